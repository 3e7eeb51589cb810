"""The Wan2.1 / Wan2.2 diffusion transformer (official ``WanModel`` and ``VaceWanModel``).

Parameter names are the official ones, so official checkpoints assign without renaming.
Precision follows the official code: time embedding, modulation, norms, residual stream and head
in float32; linear layers and attention in the weights' dtype (the compute dtype); RoPE tables
computed in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from x2v.ops.attention import FP8_OUTPUT, TORCH_SDPA, attention, attention_fp8_output, kernel, takes_fp8_query
from x2v.ops.fused import linear_gelu
from x2v.ops.norms import (gated_residual, gated_residual_layer_norm, layer_norm, modulated_norm,
                           residual_modulated_norm, rms_norm_rope, rms_norm_rope_fp8)
from x2v.ops.quant_linear import (QuantizedInput, QuantLinear, fp8_input, input_dtype, quantize_input,
                                  quantized_input, shares_quantized_input)
from x2v.ops.quant_math import FP8, Fp8Query
from x2v.ops.rope import rope_rotations
from x2v.ops.sequence_parallel import SequenceParallel, Shard

# Parameters stored in float32 whatever the compute dtype (the official code runs them in float32).
FP32_PARAMS = ("modulation", "norm", "time_embedding", "time_projection", "head.head", "img_emb.proj.0",
               "img_emb.proj.4", "emb_pos")

MODEL_TYPES = ("t2v", "i2v", "flf2v", "vace", "ti2v")


@dataclass(frozen=True)
class WanDiTConfig:
    model_type: str = "t2v"  # t2v | i2v (Wan2.1 with CLIP, or Wan2.2 without) | flf2v | vace | ti2v
    in_dim: int = 16
    out_dim: int = 16
    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    text_len: int = 512
    text_dim: int = 4096
    freq_dim: int = 256
    eps: float = 1e-6
    patch_size: tuple[int, int, int] = (1, 2, 2)
    image_branch: bool = False  # Wan2.1 I2V/FLF2V: CLIP tokens through img_emb and k_img/v_img
    image_dim: int = 1280
    image_tokens: int | None = None  # FLF2V: 514 (first + last frame), the length of img_emb.emb_pos
    vace_layers: tuple[int, ...] = field(default_factory=tuple)
    vace_in_dim: int = 96

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def has_emb_pos(self) -> bool:
        return self.model_type == "flf2v"


class RMSNorm(nn.Module):
    """RMS norm over the whole feature vector (across heads); see ``rms_norm_rope``."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor, heads: int, out_dtype: torch.dtype, rope: torch.Tensor | None = None):
        """``[B, L, dim]`` -> ``[B, L, heads, head_dim]`` in ``out_dtype`` (rotated by ``rope`` when given); fp8:
        an attention's query in fp8 with one scale (``Fp8Query``)."""
        if out_dtype == FP8:
            return Fp8Query(*rms_norm_rope_fp8(x, self.weight, self.eps, heads, rope))
        return rms_norm_rope(x, self.weight, self.eps, heads, rope, out_dtype)


class AffineLayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.bias = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor, branch: torch.Tensor, gate: torch.Tensor, out_dtype: torch.dtype,
                quant: str | None = None):
        """The residual add ``x + branch * gate`` and its norm for the next layer (see ``norm_output``), in one
        pass: ``(x', norm)``."""
        return gated_residual_layer_norm(x, branch, gate, self.weight, self.bias, self.eps, out_dtype, quant)


def linear(layer: nn.Module, x: torch.Tensor | QuantizedInput) -> torch.Tensor:
    """Run ``layer`` in its compute dtype (the official code does this with autocast); an input already quantized
    for its 8-bit matmul (once for several layers, or by the norm before them) goes to that as it is."""
    if isinstance(x, QuantizedInput):
        return layer.run_quantized(x)
    return layer(x.to(input_dtype(layer)))


def norm_output(layers: tuple[nn.Module, ...], x: torch.Tensor) -> tuple[torch.dtype, str | None]:
    """What a norm of the stream ``x`` writes for ``layers``, which all read its result: their compute dtype, and
    their 8-bit kind where they can share one quantized input: the norm's pass then quantizes it too (its 16-bit
    result is never written and read back)."""
    return input_dtype(layers[0]), (layers[0].kind if shares_quantized_input(layers, x) else None)


