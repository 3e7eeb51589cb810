"""Generation settings (x2v.pipelines.config tables, x2v.pipelines.settings resolution) against the facts in
docs/config.md and docs/pitfalls.md (E04, E06, F01, F03, F06). Fast: no torch models, no files but tmp ones."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from x2v.errors import ConfigError, UnsupportedModelError, X2VError
from x2v.formats import jsonc
from x2v.pipelines import settings as settings_module
from x2v.pipelines.config import (
    KNOWN_KEYS, MODEL_CLASSES, NEGATIVE_PROMPT, NEGATIVE_PROMPT_FLF2V, NEGATIVE_PROMPT_I2V, check_frames, defaults,
    guide_scales, model_class, validate,
)

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference"


def resolved(model_cls, task, *, config_file=None, overrides=None, model_config=None) -> settings_module.Settings:
    """Both steps, as a pipeline runs them: the user's levels (``model_cls`` / ``task`` as keywords, a config dict,
    keyword overrides), then the model's (its class and task defaults, its config.json)."""
    keywords = {**(overrides or {}), **{k: v for k, v in (("model_cls", model_cls), ("task", task)) if v}}
    user = settings_module.resolve_settings(config_json=config_file, keywords=keywords)
    return user.for_model(user.model_cls, user.task or model_class(user.model_cls).tasks[0], model_config)


def resolve_settings(model_cls, task, **levels) -> tuple[dict, list[str]]:
    settings = resolved(model_cls, task, **levels)
    return dict(settings.values), list(settings.warnings)


def resolve_with_sources(model_cls, task, **levels) -> tuple[dict, list[str], dict]:
    settings = resolved(model_cls, task, **levels)
    return dict(settings.values), list(settings.warnings), dict(settings.origins)

# ---------------------------------------------------------------------------------------------------------------
# Defaults (docs/config.md, Defaults; docs/sampling.md §6, §7, §9)

D = [1000, 750, 500, 250]
# (model_cls, task) -> infer_steps, frames, height, width, fps, guide, shift, cfg, solver, extra
EXPECTED = {
    ("wan2.1", "t2v"): (50, 81, 480, 832, 16, 5.0, 5.0, True, "unipc", {}),
    ("wan2.1", "i2v"): (40, 81, 480, 832, 16, 5.0, 3.0, True, "unipc", {}),
    ("wan2.1", "flf2v"): (50, 81, 720, 1280, 16, 5.0, 16.0, True, "unipc", {}),
    ("wan2.1_vace", "vace"): (50, 81, 480, 832, 16, 5.0, 16.0, True, "unipc", {}),
    ("wan2.1_distill", "t2v"): (4, 81, 480, 832, 16, 5.0, 5.0, False, "distill", {"denoising_step_list": D}),
    ("wan2.1_distill", "i2v"): (4, 81, 480, 832, 16, 5.0, 5.0, False, "distill", {"denoising_step_list": D}),
    ("wan2.2_moe", "t2v"): (40, 81, 480, 832, 16, [4.0, 3.0], 12.0, True, "unipc", {"boundary": 0.875}),
    ("wan2.2_moe", "i2v"): (40, 81, 480, 832, 16, [3.5, 3.5], 5.0, True, "unipc", {"boundary": 0.9}),
    ("wan2.2_moe_distill", "t2v"): (4, 81, 480, 832, 16, [3.5, 3.5], 5.0, False, "distill",
                                    {"denoising_step_list": D, "boundary_step_index": 2}),
    ("wan2.2_moe_distill", "i2v"): (4, 81, 480, 832, 16, [3.5, 3.5], 5.0, False, "distill",
                                    {"denoising_step_list": D, "boundary_step_index": 2}),
    ("wan2.2", "t2v"): (50, 121, 704, 1280, 24, 5.0, 5.0, True, "unipc", {}),
    ("wan2.2", "i2v"): (50, 121, 704, 1280, 24, 5.0, 5.0, True, "unipc", {}),
}


def test_every_model_class_and_task_has_expected_defaults() -> None:
    pairs = {(m, t) for m, info in MODEL_CLASSES.items() for t in info.tasks}
    assert pairs == set(EXPECTED)


@pytest.mark.parametrize("model_cls, task", sorted(EXPECTED))
def test_defaults(model_cls: str, task: str) -> None:
    steps, frames, h, w, fps, guide, shift, cfg, solver, extra = EXPECTED[model_cls, task]
    d = defaults(model_cls, task)
    assert (d["infer_steps"], d["target_video_length"], d["target_height"], d["target_width"], d["fps"]) == (
        steps, frames, h, w, fps)
    assert (d["sample_guide_scale"], d["sample_shift"], d["enable_cfg"], d["sample_solver"]) == (
        guide, shift, cfg, solver)
    for key, value in extra.items():
        assert d[key] == value
    if "boundary" not in extra:
        assert "boundary" not in d
    if "denoising_step_list" not in extra:
        assert "denoising_step_list" not in d
    assert set(d) <= KNOWN_KEYS
    # The defaults resolve cleanly on their own.
    settings, warnings = resolve_settings(model_cls, task)
    assert warnings == []
    assert {k: settings[k] for k in d} == d


