"""Attention entry point shared by every network."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Global, unmasked softmax attention with scale 1/sqrt(head_dim).

    ``q`` is ``[B, Lq, heads, d]``, ``k``/``v`` are ``[B, Lk, heads, d]``; returns ``[B, Lq, heads, d]``.
    """
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)
