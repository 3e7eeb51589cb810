"""What a model directory holds, read from file headers and tensor shapes only (no weights are loaded).

``inspect_model`` resolves every component like the loaders do and reports, per component: the files and how
they were found, container, key layout, dtypes, quantization, detected architecture and variant, parameter
count, bytes on disk and the memory it will take at the chosen dtype, then every problem with its fix.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from x2v.errors import X2VError
from x2v.formats.quant import Encoding, without_scales
from x2v.formats.readers import read_checkpoint
from x2v.loading.resolve import Found, resolve_component, resolve_dit
from x2v.loading.weights import build_on_meta, target_dtype, weight_problems


@dataclass
class ComponentReport:
    name: str
    found: Found | None = None
    facts: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"name": self.name, "path": str(self.found.path) if self.found else None,
                "how": self.found.how if self.found else None, **self.facts, "problems": self.problems}


def checkpoint_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(path.glob("*.safetensors"))
    if path.name.endswith(".index.json"):
        return [path.parent / s for s in sorted(set(json.loads(path.read_text())["weight_map"].values()))]
    return [path]


def container(path: Path) -> str:
    if path.is_dir():
        return "block-split safetensors folder"
    if path.name.endswith(".index.json"):
        return f"sharded safetensors ({len(checkpoint_files(path))} shards + index)"
    return "single safetensors" if path.suffix == ".safetensors" else "PyTorch pickle (.pth, read with weights_only)"


def read_tensors(report: ComponentReport) -> dict[str, torch.Tensor]:
    """The component's tensors (memory-mapped, not read); records container, counts, dtypes and bytes on disk."""
    path = report.found.path
    tensors = read_checkpoint(path)
    dtypes = Counter(str(t.dtype).removeprefix("torch.") for t in tensors.values())
    report.facts.update(
        container=container(path),
        tensors=len(tensors),
        dtypes=dict(dtypes.most_common()),
        parameters=sum(t.numel() for t in tensors.values()),
        bytes_on_disk=sum(f.stat().st_size for f in checkpoint_files(path) if f.is_file()),
    )
    return tensors


def memory_at(model: torch.nn.Module, dtype: torch.dtype, keep_fp32: tuple[str, ...] = ()) -> int:
    """Bytes of ``model``'s tensors (meta is fine) at ``dtype``; quantized layers count at their 8-bit storage."""
    return sum(t.numel() * target_dtype(n, t.dtype, dtype, keep_fp32, t.dtype).itemsize
               for n, t in model.state_dict().items())


def inspect_dit(report: ComponentReport, tensors: dict, dtype: torch.dtype, config: dict) -> None:
    from x2v.formats.dit_keys import PREFIXES, is_diffusers_layout, supported_tasks, to_official, variant_name
    from x2v.loading.dit import detect_architecture
    from x2v.models.wan_dit import FP32_PARAMS, WanDiT

    prefix = next((p for p in PREFIXES if any(k.startswith(p) for k in tensors)), "")
    layout = "diffusers" if is_diffusers_layout(tensors) else "official (Wan / LightX2V)"
    report.facts["key_layout"] = layout + (f", {prefix!r} prefix (ComfyUI)" if prefix else "")
    converted = converter_record(report.found.path)
    if converted:
        report.facts["converted_by_x2v"] = converted
    official = to_official(tensors)
    quantization = quantization_of(official, report, config, "dit")
    arch = detect_architecture(report.found.path, official)
    report.facts["variant"] = variant_name(arch)
    report.facts["architecture"] = {k: getattr(arch, k) for k in (
        "model_type", "dim", "num_layers", "num_heads", "ffn_dim", "in_dim", "out_dim", "image_branch", "vace_layers")}
    report.facts["tasks"] = supported_tasks(arch)
    model = build_on_meta(lambda: WanDiT(arch))
    fit_and_memory(report, model, official, *quantization, "dit", dtype, FP32_PARAMS, "DiT")


def converter_record(path: Path) -> dict[str, str]:
    """What ``x2v convert`` recorded in the file's metadata (layout, encoding, scheme, expert, source); {} if
    another tool wrote it."""
    from x2v.convert.layouts import from_metadata
    from x2v.loading.resolve import checkpoint_metadata

    return from_metadata(checkpoint_metadata(path))


def quantization_of(tensors: dict, report: ComponentReport, config: dict, component: str
                    ) -> tuple[Encoding, str | None]:
    """``read_quantization`` with the config's ``<component>_quantized`` / ``_quant_scheme``, described in
    ``report.facts["quantization"]``."""
    from x2v.loading.quantized import read_quantization

    encoding, kind = read_quantization(tensors, str(report.found.path), component,
                                       config.get(f"{component}_quantized"), config.get(f"{component}_quant_scheme"))
    if encoding.quantized:
        report.facts["quantization"] = f"{encoding.name} ({encoding.family}; linear layers run 8-bit)"
    else:
        report.facts["quantization"] = f"none; quantized to {kind} at load ({component}_quant_scheme)" if kind \
            else "none"
    return encoding, kind


def fit_and_memory(report: ComponentReport, model: torch.nn.Module, tensors: dict, encoding: Encoding,
                   quantize_kind: str | None, component: str, dtype: torch.dtype, keep_fp32: tuple[str, ...],
                   what: str) -> None:
    """Problems of ``tensors`` against the meta ``model``, then the memory it takes as loaded (8-bit layers
    counted as such)."""
    from x2v.loading.quantized import quantized_linears
    from x2v.ops.quant_linear import replace_linears

    report.problems += weight_problems(model.state_dict(), without_scales(tensors, encoding), what)
    layers, kind = quantized_linears(model, tensors, encoding, quantize_kind, component, keep_fp32)
    replace_linears(model, layers, kind, dtype)
    report.facts[f"memory_{str(dtype).removeprefix('torch.')}"] = memory_at(model, dtype, keep_fp32)


