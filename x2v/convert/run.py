"""Convert DiT checkpoints: plan every output file from the source's headers, write the files one tensor at a
time under temporary names, then publish them all (data files, config.json, components, indexes last), holding the
output's lock throughout (``x2v.convert.safety``: concurrent runs, leftovers of killed runs, what --overwrite may
replace, write errors).

Memory: a source tensor is read from its memory map just before its output is written, and its pages leave the
process right after (``release_pages``), while a helper thread reads the next tensor's pages. The peak is a few
tensors (source, float32 working copy, output), whatever the model's size.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from tqdm import tqdm

from x2v.convert.layouts import (
    BLOCK_SPLIT, CONFIG_WRITERS, INDEX_FILE, LAYOUTS, NAMINGS, SCALE_SPELLING, SINGLE, SINGLE_FILE, Layout, block_file,
    index_json, shard_name,
)
from x2v.convert.options import ConversionError, ConversionResult, ConvertOptions, LoraSpec
from x2v.convert.plan import QUANTIZE, Item, Producer, Target, encoding_target, plan_items
from x2v.convert.safety import (
    FILE, FOLDER, check_destinations, make_folder, make_room, output_lock, remove_stale_temps, remove_temps, reporting,
)
from x2v.errors import CheckpointError, X2VError
from x2v.formats.dit_keys import variant_name
from x2v.formats.quant import (
    ENCODINGS, FLOAT, PER_TENSOR, Encoding, schemes_for, without_scales,
)
from x2v.formats.metadata import EXPERT_METADATA_KEY, EXPERTS, to_metadata
from x2v.formats.readers import home_block, index_shard_files
from x2v.formats.writers import SafetensorsWriter, publish, temp_path, write_temp_text
from x2v.loading.components import COMPONENTS
from x2v.loading.load import Plan, plan
from x2v.loading.resolve import checkpoint_metadata, resolve_component, resolve_dit
from x2v.loading.weights import weight_problems
from x2v.models.wan_dit import WanDiTConfig
from x2v.runtime.pages import FileMappings, read_pages, release_pages

# Folders of a diffusers repository that are copied whole with --copy-components (weights + their config.json).
DIFFUSERS_COMPONENT_FOLDERS = ("text_encoder", "vae", "image_encoder")
COPY_CHUNK = 16 * 2**20


@dataclass
class OutputFile:
    path: Path
    items: list[Item]
    metadata: dict[str, str]

    @property
    def specs(self):
        return [spec for item in self.items for spec in item.outputs]

    @property
    def nbytes(self) -> int:
        return sum(item.nbytes for item in self.items)


@dataclass(frozen=True)
class DitJob:
    name: str  # "dit" or the expert's folder name
    checkpoint: Path
    expert: str | None
    expert_how: str
    destination: Path  # a folder, or the output file when to_file
    to_file: bool


@dataclass
class DitPlan:
    job: DitJob
    producer: Producer
    files: list[OutputFile]
    texts: dict[Path, str]  # config.json, then the index (published last)
    description: str
    lora_summaries: list[str]
    config: WanDiTConfig


# --- what to convert -------------------------------------------------------------------------------------------

def single_expert(checkpoint: Path, asked: str | None) -> tuple[str | None, str]:
    """The Wan2.2 expert a lone DiT is: --expert, else its own metadata, else an official expert folder name."""
    tagged = checkpoint_metadata(checkpoint).get(EXPERT_METADATA_KEY)
    if asked and tagged and asked != tagged:
        raise ConversionError(f"{checkpoint}: --expert {asked}, but the file's metadata says {tagged}. "
                              "Drop --expert, or convert the other expert's file.")
    if asked:
        return asked, "--expert"
    if tagged in EXPERTS:
        return tagged, f"metadata {EXPERT_METADATA_KEY} of the source"
    folder = checkpoint if checkpoint.is_dir() else checkpoint.parent
    if folder.name in EXPERTS:
        return folder.name, f"the source's {folder.name}/ folder"
    return None, ""


def dit_jobs(source: Path, output: Path, options: ConvertOptions, layout: Layout) -> list[DitJob]:
    to_file = output.suffix == ".safetensors"
    if output.suffix in (".pth", ".pt", ".json", ".bin", ".ckpt"):
        raise ConversionError(f"{output}: the DiT is written as safetensors: give a folder, or a .safetensors file "
                              "(single-file layouts).")
    if to_file and layout.container == BLOCK_SPLIT:
        raise ConversionError(f"{output}: the block-split layout is a folder; give a folder name.")
    if to_file and options.components:
        raise ConversionError(f"{output}: --copy-components / --link-components build a model folder; "
                              "give a folder name.")
    found = resolve_dit(source)
    if len(found) == 1:
        checkpoint = found["dit"].path
        expert, how = single_expert(checkpoint, options.expert)
        return [DitJob("dit", checkpoint, expert, how, output, to_file)]
    names = [options.expert] if options.expert else list(found)
    if to_file and len(names) == 2:
        raise ConversionError(f"{source}: a two-expert Wan2.2 model; the output must be a folder (it gets "
                              "high_noise_model/ and low_noise_model/), or pick one expert with --expert.")
    if options.components and len(names) == 1:
        raise ConversionError(f"{source}: --expert converts one expert, which is not a model that runs alone; "
                              "drop --expert to build a complete model folder.")
    return [DitJob(name, found[name].path, name, found[name].how, output if len(names) == 1 else output / name,
                   to_file) for name in names]


def output_target(encoding: Encoding, quantize: str | None, layout: Layout, source: str) -> Target:
    """How quantized layers are written: as the source has them (the same layers) unless --quantize says otherwise."""
    target = encoding_target(encoding, quantize)
    if target.kind is None or layout.naming != "comfyui":
        return replace(target, scale_name=SCALE_SPELLING[layout.naming])
    if target.kind != "fp8":
        raise ConversionError(f"{source}: the comfyui layout stores quantized weights as scaled fp8 only, and this "
                              f"conversion would write {target.kind}. Pass --quantize fp8 or --quantize none, or "
                              "choose another --layout.")
    return replace(target, granularity=PER_TENSOR, scale_name=SCALE_SPELLING["comfyui"])


def written_encoding(target: Target, items: list[Item]) -> Encoding:
    layers = tuple(item.key.removesuffix(".weight") for item in items if item.action == QUANTIZE)
    if not layers:
        return FLOAT
    name = ENCODINGS[(target.scale_name, target.kind, target.granularity)]
    return Encoding(name, target.kind, target.granularity, target.scale_name, layers)


def check_complete(planned: Plan) -> None:
    """Refuse to convert a DiT that would not load: missing, unexpected or misshapen tensors."""
    problems = weight_problems(planned.build().state_dict(), without_scales(planned.tensors, planned.encoding), "DiT")
    if problems:
        raise CheckpointError(f"{planned.source}: does not fit the {variant_name(planned.architecture)} DiT its "
                              "shapes describe, so its conversion would not load:\n  " + "\n  ".join(problems))


def lora_deltas(job: DitJob, together: bool, tensors: dict, encoding: Encoding, cfg: WanDiTConfig,
                specs: tuple[LoraSpec, ...]):
    """(LoraDeltas or None, report lines, LoRAs used) for one DiT. Converting both Wan2.2 experts, each LoRA
    names its expert (never one expert silently, docs/pitfalls.md C07); a DiT converted alone takes every LoRA, except
    one named for another expert."""
    from x2v.loading.lora import LoraEntry, entries_for_expert, prepare_loras

    entries = [LoraEntry(s.path, s.strength, name=s.expert) for s in specs]
    if together:
        entries = entries_for_expert(entries, job.expert)
    else:
        stray = [e for e in entries if e.name is not None and e.name != job.expert]
        if stray:
            what = f"the {job.expert}" if job.expert else "not a Wan2.2 expert (no expert folder or metadata)"
            raise ConversionError(f"--lora {stray[0].path}@{stray[0].name}: {job.checkpoint} is {what}. Drop the "
                                  "@expert part, or say which expert the file is with --expert.")
    if not entries:
        return None, [], []
    shapes = {k: t.shape for k, t in without_scales(tensors, encoding).items()}
    described = variant_name(cfg) + (f" ({job.expert})" if job.expert else "")
    deltas, reports = prepare_loras(entries, shapes, model_description=described)
    return deltas, [r.summary() for r in reports], entries


def split_by_size(items: list[Item], limit: int) -> list[list[Item]]:
    """Consecutive items in shards of at most ``limit`` bytes (a larger item gets a shard of its own)."""
    shards: list[list[Item]] = [[]]
    size = 0
    for item in items:
        if shards[-1] and size + item.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item.nbytes
    return shards


def output_files(items: list[Item], layout: Layout, job: DitJob, shard_size: int,
                 metadata: dict[str, str]) -> tuple[list[OutputFile], str | None]:
    """The files of one DiT and, when there are several, the text of their index."""
    if job.to_file:
        return [OutputFile(job.destination, items, metadata)], None
    folder = job.destination
    if layout.container == SINGLE:
        return [OutputFile(folder / SINGLE_FILE, items, metadata)], None
    if layout.container == BLOCK_SPLIT:
        blocks: dict[int | None, list[Item]] = {None: []}
        for item in items:
            blocks.setdefault(home_block(item.key), []).append(item)  # the reader's rule, so it reads them back
        order = [None] + sorted(b for b in blocks if b is not None)
        files = [OutputFile(folder / block_file(b), blocks[b], metadata) for b in order]
    else:
        shards = split_by_size(items, shard_size)
        files = [OutputFile(folder / shard_name(i, len(shards)), shard, metadata) for i, shard in enumerate(shards)]
    if len(files) == 1 and layout.container != BLOCK_SPLIT:
        return files, None
    weight_map = {spec.name: f.path.name for f in files for spec in f.specs}
    return files, index_json(weight_map, sum(f.nbytes for f in files))


def plan_dit(job: DitJob, layout: Layout, options: ConvertOptions, together: bool) -> DitPlan:
    source = str(job.checkpoint)
    planned = plan(COMPONENTS["dit"], job.checkpoint)  # header only: official names, architecture, encoding
    tensors, encoding, cfg = planned.tensors, planned.encoding, planned.architecture
    check_complete(planned)
    target = output_target(encoding, options.quantize, layout, source)
    items = plan_items(tensors, encoding, target, component="dit", dtype=options.dtype,
                       naming=NAMINGS[layout.naming])
    deltas, summaries, loras = lora_deltas(job, together, tensors, encoding, cfg, options.loras)
    written = written_encoding(target, items)
    layout_name = "single" if job.to_file and layout.name == "official" else layout.name
    metadata = to_metadata({
        "layout": layout_name,
        "encoding": written.name,
        "quant_scheme": schemes_for(written)[0],
        "model_type": cfg.model_type,
        "variant": variant_name(cfg),
        "expert": job.expert,
        "source": str(job.checkpoint.resolve()),
        "loras": json.dumps([{"path": e.path, "strength": e.strength} for e in loras]) if loras else None,
    })
    files, index = output_files(items, layout, job, options.shard_size, metadata)
    texts = {}
    if not job.to_file:
        texts[job.destination / "config.json"] = json.dumps(CONFIG_WRITERS[layout.naming](cfg), indent=2)
    if index is not None:
        texts[job.destination / INDEX_FILE] = index
    quantized = f"{written.family} ({written.name}, LightX2V dit_quant_scheme {schemes_for(written)[0]})" \
        if written.quantized else "not quantized"
    expert = f", expert {job.expert} (from {job.expert_how})" if job.expert else ""
    description = (f"{job.name}: {job.checkpoint} -> {job.destination}: {variant_name(cfg)}{expert}, "
                   f"{layout_name} layout, {quantized}, "
                   f"{len(files)} file(s)")
    return DitPlan(job, Producer(tensors, encoding, target, deltas), files, texts, description, summaries, cfg)


# --- components (--copy-components / --link-components) ----------------------------------------------------------

def with_shards(path: Path) -> list[Path]:
    """A component path and, for a shard index, its shards."""
    if path.name.endswith(".index.json"):
        return [path, *index_shard_files(path)]  # checked: inside the index's folder
    return [path]


def component_sources(source: Path, needs_clip: bool) -> list[tuple[Path, Path]]:
    """(path in the source, path relative to the output) of the T5, tokenizer, CLIP (if any) and VAE."""
    root = source if source.is_dir() else source.parent
    found = []
    for name in ("t5", "tokenizer", "clip", "vae"):
        try:
            path = resolve_component(name, source).path
        except X2VError as e:
            if name == "clip" and not needs_clip:
                continue  # only Wan2.1 I2V / FLF2V have a CLIP image encoder
            raise ConversionError(f"--copy-components: {e}") from None
        if path.is_file() and path.parent.name in DIFFUSERS_COMPONENT_FOLDERS and path.parent != root:
            path = path.parent
        for part in with_shards(path):
            found.append((part, part.relative_to(root) if part.is_relative_to(root) else Path(part.name)))
    return found


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def copy_file(source: Path, temp: Path, progress: tqdm) -> None:
    with open(source, "rb") as src, open(temp, "wb") as dst:
        buffer = memoryview(bytearray(COPY_CHUNK))
        while n := src.readinto(buffer):
            dst.write(buffer[:n])
            progress.update(n)
        dst.flush()
        os.fsync(dst.fileno())


def place_component(source: Path, final: Path, mode: str, progress: tqdm) -> None:
    """Copy or link ``source`` to the temporary name of ``final``."""
    temp = temp_path(final)
    if mode == "link":
        os.symlink(source.resolve(), temp)
    elif source.is_dir():
        shutil.copytree(source, temp)
        progress.update(tree_bytes(source))
    else:
        copy_file(source, temp, progress)


# --- writing ---------------------------------------------------------------------------------------------------

def _read_all(pages: list) -> None:
    for p in pages:
        read_pages(p)


def write_file(file: OutputFile, producer: Producer, mappings: FileMappings, progress: tqdm) -> None:
    """One output file, tensor by tensor; each source's pages are read ahead and dropped after use."""
    pages = [[mappings.pages(t) for t in producer.sources(item)] for item in file.items]
    with SafetensorsWriter(file.path, file.specs, file.metadata) as writer, \
            ThreadPoolExecutor(max_workers=1) as reader:
        ahead = reader.submit(_read_all, pages[0] if pages else [])
        for i, item in enumerate(file.items):
            ahead.result()
            ahead = reader.submit(_read_all, pages[i + 1] if i + 1 < len(pages) else [])
            for spec, tensor in zip(item.outputs, producer.produce(item)):
                progress.update(writer.write(spec.name, tensor))
            for p in pages[i]:
                release_pages(p)
        writer.finish()


