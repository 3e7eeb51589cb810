"""The embedded demo: a tiny official-layout model written to a cache folder and run end to end."""

import numpy as np
import torch

from x2v.cli.main import main
from x2v.demo import run_demo


def test_demo_is_deterministic_and_reuses_its_model(tmp_path):
    first = run_demo(tmp_path, "a cat on the grass", frames=5, height=64, width=64, steps=2)
    index = tmp_path / "wan-demo-tiny" / "diffusion_pytorch_model.safetensors.index.json"
    written = index.stat().st_mtime_ns
    second = run_demo(tmp_path, "a cat on the grass", frames=5, height=64, width=64, steps=2)
    assert first.shape == (3, 5, 64, 64)
    assert first.abs().max() <= 1.0
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert index.stat().st_mtime_ns == written  # the cached model is reused, not rewritten
    assert not list(tmp_path.glob(".demo-*"))  # no half-written model left behind


def test_demo_command_writes_frames(tmp_path):
    out = tmp_path / "frames.npy"
    assert main(["demo", "--cache-dir", str(tmp_path), "--frames", "5", "--steps", "1", "--output", str(out)]) == 0
    frames = np.load(out)
    assert frames.shape == (5, 128, 128, 3) and frames.dtype == np.uint8
