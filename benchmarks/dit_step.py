"""Time one DiT forward at real shapes, x2v next to diffusers' WanTransformer3DModel, same weights, same run.

    python benchmarks/dit_step.py                      # 1.3B and 14B, 480P 81 frames (32,760 tokens), bf16
    python benchmarks/dit_step.py --sizes tiny --device cpu --frames 5 --height 64 --width 64   # smoke test

With ``--quant fp8 int8`` (the default on a GPU) x2v also runs the same weights quantized per output channel
(as ``dit_quantized: true`` + ``dit_quant_scheme`` does at load), 8-bit matmuls where the card has them.

Weights are random (the timing does not depend on them). Both models share the same weight tensors
(x2v's names are a renaming of diffusers'), so a 14B pair needs one copy of the weights on the GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from x2v.formats.dit_keys import diffusers_key_to_official  # noqa: E402
from x2v.formats.quant import FLOAT  # noqa: E402
from x2v.loading.quantized import prepare_quantized  # noqa: E402
from x2v.loading.weights import assign_weights, build_on_meta  # noqa: E402
from x2v.models.wan_dit import FP32_PARAMS, WanDiT, WanDiTConfig  # noqa: E402
from x2v.pipelines.wan import compile_blocks  # noqa: E402

SIZES = {
    "tiny": WanDiTConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2),
    "1.3B": WanDiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "14B": WanDiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
}


def diffusers_model(cfg: WanDiTConfig, dtype: torch.dtype, device: str):
    """diffusers' model with random weights, made on meta and filled on the device (no slow CPU init)."""
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        model = WanTransformer3DModel(
            patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
            in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
            ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
            eps=cfg.eps,
        )
    model = model.to_empty(device=device).to(dtype)
    generator = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=generator)
        # As from_pretrained(torch_dtype=bf16) does: these modules stay in float32.
        for name, p in model.named_parameters():
            if any(part in name.split(".") for part in model._keep_in_fp32_modules):
                p.data = p.data.float()
    return model.eval()


def x2v_model(cfg: WanDiTConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype, device: str,
              quant: str | None = None) -> WanDiT:
    """x2v's model over the same tensors (renamed; only the small float32 ones are copied), or quantized to
    ``quant`` ("fp8"/"int8") the way load_dit quantizes a float file."""
    official = {diffusers_key_to_official(k): v for k, v in weights.items()}
    model = build_on_meta(lambda: WanDiT(cfg))
    official = prepare_quantized(model, official, FLOAT, quantize_kind=quant, component="dit", dtype=dtype,
                                 device=device, keep_fp32=FP32_PARAMS)
    return assign_weights(model, official, dtype=dtype, device=device, keep_fp32=FP32_PARAMS)


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


def latent_input(args: argparse.Namespace, device: str) -> tuple[tuple[int, ...], int]:
    """The Wan2.1 latent shape and token count of ``--frames/--height/--width``, printed with the device."""
    latent = (1, 16, (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8)
    tokens = latent[2] * (latent[3] // 2) * (latent[4] // 2)
    print(f"device: {torch.cuda.get_device_name() if device.startswith('cuda') else 'cpu'}, torch {torch.__version__}")
    print(f"input: {args.height}x{args.width}, {args.frames} frames -> latent {latent[1:]}, {tokens} tokens")
    return latent, tokens


def timed_alternating(fns, warmup: int, iters: int, device: str) -> list[float]:
    """Mean seconds of each function, run in turns (a, b, a, b, ...) so clock and thermal drift hit both alike."""
    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(warmup):
        for fn in fns:
            fn()
    totals = [0.0] * len(fns)
    for _ in range(iters):
        for i, fn in enumerate(fns):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            totals[i] += time.perf_counter() - start
    return [t / iters for t in totals]


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


def add_input_arguments(parser: argparse.ArgumentParser) -> None:
    """Model sizes, video shape and device (shared with benchmarks/offload.py)."""
    parser.add_argument("--sizes", nargs="+", default=["1.3B", "14B"], choices=list(SIZES))
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_input_arguments(parser)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--quant", nargs="*", choices=["fp8", "int8"],
                        default=["fp8", "int8"] if torch.cuda.is_available() else [],
                        help="also time x2v with these 8-bit linear layers (default on a GPU: fp8 int8)")
    parser.add_argument("--attention", default="torch_sdpa",
                        help="x2v's attention type (LightX2V's self_attn_1_type values, e.g. flash_attn3, sage_attn2)")
    parser.add_argument("--compile", action="store_true", help="x2v with use_compile (compiled blocks)")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--profile", type=int, nargs="?", const=18, default=0, metavar="ROWS",
                        help="print the top operators of one forward of each (default 18 rows)")
    args = parser.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    device = args.device

    latent, tokens = latent_input(args, device)
    results = []
    for size in args.sizes:
        cfg = SIZES[size]
        reference = diffusers_model(cfg, dtype, device)
        models = {"diffusers": lambda x, t, c: reference(x, t, c, return_dict=False)[0]}
        for quant in [None, *args.quant]:
            model = x2v_model(cfg, reference.state_dict(), dtype, device, quant)
            model.set_attention(args.attention, args.attention, args.attention)
            if args.compile:
                compile_blocks(model, device)
            models[f"x2v {quant or args.dtype}"] = model
        g = torch.Generator(device).manual_seed(1)
        x = torch.randn(latent, generator=g, device=device, dtype=dtype)
        context = torch.randn(1, 512, cfg.text_dim, generator=g, device=device, dtype=dtype)
        t = torch.tensor([900], device=device)

        with torch.inference_mode():
            ref_out = models["diffusers"](x, t, context).float()
            rel = {}
            for name, model in list(models.items())[1:]:
                rel[name] = ((model(x, t, context) - ref_out).norm() / ref_out.norm()).item()
            del ref_out
            runs = [lambda m=m: m(x, t, context) for m in models.values()]
            times = dict(zip(models, timed_alternating(runs, args.warmup, args.iters, device)))
            if args.profile:
                for name, run in zip(models, runs):
                    profile(name, run, args.profile)
        flops = forward_flops(cfg, tokens)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
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
        del reference, models, runs, x, context
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    assert all(math.isfinite(r["rel_diff_to_diffusers"]) for r in results)


if __name__ == "__main__":
    main()
