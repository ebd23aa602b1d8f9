"""Budget parsing, capacity levels, GFLOPs planning and the latency model (no HTTP, no model run)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mone.model import MoNEConfig, gflops
from mone.server.core.budget import Budget, Planner, parse_budget
from mone.server.core.latency import REFIT_EVERY, LatencyModel
from mone.server.core.request import InferRequest
from mone.server.errors import InvalidBudgetError

CFG = MoNEConfig.from_variant("Mi/4", num_classes=10)


@pytest.fixture(scope="module")
def planner() -> Planner:
    return Planner(CFG)


def test_no_budget_means_default() -> None:
    b = parse_budget({}, 0.75, CFG.min_capacity)
    assert (b.type, b.value, b.pinned) == ("default", 0.75, False)


@pytest.mark.parametrize("capacity", [0.1, 1.5, -1.0, float("nan")])
def test_capacity_outside_range_is_invalid(capacity: float) -> None:
    with pytest.raises(InvalidBudgetError):
        parse_budget({"capacity": capacity}, 1.0, CFG.min_capacity)


def test_two_budgets_are_invalid() -> None:
    with pytest.raises(InvalidBudgetError, match="at most one"):
        parse_budget({"capacity": 0.5, "gflops": 1.0}, 1.0, CFG.min_capacity)


def test_levels_are_distinct_and_monotone(planner: Planner) -> None:
    for frames in (1, 8):
        levels = planner.levels(frames)
        assert len({lv.counts for lv in levels}) == len(levels) > 10
        assert all(a.gflops < b.gflops for a, b in zip(levels, levels[1:], strict=False))
        assert all(a.realised < b.realised + 1e-12 for a, b in zip(levels, levels[1:], strict=False))
        assert levels[0].realised == pytest.approx(0.125)
        assert levels[-1].realised == 1.0


@pytest.mark.parametrize("frames", [1, 8])
@pytest.mark.parametrize("fraction", [0.2, 0.35, 0.5, 0.77, 1.0, 3.0])
def test_gflops_budget_gives_largest_fitting_capacity(planner: Planner, frames: int, fraction: float) -> None:
    floor, dense = gflops(CFG, 0.125, frames), gflops(CFG, 1.0, frames)
    budget = floor + fraction * (dense - floor) if fraction <= 1 else dense * fraction
    level = planner.for_gflops(budget, frames)
    assert level.gflops <= budget
    assert gflops(CFG, level.capacity, frames) == pytest.approx(level.gflops)
    # No finer e_c on the grid fits and costs more: the next level up does not fit.
    higher = [lv for lv in planner.levels(frames) if lv.gflops > level.gflops]
    assert not higher or higher[0].gflops > budget


def test_gflops_below_floor_names_the_floor(planner: Planner) -> None:
    floor = gflops(CFG, 0.125, 1)
    with pytest.raises(InvalidBudgetError) as info:
        planner.for_gflops(floor * 0.99, 1)
    assert info.value.detail["floor_gflops"] == pytest.approx(floor)
    assert f"{floor:.6g}" in info.value.message
    assert planner.for_gflops(floor, 1).realised == pytest.approx(0.125)


def test_latency_model_recovers_a_linear_cost() -> None:
    lm = LatencyModel()
    for g in (0.1, 0.5, 1.0, 2.0):
        lm.observe(1, 1, g, 0.002 + 0.01 * g, calibration=True)
    lm.observe(1, 2, 1.0, 0.002 + 0.001 + 0.01, calibration=True)
    assert lm.predict(1, 1, 3.0) == pytest.approx(0.032, rel=1e-6)
    assert lm.predict(1, 2, 1.0) == pytest.approx(0.013, rel=1e-6)
    assert lm.to_dict()["1"]["ms_per_gflop"] == pytest.approx(10.0)


def test_latency_model_follows_observations_and_stays_monotone() -> None:
    lm = LatencyModel(window=64)
    for g in (0.1, 1.0):
        lm.observe(1, 1, g, 0.01 * g, calibration=True)
    before = lm.predict(1, 1, 1.0)
    for _ in range(64):  # the device became 3x slower
        for g in (0.1, 1.0):
            lm.observe(1, 1, g, 0.03 * g)
    assert lm.predict(1, 1, 1.0) > 2 * before
    assert lm.predict(1, 1, 0.5) < lm.predict(1, 1, 1.0)


def test_served_batches_refit_the_latency_model_every_few() -> None:
    """Start-up measurements refit at once; served batches every `REFIT_EVERY`, and a prediction made
    before a refit is not served from the cache after it."""
    lm = LatencyModel()
    for g in (1.0, 2.0):
        lm.observe(1, 1, g, 0.01 * g, calibration=True)
    before = lm.predict(1, 1, 1.0)
    assert before == pytest.approx(0.01)
    for _ in range(REFIT_EVERY - 1):  # the device became 5x slower
        lm.observe(1, 1, 1.0, 0.05)
    assert lm.predict(1, 1, 1.0) == before
    lm.observe(1, 1, 1.0, 0.05)
    assert lm.predict(1, 1, 1.0) > 2 * before


def test_latency_model_plans_against_the_slow_end_of_similar_batches() -> None:
    """Small low-capacity batches cost more per GFLOP than the line through the calibration says, and vary:
    predictions near them follow what they took at the slow end; far from them, the line stands."""
    lm = LatencyModel()
    for g in (1.0, 10.0, 100.0):  # calibration: 10 ms per GFLOP
        lm.observe(1, 1, g, 0.01 * g, calibration=True)
    line = lm.predict(1, 1, 2.0)
    rng = np.random.default_rng(0)
    taken = 0.01 * 2.0 * (1.3 + 0.1 * rng.standard_normal(40))  # 30 % slower than the line, +-10 %
    for t in taken:
        lm.observe(1, 1, 2.0, float(t))
    near = lm.predict(1, 1, 2.0)
    assert near > line
    assert np.mean(taken <= near) >= 0.85  # covers most of what such batches took, not only their mean
    assert near <= float(np.max(taken)) * 1.05
    assert lm.predict(1, 1, 100.0) == pytest.approx(1.0, rel=0.25)  # no tail correction far from them


def test_latency_model_fits_relative_error() -> None:
    """A 1 ms batch's cost is not drowned by 1 s batches: the fit minimises relative, not absolute, error."""
    lm = LatencyModel()
    for g, t in ((0.1, 0.004), (0.2, 0.005), (100.0, 1.1), (150.0, 1.45), (200.0, 2.0)):  # noisy at 1-2 s
        lm.observe(1, 1, g, t, calibration=True)
    assert lm.predict(1, 1, 0.1) == pytest.approx(0.004, rel=0.25)


