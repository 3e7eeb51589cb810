"""Checkpoint containers: safetensors (single, sharded with an index, block-split folders) and PyTorch pickles.

Every reader returns a plain ``dict[str, Tensor]`` whose tensors are views of a private memory map of the
file: nothing is read from disk until a tensor is used, and casting it to the target dtype/device
is the only copy ever made. Treat these tensors as read-only: once a loader has copied one, it hands the
file pages back to the kernel (``release_pages``), and a view touched again shows the file's bytes.

Files are hostile until checked: a safetensors header is validated completely (by the rules the ``safetensors``
library enforces, some stricter) before any view is made; shards an index or a block-split folder names must lie
inside its folder; pickles load with ``weights_only=True`` only. Error messages name the file and the broken entry
and never repeat the file's bytes.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
import warnings
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

MAX_HEADER_MIB = 16  # real Wan headers are ~100 KB; the safetensors library allows 100 MB
MAX_INDEX_MIB = 64  # real shard indexes are ~100 KB
MAX_DIMS = 64  # real tensors have at most 5
TENSOR_FIELDS = ("dtype", "shape", "data_offsets")
NOT_SAFETENSORS = "the file is corrupt or not a safetensors file; download it again."
# torch's words for a pickle that needs Python objects beyond tensors (its advice to retry unsafely is not repeated).
PICKLE_NEEDS_OBJECTS = re.compile(r"GLOBAL|add_safe_globals|call reduce|must be imported")


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """``json.loads`` hook: a key given twice is an error, not "the last one wins"."""
    result = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(f"key {_quote(key)} appears twice")
        result[key] = value
    return result


def _quote(name: str, limit: int = 100) -> str:
    """A header string for a one-line message: quoted, escaped, and cut short."""
    return repr(name[:limit]) + ("..." if len(name) > limit else "")


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "true/false", type(None): "null"}
    return names.get(type(value), "a number")


def _is_text(value: object) -> bool:
    """A JSON string that is valid UTF-8 (Python's json accepts lone surrogates such as "\\ud800"; safetensors not)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _parse_json(path: Path, raw: bytes, what: str, fix: str) -> object:
    """Parse UTF-8 JSON; every failure is a one-line CheckpointError that quotes no bytes of the file."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: the {what} is not UTF-8 text (bad byte at offset {e.start}); {fix}") from None
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as e:  # its msg may quote a character after a colon ("Invalid \\escape: 'x'")
        problem = f"{e.msg.partition(':')[0]} at character {e.pos}"
    except _DuplicateKey as e:
        problem = str(e)
    except ValueError as e:  # e.g. an integer with more digits than Python converts
        problem = str(e).partition(":")[0]
    except RecursionError:
        problem = "nested too deeply"
    raise CheckpointError(f"{path}: the {what} is not valid JSON ({problem}); {fix}")


# --- safetensors ---------------------------------------------------------------------------------------------


def _corrupt(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"{path}: {problem}; {NOT_SAFETENSORS}")


def _header_length(path: Path, prefix: bytes, size: int) -> int:
    """The header length the first 8 bytes give; never shown, since a file that is no safetensors file (think
    /etc/passwd) would leak its first 8 bytes through the number."""
    if len(prefix) < 8:
        raise CheckpointError(f"{path}: file is {size} bytes, too short to be a safetensors file (truncated download?)")
    (length,) = struct.unpack("<Q", prefix)
    if length > MAX_HEADER_MIB * 2**20:
        raise _corrupt(path, "the first 8 bytes are not a plausible safetensors header length (more than the "
                             f"{MAX_HEADER_MIB} MiB x2v accepts; real Wan headers are about 100 KB)")
    if length > size - 8:
        raise _corrupt(path, "the first 8 bytes are not a plausible safetensors header length (longer than the file)")
    return length


def _check_metadata(path: Path, metadata: object) -> None:
    if not isinstance(metadata, dict):
        raise _corrupt(path, f"__metadata__ is {_json_type(metadata)}, not an object of strings")
    for key, value in metadata.items():
        if not (_is_text(key) and _is_text(value)):
            raise _corrupt(path, f"__metadata__ entry {_quote(str(key))} is {_json_type(value)}, not a string")


def _byte_count(shape: list[int], itemsize: int) -> int | None:
    """Bytes a tensor of ``shape`` takes, or None when a partial product leaves what int64 (torch) and the
    safetensors library's 64-bit bit count can hold. Python ints, so nothing overflows on the way."""
    limit = 2**63 // (8 * itemsize)
    numel = 1
    for dim in shape:
        numel *= dim
        if dim > limit or numel > limit:
            return None
    return numel * itemsize


def _is_count(value: object) -> bool:
    return type(value) is int and value >= 0  # type() rather than isinstance: true/false are no counts


def _check_tensor(path: Path, name: str, info: object) -> tuple[int, int]:
    """One header entry: exactly dtype, shape, data_offsets, consistent with each other; returns (begin, end)."""
    where = f"tensor {_quote(name)}"
    if not _is_text(name):
        raise _corrupt(path, f"{where}: the name is not valid UTF-8 text")
    if not isinstance(info, dict):
        raise _corrupt(path, f"{where}: the entry is {_json_type(info)}, not an object with {', '.join(TENSOR_FIELDS)}")
    missing = [f for f in TENSOR_FIELDS if f not in info]
    extra = [f for f in info if f not in TENSOR_FIELDS]
    if missing or extra:
        problem = f"has no {missing[0]}" if missing else f"has an unknown field {_quote(extra[0])}"
        raise _corrupt(path, f"{where}: the entry {problem}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str):
        raise _corrupt(path, f"{where}: dtype is {_json_type(dtype)}, not a string")
    if dtype not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"{path}: tensor {_quote(name)} has dtype {_quote(dtype, 20)}, which x2v cannot read.")
    if not (isinstance(shape, list) and len(shape) <= MAX_DIMS and all(map(_is_count, shape))):
        raise _corrupt(path, f"{where}: shape must be a list of at most {MAX_DIMS} non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) and o < 2**63 for o in offsets)):
        raise _corrupt(path, f"{where}: data_offsets must be a list of two non-negative integers below 2**63")
    begin, end = offsets
    if begin > end:
        raise _corrupt(path, f"{where}: data_offsets [{begin}, {end}] end before they begin")
    nbytes = _byte_count(shape, SAFETENSORS_DTYPES[dtype].itemsize)
    if nbytes != end - begin:
        needs = "more bytes than any file holds" if nbytes is None else f"{nbytes} bytes"
        raise _corrupt(path, f"{where}: shape {shape if nbytes is not None else '(huge)'} of {dtype} needs {needs}, "
                             f"but data_offsets [{begin}, {end}] hold {end - begin}")
    return begin, end


def _check_layout(path: Path, spans: list[tuple[int, int, str]], data_start: int, size: int) -> None:
    """The tensors must tile the data section: no gap, no overlap, nothing missing, nothing after the end."""
    covered = 0
    for begin, end, name in sorted(spans):
        if begin != covered:
            problem = "overlap the tensor before them" if begin < covered else f"leave {begin - covered} bytes unused"
            raise _corrupt(path, f"tensor {_quote(name)}: data_offsets [{begin}, {end}] {problem}")
        covered = end
    if data_start + covered > size:
        raise CheckpointError(
            f"{path}: truncated file: the header describes {data_start + covered} bytes, the file has {size} "
            f"({data_start + covered - size} missing). Download it again."
        )
    if data_start + covered < size:
        raise _corrupt(path, f"{size - data_start - covered} bytes follow the last tensor the header describes")


def _validated_header(path: Path) -> tuple[dict, int, int]:
    """(header, data start, file size) of a safetensors file whose header passed every check; reads no tensor data."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            length = _header_length(path, f.read(8), size)
            raw = f.read(length)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the file ({e.strerror or type(e).__name__}).") from None
    header = _parse_json(path, raw, "safetensors header", NOT_SAFETENSORS)
    if not isinstance(header, dict):
        raise _corrupt(path, f"the safetensors header is {_json_type(header)}, not an object")
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            if info is not None:  # null: no metadata, as the safetensors library reads it
                _check_metadata(path, info)
        else:
            spans.append((*_check_tensor(path, name, info), name))
    _check_layout(path, spans, 8 + length, size)
    return header, 8 + length, size


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict, int]:
    """Return (header dict, byte offset where the data section starts); the header is validated completely."""
    header, data_start, _ = _validated_header(Path(path))
    return header, data_start


def safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    header, _ = read_safetensors_header(path)
    return dict(header.get("__metadata__") or {})


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of one safetensors file as zero-copy views of a private memory map."""
    path = Path(path)
    header, data_start, size = _validated_header(path)
    try:
        storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)
    except RuntimeError:
        raise CheckpointError(f"{path}: cannot memory-map the file (did it change while being read?).") from None
    raw = torch.empty(0, dtype=torch.uint8).set_(storage)
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        chunk = raw[data_start + begin : data_start + end]
        if (data_start + begin) % dtype.itemsize:
            chunk = chunk.clone()  # unaligned writer: one small copy so the dtype view is legal
        tensors[name] = chunk.view(dtype).reshape(info["shape"])
    return tensors


# --- PyTorch pickles -----------------------------------------------------------------------------------------


def _torch_load(path: Path) -> object:
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"  # legacy (non-zip) pickles cannot be memory-mapped
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol")  # plain pickles: noise, not news
        return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)


