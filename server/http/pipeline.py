"""The one request pipeline: the stages every inference request goes through, whatever its wire format.

The native route (server/http/routes.py) and the Open Inference Protocol's REST (server/http/oip.py) and gRPC
(server/http/grpc_api.py) handlers are adapters: each reads its wire format into `Sample`s and hands them
to `Pipeline.classify`, which

1. refuses at once when the engine could not admit another request (429 / 503: no decoding paid for it),
2. decodes the encoded payloads within the server's budget of pixels in decoding (`BudgetedDecoder`,
   server/media/decode_budget.py), while a forming batch waits for them (`Engine.coming`),
3. turns every sample into an `InferRequest` (server/core/request.py): the decoded input, its kind as
   decoding found it, the budget and the options,
4. submits them to the engine and awaits their `InferResult`s under the adapter's `guard` (the HTTP routes
   cancel the work when the client disconnects), and
5. writes the account to the request's access record;

the adapter turns the results into its wire format.  Failures are `ServeError`s, which each transport maps
to its own answer (server/http/app.py for HTTP, server/http/grpc_api.py for gRPC).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from torch import Tensor

from mone.server.config import Settings
from mone.server.core.budget import Budget
from mone.server.core.engine import Engine, InferResult
from mone.server.core.request import InferRequest
from mone.server.errors import InvalidParamsError
from mone.server.http.access import AccessRecord
from mone.server.media.decode_budget import BudgetedDecoder
from mone.server.media.kinds import INPUT_KINDS
from mone.server.media.video import ClipDecoder


@dataclass(frozen=True)
class Options:
    """What a request asks of one sample besides its input."""

    budget: Budget
    top_k: int
    routing: bool = False
    deadline_ms: float | None = None


@dataclass(frozen=True, eq=False)
class Sample:
    """One sample as its adapter read it off the wire, before decoding.

    Args:
        data: the encoded image or clip, or its pixels already decoded, (T, C, H, W).
        kind: for encoded data the kind asked for (auto, image or clip); for pixels what they are (image or
            clip).
        options: the sample's options, or how to parse them: a parser runs after every sample of the request
            is decoded (so that a request's undecodable input is reported before its bad parameters).
    """

    data: bytes | Tensor
    kind: str
    options: Options | Callable[[], Options]


@dataclass
class Served:
    """The results of a request's samples, in order, with the request's decoding time."""

    results: list[InferResult]
    decode_ms: float


Guard = Callable[[Awaitable[list[InferResult]]], Awaitable[list[InferResult]]]


async def _unguarded(work: Awaitable[list[InferResult]]) -> list[InferResult]:
    return await work


class Pipeline:
    """Admission, decoding, submission and the account of every inference request.

    Args:
        engine: the engine the requests go to (only its public face is used).
        settings: the server's settings (decode limits and the pixel budget).
        clips: the pool of clip decode workers; None decodes clips in a thread of this process.
    """

    def __init__(self, engine: Engine, settings: Settings, clips: ClipDecoder | None = None) -> None:
        self.engine = engine
        self.decoder = BudgetedDecoder(engine.cfg, settings, clips)

    def admit(self) -> None:
        """Raise 429/503 now when the engine could not admit a request, so that an adapter can refuse one
        before parsing its body."""
        self.engine.shed_if_full()

    async def classify(
        self,
        samples: Sequence[Sample],
        *,
        arrival: float,
        record: AccessRecord | None = None,
        guard: Guard = _unguarded,
    ) -> Served:
        """Serve a request's samples (see the module's stages) and return their results in order.

        `arrival` is when the request arrived (time.monotonic()); `record` gets the account for the access
        log; `guard` wraps the wait for the results."""
        if record is not None and samples and isinstance(samples[0].options, Options):
            record.ask(samples[0].options.budget)
        self.admit()  # an overloaded server refuses before decoding
        with self.engine.coming():
            decoded = [await self._decode(sample) for sample in samples]
        if not decoded:
            raise InvalidParamsError("the request holds no samples (an empty batch)")
        decode_ms = (time.monotonic() - arrival) * 1e3
        request_id = record.id if record is not None else None
        requests = []
        for (x, kind), sample in zip(decoded, samples, strict=True):
            o = sample.options if isinstance(sample.options, Options) else sample.options()
            requests.append(
                InferRequest(
                    x,
                    kind,
                    o.budget,
                    top_k=o.top_k,
                    routing=o.routing,
                    deadline_ms=o.deadline_ms,
                    arrival=arrival,
                    id=request_id,
                )
            )
        if record is not None:
            record.ask(requests[0].budget)
        if len(requests) == 1:  # the common case, without gather's future and task
            results = await guard(self._one(requests[0]))
        else:
            results = await guard(asyncio.gather(*(self.engine.classify(r) for r in requests)))
        if record is not None:
            record.serve(results, decode_ms, arrival)
        return Served(results, decode_ms)

    async def _one(self, request: InferRequest) -> list[InferResult]:
        return [await self.engine.classify(request)]

    async def _decode(self, sample: Sample) -> tuple[Tensor, str]:
        if isinstance(sample.data, Tensor):
            if sample.kind not in INPUT_KINDS:
                raise ValueError(f"decoded pixels are one of {', '.join(INPUT_KINDS)}, not {sample.kind!r}")
            return sample.data, sample.kind
        decoded = await self.decoder.decode(sample.data, sample.kind)
        return decoded.tensor, decoded.kind
