"""Load time and peak memory of a Wan2.1 T2V-1.3B DiT from fp32 files into a bf16 model on CPU.

    python benchmarks/load.py                        # writes /tmp/x2v-load-bench once (~11.4 GB), measures, deletes it
    python benchmarks/load.py --keep --json load.json

Three measurements on the same random weights, each in a fresh subprocess (so its peak RSS is its own):
  read       reading every byte of the official fp32 shards sequentially (the floor),
  x2v        ``x2v.loading.dit.load_dit(dir, dtype=torch.bfloat16)``: a ready bf16 model,
  diffusers  ``WanTransformer3DModel.from_single_file(..., torch_dtype=torch.bfloat16)`` on a single-file copy.
Each runs "cold" (the files' pages dropped from the page cache first) and "warm" (the files just read).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

import torch
from harness import SIZES, add_json_argument, diffusers_on_meta

from x2v.loading.weights import build_on_meta
from x2v.models.wan_dit import WanDiT

CONFIG = SIZES["1.3B"]  # Wan2.1 T2V-1.3B
SHARDS = 3
OFFICIAL = "official"  # sharded fp32 checkpoint + index + config.json, as Wan-AI publishes it
SINGLE = "single/diffusion_pytorch_model.safetensors"  # the same tensors in one file, for from_single_file
DIFFUSERS_CONFIG = "diffusers-config"  # <dir>/transformer/config.json, so diffusers never asks the hub
METHODS = ("read", "x2v", "diffusers")
READ_CHUNK = 8 << 20


def shapes() -> dict[str, tuple[int, ...]]:
    model = build_on_meta(lambda: WanDiT(CONFIG))
    return {name: tuple(t.shape) for name, t in sorted(model.state_dict().items())}


def write_safetensors(path: Path, names: list[str], shape_of: dict, tensor_of) -> None:
    """fp32 safetensors written tensor by tensor (``tensor_of(name)``): never a whole shard in memory."""
    header, offset = {}, 0
    for name in names:
        nbytes = math.prod(shape_of[name]) * 4
        header[name] = {"dtype": "F32", "shape": list(shape_of[name]), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep the data 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name in names:
            f.write(tensor_of(name).contiguous().numpy())


def write_checkpoint(directory: Path) -> None:
    """Random official-layout fp32 checkpoint, a single-file copy and a diffusers config, written atomically."""
    partial = directory.with_name(f"{directory.name}.partial-{os.getpid()}")
    try:
        write_files(partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    partial.rename(directory)


def write_files(partial: Path) -> None:
    from x2v.formats.readers import read_checkpoint

    official = partial / OFFICIAL
    official.mkdir(parents=True)
    shape_of = shapes()
    names = list(shape_of)
    bytes_of = {n: math.prod(shape_of[n]) * 4 for n in names}
    total = sum(bytes_of.values())
    generator = torch.Generator().manual_seed(0)
    weight_map, start = {}, 0
    for i in range(SHARDS):
        # contiguous runs of sorted names, about total / SHARDS bytes each
        end, size = start, 0
        while end < len(names) and (size < total / SHARDS or i == SHARDS - 1):
            size += bytes_of[names[end]]
            end += 1
        shard = f"diffusion_pytorch_model-{i + 1:05d}-of-{SHARDS:05d}.safetensors"
        write_safetensors(official / shard, names[start:end], shape_of,
                          lambda n: torch.empty(shape_of[n]).normal_(0.0, 0.02, generator=generator))
        weight_map.update(dict.fromkeys(names[start:end], shard))
        start = end
    (official / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    fields = ("model_type", "in_dim", "dim", "ffn_dim", "freq_dim", "num_heads", "num_layers", "out_dim", "text_len",
              "eps")
    (official / "config.json").write_text(
        json.dumps({"_class_name": "WanModel", **{f: getattr(CONFIG, f) for f in fields}}, indent=2))

    tensors = read_checkpoint(official / "diffusion_pytorch_model.safetensors.index.json")
    (partial / SINGLE).parent.mkdir()
    write_safetensors(partial / SINGLE, names, shape_of, tensors.__getitem__)
    del tensors
    diffusers_on_meta(CONFIG).save_config(partial / DIFFUSERS_CONFIG / "transformer")


def files_of(directory: Path, method: str) -> list[Path]:
    if method == "diffusers":
        return [directory / SINGLE]
    return sorted((directory / OFFICIAL).glob("*.safetensors"))


def drop_page_cache(files: list[Path]) -> str:
    """Evict the files from the page cache: globally if permitted, else per file (clean, unmapped pages)."""
    os.sync()  # dirty pages (the files were just written) are not dropped, and their writeback would skew timings
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "drop_caches"
    except OSError:
        for path in files:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return "posix_fadvise(DONTNEED) per file"


def read_all(files: list[Path]) -> int:
    buffer = memoryview(bytearray(READ_CHUNK))
    total = 0
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buffer):
                total += n
    return total


def proc_status(field: str) -> int:
    """A /proc/self/status memory field in bytes (VmHWM: peak resident set size)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def measure(method: str, directory: Path) -> dict:
    """Runs inside the subprocess: one load, timed; imports happen before the clock starts."""
    torch.set_num_threads(os.cpu_count() or 1)
    files = files_of(directory, method)
    if method == "x2v":
        from x2v.loading.dit import load_dit
    elif method == "diffusers":
        from diffusers import WanTransformer3DModel
    rss_before = proc_status("VmRSS")
    start = time.perf_counter()
    if method == "read":
        model = None
        read_all(files)
    elif method == "x2v":
        model = load_dit(directory / OFFICIAL, dtype=torch.bfloat16)
    else:
        model = WanTransformer3DModel.from_single_file(
            str(files[0]), config=str(directory / DIFFUSERS_CONFIG), subfolder="transformer",
            torch_dtype=torch.bfloat16, local_files_only=True,
        )
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "file_bytes": sum(p.stat().st_size for p in files),
        "peak_rss": proc_status("VmHWM"),
        "rss_before": rss_before,
        "model_bytes": sum(t.nbytes for t in model.state_dict().values()) if model is not None else 0,
    }


