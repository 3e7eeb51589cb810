"""GPU checks of the paths the CPU tests cannot reach: x2v's Triton row kernels and 8-bit attention types on the
card, quantized loading and the 8-bit linears, the pipelines and expert swapping on CUDA, and offload.

Marked ``gpu``: a plain ``python -m pytest`` leaves them out (pyproject's addopts), and without CUDA they are
skipped. On a GPU machine (``benchmarks/gpu_session.sh``'s ``gpu_check`` step):

    python -m pytest -q -m gpu tests/test_gpu.py

The Triton kernels then run compiled for the card, not in the interpreter the CPU tests use (tests/conftest.py
drops its TRITON_INTERPRET default for a ``-m gpu`` run). Each tiny model kind generates on the GPU and on the CPU
in float32 (TF32 off) with the same seed (``noise_device: "cpu"`` gives both the same initial noise); the frames
must agree to a few uint8 levels. Figures seen on cards: docs/performance.md.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from ckpt_utils import relative_l2

GPU = "cuda"
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: torch.cuda.is_available() is False"),
]

SMALL = {"target_height": 64, "target_width": 64, "target_video_length": 9, "infer_steps": 4}
IMAGE = torch.linspace(-1, 1, 3 * 48 * 80).reshape(3, 48, 80)

# Standalone attention: lengths that are no multiple of the blocks, and large enough for the compiled quantization.
ATTENTION_SHAPES = [(1000, 700), (8200, 8200), (8200, 512)]
# x2v's 8-bit attention types with each precision option: (type, Q·K dtype, P·V in fp8, bound on the rel. L2 error
# to float32 SDPA). Random values with zero mean are fp8's worst case: ~4e-2 (sage_triton) and ~5e-2 (cudnn_fp8)
# expected (docs/performance.md).
ATTENTION_TYPES = [("sage_triton", "int8", True, 6e-2), ("sage_triton", "fp8", True, 8e-2),
                   ("sage_triton", "int8", False, 2e-2), ("cudnn_fp8", None, None, 8e-2)]
# A tiny DiT with the type for every attention vs with torch SDPA: bound on the output's rel. L2 difference.
DIT_ATTENTION = {"sage_triton": 5e-2, "cudnn_fp8": 8e-2}
EIGHT_BIT_LINEARS = {"fp8": 4e-2, "int8": 1.5e-2}  # vs per-layer dequantization
# kind -> (task, generate()'s inputs)
PIPELINES = {"t2v": (None, {}), "i2v": (None, {"image": IMAGE}), "moe_i2v": (None, {"image": IMAGE}),
             "ti2v": ("i2v", {"image": IMAGE}), "vace": (None, {})}
OFFLOAD_MODES = {"block": {}, "phase": {"offload_granularity": "phase"}, "model": {"offload_granularity": "model"},
                 "lazy_load block": {"lazy_load": True}}


@contextlib.contextmanager
def float32_matmuls():
    """TF32 off: the GPU's float32 is compared with the CPU's."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(autouse=True, scope="module")
def compiled_kernels():
    """x2v's Triton kernels must run compiled on the card, not in Triton's interpreter (what the CPU tests use)."""
    if os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes"):
        pytest.fail("TRITON_INTERPRET is set: x2v's Triton kernels would run in Triton's interpreter, not on the "
                    "card (tests/conftest.py drops its own default in a `-m gpu` run; unset it)", pytrace=False)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """kind -> a tiny random-weight model directory of that kind (x2v.demo), written once."""
    from x2v.demo import write_tiny_model

    root = tmp_path_factory.mktemp("tiny-models")
    return lambda kind: write_tiny_model(root / kind, kind)


@pytest.fixture(scope="module")
def inputs():
    """The checks' random inputs, on the CPU, each group from one generator in a fixed order (a test's figures do
    not depend on which other tests run): q, k, v and the k / v offsets of each attention shape, then each 8-bit
    type's DiT input (x, context); the 8-bit linears' DiT inputs."""
    from x2v.demo import TINY_DITS

    cfg = TINY_DITS["t2v"]
    g = torch.Generator().manual_seed(0)
    attention = {}
    for q_len, kv_len in ATTENTION_SHAPES:
        q, k, v = (torch.randn(1, n, 8, 128, generator=g) for n in (q_len, kv_len, kv_len))
        k_offset, v_offset = (torch.randn(1, 1, 8, 128, generator=g) for _ in range(2))
        attention[q_len, kv_len] = (q, k, v, k_offset, v_offset)
    dit_attention = {backend: (torch.randn(1, cfg.in_dim, 5, 32, 32, generator=g),
                               torch.randn(1, 30, cfg.text_dim, generator=g)) for backend in DIT_ATTENTION}
    g = torch.Generator().manual_seed(0)
    linears = {kind: (torch.randn(1, cfg.in_dim, 3, 16, 16, generator=g), torch.randn(1, 20, cfg.text_dim, generator=g))
               for kind in EIGHT_BIT_LINEARS}
    return {"attention": attention, "dit_attention": dit_attention, "linears": linears}


