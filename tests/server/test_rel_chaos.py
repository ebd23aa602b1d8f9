"""Load and chaos against a real `mone-serve --random-init` process on 127.0.0.1 (docs/reliability.md rows 15,
16, 17, 21, 23, 24, 30).  Each test is bounded (at most a few hundred requests, a few seconds) and ends with
the accounting identity, accepted = succeeded + failed + cancelled, from the client's log and from the
server's own counters, with nothing in flight."""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import statistics
import threading
import time

import httpx
import pytest

from tests.server.rel_load import Load, burst, figures, launch, server_account, total
from tests.support.media import fashion_images, png

pytestmark = pytest.mark.slow
BODY = png(fashion_images(1)[0])


def wait_for(cond: object, timeout: float = 10.0, step: float = 0.02) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():  # type: ignore[operator]
            return True
        time.sleep(step)
    return False


def test_rel_overload_burst_sheds_with_retry_after_and_loses_nothing() -> None:
    """300 simultaneous requests against a queue of 16: the excess is answered 429 + Retry-After at once,
    every admitted request finishes, and /healthz keeps answering fast (row 24)."""
    server = launch("--max-batch-size", "4", "--max-queue-size", "16", "--max-batch-wait-ms", "2", slow_ms=20)
    try:
        probes: list[float] = []
        answers: list[int | str] = []  # status codes, or the error a probe got; asserted below
        stop = threading.Event()

        def probe() -> None:
            with httpx.Client(base_url=server.base, timeout=5) as c:
                while not stop.is_set():
                    t0 = time.monotonic()
                    try:
                        answers.append(c.get("/healthz").status_code)
                    except httpx.HTTPError as exc:
                        answers.append(type(exc).__name__)
                    probes.append(time.monotonic() - t0)
                    time.sleep(0.02)

        prober = threading.Thread(target=probe, daemon=True)
        prober.start()
        t0 = time.monotonic()
        load = asyncio.run(burst(server.base, 300, BODY))
        wall = time.monotonic() - t0
        stop.set()
        prober.join(5)
        assert not prober.is_alive()
        assert wait_for(lambda: total(server.live_metrics(), "mone_inflight_requests") == 0)
        m = server_account(server.live_metrics())
    finally:
        server.stop()
    ok, shed = load.count(200), load.count(429, 503)
    assert not load.errors, load.codes()
    assert set(load.codes()) <= {"200", "429", "503"}, load.codes()
    assert ok >= 16, load.codes()
    assert shed >= 100, load.codes()
    assert all(o.retry_after and int(o.retry_after) >= 1 for o in load.outcomes if o.status in (429, 503))
    shed_ms = sorted(o.seconds * 1e3 for o in load.outcomes if o.status == 429)
    assert m["accepted"] == ok == m["succeeded"]
    assert m["failed"] == m["cancelled"] == m["unsettled"] == 0
    assert m["rejected"] >= shed
    p99 = sorted(probes)[int(0.99 * (len(probes) - 1))] * 1e3 if probes else float("nan")
    assert probes
    assert answers
    assert set(answers) == {200}, collections.Counter(answers)
    assert p99 < 1000, f"/healthz p99 {p99:.0f} ms under saturation"
    figures(
        "overload_burst",
        sent=300,
        accepted=ok,
        answered=len(load.outcomes) - len(load.errors),
        shed_429=load.count(429),
        shed_503=load.count(503),
        lost=len(load.errors),
        wall_s=round(wall, 2),
        shed_median_ms=round(statistics.median(shed_ms), 1) if shed_ms else None,
        health_probes=len(probes),
        health_p99_ms=round(p99, 1),
        health_max_ms=round(max(probes) * 1e3, 1),
        server=m,
    )


