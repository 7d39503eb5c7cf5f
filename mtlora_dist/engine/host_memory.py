"""Keep freed host memory in the process, so CPU training does not pay page faults every step.

glibc serves allocations above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and
returns them to the kernel on ``free``; PyTorch's CPU allocator does not cache. A CPU training
step allocates and frees the same large activations every step, so every step touches fresh
pages: ~80,000 minor faults per Swin-T step at 224 px, batch 2, which made the step about 1.4x
slower on our 2-core machines (benchmarks/model_step.py, docs/performance.md). Serving every allocation
from the heap and never trimming it below 1 GiB keeps the pages mapped after the first steps.

The cost is that the process keeps its peak heap until it exits. Set ``MTLORA_KEEP_FREED_MEMORY=0``
to leave glibc's defaults alone. Other C libraries (musl, macOS) are left untouched.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
_M_MMAP_MAX = -4
_TRIM_THRESHOLD_BYTES = 1 << 30
_applied = False


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to reuse freed memory instead of unmapping it; True when applied.

    Idempotent; DataLoader workers forked afterwards inherit the setting.
    """
    global _applied
    if _applied:
        return True
    if os.environ.get("MTLORA_KEEP_FREED_MEMORY", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES))
    return _applied
