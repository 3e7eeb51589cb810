"""Quantization maths shared by the 8-bit layers, the kernels, the loaders and the converter: the 8-bit types,
symmetric per-output-channel quantization (rounded to nearest or stochastically) and dequantization.

``W = q * scale``, ``scale = max(amax(|row|), 1e-5) / qmax`` per output channel (LightX2V's rule, docs/formats.md).
"""

from __future__ import annotations

import math
import zlib
from typing import NamedTuple

import torch

QUANT_DTYPES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
QMAX = {"int8": 127.0, "fp8": 448.0}  # symmetric range of each weight kind
MIN_AMAX = 1e-5  # LightX2V's floor for an all-zero row
FP8, FP8_MAX = QUANT_DTYPES["fp8"], QMAX["fp8"]


def quantize_weight(
    weight: torch.Tensor, kind: str, *, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """LightX2V per-output-channel symmetric quantization: ``(q [out, in] int8/fp8, scale [out, 1] float32)``.

    ``scale = max(amax(|row|), 1e-5) / qmax``; values are rounded to nearest, or stochastically when a
    ``generator`` is given. Computed in float32 on the weight's device.
    """
    if kind not in QMAX:
        raise ValueError(f"unknown weight kind {kind!r}; expected one of {', '.join(QMAX)}")
    rows = weight.float().reshape(weight.shape[0], -1)
    scale = rows.abs().amax(dim=1, keepdim=True).clamp_(min=MIN_AMAX) / QMAX[kind]
    values = (rows / scale).clamp_(-QMAX[kind], QMAX[kind])
    if generator is not None:
        q = _round_stochastic(values, kind, generator)
    elif kind == "int8":
        q = values.round_().to(torch.int8)
    else:
        q = values.to(torch.float8_e4m3fn)  # round to nearest even
    return q.reshape(weight.shape), scale


def _round_stochastic(values: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    """Round each value up or down to a neighbour on the ``kind`` grid, with probability by distance: the expected
    result is the value itself, so small additions (a LoRA merged into fp8 weights) survive on average."""
    noise = torch.rand(values.shape, generator=generator, device=generator.device).to(values.device)
    if kind == "int8":
        return torch.floor(values + noise).clamp_(-128, 127).to(torch.int8)
    nearest = values.to(torch.float8_e4m3fn)
    # The other neighbour: one step of the fp8 grid towards the value (bit patterns are sign + magnitude).
    bits = nearest.view(torch.uint8).to(torch.int16)
    negative, magnitude = bits >= 128, bits & 0x7F
    toward_up = values > nearest.float()
    step_away_from_zero = toward_up != negative
    magnitude = torch.where(step_away_from_zero, magnitude + 1, magnitude - 1)
    crosses_zero = magnitude < 0  # stepping below zero lands on the smallest value of the other sign
    negative = torch.where(crosses_zero, ~negative, negative)
    magnitude = torch.where(crosses_zero, 1, magnitude)
    other = (magnitude + negative * 128).to(torch.uint8).view(torch.float8_e4m3fn)
    near, far = nearest.float(), other.float()
    gap = (far - near).abs()
    take_far = (values != near) & (noise * gap < (values - near).abs())
    return torch.where(take_far, other, nearest)


def merge_rounding(key: str, kind: str, device: torch.device | str) -> torch.Generator | None:
    """How a weight a LoRA changed is rounded back to ``kind``: fp8 stochastically (docs/pitfalls.md B03: small changes
    survive on average), seeded by the tensor's name so the same files give the same weights whatever else is
    merged; int8 to nearest (its steps are fine enough)."""
    return torch.Generator(device).manual_seed(zlib.crc32(key.encode())) if kind == "fp8" else None


def dequantize_weight(
    q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """``q * scale`` computed in float32 (scales never rounded through bf16), cast once to ``dtype``."""
    scale = scale.to(device=device, dtype=torch.float32)
    # Per output channel: broadcast over every other dimension (also for conv weights); per tensor: a scalar.
    scale = scale.reshape(-1, *[1] * (q.dim() - 1)) if scale.numel() > 1 else scale.reshape(())
    return q.to(device).to(torch.float32).mul_(scale).to(dtype)  # moved as 1-byte values, widened on arrival


def per_channel_scale(scale: torch.Tensor, out_channels: int) -> torch.Tensor:
    """Any stored weight scale (per tensor or ``[out, 1]``) as a float32 ``[out, 1]`` per-channel scale."""
    return scale.to(torch.float32).reshape(-1, 1).expand(out_channels, 1).contiguous()


def fp8_scale_factor(width: int) -> float:
    """What max |weight| is multiplied by for ``rms_norm_rope_fp8``'s scale: RMS-normalised values have a mean
    square of 1, so no value, and no channel pair's length (which a rotation keeps), exceeds sqrt(width); a
    margin covers their rounding to 16 bits and RoPE's float32 tables."""
    return math.sqrt(width) * (1 + 2 ** -6) / FP8_MAX


class Fp8Query(NamedTuple):
    """Q in fp8 e4m3 ``[B, Lq, heads, d]`` with one float32 scale ``[1, 1, 1, 1]`` (Q = values * scale)."""

    values: torch.Tensor
    scale: torch.Tensor

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.values.float() * self.scale).to(dtype)
