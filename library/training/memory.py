"""Host-memory tuning for training processes.

Two phases. While models load, :func:`tune_allocator` fixes glibc's mmap threshold at 1 MiB, so
the big temporaries of loading and converting weights go back to the system when freed. For the
training loop, :func:`tune_allocator_for_training` stops glibc from mmapping at all and from trimming
its heap: every step allocates and frees the same buffers, and taking them from the heap instead of
fresh mappings removes the page faults (and the kernel's zeroing of every page) that otherwise cost
a large share of a CPU step (issue 12, measured on the SD1.5 shape: ~1.0 M minor faults and 2.4-3.4 s
of kernel time per step with the 1 MiB threshold, 0.33 M and ~0.8 s with glibc's defaults, which still
mmap every buffer over 32 MiB such as oneDNN's reordered conv weights, and none with the heap).

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

_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers in glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_NEVER_TRIM = (1 << 31) - 1  # mallopt takes an int: only a >2 GiB free top is returned
_THRESHOLD = 1 << 20  # 1 MiB: activations are mmapped, small objects stay on the heap
_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")
_done = False
_training = False


def _mallopt(*settings: tuple[int, int]) -> bool:
    """Apply ``mallopt(param, value)`` pairs; False off glibc/Linux or when the user tuned malloc."""
    if not sys.platform.startswith("linux") or any(k in os.environ for k in _ENV):
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        return all(bool(libc.mallopt(param, value)) for param, value in settings)
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False


def tune_allocator() -> bool:
    """Loading phase: fix glibc's mmap threshold at 1 MiB (Linux/glibc only; a user's own
    ``MALLOC_*_`` / ``GLIBC_TUNABLES`` settings win).

    Returns:
        True when the setting was applied.
    """
    global _done
    if _done:
        return False
    _done = _mallopt((_M_MMAP_THRESHOLD, _THRESHOLD))
    if _done:
        logger.debug("glibc mmap threshold fixed at %d bytes", _THRESHOLD)
    return _done


def tune_allocator_for_training() -> bool:
    """Training phase: serve every allocation from glibc's heap and never trim it.

    Call once the models are built, right before the loop. Peak RSS is unchanged in the
    measurements (the heap's high-water mark is the step's live buffers), steps lose their
    page faults. Returns True when applied.
    """
    global _training
    if _training:
        return False
    _training = _mallopt((_M_TRIM_THRESHOLD, _NEVER_TRIM), (_M_MMAP_MAX, 0))
    if _training:
        logger.debug("glibc malloc: no mmap, no heap trimming for the training loop")
    return _training
