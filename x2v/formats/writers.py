"""Streaming safetensors writer: the header is computed from shapes and dtypes first, then tensor bytes are written
one tensor at a time, so a file of any size is written with one tensor in memory.

Files are written under a temporary name beside the final one (``.x2v-tmp-<name>.<pid>@<host>.part``: no
reader's glob of ``*.safetensors`` / ``*.json`` / ``*.pth`` matches it) and fsync'd; ``publish`` renames them when a
whole conversion is complete, so an interrupted run never leaves a file that looks finished. The pid and host in the
name keep two runs apart and tell a later run whether the writer of a leftover temporary file is still alive.

Format (https://github.com/huggingface/safetensors): 8-byte little-endian header length, a JSON header
``{name: {dtype, shape, data_offsets}, "__metadata__": {str: str}}`` padded with spaces to a multiple of 8 bytes,
then the tensors' bytes in offset order.
"""

from __future__ import annotations

import json
import os
import re
import socket
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from x2v.formats.readers import SAFETENSORS_DTYPES

DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
TEMP_PREFIX, TEMP_SUFFIX = ".x2v-tmp-", ".part"
ALIGNMENT = 8


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a file to be written: what the header says before any byte exists."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for n in self.shape:
            count *= n
        return count * self.dtype.itemsize


# <final name>[.<pid>@<host>]: names without the run part were written by x2v versions before run-unique names.
TEMP_NAME = re.compile(rf"{re.escape(TEMP_PREFIX)}(?P<final>.+?)(?:\.(?P<pid>\d+)@(?P<host>[\w.-]+))?"
                       rf"{re.escape(TEMP_SUFFIX)}")


def host_name() -> str:
    """This machine's name as it appears in temporary names and lock files (file-name safe)."""
    return re.sub(r"[^\w.-]", "_", socket.gethostname())[:64] or "localhost"


@dataclass(frozen=True)
class TempName:
    final: str  # the name the file gets when published
    pid: int | None  # None: written by an older x2v, which did not record its run
    host: str | None


def temp_path(path: Path) -> Path:
    """This process's temporary name for ``path``: two runs writing the same output never share a file."""
    return path.with_name(f"{TEMP_PREFIX}{path.name}.{os.getpid()}@{host_name()}{TEMP_SUFFIX}")


def is_temp(path: Path) -> bool:
    return path.name.startswith(TEMP_PREFIX) and path.name.endswith(TEMP_SUFFIX)


def parse_temp(path: Path) -> TempName | None:
    match = TEMP_NAME.fullmatch(path.name)
    if match is None:
        return None
    return TempName(match["final"], int(match["pid"]) if match["pid"] else None, match["host"])


@contextmanager
def naming(path: Path):
    """OSErrors from writing (ENOSPC, EIO...) carry no file name; give them the output's, so one line says which."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            e.filename = str(path)
        raise


def header_bytes(specs: list[TensorSpec], metadata: dict[str, str] | None = None) -> bytes:
    """Length prefix + JSON header (tensors at consecutive offsets in ``specs`` order), space-padded to 8 bytes."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for spec in specs:
        if spec.dtype not in DTYPE_NAMES:
            raise ValueError(f"{spec.name}: dtype {spec.dtype} has no safetensors name")
        if spec.name in header:
            raise ValueError(f"tensor {spec.name!r} listed twice")
        header[spec.name] = {"dtype": DTYPE_NAMES[spec.dtype], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % ALIGNMENT)  # every tensor starts 8-byte aligned
    return struct.pack("<Q", len(text)) + text


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes in C order, without a copy when it is already contiguous."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SafetensorsWriter:
    """Writes ``specs`` in order into ``temp_path(path)``; ``finish`` checks completeness and fsyncs.

    Used as a context manager, an exception removes the temporary file. Renaming is left to ``publish``, so
    several files can become visible together at the end.
    """

    def __init__(self, path: str | os.PathLike, specs: list[TensorSpec], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.temp = temp_path(self.path)
        self.specs = list(specs)
        self._next = 0
        header = header_bytes(self.specs, metadata)
        self.size = len(header) + sum(s.nbytes for s in self.specs)
        with naming(self.path):
            self._file = open(self.temp, "wb")
            try:
                self._file.write(header)
            except BaseException:
                self.abort()  # no context manager has been entered yet to remove it
                raise

    def write(self, name: str, tensor: torch.Tensor) -> int:
        """Append the next tensor (must match the header's name, dtype and shape); returns its byte count."""
        if self._next >= len(self.specs):
            raise ValueError(f"{self.path}: tensor {name!r} is beyond the {len(self.specs)} tensors of the header")
        spec = self.specs[self._next]
        if (name, tensor.dtype, tuple(tensor.shape)) != (spec.name, spec.dtype, spec.shape):
            raise ValueError(f"{self.path}: expected {spec.name} {spec.dtype} {list(spec.shape)} next, "
                             f"got {name} {tensor.dtype} {list(tensor.shape)}")
        with naming(self.path):
            self._file.write(tensor_bytes(tensor))
        self._next += 1
        return spec.nbytes

    def finish(self) -> Path:
        """Close the complete temporary file, its bytes on disk; returns its path."""
        if self._next != len(self.specs):
            raise ValueError(f"{self.path}: {len(self.specs) - self._next} tensor(s) were never written")
        with naming(self.path):
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
        return self.temp

    def abort(self) -> None:
        try:
            self._file.close()  # a full disk can fail the close's flush too: the file goes all the same
        except OSError:
            pass
        self.temp.unlink(missing_ok=True)

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None:
            self.abort()
        elif not self._file.closed:
            self.finish()


def write_temp_text(path: Path, text: str) -> Path:
    """A small text file (index, config.json) written and fsync'd under its temporary name."""
    temp = temp_path(path)
    with naming(path), open(temp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return temp


def publish(finals: list[Path]) -> None:
    """Rename each final path's finished temporary file into place, in the order given (put an index last)."""
    for final in finals:
        os.replace(temp_path(final), final)
    for directory in {final.parent for final in finals}:
        fsync_directory(directory)
