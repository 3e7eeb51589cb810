"""8-bit attention in Triton: attention type ``sage_triton``, x2v's own kernel for GPUs without SageAttention 2.

SageAttention's recipe: Q and K go to int8 (Q per token, K per block of keys after subtracting its mean over the
tokens, which leaves softmax unchanged and shrinks the range), so Q·Kᵀ is an exact int32 product; P = exp(S - max)
goes to fp8 e4m3 scaled by 448 (its values are in [0, 1]) and V to fp8 per channel (after subtracting its mean over
the tokens, added back at the end since each row of P sums to 1), so P·V runs at the 8-bit tensor-core rate too.
Both matmuls of flash attention at twice the bf16 rate. The price is fp8's 3 mantissa bits: on random inputs
(zero-mean values, the worst case) the output is ~4 % off float32 attention in relative L2, ~1 % with P·V in bf16;
real values have offsets, which the smoothing removes exactly (docs/performance.md, tests/test_sage_triton.py).

The quantization is plain torch (compiled on GPUs); the attention loop is the Triton kernel below.
``pv_fp8=False`` keeps P·V in bf16 (more accurate, half the rate for that matmul). Needs head dims that are powers
of two (Wan: 128). CPU tests run the kernel in Triton's interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from x2v.ops.fused import fused_on_gpu
from x2v.ops.quant_math import FP8, FP8_MAX, QMAX, QUANT_DTYPES

TOP = {QUANT_DTYPES[kind]: top for kind, top in QMAX.items()}  # the largest value of each 8-bit type
LOG2_E = 1.4426950408889634
LOG2_FP8_MAX = tl.constexpr(math.log2(FP8_MAX))  # P is scaled by 448 inside the kernel (see _attend_block)


@dataclass(frozen=True)
class Tiling:
    """Launch settings of the kernel: rows of queries and keys per step, warps, pipeline stages."""

    block_m: int = 128
    block_n: int = 128
    num_warps: int = 8
    num_stages: int = 3


# For Hopper: the fastest of CANDIDATES at Wan 14B's self-attention on an H100 (33.0 ms against 35.0-43.1 ms for
# the others, `benchmarks/dit_step.py --attention-check sage_triton`, docs/performance.md)
TILING = Tiling(64, 128, 4, 3)
# Before Hopper the tensor-core instructions are warp-level (mma.sync): this one builds without spills for Ada
# (fp8) and Ampere (bf16 P·V), where 128 x 128 spills.
TILING_BEFORE_HOPPER = Tiling(128, 64, 8, 3)
FP8_CAPABILITY = (8, 9)  # fp8 tensor cores: Ada and later; Ampere runs P·V in bf16
# Each builds for sm_90 without spilled registers (benchmarks/triton_build.py).
CANDIDATES = (Tiling(128, 128, 8, 3), Tiling(128, 128, 8, 4), Tiling(128, 128, 8, 2), Tiling(128, 64, 8, 3),
              Tiling(128, 64, 8, 4), Tiling(64, 128, 4, 3))


def _amax_scale(amax: torch.Tensor, top: float) -> torch.Tensor:
    return amax.float().clamp_min(1e-30) / top  # an all-zero row or block quantizes to zeros, not NaN


def _pad_tokens(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """``x`` [B, H, L, ...] with L padded by zeros to a multiple of ``multiple``."""
    pad = -x.shape[2] % multiple
    return F.pad(x, (0, 0) * (x.dim() - 3) + (0, pad)) if pad else x


def _to_8bit(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    x = x / scale
    return (x.round() if dtype == torch.int8 else x).to(dtype)


@fused_on_gpu
def quantize_q(q: torch.Tensor, block_m: int, dtype: torch.dtype = torch.int8) -> tuple[torch.Tensor, torch.Tensor]:
    """``q`` [B, L, H, D] -> 8-bit [B, H, L', D] and per-token scales [B, H, L'] that include softmax's 1/sqrt(D)
    and log2(e) (the kernel uses exp2); L' pads L to a multiple of ``block_m``."""
    q = _pad_tokens(q.transpose(1, 2).float(), block_m)
    scale = _amax_scale(q.abs().amax(-1), TOP[dtype])
    q8 = _to_8bit(q, scale[..., None], dtype).contiguous()  # the kernel's layout, padded or not
    return q8, scale * (LOG2_E / math.sqrt(q.shape[-1]))


