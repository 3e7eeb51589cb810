"""DiT key layouts and architecture detection, as tables and pure functions.

Official (and LightX2V) names are x2v's own; ComfyUI prefixes and diffusers names are mapped to them.
The architecture is read from tensor shapes, so no ``config.json`` is needed; one that is there (official or
diffusers keys) is read for what the shapes do not say (the head count) and as a cross-check.
"""

from __future__ import annotations

import re
from typing import Protocol

import torch

from x2v.errors import CheckpointError, UnsupportedModelError

PREFIXES = ("model.diffusion_model.", "diffusion_model.")

# diffusers name fragment -> official name fragment, applied to whole dotted components.
_DIFFUSERS_BLOCK_RENAMES = [
    ("scale_shift_table", "modulation"),
    ("attn1.to_q.", "self_attn.q."),
    ("attn1.to_k.", "self_attn.k."),
    ("attn1.to_v.", "self_attn.v."),
    ("attn1.to_out.0.", "self_attn.o."),
    ("attn1.norm_q.", "self_attn.norm_q."),
    ("attn1.norm_k.", "self_attn.norm_k."),
    ("attn2.to_q.", "cross_attn.q."),
    ("attn2.to_k.", "cross_attn.k."),
    ("attn2.to_v.", "cross_attn.v."),
    ("attn2.to_out.0.", "cross_attn.o."),
    ("attn2.norm_q.", "cross_attn.norm_q."),
    ("attn2.norm_k.", "cross_attn.norm_k."),
    ("attn2.add_k_proj.", "cross_attn.k_img."),
    ("attn2.add_v_proj.", "cross_attn.v_img."),
    ("attn2.norm_added_k.", "cross_attn.norm_k_img."),
    ("norm2.", "norm3."),  # diffusers' norm2 is the affine cross-attention norm, officially norm3
    ("ffn.net.0.proj.", "ffn.0."),
    ("ffn.net.2.", "ffn.2."),
    ("proj_in.", "before_proj."),  # VACE
    ("proj_out.", "after_proj."),  # VACE
]

_DIFFUSERS_TOP_RENAMES = {
    "condition_embedder.text_embedder.linear_1.": "text_embedding.0.",
    "condition_embedder.text_embedder.linear_2.": "text_embedding.2.",
    "condition_embedder.time_embedder.linear_1.": "time_embedding.0.",
    "condition_embedder.time_embedder.linear_2.": "time_embedding.2.",
    "condition_embedder.time_proj.": "time_projection.1.",
    "condition_embedder.image_embedder.norm1.": "img_emb.proj.0.",
    "condition_embedder.image_embedder.ff.net.0.proj.": "img_emb.proj.1.",
    "condition_embedder.image_embedder.ff.net.2.": "img_emb.proj.3.",
    "condition_embedder.image_embedder.norm2.": "img_emb.proj.4.",
    "condition_embedder.image_embedder.pos_embed": "img_emb.emb_pos",
    "proj_out.": "head.head.",
    "scale_shift_table": "head.modulation",
}


def strip_prefix(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove a ComfyUI/LightX2V ``model.diffusion_model.`` / ``diffusion_model.`` prefix."""
    for prefix in PREFIXES:
        if any(k.startswith(prefix) for k in tensors):
            return {k.removeprefix(prefix): v for k, v in tensors.items()}
    return tensors


def is_diffusers_layout(keys) -> bool:
    return any(k.startswith("condition_embedder.") or ".attn1.to_q." in k for k in keys)


def _rename(key: str, block_pairs: list[tuple[str, str]], top_pairs: list[tuple[str, str]]) -> str:
    """Replace the first matching (old, new) name fragment: block-level pairs inside ``blocks.N.``, top-level else."""
    block = re.match(r"^((?:vace_)?blocks\.\d+\.)(.*)$", key)
    prefix, rest = block.groups() if block else ("", key)
    for old, new in block_pairs if block else top_pairs:
        if rest.startswith(old):
            return prefix + new + rest[len(old):]
    return key


def diffusers_key_to_official(key: str) -> str:
    return _rename(key, _DIFFUSERS_BLOCK_RENAMES, list(_DIFFUSERS_TOP_RENAMES.items()))


def official_key_to_diffusers(key: str) -> str:
    return _rename(key, [(new, old) for old, new in _DIFFUSERS_BLOCK_RENAMES],
                   [(new, old) for old, new in _DIFFUSERS_TOP_RENAMES.items()])


def to_official(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any supported DiT key layout -> official names (tensors are not copied)."""
    tensors = strip_prefix(tensors)
    if is_diffusers_layout(tensors):
        tensors = {diffusers_key_to_official(k): v for k, v in tensors.items()}
    return tensors


def _indices(keys, prefix: str) -> list[int]:
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)\.")
    return sorted({int(m.group(1)) for k in keys if (m := pattern.match(k))})


