"""Many processes, one video: torchrun jobs on gloo (CPU) give the video one process gives.

The jobs run tests/parallel_worker.py (the Python API) or ``-m x2v.infer`` (the command line) under
``python -m torch.distributed.run``, with tiny models in the official layout; the single-process reference runs here.
The token count (3 latent frames x 7 x 9 patches = 189) divides by neither 2 nor 4: the last rank's part is padded.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from parallel_worker import generate_case
from safetensors.torch import save_file

from x2v.demo import write_tiny_model
from x2v.errors import ConfigError
from x2v.pipelines.settings import resolve_settings
from x2v.runtime.parallel import ParallelConfig, check_heads, check_world

WORKER = Path(__file__).with_name("parallel_worker.py")
SMALL = {"target_height": 112, "target_width": 144, "target_video_length": 9, "infer_steps": 3, "seed": 7,
         "prompt": "a red car on a city street"}
ULYSSES, RING = {"seq_p_size": 2, "seq_p_attn_type": "ulysses"}, {"seq_p_size": 2, "seq_p_attn_type": "ring"}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Tiny models with 4 attention heads (Ulysses splits them), and a LoRA for the t2v one."""
    root = tmp_path_factory.mktemp("parallel")
    kinds = ("t2v", "i2v", "flf2v", "vace", "ti2v", "moe_t2v", "moe_i2v")
    found = {kind: write_tiny_model(root / kind, kind, num_heads=4) for kind in kinds}
    g = torch.Generator().manual_seed(3)
    lora = {f"diffusion_model.blocks.{i}.self_attn.{name}.lora_{end}.weight": 0.1 * torch.randn(shape, generator=g)
            for i in (0, 1) for name in ("q", "o") for end, shape in (("down", (4, 128)), ("up", (128, 4)))}
    save_file(lora, str(root / "lora.safetensors"))
    found["lora"] = root / "lora.safetensors"
    picture = torch.linspace(0, 255, 3 * 48 * 80).reshape(48, 80, 3).to(torch.uint8).numpy()
    Image.fromarray(picture).save(root / "first.png")
    found["image"] = root / "first.png"
    return found


