"""Which file is which component: a model directory plus LightX2V's config keys -> checkpoint paths.

Rules (one for every component, the same for both Wan2.2 experts):
1. an explicit config key wins (``dit_original_ckpt``, ``high_noise_quantized_ckpt``, ``t5_original_ckpt``, ...);
2. else the official place in the model directory (``high_noise_model/``, ``models_t5_umt5-xxl-enc-bf16.pth``, ...);
3. else the single candidate; several candidates are an error that lists them and names the key that chooses.
Every answer records how it was found, so ``x2v inspect`` and the logs can say it.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path

from x2v.errors import CheckpointError
from x2v.formats.quant import scheme_kind
from x2v.formats.readers import read_safetensors_header, safetensors_metadata

EXPERTS = ("high_noise_model", "low_noise_model")
EXPERT_SHORT = {"high_noise_model": "high_noise", "low_noise_model": "low_noise"}
# x2v's converter records the expert here; the weights alone cannot tell the two experts apart.
EXPERT_METADATA_KEY = "wan_expert"
OFFICIAL_DIT_STEM = "diffusion_pytorch_model"
# LightX2V's hub layout before Oct 2025; still on users' disks.
LEGACY_DIT_FOLDERS = ("original", "fp8", "int8", "distill_models", "distill_fp8", "distill_int8")
MOE_MODEL_CLASSES = ("wan2.2_moe", "wan2.2_moe_distill")


@dataclass(frozen=True)
class Found:
    path: Path
    how: str

    def __str__(self) -> str:
        return f"{self.path} ({self.how})"


def one_candidate(directory: Path, candidates: list[Path], what: str, looked_for: str, config_key: str,
                  note: str = "") -> Path:
    """The single candidate; none or several is an error that lists them and names the key that chooses."""
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise CheckpointError(f"{directory}: no {what} found (looked for {looked_for}).{note} Pass the file itself, "
                              f"or set the config key {config_key} to it.")
    listing = ", ".join(str(c.relative_to(directory)) for c in candidates)
    raise CheckpointError(f"{directory}: {len(candidates)} {what} checkpoints found ({listing}); x2v will not guess "
                          f"or merge them. Set the config key {config_key} to the one you want.")


def _existing(path: str | Path, key: str) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: not found (set by config key {key}). Fix the path or remove the key.")
    return path


def is_dit_safetensors(path: Path) -> bool:
    """A DiT file has the head modulation (official/ComfyUI names) or its diffusers twin; T5, CLIP, VAE and
    LoRA files lying beside it do not."""
    keys = read_safetensors_header(path)[0].keys()
    return any(k.endswith("head.modulation") or k == "scale_shift_table" for k in keys)


def dit_candidates(directory: Path) -> list[Path]:
    """DiT checkpoints in one folder: a shard index counts once for its shards; a block-split folder is itself one."""
    if (directory / "non_block.safetensors").is_file():
        return [directory]
    indexes = sorted(directory.glob("*.safetensors.index.json"))
    sharded = {p for i in indexes for p in directory.glob(i.name.removesuffix(".index.json").replace(
        ".safetensors", "-*.safetensors"))}
    singles = [p for p in sorted(directory.glob("*.safetensors")) if p not in sharded and is_dit_safetensors(p)]
    pickles = [p for p in sorted(directory.glob("*.pt")) + sorted(directory.glob("distill_model.pth"))]
    return indexes + singles + pickles


def find_dit_file(directory: Path, choose_keys: str) -> Found:
    """The one DiT checkpoint of ``directory``; several are an error, never a merge (pitfall A01)."""
    candidates = dit_candidates(directory)
    found = one_candidate(directory, candidates, "DiT", f"{OFFICIAL_DIT_STEM}*.safetensors with its index, one "
                          ".safetensors file, or non_block.safetensors + block_N.safetensors", choose_keys)
    what = "block-split folder" if found == directory else "the only DiT checkpoint"
    return Found(found, f"{what} in {directory}")


def _dit_at(path: Path, how: str, choose_keys: str) -> Found:
    return Found(path, how) if path.is_file() else find_dit_file(path, choose_keys)


def checkpoint_metadata(path: Path) -> dict[str, str]:
    """The safetensors metadata of a DiT checkpoint: its file, an index's first shard, a block-split folder's
    ``non_block`` file; {} for pickles and unreadable files (loading reports those)."""
    if path.is_dir():
        path = path / "non_block.safetensors"
    elif path.name.endswith(".index.json"):
        try:
            path = path.parent / min(json.loads(path.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return {}
    if path.suffix != ".safetensors" or not path.is_file():
        return {}
    try:
        return safetensors_metadata(path)
    except CheckpointError:
        return {}


def tagged_experts(directory: Path) -> dict[Path, str]:
    """DiT checkpoints of ``directory`` whose metadata names their Wan2.2 expert (x2v convert writes it)."""
    tags = {p: checkpoint_metadata(p).get(EXPERT_METADATA_KEY) for p in dit_candidates(directory)}
    return {p: tag for p, tag in tags.items() if tag in EXPERTS}


def is_moe(model_path: Path, config: dict) -> bool:
    if config.get("model_cls") in MOE_MODEL_CLASSES:
        return True
    if any(config.get(f"{short}_{kind}_ckpt") for short in EXPERT_SHORT.values() for kind in ("original", "quantized")):
        return True
    return model_path.is_dir() and (
        all((model_path / e).is_dir() for e in EXPERTS) or (model_path / "transformer_2").is_dir()
        or set(tagged_experts(model_path).values()) == set(EXPERTS)
    )


def resolve_expert(model_path: Path, config: dict, expert: str) -> Found:
    """One Wan2.2 expert, by the same rule for both: explicit key > expert folder > recorded metadata."""
    short = EXPERT_SHORT[expert]
    keys = (f"{short}_quantized_ckpt", f"{short}_original_ckpt")
    if not config.get("dit_quantized"):
        keys = keys[::-1]
    choose = f"{short}_original_ckpt (or {short}_quantized_ckpt)"
    for key in keys:
        if config.get(key):
            return _dit_at(_existing(config[key], key), f"config key {key}", choose)
    diffusers_folder = {"high_noise_model": "transformer", "low_noise_model": "transformer_2"}[expert]
    for folder, how in ((model_path / expert, f"the {expert}/ folder"),
                        (model_path / "distill_models" / expert, f"the legacy distill_models/{expert}/ folder"),
                        (model_path / diffusers_folder, f"diffusers {diffusers_folder}/ ({expert})")):
        if folder.is_dir():
            found = find_dit_file(folder, choose)
            return Found(found.path, how)
    tagged = [p for p, tag in tagged_experts(model_path).items() if tag == expert]
    if len(tagged) == 1:
        return Found(tagged[0], f"file metadata {EXPERT_METADATA_KEY}={expert}")
    raise CheckpointError(
        f"{model_path}: no {expert} found for this two-expert Wan2.2 model (looked for the config keys "
        f"{' / '.join(keys)}, a {expert}/ folder and files whose metadata names the expert). Both experts are "
        f"needed; the two files cannot be told apart by their weights, so set {choose}."
    )


def resolve_dit(model_path: str | Path, config: dict | None = None) -> dict[str, Found]:
    """``{"dit": Found}``, or ``{"high_noise_model": ..., "low_noise_model": ...}`` for Wan2.2 A14B."""
    config = config or {}
    model_path = Path(model_path)
    if is_moe(model_path, config):
        for key in ("dit_original_ckpt", "dit_quantized_ckpt"):
            if config.get(key):
                # One path cannot be both experts (pitfall A11): refuse instead of loading it twice.
                raise CheckpointError(
                    f"config key {key} names one DiT, but this is a two-expert Wan2.2 model. Use "
                    f"high_noise_{key.split('_')[1]}_ckpt and low_noise_{key.split('_')[1]}_ckpt instead."
                )
        return {expert: resolve_expert(model_path, config, expert) for expert in EXPERTS}
    keys = ("dit_quantized_ckpt", "dit_original_ckpt") if config.get("dit_quantized") else (
        "dit_original_ckpt", "dit_quantized_ckpt")
    choose = "dit_original_ckpt (or dit_quantized_ckpt with dit_quantized)"
    for key in keys:
        if config.get(key):
            return {"dit": _dit_at(_existing(config[key], key), f"config key {key}", choose)}
    model_path = _existing(model_path, "model_path")
    if model_path.is_file():
        return {"dit": Found(model_path, "the file given")}
    if (model_path / "transformer").is_dir() and not dit_candidates(model_path):
        return {"dit": Found(find_dit_file(model_path / "transformer", choose).path, "diffusers transformer/")}
    if dit_candidates(model_path):
        return {"dit": find_dit_file(model_path, choose)}
    legacy = [model_path / f for f in LEGACY_DIT_FOLDERS if (model_path / f).is_dir()
              and dit_candidates(model_path / f)]
    if len(legacy) == 1:
        found = find_dit_file(legacy[0], choose)
        return {"dit": Found(found.path, f"the legacy LightX2V {legacy[0].name}/ folder")}
    if legacy:
        raise CheckpointError(
            f"{model_path}: DiT weights in {len(legacy)} legacy LightX2V folders ("
            + ", ".join(f.name + "/" for f in legacy) + f"); set {choose} to the one you want."
        )
    return {"dit": find_dit_file(model_path, choose)}


# component -> (explicit keys, quantized-flag key that puts the quantized key first, finder in the model dir).
# Finders are named, not imported: the loaders import this module.
COMPONENT_RULES = {
    "t5": (("t5_quantized_ckpt", "t5_original_ckpt"), "t5_quantized", "text_encoder.find_t5_checkpoint"),
    "tokenizer": (("t5_tokenizer_path",), None, "text_encoder.find_tokenizer_dir"),
    "clip": (("clip_quantized_ckpt", "clip_original_ckpt"), "clip_quantized",
             "image_encoder.find_image_encoder_checkpoint"),
    "vae": (("vae_path",), None, "vae.find_vae_checkpoint"),
}


def resolve_component(name: str, model_path: str | Path, config: dict | None = None) -> Found:
    """The checkpoint of ``t5``, ``tokenizer``, ``clip`` or ``vae``: explicit key, else the model directory."""
    config = config or {}
    keys, flag, finder = COMPONENT_RULES[name]
    if flag and not config.get(flag):
        keys = keys[::-1]
    for key in keys:
        if config.get(key):
            return Found(_existing(config[key], key), f"config key {key}")
    model_path = _existing(model_path, "model_path")
    if model_path.is_file():
        model_path = model_path.parent  # a single DiT file: its companions lie beside it
    module, function = finder.rsplit(".", 1)
    find = getattr(importlib.import_module(f"x2v.loading.{module}"), function)
    # LightX2V's quantized file names carry the scheme's kind: models_t5_umt5-xxl-enc-fp8.pth
    kind = scheme_kind(config.get(f"{name}_quant_scheme"), name) if flag and config.get(flag) else None
    return Found(find(model_path, kind) if kind else find(model_path), f"found in {model_path}")
