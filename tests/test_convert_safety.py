"""``x2v convert`` never loses or mixes files: --overwrite replaces only x2v's own kind of output, one run per
output at a time (a lock; real processes), temporary names unique to a run, leftovers of killed runs removed and
those of live runs kept, write errors (full disk, read-only folder) as one line with nothing left behind."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from x2v.cli.main import main
from x2v.convert import ConversionError, convert
from x2v.convert.safety import lock_path, output_lock
from x2v.demo import write_tiny_model
from x2v.formats.metadata import from_metadata
from x2v.formats.quant import detect_encoding
from x2v.formats.readers import read_checkpoint, safetensors_metadata
from x2v.formats.writers import host_name, is_temp, parse_temp, temp_path
from x2v.loading.resolve import resolve_dit

QUIET = dict(progress=False)
DIT_FILE = "diffusion_pytorch_model.safetensors"
TOKENIZER = Path("google") / "umt5-xxl"

# The real CLI in a process of its own, held inside its first tensor write (temporary file open, lock held) until
# the file named by argv[1] exists: the test decides when it may finish, so the overlap of two runs is certain.
HELD_CLI = """
import sys, time
from pathlib import Path
from x2v.formats.writers import SafetensorsWriter

go, write = Path(sys.argv[1]), SafetensorsWriter.write

def held_write(self, name, tensor):
    deadline = time.monotonic() + 60
    while not go.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    return write(self, name, tensor)

SafetensorsWriter.write = held_write
from x2v.cli.main import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "t2v", "t2v")


