"""Which file is which component: a model directory plus LightX2V's config keys -> checkpoint paths.

Rules (one for every component, the same for both Wan2.2 experts):
1. an explicit config key wins (``dit_original_ckpt``, ``high_noise_quantized_ckpt``, ``t5_original_ckpt``, ...);
2. else the official place in the model directory (``high_noise_model/``, ``models_t5_umt5-xxl-enc-bf16.pth``, ...);
3. else the single candidate; several candidates are an error that lists them and names the key that chooses.
Every answer records how it was found, so ``x2v inspect`` and the logs can say it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from x2v.errors import CheckpointError
from x2v.formats.metadata import EXPERT_METADATA_KEY, EXPERT_SHORT, EXPERTS, LOW_NOISE as LOW
from x2v.formats.quant import scheme_kind
from x2v.formats.readers import index_shard_files, read_safetensors_header, safetensors_metadata
from x2v.loading.components import COMPONENTS, EXPERT_FILE_KEYS, Component, config_json_beside
from x2v.loading.gguf import is_dit_gguf

OFFICIAL_DIT_STEM = "diffusion_pytorch_model"
# LightX2V's hub layout before Oct 2025; still on users' disks.
LEGACY_DIT_FOLDERS = ("original", "fp8", "int8", "distill_models", "distill_fp8", "distill_int8")


@dataclass(frozen=True)
class Quantization:
    """A component's ``<name>_quantized`` / ``<name>_quant_scheme`` (None: not set, the file decides)."""

    quantized: bool | None = None
    scheme: str | None = None


@dataclass(frozen=True)
class Sources:
    """What the settings say about the files: paths named by LightX2V's keys (``dit_original_ckpt``, ``vae_path``,
    ...), each component's quantization, whether the model class has two experts, and where each value was set
    (for messages: "flag --model_path", "config key vae_path in my.json")."""

    files: Mapping[str, Path] = field(default_factory=dict)
    quantization: Mapping[str, Quantization] = field(default_factory=dict)
    two_experts: bool = False
    origins: Mapping[str, str] = field(default_factory=dict)

    def origin(self, key: str) -> str:
        return self.origins.get(key, f"config key {key}")

    def quant(self, component: str) -> Quantization:
        return self.quantization.get(component, Quantization())

    def file(self, key: str) -> Path | None:
        """The path set for ``key``, which must exist; None when the key is not set."""
        path = self.files.get(key)
        if path is not None and not Path(path).expanduser().exists():
            raise CheckpointError(f"{path}: not found (set by {self.origin(key)}). Fix the path or remove the key.")
        return None if path is None else Path(path).expanduser()

    def named(self, component: str, keys: tuple[str, ...]) -> tuple[Path, str] | None:
        """The file the first set of ``keys`` names, with its origin; ``(original, quantized)`` keys are tried with
        the quantized one first when ``<component>_quantized`` is true. None: no key is set."""
        ordered = keys[::-1] if self.quant(component).quantized and len(keys) == 2 else keys
        for key in ordered:
            path = self.file(key)
            if path is not None:
                return path, self.origin(key)
        return None


@dataclass(frozen=True)
class Found:
    path: Path
    how: str

    def __str__(self) -> str:
        return f"{self.path} ({self.how})"


def one_candidate(directory: Path, candidates: list[Path], what: str, looked_for: str, config_key: str,
                  note: str = "") -> Path:
    """The single candidate; none or several is an error that lists them and names the key that chooses."""
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise CheckpointError(f"{directory}: no {what} found (looked for {looked_for}).{note} Pass the file itself, "
                              f"or set the config key {config_key} to it.")
    listing = ", ".join(str(c.relative_to(directory)) for c in candidates)
    raise CheckpointError(f"{directory}: {len(candidates)} {what} checkpoints found ({listing}); x2v will not guess "
                          f"or merge them. Set the config key {config_key} to the one you want.")


