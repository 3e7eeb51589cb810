"""Bounded fuzzing of the checkpoint readers: valid tiny files, randomly mutated, must each end in a CheckpointError
that names the file, or load exactly what a reference loader loads (safetensors' own loader, torch.load). Any other
exception, a tensor that differs, or a hang fails. The seed is fixed and printed; X2V_FUZZ_SEED picks another.
"""

from __future__ import annotations

import copy
import json
import os
import random
import signal
import struct
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
from ckpt_utils import write_sharded
from conftest import fuzz_report
from safetensors.torch import load_file, save_file

from x2v.errors import CheckpointError
from x2v.formats.readers import read_checkpoint

SEED = int(os.environ.get("X2V_FUZZ_SEED", "23"))
CASE_SECONDS = 10  # one case taking longer counts as a hang


def base_tensors(rng: random.Random) -> dict[str, torch.Tensor]:
    """A few small tensors of mixed dtypes; some sets hold zero-size and 0-dim tensors."""
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    pool = {
        "blocks.0.w": torch.randn(3, 4, generator=g),
        "blocks.0.b": torch.randn(4, generator=g).bfloat16(),
        "head.modulation": torch.randn(1, 2, 3, generator=g).half(),
        "ids": torch.arange(5, dtype=torch.int64),
        "mask": torch.tensor([True, False]),
        "q": torch.arange(6, dtype=torch.uint8).reshape(2, 3),
        "scale": torch.tensor(0.5),
        "empty": torch.zeros(2, 0),
    }
    names = rng.sample(sorted(pool), rng.randint(1, 5))
    return {n: pool[n] for n in names}


def split_file(raw: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def join_file(header: object, data: bytes, rng: random.Random) -> bytes:
    text = json.dumps(header).encode()
    if rng.random() < 0.5:
        text += b" " * (-len(text) % 8)  # the padding writers add
    return struct.pack("<Q", len(text)) + text + data


ODD_VALUES = [None, True, False, "", "F32", "0", 0, -1, 1.5, 2**63, 2**64, -(2**63), [], [0], [0, 1, 2], {}, {"a": 1}]


def edit_value(value: object, rng: random.Random) -> object:
    """A nearby or odd value of any JSON type."""
    if type(value) is int and rng.random() < 0.7:
        return rng.choice([value + 1, value - 1, value * 2, value + 4, value - 4, -value, 0, value + 2**32])
    if isinstance(value, list) and value and rng.random() < 0.7:
        value = list(value)
        action = rng.choice(["edit", "drop", "add", "swap"])
        i = rng.randrange(len(value))
        if action == "edit":
            value[i] = edit_value(value[i], rng)
        elif action == "drop":
            del value[i]
        elif action == "add":
            value.insert(i, rng.choice([0, 1, 2, value[i]]))
        else:
            value.reverse()
        return value
    if isinstance(value, str) and rng.random() < 0.7:
        return rng.choice(["F16", "BF16", "F32", "F64", "U8", "I8", "I64", "BOOL", "F8_E4M3", "U16", "Q4", "f32"])
    return rng.choice(ODD_VALUES)


def edit_header(header: dict, rng: random.Random) -> object:
    """One random JSON edit: a field's value, a dropped or added field, swapped offsets, a renamed tensor..."""
    header = copy.deepcopy(header)
    names = [n for n in header if n != "__metadata__"]
    action = rng.choice(["field", "field", "field", "drop", "add", "swap", "rename", "metadata", "whole", "entry"])
    if not names or action == "whole":
        return rng.choice([[header], list(header), "header", 1, None, {}])
    name = rng.choice(names)
    info = header[name]
    if not isinstance(info, dict) and action in ("field", "drop", "add", "swap"):
        action = "entry"  # an earlier edit replaced the entry
    if action == "field":
        field = rng.choice(["dtype", "shape", "data_offsets"])
        info[field] = edit_value(info.get(field), rng)
    elif action == "drop" and info:
        del info[rng.choice(list(info))]
    elif action == "add":
        info[rng.choice(["crc", "offsets", "dtype2"])] = 0
    elif action == "swap":
        other = header[rng.choice(names)]
        if isinstance(other, dict):
            info["data_offsets"], other["data_offsets"] = other.get("data_offsets"), info.get("data_offsets")
    elif action == "rename":
        header[rng.choice(["__metadata__", name + "x", ""])] = header.pop(name)
    elif action == "metadata":
        header["__metadata__"] = rng.choice([{"k": "v"}, {"k": 1}, ["k"], "k", None, {"k": None}, {}])
    else:
        header[name] = edit_value(info, rng)
    return header


def flip_bit(raw: bytes, low: int, high: int, rng: random.Random) -> bytes:
    if high <= low:
        return raw
    data = bytearray(raw)
    i = rng.randrange(low, high)
    data[i] ^= 1 << rng.randrange(8)
    return bytes(data)


def mutate_safetensors(raw: bytes, rng: random.Random) -> bytes:
    header, data = split_file(raw)
    length = struct.unpack("<Q", raw[:8])[0]
    action = rng.choice(["truncate", "length", "header_bits", "edit", "edit", "edit", "offsets", "append", "edit2"])
    if action == "truncate":
        return raw[: rng.randrange(len(raw))]
    if action == "length":
        if rng.random() < 0.7:
            return flip_bit(raw, 0, 8, rng)
        return struct.pack("<Q", max(0, length + rng.randint(-9, 9))) + raw[8:]
    if action == "header_bits":
        return flip_bit(raw, 8, 8 + length, rng)
    if action == "offsets":
        spans = [header[n]["data_offsets"] for n in header if n != "__metadata__"]
        rng.shuffle(spans)
        for name, span in zip([n for n in header if n != "__metadata__"], spans):
            header[name]["data_offsets"] = span
        return join_file(header, data, rng)
    if action == "append":
        return raw + bytes(rng.randint(1, 9))
    edited = edit_header(header, rng)
    if action == "edit2" and isinstance(edited, dict):
        edited = edit_header(edited, rng)
    return join_file(edited, data, rng)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)  # bit equality: NaN payloads and -0.0 count


