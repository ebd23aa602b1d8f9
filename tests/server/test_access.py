"""X-Request-ID on every answer and error, and the access log's one JSON line per request."""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

import mone.server.http.routes
from mone.server.http.access import AccessRecord, usable_id
from tests.support.media import fashion_images, png

pytestmark = pytest.mark.anyio


@pytest.fixture
def access_lines() -> Iterator[list[logging.LogRecord]]:
    """What the `mone.access` logger writes while the test runs."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    logger = logging.getLogger("mone.access")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def lines_for(records: list[logging.LogRecord], request_id: str) -> list[dict[str, Any]]:
    entries = [json.loads(r.getMessage()) for r in records]
    return [e for e in entries if e["id"] == request_id]


def test_usable_ids_are_kept_and_others_replaced() -> None:
    assert usable_id(b"abc-123_X") == "abc-123_X"
    made = {usable_id(None), usable_id(b""), usable_id(b"has space"), usable_id(b"x" * 129), usable_id("é")}
    assert len(made) == 5
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in made)


async def test_classify_line_has_the_account(client: httpx.AsyncClient, access_lines: list[Any]) -> None:
    r = await client.post(
        "/v1/classify?capacity=0.5", content=png(fashion_images(1)[0]), headers={"x-request-id": "req-1"}
    )
    assert r.status_code == 200, r.text
    assert r.headers["x-request-id"] == "req-1"
    (line,) = lines_for(access_lines, "req-1")
    served = r.json()["served"]
    assert line["method"] == "POST"
    assert line["path"] == "/v1/classify"
    assert line["status"] == 200
    assert line["kind"] == "image"
    assert line["samples"] == 1
    assert (line["budget"], line["budget_value"]) == ("capacity", 0.5)
    assert line["capacity"] == served["capacity"]
    assert line["gflops"] == pytest.approx(served["gflops"], rel=1e-5)
    for key in ("decode_ms", "queue_ms", "compute_ms"):
        assert line[key] == pytest.approx(r.json()["timing"][key], abs=1e-3)
    assert line["ms"] >= line["compute_ms"]
    assert "error" not in line


async def test_a_made_id_is_returned_and_logged(client: httpx.AsyncClient, access_lines: list[Any]) -> None:
    r = await client.get("/healthz")
    made = r.headers["x-request-id"]
    assert len(made) == 32
    (line,) = lines_for(access_lines, made)
    assert (line["path"], line["status"]) == ("/healthz", 200)
    assert "kind" not in line
    again = await client.get("/healthz")
    assert again.headers["x-request-id"] != made


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "code"),
    [
        ("post", "/v1/classify", {"content": b"not an image"}, 415, "unsupported_media_type"),
        ("post", "/v1/classify?capacity=2", {"content": b"x"}, 422, "invalid_budget"),
        ("get", "/v2/models/nope", {}, 404, "not_found"),
        ("get", "/no/such/route", {}, 404, "not_found"),
        ("post", "/v2/models/mone/infer", {"content": b"{"}, 422, "validation_error"),
    ],
)
async def test_errors_carry_the_id(
    client: httpx.AsyncClient,
    access_lines: list[Any],
    method: str,
    path: str,
    kwargs: dict[str, Any],
    status: int,
    code: str,
) -> None:
    r = await getattr(client, method)(path, headers={"X-Request-ID": "err-1"}, **kwargs)
    assert r.status_code == status, r.text
    assert r.headers["x-request-id"] == "err-1"
    (line,) = lines_for(access_lines, "err-1")
    assert (line["status"], line["error"]) == (status, code)


async def test_an_unhandled_error_is_a_500_with_the_id(
    client: httpx.AsyncClient, access_lines: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(mone.server.http.routes, "build_response", broken)
    r = await client.post("/v1/classify", content=png(fashion_images(1)[0]), headers={"x-request-id": "e500"})
    assert r.status_code == 500
    assert r.headers["x-request-id"] == "e500"
    assert r.json()["error"]["code"] == "internal"
    assert "RuntimeError" in r.json()["error"]["message"]
    (line,) = lines_for(access_lines, "e500")
    assert (line["status"], line["error"], line["budget"]) == (500, "internal", "default")


async def test_oip_line_counts_samples(client: httpx.AsyncClient, access_lines: list[Any]) -> None:
    data = [base64.b64encode(png(a)).decode() for a in fashion_images(2)]
    body = {
        "inputs": [{"name": "input", "shape": [2], "datatype": "BYTES", "data": data}],
        "parameters": {"gflops": 0.05},
    }
    r = await client.post("/v2/models/mone/infer", json=body, headers={"x-request-id": "oip-2"})
    assert r.status_code == 200, r.text
    assert r.headers["x-request-id"] == "oip-2"
    (line,) = lines_for(access_lines, "oip-2")
    assert (line["kind"], line["samples"], line["budget"]) == ("image", 2, "gflops")
    assert line["gflops"] == pytest.approx(r.json()["parameters"]["gflops"], rel=1e-5)


def test_a_line_is_one_json_object() -> None:
    record = AccessRecord('quote"and\\slash')
    line = record.line("GET", '/a"b\n', 200, 1.5)
    assert "\n" not in line
    assert json.loads(line)["path"] == '/a"b\n'
