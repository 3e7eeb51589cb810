"""Plan a conversion from tensor headers alone, then produce each output tensor just before it is written.

Source tensors are memory-mapped views in official names (``dit_keys.to_official`` / ``t5_keys`` / ``clip_keys``),
so names, dtypes and shapes cost nothing: the whole output (every file's header) is known before a single weight
is read. Each ``Item`` turns one source tensor into its output tensor(s): a (cast) copy, or a quantized weight and
its float32 scale, written next to each other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from x2v.formats.quant import MARKER, PER_CHANNEL, PER_TENSOR, Encoding, quantized_in_releases, without_scales
from x2v.formats.writers import TensorSpec
from x2v.ops.quant_math import QUANT_DTYPES, dequantize_weight, merge_rounding, per_channel_scale, quantize_weight

COPY, QUANTIZE, MARK = "copy", "quantize", "marker"


@dataclass(frozen=True)
class Target:
    """How quantized layers are written: weight kind, scale granularity and the scale's name (None: float)."""

    kind: str | None = None  # "int8" | "fp8"
    granularity: str = PER_CHANNEL
    scale_name: str = "weight_scale"
    release_layers: bool = True  # quantize the layers releases quantize; False: only those the source has quantized


@dataclass(frozen=True)
class Item:
    """One source tensor (official ``key``) and the output tensors made from it, in writing order."""

    key: str
    action: str  # COPY (cast when the dtypes differ) | QUANTIZE (weight + scale) | MARK (ComfyUI marker)
    outputs: tuple[TensorSpec, ...]

    @property
    def nbytes(self) -> int:
        return sum(spec.nbytes for spec in self.outputs)


def encoding_target(encoding: Encoding, quantize: str | None) -> Target:
    """``--quantize`` (fp8 | int8 | none; None: keep the source's encoding, layer for layer) as a per-channel
    target."""
    if quantize is None:
        return Target(encoding.weight_kind, release_layers=False)
    return Target(None if quantize == "none" else quantize)


def quantized_layers(tensors: dict[str, torch.Tensor], encoding: Encoding, target: Target, component: str) -> set[str]:
    """Layers written quantized: those LightX2V's releases quantize, plus any the source already stores
    quantized in the same kind (so a conversion never inflates a quantized layer back to float)."""
    if target.kind is None:
        return set()
    layers = set(encoding.layers) if encoding.weight_kind == target.kind else set()
    if target.release_layers:
        layers |= {key.removesuffix(".weight") for key in tensors if quantized_in_releases(key, component)}
    return layers


def float_dtype(tensor: torch.Tensor, dtype: torch.dtype | None, dequantized: bool) -> torch.dtype:
    """Output dtype of an unquantized tensor: ``dtype`` if given, else its own (bf16 for a dequantized weight)."""
    if not tensor.is_floating_point():
        return tensor.dtype
    if dtype is not None:
        return dtype
    return torch.bfloat16 if dequantized else tensor.dtype


def plan_items(tensors: dict[str, torch.Tensor], encoding: Encoding, target: Target, *, component: str,
               dtype: torch.dtype | None, naming: Callable[[str], str]) -> list[Item]:
    """Every output tensor, grouped by source tensor.

    safetensors has no padding, so items are ordered by the alignment their first tensor needs (8, 4, 2, then
    1-byte dtypes, as the safetensors library orders them) and keep every tensor aligned for a zero-copy memory
    map; within one alignment, in the source's byte order (sequential reads). A quantized layer writes its float32
    scale before its 1-byte weight for the same reason.
    """
    source_quantized = {f"{layer}.weight" for layer in encoding.layers}
    quantized = {f"{layer}.weight" for layer in quantized_layers(tensors, encoding, target, component)}
    items = []
    for key in without_scales(tensors, encoding):
        tensor = tensors[key]
        shape = tuple(tensor.shape)
        if key in quantized:
            scale_shape = (shape[0], 1) if target.granularity == PER_CHANNEL else ()
            scale_key = f"{key.removesuffix('.weight')}.{target.scale_name}"
            outputs = (TensorSpec(naming(scale_key), torch.float32, scale_shape),  # scales stay float32 (B01)
                       TensorSpec(naming(key), QUANT_DTYPES[target.kind], shape))
            items.append(Item(key, QUANTIZE, outputs))
        else:
            out = float_dtype(tensor, dtype, key in source_quantized)
            items.append(Item(key, COPY, (TensorSpec(naming(key), out, shape),)))
    if target.scale_name == "scale_weight" and quantized:
        # ComfyUI's marker; two elements tell ComfyUI to upcast the weights instead of running fp8 matmuls
        # without activation scales (what LightX2V's ComfyUI export writes too).
        items.append(Item(MARKER, MARK, (TensorSpec(naming(MARKER), torch.float8_e4m3fn, (2,)),)))
    position = {key: tensor.data_ptr() for key, tensor in tensors.items()}
    return sorted(items, key=lambda item: (-item.outputs[0].dtype.itemsize, position.get(item.key, 0)))


