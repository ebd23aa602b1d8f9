"""Streams: a batch split into sub-batches that run side by side on the CPU (server/core/runner.py)."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from mone.model import MoNEConfig, expert_counts, gflops, inference, load_checkpoint
from mone.server.cli import build_parser, settings_from_args
from mone.server.core import runner as runner_module
from mone.server.core.budget import Budget
from mone.server.core.priority import lower_thread_priority, thread_nice
from mone.server.core.request import InferRequest
from mone.server.core.runner import (
    AUTO_STREAMS_MAX,
    STREAM_BALANCE,
    TORCH_THREADS,
    Runner,
    resolve_streams,
    serial_thread,
    split_batch,
)

CFG = MoNEConfig.from_variant("Mi/4", num_classes=10)


def covers(pieces: list[list[int]], n: int) -> bool:
    return sorted(i for p in pieces for i in p) == list(range(n))


# -- the split -------------------------------------------------------------------------------------------
def test_equal_samples_split_evenly() -> None:
    pieces = split_batch([1.0] * 32, streams=2, min_gflops=0.0)
    assert [len(p) for p in pieces] == [16, 16]
    assert covers(pieces, 32)
    assert all(p == sorted(p) for p in pieces)


def test_one_sample_runs_whole() -> None:
    assert split_batch([5.0], streams=4, min_gflops=0.0) == [[0]]


def test_an_uneven_split_is_not_taken() -> None:
    # Two then one on two streams takes two samples' time on one core: slower than three on both.
    assert split_batch([1.0] * 3, streams=2, min_gflops=0.0) == [[0, 1, 2]]
    # Four streams, five samples: 2+1+1+1 is off balance, 3+2 too; 5 on one is what is left.
    assert split_batch([1.0] * 5, streams=4, min_gflops=0.0) == [[0, 1, 2, 3, 4]]
    # ... but four streams and six samples fall back to three sub-batches of two.
    assert [len(p) for p in split_batch([1.0] * 6, streams=4, min_gflops=0.0)] == [2, 2, 2]


def test_small_batches_stay_whole() -> None:
    assert split_batch([0.125] * 7, streams=2, min_gflops=0.5) == [list(range(7))]
    assert len(split_batch([0.125] * 8, streams=2, min_gflops=0.5)) == 2
    # 1.0 GFLOPs in all: room for two sub-batches of 0.5, not four.
    assert len(split_batch([0.125] * 8, streams=4, min_gflops=0.5)) == 2


def test_mixed_capacities_are_balanced_by_work() -> None:
    caps = [1.0] * 5 + [0.125] * 19
    costs = [gflops(CFG, c, 1) for c in caps]
    pieces = split_batch(costs, streams=2, min_gflops=0.0)
    assert len(pieces) == 2
    assert covers(pieces, len(caps))
    loads = [sum(costs[i] for i in p) for p in pieces]
    assert max(loads) <= STREAM_BALANCE * sum(costs) / 2
    # Split by count instead, the half with the dense samples would carry most of the work.
    assert max(loads) < sum(costs[:12])


def test_streams_resolve_per_device() -> None:
    cpu = torch.device("cpu")
    assert resolve_streams(0, cpu, 2) == 2
    assert resolve_streams(0, cpu, 64) == AUTO_STREAMS_MAX
    assert resolve_streams(0, cpu, 1) == 1
    assert resolve_streams(3, cpu, 2) == 3
    assert resolve_streams(4, torch.device("cuda"), 16) == 1  # one GPU forward at a time


def test_settings_and_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    # The CLI exports its settings as MONE_* variables; these two are put back as they were afterwards.
    for name in ("MONE_INFERENCE_STREAMS", "MONE_STREAM_MIN_GFLOPS"):
        monkeypatch.setenv(name, "")
    flags = build_parser().format_help()
    assert "--inference-streams" in flags
    assert "--stream-min-gflops" in flags
    s = settings_from_args(["--inference-streams", "3", "--stream-min-gflops", "2.5"])
    assert s.inference_streams == 3
    assert s.stream_min_gflops == 2.5


# -- the runner ------------------------------------------------------------------------------------------
def inputs(n: int, seed: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, CFG.in_chans, CFG.img_size, CFG.img_size, generator=g) for _ in range(n)]


def splits(caps: list[float]) -> list[tuple[int, ...]]:
    """The token split of each capacity, as planning hands them to the runner."""
    return [expert_counts(c, CFG.num_tokens, CFG.num_experts) for c in caps]


def batch(
    xs: list[Tensor], caps: list[float], top_ks: list[int], routing: list[bool]
) -> tuple[list[InferRequest], list[tuple[int, ...]]]:
    """Image requests of `xs` and their token splits, as the engine hands them to the runner."""
    requests = [
        InferRequest(x, "image", Budget("capacity", c), top_k=k, routing=r)
        for x, c, k, r in zip(xs, caps, top_ks, routing, strict=True)
    ]
    return requests, splits(caps)


def runner(checkpoint_dir: Path, **kwargs: Any) -> Runner:
    r = Runner(load_checkpoint(checkpoint_dir), torch.device("cpu"), **kwargs)
    r.setup_threads(2)
    return r


@pytest.fixture
def pair(checkpoint_dir: Path) -> Iterator[tuple[Runner, Runner]]:
    whole, split = runner(checkpoint_dir, streams=1), runner(checkpoint_dir, streams=2)
    yield whole, split
    whole.close()
    split.close()


def test_only_the_inference_thread_runs_several_intra_op_threads(checkpoint_dir: Path) -> None:
    # The loop thread keeps to one intra-op thread (so it never starts an OpenMP team of its own); the
    # inference thread, set up after it, still gets torch's default rather than the loop's one.
    seen: dict[str, int] = {}
    r = Runner(load_checkpoint(checkpoint_dir), torch.device("cpu"), streams=1)

    def loop() -> None:
        serial_thread()
        seen["loop"] = torch.get_num_threads()

    def inference() -> None:
        r.setup_threads(None)
        seen["runner"] = r.threads or 0
        seen["inference"] = torch.get_num_threads()

    def io() -> None:  # a thread started later, as the loop's executor starts them
        serial_thread()
        seen["io"] = torch.get_num_threads()

    for target in (loop, inference, io):
        t = threading.Thread(target=target)
        t.start()
        t.join()
    r.close()
    assert seen == {"loop": 1, "runner": TORCH_THREADS, "inference": TORCH_THREADS, "io": 1}


def test_a_split_batch_answers_what_the_whole_batch_does(pair: tuple[Runner, Runner]) -> None:
    whole, split = pair
    caps = [1.0, 0.5, 0.25, 0.125, 0.75, 1.0, 0.3] * 3
    xs = inputs(len(caps))
    top_ks = [1, 3, 5, 10, 2, 4, 5] * 3
    routing = [i % 2 == 0 for i in range(len(caps))]
    assert len(split.split(1, splits(caps))) == 2
    assert len(whole.split(1, splits(caps))) == 1
    a = whole.run(*batch(xs, caps, top_ks, routing))
    b = split.run(*batch(xs, caps, top_ks, routing))
    for i, (s, t) in enumerate(zip(a.samples, b.samples, strict=True)):
        assert torch.allclose(torch.tensor(s.logits), torch.tensor(t.logits), atol=1e-5), i
        assert s.top_indices == t.top_indices
        assert len(t.top_indices) == top_ks[i]
        assert torch.allclose(torch.tensor(s.top_probs), torch.tensor(t.top_probs), atol=1e-6)
        assert (s.realised, s.counts, s.gflops) == (t.realised, t.counts, t.gflops)
        if routing[i]:
            assert s.experts is not None
            assert t.experts is not None
            assert torch.equal(s.experts, t.experts)
        else:
            assert t.experts is None


def test_sub_batches_run_on_their_own_threads(pair: tuple[Runner, Runner]) -> None:
    _, split = pair
    seen: dict[int, tuple[int, int]] = {}
    forward = split.model.forward

    def record(x: Tensor, capacity: Any = 1.0, splits: Any = None) -> Any:
        seen[threading.get_ident()] = (int(x.shape[0]), torch.get_num_threads())
        return forward(x, capacity=capacity, splits=splits)

    split.model.forward = record  # type: ignore[method-assign]
    split.run(*batch(inputs(16), [1.0] * 16, [1] * 16, [False] * 16))
    assert len(seen) == 2
    assert threading.get_ident() in seen
    assert sorted(n for n, _ in seen.values()) == [8, 8]
    assert {t for _, t in seen.values()} == {1}  # two threads in all, one each
    seen.clear()
    split.run(*batch(inputs(1), [1.0], [1], [False]))  # one sample: whole, on every thread
    assert seen == {threading.get_ident(): (1, 2)}


def test_a_failing_sub_batch_fails_the_batch_and_the_streams_live_on(pair: tuple[Runner, Runner]) -> None:
    _, split = pair
    forward = split.model.forward
    main = threading.get_ident()
    finished: list[int] = []

    def flaky(x: Tensor, capacity: Any = 1.0, splits: Any = None) -> Any:
        if threading.get_ident() != main:
            raise RuntimeError("boom")
        out = forward(x, capacity=capacity, splits=splits)
        finished.append(threading.get_ident())
        return out

    split.model.forward = flaky  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="boom"):
        split.run(*batch(inputs(8), [1.0] * 8, [1] * 8, [False] * 8))
    assert finished == [main]  # the other sub-batch was waited for before the error came out
    split.model.forward = forward  # type: ignore[method-assign]
    out = split.run(*batch(inputs(8), [1.0] * 8, [1] * 8, [False] * 8))
    assert len(out.samples) == 8


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")
def test_stream_threads_run_at_the_priority_of_the_thread_that_set_them_up(checkpoint_dir: Path) -> None:
    r = Runner(load_checkpoint(checkpoint_dir), torch.device("cpu"), streams=2)
    seen: dict[str, int] = {}
    forward = r.model.forward

    def record(x: Tensor, capacity: Any = 1.0, splits: Any = None) -> Any:
        seen[threading.current_thread().name] = thread_nice(threading.get_native_id())
        return forward(x, capacity=capacity, splits=splits)

    def inference_thread() -> None:
        lower_thread_priority(5)
        r.setup_threads(2)
        r.model.forward = record  # type: ignore[method-assign]
        r.run(*batch(inputs(8), [1.0] * 8, [1] * 8, [False] * 8))

    base = thread_nice(threading.get_native_id())
    t = threading.Thread(target=inference_thread, name="infer")
    t.start()
    t.join()
    r.close()
    assert len(seen) == 2, seen
    assert set(seen.values()) == {min(19, base + 5)}, seen


def test_warm_up_reaches_every_stream(checkpoint_dir: Path) -> None:
    r = runner(checkpoint_dir, streams=2, min_stream_gflops=0.5)
    try:
        b = r.smallest_split(1, 32)
        assert b > 0
        assert len(r.split(1, splits([1.0] * b))) == 2
        assert len(r.split(1, splits([1.0] * (b - 1)))) == 1
        assert r.smallest_split(1, b - 1) == 0
    finally:
        r.close()
    assert runner(checkpoint_dir, streams=1).smallest_split(1, 32) == 0


def test_whether_to_split_is_judged_on_dense_work() -> None:
    """A low capacity has as many operations as a high one: it is split as often, balanced by GFLOPs."""
    assert split_batch([0.1] * 8, streams=2, min_gflops=0.5) == [list(range(8))]
    pieces = split_batch([0.1] * 8, streams=2, min_gflops=0.5, work=8 * 0.4)
    assert sorted(len(p) for p in pieces) == [4, 4]


def test_the_runner_splits_every_capacity_alike(pair: tuple[Runner, Runner]) -> None:
    _, split = pair
    split.min_stream_gflops = 6 * gflops(CFG, 1.0, 1)
    for c in (1.0, 0.5, 0.25, 0.125):
        assert len(split.split(1, splits([c] * 12))) == 2, c
        assert len(split.split(1, splits([c] * 11))) == 1, c


# -- how many threads a batch gets (serial_gflops, calibrate_threads) ---------------------------------------
def test_small_batches_run_on_one_intra_op_thread(pair: tuple[Runner, Runner]) -> None:
    whole, _ = pair
    seen: list[int | None] = []
    forward = whole._forward

    def recording(xs: list[Tensor], s: Any, threads: int | None, k: int, experts: bool) -> Any:
        seen.append(threads)
        return forward(xs, s, threads, k, experts)

    whole._forward = recording  # type: ignore[method-assign]
    whole.serial_gflops = 2 * gflops(CFG, 1.0, 1)
    for n in (1, 2, 3):  # a low capacity has as many operations: judged on dense work
        whole.run(*batch(inputs(n), [0.25] * n, [1] * n, [False] * n))
    assert seen == [1, 1, 2]
    serial = whole.run(*batch(inputs(2), [0.5, 1.0], [3, 3], [False, False]))
    whole.serial_gflops = 0.0
    threaded = whole.run(*batch(inputs(2), [0.5, 1.0], [3, 3], [False, False]))
    for a, b in zip(serial.samples, threaded.samples, strict=True):  # the same arithmetic on fewer threads
        assert torch.allclose(torch.tensor(a.logits), torch.tensor(b.logits), atol=1e-5)


def test_thresholds_are_measured_where_one_way_stops_winning(
    pair: tuple[Runner, Runner], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, split = pair
    dense = gflops(CFG, 1.0, 1)
    # One thread wins up to batch 4; splitting wins from batch 8 on.
    whole_ms = {(1, 1): 1, (1, 2): 2, (2, 1): 2, (2, 2): 3, (4, 1): 4, (4, 2): 5, (8, 1): 9, (8, 2): 8}
    whole_ms |= {(b, t): b for b in (16, 32) for t in (1, 2)}
    split_ms = {2: 9, 4: 9, 8: 5, 16: 10, 32: 20}
    monkeypatch.setattr(split, "_time_whole", lambda b, threads, repeats: whole_ms[(b, threads)])
    monkeypatch.setattr(split, "_time_split", lambda b, repeats: split_ms[b])
    split.calibrate_threads(max_batch=32)
    assert split.serial_gflops == pytest.approx(4 * dense)
    assert split.min_stream_gflops == pytest.approx(8 * dense / 2)
    split_ms.update({8: 99, 16: 99, 32: 99})  # splitting never wins: batches stay whole
    split.calibrate_threads(max_batch=32)
    assert split.min_stream_gflops == float("inf")
    assert len(split.split(1, splits([1.0] * 32))) == 1
    split.calibrate_threads(max_batch=32, min_stream=0.5, serial=0.0)  # given, nothing measured
    assert (split.min_stream_gflops, split.serial_gflops) == (0.5, 0.0)


def test_the_packed_weights_setting_reaches_the_forward(checkpoint_dir: Path) -> None:
    try:
        off = runner(checkpoint_dir, packed_weights=False)
        assert not inference.PACKED
        assert off.describe()["packed_weights"] is False
        on = runner(checkpoint_dir, packed_weights=True)
        assert inference.packing_available() == inference.PACKED
        assert on.describe()["packed_weights"] is inference.packing_available()
        off.close()
        on.close()
    finally:
        inference.PACKED = inference.packing_available()


def test_each_way_of_running_a_batch_plans_with_its_own_product_cost(pair: tuple[Runner, Runner]) -> None:
    """A batch split over the streams or run on one thread plans its runs of experts with `rows_pieces`;
    one run whole on every intra-op thread, where each operation also wakes the other threads, with
    `rows_whole`."""
    _, split = pair
    seen: list[float] = []
    forward = split.model.forward

    def recording(x: Tensor, capacity: Any = 1.0, splits: Any = None) -> Any:
        seen.append(split.model.full_width_rows)
        return forward(x, capacity=capacity, splits=splits)

    split.model.forward = recording  # type: ignore[method-assign]
    split.rows_pieces, split.rows_whole = 10.0, 50.0
    split.serial_gflops, split.min_stream_gflops = gflops(CFG, 1.0, 1), 2 * gflops(CFG, 1.0, 1)
    split.run(*batch(inputs(1), [0.5], [1], [False]))  # one thread
    split.run(*batch(inputs(2), [0.5] * 2, [1] * 2, [False] * 2))  # whole, on both threads
    split.run(*batch(inputs(4), [0.5] * 4, [1] * 4, [False] * 4))  # over both streams
    assert seen == [10.0, 50.0, 10.0, 10.0]
    split.set_full_width_rows(25.0, 8)  # given: one cost for every way
    assert (split.rows_pieces, split.rows_whole, split.model.full_width_rows) == (25.0, 25.0, 25.0)
    split.model.forward = forward  # type: ignore[method-assign]


def test_the_split_margin_applies_only_to_forwards_side_by_side(
    pair: tuple[Runner, Runner], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Streams share one interpreter lock, so there a split must win start-up's measurement by
    SPLIT_MARGIN; a process with one stream (a worker process) measures the product cost without it."""
    whole, split = pair
    margins: list[tuple[float, bool]] = []

    def measured(model: Any, batches: Any, **kwargs: Any) -> float:
        margins.append((kwargs["margin"], kwargs["forward"] is not None))
        return 40.0

    monkeypatch.setattr(runner_module, "calibrate_full_width", measured)
    whole.set_full_width_rows(None, 8)
    assert set(margins) == {(1.0, False)}
    margins.clear()
    split.set_full_width_rows(None, 8)
    assert (runner_module.SPLIT_MARGIN, True) in margins  # the streams, side by side
    assert {m for m, _ in margins} == {runner_module.SPLIT_MARGIN}
