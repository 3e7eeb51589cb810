"""``x2v convert``: rewrite a checkpoint in another layout, dtype or quantization, with LoRAs merged.

Anything the loaders read goes in; out come official shards + index, one file, diffusers names, ComfyUI names
(optionally scaled fp8), LightX2V int8/fp8 per-channel files, block-split folders, and LightX2V's quantized T5 /
CLIP files. See docs/convert.md.
"""

from __future__ import annotations

import os
from pathlib import Path

from x2v.convert.options import ConversionError, ConversionResult, ConvertOptions, LoraSpec, parse_lora
from x2v.errors import CheckpointError

__all__ = ["ConversionError", "ConversionResult", "ConvertOptions", "LoraSpec", "convert", "parse_lora"]


def convert(source: str | os.PathLike, output: str | os.PathLike, options: ConvertOptions | None = None,
            **settings) -> ConversionResult:
    """Convert ``source`` (model folder, DiT folder or checkpoint file) into ``output``.

    ``settings`` are ``ConvertOptions`` fields (``layout="single"``, ``quantize="int8"``...). Every output file
    appears only when the whole conversion has been written.
    """
    from dataclasses import replace

    from x2v.convert.layouts import LAYOUTS
    from x2v.convert.options import COMPONENTS, QUANTIZE_CHOICES
    from x2v.formats.metadata import EXPERTS

    options = replace(options or ConvertOptions(), **settings)
    choices = {"layout": (None, *LAYOUTS), "quantize": (None, *QUANTIZE_CHOICES), "component": COMPONENTS,
               "expert": (None, *EXPERTS), "components": (None, "copy", "link")}
    for name, allowed in choices.items():
        if getattr(options, name) not in allowed:
            raise ConversionError(f"{name} {getattr(options, name)!r}: expected one of "
                                  f"{', '.join(a for a in allowed if a)}.")
    source, output = Path(source), Path(output)
    if not source.exists():
        raise CheckpointError(f"{source}: no such file or directory. Pass a model folder or a checkpoint file.")
    if options.component == "dit":
        from x2v.convert.run import convert_dit

        return convert_dit(source, output, options)
    from x2v.convert.encoders import convert_encoder

    return convert_encoder(source, output, options)