def torchrun(nproc: int, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node nproc ARGS``; on a timeout the whole job is killed (no stray ranks)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                          start_new_session=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def run_job(tmp_path: Path, nproc: int, cases: dict[str, dict]) -> dict[str, list[dict]]:
    """Every case on ``nproc`` ranks in one torchrun job: each rank's latents, video and frames per case."""
    job = [{**case, "model": str(case["model"]), "out": str(tmp_path / name)} for name, case in cases.items()]
    (tmp_path / "job.json").write_text(json.dumps({"cases": job}))
    done = torchrun(nproc, str(WORKER), str(tmp_path / "job.json"))
    assert done.returncode == 0, done.stderr[-3000:]
    return {name: [torch.load(tmp_path / f"{name}.rank{rank}.pt") for rank in range(nproc)] for name in cases}


def assert_same_video(ranks: list[dict], single: dict) -> None:
    """Latents within 1e-5 of the single run (relative to their largest value), frames within 1/255 (the VAE's
    float sums differ in the last bit with other thread counts); every rank holds the same video."""
    scale = single["latents"].abs().max()
    for got in ranks:
        assert (got["latents"] - single["latents"]).abs().max() <= 1e-5 * scale
        assert (got["frames"].int() - single["frames"].int()).abs().max() <= 1
        assert torch.equal(got["frames"], ranks[0]["frames"])


def test_two_ranks_give_the_single_process_video(models, tmp_path):
    lora = [{"path": str(models["lora"]), "strength": 0.8}]
    # docs/pitfalls.md#b05: an fp8 4-step distilled model under Ulysses
    distill = {"model_cls": "wan2.1_distill", "denoising_step_list": [1000, 750, 500, 250], "infer_steps": 4,
               "dit_quantized": True, "dit_quant_scheme": "fp8-vllm"}
    cases = {
        "ulysses": {"model": models["t2v"], "parallel": ULYSSES},
        "ring": {"model": models["t2v"], "parallel": RING},
        "cfg": {"model": models["t2v"], "parallel": {"cfg_p_size": 2}},
        "fsdp": {"model": models["t2v"], "parallel": {**ULYSSES, "fsdp": True}},
        "vae_parallel": {"model": models["t2v"], "parallel": {**RING, "vae_parallel": True}},
        "int8_fsdp": {"model": models["t2v"], "parallel": {**ULYSSES, "fsdp": True},
                      "settings": {"dit_quantized": True, "dit_quant_scheme": "int8-vllm"}},
        "dynamic_lora": {"model": models["t2v"], "parallel": RING,
                         "settings": {"lora_configs": lora, "lora_dynamic_apply": True}},
        "merged_lora_fsdp": {"model": models["t2v"], "parallel": {**RING, "fsdp": True},
                             "settings": {"lora_configs": lora}},
        "distill": {"model": models["t2v"], "parallel": ULYSSES, "settings": distill},
        "i2v": {"model": models["i2v"], "parallel": ULYSSES, "settings": {"image_path": str(models["image"])}},
        "flf2v": {"model": models["flf2v"], "parallel": RING, "settings": {"image_path": str(models["image"]),
                                                                           "last_frame_path": str(models["image"])}},
        "moe_i2v": {"model": models["moe_i2v"], "parallel": {"cfg_p_size": 2},
                    "settings": {"image_path": str(models["image"])}},
        "vace": {"model": models["vace"], "parallel": RING},
        "ti2v": {"model": models["ti2v"], "parallel": ULYSSES, "settings": {"target_height": 96,
                                                                            "target_width": 160}},
        "moe_fsdp": {"model": models["moe_t2v"], "parallel": {**ULYSSES, "fsdp": True}},
        "phase_offload": {"model": models["t2v"], "parallel": ULYSSES,
                          "settings": {"cpu_offload": True, "offload_granularity": "phase"}},
        "compiled": {"model": models["t2v"], "parallel": ULYSSES, "settings": {"use_compile": True}},
    }
    for case in cases.values():
        case["settings"] = {**SMALL, **case.get("settings", {})}
    ranks = run_job(tmp_path, 2, cases)
    for name, case in cases.items():
        plain = {key: value for key, value in case["settings"].items() if key != "use_compile"}  # saves a compile
        single = generate_case({**case, "model": str(case["model"]), "settings": plain})
        assert_same_video(ranks[name], single)
        if case["parallel"].get("fsdp"):  # each rank holds half the weights (shards are padded to equal size)
            assert all(abs(r["weights_held"] - single["weights_held"] / 2) <= 2048 for r in ranks[name]), name


def test_cfg_times_sequence_parallel_on_four_ranks(models, tmp_path):
    cases = {"cfg_ulysses": {"model": models["t2v"], "parallel": {**ULYSSES, "cfg_p_size": 2}},
             "cfg_ring_fsdp": {"model": models["t2v"], "parallel": {**RING, "cfg_p_size": 2, "fsdp": True}}}
    for case in cases.values():
        case["settings"] = SMALL
    ranks = run_job(tmp_path, 4, cases)
    single = generate_case({"model": str(models["t2v"]), "settings": SMALL})
    for name in cases:
        assert_same_video(ranks[name], single)


def test_torchrun_command_line_writes_one_video(models, tmp_path):
    """LightX2V's launch: torchrun ... -m x2v.infer --config_json with a parallel block. Rank 0 says the layout
    once and writes the mp4; the frames are the single run's."""
    import av

    config = tmp_path / "parallel.json"
    config.write_text(json.dumps({**SMALL, "parallel": {"seq_p_size": 2, "seq_p_attn_type": "ulysses"}}))
    done = torchrun(2, "-m", "x2v.infer", "--model_path", str(models["t2v"]), "--config_json", str(config),
                    "--save_result_path", str(tmp_path / "out.mp4"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("x2v parallel: 2 ranks = CFG 1 x ulysses 2, FSDP off, VAE decode on rank 0") == 1
    assert done.stdout.count("9 frames 144x112") == 1
    with av.open(str(tmp_path / "out.mp4")) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert len(frames) == 9 and frames[0].shape == (112, 144, 3)


def test_a_failing_rank_ends_the_job_with_its_error(models, tmp_path):
    """Rank 0 alone loads umT5; when its file is broken, rank 0 says so and the job ends instead of rank 1
    waiting for the prompt's states."""
    broken = shutil.copytree(models["t2v"], tmp_path / "broken")
    (broken / "models_t5_umt5-xxl-enc-bf16.pth").write_bytes(b"not a checkpoint")
    config = tmp_path / "parallel.json"
    config.write_text(json.dumps({**SMALL, "parallel": RING}))
    start = time.monotonic()
    done = torchrun(2, "-m", "x2v.infer", "--model_path", str(broken), "--config_json", str(config), timeout=120)
    assert done.returncode != 0 and time.monotonic() - start < 120
    assert "x2v: rank 0: error:" in done.stderr and "models_t5_umt5-xxl-enc-bf16.pth" in done.stderr


# --- misfits: refused before any weight is read --------------------------------------------------------------


def test_heads_that_ulysses_cannot_split_are_refused_at_launch(tmp_path):
    """The demo DiT has one attention head: Ulysses over 2 ranks is refused from the DiT's header, with the fix."""
    one_head = write_tiny_model(tmp_path / "one-head", "t2v")
    config = tmp_path / "parallel.json"
    config.write_text(json.dumps({**SMALL, "parallel": ULYSSES}))
    done = torchrun(2, "-m", "x2v.infer", "--model_path", str(one_head), "--config_json", str(config), timeout=120)
    assert done.returncode != 0
    assert "the model has 1 attention heads, which Ulysses cannot split over seq_p_size 2" in done.stderr
    assert "[rank0]" not in done.stderr and "[rank1]" not in done.stderr  # no rank's traceback, only x2v's line


def test_one_process_with_a_parallel_block_says_how_to_launch(tmp_path):
    import x2v

    with pytest.raises(ConfigError, match=r"seq_p_size 2 = 2 processes, but this is one process: launch it with "
                                          r"torchrun --nproc_per_node 2"):
        x2v.Pipeline.from_pretrained(tmp_path / "no-model-here", device="cpu", parallel=ULYSSES)  # checked first


@pytest.mark.parametrize("parallel, world, message", [
    ({"seq_p_size": 3}, 4, "cfg_p_size 1 x seq_p_size 3 = 3 processes, but the job has 4"),
    ({"seq_p_size": 2, "cfg_p_size": 2}, 2, "= 4 processes, but the job has 2"),
])
def test_world_size_must_be_the_product_of_the_sizes(parallel, world, message):
    config = resolve_settings(keywords={"parallel": parallel}).parallel
    with pytest.raises(ConfigError, match=message):
        check_world(config, world)


def test_heads_must_divide_for_ulysses_not_for_ring():
    with pytest.raises(ConfigError, match=r"12 attention heads, which Ulysses cannot split over seq_p_size 8: use "
                                          r"seq_p_attn_type \"ring\", or a seq_p_size that divides 12 \(2, 3, 4, 6"):
        check_heads(ParallelConfig(seq_size=8), 12, "dit.safetensors")
    check_heads(ParallelConfig(seq_size=8, seq_attention="ring"), 12, "dit.safetensors")
    check_heads(ParallelConfig(seq_size=4), 12, "dit.safetensors")


@pytest.mark.parametrize("parallel, extra, message", [
    ({"cfg_p_size": 3}, {}, "cfg_p_size must be 1 or 2"),
    ({"seq_p_size": 0}, {}, "seq_p_size must be a positive integer"),
    ({"seq_p_attn_type": "ulyses"}, {}, "seq_p_attn_type must be one of ulysses, ring"),
    ({"fsdp": "yes"}, {}, "fsdp must be true or false"),
    ({"seq_p_size": 2, "fsdp": True}, {"cpu_offload": True}, "fsdp shards .* use one of them"),
    ({"cfg_p_size": 2}, {"enable_cfg": False}, "cfg_p_size 2 runs the conditional and unconditional passes on "
                                                "different ranks, but CFG is off"),
    ({"cfg_p_size": 2}, {"model_cls": "wan2.1_distill"}, "but CFG is off for wan2.1_distill"),
])
def test_parallel_block_misfits(parallel, extra, message):
    with pytest.raises(ConfigError, match=message):
        resolve_settings(keywords={"parallel": parallel, "model_cls": "wan2.1", "task": "t2v", **extra})


def test_lightx2v_parallel_keys_x2v_does_not_run_are_said():
    settings = resolve_settings(keywords={"parallel": {"seq_p_size": 2, "tensor_p_size": 2, "seq_p_fp8_comm": True,
                                                       "seq_p_attn": "ring"}})
    warnings = "\n".join(settings.warnings)
    assert "parallel.tensor_p_size = 2 is ignored: tensor parallelism is not implemented" in warnings
    assert "parallel.seq_p_fp8_comm = true is ignored" in warnings
    assert "unknown key parallel.seq_p_attn (did you mean 'seq_p_attn_type'?)" in warnings
    assert settings.parallel == ParallelConfig(seq_size=2)


def test_two_parts_merged_by_their_log_sum_exp_are_the_whole_attention():
    """The ring's step: attention over keys [0, 300) and [300, 700) merged equals attention over all 700 (the
    formula in float64 as reference)."""
    from x2v.ops.sequence_parallel import attention_with_lse, merge_partial

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, 4, 32, generator=g) for n in (50, 700, 700))
    merged = merge_partial(*attention_with_lse(q, k[:, :300], v[:, :300]), *attention_with_lse(q, k[:, 300:],
                                                                                             v[:, 300:]))
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / 32 ** 0.5
    torch.testing.assert_close(merged[0].double(), torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.double()),
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(merged[1].double(), scores.logsumexp(-1).transpose(1, 2), rtol=0, atol=1e-5)