def layer_input(h: torch.Tensor | tuple[torch.Tensor, torch.Tensor], shape: torch.Size):
    """A norm's result as the next layers take it: 16-bit, or quantized (values, scales) rows."""
    return h if isinstance(h, torch.Tensor) else quantized_input(*h, shape)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.backend = TORCH_SDPA  # attention kernel (LightX2V's self_attn_1_type)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)

    @property
    def qkv(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        return self.q, self.k, self.v

    def forward(self, x: torch.Tensor | QuantizedInput, rope: torch.Tensor, shard: Shard | None = None
                ) -> torch.Tensor:
        """``shard``: ``x`` is this rank's part of the tokens (sequence parallel); the attention sees them all."""
        if isinstance(x, torch.Tensor):
            x = x.to(input_dtype(self.q))  # once for q, k and v
            if shares_quantized_input(self.qkv, x):  # 8-bit layers: x quantized once for all three
                x = quantize_input(x, self.q.kind)
        v = linear(self.v, x).unflatten(-1, (self.num_heads, -1))
        # An attention kernel that quantizes Q to fp8 with one scale (cudnn_fp8) gets it so from the norm; not where
        # the tokens are exchanged between ranks (each rank's part would bring its own scale).
        fp8_query = shard is None and takes_fp8_query(self.backend, v)
        q = self.norm_q(linear(self.q, x), self.num_heads, FP8 if fp8_query else v.dtype, rope)
        k = self.norm_k(linear(self.k, x), self.num_heads, v.dtype, rope)
        if shard is not None:
            return linear(self.o, shard.attention(q, k, v, self.backend).flatten(2))
        if self.backend in FP8_OUTPUT and shares_quantized_input((self.o,), v) and self.o.kind == "fp8":
            # An attention kernel that writes fp8 (cudnn_fp8 on Hopper) hands its output to the fp8 o-projection
            # as it is: no conversion to 16 bits and quantization back.
            out8 = attention_fp8_output(q, k, v, self.backend)
            if out8 is not None:
                values, scale, offset = out8
                return self.o.run_quantized(fp8_input(values.flatten(2), scale), offset.flatten(2))
        return linear(self.o, attention(q, k, v, self.backend).flatten(2))


class CrossAttention(nn.Module):
    """Attention from video tokens to the text context; with ``image_branch`` (Wan2.1 I2V/FLF2V) a second,
    independent attention to the CLIP tokens whose result is summed in before the output projection."""

    def __init__(self, dim: int, num_heads: int, eps: float, image_branch: bool):
        super().__init__()
        self.num_heads = num_heads
        self.backend = self.image_backend = TORCH_SDPA  # LightX2V's cross_attn_1_type / cross_attn_2_type
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)
        if image_branch:
            self.k_img = nn.Linear(dim, dim)
            self.v_img = nn.Linear(dim, dim)
            self.norm_k_img = RMSNorm(dim, eps)

    def forward(self, x: torch.Tensor, text: torch.Tensor, image: torch.Tensor | None) -> torch.Tensor:
        heads = self.num_heads
        v = linear(self.v, text).unflatten(-1, (heads, -1))
        q = self.norm_q(linear(self.q, x), heads, v.dtype)
        k = self.norm_k(linear(self.k, text), heads, v.dtype)
        out = attention(q, k, v, self.backend)
        if image is not None:
            v_img = linear(self.v_img, image).unflatten(-1, (heads, -1))
            k_img = self.norm_k_img(linear(self.k_img, image), heads, v.dtype)
            out = out + attention(q, k_img, v_img, self.image_backend)
        return linear(self.o, out.flatten(2))


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, ffn_dim: int):
        super().__init__(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))

    def forward(self, x: torch.Tensor | QuantizedInput) -> torch.Tensor:
        # self[1] is the GELU that the fused paths apply: in the first matmul's epilogue (16-bit layers on GPUs)
        # or in the second layer's input quantization (8-bit layers).
        fc1, _, fc2 = self
        if isinstance(x, QuantizedInput) or isinstance(fc2, QuantLinear):
            hidden = linear(fc1, x)
            if shares_quantized_input((fc2,), hidden):
                return fc2.run_quantized(quantize_input(hidden, fc2.kind, gelu=True))
            return linear(fc2, F.gelu(hidden, approximate="tanh"))
        return linear(fc2, linear_gelu(fc1, x.to(input_dtype(fc1))))


