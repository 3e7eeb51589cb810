"""What ``x2v convert`` writes, as tables: output layouts, file names, config.json formats and the metadata keys.

The metadata a converted file records is ``x2v.formats.metadata``.

A layout is a key naming (official Wan names, diffusers names, ComfyUI's ``model.diffusion_model.`` prefix) and a
container (shards + index, one file, LightX2V's block-split folder). Every converted safetensors file records in
its metadata what it holds (``METADATA_KEYS``), so that the loader, ``x2v inspect`` and the resolver understand
it without a config key or a folder name.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from x2v.formats.dit_keys import PREFIXES, official_key_to_diffusers
from x2v.formats.readers import NON_BLOCK_FILE
from x2v.loading.components import COMPONENTS
from x2v.loading.resolve import OFFICIAL_DIT_STEM
from x2v.models.wan_dit import WanDiTConfig

SHARDED, SINGLE, BLOCK_SPLIT = "sharded", "single", "block-split"
COMFY_PREFIX = PREFIXES[0]  # "model.diffusion_model.", the prefix of ComfyUI checkpoint-style files


@dataclass(frozen=True)
class Layout:
    name: str
    naming: str  # official | diffusers | comfyui
    container: str  # SHARDED | SINGLE | BLOCK_SPLIT


# docs/convert.md describes each; ComfyUI's quantized form is scaled fp8 (per-tensor scale_weight + marker).
LAYOUTS = {layout.name: layout for layout in (
    Layout("official", "official", SHARDED),
    Layout("single", "official", SINGLE),
    Layout("diffusers", "diffusers", SHARDED),
    Layout("comfyui", "comfyui", SINGLE),
    Layout("block-split", "official", BLOCK_SPLIT),
)}

NAMINGS = {
    "official": lambda key: key,
    "diffusers": official_key_to_diffusers,
    "comfyui": lambda key: COMFY_PREFIX + key,
}

# The weight-scale spelling each naming's readers expect (ComfyUI: per-tensor scale_weight; else LightX2V's).
SCALE_SPELLING = {"official": "weight_scale", "diffusers": "weight_scale", "comfyui": "scale_weight"}

# --- file names ----------------------------------------------------------------------------------------------

SINGLE_FILE = f"{OFFICIAL_DIT_STEM}.safetensors"
INDEX_FILE = f"{OFFICIAL_DIT_STEM}.safetensors.index.json"


def shard_name(i: int, count: int) -> str:
    """The official / diffusers shard name; a checkpoint that fits in one shard is one plain file."""
    return SINGLE_FILE if count == 1 else f"{OFFICIAL_DIT_STEM}-{i + 1:05d}-of-{count:05d}.safetensors"


def block_file(block: int | None) -> str:
    return NON_BLOCK_FILE if block is None else f"block_{block}.safetensors"


def index_json(weight_map: dict[str, str], total_size: int) -> str:
    return json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=2)


def encoder_file(component: str, precision: str) -> str:
    """LightX2V's name for a (quantized) T5 / CLIP file; precision is fp8 | int8 | bf16 | fp16 | fp32. umT5 files
    carry any precision in the name (the release's is bf16); a float CLIP file has the release's name."""
    entry = COMPONENTS[component]
    if component == "t5" or precision in ("fp8", "int8"):
        return entry.quantized_files[0].format(kind=precision)
    return entry.official_files[0]


# --- sizes ---------------------------------------------------------------------------------------------------

SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """``"5GB"`` -> 5e9 bytes (KB/MB/GB are powers of 1000, KiB/MiB/GiB of 1024)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not match or match[2].upper() not in SIZE_UNITS or float(match[1]) <= 0:
        raise ValueError(f"shard size {text!r}: expected a positive size such as 5GB, 500MB or 2GiB")
    return int(float(match[1]) * SIZE_UNITS[match[2].upper()])


# --- config.json -----------------------------------------------------------------------------------------------

OFFICIAL_CONFIG_FIELDS = ("model_type", "text_len", "in_dim", "dim", "ffn_dim", "freq_dim", "out_dim", "num_heads",
                          "num_layers", "eps")


def official_config(cfg: WanDiTConfig) -> dict:
    """The official ``config.json`` of a DiT (what LightX2V reads its architecture from)."""
    config = {"_class_name": "VaceWanModel" if cfg.vace_layers else "WanModel",
              **{f: getattr(cfg, f) for f in OFFICIAL_CONFIG_FIELDS}}
    if cfg.vace_layers:
        config.update(vace_layers=list(cfg.vace_layers), vace_in_dim=cfg.vace_in_dim)
    return config


def diffusers_config(cfg: WanDiTConfig) -> dict:
    """diffusers' ``WanTransformer3DModel`` / ``WanVACETransformer3DModel`` config for the same architecture."""
    config = {
        "_class_name": "WanVACETransformer3DModel" if cfg.vace_layers else "WanTransformer3DModel",
        "patch_size": list(cfg.patch_size), "num_attention_heads": cfg.num_heads, "attention_head_dim": cfg.head_dim,
        "in_channels": cfg.in_dim, "out_channels": cfg.out_dim, "text_dim": cfg.text_dim, "freq_dim": cfg.freq_dim,
        "ffn_dim": cfg.ffn_dim, "num_layers": cfg.num_layers, "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads", "eps": cfg.eps,
        "image_dim": cfg.image_dim if cfg.image_branch else None,
        "added_kv_proj_dim": cfg.dim if cfg.image_branch else None,
        "rope_max_seq_len": 1024, "pos_embed_seq_len": cfg.image_tokens if cfg.has_emb_pos else None,
    }
    if cfg.vace_layers:
        config.update(vace_layers=list(cfg.vace_layers), vace_in_channels=cfg.vace_in_dim)
    return config


CONFIG_WRITERS = {"official": official_config, "comfyui": official_config, "diffusers": diffusers_config}