# ---- the row kernels

def row_kernel_cases(device: str, **shape) -> list:
    """benchmarks/row_kernel_speed.py's cases (what it times): each row kernel's call in a 14B block, on random
    inputs, as (label, the fused function, arguments)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.append(str(BENCHMARKS))
    from row_kernel_speed import cases

    return cases(device, **shape)


def row_kernel_labels() -> list:
    """The cases' labels, from tiny inputs on the CPU (collecting needs no GPU). If the cases cannot be built, one
    case: its test then fails with the reason."""
    try:
        return [label for label, _, _ in row_kernel_cases("cpu", tokens=4, width=256, ffn_width=256, heads=2)]
    except Exception:  # noqa: BLE001 - e.g. x2v mid-change: reported by the test, collection goes on
        return [pytest.param(None, id="cases-unavailable")]


@pytest.fixture(scope="module")
def row_cases():
    # a 480P latent frame's rows (2 x 32 x 52) at a 14B width
    return {label: (fused, args) for label, fused, args in row_kernel_cases(GPU, tokens=3328)}


@pytest.mark.parametrize("label", row_kernel_labels(),
                         ids=lambda label: label.replace(" ", "-") if isinstance(label, str) else None)
def test_row_kernel(label, row_cases):
    """x2v's one-pass row kernels at a 14B width against the functions they implement, run op by op on the card:
    both round to nearest, so 16- and 8-bit results differ only where float32 sums round differently."""
    from row_kernel_speed import definition_and_kernel, tensors_of

    fused, args = row_cases[label]
    definition, kernel = definition_and_kernel(fused)
    with torch.no_grad():
        got, want = kernel(*args), definition(*args)
    pairs = list(zip(tensors_of(got), tensors_of(want)))
    bound = 1e-2 if any(a.dtype.itemsize == 1 for a, _ in pairs) else 2e-3  # 8-bit outputs
    rel = max(relative_l2(a.float(), b.float()) for a, b in pairs)
    assert rel <= bound, f"row kernel {label}: rel. L2 to its definition {rel:.1e} (bound {bound})"


# ---- the 8-bit attention types

def attention_call(kind: str, qk: str | None, pv_fp8: bool | None):
    """The attention type with its precision options: (name, call(q, k, v))."""
    if kind == "cudnn_fp8":
        try:
            from x2v.ops.cudnn_fp8 import cudnn_fp8_attention
        except ImportError as e:
            pytest.fail(f"cudnn_fp8 does not import ({e}): carry the nvidia-cudnn-frontend wheel", pytrace=False)
        return "cudnn_fp8", cudnn_fp8_attention
    from x2v.ops import sage_triton as sage

    qk_dtype = torch.int8 if qk == "int8" else sage.FP8
    name = f"sage_triton QK {str(qk_dtype).split('.')[-1]} PV {'fp8' if pv_fp8 else 'bf16'}"
    return name, lambda q, k, v: sage.sage_attention(q, k, v, qk_dtype=qk_dtype, pv_fp8=pv_fp8)


@pytest.mark.parametrize("kind, qk, pv_fp8, bound", ATTENTION_TYPES,
                         ids=[kind + (f"-QK{qk}-PV{'fp8' if pv else 'bf16'}" if qk else "")
                              for kind, qk, pv, _ in ATTENTION_TYPES])
@pytest.mark.parametrize("q_len, kv_len", ATTENTION_SHAPES, ids=[f"{q}x{kv}" for q, kv in ATTENTION_SHAPES])
def test_attention_type(q_len, kv_len, kind, qk, pv_fp8, bound, inputs):
    """x2v's 8-bit attention types (``sage_triton``, ``cudnn_fp8``) alone against float32 SDPA, on keys and values
    with offsets shared by all tokens, as real ones have (both types remove them before rounding)."""
    from x2v.ops.attention import sdpa

    name, call = attention_call(kind, qk, pv_fp8)
    q, k, v, k_offset, v_offset = (t.to(GPU, torch.bfloat16) for t in inputs["attention"][q_len, kv_len])
    k, v = k + k_offset, v + v_offset
    want = sdpa(q.float(), k.float(), v.float())
    rel = relative_l2(call(q, k, v), want)
    assert rel <= bound, f"{name} {q_len}x{kv_len}: rel. L2 to float32 SDPA {rel:.2e} (bound {bound})"


@pytest.fixture(scope="module")
def dit_attention_runs(tiny_model, inputs):
    """type -> a bf16 tiny DiT's output with torch SDPA, with the type for every attention (eager), then in
    use_compile blocks, and whether the type's kernel ran each time (after a failure SDPA runs instead)."""
    runs = {}

    def run(backend: str) -> dict:
        if backend not in runs:
            from x2v.loading.dit import load_dit
            from x2v.ops import attention as attn
            from x2v.pipelines.wan import compile_blocks

            dit = load_dit(tiny_model("t2v"), device=GPU, dtype=torch.bfloat16)
            x, context = (t.to(GPU) for t in inputs["dit_attention"][backend])
            t = torch.tensor([700.0], device=GPU)
            with torch.no_grad():
                sdpa = dit(x, t, context).float()
                dit.set_attention(backend, backend, backend)
                eager = dit(x, t, context).float()
                eager_ran = backend not in attn.failed_types
                compile_blocks(dit, GPU)  # use_compile: the kernel inside compiled blocks
                compiled = dit(x, t, context)
            runs[backend] = {"sdpa": sdpa, "eager": eager, "eager_ran": eager_ran, "compiled": compiled,
                             "compiled_ran": backend not in attn.failed_types}
        return runs[backend]

    return run


