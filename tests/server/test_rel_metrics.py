"""Metrics correctness and model faults in process (docs/reliability.md rows 19, 20, 30): after mixed traffic
with successes, overload, expired deadlines, a cancelled request and an out-of-memory batch, /metrics gives
accepted = succeeded + failed + cancelled, agreeing with the client's log and the engine's own account."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi import FastAPI

from mone.server.core.budget import parse_budget
from mone.server.core.request import InferRequest
from mone.server.http.app import create_app
from tests.server.rel_load import parse, server_account, total
from tests.support.media import fashion_images, png
from tests.support.models import fast_settings

pytestmark = pytest.mark.anyio
BODY = png(fashion_images(1)[0])


@pytest.fixture(scope="module")
async def app(checkpoint_dir: Path) -> AsyncIterator[FastAPI]:
    settings = fast_settings(
        checkpoint_dir, calibrate=False, max_batch_size=2, max_batch_wait_ms=0.0, max_queue_size=4
    )
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture(scope="module")
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        yield c


def slow_model(
    app: FastAPI, monkeypatch: pytest.MonkeyPatch, seconds: float, fail_once: bool = False
) -> None:
    runner = app.state.engine.runner
    run = runner.run
    state = {"failed": False}

    def patched(*args: Any) -> Any:
        time.sleep(seconds)
        if fail_once and not state["failed"]:
            state["failed"] = True
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return run(*args)

    monkeypatch.setattr(runner, "run", patched)


async def test_rel_oom_mid_batch_fails_only_that_batch_then_serves(
    app: FastAPI, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow_model(app, monkeypatch, 0.0, fail_once=True)
    first = await client.post("/v1/classify", content=BODY)
    assert first.status_code == 500
    assert first.json()["error"]["code"] == "internal"
    assert "OutOfMemoryError" in first.json()["error"]["message"]
    rs = await asyncio.gather(*(client.post("/v1/classify", content=BODY) for _ in range(3)))
    assert [r.status_code for r in rs] == [200, 200, 200]
    assert (await client.get("/healthz")).status_code == 200
    m = parse((await client.get("/metrics")).text)
    assert total(m, "mone_failed_total", reason="internal") == 1


async def test_rel_metrics_account_for_every_request(
    app: FastAPI, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = app.state.engine
    before = server_account(parse((await client.get("/metrics")).text))
    slow_model(app, monkeypatch, 0.05)
    log: Counter[int] = Counter()

    async def send(query: str = "") -> None:
        r = await client.post("/v1/classify" + query, content=BODY)
        log[r.status_code] += 1

    # One request whose client leaves while it is queued, then a burst larger than the queue (some 429)
    # with short deadlines mixed in (504).
    budget = parse_budget({"capacity": 1.0}, 1.0, engine.cfg.min_capacity)
    item = engine.submit(InferRequest(engine.runner.dummy(1), "image", budget))
    engine.cancel(item)
    tasks = [asyncio.ensure_future(send()) for _ in range(12)]
    tasks += [asyncio.ensure_future(send("?deadline_ms=20")) for _ in range(3)]
    await asyncio.gather(*tasks)
    for _ in range(100):
        if engine.stats.inflight == 0:
            break
        await asyncio.sleep(0.02)
    text = (await client.get("/metrics")).text
    m = parse(text)
    d = {k: v - before[k] for k, v in server_account(m).items()}
    assert sum(log.values()) == 15
    assert set(log) <= {200, 429, 504}, log
    assert log[429] >= 1
    assert d["unsettled"] == 0
    assert d["accepted"] == d["succeeded"] + d["failed"] + d["cancelled"]
    assert d["succeeded"] == log[200]
    assert d["cancelled"] == 1
    # Every non-200 answer was counted as a rejection, and a 504 that had been accepted is also a failure.
    assert total(m, "mone_rejected_total", reason="overloaded") >= log[429]
    assert total(m, "mone_inflight_requests") == 0
    assert total(m, "mone_queue_depth") == 0
    s = engine.stats
    assert (s.accepted, s.succeeded, s.failed, s.cancelled) == (
        total(m, "mone_accepted_total"),
        total(m, "mone_succeeded_total"),
        total(m, "mone_failed_total"),
        total(m, "mone_cancelled_total"),
    )


async def test_rel_client_leaving_mid_upload_is_499_not_500(app: FastAPI) -> None:
    """The body stops half way because the client hung up: answered (and counted) 499, never 500."""
    sent: list[dict[str, Any]] = []
    messages = [
        {"type": "http.request", "body": BODY[:50], "more_body": True},
        {"type": "http.disconnect"},
    ]

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/classify",
        "raw_path": b"/v1/classify",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"image/png"), (b"content-length", str(len(BODY)).encode())],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
        "app": app,
    }
    before = parse(app.state.metrics.render().decode())
    await app(scope, receive, send)
    assert sent[0]["status"] == 499
    m = parse(app.state.metrics.render().decode())
    for code, grew in (("500", 0), ("499", 1)):
        assert (
            total(m, "mone_requests_total", code=code) - total(before, "mone_requests_total", code=code)
            == grew
        )
