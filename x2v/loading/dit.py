"""Load a Wan DiT from a model directory, a DiT sub-directory or a checkpoint file."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from x2v.errors import CheckpointError
from x2v.formats import jsonc
from x2v.formats.dit_keys import check_config_json, infer_dit_config, to_official
from x2v.formats.keys import summarize_keys
from x2v.formats.readers import read_checkpoint
from x2v.loading.lora import (
    apply_loras, describe_model, entries_for_expert, merge_deltas, prepare_loras, target_shapes,
)
from x2v.loading.quantized import prepare_quantized, read_quantization
from x2v.loading.resolve import resolve_dit
from x2v.loading.weights import assign_weights, build_on_meta
from x2v.models.wan_dit import FP32_PARAMS, WanDiT, WanDiTConfig

log = logging.getLogger(__name__)


def find_dit(path: Path, expert: str | None) -> Path:
    """The DiT checkpoint under ``path`` by the resolution rules; a Wan2.2 root needs ``expert``."""
    found = resolve_dit(path)
    if expert is not None:
        if expert not in found:
            raise CheckpointError(f"{path}: expert={expert!r} was asked for, but this is a single-DiT model.")
        return found[expert].path
    if len(found) > 1:
        raise CheckpointError(
            f"{path}: a Wan2.2 two-expert model; pass expert='high_noise_model' or expert='low_noise_model' "
            "(or the expert's folder)."
        )
    return found["dit"].path


def read_config_json(checkpoint: Path) -> tuple[dict | None, Path | None]:
    """The ``config.json`` beside a DiT file (or inside a block-split folder), if any."""
    path = (checkpoint if checkpoint.is_dir() else checkpoint.parent) / "config.json"
    if not path.is_file():
        return None, None
    return jsonc.load(path), path


def detect_architecture(checkpoint: Path, tensors: dict[str, torch.Tensor]) -> WanDiTConfig:
    """The architecture read from the (official-named) tensors, cross-checked with the config.json beside them."""
    config = infer_dit_config(tensors, source=str(checkpoint))
    raw, json_path = read_config_json(checkpoint)
    return config if raw is None else check_config_json(raw, config, str(checkpoint), str(json_path))


def default_dtype(tensors: dict[str, torch.Tensor]) -> torch.dtype:
    """The checkpoint's own dtype, read from its largest kind of tensor (block linear weights)."""
    return tensors["blocks.0.self_attn.q.weight"].dtype


def load_dit(
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    architecture: WanDiTConfig | None = None,
    expert: str | None = None,
    dit_quantized: bool | None = None,
    quant_scheme: str | None = None,
    lora_configs: list | None = None,
    lora_dynamic_apply: bool = False,
    lora_strict: bool = False,
) -> WanDiT:
    """A ready DiT: architecture from the weights (cross-checked with config.json), built on meta, tensors assigned.

    ``path`` is a checkpoint file, a DiT folder or a model directory (resolved as ``x2v inspect`` shows; a Wan2.2
    root needs ``expert``). ``architecture`` overrides what is read from the shapes and config.json.

    ``dtype`` is the compute dtype of linear layers and attention (default: the checkpoint's, bfloat16 for an
    int8/fp8 file); norms, modulation, time embedding and head stay in float32. Quantized weights (LightX2V
    int8/fp8, ComfyUI scaled fp8) are detected from the tensors; their linear layers stay 8-bit
    (``QuantLinear``: 8-bit matmuls on GPUs that have them, else dequantized one layer at a time).
    ``dit_quantized`` / ``quant_scheme`` (LightX2V's ``dit_quantized`` / ``dit_quant_scheme``) are optional:
    when given they must agree with the file, except that a float file declared quantized is quantized at
    load (per output channel, the layers releases quantize). ``model.load_info`` says what was loaded.

    ``lora_configs`` (``{"path", "strength", "alpha", "name"}`` entries or paths) are merged into the weights, or
    attached at run time with ``lora_dynamic_apply`` (``x2v.loading.lora``); a Wan2.2 ``expert`` takes the entries
    naming it. ``lora_strict``: a LoRA key that changes nothing is an error. Reports: ``load_info["loras"]``.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory.")
    checkpoint = find_dit(path, expert) if path.is_dir() else path
    source = str(checkpoint)
    tensors = to_official(read_checkpoint(checkpoint))
    config = architecture or detect_architecture(checkpoint, tensors)
    encoding, quantize_kind = read_quantization(tensors, source, "dit", dit_quantized, quant_scheme)
    if encoding.quantized:
        dtype = dtype or torch.bfloat16
        log.info("%s: %s weights (%s), run quantized with %s compute.", source, encoding.family, encoding.name, dtype)
        if encoding.unusual_layers:
            log.info("%s: also quantizes layers released files keep in high precision: %s.",
                     source, summarize_keys(f"{layer}.weight" for layer in encoding.unusual_layers))
    elif quantize_kind:
        log.info("%s: float weights quantized to %s per output channel at load (dit_quant_scheme %s).",
                 source, quantize_kind, quant_scheme)
    dtype = dtype or (torch.bfloat16 if quantize_kind else default_dtype(tensors))
    model = build_on_meta(lambda: WanDiT(config))
    deltas, merged = None, set()
    if lora_configs and quantize_kind and not lora_dynamic_apply:
        # Quantizing at load: the LoRAs go into the float weights before they are rounded to 8 bits.
        deltas, reports = prepare_loras(entries_for_expert(lora_configs, expert), target_shapes(model),
                                        strict=lora_strict, model_description=describe_model(model, expert))

    def delta_before_quantizing(key: str, on: torch.device) -> torch.Tensor | None:
        merged.add(key)
        return deltas.delta(key, on)

    tensors = prepare_quantized(model, tensors, encoding, quantize_kind=quantize_kind, component="dit", dtype=dtype,
                                device=device, keep_fp32=FP32_PARAMS, delta=delta_before_quantizing if deltas else None)
    model = assign_weights(
        model, tensors, dtype=dtype, device=device, keep_fp32=FP32_PARAMS, source=source,
        what=f"{config.model_type} DiT (dim {config.dim}, {config.num_layers} layers)",
    )
    model.load_info = {"encoding": encoding.name, "source": source, "quantized": encoding.weight_kind or quantize_kind}
    if deltas:
        merge_deltas(model, deltas, skip=merged)
        model.load_info["loras"] = reports
    elif lora_configs:
        model.load_info["loras"] = apply_loras(model, lora_configs, dynamic=lora_dynamic_apply, strict=lora_strict,
                                               expert=expert)
    return model
