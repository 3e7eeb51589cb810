"""Load the Wan2.1 or Wan2.2 VAE from a model directory or a checkpoint file (official or diffusers names)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from x2v.errors import CheckpointError
from x2v.formats.readers import read_checkpoint
from x2v.formats.vae_keys import detect_version, infer_config, to_official
from x2v.loading.resolve import one_candidate
from x2v.loading.weights import assign_weights, build_on_meta
from x2v.models.vae import CausalVAE, Wan21VAE
from x2v.models.vae22 import Wan22VAE

OFFICIAL_VAE_NAMES = ("Wan2.1_VAE.pth", "Wan2.2_VAE.pth")
DIFFUSERS_VAE_CLASS = "AutoencoderKLWan"
DIFFUSERS_WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
)


def diffusers_weights(folder: Path) -> Path | None:
    return next((folder / n for n in DIFFUSERS_WEIGHT_NAMES if (folder / n).is_file()), None)


def is_diffusers_vae_folder(folder: Path) -> bool:
    """A folder whose config.json names ``AutoencoderKLWan`` (a diffusers ``vae/`` folder passed directly)."""
    try:
        return json.loads((folder / "config.json").read_text()).get("_class_name") == DIFFUSERS_VAE_CLASS
    except (OSError, ValueError, AttributeError):
        return False


def find_vae_checkpoint(directory: Path) -> Path:
    """The VAE weights of a model directory: an official file, a diffusers ``vae/`` folder, or the directory
    itself when it is a diffusers VAE folder. Exactly one must be present."""
    candidates = [directory / n for n in OFFICIAL_VAE_NAMES if (directory / n).is_file()]
    if weights := diffusers_weights(directory / "vae"):
        candidates.append(weights)
    if is_diffusers_vae_folder(directory) and (weights := diffusers_weights(directory)):
        candidates.append(weights)
    return one_candidate(directory, candidates, "VAE", f"{' and '.join(OFFICIAL_VAE_NAMES)}, and a diffusers vae/ "
                         f"folder holding {DIFFUSERS_WEIGHT_NAMES[1]}", "vae_path")


def load_vae(path: str | os.PathLike, *, dtype: torch.dtype | None = None,
             device: torch.device | str = "cpu") -> CausalVAE:
    """Wan2.1 (z 16) or Wan2.2 (z 48) VAE, recognized from its tensors.

    ``path`` is a model directory or a checkpoint file (.pth / .safetensors / shard index). ``dtype=None`` means
    float32, as the official code runs the VAE; encode/decode compute in the weights' dtype.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: not found. Pass a Wan model directory or the VAE checkpoint file (vae_path).")
    file = find_vae_checkpoint(path) if path.is_dir() else path
    source = str(file)
    tensors = to_official(read_checkpoint(file), source)
    version = detect_version(tensors)
    config = infer_config(tensors, source)
    model = build_on_meta(lambda: Wan22VAE(config) if version == "2.2" else Wan21VAE(config))
    return assign_weights(model, tensors, dtype=dtype or torch.float32, device=device, source=source,
                          what=f"Wan{version} VAE")
