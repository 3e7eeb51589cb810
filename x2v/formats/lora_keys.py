"""LoRA file key conventions, as tables and pure functions: a LoRA state dict -> the official DiT tensors it changes.

Every convention in circulation is mapped to x2v's own (official Wan) names: LightX2V / ComfyUI
(``diffusion_model.`` / ``model.diffusion_model.`` + Wan names, seven pair-suffix spellings), diffusers / PEFT
(``transformer.`` + diffusers names, ``lora_B.bias``), kohya / musubi-tuner (``lora_unet_`` + Wan names with ``_``
for ``.``) and Wan-Fun (``lora_unet__``). The mapping does not look at the model: a key naming an image-branch layer
maps to that layer whether or not the model has one, so the report can say why it was not applied.

Roles per official target tensor: a pair ``up [out, r]`` / ``down [r, in]`` with an optional ``alpha``, or a
``diff`` added as it is (``.diff`` -> weight, ``.diff_b`` / PEFT ``lora_B.bias`` -> bias, ``.diff_m`` -> modulation).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from x2v.errors import CheckpointError, UnsupportedModelError
from x2v.formats.dit_keys import RELEASE_SIZES, official_key_to_diffusers
from x2v.formats.keys import summarize_keys

UP, DOWN, ALPHA, DIFF = "up", "down", "alpha", "diff"

# (up suffix, down suffix), checked in this order, first match wins (the same table in LightX2V and ComfyUI).
PAIR_SUFFIXES = (
    (".lora_up.weight", ".lora_down.weight"),
    ("_lora.up.weight", "_lora.down.weight"),
    (".lora_B.weight", ".lora_A.weight"),
    (".lora.up.weight", ".lora.down.weight"),
    (".lora_B", ".lora_A"),
    (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
    (".lora_B.default.weight", ".lora_A.default.weight"),
)
# Single tensors: suffix -> (role, what the official target tensor is called below the base).
SINGLE_SUFFIXES = {
    ".alpha": (ALPHA, "weight"),
    ".diff": (DIFF, "weight"),
    ".diff_b": (DIFF, "bias"),
    ".lora_B.bias": (DIFF, "bias"),  # PEFT lora_bias: the bias delta (LightX2V's diff_b in diffusers files)
    ".diff_m": (DIFF, "modulation"),  # LightX2V: blocks.N.diff_m -> blocks.N.modulation
}
SUFFIXES = [(up, UP, "weight") for up, _ in PAIR_SUFFIXES] + [(down, DOWN, "weight") for _, down in PAIR_SUFFIXES] \
    + [(suffix, role, param) for suffix, (role, param) in SINGLE_SUFFIXES.items()]

# Adapter types x2v recognizes but does not apply: key fragment -> what it is.
UNSUPPORTED = {
    ".hada_": "LoHa (LyCORIS Hadamard-product adapter)",
    ".lokr_": "LoKr (LyCORIS Kronecker-product adapter)",
    ".dora_scale": "DoRA (weight-decomposed LoRA)",
    ".lora_magnitude_vector": "DoRA (weight-decomposed LoRA, PEFT)",
    ".lora_mid.": "LoCon with a Tucker core (lora_mid)",
}

# One leading wrapper is stripped, repeatedly ("model.diffusion_model.", PEFT's "base_model.model.").
DOTTED_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.", "model.",
                   "unet.")
KOHYA_PREFIXES = ("lora_unet__", "lora_unet_")  # Wan-Fun (VideoX-Fun) writes a double underscore

# Every official module (or bare parameter) a LoRA can name, inside a block and at the top level.
BLOCK_PARTS = (
    "self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "self_attn.norm_q", "self_attn.norm_k",
    "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "cross_attn.norm_q", "cross_attn.norm_k",
    "cross_attn.k_img", "cross_attn.v_img", "cross_attn.norm_k_img", "norm3", "ffn.0", "ffn.2", "modulation",
    "before_proj", "after_proj",
)
TOP_PARTS = (
    "patch_embedding", "text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2",
    "time_projection.1", "head", "head.head", "head.modulation", "img_emb.proj.0", "img_emb.proj.1",
    "img_emb.proj.3", "img_emb.proj.4", "img_emb.emb_pos", "vace_patch_embedding",
)
PARAMETERS = ("modulation", "emb_pos")  # official names that are parameters, not modules: a .diff targets them
BLOCK = re.compile(r"^((?:vace_)?blocks)[._](\d+)(?:[._](.+))?$")


def _spellings(part: str, in_block: bool) -> dict[str, str]:
    """Official and diffusers spellings of one official name, dotted and with ``_`` (kohya) -> the official name."""
    # official_key_to_diffusers renames whole dotted components, so give it a block-level key with a trailing dot.
    key = f"blocks.0.{part}." if in_block else f"{part}."
    diffusers = official_key_to_diffusers(key).removeprefix("blocks.0." if in_block else "")[:-1]
    return {name: part for name in (part, diffusers, part.replace(".", "_"), diffusers.replace(".", "_"))}


BLOCK_NAMES = {k: v for part in BLOCK_PARTS for k, v in _spellings(part, True).items()}
TOP_NAMES = {k: v for part in TOP_PARTS for k, v in _spellings(part, False).items()}


def check_supported(keys, source: str) -> None:
    """Refuse adapter types whose tensors are not a plain LoRA (applying only part of them would be wrong)."""
    for fragment, what in UNSUPPORTED.items():
        found = [k for k in keys if fragment in k]
        if found:
            raise UnsupportedModelError(
                f"{source}: a {what} file ({len(found)} tensors like {found[0]}). x2v applies plain LoRA pairs "
                "(lora_up/lora_down, lora_A/lora_B) with alpha and .diff/.diff_b/.diff_m tensors only. Remove it "
                "from lora_configs, or use a plain LoRA of it (e.g. extracted from the merged weights)."
            )


def parse_key(key: str) -> tuple[str, str, str] | None:
    """``(base, role, target parameter)`` of one LoRA file key, or None if no convention knows its suffix."""
    for suffix, role, param in SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], role, param
    return None


def _strip_dotted_prefixes(base: str) -> str:
    while prefix := next((p for p in DOTTED_PREFIXES if base.startswith(p)), None):
        base = base[len(prefix):]
    return base


def official_base(base: str) -> str | None:
    """A LoRA base name in any convention -> the official module or parameter path; None if it names none."""
    kohya = next((p for p in KOHYA_PREFIXES if base.startswith(p)), None)
    name = base[len(kohya):] if kohya else _strip_dotted_prefixes(base)
    block = BLOCK.match(name)
    if block is None:
        return TOP_NAMES.get(name)
    kind, index, part = block.groups()
    if part is None:
        return f"{kind}.{index}"  # the block itself: the base of a diff_m
    official = BLOCK_NAMES.get(part)
    return f"{kind}.{index}.{official}" if official else None


def target_key(base: str, param: str) -> str:
    """The official state-dict key a role changes: ``blocks.0.self_attn.q`` + weight -> ``...q.weight``."""
    if param == "weight" and base.rpartition(".")[2] in PARAMETERS:
        return base  # a .diff of a bare parameter (blocks.N.modulation, img_emb.emb_pos)
    return f"{base}.{param}"


@dataclass
class LoraTarget:
    """The tensors of one LoRA file that change one official model tensor, with the file keys they came from."""

    up: torch.Tensor | None = None
    down: torch.Tensor | None = None
    alpha: torch.Tensor | None = None
    diff: torch.Tensor | None = None
    keys: dict[str, str] = field(default_factory=dict)  # role -> file key

    @property
    def rank(self) -> int:
        return self.down.shape[0]


def group_by_target(tensors: dict[str, torch.Tensor], source: str) -> tuple[dict[str, LoraTarget], list[str]]:
    """``(official target key -> its LoRA tensors, keys of no known convention)``.

    A target named twice (e.g. a file mixing two conventions, or both ``.diff_b`` and ``lora_B.bias``) is an error:
    summing or picking one would be a guess.
    """
    targets: dict[str, LoraTarget] = {}
    unrecognized = []
    for key, tensor in tensors.items():
        parsed = parse_key(key)
        base = official_base(parsed[0]) if parsed else None
        if base is None:
            unrecognized.append(key)
            continue
        _, role, param = parsed
        target = targets.setdefault(target_key(base, param), LoraTarget())
        if role in target.keys:
            raise CheckpointError(
                f"{source}: {target.keys[role]} and {key} both give the {role} of {target_key(base, param)}. "
                "The file mixes two key conventions or was merged from two LoRAs; use one LoRA per file."
            )
        setattr(target, role, tensor)
        target.keys[role] = key
    for key, target in targets.items():
        if (target.up is None) != (target.down is None):
            have, lacks = (UP, DOWN) if target.up is not None else (DOWN, UP)
            raise CheckpointError(
                f"{source}: {target.keys[have]} has no matching {lacks} tensor (target {key}). The file is "
                "incomplete or was cut; download it again."
            )
    return targets, unrecognized


def alpha_value(tensor: torch.Tensor, key: str, source: str) -> float:
    """An ``.alpha`` of any dtype (int64 0-dim scalars included) as a float; unreadable is an error, not scale 1."""
    value = float(tensor.reshape(()).item()) if tensor.numel() == 1 else math.nan
    if not math.isfinite(value):
        raise CheckpointError(
            f"{source}: {key} (shape {tuple(tensor.shape)}, {tensor.dtype}) is not one finite number. An alpha "
            "must be a single value; the file is corrupt. Set \"alpha\" in lora_configs to override it."
        )
    return value


def shape_problem(key: str, target: LoraTarget, shape: torch.Size) -> str | None:
    """Why this target's tensors do not fit a model tensor of ``shape`` (None when they fit).

    A pair is ``up.flatten(1) @ down.flatten(1)`` reshaped to the target, so conv LoRAs (``down [r, in, kt, kh, kw]``)
    fit too; a diff must have the target's exact shape.
    """
    shape = tuple(shape)
    if target.diff is not None and tuple(target.diff.shape) != shape:
        return f"{key}: {target.keys[DIFF]} is {tuple(target.diff.shape)}, the model's tensor is {shape}"
    if target.up is None:
        return None
    up, down = tuple(target.up.shape), tuple(target.down.shape)
    rank = down[0] if down else 0
    if rank < 1:
        return f"{key}: lora_down {down} has rank 0 (an empty pair: the file is broken)"
    if len(up) < 2 or math.prod(up[1:]) != rank:
        return f"{key}: lora_up {up} and lora_down {down} have different ranks"
    if (up[0], math.prod(down[1:])) != (shape[0], math.prod(shape[1:])):
        return f"{key}: lora_up {up} @ lora_down {down} gives [{up[0]}, {math.prod(down[1:])}], the model's " \
               f"tensor is {shape}"
    return None


# --- why a key has no target, and what the LoRA was made for ---------------------------------------------------

IMAGE_BRANCH = re.compile(r"^img_emb\.|\.cross_attn\.(?:k_img|v_img|norm_k_img)\b")
FLF2V_ONLY = "img_emb.emb_pos"
UNRECOGNIZED = "not a key of any known LoRA convention"
LONE_ALPHA = "alpha without its lora_up/lora_down pair"


def skip_reason(key: str, model: str, num_blocks: int) -> str:
    """Why an official key the LoRA changes is absent from ``model`` (described, e.g. "Wan2.1 T2V-14B")."""
    if key == FLF2V_ONLY:
        return f"first-last-frame keys for Wan2.1 FLF2V; this {model} has none"
    if IMAGE_BRANCH.search(key):
        return f"image-branch keys for Wan2.1 I2V/FLF2V; this {model} has none"
    if key.startswith("vace_"):
        return f"VACE keys; this {model} has none"
    block = BLOCK.match(key)
    if block and block[1] == "blocks" and int(block[2]) >= num_blocks:
        return f"blocks beyond the {num_blocks} of this {model}"
    return f"not in this {model}"


def describe_skipped(skipped: dict[str, list[str]]) -> list[str]:
    """One line per reason: how many file keys, why, and their patterns."""
    return [f"skipped {len(keys)}: {reason}: {summarize_keys(keys, limit=6)}" for reason, keys in skipped.items()]


WIDTH_KEYS = re.compile(r"^blocks\.\d+\.(?:self_attn\.[qkvo]\.weight|norm3\.weight|modulation)$")


def _width(key: str, target: LoraTarget) -> int | None:
    """The model width a block-level target reveals (rows of a square attention weight, length of a norm)."""
    if not WIDTH_KEYS.match(key):
        return None
    tensor = target.up if target.up is not None else target.diff
    return tensor.shape[-1] if key.endswith("modulation") else tensor.shape[0]


def guess_variant(targets: dict[str, LoraTarget]) -> str:
    """The base model a LoRA seems made for, from its shapes and which layers it touches."""
    width = next((w for key, t in targets.items() if (w := _width(key, t)) is not None), None)
    if width is None:
        return "unknown (no block attention weight or norm to read the model width from)"
    blocks = 1 + max((int(m[2]) for k in targets if (m := BLOCK.match(k)) and m[1] == "blocks"), default=-1)
    size = RELEASE_SIZES.get(width)
    if FLF2V_ONLY in targets:
        family = "Wan2.1 FLF2V"
    elif any(IMAGE_BRANCH.search(k) for k in targets):
        family = "Wan2.1 I2V"
    elif any(k.startswith("vace_") for k in targets):
        family = "Wan2.1 VACE"
    elif size == "5B":
        family = "Wan2.2 TI2V"
    elif size == "14B":
        return f"Wan2.1 T2V-14B or a Wan2.2 A14B expert (dim {width}, {blocks} blocks, no image-branch keys)"
    elif size == "1.3B":
        family = "Wan2.1 T2V"
    else:
        return f"a Wan model of unknown size (dim {width}, {blocks} blocks)"
    return f"{family}-{size} (dim {width}, {blocks} blocks)" if size else f"{family} (dim {width}, {blocks} blocks)"
