"""What a model directory holds, read from file headers and tensor shapes only (no weights are loaded).

``inspect_model`` resolves every component like the loaders do and reports, per component: the files and how
they were found, container, key layout, dtypes, quantization, detected architecture and variant, parameter
count, bytes on disk and the memory it will take at the chosen dtype, then every problem with its fix.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from x2v.errors import X2VError
from x2v.formats import clip_keys, dit_keys, t5_keys, vae_keys
from x2v.formats.dit_keys import supported_tasks, variant_name
from x2v.formats.metadata import from_metadata
from x2v.formats.quant import without_scales
from x2v.formats.readers import index_shard_files
from x2v.loading.components import COMPONENTS
from x2v.loading.load import Plan, compute_dtype, plan
from x2v.loading.quantized import quantized_linears
from x2v.loading.resolve import Found, Sources, checkpoint_metadata, resolve_component, resolve_dit
from x2v.loading.weights import non_finite, target_dtype, weight_problems
from x2v.ops.quant_linear import replace_linears
from x2v.loading.gguf import packed_types, read_weights, stored_kind, swap_packed_linears


@dataclass
class ComponentReport:
    name: str  # "dit" or a Wan2.2 expert's name, "t5", "tokenizer", "clip", "vae"
    found: Found | None = None
    facts: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    component: str = field(default="", repr=False)  # its entry in COMPONENTS

    def as_dict(self) -> dict:
        return {"name": self.name, "path": str(self.found.path) if self.found else None,
                "how": self.found.how if self.found else None, **self.facts, "problems": self.problems}


def checkpoint_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(path.glob("*.safetensors"))
    if path.name.endswith(".index.json"):
        return index_shard_files(path)
    return [path]


def container(path: Path) -> str:
    if path.is_dir():
        return "block-split safetensors folder"
    if path.name.endswith(".index.json"):
        return f"sharded safetensors ({len(checkpoint_files(path))} shards + index)"
    if path.suffix == ".safetensors":
        return "single safetensors"
    return "GGUF" if path.suffix.lower() == ".gguf" else "PyTorch pickle (.pth, read with weights_only)"


def file_facts(report: ComponentReport) -> None:
    """Container, counts, dtypes and bytes on disk of the component's file (memory-mapped, not read)."""
    path = report.found.path
    tensors = read_weights(path)
    dtypes = Counter(stored_kind(t) for t in tensors.values())
    report.facts.update(
        container=container(path),
        key_layout=KEY_LAYOUTS[report.component](tensors, str(path)),
        tensors=len(tensors),
        dtypes=dict(dtypes.most_common()),
        parameters=sum(t.numel() for t in tensors.values()),
        bytes_on_disk=sum(f.stat().st_size for f in checkpoint_files(path) if f.is_file()),
    )


def dit_layout(tensors: dict, source: str) -> str:
    prefix = next((p for p in dit_keys.PREFIXES if any(k.startswith(p) for k in tensors)), "")
    layout = "diffusers" if dit_keys.is_diffusers_layout(tensors) else "official (Wan / LightX2V)"
    return layout + (f", {prefix!r} prefix (ComfyUI)" if prefix else "")


def clip_layout(tensors: dict, source: str) -> str:
    layout = clip_keys.find_layout(tensors)
    return layout[0] if layout else "unknown"


# How each component's key names are described (the formats' own words).
KEY_LAYOUTS = {"dit": dit_layout, "t5": t5_keys.detect_layout, "clip": clip_layout, "vae": vae_keys.detect_layout}


def memory_at(model: torch.nn.Module, dtype: torch.dtype, keep_fp32: tuple[str, ...] = ()) -> int:
    """Bytes of ``model``'s tensors (meta is fine) at ``dtype``; quantized layers count at their 8-bit storage."""
    return sum(t.numel() * target_dtype(n, t.dtype, dtype, keep_fp32, t.dtype).itemsize
               for n, t in model.state_dict().items())