def test_defaults_are_fresh_copies() -> None:
    defaults("wan2.2_moe_distill", "t2v")["denoising_step_list"].append(1)
    assert defaults("wan2.2_moe_distill", "t2v")["denoising_step_list"] == D


def test_default_negative_prompts() -> None:
    assert NEGATIVE_PROMPT.startswith("色调艳丽，过曝，静态") and NEGATIVE_PROMPT.endswith("背景人很多，倒着走")
    assert NEGATIVE_PROMPT_I2V == "镜头晃动，" + NEGATIVE_PROMPT
    assert NEGATIVE_PROMPT_FLF2V == "镜头切换，镜头晃动，" + NEGATIVE_PROMPT
    assert defaults("wan2.1", "t2v")["negative_prompt"] == NEGATIVE_PROMPT
    assert defaults("wan2.1", "i2v")["negative_prompt"] == NEGATIVE_PROMPT_I2V
    assert defaults("wan2.1_distill", "i2v")["negative_prompt"] == NEGATIVE_PROMPT_I2V
    assert defaults("wan2.1", "flf2v")["negative_prompt"] == NEGATIVE_PROMPT_FLF2V
    assert defaults("wan2.1_vace", "vace")["negative_prompt"] == NEGATIVE_PROMPT
    for model_cls in ("wan2.2_moe", "wan2.2_moe_distill", "wan2.2"):  # Wan2.2: no prefix, also for i2v
        assert defaults(model_cls, "i2v")["negative_prompt"] == NEGATIVE_PROMPT


def test_negative_prompt_matches_reference_verbatim() -> None:
    """The official string as docs/config.md records it, and as the shared reference has it where it is present."""
    for ref in (REPO / "docs" / "config.md", REFERENCE / "wan-models.md"):
        if ref.exists():
            assert f"`{NEGATIVE_PROMPT}`" in ref.read_text(), ref


def test_empty_negative_prompt_means_the_default() -> None:
    settings, _ = resolve_settings("wan2.1", "i2v", overrides={"negative_prompt": ""})
    assert settings["negative_prompt"] == NEGATIVE_PROMPT_I2V
    settings, _ = resolve_settings("wan2.1", "i2v", overrides={"negative_prompt": "blurry"})
    assert settings["negative_prompt"] == "blurry"


def test_wan21_i2v_shift_follows_size_unless_set() -> None:
    assert resolve_settings("wan2.1", "i2v")[0]["sample_shift"] == 3.0
    assert resolve_settings("wan2.1", "i2v", overrides={"target_height": 832, "target_width": 480}
                            )[0]["sample_shift"] == 3.0
    assert resolve_settings("wan2.1", "i2v", overrides={"target_height": 720, "target_width": 1280}
                            )[0]["sample_shift"] == 5.0
    assert resolve_settings("wan2.1", "i2v", overrides={"target_height": 720, "target_width": 1280,
                                                       "sample_shift": 4.0})[0]["sample_shift"] == 4.0


# ---------------------------------------------------------------------------------------------------------------
# Model classes and tasks


@pytest.mark.parametrize("model_cls", ["wan2.2_animate", "wan2.2_s2v", "wan2.1_sf", "wan2.2_moe_vace"])
def test_recognized_but_unsupported_model_cls(model_cls: str) -> None:
    with pytest.raises(UnsupportedModelError, match=f"model_cls '{model_cls}'.*recognized but not supported") as e:
        resolve_settings(model_cls, None)
    assert "wan2.2_moe" in str(e.value)  # lists what is supported


def test_unknown_model_cls_suggests() -> None:
    with pytest.raises(ConfigError, match=r"unknown model_cls 'wan21'.*did you mean 'wan2.1'"):
        defaults("wan21", "t2v")


def test_model_cls_left_to_the_weights() -> None:
    settings = settings_module.resolve_settings(keywords={"task": "t2v"})
    assert settings.model_cls is None and settings.sampling is None  # completed once the weights say the class


def test_tasks_per_model_class() -> None:
    with pytest.raises(ConfigError, match="task 'flf2v' is not available for model_cls 'wan2.2_moe'.*t2v, i2v"):
        defaults("wan2.2_moe", "flf2v")
    with pytest.raises(UnsupportedModelError, match="task 'animate'.*recognized but not supported"):
        defaults("wan2.1", "animate")
    with pytest.raises(ConfigError, match="unknown task 'i2vv'.*did you mean 'i2v'"):
        defaults("wan2.1", "i2vv")
    assert resolve_settings("wan2.1_vace", None)[0]["task"] == "vace"  # the class's only task
    assert resolve_settings("wan2.1", None)[0]["task"] == "t2v"  # LightX2V's default task