def read_pickle(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A ``.pth``/``.pt`` state dict, always with ``weights_only=True``; memory-mapped when the format allows."""
    path = Path(path)
    try:
        obj = _torch_load(path)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the file ({e.strerror or type(e).__name__}).") from None
    except pickle.UnpicklingError as e:
        if PICKLE_NEEDS_OBJECTS.search(str(e)):
            raise CheckpointError(
                f"{path}: the file holds Python objects other than tensors, which x2v never loads because loading "
                "them can run code. Get a safetensors version of the file, or convert it on a machine where you "
                "trust its origin."
            ) from None
        raise _not_a_pickle(path, e) from None
    except Exception as e:  # torch's messages for broken files may quote the file's bytes ("invalid load key, 'x'")
        raise _not_a_pickle(path, e) from None
    # Training checkpoints nest the weights one level down.
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict (name -> tensor), found {type(obj).__name__}.")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def _not_a_pickle(path: Path, error: Exception) -> CheckpointError:
    return CheckpointError(f"{path}: not a PyTorch checkpoint (or truncated): torch.load cannot read it "
                           f"({type(error).__name__}). Download it again.")


# --- Confinement: an index or a block-split folder reads only files inside its folder ---------------------------


def _hf_cache_blobs(folder: Path) -> Path | None:
    """``models--ORG--NAME/blobs`` when ``folder`` lies in a snapshot of that Hugging Face cache repo: the hub
    keeps snapshot files as symlinks into it."""
    parts = folder.parts
    for i in reversed(range(len(parts) - 2)):
        if parts[i].startswith("models--") and parts[i + 1] == "snapshots":
            return Path(*parts[: i + 1], "blobs")
    return None


def _check_inside(source: Path, folder: Path, path: Path, entry: str) -> None:
    """``path`` (after symlinks) must lie in ``folder`` or, for a Hugging Face cache snapshot, its repo's blobs;
    ``source`` (the index or folder that names it) and ``entry`` say where it was named."""
    try:
        root, target = folder.resolve(), path.resolve()
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop
        raise CheckpointError(f"{source}: cannot follow the symbolic links of {entry}.") from None
    blobs = _hf_cache_blobs(root)
    if target.is_relative_to(root) or (blobs is not None and target.is_relative_to(blobs)):
        return
    raise CheckpointError(
        f"{source}: {entry} leads outside {folder} (a symbolic link); x2v reads only files inside a model folder. "
        "Copy the file into the folder, or pass that file to x2v itself."
    )


# --- Shard indexes and block-split folders -------------------------------------------------------------------


def _read_weight_map(index_path: Path) -> tuple[dict[str, str], int | None]:
    """(weight_map, metadata.total_size or None) of a shard index; a key listed twice is an error (A02)."""
    try:
        if index_path.stat().st_size > MAX_INDEX_MIB * 2**20:
            raise CheckpointError(f"{index_path}: more than {MAX_INDEX_MIB} MiB, too large for a shard index "
                                  "(real ones are about 100 KB); the file is corrupt or not an index.")
        raw = index_path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{index_path}: cannot read the file ({e.strerror or type(e).__name__}).") from None
    index = _parse_json(index_path, raw, "shard index", "the index is corrupt; download it again.")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        found = "no weight_map" if isinstance(index, dict) else f"JSON {_json_type(index)}"
        raise CheckpointError(f"{index_path}: not a valid shard index ({found}); expected an object whose weight_map "
                              "lists each tensor once with its shard file.")
    for name, shard in weight_map.items():
        if not _is_text(name):
            raise CheckpointError(f"{index_path}: the weight_map has a key that is not valid UTF-8 text.")
        _check_shard_name(index_path, name, shard)
    metadata = index.get("metadata")
    total_size = metadata.get("total_size") if isinstance(metadata, dict) else None
    return weight_map, total_size if type(total_size) is int else None


def _check_shard_name(index_path: Path, tensor: str, shard: object) -> None:
    """A shard name is a relative path below the index's folder: no absolute path, no ``..``."""
    entry = f"the weight_map entry {_quote(tensor)}"
    if not isinstance(shard, str) or not _is_text(shard) or not shard or "\0" in shard:
        what = "an empty name" if shard == "" else "not a file name" if isinstance(shard, str) else _json_type(shard)
        raise CheckpointError(f"{index_path}: {entry} names a shard that is {what}; the index is corrupt.")
    if shard.startswith(("/", "\\")) or ".." in re.split(r"[/\\]", shard) or re.match(r"[A-Za-z]:", shard):
        raise CheckpointError(
            f"{index_path}: {entry} names the shard {_quote(shard)}, which is not inside {index_path.parent}; "
            "x2v reads shards only from the index's own folder. The index is corrupt or hostile."
        )


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


def _index_shards(index_path: Path) -> tuple[dict[str, str], int | None, list[str]]:
    """(weight_map, total_size, shard names) of an index whose shards all exist inside its folder."""
    folder = index_path.parent
    weight_map, total_size = _read_weight_map(index_path)
    shard_names = sorted(set(weight_map.values()))
    missing = [s for s in shard_names if not (folder / s).is_file()]
    if missing:
        raise CheckpointError(
            f"{index_path}: the index names {len(missing)} shard(s) that are not in {folder}: "
            f"{', '.join(map(_quote, missing[:5]))}{' ...' if len(missing) > 5 else ''}. Download the missing file(s)."
        )
    for shard in shard_names:
        _check_inside(index_path, folder, folder / shard, f"the shard {_quote(shard)}")
    return weight_map, total_size, shard_names


def index_shard_files(index_path: str | os.PathLike) -> list[Path]:
    """The shard files a ``.safetensors.index.json`` names, sorted, each checked to exist inside its folder."""
    index_path = Path(index_path)
    return [index_path.parent / shard for shard in _index_shards(index_path)[2]]


def read_index(index_path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A sharded safetensors checkpoint: the index must name existing shards, inside its folder, that hold exactly
    its keys. (The index itself is not confined: the user named it.)"""
    index_path = Path(index_path)
    folder = index_path.parent
    weight_map, total_size, shard_names = _index_shards(index_path)
    tensors: dict[str, torch.Tensor] = {}
    placement: dict[str, str] = {}
    for shard in shard_names:
        for name, tensor in read_safetensors(folder / shard).items():
            if name in tensors:
                raise CheckpointError(
                    f"{folder / shard}: tensor {name!r} is also in {placement[name]}; "
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


def _block_numbers(directory: Path) -> list[int]:
    """The N of every ``block_N.safetensors``, which must run from 0 without gaps (and be written as the converter
    writes them: ``block_007`` would never be read)."""
    try:
        names = [p.name for p in directory.iterdir()]
    except OSError as e:
        raise CheckpointError(f"{directory}: cannot list the folder ({e.strerror or type(e).__name__}).") from None
    numbers = []
    for name in sorted(names):
        if match := BLOCK_FILE.fullmatch(name):
            if str(int(match[1])) != match[1]:
                raise CheckpointError(f"{directory}: {name} is not a block file name LightX2V writes "
                                      f"(block_{int(match[1])}.safetensors); rename or remove it.")
            numbers.append(int(match[1]))
    numbers.sort()
    # Gaps from neighbours, not from range(max + 1): a file named block_99999999999 must not cost memory.
    absent = [i for low, high in zip([-1, *numbers], numbers) for i in range(low + 1, min(high, low + 7))]
    if absent or not numbers:
        absent = absent or [0]
        listing = ", ".join(f"block_{i}.safetensors" for i in absent[:5]) + (" ..." if len(absent) > 5 else "")
        raise CheckpointError(
            f"{directory}: block-split folder with {len(numbers)} block file(s), but block files must run from "
            f"block_0 without gaps; missing: {listing}. Download the missing file(s)."
        )
    return numbers


def read_block_split(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A LightX2V "lazy load" folder: ``non_block.safetensors`` + ``block_0 .. block_{N-1}.safetensors`` (+ index).

    Each ``block_i`` file must hold only ``blocks.i.`` tensors and ``non_block`` none of them, so that every tensor
    has exactly one home; an index, when present, must agree. Every file must lie inside the folder.
    """
    directory = Path(directory)
    if not is_block_split(directory):
        raise CheckpointError(f"{directory}: not a block-split folder (no {NON_BLOCK_FILE}).")
    files = {NON_BLOCK_FILE: None} | {f"block_{i}.safetensors": i for i in _block_numbers(directory)}
    indexes = sorted(directory.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise CheckpointError(f"{directory}: {len(indexes)} shard indexes in one block-split folder; keep one.")
    for file in [*files, *(i.name for i in indexes)]:
        _check_inside(directory, directory, directory / file, file)
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
    raise CheckpointError(
        f"{path}: unknown checkpoint type; expected .safetensors, .safetensors.index.json or .pth/.pt."
    )
