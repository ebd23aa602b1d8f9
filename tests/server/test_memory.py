"""Giving free heap pages back to the OS (server/core/memory.py)."""

from __future__ import annotations

import sys

import pytest

from mone.server.core.memory import _malloc_trim, release_free_memory
from tests.server.rel_corpus import rss_mb

glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or _malloc_trim() is None, reason="malloc_trim is glibc's"
)


@glibc
def test_release_returns_the_free_middle_of_the_heap() -> None:
    # 64 KiB blocks stay under glibc's mmap threshold, so they come from the heap.  Keeping every 16th
    # block alive leaves the freed ones as holes that free() itself never hands back.
    blocks = [bytearray(64 * 1024) for _ in range(2048)]  # 128 MiB, zero-filled: resident
    kept = blocks[::16]
    del blocks
    before = rss_mb()
    assert release_free_memory()
    after = rss_mb()
    assert before - after > 50, (before, after)
    assert len(kept) == 128
