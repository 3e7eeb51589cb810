"""Tensor names of the CLIP ViT image encoder, and its architecture read from tensor shapes.

Two layouts exist on disk:

* official open-clip (Wan's ``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth``): ``visual.*`` next to the
  unused text tower ``textual.*`` and ``log_scale``;
* transformers ``CLIPVisionModel`` / ``CLIPVisionModelWithProjection``: ``embeddings.*``, ``encoder.layers.N.*``, with
  a ``vision_model.`` prefix in transformers < 5, ComfyUI's ``clip_vision_h.safetensors`` and diffusers'
  ``image_encoder/``, and none in transformers >= 5; the projection is ``visual_projection.weight`` at the root.

x2v works in official names; :func:`to_official` turns either layout into ``visual.*`` names only.
"""

from __future__ import annotations

import math
import re

import torch


OFFICIAL_PREFIX = "visual."
HF_PROJECTION = "visual_projection.weight"

# Official name (after ``visual.``) -> transformers name (after the optional ``vision_model.``), where only the
# name changes. cls/pos embeddings change shape, to_qkv is split in three and head is transposed: handled apart.
TOP_LEVEL_NAMES = {
    "patch_embedding.weight": "embeddings.patch_embedding.weight",
    "pre_norm.weight": "pre_layrnorm.weight",
    "pre_norm.bias": "pre_layrnorm.bias",
    "post_norm.weight": "post_layernorm.weight",
    "post_norm.bias": "post_layernorm.bias",
}
BLOCK_MODULE_NAMES = {
    "norm1": "layer_norm1",
    "norm2": "layer_norm2",
    "attn.proj": "self_attn.out_proj",
    "mlp.0": "mlp.fc1",
    "mlp.2": "mlp.fc2",
}
QKV_NAMES = ("q_proj", "k_proj", "v_proj")

OFFICIAL_BLOCK = re.compile(r"transformer\.(\d+)\.(.+)\.(weight|bias)")
HF_BLOCK = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")


