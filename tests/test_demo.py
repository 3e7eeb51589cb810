"""The embedded demo and the command line as a newcomer meets them: a tiny official-layout model written to a cache
folder and run end to end, the flags, the help, and the errors (one line, no traceback)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from x2v.cli.main import main
from x2v.demo import DEMO_FOLDER, write_demo_model
from x2v.infer import main as infer_main
from x2v.pipelines.video import read_mp4
from x2v.pipelines.wan import Pipeline

SMALL = dict(target_video_length=5, target_height=64, target_width=64, infer_steps=2)


def test_demo_model_is_written_once_and_carries_its_settings(tmp_path):
    model = write_demo_model(tmp_path)
    index = model / "diffusion_pytorch_model.safetensors.index.json"
    written = index.stat().st_mtime_ns
    assert write_demo_model(tmp_path) == model == tmp_path / DEMO_FOLDER
    assert index.stat().st_mtime_ns == written  # the cached model is reused, not rewritten
    assert not list(tmp_path.glob(".tiny-*"))  # no half-written model left behind
    pipe = Pipeline.from_pretrained(model, device="cpu", infer_steps=2)
    # The demo's small sizes come from its config.json, below the keyword.
    assert (pipe.settings.output.frames, pipe.settings.output.height, pipe.settings.sampling.steps) == (17, 128, 2)
    model_config = model / "config.json"
    assert pipe.settings.origin("target_height") == f"target_height in {model_config} (the model's config.json)"
    first = pipe.generate("a cat on the grass", seed=1, progress=False, **SMALL)
    second = pipe.generate("a cat on the grass", seed=1, progress=False, **SMALL)
    np.testing.assert_array_equal(first.frames, second.frames)


def test_demo_command_writes_an_mp4(tmp_path):
    out = tmp_path / "demo.mp4"
    assert main(["demo", "--random-weights", "--cache-dir", str(tmp_path), "--target_video_length", "5",
                 "--infer_steps", "1", "--save_result_path", str(out)]) == 0
    frames, fps = read_mp4(out)
    assert frames.shape == (5, 128, 128, 3) and fps == 16
    assert not list(tmp_path.glob(".demo-*"))  # the temp file was renamed into place


def test_generate_without_model_path_lets_the_config_file_win(tmp_path, monkeypatch, capsys):
    """The demo model's settings sit at the model's config.json level: a --config_json beats them."""
    monkeypatch.setattr("x2v.cli.main.DEFAULT_CACHE", tmp_path)
    config = tmp_path / "my.json"
    config.write_text(json.dumps({"target_video_length": 9, "infer_steps": 2, "target_height": 64,
                                  "target_width": 64}))
    out = tmp_path / "v.mp4"
    assert main(["generate", "--prompt", "a dog", "--config_json", str(config), "--save_result_path", str(out)]) == 0
    assert read_mp4(out)[0].shape == (9, 64, 64, 3)
    assert "demo model" in capsys.readouterr().out
    config.write_text(json.dumps({"target_video_length": 10}))
    assert main(["generate", "--prompt", "a dog", "--config_json", str(config)]) == 2
    error = capsys.readouterr().err
    assert "target_video_length 10 is not of the form 4k+1" in error and f"in {config}" in error


@pytest.mark.parametrize("argv, message", [
    (["generate", "--config_json", "/no/such.json", "--prompt", "x"], "/no/such.json: config file not found"),
    (["generate", "--model_path", "/no/such/model", "--prompt", "x"], "set by flag --model_path"),
    (["generate", "--model_path", "/no/such/model"], "no prompt"),
    (["generate", "--target_video_length", "10", "--prompt", "x", "--model_cls", "wan2.1"],
     "use 9 or 13 (flag --target_video_length)"),
])
def test_cli_errors_are_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr("x2v.cli.main.DEFAULT_CACHE", tmp_path)
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert message in captured.err and "Traceback" not in captured.err
    assert len(captured.err.strip().splitlines()) == 1


def test_infer_entry_point_takes_lightx2v_flags(tmp_path, capsys):
    model = write_demo_model(tmp_path)
    out = tmp_path / "infer.mp4"
    assert infer_main(["--model_cls", "wan2.1", "--task", "t2v", "--model_path", str(model), "--prompt", "a car",
                       "--num_frames", "5", "--infer_steps", "1", "--save_video_path", str(out)]) == 0
    assert read_mp4(out)[0].shape[0] == 5


def test_help_is_readable():
    for argv in (["-m", "x2v.cli.main", "generate", "--help"], ["-m", "x2v.infer", "--help"],
                 ["-m", "x2v.cli.main", "demo", "--help"]):
        text = subprocess.run([sys.executable, *argv], capture_output=True, text=True, check=True).stdout
        assert "``" not in text
        assert "--target_video_length N, --num_frames N" in text and "4k+1" in text
        assert "--save_result_path PATH, --save_video_path PATH" in text
