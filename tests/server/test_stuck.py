"""Unit tests of the stuck-batch rule behind liveness (Engine.stuck) and of the probe listener's answer."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from mone.server.config import Settings
from mone.server.core.engine import Engine
from mone.server.http.health import HealthState


def _engine(running_s: float | None, predicted_s: float, **settings: float) -> SimpleNamespace:
    started = None if running_s is None else time.monotonic() - running_s
    return SimpleNamespace(
        _batch_started=started,
        _batch_predicted_s=predicted_s,
        _stuck_logged=False,
        settings=Settings(random_init=True, **settings),
    )


@pytest.mark.parametrize(
    ("running_s", "predicted_s", "settings", "stuck"),
    [
        (None, 0.0, {}, False),  # no batch running
        (5.0, 1.0, {"stuck_batch_factor": 10, "stuck_batch_min_s": 1}, False),  # 5x its prediction
        (11.0, 1.0, {"stuck_batch_factor": 10, "stuck_batch_min_s": 1}, True),  # 11x
        (3.0, 0.01, {"stuck_batch_factor": 10, "stuck_batch_min_s": 5}, False),  # far past, not yet 5 s
        (6.0, 0.01, {"stuck_batch_factor": 10, "stuck_batch_min_s": 5}, True),
        (30.0, 10.0, {"stuck_batch_factor": 10, "stuck_batch_ceiling_s": 20}, True),  # the ceiling
        (30.0, 10.0, {"stuck_batch_factor": 10, "stuck_batch_ceiling_s": 0}, False),  # no ceiling
    ],
)
def test_a_batch_is_stuck_past_its_limit(
    running_s: float | None, predicted_s: float, settings: dict[str, float], stuck: bool
) -> None:
    engine = _engine(running_s, predicted_s, **settings)
    report = Engine.stuck(engine)  # type: ignore[arg-type]
    assert (report is not None) == stuck, report
    if report is not None:
        assert report["batch_running_s"] > report["limit_s"]
        assert report["predicted_s"] == pytest.approx(predicted_s, abs=1e-4)


def test_the_probe_listener_reports_a_stuck_batch() -> None:
    state = HealthState(stale_s=10)
    assert state.live() == (200, {"status": "starting"})
    state.beat()
    assert state.live()[0] == 200
    state.stuck = lambda: {"batch_running_s": 12.0, "predicted_s": 0.1, "limit_s": 10.0}
    status, body = state.live()
    assert status == 503
    assert body["status"] == "stuck"
    assert body["batch_running_s"] == 12.0

    def broken() -> dict[str, float] | None:
        raise RuntimeError("engine gone")

    state.stuck = broken
    assert state.live()[0] == 200
