"""Checkpoint containers: safetensors (single, sharded with an index, block-split folders) and PyTorch pickles.

Every reader returns a plain ``dict[str, Tensor]`` whose tensors are views of a private memory map of the
file: nothing is read from disk until a tensor is used, and casting it to the target dtype/device
is the only copy ever made. Treat these tensors as read-only: once a loader has copied one, it hands the
file pages back to the kernel (``release_pages``), and a view touched again shows the file's bytes.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import torch

from x2v.errors import CheckpointError

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}

PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin", ".tar")
NON_BLOCK_FILE = "non_block.safetensors"
BLOCK_FILE = re.compile(r"block_(\d+)\.safetensors")
BLOCK_KEY = re.compile(r"blocks\.(\d+)\.")  # LightX2V's converter: re.search, so nested "fuser_blocks.N." counts


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """``json.loads`` hook: a key given twice is an error, not "the last one wins"."""
    result = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"key {key!r} appears twice")
        result[key] = value
    return result


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict, int]:
    """Return (header dict, byte offset where the data section starts); validates sizes."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: file is {size} bytes, too short to be a safetensors file (truncated download?)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(size - 8, 100 * 2**20):
            raise CheckpointError(
                f"{path}: safetensors header claims {header_len} bytes but the file has {size} bytes; "
                "the file is truncated or not a safetensors file. Download it again."
            )
        try:
            header = json.loads(f.read(header_len), object_pairs_hook=_unique_keys)
        except ValueError as e:  # also JSONDecodeError, UnicodeDecodeError
            raise CheckpointError(f"{path}: safetensors header is not valid JSON ({e}); the file is corrupt.") from None
    data_start = 8 + header_len
    end = max((info["data_offsets"][1] for k, info in header.items() if k != "__metadata__"), default=0)
    if data_start + end > size:
        raise CheckpointError(
            f"{path}: truncated file: the header describes {data_start + end} bytes, the file has {size} "
            f"({data_start + end - size} missing). Download it again."
        )
    return header, data_start


def safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    header, _ = read_safetensors_header(path)
    return dict(header.get("__metadata__") or {})


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of one safetensors file as zero-copy views of a private memory map."""
    path = Path(path)
    header, data_start = read_safetensors_header(path)
    size = path.stat().st_size
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)
    raw = torch.empty(0, dtype=torch.uint8).set_(storage)
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {info['dtype']}, which x2v cannot read.")
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        chunk = raw[data_start + begin : data_start + end]
        if (data_start + begin) % dtype.itemsize:
            chunk = chunk.clone()  # unaligned writer: one small copy so the dtype view is legal
        tensors[name] = chunk.view(dtype).reshape(info["shape"])
    return tensors


def read_pickle(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A ``.pth``/``.pt`` state dict, always with ``weights_only=True``; memory-mapped when the format allows."""
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        # Legacy (non-zip) pickles cannot be memory-mapped.
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read this PyTorch checkpoint ({e}). Is the file complete?") from None
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read this PyTorch checkpoint ({e}). Is the file complete?") from None
    # Training checkpoints nest the weights one level down.
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict (name -> tensor), found {type(obj).__name__}.")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _read_weight_map(index_path: Path) -> tuple[dict[str, str], int | None]:
    """(weight_map, metadata.total_size or None) of a shard index; a key listed twice is an error (A02)."""
    try:
        index = json.loads(index_path.read_text(), object_pairs_hook=_unique_keys)
        weight_map: dict[str, str] = index["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"{index_path}: not a valid shard index ({e}); each tensor must be listed once in its weight_map."
        ) from None
    total_size = (index.get("metadata") or {}).get("total_size")
    return weight_map, total_size if isinstance(total_size, int) else None


def _check_index(
    index_path: Path, weight_map: dict[str, str], total_size: int | None, tensors: dict[str, torch.Tensor],
    placement: dict[str, str],
) -> None:
    """The index must place every tensor where it was found, list nothing else, and roughly agree on the size."""
    for name, file in placement.items():
        if weight_map.get(name) != file:
            raise CheckpointError(
                f"{index_path.parent / file}: holds {name!r}, which the index places in "
                f"{weight_map.get(name, 'no shard')}. The index and shards do not belong together."
            )
    absent = sorted(set(weight_map) - set(placement))
    if absent:
        raise CheckpointError(
            f"{index_path}: {len(absent)} tensor(s) listed in the index are in no shard (first: {absent[0]}); "
            "a shard is truncated or from another download."
        )
    if total_size is None:
        return
    # Writers count either tensor bytes (transformers, diffusers) or file bytes (LightX2V's converter).
    tensor_bytes = sum(t.nbytes for t in tensors.values())
    file_bytes = sum((index_path.parent / f).stat().st_size for f in set(placement.values()))
    if not 0.9 * tensor_bytes <= total_size <= 1.1 * file_bytes:
        raise CheckpointError(
            f"{index_path}: metadata.total_size is {total_size:,} bytes, but the shards hold {tensor_bytes:,} bytes "
            f"of tensors ({file_bytes:,} bytes of files). The index belongs to another download or conversion."
        )


