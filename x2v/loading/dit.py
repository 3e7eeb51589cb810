"""Load a Wan DiT from a model directory, a DiT sub-directory or a checkpoint file."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from x2v.errors import CheckpointError
from x2v.formats import jsonc
from x2v.formats.dit_keys import check_config_json, infer_dit_config, to_official
from x2v.formats.quant import check_scheme, dequantize, detect_encoding
from x2v.formats.readers import read_checkpoint
from x2v.loading.resolve import resolve_dit
from x2v.formats.keys import summarize_keys
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
) -> WanDiT:
    """A ready DiT: architecture from the weights (cross-checked with config.json), built on meta, tensors assigned.

    ``path`` is a checkpoint file, a DiT folder or a model directory (resolved as ``x2v inspect`` shows; a Wan2.2
    root needs ``expert``). ``architecture`` overrides what is read from the shapes and config.json.

    ``dtype`` is the compute dtype of linear layers and attention (default: the checkpoint's, bfloat16 for an
    int8/fp8 file); norms, modulation, time embedding and head stay in float32. Quantized weights (LightX2V
    int8/fp8, ComfyUI scaled fp8) are detected from the tensors and dequantized with their scales.
    ``dit_quantized`` / ``quant_scheme`` (LightX2V's ``dit_quantized`` / ``dit_quant_scheme``) are optional:
    when given they must agree with the file. ``model.load_info`` says what was loaded.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory.")
    checkpoint = find_dit(path, expert) if path.is_dir() else path
    source = str(checkpoint)
    tensors = to_official(read_checkpoint(checkpoint))
    config = architecture or detect_architecture(checkpoint, tensors)
    encoding = detect_encoding(tensors, source)
    check_scheme(encoding, quant_scheme, dit_quantized, source)
    if encoding.quantized:
        dtype = dtype or torch.bfloat16
        log.info("%s: %s weights (%s), dequantized to %s at load.", source, encoding.family, encoding.name, dtype)
        if encoding.unusual_layers:
            log.info("%s: also quantizes layers released files keep in high precision: %s.",
                     source, summarize_keys(f"{layer}.weight" for layer in encoding.unusual_layers))
    dtype = dtype or default_dtype(tensors)
    tensors = dequantize(tensors, encoding, dtype, device=device, keep_fp32=FP32_PARAMS)
    model = build_on_meta(lambda: WanDiT(config))
    model = assign_weights(
        model, tensors, dtype=dtype, device=device, keep_fp32=FP32_PARAMS, source=source,
        what=f"{config.model_type} DiT (dim {config.dim}, {config.num_layers} layers)",
    )
    model.load_info = {"encoding": encoding.name, "source": source}
    return model