def inspect_t5(report: ComponentReport, tensors: dict, dtype: torch.dtype, config: dict) -> None:
    from x2v.formats.t5_keys import detect_layout, infer_config, to_official
    from x2v.models.t5 import T5Encoder

    report.facts["key_layout"] = detect_layout(tensors, str(report.found.path))
    official = to_official(tensors, str(report.found.path))
    arch = infer_config(official, str(report.found.path))
    report.facts["architecture"] = arch.__dict__
    quantization = quantization_of(official, report, config, "t5")
    model = build_on_meta(lambda: T5Encoder(arch))
    fit_and_memory(report, model, official, *quantization, "t5", dtype, (), "umT5 encoder")


def inspect_clip(report: ComponentReport, tensors: dict, dtype: torch.dtype, config: dict) -> None:
    from x2v.formats.clip_keys import find_layout, infer_config, to_official
    from x2v.loading.image_encoder import KEEP_FP32, tower_tensors
    from x2v.models.clip import ClipVisionTower

    layout = find_layout(tensors)
    report.facts["key_layout"] = layout[0] if layout else "unknown"
    official = to_official(tensors)
    arch = infer_config(official)
    report.facts["architecture"] = arch.__dict__
    tensors = tower_tensors(official, arch)
    quantization = quantization_of(tensors, report, config, "clip")
    model = build_on_meta(lambda: ClipVisionTower(arch))
    fit_and_memory(report, model, tensors, *quantization, "clip", dtype, KEEP_FP32, "CLIP vision tower")


def inspect_vae(report: ComponentReport, tensors: dict, dtype: torch.dtype, config: dict) -> None:
    from x2v.formats.vae_keys import detect_layout, detect_version, infer_config, to_official
    from x2v.models.vae import Wan21VAE
    from x2v.models.vae22 import Wan22VAE

    report.facts["key_layout"] = detect_layout(tensors, str(report.found.path))
    official = to_official(tensors, str(report.found.path))
    version = detect_version(official)
    arch = infer_config(official, str(report.found.path))
    report.facts["variant"] = f"Wan{version} VAE (z_dim {arch.z_dim})"
    model = build_on_meta(lambda: Wan22VAE(arch) if version == "2.2" else Wan21VAE(arch))
    # The VAE runs in float32 unless asked otherwise.
    report.facts["memory_float32"] = memory_at(model, torch.float32)
    report.problems += weight_problems(model.state_dict(), official, f"Wan{version} VAE")


INSPECTORS = {"t5": inspect_t5, "clip": inspect_clip, "vae": inspect_vae}


def inspect_model(path: str | Path, config: dict | None = None, dtype: torch.dtype = torch.bfloat16
                  ) -> list[ComponentReport]:
    """Reports for every DiT (one, or both Wan2.2 experts), then umT5, tokenizer, CLIP (when found or needed), VAE."""
    config = config or {}
    reports: list[ComponentReport] = []
    try:
        dits = resolve_dit(path, config)
    except X2VError as e:
        dits = {}
        reports.append(ComponentReport("dit", problems=[str(e)]))
    for name, found in dits.items():
        report = ComponentReport(name, found)
        reports.append(report)
        try:
            inspect_dit(report, read_tensors(report), dtype, config)
        except X2VError as e:
            report.problems.append(str(e))
    needs_clip = any(r.facts.get("architecture", {}).get("image_branch") for r in reports)
    for name in ("t5", "tokenizer", "clip", "vae"):
        report = ComponentReport(name)
        try:
            report.found = resolve_component(name, path, config)
        except X2VError as e:
            if name == "clip" and not needs_clip:
                continue  # only Wan2.1 I2V / FLF2V use CLIP
            report.problems.append(str(e))
            reports.append(report)
            continue
        reports.append(report)
        if name == "tokenizer":
            report.facts["files"] = sorted(p.name for p in report.found.path.iterdir())
            continue
        try:
            INSPECTORS[name](report, read_tensors(report), dtype, config)
        except X2VError as e:
            report.problems.append(str(e))
    if len(dits) == 2:
        shapes = [r.facts.get("architecture") for r in reports if r.name in dits]
        if shapes[0] != shapes[1]:
            reports[0].problems.append(f"the two Wan2.2 experts differ in architecture: {shapes[0]} vs {shapes[1]}")
    return reports


def human_bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def format_report(reports: list[ComponentReport]) -> str:
    lines = []
    for r in reports:
        lines.append(f"{r.name}: {r.found.path if r.found else 'not found'}")
        if r.found:
            lines.append(f"  found by: {r.found.how}")
        for key, value in r.facts.items():
            if key.startswith("memory_") or key == "bytes_on_disk":
                value = human_bytes(value)
            elif key == "parameters":
                value = f"{value / 1e9:.3f} B" if value > 1e8 else f"{value:,}"
            lines.append(f"  {key.replace('_', ' ')}: {value}")
        lines += [f"  PROBLEM: {p}" for p in r.problems]
    ok = not any(r.problems for r in reports)
    lines.append("ready to load" if ok else "cannot load as is: fix the problems above")
    return "\n".join(lines)
