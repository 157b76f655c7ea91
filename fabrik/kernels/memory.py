"""Giving back the resident pages of memory-mapped weights once a packed copy replaces them.

The loader memory-maps safetensors files, so a weight's pages are the file's pages. Packing a weight for the native
kernels reads every page of it, and those pages would stay resident beside the packed copy: twice the weights'
memory. ``madvise(MADV_DONTNEED)`` drops them; on a file-backed mapping that is always safe, because a later read
faults the same bytes back in from the file (the weights are never written).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
from functools import lru_cache

import torch

_MADV_DONTNEED = 4


@lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name, use_errno=True) if name else None


def _file_backed_ranges() -> list[tuple[int, int]]:
    """Address ranges of this process mapped from regular files (read from /proc/self/maps)."""
    ranges = []
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].startswith("/") and not fields[5].rstrip().endswith("(deleted)"):
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    ranges.append((start, end))
    except OSError:
        return []
    return ranges


def release_mapped_pages(tensors: list[torch.Tensor]) -> int:
    """Drops the resident pages of those ``tensors`` that lie in a file mapping; returns the bytes released.

    Tensors in ordinary memory are left alone (dropping their pages would zero them).
    """
    libc = _libc()
    if libc is None or not tensors:
        return 0
    ranges = _file_backed_ranges()
    page = mmap.PAGESIZE
    released = 0
    for t in tensors:
        start = t.data_ptr()
        end = start + t.numel() * t.element_size()
        if not any(lo <= start and end <= hi for lo, hi in ranges):
            continue
        # Whole pages only: the partial pages at both ends may hold a neighbouring tensor still in use.
        first, last = -(-start // page) * page, end // page * page
        if last > first and libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED) == 0:
            released += last - first
    return released