def assert_equal_bits(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], case: str) -> None:
    assert actual.keys() == expected.keys(), case
    for name, t in expected.items():
        a = actual[name]
        assert (a.dtype, a.shape) == (t.dtype, t.shape), f"{case}: {name}"
        assert torch.equal(as_bytes(a), as_bytes(t)), f"{case}: {name}"


def check(path: Path, named: Path, reference, case: str) -> str:
    """x2v refuses (naming ``named``, in one line) or loads exactly what ``reference`` loads; returns which."""
    try:
        expected, reference_error = reference(), None
    except Exception as e:  # noqa: BLE001 - any refusal of the reference loader
        expected, reference_error = None, e
    try:
        loaded = read_checkpoint(path)
    except CheckpointError as e:
        message = str(e)
        assert str(named) in message and "\n" not in message, f"{case}: {message}"
        return "refused"
    assert reference_error is None, f"{case}: x2v loaded a file the reference refuses ({reference_error})"
    assert_equal_bits(loaded, expected, case)
    return "loaded"


class Hang(Exception):
    pass


@pytest.fixture
def no_hang():
    """SIGALRM interrupts a case that runs too long (a hang), failing the test."""
    if not hasattr(signal, "SIGALRM"):  # not on Windows: no hang guard there
        yield lambda: None
        return

    def alarm(signum, frame):
        raise Hang(f"a fuzz case ran past {CASE_SECONDS} s")
    previous = signal.signal(signal.SIGALRM, alarm)
    yield lambda: signal.alarm(CASE_SECONDS)
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def report(kind: str, outcomes: Counter, seed: int) -> None:
    fuzz_report(f"fuzz: {sum(outcomes.values())} cases, seed {seed} ({kind}: {dict(outcomes)})")


def test_fuzz_safetensors(tmp_path, no_hang):
    rng = random.Random(SEED)
    outcomes = Counter()
    for case in range(2000):
        original = tmp_path / "base.safetensors"
        save_file(base_tensors(rng), str(original), metadata=rng.choice([None, {"format": "pt"}]))
        path = tmp_path / f"case{case}.safetensors"  # a fresh name: earlier views may still map earlier files
        path.write_bytes(mutate_safetensors(original.read_bytes(), rng))
        no_hang()
        outcomes[check(path, path, lambda: load_file(path), f"safetensors case {case}, seed {SEED}")] += 1
        path.unlink()
    report("safetensors", outcomes, SEED)
    assert outcomes["refused"] and outcomes["loaded"]


