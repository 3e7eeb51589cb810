"""One-pass Triton kernels for the DiT's row-wise work: the norms with their neighbours and the activation
quantization of the 8-bit linears.

Each function here computes what the function of the same name in ``x2v.ops.norms`` / ``x2v.ops.quant_linear``
defines, for the arguments it takes, and returns None for the others (``fused_on_gpu`` then compiles the
definition). Why hand-written: Inductor compiles a reduction over more than 1,024 elements (a 5,120-wide
LayerNorm row, a 13,824-wide feed-forward row) as a looped kernel that reads each row twice. Profiled at 14B / 480P
on an H100 those kernels ran at a third to a half of memory speed (135 ms of LayerNorms, 57 ms of GELU +
quantization per fp8 forward, `docs/performance.md`). Here one program holds one whole row in registers: the row
is read once and written once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from x2v.ops.quant_math import FP8, QMAX, QUANT_DTYPES, fp8_scale_factor

MAX_WIDTH = 16384  # widest row held in registers (Wan's widest: the 14B feed-forward's 13,824)
FP8_MAX = tl.constexpr(QMAX["fp8"])
GELU_C = tl.constexpr(0.7978845608028654)  # sqrt(2 / pi), tanh-GELU's constant
# 1.5 * 2**23: (v + M) - M rounds a float32 |v| < 2**22 to the nearest integer, ties to even (as torch.round)
ROUND_MAGIC = tl.constexpr(12582912.0)


WARPS: int | None = None  # overrides the warps below (benchmarks/row_kernel_speed.py times 4, 8 and 16)


def _launch(width: int) -> tuple[int, int]:
    """Block size (the row padded to a power of two) and warps: about 32 values per thread."""
    block = triton.next_power_of_2(width)
    return block, WARPS or min(16, max(4, block // 1024))


def _takes(x: torch.Tensor) -> bool:
    return x.is_contiguous() and 0 < x.shape[-1] <= MAX_WIDTH


def _rows_of(t: torch.Tensor, batch: int, tokens: int, width: int) -> tuple[int, int] | None:
    """How a row r (= sample * tokens + token) of the activation finds its row of ``t`` (one row for all, per
    sample [B, 1, width] or per token [B, L, width]): ``(divisor, stride)``, t's row at ``(r // divisor) * stride``
    elements; None for a layout this does not cover."""
    if t.shape[-1] != width or t.stride(-1) != 1 or t.dim() > 3:
        return None
    t = t.view((1,) * (3 - t.dim()) + tuple(t.shape))
    samples, rows = t.shape[0], t.shape[1]
    if samples not in (1, batch) or rows not in (1, tokens):
        return None
    if rows == 1:
        return tokens, (t.stride(0) if samples > 1 else 0)
    if samples > 1 and t.stride(0) != tokens * t.stride(1):
        return None
    return 1, t.stride(1)


@triton.jit
def _scaled_to(x, scale, limit):
    """x / scale clipped to [-limit, limit]: times the scale's reciprocal, within an ulp of torch's division. An
    IEEE division per value held the quantizing LayerNorms to half of memory speed on an H100 (0.61 ms per
    14B / 480P call; 0.41 ms so)."""
    return tl.minimum(tl.maximum(x * tl.math.div_rn(1.0, scale), -limit), limit)


@triton.jit
def _quantized_row(x, QMAX_: tl.constexpr, INT8: tl.constexpr):
    """A row's symmetric 8-bit values (still float32) and its scale: its largest magnitude over QMAX_."""
    # the scale as torch computes it: an IEEE division (Triton's `/` is approximate)
    scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(x), 0), 1e-12), QMAX_)
    values = _scaled_to(x, scale, QMAX_)
    if INT8:
        values = (values + ROUND_MAGIC) - ROUND_MAGIC
    return values, scale


