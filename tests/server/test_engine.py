"""Engine invariants of docs/serving.md section 2 and the overload behaviour of section 4 (no HTTP)."""

from __future__ import annotations

import asyncio
import math
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from torch import Tensor

from mone.model import MoNE, MoNEConfig, gflops, load_checkpoint
from mone.model.flops import count_flops
from mone.model.preprocess import pil_to_tensor
from mone.server.core import engine as engine_module
from mone.server.core.budget import Budget
from mone.server.core.engine import Engine, InferResult
from mone.server.core.priority import thread_ids, thread_nice
from mone.server.core.request import InferRequest
from mone.server.core.runner import Runner
from mone.server.errors import DeadlineExceededError, InternalError, OverloadedError
from tests.support.media import fashion_images
from tests.support.models import fast_settings

pytestmark = pytest.mark.anyio
CFG = MoNEConfig.from_variant("Mi/4", num_classes=10)


def inputs(n: int, frames: int = 1) -> list[Tensor]:
    """n normalised (frames, 1, 28, 28) inputs made from test pictures."""
    xs = [pil_to_tensor(Image.fromarray(p), CFG) for p in fashion_images(n * frames)]
    return [torch.stack(xs[i * frames : (i + 1) * frames]) for i in range(n)]


async def infer(engine: Engine, x: Tensor, budget: Budget, **options: Any) -> InferResult:
    """Classify one input: an image when it has one frame, else a clip."""
    return await engine.classify(InferRequest(x, "image" if x.shape[0] == 1 else "clip", budget, **options))


async def start_engine(checkpoint_dir: Path, **overrides: Any) -> Engine:
    settings = fast_settings(checkpoint_dir, **{"calibrate": False, **overrides})
    engine = Engine(
        Runner.from_settings(load_checkpoint(checkpoint_dir), torch.device("cpu"), settings), settings
    )
    await engine.start()
    return engine


@pytest.fixture
async def engine(checkpoint_dir: Path) -> AsyncIterator[Engine]:
    e = await start_engine(checkpoint_dir, max_batch_wait_ms=50.0)
    yield e
    await e.stop(drain_s=5)


def slow_down(engine: Engine, seconds: float) -> list[int]:
    """Make every batch take at least `seconds`; returns the list of executed batch sizes."""
    run = engine.runner.run
    sizes: list[int] = []

    def slow(*args: Any) -> Any:
        time.sleep(seconds)
        sizes.append(len(args[0]))
        return run(*args)

    engine.runner.run = slow  # type: ignore[method-assign]
    return sizes


async def test_mixed_budget_batch_equals_alone(engine: Engine) -> None:
    await batch_equals_alone(engine)


async def test_mixed_budget_batch_on_streams_equals_alone(checkpoint_dir: Path) -> None:
    """The same with the batch split into sub-batches on two streams (server/core/runner.py)."""
    e = await start_engine(checkpoint_dir, max_batch_wait_ms=50.0, threads=2, stream_min_gflops=0.0)
    splits: list[int] = []
    split = e.runner.split

    def counted(frames: int, capacities: Any) -> list[list[int]]:
        pieces = split(frames, capacities)
        splits.append(len(pieces))
        return pieces

    e.runner.split = counted  # type: ignore[method-assign]
    try:
        assert e.runner.streams == 2
        await batch_equals_alone(e)
    finally:
        await e.stop(drain_s=5)
    assert 2 in splits, "the shared batch was meant to run on both streams"


async def batch_equals_alone(engine: Engine) -> None:
    xs = inputs(6) + inputs(2, frames=1)
    budgets = [Budget("capacity", c) for c in (0.125, 0.3, 0.5, 0.5, 0.8, 1.0, 0.2, 0.9)]
    together = await asyncio.gather(*(infer(engine, x, b) for x, b in zip(xs, budgets, strict=True)))
    assert max(r.batch_size for r in together) > 1, "the requests were meant to share a batch"
    for x, b, r in zip(xs, budgets, together, strict=True):
        alone = await infer(engine, x, b)
        assert alone.batch_size == 1
        torch.testing.assert_close(torch.tensor(r.output.logits), torch.tensor(alone.output.logits))
        assert r.output.counts == alone.output.counts
        assert r.output.realised == alone.output.realised