def model_folder(model_path: str | Path, sources: Sources) -> Path:
    path = Path(model_path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: not found (set by {sources.origin('model_path')}). Fix the path.")
    return path


def is_dit_safetensors(path: Path) -> bool:
    """A DiT file has the head modulation (official/ComfyUI names) or its diffusers twin; T5, CLIP, VAE and
    LoRA files lying beside it do not."""
    keys = read_safetensors_header(path)[0].keys()
    return any(k.endswith("head.modulation") or k == "scale_shift_table" for k in keys)


def dit_candidates(directory: Path) -> list[Path]:
    """DiT checkpoints in one folder: a shard index counts once for its shards; a block-split folder is itself one."""
    if (directory / "non_block.safetensors").is_file():
        return [directory]
    indexes = sorted(directory.glob("*.safetensors.index.json"))
    sharded = {p for index in indexes for p in indexed_files(index)}
    singles = [p for p in sorted(directory.glob("*.safetensors")) if p not in sharded and is_dit_safetensors(p)]
    pickles = [p for p in sorted(directory.glob("*.pt")) + sorted(directory.glob("distill_model.pth"))]
    ggufs = [p for p in sorted(directory.glob("*.gguf")) if is_dit_gguf(p)]
    return indexes + singles + pickles + ggufs


def indexed_files(index: Path) -> list[Path]:
    """The shards an index names, whatever their names (LightX2V's converter writes ``<name>_part1.safetensors``
    ...); for an index that cannot be read, the official ``-NNNNN-of-NNNNN`` names (loading it says what is wrong)."""
    try:
        return index_shard_files(index)
    except CheckpointError:
        return list(index.parent.glob(index.name.removesuffix(".index.json").replace(".safetensors",
                                                                                       "-*.safetensors")))


def find_dit_file(directory: Path, choose_keys: str) -> Found:
    """The one DiT checkpoint of ``directory``; several are an error, never a merge (docs/pitfalls.md A01)."""
    candidates = dit_candidates(directory)
    found = one_candidate(directory, candidates, "DiT", f"{OFFICIAL_DIT_STEM}*.safetensors with its index, one "
                          ".safetensors or .gguf file, or non_block.safetensors + block_N.safetensors", choose_keys)
    what = "block-split folder" if found == directory else "the only DiT checkpoint"
    return Found(found, f"{what} in {directory}")


def _dit_at(path: Path, how: str, choose_keys: str) -> Found:
    return Found(path, how) if path.is_file() else find_dit_file(path, choose_keys)


def checkpoint_metadata(path: Path) -> dict[str, str]:
    """The safetensors metadata of a DiT checkpoint: its file, an index's first shard, a block-split folder's
    ``non_block`` file; {} for pickles and unreadable files (loading reports those)."""
    if path.is_dir():
        path = path / "non_block.safetensors"
    elif path.name.endswith(".index.json"):
        try:
            path = min(index_shard_files(path))
        except (OSError, CheckpointError, ValueError):
            return {}
    if path.suffix != ".safetensors" or not path.is_file():
        return {}
    try:
        return safetensors_metadata(path)
    except CheckpointError:
        return {}


def tagged_experts(directory: Path) -> dict[Path, str]:
    """DiT checkpoints of ``directory`` whose metadata names their Wan2.2 expert (x2v convert writes it)."""
    tags = {p: checkpoint_metadata(p).get(EXPERT_METADATA_KEY) for p in dit_candidates(directory)}
    return {p: tag for p, tag in tags.items() if tag in EXPERTS}


def is_moe(model_path: Path, sources: Sources) -> bool:
    if sources.two_experts or any(key in sources.files for key in EXPERT_FILE_KEYS):
        return True
    return model_path.is_dir() and (
        all((model_path / e).is_dir() for e in EXPERTS) or (model_path / "transformer_2").is_dir()
        or set(tagged_experts(model_path).values()) == set(EXPERTS)
    )


def explicit(sources: Sources, component: str, keys: tuple[str, ...], choose: str) -> Found | None:
    """The DiT a config key names (``keys``: original, quantized), if one does."""
    named = sources.named(component, keys)
    return _dit_at(*named, choose) if named else None


def resolve_expert(model_path: Path, sources: Sources, expert: str) -> Found:
    """One Wan2.2 expert, by the same rule for both: explicit key > expert folder > recorded metadata."""
    short = EXPERT_SHORT[expert]
    keys = (f"{short}_original_ckpt", f"{short}_quantized_ckpt")
    choose = f"{short}_original_ckpt (or {short}_quantized_ckpt)"
    found = explicit(sources, "dit", keys, choose)
    if found:
        return found
    diffusers_folder = {"high_noise_model": "transformer", "low_noise_model": "transformer_2"}[expert]
    for folder, how in ((model_path / expert, f"the {expert}/ folder"),
                        (model_path / "distill_models" / expert, f"the legacy distill_models/{expert}/ folder"),
                        (model_path / diffusers_folder, f"diffusers {diffusers_folder}/ ({expert})")):
        if folder.is_dir():
            return Found(find_dit_file(folder, choose).path, how)
    tagged = [p for p, tag in tagged_experts(model_path).items() if tag == expert]
    if len(tagged) == 1:
        return Found(tagged[0], f"file metadata {EXPERT_METADATA_KEY}={expert}")
    raise CheckpointError(
        f"{model_path}: no {expert} found for this two-expert Wan2.2 model (looked for the config keys "
        f"{' / '.join(keys)}, a {expert}/ folder and files whose metadata names the expert). Both experts are "
        f"needed; the two files cannot be told apart by their weights, so set {choose}."
    )


def resolve_dit(model_path: str | Path, sources: Sources = Sources()) -> dict[str, Found]:
    """``{"dit": Found}``, or ``{"high_noise_model": ..., "low_noise_model": ...}`` for Wan2.2 A14B."""
    model_path = Path(model_path).expanduser()
    keys = COMPONENTS["dit"].file_keys
    if is_moe(model_path, sources):
        for key in keys:
            if key in sources.files:
                # One path cannot be both experts (docs/pitfalls.md A11): refuse instead of loading it twice.
                kind = key.split("_")[1]
                raise CheckpointError(
                    f"{key} ({sources.origin(key)}) names one DiT, but this is a two-expert Wan2.2 model. Use "
                    f"high_noise_{kind}_ckpt and low_noise_{kind}_ckpt instead."
                )
        return {expert: resolve_expert(model_path, sources, expert) for expert in EXPERTS}
    choose = "dit_original_ckpt (or dit_quantized_ckpt with dit_quantized)"
    found = explicit(sources, "dit", keys, choose)
    if found:
        return {"dit": found}
    model_path = model_folder(model_path, sources)
    if model_path.is_file():
        return {"dit": Found(model_path, "the file given")}
    if (model_path / "transformer").is_dir() and not dit_candidates(model_path):
        return {"dit": Found(find_dit_file(model_path / "transformer", choose).path, "diffusers transformer/")}
    if dit_candidates(model_path):
        return {"dit": find_dit_file(model_path, choose)}
    legacy = [model_path / f for f in LEGACY_DIT_FOLDERS if (model_path / f).is_dir()
              and dit_candidates(model_path / f)]
    if len(legacy) == 1:
        found = find_dit_file(legacy[0], choose)
        return {"dit": Found(found.path, f"the legacy LightX2V {legacy[0].name}/ folder")}
    if legacy:
        raise CheckpointError(
            f"{model_path}: DiT weights in {len(legacy)} legacy LightX2V folders ("
            + ", ".join(f.name + "/" for f in legacy) + f"); set {choose} to the one you want."
        )
    return {"dit": find_dit_file(model_path, choose)}


def model_config_file(model_path: Path | None, dits: dict[str, Found]) -> Path | None:
    """The model's own ``config.json`` (its sampling keys are a settings level): in the model folder, else beside
    the DiT (the low-noise expert's first, where LightX2V looks)."""
    places = [model_path / "config.json"] if model_path is not None and model_path.is_dir() else []
    places += [config_json_beside(found.path) for _, found in sorted(dits.items(), key=lambda item: item[0] != LOW)]
    return next((place for place in places if place.is_file()), None)


# --- the other components -------------------------------------------------------------------------------------

CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".safetensors.index.json")
SHARD = re.compile(r"-\d{5}-of-\d{5}\.safetensors$")
# diffusers layouts: the umT5 encoder is a transformers UMT5EncoderModel folder; the VAE an AutoencoderKLWan folder.
DIFFUSERS_T5_FILES = ("text_encoder/model.safetensors.index.json", "text_encoder/model.safetensors")
DIFFUSERS_VAE_CLASS = "AutoencoderKLWan"
DIFFUSERS_WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
)
CLIP_FOLDER = "image_encoder"  # diffusers layout
TOKENIZER_FOLDERS = ("google/umt5-xxl", "tokenizer", "")  # official, diffusers, the folder itself
TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json")