def test_uncalibrated_kind_borrows_the_nearest() -> None:
    lm = LatencyModel()
    lm.observe(1, 1, 1.0, 0.01, calibration=True)
    lm.observe(1, 1, 2.0, 0.02, calibration=True)
    assert lm.predict(8, 1, 4.0) == pytest.approx(0.04, rel=1e-3)


def test_settings_refuse_an_open_unauthenticated_bind() -> None:
    from pydantic import ValidationError

    from mone.server.config import Settings

    with pytest.raises(ValidationError, match="api_key"):
        Settings(host="0.0.0.0")
    assert Settings(host="0.0.0.0", api_key="a-long-key").host == "0.0.0.0"
    assert Settings(host="0.0.0.0", allow_unauthenticated=True).host == "0.0.0.0"
    with pytest.raises(ValidationError):
        Settings(max_image_bytes=10, max_body_bytes=5)
    for weak in ("", "   ", "short"):
        with pytest.raises(ValidationError, match="api_key"):
            Settings(host="0.0.0.0", api_key=weak)


def test_degrade_cap_goes_linearly_from_default_to_floor(planner: Planner) -> None:
    from mone.server.config import Settings
    from mone.server.core.latency import LatencyModel
    from mone.server.core.scheduling import BatchPlanner

    s = Settings(overload_policy="degrade", max_queue_size=100, degrade_start=0.5, degrade_floor=0.25)
    bp = BatchPlanner(planner, LatencyModel(), s)
    assert bp.degrade_cap(10) == 1.0
    assert bp.degrade_cap(50) == 1.0
    assert bp.degrade_cap(75) == pytest.approx(0.625)
    assert bp.degrade_cap(100) == pytest.approx(0.25)
    assert bp.degrade_cap(500) == pytest.approx(0.25)
    assert BatchPlanner(planner, LatencyModel(), Settings()).degrade_cap(10**6) == 1.0  # reject policy


def test_random_init_and_missing_checkpoint(tmp_path: Path) -> None:
    import torch

    from mone.server.config import Settings
    from mone.server.core.runner import CheckpointMissingError, load_model

    ck = load_model(Settings(random_init=True), torch.device("cpu"))
    assert (ck.config.variant, ck.config.num_classes, ck.meta.get("random_init")) == ("Mi/4", 10, True)
    with pytest.raises(CheckpointMissingError, match="--random-init"):
        load_model(Settings(checkpoint=tmp_path / "absent"), torch.device("cpu"))