def official_to_hf(official: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """``visual.*`` tensors -> transformers names under ``prefix`` (``""`` or ``"vision_model."``)."""
    hf: dict[str, torch.Tensor] = {}
    for name, tensor in official.items():
        local = name.removeprefix(OFFICIAL_PREFIX)
        if local == "head":
            hf[HF_PROJECTION] = tensor.t()
        elif local == "cls_embedding":
            hf[prefix + "embeddings.class_embedding"] = tensor.reshape(-1)
        elif local == "pos_embedding":
            hf[prefix + "embeddings.position_embedding.weight"] = tensor[0]
        elif local in TOP_LEVEL_NAMES:
            hf[prefix + TOP_LEVEL_NAMES[local]] = tensor
        elif match := OFFICIAL_BLOCK.fullmatch(local):
            index, module, param = match.groups()
            layer = f"{prefix}encoder.layers.{index}."
            if module == "attn.to_qkv":
                for part, tensor_part in zip(QKV_NAMES, tensor.chunk(3)):
                    hf[f"{layer}self_attn.{part}.{param}"] = tensor_part
            else:
                hf[f"{layer}{BLOCK_MODULE_NAMES[module]}.{param}"] = tensor
        else:
            raise ValueError(f"no transformers name for CLIP tensor {name!r}")
    return hf


def hf_to_official(hf: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """transformers names under ``prefix`` -> ``visual.*``; the text tower and ``position_ids`` buffers are dropped.

    Unknown vision names are kept as ``visual.<name>`` so that loading reports them instead of losing them.
    """
    top_level = {v: k for k, v in TOP_LEVEL_NAMES.items()}
    block_modules = {v: k for k, v in BLOCK_MODULE_NAMES.items()}
    official: dict[str, torch.Tensor] = {}
    qkv_parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for name, tensor in hf.items():
        if name == HF_PROJECTION:
            official[OFFICIAL_PREFIX + "head"] = tensor.t()
            continue
        if not name.startswith(prefix) or name.endswith("position_ids"):
            continue  # text_model.*, text_projection, logit_scale; position_ids is a constant arange
        local = name[len(prefix):]
        if local == "embeddings.class_embedding":
            official["visual.cls_embedding"] = tensor.reshape(1, 1, -1)
        elif local == "embeddings.position_embedding.weight":
            official["visual.pos_embedding"] = tensor.unsqueeze(0)
        elif local in top_level:
            official[OFFICIAL_PREFIX + top_level[local]] = tensor
        elif match := HF_BLOCK.fullmatch(local):
            index, module, param = match.groups()
            attn_part = module.removeprefix("self_attn.")
            if attn_part in QKV_NAMES:
                qkv_parts.setdefault((index, param), {})[attn_part] = tensor
            elif module in block_modules:
                official[f"visual.transformer.{index}.{block_modules[module]}.{param}"] = tensor
            else:
                official[OFFICIAL_PREFIX + local] = tensor
        else:
            official[OFFICIAL_PREFIX + local] = tensor
    for (index, param), parts in qkv_parts.items():
        missing = [p for p in QKV_NAMES if p not in parts]
        if missing:
            raise ValueError(f"layer {index} has no self_attn.{'/'.join(missing)}.{param}")
        official[f"visual.transformer.{index}.attn.to_qkv.{param}"] = torch.cat([parts[p] for p in QKV_NAMES])
    return official


def find_layout(tensors: dict[str, torch.Tensor]) -> tuple[str, str] | None:
    """``("official" | "transformers", prefix)`` of the vision tower's names, or None if there is none."""
    for name in tensors:
        if name.endswith("embeddings.class_embedding"):
            return "transformers", name.removesuffix("embeddings.class_embedding")
        if name.endswith("cls_embedding"):
            return "official", name.removesuffix("cls_embedding")
    return None


def to_official(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The vision tower's tensors in official ``visual.*`` names, whatever the layout; the text tower is dropped."""
    layout = find_layout(tensors)
    if layout is None:
        raise ValueError(
            "no CLIP vision tower: expected visual.cls_embedding (official open-clip) or "
            "[vision_model.]embeddings.class_embedding (transformers)"
        )
    kind, prefix = layout
    if kind == "transformers":
        return hf_to_official(tensors, prefix)
    return {OFFICIAL_PREFIX + k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def default_num_heads(width: int) -> int:
    """The checkpoint does not store the head count: head dim 80 when it divides the width (ViT-H/14, width
    1280, 16 heads), else 64 (ViT-B/L). Other towers need an explicit ``num_heads``."""
    return width // 80 if width % 80 == 0 else width // 64


def infer_architecture(official: dict[str, torch.Tensor], num_heads: int | None = None) -> dict[str, int]:
    """``ClipVisionConfig`` fields read from the shapes of ``visual.*`` tensors; ``num_heads`` overrides
    :func:`default_num_heads`."""

    def shape(local: str) -> torch.Size:
        if OFFICIAL_PREFIX + local not in official:
            raise ValueError(f"no tensor visual.{local}")
        return official[OFFICIAL_PREFIX + local].shape

    width, _, patch, _ = shape("patch_embedding.weight")
    grid = math.isqrt(shape("pos_embedding")[1] - 1)
    if grid * grid != shape("pos_embedding")[1] - 1:
        raise ValueError(f"visual.pos_embedding has {shape('pos_embedding')[1]} tokens, not 1 + a square number")
    indices = {int(m[1]) for k in official if (m := re.match(r"visual\.transformer\.(\d+)\.", k))}
    if indices != set(range(len(indices))):
        raise ValueError(f"transformer block indices are not 0..N-1: {sorted(indices)}")
    return dict(
        image_size=grid * patch,
        patch_size=patch,
        width=width,
        num_layers=len(indices),
        num_heads=num_heads or default_num_heads(width),
        mlp_dim=shape("transformer.0.mlp.0.weight")[0],
    )