class WanBlock(nn.Module):
    # Phase offload (x2v.runtime.offload): the phases in the order they run, each with the children it uses; the
    # block's own tensor (modulation) goes with the first. A VACE block's before_proj runs just before the block,
    # its after_proj just after it.
    OFFLOAD_PHASES = {"self_attn": ("self_attn", "before_proj"), "cross_attn": ("norm3", "cross_attn"),
                      "ffn": ("ffn", "after_proj")}

    def __init__(self, cfg: WanDiTConfig):
        super().__init__()
        self.eps = cfg.eps
        self.modulation = nn.Parameter(torch.empty(1, 6, cfg.dim))
        self.self_attn = SelfAttention(cfg.dim, cfg.num_heads, cfg.eps)
        self.norm3 = AffineLayerNorm(cfg.dim, cfg.eps)  # the cross-attention pre-norm (official name)
        self.cross_attn = CrossAttention(cfg.dim, cfg.num_heads, cfg.eps, cfg.image_branch)
        self.ffn = FeedForward(cfg.dim, cfg.ffn_dim)

    def forward(self, x, e0, text, image, rope, shard: Shard | None = None) -> torch.Tensor:
        # e0: [B, 1 or L, 6, dim] float32; x: [B, L, dim] float32 residual stream (sequence parallel: this rank's
        # part of the tokens, with the matching part of rope and of a per-token e0).
        # Each norm writes its output in the dtype of the linear layer that reads it, and takes in the residual
        # add before it (one pass over the float32 stream).
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (self.modulation.unsqueeze(0) + e0).unbind(2)
        h = modulated_norm(x, shift_sa, scale_sa, self.eps, *norm_output(self.self_attn.qkv, x))
        # norm3 runs as a module call (not a function of its tensors), so offload hooks bring its weights in
        x, h = self.norm3(x, self.self_attn(layer_input(h, x.shape), rope, shard), gate_sa,
                          *norm_output((self.cross_attn.q,), x))
        x, h = residual_modulated_norm(x, self.cross_attn(layer_input(h, x.shape), text, image), shift_ff, scale_ff,
                                       self.eps, *norm_output((self.ffn[0],), x))
        return gated_residual(x, self.ffn(layer_input(h, x.shape)), gate_ff)


class VaceBlock(WanBlock):
    """A block of the VACE control branch; block 0 also mixes the video tokens in (``before_proj``)."""

    def __init__(self, cfg: WanDiTConfig, first: bool):
        super().__init__(cfg)
        if first:
            self.before_proj = nn.Linear(cfg.dim, cfg.dim)
        self.after_proj = nn.Linear(cfg.dim, cfg.dim)


class Head(nn.Module):
    def __init__(self, cfg: WanDiTConfig):
        super().__init__()
        self.eps = cfg.eps
        self.modulation = nn.Parameter(torch.empty(1, 2, cfg.dim))
        self.head = nn.Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        # Uses the time-MLP output e (not the projected e0), all in float32.
        shift, scale = (self.modulation.unsqueeze(0) + e.unsqueeze(2)).unbind(2)
        return linear(self.head, modulated_norm(x, shift, scale, self.eps, input_dtype(self.head)))


class ImageProjection(nn.Module):
    """CLIP features -> DiT width: LayerNorm, Linear, exact GELU, Linear, LayerNorm (eps 1e-5)."""

    def __init__(self, cfg: WanDiTConfig):
        super().__init__()
        self.proj = nn.Sequential(
            nn.LayerNorm(cfg.image_dim, eps=1e-5),
            nn.Linear(cfg.image_dim, cfg.image_dim),
            nn.GELU(),
            nn.Linear(cfg.image_dim, cfg.dim),
            nn.LayerNorm(cfg.dim, eps=1e-5),
        )
        if cfg.has_emb_pos:
            self.emb_pos = nn.Parameter(torch.empty(1, cfg.image_tokens, cfg.image_dim))

    def forward(self, clip_fea: torch.Tensor) -> torch.Tensor:
        x = clip_fea.float()
        if hasattr(self, "emb_pos"):
            x = x + self.emb_pos
        norm_in, fc1, act, fc2, norm_out = self.proj
        x = linear(fc1, layer_norm(x, norm_in.eps, norm_in.weight, norm_in.bias))
        x = linear(fc2, act(x))
        return layer_norm(x, norm_out.eps, norm_out.weight, norm_out.bias)


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[cos, sin] of t * 10000^(-j/half), computed in float64 like the official code, returned in float32."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = t.to(torch.float64)[..., None] * freqs
    return torch.cat([angles.cos(), angles.sin()], dim=-1).float()


