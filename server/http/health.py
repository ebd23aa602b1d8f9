"""Liveness and readiness off the main event loop (docs/reliability.md row 24).

The main app's `/healthz` waits behind whatever the event loop is doing: with hundreds of connections in
flight a probe can take several hundred milliseconds, and a kubelet with a short `timeoutSeconds` may
restart a server that is only busy.  `health_port` starts a second, tiny HTTP listener on its own thread
with its own asyncio loop.  It answers

* `GET /healthz`: 200 while the main loop's heartbeat is fresh, 503 once it is older than
  `health_stale_s` (a deadlocked or blocked loop fails liveness; a busy one does not), and 503 `stuck`
  while an inference batch runs far past its predicted time (`Engine.stuck`; a hung forward).  Before the
  model is ready the heartbeat is not yet armed and the answer is 200 `starting`: gate liveness with a
  startup probe.
* `GET /readyz`: the main app's readiness, 200 when the engine is ready and the server is not draining
  (SIGTERM/SIGINT received), else 503.

The heartbeat is written by `Watchdog`, a coroutine on the main loop that wakes every `interval` seconds and
also reports how late it woke (the loop lag).  The listener thread only reads two floats and a flag, so it
never waits for the main loop; it shares the GIL with it, which costs at most a few switch intervals.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

log = logging.getLogger("mone.health")

CONNECTION_DEADLINE_S = 2.0  # a probe connection must send its request line and headers within this
MAX_REQUEST_BYTES = 8192


class HealthState:
    """What the listener reports; written from the main loop (and signal handlers), read from its thread."""

    def __init__(self, stale_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.stale_s = stale_s
        self.clock = clock
        self.heartbeat: float | None = None  # None: not armed yet (starting)
        self.lag_s = 0.0
        self.ready: Callable[[], bool] = lambda: False
        self.stuck: Callable[[], dict[str, float] | None] = lambda: None  # the engine's, once it runs
        self.draining = False

    def beat(self, lag_s: float = 0.0) -> None:
        self.heartbeat = self.clock()
        self.lag_s = lag_s

    def live(self) -> tuple[int, dict[str, object]]:
        if self.heartbeat is None:
            return 200, {"status": "starting"}
        age = self.clock() - self.heartbeat
        body: dict[str, object] = {"heartbeat_age_s": round(age, 3), "loop_lag_s": round(self.lag_s, 3)}
        if age > self.stale_s:
            return 503, {"status": "stalled", **body}
        try:
            stuck = self.stuck()
        except Exception:  # the engine mid-teardown: not a stuck batch
            stuck = None
        if stuck is not None:
            return 503, {"status": "stuck", **body, **stuck}
        return 200, {"status": "ok", **body}

    def readiness(self) -> tuple[int, dict[str, object]]:
        if self.draining:
            return 503, {"status": "draining"}
        try:
            ready = self.ready()
        except Exception:  # the engine mid-teardown: not ready
            ready = False
        return (200, {"status": "ready"}) if ready else (503, {"status": "not_ready"})

    def answer(self, method: str, path: str) -> tuple[int, dict[str, object]]:
        path = path.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return 405, {"status": "method_not_allowed"}
        if path in ("/healthz", "/livez"):
            return self.live()
        if path == "/readyz":
            return self.readiness()
        return 404, {"status": "not_found"}


REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}


def render(status: int, body: dict[str, object], head: bool = False) -> bytes:
    payload = json.dumps(body, separators=(",", ":")).encode()
    lines = [
        f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}",
        "Content-Type: application/json",
        f"Content-Length: {len(payload)}",
        "Cache-Control: no-store",
        "Connection: close",
        "",
        "",
    ]
    return "\r\n".join(lines).encode() + (b"" if head else payload)


class _Probe(asyncio.Protocol):
    """One connection: read the request head, answer, close (no keep-alive, no body)."""

    def __init__(self, state: HealthState) -> None:
        self.state = state
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.deadline = asyncio.get_running_loop().call_later(CONNECTION_DEADLINE_S, transport.abort)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buffer += data
        if b"\r\n\r\n" not in self.buffer and b"\n\n" not in self.buffer:
            if len(self.buffer) > MAX_REQUEST_BYTES:
                self._reply(400, {"status": "bad_request"})
            return
        parts = self.buffer.split(b"\r\n", 1)[0].split(b"\n", 1)[0].split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            self._reply(400, {"status": "bad_request"})
            return
        method, path = parts[0].decode("latin-1"), parts[1].decode("latin-1")
        status, body = self.state.answer(method, path)
        self._reply(status, body, head=method == "HEAD")

    def _reply(self, status: int, body: dict[str, object], head: bool = False) -> None:
        assert self.transport is not None
        self.transport.write(render(status, body, head))
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.deadline is not None:
            self.deadline.cancel()


class HealthListener:
    """The probe listener on a daemon thread with its own event loop.

    `reuse_port` (Linux SO_REUSEPORT) lets every uvicorn worker bind the same port; the kernel then hands
    each probe connection to one of them, which answers for itself.
    """

    def __init__(self, state: HealthState, host: str, port: int, reuse_port: bool = False) -> None:
        self.state = state
        self.host = host
        self.port = port
        self.reuse_port = reuse_port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self.on_stop: Callable[[], None] = lambda: None

    def start(self) -> None:
        """Bind and start serving; raises OSError (e.g. the port is taken) in the caller."""
        started = threading.Event()
        error: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(
                    loop.create_server(
                        lambda: _Probe(self.state),
                        self.host,
                        self.port,
                        reuse_address=True,
                        reuse_port=self.reuse_port or None,
                        backlog=128,
                    )
                )
            except BaseException as exc:
                error.append(exc)
                started.set()
                loop.close()
                return
            sock = self._server.sockets[0]
            self.port = sock.getsockname()[1]
            started.set()
            try:
                loop.run_forever()
            finally:
                self._server.close()
                loop.run_until_complete(self._server.wait_closed())
                loop.close()

        self._thread = threading.Thread(target=run, name="mone-health", daemon=True)
        self._thread.start()
        started.wait()
        if error:
            raise error[0]

    def stop(self, timeout: float = 5.0) -> None:
        self.on_stop()
        self.on_stop = lambda: None
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return
        with contextlib.suppress(RuntimeError):  # the loop already closed
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)


class Watchdog:
    """A coroutine on the main loop that beats the heartbeat every `interval` s and measures the loop lag."""

    def __init__(
        self, state: HealthState, interval: float = 0.1, on_lag: Callable[[float], None] | None = None
    ) -> None:
        self.state = state
        self.interval = interval
        self.on_lag = on_lag
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.state.beat()
        self._task = asyncio.create_task(self._run(), name="mone-health-watchdog")

    async def _run(self) -> None:
        while True:
            t0 = time.monotonic()
            await asyncio.sleep(self.interval)
            lag = max(0.0, time.monotonic() - t0 - self.interval)
            self.state.beat(lag)
            if self.on_lag is not None:
                self.on_lag(lag)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def mark_draining_on_signals(state: HealthState) -> Callable[[], None]:
    """Chain SIGTERM/SIGINT so that readiness turns 503 as soon as uvicorn starts shutting down; returns a
    function that puts the previous handlers back (where ours are still installed).

    uvicorn installs its own handlers before the lifespan starts and puts back the ones it found when it
    exits.  Signal handlers can only be set on the main thread; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    installed: list[tuple[int, Any, Any]] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)

        def handler(signum: int, frame: FrameType | None, previous: Any = previous) -> None:
            state.draining = True
            if callable(previous):
                previous(signum, frame)
            elif previous == signal.SIG_DFL:
                signal.signal(signum, signal.SIG_DFL)
                signal.raise_signal(signum)

        signal.signal(sig, handler)
        installed.append((sig, handler, previous))

    def restore() -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, handler, previous in installed:
            if signal.getsignal(sig) is handler and previous is not None:
                signal.signal(sig, previous)

    return restore


def reuse_port_supported() -> bool:
    return hasattr(socket, "SO_REUSEPORT")