def source_files(path: Path) -> set[Path]:
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else with_shards(path)
    return {p.resolve() for p in files}


def planned_kinds(finals: list[Path], placed: dict[Path, Path]) -> dict[Path, str]:
    """What each output path will be: a file, or a folder (a tokenizer or diffusers component folder, or a link to
    one, which --overwrite may replace by the other)."""
    return {final: FOLDER if final in placed and placed[final].is_dir() else FILE for final in finals}


def write_outputs(plans: list[DitPlan], texts: dict[Path, str], placed: dict[Path, Path], mode: str | None,
                  progress: tqdm) -> None:
    """Every output under its temporary name; an OSError becomes one line naming the output it was writing."""
    mappings = FileMappings()  # after every source is mapped
    for dit in plans:
        for file in dit.files:
            with reporting(file.path):
                write_file(file, dit.producer, mappings, progress)
    for path, text in texts.items():
        with reporting(path):
            write_temp_text(path, text)
    for final, src in placed.items():
        with reporting(final, "copied" if mode == "copy" else "linked"):
            place_component(src, final, mode, progress)


def publish_outputs(finals: list[Path]) -> None:
    """Rename the finished temporary files into place, in order (the index last)."""
    for final in finals:
        with reporting(final, "put in place", PUBLISH_FAILED):
            make_room(final)  # an old component folder (allowed by check_destinations)
            publish([final])


