"""umT5-XXL text encoder (encoder stack only), with the official Wan parameter names.

Differences from textbook attention that matter: no ``1/sqrt(d)`` scaling, a relative-position bias
table per layer, and pre-norm T5 RMS norms without bias or mean subtraction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class T5EncoderConfig:
    vocab: int
    dim: int
    dim_attn: int
    dim_ffn: int
    num_heads: int
    num_layers: int
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6


UMT5_XXL = T5EncoderConfig(vocab=256384, dim=4096, dim_attn=4096, dim_ffn=10240, num_heads=64, num_layers=24)


def fp16_clamp(x: torch.Tensor) -> torch.Tensor:
    """Pull fp16 overflow back into range, as the official encoder does (no-op for other dtypes)."""
    if x.dtype == torch.float16 and torch.isinf(x).any():
        limit = torch.finfo(torch.float16).max - 1000
        x = x.clamp(min=-limit, max=limit)
    return x


def relative_position_buckets(length: int, num_buckets: int, max_distance: int, device: torch.device) -> torch.Tensor:
    """Bidirectional T5 bucket of every (query, key) pair: ``[length, length]`` long.

    Half the buckets are for keys after the query; within each half, distances below ``half/2`` get
    their own bucket and larger ones share logarithmically wider buckets up to ``max_distance``.
    """
    positions = torch.arange(length, device=device)
    relative = positions[None, :] - positions[:, None]  # key position - query position
    half = num_buckets // 2
    max_exact = half // 2
    distance = relative.abs()
    # Same float32 expression as the reference so boundary cases truncate identically;
    # the clamp only keeps log() finite where the exact branch is taken anyway.
    log_bucket = max_exact + (
        torch.log(distance.clamp(min=max_exact).float() / max_exact)
        / math.log(max_distance / max_exact)
        * (half - max_exact)
    ).long()
    log_bucket = log_bucket.clamp(max=half - 1)
    return (relative > 0).long() * half + torch.where(distance < max_exact, distance, log_bucket)


class T5LayerNorm(nn.Module):
    """RMS norm: variance in float32, normalized x cast to the weight's dtype before the gain."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.rsqrt(x.float().pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * x.to(self.weight.dtype)


class T5Attention(nn.Module):
    def __init__(self, dim: int, dim_attn: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim_attn, bias=False)
        self.k = nn.Linear(dim, dim_attn, bias=False)
        self.v = nn.Linear(dim, dim_attn, bias=False)
        self.o = nn.Linear(dim_attn, dim, bias=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """``x`` [B, L, dim]; ``bias`` [B or 1, heads, L, L] added to the logits (position + padding)."""
        b, length, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, length, self.num_heads, -1).transpose(1, 2)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)  # T5: no 1/sqrt(d)
        return self.o(out.transpose(1, 2).reshape(b, length, -1))


class T5FeedForward(nn.Module):
    """Gated GELU: ``fc2(fc1(x) * gelu_tanh(gate(x)))``."""

    def __init__(self, dim: int, dim_ffn: int):
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(dim, dim_ffn, bias=False), nn.GELU(approximate="tanh"))
        self.fc1 = nn.Linear(dim, dim_ffn, bias=False)
        self.fc2 = nn.Linear(dim_ffn, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x) * self.gate(x))


class T5RelativeEmbedding(nn.Module):
    """One learned bias per (bucket, head); this layer's table."""

    def __init__(self, num_buckets: int, num_heads: int):
        super().__init__()
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, buckets: torch.Tensor) -> torch.Tensor:
        """``buckets`` [L, L] -> bias [1, heads, L, L]."""
        return self.embedding(buckets).permute(2, 0, 1).unsqueeze(0)


class T5Block(nn.Module):
    def __init__(self, config: T5EncoderConfig):
        super().__init__()
        self.norm1 = T5LayerNorm(config.dim, config.eps)
        self.attn = T5Attention(config.dim, config.dim_attn, config.num_heads)
        self.norm2 = T5LayerNorm(config.dim, config.eps)
        self.ffn = T5FeedForward(config.dim, config.dim_ffn)
        self.pos_embedding = T5RelativeEmbedding(config.num_buckets, config.num_heads)

    def forward(self, x: torch.Tensor, buckets: torch.Tensor, key_padding: torch.Tensor | None) -> torch.Tensor:
        bias = self.pos_embedding(buckets).to(x.dtype)
        if key_padding is not None:
            # Padded keys get the dtype's most negative value (not -inf), like the reference.
            bias = bias.masked_fill(key_padding[:, None, None, :], torch.finfo(x.dtype).min)
        x = fp16_clamp(x + self.attn(self.norm1(x), bias))
        return fp16_clamp(x + self.ffn(self.norm2(x)))


class T5Encoder(nn.Module):
    """umT5 encoder. State-dict keys match ``models_t5_umt5-xxl-enc-bf16.pth``."""

    OFFLOAD_BLOCKS = ("blocks",)  # streamed by x2v.runtime.offload

    def __init__(self, config: T5EncoderConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab, config.dim)
        self.blocks = nn.ModuleList(T5Block(config) for _ in range(config.num_layers))
        self.norm = T5LayerNorm(config.dim, config.eps)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``ids`` [B, L] long, ``mask`` [B, L] (1 = real token, 0 = padding) -> float32 [B, L, dim].

        Rows at padded positions are computed too (they attend to the real tokens) and are not meaningful.
        """
        config = self.config
        buckets = relative_position_buckets(ids.shape[1], config.num_buckets, config.max_distance, ids.device)
        key_padding = None if mask is None else mask == 0
        x = self.token_embedding(ids)
        for block in self.blocks:
            x = block(x, buckets, key_padding)
        return self.norm(x).float()


def trim_to_lengths(states: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Split ``[B, L, dim]`` encoder states into per-sample ``[L_i, dim]``; ``L_i = mask[i].sum()`` includes EOS."""
    lengths = mask.gt(0).sum(dim=1).tolist()
    return [sample[:length] for sample, length in zip(states, lengths)]
