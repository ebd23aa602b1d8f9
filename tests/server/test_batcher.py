"""The dynamic batcher alone: sizes, waiting, kinds, cancellation and expiry."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Coroutine
from typing import Any

import pytest
import torch

from mone.server.core.batcher import Batch, Batcher, WorkItem
from mone.server.core.budget import Budget
from mone.server.core.request import InferRequest

pytestmark = pytest.mark.anyio


def item(frames: int = 1, deadline_s: float = 10.0) -> WorkItem:
    now = time.monotonic()
    kind = "image" if frames == 1 else "clip"
    return WorkItem(
        InferRequest(torch.zeros(frames, 1, 4, 4), kind, Budget("default", 1.0), arrival=now),
        now + deadline_s,
    )


async def batch_beside(b: Batcher, side: Coroutine[Any, Any, None]) -> tuple[Batch, float]:
    """The next batch of `b` while `side` runs (started first), and the seconds it took to form."""
    task = asyncio.create_task(side)
    await asyncio.sleep(0)
    start = time.monotonic()
    batch = await b.next_batch()
    await task
    return batch, time.monotonic() - start


async def test_full_batch_is_handed_out_at_once() -> None:
    b = Batcher(max_batch_size=4, max_batch_wait_ms=1000, max_queue_size=16)
    items = [item() for _ in range(6)]
    for it in items:
        b.put(it)
    start = time.monotonic()
    batch = await b.next_batch()
    assert time.monotonic() - start < 0.5
    assert batch.items == items[:4]
    assert len(b) == 2


async def test_partial_batch_waits_then_goes() -> None:
    b = Batcher(max_batch_size=4, max_batch_wait_ms=50, max_queue_size=16)
    b.put(item())

    async def late() -> None:
        await asyncio.sleep(0.01)
        b.put(item())

    batch, seconds = await batch_beside(b, late())
    assert 0.04 <= seconds < 0.5
    assert len(batch.items) == 2


async def test_kinds_do_not_mix_and_order_is_kept() -> None:
    b = Batcher(max_batch_size=8, max_batch_wait_ms=0, max_queue_size=16)
    a1, c1, a2 = item(1), item(8), item(1)
    for it in (a1, c1, a2):
        b.put(it)
    assert (await b.next_batch()).items == [a1, a2]
    assert (await b.next_batch()).items == [c1]


async def test_cancelled_items_are_dropped_and_expired_reported() -> None:
    b = Batcher(max_batch_size=8, max_batch_wait_ms=0, max_queue_size=16)
    gone, old, ok = item(), item(deadline_s=-1), item()
    gone.cancelled = True
    for it in (gone, old, ok):
        b.put(it)
    batch = await b.next_batch()
    assert batch.items == [ok]
    assert batch.expired == [old]


async def test_queue_is_bounded() -> None:
    b = Batcher(max_batch_size=2, max_batch_wait_ms=0, max_queue_size=2)
    b.put(item())
    b.put(item())
    assert b.full()
    with pytest.raises(OverflowError):
        b.put(item())


async def test_incoming_wait_runs_a_lone_item_at_once() -> None:
    b = Batcher(max_batch_size=4, max_batch_wait_ms=1000, max_queue_size=16, wait="incoming")
    b.put(item())
    start = time.monotonic()
    batch = await b.next_batch()
    assert time.monotonic() - start < 0.5
    assert len(batch.items) == 1


async def test_incoming_wait_waits_for_a_request_being_decoded() -> None:
    b = Batcher(max_batch_size=4, max_batch_wait_ms=1000, max_queue_size=16, wait="incoming")
    b.put(item())

    async def decode_then_put() -> None:
        with b.coming():
            await asyncio.sleep(0.05)
        b.put(item())

    batch, seconds = await batch_beside(b, decode_then_put())  # being decoded before the batch forms
    assert 0.03 <= seconds < 0.5
    assert len(batch.items) == 2


async def test_incoming_wait_gives_up_on_a_request_that_never_arrives() -> None:
    b = Batcher(max_batch_size=4, max_batch_wait_ms=100, max_queue_size=16, wait="incoming")
    b.put(item())

    async def fail_while_decoding() -> None:
        with contextlib.suppress(ValueError), b.coming():
            await asyncio.sleep(0.02)
            raise ValueError("undecodable")

    batch, seconds = await batch_beside(b, fail_while_decoding())
    assert 0.08 <= seconds < 0.6
    assert len(batch.items) == 1
