"""Hostile and broken checkpoint containers: every one is a one-line CheckpointError that names the file (or folder)
and the broken entry, reads nothing outside the model folder, and repeats none of the file's bytes.

(Broken weights, LoRAs, configs and output paths are in tests/test_hostile_inputs.py; random mutations in
tests/test_fuzz.py.)
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import time
from pathlib import Path

import pytest
import torch
from ckpt_utils import write_sharded
from safetensors.torch import load_file, save_file

from x2v.errors import CheckpointError
from x2v.formats.readers import index_shard_files, read_checkpoint, read_safetensors, safetensors_metadata

SECRET = b"s3cr3t-passw0rd:x:0:0:hunter2:/home:/bin/sh\n"  # stands in for /etc/passwd


def write_raw(path: Path, header: object, data: bytes = b"", length: int | None = None) -> Path:
    """A safetensors file from any header (JSON-encoded unless already bytes), with any length field."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)
    return path


def entry(shape: list, offsets: list, dtype: str = "F32") -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


def assert_one_line_naming(error: pytest.ExceptionInfo, path: Path) -> None:
    message = str(error.value)
    assert str(path) in message and "\n" not in message


def refused(path: Path, match: str) -> str:
    with pytest.raises(CheckpointError, match=match) as error:
        read_checkpoint(path)
    assert_one_line_naming(error, path)
    return str(error.value)


# --- safetensors headers ----------------------------------------------------------------------------------------

BAD_HEADERS = {
    "negative offsets": ({"w": entry([128], [-64, 448])}, 512, "data_offsets must be a list of two non-negative"),
    "offsets as strings": ({"w": entry([4], ["0", "16"])}, 16, "data_offsets must be a list of two non-negative"),
    "offsets as floats": ({"w": entry([4], [0.0, 16.0])}, 16, "data_offsets must be a list of two non-negative"),
    "offsets as bools": ({"w": entry([1], [False, True], "U8")}, 1, "data_offsets must be a list of two non-negative"),
    "offsets past 2**63": ({"w": entry([4], [2**64, 2**64 + 16])}, 16, "non-negative integers below 2\\*\\*63"),
    "three offsets": ({"w": entry([4], [0, 16, 16])}, 16, "data_offsets must be a list of two"),
    "reversed offsets": ({"w": entry([4], [16, 0])}, 16, r"data_offsets \[16, 0\] end before they begin"),
    "overlapping offsets": ({"a": entry([4], [0, 16]), "b": entry([4], [8, 24])}, 24,
                            r"tensor 'b': data_offsets \[8, 24\] overlap the tensor before them"),
    "same offsets twice": ({"a": entry([4], [0, 16]), "b": entry([4], [0, 16])}, 16, "overlap the tensor before"),
    "gap between tensors": ({"a": entry([4], [0, 16]), "b": entry([4], [20, 36])}, 36,
                            r"tensor 'b': data_offsets \[20, 36\] leave 4 bytes unused"),
    "gap before the first": ({"a": entry([4], [8, 24])}, 24, "leave 8 bytes unused"),
    "shape -1": ({"w": entry([-1], [0, 16])}, 16, "shape must be a list of at most 64 non-negative integers"),
    "shape of bools": ({"w": entry([True], [0, 4])}, 4, "shape must be a list"),
    "shape as a string": ({"w": entry("4", [0, 16])}, 16, "shape must be a list"),
    "shape/bytes mismatch": ({"w": entry([5], [0, 16])}, 16,
                             r"tensor 'w': shape \[5\] of F32 needs 20 bytes, but data_offsets \[0, 16\] hold 16"),
    "huge shape": ({"w": entry([2**40, 2**40], [0, 16])}, 16, "needs more bytes than any file holds"),
    "huge shape times zero": ({"w": entry([2**40, 2**40, 0], [0, 0])}, 0, "needs more bytes than any file holds"),
    "too many dimensions": ({"w": entry([1] * 65, [0, 4])}, 4, "at most 64"),
    "missing data_offsets": ({"w": {"dtype": "F32", "shape": [4]}}, 16, "tensor 'w': the entry has no data_offsets"),
    "missing dtype": ({"w": {"shape": [4], "data_offsets": [0, 16]}}, 16, "tensor 'w': the entry has no dtype"),
    "unknown field": ({"w": {**entry([4], [0, 16]), "crc": 1}}, 16, "has an unknown field 'crc'"),
    "dtype a number": ({"w": entry([4], [0, 16], 4)}, 16, "dtype is a number, not a string"),
    "unknown dtype": ({"w": entry([4], [0, 16], "Q4")}, 16, "has dtype 'Q4', which x2v cannot read"),
    "entry a list": ({"w": [0, 16]}, 16, "tensor 'w': the entry is an array"),
    "header a list": ([entry([4], [0, 16])], 16, "the safetensors header is an array, not an object"),
    "header a string": ("weights", 16, "the safetensors header is a string, not an object"),
    "metadata values not strings": ({"__metadata__": {"steps": 4}, "w": entry([4], [0, 16])}, 16,
                                    "__metadata__ entry 'steps' is a number, not a string"),
    "metadata a list": ({"__metadata__": ["a"], "w": entry([4], [0, 16])}, 16, "__metadata__ is an array"),
    "lone surrogate name": ({"\ud800": entry([4], [0, 16])}, 16, "the name is not valid UTF-8 text"),
    "bytes after the data": ({"w": entry([4], [0, 16])}, 20, "4 bytes follow the last tensor the header describes"),
}