class WanDiT(nn.Module):
    # Block offload (x2v.runtime.offload): the block lists, in the order forward runs them (VACE branch first).
    OFFLOAD_BLOCKS = ("vace_blocks", "blocks")

    def __init__(self, cfg: WanDiTConfig):
        super().__init__()
        if cfg.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type {cfg.model_type!r} is not one of {MODEL_TYPES}")
        self.config = cfg
        self.sequence_parallel: SequenceParallel | None = None  # set by x2v.runtime.parallel
        self.patch_embedding = nn.Conv3d(cfg.in_dim, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(
            nn.Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.dim, cfg.dim)
        )
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 6 * cfg.dim))
        self.blocks = nn.ModuleList(WanBlock(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        if cfg.image_branch:
            self.img_emb = ImageProjection(cfg)
        if cfg.vace_layers:
            self.vace_patch_embedding = nn.Conv3d(
                cfg.vace_in_dim, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size
            )
            self.vace_blocks = nn.ModuleList(VaceBlock(cfg, first=i == 0) for i in range(len(cfg.vace_layers)))

    def running_blocks(self, vace_context=None, **_) -> tuple[str, ...]:
        """The block lists a forward call with these keyword arguments runs, in order."""
        return self.OFFLOAD_BLOCKS if vace_context is not None else ("blocks",)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    def set_attention(self, self_attn: str = TORCH_SDPA, cross_attn: str = TORCH_SDPA,
                      image_attn: str = TORCH_SDPA) -> None:
        """Attention kernels by LightX2V type (``self_attn_1_type``, ``cross_attn_1_type``, ``cross_attn_2_type``
        for the CLIP-image attention); an unavailable one falls back to torch SDPA with a notice."""
        for name in (self_attn, cross_attn, image_attn):
            kernel(name)  # unknown names fail now, missing packages are announced now
        for module in self.modules():
            if isinstance(module, SelfAttention):
                module.backend = self_attn
            elif isinstance(module, CrossAttention):
                module.backend, module.image_backend = cross_attn, image_attn

    def embed_text(self, context: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """Zero-pad the umT5 states to exactly ``text_len`` rows (unmasked, as the official model)."""
        cfg = self.config
        rows = [c for c in context] if isinstance(context, (list, tuple)) else list(context.unbind(0))
        if any(r.shape[0] > cfg.text_len for r in rows):
            raise ValueError(f"context has more than text_len={cfg.text_len} tokens")
        padded = torch.stack([F.pad(r, (0, 0, 0, cfg.text_len - r.shape[0])) for r in rows])
        emb = self.text_embedding
        return linear(emb[2], emb[1](linear(emb[0], padded)))

    def embed_time(self, timestep: torch.Tensor, batch: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """e ``[B, 1 or L, dim]`` for the head and e0 ``[B, 1 or L, 6, dim]`` for the blocks, in float32."""
        t = timestep.reshape(batch, -1) if timestep.ndim == 2 else timestep.reshape(batch, 1)
        if t.shape[1] not in (1, tokens):
            raise ValueError(f"per-token timestep has {t.shape[1]} entries, the video has {tokens} tokens")
        emb = sinusoidal_embedding(t, self.config.freq_dim)
        e = self.time_embedding(emb)
        e0 = self.time_projection(e).unflatten(-1, (6, self.config.dim))
        return e, e0

    def patchify(self, conv: nn.Conv3d, video: torch.Tensor) -> torch.Tensor:
        """``[B, L, dim]`` float32 tokens, rows contiguous (the layout the fused norm kernels take)."""
        tokens = conv(video.to(conv.weight.dtype)).flatten(2).transpose(1, 2)
        return tokens.to(torch.float32, memory_format=torch.contiguous_format)

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor | list[torch.Tensor],
        *,
        clip_fea: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        vace_context: torch.Tensor | None = None,
        vace_scale: float = 1.0,
    ) -> torch.Tensor:
        """Velocity ``[B, out_dim, F, H, W]`` (float32) for latents ``x`` ``[B, C, F, H, W]``.

        ``timestep`` is ``[B]`` or per token ``[B, L]``; ``context`` the umT5 states ``[B, L_txt, text_dim]``;
        ``clip_fea`` ``[B, 257 or 514, 1280]`` (Wan2.1 I2V/FLF2V); ``y`` mask + image latent concatenated after
        ``x`` on channels; ``vace_context`` ``[B, 96, F, H, W]`` for VACE models.
        """
        cfg = self.config
        if y is not None:
            x = torch.cat([x, y.to(x.dtype)], dim=1)
        if x.shape[1] != cfg.in_dim:
            raise ValueError(
                f"the DiT takes {cfg.in_dim} input channels (latents + y), got {x.shape[1]}; "
                + ("pass y (mask + image latent)" if x.shape[1] < cfg.in_dim else "this model takes no y")
            )
        batch, _, frames, height, width = x.shape
        pt, ph, pw = cfg.patch_size
        grid = (frames // pt, height // ph, width // pw)
        tokens = math.prod(grid)

        hidden = self.patchify(self.patch_embedding, x)
        e, e0 = self.embed_time(timestep, batch, tokens)
        text = self.embed_text(context)
        image = self.embed_image(clip_fea, batch)
        rope = rope_rotations(grid, cfg.head_dim, hidden.device)  # cached
        shard = self.sequence_parallel.shard(tokens) if self.sequence_parallel is not None else None
        if shard is not None:  # this rank's tokens, their positions and (TI2V) their timesteps
            hidden, rope = shard.split(hidden), shard.split(rope, dim=0)
            if e0.shape[1] == tokens:
                e, e0 = shard.split(e), shard.split(e0)

        hints = {} if vace_context is None else self.vace_hints(vace_context, hidden, e0, text, image, rope, shard)
        for i, block in enumerate(self.blocks):
            hidden = block(hidden, e0, text, image, rope, shard)
            if i in hints:
                hidden = hidden + hints[i] * vace_scale
        out = self.head(hidden, e)
        return self.unpatchify(out if shard is None else shard.gather(out), grid)

    def embed_image(self, clip_fea: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        cfg = self.config
        if not cfg.image_branch:
            if clip_fea is not None:
                raise ValueError("this DiT has no CLIP image branch; do not pass clip_fea")
            return None
        if clip_fea is None:
            raise ValueError(f"this {cfg.model_type} DiT needs clip_fea [B, {cfg.image_tokens or 257}, {cfg.image_dim}]")
        clip_fea = clip_fea.reshape(batch, -1, clip_fea.shape[-1])  # FLF2V: first and last frame side by side
        if cfg.image_tokens is not None and clip_fea.shape[1] != cfg.image_tokens:
            raise ValueError(f"clip_fea has {clip_fea.shape[1]} tokens per sample, this model takes {cfg.image_tokens}")
        return self.img_emb(clip_fea)

    def vace_hints(self, vace_context, hidden, e0, text, image, rope, shard=None) -> dict[int, torch.Tensor]:
        """Run the VACE branch; returns the hint to add after each main block listed in ``vace_layers``."""
        if not self.config.vace_layers:
            raise ValueError("this DiT is not a VACE model; do not pass vace_context")
        c = self.patchify(self.vace_patch_embedding, vace_context)
        if shard is not None:
            c = shard.split(c)
        hints = {}
        for i, (layer, block) in enumerate(zip(self.config.vace_layers, self.vace_blocks)):
            if i == 0:
                c = linear(block.before_proj, c).float() + hidden
            c = block(c, e0, text, image, rope, shard)
            hints[layer] = linear(block.after_proj, c).float()
        return hints

    def unpatchify(self, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """``[B, f*h*w, pt*ph*pw*C]`` (channel fastest) -> ``[B, C, f*pt, h*ph, w*pw]`` in float32."""
        f, h, w = grid
        pt, ph, pw = self.config.patch_size
        x = tokens.float().view(tokens.shape[0], f, h, w, pt, ph, pw, -1)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(x.shape[0], x.shape[1], f * pt, h * ph, w * pw)