@fused_on_gpu
def quantize_k(k: torch.Tensor, block_n: int, dtype: torch.dtype = torch.int8) -> tuple[torch.Tensor, torch.Tensor]:
    """``k`` [B, L, H, D] minus its mean over the tokens -> 8-bit [B, H, L', D] and one scale per ``block_n``
    keys [B, H, L'/block_n]."""
    k = k.transpose(1, 2).float()
    k = _pad_tokens(k - k.mean(2, keepdim=True), block_n)
    blocks = k.unflatten(2, (-1, block_n))
    scale = _amax_scale(blocks.abs().amax((-1, -2)), TOP[dtype])
    k8 = _to_8bit(blocks, scale[..., None, None], dtype).flatten(2, 3).contiguous()
    return k8, scale


@fused_on_gpu
def quantize_v(v: torch.Tensor, block_n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``v`` [B, L, H, D] minus its mean over the tokens -> fp8 transposed [B, H, D, L'] (the layout the fp8
    tensor-core instruction reads), per-channel scales [B, H, D] and the mean [B, H, D]."""
    v = v.transpose(1, 2).float()
    mean = v.mean(2)
    v = _pad_tokens(v - mean[:, :, None], block_n)
    scale = _amax_scale(v.abs().amax(2), FP8_MAX)
    v8 = _to_8bit(v, scale[:, :, None], FP8).transpose(2, 3).contiguous()
    return v8, scale, mean


@triton.jit
def _attend_block(acc, l_i, m_i, q, q_scale, k_base, k_scale_base, v_base, start_n, kv_len, kv_padded, stride_vl,
                  HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, PV_FP8: tl.constexpr, MASK: tl.constexpr):
    """One block of keys: online softmax update of (acc, l_i, m_i)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    k = tl.load(k_base + offs_n[None, :] * HEAD_DIM + offs_d[:, None])  # Kᵀ tile [D, N]; K is zero-padded
    s = tl.dot(q, k).to(tl.float32)
    if MASK:
        s = tl.where(offs_n[None, :] < kv_len, s, float("-inf"))
    row_scale = q_scale * tl.load(k_scale_base + start_n // BLOCK_N)  # > 0, so row maxima commute with it
    m_new = tl.maximum(m_i, tl.max(s, 1) * row_scale)
    # P = exp2(S - max) times 448 (fp8's largest value, so P uses fp8's whole range): the factor is an added
    # log2(448) in the exponent, and it cancels in acc / l_i.
    p = tl.math.exp2(s * row_scale[:, None] - (m_new - LOG2_FP8_MAX)[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if PV_FP8:
        v = tl.load(v_base + offs_n[:, None] + offs_d[None, :] * kv_padded)  # from Vᵀ [D, L']: tile [N, D]
        # Hopper's fp8 tensor cores add with ~14-bit precision: the block's products go to a fresh accumulator that
        # is added to acc in float32 (SageAttention 2's two-level accumulation), not summed into acc 32k times.
        acc = tl.dot(p.to(tl.float8e4nv), v, acc, max_num_imprecise_acc=BLOCK_N)
    else:
        v_ptrs = v_base + offs_n[:, None] * stride_vl + offs_d[None, :]
        v = tl.load(v_ptrs, mask=offs_n[:, None] < kv_len, other=0.0) if MASK else tl.load(v_ptrs)
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_new


@triton.jit
def _attention_kernel(Q, QScale, K, KScale, V, VScale, VMean, Out, q_len, heads, q_padded,
                      stride_vb, stride_vl, stride_vh, stride_ob, stride_ol, stride_oh,
                      KV_LEN: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      PV_FP8: tl.constexpr):
    """One block of queries of one (batch, head) against all keys. KV_LEN is a compile-time constant (a
    generation has two or three: video, text and image tokens), so the loop's bounds are known."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // heads, bh % heads
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + bh * q_padded * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :])
    q_scale = tl.load(QScale + bh * q_padded + offs_m)
    kv_padded = (KV_LEN + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    k_base = K + bh * kv_padded * HEAD_DIM
    k_scale_base = KScale + bh * (kv_padded // BLOCK_N)
    if PV_FP8:
        v_base = V + bh * HEAD_DIM * kv_padded
    else:
        v_base = V + b * stride_vb + h * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    full_blocks_end = KV_LEN // BLOCK_N * BLOCK_N
    for start_n in range(0, full_blocks_end, BLOCK_N):
        acc, l_i, m_i = _attend_block(acc, l_i, m_i, q, q_scale, k_base, k_scale_base, v_base, start_n, KV_LEN,
                                      kv_padded, stride_vl, HEAD_DIM, BLOCK_N, PV_FP8, False)
    if full_blocks_end < KV_LEN:  # the last, partial block of keys
        acc, l_i, m_i = _attend_block(acc, l_i, m_i, q, q_scale, k_base, k_scale_base, v_base, full_blocks_end,
                                      KV_LEN, kv_padded, stride_vl, HEAD_DIM, BLOCK_N, PV_FP8, True)

    out = acc / l_i[:, None]
    if PV_FP8:
        out = out * tl.load(VScale + bh * HEAD_DIM + offs_d)[None, :]
        out += tl.load(VMean + bh * HEAD_DIM + offs_d)[None, :]
    out_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ol + offs_d[None, :]
    tl.store(out_ptrs, out.to(Out.dtype.element_ty), mask=offs_m[:, None] < q_len)


# Inside compiled blocks (use_compile) the attention runs as it is, between two graphs: tracing into the launch
# and the quantization buys nothing (the kernel is one call, the quantization compiles on its own).
@torch.compiler.disable
def sage_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tiling: Tiling | None = None,
                   qk_dtype: torch.dtype = torch.int8, pv_fp8: bool | None = None) -> torch.Tensor:
    """Softmax attention with 8-bit matmuls: ``q`` [B, Lq, H, D], ``k``/``v`` [B, Lk, H, D] -> [B, Lq, H, D] in
    ``q``'s dtype (scale 1/sqrt(D), no mask). ``qk_dtype``: int8 (exact products) or fp8 e4m3 for Q and K;
    ``pv_fp8``: P·V in fp8 (default where the card has fp8 tensor cores) or in ``q``'s dtype."""
    default_tiling, default_pv_fp8 = defaults(device_capability(q.device))
    tiling = default_tiling if tiling is None else tiling
    pv_fp8 = default_pv_fp8 if pv_fp8 is None else pv_fp8
    launch = kernel_launch(q, k, v, tiling, qk_dtype, pv_fp8)
    _attention_kernel[launch.grid](*launch.args, **launch.constants, **launch.options)
    return launch.out


def defaults(capability: tuple[int, int]) -> tuple[Tiling, bool]:
    """The tiling and whether P·V runs in fp8, for a card of this compute capability."""
    return (TILING if capability >= (9, 0) else TILING_BEFORE_HOPPER), capability >= FP8_CAPABILITY


@functools.cache
def device_capability(device: torch.device) -> tuple[int, int]:
    """The card's compute capability; Hopper's for CPU tensors (Triton's interpreter in the tests)."""
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else (9, 0)


@dataclass
class Launch:
    grid: tuple[int, int]
    args: list  # run-time arguments, in the kernel's order
    constants: dict  # compile-time ones
    options: dict  # num_warps, num_stages
    out: torch.Tensor


def kernel_launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tiling: Tiling, qk_dtype: torch.dtype,
                  pv_fp8: bool) -> Launch:
    """Quantize the inputs and lay out the kernel's launch (also what `benchmarks/triton_build.py` compiles)."""
    batch, q_len, heads, head_dim = q.shape
    kv_len = k.shape[1]
    if head_dim & (head_dim - 1) or head_dim < 16:
        raise ValueError(f"sage_triton needs a head dim that is a power of two >= 16, got {head_dim}")
    q8, q_scale = quantize_q(q, tiling.block_m, qk_dtype)
    k8, k_scale = quantize_k(k, tiling.block_n, qk_dtype)
    if pv_fp8:
        v_in, v_scale, v_mean = quantize_v(v, tiling.block_n)
    else:
        v_in, v_scale, v_mean = v.to(q.dtype).contiguous(), None, None
    out = torch.empty_like(q)
    args = [q8, q_scale, k8, k_scale, v_in, v_scale, v_mean, out, q_len, heads, q8.shape[2],
            v_in.stride(0), v_in.stride(1), v_in.stride(2), out.stride(0), out.stride(1), out.stride(2)]
    constants = dict(KV_LEN=kv_len, HEAD_DIM=head_dim, BLOCK_M=tiling.block_m, BLOCK_N=tiling.block_n,
                     PV_FP8=pv_fp8)
    return Launch((triton.cdiv(q_len, tiling.block_m), batch * heads), args, constants,
                  dict(num_warps=tiling.num_warps, num_stages=tiling.num_stages), out)