@pytest.mark.parametrize("header, data_bytes, message", BAD_HEADERS.values(), ids=BAD_HEADERS.keys())
def test_bad_header_is_refused_naming_file_and_entry(tmp_path, header, data_bytes, message):
    path = write_raw(tmp_path / "bad.safetensors", header, bytes(data_bytes))
    text = refused(path, rf"bad\.safetensors: .*{message}")
    assert "download it again" in text or "cannot read" in text


def test_duplicate_tensor_name_is_refused(tmp_path):
    text = b'{"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, "w": ' \
           b'{"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}'
    refused(write_raw(tmp_path / "dup.safetensors", text, b"\0"), r"dup\.safetensors: .*key 'w' appears twice")


def test_deeply_nested_header_is_refused_without_recursion_error(tmp_path):
    path = write_raw(tmp_path / "deep.safetensors", b"[" * 100_000 + b"]" * 100_000)
    refused(path, r"deep\.safetensors: the safetensors header is not valid JSON \(nested too deeply\)")


def test_header_not_utf8_names_an_offset_not_the_byte(tmp_path):
    path = write_raw(tmp_path / "latin.safetensors", b'{"\xe9": {}}')
    text = refused(path, r"latin\.safetensors: the safetensors header is not UTF-8 text \(bad byte at offset 2\)")
    assert "xe9" not in text


def test_json_error_quotes_no_character_of_the_file(tmp_path):
    path = write_raw(tmp_path / "escape.safetensors", b'{"a\\Z": 1}')
    text = refused(path, r"escape\.safetensors: the safetensors header is not valid JSON \(Invalid \\escape at")
    assert "Z" not in text.replace(str(path), "")


def test_84_mib_header_is_refused_at_once_without_reading_it(tmp_path):
    # A header that is otherwise valid: without the cap it would be read, parsed and accepted.
    pad = 84 * 2**20
    header = json.dumps({"__metadata__": {"pad": ""}, "w": entry([4], [0, 16])}).encode()
    header = header.replace(b'"pad": ""', b'"pad": "' + b"x" * pad + b'"')
    path = write_raw(tmp_path / "big.safetensors", header, bytes(16))
    start = time.perf_counter()
    text = refused(path, r"big\.safetensors: the first 8 bytes are not a plausible safetensors header length "
                         r"\(more than the 16 MiB x2v accepts; real Wan headers are about 100 KB\)")
    assert time.perf_counter() - start < 0.5
    assert str(len(header)) not in text


def test_header_length_longer_than_the_file(tmp_path):
    path = write_raw(tmp_path / "short.safetensors", {"w": entry([4], [0, 16])}, bytes(16), length=10_000)
    text = refused(path, r"short\.safetensors: the first 8 bytes are not a plausible safetensors header length "
                         r"\(longer than the file\)")
    assert "10000" not in text and "10,000" not in text


