"""Every component x2v loads, as one table: where its file is found, how its keys map to the official names, how its
architecture is read, which network it builds, which tensors stay float32 and which linears may be 8-bit.

``x2v.loading.resolve`` finds the files by these entries, ``x2v.loading.load`` loads any weights entry with one
recipe (read, to official names, architecture, quantization, build on meta, assign), and ``x2v inspect`` reads
the same entries. Adding a component means adding an entry here (and its network in ``x2v/models/``, its key map
in ``x2v/formats/``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from x2v.errors import CheckpointError
from x2v.formats import clip_keys, dit_keys, jsonc, t5_keys, vae_keys
from x2v.models.clip import ClipVisionConfig, ClipVisionTower
from x2v.models.t5 import T5Encoder, T5EncoderConfig
from x2v.models.vae import Wan21VAE, Wan21VAEConfig
from x2v.models.vae22 import Wan22VAE, Wan22VAEConfig
from x2v.models.wan_dit import FP32_PARAMS, WanDiT, WanDiTConfig


@dataclass(frozen=True)
class Component:
    """One loadable part of a Wan model (the tokenizer is files only: ``to_official`` is None)."""

    name: str  # "dit", "t5", "clip", "vae", "tokenizer"; also the prefix of its quantization keys
    what: str  # how messages name it
    file_keys: tuple[str, ...]  # LightX2V config keys that name its file: the float one first, the 8-bit one second
    official_files: tuple[str, ...] = ()  # its names in the official release folders
    quantized_files: tuple[str, ...] = ()  # LightX2V's names of its int8 / fp8 files, best first ("{kind}")
    to_official: Callable[[dict, str], dict] | None = None  # any key layout -> official names
    architecture: Callable[[dict, Path], Any] | None = None  # official tensors, checkpoint -> the model's config
    model: Callable[[Any], nn.Module] | None = None  # config -> the network (built on the meta device)
    used: Callable[[dict, Any], dict] = lambda tensors, config: tensors  # the tensors the network holds
    keep_fp32: tuple[str, ...] = ()  # parameters (by name fragment) stored in float32 whatever the dtype
    quantizable: bool = False  # <name>_quantized / <name>_quant_scheme apply; 8-bit linears as releases have them
    default_dtype: Callable[[dict], torch.dtype | None] = lambda tensors: None  # None: float32
    needed_by: str = ""  # when only some models use it, which (said when it is missing)
    network: Callable[[Any], str] | None = None  # how a fit problem names the network built from a config

    def describe(self, config: Any) -> str:
        return self.network(config) if self.network else self.what

    @property
    def quantized_key(self) -> str | None:
        """The flag that makes the 8-bit file key win (``t5_quantized``)."""
        return f"{self.name}_quantized" if self.quantizable else None


# --- architectures ----------------------------------------------------------------------------------------------


def config_json_beside(checkpoint: Path) -> Path:
    """Where a DiT's ``config.json`` lies: next to its file, or inside a block-split folder."""
    return (checkpoint if checkpoint.is_dir() else checkpoint.parent) / "config.json"


def dit_architecture(tensors: dict[str, torch.Tensor], checkpoint: Path) -> WanDiTConfig:
    """The architecture read from the (official-named) tensors; a ``config.json`` beside them (official or diffusers
    keys) gives what shapes do not (head count, VACE hint placement, text length) and must agree with the rest."""
    detected = dit_keys.infer_architecture(tensors, source=str(checkpoint))
    json_path = config_json_beside(checkpoint)
    if not json_path.is_file():
        return WanDiTConfig(**detected)
    stated = dit_keys.config_json_fields(jsonc.load(json_path), str(json_path))
    clashes = [f"{f}: weights {detected[f]}, config.json {stated[f]}" for f in dit_keys.SHAPE_FIELDS
               if f in stated and f in detected and stated[f] != detected[f]]
    # Where the VACE hints go is not in the shapes, only how many there are.
    if "vace_layers" in stated and len(stated["vace_layers"]) != len(detected["vace_layers"]):
        clashes.append(f"vace_layers: weights have {len(detected['vace_layers'])} VACE blocks, config.json lists "
                       f"{len(stated['vace_layers'])}")
    merged = {**detected, **stated}
    if clashes:
        raise CheckpointError(
            f"{checkpoint}: the weights are a {dit_keys.variant_name(WanDiTConfig(**detected))} DiT but {json_path} "
            f"describes a {dit_keys.variant_name(WanDiTConfig(**merged))} ({'; '.join(clashes)}). Use the "
            "config.json that came with these weights, or remove it (x2v reads the architecture from the weights).")
    if merged["dim"] % merged["num_heads"]:  # a stated head count against the width the weights have
        raise CheckpointError(f"{json_path}: num_heads {merged['num_heads']} does not divide dim {merged['dim']}.")
    return WanDiTConfig(**merged)


def dit_dtype(tensors: dict[str, torch.Tensor]) -> torch.dtype | None:
    """The checkpoint's own dtype, read from its largest kind of tensor (block linear weights); None when that
    tensor is missing (the weight check then names it)."""
    weight = tensors.get("blocks.0.self_attn.q.weight")
    return weight.dtype if weight is not None else None


