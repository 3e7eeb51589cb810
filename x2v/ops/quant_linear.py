"""Linear layers whose weights stay int8 / fp8 in memory (per-output-channel scales, float32).

Two ways to run one, chosen per call from the input's device:

* ``w8a8``: activations quantized per token (symmetric, dynamic) and multiplied in 8 bits —
  fp8 through ``torch._scaled_mm`` (compute capability 8.9+), int8 through ``torch._int_mm`` (8.0+) —
  with both scales applied in float32: ``out = (x_q * s_x) @ (W_q * s_w)^T + b``.
* ``weight-only``: the layer's weight is dequantized to the compute dtype for this call only (CPU, older
  GPUs, shapes the 8-bit kernels refuse). Slower, same memory.

Every LightX2V per-channel scheme (``fp8-vllm``, ``int8-sgl``, ``fp8-q8f``, ``int8-torchao``, ``*-triton`` ...) is
this computation with another library's kernel, so all of them run here without those libraries.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from x2v.errors import first_line
from x2v.ops.fused import fused_enabled, fused_on_gpu, is_bare
from x2v.ops.quant_math import QMAX, QUANT_DTYPES, dequantize_weight

log = logging.getLogger(__name__)

AUTO, W8A8, WEIGHT_ONLY = "auto", "w8a8", "weight-only"
MIN_CAPABILITY = {"fp8": (8, 9), "int8": (8, 0)}
INT_MM_MIN_ROWS = 17  # torch._int_mm on CUDA wants more than 16 rows
# Device types where torch._scaled_mm adds the bias in its epilogue with row-wise scales (one pass over the
# output saved); found by w8a8_available's probe, which runs before any compiling.
SCALED_MM_ADDS_BIAS: dict[str, bool] = {}


def row_quantized(x: torch.Tensor, kind: str, gelu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric quantization of a 2-D activation (after tanh-GELU with ``gelu``): ``(x_q, scale [rows, 1]
    float32)``."""
    if gelu:
        x = F.gelu(x, approximate="tanh")
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / QMAX[kind]
    values = (x.float() / scale).clamp(-QMAX[kind], QMAX[kind])
    return (values.round() if kind == "int8" else values).to(QUANT_DTYPES[kind]), scale