def test_header_length_a_few_bytes_short_is_refused_not_misread(tmp_path):
    """Writers pad headers with spaces: a length 4 bytes short still parses, but every tensor would shift."""
    header = json.dumps({"w": entry([4], [0, 16])}).encode() + b" " * 8
    path = write_raw(tmp_path / "shifted.safetensors", header, bytes(16), length=len(header) - 4)
    refused(path, r"shifted\.safetensors: 4 bytes follow the last tensor")


def test_a_text_file_named_safetensors_leaks_none_of_its_bytes(tmp_path):
    path = tmp_path / "passwd.safetensors"
    path.write_bytes(SECRET)
    text = refused(path, r"passwd\.safetensors: the first 8 bytes are not a plausible safetensors header length")
    number = str(struct.unpack("<Q", SECRET[:8])[0])
    assert "s3cr3t" not in text and "hunter2" not in text and number not in text


def test_file_shorter_than_the_length_field(tmp_path):
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(b"\x02\0\0")
    refused(path, r"tiny\.safetensors: file is 3 bytes, too short to be a safetensors file")


def test_a_folder_named_like_a_block_file_is_refused(tmp_path):
    folder = write_block_split(tmp_path / "lazy", blocks=1)
    (folder / "block_0.safetensors").unlink()
    (folder / "block_0.safetensors").mkdir()
    with pytest.raises(CheckpointError, match=r"block_0\.safetensors: cannot read the file"):
        read_checkpoint(folder)


# --- files that must still load ---------------------------------------------------------------------------------


def valid_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 5, generator=g),
        "bf16": torch.randn(7, generator=g).bfloat16(),
        "f16": torch.randn(2, 3, generator=g).half(),
        "f64": torch.randn(3, generator=g).double(),
        "i64": torch.arange(-3, 3),
        "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "u8": torch.arange(11, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "f8": torch.randn(9, generator=g).to(torch.float8_e4m3fn),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0),
        "empty_2d": torch.zeros(4, 0, dtype=torch.bfloat16),
    }


