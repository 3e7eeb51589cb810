"""The DiT's norms and residual adds, each with its neighbours (modulation, RoPE, the cast to the next layer's
dtype, the residual add before the norm) fused into one pass on GPUs.

Precision as in the official code: the residual stream, statistics and affine terms in float32, the
RMS-normalised values rounded to the input's dtype before their float32 gain, RoPE in float32; a norm's result is
rounded once, to the dtype the next layer computes in (and, for 8-bit layers, quantized per row in the same pass).
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from x2v.ops.fused import fused_on_gpu
from x2v.ops.quant_linear import row_quantized
from x2v.ops.quant_math import FP8, FP8_MAX, fp8_scale_factor
from x2v.ops.rope import apply_rope


def layer_norm(x: torch.Tensor, eps: float, weight=None, bias=None) -> torch.Tensor:
    """LayerNorm over the last dimension in float32."""
    return F.layer_norm(x.float(), (x.shape[-1],), weight, bias, eps)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm(x) * (1 + scale) + shift in float32.

    When one (shift, scale) pair serves every token (batch 1, one timestep), it is the norm's own affine
    transform: one pass over the tokens even unfused.
    """
    if shift.shape[0] == 1 and shift.shape[1] == 1:
        return layer_norm(x, eps, (1 + scale).flatten(), shift.flatten())
    return torch.addcmul(shift, layer_norm(x, eps), 1 + scale)


def for_next_layer(h: torch.Tensor, out_dtype: torch.dtype, quant: str | None):
    """A norm's result in the dtype the next layer computes in; with ``quant`` (``int8`` / ``fp8``) that, quantized
    per row for 8-bit matmuls: ``(values [rows, width], scales [rows, 1])``. Fused, the 16-bit rows are never
    written and read back."""
    h = h.to(out_dtype)
    return h if quant is None else row_quantized(h.reshape(-1, h.shape[-1]), quant)


@fused_on_gpu(row_kernel=True)
def modulated_norm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                   out_dtype: torch.dtype, quant: str | None = None):
    return for_next_layer(modulate(x, shift, scale, eps), out_dtype, quant)


@fused_on_gpu
def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """The float32 stream ``x`` plus ``y * gate``. Eager, the gate's broadcast across mixed dtypes runs as a slow
    generic kernel (1.4 ms at 14B / 480P on an H100 against 0.6 ms for one pass at memory speed)."""
    return torch.addcmul(x, y, gate)


@fused_on_gpu(row_kernel=True)
def gated_residual_layer_norm(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor,
                              bias: torch.Tensor, eps: float, out_dtype: torch.dtype, quant: str | None = None):
    """``(x', LayerNorm(x') for the next layer)`` with ``x' = x + y * gate``: the stream is read once for both."""
    x = torch.addcmul(x, y, gate)
    return x, for_next_layer(layer_norm(x, eps, weight, bias), out_dtype, quant)


@fused_on_gpu(row_kernel=True)
def residual_modulated_norm(x: torch.Tensor, y: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                            eps: float, out_dtype: torch.dtype, quant: str | None = None):
    """``(x', modulated_norm(x'))`` with ``x' = x + y``."""
    x = x + y
    return x, for_next_layer(modulate(x, shift, scale, eps), out_dtype, quant)


def rms_norm_rope_float(x: torch.Tensor, weight: torch.Tensor, eps: float, heads: int,
                        rope: torch.Tensor | None) -> torch.Tensor:
    """RMS norm over the whole feature vector ``[B, L, dim]`` (across heads), split into ``[B, L, heads, d]``,
    rotated by ``rope`` when given; float32."""
    # rms_norm computes in float32 and rounds to x's dtype, as the official code does before its gain.
    out = (F.rms_norm(x, (x.shape[-1],), eps=eps) * weight).unflatten(-1, (heads, -1))
    return out if rope is None else apply_rope(out, rope)


@fused_on_gpu(row_kernel=True)
def rms_norm_rope(x: torch.Tensor, weight: torch.Tensor, eps: float, heads: int, rope: torch.Tensor | None,
                  out_dtype: torch.dtype) -> torch.Tensor:
    """``rms_norm_rope_float`` rounded to ``out_dtype``."""
    return rms_norm_rope_float(x, weight, eps, heads, rope).to(out_dtype)


@fused_on_gpu(row_kernel=True)
def rms_norm_rope_fp8(x: torch.Tensor, weight: torch.Tensor, eps: float, heads: int,
                      rope: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``rms_norm_rope_float`` in fp8 e4m3 with one scale ``[1, 1, 1, 1]`` for the whole tensor (values * scale),
    known before the values: max |weight| * ``fp8_scale_factor(dim)`` bounds them. An attention's Q goes straight
    to fp8 this way (``cudnn_fp8``): no pass over Q to find its largest value, no 16-bit Q written. fp8 e4m3 is a
    floating-point type, so a scale above the largest value costs no precision, only range at the bottom."""
    scale = (weight.abs().amax().float() * fp8_scale_factor(x.shape[-1])).clamp_min(1e-30).reshape(1, 1, 1, 1)
    values = rms_norm_rope_float(x, weight, eps, heads, rope) / scale
    return values.clamp(-FP8_MAX, FP8_MAX).to(FP8), scale
