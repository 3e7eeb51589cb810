"""End to end: every model class and task on a tiny official-layout model, written as mp4 and read back."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from x2v.demo import write_tiny_model
from x2v.pipelines import conditioning as cond
from x2v.pipelines.schedulers import make_scheduler
from x2v.pipelines.video import read_mp4
from x2v.pipelines.wan import HIGH, LOW, Pipeline

SMALL = dict(target_height=64, target_width=64, target_video_length=5, infer_steps=2)
IMAGE = torch.linspace(-1, 1, 3 * 48 * 80).reshape(3, 48, 80)  # a 48x80 (h x w) gradient picture
LAST = IMAGE.flip(-1)

# kind of tiny model -> (expected model_cls, task, inputs to generate, fps)
CASES = {
    "t2v": ("wan2.1", "t2v", {}, 16),
    "i2v": ("wan2.1", "i2v", {"image": IMAGE}, 16),
    "flf2v": ("wan2.1", "flf2v", {"image": IMAGE, "last_image": LAST}, 16),
    "vace": ("wan2.1_vace", "vace", {}, 16),
    "moe_t2v": ("wan2.2_moe", "t2v", {}, 16),
    "moe_i2v": ("wan2.2_moe", "i2v", {"image": IMAGE}, 16),
    "ti2v": ("wan2.2", "t2v", {}, 24),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {kind: write_tiny_model(root / kind, kind) for kind in list(CASES)}


def expected_size(kind: str, task: str) -> tuple[int, int]:
    if task in ("i2v", "flf2v"):
        return cond.i2v_size(48, 80, 64 * 64)
    return 64, 64


@pytest.mark.parametrize("kind", list(CASES))
def test_generates_a_video_deterministically(models, kind, tmp_path):
    model_cls, task, inputs, fps = CASES[kind]
    pipe = Pipeline.from_pretrained(models[kind], device="cpu", **SMALL)
    assert (pipe.model_cls, pipe.task) == (model_cls, task)
    out = pipe.generate("a cat on the grass", seed=3, save_result_path=tmp_path / "v.mp4", progress=False, **inputs)
    again = pipe.generate("a cat on the grass", seed=3, progress=False, **inputs)
    other = pipe.generate("a cat on the grass", seed=4, progress=False, **inputs)
    height, width = expected_size(kind, task)
    assert out.frames.shape == (5, height, width, 3) and out.frames.dtype == np.uint8
    np.testing.assert_array_equal(out.frames, again.frames)
    assert not np.array_equal(out.frames, other.frames)
    frames, read_fps = read_mp4(out.path)
    assert frames.shape == (5, height, width, 3) and read_fps == fps
    assert set(out.timings) >= {"load", "text encode", "denoise", "decode", "save"}


def test_ti2v_image_to_video_keeps_the_first_latent(models):
    pipe = Pipeline.from_pretrained(models["ti2v"], task="i2v", device="cpu", **SMALL)
    result = pipe.generate("a dog", image=IMAGE, seed=0, progress=False)
    w, h = cond.ti2v_size(80, 48, 64 * 64)
    assert result.frames.shape == (5, h, w, 3)
    # Frame 0 decodes from the image's own latent, so it does not depend on the seed.
    other = pipe.generate("a dog", image=IMAGE, seed=1, progress=False)
    np.testing.assert_array_equal(result.frames[0], other.frames[0])
    assert not np.array_equal(result.frames[1:], other.frames[1:])


def test_distilled_model_runs_four_steps_without_cfg(models, monkeypatch):
    pipe = Pipeline.from_pretrained(models["t2v"], "wan2.1_distill", device="cpu", **{**SMALL, "infer_steps": None})
    calls = []
    dit = pipe.dits["dit"]
    monkeypatch.setattr(dit, "forward", lambda *a, _f=dit.forward, **k: calls.append(a[1]) or _f(*a, **k))
    pipe.generate("a car", seed=0, progress=False)
    assert [float(t) for t in calls] == pytest.approx([1000.0, 937.5, 833.3333, 625.0], abs=1e-3)


def test_moe_expert_split_follows_the_boundary(models):
    pipe = Pipeline.from_pretrained(models["moe_t2v"], device="cpu", **SMALL)
    sampling = pipe.settings.for_request({"infer_steps": 40, "sample_shift": 12.0, "boundary": 0.875}).sampling
    scheduler = make_scheduler("unipc", 40, 12.0)
    experts = [pipe.expert_for(sampling, i, t) for i, t in enumerate(scheduler.timesteps)]
    assert experts.count(HIGH) == 26 and experts.count(LOW) == 14


def test_i2v_needs_an_image(models):
    pipe = Pipeline.from_pretrained(models["i2v"], device="cpu", **SMALL)
    with pytest.raises(ValueError, match="needs an image"):
        pipe.generate("a cat", progress=False)


def test_i2v_task_on_t2v_weights_is_refused(models):
    with pytest.raises(Exception, match="task i2v needs an image-to-video DiT"):
        Pipeline.from_pretrained(models["t2v"], task="i2v", device="cpu", **SMALL)


def test_official_i2v_size_rule():
    assert cond.i2v_size(480, 832, 832 * 480) == (464, 832)  # float64 edge case of the official code
    assert cond.i2v_size(720, 1280, 1280 * 720) == (720, 1280)
    assert cond.i2v_size(1000, 1000, 832 * 480) == (624, 624)


def test_i2v_and_flf2v_masks():
    mask = cond.i2v_mask(9, 2, 3)
    assert mask.shape == (4, 3, 2, 3)
    assert mask[:, 0].eq(1).all() and mask[:, 1:].eq(0).all()
    flf = cond.i2v_mask(9, 2, 3, last_frame=True)
    assert flf[3, -1].eq(1).all() and flf[:3, -1].eq(0).all()


def test_cli_with_lightx2v_config(models, tmp_path, capsys):
    from x2v.infer import main

    config = tmp_path / "wan_t2v.json"
    config.write_text("""{
        // LightX2V style: comments and a trailing comma
        "infer_steps": 2,
        "target_video_length": 5,
        "target_height": 64, "target_width": 64,  /* small */
        "sample_guide_scale": 5.0,
        "sample_shift": 5.0,
        "enable_cfg": true,
    }""")
    out = tmp_path / "cli.mp4"
    code = main(["--model_cls", "wan2.1", "--task", "t2v", "--model_path", str(models["t2v"]), "--config_json",
                 str(config), "--prompt", "a red car", "--seed", "7", "--save_result_path", str(out)])
    assert code == 0
    frames, fps = read_mp4(out)
    assert frames.shape == (5, 64, 64, 3) and fps == 16
    assert "5 frames 64x64 at 16 fps, seed 7" in capsys.readouterr().out


def test_vace_edits_a_source_video(models, tmp_path):
    from x2v.pipelines.video import write_mp4

    pipe = Pipeline.from_pretrained(models["vace"], device="cpu", **SMALL)
    source = np.zeros((5, 64, 64, 3), np.uint8)
    source[:, :, :32] = 200  # left half given
    mask = np.zeros((5, 64, 64, 3), np.uint8)
    mask[:, :, 32:] = 255  # right half generated
    write_mp4(source, tmp_path / "src.mp4", 16)
    write_mp4(mask, tmp_path / "mask.mp4", 16)
    edited = pipe.generate("a cat", src_video=tmp_path / "src.mp4", src_mask=tmp_path / "mask.mp4", seed=0,
                           progress=False)
    free = pipe.generate("a cat", seed=0, progress=False)
    assert edited.frames.shape == (5, 64, 64, 3)
    assert not np.array_equal(edited.frames, free.frames)  # the source video conditions the result


def test_vace_reference_images_are_extra_latent_frames(models):
    pipe = Pipeline.from_pretrained(models["vace"], device="cpu", **SMALL)
    inputs = pipe.prepare_inputs(pipe.settings.output, None, None, (None, None, [IMAGE]), {})
    assert inputs["ref_frames"] == 1 and inputs["shape"][2] == 2 + 1  # 5 frames -> 2 latent frames, + 1 reference
    assert inputs["vace_context"].shape == (1, 96, 3, 8, 8)
    assert inputs["vace_context"][:, 16:].narrow(2, 0, 1).eq(0).all()  # reference: no reactive part, zero mask
    with_ref = pipe.generate("a cat", src_ref_images=[IMAGE], seed=0, progress=False)
    without = pipe.generate("a cat", seed=0, progress=False)
    assert with_ref.frames.shape == without.frames.shape == (5, 64, 64, 3)  # the reference is not in the video
    assert not np.array_equal(with_ref.frames, without.frames)


def test_reference_image_fits_on_a_white_canvas():
    canvas = cond.fit_on_white(torch.zeros(3, 10, 40), 20, 20)  # wide image: 5 rows tall after scaling
    assert canvas.shape == (3, 20, 20)
    assert canvas[:, :7].eq(1).all() and canvas[:, 8:12].eq(0).all() and canvas[:, 13:].eq(1).all()


def test_wan22_distilled_experts_switch_by_step(models, monkeypatch):
    pipe = Pipeline.from_pretrained(models["moe_t2v"], "wan2.2_moe_distill", device="cpu",
                                    **{**SMALL, "infer_steps": None})
    used = []
    for name, dit in pipe.dits.items():
        monkeypatch.setattr(dit, "forward", lambda *a, _f=dit.forward, _n=name, **k: used.append(_n) or _f(*a, **k))
    result = pipe.generate("a car", seed=0, progress=False)
    assert used == [HIGH, HIGH, LOW, LOW]  # 4 steps, boundary_step_index 2, no CFG pass
    assert result.frames.shape == (5, 64, 64, 3)


def test_a_missing_lora_file_is_an_error_not_ignored(models):
    with pytest.raises(Exception, match="distill.safetensors.*LoRA file not found"):
        Pipeline.from_pretrained(models["t2v"], device="cpu", lora_configs=[{"path": "distill.safetensors"}], **SMALL)


def test_legacy_mm_type_quantizes_the_model(models, caplog):
    """LightX2V's old ``mm_config.mm_type`` reaches the loader: the DiT's block linears are 8-bit."""
    from x2v.ops.quant_linear import QuantLinear

    mm_type = "W-int8-channel-sym-A-int8-channel-sym-dynamic-Vllm"
    pipe = Pipeline.from_pretrained(models["t2v"], device="cpu", config_json={"mm_config": {"mm_type": mm_type}},
                                    **SMALL)
    assert isinstance(pipe.dits["dit"].blocks[0].self_attn.q, QuantLinear)
    assert pipe.dits["dit"].load_info["quantized"] == "int8"
    assert any("deprecated 'mm_config.mm_type'" in r.getMessage() for r in caplog.records)


def test_per_request_settings_are_read_as_in_a_config_file(models, caplog):
    pipe = Pipeline.from_pretrained(models["t2v"], device="cpu", **SMALL)
    result = pipe.generate("a cat", num_frames=9, infer_step=1, seed=0, progress=False)  # an alias and a typo
    assert result.frames.shape[0] == 9
    assert any("generate(): unknown config key 'infer_step' (did you mean 'infer_steps'?)" in r.getMessage()
               for r in caplog.records)
    with pytest.raises(ValueError, match=r"target_video_length 10 is not of the form 4k\+1"):
        pipe.generate("a cat", num_frames=10, progress=False)
    with pytest.raises(ValueError, match="cpu_offload cannot change per request"):
        pipe.generate("a cat", cpu_offload=True, progress=False)
    assert pipe.settings.output.frames == 5  # the pipeline's settings are as loaded


def test_image_inputs_raise_no_warning(tmp_path, recwarn):
    from PIL import Image

    from x2v.pipelines.video import load_image

    path = tmp_path / "frame.png"
    Image.fromarray(np.full((6, 4, 3), 200, np.uint8)).save(path)
    for image in (path, Image.open(path), np.asarray(Image.open(path))):
        assert load_image(image).shape == (3, 6, 4)
    assert not [w for w in recwarn if "not writable" in str(w.message)]


# Batched runs: float32 matmuls over B samples sum in another order than over one, so a batch's video equals the
# single runs' to float rounding (measured: at most 1.1e-5 on the [-1, 1] video), not bit for bit.
BATCH_TOLERANCE = 5e-5


@pytest.mark.parametrize("kind", ["t2v", "i2v", "ti2v", "moe_t2v", "vace"])
def test_a_batch_gives_the_videos_of_single_runs(models, kind):
    _, _, inputs, _ = CASES[kind]
    pipe = Pipeline.from_pretrained(models[kind], device="cpu", **SMALL)
    requests = [dict(prompt="a cat on the grass", seed=3, sample_guide_scale=5.0, **inputs),
                dict(prompt="a red car in the city at night", seed=9, sample_guide_scale=2.0,
                     negative_prompt="rain", **inputs)]
    batch = pipe.generate_batch(requests, progress=False)
    singles = [pipe.generate(progress=False, **request) for request in requests]
    for one, together in zip(singles, batch):
        assert together.seed == one.seed
        torch.testing.assert_close(together.video, one.video, rtol=0, atol=BATCH_TOLERANCE)
        assert np.abs(together.frames.astype(int) - one.frames).max() <= 1
    assert not torch.allclose(batch[0].video, batch[1].video, atol=1e-2)


def test_generate_takes_a_list_of_prompts(models, tmp_path):
    pipe = Pipeline.from_pretrained(models["t2v"], device="cpu", **SMALL)
    paths = [tmp_path / "a.mp4", tmp_path / "b.mp4"]
    results = pipe.generate(["a cat", "a dog"], seed=[1, 2], save_result_path=paths, progress=False)
    assert [r.seed for r in results] == [1, 2] and [r.path for r in results] == paths
    single = pipe.generate("a dog", seed=2, progress=False)
    torch.testing.assert_close(results[1].video, single.video, rtol=0, atol=BATCH_TOLERANCE)
    same_seed = pipe.generate(["a cat", "a dog"], seed=5, progress=False)
    assert [r.seed for r in same_seed] == [5, 5]
    with pytest.raises(ValueError, match="seed has 3 entries for 2 prompts"):
        pipe.generate(["a cat", "a dog"], seed=[1, 2, 3], progress=False)
    with pytest.raises(ValueError, match="several videos of one call would be written to"):
        pipe.generate(["a cat", "a dog"], save_result_path=tmp_path / "one.mp4", progress=False)


def test_requests_of_different_sizes_run_in_one_call(models):
    pipe = Pipeline.from_pretrained(models["t2v"], device="cpu", **SMALL)
    results = pipe.generate_batch([dict(prompt="a cat", seed=1), dict(prompt="a cat", seed=1, target_width=96),
                                   dict(prompt="a cat", seed=1, infer_steps=3)], progress=False)
    assert [r.frames.shape[2] for r in results] == [64, 96, 64]
    torch.testing.assert_close(results[0].video, pipe.generate("a cat", seed=1, progress=False).video,
                               rtol=0, atol=BATCH_TOLERANCE)


def test_progress_is_reported_and_a_callback_can_stop(models):
    from x2v.pipelines.wan import Cancelled

    pipe = Pipeline.from_pretrained(models["t2v"], device="cpu", **SMALL)
    seen = []
    pipe.generate("a cat", progress=False, on_progress=lambda *report: seen.append(report))
    assert seen == [("encode", 0, 1), ("denoise", 0, 2), ("denoise", 1, 2), ("decode", 0, 1)]
    with pytest.raises(Cancelled):
        pipe.generate("a cat", progress=False, on_progress=lambda phase, step, steps: phase == "denoise" and step == 1)


def test_cli_prompt_file_writes_one_video_per_prompt(models, tmp_path, capsys):
    from x2v.infer import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red car\n\n# a comment\na cat on the grass\na dog in the rain\n")
    code = main(["--model_path", str(models["t2v"]), "--prompt_file", str(prompts), "--batch_size", "2",
                 "--infer_steps", "2", "--target_video_length", "5", "--target_height", "64", "--target_width", "64",
                 "--seed", "7", "--save_result_path", str(tmp_path / "clip.mp4")])
    assert code == 0
    assert sorted(p.name for p in tmp_path.glob("clip-*.mp4")) == ["clip-1.mp4", "clip-2.mp4", "clip-3.mp4"]
    single = Pipeline.from_pretrained(models["t2v"], device="cpu", **SMALL).generate("a dog in the rain", seed=7,
                                                                                     progress=False)
    frames, _ = read_mp4(tmp_path / "clip-3.mp4")
    assert frames.shape == single.frames.shape
    assert capsys.readouterr().out.count("seed 7") == 3