def test_errors_are_value_errors_and_x2v_errors() -> None:
    with pytest.raises(ValueError):
        check_frames(80, "t2v")
    with pytest.raises(X2VError):
        check_frames(80, "t2v")


# ---------------------------------------------------------------------------------------------------------------
# Precedence (F01)


def test_precedence_each_level_overrides_the_previous() -> None:
    model = {"infer_steps": 30, "sample_shift": 7.0, "fps": 20, "target_video_length": 49}
    user = {"sample_shift": 8.0, "fps": 25, "target_video_length": 61}
    cli = {"fps": 30, "target_video_length": 73}
    settings, warnings, sources = resolve_with_sources("wan2.1", "t2v", config_file=user, overrides=cli,
                                                       model_config=model)
    assert warnings == []
    assert settings["sample_guide_scale"] == 5.0 and sources["sample_guide_scale"] == "default for wan2.1 t2v"
    assert settings["infer_steps"] == 30 and sources["infer_steps"] == "infer_steps in the model's config.json"
    assert settings["sample_shift"] == 8.0 and sources["sample_shift"] == "config key sample_shift"
    assert settings["fps"] == 30 and sources["fps"] == "keyword fps="
    assert settings["target_video_length"] == 73
    text = resolved("wan2.1", "t2v", config_file=user, overrides=cli, model_config=model).describe()
    assert "fps: 30  [keyword fps=]" in text and "infer_steps: 30  [infer_steps in the model's config.json]" in text


def test_a_request_is_the_highest_level_and_is_checked_like_a_file() -> None:
    settings = resolved("wan2.1", "t2v", config_file={"infer_steps": 20}, overrides={"fps": 30})
    request = settings.for_request({"num_frames": 49, "infer_steps": 3, "seed": None})
    assert (request.output.frames, request.sampling.steps, request.output.fps) == (49, 3, 30)
    assert request.origin("target_video_length") == "generate(num_frames=...)"
    assert request.warnings == ()  # aliases are quiet in keywords
    assert settings.sampling.steps == 20  # the pipeline's own settings are unchanged
    typo = settings.for_request({"infer_step": 3})
    assert typo.warnings == ("generate(): unknown config key 'infer_step' (did you mean 'infer_steps'?)",)
    assert typo.sampling.steps == 20
    with pytest.raises(ConfigError, match=r"target_video_length 10 is not of the form 4k\+1.*generate\(num_frames"):
        settings.for_request({"num_frames": 10})
    with pytest.raises(ConfigError, match="dit_quant_scheme cannot change per request"):
        settings.for_request({"dit_quant_scheme": "fp8-vllm"})


def test_config_file_warnings_and_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "my.json"
    path.write_text('{"infer_step": 3, "target_video_length": 10}')
    with pytest.raises(ConfigError, match=rf"target_video_length 10 .*config key target_video_length in {path}"):
        settings_module.resolve_settings(config_json=path, keywords={"model_cls": "wan2.1"})
    path.write_text('{"infer_step": 3}')
    settings = settings_module.resolve_settings(config_json=path)
    assert settings.warnings == (f"config file {path}: unknown config key 'infer_step' (did you mean 'infer_steps'?)",)
    with pytest.raises(ConfigError, match=f"{tmp_path / 'missing.json'}: config file not found"):
        settings_module.resolve_settings(config_json=tmp_path / "missing.json")
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="holds one JSON object"):
        settings_module.resolve_settings(config_json=path)


def test_flags_are_named_as_flags() -> None:
    settings = settings_module.resolve_settings(flags={"model_path": "/nowhere", "infer_steps": 4})
    assert settings.origin("model_path") == "flag --model_path" and settings.sources.origin("model_path") == \
        "flag --model_path"
    with pytest.raises(ConfigError, match=r"infer_steps must be a positive integer.*\(flag --infer_steps\)"):
        settings_module.resolve_settings(flags={"infer_steps": 0, "model_cls": "wan2.1"})


