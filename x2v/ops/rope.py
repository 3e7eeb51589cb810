"""3-D rotary position embedding of the Wan DiT (time, height, width axes)."""

from __future__ import annotations

import functools

import torch


def axis_channels(head_dim: int) -> tuple[int, int, int]:
    """Real channels per axis: time gets the remainder, height and width 2*floor(d/6) each (44/42/42 for d=128)."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


@functools.lru_cache(maxsize=16)
def _rope_angles(grid: tuple[int, int, int], head_dim: int, theta: float) -> torch.Tensor:
    """Angles ``[f*h*w, head_dim/2]`` in float64, token order (frame, row, column)."""
    axes = []
    for size, n in zip(grid, axis_channels(head_dim)):
        # Each axis uses its own channel count in the exponent.
        inv_freq = theta ** (-torch.arange(0, n, 2, dtype=torch.float64) / n)
        axes.append(torch.arange(size, dtype=torch.float64)[:, None] * inv_freq)
    f, h, w = grid
    t_ang, h_ang, w_ang = axes
    angles = torch.cat(
        [
            t_ang[:, None, None, :].expand(f, h, w, -1),
            h_ang[None, :, None, :].expand(f, h, w, -1),
            w_ang[None, None, :, :].expand(f, h, w, -1),
        ],
        dim=-1,
    )
    return angles.reshape(f * h * w, head_dim // 2)


def rope_cos_sin(grid: tuple[int, int, int], head_dim: int, device: torch.device, theta: float = 10000.0):
    """cos and sin tables ``[L, 1, head_dim/2]`` in float32 (computed in float64 as the official code does)."""
    angles = _rope_angles(tuple(grid), head_dim, theta)
    return (
        angles.cos().float().unsqueeze(1).to(device, non_blocking=True),
        angles.sin().float().unsqueeze(1).to(device, non_blocking=True),
    )


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs (2j, 2j+1) of ``x`` ``[B, L, heads, d]``; returns float32."""
    x = x.float().unflatten(-1, (-1, 2))
    even, odd = x[..., 0], x[..., 1]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)
