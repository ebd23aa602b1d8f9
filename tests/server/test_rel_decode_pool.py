"""Clip decoding in killable worker processes (docs/reliability.md row 13): a decode that hangs inside one
FFmpeg call is killed at the budget with 422, a worker that crashes gets 400, the pool is replenished either
way, and shutdown stops every worker.  The faults come from `rel_decode_faults.misbehaving_decode`, which the
workers run in place of `decode_video`."""

from __future__ import annotations

import importlib.util
import os
import statistics
import sys
import threading
import time
import types
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from fastapi import FastAPI

from mone.model import MoNEConfig
from mone.server.config import Settings
from mone.server.errors import BadInputError, NotReadyError, OverLimitError, ServeError
from mone.server.http import app as app_module
from mone.server.media.decode import decode
from mone.server.media.decode_pool import KILL_MARGIN_S, DecodePool
from tests.server.rel_decode_faults import EXIT, HANG, SEGFAULT, misbehaving_decode
from tests.support.media import encode_clip
from tests.support.models import fast_settings

CFG = MoNEConfig.from_variant("Mi/4", num_classes=10)
BUDGET_S = 1.0
S = Settings(random_init=True, max_decode_seconds=BUDGET_S)
CLIP = encode_clip([np.full((16, 16), 30 * i, np.uint8) for i in range(8)])
SLACK_S = 3.0  # a loaded 2-core machine: scheduling, pipe and process start