def test_load_settings_are_typed_and_checked_before_any_file_is_read() -> None:
    settings = settings_module.resolve_settings(config_json={
        "mm_config": {"mm_type": "W-fp8-channel-sym-A-fp8-channel-sym-dynamic-Vllm"}, "cpu_offload": True,
        "offload_granularity": "phase", "self_attn_1_type": "sage_triton", "t5_quantized_ckpt": "/models/t5.pth",
        "lora_configs": [{"path": "a.safetensors", "strength": 0.5}], "lora_dynamic_apply": True})
    assert settings.sources.quant("dit") == settings_module.Quantization(True, "fp8-vllm")
    assert settings.sources.files["t5_quantized_ckpt"] == Path("/models/t5.pth")
    assert (settings.offload.cpu_offload, settings.offload.granularity, settings.offload.t5) == (True, "phase", True)
    assert settings.attention.types == ("sage_triton", "torch_sdpa", "torch_sdpa")
    assert [(e.path, e.strength) for e in settings.lora.entries] == [("a.safetensors", 0.5)] and settings.lora.dynamic
    with pytest.raises(ConfigError) as e:
        settings_module.resolve_settings(config_json={
            "dit_quant_scheme": "fp8-vlm", "self_attn_1_type": "flash_atn2", "lazy_load": True, "cpu_offload": "yes"})
    text = str(e.value)
    for expected in ("dit_quant_scheme 'fp8-vlm' is unknown (did you mean 'fp8-vllm'?)",
                     "self_attn_1_type 'flash_atn2' is not an attention type (did you mean 'flash_attn2'?)",
                     "cpu_offload must be true or false, got 'yes' (config key cpu_offload)"):
        assert expected in text


def test_model_config_never_overrides_the_user() -> None:
    # LightX2V merges the model's config.json after --config_json; x2v does not (docs/pitfalls.md F01).
    settings, _ = resolve_settings("wan2.1", "t2v", config_file={"infer_steps": 20},
                                   model_config={"infer_steps": 99, "sample_shift": 3.0})
    assert settings["infer_steps"] == 20 and settings["sample_shift"] == 3.0


def test_model_config_contributes_only_sampling_keys() -> None:
    model = {"_class_name": "WanModel", "dim": 5120, "num_layers": 40, "in_dim": 16, "model_type": "t2v",
             "cpu_offload": True, "made_up": 1, "num_inference_steps": 25}
    settings, warnings = resolve_settings("wan2.1", "t2v", model_config=model)
    assert warnings == []  # the user cannot fix the model's file
    # LightX2V reads num_inference_steps there too (docs/config.md, Old names and aliases)
    assert settings["infer_steps"] == 25
    assert not {"dim", "num_layers", "cpu_offload", "made_up", "_class_name"} & set(settings)


def test_none_values_are_ignored_at_every_level() -> None:
    settings, warnings = resolve_settings(
        "wan2.1", "t2v", config_file={"infer_steps": 20, "fps": None, "lora_configs": None},
        overrides={"infer_steps": None, "seed": None, "target_height": None}, model_config={"fps": None})
    assert warnings == []
    assert settings["infer_steps"] == 20 and settings["fps"] == 16 and settings["seed"] == 42
    assert settings["target_height"] == 480 and "lora_configs" not in settings


def test_model_cls_and_task_from_the_config_file() -> None:
    settings, warnings = resolve_settings(None, None, config_file={"model_cls": "wan2.2_moe", "task": "i2v"})
    assert (settings["model_cls"], settings["task"], settings["boundary"]) == ("wan2.2_moe", "i2v", 0.9)
    assert warnings == []
    settings, warnings = resolve_settings("wan2.1", "i2v", config_file={"model_cls": "wan2.2_moe", "task": "t2v"})
    assert (settings["model_cls"], settings["task"]) == ("wan2.1", "i2v")
    assert warnings == ["config: model_cls 'wan2.2_moe' is ignored; 'wan2.1' (keyword model_cls=) wins"]
    settings, warnings, sources = resolve_with_sources(None, None, config_file={"model_cls": "wan2.1", "task": "t2v"},
                                                       overrides={"task": "i2v"})
    assert (settings["task"], sources["task"], sources["model_cls"]) == ("i2v", "keyword task=", "config key model_cls")
    assert warnings == []  # another task with the same file is routine


# ---------------------------------------------------------------------------------------------------------------
# Warnings: unknown, renamed, ignored keys (F03, F06)


def test_unknown_key_warning_suggests_the_closest_key() -> None:
    settings, warnings = resolve_settings("wan2.1", "t2v", config_file={"infer_step": 3, "zzz_qqq": 1})
    assert "config: unknown config key 'infer_step' (did you mean 'infer_steps'?)" in warnings
    assert "config: unknown config key 'zzz_qqq' (ignored)" in warnings
    assert settings["infer_steps"] == 50  # the typo does not set anything
    _, warnings = resolve_settings("wan2.1", "t2v", overrides={"sample_guide_scal": 4.0})
    assert warnings == ["keyword arguments: unknown config key 'sample_guide_scal' (did you mean "
                        "'sample_guide_scale'?)"]