def test_rel_sigterm_under_load_drains_and_exits_cleanly() -> None:
    """SIGTERM while 40 requests are queued: the listener goes at once (readiness fails), every accepted
    request completes, the process exits 0 within the grace period."""
    grace = 10
    server = launch(
        "--max-batch-size",
        "4",
        "--max-queue-size",
        "64",
        "--timeout-graceful-shutdown",
        str(grace),
        slow_ms=50,
    )
    result: dict[str, Load] = {}
    loader = threading.Thread(
        target=lambda: result.setdefault("load", asyncio.run(burst(server.base, 40, BODY)))
    )
    loader.start()
    assert wait_for(lambda: total(server.live_metrics(), "mone_accepted_total") >= 12)
    t_term = time.monotonic()
    os.killpg(server.proc.pid, signal.SIGTERM)
    ready_gone = None
    end = time.monotonic() + 2
    while time.monotonic() < end and ready_gone is None:
        try:
            if httpx.get(server.base + "/readyz", timeout=0.5).status_code != 200:
                ready_gone = time.monotonic() - t_term
        except httpx.HTTPError:
            ready_gone = time.monotonic() - t_term
        time.sleep(0.01)
    late = asyncio.run(burst(server.base, 5, BODY, timeout=5))
    try:
        code = server.proc.wait(timeout=grace + 5)
    finally:
        server.stop()
    exit_s = time.monotonic() - t_term
    loader.join(30)
    load = result["load"]
    m = server_account(server.dead_metrics())
    assert ready_gone is not None
    assert ready_gone < 0.5, ready_gone
    assert code == 0
    assert exit_s < grace
    assert not load.errors, load.codes()
    assert load.count(200) == 40 == m["accepted"] == m["succeeded"]
    assert m["unsettled"] == 0
    assert all(o.status in (None, 503) for o in late.outcomes), late.codes()  # refused, never accepted
    figures(
        "sigterm_under_load",
        sent=40,
        accepted=m["accepted"],
        answered=load.count(200),
        lost=len(load.errors),
        sent_after_sigterm=5,
        refused_after_sigterm=dict(late.codes()),
        readiness_gone_ms=round(ready_gone * 1e3, 1),
        exit_code=code,
        exit_s=round(exit_s, 2),
        server=m,
    )


def test_rel_kill_9_mid_batch_gives_errors_never_a_hang() -> None:
    """SIGKILL while a batch runs: every client gets an answer or a connection error within a second; the
    requests the dead server had accepted but not settled are exactly the clients' errors."""
    server = launch(
        "--max-batch-size", "4", "--max-queue-size", "64", "--max-batch-wait-ms", "1", slow_ms=300
    )
    result: dict[str, Load] = {}
    loader = threading.Thread(
        target=lambda: result.setdefault("load", asyncio.run(burst(server.base, 20, BODY, timeout=15)))
    )
    loader.start()
    assert wait_for(lambda: total(server.live_metrics(), "mone_batch_size_count") >= 1)
    time.sleep(0.1)  # the next batch is in the model now
    os.killpg(server.proc.pid, signal.SIGKILL)
    t_kill = time.monotonic()
    loader.join(15)
    settled_s = time.monotonic() - t_kill
    server.stop()
    load = result["load"]
    m = server_account(server.dead_metrics())
    assert not loader.is_alive()
    assert load.hung() == 0, load.codes()
    assert settled_s < 2.0, settled_s
    assert len(load.errors) >= 1, "the kill must have interrupted work"
    assert set(load.codes()) - {"200"} <= {"RemoteProtocolError", "ReadError", "ConnectError"}, load.codes()
    assert load.count(200) == m["succeeded"]
    # Accepted but never settled = killed in flight; each of those clients got an error, not silence.
    assert m["unsettled"] <= len(load.errors)
    # Every client is accounted for: a 200 or a connection error, nothing else and nothing missing; the
    # server accepted at most the 20 and at least those it answered, and failed none.
    assert len(load.outcomes) == 20
    assert load.count(200) + len(load.errors) == 20, load.codes()
    assert load.count(200) <= m["accepted"] <= 20, m
    assert m["failed"] == 0, m
    restarted = launch("--max-batch-size", "4")  # the orchestrator's restart: ready only once warm
    try:
        assert httpx.post(restarted.base + "/v1/classify", content=BODY, timeout=10).status_code == 200
    finally:
        restarted.stop()
    figures(
        "kill_9_mid_batch",
        sent=20,
        accepted=m["accepted"],
        answered_200=load.count(200),
        client_errors=len(load.errors),
        error_kinds=dict(load.codes()),
        lost=load.hung(),
        clients_settled_s=round(settled_s, 2),
        server=m,
    )


def test_rel_worker_killed_is_restarted_and_serving_continues() -> None:
    """Two workers; kill -9 one: uvicorn's supervisor starts a new one and every later request succeeds."""
    server = launch("--workers", "2", "--max-batch-size", "4")
    try:
        import subprocess

        def children() -> list[int]:
            out = subprocess.run(
                ["ps", "-o", "pid=", "--ppid", str(server.proc.pid)], capture_output=True, text=True
            ).stdout
            return [int(p) for p in out.split()]

        assert wait_for(lambda: len(children()) >= 2, 30)
        before = children()
        # multiprocessing's resource tracker is also a child; the workers are the ones serving
        victim = before[-1]
        os.kill(victim, signal.SIGKILL)
        assert wait_for(lambda: victim not in children() and len(children()) >= len(before), 30)
        assert wait_for(lambda: httpx.get(server.base + "/readyz", timeout=2).status_code == 200, 60)
        load = asyncio.run(burst(server.base, 30, BODY, stagger=0.01))
    finally:
        server.stop()
    assert load.count(200) == 30, load.codes()
    figures("worker_kill_restart", workers_before=before, victim=victim, sent_after=30, ok_after=30)


