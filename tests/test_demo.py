"""The embedded demo: a tiny official-layout model written to a cache folder and run end to end."""

import numpy as np

from x2v.cli.main import main
from x2v.demo import run_demo
from x2v.pipelines.video import read_mp4

SMALL = dict(target_video_length=5, target_height=64, target_width=64, infer_steps=2)


def test_demo_is_deterministic_and_reuses_its_model(tmp_path):
    first = run_demo(tmp_path, "a cat on the grass", **SMALL)
    index = tmp_path / "wan-demo-tiny" / "diffusion_pytorch_model.safetensors.index.json"
    written = index.stat().st_mtime_ns
    second = run_demo(tmp_path, "a cat on the grass", **SMALL)
    assert first.frames.shape == (5, 64, 64, 3)
    np.testing.assert_array_equal(first.frames, second.frames)
    assert index.stat().st_mtime_ns == written  # the cached model is reused, not rewritten
    assert not list(tmp_path.glob(".tiny-*"))  # no half-written model left behind


def test_demo_command_writes_an_mp4(tmp_path):
    out = tmp_path / "demo.mp4"
    assert main(["demo", "--cache-dir", str(tmp_path), "--frames", "5", "--steps", "1", "--output", str(out)]) == 0
    frames, fps = read_mp4(out)
    assert frames.shape == (5, 128, 128, 3) and fps == 16
    assert not list(tmp_path.glob(".demo-*"))  # the temp file was renamed into place