def test_deprecated_names_are_mapped_with_a_warning() -> None:
    settings, warnings = resolve_settings("wan2.1", "t2v", overrides={"save_video_path": "out.mp4"},
                                          config_file={"num_inference_steps": 30})
    assert settings["save_result_path"] == "out.mp4" and "save_video_path" not in settings
    assert settings["infer_steps"] == 30 and "num_inference_steps" not in settings
    assert any("deprecated config key 'save_video_path' read as 'save_result_path'" in w for w in warnings)
    assert any("deprecated config key 'num_inference_steps' read as 'infer_steps'" in w for w in warnings)
    settings, warnings = resolve_settings("wan2.1", "t2v", config_file={"num_inference_steps": 30, "infer_steps": 20})
    assert settings["infer_steps"] == 20
    assert warnings == [("config: both 'num_inference_steps' and 'infer_steps' are set; "
                         "'num_inference_steps' is ignored")]


def test_legacy_mm_type_maps_to_dit_quant_scheme() -> None:
    old = {"mm_config": {"mm_type": "W-int8-channel-sym-A-int8-channel-sym-dynamic-Vllm"}}
    settings, warnings = resolve_settings("wan2.1", "t2v", config_file=old)
    assert settings["dit_quantized"] is True and settings["dit_quant_scheme"] == "int8-vllm"
    assert "mm_config" not in settings
    assert len(warnings) == 1 and "deprecated 'mm_config.mm_type'" in warnings[0]
    settings, _ = resolve_settings("wan2.1", "t2v", config_file={"mm_config": {"mm_type": "Default"}})
    assert settings["dit_quantized"] is False and settings["dit_quant_scheme"] == "Default"
    settings, warnings = resolve_settings("wan2.1", "t2v", config_file={"mm_config": {"mm_type": "W-weird"}})
    assert "dit_quant_scheme" not in settings and "no dit_quant_scheme equivalent" in warnings[0]


def test_aliases_quiet_in_overrides_noted_in_files() -> None:
    settings, warnings = resolve_settings("wan2.1", "t2v", overrides={"num_frames": 49, "height": 832, "width": 480})
    assert (settings["target_video_length"], settings["target_height"], settings["target_width"]) == (49, 832, 480)
    assert warnings == []
    settings, warnings = resolve_settings("wan2.1", "t2v", config_file={"guidance_scale": 6.0})
    assert settings["sample_guide_scale"] == 6.0
    assert warnings == ["config: config key 'guidance_scale' read as 'sample_guide_scale' (LightX2V's name)"]


def test_known_but_ignored_keys_warn() -> None:
    _, warnings = resolve_settings("wan2.1", "t2v", config_file={
        "offload_ratio": 0.8, "max_memory": 20, "tensor_parallel": True, "feature_caching": "Tea",
        "teacache_thresh": 0.26})
    joined = "\n".join(warnings)
    assert len(warnings) == 4
    for key in ("offload_ratio", "max_memory", "tensor_parallel", "feature_caching"):
        assert f"config key '{key}'" in joined
    assert "fsdp" in joined  # what to use instead of tensor parallelism
    # Values that ask for nothing are silent; the parallel block is read (x2v.runtime.parallel).
    for parallel in (False, {"seq_p_size": 1, "cfg_p_size": 1}, {"seq_p_size": 4, "seq_p_attn_type": "ulysses"}):
        _, warnings = resolve_settings("wan2.1", "t2v", config_file={
            "parallel": parallel, "seq_parallel": False, "feature_caching": "NoCaching", "use_tae": False,
            "parallel_x": 1})
        assert warnings == ["config: unknown config key 'parallel_x' (did you mean 'parallel'?)"]


def test_settings_that_do_not_apply_warn() -> None:
    _, warnings = resolve_settings("wan2.1", "t2v", config_file={"boundary": 0.9})
    assert warnings == ["config: 'boundary' only applies to Wan2.2 A14B (wan2.2_moe); ignored for wan2.1"]
    settings, warnings = resolve_settings("wan2.1", "t2v", config_file={"denoising_step_list": D})
    assert len(warnings) == 1 and "only applies to the distill sampler" in warnings[0]
    assert "denoising_step_list" not in settings
    _, warnings = resolve_settings("wan2.1_distill", "t2v", overrides={"enable_cfg": True})
    assert len(warnings) == 1 and "enable_cfg is true with the distill sampler" in warnings[0]


# ---------------------------------------------------------------------------------------------------------------
# LightX2V-style config files (JSON with comments and trailing commas)

