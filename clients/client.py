"""Typed Python clients for mone-serve: `MoneClient` (sync) and `AsyncMoneClient`, over httpx.

    with MoneClient("http://127.0.0.1:8000") as client:
        result = client.classify("shirt.png", capacity=0.5, routing=True)
        print(result.label, result.gflops, result.timing.total_ms)

The native API is the default; `protocol="oip"` sends the same request as an Open Inference Protocol (KServe
v2) `infer` call.  429 and 503 answers are retried with exponential back-off, waiting at least what the
server's `Retry-After` asks, for at most `retries` extra attempts; other errors raise at once.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from clients.errors import MoneError, Timeout, TransportError, from_response, retry_after
from clients.media import Input, Kind, Payload, to_payload
from clients.schemas import (
    ClassifyResponse,
    InferResponse,
    ModelInfo,
    ModelList,
    Prediction,
    Protocol,
    Result,
    Timing,
)

DEFAULT_URL = "http://127.0.0.1:8000"
RETRY_STATUSES = frozenset({429, 503})


@dataclass(frozen=True)
class RetryPolicy:
    """`retries` extra attempts; the n-th waits `backoff * 2**n` (±10 %, at most `max_backoff`), or what
    the server's `Retry-After` asks if that is longer (beyond `max_retry_after` the client gives up)."""

    retries: int = 3
    backoff: float = 0.25
    max_backoff: float = 8.0
    max_retry_after: float = 60.0

    def delay(self, attempt: int, response: httpx.Response | None) -> float | None:
        """Seconds to wait before the next attempt, or None to stop."""
        if attempt >= self.retries:
            return None
        wait = min(self.max_backoff, self.backoff * 2.0**attempt) * random.uniform(0.9, 1.1)
        asked = retry_after(response) if response is not None else None
        if asked is not None:
            if asked > self.max_retry_after:
                return None
            wait = max(wait, asked)
        return wait


class _Base:
    """What both clients share: configuration, request building and response parsing (no I/O)."""

    def __init__(
        self,
        url: str | None = None,
        *,
        api_key: str | None = None,
        protocol: Protocol = "native",
        model: str | None = None,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
    ) -> None:
        if protocol not in ("native", "oip"):
            raise ValueError(f"protocol must be 'native' or 'oip', got {protocol!r}")
        self.url = (url or os.environ.get("MONE_URL") or DEFAULT_URL).rstrip("/")
        self.protocol: Protocol = protocol
        self.model_name = model
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        key = api_key if api_key is not None else os.environ.get("MONE_API_KEY")
        self.headers = {"authorization": f"Bearer {key}"} if key else {}
        self._labels: list[str] | None = None

    def _retry_wait(self, attempt: int, outcome: httpx.Response | Exception) -> float | None:
        """After one attempt: seconds to wait before the next, or None to hand the response back.

        Retried: 429 and 503 answers, and connections that could not be made (nothing was sent).  A failure
        after sending (a timeout, a reset) raises at once: the server may have done the work.
        """
        if isinstance(outcome, httpx.Response):
            if outcome.status_code not in RETRY_STATUSES:
                return None
            return self.retry.delay(attempt, outcome)
        if isinstance(outcome, httpx.TimeoutException) and not isinstance(outcome, httpx.ConnectTimeout):
            raise Timeout(f"no answer from {self.url} within {self.timeout:g} s") from outcome
        connect = isinstance(outcome, httpx.ConnectError | httpx.ConnectTimeout)
        wait = self.retry.delay(attempt, None) if connect else None
        if wait is None:
            raise TransportError(f"cannot reach {self.url}: {type(outcome).__name__}: {outcome}") from outcome
        return wait

    def _classify_request(self, payload: Payload, model: str, options: dict[str, Any]) -> httpx.Request:
        if self.protocol == "native":
            fields = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in options.items()}
            files = {"file": (payload.filename, payload.data, payload.content_type)}
            return httpx.Request(
                "POST", f"{self.url}/v1/classify", files=files, data=fields, headers=self.headers
            )
        if options.get("routing"):
            raise ValueError("routing maps come with the native API only (protocol='native')")
        body = {
            "inputs": [
                {
                    "name": "input",
                    "shape": [1],
                    "datatype": "BYTES",
                    "data": [base64.b64encode(payload.data).decode()],
                }
            ],
            "parameters": options,
        }
        return httpx.Request("POST", f"{self.url}/v2/models/{model}/infer", json=body, headers=self.headers)

    def _result(self, body: Any, top_k: int) -> Result:
        if self.protocol == "native":
            r = ClassifyResponse.model_validate(body)
            s = r.served
            return Result(
                model=r.model,
                protocol="native",
                top_k=r.top_k,
                capacity=s.capacity,
                realised_capacity=s.realised_capacity,
                gflops=s.gflops,
                dense_gflops=s.dense_gflops,
                deadline_met=s.deadline_met,
                timing=r.timing,
                routing=r.routing,
                native=r,
            )
        return _oip_result(InferResponse.model_validate(body), self._labels or [], top_k)


