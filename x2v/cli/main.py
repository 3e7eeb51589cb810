"""The ``x2v`` command."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DEFAULT_CACHE = Path(os.environ.get("X2V_CACHE", Path.home() / ".cache" / "x2v"))


def demo(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from x2v.demo import run_demo

    video = run_demo(args.cache_dir, args.prompt, frames=args.frames, steps=args.steps, seed=args.seed)
    frames = ((video.permute(1, 2, 3, 0).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    out = Path(args.output)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, frames.numpy())
    tmp.replace(out)
    print(f"frames [F, H, W, 3] uint8 written to {out}")
    return 0


def inspect(args: argparse.Namespace) -> int:
    import json

    import torch

    from x2v.formats import jsonc
    from x2v.loading.inspect import format_report, inspect_model

    config = jsonc.load(args.config) if args.config else {}
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    reports = inspect_model(args.path, config, dtype)
    if args.json:
        print(json.dumps([r.as_dict() for r in reports], indent=2, default=str))
    else:
        print(format_report(reports))
    return 1 if any(r.problems for r in reports) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="x2v", description="Load and run Wan2.1 / Wan2.2 video diffusion models.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="text-to-video through a tiny random-weight model in the official layout")
    p.add_argument("--prompt", default="a red car on a city street at night")
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--output", default="x2v_demo_frames.npy")
    p.set_defaults(func=demo)
    p = sub.add_parser("inspect", help="what a model directory or file holds, and every problem with its fix")
    p.add_argument("path", type=Path, help="model directory, DiT folder or checkpoint file")
    p.add_argument("--config", type=Path, help="LightX2V-style JSON config (its checkpoint keys are honoured)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="dtype for the memory estimate")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=inspect)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except Exception as e:  # user-facing errors: one clear line, no traceback
        from x2v.errors import X2VError

        if isinstance(e, (X2VError, ValueError)):
            print(f"x2v: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