LIGHTX2V_MOE_T2V = """\
// configs/wan22/wan_moe_t2v.json as LightX2V ships it (keys: docs/config.md)
{
    "infer_steps": 40,
    "target_video_length": 81,
    "text_len": 512,
    "target_height": 720,
    "target_width": 1280,
    "self_attn_1_type": "flash_attn3",
    "cross_attn_1_type": "flash_attn3",
    "cross_attn_2_type": "flash_attn3",
    "sample_guide_scale": [4.0, 3.0], // [high_noise, low_noise]
    "sample_shift": 12.0,
    "enable_cfg": true,
    /* offload: whole expert swapped
       at the boundary */
    "cpu_offload": true,
    "offload_granularity": "model",
    "t5_cpu_offload": false,
    "vae_cpu_offload": false,
    "use_image_encoder": false,
    "boundary": 0.875,
    "fps": 16,
}
"""

LIGHTX2V_MOE_I2V_DISTILL = """\
{
    "infer_steps": 4,
    "target_video_length": 81,
    "text_len": 512,
    "target_height": 720,
    "target_width": 1280,
    "self_attn_1_type": "sage_attn2",
    "cross_attn_1_type": "sage_attn2",
    "cross_attn_2_type": "sage_attn2",
    "sample_guide_scale": [3.5, 3.5],
    "sample_shift": 5.0,
    "enable_cfg": false,
    "cpu_offload": true,
    "offload_granularity": "block",
    "lazy_load": false,
    "t5_cpu_offload": false,
    "vae_cpu_offload": false,
    "clip_cpu_offload": false,
    "use_image_encoder": false,
    "boundary_step_index": 2,
    "denoising_step_list": [1000, 750, 500, 250,],
    "dit_quantized": true,
    "dit_quant_scheme": "fp8-sgl",
    "high_noise_quantized_ckpt": "/models/wan2.2_i2v_A14b_high_noise_scaled_fp8_e4m3_lightx2v_4step.safetensors",
    "low_noise_quantized_ckpt": "/models/wan2.2_i2v_A14b_low_noise_scaled_fp8_e4m3_lightx2v_4step.safetensors",
    "t5_quantized": true,
    "t5_quant_scheme": "fp8-sgl",
    "t5_quantized_ckpt": "/models/models_t5_umt5-xxl-enc-fp8.pth", // https://example.org/a//b
    "vae_path": "/models/Wan2.1_VAE.pth",
    "rope_type": "torch_complex_rope",
    "rms_norm_type": "torch",
    "feature_caching": "NoCaching",
    "lora_configs": [
        {"name": "high_noise_model", "path": "/loras/high.safetensors", "strength": 1.0},
        {"name": "low_noise_model", "path": "/loras/low.safetensors", "strength": 1.0, "alpha": null},
    ],
    "lora_dynamic_apply": true,
    "parallel": {"seq_p_size": 1, "seq_p_attn_type": "ulysses"},
    "sparge_attn_setting": {"sparse_threshold": 0.5},
    "seed": 42
}
"""


def test_lightx2v_moe_t2v_config_resolves_without_warnings(tmp_path: Path) -> None:
    path = tmp_path / "wan_moe_t2v.json"
    path.write_text(LIGHTX2V_MOE_T2V)
    config = jsonc.load(path)
    settings, warnings = resolve_settings("wan2.2_moe", "t2v", config_file=config)
    assert warnings == []
    assert (settings["infer_steps"], settings["sample_shift"], settings["boundary"]) == (40, 12.0, 0.875)
    assert (settings["target_height"], settings["target_width"]) == (720, 1280)
    assert settings["cpu_offload"] is True and settings["offload_granularity"] == "model"
    assert guide_scales(settings, moe=True) == {"high": 4.0, "low": 3.0}


def test_lightx2v_moe_distill_config_resolves_without_warnings(tmp_path: Path) -> None:
    path = tmp_path / "wan_moe_i2v_distill.json"
    path.write_text(LIGHTX2V_MOE_I2V_DISTILL)
    config = jsonc.load(path)
    settings, warnings = resolve_settings("wan2.2_moe_distill", "i2v", config_file=config)
    assert warnings == []
    assert settings["sample_solver"] == "distill" and settings["denoising_step_list"] == D
    assert settings["boundary_step_index"] == 2 and settings["dit_quant_scheme"] == "fp8-sgl"
    assert settings["t5_quantized_ckpt"] == "/models/models_t5_umt5-xxl-enc-fp8.pth"
    assert guide_scales(settings, moe=True) == {"high": 1.0, "low": 1.0}  # CFG off


def test_every_lightx2v_key_is_known() -> None:
    for text in (LIGHTX2V_MOE_T2V, LIGHTX2V_MOE_I2V_DISTILL):
        config = jsonc.loads(text)
        assert {k for k in config if not k.endswith("_setting")} <= KNOWN_KEYS


@pytest.mark.parametrize("name", ["wan_t2v", "wan_i2v", "wan_moe_t2v", "wan_moe_i2v_distill", "wan_ti2v",
                                  "wan_t2v_8gpu"])
