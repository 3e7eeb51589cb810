"""umT5 encoder tensor names: official Wan ``.pth`` <-> HF transformers ``UMT5EncoderModel``, and the
architecture read back from tensor shapes.

HF names are used by diffusers ``text_encoder/`` folders and ComfyUI ``umt5_xxl_*.safetensors`` files;
there ``encoder.embed_tokens.weight`` is the same tensor as ``shared.weight`` (tied) and may or may not be stored.
"""

from __future__ import annotations

import re
from typing import Literal

import torch

from x2v.errors import CheckpointError
from x2v.formats.quant import SCALE_NAMES
from x2v.formats.keys import summarize_keys

Layout = Literal["official", "hf"]

OFFICIAL_TO_HF_TOP = {
    "token_embedding.weight": "shared.weight",
    "norm.weight": "encoder.final_layer_norm.weight",
}

# Per block: official suffix after ``blocks.N.`` -> HF suffix after ``encoder.block.N.``.
OFFICIAL_TO_HF_BLOCK = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}

HF_TO_OFFICIAL_TOP = {hf: official for official, hf in OFFICIAL_TO_HF_TOP.items()}
HF_TO_OFFICIAL_BLOCK = {hf: official for official, hf in OFFICIAL_TO_HF_BLOCK.items()}
HF_TIED_EMBEDDING = "encoder.embed_tokens.weight"
# Parts of a full HF T5 (encoder-decoder) checkpoint that the encoder does not use.
HF_UNUSED_PREFIXES = ("decoder.", "lm_head.")

OFFICIAL_BLOCK_RE = re.compile(r"blocks\.(\d+)\.(.+)")
HF_BLOCK_RE = re.compile(r"encoder\.block\.(\d+)\.(.+)")


def official_to_hf_name(name: str) -> str:
    if name in OFFICIAL_TO_HF_TOP:
        return OFFICIAL_TO_HF_TOP[name]
    match = OFFICIAL_BLOCK_RE.fullmatch(name)
    if match and match[2] in OFFICIAL_TO_HF_BLOCK:
        return f"encoder.block.{match[1]}.{OFFICIAL_TO_HF_BLOCK[match[2]]}"
    raise KeyError(f"{name!r} is not an official umT5 encoder tensor name")


def hf_to_official_name(name: str) -> str:
    layer, _, last = name.rpartition(".")
    if layer and last in SCALE_NAMES:  # a quantized layer's scale goes with its weight (ComfyUI scaled fp8)
        return f"{hf_to_official_name(f'{layer}.weight').removesuffix('.weight')}.{last}"
    if name in HF_TO_OFFICIAL_TOP:
        return HF_TO_OFFICIAL_TOP[name]
    match = HF_BLOCK_RE.fullmatch(name)
    if match and match[2] in HF_TO_OFFICIAL_BLOCK:
        return f"blocks.{match[1]}.{HF_TO_OFFICIAL_BLOCK[match[2]]}"
    raise KeyError(f"{name!r} is not a HF UMT5 encoder tensor name")


def official_to_hf(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an official state dict to HF names (the tied ``encoder.embed_tokens.weight`` is not added)."""
    return {official_to_hf_name(name): t for name, t in tensors.items()}


def hf_to_official(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a HF state dict to official names.

    The tied embedding copy is dropped (or used when ``shared.weight`` is absent), decoder/LM-head tensors of a
    full T5 are ignored, and unknown names are kept unchanged so the loader reports them.
    """
    renamed = {}
    for name, t in tensors.items():
        if name.startswith(HF_UNUSED_PREFIXES):
            continue
        if name == HF_TIED_EMBEDDING:
            if "shared.weight" not in tensors:
                renamed["token_embedding.weight"] = t
            continue
        try:
            renamed[hf_to_official_name(name)] = t
        except KeyError:
            renamed[name] = t
    return renamed


def detect_layout(tensors: dict[str, torch.Tensor], source: str) -> Layout:
    names = tensors.keys()
    if "token_embedding.weight" in names or any(OFFICIAL_BLOCK_RE.match(n) for n in names):
        return "official"
    if "shared.weight" in names or HF_TIED_EMBEDDING in names or any(HF_BLOCK_RE.match(n) for n in names):
        return "hf"
    raise CheckpointError(
        f"{source}: not a umT5 text encoder: expected official names "
        "(token_embedding.weight, blocks.N.attn.q.weight, ...) "
        f"or HF UMT5 names (shared.weight, encoder.block.N.layer.0.SelfAttention.q.weight, ...); found "
        f"{summarize_keys(names) or 'no tensors'}. Pass the umT5 checkpoint (models_t5_umt5-xxl-enc-bf16.pth)."
    )


def to_official(tensors: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """The state dict in official names, whichever layout ``tensors`` uses."""
    return tensors if detect_layout(tensors, source) == "official" else hf_to_official(tensors)


def infer_architecture(tensors: dict[str, torch.Tensor], source: str) -> dict[str, int]:
    """``T5EncoderConfig`` fields read from the shapes of an official-named state dict (max_distance and eps are
    not stored: the config's defaults)."""
    required = ("token_embedding.weight", "blocks.0.attn.q.weight", "blocks.0.ffn.fc1.weight",
                "blocks.0.pos_embedding.embedding.weight")
    missing = [name for name in required if name not in tensors]
    if missing:
        raise CheckpointError(
            f"{source}: umT5 encoder tensor(s) {', '.join(missing)} not found; the file is incomplete "
            "or not a umT5 encoder."
        )
    vocab, dim = tensors["token_embedding.weight"].shape
    num_buckets, num_heads = tensors["blocks.0.pos_embedding.embedding.weight"].shape
    dim_attn = tensors["blocks.0.attn.q.weight"].shape[0]
    indices = {int(m[1]) for m in map(OFFICIAL_BLOCK_RE.fullmatch, tensors) if m}
    if indices != set(range(len(indices))):
        gaps = sorted(set(range(max(indices) + 1)) - indices)
        raise CheckpointError(f"{source}: umT5 block(s) {gaps} are missing (blocks 0..{max(indices)} expected).")
    if dim_attn % num_heads:
        raise CheckpointError(
            f"{source}: attention width {dim_attn} (blocks.0.attn.q.weight) is not a multiple of the "
            f"{num_heads} heads of the relative-position table; the file is not a valid umT5 encoder."
        )
    return dict(vocab=vocab, dim=dim, dim_attn=dim_attn, dim_ffn=tensors["blocks.0.ffn.fc1.weight"].shape[0],
                num_heads=num_heads, num_layers=len(indices), num_buckets=num_buckets)
