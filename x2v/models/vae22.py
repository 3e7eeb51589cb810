"""Wan2.2 video VAE (z_dim 48, stride 4x16x16; official ``wan/modules/vae2_2.py`` parameter names).

Differences from Wan2.1: 2x2 pixels are packed into channels before the encoder (and unpacked after the
decoder); each resolution level is one block with a parameter-free shortcut that averages (encoder) or
duplicates (decoder) values across the resampled cells; the decoder has its own width and its spatial
upsampling keeps the channel count.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from x2v.models.vae import CausalConv3d, CausalVAE, Resample, ResidualBlock, Stateful, middle_blocks, output_head

WAN22_LATENT_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)
WAN22_LATENT_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)

PATCH = 2  # pixels per side packed into channels


def patchify(video: torch.Tensor) -> torch.Tensor:
    """``[B, C, T, H, W] -> [B, 4C, T, H/2, W/2]``; channel ``c*4 + col*2 + row`` (row/col offset in the 2x2 cell)."""
    b, c, t, h, w = video.shape
    x = video.view(b, c, t, h // PATCH, PATCH, w // PATCH, PATCH)  # b c t h row w col
    return x.permute(0, 1, 6, 4, 2, 3, 5).reshape(b, c * PATCH * PATCH, t, h // PATCH, w // PATCH)


def unpatchify(x: torch.Tensor) -> torch.Tensor:
    """Exact inverse of ``patchify``."""
    b, c4, t, h, w = x.shape
    x = x.view(b, c4 // (PATCH * PATCH), PATCH, PATCH, t, h, w)  # b c col row t h w
    return x.permute(0, 1, 4, 5, 3, 6, 2).reshape(b, c4 // (PATCH * PATCH), t, h * PATCH, w * PATCH)


class AvgDown3D(nn.Module):
    """Fold each ``ft x fs x fs`` cell into channels (index ``c*F + (ti*fs + hi)*fs + wi``), then average
    consecutive channel groups down to ``out_channels``. Time is zero-padded in front to a multiple of ``ft``."""

    def __init__(self, in_channels: int, out_channels: int, ft: int, fs: int) -> None:
        super().__init__()
        self.out_channels, self.ft, self.fs = out_channels, ft, fs
        self.group = in_channels * ft * fs * fs // out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ft, fs = self.ft, self.fs
        x = F.pad(x, (0, 0, 0, 0, (-x.shape[2]) % ft, 0))
        b, c, t, h, w = x.shape
        cells = x.view(b, c, t // ft, ft, h // fs, fs, w // fs, fs).permute(0, 1, 3, 5, 7, 2, 4, 6)
        return cells.reshape(b, self.out_channels, self.group, t // ft, h // fs, w // fs).mean(dim=2)


class DupUp3D(nn.Module, Stateful):
    """Inverse layout of ``AvgDown3D``: repeat channels, then unfold them into ``ft x fs x fs`` cells.
    On the first chunk the first ``ft - 1`` frames are dropped (frame 0 is not doubled in time)."""

    def __init__(self, in_channels: int, out_channels: int, ft: int, fs: int) -> None:
        super().__init__()
        self.out_channels, self.ft, self.fs = out_channels, ft, fs
        self.repeats = out_channels * ft * fs * fs // in_channels
        self.reset_state()

    def reset_state(self) -> None:
        self.first_chunk_done = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ft, fs = self.ft, self.fs
        b, _, t, h, w = x.shape
        cells = x.repeat_interleave(self.repeats, dim=1).view(b, self.out_channels, ft, fs, fs, t, h, w)
        x = cells.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, self.out_channels, t * ft, h * fs, w * fs)
        if not self.first_chunk_done:
            self.first_chunk_done = True
            x = x[:, :, ft - 1:]
        return x


class DownBlock(nn.Module):
    """Residual blocks, then an optional downsampler; plus the input averaged down to the output grid."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temporal: bool, spatial: bool) -> None:
        super().__init__()
        self.avg_shortcut = AvgDown3D(in_dim, out_dim, ft=2 if temporal else 1, fs=2 if spatial else 1)
        blocks: list[nn.Module] = [ResidualBlock(in_dim if i == 0 else out_dim, out_dim) for i in range(num_res_blocks)]
        if spatial:
            blocks.append(Resample(out_dim, "downsample3d" if temporal else "downsample2d"))
        self.downsamples = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsamples(x) + self.avg_shortcut(x)