def checkpoint_files(folder: Path) -> list[Path]:
    """Checkpoint files directly in ``folder``; a sharded checkpoint counts once, as its index."""
    if not folder.is_dir():
        return []
    files = sorted(f for f in folder.iterdir() if f.is_file() and f.name.endswith(CHECKPOINT_SUFFIXES))
    indexes = [f for f in files if f.name.endswith(".index.json")]
    if indexes:
        shards = {p for index in indexes for p in indexed_files(index)}
        files = [f for f in files if f not in shards and not SHARD.search(f.name)]
    return files


def files_near(directory: Path) -> list[Path]:
    """Files at the top level of ``directory`` and one folder down."""
    top = sorted(directory.iterdir())
    return [p for p in top if p.is_file()] + [f for d in top if d.is_dir() for f in sorted(d.iterdir()) if f.is_file()]


def release_names(component: Component, kind: str | None) -> list[str]:
    """The component's file names, best first: LightX2V's 8-bit names for ``kind`` ("int8" / "fp8"), then the
    official ones."""
    quantized = [name.format(kind=kind) for name in component.quantized_files] if kind else []
    return [*quantized, *component.official_files]


def looks_like_t5(name: str) -> bool:
    if not name.endswith((".pth", ".pt", ".safetensors")):
        return False
    return (name.startswith("models_t5_") and name.endswith(".pth")) or "umt5" in name.lower()


