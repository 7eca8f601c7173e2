"""Give back the resident pages of memory-mapped weights that a process has replaced.

Weights loaded from safetensors files (by sdtk's reader or by diffusers) are views of a (private,
copy-on-write) mapping of the file, and the mapping lives until the last tensor viewing it is gone. A conversion that
replaces most tensors but not all (``--fp8_base`` keeps biases and norms) therefore leaves every page it
read resident, counted in the process's RSS: quantizing a full-size fp32 SDXL UNet from a diffusers
folder peaked at 12.9 GB, for 2.5 GB of float8 weights (issue 12, docs/benchmarks.md).

:func:`release_file_pages` tells the kernel (``madvise(MADV_DONTNEED)``) that the pages under given
tensors are not needed. It acts only inside mappings of regular files; anonymous memory (the heap,
tensors torch allocated) is never touched. A later read of a released page faults it in again from the
file. safetensors maps files private and writable (copy-on-write), so a page that was *written* (say,
a LoRA merged into the weights in place) comes back as the file's bytes: call it only for tensors
nobody reads again — the weights a conversion has just replaced. Linux only; elsewhere it does nothing.
"""

from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import functools
import mmap
import sys
from typing import Iterable

import torch

_MADV_DONTNEED = 4
_PAGE = mmap.PAGESIZE


def file_ranges(maps_text: str | None = None) -> list[tuple[int, int]]:
    """``[(start, end)]`` of this process's mappings of regular files, sorted
    (from ``/proc/self/maps``, or ``maps_text`` in that format)."""
    if maps_text is None:
        try:
            with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
                maps_text = f.read()
        except OSError:
            return []
    ranges = []
    for line in maps_text.splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) < 6 or parts[4] == "0" or not parts[5].startswith("/"):
            continue  # anonymous memory, the heap, the stack, [vvar] ...
        start, end = (int(x, 16) for x in parts[0].split("-"))
        ranges.append((start, end))
    ranges.sort()
    return ranges


@functools.cache
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return libc
    except (OSError, AttributeError):
        return None


def release_file_pages(tensors: Iterable[torch.Tensor], ranges: list[tuple[int, int]] | None = None) -> int:
    """Drop the resident pages under ``tensors`` that lie wholly inside a file mapping.

    Call only for tensors nobody reads again (see the module's docstring). ``ranges``:
    :func:`file_ranges`, read once by callers that release many tensors. Returns the number of
    bytes advised.
    """
    libc = _libc()
    if libc is None:
        return 0
    ranges = file_ranges() if ranges is None else ranges
    if not ranges:
        return 0
    starts = [r[0] for r in ranges]
    released = 0
    for t in tensors:
        if t.device.type != "cpu" or not t.is_contiguous() or t.numel() == 0:
            continue
        lo = t.data_ptr()
        hi = lo + t.numel() * t.element_size()
        i = bisect.bisect_right(starts, lo) - 1
        if i < 0 or hi > ranges[i][1]:
            continue  # not (wholly) inside one file mapping
        a = -(-lo // _PAGE) * _PAGE  # whole pages only: a neighbour may still be in use
        b = hi // _PAGE * _PAGE
        if b > a and libc.madvise(ctypes.c_void_p(a), ctypes.c_size_t(b - a), _MADV_DONTNEED) == 0:
            released += b - a
    return released


__all__ = ["file_ranges", "release_file_pages"]
