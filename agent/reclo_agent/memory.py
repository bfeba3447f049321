"""Keep freed block buffers in the process instead of handing them back to the kernel.

A backup or restore allocates and frees a few MiB per disk block, millions
of times for a large disk. glibc's defaults return such buffers to the
kernel (``mmap`` above its threshold, trimming the heap top above 128 KiB
free), so every block's buffer is faulted in and zeroed again: on the 1 GiB
benchmark restore that was half the process's time (190,000 page faults
against 23,000). Raising the thresholds lets glibc reuse the memory; peak
memory grows by about the trim threshold at most. No library sets these,
and Python has no ``mallopt``, hence ctypes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc's malloc.h
M_MMAP_THRESHOLD = -3
MiB = 1024 * 1024
MMAP_THRESHOLD = 16 * MiB  # blocks (2 MiB and their frames) from the heap; large download chunks still mmap'd
TRIM_THRESHOLD = 64 * MiB


def keep_freed_buffers() -> bool:
    """Tune glibc's malloc as the module doc says; False where it is not glibc or the user set the thresholds."""
    if any(name in os.environ for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False  # the user's own tuning wins
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False  # not glibc (musl has no mallopt thresholds)
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    log.debug("malloc thresholds %s", "raised" if ok else "left as they were")
    return ok
