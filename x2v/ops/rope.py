"""3-D rotary position embedding of the Wan DiT (time, height, width axes)."""

from __future__ import annotations

import functools

import torch


def axis_channels(head_dim: int) -> tuple[int, int, int]:
    """Real channels per axis: time gets the remainder, height and width 2*floor(d/6) each (44/42/42 for d=128)."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


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


@functools.lru_cache(maxsize=16)
def rope_rotations(grid: tuple[int, int, int], head_dim: int, device: torch.device, theta: float = 10000.0):
    """Rotations ``[L, 1, head_dim/2, 2]``: (cos, sin) in float32 of angles computed in float64 as officially.

    Cached per grid and device: every step of a generation reuses them.
    """
    angles = _rope_angles(grid, head_dim, theta)
    return torch.stack([angles.cos(), angles.sin()], dim=-1).float().unsqueeze(1).to(device)


def apply_rope(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs (2j, 2j+1) of ``x`` ``[B, L, heads, d]`` (a complex multiply written out in
    real arithmetic, which compilers fuse); float32 out."""
    real, imag = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = rotations.unbind(-1)
    return torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1).flatten(-2)
