"""One settings object per run, resolved before anything loads.

``resolve_settings`` turns the command line's flags, a ``--config_json`` file and Python keyword arguments into a
frozen ``Settings``: every key under today's LightX2V name (aliases, renamed and deprecated keys mapped, unknown
keys warned about with the closest known key and the file that holds them), the load-time sections typed and
checked (``sources`` with each component's quantization, ``lora``, ``offload``, ``attention``, ``parallel``), and
each value's origin ("flag --model_path", "config key vae_path in my.json"). No file but the config file is read.

Values that depend on the model (the defaults of its class and task, its own ``config.json``) come in a second,
explicit step once the weights' headers have said what the model is: ``settings.for_model(model_cls, task,
model_config)`` adds the ``sampling`` and ``output`` sections and checks every value. ``settings.for_request(...)``
puts the per-request overrides of ``Pipeline.generate`` on top through the same normaliser.

Precedence, lowest first (docs/config.md): the official defaults of the model class and task < the model's
``config.json`` (its sampling keys) < ``--config_json`` < flags / keywords < per-request overrides. A ``None`` (JSON
``null``) never overrides anything. Tables and value checks are in ``x2v.pipelines.config``.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from x2v.errors import ConfigError
from x2v.formats import jsonc
from x2v.formats.quant import GGUF_SCHEMES, LEGACY_SCHEMES, UNSUPPORTED_SCHEMES, scheme_families
from x2v.loading.components import COMPONENTS, FILE_KEYS
from x2v.loading.lora import LoraEntry
from x2v.loading.resolve import Quantization, Sources
from x2v.ops.attention import KERNELS, NOT_IMPLEMENTED, TORCH_SDPA
from x2v.pipelines import config as tables
from x2v.pipelines.config import (
    ALIASES, IGNORED_KEYS, LOAD_KEYS, RENAMED, SAMPLING_KEYS, SCHEDULER_TYPES, check_task, default_negative_prompt,
    defaults, guide_scales, is_known, model_class, raise_problems, scheduler_solver, suggest, validate,
)
from x2v.ops.sequence_parallel import KINDS as SEQUENCE_PARALLEL_KINDS
from x2v.runtime.offload import GRANULARITIES, OffloadConfig
from x2v.runtime.parallel import ParallelConfig

# Levels, lowest precedence first.
DEFAULT, MODEL_CONFIG, CONFIG_FILE, EXPLICIT, REQUEST = range(5)
ATTENTION_KEYS = ("self_attn_1_type", "cross_attn_1_type", "cross_attn_2_type")  # LightX2V's, in set_attention order
ATTENTION_TYPES = (TORCH_SDPA, *KERNELS, *NOT_IMPLEMENTED)


@dataclass(frozen=True)
class Layer:
    """The settings of one level, under today's names, with how the user spelled each key (an alias, an old name)."""

    level: int
    label: str  # how warnings name the level: "config file my.json", "command line", "keyword arguments"
    values: Mapping[str, Any]
    spelled: Mapping[str, str] = field(default_factory=dict)
    where: Callable[[str], str] = lambda key: key  # a key's origin, e.g. "flag --infer_steps"

    def origin(self, key: str) -> str:
        return self.where(self.spelled.get(key, key))


@dataclass(frozen=True)
class LoraSettings:
    entries: tuple[LoraEntry, ...] = ()
    dynamic: bool = False  # lora_dynamic_apply: low-rank branches at run time instead of merged weights
    strict: bool = False  # lora_strict: a LoRA key that changes nothing is an error


@dataclass(frozen=True)
class AttentionSettings:
    self_attn: str = TORCH_SDPA
    cross_attn: str = TORCH_SDPA
    image_attn: str = TORCH_SDPA  # cross_attn_2_type: the CLIP-image attention of Wan2.1 I2V / FLF2V
    compile: bool = False  # use_compile

    @property
    def types(self) -> tuple[str, str, str]:
        return self.self_attn, self.cross_attn, self.image_attn