def run_one(method: str, directory: Path, cold: bool) -> dict:
    files = files_of(directory, method)
    cache = drop_page_cache(files) if cold else f"warm ({read_all(files) / 1e9:.1f} GB read just before)"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, __file__, "--measure", method, "--dir", str(directory)],
                          capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "cache": cache}


def summarize(runs: list[dict]) -> dict:
    """Median seconds over the repeats; peak RSS is the largest seen."""
    if any("error" in r for r in runs):
        return {"error": next(r["error"] for r in runs if "error" in r)}
    seconds = statistics.median(r["seconds"] for r in runs)
    return {"seconds": seconds, "all_seconds": [r["seconds"] for r in runs],
            "gb_per_s": runs[0]["file_bytes"] / seconds / 1e9, "file_bytes": runs[0]["file_bytes"],
            "peak_rss": max(r["peak_rss"] for r in runs), "rss_before": max(r["rss_before"] for r in runs),
            "model_bytes": runs[0]["model_bytes"], "cache": runs[0]["cache"]}


def table(results: dict) -> str:
    floor = {c: results["read"][c].get("seconds") for c in ("cold", "warm")}
    lines = ["| method | cache | seconds (median) | GB/s | × read | peak RSS | RSS before load | model |",
             "|---|---|---|---|---|---|---|---|"]
    for method in METHODS:
        for cache in ("cold", "warm"):
            r = results[method][cache]
            if "error" in r:
                lines.append(f"| {method} | {cache} | failed: {r['error']} | | | | | |")
                continue
            model = f"{r['model_bytes'] / 1e9:.2f} GB" if r["model_bytes"] else "-"
            lines.append(
                f"| {method} | {cache} | {r['seconds']:.2f} | {r['gb_per_s']:.2f} | {r['seconds'] / floor[cache]:.2f} "
                f"| {r['peak_rss'] / 1e9:.2f} GB | {r['rss_before'] / 1e9:.2f} GB | {model} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/x2v-load-bench"), help="cache for the test files")
    parser.add_argument("--repeat", type=int, default=3, help="runs per method and cache state (median reported)")
    parser.add_argument("--keep", action="store_true", help="keep the ~11.4 GB of test files for the next run")
    add_json_argument(parser)
    parser.add_argument("--measure", choices=METHODS, help=argparse.SUPPRESS)  # internal: the subprocess side
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.dir)))
        return

    if not (args.dir / OFFICIAL / "config.json").is_file():
        print(f"writing the test checkpoint to {args.dir} (once) ...", flush=True)
        start = time.perf_counter()
        write_checkpoint(args.dir)
        print(f"  written in {time.perf_counter() - start:.0f} s", flush=True)
    try:
        runs = {m: {"cold": [], "warm": []} for m in METHODS}
        for i in range(args.repeat):
            for method in METHODS:
                for cache in ("cold", "warm"):
                    run = run_one(method, args.dir, cold=cache == "cold")
                    runs[method][cache].append(run)
                    print(f"  run {i + 1}/{args.repeat} {method:9s} {cache}: {run}", flush=True)
        results = {m: {c: summarize(runs[m][c]) for c in runs[m]} for m in METHODS}
    finally:
        if not args.keep:
            shutil.rmtree(args.dir)
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps({"config": "Wan2.1 T2V-1.3B, fp32 files -> bf16 model on CPU",
                                         "results": results}, indent=2))


if __name__ == "__main__":
    main()
