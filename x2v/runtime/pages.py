"""Pages of memory-mapped checkpoint files: read a tensor's pages in large reads ahead of use, and hand them back to
the kernel after a copy.

A view of a private file mapping that has been read keeps its pages in this process's RSS for as long as the
mapping lives. A loader that copies a tensor (cast, or move to a GPU) drops the source's pages right after the
copy, so a load peaks near one copy of the model, not file + model; lazy offload streams blocks the same way.
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
import os

import torch


_MADV_DONTNEED = 4
_MADV_POPULATE_READ = 22  # Linux >= 5.14: fault a whole range in with one call
_libc = ctypes.CDLL(None, use_errno=True) if os.name == "posix" else None
Pages = tuple[int, int]  # (page-aligned address, length in bytes)


def _span_bytes(tensor: torch.Tensor) -> int:
    """Bytes from the first to one past the last element, for any strided view."""
    return (1 + sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride()))) * tensor.element_size()


class FileMappings:
    """Where this process maps files privately (a snapshot of ``/proc/self/maps``): memory whose pages can be
    dropped and read again from the file. Empty without ``/proc`` (not Linux): then nothing is ever released."""

    def __init__(self) -> None:
        ranges = []
        try:
            with open("/proc/self/maps") as maps:
                for line in maps:
                    fields = line.split(maxsplit=5)
                    path = fields[5].strip() if len(fields) == 6 else ""
                    # Private mappings of regular files only: a /dev/zero mapping is anonymous memory in disguise.
                    if fields[1].endswith("p") and path.startswith("/") and not path.startswith("/dev/"):
                        ranges.append(tuple(int(a, 16) for a in fields[0].split("-")))
        except OSError:
            pass
        ranges.sort()
        self._starts = [start for start, _ in ranges]
        self._ends = [end for _, end in ranges]

    def pages(self, tensor: torch.Tensor) -> Pages | None:
        """The whole pages under ``tensor`` when they lie in one file mapping, else None (e.g. anonymous memory)."""
        if tensor.device.type != "cpu" or tensor.numel() == 0:
            return None
        begin = tensor.data_ptr()
        end = begin + _span_bytes(tensor)
        i = bisect.bisect_right(self._starts, begin) - 1
        if i < 0 or end > self._ends[i]:
            return None
        start = begin - begin % mmap.PAGESIZE
        stop = min(-(-end // mmap.PAGESIZE) * mmap.PAGESIZE, self._ends[i])
        return start, stop - start


def _madvise(pages: Pages | None, advice: int) -> None:
    # Best effort: if the kernel refuses (old kernel, no MADV_POPULATE_READ), pages just fault in or stay.
    if pages is not None and _libc is not None:
        _libc.madvise(ctypes.c_void_p(pages[0]), ctypes.c_size_t(pages[1]), ctypes.c_int(advice))


def read_pages(pages: Pages | None) -> None:
    """Bring a mapped range into memory now, in large reads (no page-by-page faults later)."""
    _madvise(pages, _MADV_POPULATE_READ)


def release_pages(pages: Pages | None) -> None:
    """Drop a mapped range from this process; the data stays in the file (and the page cache).

    Only for ranges ``FileMappings.pages`` returned and nobody wrote to: a written page of a private mapping
    would lose the change.
    """
    _madvise(pages, _MADV_DONTNEED)