def _options(
    payload: Payload,
    capacity: float | None,
    gflops: float | None,
    latency_ms: float | None,
    deadline_ms: float | None,
    top_k: int | None,
    routing: bool,
    kind: Kind | None,
) -> dict[str, Any]:
    budgets = {"capacity": capacity, "gflops": gflops, "latency_ms": latency_ms}
    given = {k: v for k, v in budgets.items() if v is not None}
    if len(given) > 1:
        raise ValueError(f"give at most one budget, got {', '.join(given)}")
    options: dict[str, Any] = dict(given)
    if deadline_ms is not None:
        options["deadline_ms"] = deadline_ms
    if top_k is not None:
        options["top_k"] = top_k
    if routing:
        options["routing"] = True
    chosen = kind or payload.kind
    if chosen != "auto":
        options["kind"] = chosen
    return options


def _oip_result(r: InferResponse, labels: list[str], top_k: int) -> Result:
    p = r.parameters or {}
    logits = next((o.data for o in r.outputs if o.name == "logits"), [])
    peak = max(logits, default=0.0)
    exps = [math.exp(float(v) - peak) for v in logits]
    total = sum(exps) or 1.0
    order = sorted(range(len(exps)), key=lambda i: -exps[i])[:top_k]
    preds = [
        Prediction(label=labels[i] if i < len(labels) else str(i), index=i, prob=exps[i] / total)
        for i in order
    ]
    met = p.get("deadline_met")
    return Result(
        model=r.model_name,
        protocol="oip",
        top_k=preds,
        capacity=float(p.get("capacity", 0.0)),
        realised_capacity=float(p.get("realised_capacity", 0.0)),
        gflops=float(p.get("gflops", 0.0)),
        dense_gflops=float(p.get("dense_gflops", 0.0)),
        deadline_met=bool(met) if met is not None else None,
        timing=Timing(
            **{k: float(p.get(k, 0.0)) for k in ("decode_ms", "queue_ms", "compute_ms", "total_ms")}
        ),
    )


def _json(response: httpx.Response) -> Any:
    if response.status_code >= 400:
        raise from_response(response)
    return response.json()


