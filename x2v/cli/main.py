"""The ``x2v`` command."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from x2v.cli.generate import add_generate_arguments, run_generate

DEFAULT_CACHE = Path(os.environ.get("X2V_CACHE", Path.home() / ".cache" / "x2v"))


def demo(args: argparse.Namespace) -> int:
    from x2v.demo import run_demo

    run_demo(args.cache_dir, args.prompt, save_result_path=args.output, seed=args.seed,
             target_video_length=args.frames, infer_steps=args.steps)
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
    p.add_argument("--output", default="x2v_demo.mp4")
    p.set_defaults(func=demo)
    p = sub.add_parser("inspect", help="what a model directory or file holds, and every problem with its fix")
    p.add_argument("path", type=Path, help="model directory, DiT folder or checkpoint file")
    p.add_argument("--config", type=Path, help="LightX2V-style JSON config (its checkpoint keys are honoured)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="dtype for the memory estimate")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=inspect)
    p = sub.add_parser("generate", help="generate a video (LightX2V's flags; python -m x2v.infer takes the same)")
    add_generate_arguments(p, model_path_required=False)
    p.set_defaults(func=run_generate)
    args = parser.parse_args(argv)
    return run_command(args.func, args)


def run_command(func, args: argparse.Namespace) -> int:
    """Run a subcommand; bad input gives one clear line and exit status 2, not a traceback."""
    from x2v.errors import X2VError

    try:
        return func(args)
    except (X2VError, ValueError) as e:
        print(f"x2v: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
