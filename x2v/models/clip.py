"""CLIP ViT image encoder (open-clip ``xlm-roberta-large-vit-huge-14`` vision tower), as Wan runs it.

Wan conditions I2V/FLF2V on the output of the *penultimate* transformer block, so the tower built here stops
there: the last block, ``post_norm`` and ``head`` of the checkpoint are never built (they hold 21.0 M of the
632.1 M visual parameters of ViT-H/14). State-dict keys are the official ones with the ``visual.`` prefix
stripped: ``patch_embedding.weight``, ``cls_embedding``, ``pos_embedding``, ``pre_norm.*``,
``transformer.N.{norm1,attn.to_qkv,attn.proj,norm2,mlp.0,mlp.2}.*``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from x2v.ops.attention import attention

# open-clip's image normalisation, applied after mapping [-1, 1] to [0, 1].
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
LAYER_NORM_EPS = 1e-5


@dataclass(frozen=True)
class ClipVisionConfig:
    """Defaults are ViT-H/14 as shipped with Wan2.1.

    ``num_layers`` counts the blocks in the checkpoint; the tower builds and runs ``num_layers - 1`` of them.
    """

    image_size: int = 224
    patch_size: int = 14
    width: int = 1280
    num_layers: int = 32
    num_heads: int = 16
    mlp_dim: int = 5120

    def __post_init__(self) -> None:
        if self.width % self.num_heads:
            raise ValueError(f"CLIP width {self.width} is not divisible by num_heads={self.num_heads}.")
        if self.image_size % self.patch_size:
            raise ValueError(f"CLIP image size {self.image_size} is not a multiple of patch size {self.patch_size}.")
        if self.num_layers < 2:
            raise ValueError(f"CLIP needs at least 2 layers (Wan uses all but the last), got {self.num_layers}.")

    @property
    def num_tokens(self) -> int:
        """Patches plus the class token."""
        return (self.image_size // self.patch_size) ** 2 + 1


class Float32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the activation dtype; the result returns to that dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)
        return out.to(x.dtype)


class SelfAttention(nn.Module):
    def __init__(self, width: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.to_qkv = nn.Linear(width, 3 * width)  # q, k, v stacked in that order
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.to_qkv(x).view(batch, length, 3, self.num_heads, -1).unbind(2)
        return self.proj(attention(q, k, v).reshape(batch, length, width))


class TransformerBlock(nn.Module):
    """Pre-norm residual block: attention, then an MLP with exact (erf) GELU."""

    def __init__(self, config: ClipVisionConfig) -> None:
        super().__init__()
        self.norm1 = Float32LayerNorm(config.width, eps=LAYER_NORM_EPS)
        self.attn = SelfAttention(config.width, config.num_heads)
        self.norm2 = Float32LayerNorm(config.width, eps=LAYER_NORM_EPS)
        self.mlp = nn.Sequential(
            nn.Linear(config.width, config.mlp_dim), nn.GELU(), nn.Linear(config.mlp_dim, config.width)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ClipVisionTower(nn.Module):
    """``forward(images [B, 3, H, W] in [-1, 1]) -> [B, num_tokens, width]``: the penultimate block's output."""

    OFFLOAD_BLOCKS = ("transformer",)  # streamed by x2v.runtime.offload

    def __init__(self, config: ClipVisionConfig) -> None:
        super().__init__()
        self.config = config
        width, patch = config.width, config.patch_size
        # open-clip drops the patch-conv bias when the tower has a pre-norm.
        self.patch_embedding = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.cls_embedding = nn.Parameter(torch.empty(1, 1, width))
        self.pos_embedding = nn.Parameter(torch.empty(1, config.num_tokens, width))
        self.pre_norm = Float32LayerNorm(width, eps=LAYER_NORM_EPS)
        self.transformer = nn.ModuleList(TransformerBlock(config) for _ in range(config.num_layers - 1))

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Wan's preprocessing, in float32: squash-resize (bicubic, no crop, no antialias), then normalise."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"CLIP expects images of shape [B, 3, H, W], got {list(images.shape)}.")
        size = (self.config.image_size, self.config.image_size)
        x = F.interpolate(images.float(), size=size, mode="bicubic", align_corners=False)
        mean = torch.tensor(IMAGE_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGE_STD, device=x.device).view(1, 3, 1, 1)
        return (x * 0.5 + 0.5 - mean) / std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(images).to(self.patch_embedding.weight.dtype)
        x = self.patch_embedding(x).flatten(2).transpose(1, 2)
        cls = self.cls_embedding.to(x.dtype).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embedding.to(x.dtype)
        x = self.pre_norm(x)
        for block in self.transformer:
            x = block(x)
        return x