def gone(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists()


@pytest.fixture(scope="module")
def pool() -> Iterator[DecodePool]:
    p = DecodePool(1, target=misbehaving_decode)
    p.wait_ready()
    yield p
    p.close()


def test_rel_pool_decodes_exactly_like_the_thread() -> None:
    clips = [CLIP, encode_clip([np.full((20, 24), 9 * i, np.uint8) for i in range(5)], "webm", "libvpx")]
    p = DecodePool(1)
    try:
        p.wait_ready()
        for data in clips:
            want = decode(data, CFG, S, "clip").tensor
            got = decode(data, CFG, S, "clip", p).tensor
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        with pytest.raises(BadInputError):
            decode(CLIP[: len(CLIP) // 3], CFG, S, "clip", p)  # a documented error crosses the pipe as is
        assert p.stats.decoded == 2
        assert p.stats.killed == p.stats.crashed == 0
        worker_pid = p.pids()[0]
        maps = Path(f"/proc/{worker_pid}/maps").read_text()
        assert "libtorch" not in maps, "a decode worker should not load torch"
    finally:
        p.close()


def test_rel_workers_do_not_import_the_servers_main(monkeypatch: pytest.MonkeyPatch) -> None:
    """spawn would re-import `__main__` in each worker; a launcher such as `tests.server.rel_server` imports
    torch, which would cost every worker seconds and about 200 MB."""
    main = types.ModuleType("__main__")
    main.__spec__ = importlib.util.find_spec("tests.server.rel_server")
    monkeypatch.setitem(sys.modules, "__main__", main)
    p = DecodePool(1)
    try:
        p.wait_ready()
        assert "libtorch" not in Path(f"/proc/{p.pids()[0]}/maps").read_text()
    finally:
        p.close()


def test_rel_hang_in_one_ffmpeg_call_is_killed_at_the_budget(pool: DecodePool) -> None:
    before = pool.pids()
    t0 = time.monotonic()
    with pytest.raises(OverLimitError, match="longer than 1 s") as info:
        decode(CLIP + HANG, CFG, S, "clip", pool)
    took = time.monotonic() - t0
    assert info.value.detail == {"limit_s": BUDGET_S}
    assert BUDGET_S <= took < BUDGET_S + KILL_MARGIN_S + SLACK_S, f"answered after {took:.2f} s"
    assert all(gone(pid) for pid in before), "the hung worker is still running"
    # The pool is whole again, and its fresh worker decodes the next clip.
    assert pool.alive() == 1
    assert pool.pids() != before
    t1 = time.monotonic()
    got = decode(CLIP, CFG, S, "clip", pool).tensor
    torch.testing.assert_close(got, decode(CLIP, CFG, S, "clip").tensor, rtol=0, atol=0)
    print(
        f"\nREL-FIGURES decode_hang hang_to_error_s={took:.2f} budget_s={BUDGET_S} "
        f"next_clip_incl_worker_start_s={time.monotonic() - t1:.2f}"
    )
    assert pool.stats.killed >= 1


@pytest.mark.parametrize(("marker", "how"), [(SEGFAULT, "killed by SIGSEGV"), (EXIT, "exited with status 3")])
def test_rel_crashed_worker_is_a_400_and_is_replaced(pool: DecodePool, marker: bytes, how: str) -> None:
    before = pool.pids()
    crashed = pool.stats.crashed
    with pytest.raises(BadInputError, match=f"decoder process {how}"):
        decode(CLIP + marker, CFG, S, "clip", pool)
    assert pool.stats.crashed == crashed + 1
    assert pool.alive() == 1
    assert pool.pids() != before
    assert all(gone(pid) for pid in before)
    assert decode(CLIP, CFG, S, "clip", pool).frames == CFG.num_frames


def test_rel_pool_never_shrinks_under_concurrent_faults() -> None:
    p = DecodePool(2, target=misbehaving_decode)
    payloads = [CLIP, CLIP + HANG, CLIP + SEGFAULT, CLIP, CLIP + EXIT, CLIP, CLIP + HANG, CLIP]
    outcomes: dict[int, str] = {}

    def one(i: int, data: bytes) -> None:
        try:
            decode(data, CFG, S, "clip", p)
            outcomes[i] = "ok"
        except ServeError as exc:
            outcomes[i] = exc.code

    try:
        p.wait_ready()
        threads = [threading.Thread(target=one, args=(i, d)) for i, d in enumerate(payloads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        want = {
            i: "over_limit" if d.endswith(HANG) else "ok" if d == CLIP else "bad_input"
            for i, d in enumerate(payloads)
        }
        assert outcomes == want
        assert p.alive() == 2
        assert len(p.pids()) == 2
        assert (p.stats.killed, p.stats.crashed, p.stats.decoded) == (2, 2, 4)
    finally:
        p.close()


def decode_hanging_clip(p: DecodePool, errors: list[BaseException]) -> threading.Thread:
    """Start a thread (named "request") that decodes a clip which hangs its worker; its error goes to
    `errors`."""

    def hang() -> None:
        try:
            decode(CLIP + HANG, CFG, Settings(random_init=True, max_decode_seconds=30), "clip", p)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=hang, name="request")
    t.start()
    return t


def test_rel_close_stops_idle_and_busy_workers() -> None:
    p = DecodePool(2, target=misbehaving_decode)
    p.wait_ready()
    pids = p.pids()
    errors: list[BaseException] = []
    t = decode_hanging_clip(p, errors)
    time.sleep(0.5)  # the clip is in a worker, which is stuck
    t0 = time.monotonic()
    p.close(timeout=1.0)
    t.join(10)
    assert time.monotonic() - t0 < 1.0 + SLACK_S
    assert all(gone(pid) for pid in pids), "a worker outlived close()"
    assert len(errors) == 1
    assert isinstance(errors[0], NotReadyError)
    with pytest.raises(NotReadyError):
        decode(CLIP, CFG, S, "clip", p)


def test_rel_close_leaves_a_busy_pipe_to_its_request_thread() -> None:
    """`close` must not close the pipe a request thread is polling: the two closes raced (EBADF), and a
    descriptor closed under a poller can be reused by another file.  Every close of the busy worker's pipe is
    recorded with its thread."""
    p = DecodePool(1, target=misbehaving_decode)
    p.wait_ready()
    (worker,) = p._workers
    closers: list[str] = []
    real_close = worker.conn.close

    def recorded_close() -> None:
        closers.append(threading.current_thread().name)
        real_close()

    worker.conn.close = recorded_close  # type: ignore[method-assign]
    errors: list[BaseException] = []
    t = decode_hanging_clip(p, errors)
    deadline = time.monotonic() + 10
    while not worker.busy and time.monotonic() < deadline:
        time.sleep(0.01)
    assert worker.busy
    p.close(timeout=0.2)
    t.join(10)
    assert not t.is_alive()
    assert [type(e) for e in errors] == [NotReadyError]
    assert closers
    assert set(closers) == {"request"}
    assert worker.conn.closed
    assert gone(worker.process.pid)


def test_rel_decode_overhead_per_clip() -> None:
    """The cost of the isolation on the common path: the same clip in the thread and through the pool,
    alternately, so that both see the same machine load."""
    p = DecodePool(1)
    times: dict[str, list[float]] = {"thread": [], "process": []}
    try:
        p.wait_ready()
        decode(CLIP, CFG, S, "clip", p)
        for _ in range(40):
            for mode, clips in (("thread", None), ("process", p)):
                t0 = time.perf_counter()
                decode(CLIP, CFG, S, "clip", clips)
                times[mode].append((time.perf_counter() - t0) * 1e3)
    finally:
        p.close()
    thread_ms, process_ms = (statistics.median(times[m]) for m in ("thread", "process"))
    print(
        f"\nREL-FIGURES decode_overhead clip_bytes={len(CLIP)} thread_ms={thread_ms:.2f} "
        f"process_ms={process_ms:.2f} overhead_ms={process_ms - thread_ms:.2f}"
    )
    assert process_ms < thread_ms + 50.0


# -- over HTTP -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def faulty_app(checkpoint_dir: Path) -> AsyncIterator[FastAPI]:
    """The app with one decode worker that runs `misbehaving_decode`, and a 1 s decode budget."""
    settings = fast_settings(checkpoint_dir, max_decode_seconds=BUDGET_S, decode_workers=1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(app_module, "DecodePool", lambda n: DecodePool(n, target=misbehaving_decode))
        application = app_module.create_app(settings)
        async with application.router.lifespan_context(application):
            yield application
            pids = application.state.clips.pids()
    assert pids
    assert all(gone(pid) for pid in pids), "shutdown left decode workers running"


@pytest.fixture(scope="module")
async def faulty_client(faulty_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=faulty_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as c:
        yield c


async def classify(client: httpx.AsyncClient, data: bytes) -> httpx.Response:
    return await client.post("/v1/classify", files={"file": ("clip.mp4", data, "video/mp4")})


@pytest.mark.anyio
async def test_rel_http_hang_is_422_then_the_server_serves_clips(
    faulty_app: FastAPI, faulty_client: httpx.AsyncClient
) -> None:
    pool: DecodePool = faulty_app.state.clips
    first = pool.pids()
    assert len(first) == 1
    assert os.getpid() not in first

    assert (await classify(faulty_client, CLIP)).status_code == 200
    t0 = time.monotonic()
    r = await classify(faulty_client, CLIP + HANG)
    took = time.monotonic() - t0
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "over_limit"
    assert "decoder was stopped" in error["message"]
    assert took < BUDGET_S + KILL_MARGIN_S + SLACK_S
    assert (await faulty_client.get("/healthz")).status_code == 200
    ok = await classify(faulty_client, CLIP)
    assert ok.status_code == 200, ok.text
    assert gone(first[0])
    assert pool.alive() == 1

    r = await classify(faulty_client, CLIP + SEGFAULT)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "bad_input"
    assert "SIGSEGV" in r.json()["error"]["message"]
    assert (await classify(faulty_client, CLIP)).status_code == 200
    assert pool.alive() == 1
    assert pool.stats.killed == 1
    assert pool.stats.crashed == 1


@pytest.mark.anyio
async def test_rel_http_oip_clip_goes_through_the_pool(
    faulty_app: FastAPI, faulty_client: httpx.AsyncClient
) -> None:
    import base64

    pool: DecodePool = faulty_app.state.clips
    decoded = pool.stats.decoded
    body = {
        "inputs": [
            {"name": "x", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(CLIP).decode()]}
        ],
        "parameters": {"kind": "clip"},
    }
    r = await faulty_client.post("/v2/models/mone/infer", json=body)
    assert r.status_code == 200, r.text
    assert pool.stats.decoded == decoded + 1
