"""What both clients share, without I/O: configuration, the retry policy and decision, building the native and
Open Inference Protocol requests, and reading their answers into a `Result`."""

from __future__ import annotations

import base64
import math
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from mone.clients.errors import Timeout, TransportError, from_response, retry_after
from mone.clients.media import Kind, Payload
from mone.clients.schemas import (
    BudgetKindInfo,
    ClassifyResponse,
    InferResponse,
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


class BaseClient:
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
        self._budget_kinds: list[BudgetKindInfo] | None = None

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
        return oip_result(InferResponse.model_validate(body), self._labels or [], top_k)


def budget_option(named: Mapping[str, float | None], budget: Mapping[str, float] | None) -> dict[str, float]:
    """The (at most one) budget of a request, from the keyword arguments (`named`, None where not given) and
    the generic `budget={kind: value}`."""
    given = {k: v for k, v in named.items() if v is not None}
    names = [*given, *(budget or {})]
    if len(names) > 1:
        raise ValueError(f"give at most one budget, got {', '.join(names)}")
    return {**given, **(budget or {})}


def check_budget_kinds(budget: Mapping[str, float], kinds: list[BudgetKindInfo]) -> None:
    """ValueError unless every kind in `budget` is one the server lists."""
    names = [k.name for k in kinds]
    for name in budget:
        if name not in names:
            raise ValueError(f"unknown budget kind {name!r}: the server takes {', '.join(names)}")


def classify_options(
    payload: Payload,
    budget: Mapping[str, float],
    deadline_ms: float | None,
    top_k: int | None,
    routing: bool,
    kind: Kind | None,
) -> dict[str, Any]:
    """The form fields (native) or `parameters` (OIP) of one classify request; `budget` from
    `budget_option`."""
    options: dict[str, Any] = dict(budget)
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


def oip_result(r: InferResponse, labels: list[str], top_k: int) -> Result:
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


def read_json(response: httpx.Response) -> Any:
    if response.status_code >= 400:
        raise from_response(response)
    return response.json()
