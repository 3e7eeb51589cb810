"""GPU checks of the paths CPU tests cannot reach: the row kernels and 8-bit attention on the card, pipelines,
expert swapping, quantized loading and offload on CUDA.

    python benchmarks/gpu_check.py [--out DIR]

Each tiny model kind generates on the GPU and on the CPU in float32 (TF32 off) with the same seed; the frames
must agree to a few uint8 levels (``noise_device: "cpu"`` gives both the same initial noise).
Prints one line per check and exits non-zero on a failure.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dit_step import relative_l2  # noqa: E402
from x2v.demo import write_tiny_model  # noqa: E402
from x2v.errors import first_line  # noqa: E402
from x2v.pipelines.wan import Pipeline, compile_blocks  # noqa: E402

SMALL = dict(target_height=64, target_width=64, target_video_length=9, infer_steps=4)
IMAGE = torch.linspace(-1, 1, 3 * 48 * 80).reshape(3, 48, 80)


def verdict(ok: bool, message: str, failure: str) -> list[str]:
    """Print one check's line, marked ok or FAIL; returns ``[failure]`` when it failed, else ``[]``."""
    print(f"{'ok ' if ok else 'FAIL'} {message}", flush=True)
    return [] if ok else [failure]


def check_pipelines(root: Path, gpu: str) -> list[str]:
    failures = []
    torch.backends.cuda.matmul.allow_tf32 = False  # compare float32 with float32
    torch.backends.cudnn.allow_tf32 = False
    for kind, task, inputs in (("t2v", None, {}), ("i2v", None, {"image": IMAGE}), ("moe_i2v", None, {"image": IMAGE}),
                               ("ti2v", "i2v", {"image": IMAGE}), ("vace", None, {})):
        model = write_tiny_model(root / kind, kind)
        frames = {}
        for device in (gpu, "cpu"):
            pipe = Pipeline.from_pretrained(model, task=task, device=device, dtype=torch.float32, noise_device="cpu",
                                            **SMALL)
            start = time.perf_counter()
            frames[device] = pipe.generate("a cat", seed=5, progress=False, **inputs).frames.astype(int)
            seconds = time.perf_counter() - start
            if kind.startswith("moe") and device == gpu:
                placement = {name: next(m.parameters()).device.type for name, m in pipe.dits.items()}
                ok = gpu == "cpu" or list(placement.values()).count("cuda") == 1
                failures += verdict(ok, f"{kind}: only the active expert on the GPU: {placement}",
                                    f"{kind} expert placement")
        diff = np.abs(frames[gpu] - frames["cpu"])
        ok = diff.max() <= 8 and diff.mean() < 1.0
        failures += verdict(ok, f"{kind}: GPU vs CPU frames max |diff| {diff.max()} mean {diff.mean():.3f} "
                                f"(uint8 levels), gpu run {seconds:.2f} s", kind)
    return failures


OFFLOAD_MODES = {"block": {}, "phase": {"offload_granularity": "phase"}, "model": {"offload_granularity": "model"},
                 "lazy_load block": {"lazy_load": True}}


def check_offload(root: Path, gpu: str) -> list[str]:
    """cpu_offload on the GPU (side stream, pinned memory, events): every granularity and lazy_load gives the
    resident pipeline's video exactly, and the DiT weights are back on the host after generating."""
    failures = []
    for kind in ("t2v", "moe_t2v"):
        model = write_tiny_model(root / kind, kind)
        common = dict(device=gpu, dtype=torch.float32, noise_device="cpu", **SMALL)
        expected = Pipeline.from_pretrained(model, **common).generate("a cat", seed=5, progress=False).video
        for mode, extra in OFFLOAD_MODES.items():
            pipe = Pipeline.from_pretrained(model, cpu_offload=True, **extra, **common)
            diff = (pipe.generate("a cat", seed=5, progress=False).video - expected).abs().max().item()
            on_host = all(p.device.type == "cpu" for dit in pipe.dits.values() for p in dit.parameters())
            ok = (diff == 0 or gpu == "cpu") and on_host  # CPU: unaligned file views round differently
            failures += verdict(ok, f"{kind} cpu_offload {mode}: max |diff| to resident {diff}, DiT back on the "
                                    f"host: {on_host}", f"{kind} offload {mode}")
    return failures