def refuse() -> dict[str, torch.Tensor]:
    raise ValueError("x2v must refuse this case")


def mutate_index_folder(folder: Path, index: Path, outside: Path, rng: random.Random) -> None:
    """One change to the index (bytes or JSON) or to a shard (cut, header bits, a link out)."""
    shards = sorted(folder.glob("*-of-*.safetensors"))
    action = rng.choice(["index_edit", "index_edit", "index_edit", "index_cut", "index_bits", "shard", "link"])
    if action == "index_edit":
        data = json.loads(index.read_text())
        names = list(data["weight_map"])
        if rng.random() < 0.2:
            data = rng.choice([[data], {"metadata": data["metadata"]}, {"weight_map": names}])
        elif rng.random() < 0.5:
            data["weight_map"][rng.choice(names)] = rng.choice([
                "../" + shards[0].name, str(shards[0]), f"./{shards[0].name}", shards[-1].name, "nothere.safetensors",
                f"../{outside.name}", "", 1, None, ["x"], "sub/../" + shards[0].name])
        elif rng.random() < 0.5:
            del data["weight_map"][rng.choice(names)]
        else:
            data["metadata"]["total_size"] = edit_value(data["metadata"]["total_size"], rng)
        index.write_text(json.dumps(data))
    elif action == "index_cut":
        raw = index.read_bytes()
        index.write_bytes(raw[: rng.randrange(len(raw))])
    elif action == "index_bits":
        index.write_bytes(flip_bit(index.read_bytes(), 0, index.stat().st_size, rng))
    elif action == "shard":
        shard = rng.choice(shards)
        shard.write_bytes(mutate_safetensors(shard.read_bytes(), rng))
    else:
        shard = rng.choice(shards)
        shard.rename(outside)
        shard.symlink_to(outside)


def index_reference(index: Path):
    """A plain index loader on top of safetensors: every tensor the weight_map lists, from the shard it names."""
    def load() -> dict[str, torch.Tensor]:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = {name: load_file(index.parent / name) for name in set(weight_map.values())}
        return {key: shards[name][key] for key, name in weight_map.items()}
    return load


def test_fuzz_index_with_two_shards(tmp_path, no_hang):
    rng = random.Random(SEED + 1)
    outcomes = Counter()
    for case in range(300):
        folder = tmp_path / f"case{case}" / "model"
        tensors = base_tensors(rng) | {"extra": torch.ones(3)}
        index = write_sharded(folder, tensors, shards=2)
        shard_names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        outside = folder.parent / "outside.safetensors"
        mutate_index_folder(folder, index, outside, rng)
        no_hang()
        # A shard moved out and linked: the reference reads through the link, but x2v must refuse it.
        linked = any((folder / n).is_symlink() for n in shard_names)
        reference = refuse if linked else index_reference(index)
        outcome = check(index, folder, reference, f"index case {case}, seed {SEED + 1}")
        outcomes[outcome] += 1
    report("index + 2 shards", outcomes, SEED + 1)
    assert outcomes["refused"] and outcomes["loaded"]


def pth_reference(path: Path):
    def load() -> dict[str, torch.Tensor]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        assert isinstance(obj, dict)
        return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    return load


def test_fuzz_pth(tmp_path, no_hang):
    rng = random.Random(SEED + 2)
    outcomes = Counter()
    for case in range(400):
        original = tmp_path / "base.pth"
        torch.save(base_tensors(rng), original)
        raw = original.read_bytes()
        pickle_at = raw.find(b"data.pkl") + 60  # the pickle follows its zip entry's local header
        action = rng.choice(["truncate", "bits", "pickle_bits", "pickle_bits"])
        if action == "truncate":
            raw = raw[: rng.randrange(len(raw))]
        elif action == "bits":
            raw = flip_bit(raw, 0, len(raw), rng)
        else:
            raw = flip_bit(raw, pickle_at, min(pickle_at + 300, len(raw)), rng)
        path = tmp_path / f"case{case}.pth"
        path.write_bytes(raw)
        no_hang()
        outcomes[check(path, path, pth_reference(path), f"pth case {case}, seed {SEED + 2}")] += 1
    report("pth", outcomes, SEED + 2)
    assert outcomes["refused"] and outcomes["loaded"]
