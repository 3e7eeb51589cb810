"""Denoising steps over many GPUs (``x2v.runtime.parallel``): measured under torchrun, or predicted by a model.

Measure: one process per GPU, launched by torchrun; rank 0 prints and writes ``--json``::

    torchrun --nproc_per_node 8 benchmarks/parallel.py --sizes 14B --resolutions 480p 720p --dtypes bf16 fp8 \\
        --layouts ulysses ring cfg2-ulysses cfg2-ring ulysses-fsdp --json parallel.json
    python benchmarks/parallel.py --sizes 14B --resolutions 480p 720p --dtypes bf16 fp8   # the one-GPU baseline
    python -m torch.distributed.run --standalone --nproc_per_node 2 benchmarks/parallel.py --device cpu \\
        --sizes tiny --resolutions tiny --dtypes fp32 --layouts ulysses ring cfg2 ulysses-fsdp --iters 2  # smoke

A layout is ``[cfg2-][ulysses|ring][-fsdp]``: ``cfg2`` runs the conditional and unconditional passes on two halves
of the ranks (``cfg_p_size`` 2), ``ulysses`` / ``ring`` splits the video tokens over the ``world / cfg`` ranks of
each half (``seq_p_size``, ``seq_p_attn_type``), ``fsdp`` shards the DiT's weights over all ranks. A layout whose
cfg x seq is not the job's world size is skipped; one process runs the plain path (``single``) instead. Each
layout builds the DiT at its real shape with random weights (the same seed on every rank; ``fp8``: the block
linears quantized per output channel as ``dit_quant_scheme`` fp8 does at load), splits it with
``Layout.parallelize`` and times ``--warmup`` + ``--iters`` denoising steps. A step is the CFG pair of forwards
as ``Pipeline.velocity`` runs it (that very method is called). Reported per layout: seconds per step (the slowest
rank's mean) and the peak GPU memory allocated during the steps (the largest over the ranks).

Predict (``--model``, no GPU): the scaling model, for N = ``--gpus`` (2 4 8)::

    python benchmarks/parallel.py --model --sizes 14B --resolutions 480p 720p --one-gpu-step-s 5.43 \\
        --link-gbps 150 20

N GPUs = C x S: C = 2 with cfg2 (each rank runs 1 forward per step), else 1 (each rank runs both: 2 forwards);
S ranks split the L video tokens, chunk = ceil(L / S) each. D = dim, b = ``--element-bytes`` (bf16: 2; fp8
weights still exchange bf16 activations), P = prod(patch_size) x out_dim = 64, K = num_layers. Bytes each rank
sends per step::

    Ulysses, per self-attention:  4 x chunk x D x b x (S - 1) / S     (q, k, v to head shards, the output back)
    ring, per self-attention:     (S - 1) x 2 x chunk x D x b         (its K/V part passed on S - 1 times)
    per forward:  K x self-attention + (S - 1) x chunk x P x 4        (the float32 head output, all-gathered)
                  [+ fsdp: (N - 1) / N x the weights' bytes, gathered block by block]
    per step:     (2 / C) x per forward + (C - 1) x L x P x 4         (cfg2: the other rank's float32 velocity)

    predicted step = T1 / N + bytes / bandwidth,   speed-up = T1 / predicted step,   efficiency = speed-up / N

T1 is ``--one-gpu-step-s``, the measured one-GPU step (two forwards with CFG) at ``--measured-at``; other
resolutions get T1 scaled by the FLOP ratio of ``dit_step.forward_flops`` (derived, not measured). The compute is
assumed to split evenly and the communication not to overlap it (conservative: ring passes K/V while it attends,
FSDP2 gathers the next block ahead). Not modelled: the collectives' latency, ring's per-part attention kernel
(torch's memory-efficient one, with a log-sum-exp merge) being slower than the one-GPU kernel, padding's extra
compute, and imbalance between ranks.
"""

from __future__ import annotations

import math
import time
from functools import partial
from types import SimpleNamespace