async def test_a_batch_is_answered_in_slices(checkpoint_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch's results reach their requests `ANSWER_SLICE` per event-loop iteration, so that a probe that
    arrives meanwhile is not held behind the whole batch's response handlers."""
    monkeypatch.setattr(engine_module, "ANSWER_SLICE", 2)
    e = await start_engine(checkpoint_dir, max_batch_size=8, max_batch_wait_ms=200.0)
    try:
        ticks = 0
        stop = False

        async def ticker() -> None:  # one tick per loop iteration
            nonlocal ticks
            while not stop:
                ticks += 1
                await asyncio.sleep(0)

        tick_task = asyncio.create_task(ticker())
        items = [e.submit(InferRequest(x, "image", Budget("capacity", 1.0))) for x in inputs(8)]
        answered_at: list[int] = []
        for item in items:
            item.future.add_done_callback(lambda _: answered_at.append(ticks))
        results = await asyncio.gather(*(item.future for item in items))
        stop = True
        await tick_task
    finally:
        await e.stop(drain_s=5)
    assert {r.batch_size for r in results} == {8}
    assert len(answered_at) == 8
    # 8 answers, 2 per iteration: 4 iterations apart at least (all 8 in one went unnoticed before)
    assert len(set(answered_at)) >= 4, answered_at


async def test_a_failure_while_answering_leaves_no_request_waiting(checkpoint_dir: Path) -> None:
    e = await start_engine(checkpoint_dir, max_batch_size=4, max_batch_wait_ms=200.0)
    succeed, calls = e._succeed, 0

    def flaky(*args: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("broken")
        succeed(*args)

    e._succeed = flaky  # type: ignore[method-assign]
    try:
        items = [e.submit(InferRequest(x, "image", Budget("capacity", 1.0))) for x in inputs(4)]
        async with asyncio.timeout(30):
            out = await asyncio.gather(*(item.future for item in items), return_exceptions=True)
    finally:
        await e.stop(drain_s=5)
    assert not isinstance(out[0], BaseException)
    assert all(isinstance(o, InternalError) for o in out[1:]), out
    assert e.stats.inflight == 0


def dense_vit(net: MoNE, x: Tensor) -> Tensor:
    """A plain pre-LN ViT with global average pooling over the same weights (images, no MoNE code paths)."""
    cfg = net.cfg
    t = net.patch_embed(x).flatten(2).transpose(1, 2) + net.pos_embed  # (B, N, D)
    B, N, D = t.shape
    H = cfg.heads
    for blk in net.blocks:
        h = F.layer_norm(t, (D,), blk.norm1.weight, blk.norm1.bias, blk.norm1.eps)
        q, k, v = F.linear(h, blk.attn.qkv.weight, blk.attn.qkv.bias).view(B, N, 3, H, D // H).unbind(2)
        att = torch.softmax(q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2) / math.sqrt(D // H), -1)
        a = (att @ v.transpose(1, 2)).transpose(1, 2).reshape(B, N, D)
        t = t + blk.attn.proj(a)
        h = F.layer_norm(t, (D,), blk.norm2.weight, blk.norm2.bias, blk.norm2.eps)
        t = t + blk.mlp.fc2(F.gelu(blk.mlp.fc1(h)))
    z = net.fc_norm(t.mean(dim=1)).unsqueeze(1)  # one frame
    if cfg.temporal_depth:
        z = z + net.temporal_pos[:, :1]
        for tb in net.temporal_blocks:
            z = tb(z)
        z = net.temporal_norm(z)
    return net.head(z.mean(dim=1))


async def test_capacity_one_is_the_dense_vit(engine: Engine) -> None:
    net = engine.runner.model
    assert (
        float(net.alpha.detach()) == 0.0
    )  # the router's MLP scale is off, so capacity 1 must be a plain ViT
    xs = inputs(4)
    with torch.inference_mode():
        want = dense_vit(net, torch.stack(xs)[:, 0])
    results = await asyncio.gather(*(infer(engine, x, Budget("capacity", 1.0)) for x in xs))
    got = torch.tensor([r.output.logits for r in results])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("frames", [1, 8])
async def test_reported_gflops_match_a_flop_counter(engine: Engine, frames: int) -> None:
    net = engine.runner.model
    x = inputs(1, frames)[0]
    for c in (0.125, 0.4, 0.7, 1.0):
        r = await infer(engine, x, Budget("capacity", c))
        measured = count_flops(lambda c=c: net(x.unsqueeze(0), capacity=c)) / 1e9
        assert r.output.gflops == pytest.approx(measured, rel=0.01)
        assert r.output.gflops == pytest.approx(gflops(engine.cfg, c, frames), rel=1e-9)


async def test_gflops_budget_is_honoured(engine: Engine) -> None:
    x = inputs(1)[0]
    for budget in (0.03, 0.05, 0.08, 0.2):
        r = await infer(engine, x, Budget("gflops", budget))
        assert r.output.gflops <= budget
    r = await infer(engine, x, Budget("gflops", 0.2))
    assert r.output.realised == 1.0


@pytest.mark.parametrize("wait", ["incoming", "always"])
async def test_a_lone_request_waits_for_batch_mates_only_when_told_to(
    checkpoint_dir: Path, wait: str
) -> None:
    engine = await start_engine(checkpoint_dir, max_batch_wait_ms=600.0, batch_wait=wait)
    result = await infer(engine, inputs(1)[0], Budget("default", 1.0))
    await engine.stop(drain_s=5)
    if wait == "incoming":
        assert result.queue_ms < 300, "nothing else on its way: the batch runs at once"
    else:
        assert result.queue_ms >= 550


async def test_reject_policy_answers_429_and_accounts_for_everything(checkpoint_dir: Path) -> None:
    engine = await start_engine(checkpoint_dir, max_batch_size=1, max_queue_size=2, max_batch_wait_ms=0.0)
    slow_down(engine, 0.05)
    x = inputs(1)[0]
    results = await asyncio.gather(
        *(infer(engine, x, Budget("default", 1.0)) for _ in range(8)), return_exceptions=True
    )
    rejected = [r for r in results if isinstance(r, OverloadedError)]
    assert rejected
    assert all(e.retry_after >= 1 for e in rejected)
    assert len(rejected) + engine.stats.succeeded == 8
    await engine.stop(drain_s=5)
    s = engine.stats
    assert s.accepted == s.succeeded + s.failed + s.cancelled
    assert s.inflight == 0


async def test_degrade_policy_lowers_unpinned_capacity_only(checkpoint_dir: Path) -> None:
    engine = await start_engine(
        checkpoint_dir,
        max_batch_size=1,
        max_queue_size=8,
        max_batch_wait_ms=0.0,
        overload_policy="degrade",
        degrade_start=0.0,
        degrade_floor=0.25,
    )
    slow_down(engine, 0.02)
    x = inputs(1)[0]
    budgets = [Budget("default", 1.0), Budget("capacity", 1.0)] * 4
    results = await asyncio.gather(*(infer(engine, x, b) for b in budgets))
    await engine.stop(drain_s=5)
    unpinned = [r for r in results if r.budget.type == "default"]
    pinned = [r for r in results if r.budget.type == "capacity"]
    assert all(r.output.realised == 1.0 and not r.degraded for r in pinned)
    assert any(r.degraded and r.level.capacity < 1.0 for r in unpinned)
    assert all(r.level.capacity >= 0.25 - 1e-9 for r in unpinned)


async def test_hard_deadline_expires_while_queued(checkpoint_dir: Path) -> None:
    engine = await start_engine(checkpoint_dir, max_batch_size=1, max_batch_wait_ms=0.0)
    sizes = slow_down(engine, 0.2)
    x = inputs(1)[0]
    first = asyncio.ensure_future(infer(engine, x, Budget("default", 1.0)))
    await asyncio.sleep(0.02)
    with pytest.raises(DeadlineExceededError):
        await infer(engine, x, Budget("default", 1.0), deadline_ms=400.0, arrival=time.monotonic() - 0.35)
    await first
    await engine.stop(drain_s=5)
    assert sizes == [1], "the expired request must not run"
    assert engine.stats.failed == 1


async def test_cancelled_while_queued_never_runs(checkpoint_dir: Path) -> None:
    engine = await start_engine(checkpoint_dir, max_batch_size=1, max_batch_wait_ms=0.0)
    sizes = slow_down(engine, 0.15)
    x = inputs(1)[0]
    running = asyncio.ensure_future(infer(engine, x, Budget("default", 1.0)))
    await asyncio.sleep(0.02)
    queued = asyncio.ensure_future(infer(engine, x, Budget("default", 1.0)))
    await asyncio.sleep(0.02)
    queued.cancel()
    await running
    await asyncio.sleep(0.2)
    await engine.stop(drain_s=5)
    assert sizes == [1]
    s = engine.stats
    assert (s.accepted, s.succeeded, s.cancelled, s.inflight) == (2, 1, 1, 0)


async def test_latency_budget_is_planned_within_budget(checkpoint_dir: Path) -> None:
    engine = await start_engine(checkpoint_dir, calibrate=True, max_batch_wait_ms=1.0)
    x = inputs(1)[0]
    floor = engine.latency.predict(1, 1, engine.planner.floor(1).gflops) * 1e3
    dense = engine.latency.predict(1, 1, engine.planner.dense_gflops(1)) * 1e3
    generous = await infer(engine, x, Budget("latency_ms", 50 * dense + 100))
    assert generous.output.realised == 1.0
    # The fastest plan: the floor, or a larger capacity start-up measured no slower at batch 1 (on a small
    # model a lone image can cost the same at every capacity, and then the floor would only lose accuracy).
    fastest = engine.scheduler.no_slower(engine.planner.floor(1), 1, 1).realised
    mid_budget = (floor + dense) / 2 + 1.5  # wait time and margin on top of the compute
    mid = await infer(engine, x, Budget("latency_ms", mid_budget))
    assert mid.planned_ms is not None
    # Within budget whenever the floor allows: on a busy machine the wait before the batch forms can eat
    # the slack, and then the planner must have gone down to the fastest plan, never overshot above it.
    assert mid.planned_ms <= mid_budget or mid.output.realised == pytest.approx(fastest)
    tiny = await infer(engine, x, Budget("latency_ms", 0.01))
    assert tiny.output.realised == pytest.approx(fastest)
    assert tiny.deadline_met is False
    await engine.stop(drain_s=5)


async def test_hard_deadline_that_cannot_be_met_is_504_without_running(checkpoint_dir: Path) -> None:
    engine = await start_engine(checkpoint_dir, request_timeout_s=0.5)
    sizes = slow_down(engine, 0.0)
    for g in (0.01, 1.0):  # teach the latency model that every batch takes at least 2 s
        engine.latency.observe(1, 1, g, 2.0 + g, calibration=True)
    with pytest.raises(DeadlineExceededError):
        await infer(engine, inputs(1)[0], Budget("default", 1.0))
    await engine.stop(drain_s=5)
    assert sizes == []
    assert engine.stats.failed == 1


async def test_pinned_work_does_not_hold_a_latency_budget_hostage(checkpoint_dir: Path) -> None:
    engine = await start_engine(checkpoint_dir, max_batch_size=7, max_batch_wait_ms=200.0)
    sizes = slow_down(engine, 0.0)
    for g in (0.01, 1.0, 3.0):  # planning model: 1 ms + 100 ms per GFLOP (a dense Mi/4 image: ~12 ms)
        engine.latency.observe(1, 1, g, 0.001 + 0.1 * g, calibration=True)
    engine.latency.observe = lambda *a, **k: None  # type: ignore[method-assign]  # keep the model fixed
    x = inputs(1)[0]
    budgets = [Budget("capacity", 1.0)] * 6 + [Budget("latency_ms", 40.0)]
    results = await asyncio.gather(*(infer(engine, x, b) for b in budgets))
    await engine.stop(drain_s=5)
    fast = results[-1]
    assert fast.planned_ms is not None
    assert fast.planned_ms <= 40.0
    assert fast.batch_size == 1, "with six dense images the batch could not fit 40 ms even at the floor"
    assert fast.output.realised > 0.5, "alone, it fits at a high capacity"
    assert sizes == [1, 6]
    assert all(r.output.realised == 1.0 for r in results[:6])


async def test_a_failing_batch_fails_only_its_requests(checkpoint_dir: Path) -> None:
    engine = await start_engine(checkpoint_dir, max_batch_size=1, max_batch_wait_ms=0.0)
    run = engine.runner.run
    calls = {"n": 0}

    def flaky(*args: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        return run(*args)

    engine.runner.run = flaky  # type: ignore[method-assign]
    x = inputs(1)[0]
    with pytest.raises(InternalError):
        await infer(engine, x, Budget("default", 1.0))
    ok = await infer(engine, x, Budget("default", 1.0))
    await engine.stop(drain_s=5)
    assert ok.output.realised == 1.0
    s = engine.stats
    assert (s.accepted, s.succeeded, s.failed, s.inflight) == (2, 1, 1, 0)


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from([0.125, 0.2, 0.33, 0.5, 0.61, 0.8, 1.0]), min_size=1, max_size=6))
async def test_each_response_matches_its_own_input(engine: Engine, capacities: list[float]) -> None:
    xs = inputs(len(capacities))
    results = await asyncio.gather(
        *(infer(engine, x, Budget("capacity", c)) for x, c in zip(xs, capacities, strict=True))
    )
    with torch.inference_mode():
        for x, c, r in zip(xs, capacities, results, strict=True):
            want = engine.runner.model(x.unsqueeze(0), capacity=c).logits[0]
            torch.testing.assert_close(torch.tensor(r.output.logits), want, rtol=1e-4, atol=1e-4)


async def test_failing_hooks_do_not_break_serving(checkpoint_dir: Path) -> None:
    class Broken:
        def __getattr__(self, name: str) -> Any:
            def fail(*args: Any) -> None:
                raise RuntimeError(f"{name} is broken")

            return fail

    settings = fast_settings(checkpoint_dir, calibrate=False)
    engine = Engine(Runner(load_checkpoint(checkpoint_dir), torch.device("cpu")), settings, events=Broken())
    await engine.start()
    results = await asyncio.gather(*(infer(engine, x, Budget("capacity", 0.5)) for x in inputs(3)))
    await engine.stop(drain_s=5)
    assert all(r.output.realised < 0.6 for r in results)
    assert engine.stats.succeeded == 3


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")
@pytest.mark.parametrize("nice", [7, 0])
async def test_inference_threads_run_at_a_lower_priority(checkpoint_dir: Path, nice: int) -> None:
    """The worker thread and the intra-op threads torch starts from it get `inference_nice` more than the
    event loop's thread, which keeps its own (docs/reliability.md row 24)."""
    loop_tid = threading.get_native_id()
    base = thread_nice(loop_tid)
    before = thread_ids()
    engine = await start_engine(checkpoint_dir, threads=2, inference_nice=nice, stream_min_gflops=0.0)
    try:
        await infer(engine, inputs(1)[0], Budget("capacity", 1.0))
        # Four at once share a batch, which runs on two streams: the second one's thread joins in.
        await asyncio.gather(*(infer(engine, x, Budget("capacity", 1.0)) for x in inputs(4)))
        started = {tid: thread_nice(tid) for tid in thread_ids() - before}
        streams = {t.native_id for t in threading.enumerate() if t.name.startswith("mone-stream")}
    finally:
        await engine.stop(drain_s=5)
    assert len(started) >= 3, started  # the worker, an intra-op thread and a stream thread
    assert streams, "no stream thread ran"
    assert streams <= set(started), (streams, started)
    assert set(started.values()) == {min(19, base + nice)}, started
    assert thread_nice(loop_tid) == base


async def test_free_memory_goes_back_once_per_idle_spell(
    checkpoint_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After `release_memory_idle_s` of an empty queue: once per idle spell, on the worker thread (never
    beside a forward), never under steady load."""
    calls: list[str] = []
    monkeypatch.setattr(
        "mone.server.core.engine.release_free_memory",
        lambda: calls.append(threading.current_thread().name) or True,
    )
    engine = await start_engine(checkpoint_dir, release_memory_idle_s=0.4)
    try:
        await asyncio.sleep(0.9)
        assert len(calls) == 1  # after start-up: calibration and warm-up batches are behind us
        assert calls[0].startswith("mone-infer")
        for x in inputs(12):  # one request every 0.05 s: never 0.4 s idle
            await infer(engine, x, Budget("capacity", 1.0))
            await asyncio.sleep(0.05)
        assert len(calls) == 1
        await asyncio.sleep(0.9)
        assert len(calls) == 2
        await asyncio.sleep(0.9)
        assert len(calls) == 2  # one idle spell, one release
        await infer(engine, inputs(1)[0], Budget("capacity", 0.5))
        await asyncio.sleep(0.9)
        assert len(calls) == 3
    finally:
        await engine.stop(drain_s=5)


async def test_free_memory_release_can_be_turned_off(
    checkpoint_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    monkeypatch.setattr("mone.server.core.engine.release_free_memory", lambda: calls.append(1) or True)
    engine = await start_engine(checkpoint_dir, release_memory_idle_s=0.0)
    try:
        await infer(engine, inputs(1)[0], Budget("capacity", 1.0))
        await asyncio.sleep(0.3)
    finally:
        await engine.stop(drain_s=5)
    assert calls == []
