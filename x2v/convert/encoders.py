"""Convert (quantize) the umT5 text encoder and the CLIP image encoder into LightX2V's ``.pth`` files.

The files are PyTorch pickles (``models_t5_umt5-xxl-enc-fp8.pth``, ...), which cannot be written one tensor at a
time: the output state dict is built in memory (quantized tensors are new; unchanged ones stay views of the
source's memory map until ``torch.save`` reads them), then saved under a temporary name and renamed. Peak memory
is about the output's size, not the source's plus the output's.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from x2v.convert.layouts import encoder_file
from x2v.convert.options import DTYPES, ConversionError, ConversionResult, ConvertOptions
from x2v.convert.plan import QUANTIZE, Producer, encoding_target, plan_items
from x2v.convert.safety import (
    FILE, check_destinations, make_folder, output_lock, remove_stale_temps, remove_temps, reporting,
)
from x2v.formats import clip_keys, t5_keys
from x2v.formats.quant import detect_encoding
from x2v.formats.readers import read_checkpoint
from x2v.formats.writers import publish, temp_path
from x2v.loading.resolve import resolve_component

DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
NAMES = {"t5": "umT5 text encoder", "clip": "CLIP image encoder"}


def official_tensors(component: str, tensors: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Official names. An official CLIP file is kept whole (text tower too), as LightX2V's quantized files are."""
    if component == "t5":
        return t5_keys.to_official(tensors, source)  # scales follow their weights' names
    layout = clip_keys.find_layout(tensors)
    if layout == ("official", clip_keys.OFFICIAL_PREFIX):
        return tensors
    try:
        return clip_keys.to_official(tensors)
    except ValueError as e:
        raise ConversionError(f"{source}: not a CLIP image encoder checkpoint ({e}).") from None


def own_storage(tensor: torch.Tensor) -> torch.Tensor:
    """``torch.save`` writes a view's whole storage (for a safetensors source: the whole file), so views are
    copied into storages of their own."""
    if tensor.is_contiguous() and tensor.storage_offset() == 0 and tensor.untyped_storage().nbytes() == tensor.nbytes:
        return tensor
    return tensor.clone()


def save_atomically(state: dict[str, torch.Tensor], path: Path) -> None:
    try:
        with reporting(path), open(temp_path(path), "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        with reporting(path, "put in place"):
            publish([path])
    finally:
        remove_temps([path])  # after an error: no half-written file, not even under a temporary name


def convert_encoder(source: Path, output: Path, options: ConvertOptions) -> ConversionResult:
    start = time.perf_counter()
    component = options.component
    if options.loras:
        raise ConversionError(f"--lora applies to the DiT; it cannot be merged into the {NAMES[component]}.")
    if options.layout not in (None, "official") or options.components or options.expert:
        raise ConversionError(f"--layout, --copy-components and --expert apply to the DiT; the {NAMES[component]} "
                              "is written as LightX2V's .pth file.")
    file = resolve_component(component, source).path if source.is_dir() else source
    tensors = official_tensors(component, read_checkpoint(file), str(file))
    # Only the vision tower can be quantized: open-clip's text tower and its logit scale (log_scale) are kept as is.
    tower = tensors if component == "t5" else {k: v for k, v in tensors.items()
                                               if k.startswith(clip_keys.OFFICIAL_PREFIX)}
    encoding = detect_encoding(tower, str(file))
    target = encoding_target(encoding, options.quantize)
    kind = target.kind
    items = plan_items(tensors, encoding, target, component=component, dtype=options.dtype, naming=lambda k: k)
    largest = max((spec for item in items for spec in item.outputs), key=lambda spec: spec.nbytes)
    precision = kind or DTYPE_NAMES.get(largest.dtype, "fp32")
    path = output if output.suffix in (".pth", ".pt") else output / encoder_file(component, precision)
    with output_lock([path]):
        check_destinations({path: FILE}, {file.resolve()}, options.overwrite)
        make_folder(path.parent)
        remove_stale_temps({path.parent}, {path})
        producer = Producer(tensors, encoding, target)
        state = {}
        for item in items:
            for spec, tensor in zip(item.outputs, producer.produce(item)):
                state[spec.name] = own_storage(tensor)
        save_atomically(state, path)
    quantized = sum(1 for item in items if item.action == QUANTIZE)
    description = (f"{component}: {file} -> {path}: {NAMES[component]}, "
                   + (f"{quantized} linear layers quantized to {kind} per output channel" if kind else precision))
    return ConversionResult([path], path.stat().st_size, time.perf_counter() - start, [description])
