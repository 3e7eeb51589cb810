"""``x2v generate`` and ``python -m x2v.infer``: LightX2V's flags, x2v's pipeline."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path



def add_generate_arguments(parser: argparse.ArgumentParser, model_path_required: bool) -> None:
    parser.add_argument("--model_cls", help="wan2.1, wan2.1_distill, wan2.1_vace, wan2.2_moe, wan2.2_moe_distill, "
                                            "wan2.2 (default: read from the weights)")
    parser.add_argument("--task", help="t2v, i2v, flf2v, vace (default: read from the weights)")
    parser.add_argument("--model_path", required=model_path_required, type=Path,
                        help="model directory or DiT file" + ("" if model_path_required else
                                                              " (default: the tiny random-weight demo model)"))
    parser.add_argument("--config_json", type=Path, help="LightX2V-style JSON config (comments allowed)")
    parser.add_argument("--prompt", default="")
    parser.add_argument("--negative_prompt", default="", help="empty: the task's official default")
    parser.add_argument("--image_path", help="first frame (i2v, flf2v, TI2V image-to-video)")
    parser.add_argument("--last_frame_path", help="last frame (flf2v)")
    parser.add_argument("--src_video", help="VACE: source video (mp4) to edit or extend")
    parser.add_argument("--src_mask", help="VACE: mask video (mp4), white where new content is generated")
    parser.add_argument("--src_ref_images", help="VACE: reference images, comma-separated paths")
    parser.add_argument("--seed", type=int, default=None, help="default 42; negative: random")
    parser.add_argument("--num_frames", dest="target_video_length", type=int)
    parser.add_argument("--infer_steps", type=int)
    parser.add_argument("--height", dest="target_height", type=int)
    parser.add_argument("--width", dest="target_width", type=int)
    parser.add_argument("--save_result_path", "--save_video_path", dest="save_result_path", default="output.mp4")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")


def run_generate(args: argparse.Namespace) -> int:
    from x2v.pipelines.wan import Pipeline

    logging.basicConfig(level=logging.WARNING, format="x2v: %(message)s")
    model_path = args.model_path
    if model_path is None:
        from x2v.cli.main import DEFAULT_CACHE
        from x2v.demo import DEMO_SETTINGS, write_demo_model

        model_path = write_demo_model(DEFAULT_CACHE / "wan-demo-tiny")
        print(f"no --model_path: using the tiny random-weight demo model in {model_path}")
        defaults = DEMO_SETTINGS
    else:
        defaults = {}
    settings = {k: getattr(args, k) for k in ("target_video_length", "infer_steps", "target_height", "target_width")}
    settings = {**defaults, **{k: v for k, v in settings.items() if v is not None}}
    pipe = Pipeline.from_pretrained(model_path, args.model_cls, args.task, device=args.device,
                                    config_json=args.config_json, **settings)
    print(f"model: {args.model_cls or pipe.model_cls}, task {pipe.task}, {len(pipe.dits)} DiT(s) on {pipe.device}")
    refs = [p for p in (args.src_ref_images or "").split(",") if p]
    result = pipe.generate(args.prompt, negative_prompt=args.negative_prompt or None, image=args.image_path,
                           last_image=args.last_frame_path, src_video=args.src_video, src_mask=args.src_mask, src_ref_images=refs,
                           seed=args.seed, save_result_path=args.save_result_path)
    print(result.report())
    return 0
