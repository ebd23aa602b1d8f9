"""Budget planning: turn a request's budget (one of `BUDGET_KINDS`) into an effective capacity e_c.

What each kind means, how it is validated and how it picks a level is in server/core/budget_kinds.py.

The realised e_c is a step function of the requested one (token counts are floored, MoNE Algorithm 1), so
planning searches the distinct token splits ("levels") found on a fine grid of e_c, each represented by
the largest grid e_c that produces it (of splits with equal cost, the one with the largest e_c).  Levels
are ordered by cost, so the largest level that fits a budget is found by bisection.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from mone.model import MoNEConfig, capacity_distribution, expert_counts, realised_capacity, sample_gflops
from mone.server.core.budget_kinds import BUDGET_KINDS, BudgetKind, budget_kind
from mone.server.errors import InvalidBudgetError

GRID_STEPS = 896  # e_c grid step (1 - min_capacity) / 896: 1/1024 for 4 experts


@dataclass(frozen=True)
class Budget:
    """What a request asked for: `type` is a kind's name (`BUDGET_KINDS`), or `default` when none was given
    (value = the server's default e_c)."""

    type: str
    value: float

    @property
    def kind(self) -> BudgetKind:
        return budget_kind(self.type)

    @property
    def pinned(self) -> bool:
        """A pinned budget is never lowered by the degrade policy."""
        return self.kind.pinned


@dataclass(frozen=True)
class Level:
    """One distinct token split: the e_c to ask the model for, what it realises, and its cost."""

    capacity: float
    realised: float
    counts: tuple[int, ...]
    gflops: float


def parse_budget(given: Mapping[str, float | None], default_capacity: float, min_capacity: float) -> Budget:
    """Validate the (at most one) budget a request carries; errors are InvalidBudgetError (422).

    `given` maps kind names (`BUDGET_KINDS`) to the value the request gave, or None; `min_capacity` is the
    model's lowest capacity (`MoNEConfig.min_capacity`, 1/2**(E-1) for E experts)."""
    values = {k: v for k, v in given.items() if v is not None}
    unknown = sorted(set(values) - set(BUDGET_KINDS))
    if unknown:
        raise InvalidBudgetError(
            f"unknown budget {unknown[0]!r}, expected one of {list(BUDGET_KINDS)}", kinds=list(BUDGET_KINDS)
        )
    if len(values) > 1:
        raise InvalidBudgetError(f"give at most one budget, got {sorted(values)}", given=values)
    if not values:
        return Budget("default", default_capacity)
    name, value = next(iter(values.items()))
    return Budget(name, BUDGET_KINDS[name].parse(value, min_capacity))


class Planner:
    """Capacity levels of one model and the searches over them."""

    def __init__(self, cfg: MoNEConfig, steps: int = GRID_STEPS) -> None:
        self.cfg = cfg
        lo = cfg.min_capacity
        grid = [lo + (1.0 - lo) * i / steps for i in range(steps + 1)]
        best: dict[tuple[int, ...], float] = {}
        for e_c in grid:  # ascending, so the last e_c seen for a split is its largest
            best[expert_counts(e_c, cfg.num_tokens, cfg.num_experts)] = e_c
        self._splits = sorted(best.items(), key=lambda kv: kv[1])
        self._levels: dict[int, list[Level]] = {}

    def levels(self, frames: int) -> list[Level]:
        """Distinct levels for an input of `frames` frames, cheapest first."""
        if frames not in self._levels:
            levels = [
                Level(e_c, realised_capacity(counts), counts, sample_gflops(self.cfg, counts, frames))
                for counts, e_c in self._splits
            ]
            # Splits of equal cost are interchangeable for budgeting: keep the largest e_c of each cost.
            levels.sort(key=lambda lv: (lv.gflops, lv.capacity))
            unique: dict[float, Level] = {round(lv.gflops, 12): lv for lv in levels}
            self._levels[frames] = list(unique.values())
        return self._levels[frames]

    def level_of(self, capacity: float, frames: int) -> Level:
        """The level a requested e_c falls on."""
        counts = expert_counts(capacity, self.cfg.num_tokens, self.cfg.num_experts)
        return Level(capacity, realised_capacity(counts), counts, sample_gflops(self.cfg, counts, frames))

    def floor(self, frames: int) -> Level:
        return self.levels(frames)[0]

    def for_gflops(self, budget: float, frames: int) -> Level:
        """The largest level whose analytic GFLOPs fit `budget`; else InvalidBudgetError naming the floor."""
        levels = self.levels(frames)
        i = bisect.bisect_right([lv.gflops for lv in levels], budget * (1 + 1e-12)) - 1
        if i < 0:
            floor = levels[0].gflops
            kind = "image" if frames == 1 else f"{frames}-frame clip"
            raise InvalidBudgetError(
                f"gflops {budget:g} is below the model's floor of {floor:.6g} GFLOPs for this {kind}",
                floor_gflops=floor,
                frames=frames,
            )
        return levels[i]

    def largest_fitting(self, frames: int, fits: Callable[[Level], bool]) -> Level | None:
        """The largest level for which `fits(level)` holds, assuming it is monotone; None if none."""
        levels = self.levels(frames)
        lo, hi = 0, len(levels) - 1
        if not fits(levels[0]):
            return None
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fits(levels[mid]):
                lo = mid
            else:
                hi = mid - 1
        return levels[lo]

    def distribution(self, capacity: float) -> tuple[float, ...]:
        return capacity_distribution(capacity, self.cfg.num_experts)

    def dense_gflops(self, frames: int) -> float:
        return self.levels(frames)[-1].gflops
