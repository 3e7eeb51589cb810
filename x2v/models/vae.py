"""Wan2.1 video VAE (z_dim 16, stride 4x8x8) and the building blocks shared with the Wan2.2 VAE.

Parameter names follow the official ``wan/modules/vae.py`` state dict.

Videos are processed causally in chunks of frames: frame 0 alone, then 4 frames per chunk (encode), or one
latent frame per chunk (decode). Modules that look back in time (``Stateful``) keep the context they need from
the previous chunk; ``CausalVAE.encode``/``decode`` reset that state at the start and drop it at the end, so
memory does not grow with the video length. With ``tiled=True`` they also split the frame into overlapping
spatial tiles, stream each tile through all frames on its own and blend the overlaps with linear ramps, so
memory follows the tile instead of the frame size.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from x2v.ops.attention import attention

# Official per-channel latent statistics (latents are stored as (mu - mean) / std).
WAN21_LATENT_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN21_LATENT_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)


class Stateful:
    """A module that carries context from one chunk of frames to the next."""

    def reset_state(self) -> None:
        raise NotImplementedError


class CausalConv3d(nn.Conv3d, Stateful):
    """3-D convolution padded only on the past side in time, streaming over chunks.

    ``padding=(pt, ph, pw)`` has the official meaning: ``2*pt`` frames of left (past) context in time,
    symmetric ``ph``/``pw`` in space. The last ``2*pt`` input frames are kept for the next chunk, so running
    chunk after chunk equals one causal convolution over the whole sequence with zero frames before frame 0.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int, int],
                 stride: int | tuple[int, int, int] = 1, padding: int | tuple[int, int, int] = 0) -> None:
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else padding
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=(0, ph, pw))
        self.past_frames = 2 * pt
        self.history: torch.Tensor | None = None

    def reset_state(self) -> None:
        self.history = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.past_frames:
            if self.history is None:
                x = F.pad(x, (0, 0, 0, 0, self.past_frames, 0))
            else:
                x = torch.cat([self.history, x], dim=2)
            self.history = x[:, :, -self.past_frames:].clone()
        return super().forward(x)


class RMSNorm(nn.Module):
    """L2-normalize over channels (dim 1), times sqrt(C) and a learned per-channel gain ``gamma``."""

    def __init__(self, channels: int, spatial_dims: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(channels, *(1,) * spatial_dims))
        self.scale = math.sqrt(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        # Indices 0..6 match the official Sequential (5 is an inference no-op dropout).
        self.residual = nn.Sequential(
            RMSNorm(in_dim, 3), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim, 3), nn.SiLU(), nn.Identity(), CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.residual(x) + self.shortcut(x)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, 2)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)
        qkv = self.to_qkv(self.norm(frames)).reshape(b * t, 3, c, 1, h * w)
        q, k, v = qkv.permute(1, 0, 4, 3, 2).unbind(0)  # each [b*t, h*w, 1 head, c]
        out = attention(q, k, v).reshape(b * t, h, w, c).permute(0, 3, 1, 2)
        out = self.proj(out).reshape(b, t, c, h, w).transpose(1, 2)
        return x + out


class Resample(nn.Module, Stateful):
    """2x spatial down/upsampling per frame, optionally with 2x temporal down/upsampling (the ``*3d`` modes).

    ``upsample_dim`` is the channel count after spatial upsampling (Wan2.1: dim // 2, Wan2.2: dim).
    """

    MODES = ("downsample2d", "downsample3d", "upsample2d", "upsample3d")

    def __init__(self, dim: int, mode: str, upsample_dim: int | None = None) -> None:
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"unknown Resample mode {mode!r}; expected one of {self.MODES}")
        self.mode = mode
        if mode.startswith("downsample"):
            # Pad right/bottom only, then a strided valid conv: the official (asymmetric) layout.
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        else:
            self.resample = nn.Sequential(
                nn.Upsample(scale_factor=2.0, mode="nearest-exact"), nn.Conv2d(dim, upsample_dim or dim // 2, 3, padding=1)
            )
        if mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))
        elif mode == "upsample3d":
            # Emits 2*dim channels per frame: [0:dim] become frame 2k, [dim:2dim] frame 2k+1.
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        self.reset_state()

    def reset_state(self) -> None:
        self.first_chunk_done = False
        self.last_frame: torch.Tensor | None = None  # downsample3d: last frame of the previous chunk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "upsample3d":
            x = self.upsample_time(x)
        x = self.per_frame(self.resample, x)
        if self.mode == "downsample3d":
            x = self.downsample_time(x)
        self.first_chunk_done = True
        return x

    @staticmethod
    def per_frame(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = module(x.transpose(1, 2).reshape(b * t, c, h, w))
        return y.reshape(b, t, *y.shape[1:]).transpose(1, 2)

    def downsample_time(self, x: torch.Tensor) -> torch.Tensor:
        # The first chunk (frame 0 alone) passes through; later chunks get a stride-2 valid conv over
        # [last frame of the previous chunk, this chunk].
        previous, self.last_frame = self.last_frame, x[:, :, -1:].clone()
        if not self.first_chunk_done:
            return x
        return self.time_conv(torch.cat([previous, x], dim=2))

    def upsample_time(self, x: torch.Tensor) -> torch.Tensor:
        # The first chunk (latent frame 0) is not doubled; the time conv's history starts at chunk 1, with zeros.
        if not self.first_chunk_done:
            return x
        b, c, t, h, w = x.shape
        pairs = self.time_conv(x).reshape(b, 2, c, t, h, w)
        return pairs.permute(0, 2, 3, 1, 4, 5).reshape(b, c, t * 2, h, w)


def middle_blocks(dim: int) -> nn.Sequential:
    return nn.Sequential(ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim))


