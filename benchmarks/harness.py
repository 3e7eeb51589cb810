"""What the benchmarks share: the repository on ``sys.path``, Wan DiTs at real shapes with random weights (x2v's
and diffusers' over the same tensors) and their inputs, the common arguments, timing in turns with the device
synchronized, accuracy as relative L2, and the results written to ``--json`` as they come in (a run cut short
still leaves what it measured).

A script in this folder imports it before anything from x2v (``python benchmarks/NAME.py`` puts this folder on
``sys.path``, and importing this module puts the repository there)::

    from harness import SIZES, Results, add_input_arguments, timed_alternating, ...

The models' own x2v and diffusers imports happen where they are built, so a script that builds none does not
depend on them.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from x2v.models.wan_dit import WanDiTConfig  # noqa: E402

SIZES = {
    "tiny": WanDiTConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2),
    "1.3B": WanDiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "14B": WanDiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
}


# ---- arguments

def make_parser(doc: str) -> argparse.ArgumentParser:
    """The script's parser, its docstring's first line as the description."""
    return argparse.ArgumentParser(description=doc.split("\n")[0])


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_input_arguments(parser: argparse.ArgumentParser) -> None:
    """Model sizes, video shape and device (benchmarks/dit_step.py, benchmarks/offload.py)."""
    parser.add_argument("--sizes", nargs="+", default=["1.3B", "14B"], choices=list(SIZES))
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--device", default=default_device())


def add_timing_arguments(parser: argparse.ArgumentParser, iters: int = 3, warmup: int | None = 1,
                         warmup_help: str | None = None) -> None:
    """``--iters`` (timed rounds) and, unless ``warmup`` is None, ``--warmup`` (untimed runs before them)."""
    if warmup is not None:
        parser.add_argument("--warmup", type=int, default=warmup, help=warmup_help)
    parser.add_argument("--iters", type=int, default=iters)


def add_json_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", type=Path, help="also write the results to this file")


# ---- the device

def device_name(device: str) -> str:
    """The card's name on CUDA, else the device as given."""
    return torch.cuda.get_device_name() if device.startswith("cuda") else device


def print_device(device: str) -> str:
    """Prints ``device: NAME, torch VERSION`` (the first line of each benchmark's output); returns NAME."""
    name = device_name(device)
    print(f"device: {name}, torch {torch.__version__}", flush=True)
    return name


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def gib(n: float) -> float:
    return n / 2**30


def peak_gib(device: str) -> float | None:
    """The peak of allocated device memory since the last reset, in GiB (None off CUDA)."""
    return gib(torch.cuda.max_memory_allocated()) if device.startswith("cuda") else None


def free_memory(device: str, reset_peak: bool = False) -> None:
    """Collects garbage (offloaded models and their wrappers refer to each other) and returns the allocator's
    cached blocks to the card; with ``reset_peak`` the peak statistics start again."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        if reset_peak:
            torch.cuda.reset_peak_memory_stats()


# ---- timing and accuracy

def timed_alternating(fns, warmup: int, iters: int, device: str, names: list[str] | None = None) -> list[float]:
    """Mean seconds of each function, run in turns (a, b, a, b, ...) so clock and thermal drift hit both alike;
    with ``names``, each round's seconds are printed as it ends (a run cut short still reports)."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    totals = [0.0] * len(fns)
    for round_ in range(iters):
        seconds = []
        for i, fn in enumerate(fns):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            seconds.append(time.perf_counter() - start)
            totals[i] += seconds[-1]
        if names:
            print(f"round {round_ + 1}: " + ", ".join(f"{n} {t:.3f} s" for n, t in zip(names, seconds)), flush=True)
    return [t / iters for t in totals]


def relative_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||, in float32 (tests/ckpt_utils.py has the tests' copy)."""
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


# ---- results

class Results(list):
    """The rows measured so far; ``save()`` writes them all to ``path`` (when given) as JSON."""

    def __init__(self, path: Path | None):
        super().__init__()
        self.path = path

    def save(self) -> None:
        if self.path:
            self.path.write_text(json.dumps(self, indent=2))

    def add(self, *rows: dict) -> None:
        """Appends ``rows`` and saves."""
        self.extend(rows)
        self.save()


# ---- DiTs at real shapes

def diffusers_on_meta(cfg: WanDiTConfig):
    """diffusers' ``WanTransformer3DModel`` of ``cfg``'s architecture on the meta device (no weights)."""
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        return WanTransformer3DModel(
            patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
            in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
            ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
            eps=cfg.eps,
        )


def diffusers_model(cfg: WanDiTConfig, dtype: torch.dtype, device: str):
    """diffusers' model with random weights, made on meta and filled on the device (no slow CPU init)."""
    model = diffusers_on_meta(cfg)
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
        # The RoPE tables are buffers computed at construction (not in checkpoints): to_empty left them
        # uninitialised, so they are computed again, in float32 as diffusers keeps them.
        rope = model.rope
        fresh = type(rope)(rope.attention_head_dim, rope.patch_size, rope.max_seq_len)
        for name, buffer in fresh.named_buffers():
            setattr(rope, name, buffer.to(device, torch.float32))
    return model.eval()


def diffusers_forward(model):
    """diffusers' model called as x2v's is: ``(x, t, context) -> output``."""
    return lambda x, t, c: model(x, t, c, return_dict=False)[0]


def x2v_model(cfg: WanDiTConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype, device: str,
              quant: str | None = None):
    """x2v's model over the same tensors (renamed; only the small float32 ones are copied), or quantized to
    ``quant`` ("fp8"/"int8") the way load_dit quantizes a float file."""
    from x2v.formats.dit_keys import diffusers_key_to_official
    from x2v.formats.quant import FLOAT
    from x2v.loading.quantized import prepare_quantized
    from x2v.loading.weights import assign_weights, build_on_meta
    from x2v.models.wan_dit import FP32_PARAMS, WanDiT

    official = {diffusers_key_to_official(k): v for k, v in weights.items()}
    model = build_on_meta(lambda: WanDiT(cfg))
    official = prepare_quantized(model, official, FLOAT, quantize_kind=quant, component="dit", dtype=dtype,
                                 device=device, keep_fp32=FP32_PARAMS)
    return assign_weights(model, official, dtype=dtype, device=device, keep_fp32=FP32_PARAMS)


def latent_input(args: argparse.Namespace, device: str) -> tuple[tuple[int, ...], int]:
    """The Wan2.1 latent shape and token count of ``--frames/--height/--width``, printed with the device."""
    latent = (1, 16, (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8)
    tokens = latent[2] * (latent[3] // 2) * (latent[4] // 2)
    print_device(device)
    print(f"input: {args.height}x{args.width}, {args.frames} frames -> latent {latent[1:]}, {tokens} tokens")
    return latent, tokens


def dit_inputs(cfg: WanDiTConfig, latent: tuple[int, ...], dtype: torch.dtype, device: str):
    """A DiT forward's ``(x, t, context)``: random latents and 512 text tokens (seed 1), timestep 900."""
    g = torch.Generator(device).manual_seed(1)
    x = torch.randn(latent, generator=g, device=device, dtype=dtype)
    context = torch.randn(1, 512, cfg.text_dim, generator=g, device=device, dtype=dtype)
    return x, torch.tensor([900], device=device), context