@fused_on_gpu(row_kernel=True)
def quantize_activations(x: torch.Tensor, kind: str, gelu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``row_quantized``, in one pass on GPUs."""
    return row_quantized(x, kind, gelu)


@dataclass
class QuantizedInput:
    """An activation quantized per row for the 8-bit matmuls; made once when several layers read it."""

    values: torch.Tensor  # [rows, in] int8 / fp8 (int8: at least INT_MM_MIN_ROWS rows, zero-padded)
    scale: torch.Tensor  # [rows, 1] float32
    shape: torch.Size  # the activation's shape


def quantize_input(x: torch.Tensor, kind: str, gelu: bool = False) -> QuantizedInput:
    """``x`` [..., in] quantized for ``kind``'s matmul; ``gelu``: of tanh-GELU(x), in the same pass (the
    feed-forward's activation, which then never exists in 16 bits)."""
    return quantized_input(*quantize_activations(x.reshape(-1, x.shape[-1]), kind, gelu), x.shape)


def quantized_input(values: torch.Tensor, scale: torch.Tensor, shape: torch.Size) -> QuantizedInput:
    """Per-row quantized ``values`` [rows, in] and their ``scale`` [rows, 1] of an activation of ``shape``, as
    the 8-bit matmuls take them: int8 padded with zero rows to INT_MM_MIN_ROWS."""
    if values.dtype == torch.int8 and values.shape[0] < INT_MM_MIN_ROWS:
        padding = INT_MM_MIN_ROWS - values.shape[0]  # zero rows: their outputs are cut off
        values, scale = F.pad(values, (0, 0, 0, padding)), F.pad(scale, (0, 0, 0, padding), value=1.0)
    return QuantizedInput(values, scale, shape)


def fp8_input(values: torch.Tensor, scale: torch.Tensor) -> QuantizedInput:
    """An activation already in fp8 ``[..., in]`` with one scale for all of it (an 8-bit attention's output) as
    the row-wise quantized input the fp8 matmul takes."""
    rows = values.reshape(-1, values.shape[-1])
    return QuantizedInput(rows, scale.float().reshape(1, 1).expand(rows.shape[0], 1).contiguous(), values.shape)


@fused_on_gpu
def scale_int8_product(acc: torch.Tensor, x_scale: torch.Tensor, weight_scale: torch.Tensor,
                       bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """int32 accumulators -> ``out_dtype``, both scales and the bias applied in float32."""
    out = acc.float() * x_scale * weight_scale.view(1, -1)
    return (out if bias is None else out + bias).to(out_dtype)


def fp8_matmul(x: QuantizedInput, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
               out_dtype) -> torch.Tensor:
    fuse_bias = bias is None or SCALED_MM_ADDS_BIAS.get(x.values.device.type, False)
    out = torch._scaled_mm(x.values, weight.t(), scale_a=x.scale, scale_b=weight_scale.view(1, -1),
                           bias=bias if fuse_bias else None, out_dtype=out_dtype, use_fast_accum=x.values.is_cuda)
    return out if fuse_bias else out + bias


def int8_matmul(x: QuantizedInput, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                out_dtype) -> torch.Tensor:
    return scale_int8_product(torch._int_mm(x.values, weight.t()), x.scale, weight_scale, bias, out_dtype)


MATMULS = {"fp8": fp8_matmul, "int8": int8_matmul}


def scaled_mm_takes_bias(device: torch.device) -> bool:
    """Whether ``torch._scaled_mm`` adds a bfloat16 bias with row-wise scales on ``device``."""
    x = torch.ones(32, 32, device=device).to(torch.float8_e4m3fn)
    scale = torch.ones(32, 1, device=device)
    try:
        torch._scaled_mm(x, x.t(), scale_a=scale, scale_b=scale.view(1, -1), out_dtype=torch.bfloat16,
                         bias=torch.ones(32, device=device, dtype=torch.bfloat16))
        return True
    except (RuntimeError, ValueError):
        return False


def kernel_shape_ok(kind: str, in_features: int, out_features: int) -> bool:
    """fp8 GEMMs want both dimensions multiples of 16, int8 multiples of 8."""
    multiple = 16 if kind == "fp8" else 8
    return in_features % multiple == 0 and out_features % multiple == 0


@functools.cache
def w8a8_available(kind: str, device: torch.device) -> bool:
    """Whether the 8-bit kernel runs on this device; probed once, the slower fallback announced once."""
    reason = None
    if device.type != "cuda":
        reason = f"no 8-bit {kind} kernel is used on {device.type}"
    elif torch.cuda.get_device_capability(device) < MIN_CAPABILITY[kind]:
        major, minor = MIN_CAPABILITY[kind]
        reason = f"{kind} matmuls need compute capability {major}.{minor}+"
    else:
        probe = torch.zeros(32, 32, device=device)
        if kind == "fp8":
            SCALED_MM_ADDS_BIAS[device.type] = scaled_mm_takes_bias(device)
        try:
            MATMULS[kind](quantize_input(probe, kind), probe.to(QUANT_DTYPES[kind]), torch.ones(32, 1, device=device),
                          None, torch.bfloat16)
        except (RuntimeError, ValueError) as e:  # an older torch/cuBLAS without this kernel
            reason = f"the {kind} kernel failed on this device ({first_line(e)})"
    if reason:
        log.warning("%s weights run weight-only on %s (each layer dequantized when used; memory stays %s): %s.",
                    kind, device, kind, reason)
    return reason is None


class QuantLinear(nn.Module):
    """``nn.Linear`` with an int8/fp8 ``weight`` [out, in] and a float32 ``weight_scale`` [out, 1].

    ``compute_dtype`` is what the float layer would run in: inputs are cast to it and outputs come back in it.
    ``mode`` is ``auto`` (8-bit kernel where available), ``w8a8`` (always; for tests) or ``weight-only``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, kind: str, compute_dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.kind, self.compute_dtype, self.mode = kind, compute_dtype, AUTO
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=QUANT_DTYPES[kind]),
                                   requires_grad=False)
        self.register_buffer("weight_scale", torch.empty(out_features, 1, dtype=torch.float32))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=compute_dtype)) if bias else None

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.kind}, compute {self.compute_dtype}, mode {self.mode}"

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_weight(self.weight, self.weight_scale, dtype or self.compute_dtype, self.weight.device)

    def uses_w8a8(self, device: torch.device) -> bool:
        if self.mode == WEIGHT_ONLY or not kernel_shape_ok(self.kind, self.in_features, self.out_features):
            return False
        if self.kind == "fp8" and device.type == "cuda" and self.compute_dtype != torch.bfloat16:
            return False  # row-wise scaled fp8 GEMMs write bfloat16 only
        return self.mode == W8A8 or w8a8_available(self.kind, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.compute_dtype)
        if not self.uses_w8a8(x.device):
            return F.linear(x, self.dequantized_weight(), self.bias)
        return self.run_quantized(quantize_input(x, self.kind))

    def run_quantized(self, x: QuantizedInput, offset: torch.Tensor | None = None) -> torch.Tensor:
        """The W8A8 matmul of an already quantized input (see ``shares_quantized_input``); ``offset`` [B, 1, in]:
        the layer's input is x + offset (one row per sample, shared by its tokens), whose projection
        W·offset joins the bias: in the matmul's epilogue for one sample, added after for more."""
        bias, after = self.bias, None
        if offset is not None:
            projected = F.linear(offset.to(self.compute_dtype), self.dequantized_weight())  # [B, 1, out]
            if projected.shape[0] == 1:
                bias = projected.flatten() if bias is None else bias + projected.flatten()
            else:
                after = projected
        out = MATMULS[self.kind](x, self.weight, self.weight_scale, bias, self.compute_dtype)
        out = out[:math.prod(x.shape[:-1])].view(*x.shape[:-1], self.out_features)
        return out if after is None else out + after


def shares_quantized_input(layers: tuple[nn.Module, ...], x: torch.Tensor) -> bool:
    """Whether ``layers``, which all read ``x``, can take one quantized copy of it (``quantize_input`` once, then
    ``run_quantized`` each): plain 8-bit layers of one kind on the W8A8 kernel for ``x``'s device, without hooks
    (a dynamic LoRA branch is one), and fusing not switched off (``x2v.ops.fused.unfused``)."""
    return fused_enabled() and all(
        is_bare(layer, QuantLinear) and layer.kind == layers[0].kind and layer.uses_w8a8(x.device) for layer in layers)


def input_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype a linear layer computes in (a quantized layer's weight dtype is its storage, not its compute)."""
    compute = getattr(layer, "compute_dtype", None)  # quantized layers (8-bit, GGUF) say it
    return compute if compute is not None else layer.weight.dtype


def replace_linears(model: nn.Module, names: list[str], kind: str, compute_dtype: torch.dtype) -> None:
    """Swap the ``nn.Linear`` modules at ``names`` (``blocks.0.ffn.0``...) for empty QuantLinears (meta model)."""
    swap_linears(model, names, lambda name, old: QuantLinear(old.in_features, old.out_features, old.bias is not None,
                                                             kind, compute_dtype))


def swap_linears(model: nn.Module, names, make) -> None:
    """Replace each ``nn.Linear`` named in ``names`` by ``make(name, old)``, built on the meta device."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        if not isinstance(old, nn.Linear):
            raise TypeError(f"{name} is a {type(old).__name__}, not a linear layer")
        with torch.device("meta"):
            setattr(parent, child, make(name, old))


def settle_quant_modes(model: nn.Module, device: torch.device | str) -> None:
    """Decide now which path each ``auto`` layer takes on ``device`` (before compiling: compiled code must not
    probe kernels or log)."""
    device = torch.device(device)
    for module in model.modules():
        if isinstance(module, QuantLinear) and module.mode == AUTO:
            module.mode = W8A8 if module.uses_w8a8(device) else WEIGHT_ONLY


def set_quant_mode(model: nn.Module, mode: str) -> None:
    """``auto`` / ``w8a8`` / ``weight-only`` for every quantized layer of ``model``."""
    if mode not in (AUTO, W8A8, WEIGHT_ONLY):
        raise ValueError(f"quant mode {mode!r}: expected {AUTO}, {W8A8} or {WEIGHT_ONLY}")
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.mode = mode