@pytest.mark.parametrize("backend", DIT_ATTENTION)
def test_dit_attention(backend, dit_attention_runs):
    """A DiT with an 8-bit attention type against the same DiT with torch SDPA."""
    run, bound = dit_attention_runs(backend), DIT_ATTENTION[backend]
    rel = relative_l2(run["eager"], run["sdpa"])
    assert rel <= bound and run["eager_ran"], (f"DiT with {backend} attention vs torch SDPA: rel. L2 {rel:.2e} "
                                               f"(bound {bound}), kernel ran: {run['eager_ran']}")


@pytest.mark.parametrize("backend", DIT_ATTENTION)
def test_dit_attention_use_compile(backend, dit_attention_runs):
    """The 8-bit attention type inside use_compile blocks against eager."""
    run = dit_attention_runs(backend)
    rel = relative_l2(run["compiled"], run["eager"])
    assert rel <= 1e-2 and run["compiled_ran"], (f"DiT with {backend}, use_compile vs eager: rel. L2 {rel:.2e} "
                                                 f"(bound 0.01), kernel ran: {run['compiled_ran']}")


@pytest.fixture(scope="module")
def fp8_hand_over(tiny_model, inputs):
    """An fp8 DiT with cudnn_fp8: its output where each self-attention's fp8 output is converted before the
    o-projection (``unfused()``), where it is handed over as it is (eager, then in use_compile blocks), and how many
    times cuDNN's fp8 output was asked for."""
    from x2v.loading.dit import load_dit
    from x2v.ops import cudnn_fp8
    from x2v.ops.fused import unfused
    from x2v.pipelines.wan import compile_blocks

    dit = load_dit(tiny_model("t2v"), device=GPU, dit_quantized=True, quant_scheme="fp8-vllm")
    dit.set_attention("cudnn_fp8")
    x, context = (t.to(GPU) for t in inputs["dit_attention"]["cudnn_fp8"])
    t = torch.tensor([700.0], device=GPU)
    handed = []
    real = cudnn_fp8.cudnn_fp8_attention_fp8_output
    with pytest.MonkeyPatch.context() as patch, torch.no_grad():
        patch.setattr(cudnn_fp8, "cudnn_fp8_attention_fp8_output", lambda *a: handed.append(1) or real(*a))
        with unfused():
            converted = dit(x, t, context).float()
        eager = dit(x, t, context).float()
        compile_blocks(dit, GPU)
        compiled = dit(x, t, context).float()
    return {"converted": converted, "eager": eager, "use_compile": compiled, "calls": len(handed)}