@dataclass(frozen=True)
class SamplingSettings:
    solver: str  # "unipc", "dpm++" or "distill"
    steps: int
    shift: float
    guide_scales: Mapping[str, float]  # {"high": ..., "low": ...}: per Wan2.2 expert, the same for one DiT
    cfg: bool
    denoising_steps: tuple[int, ...] | None  # the distill sampler's timesteps
    boundary: float | None  # Wan2.2 A14B: high-noise expert while t >= boundary * 1000
    boundary_step: int | None  # Wan2.2 A14B distilled: steps before it use the high-noise expert
    seed: int  # negative: random
    noise_device: str  # "device" or a torch device for the initial noise
    negative_prompt: str


@dataclass(frozen=True)
class OutputSettings:
    frames: int
    height: int  # for image-to-video the area height x width, the aspect ratio follows the image
    width: int
    fps: int | float
    save_path: Path | None
    tiled_vae: bool  # use_tiling_vae


@dataclass(frozen=True)
class Settings:
    """Everything one run is set to, frozen. ``values`` holds every key by its LightX2V name, ``origins`` where
    each came from; the typed sections are what the loaders, the offload machinery and the pipeline read."""

    values: Mapping[str, Any]
    origins: Mapping[str, str]
    layers: tuple[Layer, ...]  # the user's levels (resolve_settings) and, per request, the request's
    warnings: tuple[str, ...]
    model_cls: str | None
    task: str | None
    model_path: Path | None
    sources: Sources
    lora: LoraSettings
    offload: OffloadConfig
    attention: AttentionSettings
    parallel: ParallelConfig
    sampling: SamplingSettings | None = None  # with the model (for_model)
    output: OutputSettings | None = None
    model_layers: tuple[Layer, ...] = ()  # the model's levels (defaults, its config.json), with the model

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    def origin(self, key: str) -> str:
        return self.origins.get(key, "default")

    def with_fallback(self, values: Mapping[str, Any], origin: str) -> Settings:
        """These user settings with ``values`` below every level (a command's own defaults, e.g. the demo model's
        folder), said to come from ``origin``; the levels already read are reused, not read again."""
        fallback = Layer(DEFAULT, origin, MappingProxyType(dict(values)), where=lambda key: origin)
        return replace(_user_settings([fallback, *self.layers], []), warnings=self.warnings)

    def for_model(self, model_cls: str, task: str, model_config: dict | None = None,
                  model_config_path: str | Path | None = None) -> Settings:
        """These settings on top of the model's: the defaults of ``model_cls`` / ``task`` and the sampling keys of
        its ``config.json``. Every value is checked; ``ConfigError`` names the key, where it was set and the fix."""
        described = f"{model_config_path} (the model's config.json)" if model_config_path else "the model's config.json"
        model_layer = normalize(model_config, MODEL_CONFIG, described, lambda key: f"{key} in {described}", quiet=True)
        model_layer = replace(model_layer, values=MappingProxyType(
            {k: v for k, v in model_layer.values.items() if k in SAMPLING_KEYS}))
        default = Layer(DEFAULT, "default", MappingProxyType(defaults(model_cls, task)),
                        where=lambda key: f"default for {model_cls} {task}")
        return _complete(self, model_cls, task, (default, model_layer))

    def for_request(self, overrides: Mapping[str, Any]) -> Settings:
        """Per-request overrides (``generate(infer_steps=..., num_frames=...)``) on top, normalised and checked as
        a config file is: aliases read, unknown keys warned about, invalid values refused. Settings fixed at load
        (files, quantization, offload, attention, LoRAs) are refused: they need a new pipeline."""
        if self.sampling is None:
            raise ValueError("for_request needs settings completed for a model (for_model)")
        warnings: list[str] = []
        request = normalize(overrides, REQUEST, "generate()", lambda key: f"generate({key}=...)", quiet_aliases=True,
                            warnings=warnings)
        fixed = sorted(key for key in request.values if key in LOAD_KEYS)
        if fixed:
            raise ConfigError(f"generate(): {', '.join(fixed)} cannot change per request (set when the pipeline "
                              "loads); load the pipeline with the new value instead")
        user = replace(self, layers=(*[layer for layer in self.layers if layer.level < REQUEST], request),
                       warnings=tuple(warnings))
        return _complete(user, self.model_cls, self.task, self.model_layers)

    def describe(self) -> str:
        """One ``key: value  [origin]`` line per setting, for logs (docs/pitfalls.md F01)."""
        return "\n".join(f"{key}: {json.dumps(value, ensure_ascii=False, default=str)}  [{self.origin(key)}]"
                         for key, value in self.values.items())


