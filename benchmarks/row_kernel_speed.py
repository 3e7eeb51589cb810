"""Time x2v's one-pass row kernels (``x2v.ops.row_kernels``) against the same functions compiled by Inductor (what
ran before them) at Wan 14B / 480P shapes: milliseconds per call and the memory speed each reaches, next to the
card's copy speed, and each kernel with 4, 8 and 16 warps (``row_kernels.WARPS``) next to its default.

    python benchmarks/row_kernel_speed.py [--tokens 32760] [--json out.json]
    TRITON_INTERPRET=1 python benchmarks/row_kernel_speed.py --device cpu --tokens 16 --iters 1   # smoke test

A kernel slower than its compiled function is switched off by dropping ``row_kernel=True`` from its ``fused_on_gpu``.
"""

from __future__ import annotations

import time

import torch
from harness import Results, add_json_argument, add_timing_arguments, make_parser, print_device, sync

from x2v.ops import norms, quant_linear, row_kernels
from x2v.ops.fused import COMPILE_OPTIONS
from x2v.ops.rope import rope_rotations

GRID_480P = (21, 30, 52)  # latent frames x patch rows x patch columns: 32,760 tokens


def cases(device: str, tokens: int = 32760, width: int = 5120, ffn_width: int = 13824, heads: int = 40,
          seed: int = 0) -> list[tuple[str, object, tuple]]:
    """Each row kernel's call in a 14B block, on random inputs: (label, the fused function, arguments). The
    function's ``__wrapped__`` is its definition, ``row_kernels``' function of the same name its kernel."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, dtype=torch.float32):
        return (scale * torch.randn(*shape, generator=g)).to(device, dtype)

    x, y = rand(1, tokens, width, scale=3.0), rand(1, tokens, width, dtype=torch.bfloat16)
    shift, scale, gate = rand(1, 1, 6, width).unbind(2)[:3]  # as the block slices e0
    weight, bias = rand(width), rand(width)
    frames = max(1, tokens // (GRID_480P[1] * GRID_480P[2]))
    grid = (frames, *GRID_480P[1:]) if frames * GRID_480P[1] * GRID_480P[2] == tokens else (1, 1, tokens)
    rope = rope_rotations(grid, width // heads, torch.device(device))
    act, ffn = rand(tokens, width, dtype=torch.bfloat16), rand(tokens, ffn_width, scale=2.0, dtype=torch.bfloat16)
    bf16, quantize = torch.bfloat16, quant_linear.quantize_activations
    return [("modulated_norm", norms.modulated_norm, (x, shift, scale, 1e-6, bf16)),
            ("residual_modulated_norm", norms.residual_modulated_norm, (x, y, shift, scale, 1e-6, bf16)),
            ("gated_residual_layer_norm", norms.gated_residual_layer_norm, (x, y, gate, weight, bias, 1e-6, bf16)),
            # with fp8 layers after them: quantized per row in the same pass
            ("modulated_norm fp8", norms.modulated_norm, (x, shift, scale, 1e-6, bf16, "fp8")),
            ("residual_modulated_norm fp8", norms.residual_modulated_norm, (x, y, shift, scale, 1e-6, bf16, "fp8")),
            ("gated_residual_layer_norm fp8", norms.gated_residual_layer_norm,
             (x, y, gate, weight, bias, 1e-6, bf16, "fp8")),
            ("rms_norm_rope", norms.rms_norm_rope, (y, weight.abs(), 1e-6, heads, rope, bf16)),
            ("rms_norm", norms.rms_norm_rope, (y, weight.abs(), 1e-6, heads, None, bf16)),
            ("rms_norm_rope_fp8", norms.rms_norm_rope_fp8, (y, weight.abs(), 1e-6, heads, rope)),  # cudnn_fp8's Q
            ("quantize_activations fp8", quantize, (act, "fp8", False)),
            ("quantize_activations fp8 gelu", quantize, (ffn, "fp8", True)),
            ("quantize_activations int8", quantize, (act, "int8", False))]


def definition_and_kernel(fused) -> tuple[object, object]:
    """A fused function's definition (the Python function) and its row kernel."""
    return fused.__wrapped__, getattr(row_kernels, fused.__name__)


def tensors_of(out) -> list[torch.Tensor]:
    """A function's output tensors, nested tuples flattened."""
    return [t for o in out for t in tensors_of(o)] if isinstance(out, tuple) else [out]


def moved_bytes(args: tuple, out) -> int:
    """Bytes a one-pass kernel must move: the activation-sized inputs read once, the outputs written once."""
    outputs = tensors_of(out)
    rows = args[0].numel() // args[0].shape[-1]
    big = [a for a in args if isinstance(a, torch.Tensor) and a.numel() >= rows]
    return sum(t.numel() * t.element_size() for t in (*big, *outputs) if t.numel() >= rows)


def seconds_per_call(fn, args: tuple, iters: int, device: str) -> float:
    for _ in range(2):  # compiles / JIT-builds, then warms up
        fn(*args)
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn(*args)
    sync(device)
    return (time.perf_counter() - start) / iters


def copy_speed(device: str, iters: int) -> float:
    """The card's device-to-device copy speed in bytes per second (read + write counted), 1 GiB."""
    a = torch.empty(1 << 28, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    return 2 * a.numel() * 4 / seconds_per_call(lambda: b.copy_(a), (), iters, device)


def main() -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tokens", type=int, default=32760)
    add_timing_arguments(parser, iters=20, warmup=None)
    parser.add_argument("--warps", type=int, nargs="*", default=[4, 8, 16], help="also time the kernels with these")
    add_json_argument(parser)
    args = parser.parse_args()
    card = print_device(args.device)
    results = Results(args.json)
    if args.device == "cuda":
        speed = copy_speed(args.device, args.iters)
        print(f"copy: {speed / 1e12:.2f} TB/s", flush=True)
        results.add(dict(card=card, copy_tb_s=speed / 1e12))
    for label, fused, call_args in cases(args.device, args.tokens):
        definition, kernel = definition_and_kernel(fused)
        compiled = torch.compile(definition, dynamic=False, options=COMPILE_OPTIONS)
        times = {}
        with torch.no_grad():
            moved = moved_bytes(call_args, kernel(*call_args))
            times["inductor"] = seconds_per_call(compiled, call_args, args.iters, args.device)
            times["kernel"] = seconds_per_call(kernel, call_args, args.iters, args.device)  # its default warps
            for warps in args.warps:
                row_kernels.WARPS = warps
                times[f"kernel {warps}w"] = seconds_per_call(kernel, call_args, args.iters, args.device)
            row_kernels.WARPS = None
        result = dict(case=label, tokens=args.tokens, moved_gb=moved / 1e9,
                      **{f"{name} ms": t * 1e3 for name, t in times.items()},
                      **{f"{name} TB/s": moved / t / 1e12 for name, t in times.items()})
        print(f"{label:>30} ({moved / 1e6:.0f} MB): " + ", ".join(
            f"{name} {t * 1e3:.3f} ms ({moved / t / 1e12:.2f} TB/s)" for name, t in times.items()), flush=True)
        results.add(result)  # after each case: a run cut short still leaves what it measured


if __name__ == "__main__":
    main()
