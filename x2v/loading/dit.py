"""Load a Wan DiT from a model directory, a DiT sub-directory or a checkpoint file."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from x2v.errors import CheckpointError
from x2v.formats.dit_keys import check_config_json, infer_dit_config, to_official
from x2v.formats.quant import check_scheme, dequantize, detect_encoding
from x2v.formats.readers import read_checkpoint
from x2v.loading.weights import assign_weights, build_on_meta, summarize_keys
from x2v.models.wan_dit import FP32_PARAMS, WanDiT, WanDiTConfig

OFFICIAL_STEM = "diffusion_pytorch_model"
EXPERT_DIRS = ("high_noise_model", "low_noise_model")

log = logging.getLogger(__name__)


def find_dit_checkpoint(directory: Path) -> Path:
    """The DiT file (or shard index) of a directory; several candidates are an error, never a merge."""
    if all((directory / d).is_dir() for d in EXPERT_DIRS):
        raise CheckpointError(
            f"{directory}: a Wan2.2 A14B directory with two experts; load {directory / 'high_noise_model'} "
            f"or {directory / 'low_noise_model'}."
        )
    if (directory / "transformer").is_dir() and not any(directory.glob("*.safetensors*")):
        directory = directory / "transformer"  # diffusers repository
    indexes = sorted(directory.glob("*.safetensors.index.json"))
    if len(indexes) == 1:
        return indexes[0]
    singles = sorted(p for p in directory.glob("*.safetensors") if p.name != "non_block.safetensors")
    official = directory / f"{OFFICIAL_STEM}.safetensors"
    if not indexes and official.is_file():
        return official
    candidates = indexes + ([] if indexes else singles)
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise CheckpointError(
            f"{directory}: no DiT checkpoint found (expected {OFFICIAL_STEM}*.safetensors with its index, "
            "or one .safetensors file). Pass the file path, or set dit_original_ckpt."
        )
    raise CheckpointError(
        f"{directory}: {len(candidates)} DiT candidates, x2v will not guess or merge them: "
        + ", ".join(p.name for p in candidates)
        + ". Pass one file, or set dit_original_ckpt / dit_quantized_ckpt to choose."
    )


def read_config_json(checkpoint: Path) -> tuple[dict | None, Path | None]:
    path = checkpoint.parent / "config.json"
    if not path.is_file():
        return None, None
    try:
        return json.loads(path.read_text()), path
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}). Fix or delete it.") from None


def default_dtype(tensors: dict[str, torch.Tensor]) -> torch.dtype:
    """The checkpoint's own dtype, read from its largest kind of tensor (block linear weights)."""
    return tensors["blocks.0.self_attn.q.weight"].dtype


def load_dit(
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    config: WanDiTConfig | None = None,
    dit_quantized: bool | None = None,
    quant_scheme: str | None = None,
) -> WanDiT:
    """A ready DiT: architecture from the weights (cross-checked with config.json), built on meta, tensors assigned.

    ``dtype`` is the compute dtype of linear layers and attention (default: the checkpoint's, bfloat16 for an
    int8/fp8 file); norms, modulation, time embedding and head stay in float32. Quantized weights (LightX2V
    int8/fp8, ComfyUI scaled fp8) are detected from the tensors and dequantized with their scales.
    ``dit_quantized`` / ``quant_scheme`` (LightX2V's ``dit_quantized`` / ``dit_quant_scheme``) are optional:
    when given they must agree with the file. ``model.load_info`` says what was loaded.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory.")
    checkpoint = find_dit_checkpoint(path) if path.is_dir() else path
    source = str(checkpoint)
    tensors = to_official(read_checkpoint(checkpoint))
    if config is None:
        config = infer_dit_config(tensors, source=source)
        raw, json_path = read_config_json(checkpoint)
        if raw is not None:
            config = check_config_json(raw, config, source, str(json_path))
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