def request(budget: Budget, arrival: float) -> InferRequest:
    """An image request of zeros."""
    return InferRequest(torch.zeros(1, 1, 28, 28), "image", budget, arrival=arrival)


def _latency_items(n: int, budget_ms: float, now: float) -> list:
    import asyncio

    from mone.server.core.batcher import WorkItem

    loop = asyncio.new_event_loop()
    try:
        budget = parse_budget({"latency_ms": budget_ms}, 1.0, CFG.min_capacity)
        return [WorkItem(request(budget, now), now + 30, future=loop.create_future()) for _ in range(n)]
    finally:
        loop.close()


def test_latency_batches_leave_room_for_the_next_under_a_stream(planner: Planner) -> None:
    """Alone, a latency request gets the largest level that fits its budget; under a stream of them, a batch
    takes at most half the budget, so that a request arriving while it runs can still make its own."""
    import time

    from mone.server.config import Settings
    from mone.server.core.scheduling import BatchPlanner

    lm = LatencyModel()
    for g in (0.01, 0.1, 1.0):  # 1 ms + 1 s per GFLOP: 2 samples at capacity 1.0 take ~0.25 s
        lm.observe(1, 1, g, 0.001 + 1.0 * g, calibration=True)
    bp = BatchPlanner(planner, lm, Settings())
    dense = planner.level_of(1.0, 1).gflops
    budget_ms = 1e3 * 1.5 * (0.001 + 2 * dense) * 1.1  # two dense samples fit, but not in half of it

    now = time.monotonic()
    alone = _latency_items(2, budget_ms, now)
    run, back = bp.plan(alone, depth=2)
    assert (run, back) == (alone, [])
    assert alone[0].level is not None
    assert alone[0].level.capacity == 1.0

    for i in range(40):  # one latency request every 5 ms
        bp.note_arrival(now - 0.2 + 0.005 * i)
    stream = _latency_items(2, budget_ms, now)
    bp.plan(stream, depth=2)
    level = stream[0].level
    assert level is not None
    assert level.capacity < 1.0
    predicted = lm.predict(1, 1, 2 * level.gflops)
    assert predicted * 1.1 <= 0.5 * budget_ms / 1e3
    assert all(it.level == level for it in stream)

    time.sleep(0.01)
    bp._last_arrival = time.monotonic() - 10.0  # the stream stopped long ago: full budget again
    later = _latency_items(2, budget_ms, time.monotonic())
    bp.plan(later, depth=2)
    assert later[0].level is not None
    assert later[0].level.capacity == 1.0


def _flat_small_batches() -> LatencyModel:
    """Start-up measurements of a model bound by per-operation overhead at batch 1 (every capacity takes
    about 4 ms, the lowest ones slightly more) and by FLOPs at batch 32."""
    lm = LatencyModel()
    measured = {
        1: {0.125: 0.0040, 0.25: 0.0042, 0.5: 0.0041, 1.0: 0.0040},
        32: {0.125: 0.020, 0.25: 0.030, 0.5: 0.045, 1.0: 0.080},
    }
    for b, row in measured.items():
        for c, t in row.items():
            lm.observe(1, 1, b * gflops(CFG, c), t, calibration=True)
            lm.observe_uniform(1, b, c, t)
    return lm


def test_no_lower_capacity_where_a_higher_one_was_measured_no_slower() -> None:
    lm = _flat_small_batches()
    assert lm.no_slower_capacity(1, 1, 0.25) == 1.0  # 1.0 took 4.0 ms against 4.2 ms
    assert lm.no_slower_capacity(1, 1, 0.3) == 1.0  # between measured capacities: judged by 0.25
    assert lm.no_slower_capacity(1, 2, 0.125) == 1.0  # nearest measured size: 1
    assert lm.no_slower_capacity(1, 32, 0.25) == 0.25  # at 32 each lower capacity is faster
    assert lm.no_slower_capacity(1, 24, 0.5) == 0.5
    assert LatencyModel().no_slower_capacity(1, 1, 0.25) == 0.25  # nothing measured: as planned


def test_predictions_are_never_below_what_was_measured() -> None:
    lm = _flat_small_batches()
    for c in (0.125, 0.25, 0.5):
        g = gflops(CFG, c)
        assert lm.predict_uniform(1, 1, g, 1, c) >= 0.0040
        # The line through every measurement puts batch 1 far below its measured time at low capacities.
    assert lm.predict(1, 1, gflops(CFG, 0.125)) < 0.0040
    assert lm.predict_uniform(1, 1, 32 * gflops(CFG, 0.25), 32, 0.25) >= 0.030


