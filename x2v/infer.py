"""LightX2V's entry point, ``python -m x2v.infer --model_cls ... --task ... --model_path ... --config_json ...``,
on x2v's pipeline (``x2v generate`` takes the same flags)."""

from __future__ import annotations

import argparse
import sys

from x2v.cli.generate import add_generate_arguments, run_generate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m x2v.infer",
        description="Generate a video with LightX2V's command line (same flags, same config files) on x2v. "
                    "Settings, lowest precedence first: the model's official defaults < its config.json < "
                    "--config_json < these flags.")
    add_generate_arguments(parser)
    parser.set_defaults(command="python -m x2v.infer")
    args = parser.parse_args(argv)
    if args.model_path is None:
        parser.error("--model_path is required (the model folder or DiT file)")
    from x2v.cli.main import run_command

    return run_command(run_generate, args)


if __name__ == "__main__":
    sys.exit(main())
