"""Load the CLIP ViT image encoder of Wan2.1 I2V/FLF2V from a model directory or a checkpoint file."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from x2v.errors import CheckpointError
from x2v.formats.clip_keys import OFFICIAL_PREFIX, infer_config, to_official
from x2v.formats.quant import scheme_kind
from x2v.formats.readers import read_checkpoint
from x2v.loading.quantized import prepare_quantized, read_quantization
from x2v.loading.resolve import one_candidate
from x2v.formats.keys import summarize_keys
from x2v.loading.weights import assign_weights, build_on_meta
from x2v.models.clip import ClipVisionConfig, ClipVisionTower

OFFICIAL_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
SUBFOLDER = "image_encoder"  # diffusers layout
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".safetensors.index.json")
SHARD = re.compile(r"-\d{5}-of-\d{5}\.safetensors$")
KEEP_FP32 = ("norm",)


def checkpoint_files(folder: Path) -> list[Path]:
    """Checkpoint files directly in ``folder``; a sharded checkpoint counts once, as its index."""
    if not folder.is_dir():
        return []
    files = sorted(f for f in folder.iterdir() if f.is_file() and f.name.endswith(CHECKPOINT_SUFFIXES))
    if any(f.name.endswith(".index.json") for f in files):
        files = [f for f in files if not SHARD.search(f.name)]
    return files


def official_names(quant_kind: str | None) -> list[str]:
    """File names to look for, best first: LightX2V's quantized names (current, then old) for ``quant_kind``."""
    quantized = [OFFICIAL_FILE.replace(".pth", f"-{quant_kind}.pth"), f"clip-{quant_kind}.pth"] if quant_kind else []
    return [*quantized, OFFICIAL_FILE]


def find_image_encoder_checkpoint(model_dir: Path, quant_kind: str | None = None) -> Path:
    """The official file if present (LightX2V's quantized one first when ``quant_kind`` is "int8"/"fp8"), else
    the single CLIP-looking checkpoint at the top or in ``image_encoder/``."""
    for name in official_names(quant_kind):
        for folder in (model_dir, model_dir / SUBFOLDER):
            if (folder / name).is_file():
                return folder / name
    candidates = [f for f in checkpoint_files(model_dir) if "clip" in f.name.lower()]
    candidates += checkpoint_files(model_dir / SUBFOLDER)
    return one_candidate(model_dir, candidates, "CLIP image encoder",
                         f"{OFFICIAL_FILE} or one other *clip* checkpoint here or in {SUBFOLDER}/", "clip_original_ckpt",
                         note=" Only Wan2.1 I2V and FLF2V use the CLIP image encoder.")


def tower_tensors(official: dict[str, torch.Tensor], config: ClipVisionConfig) -> dict[str, torch.Tensor]:
    """Tensors the tower uses, without ``visual.``; Wan never runs the last block, ``post_norm`` or ``head``."""
    unused = ("post_norm.", f"transformer.{config.num_layers - 1}.")
    tensors = {}
    for name, tensor in official.items():
        local = name.removeprefix(OFFICIAL_PREFIX)
        if local != "head" and not local.startswith(unused):
            tensors[local] = tensor
    return tensors


def load_image_encoder(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    num_heads: int | None = None,
    quantized: bool | None = None,
    quant_scheme: str | None = None,
) -> ClipVisionTower:
    """Build the CLIP vision tower from a model directory or a checkpoint (official or transformers names).

    ``dtype=None`` keeps the checkpoint's floating dtype; LayerNorm weights are always stored in float32.
    ``num_heads`` overrides the head count inferred from the width (the checkpoint does not store it).
    Quantized LightX2V files (``...-vit-huge-14-{fp8,int8}.pth``) keep their attention and MLP linears 8-bit;
    ``quantized`` / ``quant_scheme`` (``clip_quantized`` / ``clip_quant_scheme``) must agree with the file, and
    with a float file quantize it at load.
    """
    path = Path(path)
    if path.is_dir():
        path = find_image_encoder_checkpoint(path, scheme_kind(quant_scheme, "clip") if quantized else None)
    elif not path.is_file():
        raise CheckpointError(f"{path}: no such file or directory (expected a model directory or a CLIP checkpoint).")
    raw = read_checkpoint(path)
    try:
        official = to_official(raw)
        config = infer_config(official, num_heads)
    except ValueError as e:
        raise CheckpointError(
            f"{path}: not a usable CLIP image encoder checkpoint: {e}. Found: {summarize_keys(raw)}."
        ) from None
    tensors = tower_tensors(official, config)
    encoding, quantize_kind = read_quantization(tensors, str(path), "clip", quantized, quant_scheme)
    dtype = dtype or official[OFFICIAL_PREFIX + "patch_embedding.weight"].dtype
    model = build_on_meta(lambda: ClipVisionTower(config))
    tensors = prepare_quantized(model, tensors, encoding, quantize_kind=quantize_kind, component="clip", dtype=dtype,
                                device=device, keep_fp32=KEEP_FP32)
    return assign_weights(model, tensors, dtype=dtype, device=device, keep_fp32=KEEP_FP32, source=str(path),
                          what="CLIP vision tower")