def output_head(dim: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(RMSNorm(dim, 3), nn.SiLU(), CausalConv3d(dim, out_channels, 3, padding=1))


# Default tile and overlap in pixels, the values of LightX2V's `use_tiling` and diffusers' `enable_tiling()`
# (256 px tiles, 64 px overlap): 32 / 8 latents for Wan2.1, 16 / 4 for Wan2.2.
TILE_PIXELS, OVERLAP_PIXELS = 256, 64


def tile_spans(size: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """Cover ``range(size)`` with the fewest windows of at most ``tile`` that overlap their neighbours by
    ``overlap``; the windows get about the same length, so no thin last tile decodes with little context."""
    if tile < 1 or not 0 <= overlap < tile:
        raise ValueError(f"tiling needs tile >= 1 and 0 <= overlap < tile; got tile {tile}, overlap {overlap}")
    if size <= tile:
        return [(0, size)]
    count = math.ceil((size - overlap) / (tile - overlap))
    cuts = [i * (size - overlap) // count for i in range(count + 1)]
    return [(cuts[i], cuts[i + 1] + overlap) for i in range(count)]


def blend_weights(spans: list[tuple[int, int]], scale: int) -> list[torch.Tensor]:
    """One weight vector per span, in output units (``scale`` outputs per input unit): a linear ramp across each
    overlap with a neighbour, normalized so that all tiles' weights sum to 1 at every position."""
    ramps = []
    for i, (start, end) in enumerate(spans):
        weight = torch.ones((end - start) * scale)
        if i > 0:
            n = (spans[i - 1][1] - start) * scale
            weight[:n] *= (torch.arange(n) + 0.5) / n
        if i < len(spans) - 1:
            n = (end - spans[i + 1][0]) * scale
            weight[weight.numel() - n:] *= (n - 0.5 - torch.arange(n)) / n
        ramps.append(weight)
    # The ramps of two neighbours already sum to 1; dividing also covers the rare spot three tiles share.
    total = torch.zeros(spans[-1][1] * scale)
    for (start, _), weight in zip(spans, ramps):
        total[start * scale:start * scale + weight.numel()] += weight
    return [weight / total[start * scale:start * scale + weight.numel()] for (start, _), weight in zip(spans, ramps)]


@dataclass(frozen=True)
class Tile:
    rows: slice  # latent rows / columns of the tile
    cols: slice
    weight: torch.Tensor  # [h * scale, w * scale] blend weight of its output

    def scaled(self, scale: int) -> tuple[slice, slice]:
        """The tile's rows and columns in pixels."""
        return (slice(self.rows.start * scale, self.rows.stop * scale),
                slice(self.cols.start * scale, self.cols.stop * scale))


def tile_grid(height: int, width: int, tile: int, overlap: int, scale: int) -> list[Tile]:
    """Overlapping tiles over a ``height x width`` latent, with output weights at ``scale`` outputs per latent."""
    row_spans, col_spans = tile_spans(height, tile, overlap), tile_spans(width, tile, overlap)
    row_weights, col_weights = blend_weights(row_spans, scale), blend_weights(col_spans, scale)
    return [Tile(slice(*r), slice(*c), rw[:, None] * cw[None, :])
            for r, rw in zip(row_spans, row_weights) for c, cw in zip(col_spans, col_weights)]


@contextmanager
def streaming(module: nn.Module) -> Iterator[None]:
    """Start every stateful submodule from an empty past, and free the carried frames afterwards."""
    stateful = [m for m in module.modules() if isinstance(m, Stateful)]
    for m in stateful:
        m.reset_state()
    try:
        yield
    finally:
        for m in stateful:
            m.reset_state()


class CausalVAE(nn.Module):
    """Chunked causal encode/decode shared by both Wan VAEs.

    Subclasses define ``encoder``, ``decoder``, ``conv1`` (2*z -> 2*z, gives mu | log_var), ``conv2`` (z -> z),
    ``z_dim``, ``stride`` and ``latent_stats``; Wan2.2 also packs pixels into channels (``to_encoder_input``,
    ``from_decoder_output``).
    """

    z_dim: int
    stride: tuple[int, int, int]
    latent_stats: tuple[Sequence[float], Sequence[float]] | None  # (mean, std) of the official release

    def to_encoder_input(self, video: torch.Tensor) -> torch.Tensor:
        return video

    def from_decoder_output(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def latent_mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel statistics shaped [1, z, 1, 1, 1], float32.

        Only the release sizes (z 16 / 48) have official values; other sizes (test models) use mean 0, std 1.
        """
        mean, std = self.latent_stats if self.latent_stats is not None else ((0.0,) * self.z_dim, (1.0,) * self.z_dim)
        device = self.conv2.weight.device
        return tuple(torch.tensor(v, dtype=torch.float32, device=device).view(1, -1, 1, 1, 1) for v in (mean, std))

    def tiles(self, height: int, width: int, tile: int | None, overlap: int | None, scale: int) -> list[Tile]:
        """Tiles over a latent grid (sizes in latents; ``None``: 256 px tiles, 64 px overlap)."""
        spatial = self.stride[1]
        tile = TILE_PIXELS // spatial if tile is None else tile
        overlap = OVERLAP_PIXELS // spatial if overlap is None else overlap
        return tile_grid(height, width, tile, overlap, scale)

    @torch.no_grad()
    def encode(self, video: torch.Tensor, *, tiled: bool = False, tile: int | None = None,
               overlap: int | None = None) -> torch.Tensor:
        """``[B, 3, T, H, W]`` in [-1, 1], T = 1 + 4k -> normalized latents ``[B, z, 1 + k, H/s, W/s]``.

        ``tiled``: encode overlapping tiles of ``tile`` latents (``overlap`` shared), see ``decode``.
        """
        weight = self.conv2.weight
        self.check_video(video)
        video = video.to(device=weight.device, dtype=weight.dtype)
        if tiled:
            _, _, t, h, w = video.shape
            st, sh, sw = self.stride
            mu = video.new_zeros(video.shape[0], self.z_dim, 1 + (t - 1) // st, h // sh, w // sw)
            for part in self.tiles(h // sh, w // sw, tile, overlap, scale=1):
                rows, cols = part.scaled(sh)
                mu[..., part.rows, part.cols] += self.encode_mean(video[..., rows, cols]) * part.weight.to(mu)
        else:
            mu = self.encode_mean(video)
        mean, std = self.latent_mean_std()
        return ((mu.float() - mean) / std).to(weight.dtype)

    def encode_mean(self, video: torch.Tensor) -> torch.Tensor:
        """The encoder's mean (unnormalized latent); its log-variance is unused at inference."""
        return self.encode_moments(video)[:, :self.z_dim]

    def encode_moments(self, video: torch.Tensor) -> torch.Tensor:
        """mu | log_var (unnormalized) on channels, streaming over chunks of 1, 4, 4, ... frames."""
        x = self.to_encoder_input(video)
        step = self.stride[0]
        chunks = [x[:, :, :1]] + [x[:, :, i:i + step] for i in range(1, x.shape[2], step)]
        with streaming(self.encoder):
            features = torch.cat([self.encoder(chunk) for chunk in chunks], dim=2)
        return self.conv1(features)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, *, tiled: bool = False, tile: int | None = None,
               overlap: int | None = None, part: tuple[int, int] | None = None) -> torch.Tensor:
        """Normalized latents ``[B, z, T, h, w]`` -> video ``[B, 3, 1 + 4(T-1), h*s, w*s]`` clamped to [-1, 1].

        Decodes one latent frame at a time; the output is written into a preallocated tensor. ``tiled``: decode
        overlapping spatial tiles of at most ``tile`` x ``tile`` latents, each sharing ``overlap`` latents with its
        neighbours (default 256 px tiles, 64 px overlap: Wan2.1 32 / 8, Wan2.2 16 / 4), one tile at a time through
        all frames, and blend them with linear ramps. Approximate: the decoder sees only the tile.
        ``part=(index, count)`` (tiled; decoding on several ranks): only the tiles ``index``, ``index + count``, ...,
        the rest zero; the sum of all ``count`` parts is the tiled decode.
        """
        weight = self.conv2.weight
        if latents.dim() != 5 or latents.shape[1] != self.z_dim:
            raise ValueError(f"decode expects latents [B, {self.z_dim}, T, h, w]; got shape {tuple(latents.shape)}")
        mean, std = self.latent_mean_std()
        z = (latents.to(device=weight.device, dtype=torch.float32) * std + mean).to(weight.dtype)
        x = self.conv2(z)
        b, _, t, h, w = x.shape
        st, sh, sw = self.stride
        if not tiled:
            video = x.new_empty(b, 3, 1 + st * (t - 1), h * sh, w * sw)
            self.decode_into(video, x)
            return video
        video = x.new_zeros(b, 3, 1 + st * (t - 1), h * sh, w * sw)
        index, count = part or (0, 1)
        for piece in self.tiles(h, w, tile, overlap, scale=sh)[index::count]:
            self.decode_into(video[(..., *piece.scaled(sh))], x[..., piece.rows, piece.cols], piece.weight.to(video))
        return video

    def decode_into(self, out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        """Decode ``x`` (after ``conv2``) one latent frame at a time into ``out``, or add it times ``weight``."""
        with streaming(self.decoder):  # a fresh past for every tile
            start = 0
            for i in range(x.shape[2]):
                frames = self.from_decoder_output(self.decoder(x[:, :, i:i + 1])).clamp(-1.0, 1.0)
                target = out[:, :, start:start + frames.shape[2]]
                if weight is None:
                    target.copy_(frames)
                else:
                    target.add_(frames * weight)
                start += frames.shape[2]

    def check_video(self, video: torch.Tensor) -> None:
        st, sh, sw = self.stride
        if video.dim() != 5 or video.shape[1] != 3:
            raise ValueError(f"encode expects a video [B, 3, T, H, W]; got shape {tuple(video.shape)}")
        t, h, w = video.shape[2:]
        if t < 1 or (t - 1) % st:
            lower = 1 + max(t - 1, 0) // st * st
            raise ValueError(
                f"encode got {t} frames; the Wan VAE encodes 1 + {st}k frames (1, {1 + st}, {1 + 2 * st}, ...). "
                f"Trim the video to {lower} frames or extend it to {lower + st}."
            )
        if h % sh or w % sw:
            raise ValueError(f"encode got {h}x{w} pixels; height and width must be multiples of {sh} and {sw}.")


@dataclass(frozen=True)
class Wan21VAEConfig:
    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)  # per downsampling level; the decoder mirrors it


class Wan21Encoder(nn.Module):
    def __init__(self, config: Wan21VAEConfig) -> None:
        super().__init__()
        dims = [config.dim * m for m in (1, *config.dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []  # one flat Sequential, as in the official key names
        for level, (in_dim, out_dim) in enumerate(pairwise(dims)):
            for _ in range(config.num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if level < len(config.dim_mult) - 1:
                mode = "downsample3d" if config.temporal_downsample[level] else "downsample2d"
                blocks.append(Resample(out_dim, mode))
        self.downsamples = nn.Sequential(*blocks)
        self.middle = middle_blocks(dims[-1])
        self.head = output_head(dims[-1], config.z_dim * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.middle(self.downsamples(self.conv1(x))))


class Wan21Decoder(nn.Module):
    def __init__(self, config: Wan21VAEConfig) -> None:
        super().__init__()
        dims = [config.dim * m for m in (config.dim_mult[-1], *reversed(config.dim_mult))]
        temporal_upsample = tuple(reversed(config.temporal_downsample))
        self.conv1 = CausalConv3d(config.z_dim, dims[0], 3, padding=1)
        self.middle = middle_blocks(dims[0])
        blocks: list[nn.Module] = []
        in_dim = dims[0]
        for level, out_dim in enumerate(dims[1:]):
            for _ in range(config.num_res_blocks + 1):
                blocks.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if level < len(config.dim_mult) - 1:
                mode = "upsample3d" if temporal_upsample[level] else "upsample2d"
                blocks.append(Resample(out_dim, mode))
                in_dim = out_dim // 2  # the Wan2.1 upsampler halves the channels
        self.upsamples = nn.Sequential(*blocks)
        self.head = output_head(dims[-1], 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.upsamples(self.middle(self.conv1(x))))


class Wan21VAE(CausalVAE):
    def __init__(self, config: Wan21VAEConfig = Wan21VAEConfig()) -> None:
        super().__init__()
        self.config = config
        self.z_dim = config.z_dim
        self.stride = (2 ** sum(config.temporal_downsample), 2 ** (len(config.dim_mult) - 1),
                       2 ** (len(config.dim_mult) - 1))
        self.latent_stats = (WAN21_LATENT_MEAN, WAN21_LATENT_STD) if config.z_dim == 16 else None
        self.encoder = Wan21Encoder(config)
        self.conv1 = CausalConv3d(config.z_dim * 2, config.z_dim * 2, 1)
        self.conv2 = CausalConv3d(config.z_dim, config.z_dim, 1)
        self.decoder = Wan21Decoder(config)
