"""One rank of a torchrun job for tests/test_parallel.py: every case of a job file through x2v's Python API.

    python -m torch.distributed.run --nproc_per_node N tests/parallel_worker.py job.json

Each case loads ``Pipeline.from_pretrained(model, parallel=..., **settings)``, generates one video and saves the
latents, the video and its uint8 frames to ``{out}.rank{R}.pt``. The test runs the same cases in one process
(``generate_case`` without ``parallel``) and compares.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def generate_case(case: dict, parallel: dict | None = None) -> dict[str, torch.Tensor]:
    """Latents (the denoising loop's output), video and frames of one case, and how much of the DiT it held."""
    import x2v

    pipe = x2v.Pipeline.from_pretrained(case["model"], device="cpu", dtype=torch.float32, parallel=parallel,
                                        **case.get("settings", {}))
    denoise, captured = pipe.denoise, {}

    def keep_latents(*args, **kwargs):
        captured["latents"] = denoise(*args, **kwargs)
        return captured["latents"]

    pipe.denoise = keep_latents
    result = pipe.generate(progress=False, **case.get("request", {}))
    dit = next(iter(pipe.dits.values()))
    held = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in dit.parameters())
    return {"latents": captured["latents"], "video": result.video, "frames": torch.from_numpy(result.frames),
            "weights_held": torch.tensor(held)}  # DiT parameters this rank holds (a shard of each with fsdp)


def main(job_file: str) -> None:
    job = json.loads(Path(job_file).read_text())
    torch.distributed.init_process_group("gloo")  # one job, many pipelines
    rank = torch.distributed.get_rank()
    for case in job["cases"]:
        torch.save(generate_case(case, case["parallel"]), f"{case['out']}.rank{rank}.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
