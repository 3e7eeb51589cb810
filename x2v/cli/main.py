"""The ``x2v`` command."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from x2v.cli.generate import add_generate_arguments, run_generate
from x2v.cli.serve import add_serve_arguments, serve

DEFAULT_CACHE = Path(os.environ.get("X2V_CACHE", Path.home() / ".cache" / "x2v"))
DEMO_PROMPT = "a red ball moves to the right on a blue background"  # what the trained demo model was taught
RANDOM_DEMO_PROMPT = "a red car on a city street at night"


def trained_demo_model() -> Path:
    from x2v.demo import DEMO_MODEL
    from x2v.errors import CheckpointError

    if not (DEMO_MODEL / "config.json").is_file():
        raise CheckpointError(f"the trained demo model is missing from this x2v install (expected {DEMO_MODEL}); "
                              f"reinstall x2v (pip install -e . from a checkout), or run x2v demo --random-weights")
    return DEMO_MODEL


def random_demo_model(cache_dir: Path):
    def write() -> Path:
        from x2v.demo import write_demo_model

        return write_demo_model(cache_dir)

    return write


def demo(args: argparse.Namespace) -> int:
    """``x2v generate`` on a demo model: the trained tiny one shipped with x2v, or (``--random-weights``) a tiny
    random-weight one written once to the cache. Same flags, same pipeline."""
    if args.random_weights:
        return run_generate(args, default_model=random_demo_model(args.cache_dir), default_output="x2v_demo.mp4",
                            default_prompt=RANDOM_DEMO_PROMPT)
    from x2v.demo import known_words, unknown_words

    model = trained_demo_model()
    prompt = args.prompt if args.prompt is not None else DEMO_PROMPT
    unknown = unknown_words(model, prompt)
    if unknown:
        print(f"the demo model has never seen {', '.join(map(repr, unknown))}; it knows only: "
              f"{' '.join(known_words(model))}")
    return run_generate(args, default_model=lambda: model, default_output="x2v_demo.mp4", default_prompt=DEMO_PROMPT)


def generate(args: argparse.Namespace) -> int:
    return run_generate(args, default_model=trained_demo_model)


def inspect(args: argparse.Namespace) -> int:
    import json

    import torch

    from x2v.loading.inspect import format_report, inspect_model
    from x2v.pipelines.settings import resolve_settings

    settings = resolve_settings(config_json=args.config)
    for warning in settings.warnings:
        print(f"x2v: {warning}", file=sys.stderr)
    sources = settings.sources
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    reports = inspect_model(args.path, sources, dtype, values=args.values)
    if args.json:
        print(json.dumps([r.as_dict() for r in reports], indent=2, default=str))
    else:
        print(format_report(reports))
    return 1 if any(r.problems for r in reports) else 0


def convert(args: argparse.Namespace) -> int:
    from x2v.convert import ConvertOptions, convert as run_convert, parse_lora
    from x2v.convert.layouts import parse_size
    from x2v.convert.options import DTYPES, expert_name

    options = ConvertOptions(
        layout=args.layout, quantize=args.quantize, dtype=DTYPES[args.dtype] if args.dtype else None,
        shard_size=parse_size(args.shard_size), loras=tuple(parse_lora(text) for text in args.lora),
        component=args.component, expert=expert_name(args.expert) if args.expert else None,
        components="link" if args.link_components else "copy" if args.copy_components else None,
        overwrite=args.overwrite, progress=not args.quiet,
    )
    print(run_convert(args.source, args.output, options).report())
    return 0


def add_convert_arguments(p: argparse.ArgumentParser) -> None:
    # Plain strings: building the parser must not import torch (x2v.convert checks the values).
    p.add_argument("source", type=Path, help="model folder (Wan2.1/2.2, diffusers), DiT folder or checkpoint file")
    p.add_argument("output", type=Path, help="output folder, or a .safetensors file (single-file layouts) / .pth "
                                             "file (--component t5/clip)")
    p.add_argument("--layout", choices=["official", "single", "diffusers", "comfyui", "block-split"],
                   help="official: shards of --shard-size + index; single: one file; diffusers: diffusers names + "
                        "config; comfyui: model.diffusion_model. names, one file (scaled fp8 with --quantize fp8); "
                        "block-split: LightX2V lazy-load folder (default: official)")
    p.add_argument("--quantize", choices=["fp8", "int8", "none"],
                   help="LightX2V per-channel int8/fp8 block linear layers (ComfyUI layout: scaled fp8); none: "
                        "dequantize (default: keep the source's encoding)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"],
                   help="dtype of the unquantized tensors (default: keep each tensor's; bf16 for dequantized ones)")
    p.add_argument("--shard-size", default="5GB", help="largest shard of the official/diffusers layouts (5GB)")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:STRENGTH][@EXPERT]",
                   help="merge a LoRA before quantizing (repeatable). Converting both Wan2.2 experts, name the "
                        "expert: @high_noise_model / @low_noise_model (@high / @low); repeat --lora for both")
    p.add_argument("--component", choices=["dit", "t5", "clip"], default="dit",
                   help="what to convert; t5/clip write LightX2V's models_t5_umt5-xxl-enc-{fp8,int8}.pth / "
                        "models_clip_..-{fp8,int8}.pth (default: dit)")
    p.add_argument("--expert", help="Wan2.2: convert only this expert (high_noise_model / low_noise_model), or "
                                    "record which expert a lone expert file is")
    links = p.add_mutually_exclusive_group()
    links.add_argument("--copy-components", action="store_true",
                       help="copy T5, CLIP, VAE and tokenizer so the output is a complete model folder")
    links.add_argument("--link-components", action="store_true", help="the same with symbolic links")
    p.add_argument("--overwrite", action="store_true", help="replace outputs x2v wrote before (a file by a file, a "
                                                            "component folder by a folder); never a folder by a file, "
                                                            "or the reverse")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="x2v", description="Load and run Wan2.1 / Wan2.2 video diffusion models.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="text-to-video through the tiny trained demo model shipped with x2v, in the "
                                     "official layout (the same flags as generate; docs/demo-model.md)")
    add_generate_arguments(p, model_path=False, default_prompt=DEMO_PROMPT)
    p.add_argument("--random-weights", action="store_true", help="a tiny random-weight model instead (noise: "
                                                                 "proves the plumbing), written to --cache-dir")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help=f"where the random-weight model is written "
                                                                          f"(default: {DEFAULT_CACHE})")
    p.set_defaults(func=demo)
    p = sub.add_parser("inspect", help="what a model directory or file holds, and every problem with its fix")
    p.add_argument("path", type=Path, help="model directory, DiT folder or checkpoint file")
    p.add_argument("--config", type=Path, help="LightX2V-style JSON config (its checkpoint keys are honoured)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="dtype for the memory estimate")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--values", action="store_true", help="also read every tensor and report NaN / infinite values "
                                                         "(one pass over the files)")
    p.set_defaults(func=inspect)
    p = sub.add_parser("convert", help="rewrite a checkpoint: layout, dtype, int8/fp8 quantization, merged LoRAs")
    add_convert_arguments(p)
    p.set_defaults(func=convert)
    p = sub.add_parser("generate", help="generate a video (LightX2V's flags; python -m x2v.infer takes the same)")
    add_generate_arguments(p)
    p.set_defaults(func=generate)
    p = sub.add_parser("serve", help="an HTTP service: durable queue, web page, batching, workers on many GPUs "
                                     "(python -m x2v.server takes the same flags; docs/server.md)")
    add_serve_arguments(p)
    p.set_defaults(func=serve)
    args = parser.parse_args(argv)
    return run_command(args.func, args)


def run_command(func, args: argparse.Namespace) -> int:
    """Run a subcommand; bad input gives one clear line and exit status 2, not a traceback. Under torchrun the
    line names the rank; torchrun then ends the other ranks."""
    from x2v.errors import X2VError, first_line

    who = f"rank {os.environ['RANK']}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    try:
        return func(args)
    except (X2VError, ValueError) as e:
        print(f"x2v: {who}error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file that cannot be read or written: say which, no traceback
        print(f"x2v: {who}error: {f'{e.filename}: ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        return 2
    except Exception as e:
        if not who:
            raise  # a bug: its traceback helps
        # Under torchrun the usual case is a collective that lost a rank which failed first: one line, no traceback.
        print(f"x2v: {who}stopped: {first_line(e)} (if another rank failed first, its error above says why)",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("x2v: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
