"""Clip decoding in a small pool of killable worker processes (docs/reliability.md row 13).

The decode-time budget inside `decode_video` is checked between frames, so a crafted stream that makes one
FFmpeg call hang (or loop) would never reach the check, and a thread cannot be stopped.  A process can: each
clip goes to an idle worker, and when no answer comes within `max_decode_seconds` + `KILL_MARGIN_S` the
worker gets SIGKILL, a fresh one takes its place, and the request gets 422 `over_limit`.  A worker that dies
on its own (a segfault in a decoder, `os._exit`, the OOM killer) is replaced the same way and the request
gets 400 `bad_input`: like any input that cannot be decoded, it is the stream's doing (docs/reliability.md
row 8: corrupt media gets a 4xx, never a 500).  The pool never shrinks.

Workers are started with the spawn method, never fork: the server process holds torch's thread pools, which
a forked child would inherit in an undefined state.  They are started with the app (before the first
request) and reused, so the common path costs one round trip through a pipe; the frames come back as one
uint8 array.  Workers import PyAV, Pillow and NumPy but not torch (`mone.server.media.video`), which keeps a
replacement quick to start.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
import types
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnProcess
from typing import Any

import numpy as np

from mone.server.config import Settings
from mone.server.errors import (
    BadInputError,
    DeadlineExceededError,
    InternalError,
    NotReadyError,
    OverLimitError,
    ServeError,
)
from mone.server.media.video import ClipDecoder, ClipShape, decode_video

log = logging.getLogger("mone.decode")
KILL_MARGIN_S = 1.0  # beyond the budget: the worker's own between-frames check answers first when it can
START_TIMEOUT_S = 60.0  # a fresh worker imports PyAV and Pillow; on a loaded machine that takes a while


def _serve(conn: Connection, target: ClipDecoder) -> None:
    """A worker's main loop: answer (data, fmt, shape, settings) jobs until told to stop or orphaned."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the server stops us
    threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), daemon=True).start()
    conn.send(("ready", os.getpid()))
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):  # the server went away
            return
        if job is None:
            return
        try:
            reply: tuple[str, Any] = ("ok", target(*job))
        except ServeError as exc:
            reply = ("error", exc)
        except Exception as exc:  # a bug in the decoder, not a property of the input
            reply = ("error", InternalError(f"clip decoder failed: {type(exc).__name__}: {exc}"))
        conn.send(reply)