# The tensors whose shapes give a DiT's architecture (besides patch_embedding and head.modulation).
SHAPE_KEYS = ("head.head.weight", "blocks.0.ffn.0.weight", "text_embedding.0.weight", "time_embedding.0.weight")


def infer_architecture(tensors: dict[str, torch.Tensor], source: str = "checkpoint") -> dict:
    """``WanDiTConfig`` fields (architecture and model type) of an official-named DiT state dict, from tensor shapes
    alone. The head count is not in the shapes: every release has head dim 128 (a ``config.json`` may say
    otherwise, see ``config_json_fields``)."""
    keys = tensors.keys()
    if "motion_encoder.dec.direction.weight" in keys or any(k.startswith("face_adapter.") for k in keys):
        raise UnsupportedModelError(
            f"{source}: this is a Wan2.2-Animate-14B DiT (motion encoder / face adapter keys). "
            "Animate is not supported yet by x2v."
        )
    if "head.modulation" not in keys or "patch_embedding.weight" not in keys:
        raise CheckpointError(
            f"{source}: not a Wan DiT checkpoint (no head.modulation / patch_embedding.weight). "
            "Point x2v at the diffusion model file(s), not the T5, CLIP or VAE file."
        )
    dim, in_dim = tensors["patch_embedding.weight"].shape[:2]
    patch_size = tuple(tensors["patch_embedding.weight"].shape[2:])
    layers = _indices(keys, "blocks.")
    if not layers:
        raise CheckpointError(f"{source}: a Wan DiT without any blocks.N tensors; the file is incomplete.")
    missing = [key for key in SHAPE_KEYS if key not in keys]
    if missing:
        raise CheckpointError(f"{source}: a Wan DiT without {', '.join(missing)}, whose shapes say its size; the file "
                              "is incomplete or corrupt (download it again)")
    head_rows = tensors["head.head.weight"].shape[0]
    image_branch = "blocks.0.cross_attn.k_img.weight" in keys
    image_tokens = tensors["img_emb.emb_pos"].shape[1] if "img_emb.emb_pos" in keys else None
    vace_blocks = _indices(keys, "vace_blocks.")
    vace_layers: tuple[int, ...] = ()
    if vace_blocks:
        # Shipped VACE models place their hints evenly: every num_layers/len(vace) blocks, starting at 0.
        step = len(layers) // len(vace_blocks)
        vace_layers = tuple(range(0, len(layers), step))[: len(vace_blocks)]
    out_dim = head_rows // (patch_size[0] * patch_size[1] * patch_size[2])
    if vace_blocks:
        model_type = "vace"
    elif image_branch:
        model_type = "flf2v" if "img_emb.emb_pos" in keys else "i2v"
    elif in_dim == out_dim and in_dim == 48:
        model_type = "ti2v"
    elif in_dim > out_dim:
        model_type = "i2v"  # Wan2.2 I2V-A14B: image latent on the channels, no CLIP
    else:
        model_type = "t2v"
    return dict(
        model_type=model_type,
        in_dim=in_dim,
        out_dim=out_dim,
        dim=dim,
        ffn_dim=tensors["blocks.0.ffn.0.weight"].shape[0],
        num_heads=max(1, dim // 128),
        num_layers=len(layers),
        text_dim=tensors["text_embedding.0.weight"].shape[1],
        freq_dim=tensors["time_embedding.0.weight"].shape[1],
        patch_size=patch_size,
        image_branch=image_branch,
        image_dim=tensors["img_emb.proj.1.weight"].shape[1] if image_branch else 1280,
        image_tokens=image_tokens,
        vace_layers=vace_layers,
        vace_in_dim=tensors["vace_patch_embedding.weight"].shape[1] if vace_blocks else 96,
    )


class Architecture(Protocol):
    """What the release names below read of a DiT's architecture (``x2v.models.wan_dit.WanDiTConfig`` has it)."""

    model_type: str
    dim: int
    image_branch: bool


RELEASE_SIZES = {1536: "1.3B", 3072: "5B", 5120: "14B"}  # DiT width -> the release size it belongs to


def variant_name(cfg: Architecture) -> str:
    """Human name of the release a config looks like, e.g. 'Wan2.1 T2V-1.3B'."""
    size = RELEASE_SIZES.get(cfg.dim, f"dim {cfg.dim}")
    if cfg.model_type == "ti2v":
        return f"Wan2.2 TI2V-{size}"
    if cfg.model_type == "i2v" and not cfg.image_branch:
        return f"Wan2.2 I2V-A{size} expert"
    return f"Wan2.1 {cfg.model_type.upper()}-{size}"


def supported_tasks(cfg: Architecture) -> list[str]:
    """Generation tasks a DiT can serve, from its architecture."""
    return {"t2v": ["t2v", "t2i"], "ti2v": ["t2v", "i2v"]}.get(cfg.model_type, [cfg.model_type])


TASK_NEEDS = {
    "t2v": "a text-to-video DiT (T2V, TI2V-5B)",
    "t2i": "a Wan2.1 T2V DiT",
    "i2v": "an image-to-video DiT (Wan2.1 I2V, Wan2.2 I2V-A14B, TI2V-5B)",
    "flf2v": "the Wan2.1 FLF2V DiT",
    "vace": "a Wan2.1 VACE DiT",
}


def check_task(cfg: Architecture, task: str, source: str) -> None:
    """Refuse a task the weights cannot serve (e.g. i2v with T2V weights) before anything runs."""
    if task not in TASK_NEEDS:
        raise ValueError(f"unknown task {task!r}; x2v knows {', '.join(TASK_NEEDS)}")
    tasks = supported_tasks(cfg)
    if task not in tasks:
        raise CheckpointError(
            f"{source}: task {task} needs {TASK_NEEDS[task]}, but this is a {variant_name(cfg)} DiT, which serves "
            f"{', '.join(tasks)}. Point model_path at the right model, or set task to one of those."
        )


# config.json keys -> WanDiTConfig fields. Official (WanModel, docs/models.md) and diffusers
# (WanTransformer3DModel) names; diffusers gives the width as num_attention_heads x attention_head_dim.
OFFICIAL_CONFIG_KEYS = {k: k for k in ("in_dim", "out_dim", "dim", "ffn_dim", "num_heads", "num_layers", "text_len",
                                       "text_dim", "freq_dim", "eps", "vace_in_dim")}
DIFFUSERS_CONFIG_KEYS = {"in_channels": "in_dim", "out_channels": "out_dim", "ffn_dim": "ffn_dim",
                         "num_attention_heads": "num_heads", "num_layers": "num_layers", "text_dim": "text_dim",
                         "freq_dim": "freq_dim", "eps": "eps", "image_dim": "image_dim",
                         "pos_embed_seq_len": "image_tokens", "vace_in_channels": "vace_in_dim"}
# Fields the tensor shapes determine: a config.json that disagrees describes other weights.
SHAPE_FIELDS = ("in_dim", "out_dim", "dim", "ffn_dim", "num_layers", "text_dim", "freq_dim", "patch_size",
                "image_dim", "image_tokens", "vace_in_dim")


def is_diffusers_config(raw: dict) -> bool:
    return "num_attention_heads" in raw or str(raw.get("_class_name", "")).endswith("Transformer3DModel")


# The range of each integer field a config.json may state: the releases lie well inside (text_len 512, 12 to 40
# heads); a value outside is a broken or hostile file, which would crash or exhaust memory further on.
CONFIG_RANGES = {"in_dim": (1, 4096), "out_dim": (1, 4096), "dim": (1, 65536), "ffn_dim": (1, 262144),
                 "num_heads": (1, 1024), "num_layers": (1, 1000), "text_len": (1, 4096), "text_dim": (1, 65536),
                 "freq_dim": (2, 65536), "vace_in_dim": (1, 4096), "image_dim": (1, 65536), "image_tokens": (1, 4096)}
EPS_RANGE = (0.0, 0.1)  # exclusive: the norms divide by sqrt(mean + eps); 0 or less gives NaN, black videos


def config_json_fields(raw: dict, source: str = "config.json") -> dict:
    """The ``WanDiTConfig`` fields a DiT ``config.json`` states (official or diffusers keys; null values and keys
    that are not architecture are left out). ``vace_layers`` is the one field shapes cannot give: where the VACE
    hints go. Values of the wrong type or out of range are a ``CheckpointError`` naming ``source``."""
    if not isinstance(raw, dict):
        raise CheckpointError(f"{source}: a config.json holds one JSON object ({{\"dim\": 5120, ...}}), got "
                              f"{type(raw).__name__}; use the config.json that came with the weights, or remove it")
    diffusers = is_diffusers_config(raw)
    names = DIFFUSERS_CONFIG_KEYS if diffusers else OFFICIAL_CONFIG_KEYS
    fields = {field: raw[key] for key, field in names.items() if raw.get(key) is not None}
    if diffusers and raw.get("attention_head_dim") is not None:
        fields["head_dim"] = raw["attention_head_dim"]
    problems = config_problems(fields)
    if diffusers and "head_dim" in fields:
        head_dim = fields.pop("head_dim")
        if not problems and "num_heads" in fields:
            fields["dim"] = fields["num_heads"] * head_dim
    if raw.get("patch_size") is not None:
        patch = raw["patch_size"]
        if not (isinstance(patch, list) and len(patch) == 3 and all(_is_int(p) and 1 <= p <= 16 for p in patch)):
            problems.append(f"patch_size must be 3 integers from 1 to 16, got {patch!r}")
        elif diffusers:
            fields["patch_size"] = tuple(patch)
    if raw.get("vace_layers"):
        layers = raw["vace_layers"]
        if not (isinstance(layers, list) and all(_is_int(n) and 0 <= n < 1000 for n in layers)):
            problems.append(f"vace_layers must be a list of block numbers, got {layers!r}")
        else:
            fields["vace_layers"] = tuple(layers)
    if problems:
        raise CheckpointError(f"{source}: {'; '.join(problems)}. Use the config.json that came with the weights, or "
                              "remove it (x2v reads the architecture from the weights)")
    return fields


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def config_problems(fields: dict) -> list[str]:
    """What is wrong with a config.json's architecture fields: types, ranges, heads that do not divide the width."""
    problems = []
    for field, value in fields.items():
        if field == "eps":
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not EPS_RANGE[0] < value < EPS_RANGE[1]:
                problems.append(f"eps must be a number between {EPS_RANGE[0]} and {EPS_RANGE[1]} (the releases: "
                                f"1e-6), got {value!r}")
            continue
        low, high = CONFIG_RANGES.get(field, (1, 65536))
        if not _is_int(value) or not low <= value <= high:
            problems.append(f"{field} must be an integer from {low} to {high}, got {value!r}")
    heads, dim = fields.get("num_heads"), fields.get("dim")
    if not problems and heads is not None and dim is not None and dim % heads:
        problems.append(f"num_heads {heads} does not divide dim {dim}")
    return problems
