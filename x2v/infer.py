"""LightX2V-compatible entry point: ``python -m x2v.infer --model_cls ... --task ... --model_path ... --config_json ...``."""

from __future__ import annotations

import argparse
import sys

from x2v.cli.generate import add_generate_arguments, run_generate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m x2v.infer", description=__doc__)
    add_generate_arguments(parser, model_path_required=True)
    from x2v.cli.main import run_command

    return run_command(run_generate, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