def test_latency_budgets_and_degrade_never_pick_a_capacity_measured_no_faster(planner: Planner) -> None:
    import time

    from mone.server.config import Settings
    from mone.server.core.scheduling import BatchPlanner

    lm = _flat_small_batches()
    # A lone latency request whose budget fits no level by the measurements: served at the highest capacity
    # measured as fast as the floor, not at the floor.
    bp = BatchPlanner(planner, lm, Settings())
    tight = _latency_items(1, 1.0, time.monotonic())
    bp.plan(tight, depth=1)
    assert tight[0].level is not None
    assert tight[0].level.capacity == 1.0

    # A budget that the fitted line lets a low capacity meet: the measured 1.0 is no slower, so 1.0.
    roomy = _latency_items(1, 30.0, time.monotonic())
    bp.plan(roomy, depth=1)
    assert roomy[0].level is not None
    assert roomy[0].level.capacity == 1.0

    # Degrade: a full queue lowers unbudgeted requests to the floor only where that is faster.
    s = Settings(overload_policy="degrade", max_queue_size=100, degrade_start=0.5, degrade_floor=0.25)
    bp = BatchPlanner(planner, lm, s)
    lone = _default_items(1)
    bp.plan(lone, depth=100)
    assert lone[0].level is not None
    assert (lone[0].level.capacity, lone[0].degraded) == (1.0, False)
    full = _default_items(32)
    bp.plan(full, depth=100)
    assert full[0].level is not None
    assert (full[0].level.capacity, full[0].degraded) == (0.25, True)


def _default_items(n: int) -> list:
    import asyncio
    import time

    from mone.server.core.batcher import WorkItem

    planner = Planner(CFG)
    loop = asyncio.new_event_loop()
    now = time.monotonic()
    try:
        items = [
            WorkItem(request(parse_budget({}, 1.0, CFG.min_capacity), now),
                     now + 30, future=loop.create_future())
            for _ in range(n)
        ]  # fmt: skip
    finally:
        loop.close()
    for it in items:
        it.level = planner.level_of(1.0, 1)
    return items


def test_measured_times_are_interpolated_between_measured_batch_sizes() -> None:
    """A few samples at a low capacity cost more per GFLOP than the line through every measurement says:
    between measured batch sizes the prediction follows the measurements, not the line."""
    lm = _flat_small_batches()
    g = gflops(CFG, 0.125)
    # 0.125: 4 ms at batch 1, 20 ms at batch 32; at 16, at least 4 + 16 * 15 / 31 ms.
    assert lm.predict_uniform(1, 1, 16 * g, 16, 0.125) >= 0.004 + 0.016 * 15 / 31 - 1e-9
    assert lm.predict(1, 1, 16 * g) < 0.004 + 0.016 * 15 / 31  # the line alone is below it
    # Never below the largest measured size no larger than the batch, even where the next one was faster.
    lm.observe_uniform(1, 8, 0.5, 0.003)
    assert lm.predict_uniform(1, 1, 4 * gflops(CFG, 0.5), 4, 0.5) >= 0.0041
    # Beyond the largest measured size: at least what that size took.
    assert lm.predict_uniform(1, 1, 64 * g, 64, 0.125) >= 0.020


def test_under_a_stream_a_batch_that_fits_no_level_in_half_the_budget_runs_at_the_floor(
    planner: Planner,
) -> None:
    """Queued up, a batch whose every level takes more than half the budget runs at the fastest level:
    a larger one that still fits its own deadline would take the next requests' time."""
    import time

    from mone.server.config import Settings
    from mone.server.core.scheduling import BatchPlanner

    lm = LatencyModel()
    for g in (0.01, 0.1, 1.0):  # 1 ms + 1 s per GFLOP
        lm.observe(1, 1, g, 0.001 + 1.0 * g, calibration=True)
    bp = BatchPlanner(planner, lm, Settings())
    floor = planner.floor(1).gflops
    n = 8
    budget_ms = 1e3 * 1.5 * (0.001 + n * floor) * 1.25  # the floor fits the budget, not half of it
    now = time.monotonic()
    alone = _latency_items(n, budget_ms, now)
    bp.plan(alone, depth=n)
    assert alone[0].level is not None
    assert alone[0].level.capacity > planner.floor(1).capacity  # no stream: the largest that fits
    for i in range(40):  # one latency request every 5 ms
        bp.note_arrival(now - 0.2 + 0.005 * i)
    stream = _latency_items(n, budget_ms, now)
    bp.plan(stream, depth=n)
    assert stream[0].level is not None
    assert stream[0].level.capacity == planner.floor(1).capacity