@pytest.mark.parametrize("run", ["eager", "use_compile"])
def test_fp8_hand_over(run, fp8_hand_over):
    """cudnn_fp8's fp8 output taken as it is by the fp8 o-projection (on Hopper; 16-bit output elsewhere), within
    fp8 rounding of the path that converts it, eager and in use_compile blocks."""
    rel, calls = relative_l2(fp8_hand_over[run], fp8_hand_over["converted"]), fp8_hand_over["calls"]
    assert rel <= 1e-2 and calls > 0, (f"fp8 DiT, cudnn_fp8 output handed to the fp8 o-projection ({run}, {calls} "
                                       f"calls) vs converted: rel. L2 {rel:.2e} (bound 0.01)")


# ---- quantized loading and the 8-bit linears

def test_fp8_file_loads_straight_to_gpu(tiny_model, tmp_path):
    """An fp8 file (some layers fp8 with per-row scales) loaded straight to the GPU, dequantized there, equals the
    CPU load bit for bit."""
    from safetensors.torch import save_file

    from x2v.formats.readers import read_checkpoint
    from x2v.loading.dit import load_dit

    tensors = read_checkpoint(tiny_model("t2v") / "diffusion_pytorch_model.safetensors.index.json")
    quantized = {}
    for name, t in tensors.items():
        if name.startswith("blocks.") and name.endswith(("attn.q.weight", "ffn.0.weight")):
            scale = t.abs().amax(dim=1, keepdim=True) / 448
            quantized[name] = (t / scale).to(torch.float8_e4m3fn)
            quantized[name.replace(".weight", ".weight_scale")] = scale
        else:
            quantized[name] = t.contiguous()
    path = tmp_path / "fp8.safetensors"
    save_file(quantized, str(path))
    on_gpu = load_dit(path, dtype=torch.bfloat16, device=GPU).state_dict()
    on_cpu = load_dit(path, dtype=torch.bfloat16).state_dict()
    worst = max((on_gpu[k].cpu().float() - v.float()).abs().max().item() for k, v in on_cpu.items())
    assert worst == 0.0, f"fp8 file loaded straight to the GPU equals the CPU load (max diff {worst})"


@pytest.mark.parametrize("kind", EIGHT_BIT_LINEARS)
def test_8bit_linears(kind, tiny_model, inputs):
    """A float model quantized at load, run with the 8-bit kernels and with per-layer dequantization."""
    from x2v.loading.dit import load_dit
    from x2v.ops.quant_linear import set_quant_mode, w8a8_available

    bound = EIGHT_BIT_LINEARS[kind]
    dit = load_dit(tiny_model("t2v"), device=GPU, dit_quantized=True, quant_scheme=f"{kind}-vllm")
    x, context = (t.to(GPU) for t in inputs["linears"][kind])
    t = torch.tensor([700.0], device=GPU)
    outputs = {}
    with torch.no_grad():
        for mode in ("weight-only", "auto"):
            set_quant_mode(dit, mode)
            outputs[mode] = dit(x, t, context)
    rel = relative_l2(outputs["auto"], outputs["weight-only"])
    kernel = w8a8_available(kind, torch.device(GPU))
    assert rel <= bound and kernel, (f"{kind}: 8-bit kernel used: {kernel}; vs per-layer dequantization rel. L2 "
                                     f"{rel:.2e} (bound {bound})")


# ---- the pipelines on CUDA

@pytest.fixture(scope="module")
def pipeline_runs(tiny_model):
    """kind -> its tiny model generated on the GPU and on the CPU in float32 with the same seed: the uint8 frames
    of each, the GPU run's seconds, and each DiT's device after the GPU run."""
    runs = {}

    def run(kind: str) -> dict:
        if kind not in runs:
            from x2v.pipelines.wan import Pipeline

            task, extra = PIPELINES[kind]
            frames, seconds, placement = {}, None, None
            with float32_matmuls():
                for device in (GPU, "cpu"):
                    pipe = Pipeline.from_pretrained(tiny_model(kind), task=task, device=device, dtype=torch.float32,
                                                    noise_device="cpu", **SMALL)
                    start = time.perf_counter()
                    frames[device] = pipe.generate("a cat", seed=5, progress=False, **extra).frames.astype(int)
                    if device == GPU:
                        seconds = time.perf_counter() - start
                        placement = {name: next(m.parameters()).device.type for name, m in pipe.dits.items()}
                    del pipe
            runs[kind] = {"frames": frames, "seconds": seconds, "placement": placement}
        return runs[kind]

    return run


