"""Keep freed memory in the process, so that CPU inference does not page-fault its way through every batch.

glibc's ``malloc`` serves large blocks (a few MB: the activations of a batch of 32 sentences) with fresh
``mmap`` pages and returns them to the kernel on ``free``; the next batch then touches new pages, and every
first touch is a page fault that zeroes 4 KiB. On a small virtual machine that cost is a large share of a
batch's time (docs/benchmarks.md, "CPU backends"). Early exit makes it worse, since every layer sees a new
(rows, length) shape. Raising glibc's ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` keeps those blocks on the heap for reuse
(what jemalloc or tcmalloc, often preloaded for PyTorch CPU inference, do by design); the cost is that the
process keeps its peak memory instead of returning it.

layerexit's own commands call :func:`keep_freed_memory` at start-up; a library caller may call it (it is
process-wide). It does nothing off glibc, when ``LD_PRELOAD`` names another allocator, when the user set any
``MALLOC_*_`` tuning variable themselves, or when ``LAYEREXIT_KEEP_FREED_MEMORY=0``.
"""

from __future__ import annotations

import ctypes
import os
import platform

# mallopt parameters (glibc <malloc.h>)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: blocks up to this size come from the heap (glibc's ceiling for the parameter on 64-bit systems)
MMAP_THRESHOLD = 32 * 1024 * 1024
#: free memory at the top of the heap is returned to the kernel only beyond this
TRIM_THRESHOLD = 1024 * 1024 * 1024
_USER_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
_applied: dict | None = None


def keep_freed_memory() -> dict | None:
    """Set glibc's thresholds (once per process); returns what was set, or ``None`` when left alone."""
    global _applied
    if _applied is not None:
        return _applied
    if os.environ.get("LAYEREXIT_KEEP_FREED_MEMORY", "1") == "0" or _user_chose_allocator():
        return None
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not (mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        return None
    _applied = {"allocator": "glibc", "mmap_threshold": MMAP_THRESHOLD, "trim_threshold": TRIM_THRESHOLD}
    return _applied


def _user_chose_allocator() -> bool:
    if any(name in os.environ for name in _USER_VARIABLES):
        return True
    preload = os.environ.get("LD_PRELOAD", "")
    return any(name in preload for name in ("jemalloc", "tcmalloc", "mimalloc"))
