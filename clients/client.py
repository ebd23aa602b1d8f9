"""Typed Python clients for mone-serve: `MoneClient` (sync) and `AsyncMoneClient`, over httpx.

    with MoneClient("http://127.0.0.1:8000") as client:
        result = client.classify("shirt.png", capacity=0.5, routing=True)
        print(result.label, result.gflops, result.timing.total_ms)
        client.classify("shirt.png", budget={"latency_ms": 50})  # any kind in client.budget_kinds()

The native API is the default; `protocol="oip"` sends the same request as an Open Inference Protocol (KServe
v2) `infer` call.  429 and 503 answers are retried with exponential back-off, waiting at least what the
server's `Retry-After` asks, for at most `retries` extra attempts; other errors raise at once.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Mapping
from typing import Any

import httpx

from mone.clients.core import (
    DEFAULT_URL,
    BaseClient,
    RetryPolicy,
    budget_option,
    check_budget_kinds,
    classify_options,
    read_json,
)
from mone.clients.errors import MoneError
from mone.clients.media import Input, Kind, to_payload
from mone.clients.schemas import BudgetKindInfo, ModelInfo, ModelList, Result, budget_kinds


class MoneClient(BaseClient):
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
        return read_json(self._send(lambda: httpx.Request("GET", self.url + path, headers=self.headers)))

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

    def budget_kinds(self) -> list[BudgetKindInfo]:
        """The budget kinds the server takes (`/v1/models` `budgets.kinds`; asked once)."""
        if self._budget_kinds is None:
            self._budget_kinds = budget_kinds(self.model())
        return self._budget_kinds

    def classify(
        self,
        file: Input,
        *,
        capacity: float | None = None,
        gflops: float | None = None,
        latency_ms: float | None = None,
        budget: Mapping[str, float] | None = None,
        deadline_ms: float | None = None,
        top_k: int | None = None,
        routing: bool = False,
        kind: Kind | None = None,
    ) -> Result:
        """Classify an image or clip under at most one budget: capacity, GFLOPs or latency by keyword, or
        any kind the server lists as `budget={kind: value}` (checked against `budget_kinds()`)."""
        payload = to_payload(file)
        given = budget_option({"capacity": capacity, "gflops": gflops, "latency_ms": latency_ms}, budget)
        if budget:
            check_budget_kinds(budget, self.budget_kinds())
        options = classify_options(payload, given, deadline_ms, top_k, routing, kind)
        model = ""
        if self.protocol == "oip":
            model = self._model_name()
            if self._labels is None:
                self._labels = self.model(model).labels
        response = self._send(lambda: self._classify_request(payload, model, options))
        return self._result(read_json(response), top_k or 5)


class AsyncMoneClient(BaseClient):
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
        return read_json(
            await self._send(lambda: httpx.Request("GET", self.url + path, headers=self.headers))
        )

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

    async def budget_kinds(self) -> list[BudgetKindInfo]:
        if self._budget_kinds is None:
            self._budget_kinds = budget_kinds(await self.model())
        return self._budget_kinds

    async def classify(
        self,
        file: Input,
        *,
        capacity: float | None = None,
        gflops: float | None = None,
        latency_ms: float | None = None,
        budget: Mapping[str, float] | None = None,
        deadline_ms: float | None = None,
        top_k: int | None = None,
        routing: bool = False,
        kind: Kind | None = None,
    ) -> Result:
        payload = to_payload(file)
        given = budget_option({"capacity": capacity, "gflops": gflops, "latency_ms": latency_ms}, budget)
        if budget:
            check_budget_kinds(budget, await self.budget_kinds())
        options = classify_options(payload, given, deadline_ms, top_k, routing, kind)
        model = ""
        if self.protocol == "oip":
            model = await self._model_name()
            if self._labels is None:
                self._labels = (await self.model(model)).labels
        response = await self._send(lambda: self._classify_request(payload, model, options))
        return self._result(read_json(response), top_k or 5)


__all__ = ["DEFAULT_URL", "AsyncMoneClient", "MoneClient", "MoneError", "Result", "RetryPolicy"]
