"""Image and video conditioning of the official pipelines (docs/sampling.md §5, §7, §8), as pure functions."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def i2v_size(image_h: int, image_w: int, max_area: int, stride: int = 8, patch: int = 2) -> tuple[int, int]:
    """Output (height, width) of Wan2.1/2.2 I2V: the image's aspect ratio within ``max_area``, in float64 as the
    official code computes it (832x480 at area 832*480 gives height 464, not 480)."""
    aspect = np.float64(image_h) / np.float64(image_w)
    lat_h = round(np.floor(np.floor(np.sqrt(max_area * aspect) / stride) / patch) * patch)
    lat_w = round(np.floor(np.floor(np.sqrt(max_area / aspect) / stride) / patch) * patch)
    return int(lat_h * stride), int(lat_w * stride)


def ti2v_size(image_w: int, image_h: int, area: int, step: int = 32) -> tuple[int, int]:
    """(width, height) of TI2V-5B image-to-video: the multiple-of-32 size of about ``area`` pixels whose aspect
    ratio is closest to the image's (``best_output_size``)."""
    ratio = image_w / image_h
    ow = math.sqrt(area * ratio)
    oh = area / ow
    w1 = math.floor(ow / step) * step
    h1 = math.floor(area / w1 / step) * step
    h2 = math.floor(oh / step) * step
    w2 = math.floor(area / h2 / step) * step

    def misfit(w: int, h: int) -> float:
        return max(ratio / (w / h), (w / h) / ratio)

    return (w1, h1) if misfit(w1, h1) < misfit(w2, h2) else (w2, h2)


def resize_image(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bicubic squash resize of ``[3, H, W]`` (no antialias, not clamped), as the official conditioning frame."""
    return F.interpolate(image[None].float(), size=(height, width), mode="bicubic", align_corners=False)[0]


def resize_cover_crop(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Scale ``[3, H, W]`` to cover (height, width) with LANCZOS, then center-crop (TI2V-5B, §7)."""
    from PIL import Image

    h, w = image.shape[1:]
    scale = max(width / w, height / h)
    pixels = ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    resized = Image.fromarray(pixels).resize((round(w * scale), round(h * scale)), Image.LANCZOS)
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    cropped = np.asarray(resized.crop((left, top, left + width, top + height)))
    return torch.from_numpy(cropped.copy()).permute(2, 0, 1).float() / 127.5 - 1


def i2v_mask(frames: int, lat_h: int, lat_w: int, last_frame: bool = False) -> torch.Tensor:
    """The 4-channel frame mask ``[4, T_lat, lat_h, lat_w]``: 1 where a pixel frame is given (frame 0; FLF2V also
    the last), grouped by the VAE's 4-frame time compression (frame 0 repeated 4 times first)."""
    mask = torch.zeros(frames, lat_h, lat_w)
    mask[0] = 1
    if last_frame:
        mask[-1] = 1
    mask = torch.cat([mask[:1].repeat(3, 1, 1), mask])  # frame 0 is its own latent frame
    return mask.view(-1, 4, lat_h, lat_w).transpose(0, 1)


def conditioning_video(first: torch.Tensor, frames: int, height: int, width: int,
                       last: torch.Tensor | None = None) -> torch.Tensor:
    """``[3, F, H, W]``: the resized first (and last) frame, zeros (mid-grey) elsewhere."""
    video = torch.zeros(3, frames, height, width)
    video[:, 0] = resize_image(first, height, width)
    if last is not None:
        video[:, -1] = resize_image(last, height, width)
    return video


def per_token_timesteps(t: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
    """TI2V-5B: ``[1, tokens]`` timesteps, ``t`` for generated tokens and 0 for the given first frame.

    ``frame_mask`` is ``[T_lat, h, w]`` on the latent grid (1 = generate); tokens are 2x2 latent patches.
    """
    return (frame_mask[:, ::2, ::2] * t.float()).flatten()[None]


def fold_vace_mask(mask: torch.Tensor, latent_frames: int, stride: int = 8) -> torch.Tensor:
    """VACE mask ``[F, H, W]`` -> ``[stride*stride, T_lat, H/stride, W/stride]``: each 8x8 pixel cell becomes channels,
    then nearest-exact resampling in time to the latent frame count (docs/models.md, VACE)."""
    frames, h, w = mask.shape
    folded = mask.view(frames, h // stride, stride, w // stride, stride).permute(2, 4, 0, 1, 3)
    folded = folded.reshape(stride * stride, frames, h // stride, w // stride)
    return F.interpolate(folded[None], size=(latent_frames, h // stride, w // stride), mode="nearest-exact")[0]


def fit_on_white(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """VACE reference image: scaled to fit inside (height, width) keeping its aspect ratio (bilinear), centred on
    a white canvas."""
    h, w = image.shape[1:]
    if (h, w) == (height, width):
        return image.float()
    scale = min(height / h, width / w)
    new_h, new_w = int(h * scale), int(w * scale)
    resized = F.interpolate(image[None].float(), size=(new_h, new_w), mode="bilinear", align_corners=False)[0]
    canvas = torch.ones(3, height, width)
    top, left = (height - new_h) // 2, (width - new_w) // 2
    canvas[:, top:top + new_h, left:left + new_w] = resized
    return canvas