def t5_architecture(tensors: dict[str, torch.Tensor], checkpoint: Path) -> T5EncoderConfig:
    return T5EncoderConfig(**t5_keys.infer_architecture(tensors, str(checkpoint)))


def clip_official(tensors: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    try:
        return clip_keys.to_official(tensors)
    except ValueError as e:
        raise CheckpointError(f"{source}: not a usable CLIP image encoder checkpoint: {e}.") from None


def clip_architecture(tensors: dict[str, torch.Tensor], checkpoint: Path) -> ClipVisionConfig:
    try:
        return ClipVisionConfig(**clip_keys.infer_architecture(tensors))
    except ValueError as e:
        raise CheckpointError(f"{checkpoint}: not a usable CLIP image encoder checkpoint: {e}.") from None


def clip_tower(official: dict[str, torch.Tensor], config: ClipVisionConfig) -> dict[str, torch.Tensor]:
    """Tensors the tower uses, without ``visual.``; Wan never runs the last block, ``post_norm`` or ``head``."""
    unused = ("post_norm.", f"transformer.{config.num_layers - 1}.")
    tensors = {}
    for name, tensor in official.items():
        local = name.removeprefix(clip_keys.OFFICIAL_PREFIX)
        if local != "head" and not local.startswith(unused):
            tensors[local] = tensor
    return tensors


def vae_architecture(tensors: dict[str, torch.Tensor], checkpoint: Path) -> Wan21VAEConfig | Wan22VAEConfig:
    """Wan2.1 (z 16) or Wan2.2 (z 48), recognized from the tensors."""
    config = Wan22VAEConfig if vae_keys.detect_version(tensors) == "2.2" else Wan21VAEConfig
    return config(**vae_keys.infer_architecture(tensors, str(checkpoint)))


def vae_model(config: Wan21VAEConfig | Wan22VAEConfig) -> nn.Module:
    return Wan22VAE(config) if isinstance(config, Wan22VAEConfig) else Wan21VAE(config)


def with_source(to_official: Callable[[dict], dict]) -> Callable[[dict, str], dict]:
    return lambda tensors, source: to_official(tensors)


# --- the table ------------------------------------------------------------------------------------------------

CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"

COMPONENTS: dict[str, Component] = {c.name: c for c in (
    Component(
        "dit", "Wan DiT", ("dit_original_ckpt", "dit_quantized_ckpt"),
        to_official=with_source(dit_keys.to_official), architecture=dit_architecture, model=WanDiT,
        keep_fp32=FP32_PARAMS, quantizable=True, default_dtype=dit_dtype,
        network=lambda c: f"{c.model_type} DiT (dim {c.dim}, {c.num_layers} layers)",
    ),
    Component(
        "t5", "umT5 text encoder", ("t5_original_ckpt", "t5_quantized_ckpt"),
        official_files=("models_t5_umt5-xxl-enc-bf16.pth",),
        quantized_files=("models_t5_umt5-xxl-enc-{kind}.pth",),
        to_official=t5_keys.to_official, architecture=t5_architecture, model=T5Encoder, quantizable=True,
        # Every weight, norms included, in the file's dtype (bf16 officially), as the official runtime has it.
        default_dtype=lambda tensors: tensors["token_embedding.weight"].dtype, network=lambda c: "umT5 encoder",
    ),
    Component(
        "clip", "CLIP image encoder", ("clip_original_ckpt", "clip_quantized_ckpt"),
        official_files=(CLIP_FILE,),
        quantized_files=(CLIP_FILE.replace(".pth", "-{kind}.pth"), "clip-{kind}.pth"),  # current, then old names
        to_official=clip_official, architecture=clip_architecture, model=ClipVisionTower, used=clip_tower,
        keep_fp32=("norm",), quantizable=True,
        default_dtype=lambda tensors: tensors[clip_keys.OFFICIAL_PREFIX + "patch_embedding.weight"].dtype,
        needed_by="Only Wan2.1 I2V and FLF2V use the CLIP image encoder.", network=lambda c: "CLIP vision tower",
    ),
    Component(
        "vae", "VAE", ("vae_path",), official_files=("Wan2.1_VAE.pth", "Wan2.2_VAE.pth"),
        to_official=vae_keys.to_official, architecture=vae_architecture, model=vae_model,
        network=lambda c: f"Wan{'2.2' if isinstance(c, Wan22VAEConfig) else '2.1'} VAE",
    ),  # float32 unless asked otherwise, as the official code runs it
    Component("tokenizer", "umT5 tokenizer", ("t5_tokenizer_path",)),
)}

# Every config key that names a file or folder (the DiT's Wan2.2 expert keys included).
EXPERT_FILE_KEYS = tuple(f"{short}_{kind}_ckpt" for short in ("high_noise", "low_noise")
                         for kind in ("original", "quantized"))
FILE_KEYS = (*(key for c in COMPONENTS.values() for key in c.file_keys), *EXPERT_FILE_KEYS)


def with_overrides(config: Any, overrides: dict | None) -> Any:
    """``config`` with some fields replaced (e.g. a CLIP head count the checkpoint does not store)."""
    return replace(config, **overrides) if overrides else config