def assert_equal_bits(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name, t in expected.items():
        a = actual[name]
        assert (a.dtype, a.shape) == (t.dtype, t.shape), name
        assert torch.equal(a.reshape(-1).view(torch.uint8), t.reshape(-1).contiguous().view(torch.uint8)), name


@pytest.mark.parametrize("metadata", [None, {"format": "pt", "note": "é ✓"}])
def test_files_written_by_safetensors_load_exactly(tmp_path, metadata):
    tensors = valid_tensors()
    path = tmp_path / "good.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    assert_equal_bits(read_checkpoint(path), tensors)
    assert_equal_bits(read_checkpoint(path), load_file(path))
    assert safetensors_metadata(path) == (metadata or {})


def test_only_zero_size_tensors_and_an_empty_header_load(tmp_path):
    save_file({"a": torch.zeros(3, 0), "b": torch.zeros(0, 2)}, str(tmp_path / "zeros.safetensors"))
    assert_equal_bits(read_checkpoint(tmp_path / "zeros.safetensors"), {"a": torch.zeros(3, 0), "b": torch.zeros(0, 2)})
    assert read_checkpoint(write_raw(tmp_path / "none.safetensors", {})) == {}
    null_header = {"__metadata__": None, "w": entry([1], [0, 1], "U8")}  # null: no metadata, as safetensors reads it
    null_metadata = write_raw(tmp_path / "null.safetensors", null_header, b"7")
    assert_equal_bits(read_checkpoint(null_metadata), {"w": torch.tensor([55], dtype=torch.uint8)})
    assert safetensors_metadata(null_metadata) == {}


# --- shard indexes: only shards inside the index's folder -------------------------------------------------------


def small() -> dict[str, torch.Tensor]:
    return {"head.modulation": torch.randn(1, 2, 8), "patch_embedding.weight": torch.randn(8, 4)}


def outside_file(tmp_path: Path) -> Path:
    """A file outside every model folder, with a known content that no message may repeat."""
    secret = tmp_path / "outside" / "x.safetensors"
    secret.parent.mkdir()
    secret.write_bytes(SECRET)
    return secret


def index_naming(tmp_path: Path, shard: object) -> Path:
    index = write_sharded(tmp_path / "models" / "wan", small(), shards=2)
    data = json.loads(index.read_text())
    data["weight_map"]["head.modulation"] = shard
    index.write_text(json.dumps(data))
    return index


@pytest.mark.parametrize("shard", ["../../outside/x.safetensors", "../../../../../../../etc/passwd",
                                   "sub/../../outside/x.safetensors", "..\\..\\outside\\x.safetensors"])
def test_index_naming_a_shard_above_its_folder_is_refused(tmp_path, shard):
    outside_file(tmp_path)
    index = index_naming(tmp_path, shard)
    text = refused(index, r"the weight_map entry 'head\.modulation' names the shard .* which is not inside "
                          r".*wan; x2v reads shards only from the index's own folder")
    assert "s3cr3t" not in text and "hunter2" not in text


def test_index_shard_files_are_confined_too(tmp_path):
    """What resolve.py-style callers use to peek at a shard: the same checks as reading the whole index."""
    index = write_sharded(tmp_path / "wan", small(), shards=2)
    assert [p.name for p in index_shard_files(index)] == [f"diffusion_pytorch_model-0000{i}-of-00002.safetensors"
                                                          for i in (1, 2)]
    outside_file(tmp_path)
    with pytest.raises(CheckpointError, match="which is not inside"):
        index_shard_files(index_naming(tmp_path, "../../outside/x.safetensors"))


def test_index_naming_an_absolute_path_is_refused(tmp_path):
    index = index_naming(tmp_path, str(outside_file(tmp_path)))
    refused(index, r"names the shard '/.*x\.safetensors', which is not inside")


@pytest.mark.parametrize("shard, what", [(3, "a number"), (None, "null"), ("", "an empty name"),
                                         ("a\0b", "not a file name"), (["x"], "an array")])
def test_index_naming_a_shard_that_is_no_file_name(tmp_path, shard, what):
    refused(index_naming(tmp_path, shard), rf"entry 'head\.modulation' names a shard that is {what}")


@pytest.mark.parametrize("index, message", [
    ([], r"not a valid shard index \(JSON an array\)"),
    ({"metadata": {}}, r"not a valid shard index \(no weight_map\)"),
    ({"weight_map": ["a"]}, r"not a valid shard index \(no weight_map\)"),
])
def test_index_of_the_wrong_shape(tmp_path, index, message):
    path = tmp_path / "model.safetensors.index.json"
    path.write_text(json.dumps(index))
    refused(path, rf"model\.safetensors\.index\.json: {message}")


def test_index_nested_too_deeply(tmp_path):
    path = tmp_path / "model.safetensors.index.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    refused(path, r"index\.json: the shard index is not valid JSON \(nested too deeply\)")


def test_shard_symlink_leading_out_is_refused(tmp_path):
    secret = outside_file(tmp_path)
    index = write_sharded(tmp_path / "models" / "wan", small(), shards=2)
    shard = index.parent / "diffusion_pytorch_model-00001-of-00002.safetensors"
    save_file(dict(list(small().items())[:1]), str(secret))  # a valid shard: only the link is wrong
    shard.unlink()
    shard.symlink_to(secret)
    text = refused(index, r"index\.json: the shard '.*00001-of-00002\.safetensors' leads outside .*wan "
                          r"\(a symbolic link\)")
    assert str(secret) not in text


def test_a_symlink_loop_is_refused(tmp_path):
    index = write_sharded(tmp_path / "wan", small(), shards=2)
    data = json.loads(index.read_text())
    data["weight_map"]["head.modulation"] = "loop.safetensors"
    index.write_text(json.dumps(data))
    (index.parent / "loop.safetensors").symlink_to("loop.safetensors")
    refused(index, r"names 1 shard\(s\) that are not in")


def test_a_linked_model_folder_and_a_shard_in_a_subfolder_load(tmp_path):
    tensors = small()
    index = write_sharded(tmp_path / "disk" / "wan", tensors, shards=2)
    (index.parent / "sub").mkdir()
    second = "diffusion_pytorch_model-00002-of-00002.safetensors"
    (index.parent / second).rename(index.parent / "sub" / second)
    data = json.loads(index.read_text())
    data["weight_map"] = {k: (f"sub/{v}" if v == second else v) for k, v in data["weight_map"].items()}
    index.write_text(json.dumps(data))
    (tmp_path / "link").symlink_to(tmp_path / "disk" / "wan")  # the whole model folder behind a link is fine
    assert_equal_bits(read_checkpoint(tmp_path / "link" / index.name), tensors)


def hf_cache_snapshot(tmp_path: Path, tensors: dict[str, torch.Tensor], subfolder: str = "") -> Path:
    """The hub cache: ``models--ORG--NAME/snapshots/<commit>/[sub/]file`` links to ``models--ORG--NAME/blobs/<sha>``."""
    repo = tmp_path / "hub" / "models--Wan-AI--Wan2.1-T2V-1.3B"
    staging = write_sharded(tmp_path / "staging", tensors, shards=2).parent
    snapshot = repo / "snapshots" / "0123abcd" / subfolder
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for i, file in enumerate(sorted(staging.iterdir())):
        blob = repo / "blobs" / f"{i:040x}"
        file.rename(blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot / "diffusion_pytorch_model.safetensors.index.json"


@pytest.mark.parametrize("subfolder", ["", "transformer"])
def test_hugging_face_cache_snapshot_loads(tmp_path, subfolder):
    tensors = small()
    index = hf_cache_snapshot(tmp_path, tensors, subfolder)
    assert index.is_symlink() and (index.parent / "diffusion_pytorch_model-00001-of-00002.safetensors").is_symlink()
    assert_equal_bits(read_checkpoint(index), tensors)


def test_hugging_face_cache_link_into_another_repo_is_refused(tmp_path):
    index = hf_cache_snapshot(tmp_path, small())
    other = tmp_path / "hub" / "models--Evil--Repo" / "blobs"
    other.mkdir(parents=True)
    shard = index.parent / "diffusion_pytorch_model-00001-of-00002.safetensors"
    moved = other / ("f" * 40)
    shard.resolve().rename(moved)
    shard.unlink()
    shard.symlink_to(moved)
    refused(index, r"index\.json: the shard .*00001-of-00002\.safetensors' leads outside .*0123abcd ")


# --- block-split folders ----------------------------------------------------------------------------------------


def write_block_split(folder: Path, blocks: int = 2) -> Path:
    folder.mkdir(parents=True)
    save_file({"head.modulation": torch.randn(1, 2, 8)}, str(folder / "non_block.safetensors"))
    for i in range(blocks):
        save_file({f"blocks.{i}.norm3.bias": torch.randn(8)}, str(folder / f"block_{i}.safetensors"))
    return folder


@pytest.mark.parametrize("file", ["non_block.safetensors", "block_1.safetensors"])
def test_block_split_file_linking_out_is_refused(tmp_path, file):
    folder = write_block_split(tmp_path / "lazy")
    secret = tmp_path / "elsewhere.safetensors"
    (folder / file).rename(secret)
    (folder / file).symlink_to(secret)
    refused(folder, rf"lazy: {file} leads outside .*lazy \(a symbolic link\)")


def test_block_split_index_linking_out_is_refused(tmp_path):
    folder = write_block_split(tmp_path / "lazy")
    secret = tmp_path / "outside.json"
    secret.write_text(json.dumps({"weight_map": {}}))
    (folder / "model.safetensors.index.json").symlink_to(secret)
    refused(folder, r"lazy: model\.safetensors\.index\.json leads outside .*lazy ")


def test_block_split_in_the_hugging_face_cache_loads(tmp_path):
    source = write_block_split(tmp_path / "staging")
    repo = tmp_path / "models--lightx2v--Wan-lazy"
    snapshot, blobs = repo / "snapshots" / "abc", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    expected = {}
    for file in sorted(source.iterdir()):
        expected |= load_file(file)
        file.rename(blobs / file.name)
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", file.name))
    assert_equal_bits(read_checkpoint(snapshot), expected)


def test_block_file_with_a_huge_number_costs_no_memory(tmp_path):
    folder = write_block_split(tmp_path / "lazy")
    save_file({"blocks.99999999999.x": torch.zeros(1)}, str(folder / "block_99999999999.safetensors"))
    refused(folder, r"lazy: block-split folder with 3 block file\(s\), .*missing: block_2\.safetensors, "
                    r"block_3\.safetensors, block_4\.safetensors, block_5\.safetensors, block_6\.safetensors \.\.\.")


def test_block_file_name_the_converter_never_writes(tmp_path):
    folder = write_block_split(tmp_path / "lazy")
    (folder / "block_1.safetensors").rename(folder / "block_01.safetensors")
    refused(folder, r"lazy: block_01\.safetensors is not a block file name LightX2V writes \(block_1\.safetensors\)")


# --- pickles ----------------------------------------------------------------------------------------------------


class RunsCode:
    """Unpickling this calls os.system: a malicious checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("container", ["torch.save", "pickle"])
def test_malicious_pickle_runs_nothing_and_gives_no_unsafe_advice(tmp_path, container):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    payload = {"weight": torch.zeros(2), "evil": RunsCode(marker)}
    if container == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(CheckpointError, match=r"evil\.pth: ") as error:
        read_checkpoint(path)
    assert_one_line_naming(error, path)
    assert not marker.exists()
    text = str(error.value)
    assert "weights_only" not in text and "succeed" not in text
    if container == "torch.save":
        assert "holds Python objects other than tensors, which x2v never loads because loading them can run code. " \
               "Get a safetensors version of the file" in text


def test_pickle_of_a_newer_protocol_is_not_a_checkpoint(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"evil": RunsCode(marker)}, protocol=4))
    refused(path, r"evil\.pt: not a PyTorch checkpoint \(or truncated\)")
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"xyz-junk" * 8, SECRET, b""])
def test_junk_pth_quotes_no_byte(tmp_path, content):
    path = tmp_path / "junk.pth"
    path.write_bytes(content)
    text = refused(path, r"junk\.pth: not a PyTorch checkpoint \(or truncated\): torch\.load cannot read it")
    assert "xyz" not in text and "s3cr3t" not in text and "load key" not in text


def test_truncated_pth(tmp_path):
    path = tmp_path / "cut.pth"
    torch.save({"w": torch.zeros(100)}, path)
    os.truncate(path, path.stat().st_size // 2)
    refused(path, r"cut\.pth: not a PyTorch checkpoint \(or truncated\)")


@pytest.mark.parametrize("obj, expected", [
    ({"state_dict": [1, 2], "w": torch.ones(2)}, {"w": torch.ones(2)}),
    ({"model": {"a": {"b": torch.ones(1)}, "w": torch.ones(2)}}, {"w": torch.ones(2)}),
    ({1: torch.ones(1), "w": torch.ones(2), "n": None}, {"w": torch.ones(2)}),
])
def test_pickle_with_nested_non_tensors_keeps_only_named_tensors(tmp_path, obj, expected):
    path = tmp_path / "mixed.pth"
    torch.save(obj, path)
    assert_equal_bits(read_checkpoint(path), expected)


def test_pickle_that_is_no_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.ones(1)], path)
    refused(path, r"list\.pth: expected a state dict \(name -> tensor\), found list")


def test_read_safetensors_on_a_file_the_user_named_is_not_confined(tmp_path):
    """Confinement is for files an index or a folder names; a path the user gives is read wherever it is."""
    target = tmp_path / "elsewhere" / "w.safetensors"
    target.parent.mkdir()
    save_file({"w": torch.ones(3)}, str(target))
    link = tmp_path / "models" / "w.safetensors"
    link.parent.mkdir()
    link.symlink_to(target)
    assert_equal_bits(read_safetensors(link), {"w": torch.ones(3)})
