"""Broken or hostile weights, LoRAs, model configs and output paths: a one-line error naming the file and the cause,
before the compute where it can be known then; never a black video with exit status 0 or a traceback.

(The container formats' own cases, safetensors headers and indexes, are in tests/test_hostile_files.py.)
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import fuzz_report
from safetensors.torch import load_file, save_file

import x2v.pipelines.video as video
from x2v.cli.main import main as x2v_main
from x2v.demo import write_tiny_model
from x2v.errors import CheckpointError, ConfigError, X2VError
from x2v.loading.weights import ALLOW_NON_FINITE, has_non_finite
from x2v.pipelines.wan import Pipeline

SMALL = {"target_height": 32, "target_width": 32, "target_video_length": 5, "infer_steps": 2}
SHARD = "diffusion_pytorch_model-00001-of-00002.safetensors"
T5 = "models_t5_umt5-xxl-enc-bf16.pth"
VAE = "Wan2.1_VAE.pth"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("hostile") / "t2v", "t2v")


@pytest.fixture
def model(pristine, tmp_path) -> Path:
    """A private copy of the tiny model, to break."""
    return Path(shutil.copytree(pristine, tmp_path / "model"))


def poison_safetensors(path: Path, value: float) -> str:
    tensors = load_file(path)
    name = next(k for k in tensors if k.endswith("ffn.0.weight") or k.endswith(".weight"))
    tensors[name][0, 0] = value
    save_file(tensors, str(path))
    return name


def poison_pth(path: Path, suffix: str) -> str:
    state = torch.load(path, weights_only=True)
    name = next(k for k in state if k.endswith(suffix) and state[k].is_floating_point())
    state[name].view(-1)[0] = float("nan")
    torch.save(state, path)
    return name


def load(model: Path, dtype: torch.dtype | None = None, **settings) -> Pipeline:
    return Pipeline.from_pretrained(model, device="cpu", dtype=dtype, **{**SMALL, **settings})


def run_cli(*args: str, capsys) -> tuple[int, str]:
    status = x2v_main(["generate", *args])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return status, err


# --- non-finite weights -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_dit_weight_is_refused_naming_file_and_tensor(model, value):
    name = poison_safetensors(model / SHARD, value)
    with pytest.raises(CheckpointError, match=rf"index.json: 1 tensor\(s\) hold NaN or infinite values \({name}\)"):
        load(model)


@pytest.mark.parametrize("file, suffix", [(T5, ".weight"), (VAE, ".weight")])
def test_non_finite_encoder_and_vae_weights_are_refused(model, file, suffix):
    poison_pth(model / file, suffix)
    with pytest.raises(CheckpointError, match=rf"{file}: 1 tensor\(s\) hold NaN"):
        load(model)


def test_the_opt_out_loads_them_and_the_nan_video_is_refused_not_written(model, monkeypatch, tmp_path):
    """Who knows better may load NaN weights; the generation then says the latents are NaN and writes nothing."""
    poison_safetensors(model / SHARD, float("nan"))
    monkeypatch.setenv(ALLOW_NON_FINITE, "1")
    pipe = load(model)
    out = tmp_path / "out.mp4"
    with pytest.raises(X2VError, match="the denoised latents hold NaN or infinite values.*nothing was written"):
        pipe.generate("a cat", save_result_path=out, progress=False)
    assert not out.exists()


def test_fp8_nan_and_infinity_bit_patterns_are_found():
    finite = torch.tensor([0.0, 1.0, -448.0, 448.0])
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        assert not has_non_finite(finite.to(dtype))
        assert has_non_finite(torch.cat([finite, torch.tensor([float("nan")])]).to(dtype))
    assert has_non_finite(torch.tensor([float("-inf")]).to(torch.float8_e5m2))
    assert not has_non_finite(torch.tensor([127, -128], dtype=torch.int8))


# --- LoRAs -------------------------------------------------------------------------------------------------------


def write_lora(path: Path, up_value: float = 0.01) -> Path:
    up = torch.full((128, 4), up_value)
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.full((4, 128), 0.01),
               "diffusion_model.blocks.0.self_attn.q.lora_up.weight": up}, str(path))
    return path


def test_lora_with_nan_is_refused_naming_the_lora(model, tmp_path):
    lora = write_lora(tmp_path / "nan_lora.safetensors", float("nan"))
    with pytest.raises(CheckpointError, match=r"nan_lora.safetensors: 1 tensor\(s\) hold NaN.*lora_up"):
        load(model, lora_configs=[{"path": str(lora)}])


@pytest.mark.parametrize("entry, message", [
    ({"strength": 1e40}, r"lora_configs\[0\].strength must be a number from -100 to 100 .*got 1e\+40"),
    ({"strength": float("nan")}, r"strength must be a number from -100 to 100"),
    ({"alpha": -1.0}, r"lora_configs\[0\].alpha must be a number from 0 to 100000 or null"),
])
def test_lora_strength_and_alpha_are_bounded(model, tmp_path, entry, message):
    lora = write_lora(tmp_path / "ok.safetensors")
    with pytest.raises(ConfigError, match=message):
        load(model, lora_configs=[{"path": str(lora), **entry}])


def test_a_lora_that_overflows_the_weights_when_merged_is_refused(model, tmp_path):
    lora = write_lora(tmp_path / "huge.safetensors", 1e38)  # finite; times 0.01 x 128 x strength 100: 1.3e40
    with pytest.raises(CheckpointError, match=r"huge.safetensors: merged into blocks.0.self_attn.q.weight, it gives "
                                              r"NaN or infinite values"):
        load(model, lora_configs=[{"path": str(lora), "strength": 100}], dtype=torch.bfloat16)


def test_load_lora_checks_strength_too(model, tmp_path):
    pipe = load(model)
    with pytest.raises(ValueError, match="strength must be a number from -100 to 100"):
        pipe.load_lora(write_lora(tmp_path / "ok.safetensors"), strength=1e40)


# --- the model's config.json --------------------------------------------------------------------------------------


@pytest.mark.parametrize("change, message", [
    ({"eps": -1}, r"eps must be a number between 0.0 and 0.1 .*got -1"),
    ({"num_heads": 0}, r"num_heads must be an integer from 1 to 1024, got 0"),
    ({"num_heads": 3}, r"num_heads 3 does not divide dim 128"),
    ({"text_len": 100000000}, r"text_len must be an integer from 1 to 4096, got 100000000"),
    ({"dim": "128"}, r"dim must be an integer from 1 to 65536, got '128'"),
    ({"vace_layers": ["a"]}, r"vace_layers must be a list of block numbers"),
])
def test_config_json_values_out_of_range_are_refused(model, change, message):
    config = model / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **change}))
    with pytest.raises(CheckpointError, match=rf"config.json: .*{message}"):
        load(model)


def test_a_config_json_that_is_a_list_is_refused(model):
    (model / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"config.json: a config.json holds one JSON object .*got list"):
        load(model)


def test_cli_says_each_in_one_line_with_exit_2(model, capsys):
    (model / "config.json").write_text(json.dumps({**json.loads((model / "config.json").read_text()),
                                                   "num_heads": 0}))
    status, err = run_cli("--model_path", str(model), "--prompt", "a cat", capsys=capsys)
    assert status == 2 and err.count("\n") == 1 and "num_heads must be an integer" in err


# --- sizes and outputs: refused before the compute ---------------------------------------------------------------


def test_a_size_memory_cannot_hold_is_refused_at_once(pristine, capsys):
    status, err = run_cli("--model_path", str(pristine), "--prompt", "a cat", "--height", "100000", "--width",
                          "100000", capsys=capsys)
    assert status == 2 and "needs at least" in err and "GiB for the activations alone" in err


@pytest.fixture
def no_compute(monkeypatch):
    """Fail the test if the denoising loop starts."""
    monkeypatch.setattr(Pipeline, "denoise", lambda *a, **k: pytest.fail("the compute ran"))


def test_an_output_path_that_is_a_folder_is_refused_before_the_compute(pristine, tmp_path, no_compute):
    with pytest.raises(ConfigError, match=rf"save_result_path {tmp_path} is a folder; name an .mp4 file"):
        load(pristine).generate("a cat", save_result_path=tmp_path, progress=False)


def test_an_output_under_a_file_is_refused_before_the_compute(pristine, tmp_path, no_compute):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"file is a file, not a folder"):
        load(pristine).generate("a cat", save_result_path=tmp_path / "file" / "out.mp4", progress=False)


def test_a_disk_without_room_is_refused_before_the_compute(pristine, tmp_path, no_compute, monkeypatch):
    monkeypatch.setattr(video.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10, 10, 0))
    with pytest.raises(ConfigError, match=r"has 0.0 MiB free, the video needs about"):
        load(pristine).generate("a cat", save_result_path=tmp_path / "out.mp4", progress=False)


def test_a_failed_mp4_write_keeps_the_frames_and_says_where(pristine, tmp_path, monkeypatch):
    def full_disk(frames, path, fps):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(video, "_write_mp4", full_disk)
    out = tmp_path / "out.mp4"
    pipe = load(pristine)
    with pytest.raises(X2VError, match=rf"{out}: the video could not be written \(No space left on device\); its "
                                       rf"frames are kept in {tmp_path / 'out.frames.npy'}"):
        pipe.generate("a cat", save_result_path=out, seed=3, progress=False)
    expected = pipe.generate("a cat", seed=3, progress=False).frames
    assert np.array_equal(np.load(tmp_path / "out.frames.npy"), expected)


# --- fuzz: hostile values for every config key --------------------------------------------------------------------

HOSTILE_VALUES = [None, True, False, 0, -1, 1, 7, 2**63, -2**63, 1e308, -1e308, float("nan"), float("inf"), 0.5, "",
                  "x", "../../etc/passwd", "/", [], [1], ["a"], [[]], {}, {"a": 1}, {"path": 1}, [{}], [None],
                  "a" * 10000, {"seq_p_size": "2"}, [1, 2, 3]]


def test_fuzz_settings_values_end_in_a_named_error_or_settings():
    """Every known config key with each hostile value, alone, through the settings and their check for a model:
    a ConfigError / ValueError naming the key (what the CLI prints as one line), or settings; nothing else."""
    from x2v.pipelines.config import KNOWN_KEYS
    from x2v.pipelines.settings import resolve_settings

    cases = 0
    for key in sorted(KNOWN_KEYS - {"model_cls", "task"}):
        for value in HOSTILE_VALUES:
            cases += 1
            try:
                resolve_settings(keywords={key: value, "model_cls": "wan2.1", "task": "t2v"})
            except (X2VError, ValueError) as e:
                assert str(e), (key, value)
    fuzz_report(f"fuzz: {cases} cases, no seed (every known key x {len(HOSTILE_VALUES)} values: settings)")


def test_fuzz_config_json_fields_end_in_a_named_error_or_fields():
    """Random hostile values in a DiT config.json (official and diffusers keys): fields within their ranges, or a
    CheckpointError naming the file; nothing else (no ZeroDivisionError, TypeError...)."""
    import random

    from x2v.formats.dit_keys import CONFIG_RANGES, DIFFUSERS_CONFIG_KEYS, OFFICIAL_CONFIG_KEYS, config_json_fields

    seed = 20261207
    rng = random.Random(seed)
    keys = [*OFFICIAL_CONFIG_KEYS, *DIFFUSERS_CONFIG_KEYS, "attention_head_dim", "patch_size", "vace_layers",
            "_class_name"]
    base = {"dim": 128, "num_heads": 4, "num_layers": 2, "eps": 1e-6, "text_len": 512}
    for _ in range(3000):
        raw = dict(base)
        for key in rng.sample(keys, rng.randint(1, 4)):
            raw[key] = rng.choice(HOSTILE_VALUES)
        try:
            fields = config_json_fields(raw, "my/config.json")
        except CheckpointError as e:
            assert str(e).startswith("my/config.json: ")
            continue
        for field, value in fields.items():
            if field in CONFIG_RANGES:
                low, high = CONFIG_RANGES[field]
                assert low <= value <= high, (field, value)
    fuzz_report(f"fuzz: 3000 cases, seed {seed} (config.json)")


def test_fuzz_lora_files_end_in_a_named_error_or_finite_weights(pristine, tmp_path):
    """Mutated LoRA files (renamed keys, wrong shapes and ranks, odd dtypes, alpha tensors of any value, diffs,
    extreme values) merged into and attached to a tiny DiT: a named error (CheckpointError / ValueError, what the
    CLI prints as one line), or weights that are all finite; nothing else."""
    import random

    from x2v.loading.dit import load_dit
    from x2v.loading.lora import LoraEntry, apply_loras, detach_loras
    from x2v.loading.weights import has_non_finite as not_finite

    seed = 7
    rng = random.Random(seed)
    torch.manual_seed(seed)
    dit = load_dit(pristine, dtype=torch.float32)
    bases = ["blocks.0.self_attn.q", "blocks.1.ffn.0", "blocks.0.cross_attn.o", "head.head", "text_embedding.0"]
    shapes = {name: tuple(dit.get_submodule(name).weight.shape) for name in bases}
    values = [0.0, 1e-3, 1.0, 1e30, -1e30]
    cases = 0
    for case in range(60):
        tensors = {}
        for base in rng.sample(bases, rng.randint(1, 3)):
            out_features, in_features = shapes[base]
            rank = rng.choice([1, 4, 0])
            up, down = torch.randn(out_features, rank), torch.randn(rank, in_features)
            mutation = rng.choice(["none", "transpose", "rank", "dtype", "alpha", "diff", "value", "rename"])
            if mutation == "transpose":
                up = up.T.contiguous()
            elif mutation == "rank":
                down = torch.randn(rank + 1, in_features)
            elif mutation == "dtype":
                up = up.to(rng.choice([torch.float16, torch.bfloat16, torch.int8, torch.float64]))
            elif mutation == "value":
                up = up * rng.choice(values)
            key = f"diffusion_model.{base}" if mutation != "rename" else f"diffusion_model.{base}.x{case}"
            tensors[f"{key}.lora_up.weight"], tensors[f"{key}.lora_down.weight"] = up, down
            if mutation == "alpha":
                tensors[f"{key}.alpha"] = torch.tensor(rng.choice([*values, -4.0, 4.0]))
            if mutation == "diff":
                tensors[f"{key}.diff"] = torch.randn(rng.choice([shapes[base], (3,)])) * rng.choice(values)
        path = tmp_path / f"lora{case}.safetensors"
        save_file(tensors, str(path))
        for dynamic in (False, True):
            cases += 1
            model = load_dit(pristine, dtype=torch.float32) if not dynamic else dit
            try:
                apply_loras(model, [LoraEntry(str(path), rng.choice([0.5, 1.0, -2.0]))], dynamic=dynamic)
            except (X2VError, ValueError) as e:
                assert str(e), path
                continue
            finally:
                if dynamic:
                    detach_loras(dit)
            if not dynamic:
                assert not any(not_finite(t) for t in model.state_dict().values()), path
    fuzz_report(f"fuzz: {cases} cases, seed {seed} (LoRA files)")


def test_inspect_values_names_non_finite_tensors(model, capsys):
    name = poison_safetensors(model / SHARD, float("nan"))
    assert x2v_main(["inspect", str(model)]) == 0  # headers only: the values are not read
    capsys.readouterr()
    assert x2v_main(["inspect", str(model), "--values"]) == 1
    assert f"1 tensor(s) hold NaN or infinite values ({name}): loading refuses them" in capsys.readouterr().out