def start_held(go: Path, *args: str) -> subprocess.Popen:
    command = [sys.executable, "-c", HELD_CLI, str(go), "convert", *args, "--quiet"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_until(condition, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    return err


def names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def encoding_of(folder: Path) -> str:
    return detect_encoding(read_checkpoint(resolve_dit(folder)["dit"].path)).name


# --- temporary names --------------------------------------------------------------------------------------------

def test_temporary_names_carry_the_run_and_read_back(tmp_path):
    temp = temp_path(tmp_path / "model.v2.safetensors")
    assert is_temp(temp) and str(os.getpid()) in temp.name and host_name() in temp.name
    parsed = parse_temp(temp)
    assert (parsed.final, parsed.pid, parsed.host) == ("model.v2.safetensors", os.getpid(), host_name())
    old = parse_temp(Path(".x2v-tmp-config.json.part"))  # an older x2v's name: no run recorded
    assert (old.final, old.pid, old.host) == ("config.json", None, None)
    assert parse_temp(Path("config.json")) is None


# --- --overwrite replaces only x2v's own kind of output ----------------------------------------------------------

def test_overwrite_never_replaces_a_folder_with_a_file(tiny, tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    (out / "inner").mkdir(parents=True)
    (out / "inner" / "notes.txt").write_text("mine")
    assert main(["convert", str(tiny), str(out), "--layout", "single", "--overwrite", "--quiet"]) == 2
    err = one_error_line(capsys)
    assert str(out) in err and "is a folder" in err
    assert (out / "inner" / "notes.txt").read_text() == "mine"
    assert names(tmp_path) == {"out.safetensors"}  # no temporary file, no lock file


def test_overwrite_never_replaces_a_file_with_a_folder(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    out.write_text("not a model")
    assert main(["convert", str(tiny), str(out), "--overwrite", "--quiet"]) == 2
    err = one_error_line(capsys)
    assert str(out) in err and "is a file" in err
    assert out.read_text() == "not a model" and names(tmp_path) == {"out"}


def test_overwrite_refuses_before_writing_anything(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "config.json").mkdir(parents=True)  # the data file would be fine; the config.json path is not
    assert main(["convert", str(tiny), str(out), "--overwrite", "--quiet"]) == 2
    assert str(out / "config.json") in one_error_line(capsys)
    assert names(out) == {"config.json"} and not any((out / "config.json").iterdir())


def test_overwrite_never_replaces_a_special_file(tiny, tmp_path):
    out = tmp_path / "out.safetensors"
    os.mkfifo(out)
    with pytest.raises(ConversionError, match="not a regular file"):
        convert(tiny, out, layout="single", overwrite=True, **QUIET)
    assert out.is_fifo()


def test_overwrite_replaces_what_x2v_wrote(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["convert", str(tiny), str(out), "--quantize", "int8", "--copy-components", "--quiet"]) == 0
    (out / TOKENIZER / "added.txt").write_text("x")
    # Files by files, the copied tokenizer folder by a fresh copy, then by a link, then a link by a folder again.
    assert main(["convert", str(tiny), str(out), "--copy-components", "--overwrite", "--quiet"]) == 0
    assert encoding_of(out) == "float" and not (out / TOKENIZER / "added.txt").exists()
    assert main(["convert", str(tiny), str(out), "--link-components", "--overwrite", "--quiet"]) == 0
    assert (out / TOKENIZER).is_symlink() and (out / TOKENIZER).resolve() == (tiny / TOKENIZER).resolve()
    assert main(["convert", str(tiny), str(out), "--copy-components", "--overwrite", "--quiet"]) == 0
    assert (out / TOKENIZER).is_dir() and not (out / TOKENIZER).is_symlink()
    assert (tiny / TOKENIZER).is_dir() and any((tiny / TOKENIZER).iterdir())  # the link's target was never touched
    capsys.readouterr()
    # A file where the tokenizer folder goes is not x2v's: refused.
    shutil.rmtree(out / TOKENIZER)
    (out / TOKENIZER).write_text("someone's file")
    assert main(["convert", str(tiny), str(out), "--copy-components", "--overwrite", "--quiet"]) == 2
    assert "is a file" in one_error_line(capsys) and (out / TOKENIZER).read_text() == "someone's file"
    assert not any(is_temp(p) for p in out.rglob("*"))


# --- one run per output --------------------------------------------------------------------------------------------

def test_two_runs_into_one_output_one_refuses_and_the_output_is_whole(tiny, tmp_path):
    out, go = tmp_path / "out", tmp_path / "go"
    runs = {kind: start_held(go, str(tiny), str(out), "--quantize", kind) for kind in ("int8", "fp8")}
    wait_until(lambda: any(run.poll() is not None for run in runs.values()), 120)
    go.touch()  # the one that holds the lock may finish now
    results = {kind: (run.wait(timeout=120), run.stderr.read()) for kind, run in runs.items()}
    winners = [kind for kind, (rc, _) in results.items() if rc == 0]
    assert len(winners) == 1, results
    winner = winners[0]
    loser = "fp8" if winner == "int8" else "int8"
    rc, err = results[loser]
    assert rc == 2 and err.strip().count("\n") == 0, err
    assert "another x2v convert is writing it" in err and "Wait for it to finish or stop it" in err
    assert f"pid {runs[winner].pid} on {host_name()}" in err
    # Wholly the winner's: every file says so, and so do the tensors.
    assert names(out) == {DIT_FILE, "config.json"}
    assert from_metadata(safetensors_metadata(out / DIT_FILE))["encoding"] == f"lightx2v-{winner}"
    assert encoding_of(out) == f"lightx2v-{winner}"
    assert not lock_path(out).exists()


def test_a_held_lock_refuses_at_once_and_a_stale_one_does_not(tiny, tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    with output_lock([out]):
        started = time.monotonic()
        assert main(["convert", str(tiny), str(out), "--quiet"]) == 2
        assert time.monotonic() - started < 30
        err = one_error_line(capsys)
        assert f"pid {os.getpid()} on {host_name()}" in err and str(out) in err
        assert names(tmp_path) == {lock_path(out).name}  # nothing written
    assert not lock_path(out).exists()
    # A lock file a killed run left (its pid dead, the file no longer locked) is taken over.
    lock_path(out).write_text(json.dumps({"pid": dead_pid(), "host": host_name(), "started": "earlier"}))
    convert(tiny, out, **QUIET)
    assert names(tmp_path) == {out.name}


def test_killed_run_leaves_temps_that_the_next_run_removes_but_not_a_live_runs(tiny, tmp_path):
    out = tmp_path / "out"
    child = start_held(tmp_path / "never", str(tiny), str(out), "--quantize", "int8")
    wait_until(lambda: out.is_dir() and any(is_temp(p) for p in out.iterdir()))
    child.kill()  # SIGKILL mid-write: no cleanup runs
    child.wait()
    left = names(out)
    assert left and all(is_temp(out / name) for name in left) and lock_path(out).exists()

    host, sleeper = host_name(), subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        kept = {
            f".x2v-tmp-{DIT_FILE}.{sleeper.pid}@{host}.part",  # a live run's (another output in this folder)
            ".x2v-tmp-other.json.12@elsewhere.part",  # another machine's, not for this run's outputs
        }
        removed = {
            f".x2v-tmp-block_7.safetensors.{dead_pid()}@{host}.part",  # a dead run's
            ".x2v-tmp-config.json.part",  # an older x2v's, for this run's output
            f".x2v-tmp-{DIT_FILE}.12@elsewhere.part",  # another machine's, for this run's output (its lock is ours)
        }
        for name in kept | removed:
            (out / name).write_bytes(b"partial")
        convert(tiny, out, quantize="int8", **QUIET)
        assert names(out) == {DIT_FILE, "config.json"} | kept
        assert not lock_path(out).exists() and encoding_of(out) == "lightx2v-int8"
    finally:
        sleeper.kill()
        sleeper.wait()


# --- write errors ------------------------------------------------------------------------------------------------

def full_disk_after(calls: int, real):
    count = [0]

    def fail(*args, **kwargs):
        count[0] += 1
        if count[0] > calls:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)

    return fail


def test_full_disk_while_writing_is_one_line_and_leaves_nothing(tiny, tmp_path, capsys, monkeypatch):
    import x2v.formats.writers as writers

    out = tmp_path / "out"
    monkeypatch.setattr(writers, "tensor_bytes", full_disk_after(40, writers.tensor_bytes))
    # Small shards: some files are complete (under temporary names) when the disk fills.
    assert main(["convert", str(tiny), str(out), "--shard-size", "20kB", "--quiet"]) == 2
    err = one_error_line(capsys)
    assert "No space left on device" in err and str(out / "diffusion_pytorch_model-0") in err, err
    assert ".part" not in err and "removed" in err
    assert names(out) == set() and names(tmp_path) == {"out"}


def test_full_disk_while_copying_a_component_folder(tiny, tmp_path, capsys, monkeypatch):
    import x2v.convert.run as run

    def copytree(source, target, **kwargs):
        Path(target).mkdir()
        (Path(target) / "spiece.model").write_bytes(b"part")
        raise shutil.Error([(str(source), str(target), "[Errno 28] No space left on device")])

    monkeypatch.setattr(run.shutil, "copytree", copytree)
    out = tmp_path / "out"
    assert main(["convert", str(tiny), str(out), "--copy-components", "--quiet"]) == 2
    err = one_error_line(capsys)
    assert str(out / TOKENIZER) in err and "No space left on device" in err
    assert not [p for p in out.rglob("*") if p.is_file()]


def test_full_disk_while_saving_an_encoder(tiny, tmp_path, monkeypatch):
    def save(state, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(ConversionError, match="models_t5_umt5-xxl-enc-int8.pth: could not be written: No space"):
        convert(tiny, tmp_path / "enc", component="t5", quantize="int8", **QUIET)
    assert names(tmp_path / "enc") == set() and names(tmp_path) == {"enc"}


@pytest.mark.parametrize("code", [errno.EACCES, errno.EROFS])
def test_unwritable_folder_simulated_as_root_too(tiny, tmp_path, capsys, monkeypatch, code):
    import x2v.formats.writers as writers

    def refuse(file, *args, **kwargs):  # what open() raises in a read-only folder / on a read-only mount
        raise OSError(code, os.strerror(code), str(file))

    monkeypatch.setattr(writers, "open", refuse, raising=False)
    out = tmp_path / "out"
    assert main(["convert", str(tiny), str(out), "--quiet"]) == 2
    err = one_error_line(capsys)
    assert f"{out / DIT_FILE}: could not be written: {os.strerror(code)}" in err and "elsewhere" in err, err
    assert names(out) == set() and names(tmp_path) == {"out"}


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    try:
        assert main(["convert", str(tiny), str(out), "--quiet"]) == 2
        err = one_error_line(capsys)
        assert str(out / DIT_FILE) in err and "Permission denied" in err and "not writable" in err
        assert names(out) == set()
    finally:
        out.chmod(0o755)