def test_shipped_example_configs_resolve_without_warnings(name: str) -> None:
    config = jsonc.load(REPO / "configs" / f"{name}.json")
    settings, warnings = resolve_settings(None, None, config_file=config)
    assert warnings == []
    # Each example spells out its model's defaults (sizes may differ).
    expected = defaults(settings["model_cls"], settings["task"])
    for key in ("infer_steps", "sample_guide_scale", "sample_shift", "enable_cfg", "fps", "target_video_length"):
        assert settings[key] == expected[key], key
    assert settings["negative_prompt"] == expected["negative_prompt"]


# ---------------------------------------------------------------------------------------------------------------
# Guidance (E04)


def test_guide_scales_lightx2v_order_is_high_low() -> None:
    assert guide_scales({"sample_guide_scale": [4.0, 3.0]}, moe=True) == {"high": 4.0, "low": 3.0}
    assert guide_scales({"sample_guide_scale": {"low": 3.0, "high": 4.0}}, moe=True) == {"high": 4.0, "low": 3.0}
    assert guide_scales({"sample_guide_scale": 5}, moe=True) == {"high": 5.0, "low": 5.0}
    assert guide_scales({"sample_guide_scale": 6.0, "enable_cfg": True}, moe=False) == {"high": 6.0, "low": 6.0}
    assert guide_scales({"sample_guide_scale": [4.0, 3.0], "enable_cfg": False}, moe=False) == {"high": 1.0,
                                                                                                 "low": 1.0}


def test_guide_scale_pair_on_a_single_model_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"sample_guide_scale \[4.0, 3.0\].*only Wan2.2 A14B"):
        guide_scales({"sample_guide_scale": [4.0, 3.0]}, moe=False)
    with pytest.raises(ConfigError, match=r"only Wan2.2 A14B"):
        resolve_settings("wan2.1", "t2v", config_file={"sample_guide_scale": [4.0, 3.0]})
    with pytest.raises(ConfigError, match=r"\[high_noise, low_noise\]"):
        guide_scales({"sample_guide_scale": [4.0, 3.0, 2.0]}, moe=True)
    with pytest.raises(ConfigError, match="number >= 0"):
        guide_scales({"sample_guide_scale": "5"}, moe=False)


def test_moe_resolution_keeps_the_pair_order() -> None:
    settings, _ = resolve_settings("wan2.2_moe", "t2v", overrides={"sample_guide_scale": [5.0, 2.0]})
    assert guide_scales(settings, moe=True) == {"high": 5.0, "low": 2.0}


# ---------------------------------------------------------------------------------------------------------------
# Frames (E06) and validation


@pytest.mark.parametrize("n", [1, 5, 49, 81, 121])
def test_valid_frame_counts(n: int) -> None:
    assert check_frames(n, "t2v") == n


@pytest.mark.parametrize("n, suggestion", [(80, "77 or 81"), (82, "81 or 85"), (2, "1 or 5"), (120, "117 or 121")])
def test_invalid_frame_counts_name_the_nearest(n: int, suggestion: str) -> None:
    with pytest.raises(ConfigError, match=f"target_video_length {n} is not of the form 4k\\+1.*use {suggestion}$"):
        check_frames(n, "i2v")


def test_frame_count_edge_cases() -> None:
    with pytest.raises(ConfigError, match="too small"):
        check_frames(0, "t2v")
    with pytest.raises(ConfigError, match="too small for flf2v: use at least 5"):
        check_frames(1, "flf2v")
    with pytest.raises(ConfigError, match="use at least 5$"):
        check_frames(3, "flf2v")
    for bad in (81.0, "81", True):
        with pytest.raises(ConfigError, match="must be an integer"):
            check_frames(bad, "t2v")
    with pytest.raises(ConfigError, match="target_video_length 80"):
        resolve_settings("wan2.1", "t2v", overrides={"target_video_length": 80})