@pytest.mark.parametrize("kind", PIPELINES)
def test_pipeline_gpu_matches_cpu(kind, pipeline_runs):
    run = pipeline_runs(kind)
    diff = np.abs(run["frames"][GPU] - run["frames"]["cpu"])
    assert diff.max() <= 8 and diff.mean() < 1.0, (
        f"{kind}: GPU vs CPU frames max |diff| {diff.max()} mean {diff.mean():.3f} (uint8 levels; bounds 8 and "
        f"1.0), gpu run {run['seconds']:.2f} s")


def test_moe_only_active_expert_on_gpu(pipeline_runs):
    """Wan2.2's two experts: after sampling, only the one that ran last is on the GPU."""
    placement = pipeline_runs("moe_i2v")["placement"]
    assert list(placement.values()).count("cuda") == 1, f"moe_i2v: only the active expert on the GPU: {placement}"


@pytest.fixture(scope="module")
def resident_videos(tiny_model):
    """kind -> the video of its tiny model's pipeline with the weights resident on the GPU."""
    videos = {}

    def video(kind: str) -> torch.Tensor:
        if kind not in videos:
            from x2v.pipelines.wan import Pipeline

            with float32_matmuls():
                pipe = Pipeline.from_pretrained(tiny_model(kind), device=GPU, dtype=torch.float32, noise_device="cpu",
                                                **SMALL)
                videos[kind] = pipe.generate("a cat", seed=5, progress=False).video
        return videos[kind]

    return video


@pytest.mark.parametrize("mode", OFFLOAD_MODES, ids=lambda mode: mode.replace(" ", "-"))
@pytest.mark.parametrize("kind", ["t2v", "moe_t2v"])
def test_offload(kind, mode, tiny_model, resident_videos):
    """cpu_offload on the GPU (side stream, pinned memory, events): every granularity and lazy_load gives the
    resident pipeline's video exactly, and the DiT weights are back on the host after generating."""
    from x2v.pipelines.wan import Pipeline

    expected = resident_videos(kind)
    with float32_matmuls():
        pipe = Pipeline.from_pretrained(tiny_model(kind), device=GPU, dtype=torch.float32, noise_device="cpu",
                                        cpu_offload=True, **OFFLOAD_MODES[mode], **SMALL)
        diff = (pipe.generate("a cat", seed=5, progress=False).video - expected).abs().max().item()
    on_host = all(p.device.type == "cpu" for dit in pipe.dits.values() for p in dit.parameters())
    assert diff == 0 and on_host, (f"{kind} cpu_offload {mode}: max |diff| to resident {diff}, DiT back on the "
                                   f"host: {on_host}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_ring_attention_part(dtype):
    """The ring's attention over one K/V part with its log-sum-exp (torch's memory-efficient kernel on CUDA; the
    CPU tests run the CPU flash kernel) against the formula in float64."""
    from x2v.ops.sequence_parallel import attention_with_lse

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, 8, 128, generator=g) for n in (1000, 700, 700))
    out, lse = attention_with_lse(*(t.to(GPU, dtype) for t in (q, k, v)))
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / 128 ** 0.5
    expected = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.double())
    bound = 2e-2 if dtype == torch.bfloat16 else 1e-5
    assert relative_l2(out.cpu().double(), expected) < bound
    assert (lse.cpu().double() - scores.logsumexp(-1).transpose(1, 2)).abs().max() < 10 * bound


@pytest.mark.parametrize("kind", ["ulysses", "ring"])
def test_sequence_parallel_collectives_on_nccl(kind, tiny_model):
    """A one-rank NCCL group through a bf16 DiT (the one GPU a session has): the all-to-alls, the all-gather and the
    ring's kernel on CUDA give the plain forward's output."""
    import torch.distributed as dist

    from x2v.ops.sequence_parallel import SequenceParallel
    from x2v.pipelines.wan import Pipeline

    pipe = Pipeline.from_pretrained(tiny_model("t2v"), device=GPU, **SMALL)
    dit = next(iter(pipe.dits.values()))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 3, 14, 18, generator=g).to(GPU)
    context = [torch.randn(7, dit.config.text_dim, generator=g).to(GPU, torch.bfloat16)]
    t = torch.tensor([900.0], device=GPU)
    with torch.inference_mode():
        plain = dit(x, t, context)
        dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=torch.device(GPU, 0))
        try:
            dit.sequence_parallel = SequenceParallel(dist.group.WORLD, kind)
            split = dit(x, t, context)
        finally:
            dit.sequence_parallel = None
            dist.destroy_process_group()
    assert relative_l2(split.float(), plain.float()) < (1e-6 if kind == "ulysses" else 2e-2)