def find_t5(component: Component, directory: Path, kind: str | None) -> tuple[list[Path], str]:
    """A release name at the top level or one folder down, else files that look like umT5, else a diffusers
    ``text_encoder/``."""
    files = files_near(directory)
    for name in release_names(component, kind):
        if official := [f for f in files if f.name == name]:
            return official, ""
    candidates = [f for f in files if looks_like_t5(f.name)]
    candidates = candidates or [directory / f for f in DIFFUSERS_T5_FILES if (directory / f).is_file()][:1]
    return candidates, (f"{component.official_files[0]}, models_t5_*.pth and *umt5*.pth/.safetensors at the top "
                        "level and one folder down, and a diffusers text_encoder/ folder")


def find_clip(component: Component, directory: Path, kind: str | None) -> tuple[list[Path], str]:
    """A release name here or in ``image_encoder/``, else one other CLIP-looking checkpoint."""
    for name in release_names(component, kind):
        for folder in (directory, directory / CLIP_FOLDER):
            if (folder / name).is_file():
                return [folder / name], ""
    candidates = [f for f in checkpoint_files(directory) if "clip" in f.name.lower()]
    candidates += checkpoint_files(directory / CLIP_FOLDER)
    return candidates, f"{component.official_files[0]} or one other *clip* checkpoint here or in {CLIP_FOLDER}/"


def diffusers_weights(folder: Path) -> Path | None:
    return next((folder / n for n in DIFFUSERS_WEIGHT_NAMES if (folder / n).is_file()), None)


def is_diffusers_vae_folder(folder: Path) -> bool:
    """A folder whose config.json names ``AutoencoderKLWan`` (a diffusers ``vae/`` folder passed directly)."""
    try:
        return json.loads((folder / "config.json").read_text()).get("_class_name") == DIFFUSERS_VAE_CLASS
    except (OSError, ValueError, AttributeError):
        return False


def find_vae(component: Component, directory: Path, kind: str | None) -> tuple[list[Path], str]:
    """Every official file, a diffusers ``vae/`` folder, and the directory itself when it is a diffusers VAE
    folder: exactly one must be there."""
    candidates = [directory / n for n in component.official_files if (directory / n).is_file()]
    if weights := diffusers_weights(directory / "vae"):
        candidates.append(weights)
    if is_diffusers_vae_folder(directory) and (weights := diffusers_weights(directory)):
        candidates.append(weights)
    return candidates, (f"{' and '.join(component.official_files)}, and a diffusers vae/ folder holding "
                        f"{DIFFUSERS_WEIGHT_NAMES[1]}")


def find_tokenizer(component: Component, directory: Path, kind: str | None) -> tuple[list[Path], str]:
    """``google/umt5-xxl/`` (official), ``tokenizer/`` (diffusers), or the folder itself: the first that holds
    tokenizer files."""
    for candidate in (directory / sub for sub in TOKENIZER_FOLDERS):
        if candidate.is_dir() and any((candidate / f).is_file() for f in TOKENIZER_FILES):
            return [candidate], ""
    return [], f"google/umt5-xxl/ and tokenizer/ holding {' or '.join(TOKENIZER_FILES)}"


# How each component is found in a model folder: (candidates, what was looked for when there are none).
FINDERS = {"t5": find_t5, "clip": find_clip, "vae": find_vae, "tokenizer": find_tokenizer}


def find_in_folder(name: str, directory: Path, kind: str | None = None) -> Path:
    """The one checkpoint of component ``name`` in a model folder; none or several is an error naming the key
    that chooses (``kind``: prefer LightX2V's 8-bit file of that kind)."""
    component = COMPONENTS[name]
    candidates, looked_for = FINDERS[name](component, directory, kind)
    note = f" {component.needed_by}" if component.needed_by else ""
    return one_candidate(directory, candidates, component.what, looked_for, component.file_keys[0], note)


def resolve_component(name: str, model_path: str | Path, sources: Sources = Sources()) -> Found:
    """The checkpoint of ``t5``, ``tokenizer``, ``clip`` or ``vae``: a config key that names it, else the model
    folder (the folder of a single DiT file)."""
    named = sources.named(name, COMPONENTS[name].file_keys)
    if named:
        return Found(*named)
    directory = model_folder(model_path, sources)
    if directory.is_file():
        directory = directory.parent  # a single DiT file: its companions lie beside it
    # LightX2V's 8-bit file names carry the scheme's kind: models_t5_umt5-xxl-enc-fp8.pth
    quant = sources.quant(name)
    kind = scheme_kind(quant.scheme, name) if quant.quantized else None
    return Found(find_in_folder(name, directory, kind), f"found in {directory}")
