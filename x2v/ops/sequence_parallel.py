"""Sequence parallelism over the video tokens: each rank of a group holds one contiguous part of the tokens.

Everything in a DiT block works token by token except self-attention, which needs every token:

* **Ulysses**: an all-to-all turns "my tokens, all heads" into "all tokens, my heads" before the attention and back
  after it; the configured attention kernel runs in between on whole sequences. The heads must divide by the size.
* **Ring**: the K/V parts travel around the ring while each rank attends its queries to the part it holds, merging
  the partial results by their log-sum-exp (online softmax). Any head count; torch's fused attention per part (the
  configured kernels do not return the log-sum-exp).

Lengths that do not divide by the size are padded at the end; the padded tokens are cut off before any attention
sees them as keys (Ulysses) or never sent as keys (ring), so they do not influence the real ones.
Cross-attention needs no exchange: every rank has the whole text (and CLIP image tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from x2v.ops.attention import attention

ULYSSES, RING = "ulysses", "ring"
KINDS = (ULYSSES, RING)


@dataclass(frozen=True)
class SequenceParallel:
    """A process group that splits the video tokens, and how its self-attention exchanges them."""

    group: dist.ProcessGroup
    kind: str = ULYSSES

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"sequence-parallel attention {self.kind!r} is not one of {', '.join(KINDS)}")

    def shard(self, length: int) -> Shard:
        """This rank's part of a sequence of ``length`` tokens."""
        return Shard(self.group, self.kind, dist.get_rank(self.group), dist.get_world_size(self.group), length)


@dataclass(frozen=True)
class Shard:
    group: dist.ProcessGroup
    kind: str
    rank: int  # in the group
    size: int
    length: int  # real tokens; the sequence is padded to size * chunk

    @property
    def chunk(self) -> int:
        return math.ceil(self.length / self.size)

    def split(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's ``chunk`` rows of ``x`` along ``dim`` (the last rank's padded with zeros)."""
        padding = self.chunk * self.size - x.shape[dim]
        if padding:
            x = torch.cat([x, x.new_zeros(*x.shape[:dim], padding, *x.shape[dim + 1:])], dim)
        return x.narrow(dim, self.rank * self.chunk, self.chunk).contiguous()

    def gather(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Every rank's part of ``x`` along ``dim``, in order, padding removed: the whole sequence on every rank."""
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim).narrow(dim, 0, self.length)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
        """Self-attention of this rank's queries ``[B, chunk, heads, d]`` over the whole sequence."""
        if self.kind == ULYSSES:
            return self._ulysses(q, k, v, backend)
        return self._ring(q, k, v)

    # --- Ulysses ------------------------------------------------------------------------------------------------

    def _all_to_all(self, x: torch.Tensor) -> torch.Tensor:
        """Exchange the first dim's ``size`` parts: part i goes to rank i, and rank i's part j arrives as part i."""
        x = x.contiguous()
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=self.group)
        return out

    def _to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, chunk, heads, d]`` -> ``[B, size * chunk, heads / size, d]``."""
        b, c, h, d = x.shape
        parts = x.reshape(b, c, self.size, h // self.size, d).permute(2, 0, 1, 3, 4)  # per destination rank
        return self._all_to_all(parts).permute(1, 0, 2, 3, 4).reshape(b, self.size * c, h // self.size, d)

    def _to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, size * chunk, heads / size, d]`` -> ``[B, chunk, heads, d]``."""
        b, n, h, d = x.shape
        parts = x.reshape(b, self.size, n // self.size, h, d).permute(1, 0, 2, 3, 4)
        return self._all_to_all(parts).permute(1, 2, 0, 3, 4).reshape(b, n // self.size, self.size * h, d)

    def _ulysses(self, q, k, v, backend: str) -> torch.Tensor:
        heads = q.shape[2]
        if heads % self.size:
            raise ValueError(f"Ulysses sequence parallelism splits the {heads} attention heads over {self.size} "
                             f"ranks; they do not divide: use seq_p_attn_type \"ring\" or another seq_p_size")
        q, k, v = map(self._to_heads, (q, k, v))
        n = self.length  # the padded tokens at the end are cut off: no query or key sees them
        out = attention(q[:, :n], k[:, :n], v[:, :n], backend)
        return self._to_tokens(F.pad(out, (0, 0, 0, 0, 0, q.shape[1] - n)))

    # --- ring ---------------------------------------------------------------------------------------------------

    def _ring(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = lse = None
        kv = torch.stack([k, v])
        following = dist.get_global_rank(self.group, (self.rank + 1) % self.size)
        preceding = dist.get_global_rank(self.group, (self.rank - 1) % self.size)
        for step in range(self.size):
            pending = []
            if step + 1 < self.size:  # pass the part on while attending to it
                arriving = torch.empty_like(kv)
                pending = dist.batch_isend_irecv([dist.P2POp(dist.isend, kv, following, self.group),
                                                  dist.P2POp(dist.irecv, arriving, preceding, self.group)])
            owner = (self.rank - step) % self.size
            real = min(self.chunk, self.length - owner * self.chunk)  # the owner's unpadded tokens
            if real > 0:
                part_out, part_lse = attention_with_lse(q, kv[0, :, :real], kv[1, :, :real])
                out, lse = (part_out, part_lse) if out is None else merge_partial(out, lse, part_out, part_lse)
            for request in pending:
                request.wait()
            if pending:
                kv = arriving
        return out.to(v.dtype)


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention ``[B, Lq, heads, d]`` (float32) and its log-sum-exp ``[B, Lq, heads]`` (float32), by
    torch's fused kernels (the memory-efficient one on CUDA, flash on CPU): no ``Lq x Lk`` matrix in memory."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if q.device.type == "cuda":
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[:2]
    return out.transpose(1, 2).float(), lse[..., :q.shape[2]].transpose(1, 2).float()


def merge_partial(out: torch.Tensor, lse: torch.Tensor, part: torch.Tensor, part_lse: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over two key sets from each one's result and log-sum-exp (the online-softmax step)."""
    total = torch.logaddexp(lse, part_lse)
    merged = out * torch.exp(lse - total)[..., None] + part * torch.exp(part_lse - total)[..., None]
    return merged, total