@pytest.mark.parametrize("overrides, message", [
    ({"infer_steps": 0}, "infer_steps must be a positive integer"),
    ({"infer_steps": 4.0}, "infer_steps must be a positive integer"),
    ({"target_height": 470}, "target_height 470 must be a multiple of 16.*use 464 or 480"),
    ({"target_width": 8}, r"target_width 8 must be a multiple of 16.*use 16 \(keyword target_width=\)$"),
    ({"sample_shift": 0}, "sample_shift must be a positive number"),
    ({"enable_cfg": "yes"}, "enable_cfg must be true or false"),
    ({"sample_solver": "unipcc"}, "sample_solver 'unipcc' is unknown.*did you mean 'unipc'"),
    ({"seed": 1.5}, "seed must be an integer"),
    ({"negative_prompt": 3}, "negative_prompt must be a string"),
])
def test_validation_names_key_and_fix(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve_settings("wan2.1", "t2v", overrides=overrides)


def test_ti2v_sizes_are_multiples_of_32() -> None:
    resolve_settings("wan2.2", "t2v", overrides={"target_height": 1280, "target_width": 704})
    with pytest.raises(ConfigError, match="target_height 720 must be a multiple of 32.*for wan2.2.*use 704 or 736"):
        resolve_settings("wan2.2", "t2v", overrides={"target_height": 720})
    resolve_settings("wan2.1", "t2v", overrides={"target_height": 720, "target_width": 1280})  # 16 is enough


def test_moe_boundary_range() -> None:
    for bad in (0, 1.0, 1.2, "0.9"):
        with pytest.raises(ConfigError, match=r"boundary must be a number in \(0, 1\)"):
            resolve_settings("wan2.2_moe", "t2v", overrides={"boundary": bad})
    with pytest.raises(ConfigError, match=r"boundary_step_index must be an integer step index in \[0, infer_steps\]"):
        resolve_settings("wan2.2_moe_distill", "t2v", overrides={"boundary_step_index": 5})


@pytest.mark.parametrize("steps", [[1000, 750, 750, 250], [250, 500], [1001, 500], [1000, 500, 0], [], "1000",
                                   [1000.0, 500]])
def test_denoising_step_list_checked(steps) -> None:
    with pytest.raises(ConfigError, match=r"denoising_step_list must be a strictly decreasing list.*\(0, 1000\]"):
        resolve_settings("wan2.1_distill", "t2v", overrides={"denoising_step_list": steps})


def test_distill_steps_and_solver() -> None:
    # infer_steps follows a denoising_step_list set at a higher level...
    settings, _ = resolve_settings("wan2.1_distill", "t2v", config_file={"denoising_step_list": [1000, 500]})
    assert settings["infer_steps"] == 2
    # ...but an explicit contradiction at the same level is refused.
    with pytest.raises(ConfigError, match=r"infer_steps 8 does not match denoising_step_list"):
        resolve_settings("wan2.1_distill", "t2v", overrides={"infer_steps": 8})
    # Distilled weights refuse the base samplers (E03).
    with pytest.raises(ConfigError, match="sample_solver must be 'distill'"):
        resolve_settings("wan2.1_distill", "t2v", overrides={"sample_solver": "unipc"})
    # A distill LoRA on a base model: LightX2V's scheduler_type selects the distill sampler.
    settings, warnings = resolve_settings("wan2.1", "t2v", config_file={
        "scheduler_type": "WanStepDistillScheduler", "denoising_step_list": D, "enable_cfg": False})
    assert warnings == []
    assert (settings["sample_solver"], settings["infer_steps"]) == ("distill", 4)
    _, warnings = resolve_settings("wan2.1", "t2v", config_file={"scheduler_type": "MyScheduler"})
    assert warnings == [("scheduler_type \"MyScheduler\" (config key scheduler_type) is not one x2v knows "
                        "(WanScheduler, WanStepDistillScheduler); ignored, sample_solver is 'unipc'")]
    with pytest.raises(ConfigError, match="the distill sampler needs denoising_step_list"):
        resolve_settings("wan2.1", "t2v", config_file={"scheduler_type": "WanStepDistillScheduler"})


def test_lora_configs_shape() -> None:
    good = [{"path": "a.safetensors", "strength": 0.8}]
    resolve_settings("wan2.1", "t2v", config_file={"lora_configs": good})
    with pytest.raises(ConfigError, match=r"lora_configs\[0\] needs \"name\": \"high_noise_model\""):
        resolve_settings("wan2.2_moe", "t2v", config_file={"lora_configs": good})
    with pytest.raises(ConfigError, match=r"lora_configs\[0\] needs a 'path'"):
        resolve_settings("wan2.1", "t2v", config_file={"lora_configs": [{"strength": 1.0}]})
    with pytest.raises(ConfigError, match=r"lora_configs\[0\]: unknown keys \['strenght'\]"):
        resolve_settings("wan2.1", "t2v", config_file={"lora_configs": [{"path": "a", "strenght": 1.0}]})


def test_validate_lists_every_problem() -> None:
    settings = defaults("wan2.1", "t2v") | {"model_cls": "wan2.1", "task": "t2v", "infer_steps": -1,
                                            "target_video_length": 80, "target_width": 100}
    with pytest.raises(ConfigError) as e:
        validate(settings)
    text = str(e.value)
    assert text.startswith("invalid settings:")
    assert len(re.findall(r"^  - ", text, re.MULTILINE)) == 3
    validate(defaults("wan2.2_moe", "i2v") | {"model_cls": "wan2.2_moe", "task": "i2v"})
