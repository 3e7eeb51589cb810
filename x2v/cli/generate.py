"""``x2v generate``, ``x2v demo`` and ``python -m x2v.infer``: LightX2V's flags, x2v's pipeline.

Every flag is a LightX2V setting of the same name (argparse ``dest``), handed to ``resolve_settings`` as the
command line's level: it beats ``--config_json``, which beats the model's own ``config.json`` and the defaults.
A flag left out sets nothing, so the config file's value stands.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path

# Flags that are not settings: where to run, how much to say.
NOT_SETTINGS = ("device", "config_json", "verbose", "func", "command", "cache_dir", "prompt_file", "batch_size")
DEFAULT_OUTPUT = "output.mp4"


def add_generate_arguments(parser: argparse.ArgumentParser, *, model_path: bool = True,
                           default_prompt: str | None = None) -> None:
    """LightX2V's flags (``python -m lightx2v.infer``) plus the common sampling settings, each also a config key."""
    model = parser.add_argument_group("model")
    if model_path:
        model.add_argument("--model_path", help="model folder (official, diffusers or LightX2V layout) or DiT file; "
                                                "without it: the tiny trained demo model shipped with x2v")
    model.add_argument("--model_cls", help="wan2.1, wan2.1_distill, wan2.1_vace, wan2.2_moe, wan2.2_moe_distill, "
                                           "wan2.2 (default: read from the weights)")
    model.add_argument("--task", help="t2v, i2v, flf2v, vace (default: read from the weights)")
    model.add_argument("--config_json", help="LightX2V-style JSON config; comments and trailing commas allowed. "
                                             "Flags beat its values")
    inputs = parser.add_argument_group("inputs")
    inputs.add_argument("--prompt", help="what the video shows" +
                        (f" (default: {default_prompt!r})" if default_prompt else " (required)"))
    inputs.add_argument("--prompt_file", metavar="FILE",
                        help="one prompt per line (blank lines and lines starting with # skipped): one video each, "
                             "named <save_result_path stem>-<n>.mp4, denoised --batch_size at a time")
    inputs.add_argument("--batch_size", type=int, default=4, metavar="N",
                        help="with --prompt_file: videos denoised together (default 4); each is the video its "
                             "prompt alone gives")
    inputs.add_argument("--negative_prompt", help="what it must not show (default: the task's official one)")
    inputs.add_argument("--image_path", help="first frame (i2v, flf2v, TI2V image-to-video)")
    inputs.add_argument("--last_frame_path", help="last frame (flf2v)")
    inputs.add_argument("--src_video", help="VACE: source video (mp4) to edit or extend")
    inputs.add_argument("--src_mask", help="VACE: mask video (mp4), white where new content is generated")
    inputs.add_argument("--src_ref_images", help="VACE: reference images, comma-separated paths")
    sampling = parser.add_argument_group("sampling (default: the model's official values)")
    sampling.add_argument("--seed", type=int, help="noise seed (default 42; negative: a random one)")
    sampling.add_argument("--target_video_length", "--num_frames", type=int, metavar="N",
                          help="frames, of the form 4k+1: 5, 9, ..., 81 (default 81; TI2V-5B 121)")
    sampling.add_argument("--infer_steps", type=int, metavar="N", help="denoising steps (default 40-50; distilled 4)")
    sampling.add_argument("--target_height", "--height", type=int, metavar="PX",
                          help="height, a multiple of 16 (32 for TI2V-5B); image-to-video: with the width the area")
    sampling.add_argument("--target_width", "--width", type=int, metavar="PX", help="width, a multiple of 16 (32)")
    sampling.add_argument("--sample_guide_scale", type=float, metavar="G", help="classifier-free guidance scale")
    sampling.add_argument("--sample_shift", type=float, metavar="S", help="noise schedule shift")
    output = parser.add_argument_group("output")
    output.add_argument("--save_result_path", "--save_video_path", metavar="PATH",
                        help=f"mp4 to write (default: {DEFAULT_OUTPUT})")
    output.add_argument("--device", help="cuda or cpu (default: cuda when there is one)")
    output.add_argument("--verbose", action="store_true", help="say how each file was found and loaded")


def run_generate(args: argparse.Namespace, *, default_model: Callable[[], Path] | None = None,
                 default_output: str = DEFAULT_OUTPUT, default_prompt: str | None = None) -> int:
    """Resolve the settings (flags > --config_json > the model's > defaults), load, generate, write the mp4.
    ``default_model`` (called when neither a flag nor the config names the model) and ``default_prompt`` are the
    command's own defaults, below every level the user sets."""
    from x2v.pipelines.settings import resolve_settings
    from x2v.pipelines.wan import Pipeline, default_device
    from x2v.runtime import parallel

    # Under torchrun rank 0 speaks for the job; the other ranks say only their own errors.
    main = parallel.launched_rank() == 0
    level = logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level if main else logging.ERROR, format="x2v: %(message)s")
    flags = {key: value for key, value in vars(args).items() if key not in NOT_SETTINGS and value is not None}
    settings = resolve_settings(flags=flags, config_json=args.config_json)
    fallback = {}
    if settings.model_path is None and not settings.sources.files and default_model is not None:
        fallback["model_path"] = default_model()
        if main:
            print(f"no --model_path: the demo model in {fallback['model_path']}")
    prompts = read_prompt_file(args.prompt_file) if getattr(args, "prompt_file", None) else None
    if settings.get("prompt") is None and prompts is None:
        if default_prompt is None:
            raise ValueError("no prompt: say what the video shows with --prompt \"...\" (or the config key prompt)")
        fallback["prompt"] = default_prompt
    if fallback:
        settings = settings.with_fallback(fallback, f"{args.command}'s default")
    layout = parallel.start(settings.parallel, default_device(args.device))
    say = print if main else (lambda *_, **__: None)
    if layout is not None:
        say(layout.describe(), flush=True)
    pipe = Pipeline.load(settings, device=args.device, layout=layout)
    say(f"model: {pipe.model_cls}, task {pipe.task}, {len(pipe.dits)} DiT(s) on {pipe.device}")
    output = settings.get("save_result_path") or default_output
    if prompts is None:
        say(pipe.generate(save_result_path=None if settings.get("save_result_path") else output).report())
        return 0
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be 1 or more, got {args.batch_size}")
    paths = numbered_paths(Path(output), len(prompts))
    for start in range(0, len(prompts), args.batch_size):
        part = slice(start, start + args.batch_size)
        for result in pipe.generate(prompts[part], save_result_path=paths[part]):
            say(result.report())
    return 0


def read_prompt_file(path: str) -> list[str]:
    """The prompts of ``--prompt_file``: one per line, blank lines and ``#`` comments skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--prompt_file {path}: cannot be read ({e}); give a UTF-8 text file, one prompt per line"
                         ) from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"--prompt_file {path}: no prompt in it; write one prompt per line")
    return prompts


def numbered_paths(path: Path, count: int) -> list[Path]:
    """``out.mp4`` -> ``out-1.mp4`` ... ``out-<count>.mp4`` (numbers padded to one width, so they sort)."""
    width = len(str(count))
    return [path.with_name(f"{path.stem}-{i:0{width}d}{path.suffix or '.mp4'}") for i in range(1, count + 1)]
