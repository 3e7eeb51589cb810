"""LightX2V's configuration keys as tables and pure checks: model classes and tasks, the official defaults per
class and task, the keys x2v knows (and those it reads but ignores), old names and aliases, and the value checks.
``x2v.pipelines.settings`` resolves the levels into one ``Settings`` with these; docs/config.md describes both.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import numbers
import os
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

from x2v.errors import ConfigError, UnsupportedModelError
from x2v.formats.metadata import EXPERTS
from x2v.loading.lora import number_problems as lora_number_problems


# ---------------------------------------------------------------------------------------------------------------
# Model classes and tasks


@dataclass(frozen=True)
class ModelClass:
    """What a LightX2V ``model_cls`` value means for x2v."""

    name: str
    description: str
    tasks: tuple[str, ...]  # the first one is the default task
    moe: bool = False  # two experts (high_noise_model / low_noise_model)
    distill: bool = False  # 4-step distilled weights: distill sampler, no CFG
    size_multiple: int = 16  # target_height / target_width granularity = VAE spatial stride x patch size 2


MODEL_CLASSES: dict[str, ModelClass] = {
    m.name: m
    for m in (
        ModelClass("wan2.1", "Wan2.1 T2V-1.3B / T2V-14B / I2V-14B / FLF2V-14B", ("t2v", "i2v", "flf2v")),
        ModelClass("wan2.1_distill", "Wan2.1 4-step distilled T2V / I2V (LightX2V)", ("t2v", "i2v"), distill=True),
        ModelClass("wan2.1_vace", "Wan2.1 VACE-1.3B / VACE-14B", ("vace",)),
        ModelClass("wan2.2_moe", "Wan2.2 T2V-A14B / I2V-A14B (two experts)", ("t2v", "i2v"), moe=True),
        ModelClass("wan2.2_moe_distill", "Wan2.2 A14B 4-step distilled (LightX2V)", ("t2v", "i2v"), moe=True,
                   distill=True),
        # Wan2.2 VAE: spatial stride 16, so sizes are multiples of 32 (docs/models.md, Latent shapes).
        ModelClass("wan2.2", "Wan2.2 TI2V-5B", ("t2v", "i2v"), size_multiple=32),
    )
}

# LightX2V model_cls values x2v recognizes but cannot run (docs/config.md, Model classes and tasks).
UNSUPPORTED_MODEL_CLASSES: dict[str, str] = {
    "wan2.1_mean_flow_distill": "Wan2.1 mean-flow distilled",
    "wan2.1_sf": "Wan2.1 self-forcing (autoregressive)",
    "wan2.2_moe_vace": "Wan2.2 A14B VACE",
    "wan2.2_animate": "Wan2.2-Animate-14B",
    "wan2.2_s2v": "Wan2.2-S2V-14B (speech to video)",
    "wan2.2_audio": "Wan2.2 audio-driven",
    "wan2.2_moe_audio": "Wan2.2 A14B audio-driven",
}

TASKS: dict[str, str] = {
    "t2v": "text to video",
    "i2v": "image to video",
    "flf2v": "first and last frame to video",
    "vace": "video editing / control (VACE)",
}
UNSUPPORTED_TASKS: dict[str, str] = {
    "t2i": "text to image (Wan2.1 t2i-14B)",
    "animate": "character animation (Wan2.2-Animate)",
    "s2v": "speech to video (Wan2.2-S2V)",
}



def suggest(word: str, candidates) -> str:
    close = difflib.get_close_matches(word, sorted(candidates), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def model_class(model_cls: str) -> ModelClass:
    """The ``ModelClass`` of a LightX2V ``model_cls``; an error says what is supported otherwise."""
    if model_cls in MODEL_CLASSES:
        return MODEL_CLASSES[model_cls]
    supported = ", ".join(MODEL_CLASSES)
    if model_cls in UNSUPPORTED_MODEL_CLASSES:
        raise UnsupportedModelError(
            f"model_cls '{model_cls}' ({UNSUPPORTED_MODEL_CLASSES[model_cls]}) is recognized but not supported by "
            f"x2v yet. Supported model_cls values: {supported}."
        )
    raise ConfigError(
        f"unknown model_cls {model_cls!r}{suggest(str(model_cls), [*MODEL_CLASSES, *UNSUPPORTED_MODEL_CLASSES])}. "
        f"Supported model_cls values: {supported}."
    )


def check_task(model_cls: str, task: str) -> str:
    """Refuse a task the model class cannot run; returns ``task``."""
    info = model_class(model_cls)
    if task in info.tasks:
        return task
    if task in UNSUPPORTED_TASKS:
        raise UnsupportedModelError(
            f"task '{task}' ({UNSUPPORTED_TASKS[task]}) is recognized but not supported by x2v yet. "
            f"Tasks of model_cls '{model_cls}': {', '.join(info.tasks)}."
        )
    if task in TASKS:
        raise ConfigError(
            f"task '{task}' is not available for model_cls '{model_cls}' ({info.description}); "
            f"its tasks: {', '.join(info.tasks)}."
        )
    raise ConfigError(f"unknown task {task!r}{suggest(str(task), [*TASKS, *UNSUPPORTED_TASKS])}. "
                      f"Tasks of model_cls '{model_cls}': {', '.join(info.tasks)}.")


# ---------------------------------------------------------------------------------------------------------------
# Defaults (docs/config.md, Defaults; docs/sampling.md §5-§9)

# The official `sample_neg_prompt`, used when the negative prompt is empty (verbatim, docs/config.md, Negative prompts).
NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
NEGATIVE_PROMPT_I2V = "镜头晃动，" + NEGATIVE_PROMPT  # Wan2.1 i2v-14B
NEGATIVE_PROMPT_FLF2V = "镜头切换，" + NEGATIVE_PROMPT_I2V  # Wan2.1 flf2v-14B: a copy of the i2v config, prefixed again


def default_negative_prompt(model_cls: str, task: str) -> str:
    """The official default negative prompt: Wan2.1 I2V / FLF2V have prefixes; Wan2.2 (every task) has none."""
    if model_cls.startswith("wan2.1"):
        return {"i2v": NEGATIVE_PROMPT_I2V, "flf2v": NEGATIVE_PROMPT_FLF2V}.get(task, NEGATIVE_PROMPT)
    return NEGATIVE_PROMPT


DISTILL_STEPS = [1000, 750, 500, 250]  # LightX2V's 4-step models (docs/sampling.md §9)

# Shared by every model class unless its entry says otherwise. Where LightX2V's shipped configs differ from the
# official code, x2v takes the official value:
#  * size 480x832 (height x width): the one size every Wan2.1 / Wan2.2 A14B model supports (T2V-1.3B only has
#    480p; the official --size default 1280*720 does not run on it). For I2V it is the max area, the output
#    aspect ratio follows the image (docs/sampling.md §5.1).
#  * enable_cfg true: the official code always runs CFG; LightX2V's get_default_config() says false, but its
#    non-distilled configs all set true.
#  * sample_solver "unipc": the official default (`--sample_solver unipc`); LightX2V's WanScheduler is the same.
#  * seed 42: LightX2V's CLI default, reproducible; the official default -1 draws a random seed.
_COMMON = {
    "target_video_length": 81,
    "target_height": 480,
    "target_width": 832,
    "fps": 16,
    "enable_cfg": True,
    "sample_solver": "unipc",
    "seed": 42,
    # x2v: where the initial noise is drawn. "device" matches the official code (a CUDA generator on a GPU);
    # "cpu" gives the same noise, hence the same video up to rounding, on every device (docs/pitfalls.md E08).
    "noise_device": "device",
}

# LightX2V's distilled configs: 4 steps, shift 5, no CFG (docs/sampling.md §9).
_DISTILL = {
    "infer_steps": len(DISTILL_STEPS),
    "denoising_step_list": DISTILL_STEPS,
    "sample_shift": 5.0,
    "enable_cfg": False,
    "sample_solver": "distill",
}

_DEFAULTS: dict[tuple[str, str], dict[str, Any]] = {
    # LightX2V configs/wan/wan_t2v.json uses guide 6, shift 8; the official values are 5 and 5.
    ("wan2.1", "t2v"): {"infer_steps": 50, "sample_shift": 5.0, "sample_guide_scale": 5.0},
    # Official: 40 steps, guide 5, shift 3.0 at 480p sizes (5.0 otherwise, derived in resolve_settings);
    # LightX2V's wan_i2v.json agrees.
    ("wan2.1", "i2v"): {"infer_steps": 40, "sample_shift": 3.0, "sample_guide_scale": 5.0},
    # The only FLF2V checkpoint is FLF2V-14B-720P, so its 720p size is the default; the official mask hard-codes
    # 81 frames.
    ("wan2.1", "flf2v"): {"infer_steps": 50, "sample_shift": 16.0, "sample_guide_scale": 5.0,
                          "target_height": 720, "target_width": 1280},
    ("wan2.1_vace", "vace"): {"infer_steps": 50, "sample_shift": 16.0, "sample_guide_scale": 5.0},
    # The guide scale is unused without CFG; the base model's value is kept for a user who turns CFG on.
    ("wan2.1_distill", "t2v"): {**_DISTILL, "sample_guide_scale": 5.0},
    ("wan2.1_distill", "i2v"): {**_DISTILL, "sample_guide_scale": 5.0},
    # Guide scales in LightX2V order [high_noise, low_noise]; the official tuple is (low, high) = (3.0, 4.0).
    ("wan2.2_moe", "t2v"): {"infer_steps": 40, "sample_shift": 12.0, "sample_guide_scale": [4.0, 3.0],
                            "boundary": 0.875},
    ("wan2.2_moe", "i2v"): {"infer_steps": 40, "sample_shift": 5.0, "sample_guide_scale": [3.5, 3.5],
                            "boundary": 0.900},
    # Steps 0-1 on the high-noise expert, 2-3 on the low-noise one (docs/sampling.md §9).
    ("wan2.2_moe_distill", "t2v"): {**_DISTILL, "sample_guide_scale": [3.5, 3.5], "boundary_step_index": 2},
    ("wan2.2_moe_distill", "i2v"): {**_DISTILL, "sample_guide_scale": [3.5, 3.5], "boundary_step_index": 2},
    # TI2V-5B: 121 frames at 24 fps, 704x1280 (height x width, official size '1280*704'), for t2v and i2v.
    ("wan2.2", "t2v"): {"infer_steps": 50, "sample_shift": 5.0, "sample_guide_scale": 5.0,
                        "target_video_length": 121, "target_height": 704, "target_width": 1280, "fps": 24},
    ("wan2.2", "i2v"): {"infer_steps": 50, "sample_shift": 5.0, "sample_guide_scale": 5.0,
                        "target_video_length": 121, "target_height": 704, "target_width": 1280, "fps": 24},
}

# Official Wan2.1 I2V rule (generate.py): shift 3.0 for the sizes 832*480 / 480*832, else 5.0.
WAN21_I2V_480P_SIZES = {(480, 832), (832, 480)}


def defaults(model_cls: str, task: str) -> dict[str, Any]:
    """Every sampling default x2v needs for ``model_cls`` / ``task``, with LightX2V key names (a fresh dict)."""
    check_task(model_cls, task)
    settings = {**_COMMON, **copy.deepcopy(_DEFAULTS[model_cls, task])}
    settings["negative_prompt"] = default_negative_prompt(model_cls, task)
    return settings


# ---------------------------------------------------------------------------------------------------------------
# Known keys (docs/config.md, Key groups; docs/formats.md, DiT config.json keys)

KEY_GROUPS: dict[str, tuple[str, ...]] = {
    "x2v": ("noise_device",),
    # CLI flags and per-request inputs of `python -m lightx2v.infer` (docs/config.md, Command line), as argparse dests.
    "run": (
        "model_cls", "task", "model_path", "config_json", "prompt", "negative_prompt", "seed", "image_path",
        "last_frame_path", "src_ref_images", "src_video", "src_mask", "src_pose_path", "src_face_path",
        "src_bg_path", "src_mask_path", "audio_path", "image_strength", "image_frame_idx", "i2i_denoise_strength",
        "state_path", "save_result_path", "use_prompt_enhancer", "warmup", "return_result_tensor", "target_shape",
        "aspect_ratio", "keep_original_aspect", "video_path", "sr_ratio", "support_tasks",
    ),
    "dit source": (
        "dit_original_ckpt", "dit_quantized_ckpt", "dit_quantized", "dit_quant_scheme", "high_noise_original_ckpt",
        "low_noise_original_ckpt", "high_noise_quantized_ckpt", "low_noise_quantized_ckpt", "adapter_model_path",
        "load_from_rank0", "dummy_model",
    ),
    "encoders / vae": (
        "t5_original_ckpt", "t5_quantized", "t5_quantized_ckpt", "t5_quant_scheme", "t5_tokenizer_path",
        "t5_cpu_offload", "t5_lazy_load", "clip_original_ckpt", "clip_quantized", "clip_quantized_ckpt",
        "clip_quant_scheme", "clip_cpu_offload", "use_31_block", "clip_attn_type", "use_image_encoder", "vae_path",
        "vae_name", "vae_type", "vae_dtype", "vae_weight_dtype", "vae_cpu_offload", "use_tiling_vae", "use_tae",
        "tae_path", "use_lightvae", "lightvae_encoder_vae_pth",
    ),
    "lora": ("lora_configs", "lora_dynamic_apply", "lora_strict"),  # lora_strict: x2v's own
    "sampling": (
        "infer_steps", "target_video_length", "target_height", "target_width", "sample_guide_scale", "sample_shift",
        "enable_cfg", "fps", "text_len", "vae_stride", "patch_size", "num_channels_latents", "resize_mode",
        "resolution", "bucket_shape", "fixed_area", "fixed_shape", "boundary", "boundary_step_index",
        "denoising_step_list", "scheduler_type", "enable_dynamic_cfg", "max_area",
        "sample_solver",  # x2v's own (the official generate.py name): "unipc", "dpm++" or "distill"
    ),
    # Per-type "*_setting" dicts of the attention kernels are accepted by suffix (_is_known).
    "attention / kernels": (
        "self_attn_1_type", "cross_attn_1_type", "cross_attn_2_type", "rope_type", "rope_chunk", "rope_chunk_size",
        "rms_norm_type", "layer_norm_type", "use_compile", "use_bfloat16",
    ),
    "caching": (
        "feature_caching", "coefficients", "use_ret_steps", "teacache_thresh", "magcache_calibration", "magcache_K",
        "magcache_thresh", "magcache_retention_ratio", "magcache_ratios",
    ),
    "parallel": ("parallel", "seq_parallel", "cfg_parallel", "tensor_parallel"),
    "offload / memory": (
        "cpu_offload", "offload_granularity", "lazy_load", "num_disk_workers", "unload_modules", "clean_cuda_cache",
        "offload_ratio", "max_memory", "offload_to_disk", "warm_up_cpu_buffers",
    ),
    "misc": (
        "changing_resolution", "resolution_rate", "changing_resolution_steps", "video_frame_interpolation",
        "video_super_resolution", "sub_servers", "do_mm_calib", "lora_dir",
    ),
    # DiT config.json keys (docs/formats.md, DiT config.json keys; diffusers ConfigMixin extras).
    "architecture": (
        "_class_name", "_diffusers_version", "model_type", "dim", "num_layers", "num_heads", "in_dim", "out_dim",
        "ffn_dim", "freq_dim", "text_dim", "eps", "window_size", "qk_norm", "cross_attn_norm", "vace_layers",
        "vace_in_dim", "motion_encoder_dim", "use_img_emb",
    ),
}
KNOWN_KEYS: frozenset[str] = frozenset(k for keys in KEY_GROUPS.values() for k in keys)

# Keys fixed when a pipeline loads: what files, quantization, LoRAs, offload and kernels it runs. A request that
# sets one is refused (the other keys may change per request).
LOAD_KEYS: frozenset[str] = frozenset(
    {"model_cls", "task", "model_path", "config_json"}
    | {k for group in ("dit source", "encoders / vae", "lora", "attention / kernels", "offload / memory", "parallel")
       for k in KEY_GROUPS[group]} - {"use_tiling_vae"}
)

# Keys taken from the model's own config.json (everything else in it is ignored here).
SAMPLING_KEYS: frozenset[str] = frozenset({
    "infer_steps", "target_video_length", "target_height", "target_width", "sample_guide_scale", "sample_shift",
    "enable_cfg", "fps", "boundary", "boundary_step_index", "denoising_step_list", "scheduler_type", "sample_solver",
})

# Old names (docs/pitfalls.md F03): old -> (new, note). Mapped with a warning. `mm_config.mm_type` is handled
# separately.
RENAMED: dict[str, tuple[str, str]] = {
    "save_video_path": ("save_result_path", "LightX2V's name before 2025-09-29"),
    "num_inference_steps": ("infer_steps", "LightX2V reads it only when infer_steps is absent"),
}

# Other spellings of the same settings (LightX2V's Python API / --num_frames flag, the official generate.py).
# Quietly mapped in overrides (Python keyword arguments); mapped with a note in files.
ALIASES: dict[str, str] = {
    "num_frames": "target_video_length",
    "frame_num": "target_video_length",
    "height": "target_height",
    "width": "target_width",
    "guidance_scale": "sample_guide_scale",
    "sample_steps": "infer_steps",
    "sample_neg_prompt": "negative_prompt",
    "base_seed": "seed",
}

SOLVERS = ("unipc", "dpm++", "distill")
# LightX2V `scheduler_type` -> sample_solver.
SCHEDULER_TYPES = {"WanScheduler": "unipc", "WanStepDistillScheduler": "distill"}


def scheduler_solver(scheduler_type: Any) -> str | None:
    """The sample_solver a LightX2V ``scheduler_type`` means; None for a value x2v does not know (of any type)."""
    return SCHEDULER_TYPES.get(scheduler_type) if isinstance(scheduler_type, str) else None


def is_known(key: str) -> bool:
    return key in KNOWN_KEYS or key.endswith("_setting")


def _truthy(value: Any) -> bool:
    return bool(value)


# Keys x2v knows but does not act on: key -> (does this value ask for something?, why it is ignored).
# Delete an entry when the feature lands.
IGNORED_KEYS: dict[str, tuple[Callable[[Any], bool], str]] = {
    **{k: (lambda v: True, "the Wan models do not read it (LightX2V's Wan code ignores it too)")
       for k in ("offload_ratio", "max_memory", "offload_to_disk", "warm_up_cpu_buffers")},
    "unload_modules": (_truthy, "models stay loaded between requests (cpu_offload + lazy_load keep the DiT's "
                                "blocks in the file instead)"),
    "t5_lazy_load": (_truthy, "umT5 is not streamed from disk; t5_cpu_offload streams its blocks from host memory"),
    "clean_cuda_cache": (_truthy, "torch.cuda.empty_cache is not called between steps; offloaded blocks reuse "
                                  "their device buffers"),
    **{k: (_truthy, "LightX2V derives it from the parallel block; set parallel.seq_p_size / cfg_p_size")
       for k in ("seq_parallel", "cfg_parallel")},
    "tensor_parallel": (_truthy, "tensor parallelism is not implemented; parallel.fsdp shards the DiT's weights"),
    "feature_caching": (lambda v: v != "NoCaching",
                        "feature caching (TeaCache, MagCache, ...) is not implemented yet; every step runs the model"),
    "use_prompt_enhancer": (_truthy, "prompt enhancement is not implemented"),
    "changing_resolution": (_truthy, "changing resolution during sampling is not implemented"),
    "video_frame_interpolation": (_truthy, "frame interpolation is not implemented"),
    "video_super_resolution": (_truthy, "super-resolution is not implemented"),
    "sub_servers": (_truthy, "sub-servers are not implemented"),
    "do_mm_calib": (_truthy, "matmul calibration is not implemented"),
    "use_tae": (_truthy, "the tiny VAE is not implemented yet; the full VAE decodes"),
    "use_lightvae": (_truthy, "LightVAE is not implemented yet; the full VAE decodes"),
    "enable_dynamic_cfg": (_truthy, "dynamic CFG is not implemented"),
}

# ---------------------------------------------------------------------------------------------------------------
# Checks


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _guide_number(value: Any, what: str) -> float:
    if not _is_number(value) or value < 0:
        raise ConfigError(f"{what} must be a number >= 0 (e.g. 5.0), got {value!r}")
    return float(value)


def guide_scales(settings: dict[str, Any], moe: bool) -> dict[str, float]:
    """``{"high": g, "low": g}``: the CFG scale for the high-noise and low-noise expert (the same for one model).

    ``sample_guide_scale`` is a number (both experts), or for Wan2.2 A14B a ``[high, low]`` list in LightX2V
    order, or ``{"high": ..., "low": ...}``. The official Wan2.2 tuple is ``(low, high)``: map by name (E04).
    With ``enable_cfg`` false both are 1.0 and the caller runs only the conditional pass (a scale of 1.0 with CFG
    on gives the same result: ``u + 1·(c − u) = c``).
    """
    if settings.get("enable_cfg") is False:
        return {"high": 1.0, "low": 1.0}
    value = settings.get("sample_guide_scale")
    if isinstance(value, dict):
        if set(value) != {"high", "low"}:
            raise ConfigError(f"sample_guide_scale as a dict needs exactly the keys 'high' and 'low', got {value!r}")
        pair = [value["high"], value["low"]]
    elif isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ConfigError(f"sample_guide_scale {list(value)!r}: a list must be [high_noise, low_noise]; use one "
                              f"number for both")
        pair = list(value)
    else:
        g = _guide_number(value, "sample_guide_scale")
        return {"high": g, "low": g}
    if not moe:
        raise ConfigError(
            f"sample_guide_scale {json.dumps(value)} is a (high, low) pair, which only Wan2.2 A14B "
            f"(wan2.2_moe) has; use one number (e.g. 5.0)"
        )
    return {"high": _guide_number(pair[0], "sample_guide_scale high"),
            "low": _guide_number(pair[1], "sample_guide_scale low")}


MIN_FRAMES = {"flf2v": 5}  # first and last frame need two latent frames; every other task runs from 1


def check_frames(n: Any, task: str) -> int:
    """``target_video_length`` must be ``4k + 1`` (the VAE encodes 1 + 4k frames and would silently drop the rest,
    E06); refused with the nearest valid values rather than rounded."""
    least = MIN_FRAMES.get(task, 1)
    if not _is_int(n):
        raise ConfigError(f"target_video_length must be an integer of the form 4k+1 (e.g. 81), got {n!r}")
    n = int(n)
    if n < least:
        raise ConfigError(f"target_video_length {n} is too small for {task}: use at least {least}")
    if (n - 1) % 4:
        below = n - (n - 1) % 4
        nearest = [v for v in (below, below + 4) if v >= least]
        raise ConfigError(
            f"target_video_length {n} is not of the form 4k+1 (the VAE encodes 1 + 4k frames and would drop "
            f"the rest): use {' or '.join(map(str, nearest))}"
        )
    return n


def lora_config_problems(value: Any, moe: bool) -> list[str]:
    if not isinstance(value, list):
        return [f"lora_configs must be a list of {{\"path\": ..., \"strength\": ...}} objects, got {value!r}"]
    problems = []
    for i, entry in enumerate(value):
        where = f"lora_configs[{i}]"
        if not isinstance(entry, dict):
            problems.append(f"{where} must be an object with 'path' and 'strength', got {entry!r}")
            continue
        if not isinstance(entry.get("path"), str) or not entry["path"]:
            problems.append(f"{where} needs a 'path' (the LoRA .safetensors file)")
        problems += [f"{where}.{problem}" for problem in lora_number_problems(entry.get("strength"), entry.get("alpha"))]
        if entry.get("name") is not None and entry["name"] not in EXPERTS:
            problems.append(f"{where}.name {entry['name']!r} is not a Wan2.2 expert; use {' or '.join(EXPERTS)}, or "
                            "leave it out for a single-DiT model")
        elif moe and entry.get("name") is None:
            problems.append(f"{where} needs \"name\": \"high_noise_model\" or \"low_noise_model\" (which Wan2.2 "
                            f"expert it is for; add one entry per expert to apply it to both), got "
                            f"{entry.get('name')!r}")
        unknown = set(entry) - {"path", "strength", "alpha", "name"}
        if unknown:
            problems.append(f"{where}: unknown keys {sorted(unknown)}; expected path, strength, alpha, name")
    return problems


def validate(settings: dict[str, Any], origins: dict[str, str] | None = None) -> None:
    """Check the types and ranges of the core keys; one ``ConfigError`` lists every problem with its fix and, given
    ``origins`` (key -> where it was set), where each wrong value came from."""
    model_cls, task = settings.get("model_cls"), settings.get("task")
    info = model_class(model_cls) if model_cls is not None else None
    if info is not None and task is not None:
        check_task(model_cls, task)
    problems: list[str] = []
    origins = origins or {}

    def bad(key: str, message: str) -> None:
        where = origins.get(key)
        problems.append(f"{message} ({where})" if where and where != "default" else message)

    def positive_int(key: str, example: int) -> bool:
        value = settings.get(key)
        if key in settings and (not _is_int(value) or value < 1):
            bad(key, f"{key} must be a positive integer (e.g. {example}), got {value!r}")
            return False
        return key in settings

    positive_int("infer_steps", 50)
    if "target_video_length" in settings:
        try:
            check_frames(settings["target_video_length"], task or "t2v")
        except ConfigError as e:
            bad("target_video_length", str(e))
    multiple = info.size_multiple if info else 16
    why = "the Wan2.2 VAE stride 16 x patch 2" if multiple == 32 else "the VAE stride 8 x patch 2"
    for key in ("target_height", "target_width"):
        if positive_int(key, 480) and settings[key] % multiple:
            below = settings[key] // multiple * multiple
            use = " or ".join(str(v) for v in (below, below + multiple) if v > 0)
            bad(key, f"{key} {settings[key]} must be a multiple of {multiple} ({why}" +
                (f" for {model_cls}" if model_cls else "") + f"): use {use}")
    for key in ("sample_shift", "fps"):
        value = settings.get(key)
        if key in settings and (not _is_number(value) or value <= 0):
            bad(key, f"{key} must be a positive number, got {value!r}")
    if "enable_cfg" in settings and not isinstance(settings["enable_cfg"], bool):
        bad("enable_cfg", f"enable_cfg must be true or false, got {settings['enable_cfg']!r}")
    if "sample_guide_scale" in settings:
        try:
            guide_scales(settings, moe=bool(info and info.moe))
        except ConfigError as e:
            bad("sample_guide_scale", str(e))
    if "seed" in settings and not _is_int(settings["seed"]):
        bad("seed", f"seed must be an integer (negative: random), got {settings['seed']!r}")
    if "negative_prompt" in settings and not isinstance(settings["negative_prompt"], str):
        bad("negative_prompt", f"negative_prompt must be a string, got {settings['negative_prompt']!r}")
    path = settings.get("save_result_path")
    if path is not None and not (isinstance(path, (str, os.PathLike)) and str(path)):
        bad("save_result_path", f"save_result_path must be the .mp4 file to write, got {path!r}")

    solver = settings.get("sample_solver", "unipc")
    if solver not in SOLVERS:
        bad("sample_solver", f"sample_solver {solver!r} is unknown{suggest(str(solver), SOLVERS)}; use one of "
            f"{', '.join(SOLVERS)}")
    if info and info.distill and solver != "distill":
        bad("sample_solver", f"{model_cls} holds 4-step distilled weights: sample_solver must be 'distill' (got "
            f"{solver!r}); the base samplers produce noise with them")
    if solver == "distill":
        steps = settings.get("denoising_step_list")
        if steps is None:
            problems.append(f"the distill sampler needs denoising_step_list, e.g. {DISTILL_STEPS}")
        elif (not isinstance(steps, list) or not steps or not all(_is_int(t) and 0 < t <= 1000 for t in steps)
              or any(a <= b for a, b in pairwise(steps))):
            bad("denoising_step_list", f"denoising_step_list must be a strictly decreasing list of integers in "
                f"(0, 1000], e.g. {DISTILL_STEPS}; got {steps!r}")
        elif _is_int(settings.get("infer_steps")) and settings["infer_steps"] != len(steps):
            bad("infer_steps", f"infer_steps {settings['infer_steps']} does not match denoising_step_list {steps} "
                f"({len(steps)} steps): drop infer_steps or make them agree")

    if info and info.moe and not info.distill:
        value = settings.get("boundary")
        if not _is_number(value) or not 0 < value < 1:
            bad("boundary", f"boundary must be a number in (0, 1) (the expert switch at t = boundary x 1000; "
                f"0.875 for T2V, 0.9 for I2V), got {value!r}")
    if info and info.moe and info.distill:
        value, n = settings.get("boundary_step_index"), settings.get("infer_steps")
        if not _is_int(value) or value < 0 or (_is_int(n) and value > n):
            bad("boundary_step_index", f"boundary_step_index must be an integer step index in [0, infer_steps] "
                f"(steps before it use the high-noise expert; 2 for 4 steps), got {value!r}")
    for problem in lora_config_problems(settings.get("lora_configs") or [], bool(info and info.moe)):
        bad("lora_configs", problem)

    raise_problems(problems)


def raise_problems(problems: list[str]) -> None:
    """One ``ConfigError`` for every problem found (each names its key, its origin and the fix); none: nothing."""
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError("invalid settings:\n  - " + "\n  - ".join(problems))
