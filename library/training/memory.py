"""Host-memory tuning for training processes.

glibc raises its mmap threshold dynamically (up to 32 MiB) after large blocks are freed. In a
training loop that means the big activation buffers of the second and later steps come from
the heap, where freed memory fragments and is not returned to the system: measured on the
SD1.5 benchmark model, peak RSS grows by ~0.4 GB after step 1 for nothing. Fixing the
threshold keeps large buffers mmapped, so they go back to the system as soon as they are freed
(anonymous RSS 0.81 GB instead of 1.42 GB after three steps, same numbers otherwise).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

logger = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h
_THRESHOLD = 1 << 20  # 1 MiB: activations are mmapped, small objects stay on the heap
_done = False


def tune_allocator() -> bool:
    """Fix glibc's mmap threshold (Linux/glibc only; respects ``MALLOC_MMAP_THRESHOLD_`` if set).

    Returns:
        True when the setting was applied.
    """
    global _done
    if _done or not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, _THRESHOLD))
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    _done = ok
    if ok:
        logger.debug("glibc mmap threshold fixed at %d bytes", _THRESHOLD)
    return ok
