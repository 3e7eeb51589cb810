"""Wan VAE tensor names: official (``Wan2.1_VAE.pth`` / ``Wan2.2_VAE.pth``) <-> diffusers ``AutoencoderKLWan``,
which VAE a state dict holds, and its architecture read back from tensor shapes.

Both VAEs share the renames of ``FIXED_PREFIXES`` and ``RESNET_PARTS``; they differ in how the resolution
levels are numbered:

* Wan2.1 official: flat ``encoder.downsamples.K`` / ``decoder.upsamples.K`` (residual blocks and resamplers in
  one Sequential). diffusers keeps the flat encoder index (``encoder.down_blocks.K``) but splits the decoder into
  ``decoder.up_blocks.I.resnets.J`` / ``decoder.up_blocks.I.upsamplers.0``.
* Wan2.2 official: ``encoder.downsamples.I.downsamples.J`` / ``decoder.upsamples.I.upsamples.J`` (the last J of a
  level is its resampler); diffusers: ``{down,up}_blocks.I.resnets.J`` and ``down_blocks.I.downsampler`` /
  ``up_blocks.I.upsampler``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Literal

import torch

from x2v.errors import CheckpointError
from x2v.formats.keys import summarize_keys

Layout = Literal["official", "diffusers"]
Version = Literal["2.1", "2.2"]

# (official prefix, diffusers prefix), matched at the start of a name.
FIXED_PREFIXES = (
    ("conv1.", "quant_conv."),
    ("conv2.", "post_quant_conv."),
    *(
        pair
        for part in ("encoder", "decoder")
        for pair in (
            (f"{part}.conv1.", f"{part}.conv_in."),
            (f"{part}.middle.0.", f"{part}.mid_block.resnets.0."),
            (f"{part}.middle.1.", f"{part}.mid_block.attentions.0."),
            (f"{part}.middle.2.", f"{part}.mid_block.resnets.1."),
            (f"{part}.head.0.", f"{part}.norm_out."),
            (f"{part}.head.2.", f"{part}.conv_out."),
        )
    ),
)
# Inside a residual block: (official, diffusers) start of the remaining name.
RESNET_PARTS = (
    ("residual.0.", "norm1."),
    ("residual.2.", "conv1."),
    ("residual.3.", "norm2."),
    ("residual.6.", "conv2."),
    ("shortcut.", "conv_shortcut."),
)
RESAMPLER_PARTS = ("resample.", "time_conv.")

OFFICIAL_MARKER = "decoder.middle.0.residual.0.gamma"
DIFFUSERS_MARKER = "decoder.mid_block.resnets.0.norm1.gamma"
OFFICIAL_WAN22_MARKER = "decoder.upsamples.0.upsamples.0.residual.2.weight"
DIFFUSERS_WAN22_MARKER = "encoder.down_blocks.0.resnets.0.conv1.weight"

# A name split into (block prefix, rest inside the block); None when no block rule applies.
BlockRule = Callable[[str], tuple[str, str] | None]


def rename(names: Iterable[str], block: BlockRule, fixed: dict[str, str], parts: dict[str, str]) -> dict[str, str]:
    """old name -> new name: block prefix from ``fixed`` or ``block``, then the residual-block parts.
    Names no rule knows are kept, so the loader can report them."""
    mapping = {}
    for name in names:
        split = next(((new, name[len(old):]) for old, new in fixed.items() if name.startswith(old)), None) or block(name)
        if split is None:
            mapping[name] = name
            continue
        prefix, rest = split
        part = next((p for p in parts if rest.startswith(p)), None)
        mapping[name] = prefix + (parts[part] + rest[len(part):] if part else rest)
    return mapping


def indices(names: Iterable[str], pattern: str) -> list[int]:
    """Sorted distinct values of the ``(\\d+)`` group of ``pattern`` over ``names``."""
    regex = re.compile(pattern)
    return sorted({int(m[1]) for m in map(regex.match, names) if m})


def official_to_diffusers(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an official state dict (either VAE) to diffusers ``AutoencoderKLWan`` names."""
    names = list(tensors)
    if OFFICIAL_WAN22_MARKER in tensors:
        def block(name: str) -> tuple[str, str] | None:
            m = re.match(r"(encoder|decoder)\.(?:down|up)samples\.(\d+)\.(?:down|up)samples\.(\d+)\.(.*)", name)
            if not m:
                return None
            part, level, j, rest = m.groups()
            blocks, resampler = ("down_blocks", "downsampler") if part == "encoder" else ("up_blocks", "upsampler")
            inner = resampler if rest.startswith(RESAMPLER_PARTS) else f"resnets.{j}"
            return f"{part}.{blocks}.{level}.{inner}.", rest
    else:
        # Decoder levels are (resnets..., upsampler): the first upsampler's index + 1 is the level size.
        upsamplers = indices(names, r"decoder\.upsamples\.(\d+)\.resample\.")
        level_size = upsamplers[0] + 1 if upsamplers else len(indices(names, r"decoder\.upsamples\.(\d+)\.")) + 1

        def block(name: str) -> tuple[str, str] | None:
            if m := re.match(r"encoder\.downsamples\.(\d+)\.(.*)", name):
                return f"encoder.down_blocks.{m[1]}.", m[2]
            if m := re.match(r"decoder\.upsamples\.(\d+)\.(.*)", name):
                level, j = divmod(int(m[1]), level_size)
                inner = "upsamplers.0" if m[2].startswith(RESAMPLER_PARTS) else f"resnets.{j}"
                return f"decoder.up_blocks.{level}.{inner}.", m[2]
            return None

    mapping = rename(names, block, dict(FIXED_PREFIXES), dict(RESNET_PARTS))
    return {mapping[name]: t for name, t in tensors.items()}