def check_quantized_load(root: Path, gpu: str) -> list[str]:
    from safetensors.torch import save_file

    from x2v.formats.readers import read_checkpoint
    from x2v.loading.dit import load_dit

    model = write_tiny_model(root / "t2v", "t2v")
    tensors = read_checkpoint(model / "diffusion_pytorch_model.safetensors.index.json")
    quantized = {}
    for name, t in tensors.items():
        if name.startswith("blocks.") and name.endswith(("attn.q.weight", "ffn.0.weight")):
            scale = t.abs().amax(dim=1, keepdim=True) / 448
            quantized[name] = (t / scale).to(torch.float8_e4m3fn)
            quantized[name.replace(".weight", ".weight_scale")] = scale
        else:
            quantized[name] = t.contiguous()
    path = root / "fp8.safetensors"
    save_file(quantized, str(path))
    on_gpu = load_dit(path, dtype=torch.bfloat16, device=gpu).state_dict()
    on_cpu = load_dit(path, dtype=torch.bfloat16).state_dict()
    worst = max((on_gpu[k].cpu().float() - v.float()).abs().max().item() for k, v in on_cpu.items())
    ok = worst == 0.0
    return verdict(ok, f"fp8 file loaded straight to the GPU equals the CPU load (max diff {worst})",
                   "quantized load") + check_8bit_kernels(model, gpu)


def check_8bit_kernels(model: Path, gpu: str) -> list[str]:
    """A float model quantized at load, run with the 8-bit kernels and with per-layer dequantization."""
    from x2v.loading.dit import load_dit
    from x2v.ops.quant_linear import set_quant_mode, w8a8_available

    failures = []
    g = torch.Generator().manual_seed(0)
    for kind, bound in (("fp8", 4e-2), ("int8", 1.5e-2)):
        dit = load_dit(model, device=gpu, dit_quantized=True, quant_scheme=f"{kind}-vllm")
        cfg = dit.config
        x = torch.randn(1, cfg.in_dim, 3, 16, 16, generator=g).to(gpu)
        context = torch.randn(1, 20, cfg.text_dim, generator=g).to(gpu)
        t = torch.tensor([700.0], device=gpu)
        outputs = {}
        with torch.no_grad():
            for mode in ("weight-only", "auto"):
                set_quant_mode(dit, mode)
                outputs[mode] = dit(x, t, context)
        rel = relative_l2(outputs["auto"], outputs["weight-only"])
        kernel = w8a8_available(kind, torch.device(gpu))
        ok = rel <= bound and (kernel or gpu == "cpu")
        failures += verdict(ok, f"{kind}: 8-bit kernel used: {kernel}; vs per-layer dequantization rel. L2 "
                                f"{rel:.2e} (bound {bound})", f"{kind} kernels")
    return failures


def check_row_kernels(gpu: str) -> list[str]:
    """x2v's one-pass row kernels at a 14B width against the functions they implement, run op by op on the card:
    both round to nearest, so 16- and 8-bit results differ only where float32 sums round differently."""
    from row_kernel_speed import cases, definition_and_kernel, tensors_of

    failures = []
    for label, fused, args in cases(gpu, tokens=3328):  # a 480P latent frame's rows (2 x 32 x 52)
        definition, kernel = definition_and_kernel(fused)
        with torch.no_grad():
            got, want = kernel(*args), definition(*args)
        pairs = list(zip(tensors_of(got), tensors_of(want)))
        bound = 1e-2 if any(a.dtype.itemsize == 1 for a, _ in pairs) else 2e-3  # 8-bit outputs
        rel = max(relative_l2(a.float(), b.float()) for a, b in pairs)
        failures += verdict(rel <= bound, f"row kernel {label}: rel. L2 to its definition {rel:.1e} (bound {bound})",
                            f"row kernel {label}")
    return failures


def attention_calls() -> list[tuple[str, object, float]]:
    """x2v's 8-bit attention types with each precision option: (name, call(q, k, v), bound on the rel. L2 error to
    float32 SDPA). Random values with zero mean are fp8's worst case: ~4e-2 (sage_triton) and ~5e-2 (cudnn_fp8)
    expected (docs/performance.md)."""
    from x2v.ops import sage_triton as sage

    calls = [(f"sage_triton QK {str(qk).split('.')[-1]} PV {'fp8' if pv else 'bf16'}",
              lambda q, k, v, qk=qk, pv=pv: sage.sage_attention(q, k, v, qk_dtype=qk, pv_fp8=pv), bound)
             for qk, pv, bound in ((torch.int8, True, 6e-2), (sage.FP8, True, 8e-2), (torch.int8, False, 2e-2))]
    try:
        from x2v.ops.cudnn_fp8 import cudnn_fp8_attention
    except ImportError as e:  # each cudnn_fp8 check then fails with it (carry the nvidia-cudnn-frontend wheel)
        def cudnn_fp8_attention(q, k, v, error=e):
            raise error
    return calls + [("cudnn_fp8", cudnn_fp8_attention, 8e-2)]