def describe_quantization(planned: Plan, component: str) -> str:
    types = packed_types(planned.tensors)
    if types:
        return f"GGUF {', '.join(sorted(types))} (linear layers keep their blocks and dequantize as they run)"
    if planned.encoding.quantized:
        return f"{planned.encoding.name} ({planned.encoding.family}; linear layers run 8-bit)"
    if planned.quantize_kind:
        return f"none; quantized to {planned.quantize_kind} at load ({component}_quant_scheme)"
    return "none"


def architecture_facts(report: ComponentReport, planned: Plan) -> None:
    config = planned.architecture
    if report.component == "dit":
        report.facts["variant"] = variant_name(config)
        report.facts["architecture"] = {k: getattr(config, k) for k in (
            "model_type", "dim", "num_layers", "num_heads", "ffn_dim", "in_dim", "out_dim", "image_branch",
            "vace_layers")}
        report.facts["tasks"] = supported_tasks(config)
        converted = from_metadata(checkpoint_metadata(report.found.path))
        if converted:
            report.facts["converted_by_x2v"] = converted
    elif report.component == "vae":
        report.facts["variant"] = f"{COMPONENTS['vae'].describe(config)} (z_dim {config.z_dim})"
    else:
        report.facts["architecture"] = config.__dict__


def inspect_weights(report: ComponentReport, dtype: torch.dtype, sources: Sources, values: bool = False) -> None:
    """What ``load_component`` would build from the report's file, without reading a weight: architecture,
    quantization, every tensor that does not fit, and the memory it takes as loaded (8-bit layers as such).
    ``values``: also read every tensor and report those holding NaN or infinity (one pass over the file)."""
    component = COMPONENTS[report.component]
    file_facts(report)
    planned = plan(component, report.found.path, sources.quant(component.name))
    if component.quantizable:
        report.facts["quantization"] = describe_quantization(planned, component.name)
    architecture_facts(report, planned)
    found = non_finite(planned.tensors) if values else None
    if found:
        report.problems.append(f"{found}: loading refuses them (the file is corrupt or from a diverged training run)")
    model = planned.build()
    report.problems += weight_problems(model.state_dict(), without_scales(planned.tensors, planned.encoding),
                                       component.describe(planned.architecture))
    if packed_types(planned.tensors):
        swap_packed_linears(model, planned.tensors, dtype, component.keep_fp32)
    elif component.quantizable:
        layers, kind = quantized_linears(model, planned.tensors, planned.encoding, planned.quantize_kind,
                                         component.name, component.keep_fp32)
        replace_linears(model, layers, kind, dtype)
    # Memory at the dtype asked for; components that run in float32 by default (the VAE) at theirs.
    at = dtype if component.quantizable else compute_dtype(planned, None)
    report.facts[f"memory_{str(at).removeprefix('torch.')}"] = memory_at(model, at, component.keep_fp32)


def inspect_model(path: str | Path, sources: Sources = Sources(), dtype: torch.dtype = torch.bfloat16,
                  values: bool = False) -> list[ComponentReport]:
    """Reports for every DiT (one, or both Wan2.2 experts), then umT5, tokenizer, CLIP (when found or needed), VAE.
    A path that does not exist is one report with one problem, not one per component. ``values``: see
    ``inspect_weights``."""
    if not Path(path).expanduser().exists():
        return [ComponentReport("model", problems=[f"{path}: no such file or folder. Pass a model folder, a DiT "
                                                   "folder or a checkpoint file."])]
    reports: list[ComponentReport] = []
    try:
        dits = resolve_dit(path, sources)
    except X2VError as e:
        dits = {}
        reports.append(ComponentReport("dit", problems=[str(e)]))
    for name, found in dits.items():
        report = ComponentReport(name, found, component="dit")
        reports.append(report)
        try:
            inspect_weights(report, dtype, sources, values)
        except X2VError as e:
            report.problems.append(str(e))
    needs_clip = any(r.facts.get("architecture", {}).get("image_branch") for r in reports)
    for name in ("t5", "tokenizer", "clip", "vae"):
        report = ComponentReport(name, component=name)
        try:
            report.found = resolve_component(name, path, sources)
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
            inspect_weights(report, dtype, sources, values)
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