def _exit_when_orphaned(parent: int) -> None:
    """End the worker when the server dies without closing the pool (kill -9), even in the middle of a hung
    decode, which would otherwise never read the end of its pipe."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


@contextlib.contextmanager
def _bare_main() -> Iterator[None]:
    """Start a worker without the server's `__main__`.

    spawn re-imports the parent's main module in the child (`python -m x` or a script).  The workers need
    nothing from it, and a launcher whose main imports torch would make every worker load torch: seconds of
    start-up and about 200 MB each.  An empty `__main__` during `start()` gives the child none to import.
    """
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


class _Worker:
    """One worker process and the parent's end of its pipe.

    The pipe has one owner at a time: the request thread that acquired the worker (`busy`), else the pool.
    Only the owner sends on it or closes it, so that `DecodePool.close` never closes a pipe that another
    thread is polling (the descriptor could be reused under that thread's feet).
    """

    def __init__(self, ctx: Any, target: ClipDecoder) -> None:
        self.conn, child = ctx.Pipe(duplex=True)
        self.process: SpawnProcess = ctx.Process(
            target=_serve, args=(child, target), name="mone-decode", daemon=True
        )
        with _bare_main():
            self.process.start()
        child.close()
        self.ready = False
        self.busy = False  # guarded by the pool's lock

    def wait_ready(self, timeout: float) -> None:
        """Block until the worker has imported its modules (raises TimeoutError or EOFError)."""
        if self.ready:
            return
        if not self.conn.poll(timeout):
            raise TimeoutError(f"decode worker {self.process.pid} did not start within {timeout:g} s")
        self.conn.recv()
        self.ready = True

    def kill(self) -> None:
        """SIGKILL (a hung FFmpeg call cannot ignore it); the pipe is left to its owner."""
        self.process.kill()
        self.process.join(5.0)

    def stop(self) -> None:
        """Ask the worker to exit after its current job (by the pipe's owner only)."""
        with contextlib.suppress(OSError):
            self.conn.send(None)

    def death(self) -> str:
        """How the process ended, for the error message."""
        self.process.join(1.0)
        code = self.process.exitcode
        if code is None:
            return "closed its pipe"
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exited with status {code}"


@dataclass
class PoolStats:
    """What the pool has done (read by tests and logs)."""

    decoded: int = 0
    refused: int = 0  # answered with a documented error (bad input, over a limit)
    killed: int = 0  # over the budget
    crashed: int = 0  # died on their own
    started: int = 0


class DecodePool:
    """A fixed number of decode worker processes; a `ClipDecoder` that is safe to call from many threads.

    Args:
        size: workers (each decodes one clip at a time; more concurrent clips wait for a free one).
        target: the function the workers run; it must be importable by name (module level).
        kill_margin_s: extra wall time over `max_decode_seconds` before a worker is killed.
    """

    def __init__(
        self, size: int, target: ClipDecoder = decode_video, kill_margin_s: float = KILL_MARGIN_S
    ) -> None:
        if size < 1:
            raise ValueError("a decode pool needs at least one worker")
        self.size = size
        self.target = target
        self.kill_margin_s = kill_margin_s
        self.stats = PoolStats()
        self._ctx = multiprocessing.get_context("spawn")
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._workers: set[_Worker] = set()
        self._lock = threading.Lock()
        self._closed = False
        for _ in range(size):
            self._idle.put(self._spawn())

    # -- lifecycle ---------------------------------------------------------------------------------------

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        """Block until every worker has started, so that the first clip pays no start-up."""
        deadline = time.monotonic() + timeout
        with self._lock:
            workers = list(self._workers)
        for worker in workers:
            worker.wait_ready(max(0.0, deadline - time.monotonic()))

    def close(self, timeout: float = 2.0) -> None:
        """Stop every worker: idle ones are asked to exit, and whatever still runs after `timeout` is killed.

        A busy worker's pipe stays with its request thread, which sees the worker end (the request gets
        503 `not_ready`) or gets its answer, and closes the pipe itself.
        """
        with self._lock:
            self._closed = True
            workers = list(self._workers)
            idle = [w for w in workers if not w.busy]
            self._workers.clear()
        for worker in idle:
            worker.stop()
        deadline = time.monotonic() + timeout
        for worker in workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.kill()
        for worker in idle:
            worker.conn.close()

    def alive(self) -> int:
        """Workers whose process is running (started or starting)."""
        with self._lock:
            return sum(w.process.is_alive() for w in self._workers)

    def pids(self) -> list[int]:
        with self._lock:
            return [w.process.pid for w in self._workers if w.process.pid is not None]

    # -- decoding ----------------------------------------------------------------------------------------

    def __call__(self, data: bytes, fmt: str, shape: ClipShape, settings: Settings) -> np.ndarray:
        worker = self._acquire(settings.request_timeout_s)
        try:
            frames = self._run(worker, data, fmt, shape, settings)
        except _WorkerLostError as lost:
            self._replace(worker)
            raise lost.error from None
        except ServeError:
            self.stats.refused += 1
            self._release(worker)
            raise
        except BaseException:  # the pipe is in an unknown state: do not reuse the worker
            self._replace(worker)
            raise
        self._release(worker)
        self.stats.decoded += 1
        return frames

    def _run(
        self, worker: _Worker, data: bytes, fmt: str, shape: ClipShape, settings: Settings
    ) -> np.ndarray:
        try:
            worker.wait_ready(START_TIMEOUT_S)
        except (TimeoutError, EOFError, OSError) as exc:
            raise _WorkerLostError(InternalError(f"decode worker did not start: {exc}")) from exc
        # The settings minus the key: the worker needs only the limits.
        job = (data, fmt, shape, settings.model_copy(update={"api_key": None}))
        budget = settings.max_decode_seconds
        try:
            worker.conn.send(job)
            answered = worker.conn.poll(budget + self.kill_margin_s)
            reply = worker.conn.recv() if answered else None
        except (EOFError, OSError):
            raise self._crashed(worker, fmt) from None
        if reply is None:
            self.stats.killed += 1
            log.warning("decode worker %s passed the %g s budget: killed", worker.process.pid, budget)
            worker.kill()
            raise _WorkerLostError(
                OverLimitError(
                    f"decoding took longer than {budget:g} s; the decoder was stopped", limit_s=budget
                )
            )
        status, value = reply
        if status == "ok":
            return np.asarray(value, dtype=np.uint8)
        raise value

    def _crashed(self, worker: _Worker, fmt: str) -> _WorkerLostError:
        if self._closed:
            return _WorkerLostError(NotReadyError("the server is shutting down"))
        self.stats.crashed += 1
        how = worker.death()
        log.warning("decode worker %s %s while decoding a %s clip", worker.process.pid, how, fmt)
        return _WorkerLostError(BadInputError(f"could not decode {fmt} clip: the decoder process {how}"))

    def _acquire(self, timeout: float) -> _Worker:
        deadline = time.monotonic() + timeout
        while True:
            if self._closed:
                raise NotReadyError("the server is shutting down")
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeadlineExceededError(f"no clip decoder was free within {timeout:g} s")
            try:
                worker = self._idle.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            with self._lock:
                if self._closed:  # `close` took it for idle and owns its pipe
                    raise NotReadyError("the server is shutting down")
                worker.busy = True
            return worker

    def _release(self, worker: _Worker) -> None:
        with self._lock:
            worker.busy = False
            keep = not self._closed
        if keep:
            self._idle.put(worker)
        else:  # closed while it worked: `close` left the pipe to this thread
            worker.stop()
            worker.conn.close()

    def _replace(self, worker: _Worker) -> None:
        """Kill `worker` (if it still runs) and put a fresh one in its place: the pool never shrinks."""
        if worker.process.is_alive():
            worker.kill()
        worker.conn.close()
        with self._lock:
            worker.busy = False
            self._workers.discard(worker)
            if self._closed:
                return
            fresh = self._spawn_locked()
        self._idle.put(fresh)

    def _spawn(self) -> _Worker:
        with self._lock:
            return self._spawn_locked()

    def _spawn_locked(self) -> _Worker:
        worker = _Worker(self._ctx, self.target)
        self._workers.add(worker)
        self.stats.started += 1
        return worker


class _WorkerLostError(Exception):
    """The worker must be replaced; `error` is what the request gets."""

    def __init__(self, error: ServeError) -> None:
        super().__init__(error.message)
        self.error = error
