"""Time one DiT forward with the weights resident on the device vs streamed from host memory (cpu_offload).

    python benchmarks/offload.py                         # 1.3B and 14B, 480P 81 frames, bf16 and fp8, on a GPU
    python benchmarks/offload.py --device cpu --sizes tiny --weights bf16 --frames 5 --height 64 --width 64

For each size and weight kind, x2v runs resident, with ``offload_granularity`` "block" and "phase" (weights in
pinned host memory, the next unit copied on a side stream while the current one computes), in turns; diffusers'
``WanTransformer3DModel`` runs resident and with its block-level group offload (``use_stream=True`` on a GPU) on
the same weights in the same run. Reported per configuration: seconds per forward, the ratio to the same model
resident, and the device memory it needs (peak allocated during the forward above what was there before, plus
the weights it keeps on the device), and the largest difference of its output from the same model resident
(offloading moves bytes, so 0 is expected). Weights are random.
"""

from __future__ import annotations

import torch
from harness import (
    SIZES,
    Results,
    add_input_arguments,
    add_json_argument,
    add_timing_arguments,
    diffusers_model,
    dit_inputs,
    free_memory,
    gib,
    latent_input,
    make_parser,
    sync,
    timed_alternating,
    x2v_model,
)

from x2v.runtime.offload import DiTOffload, OffloadConfig

GRANULARITIES = ("block", "phase")


def device_bytes(model: torch.nn.Module, device: str) -> int:
    """Bytes of ``model``'s tensors that live on ``device``."""
    kind = torch.device(device).type
    return sum(t.nbytes for t in [*model.parameters(), *model.buffers()] if t.device.type == kind)


def peak_of(fn, device: str, resident: int) -> float:
    """GiB the call needs on the device: its peak above what was allocated before, plus its resident weights."""
    if not device.startswith("cuda"):
        return float("nan")
    sync(device)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    sync(device)
    return gib(torch.cuda.max_memory_allocated() - before + resident)


def offloaded(model: torch.nn.Module, device: str, granularity: str):
    """``model`` (on the host) streamed to ``device``; returns the forward to time."""
    offload = DiTOffload({"dit": model}, torch.device(device), OffloadConfig(cpu_offload=True, granularity=granularity))

    def run(*args):
        with offload.denoising():
            return offload.activate("dit")(*args)

    return run


def x2v_runs(cfg, weights: dict, dtype: torch.dtype, device: str, quant: str | None) -> dict:
    """x2v resident and offloaded forwards of the same weights (quantized to ``quant`` first)."""
    resident = x2v_model(cfg, weights, dtype, device, quant)
    host = x2v_model(cfg, weights, dtype, device, quant).to("cpu")  # quantized on the device, then moved out
    runs = {"resident": (resident, device_bytes(resident, device))}
    for granularity in GRANULARITIES:
        runs[granularity] = (offloaded(host, device, granularity), 0)
    return runs


def measure(label: str, runs: dict, inputs: tuple, device: str, warmup: int, iters: int) -> list[dict]:
    """Times ``runs`` in turns; each output is compared with the first (resident) one."""
    with torch.inference_mode():
        outputs = [fn(*inputs) for fn, _ in runs.values()]
        diffs = [(out - outputs[0]).abs().max().item() for out in outputs]
        del outputs
        calls = [lambda fn=fn: fn(*inputs) for fn, _ in runs.values()]
        seconds = timed_alternating(calls, warmup, iters, device)
        peaks = [peak_of(call, device, resident) for call, (_, resident) in zip(calls, runs.values())]
    base = seconds[0]
    return [dict(model=label, mode=name, seconds=s, ratio=s / base, peak_gib=p, max_diff=d)
            for name, s, p, d in zip(runs, seconds, peaks, diffs)]


def diffusers_runs(reference, inputs: tuple, device: str, warmup: int, iters: int, label: str) -> list[dict]:
    """diffusers resident, then with block-level group offload (the same model, changed in place)."""
    def call():
        return reference(*inputs, return_dict=False)[0]

    with torch.inference_mode():
        resident_bytes = device_bytes(reference, device)
        (resident,) = timed_alternating([call], warmup, iters, device)
        resident_peak = peak_of(call, device, resident_bytes)
        reference.enable_group_offload(torch.device(device), offload_type="block_level", num_blocks_per_group=1,
                                       use_stream=device.startswith("cuda"))
        (streamed,) = timed_alternating([call], warmup, iters, device)
        streamed_peak = peak_of(call, device, 0)
    return [dict(model=label, mode="resident", seconds=resident, ratio=1.0, peak_gib=resident_peak),
            dict(model=label, mode="group offload", seconds=streamed, ratio=streamed / resident,
                 peak_gib=streamed_peak)]


def main() -> None:
    parser = make_parser(__doc__)
    add_input_arguments(parser)
    parser.add_argument("--weights", nargs="+", choices=["bf16", "fp8", "int8"],
                        default=["bf16", "fp8"] if torch.cuda.is_available() else ["bf16"])
    add_timing_arguments(parser)
    parser.add_argument("--no-diffusers", action="store_true", help="time x2v only")
    add_json_argument(parser)
    args = parser.parse_args()
    device, dtype = args.device, torch.bfloat16
    latent, _ = latent_input(args, device)
    results = Results(args.json)
    for size in args.sizes:
        cfg = SIZES[size]
        reference = diffusers_model(cfg, dtype, device)
        inputs = dit_inputs(cfg, latent, dtype, device)
        for weights in args.weights:
            quant = None if weights == "bf16" else weights
            runs = x2v_runs(cfg, reference.state_dict(), dtype, device, quant)
            report(measure(f"{size} x2v {weights}", runs, inputs, device, args.warmup, args.iters), results)
            del runs
            free_memory(device)  # an offloaded model and its forward wrapper refer to each other
        if not args.no_diffusers:
            report(diffusers_runs(reference, inputs, device, args.warmup, args.iters, f"{size} diffusers bf16"),
                   results)
        del reference, inputs
        free_memory(device)


def report(new: list[dict], results: Results) -> None:
    """Print ``new`` and save everything so far (a run cut short still leaves what it measured)."""
    for r in new:
        diff = f"  max |diff| {r['max_diff']:.1e}" if "max_diff" in r else ""
        print(f"{r['model']:>22} {r['mode']:>13}: {r['seconds']:.3f} s  {r['ratio']:.3f}x resident  "
              f"peak {r['peak_gib']:.2f} GiB{diff}", flush=True)
    results.add(*new)


if __name__ == "__main__":
    main()
