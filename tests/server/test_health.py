"""The probe listener off the main event loop (server/http/health.py, docs/reliability.md row 24): heartbeat
freshness, readiness, the wire format, and the app's lifespan wiring."""

from __future__ import annotations

import asyncio
import http.client
import json
import multiprocessing
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

import mone.server.core.engine
import mone.server.http.app
from mone.model.checkpoint import CheckpointError
from mone.server.http.app import create_app
from mone.server.http.health import HealthListener, HealthState, Watchdog, mark_draining_on_signals
from tests.live_server import free_port
from tests.support.models import fast_settings


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def get(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, object]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path)
        r = conn.getresponse()
        raw = r.read()
        return r.status, json.loads(raw) if raw else {}
    finally:
        conn.close()


def test_stale_heartbeat_is_503_fresh_is_200() -> None:
    clock = Clock()
    state = HealthState(stale_s=10.0, clock=clock)
    assert state.live() == (200, {"status": "starting"})  # not armed before the model is ready
    state.beat(lag_s=0.004)
    clock.now += 9.9
    status, body = state.live()
    assert (status, body["status"], body["loop_lag_s"]) == (200, "ok", 0.004)
    clock.now += 0.2  # 10.1 s since the last beat
    status, body = state.live()
    assert (status, body["status"]) == (503, "stalled")
    assert body["heartbeat_age_s"] == pytest.approx(10.1)
    state.beat()
    assert state.live()[0] == 200


def test_readiness_mirrors_the_engine_and_draining() -> None:
    state = HealthState(stale_s=10.0)
    engine = {"ready": False}
    assert state.readiness() == (503, {"status": "not_ready"})  # no engine yet
    state.ready = lambda: engine["ready"]
    assert state.readiness()[0] == 503
    engine["ready"] = True
    assert state.readiness() == (200, {"status": "ready"})
    state.draining = True
    assert state.readiness() == (503, {"status": "draining"})


def test_listener_answers_on_its_own_thread_and_stops() -> None:
    clock = Clock()
    state = HealthState(stale_s=1.0, clock=clock)
    state.ready = lambda: True
    listener = HealthListener(state, "127.0.0.1", 0)
    listener.start()
    try:
        port = listener.port
        assert port
        state.beat()
        assert get(port, "/healthz")[0] == 200
        assert get(port, "/readyz") == (200, {"status": "ready"})
        assert get(port, "/healthz", "HEAD") == (200, {})
        assert get(port, "/nope")[0] == 404
        assert get(port, "/healthz", "POST")[0] == 405
        clock.now += 2.0
        assert get(port, "/healthz")[0] == 503
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"garbage\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.1 400")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:  # nothing sent: cut off
            assert s.recv(100) == b""
    finally:
        listener.stop()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_a_taken_port_fails_at_start() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        listener = HealthListener(HealthState(1.0), "127.0.0.1", s.getsockname()[1])
        with pytest.raises(OSError, match="in use"):
            listener.start()


def test_watchdog_beats_and_a_blocked_loop_goes_stale() -> None:
    async def scenario() -> tuple[int, int, float]:
        state = HealthState(stale_s=0.3)
        lags: list[float] = []
        dog = Watchdog(state, interval=0.02, on_lag=lags.append)
        dog.start()
        await asyncio.sleep(0.2)
        fresh = state.live()[0]
        time.sleep(0.5)  # the loop is blocked: no beat
        stale = state.live()[0]
        await asyncio.sleep(0.05)
        await dog.stop()
        return fresh, stale, max(lags)

    fresh, stale, lag = asyncio.run(scenario())
    assert (fresh, stale) == (200, 503)
    assert lag >= 0.4  # the watchdog saw how late it woke


@pytest.mark.anyio
async def test_app_lifespan_serves_the_probe_port(checkpoint_dir: Path) -> None:
    port = free_port()
    settings = fast_settings(checkpoint_dir, health_port=port, health_stale_s=5.0)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        engine = app.state.engine
        status, body = await asyncio.to_thread(get, port, "/healthz")
        assert (status, body["status"]) == (200, "ok")
        assert await asyncio.to_thread(get, port, "/readyz") == (200, {"status": "ready"})
        engine.ready = False
        assert (await asyncio.to_thread(get, port, "/readyz"))[0] == 503
        engine.ready = True
        metrics = app.state.metrics.render().decode()
        assert "mone_event_loop_lag_seconds" in metrics
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


@pytest.mark.anyio
async def test_app_lifespan_sets_the_gil_switch_interval(checkpoint_dir: Path) -> None:
    """`gil_switch_interval_ms` holds while the app runs (the probe listener and the loop wait less for the
    GIL under load) and Python's own value comes back when it stops."""
    before = sys.getswitchinterval()
    app = create_app(fast_settings(checkpoint_dir, gil_switch_interval_ms=2.5))
    async with app.router.lifespan_context(app):
        assert sys.getswitchinterval() == pytest.approx(0.0025)
    assert sys.getswitchinterval() == before


def _fail_to_spawn(workers: int) -> None:
    raise OSError("cannot spawn decode workers")


def _fail_to_calibrate(*args: object) -> None:
    raise RuntimeError("calibration failed")


@pytest.mark.anyio
@pytest.mark.parametrize("failure", ["digest", "decode workers", "calibration"])
async def test_a_start_up_that_fails_undoes_what_it_started(
    checkpoint_dir: Path, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    """Start-up stops at the weights (a digest that does not match), at the decode workers, or at
    calibration: the probe listener, the decode workers and the engine's thread are stopped again, and
    Python's switch interval comes back."""
    port = free_port()
    pin = "0" * 64 if failure == "digest" else None
    settings = fast_settings(
        checkpoint_dir, health_port=port, gil_switch_interval_ms=2.5, checkpoint_sha256=pin
    )
    if failure == "decode workers":
        monkeypatch.setattr(mone.server.http.app, "DecodePool", _fail_to_spawn)
    if failure == "calibration":
        monkeypatch.setattr(mone.server.core.engine, "warm_up_and_calibrate", _fail_to_calibrate)
    before = sys.getswitchinterval()
    app = create_app(settings)
    expected = {"digest": CheckpointError, "decode workers": OSError, "calibration": RuntimeError}[failure]
    with pytest.raises(expected):
        async with app.router.lifespan_context(app):
            pass
    assert sys.getswitchinterval() == before
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    assert not [p for p in multiprocessing.active_children() if p.is_alive()]
    engine = getattr(app.state, "engine", None)
    if failure == "calibration":
        assert engine is not None
        assert engine._executor._shutdown


def test_health_port_must_differ_from_port(checkpoint_dir: Path) -> None:
    with pytest.raises(ValueError, match="health_port"):
        fast_settings(checkpoint_dir, port=8000, health_port=8000)


def test_sigterm_turns_readiness_to_draining_and_chains() -> None:
    state = HealthState(stale_s=10.0)
    state.ready = lambda: True
    seen: list[int] = []
    original = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        recorder = signal.getsignal(signal.SIGTERM)
        restore = mark_draining_on_signals(state)
        assert state.readiness()[0] == 200
        signal.raise_signal(signal.SIGTERM)
        assert state.readiness() == (503, {"status": "draining"})
        assert seen == [signal.SIGTERM]  # uvicorn's handler still runs
        restore()
        assert signal.getsignal(signal.SIGTERM) is recorder
    finally:
        signal.signal(signal.SIGTERM, original)