class MoneClient(_Base):
    """Synchronous client.

    Args:
        url: server base URL (default: $MONE_URL, else http://127.0.0.1:8000).
        api_key: Bearer token (default: $MONE_API_KEY).
        protocol: "native" (/v1) or "oip" (Open Inference Protocol, /v2).
        model: model name for per-model routes (default: the first the server lists).
        timeout: seconds per HTTP attempt.
        retry: retry policy for 429/503 and refused connections.
    """

    def __init__(self, url: str | None = None, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self._http = httpx.Client(timeout=self.timeout)

    def __enter__(self) -> MoneClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, build: Callable[[], httpx.Request]) -> httpx.Response:
        for attempt in itertools.count():
            try:
                response: httpx.Response | Exception = self._http.send(build())
            except httpx.HTTPError as exc:
                response = exc
            wait = self._retry_wait(attempt, response)
            if wait is None:
                assert isinstance(response, httpx.Response)
                return response
            time.sleep(wait)
        raise AssertionError("unreachable")

    def _get(self, path: str) -> Any:
        return _json(self._send(lambda: httpx.Request("GET", self.url + path, headers=self.headers)))

    def health(self) -> bool:
        """Liveness (`/healthz`)."""
        return bool(self._get("/healthz").get("status") == "ok")

    def ready(self) -> bool:
        """Readiness (`/readyz`): False while the model loads or the server drains (no retries)."""
        try:
            response = self._http.get(self.url + "/readyz", headers=self.headers)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    def models(self) -> list[ModelInfo]:
        """Metadata of every served model (config, labels, input spec, capacity profile)."""
        return ModelList.model_validate(self._get("/v1/models")).models

    def model(self, name: str | None = None) -> ModelInfo:
        """One model's metadata (`/v1/models/{name}`)."""
        return ModelInfo.model_validate(self._get(f"/v1/models/{name or self._model_name()}"))

    def _model_name(self) -> str:
        if self.model_name is None:
            self.model_name = self.models()[0].name
        return self.model_name

    def classify(
        self,
        file: Input,
        *,
        capacity: float | None = None,
        gflops: float | None = None,
        latency_ms: float | None = None,
        deadline_ms: float | None = None,
        top_k: int | None = None,
        routing: bool = False,
        kind: Kind | None = None,
    ) -> Result:
        """Classify an image or clip under at most one budget (capacity, GFLOPs or latency)."""
        payload = to_payload(file)
        options = _options(payload, capacity, gflops, latency_ms, deadline_ms, top_k, routing, kind)
        model = ""
        if self.protocol == "oip":
            model = self._model_name()
            if self._labels is None:
                self._labels = self.model(model).labels
        response = self._send(lambda: self._classify_request(payload, model, options))
        return self._result(_json(response), top_k or 5)


class AsyncMoneClient(_Base):
    """Asynchronous client; the same arguments and methods as `MoneClient`, awaited."""

    def __init__(self, url: str | None = None, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self._http = httpx.AsyncClient(timeout=self.timeout)

    async def __aenter__(self) -> AsyncMoneClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def _send(self, build: Callable[[], httpx.Request]) -> httpx.Response:
        for attempt in itertools.count():
            try:
                response: httpx.Response | Exception = await self._http.send(build())
            except httpx.HTTPError as exc:
                response = exc
            wait = self._retry_wait(attempt, response)
            if wait is None:
                assert isinstance(response, httpx.Response)
                return response
            await asyncio.sleep(wait)
        raise AssertionError("unreachable")

    async def _get(self, path: str) -> Any:
        return _json(await self._send(lambda: httpx.Request("GET", self.url + path, headers=self.headers)))

    async def health(self) -> bool:
        return bool((await self._get("/healthz")).get("status") == "ok")

    async def ready(self) -> bool:
        try:
            response = await self._http.get(self.url + "/readyz", headers=self.headers)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def models(self) -> list[ModelInfo]:
        return ModelList.model_validate(await self._get("/v1/models")).models

    async def model(self, name: str | None = None) -> ModelInfo:
        return ModelInfo.model_validate(await self._get(f"/v1/models/{name or await self._model_name()}"))

    async def _model_name(self) -> str:
        if self.model_name is None:
            self.model_name = (await self.models())[0].name
        return self.model_name

    async def classify(
        self,
        file: Input,
        *,
        capacity: float | None = None,
        gflops: float | None = None,
        latency_ms: float | None = None,
        deadline_ms: float | None = None,
        top_k: int | None = None,
        routing: bool = False,
        kind: Kind | None = None,
    ) -> Result:
        payload = to_payload(file)
        options = _options(payload, capacity, gflops, latency_ms, deadline_ms, top_k, routing, kind)
        model = ""
        if self.protocol == "oip":
            model = await self._model_name()
            if self._labels is None:
                self._labels = (await self.model(model)).labels
        response = await self._send(lambda: self._classify_request(payload, model, options))
        return self._result(_json(response), top_k or 5)


__all__ = ["AsyncMoneClient", "MoneError", "MoneClient", "Result", "RetryPolicy"]