def check_attention_kernels(root: Path, gpu: str) -> list[str]:
    """x2v's 8-bit attention types (``sage_triton``, ``cudnn_fp8``) against float32 SDPA: alone, at lengths that
    are no multiple of the blocks and large enough for the compiled quantization, and inside a DiT (also in
    ``use_compile`` blocks)."""
    from x2v.loading.dit import load_dit
    from x2v.ops import attention as attn

    if gpu == "cpu":
        return []
    failures, calls = [], attention_calls()
    g = torch.Generator().manual_seed(0)
    for q_len, kv_len in ((1000, 700), (8200, 8200), (8200, 512)):
        q, k, v = (torch.randn(1, n, 8, 128, generator=g).to(gpu, torch.bfloat16) for n in (q_len, kv_len, kv_len))
        # offsets shared by all tokens, as real keys and values have (both 8-bit types remove them before rounding)
        k, v = (x + torch.randn(1, 1, 8, 128, generator=g).to(gpu, torch.bfloat16) for x in (k, v))
        want = attn.sdpa(q.float(), k.float(), v.float())
        for name, call, bound in calls:
            try:
                rel = relative_l2(call(q, k, v), want)
            except Exception as e:  # noqa: BLE001 - report which kernel or option does not run on this card
                rel, bound = float("nan"), f"{type(e).__name__}: {first_line(e)[:300]}"
            ok = rel <= bound if isinstance(bound, float) else False
            failures += verdict(ok, f"{name} {q_len}x{kv_len}: rel. L2 to float32 SDPA {rel:.2e} (bound {bound})",
                                f"{name} {q_len}x{kv_len}")
    model = write_tiny_model(root / "attention", "t2v")
    for backend, bound in (("sage_triton", 5e-2), ("cudnn_fp8", 8e-2)):
        dit = load_dit(model, device=gpu, dtype=torch.bfloat16)
        x = torch.randn(1, dit.config.in_dim, 5, 32, 32, generator=g).to(gpu)
        context = torch.randn(1, 30, dit.config.text_dim, generator=g).to(gpu)
        t = torch.tensor([700.0], device=gpu)
        with torch.no_grad():
            want = dit(x, t, context).float()
            dit.set_attention(backend, backend, backend)
            eager = dit(x, t, context).float()
            rel = relative_l2(eager, want)
            ok = rel <= bound and backend not in attn.failed_types
            failures += verdict(ok, f"DiT with {backend} attention vs torch SDPA: rel. L2 {rel:.2e}, kernel ran: "
                                    f"{backend not in attn.failed_types}", f"{backend} DiT")
            compile_blocks(dit, gpu)  # use_compile: the kernel inside compiled blocks
            rel = relative_l2(dit(x, t, context), eager)
        ok = rel <= 1e-2 and backend not in attn.failed_types
        failures += verdict(ok, f"DiT with {backend}, use_compile vs eager: rel. L2 {rel:.2e}",
                            f"{backend} use_compile")
    failures += check_fp8_hand_over(model, gpu, x, t, context)
    return failures


def check_fp8_hand_over(model: Path, gpu: str, x, t, context) -> list[str]:
    """An fp8 DiT with cudnn_fp8: each self-attention's output projection takes cuDNN's fp8 output as it is (on
    Hopper; 16-bit output elsewhere), within fp8 rounding of the path that converts it (``unfused()``), eager and
    in use_compile blocks."""
    from x2v.loading.dit import load_dit
    from x2v.ops import cudnn_fp8
    from x2v.ops.fused import unfused

    dit = load_dit(model, device=gpu, dit_quantized=True, quant_scheme="fp8-vllm")
    dit.set_attention("cudnn_fp8")
    handed = []
    real = cudnn_fp8.cudnn_fp8_attention_fp8_output
    cudnn_fp8.cudnn_fp8_attention_fp8_output = lambda *a: handed.append(1) or real(*a)
    failures = []
    try:
        with torch.no_grad():
            with unfused():
                want = dit(x, t, context).float()
            got = dit(x, t, context).float()
            compile_blocks(dit, gpu)
            compiled = dit(x, t, context).float()
    finally:
        cudnn_fp8.cudnn_fp8_attention_fp8_output = real
    for name, out in (("eager", got), ("use_compile", compiled)):
        rel = relative_l2(out, want)
        failures += verdict(rel <= 1e-2 and len(handed) > 0, f"fp8 DiT, cudnn_fp8 output handed to the fp8 "
                            f"o-projection ({name}, {len(handed)} calls) vs converted: rel. L2 {rel:.2e} (bound 0.01)",
                            f"fp8 hand-over {name}")
    return failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="where the tiny models go (default: a temp dir)")
    parser.add_argument("--device", default="cuda", help="cpu only to try the script itself")
    args = parser.parse_args()
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"device: {name}, torch {torch.__version__}")
    root = args.out or Path(tempfile.mkdtemp())
    failures = check_row_kernels(args.device) if args.device == "cuda" else []  # Triton: GPUs only
    failures += check_attention_kernels(root, args.device)
    failures += check_quantized_load(root, args.device) + check_pipelines(root, args.device) + check_offload(
        root, args.device)
    print("all GPU checks passed" if not failures else f"FAILED: {failures}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