import torch
import torch.distributed as dist
from harness import (
    SIZES,
    Results,
    add_json_argument,
    add_timing_arguments,
    default_device,
    free_memory,
    gib,
    make_parser,
    print_device,
    sync,
)

from x2v.errors import ConfigError
from x2v.models.wan_dit import WanDiT, WanDiTConfig
from x2v.runtime import parallel
from x2v.runtime.parallel import ParallelConfig

RESOLUTIONS = {  # name: (frames, height, width)
    "tiny": (9, 64, 64),  # the CPU smoke check: 3 latent frames x 4 x 4 = 48 tokens
    "480p": (81, 480, 832),  # 21 x 30 x 52 = 32,760 tokens
    "720p": (81, 720, 1280),  # 21 x 45 x 80 = 75,600 tokens
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp8": torch.bfloat16}
SINGLE = "single"  # the plain one-process path
FLOAT32 = 4  # bytes: the head output and the velocity are float32


# ---- shapes

def latent_shape(cfg: WanDiTConfig, resolution: str) -> tuple[int, ...]:
    frames, height, width = RESOLUTIONS[resolution]
    return 1, cfg.in_dim, (frames - 1) // 4 + 1, height // 8, width // 8


def token_count(cfg: WanDiTConfig, resolution: str) -> int:
    _, _, frames, height, width = latent_shape(cfg, resolution)
    pt, ph, pw = cfg.patch_size
    return (frames // pt) * (height // ph) * (width // pw)


def layout_config(name: str, world: int) -> ParallelConfig | None:
    """The ``parallel`` block of layout ``name`` on ``world`` ranks; None where it does not fit them. With one
    rank per CFG branch (cfg2 on 2 ranks) the attention kind does not matter: it is left at ulysses."""
    parts = name.split("-")
    kinds = [p for p in parts if p in ("ulysses", "ring")]
    if set(parts) - {"cfg2", "ulysses", "ring", "fsdp"} or len(kinds) > 1:
        return None
    cfg_size = 2 if "cfg2" in parts else 1
    seq_size = world // cfg_size
    if world < 2 or world % cfg_size or (seq_size > 1 and not kinds):
        return None
    return ParallelConfig(seq_size=seq_size, seq_attention=kinds[0] if seq_size > 1 else "ulysses",
                          cfg_size=cfg_size, fsdp="fsdp" in parts)


def layout_name(config: ParallelConfig | None) -> str:
    """The layout's name as given to ``--layouts`` (``single``: one process)."""
    if config is None:
        return SINGLE
    parts = (["cfg2"] if config.cfg_size == 2 else []) + ([config.seq_attention] if config.seq_size > 1 else [])
    return "-".join(parts + (["fsdp"] if config.fsdp else []))


# ---- the scaling model: bytes each rank sends per step

def ulysses_bytes(tokens: int, dim: int, seq: int, element_bytes: int) -> float:
    """One self-attention: q, k, v to head shards and the output back, (S - 1) / S of each rank's chunk each."""
    return 4 * math.ceil(tokens / seq) * dim * element_bytes * (seq - 1) / seq


def ring_bytes(tokens: int, dim: int, seq: int, element_bytes: int) -> float:
    """One self-attention: the rank's K and V chunk passed on S - 1 times."""
    return (seq - 1) * 2 * math.ceil(tokens / seq) * dim * element_bytes


def head_gather_bytes(tokens: int, seq: int, out_per_token: int) -> float:
    """The end of a forward: the float32 head output of the S - 1 other chunks."""
    return (seq - 1) * math.ceil(tokens / seq) * out_per_token * FLOAT32


def forward_bytes(cfg: WanDiTConfig, tokens: int, config: ParallelConfig, element_bytes: int,
                  weight_bytes: float = 0.0) -> float:
    """One DiT forward on one rank (``weight_bytes``: the whole model's, gathered with fsdp)."""
    seq = config.seq_size
    if seq == 1:
        attention = 0.0
    elif config.seq_attention == "ulysses":
        attention = ulysses_bytes(tokens, cfg.dim, seq, element_bytes)
    else:
        attention = ring_bytes(tokens, cfg.dim, seq, element_bytes)
    out_per_token = math.prod(cfg.patch_size) * cfg.out_dim
    fsdp = weight_bytes * (config.world_size - 1) / config.world_size if config.fsdp else 0.0
    return cfg.num_layers * attention + head_gather_bytes(tokens, seq, out_per_token) + fsdp


def step_bytes(cfg: WanDiTConfig, tokens: int, config: ParallelConfig, element_bytes: int,
               weight_bytes: float = 0.0) -> float:
    """One denoising step with CFG on one rank: its forwards, and with cfg2 the other rank's velocity."""
    forwards = 2 // config.cfg_size
    velocity = (config.cfg_size - 1) * tokens * math.prod(cfg.patch_size) * cfg.out_dim * FLOAT32
    return forwards * forward_bytes(cfg, tokens, config, element_bytes, weight_bytes) + velocity


def predict(one_gpu_step: float, n: int, bytes_per_step: float, link_gbps: float) -> dict:
    """The step time on ``n`` GPUs: the compute split evenly, the communication added (not overlapped)."""
    comm = bytes_per_step / (link_gbps * 1e9)
    step = one_gpu_step / n + comm
    return {"comm_s": comm, "step_s": step, "speedup": one_gpu_step / step, "efficiency": one_gpu_step / (n * step)}


def weight_bytes_of(cfg: WanDiTConfig, element_bytes: int) -> float:
    from x2v.loading.weights import build_on_meta

    return sum(p.numel() for p in build_on_meta(lambda: WanDiT(cfg)).parameters()) * element_bytes


def run_model(args) -> None:
    from dit_step import forward_flops

    results = Results(args.json)
    print(f"scaling model: one-GPU step {args.one_gpu_step_s} s (with CFG) at {args.measured_at}, "
          f"{args.element_bytes}-byte activations")
    print("| size | resolution | tokens | one-GPU step s | link GB/s | layout | N | C x S | GB/rank/step | comm s "
          "| predicted s/step | speed-up | efficiency |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        cfg = SIZES[size]
        weights = weight_bytes_of(cfg, args.element_bytes) if any("fsdp" in n for n in args.layouts) else 0.0
        base_flops = forward_flops(cfg, token_count(cfg, args.measured_at))
        for resolution in args.resolutions:
            tokens = token_count(cfg, resolution)
            one_gpu = args.one_gpu_step_s * forward_flops(cfg, tokens) / base_flops
            derived = "" if resolution == args.measured_at else " (derived)"
            for link in args.link_gbps:
                seen = set()
                for n in args.gpus:
                    for name in args.layouts:
                        config = layout_config(name, n)
                        if config is None or config in seen:
                            continue
                        seen.add(config)
                        label = layout_name(config)  # cfg2-ulysses on 2 GPUs is cfg2
                        try:
                            parallel.check_heads(config, cfg.num_heads, size)
                        except ConfigError:
                            print(f"| {size} | {resolution} | {tokens} | | {link:g} | {label} | {n} | | Ulysses: "
                                  f"{cfg.num_heads} heads do not divide by {config.seq_size} | | | | |")
                            continue
                        sent = step_bytes(cfg, tokens, config, args.element_bytes, weights)
                        p = predict(one_gpu, n, sent, link)
                        print(f"| {size} | {resolution} | {tokens} | {one_gpu:.2f}{derived} | {link:g} | {label} | "
                              f"{n} | {config.cfg_size} x {config.seq_size} | {sent / 1e9:.2f} | {p['comm_s']:.3f} | "
                              f"{p['step_s']:.3f} | {p['speedup']:.2f}x | {p['efficiency']:.0%} |")
                        results.append(dict(size=size, resolution=resolution, tokens=tokens, one_gpu_step_s=one_gpu,
                                            one_gpu_step_derived=bool(derived), link_gbps=link, layout=label, gpus=n,
                                            cfg_size=config.cfg_size, seq_size=config.seq_size,
                                            bytes_per_rank_per_step=sent, **p))
    results.save()


# ---- measurement

def random_dit(cfg: WanDiTConfig, dtype_name: str, device: torch.device) -> WanDiT:
    """The DiT of ``cfg`` on ``device`` with random weights (seed 0, so every rank has the same), the block
    linears quantized for ``fp8`` the way load_dit quantizes a float file."""
    from x2v.formats.quant import FLOAT
    from x2v.loading.quantized import prepare_quantized
    from x2v.loading.weights import assign_weights, build_on_meta
    from x2v.models.wan_dit import FP32_PARAMS

    dtype = DTYPES[dtype_name]
    model = build_on_meta(lambda: WanDiT(cfg))
    generator = torch.Generator(device).manual_seed(0)
    tensors = {}
    for name, p in model.state_dict().items():
        tensor = torch.empty(p.shape, dtype=dtype, device=device)
        if "norm" in name:  # norms as initialised: weight 1, bias 0
            tensors[name] = tensor.fill_(1.0 if name.endswith("weight") else 0.0)
        else:
            tensors[name] = tensor.normal_(0.0, 0.02, generator=generator)
    tensors = prepare_quantized(model, tensors, FLOAT, quantize_kind="fp8" if dtype_name == "fp8" else None,
                                component="dit", dtype=dtype, device=device, keep_fp32=FP32_PARAMS)
    return assign_weights(model, tensors, dtype=dtype, device=device, keep_fp32=FP32_PARAMS)


def step_inputs(cfg: WanDiTConfig, resolution: str, dtype: torch.dtype, device: torch.device):
    """Float32 latents, timestep 900 and the two umT5 contexts (512 tokens each) of CFG; seed 1 on every rank."""
    g = torch.Generator(device).manual_seed(1)
    x = torch.randn(latent_shape(cfg, resolution), generator=g, device=device)
    contexts = [torch.randn(512, cfg.text_dim, generator=g, device=device, dtype=dtype) for _ in range(2)]
    return x, torch.tensor([900.0], device=device), contexts


def largest_over_ranks(value: float, layout: parallel.Layout | None) -> float:
    if layout is None:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=layout.comm_device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.item()


def timed_steps(step, layout: parallel.Layout | None, device: torch.device, warmup: int, iters: int) -> dict:
    """``step()`` run ``warmup`` times, then ``iters`` times timed: the mean seconds of the slowest rank, the peak
    memory allocated meanwhile on the rank that used most (None off CUDA), and whether the velocity is finite."""
    with torch.inference_mode():
        for _ in range(warmup):
            step()
        sync(device.type)
        free_memory(device.type, reset_peak=True)
        if layout is not None:
            dist.barrier()
        start = time.perf_counter()
        for _ in range(iters):
            velocity = step()
        sync(device.type)
        seconds = largest_over_ranks((time.perf_counter() - start) / iters, layout)
    peak = gib(largest_over_ranks(torch.cuda.max_memory_allocated(device), layout)) if device.type == "cuda" else None
    return {"step_s": seconds, "peak_gib": peak, "finite": bool(velocity.isfinite().all())}


def measure(cfg: WanDiTConfig, dtype_name: str, config: ParallelConfig | None, args) -> list[dict]:
    """Steps of the DiT of ``cfg`` split as ``config`` says (None: one process), at each resolution."""
    from x2v.pipelines.wan import Pipeline

    layout = parallel.start(config, torch.device(args.device)) if config is not None else None
    device = layout.device if layout is not None else torch.device(args.device)
    dit = random_dit(cfg, dtype_name, device)
    if layout is not None:
        layout.parallelize(dit)
    dit.set_attention(args.attention)
    pipe = SimpleNamespace(layout=layout)  # all that Pipeline.velocity reads of its pipeline
    rows = []
    for resolution in args.resolutions:
        x, t, contexts = step_inputs(cfg, resolution, DTYPES[dtype_name], device)
        step = partial(Pipeline.velocity, pipe, dit, x, t, contexts, {}, 5.0)  # guidance scale 5
        rows.append({"resolution": resolution, "tokens": token_count(cfg, resolution),
                     **timed_steps(step, layout, device, args.warmup, args.iters)})
    return rows


def job_layouts(names: list[str], world: int, heads: int, size: str, main: bool) -> list[ParallelConfig | None]:
    """The layouts of ``names`` that this job can run, each once (None: the plain path of one process)."""
    if world == 1:
        return [None]
    configs = []
    for name in names:
        config = layout_config(name, world)
        try:
            if config is None:
                raise ConfigError(f"not a layout for {world} processes")
            parallel.check_heads(config, heads, size)
        except ConfigError as e:
            if main:
                print(f"{size} {name}: skipped: {e}", flush=True)
            continue
        if config not in configs:
            configs.append(config)
    return configs


def run_measure(args) -> None:
    world = parallel.launched_world_size()
    main = parallel.launched_rank() == 0
    if main:
        print_device(args.device)
        print(f"{world} process(es), self-attention {args.attention}, {args.warmup} warm-up + {args.iters} timed "
              f"steps (a step: the CFG pair of forwards)", flush=True)
    results = Results(args.json if main else None)
    for size in args.sizes:
        cfg = SIZES[size]
        configs = job_layouts(args.layouts, world, cfg.num_heads, size, main)
        for dtype_name in args.dtypes:
            for config in configs:
                name = layout_name(config)
                rows = measure(cfg, dtype_name, config, args)
                free_memory(args.device)  # the DiT of this layout
                for row in rows:
                    row.update(size=size, dtype=dtype_name, layout=name, world=world, attention=args.attention,
                               cfg_size=config.cfg_size if config else 1, seq_size=config.seq_size if config else 1,
                               fsdp=bool(config and config.fsdp))
                    if main:
                        print(f"{size} {row['resolution']} ({row['tokens']} tokens) {dtype_name} {name:>17}: "
                              f"{row['step_s']:.3f} s/step, peak "
                              + ("n/a" if row["peak_gib"] is None else f"{row['peak_gib']:.2f} GiB")
                              + ("" if row["finite"] else "  (non-finite output)"), flush=True)
                results.add(*rows)
    if dist.is_initialized():
        dist.destroy_process_group()


def main() -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--model", action="store_true", help="print the scaling model's predictions; no GPU")
    parser.add_argument("--sizes", nargs="+", default=["14B"], choices=list(SIZES))
    parser.add_argument("--resolutions", nargs="+", default=["480p", "720p"], choices=list(RESOLUTIONS))
    parser.add_argument("--layouts", nargs="+", default=["ulysses", "ring", "cfg2-ulysses", "cfg2-ring"],
                        help="[cfg2-][ulysses|ring][-fsdp]; one process always runs the plain path")
    measuring = parser.add_argument_group("measure (under torchrun)")
    measuring.add_argument("--dtypes", nargs="+", default=["bf16"], choices=list(DTYPES),
                           help="compute dtype; fp8: bf16 with the block linears in fp8")
    measuring.add_argument("--attention", default="torch_sdpa", help="self-attention type (self_attn_1_type)")
    measuring.add_argument("--device", default=default_device())
    add_timing_arguments(measuring, iters=3, warmup=1)
    modelling = parser.add_argument_group("--model")
    modelling.add_argument("--one-gpu-step-s", type=float, help="measured one-GPU step with CFG (two forwards)")
    modelling.add_argument("--measured-at", default="480p", choices=list(RESOLUTIONS),
                           help="the resolution of --one-gpu-step-s; others are scaled by the FLOP ratio")
    modelling.add_argument("--link-gbps", type=float, nargs="+", default=[150.0, 20.0],
                           help="effective all-to-all / p2p bandwidth per GPU, GB/s")
    modelling.add_argument("--gpus", type=int, nargs="+", default=[2, 4, 8])
    modelling.add_argument("--element-bytes", type=int, default=2, help="bytes per exchanged activation (bf16: 2)")
    add_json_argument(parser)
    args = parser.parse_args()
    if args.model:
        if args.one_gpu_step_s is None:
            parser.error("--model needs --one-gpu-step-s")
        run_model(args)
    else:
        run_measure(args)


if __name__ == "__main__":
    main()
