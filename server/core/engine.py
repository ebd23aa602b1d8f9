"""The engine: admission, budget planning, the batch loop and the accounting of every accepted request.

It knows nothing about HTTP.  Callers hand it an `InferRequest` (server/core/request.py: a decoded
(T, C, H, W) input, its kind, a `Budget` and the request's options) and await an `InferResult`
(`Engine.classify`); failures are `ServeError`s.  What the HTTP layer may use is the engine's public face:
`classify`, `shed_if_full`, `coming`, `ready`, `stuck`, `queue_depth`, `cfg`, `labels`, `describe` and
`profile`; the runner, planner, latency model and batcher are its own.  Inference runs on a single worker
thread so that the event loop (health, metrics, admission) stays responsive while the model computes.

Accounting: every accepted request ends exactly once as succeeded, failed or cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

from mone.model import MoNEConfig
from mone.server.config import Settings
from mone.server.core.batcher import Batcher, WorkItem
from mone.server.core.budget import Budget, Level, Planner
from mone.server.core.latency import LatencyModel
from mone.server.core.memory import release_free_memory
from mone.server.core.priority import lower_thread_priority
from mone.server.core.request import InferRequest
from mone.server.core.runner import Runner, SampleOutput, warm_up_and_calibrate
from mone.server.core.scheduling import BatchPlanner
from mone.server.errors import (
    DeadlineExceededError,
    InternalError,
    NotReadyError,
    OverLimitError,
    OverloadedError,
    ServeError,
)
from mone.server.media.kinds import INPUT_KINDS

log = logging.getLogger("mone.engine")
ANSWER_SLICE = 4  # results handed to their requests per event-loop iteration (see `Engine._answer`)


class EngineEvents(Protocol):
    """Lifecycle hooks (metrics implement them)."""

    def batch_done(self, size: int, seconds: float) -> None: ...
    def request_done(self, result: InferResult) -> None: ...
    def cancelled(self) -> None: ...
    def load(self, queue_depth: int, inflight: int) -> None: ...
    def accepted(self) -> None: ...
    def settled(self, outcome: str, reason: str) -> None: ...


class NullEvents:
    def batch_done(self, size: int, seconds: float) -> None:
        pass

    def request_done(self, result: InferResult) -> None:
        pass

    def cancelled(self) -> None:
        pass

    def load(self, queue_depth: int, inflight: int) -> None:
        pass

    def accepted(self) -> None:
        pass

    def settled(self, outcome: str, reason: str) -> None:
        pass


class SafeEvents:
    """Hooks that can never break serving: an exception in a hook is logged and swallowed."""

    def __init__(self, events: EngineEvents) -> None:
        self._events = events

    def _call(self, name: str, *args: object) -> None:
        try:
            getattr(self._events, name)(*args)
        except Exception:
            log.exception("engine event %s failed", name)

    def batch_done(self, size: int, seconds: float) -> None:
        self._call("batch_done", size, seconds)

    def request_done(self, result: InferResult) -> None:
        self._call("request_done", result)

    def cancelled(self) -> None:
        self._call("cancelled")

    def load(self, queue_depth: int, inflight: int) -> None:
        self._call("load", queue_depth, inflight)

    def accepted(self) -> None:
        self._call("accepted")

    def settled(self, outcome: str, reason: str) -> None:
        self._call("settled", outcome, reason)


def fit_settings(settings: Settings, cfg: MoNEConfig) -> Settings:
    """The settings for this model: capacities below its lowest one (1/2**(E-1) for E experts) raised to it
    for calibration and degrading; a default capacity below it is refused, naming both."""
    lo = cfg.min_capacity
    if settings.default_capacity < lo - 1e-9:
        raise ValueError(
            f"default_capacity {settings.default_capacity:g} is below the model's lowest capacity {lo:g} "
            f"({cfg.num_experts} experts)"
        )
    calibration = sorted({max(c, lo) for c in settings.calibration_capacities})
    degrade_floor = max(settings.degrade_floor, lo)
    if calibration == settings.calibration_capacities and degrade_floor == settings.degrade_floor:
        return settings
    return settings.model_copy(update={"calibration_capacities": calibration, "degrade_floor": degrade_floor})


@dataclass
class InferResult:
    """One served sample and its account."""

    request: InferRequest
    output: SampleOutput
    level: Level
    dense_gflops: float
    queue_ms: float
    compute_ms: float
    batch_size: int
    degraded: bool
    planned_ms: float | None
    deadline_met: bool | None
    # When it was queued, taken into a batch, and when that batch's forward started and ended (monotonic):
    # what tracing draws its spans from.
    enqueued: float = 0.0
    dequeued: float = 0.0
    forward: tuple[float, float] = (0.0, 0.0)

    @property
    def budget(self) -> Budget:
        """The budget asked for."""
        return self.request.budget

    @property
    def kind(self) -> str:
        """What the input was, as decoding found it."""
        return self.request.kind

    @property
    def frames(self) -> int:
        return self.request.frames


@dataclass(frozen=True)
class KindCost:
    """What one sample of an input kind costs at a capacity."""

    gflops: float
    latency_ms_batch1: float
    latency_ms_max_batch: float


@dataclass(frozen=True)
class ProfilePoint:
    """One capacity of the model's profile: its token split and its cost per input kind."""

    capacity: float
    realised: float
    distribution: tuple[float, ...]
    counts: tuple[int, ...]
    costs: dict[str, KindCost]