# ---------------------------------------------------------------------------------------------------------------
# Normalising one level


def _legacy_quant(mm_config: Any, layer: dict, label: str, warnings: list[str]) -> dict[str, Any]:
    """``mm_config: {"mm_type": ...}`` (LightX2V before Oct 2025) -> ``dit_quantized`` + ``dit_quant_scheme``."""
    mm_type = mm_config.get("mm_type") if isinstance(mm_config, dict) else None
    if not isinstance(mm_type, str):
        warnings.append(f"{label}: deprecated config key 'mm_config' without a 'mm_type' string is ignored; "
                        f"set dit_quantized and dit_quant_scheme instead")
        return {}
    if layer.get("dit_quant_scheme") is not None:
        warnings.append(f"{label}: deprecated 'mm_config.mm_type' ignored: dit_quant_scheme is set")
        return {}
    scheme = "Default" if mm_type == "Default" else LEGACY_SCHEMES.get(mm_type)
    if scheme is None:
        warnings.append(f"{label}: deprecated 'mm_config.mm_type' {mm_type!r} has no dit_quant_scheme "
                        f"equivalent x2v knows; it is ignored. Set dit_quantized and dit_quant_scheme instead")
        return {}
    warnings.append(f"{label}: deprecated 'mm_config.mm_type' {mm_type!r} read as dit_quantized "
                    f"{str(scheme != 'Default').lower()}, dit_quant_scheme '{scheme}'; write those keys instead")
    return {"dit_quantized": scheme != "Default", "dit_quant_scheme": scheme}


def normalize(raw: Mapping[str, Any] | None, level: int, label: str, where: Callable[[str], str], *,
              quiet: bool = False, quiet_aliases: bool = False, warnings: list[str] | None = None) -> Layer:
    """One level's keys under today's names, ``None`` values dropped; renamed / unknown keys reported into
    ``warnings`` (unless ``quiet``: a model's own file, which the user cannot fix)."""
    found: list[str] = []
    values: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for key, value in (raw or {}).items():
        if value is None:
            continue
        if key == "mm_config":
            legacy = _legacy_quant(value, raw, label, found)
            values.update(legacy)
            spelled.update(dict.fromkeys(legacy, "mm_config"))
            continue
        new = RENAMED[key][0] if key in RENAMED else ALIASES.get(key, key)
        if new != key:
            if raw.get(new) is not None:
                found.append(f"{label}: both '{key}' and '{new}' are set; '{key}' is ignored")
                continue
            if key in RENAMED:
                found.append(f"{label}: deprecated config key '{key}' read as '{new}' ({RENAMED[key][1]})")
            elif not quiet_aliases:
                found.append(f"{label}: config key '{key}' read as '{new}' (LightX2V's name)")
            spelled[new] = key
        elif not is_known(key):
            hint = suggest(key, [*tables.KNOWN_KEYS, *RENAMED, *ALIASES]) or " (ignored)"
            found.append(f"{label}: unknown config key '{key}'{hint}")
            continue
        values[new] = copy.deepcopy(value)
    if warnings is not None and not quiet:
        warnings.extend(found)
    return Layer(level, label, MappingProxyType(values), MappingProxyType(spelled), where)