PUBLISH_FAILED = ("The outputs renamed into place before it are complete; the others were not published and their "
                  "temporary files were removed: run the conversion again with --overwrite.")


def convert_dit(source: Path, output: Path, options: ConvertOptions) -> ConversionResult:
    start = time.perf_counter()
    layout = LAYOUTS[options.layout or "official"]
    jobs = dit_jobs(source, output, options, layout)
    for job in jobs:
        folder = job.checkpoint if job.checkpoint.is_dir() else job.checkpoint.parent
        if not job.to_file and job.destination.resolve() == folder.resolve():
            raise ConversionError(f"{job.destination}: is the source's own folder; a folder with two DiT "
                                  "checkpoints is ambiguous. Write the conversion into another folder.")
    plans = [plan_dit(job, layout, options, together=len(jobs) > 1) for job in jobs]
    needs_clip = any(plan.config.image_branch for plan in plans)
    components = component_sources(source, needs_clip) if options.components else []
    data = [f.path for plan in plans for f in plan.files]
    texts = {path: text for plan in plans for path, text in plan.texts.items()}
    indexes = [p for p in texts if p.name == INDEX_FILE]
    placed = {output / rel: src for src, rel in components}
    finals = data + [p for p in texts if p not in indexes] + list(placed) + indexes
    sources = set().union(*(source_files(job.checkpoint) for job in jobs), {src.resolve() for src, _ in components})
    total = sum(f.nbytes for plan in plans for f in plan.files)
    if options.components != "link":
        total += sum(tree_bytes(src) for src in placed.values())

    # The output and each expert folder: a second run into any of them (--expert into one) is refused.
    with output_lock([output, *(job.destination for job in jobs)]):
        check_destinations(planned_kinds(finals, placed), sources, options.overwrite)
        folders = {p.parent for p in finals}
        for folder in sorted(folders):
            make_folder(folder)
        remove_stale_temps(folders, set(finals))
        try:
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc="x2v convert",
                      disable=not options.progress or None, leave=False) as progress:
                write_outputs(plans, texts, placed, options.components, progress)
            publish_outputs(finals)
        finally:
            remove_temps(finals)  # after an error: nothing half-written stays, not even under a temporary name
    return ConversionResult(finals, total, time.perf_counter() - start, [plan.description for plan in plans],
                            [line for plan in plans for line in plan.lora_summaries])
