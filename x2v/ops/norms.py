"""The DiT's norms, each with the dtype cast (and RoPE) that follows it, fused into one pass on GPUs.

Precision as in the official code: statistics and affine terms in float32, the RMS-normalised values rounded to
the input's dtype before their float32 gain, RoPE in float32; the result is rounded once, to the dtype the next
layer computes in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from x2v.ops.fused import fused_on_gpu
from x2v.ops.rope import apply_rope


def layer_norm(x: torch.Tensor, eps: float, weight=None, bias=None) -> torch.Tensor:
    """LayerNorm over the last dimension in float32."""
    return F.layer_norm(x.float(), (x.shape[-1],), weight, bias, eps)


@fused_on_gpu(dynamic=None)
def layer_norm_to(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                  out_dtype: torch.dtype) -> torch.Tensor:
    """``layer_norm`` rounded to ``out_dtype``."""
    return layer_norm(x, eps, weight, bias).to(out_dtype)


@fused_on_gpu(dynamic=None)
def modulated_norm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                   out_dtype: torch.dtype) -> torch.Tensor:
    """LayerNorm(x) * (1 + scale) + shift in float32, rounded to ``out_dtype``.

    When one (shift, scale) pair serves every token (batch 1, one timestep), it is the norm's own affine
    transform: one pass over the tokens even unfused.
    """
    if shift.shape[0] == 1 and shift.shape[1] == 1:
        out = layer_norm(x, eps, (1 + scale).flatten(), shift.flatten())
    else:
        out = torch.addcmul(shift, layer_norm(x, eps), 1 + scale)
    return out.to(out_dtype)


@fused_on_gpu(dynamic=None)
def rms_norm_rope(x: torch.Tensor, weight: torch.Tensor, eps: float, heads: int, rope: torch.Tensor | None,
                  out_dtype: torch.dtype) -> torch.Tensor:
    """RMS norm over the whole feature vector ``[B, L, dim]`` (across heads), split into ``[B, L, heads, d]``,
    rotated by ``rope`` when given, rounded to ``out_dtype``."""
    # rms_norm computes in float32 and rounds to x's dtype, as the official code does before its gain.
    out = (F.rms_norm(x, (x.shape[-1],), eps=eps) * weight).unflatten(-1, (heads, -1))
    return (out if rope is None else apply_rope(out, rope)).to(out_dtype)