def config_file_layer(config_json: str | Path | Mapping | None, warnings: list[str]) -> Layer | None:
    """The ``--config_json`` level: a file (JSON with comments) or a dict already read."""
    if config_json is None:
        return None
    if isinstance(config_json, Mapping):
        return normalize(config_json, CONFIG_FILE, "config", lambda key: f"config key {key}", warnings=warnings)
    path = Path(config_json).expanduser()
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found (set by --config_json / config_json=). Check the path.")
    raw = jsonc.load(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config file holds one JSON object ({{\"key\": value, ...}}), got "
                          f"{type(raw).__name__}")
    return normalize(raw, CONFIG_FILE, f"config file {path}", lambda key: f"config key {key} in {path}",
                     warnings=warnings)


# ---------------------------------------------------------------------------------------------------------------
# Merging levels


def merge(layers: list[Layer]) -> tuple[dict[str, Any], dict[str, str], dict[str, int]]:
    """``(values, origins, levels)``: each key from the highest level that sets it."""
    values, origins, levels = {}, {}, {}
    for layer in sorted(layers, key=lambda item: item.level):  # stable: later layers of a level win
        for key, value in layer.values.items():
            values[key], origins[key], levels[key] = value, layer.origin(key), layer.level
    return values, origins, levels


def pick(name: str, layers: list[Layer], warnings: list[str] | None) -> str | None:
    """``model_cls`` / ``task``: the highest level that sets it; a lower level that says otherwise is reported when
    ``warnings`` is a list."""
    chosen, origin = None, ""
    for layer in sorted(layers, key=lambda item: item.level, reverse=True):
        value = layer.values.get(name)
        if value is None:
            continue
        if chosen is None:
            chosen, origin = value, layer.origin(name)
        elif value != chosen and warnings is not None:
            warnings.append(f"{layer.label}: {name} '{value}' is ignored; '{chosen}' ({origin}) wins")
    return chosen


# ---------------------------------------------------------------------------------------------------------------
# Typed sections


def _flag(values: Mapping, origins: Mapping, key: str, default: bool | None, problems: list[str]) -> bool | None:
    value = values.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        problems.append(f"{key} must be true or false, got {value!r} ({origins[key]})")
    return bool(value)


def _sources(values: Mapping, origins: Mapping, moe: bool, problems: list[str]) -> Sources:
    files = {}
    for key in FILE_KEYS:
        value = values.get(key)
        if value is None:
            continue
        if not isinstance(value, (str, Path)) or not str(value):
            problems.append(f"{key} must be a path, got {value!r} ({origins[key]})")
            continue
        files[key] = Path(value).expanduser()
    quantization = {}
    for component in (c.name for c in COMPONENTS.values() if c.quantizable):
        flag, scheme_key = f"{component}_quantized", f"{component}_quant_scheme"
        quantized = _flag(values, origins, flag, None, problems)
        scheme = values.get(scheme_key)
        known = [*scheme_families(component), *UNSUPPORTED_SCHEMES, *LEGACY_SCHEMES, *GGUF_SCHEMES]
        if scheme is not None and scheme not in known:
            problems.append(f"{scheme_key} {scheme!r} is unknown{suggest(str(scheme), known)} ({origins[scheme_key]});"
                            f" use one of {', '.join(scheme_families(component))}")
        quantization[component] = Quantization(quantized, scheme)
    return Sources(files=MappingProxyType(files), quantization=MappingProxyType(quantization), two_experts=moe,
                   origins=MappingProxyType(dict(origins)))


def _lora(values: Mapping, origins: Mapping, problems: list[str]) -> LoraSettings:
    entries = values.get("lora_configs") or []
    found = tables.lora_config_problems(entries, moe=False)  # the Wan2.2 names are checked with the model
    problems += [f"{problem} ({origins['lora_configs']})" for problem in found]
    return LoraSettings(() if found else tuple(map(LoraEntry.from_config, entries)),
                        _flag(values, origins, "lora_dynamic_apply", False, problems),
                        _flag(values, origins, "lora_strict", False, problems))


def _offload(values: Mapping, origins: Mapping, problems: list[str]) -> OffloadConfig:
    """LightX2V's offload keys, with the combinations x2v cannot run refused (docs/config.md)."""
    cpu = _flag(values, origins, "cpu_offload", False, problems)
    granularity = values.get("offload_granularity") or "block"
    if granularity not in GRANULARITIES:
        problems.append(f"offload_granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r} "
                        f"({origins['offload_granularity']})")
    lazy = _flag(values, origins, "lazy_load", False, problems)
    workers = values.get("num_disk_workers", 4)
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        problems.append(f"num_disk_workers must be a positive integer (threads reading blocks), got {workers!r} "
                        f"({origins['num_disk_workers']})")
    if lazy and not cpu:
        problems.append("lazy_load needs cpu_offload: true (blocks stream from the file to the device)")
    if lazy and granularity == "model":
        problems.append('lazy_load streams blocks: offload_granularity must be "block" or "phase", not "model"')
    if lazy and values.get("lora_configs") and not values.get("lora_dynamic_apply"):
        problems.append("lazy_load reads the blocks from the checkpoint as they run, so LoRAs cannot be merged "
                        "into them: set lora_dynamic_apply true (the LoRA runs as a low-rank branch), or turn "
                        "lazy_load off")
    if cpu and granularity != "model" and values.get("use_compile"):
        problems.append("use_compile is not supported with cpu_offload block / phase yet (the blocks' weights "
                        'and hooks change every call); set offload_granularity "model" or turn use_compile off')
    return OffloadConfig(cpu, granularity, lazy, workers, _flag(values, origins, "t5_cpu_offload", cpu, problems),
                         _flag(values, origins, "clip_cpu_offload", cpu, problems),
                         _flag(values, origins, "vae_cpu_offload", cpu, problems))


def _attention(values: Mapping, origins: Mapping, problems: list[str]) -> AttentionSettings:
    types = []
    for key in ATTENTION_KEYS:
        value = values.get(key) or TORCH_SDPA
        if value not in ATTENTION_TYPES:
            problems.append(f"{key} {value!r} is not an attention type{suggest(str(value), ATTENTION_TYPES)} "
                            f"({origins[key]}); x2v runs {TORCH_SDPA}, {', '.join(KERNELS)} and LightX2V's others "
                            "as torch SDPA")
            value = TORCH_SDPA
        types.append(value)
    return AttentionSettings(*types, compile=_flag(values, origins, "use_compile", False, problems))


# The parallel block's keys: ParallelConfig field -> LightX2V key (the defaults are ParallelConfig's).
PARALLEL_KEYS = {"seq_size": "seq_p_size", "seq_attention": "seq_p_attn_type", "cfg_size": "cfg_p_size",
                 "vae_parallel": "vae_parallel", "fsdp": "fsdp", "timeout_s": "timeout_s"}
# LightX2V's other parallel keys: key -> (does this value ask for something?, why x2v does not act on it).
PARALLEL_IGNORED = {
    "tensor_p_size": (lambda v: v != 1, "tensor parallelism is not implemented; fsdp true shards the DiT's weights"),
    "tp_load_mode": (lambda v: True, "it applies to tensor parallelism, which x2v does not implement"),
    "seq_p_fp8_comm": (bool, "the tokens are exchanged in the compute dtype (exact); fp8 exchange is not implemented"),
}


def _parallel(values: Mapping, origins: Mapping, problems: list[str], warnings: list[str]) -> ParallelConfig:
    """LightX2V's ``parallel`` block (x2v adds ``fsdp`` and ``timeout_s``); the job's size is checked at launch."""
    block = values.get("parallel")
    if block is None or block is False:
        return ParallelConfig()
    where = origins.get("parallel", "config key parallel")
    if not isinstance(block, Mapping):
        problems.append(f"parallel must be an object like {{\"seq_p_size\": 4, \"seq_p_attn_type\": \"ulysses\", "
                        f"\"cfg_p_size\": 2}}, got {block!r} ({where})")
        return ParallelConfig()
    known = set(PARALLEL_KEYS.values())
    for key, value in block.items():
        if key in PARALLEL_IGNORED and PARALLEL_IGNORED[key][0](value):
            warnings.append(f"parallel.{key} = {json.dumps(value)} is ignored: {PARALLEL_IGNORED[key][1]} ({where})")
        elif key not in known and key not in PARALLEL_IGNORED:
            warnings.append(f"unknown key parallel.{key}{suggest(key, [*known]) or ' (ignored)'} ({where})")
    defaults = ParallelConfig()
    fields = {name: block.get(key, getattr(defaults, name)) for name, key in PARALLEL_KEYS.items()}
    for name in ("seq_size", "cfg_size"):
        value = fields[name]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            problems.append(f"parallel.{PARALLEL_KEYS[name]} must be a positive integer, got {value!r} ({where})")
            fields[name] = 1
    if fields["cfg_size"] > 2:
        problems.append(f"parallel.cfg_p_size must be 1 or 2 (the conditional and unconditional passes), got "
                        f"{fields['cfg_size']} ({where}); give the other ranks to seq_p_size")
        fields["cfg_size"] = 1
    if fields["seq_attention"] not in SEQUENCE_PARALLEL_KINDS:
        problems.append(f"parallel.seq_p_attn_type must be one of {', '.join(SEQUENCE_PARALLEL_KINDS)}, got "
                        f"{fields['seq_attention']!r} ({where})")
    for name in ("vae_parallel", "fsdp"):
        if not isinstance(fields[name], bool):
            problems.append(f"parallel.{name} must be true or false, got {fields[name]!r} ({where})")
    timeout = fields["timeout_s"]
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0:
        problems.append(f"parallel.timeout_s must be a positive number of seconds, got {timeout!r} ({where})")
        fields["timeout_s"] = defaults.timeout_s
    if fields["fsdp"] is True and values.get("cpu_offload"):
        problems.append("parallel.fsdp shards the DiT's weights over the GPUs; cpu_offload moves them to the host: "
                        "use one of them")
    return ParallelConfig(**fields)


def _sampling(values: Mapping, moe: bool) -> SamplingSettings:
    distill = values["sample_solver"] == "distill"
    steps = values.get("denoising_step_list")
    return SamplingSettings(
        solver=values["sample_solver"], steps=int(values["infer_steps"]), shift=float(values["sample_shift"]),
        guide_scales=MappingProxyType(guide_scales(values, moe)), cfg=values.get("enable_cfg") is not False,
        denoising_steps=tuple(steps) if distill and steps else None,
        boundary=float(values["boundary"]) if moe and not distill else None,
        boundary_step=int(values["boundary_step_index"]) if moe and distill else None,
        seed=int(values["seed"]), noise_device=values["noise_device"], negative_prompt=values["negative_prompt"])


def _output(values: Mapping) -> OutputSettings:
    path = values.get("save_result_path")
    return OutputSettings(int(values["target_video_length"]), int(values["target_height"]),
                          int(values["target_width"]), values["fps"], Path(path) if path else None,
                          bool(values.get("use_tiling_vae")))


# ---------------------------------------------------------------------------------------------------------------
# The two steps


def resolve_settings(*, flags: Mapping[str, Any] | None = None, config_json: str | Path | Mapping | None = None,
                     keywords: Mapping[str, Any] | None = None) -> Settings:
    """Step one, before any weight is read: the user's levels merged, normalised and the load-time sections checked.

    ``flags``: the command line's (argparse dests, LightX2V's names); ``config_json``: a config file path or dict;
    ``keywords``: Python keyword arguments. ``model_cls`` / ``task`` may come from any of them or stay None (the
    weights say them). Raises ``ConfigError`` (every problem at once) or ``UnsupportedModelError``.
    """
    warnings: list[str] = []
    layers = [layer for layer in (
        config_file_layer(config_json, warnings),
        normalize(flags, EXPLICIT, "command line", lambda key: f"flag --{key}", quiet_aliases=True,
                  warnings=warnings) if flags else None,
        normalize(keywords, EXPLICIT, "keyword arguments", lambda key: f"keyword {key}=", quiet_aliases=True,
                  warnings=warnings) if keywords else None,
    ) if layer is not None]
    return _user_settings(layers, warnings)


def _user_settings(layers: list[Layer], warnings: list[str]) -> Settings:
    # A config written for another model class is likely a mistake; another task with the same file is routine.
    model_cls = pick("model_cls", layers, warnings)
    task = pick("task", layers, None)
    info = model_class(model_cls) if model_cls is not None else None
    if info is not None and task is not None:
        check_task(model_cls, task)
    values, origins, _ = merge(layers)
    problems: list[str] = []
    model_path = values.get("model_path")
    if model_path is not None and not isinstance(model_path, (str, Path)):
        problems.append(f"model_path must be a path, got {model_path!r} ({origins['model_path']})")
        model_path = None
    moe = bool(info and info.moe)
    parallel = _parallel(values, origins, problems, warnings)
    settings = Settings(
        values=MappingProxyType(values), origins=MappingProxyType(origins), layers=tuple(layers),
        warnings=tuple(warnings), model_cls=model_cls, task=task,
        model_path=Path(model_path).expanduser() if model_path is not None else None,
        sources=_sources(values, origins, moe, problems), lora=_lora(values, origins, problems),
        offload=_offload(values, origins, problems), attention=_attention(values, origins, problems),
        parallel=parallel,
    )
    raise_problems(problems)
    if model_cls is not None:  # everything else can be checked now too
        settings.for_model(model_cls, task or info.tasks[0])
    return settings


def _derive(values: dict[str, Any], origins: dict[str, str], levels: dict[str, int]) -> None:
    """Values that follow from others, each only if not set above its source's level (docs/config.md)."""

    def level(key: str) -> int:
        return levels.get(key, DEFAULT)

    if not values.get("negative_prompt"):  # official: an empty negative prompt means the default one
        values["negative_prompt"] = default_negative_prompt(values["model_cls"], values["task"])
        origins["negative_prompt"], levels["negative_prompt"] = "default", DEFAULT
    solver = scheduler_solver(values.get("scheduler_type"))
    if solver is not None and level("scheduler_type") > level("sample_solver"):
        values["sample_solver"] = solver
        origins["sample_solver"] = "derived from scheduler_type"
    steps = values.get("denoising_step_list")
    if values["sample_solver"] == "distill" and isinstance(steps, list) and level("denoising_step_list") > level(
            "infer_steps"):
        values["infer_steps"] = len(steps)
        origins["infer_steps"] = "derived from denoising_step_list"
    if (values["model_cls"], values["task"]) == ("wan2.1", "i2v") and level("sample_shift") == DEFAULT:
        size = (values.get("target_height"), values.get("target_width"))
        values["sample_shift"] = 3.0 if size in tables.WAN21_I2V_480P_SIZES else 5.0


def _complete(user: Settings, model_cls: str, task: str, model_layers: tuple[Layer, ...]) -> Settings:
    """``user``'s levels on the model's (``model_layers``); derived values, warnings, every check, typed sections."""
    info = model_class(model_cls)
    check_task(model_cls, task)
    warnings = list(user.warnings)
    values, origins, levels = merge([*model_layers, *user.layers])
    values.update(model_cls=model_cls, task=task)
    origins.setdefault("model_cls", "detected from the weights")
    origins.setdefault("task", "detected from the weights")
    _derive(values, origins, levels)

    for layer in user.layers:
        for key, value in layer.values.items():
            if key in IGNORED_KEYS and IGNORED_KEYS[key][0](value):
                warnings.append(f"{layer.label}: config key '{key}' = {json.dumps(value)} is ignored: "
                                f"{IGNORED_KEYS[key][1]}")
        if "boundary" in layer.values and not info.moe:
            warnings.append(f"{layer.label}: 'boundary' only applies to Wan2.2 A14B (wan2.2_moe); ignored for "
                            f"{model_cls}")
        if "boundary_step_index" in layer.values and not info.moe:
            warnings.append(f"{layer.label}: 'boundary_step_index' only applies to wan2.2_moe_distill; ignored for "
                            f"{model_cls}")
    scheduler_type = values.get("scheduler_type")
    if scheduler_type is not None and scheduler_solver(scheduler_type) is None:
        warnings.append(f"scheduler_type {json.dumps(scheduler_type)} ({origins['scheduler_type']}) is not one x2v "
                        f"knows ({', '.join(SCHEDULER_TYPES)}); ignored, sample_solver is "
                        f"'{values['sample_solver']}'")
    if values["sample_solver"] != "distill" and levels.get("denoising_step_list", DEFAULT) != DEFAULT:
        warnings.append(f"denoising_step_list ({origins['denoising_step_list']}) only applies to the distill "
                        f"sampler; ignored with sample_solver '{values['sample_solver']}'")
        del values["denoising_step_list"]  # so no caller hands it to a base sampler
    if values["sample_solver"] == "distill" and values.get("enable_cfg") is True:
        warnings.append("enable_cfg is true with the distill sampler: distilled weights are made for one pass per "
                        "step without CFG (set enable_cfg false unless the LoRA / model says otherwise)")
    validate(values, origins)
    sampling = _sampling(values, info.moe)
    if user.parallel.cfg_size == 2 and not sampling.cfg:
        raise ConfigError(f"parallel.cfg_p_size 2 runs the conditional and unconditional passes on different ranks, "
                          f"but CFG is off for {model_cls} (enable_cfg false, {origins.get('enable_cfg', 'default')}): "
                          "set cfg_p_size 1 and give the ranks to seq_p_size, or enable_cfg true")
    return replace(
        user, values=MappingProxyType(values), origins=MappingProxyType(origins), warnings=tuple(warnings),
        model_cls=model_cls, task=task, sources=replace(user.sources, two_experts=info.moe),
        sampling=sampling, output=_output(values), model_layers=model_layers,
    )
