"""Handing freed heap memory back to the operating system when the server goes idle.

glibc keeps freed blocks in its arenas for reuse and returns only the free space at the top of a heap.
Batches change shape from one to the next (batch size x capacity x frames), so the activation buffers of a
224 px model fragment the inference thread's arena: its resident size creeps up under mixed budgets (S/16,
3,000 requests at capacities 1.0/0.5/0.25 in turn: 598 -> 660 MB) although nothing is leaked.
`malloc_trim(0)` gives every whole free page of every arena back.  The engine calls it on the inference
thread once the queue has stayed empty for `release_memory_idle_s`, never between batches under load, where
the pages would only be faulted straight back in.  Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim  # glibc only (musl has no malloc_trim)
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_free_memory() -> bool:
    """Return the allocator's free pages to the OS; True when anything was given back."""
    trim = _malloc_trim()
    if trim is None:
        return False
    return bool(trim(0))
