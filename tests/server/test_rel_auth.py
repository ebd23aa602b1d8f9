"""Authentication and CORS (docs/reliability.md rows 25-26): every inference and model route, taken from the
OpenAPI schema, answers 401 + WWW-Authenticate without the key, also where it would otherwise answer 413,
429 or 503; the key is compared in constant time; /metrics is not public; CORS is off."""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from mone.server.config import Settings
from mone.server.http import auth
from mone.server.http.app import create_app
from tests.support.media import fashion_images, png
from tests.support.models import fast_settings

pytestmark = pytest.mark.anyio
KEY = "rel-test-key-0123456789"
AUTH = {"authorization": f"Bearer {KEY}"}
WRONG: list[dict[str, str]] = [
    {},
    {"authorization": ""},
    {"authorization": "Bearer"},
    {"authorization": "Bearer wrong-key-0123456789"},
    {"authorization": f"Basic {KEY}"},
    {"authorization": f"Bearer {KEY[:-1]}"},
    {"authorization": f"Bearer {KEY}x"},
]
PROTECTED_PREFIXES = ("/v1/", "/v2/models")
HIDDEN = [("GET", "/v2/models/mone/versions/1"), ("GET", "/v2/models/mone/versions/1/ready")]
HIDDEN += [("POST", "/v2/models/mone/versions/1/infer")]


def schema_routes() -> list[tuple[str, str]]:
    """Every (method, path) of the OpenAPI schema, path parameters filled in, plus the hidden aliases."""
    schema = create_app(Settings(random_init=True, api_key=KEY)).openapi()
    out = []
    for path, ops in schema["paths"].items():
        concrete = path.replace("{name}", "mone").replace("{version}", "1")
        out += [(method.upper(), concrete) for method in ops]
    return sorted(out) + HIDDEN


ROUTES = schema_routes()
PROTECTED = [r for r in ROUTES if r[1].startswith(PROTECTED_PREFIXES)]
OPEN = [r for r in ROUTES if not r[1].startswith(PROTECTED_PREFIXES) and r[1] != "/metrics"]


@pytest.fixture(scope="module")
async def app(checkpoint_dir: Path) -> AsyncIterator[FastAPI]:
    settings = fast_settings(
        checkpoint_dir, calibrate=False, api_key=KEY, max_body_bytes=4000, max_image_bytes=3000
    )
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture(scope="module")
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        yield c


def test_rel_schema_has_the_routes_we_expect() -> None:
    paths = {p for _, p in ROUTES}
    assert {"/v1/classify", "/v1/models", "/v2/models/mone/infer", "/healthz", "/metrics"} <= paths
    assert len(PROTECTED) >= 7


def _assert_401(r: httpx.Response) -> None:
    assert r.status_code == 401, (r.request.url, r.status_code, r.text[:200])
    assert r.headers["www-authenticate"].startswith("Bearer")
    body = r.json()
    code = body["code"] if r.request.url.path.startswith("/v2") else body["error"]["code"]
    assert code == "unauthorized"
    assert KEY not in r.text


@pytest.mark.parametrize(("method", "path"), PROTECTED)
async def test_rel_protected_route_needs_the_key(client: httpx.AsyncClient, method: str, path: str) -> None:
    for headers in WRONG:
        _assert_401(await client.request(method, path, headers=headers, content=b"{}"))
    r = await client.request(method, path, headers=AUTH, content=png(fashion_images(1)[0]))
    assert r.status_code != 401


@pytest.mark.parametrize(("method", "path"), OPEN)
async def test_rel_probe_routes_stay_open(client: httpx.AsyncClient, method: str, path: str) -> None:
    r = await client.request(method, path)
    assert r.status_code in (200, 503), (path, r.status_code)


@pytest.mark.parametrize("path", ["/v1/classify", "/v2/models/mone/infer"])
async def test_rel_401_comes_before_413(client: httpx.AsyncClient, path: str) -> None:
    big = b"\0" * 10_000
    _assert_401(await client.post(path, content=big, headers={"content-type": "image/png"}))

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"\0" * 1000

    _assert_401(await client.post(path, content=chunks()))
    r = await client.post(path, content=big, headers={**AUTH, "content-type": "image/png"})
    assert r.status_code == 413


async def test_rel_401_comes_before_503_and_429(app: FastAPI, client: httpx.AsyncClient) -> None:
    engine = app.state.engine
    data = png(fashion_images(1)[0])
    engine.ready = False
    try:
        _assert_401(await client.post("/v1/classify", content=data))
        _assert_401(await client.post("/v2/models/mone/infer", content=b"{}"))
        r = await client.post("/v1/classify", content=data, headers=AUTH)
        assert r.status_code == 503
    finally:
        engine.ready = True
    full = engine._batcher.full
    engine._batcher.full = lambda: True
    try:
        _assert_401(await client.post("/v1/classify", content=data))
        assert (await client.post("/v1/classify", content=data, headers=AUTH)).status_code == 429
    finally:
        engine._batcher.full = full


async def test_rel_metrics_is_not_public(client: httpx.AsyncClient) -> None:
    _assert_401(await client.get("/metrics"))
    r = await client.get("/metrics", headers=AUTH)
    assert r.status_code == 200
    assert 'mone_rejected_total{reason="unauthorized"}' in r.text


async def test_rel_metrics_can_be_made_public(checkpoint_dir: Path) -> None:
    application = create_app(fast_settings(checkpoint_dir, api_key=KEY, metrics_public=True))
    transport = httpx.ASGITransport(app=application)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        assert (await c.get("/metrics")).status_code == 200  # no lifespan needed to render
        assert (await c.get("/v1/models")).status_code == 401


async def test_rel_key_is_compared_in_constant_time(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[Any, Any]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    await client.get("/v1/models", headers={"authorization": "Bearer nope-nope-nope"})
    await client.get("/v1/models", headers=AUTH)
    assert len(calls) >= 2
    assert all(b == KEY.encode() for _, b in calls)


@pytest.mark.parametrize("origin", ["https://evil.example", "null", "http://127.0.0.1:9999"])
async def test_rel_no_cors_for_an_unknown_origin(client: httpx.AsyncClient, origin: str) -> None:
    preflight = {
        "origin": origin,
        "access-control-request-method": "POST",
        "access-control-request-headers": "authorization",
    }
    r = await client.options("/v1/classify", headers=preflight)
    assert "access-control-allow-origin" not in r.headers
    assert r.status_code != 200
    for method, path in [("GET", "/healthz"), ("GET", "/v1/models"), ("GET", "/metrics")]:
        r = await client.request(method, path, headers={"origin": origin, **AUTH})
        assert "access-control-allow-origin" not in r.headers
        assert "access-control-allow-credentials" not in r.headers


@pytest.mark.parametrize(
    "path", ["/v1/models/", "//v1/models", "/v1//models", "/V1/models", "/%76%31/models", "/v1/./models"]
)
async def test_rel_path_tricks_do_not_bypass_the_key(client: httpx.AsyncClient, path: str) -> None:
    r = await client.get(path)
    assert r.status_code in (401, 404, 405), (path, r.status_code)
    assert "labels" not in r.text