@dataclass(frozen=True)
class ModelDescription:
    """What the engine serves and how: the model metadata routes show."""

    cfg: MoNEConfig
    device: str
    ready: bool
    labels: list[str]
    default_capacity: float
    floor_gflops: dict[str, float]  # per input kind
    dense_gflops: dict[str, float]
    latency_model: dict[str, Any]
    evaluation: dict[str, Any] | None  # the checkpoint's accuracy profile
    batching: dict[str, Any]
    checkpoint: dict[str, Any]


@dataclass
class Stats:
    accepted: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0

    @property
    def inflight(self) -> int:
        return self.accepted - self.succeeded - self.failed - self.cancelled


class Engine:
    """Model + dynamic batcher + planner.

    Args:
        runner: the loaded model.
        settings: batching, overload and calibration settings.
        events: lifecycle hooks.
    """

    def __init__(self, runner: Runner, settings: Settings, events: EngineEvents | None = None) -> None:
        self.runner = runner
        self.cfg = runner.cfg
        self.settings = fit_settings(settings, runner.cfg)
        self.events: EngineEvents = SafeEvents(events or NullEvents())
        self.planner = Planner(self.cfg)
        self.latency = LatencyModel()
        self.scheduler = BatchPlanner(self.planner, self.latency, self.settings)
        self.stats = Stats()
        self.ready = False
        self._batcher: Batcher | None = None
        # The worker thread lowers its own priority before its first torch op, so that the intra-op threads
        # torch starts from it inherit the lower priority too (server/core/priority.py).
        self._executor = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="mone-infer",
            initializer=lower_thread_priority,
            initargs=(settings.inference_nice,),
        )
        self._task: asyncio.Task[None] | None = None
        self._answering: set[asyncio.Task[None]] = set()
        # The batch on the inference thread: when it started and its predicted seconds (liveness, `stuck`).
        self._batch_started: float | None = None
        self._batch_predicted_s = 0.0
        self._stuck_logged = False

    @property
    def kinds(self) -> dict[str, int]:
        """Input kinds and their frames per sample (`INPUT_KINDS`)."""
        return {kind.name: kind.frames(self.cfg) for kind in INPUT_KINDS.values()}

    @property
    def queue_depth(self) -> int:
        """Requests queued, not yet taken into a batch."""
        return len(self._batcher) if self._batcher else 0

    @property
    def labels(self) -> list[str]:
        """The class labels, by class index."""
        labels: list[str] = self.runner.checkpoint.labels
        return labels

    def describe(self) -> ModelDescription:
        """The model, its budgets, latency model, batching and checkpoint, for metadata routes."""
        cfg, s, ck = self.cfg, self.settings, self.runner.checkpoint
        return ModelDescription(
            cfg=cfg,
            device=str(self.runner.device),
            ready=self.ready,
            labels=ck.labels,
            default_capacity=s.default_capacity,
            floor_gflops={k: self.planner.floor(f).gflops for k, f in self.kinds.items()},
            dense_gflops={k: self.planner.dense_gflops(f) for k, f in self.kinds.items()},
            latency_model=self.latency.to_dict(),
            evaluation=ck.profile,
            batching={
                "max_batch_size": s.max_batch_size,
                "max_batch_wait_ms": s.max_batch_wait_ms,
                "max_queue_size": s.max_queue_size,
                "overload_policy": s.overload_policy,
                "workers": max(1, s.workers),  # each with this batching, queue and model
            },
            checkpoint=self.runner.describe(),
        )

    def profile(self, capacities: Iterable[float]) -> list[ProfilePoint]:
        """Per capacity: its token split, and per input kind its GFLOPs and the predicted latency of a batch
        of one and of a full batch."""
        b = self.settings.max_batch_size
        points = []
        for c in capacities:
            costs: dict[str, KindCost] = {}
            level: Level | None = None
            for kind, frames in self.kinds.items():
                level = self.planner.level_of(c, frames)
                costs[kind] = KindCost(
                    gflops=level.gflops,
                    latency_ms_batch1=self.latency.predict(frames, 1, level.gflops) * 1e3,
                    latency_ms_max_batch=self.latency.predict(frames, 1, b * level.gflops) * 1e3,
                )
            assert level is not None
            points.append(ProfilePoint(c, level.realised, self.planner.distribution(c), level.counts, costs))
        return points

    # -- lifecycle -----------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Warm up, calibrate the latency model, start the batch loop; then report ready."""
        s = self.settings
        self._batcher = Batcher(s.max_batch_size, s.max_batch_wait_ms, s.max_queue_size, s.batch_wait)
        calibrate = partial(
            warm_up_and_calibrate, self.runner, self.latency, s, sorted(set(self.kinds.values()))
        )
        await asyncio.get_running_loop().run_in_executor(self._executor, calibrate)
        self.runner.serving = True
        self._task = asyncio.create_task(self._loop(), name="mone-batch-loop")
        self.ready = True

    async def stop(self, drain_s: float = 20.0) -> None:
        """Refuse new work, let queued work finish (up to drain_s), fail what is left, stop the loop."""
        self.ready = False
        end = time.monotonic() + drain_s
        while self.stats.inflight and time.monotonic() < end:
            await asyncio.sleep(0.01)
        if self._batcher:
            for item in self._batcher.drain():
                self._fail(item, NotReadyError("server shutting down"))
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=True)
        self.runner.close()

    # -- admission -----------------------------------------------------------------------------------------
    async def classify(self, request: InferRequest) -> InferResult:
        """Serve one request.  Cancelling the awaiting task cancels the request."""
        item = self.submit(request)
        try:
            result: InferResult = await item.future
        except asyncio.CancelledError:
            self.cancel(item)
            raise
        return result

    def submit(self, request: InferRequest) -> WorkItem:
        """Admit one request (or raise a ServeError); the returned item's future resolves to its result."""
        if not self.ready or self._batcher is None:
            raise NotReadyError("the model is not ready")
        now = time.monotonic()
        budget, arrival, deadline_ms = request.budget, request.arrival, request.deadline_ms
        frames = request.frames
        limit = min(
            self.settings.max_request_frames, self.cfg.num_frames if self.cfg.temporal_depth else 10**9
        )
        if frames > limit:
            raise self._reject(
                OverLimitError(f"{frames} frames, the limit is {limit}", frames=frames, limit=limit)
            )
        level = self._admission_level(budget, frames)
        timeout = self.settings.request_timeout_s
        deadline = arrival + (min(timeout, deadline_ms / 1e3) if deadline_ms else timeout)
        self.shed_if_full()
        if (
            deadline_ms is not None
            and now + self.scheduler.wait_estimate(frames, self.queue_depth) > deadline
        ):
            raise self._reject(
                DeadlineExceededError(
                    f"deadline of {deadline_ms:g} ms cannot be met", deadline_ms=deadline_ms
                )
            )
        item = WorkItem(request, deadline, level=level)
        if budget.kind.deadline:
            self.scheduler.note_arrival(now)
        self._batcher.put(item)
        self.stats.accepted += 1
        self.events.accepted()
        self.events.load(self.queue_depth, self.stats.inflight)
        return item

    def stuck(self) -> dict[str, float] | None:
        """How long the running batch has gone past its limit, when it has (else None): it has run
        `stuck_batch_factor` times its predicted time and at least `stuck_batch_min_s`, or
        `stuck_batch_ceiling_s`.  A hung forward cannot be interrupted, so liveness fails and the
        orchestrator restarts the process.  Read from any thread."""
        started, predicted = self._batch_started, self._batch_predicted_s
        if started is None:
            return None
        s = self.settings
        running = time.monotonic() - started
        limit = max(s.stuck_batch_factor * predicted, s.stuck_batch_min_s)
        if s.stuck_batch_ceiling_s:
            limit = min(limit, s.stuck_batch_ceiling_s)
        if running <= limit:
            return None
        if not self._stuck_logged:
            self._stuck_logged = True
            log.error(
                "an inference batch has run %.1f s (predicted %.3f s): liveness fails", running, predicted
            )
        return {
            "batch_running_s": round(running, 3),
            "predicted_s": round(predicted, 4),
            "limit_s": round(limit, 3),
        }

    def shed_if_full(self) -> None:
        """Raise 503/429 now when a new request could not be admitted, so that routes can refuse it before
        paying for its decoding."""
        if not self.ready or self._batcher is None:
            raise NotReadyError("the model is not ready")
        if self._batcher.full():
            raise self._reject(
                OverloadedError(
                    f"queue full ({self._batcher.max_queue_size})",
                    retry_after=self.scheduler.drain_estimate(self.queue_depth),
                )
            )

    def coming(self) -> contextlib.AbstractContextManager[None]:
        """Wrap the decoding of an admitted request, so that a forming batch waits for it."""
        return self._batcher.coming() if self._batcher else contextlib.nullcontext()

    def _admission_level(self, budget: Budget, frames: int) -> Level | None:
        try:
            return budget.kind.level(self.planner, budget.value, frames)  # None: planned when its batch forms
        except ServeError as exc:
            raise self._reject(exc) from None

    def _reject(self, exc: ServeError) -> ServeError:
        log.debug("rejected at admission: %s", exc.message)
        return exc

    def cancel(self, item: WorkItem) -> None:
        """The client went away: drop the item if queued; count it cancelled unless it already finished."""
        item.cancelled = True
        if self._batcher:
            self._batcher.remove(item)
        if self._settle(item, "cancelled"):
            self.events.cancelled()
            self.events.load(self.queue_depth, self.stats.inflight)

    # -- the batch loop ------------------------------------------------------------------------------------
    async def _loop(self) -> None:
        assert self._batcher is not None
        idle_s, released = self.settings.release_memory_idle_s, False  # start-up's batches: released too
        while True:
            if idle_s > 0 and not released and not await self._batcher.wait_for_work(idle_s):
                # Idle: hand the free heap pages back (server/core/memory.py), on the worker thread so that it
                # never overlaps a forward.
                await asyncio.get_running_loop().run_in_executor(self._executor, release_free_memory)
                released = True
            batch = await self._batcher.next_batch()
            for item in batch.expired:
                self._fail(item, DeadlineExceededError("deadline expired while queued"))
            items = self._drop_hopeless(batch.items)
            if not items:
                continue
            released = False
            try:
                await self._run_batch(items)
            except Exception as exc:  # the loop must outlive any failure: fail this batch, keep serving
                log.exception("batch of %d failed", len(items))
                for item in items:
                    if item not in self._batcher:  # not put back for a later batch
                        self._fail(item, InternalError(f"inference failed: {type(exc).__name__}"))

    async def _run_batch(self, items: list[WorkItem]) -> None:
        """Plan, predict on the worker thread, unbatch; items put back for later are not run here."""
        assert self._batcher is not None
        run, back = self.scheduler.plan(items, self.queue_depth + len(items))
        self._batcher.requeue_front(back)
        self.events.load(self.queue_depth, self.stats.inflight)
        levels = [it.level for it in run if it.level is not None]
        assert len(levels) == len(run), "every item of a batch is planned before it runs"
        # The token split of each sample was planned once (`Level.counts`); the runner hands it to the model.
        requests, splits = [it.request for it in run], [lv.counts for lv in levels]
        groups, gflops = len({lv.counts for lv in levels}), sum(lv.gflops for lv in levels)
        started = self._batch_started = time.monotonic()
        try:
            pending = asyncio.get_running_loop().run_in_executor(
                self._executor, self.runner.run, requests, splits
            )
            # While the forward runs: its prediction, for the stuck-batch check (`_check_stuck`).
            self._batch_predicted_s = self.latency.predict(run[0].frames, groups, gflops)
            out = await pending
        finally:
            self._batch_started, self._stuck_logged = None, False
        forward = (started, time.monotonic())
        observed = (run[0].frames, groups, gflops, out.seconds)
        task = asyncio.create_task(self._answer(run, out.samples, out.seconds, forward, observed))
        self._answering.add(task)
        task.add_done_callback(self._answering.discard)

    async def _answer(
        self,
        run: list[WorkItem],
        samples: list[SampleOutput],
        seconds: float,
        forward: tuple[float, float] = (0.0, 0.0),
        observed: tuple[int, int, float, float] | None = None,
    ) -> None:
        """Hand a batch's results to their requests `ANSWER_SLICE` at a time, letting the event loop poll
        its sockets in between.  Each answer wakes a handler that builds and sends its response; a whole
        batch of them in one iteration held a /healthz behind them (small model, 64 clients: p99 65-80 ms
        on the API port, 24 ms in slices of 4).  A task of its own, so that the next batch starts at once.

        Then the batch is counted and the latency model refitted with its time (`observed`: frames, token
        splits, GFLOPs, seconds): after the answers, so that a lone request does not wait for the refit
        (0.3 ms on 2 vCPUs), and while the next batch runs."""
        try:
            for i, (item, sample) in enumerate(zip(run, samples, strict=True)):
                if i and i % ANSWER_SLICE == 0:
                    await asyncio.sleep(0)
                self._succeed(item, sample, seconds, len(run), forward)
        except Exception as exc:  # no request may be left waiting: fail the ones not answered yet
            log.exception("answering a batch of %d failed", len(run))
            for item in run:
                self._fail(item, InternalError(f"answering failed: {type(exc).__name__}"))
        if observed is not None:
            await asyncio.sleep(0)  # the handlers woken above send their responses first
            self.latency.observe(*observed)
            self.events.batch_done(len(run), observed[3])
        self.events.load(self.queue_depth, self.stats.inflight)

    def _drop_hopeless(self, items: list[WorkItem]) -> list[WorkItem]:
        """Answer 504 without running the items whose hard deadline even a floor-capacity batch would miss."""
        if not items:
            return items
        frames = items[0].frames
        floor = self.scheduler.floor_batch_seconds(frames, len(items))
        now = time.monotonic()
        keep = []
        for item in items:
            if now + floor > item.deadline:
                self._fail(
                    item, DeadlineExceededError("the deadline cannot be met", predicted_ms=floor * 1e3)
                )
            else:
                keep.append(item)
        return keep

    def _settle(self, item: WorkItem, outcome: str, reason: str = "") -> bool:
        if item.outcome is not None:
            return False
        item.outcome = outcome
        if outcome == "succeeded":
            self.stats.succeeded += 1
        elif outcome == "failed":
            self.stats.failed += 1
        else:
            self.stats.cancelled += 1
        self.events.settled(outcome, reason)
        return True

    def _fail(self, item: WorkItem, exc: ServeError) -> None:
        if self._settle(item, "failed", exc.reason):
            self.events.load(self.queue_depth, self.stats.inflight)
            if not item.future.done():
                item.future.set_exception(exc)

    def _succeed(
        self,
        item: WorkItem,
        sample: SampleOutput,
        seconds: float,
        size: int,
        forward: tuple[float, float] = (0.0, 0.0),
    ) -> None:
        if item.outcome is not None:  # cancelled meanwhile
            return
        assert item.level is not None
        now = time.monotonic()
        met = None
        if item.budget.kind.deadline:
            met = (now - item.arrival) * 1e3 <= item.budget.value
        result = InferResult(
            request=item.request,
            output=sample,
            level=item.level,
            dense_gflops=self.planner.dense_gflops(item.frames),
            queue_ms=(item.dequeued - item.enqueued) * 1e3,
            compute_ms=seconds * 1e3,
            batch_size=size,
            degraded=item.degraded,
            planned_ms=item.planned_ms,
            deadline_met=met,
            enqueued=item.enqueued,
            dequeued=item.dequeued,
            forward=forward,
        )
        self._settle(item, "succeeded")
        if not item.future.done():
            item.future.set_result(result)
        self.events.request_done(result)