def test_rel_client_disconnects_cancel_queued_work() -> None:
    """30 requests whose clients give up after 0.35 s while the model serves one every 100 ms: the queued
    ones are cancelled (counted in mone_cancelled_total) and never run; a keep-alive client is unaffected."""
    server = launch(
        "--max-batch-size", "1", "--max-queue-size", "64", "--max-batch-wait-ms", "0", slow_ms=100
    )
    try:
        with httpx.Client(base_url=server.base, timeout=10) as keep:
            assert keep.post("/v1/classify", content=BODY).status_code == 200
            before = server_account(server.live_metrics())
            load = asyncio.run(burst(server.base, 30, BODY, timeout=0.35))
            assert wait_for(lambda: total(server.live_metrics(), "mone_inflight_requests") == 0, 10)
            time.sleep(0.3)
            m = server_account(server.live_metrics())
            assert keep.post("/v1/classify", content=BODY).status_code == 200  # same connection, still fine
            codes499 = total(server.live_metrics(), "mone_requests_total", code="499")
    finally:
        server.stop()
    d = {k: m[k] - before[k] for k in m}
    gave_up = len(load.errors)
    assert gave_up >= 20, load.codes()
    assert d["accepted"] == 30
    assert d["unsettled"] == 0
    assert d["failed"] == 0
    assert d["succeeded"] + d["cancelled"] == 30
    assert d["cancelled"] >= 15
    assert d["succeeded"] >= load.count(200)
    # All 28 clients leave within a few ms of each other; the one in the model and the one or two that
    # start before the server has read every hang-up may still run.  The rest never reach the model.
    assert d["batches"] <= d["succeeded"] + 3, "cancelled requests must not run"
    figures(
        "client_disconnects",
        sent=30,
        accepted=d["accepted"],
        answered_200=load.count(200),
        clients_gave_up=gave_up,
        server_cancelled=d["cancelled"],
        server_succeeded=d["succeeded"],
        batches_run=d["batches"],
        http_499=codes499,
        lost=int(d["unsettled"]),
    )


def test_rel_deadline_expiry_is_504_without_running() -> None:
    """Requests with deadline_ms=100 behind 3 slow ones get 504 and never reach the model."""
    server = launch(
        "--max-batch-size", "1", "--max-queue-size", "64", "--max-batch-wait-ms", "0", slow_ms=200
    )
    try:
        for _ in range(2):  # the latency model learns what a batch costs here
            assert httpx.post(server.base + "/v1/classify", content=BODY, timeout=10).status_code == 200
        before = server_account(server.live_metrics())
        result: dict[str, Load] = {}
        loader = threading.Thread(
            target=lambda: result.setdefault("busy", asyncio.run(burst(server.base, 3, BODY)))
        )
        loader.start()
        assert wait_for(lambda: total(server.live_metrics(), "mone_accepted_total") >= before["accepted"] + 3)
        short = asyncio.run(burst(server.base, 10, BODY, path="/v1/classify?deadline_ms=100"))
        loader.join(10)
        busy = result["busy"]
        long_ok = httpx.post(server.base + "/v1/classify?deadline_ms=5000", content=BODY, timeout=10)
        assert wait_for(lambda: total(server.live_metrics(), "mone_inflight_requests") == 0)
        after = server.live_metrics()
    finally:
        server.stop()
    m = server_account(after)
    d = {k: m[k] - before[k] for k in m}
    assert busy.count(200) == 3
    assert long_ok.status_code == 200
    assert short.count(504) == 10, short.codes()
    assert d["batches"] == 4, "only the 3 busy requests and the long-deadline one ran"
    assert d["unsettled"] == 0
    expired_in_queue = total(after, "mone_failed_total", reason="deadline")
    answered_504 = total(after, "mone_rejected_total", reason="deadline")  # every 504, wherever it arose
    refused_at_admission = answered_504 - expired_in_queue
    assert answered_504 == 10
    assert d["accepted"] == 4 + expired_in_queue
    figures(
        "deadline_expiry",
        sent=14,
        accepted=d["accepted"],
        answered=14,
        http_504=short.count(504),
        expired_in_queue=expired_in_queue,
        refused_at_admission=refused_at_admission,
        batches_run=d["batches"],
        lost=0,
    )