def diffusers_to_official(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a diffusers ``AutoencoderKLWan`` state dict (either VAE) to official names."""
    names = list(tensors)
    encoder_resnets = len(indices(names, r"encoder\.down_blocks\.0\.resnets\.(\d+)\."))
    decoder_resnets = len(indices(names, r"decoder\.up_blocks\.0\.resnets\.(\d+)\."))
    if DIFFUSERS_WAN22_MARKER in tensors:
        def block(name: str) -> tuple[str, str] | None:
            m = re.match(r"(encoder|decoder)\.(?:down|up)_blocks\.(\d+)\.(?:resnets\.(\d+)|downsampler|upsampler)\.(.*)", name)
            if not m:
                return None
            part, level, j, rest = m.groups()
            group = "downsamples" if part == "encoder" else "upsamples"
            j = j if j is not None else (encoder_resnets if part == "encoder" else decoder_resnets)
            return f"{part}.{group}.{level}.{group}.{j}.", rest
    else:
        def block(name: str) -> tuple[str, str] | None:
            if m := re.match(r"encoder\.down_blocks\.(\d+)\.(.*)", name):
                return f"encoder.downsamples.{m[1]}.", m[2]
            if m := re.match(r"decoder\.up_blocks\.(\d+)\.(?:resnets\.(\d+)|upsamplers\.0)\.(.*)", name):
                j = int(m[2]) if m[2] is not None else decoder_resnets
                return f"decoder.upsamples.{int(m[1]) * (decoder_resnets + 1) + j}.", m[3]
            return None

    fixed = {diffusers: official for official, diffusers in FIXED_PREFIXES}
    parts = {diffusers: official for official, diffusers in RESNET_PARTS}
    mapping = rename(names, block, fixed, parts)
    return {mapping[name]: t for name, t in tensors.items()}


def detect_layout(tensors: dict[str, torch.Tensor], source: str) -> Layout:
    if OFFICIAL_MARKER in tensors:
        return "official"
    if DIFFUSERS_MARKER in tensors:
        return "diffusers"
    raise CheckpointError(
        f"{source}: not a Wan VAE: expected {OFFICIAL_MARKER} (official Wan2.1_VAE.pth / Wan2.2_VAE.pth) or "
        f"{DIFFUSERS_MARKER} (diffusers AutoencoderKLWan); found {summarize_keys(tensors) or 'no tensors'}. "
        "Pass the VAE checkpoint (config key vae_path)."
    )


def to_official(tensors: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """The state dict in official names, whichever layout ``tensors`` uses."""
    return tensors if detect_layout(tensors, source) == "official" else diffusers_to_official(tensors)


def detect_version(tensors: dict[str, torch.Tensor]) -> Version:
    """Which VAE an official-named state dict holds: only Wan2.2 nests blocks inside each decoder level."""
    return "2.2" if OFFICIAL_WAN22_MARKER in tensors else "2.1"


def infer_architecture(tensors: dict[str, torch.Tensor], source: str) -> dict:
    """The fields of ``Wan21VAEConfig`` or, for a Wan2.2 VAE (``detect_version``), ``Wan22VAEConfig``, read from an
    official-named state dict; the loader then checks every shape against them."""

    def shape(name: str) -> torch.Size:
        if name not in tensors:
            raise CheckpointError(f"{source}: VAE tensor {name!r} not found; the file is incomplete or not a Wan VAE.")
        return tensors[name].shape

    dim = shape("encoder.conv1.weight")[0]
    z_dim = shape("conv2.weight")[0]
    if detect_version(tensors) == "2.2":
        levels = indices(tensors, r"encoder\.downsamples\.(\d+)\.")
        num_res_blocks = len(indices(tensors, r"encoder\.downsamples\.0\.downsamples\.(\d+)\.residual\."))
        return dict(
            dim=dim,
            decoder_dim=shape("decoder.head.2.weight")[1],
            z_dim=z_dim,
            dim_mult=tuple(shape(f"encoder.downsamples.{i}.downsamples.0.residual.2.weight")[0] // dim for i in levels),
            num_res_blocks=num_res_blocks,
            temporal_downsample=tuple(
                f"encoder.downsamples.{i}.downsamples.{num_res_blocks}.time_conv.weight" in tensors for i in levels[:-1]
            ),
        )

    # Wan2.1: walk the flat encoder Sequential; each resampler closes a level.
    level_widths: list[list[int]] = [[]]
    temporal: list[bool] = []
    for k in indices(tensors, r"encoder\.downsamples\.(\d+)\."):
        prefix = f"encoder.downsamples.{k}."
        if prefix + "resample.1.weight" in tensors:
            temporal.append(prefix + "time_conv.weight" in tensors)
            level_widths.append([])
        else:
            level_widths[-1].append(shape(prefix + "residual.2.weight")[0])
    blocks_per_level = {len(widths) for widths in level_widths}
    if len(blocks_per_level) != 1 or 0 in blocks_per_level:
        raise CheckpointError(
            f"{source}: the encoder levels hold {[len(w) for w in level_widths]} residual blocks; a Wan2.1 VAE has the "
            "same number (2 in the release) in every level. The file is incomplete or not a Wan VAE."
        )
    return dict(
        dim=dim,
        z_dim=z_dim,
        dim_mult=tuple(widths[-1] // dim for widths in level_widths),
        num_res_blocks=blocks_per_level.pop(),
        temporal_downsample=tuple(temporal),
    )
