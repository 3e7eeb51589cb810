"""Checkpoint containers: safetensors (single or sharded with an index) and PyTorch pickles.

Every reader returns a plain ``dict[str, Tensor]`` whose tensors are views of a memory map of the
file: nothing is read from disk until a tensor is used, and casting it to the target dtype/device
is the only copy ever made.
"""

from __future__ import annotations

import json
import os
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
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
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


def read_index(index_path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A sharded safetensors checkpoint: the index must name existing shards that hold exactly its keys."""
    index_path = Path(index_path)
    try:
        weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{index_path}: not a valid shard index ({e}).") from None
    shard_names = sorted(set(weight_map.values()))
    missing = [s for s in shard_names if not (index_path.parent / s).is_file()]
    if missing:
        raise CheckpointError(
            f"{index_path}: the index names {len(missing)} shard(s) that are not in {index_path.parent}: "
            f"{', '.join(missing)}. Download the missing file(s)."
        )
    tensors: dict[str, torch.Tensor] = {}
    for shard in shard_names:
        for name, tensor in read_safetensors(index_path.parent / shard).items():
            if name in tensors:
                raise CheckpointError(f"{index_path.parent / shard}: tensor {name!r} appears in two shards.")
            if weight_map.get(name) != shard:
                raise CheckpointError(
                    f"{index_path.parent / shard}: holds {name!r}, which the index places in "
                    f"{weight_map.get(name, 'no shard')}. The index and shards do not belong together."
                )
            tensors[name] = tensor
    absent = sorted(set(weight_map) - set(tensors))
    if absent:
        raise CheckpointError(
            f"{index_path}: {len(absent)} tensor(s) listed in the index are in no shard (first: {absent[0]}); "
            "a shard is truncated or from another download."
        )
    return tensors


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read any single checkpoint file (or a shard index) by its suffix."""
    path = Path(path)
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