def read_index(index_path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A sharded safetensors checkpoint: the index must name existing shards that hold exactly its keys."""
    index_path = Path(index_path)
    weight_map, total_size = _read_weight_map(index_path)
    shard_names = sorted(set(weight_map.values()))
    missing = [s for s in shard_names if not (index_path.parent / s).is_file()]
    if missing:
        raise CheckpointError(
            f"{index_path}: the index names {len(missing)} shard(s) that are not in {index_path.parent}: "
            f"{', '.join(missing)}. Download the missing file(s)."
        )
    tensors: dict[str, torch.Tensor] = {}
    placement: dict[str, str] = {}
    for shard in shard_names:
        for name, tensor in read_safetensors(index_path.parent / shard).items():
            if name in tensors:
                raise CheckpointError(
                    f"{index_path.parent / shard}: tensor {name!r} is also in {placement[name]}; "
                    "each tensor must be in exactly one shard."
                )
            tensors[name], placement[name] = tensor, shard
    _check_index(index_path, weight_map, total_size, tensors, placement)
    return tensors


def is_block_split(directory: str | os.PathLike) -> bool:
    return (Path(directory) / NON_BLOCK_FILE).is_file()


def home_block(name: str) -> int | None:
    """The block file a tensor belongs in (None: non_block), as LightX2V's converter assigns it."""
    match = BLOCK_KEY.search(name)
    if match is None:
        return None
    # Wan2.2-Animate's face adapter has one fuser block per five DiT blocks; the converter files it by DiT block.
    return int(match[1]) * 5 if "face_adapter" in name else int(match[1])


def read_block_split(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A LightX2V "lazy load" folder: ``non_block.safetensors`` + ``block_0 .. block_{N-1}.safetensors`` (+ index).

    Each ``block_i`` file must hold only ``blocks.i.`` tensors and ``non_block`` none of them, so that every tensor
    has exactly one home; an index, when present, must agree.
    """
    directory = Path(directory)
    if not is_block_split(directory):
        raise CheckpointError(f"{directory}: not a block-split folder (no {NON_BLOCK_FILE}).")
    numbers = sorted(int(m[1]) for p in directory.iterdir() if (m := BLOCK_FILE.fullmatch(p.name)))
    absent = sorted(set(range(numbers[-1] + 1 if numbers else 1)) - set(numbers))
    if absent:
        listing = ", ".join(f"block_{i}.safetensors" for i in absent[:5]) + (" ..." if len(absent) > 5 else "")
        raise CheckpointError(
            f"{directory}: block-split folder with {len(numbers)} block file(s), but block files must run from "
            f"block_0 without gaps; missing: {listing}. Download the missing file(s)."
        )
    files = {NON_BLOCK_FILE: None} | {f"block_{i}.safetensors": i for i in numbers}
    tensors: dict[str, torch.Tensor] = {}
    placement: dict[str, str] = {}
    for file, block in files.items():
        for name, tensor in read_safetensors(directory / file).items():
            home = home_block(name)
            if home != block:
                belongs = NON_BLOCK_FILE if home is None else f"block_{home}.safetensors"
                raise CheckpointError(
                    f"{directory / file}: holds {name!r}, which belongs in {belongs}. "
                    "The folder mixes files of different conversions; convert it again."
                )
            tensors[name], placement[name] = tensor, file
    indexes = sorted(directory.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise CheckpointError(f"{directory}: {len(indexes)} shard indexes in one block-split folder; keep one.")
    if indexes:
        weight_map, total_size = _read_weight_map(indexes[0])
        _check_index(indexes[0], weight_map, total_size, tensors, placement)
    return tensors


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read any checkpoint file by its suffix (a shard index reads its shards), or a block-split folder."""
    path = Path(path)
    if path.is_dir():
        if is_block_split(path):
            return read_block_split(path)
        raise CheckpointError(
            f"{path}: a folder; pass the checkpoint file or its .safetensors.index.json "
            f"(only block-split folders, with {NON_BLOCK_FILE}, are read as a whole)."
        )
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found.")
    name = path.name
    if name.endswith(".index.json"):
        return read_index(path)
    if name.endswith(".safetensors"):
        return read_safetensors(path)
    if name.endswith(PICKLE_SUFFIXES):
        return read_pickle(path)
    raise CheckpointError(f"{path}: unknown checkpoint type; expected .safetensors, .safetensors.index.json or .pth/.pt.")
