"""Time one DiT forward at real shapes, x2v next to diffusers' WanTransformer3DModel, same weights, same run.

    python benchmarks/dit_step.py                      # 1.3B and 14B, 480P 81 frames (32,760 tokens), bf16
    python benchmarks/dit_step.py --sizes tiny --device cpu --frames 5 --height 64 --width 64   # smoke test

``--variants`` picks the x2v configurations (default: bf16, and on a GPU fp8 and int8: the same weights quantized
per output channel, as ``dit_quantized: true`` + ``dit_quant_scheme`` does at load), e.g.
``--variants bf16 bf16-unfused bf16-inductor bf16-compiled fp8 fp8-inductor fp8-cudnn_fp8``;
``--attention-check sage_triton cudnn_fp8`` also times the attention kernels alone with their accuracy (for
``sage_triton`` each candidate tiling at the self-attention's shape: this run's variants then use the fastest);
``--attention-check ... --variants`` (no names) runs only that check.

Weights are random (the timing does not depend on them). Both models share the same weight tensors
(x2v's names are a renaming of diffusers'), so a 14B pair needs one copy of the weights on the GPU.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from functools import partial

import torch
from harness import (
    SIZES,
    Results,
    add_input_arguments,
    add_json_argument,
    add_timing_arguments,
    diffusers_forward,
    diffusers_model,
    dit_inputs,
    free_memory,
    latent_input,
    make_parser,
    peak_gib,
    relative_l2,
    timed_alternating,
    x2v_model,
)

from x2v.errors import first_line
from x2v.models.wan_dit import WanDiT, WanDiTConfig
from x2v.ops.attention import TORCH_SDPA, attention, failed_types, kernel
from x2v.ops.fused import compiled_only, unfused
from x2v.pipelines.wan import compile_blocks


def forward_flops(cfg: WanDiTConfig, tokens: int, text_tokens: int = 512) -> float:
    d, f = cfg.dim, cfg.ffn_dim
    per_block = (
        2 * tokens * d * d * 4  # self-attention q, k, v, o
        + 4 * tokens * tokens * d  # self-attention scores and weighted sum
        + 2 * tokens * d * d * 2 + 2 * text_tokens * d * d * 2  # cross-attention projections
        + 4 * tokens * text_tokens * d  # cross-attention
        + 2 * tokens * d * f * 2  # FFN
    )
    return cfg.num_layers * per_block


def profile(name: str, fn, rows: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with torch_profile(activities=activities) as prof:
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    print(f"--- {name}: top operators by self time")
    print(prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=60))


@dataclass
class Variant:
    """An x2v configuration to time: WEIGHTS[-OPTION...], e.g. ``bf16``, ``bf16-unfused``, ``fp8-sage_attn2``."""

    name: str
    weights: str  # the compute dtype's name, "fp8" or "int8"
    # self-attention's type; cross-attention (512 keys) stays SDPA: an 8-bit kernel would first quantize its 32,760
    # queries (two passes over 335 MB, ~0.3 ms), half of what the whole bf16 cross-attention takes (0.6 ms)
    attention: str = TORCH_SDPA
    compiled: bool = False  # use_compile: blocks compiled whole
    unfused: bool = False  # the norms op by op (what x2v did before they were fused), to show what fusing gains
    # the fused functions compiled by Inductor instead of x2v's one-pass row kernels, to show what the row kernels
    # gain
    inductor: bool = False

    @classmethod
    def parse(cls, name: str, dtype_name: str) -> Variant:
        weights, *options = name.split("-")
        if weights not in (dtype_name, "fp8", "int8"):
            raise SystemExit(f"variant {name!r}: weights must be {dtype_name}, fp8 or int8")
        variant = cls(name, weights)
        for option in options:
            if option in ("compiled", "unfused", "inductor"):
                setattr(variant, option, True)
            else:
                kernel(option)  # an attention type: unknown ones fail here
                variant.attention = option
        return variant

    def runner(self, model: WanDiT):
        def run(x, t, context):
            model.set_attention(self.attention)  # models are shared by variants
            with contextlib.ExitStack() as options:
                if self.unfused:
                    options.enter_context(unfused())
                if self.inductor:
                    options.enter_context(compiled_only())
                return model(x, t, context)
        return run


def attention_check(backends: list[str], cfg: WanDiTConfig, tokens: int, device: str, iters: int) -> list[dict]:
    """Each attention type on random q/k/v of the self-attention's shape and of the cross-attention's (512 text
    tokens): seconds per call and relative L2 to float32 and bf16 SDPA (the 8-bit kernels' accuracy). On a GPU
    also each of torch SDPA's own kernels, to see whether torch picks the fastest."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = torch.Generator(device).manual_seed(2)
    results, tiling_of = [], {}
    for shape, kv_tokens in (("self", tokens), ("cross", 512)):
        q, k, v = (torch.randn(1, n, cfg.num_heads, cfg.head_dim, generator=g, device=device, dtype=torch.bfloat16)
                   for n in (tokens, kv_tokens, kv_tokens))
        # each kernel called itself, so that one which fails says so instead of falling back to SDPA
        calls = {b: partial(kernel(b) or attention, q, k, v) for b in backends}
        if "sage_triton" in backends and device.startswith("cuda") and shape == "self":  # where its speed counts
            sage_calls, tiling_of = sage_triton_calls(q, k, v)
            calls.update(sage_calls)
        if device.startswith("cuda"):
            for name in ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION"):
                def forced(backend=getattr(SDPBackend, name)):
                    with sdpa_kernel(backend):
                        return attention(q, k, v)
                calls[f"sdpa {name.split('_')[0].lower()}"] = forced
        measured = []
        with torch.inference_mode():
            want, bf16 = attention(q.float(), k.float(), v.float()), attention(q, k, v)
            for name, call in list(calls.items()):
                try:
                    out = call()
                except Exception as e:  # noqa: BLE001 - a kernel this card, shape or installation does not have
                    print(f"{shape} attention {name:>14}: not run ({type(e).__name__}: {first_line(e)})", flush=True)
                    del calls[name]
                    continue
                measured.append(dict(attention=name, shape=shape, tokens=tokens, kv_tokens=kv_tokens,
                                     rel_l2_to_fp32=relative_l2(out, want), rel_l2_to_bf16_sdpa=relative_l2(out, bf16)))
            seconds = timed_alternating(list(calls.values()), 1, iters, device)
        flops = 4 * tokens * kv_tokens * cfg.dim
        for r, s in zip(measured, seconds):
            r.update(seconds=s, tflops=flops / s / 1e12)
            print(f"{shape} attention {r['attention']:>30}: {s * 1e3:.2f} ms ({r['tflops']:.0f} TFLOP/s), rel. L2 "
                  f"to float32 SDPA {r['rel_l2_to_fp32']:.1e}, to bf16 SDPA {r['rel_l2_to_bf16_sdpa']:.1e}", flush=True)
        results += measured
    tilings = [r for r in results if r["shape"] == "self" and r["attention"] in tiling_of]
    if tilings:  # the DiT variants below run the fastest
        from x2v.ops import sage_triton

        sage_triton.TILING = tiling_of[min(tilings, key=lambda r: r["seconds"])["attention"]]
        print(f"sage_triton tiling for the rest of this run: {sage_triton.TILING}", flush=True)
    return results


def sage_triton_calls(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[dict, dict]:
    """x2v's 8-bit kernel with each candidate tiling (names -> calls, names -> tilings), and with fp8 Q·K or
    bf16 P·V instead of int8 / fp8."""
    from x2v.ops import sage_triton as sage

    calls, tiling_of = {}, {}
    for tiling in sage.CANDIDATES:
        name = f"sage_triton {tiling.block_m}/{tiling.block_n}/{tiling.num_warps}w/{tiling.num_stages}s"
        tiling_of[name] = tiling
        calls[name] = lambda tiling=tiling: sage.sage_attention(q, k, v, tiling)
    calls["sage_triton fp8 QK"] = lambda: sage.sage_attention(q, k, v, qk_dtype=sage.FP8)
    calls["sage_triton bf16 PV"] = lambda: sage.sage_attention(q, k, v, pv_fp8=False)
    return calls, tiling_of


def main() -> None:
    parser = make_parser(__doc__)
    add_input_arguments(parser)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    add_timing_arguments(parser, warmup_help="untimed runs of each after the accuracy run")
    parser.add_argument("--variants", nargs="*", metavar="VARIANT",
                        help="x2v configurations next to diffusers: WEIGHTS[-OPTION...] with WEIGHTS the dtype "
                             "(bf16), fp8 or int8, and options 'compiled' (use_compile), 'unfused' (norms op by op) "
                             "or a self-attention type (sage_triton, cudnn_fp8 ...). Default: bf16, and fp8 int8 on "
                             "a GPU; none (the option alone): only the attention check, no forward")
    parser.add_argument("--attention-check", nargs="*", metavar="TYPE",
                        help="also time these attention types alone (torch_sdpa always) at the self- and "
                             "cross-attention's shapes, with their accuracy against float32 and bf16 SDPA")
    add_json_argument(parser)
    parser.add_argument("--profile", type=int, nargs="?", const=18, default=0, metavar="ROWS",
                        help="print the top operators of one forward of each")
    args = parser.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    device = args.device
    default = [args.dtype] + (["fp8", "int8"] if device.startswith("cuda") else [])
    variants = [Variant.parse(name, args.dtype) for name in (default if args.variants is None else args.variants)]

    latent, tokens = latent_input(args, device)
    results = Results(args.json)
    for size in args.sizes:
        cfg = SIZES[size]
        if args.attention_check is not None:
            results.add(*attention_check([TORCH_SDPA, *args.attention_check], cfg, tokens, device, args.iters))
        if not variants:
            continue
        reference = diffusers_model(cfg, dtype, device)
        models = {"diffusers": diffusers_forward(reference)}
        shared: dict[str, WanDiT] = {}  # one model per weight kind for the variants that do not compile
        for variant in variants:
            quant = None if variant.weights == args.dtype else variant.weights
            if variant.compiled or variant.weights not in shared:
                model = x2v_model(cfg, reference.state_dict(), dtype, device, quant)
                if variant.compiled:
                    compile_blocks(model, device)
                else:
                    shared[variant.weights] = model
            models[f"x2v {variant.name}"] = variant.runner(model if variant.compiled else shared[variant.weights])
        variant_of = {f"x2v {variant.name}": variant for variant in variants}
        x, t, context = dit_inputs(cfg, latent, dtype, device)

        with torch.inference_mode():
            ref_out = models["diffusers"](x, t, context).float()
            rel, first = {}, None
            for name, model in list(models.items())[1:]:  # also the first (compiling) run of each
                try:
                    out = model(x, t, context).float()
                except Exception as e:  # noqa: BLE001 - one failing variant must not cost the others' figures
                    print(f"{size} {name}: FAILED, not timed: {type(e).__name__}: {first_line(e)}")
                    del models[name]
                    continue
                if variant_of[name].attention in failed_types:
                    print(f"{size} {name}: attention {variant_of[name].attention} failed: this ran torch SDPA")
                rel[name] = relative_l2(out, ref_out)
                first = out if first is None else first
                print(f"{size} {name}: rel. L2 to diffusers {rel[name]:.1e}, to {list(models)[1]} "
                      f"{relative_l2(out, first):.1e}", flush=True)
            ref_out = out = first = None  # freed before timing
            runs = [partial(m, x, t, context) for m in models.values()]
            times = dict(zip(models, timed_alternating(runs, args.warmup, args.iters, device, list(models))))
            if args.profile:
                for name, run in zip(models, runs):
                    profile(name, run, args.profile)
        flops = forward_flops(cfg, tokens)
        peak = peak_gib(device)
        line = [f"{size:>5}: diffusers {args.dtype} {times['diffusers']:.3f} s"]
        for name, seconds in times.items():
            ratio = seconds / times["diffusers"]
            results.append(dict(size=size, tokens=tokens, model=name, seconds=seconds, ratio_to_diffusers=ratio,
                                tflops=flops / seconds / 1e12, rel_diff_to_diffusers=rel.get(name, 0.0),
                                peak_gib_all_models=peak))
            if name != "diffusers":
                line.append(f"{name} {seconds:.3f} s ({ratio:.3f}x, {flops / seconds / 1e12:.0f} TFLOP/s, "
                            f"rel. L2 {rel[name]:.1e})")
        print(" | ".join(line), flush=True)
        del reference, models, runs, shared, x, t, context
        free_memory(device, reset_peak=True)
        results.save()  # after each size: a run cut short still leaves what it measured
    assert all(math.isfinite(r.get("rel_diff_to_diffusers", 0.0)) for r in results)


if __name__ == "__main__":
    main()
