"""Latency model: predicted compute time of a batch, calibrated at start-up and refreshed online.

Per input kind (frames per sample) the model is linear:

    t = a + b * (groups - 1) + c * sum of the batch's GFLOPs

where `groups` is the number of distinct token splits in the batch (the model runs one pass per split).
Coefficients are least-squares fits of the relative error (a 50 ms miss on a 100 ms batch matters as much as
a 500 ms miss on a 1 s one) over the start-up measurements plus a window of recent batches, so the model
follows the device as its load changes.  A coefficient that comes out negative is dropped and the rest
refitted, which keeps predictions monotone in GFLOPs.

A lower capacity is not always faster: on a small model at a small batch the forward is bound by
per-operation overhead, not FLOPs, and every capacity costs about the same.  So the start-up measurements of
uniform batches (one capacity) are also kept as measured, and two rules follow from them: a prediction is
never below what the nearest measured capacity took, interpolated linearly in the batch size between the
measured sizes around the batch (and at least what the largest measured size no larger than it took:
`predict_uniform`), and planning never serves a capacity when a higher one was measured no slower
(`no_slower_capacity`).  The line alone puts a few samples at a low capacity far below what they take
(S/16, 8 images at capacity 0.125: 127 ms fitted against 177 ms measured), and a plan against it over-fills
a latency budget.

One line cannot fit every batch shape: a few samples at a low capacity cost more per GFLOP than a full dense
batch (smaller matrix products, one pass per token split), and a loaded machine adds noise.  So a prediction
is the line times a tail correction: the 90th percentile of observed / fitted time over the recent batches
nearest in GFLOPs (at least 1).  Budgets are then planned against the slow end of what batches of that size
actually took, not against their mean.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

FALLBACK_GFLOPS_PER_S = 20.0  # used only before any measurement exists for a kind
TAIL_QUANTILE = 0.9  # of observed / fitted time over the neighbouring recent batches
TAIL_NEIGHBOURS = 32  # recent batches nearest in GFLOPs that set the correction
TAIL_MIN_POINTS = 8  # fewer recent batches than this (or none within TAIL_SPAN): no correction
TAIL_SPAN = math.log(4.0)  # neighbours lie within a factor of 4 in GFLOPs
TAIL_MAX = 3.0
# A served batch refits its kind's coefficients once this many have arrived since the last fit (start-up
# measurements at once): a fit is a least-squares solve over the window, 0.1-0.15 ms of the event loop's
# time (2 vCPUs), which every batch of a small model paid.
REFIT_EVERY = 8


@dataclass
class _KindModel:
    calibration: list[tuple[float, float, float]] = field(default_factory=list)
    recent: deque[tuple[float, float, float]] = field(default_factory=lambda: deque(maxlen=256))
    coef: tuple[float, float, float] | None = None
    log_gflops: np.ndarray = field(default_factory=lambda: np.zeros(0))  # of the recent batches
    ratio: np.ndarray = field(default_factory=lambda: np.zeros(0))  # their observed / fitted time
    measured: dict[int, dict[float, float]] = field(default_factory=dict)  # batch -> capacity -> seconds
    pending: int = 0  # served batches since the last fit
    tails: dict[float, float] = field(default_factory=dict)  # `_tail` by GFLOPs, since the last fit


class LatencyModel:
    """Predicts batch compute seconds from (frames, groups, total GFLOPs)."""

    def __init__(self, window: int = 256) -> None:
        self._kinds: dict[int, _KindModel] = {}
        self._window = window

    def _kind(self, frames: int) -> _KindModel:
        if frames not in self._kinds:
            self._kinds[frames] = _KindModel(recent=deque(maxlen=self._window))
        return self._kinds[frames]

    def observe(
        self, frames: int, groups: int, gflops: float, seconds: float, calibration: bool = False
    ) -> None:
        """Record one executed batch; refit that kind's coefficients at a start-up measurement, and after
        every `REFIT_EVERY` served batches."""
        km = self._kind(frames)
        (km.calibration if calibration else km.recent).append((float(groups - 1), gflops, seconds))
        km.pending = 0 if calibration else km.pending + 1
        if km.pending % REFIT_EVERY == 0 or km.coef is None:
            self._refit(km)

    def _refit(self, km: _KindModel) -> None:
        km.pending = 0
        km.tails = {}
        km.coef = _fit(km.calibration + list(km.recent))
        if km.recent and km.coef is not None:
            rows = np.asarray(km.recent, dtype=np.float64)
            a, b, c = km.coef
            fitted = np.maximum(a + b * rows[:, 0] + c * rows[:, 1], 1e-9)
            km.log_gflops = np.log(np.maximum(rows[:, 1], 1e-12))
            km.ratio = rows[:, 2] / fitted

    def observe_uniform(self, frames: int, batch: int, capacity: float, seconds: float) -> None:
        """Record a start-up measurement of a batch of `batch` inputs all at `capacity`."""
        self._kind(frames).measured.setdefault(batch, {})[capacity] = seconds

    def _measured_at(self, frames: int, batch: int) -> dict[float, float] | None:
        """The measured capacities at the measured batch size nearest `batch` (in ratio)."""
        km = self._kinds.get(frames)
        if km is None or not km.measured:
            return None
        return km.measured[min(km.measured, key=lambda b: (abs(math.log(b / batch)), -b))]

    def no_slower_capacity(self, frames: int, batch: int, capacity: float) -> float:
        """The largest measured capacity above `capacity` whose batches (at the measured size nearest
        `batch`) took no longer than those at the largest measured capacity not above it; else `capacity`.

        Serving it costs no more time and answers more accurately (MoNE's accuracy grows with capacity).
        """
        table = self._measured_at(frames, batch)
        if not table:
            return capacity
        below = [c for c in table if c <= capacity + 1e-9]
        if not below:
            return capacity
        ref = table[max(below)]
        faster = [c for c, t in table.items() if c > capacity + 1e-9 and t <= ref]
        return max(faster) if faster else capacity

    def predict_uniform(self, frames: int, groups: int, gflops: float, batch: int, capacity: float) -> float:
        """`predict` for a batch of `batch` inputs at about `capacity`, never below what the measured
        capacity nearest it took at the measured batch sizes around `batch`, interpolated linearly, nor below
        what it took at the largest measured size no larger than `batch`."""
        fitted = self.predict(frames, groups, gflops)
        km = self._kinds.get(frames)
        if km is None:
            return fitted
        below = [b for b in km.measured if b <= batch]
        if not below:
            return fitted
        lo = max(below)
        floor = _nearest(km.measured[lo], capacity)
        above = [b for b in km.measured if b > batch]
        if above and batch > lo:
            hi = min(above)
            t_hi = _nearest(km.measured[hi], capacity)
            floor = max(floor, floor + (t_hi - floor) * (batch - lo) / (hi - lo))
        return max(fitted, floor)

    def predict(self, frames: int, groups: int, gflops: float) -> float:
        """Predicted compute seconds of one batch."""
        km = self._kinds.get(frames)
        if km is None or km.coef is None:
            # An uncalibrated kind borrows the nearest calibrated one: cost per GFLOP transfers well.
            known = [f for f, k in self._kinds.items() if k.coef is not None]
            if not known:
                return gflops / FALLBACK_GFLOPS_PER_S
            km = self._kinds[min(known, key=lambda f: abs(f - frames))]
        assert km.coef is not None
        a, b, c = km.coef
        tail = km.tails.get(gflops)
        if tail is None:
            tail = km.tails[gflops] = _tail(km, gflops)
        return (a + b * max(groups - 1, 0) + c * gflops) * tail

    def calibrated(self, frames: int) -> bool:
        km = self._kinds.get(frames)
        return km is not None and km.coef is not None

    def to_dict(self) -> dict[str, Any]:
        """Coefficients per kind, for the model metadata."""
        out: dict[str, Any] = {}
        for frames, km in sorted(self._kinds.items()):
            if km.coef is None:
                continue
            a, b, c = km.coef
            out[str(frames)] = {
                "intercept_ms": a * 1e3,
                "per_extra_split_ms": b * 1e3,
                "ms_per_gflop": c * 1e3,
                "samples": len(km.calibration) + len(km.recent),
                "measured_ms": {
                    str(b): {f"{cap:g}": t * 1e3 for cap, t in sorted(row.items())}
                    for b, row in sorted(km.measured.items())
                },
            }
        return out


def _nearest(table: dict[float, float], capacity: float) -> float:
    """The time measured at the capacity nearest `capacity` (the higher one of two as near)."""
    return table[min(table, key=lambda c: (abs(c - capacity), -c))]


def _tail(km: _KindModel, gflops: float) -> float:
    """Observed / fitted time at the slow end of the recent batches nearest in GFLOPs; 1 without enough."""
    if len(km.ratio) < TAIL_MIN_POINTS:
        return 1.0
    dist = np.abs(km.log_gflops - math.log(max(gflops, 1e-12)))
    near = np.argsort(dist)[:TAIL_NEIGHBOURS]
    near = near[dist[near] <= TAIL_SPAN]
    if len(near) < TAIL_MIN_POINTS:
        return 1.0
    return float(np.clip(np.quantile(km.ratio[near], TAIL_QUANTILE), 1.0, TAIL_MAX))


def _fit(rows: list[tuple[float, float, float]]) -> tuple[float, float, float] | None:
    if not rows:
        return None
    data = np.asarray(rows, dtype=np.float64)
    w = 1.0 / np.maximum(data[:, 2], 1e-6)  # relative error
    X = np.column_stack([np.ones(len(data)), data[:, 0], data[:, 1]]) * w[:, None]
    y = data[:, 2] * w
    # Drop the split term first, then the intercept; the GFLOPs slope is what planning relies on.
    for active in ([0, 1, 2], [0, 2], [2]):
        sol, *_ = np.linalg.lstsq(X[:, active], y, rcond=None)
        if (sol >= 0).all():
            coef = [0.0, 0.0, 0.0]
            for i, v in zip(active, sol, strict=True):
                coef[i] = float(v)
            return coef[0], coef[1], coef[2]
    return float(data[:, 2].mean()), 0.0, 0.0