class Producer:
    """Makes an item's output tensors from the source: dequantize, add the LoRA change, cast or quantize.

    ``deltas`` (a ``LoraDeltas``) gives the float32 change of an official key, or None. fp8 weights a LoRA
    changed are rounded stochastically (seeded by the key, so a conversion is reproducible): changes smaller than
    a quantization step survive on average instead of rounding away (docs/pitfalls.md B03).
    """

    def __init__(self, tensors: dict[str, torch.Tensor], encoding: Encoding, target: Target, deltas=None):
        self.tensors, self.target, self.deltas = tensors, target, deltas
        self.scales = {f"{layer}.weight": encoding.scale_of(tensors, layer) for layer in encoding.layers}

    def sources(self, item: Item) -> list[torch.Tensor]:
        """The source tensors an item reads (its weight, and its scale when stored quantized)."""
        if item.action == MARK:
            return []
        return [self.tensors[item.key]] + ([self.scales[item.key]] if item.key in self.scales else [])

    def value(self, key: str, delta: torch.Tensor | None) -> torch.Tensor:
        """The tensor's float32 value, dequantized and with the LoRA change added (read-only: it may be the
        source's own memory)."""
        tensor = self.tensors[key]
        value = dequantize_weight(tensor, self.scales[key], torch.float32) if key in self.scales else tensor.float()
        return value if delta is None else value + delta.to(value.device)

    def produce(self, item: Item) -> list[torch.Tensor]:
        if item.action == MARK:
            return [torch.zeros(2, dtype=torch.float8_e4m3fn)]
        key, out = item.key, item.outputs[0]
        delta = None if self.deltas is None else self.deltas.delta(key)
        if item.action == QUANTIZE:
            q, scale = self.quantize(key, item.outputs[1].shape, delta)
            return [scale, q]
        if key not in self.scales and delta is None:
            return [self.tensors[key].to(out.dtype)]  # no copy at all when the dtype stays
        return [self.value(key, delta).to(out.dtype)]

    def quantize(self, key: str, shape: tuple[int, ...], delta: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        kind, granularity = self.target.kind, self.target.granularity
        tensor, scale = self.tensors[key], self.scales.get(key)
        same_kind = scale is not None and tensor.dtype == QUANT_DTYPES[kind]
        if delta is None and same_kind and (granularity == PER_CHANNEL or scale.numel() == 1):
            # The stored values are kept bit for bit; a per-tensor scale is a per-channel one repeated.
            if granularity == PER_CHANNEL:
                return tensor, per_channel_scale(scale, shape[0])
            return tensor, scale.to(torch.float32).reshape(())
        generator = merge_rounding(key, kind, "cpu") if delta is not None else None  # as the loader merges
        value = tensor if delta is None and scale is None else self.value(key, delta)
        if granularity == PER_TENSOR:
            q, s = quantize_weight(value.reshape(1, -1), kind, generator=generator)
            return q.reshape(shape), s.reshape(())
        return quantize_weight(value, kind, generator=generator)
