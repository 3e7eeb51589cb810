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
