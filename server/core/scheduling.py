"""Batch formation: the levels a forming batch runs at, and the time estimates admission relies on.

Pure planning over the latency model and the capacity levels; no queue, no model, no HTTP.  Budgets are
decided here when a batch forms (docs/serving.md section 4):

* items whose kind picks the level at admission (`capacity`, `gflops`: `BudgetKind.level`,
  server/core/budget_kinds.py) keep it;
* items without a budget get `default_capacity`; unpinned ones (`BudgetKind.pinned`) are lowered by the
  `degrade` overload policy as the queue fills (linearly from `degrade_start` fill down to `degrade_floor`
  when full);
* items of a deadline kind (`latency_ms`: `BudgetKind.deadline`) get the largest level whose predicted
  batch time fits the tightest of their budgets; if pinned work in the batch makes that impossible, they
  run first in a batch of their own; if even the floor cannot fit, they run at the floor and will be
  counted as missed.
* Under a stream of latency-budgeted requests (another one expected while the batch runs), a batch may
  take at most half of the tightest budget, less the decoding and batch wait a request spends before it
  is queued: a request that arrives just after a batch starts waits for all of it, then needs its own
  batch.  Planning each batch against its own deadline alone lets a long batch eat the next one's time,
  and the misses come in runs (the rule of Clipper and Nexus: batch duration <= SLO / 2).  Where no level
  fits that half, the batch runs at the floor (the fastest level), not at the largest level that fits the
  whole budget.
* Predicted batch times come from `LatencyModel`, which already plans against the slow end (90th
  percentile) of what similar recent batches took, and never below what start-up measured for that batch
  size and capacity; `LATENCY_SAFETY` adds 20 % on top.
* A level chosen for a `latency_ms` item or lowered by `degrade` is raised to the largest capacity that
  start-up measured no slower (`LatencyModel.no_slower_capacity`): on a small model at a small batch every
  capacity costs about the same, and a lower one would only lose accuracy.  Pinned budgets are served as
  asked.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from mone.server.config import Settings
from mone.server.core.batcher import WorkItem
from mone.server.core.budget import Level, Planner
from mone.server.core.latency import LatencyModel

LATENCY_SAFETY = 1.2  # plan against 120 % of the predicted compute time
LATENCY_MARGIN_S = 0.002  # plus 2 ms for unbatching and answering
LATENCY_HEADROOM = 0.5  # under a stream of latency requests, a batch takes at most this share of a budget
ARRIVAL_HALF_LIFE = 16  # latency-budgeted arrivals over which the arrival rate estimate halves its weight


class BatchPlanner:
    """Args: planner (capacity levels), latency (the latency model), settings (batching and overload)."""

    def __init__(self, planner: Planner, latency: LatencyModel, settings: Settings) -> None:
        self.planner = planner
        self.latency = latency
        self.settings = settings
        self._last_arrival: float | None = None
        self._interval: float | None = None  # EWMA of the gap between latency-budgeted arrivals, seconds

    def note_arrival(self, now: float) -> None:
        """Count the admission of a latency-budgeted request (for the arrival-rate estimate)."""
        if self._last_arrival is not None:
            gap = max(now - self._last_arrival, 0.0)
            w = 1.0 - 0.5 ** (1.0 / ARRIVAL_HALF_LIFE)
            self._interval = gap if self._interval is None else (1 - w) * self._interval + w * gap
        self._last_arrival = now

    def expects_arrival_within(self, seconds: float, now: float | None = None) -> bool:
        """Whether another latency-budgeted request is likely to arrive in the next `seconds`."""
        if self._interval is None or self._last_arrival is None:
            return False
        now = time.monotonic() if now is None else now
        if now - self._last_arrival > 4 * self._interval + seconds:
            return False  # the stream has stopped
        return self._interval < seconds

    # -- estimates for admission ---------------------------------------------------------------------------
    def wait_estimate(self, frames: int, queue_depth: int) -> float:
        """Predicted seconds until a new item of this kind finishes at the floor."""
        b = self.settings.max_batch_size
        floor = self.planner.floor(frames).gflops
        full, rest = divmod(queue_depth, b)
        compute = full * self.latency.predict(frames, 1, b * floor)
        compute += self.latency.predict(frames, 1, (rest + 1) * floor)
        return compute + self.settings.max_batch_wait_ms / 1e3

    def drain_estimate(self, queue_depth: int) -> float:
        """Whole seconds to serve the queue at full capacity (for Retry-After)."""
        b = self.settings.max_batch_size
        batches = math.ceil(queue_depth / b)
        dense = self.planner.dense_gflops(1)
        return float(max(1, math.ceil(batches * self.latency.predict(1, 1, b * dense))))

    def floor_batch_seconds(self, frames: int, size: int) -> float:
        return self.latency.predict(frames, 1, size * self.planner.floor(frames).gflops)

    # -- batch formation -----------------------------------------------------------------------------------
    def degrade_cap(self, depth: int) -> float:
        s = self.settings
        if s.overload_policy != "degrade":
            return 1.0
        fill = depth / s.max_queue_size
        if fill <= s.degrade_start:
            return 1.0
        t = min(1.0, (fill - s.degrade_start) / (1.0 - s.degrade_start))
        return s.default_capacity - (s.default_capacity - s.degrade_floor) * t

    def plan(self, items: list[WorkItem], depth: int) -> tuple[list[WorkItem], list[WorkItem]]:
        """Give every item of a forming batch its level (with `depth` items queued, the batch included);
        returns (run now, put back at the queue head)."""
        frames = items[0].frames
        cap = self.degrade_cap(depth)
        fixed = [it for it in items if not it.budget.kind.deadline]
        flexible = [it for it in items if it.budget.kind.deadline]
        for it in fixed:
            assert it.level is not None
            if not it.budget.pinned and it.level.capacity > cap + 1e-12:
                lowered = self.planner.level_of(max(cap, self.planner.cfg.min_capacity), frames)
                level = self.no_slower(lowered, frames, len(items), ceiling=it.level.capacity)
                it.degraded = level.capacity < it.level.capacity - 1e-12
                it.level = level
        if not flexible or self._fit_latency(fixed, flexible, frames, cap):
            return items, []
        # Pinned work must not push latency-budgeted requests past their budget: run those alone first.
        if fixed and self._fit_latency([], flexible, frames, cap):
            return flexible, fixed
        floor = self.no_slower(self.planner.floor(frames), frames, len(items))
        now = time.monotonic()
        predicted = self._predict(fixed, [floor] * len(flexible), frames)
        for it in flexible:
            it.level, it.planned_ms = floor, (now - it.arrival + predicted) * 1e3
        return items, []

    def no_slower(self, level: Level, frames: int, batch: int, ceiling: float = 1.0) -> Level:
        """`level`, or the level of the largest capacity up to `ceiling` measured no slower at this batch
        size (`LatencyModel.no_slower_capacity`)."""
        capacity = min(self.latency.no_slower_capacity(frames, batch, level.capacity), ceiling)
        return level if capacity <= level.capacity + 1e-12 else self.planner.level_of(capacity, frames)

    def _predict(self, fixed: list[WorkItem], levels: list[Level], frames: int) -> float:
        all_levels = [it.level for it in fixed if it.level is not None] + levels
        groups = len({lv.counts for lv in all_levels})
        capacity = max(lv.capacity for lv in all_levels)
        gflops = sum(lv.gflops for lv in all_levels)
        return self.latency.predict_uniform(frames, groups, gflops, len(all_levels), capacity)

    def _fit_latency(self, fixed: list[WorkItem], flexible: list[WorkItem], frames: int, cap: float) -> bool:
        """Give the latency-budgeted items the largest level whose predicted batch time fits the tightest."""
        now = time.monotonic()
        left = min(it.latency_deadline or math.inf for it in flexible) - now - LATENCY_MARGIN_S
        # A request arriving just after this batch starts spends its decoding and the batch wait, then
        # waits for all of this batch before its own: each batch gets half of what is left after those.
        decode = max((it.enqueued - it.arrival for it in flexible if it.enqueued), default=0.0)
        overhead = self.settings.max_batch_wait_ms / 1e3 + max(decode, 0.0)
        span = LATENCY_HEADROOM * (min(it.budget.value for it in flexible) / 1e3 - overhead)

        def fits_within(limit: float) -> Callable[[Level], bool]:
            def fits(level: Level) -> bool:
                if level.capacity > cap + 1e-12:
                    return False
                return self._predict(fixed, [level] * len(flexible), frames) * LATENCY_SAFETY <= limit

            return fits

        level = None
        if span < left and self.expects_arrival_within(span, now):
            level = self.planner.largest_fitting(frames, fits_within(span))
            # No level fits half the budget: the fastest one that fits the rest, never a slower one, which
            # would take the time of the requests arriving while it runs.
            if level is None and fits_within(left)(floor := self.planner.floor(frames)):
                level = floor
        if level is None:
            level = self.planner.largest_fitting(frames, fits_within(left))
        if level is None:
            return False
        predicted = self._predict(fixed, [level] * len(flexible), frames)
        level = self.no_slower(level, frames, len(fixed) + len(flexible))
        for it in flexible:
            it.level, it.planned_ms = level, (now - it.arrival + predicted) * 1e3
            it.degraded = cap < 1.0 and level.capacity >= cap - 1e-3
        return True