@triton.jit
def _layer_norm_kernel(X, Y, Gate, Weight, Bias, XOut, Out, Scales, width, eps, gate_div, gate_stride, weight_div,
                       weight_stride, bias_stride, HAS_Y: tl.constexpr, HAS_GATE: tl.constexpr,
                       ONE_PLUS: tl.constexpr, QUANT: tl.constexpr, ROUND_FP16: tl.constexpr, QMAX_: tl.constexpr,
                       INT8: tl.constexpr, BLOCK: tl.constexpr):
    """One row: x' = x + y * gate (or x + y, or x), stored when there is a y; LayerNorm(x') in float32 times
    ``weight`` (``1 + weight`` for a modulation's scale) plus ``bias``, stored in Out's dtype; with ``QUANT``,
    rounded to bf16 (fp16 with ``ROUND_FP16``) and quantized: Out's 8-bit values and the row's scale."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < width
    x = tl.load(X + row * width + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_Y:
        y = tl.load(Y + row * width + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_GATE:
            y = y * tl.load(Gate + (row // gate_div) * gate_stride + cols, mask=mask, other=0.0)
        x = x + y
        tl.store(XOut + row * width + cols, x, mask=mask)
    mean = tl.sum(x, 0) / width
    centered = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt_rn(tl.sum(centered * centered, 0) / width + eps)
    weight = tl.load(Weight + (row // weight_div) * weight_stride + cols, mask=mask, other=0.0)
    if ONE_PLUS:
        weight = weight + 1.0
    bias = tl.load(Bias + (row // weight_div) * bias_stride + cols, mask=mask, other=0.0)
    out = centered * rstd * weight + bias
    if QUANT:
        out = out.to(tl.float16 if ROUND_FP16 else tl.bfloat16).to(tl.float32)
        out, scale = _quantized_row(out, QMAX_, INT8)
        tl.store(Scales + row, scale)
    tl.store(Out + row * width + cols, out.to(Out.dtype.element_ty), mask=mask)


def _layer_norm(x, y, gate, weight, bias, eps, out_dtype, one_plus, quant):
    """The launch behind the three LayerNorm functions; None for inputs it does not take."""
    if x.dtype != torch.float32 or x.dim() != 3 or not _takes(x):
        return None
    if quant is not None and out_dtype not in (torch.bfloat16, torch.float16):
        return None
    if y is not None and (y.shape != x.shape or not y.is_contiguous()):
        return None
    batch, tokens, width = x.shape
    found = [_rows_of(t, batch, tokens, width) if t is not None else (1, 0) for t in (gate, weight, bias)]
    tensors = [t for t in (gate, weight, bias) if t is not None]
    if None in found or any(t.dtype != torch.float32 for t in tensors) or found[1][0] != found[2][0]:
        return None
    (gate_div, gate_stride), (weight_div, weight_stride), (_, bias_stride) = found
    rows = batch * tokens
    if quant is None:
        out, scales = torch.empty(x.shape, dtype=out_dtype, device=x.device), None
    else:
        out = torch.empty(rows, width, dtype=QUANT_DTYPES[quant], device=x.device)
        scales = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    x_out = torch.empty_like(x) if y is not None else x
    block, warps = _launch(width)
    _layer_norm_kernel[(rows,)](
        x, y if y is not None else x, gate if gate is not None else x, weight, bias, x_out, out,
        scales if scales is not None else x, width, eps, gate_div, gate_stride, weight_div, weight_stride,
        bias_stride, HAS_Y=y is not None, HAS_GATE=gate is not None, ONE_PLUS=one_plus, QUANT=quant is not None,
        ROUND_FP16=out_dtype == torch.float16, QMAX_=float(QMAX[quant]) if quant else 0.0, INT8=quant == "int8",
        BLOCK=block, num_warps=warps)
    out = out if scales is None else (out, scales)
    return out if y is None else (x_out, out)


def modulated_norm(x, shift, scale, eps, out_dtype, quant=None):
    return _layer_norm(x, None, None, scale, shift, eps, out_dtype, True, quant)


def residual_modulated_norm(x, y, shift, scale, eps, out_dtype, quant=None):
    return _layer_norm(x, y, None, scale, shift, eps, out_dtype, True, quant)


def gated_residual_layer_norm(x, y, gate, weight, bias, eps, out_dtype, quant=None):
    return _layer_norm(x, y, gate, weight, bias, eps, out_dtype, False, quant)


@triton.jit
def _rms_norm_rope_kernel(X, Weight, Rope, Out, Scale, width, tokens, eps, scale_factor, HEAD_DIM: tl.constexpr,
                          HAS_ROPE: tl.constexpr, FP8_SCALED: tl.constexpr, BLOCK: tl.constexpr):
    """One row: RMS norm over the whole row in float32, rounded to X's dtype, times the float32 weight; then each
    channel pair (2j, 2j+1) rotated by its token's (cos, sin); stored in Out's dtype. ``FP8_SCALED``: divided by
    the scale max |weight| * scale_factor first, which every program finds alike and the first stores."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < width
    if FP8_SCALED:  # first: stored after the row's work, the scale took twice the registers (Triton 3.9, sm_90)
        scale = tl.maximum(tl.max(tl.abs(tl.load(Weight + cols, mask=mask, other=0.0)), 0) * scale_factor, 1e-30)
        if row == 0:
            tl.store(Scale, scale)
    x = tl.load(X + row * width + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt_rn(tl.sum(x * x, 0) / width + eps)
    weight = tl.load(Weight + cols, mask=mask, other=0.0)
    normed = (x * rstd).to(X.dtype.element_ty).to(tl.float32) * weight
    if HAS_ROPE:
        real, imag = tl.split(tl.reshape(normed, (BLOCK // 2, 2)))
        # The token's table [head_dim / 2, (cos, sin)], the same in every head: channel c reads entry c % head_dim.
        table = tl.load(Rope + (row % tokens) * HEAD_DIM + cols % HEAD_DIM, mask=mask, other=0.0)
        cos, sin = tl.split(tl.reshape(table, (BLOCK // 2, 2)))
        normed = tl.reshape(tl.join(real * cos - imag * sin, real * sin + imag * cos), (BLOCK,))
    if FP8_SCALED:
        normed = _scaled_to(normed, scale, FP8_MAX)
    tl.store(Out + row * width + cols, normed.to(Out.dtype.element_ty), mask=mask)


def _rms_norm_rope(x, weight, eps, heads, rope, out_dtype, scale=None, scale_factor=0.0):
    """The launch behind both RMS norm functions (``scale``: the fp8 one's output scale); the output
    ``[B, L, heads, d]``, or None for inputs it does not take."""
    if x.dim() != 3 or not _takes(x) or weight.dtype != torch.float32 or not weight.is_contiguous():
        return None
    batch, tokens, width = x.shape
    head_dim = width // heads
    if head_dim * heads != width or head_dim % 2:
        return None
    if rope is not None and (rope.shape != (tokens, 1, head_dim // 2, 2) or not rope.is_contiguous()
                             or rope.dtype != torch.float32):
        return None
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    block, warps = _launch(width)
    _rms_norm_rope_kernel[(batch * tokens,)](
        x, weight, rope if rope is not None else weight, out, scale if scale is not None else weight, width, tokens,
        eps, scale_factor, HEAD_DIM=head_dim, HAS_ROPE=rope is not None, FP8_SCALED=scale is not None, BLOCK=block,
        num_warps=warps)
    return out.view(batch, tokens, heads, head_dim)


def rms_norm_rope(x, weight, eps, heads, rope, out_dtype):
    return _rms_norm_rope(x, weight, eps, heads, rope, out_dtype)


def rms_norm_rope_fp8(x, weight, eps, heads, rope):
    scale = torch.empty(1, 1, 1, 1, dtype=torch.float32, device=x.device)
    out = _rms_norm_rope(x, weight, eps, heads, rope, FP8, scale, fp8_scale_factor(x.shape[-1]))
    return None if out is None else (out, scale)


@triton.jit
def _quantize_kernel(X, Values, Scales, width, QMAX_: tl.constexpr, GELU: tl.constexpr, INT8: tl.constexpr,
                     BLOCK: tl.constexpr):
    """One row (after tanh-GELU, rounded to X's dtype as the 16-bit activation would be): its largest magnitude
    over QMAX_ is the row's scale; values / scale rounded to int8 or fp8."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < width
    x = tl.load(X + row * width + cols, mask=mask, other=0.0).to(tl.float32)
    if GELU:
        # tanh(u) = 1 - 2 / (exp(2u) + 1): exact at both ends (exp overflowing to inf gives 1)
        u = GELU_C * (x + 0.044715 * x * x * x)
        x = (0.5 * x * (2.0 - 2.0 / (tl.exp(2.0 * u) + 1.0))).to(X.dtype.element_ty).to(tl.float32)
    values, scale = _quantized_row(x, QMAX_, INT8)
    tl.store(Values + row * width + cols, values.to(Values.dtype.element_ty), mask=mask)
    tl.store(Scales + row, scale)


def quantize_activations(x, kind, gelu=False):
    if x.dim() != 2 or not _takes(x) or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return None
    rows, width = x.shape
    values = torch.empty(x.shape, dtype=QUANT_DTYPES[kind], device=x.device)
    scales = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    block, warps = _launch(width)
    _quantize_kernel[(rows,)](x, values, scales, width, QMAX_=float(QMAX[kind]), GELU=gelu, INT8=kind == "int8",
                              BLOCK=block, num_warps=warps)
    return values, scales