class UpBlock(nn.Module):
    """Residual blocks, then an optional upsampler; when upsampling, plus the input duplicated onto the output grid."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temporal: bool, upsample: bool) -> None:
        super().__init__()
        blocks: list[nn.Module] = [ResidualBlock(in_dim if i == 0 else out_dim, out_dim) for i in range(num_res_blocks)]
        if upsample:
            blocks.append(Resample(out_dim, "upsample3d" if temporal else "upsample2d", upsample_dim=out_dim))
        self.upsamples = nn.Sequential(*blocks)
        self.avg_shortcut = DupUp3D(in_dim, out_dim, ft=2 if temporal else 1, fs=2) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.upsamples(x)
        return out if self.avg_shortcut is None else out + self.avg_shortcut(x)


@dataclass(frozen=True)
class Wan22VAEConfig:
    dim: int = 160  # encoder width
    decoder_dim: int = 256
    z_dim: int = 48
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)  # per downsampling level; the decoder mirrors it


class Wan22Encoder(nn.Module):
    def __init__(self, config: Wan22VAEConfig) -> None:
        super().__init__()
        dims = [config.dim * m for m in (1, *config.dim_mult)]
        last = len(config.dim_mult) - 1
        self.conv1 = CausalConv3d(3 * PATCH * PATCH, dims[0], 3, padding=1)
        self.downsamples = nn.Sequential(*(
            DownBlock(in_dim, out_dim, config.num_res_blocks,
                      temporal=level < last and config.temporal_downsample[level], spatial=level < last)
            for level, (in_dim, out_dim) in enumerate(pairwise(dims))
        ))
        self.middle = middle_blocks(dims[-1])
        self.head = output_head(dims[-1], config.z_dim * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.middle(self.downsamples(self.conv1(x))))


class Wan22Decoder(nn.Module):
    def __init__(self, config: Wan22VAEConfig) -> None:
        super().__init__()
        dims = [config.decoder_dim * m for m in (config.dim_mult[-1], *reversed(config.dim_mult))]
        temporal_upsample = tuple(reversed(config.temporal_downsample))
        last = len(config.dim_mult) - 1
        self.conv1 = CausalConv3d(config.z_dim, dims[0], 3, padding=1)
        self.middle = middle_blocks(dims[0])
        self.upsamples = nn.Sequential(*(
            UpBlock(in_dim, out_dim, config.num_res_blocks + 1,
                    temporal=level < last and temporal_upsample[level], upsample=level < last)
            for level, (in_dim, out_dim) in enumerate(pairwise(dims))
        ))
        self.head = output_head(dims[-1], 3 * PATCH * PATCH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.upsamples(self.middle(self.conv1(x))))


class Wan22VAE(CausalVAE):
    def __init__(self, config: Wan22VAEConfig = Wan22VAEConfig()) -> None:
        super().__init__()
        self.config = config
        self.z_dim = config.z_dim
        spatial = PATCH * 2 ** (len(config.dim_mult) - 1)
        self.stride = (2 ** sum(config.temporal_downsample), spatial, spatial)
        self.latent_stats = (WAN22_LATENT_MEAN, WAN22_LATENT_STD) if config.z_dim == 48 else None
        self.encoder = Wan22Encoder(config)
        self.conv1 = CausalConv3d(config.z_dim * 2, config.z_dim * 2, 1)
        self.conv2 = CausalConv3d(config.z_dim, config.z_dim, 1)
        self.decoder = Wan22Decoder(config)

    def to_encoder_input(self, video: torch.Tensor) -> torch.Tensor:
        return patchify(video)

    def from_decoder_output(self, x: torch.Tensor) -> torch.Tensor:
        return unpatchify(x)
