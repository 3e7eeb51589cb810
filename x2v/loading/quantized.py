"""Turn a meta-built model's linear layers into quantized ones, from a quantized file or by quantizing at load."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from x2v.formats.quant import (
    Encoding, check_scheme, detect_encoding, quantized_in_releases, scheme_kind, without_scales,
)
from x2v.ops.quant_linear import replace_linears
from x2v.ops.quant_math import QUANT_DTYPES, dequantize_weight, merge_rounding, per_channel_scale, quantize_weight
from x2v.runtime.pages import FileMappings, release_pages


def read_quantization(tensors: dict[str, torch.Tensor], source: str, component: str, quantized: bool | None,
                      scheme: str | None) -> tuple[Encoding, str | None]:
    """The file's encoding, checked against the declared ``<component>_quantized`` / ``_quant_scheme``, and the
    kind ("int8" / "fp8") a float file declared quantized is quantized to at load (None: it stays float)."""
    encoding = detect_encoding(tensors, source)
    check_scheme(encoding, scheme, quantized, source, component)
    return encoding, None if encoding.quantized else scheme_kind(scheme, component)


def quantized_linears(
    model: nn.Module, tensors: dict[str, torch.Tensor], encoding: Encoding, quantize_kind: str | None,
    component: str, keep_fp32: tuple[str, ...] = (),
) -> tuple[list[str], str | None]:
    """``(layers, kind)``: the linear layers of ``model`` that run 8-bit, in file order, and their weight kind.

    From a quantized file: its quantized linears (a quantized convolution, a layer the model keeps in float32 or
    an fp8 e5m2 weight is dequantized instead). From a float file with ``quantize_kind``: the layers LightX2V's
    releases quantize.
    """
    linears = {name for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and not any(s in name for s in keep_fp32)}
    if encoding.quantized:
        storage = QUANT_DTYPES[encoding.weight_kind]
        return [layer for layer in encoding.layers
                if layer in linears and tensors[f"{layer}.weight"].dtype == storage], encoding.weight_kind
    if quantize_kind:
        return [key.removesuffix(".weight") for key in tensors  # file order: sequential reads
                if key.removesuffix(".weight") in linears and quantized_in_releases(key, component)], quantize_kind
    return [], None


def prepare_quantized(
    model: nn.Module,
    tensors: dict[str, torch.Tensor],
    encoding: Encoding,
    *,
    quantize_kind: str | None,
    component: str,
    dtype: torch.dtype,
    device: torch.device | str,
    keep_fp32: tuple[str, ...] = (),
    delta: Callable[[str, torch.device], torch.Tensor | None] | None = None,
) -> dict[str, torch.Tensor]:
    """The tensors to assign to ``model`` (built on meta), whose linears are swapped for ``QuantLinear`` where
    they run 8-bit (``quantized_linears``). Quantized tensors that do not run 8-bit are dequantized. A float file
    quantized here gets ``delta(key, device)`` (a LoRA change) added to each weight before it is quantized."""
    layers, kind = quantized_linears(model, tensors, encoding, quantize_kind, component, keep_fp32)
    if encoding.quantized:
        tensors = dequantize(tensors, encoding, dtype, device=device, keep_fp32=keep_fp32,
                             keep_quantized=frozenset(layers))
    elif layers:
        tensors = quantize_layers(tensors, layers, kind, device=device, delta=delta)
    replace_linears(model, layers, kind, dtype)
    return tensors


def dequantize(
    tensors: dict[str, torch.Tensor],
    encoding: Encoding,
    dtype: torch.dtype,
    *,
    device: torch.device | str = "cpu",
    keep_fp32: tuple[str, ...] = (),
    keep_quantized: frozenset[str] = frozenset(),
) -> dict[str, torch.Tensor]:
    """Official-named tensors ready for the model: quantized weights dequantized one at a time, scales and marker
    removed, except the layers in ``keep_quantized``, which keep their int8/fp8 weight and get their scale as a
    float32 per-channel ``<layer>.weight_scale`` (what ``QuantLinear`` holds).

    Other tensors pass through untouched (no copy). Weights whose name contains one of ``keep_fp32`` are
    dequantized to float32 instead of ``dtype`` (the model keeps them in float32).
    """
    scales = {f"{layer}.weight": encoding.scale_of(tensors, layer) for layer in encoding.layers}
    mappings = FileMappings()
    result = {}
    for key, tensor in without_scales(tensors, encoding).items():
        layer = key.removesuffix(".weight")
        if layer in keep_quantized:
            result[f"{layer}.weight_scale"] = per_channel_scale(scales[key], tensor.shape[0])
        elif key in scales:
            target = torch.float32 if any(s in key for s in keep_fp32) else dtype
            pages = mappings.pages(tensor)
            tensor = dequantize_weight(tensor, scales[key], target, device)
            release_pages(pages)  # the file's copy of this weight is no longer needed in memory
        result[key] = tensor
    return result


def quantize_layers(
    tensors: dict[str, torch.Tensor], layers: list[str], kind: str, *, device: torch.device | str = "cpu",
    delta: Callable[[str, torch.device], torch.Tensor | None] | None = None,
) -> dict[str, torch.Tensor]:
    """Float official-named tensors with the weights of ``layers`` quantized per output channel (one at a time,
    on ``device``, each source weight's pages released after): ``<layer>.weight`` + ``<layer>.weight_scale``.
    ``delta(key, device)`` (a LoRA's float32 change, or None) is added before quantizing."""
    mappings = FileMappings()
    result = dict(tensors)
    for layer in layers:
        key = f"{layer}.weight"
        weight = tensors[key].to(device)
        pages = mappings.pages(tensors[key])
        change = delta(key, weight.device) if delta else None
        if change is None:
            result[key], result[f"{layer}.weight_scale"] = quantize_weight(weight, kind)
        else:
            result[key], result[f"{layer}.weight_scale"] = quantize_weight(
                change.add_(weight.float()), kind, generator=merge_rounding(key, kind, weight.device))
        release_pages(pages)
    return result
