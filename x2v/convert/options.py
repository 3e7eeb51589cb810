"""What the user asked ``x2v convert`` for, and what it reports back."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from x2v.errors import X2VError
from x2v.formats.metadata import EXPERT_SHORT, EXPERTS

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
QUANTIZE_CHOICES = ("fp8", "int8", "none")
COMPONENTS = ("dit", "t5", "clip")
# --lora PATH@EXPERT and --expert accept the folder name or LightX2V's short name.
EXPERT_NAMES = {**{e: e for e in EXPERTS}, **{short: e for e, short in EXPERT_SHORT.items()},
                **{short.split("_")[0]: e for e, short in EXPERT_SHORT.items()}}


class ConversionError(X2VError):
    """The conversion asked for cannot be done as asked (options that contradict each other, output in the way)."""


@dataclass(frozen=True)
class LoraSpec:
    path: str
    strength: float = 1.0
    expert: str | None = None  # a Wan2.2 expert folder name; None: every DiT converted


def expert_name(text: str) -> str:
    if text not in EXPERT_NAMES:
        raise ValueError(f"unknown Wan2.2 expert {text!r}; expected one of {', '.join(EXPERT_NAMES)}")
    return EXPERT_NAMES[text]


def parse_lora(text: str) -> LoraSpec:
    """``PATH[:STRENGTH][@EXPERT]``, e.g. ``distill.safetensors:0.8@high_noise_model``."""
    path, expert = text, None
    head, at, tail = text.rpartition("@")
    if at and tail in EXPERT_NAMES:
        path, expert = head, EXPERT_NAMES[tail]
    strength = 1.0
    head, colon, tail = path.rpartition(":")
    if colon and head:
        try:
            path, strength = head, float(tail)
        except ValueError:
            pass  # a colon inside the path
    return LoraSpec(path, strength, expert)


@dataclass(frozen=True)
class ConvertOptions:
    layout: str | None = None  # a key of layouts.LAYOUTS; None: official (DiT)
    quantize: str | None = None  # fp8 | int8 | none; None: keep the source's encoding
    dtype: torch.dtype | None = None  # unquantized tensors; None: keep each tensor's own dtype
    shard_size: int = 5 * 10**9
    loras: tuple[LoraSpec, ...] = ()
    component: str = "dit"  # dit | t5 | clip
    expert: str | None = None  # convert / label this Wan2.2 expert
    components: str | None = None  # "copy" | "link": make the output a complete model directory
    overwrite: bool = False
    progress: bool = True


@dataclass
class ConversionResult:
    files: list[Path]
    bytes_written: int
    seconds: float
    descriptions: list[str] = field(default_factory=list)
    lora_summaries: list[str] = field(default_factory=list)

    def report(self) -> str:
        rate = self.bytes_written / max(self.seconds, 1e-9) / 1e9
        lines = [*self.descriptions, *self.lora_summaries,
                 f"wrote {len(self.files)} file(s), {self.bytes_written / 1e9:.3f} GB in {self.seconds:.1f} s "
                 f"({rate:.2f} GB/s)"]
        folders = sorted({str(path.parent) for path in self.files})
        if len(self.files) > 8:  # shards and block files: the folders say enough
            lines += [f"  in {folder}" for folder in folders]
        else:
            lines += [f"  {path}" for path in self.files]
        return "\n".join(lines)
