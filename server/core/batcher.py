"""The dynamic batcher: a bounded FIFO that hands out batches of up to `max_batch_size` items.

A batch starts with the oldest waiting item and collects items of the same input kind (frames per sample)
until it is full or `max_batch_wait_ms` has passed since it started; with `wait="incoming"`, it stops
waiting as soon as no request is on its way to the queue (see `Batcher.coming`): a lone request on an idle
server runs at once instead of waiting for batch-mates that cannot come.  Items of other kinds stay queued in
order.  Budgets may differ inside a batch (the model takes one e_c per sample), so a cheap request is never
queued behind a different budget.  Items whose client left are dropped; items whose hard deadline passed
are handed back as `expired` so that the caller can answer them 504 without running them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import Tensor

from mone.server.core.budget import Budget, Level
from mone.server.core.request import InferRequest


@dataclass(eq=False)
class WorkItem:
    """One request travelling from admission to its result."""

    request: InferRequest
    deadline: float  # hard deadline (monotonic); 504 when passed before running
    level: Level | None = None  # planned at admission (BudgetKind.level), or when the batch forms (deadline)
    future: asyncio.Future[Any] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    enqueued: float = 0.0
    dequeued: float = 0.0
    degraded: bool = False
    planned_ms: float | None = None
    cancelled: bool = False
    outcome: str | None = None  # succeeded / failed / cancelled, set exactly once

    @property
    def x(self) -> Tensor:
        """The input, (T, C, H, W)."""
        return self.request.x

    @property
    def budget(self) -> Budget:
        return self.request.budget

    @property
    def arrival(self) -> float:
        """time.monotonic() when the request arrived."""
        return self.request.arrival

    @property
    def frames(self) -> int:
        return self.request.frames

    @property
    def latency_deadline(self) -> float | None:
        if not self.budget.kind.deadline:
            return None
        return self.arrival + self.budget.value / 1e3


@dataclass
class Batch:
    items: list[WorkItem]
    expired: list[WorkItem]


class Batcher:
    """Bounded queue + batch collection; used from one event loop.

    Args:
        max_batch_size: most items in one batch.
        max_batch_wait_ms: how long a batch waits for more items after its first.
        max_queue_size: most queued items; `put` refuses beyond it.
        wait: "always" waits `max_batch_wait_ms` for a batch to fill; "incoming" only while a request is
            on its way (inside `coming()`).
    """

    def __init__(
        self,
        max_batch_size: int,
        max_batch_wait_ms: float,
        max_queue_size: int,
        wait: Literal["always", "incoming"] = "always",
    ) -> None:
        self.max_batch_size = max_batch_size
        self.max_wait = max_batch_wait_ms / 1e3
        self.max_queue_size = max_queue_size
        self.wait = wait
        self._queue: deque[WorkItem] = deque()
        self._wakeup = asyncio.Event()
        self._coming = 0

    @contextlib.contextmanager
    def coming(self) -> Iterator[None]:
        """Mark a request on its way to `put` (being decoded): a forming batch waits for it.  Leaving does
        not wake the batch; the `put` that follows does (or the wait runs out, if the request failed)."""
        self._coming += 1
        try:
            yield
        finally:
            self._coming -= 1

    def __len__(self) -> int:
        return len(self._queue)

    def __contains__(self, item: WorkItem) -> bool:
        return any(it is item for it in self._queue)

    def full(self) -> bool:
        return len(self._queue) >= self.max_queue_size

    def put(self, item: WorkItem) -> None:
        if self.full():
            raise OverflowError("queue full")
        item.enqueued = time.monotonic()
        self._queue.append(item)
        self._wakeup.set()

    def requeue_front(self, items: Iterable[WorkItem]) -> None:
        """Put items back at the head of the queue, keeping their order."""
        self._queue.extendleft(reversed(list(items)))
        if self._queue:
            self._wakeup.set()

    def remove(self, item: WorkItem) -> bool:
        """Take a queued item out (client went away); False if it already left the queue."""
        try:
            self._queue.remove(item)
        except ValueError:
            return False
        return True

    def drain(self) -> list[WorkItem]:
        items = list(self._queue)
        self._queue.clear()
        return items

    async def wait_for_work(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the queue to hold an item; False when it stayed empty."""
        if not self._queue:
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout=timeout)
        return bool(self._queue)

    async def next_batch(self) -> Batch:
        """Wait for work, then collect one batch of a single input kind."""
        while not self._queue:
            self._wakeup.clear()
            await self._wakeup.wait()
        start = time.monotonic()
        frames = self._queue[0].frames
        items: list[WorkItem] = []
        expired: list[WorkItem] = []
        while True:
            self._take(frames, items, expired)
            left = self.max_wait - (time.monotonic() - start)
            if len(items) >= self.max_batch_size or left <= 0 or (not items and not self._queue):
                break
            if self.wait == "incoming" and not self._coming and items:
                break
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout=left)
        items = [it for it in items if not it.cancelled]  # clients that left while the batch formed
        now = time.monotonic()
        for item in items:
            item.dequeued = now
        return Batch(items, expired)

    def _take(self, frames: int, items: list[WorkItem], expired: list[WorkItem]) -> None:
        now = time.monotonic()
        kept: deque[WorkItem] = deque()
        while self._queue and len(items) < self.max_batch_size:
            item = self._queue.popleft()
            if item.cancelled:
                continue
            if now >= item.deadline:
                expired.append(item)
            elif item.frames == frames:
                items.append(item)
            else:
                kept.append(item)
        self._queue.extendleft(reversed(kept))
