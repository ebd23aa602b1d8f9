"""The predict stage: one batched forward pass of the model, run on the engine's single worker thread.

Loading (checkpoint or random initialisation), device choice, warm-up and latency calibration live here too:
everything that touches the model's weights.  Nothing here knows about queues or HTTP.

Streams (CPU): a batch big enough is split into sub-batches of about equal work that run side by side, each
on its own thread with its share of the intra-op threads (`inference_streams`).  One forward spread over
all cores waits at a barrier after every operation for the slowest thread, and runs its Python between
operations on one core while the others wait; sub-batches on one core each never wait for one another.
S/16 at batch 32 on 2 cores: 2622 ms as two single-threaded halves against 3112 ms as one two-threaded
forward (cap 1.0; 2211 against 2502 ms at 0.5).  Every sample goes through the same per-sample arithmetic
either way.  A batch of one sample, or one too small to be worth splitting (`stream_min_gflops`), runs
whole: on one intra-op thread when its work is small enough that waking the other threads costs more than
they save (`serial_max_gflops`), else on all of them.

Both thresholds are measured at start-up on the inference thread (`Runner.calibrate_threads`), at capacity
1.0, since a lower capacity has as many operations.

Only the inference thread has an OpenMP team.  Every other thread of the server keeps to one intra-op
thread (`serial_thread`): the event loop, which loads the model, and the threads it hands work to.  GNU
OpenMP lets a team's idle threads spin a while before they sleep, but only while it manages no more threads
than there are CPUs.  A second team (the loop's, left from loading the model) made them sleep after every
operation, so that each operation of a two-threaded forward paid a wake-up: a lone S/16 image took 18 % longer
at capacity 1.0 and 39 % longer at 0.25 than with one team (through the server, 2 vCPUs, AMD EPYC).  The
team's threads run at the inference threads' lower priority (server/core/priority.py), so while they spin
the event loop still gets the CPU first.
"""

from __future__ import annotations

import logging
import math
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mone.model import (
    Checkpoint,
    MoNE,
    MoNEConfig,
    expert_counts,
    gflops,
    inference,
    load_checkpoint,
    sample_gflops,
    save_checkpoint,
)
from mone.model.inference import calibrate_full_width
from mone.server.config import Settings
from mone.server.core.budget import Budget
from mone.server.core.capture import CapturedForward, CudaGraphs, accounting, capture_sizes
from mone.server.core.compiled import CompiledPlans, compiled_plans_for
from mone.server.core.latency import LatencyModel
from mone.server.core.precision import cast_model, dtype_name, resolve_dtype
from mone.server.core.priority import current_thread_nice, set_thread_priority
from mone.server.core.request import InferRequest

log = logging.getLogger("mone.runner")
AUTO_STREAMS_MAX = 4  # beyond this, side-by-side forwards would queue for the GIL between their operations
STREAM_BALANCE = 1.15  # split only when the largest sub-batch is within this factor of an even share
STREAM_MIN_GFLOPS = 0.5  # `stream_min_gflops` when start-up does not measure it
THREAD_BATCHES = (1, 2, 4, 8, 16, 32, 64)  # batch sizes `calibrate_threads` may time
# In a process that runs forwards side by side (streams), a split of the experts into several products must
# win the start-up measurement by this factor to be used (`calibrate_full_width`'s margin): under load the
# other forwards' and the event loop's Python compete for the interpreter lock at every operation, and the
# split has more of them.  Shipped Mi/4, one process, two streams, 16 clients (2 vCPUs): full width
# everywhere served 367 req/s at capacity 0.5 and 351 at 0.25, against 330 and 326 with the threshold
# measured without a margin (47 rows), which a margin of 1.3 no longer picks; S/16's split wins by far more.
# A process with one stream (a worker of one thread, server/workers.py) measures without it: there the
# threshold measured without a margin (48 rows) served 1.17x the requests/s at 0.25 of the one measured
# with it (93-187).
SPLIT_MARGIN = 1.3
# The product cost is the largest of this many measurements: near the margin one start-up's measure moved
# between 47 and 528 rows on the same model, and one that finds products cheap by chance costs throughput
# under load for as long as the server runs.
CALIBRATIONS = 3


class CheckpointMissingError(RuntimeError):
    """The configured checkpoint does not exist."""


@dataclass
class SampleOutput:
    """What one sample of a batch produced."""

    logits: list[float]
    top_indices: list[int]
    top_probs: list[float]
    realised: float
    counts: tuple[int, ...]
    gflops: float
    experts: Tensor | None  # (T, N) int8 when routing was asked for


@dataclass
class BatchOutput:
    samples: list[SampleOutput]
    seconds: float


@dataclass
class _Part:
    """One sub-batch's outputs, on the CPU."""

    logits: Tensor
    top_p: Tensor
    top_i: Tensor
    capacity: Tensor
    counts: Tensor
    gflops: Tensor
    experts: Tensor | None


_local = threading.local()

# torch's intra-op threads for a thread that sets none (OMP_NUM_THREADS, else one per CPU), read before any
# thread of the server sets its own: `setup_threads`' default.
TORCH_THREADS = torch.get_num_threads()


def _use_threads(n: int) -> None:
    """Give the calling thread `n` intra-op threads (torch keeps the count per thread once it has run)."""
    if getattr(_local, "threads", None) != n:
        torch.set_num_threads(n)
        _local.threads = n


def serial_thread() -> None:
    """Keep the calling thread to one intra-op thread, so that it never starts an OpenMP team of its own:
    for every thread of the server but the inference thread and its streams (see the module's docstring).
    Also a thread pool's initializer."""
    _use_threads(1)


def resolve_streams(setting: int, device: torch.device, threads: int) -> int:
    """Side-by-side sub-batches: 1 on a GPU, `setting` when given, else one per intra-op thread up to
    AUTO_STREAMS_MAX."""
    if device.type != "cpu":
        return 1
    return setting if setting > 0 else max(1, min(threads, AUTO_STREAMS_MAX))


def split_batch(
    costs: Sequence[float],
    streams: int,
    min_gflops: float,
    balance: float = STREAM_BALANCE,
    work: float | None = None,
) -> list[list[int]]:
    """The sample indices of each sub-batch of a batch whose samples cost `costs` GFLOPs.

    As many sub-batches as there are streams, samples and multiples of `min_gflops` in the batch's `work`
    (default: its GFLOPs), filled largest first into the lightest one; fewer when the largest would exceed
    `balance` times an even share (three equal samples on two streams: two then one would take longer than
    all three on both threads).  One sub-batch of every sample when no split qualifies.
    """
    n, total = len(costs), float(sum(costs))
    k = min(streams, n)
    if min_gflops > 0:
        k = min(k, int((total if work is None else work) // min_gflops))
    order = sorted(range(n), key=lambda i: (-costs[i], i))
    while k > 1:
        loads = [0.0] * k
        pieces: list[list[int]] = [[] for _ in range(k)]
        for i in order:
            j = min(range(k), key=loads.__getitem__)
            pieces[j].append(i)
            loads[j] += costs[i]
        if max(loads) <= balance * total / k:
            return [sorted(p) for p in pieces]
        k -= 1
    return [list(range(n))]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} was asked for, but CUDA is not available")
    return device


def load_model(settings: Settings, device: torch.device) -> Checkpoint:
    """The configured checkpoint, or (with random_init) a randomly initialised model of random_variant."""
    if settings.random_init:
        log.warning("serving a RANDOMLY INITIALISED %s model (development only)", settings.random_variant)
        torch.manual_seed(0)
        cfg = MoNEConfig.from_variant(settings.random_variant, num_classes=settings.random_classes)
        net = MoNE(cfg).eval()
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(tmp, net, meta={"random_init": True})
            ck = load_checkpoint(tmp, device=device)
        ck.path = None
        return ck
    path = Path(settings.checkpoint)
    if not path.exists():
        raise CheckpointMissingError(
            f"checkpoint {path} does not exist; set MONE_CHECKPOINT / --checkpoint to a checkpoint "
            "directory, "
            "or start with --random-init for development"
        )
    return load_checkpoint(
        path,
        device=device,
        expected_sha256=settings.checkpoint_sha256,
        allow_unverified=settings.allow_unverified_checkpoint,
    )


class Runner:
    """Runs batches through the model.

    Args:
        checkpoint: the loaded model.
        device: where inputs go.
        streams: sub-batches run side by side on the CPU (0: auto; see `resolve_streams`).
        min_stream_gflops: least work of a sub-batch (None: STREAM_MIN_GFLOPS until `calibrate_threads`).
        serial_gflops: a batch run whole with at most this much dense work gets one intra-op thread.
        dtype: the inference dtype (server/core/precision.py); fp32 leaves the model as loaded.
        cuda_graphs: on a CUDA device, capture the forward per batch size, frames and token split
            (server/core/capture.py), up to `max_graphs` graphs of batches up to `max_batch`.
    """

    def __init__(
        self,
        checkpoint: Checkpoint,
        device: torch.device,
        *,
        streams: int = 1,
        min_stream_gflops: float | None = 0.0,
        serial_gflops: float | None = 0.0,
        dtype: str = "fp32",
        cuda_graphs: bool = False,
        max_batch: int = 32,
        max_graphs: int = 64,
        packed_weights: bool = True,
        compiled_plans: bool = False,
        compile_dir: str | None = None,
        compile_max_batch: int = 8,
    ) -> None:
        # Process-wide, as one process serves one model.
        inference.PACKED = packed_weights and inference.packing_available()
        self.checkpoint = checkpoint
        self.dtype = resolve_dtype(dtype, device)
        self.model = cast_model(checkpoint.model.to(device).eval(), self.dtype)
        self.cfg = checkpoint.config
        self.device = device
        self.min_stream_gflops = STREAM_MIN_GFLOPS if min_stream_gflops is None else min_stream_gflops
        self.serial_gflops = serial_gflops or 0.0
        self.threads: int | None = None  # intra-op threads of a whole batch; set by `setup_threads`
        # The product cost (`set_full_width_rows`) of a batch split over the streams or run serially, and of
        # one run whole on every intra-op thread; None: the model's own.
        self.rows_pieces: float | None = None
        self.rows_whole: float | None = None
        self.streams = 1
        self._streams_setting = streams
        self._pool: ThreadPoolExecutor | None = None
        self.graphs: CapturedForward | None = None
        if cuda_graphs and device.type == "cuda":
            self.graphs = CapturedForward(
                self.model, CudaGraphs(device), capture_sizes(max_batch), max_graphs=max_graphs
            )
        self.compiled: CompiledPlans | None = None
        self.serving = False  # set once warm-up and calibration are done: batches count towards compiling
        if compiled_plans and device.type == "cpu":
            self.compiled = compiled_plans_for(
                self.model, checkpoint.path, checkpoint.sha256, self.dtype, compile_dir, compile_max_batch
            )

    @classmethod
    def from_settings(cls, checkpoint: Checkpoint, device: torch.device, settings: Settings) -> Runner:
        return cls(
            checkpoint,
            device,
            streams=settings.inference_streams,
            min_stream_gflops=settings.stream_min_gflops,
            serial_gflops=settings.serial_max_gflops,
            dtype=settings.inference_dtype,
            cuda_graphs=settings.cuda_graphs,
            max_batch=settings.max_batch_size,
            max_graphs=settings.cuda_graphs_max,
            packed_weights=settings.packed_weights,
            compiled_plans=settings.compiled_plans,
            compile_dir=settings.compile_dir,
            compile_max_batch=settings.compile_max_batch,
        )

    def setup_threads(self, threads: int | None) -> None:
        """On the inference thread, before its first forward: its intra-op threads (torch's default when
        None, `TORCH_THREADS`) and the stream threads, which run at its priority (server/core/priority.py)."""
        self.threads = threads or TORCH_THREADS
        _use_threads(self.threads)
        self.streams = resolve_streams(self._streams_setting, self.device, self.threads)
        if self.streams > 1 and self._pool is None:
            self._pool = ThreadPoolExecutor(
                self.streams - 1,
                thread_name_prefix="mone-stream",
                initializer=set_thread_priority,
                initargs=(current_thread_nice(),),
            )
        log.info("%d intra-op threads, %d stream(s)", self.threads, self.streams)

    def calibrate_threads(
        self,
        max_batch: int,
        repeats: int = 3,
        min_stream: float | None = None,
        serial: float | None = None,
    ) -> None:
        """On the inference thread: `serial_gflops` and `min_stream_gflops` as given, else measured on images
        at capacity 1.0.  Serial: the largest batch, of growing sizes, that runs whole no slower on one
        intra-op thread than on all of them.  Streams: the smallest batch that runs faster split over the
        streams than whole (as it would run whole, serial or not); never split when none does."""
        dense = gflops(self.cfg, 1.0, 1)
        sizes = [b for b in THREAD_BATCHES if b <= max(max_batch, 1)]
        if serial is None:
            serial = 0.0
            if self.device.type == "cpu" and (self.threads or 1) > 1:
                for b in sizes:
                    if self._time_whole(b, 1, repeats) > self._time_whole(b, self.threads, repeats):
                        break
                    serial = b * dense
        self.serial_gflops = serial
        if min_stream is None and self._pool is None:
            min_stream = STREAM_MIN_GFLOPS
        elif min_stream is None:
            min_stream = math.inf
            for b in (b for b in sizes if b >= self.streams):
                whole = self._time_whole(b, self.whole_threads(b * dense), repeats)
                if self._time_split(b, repeats) < whole:
                    min_stream = b * dense / self.streams
                    break
        self.min_stream_gflops = min_stream
        _use_threads(self.threads or 1)
        log.info(
            "one intra-op thread for batches up to %.3g GFLOPs; %d streams from %.3g GFLOPs a stream",
            self.serial_gflops,
            self.streams,
            self.min_stream_gflops,
        )

    def _time_whole(self, batch: int, threads: int | None, repeats: int) -> float:
        """Median seconds of a batch of `batch` zero images at capacity 1.0, run whole on `threads`."""
        xs, splits = [self.dummy(1)] * batch, [self.token_split(1.0)] * batch
        return _median_seconds(lambda: self._forward(xs, splits, threads, 1, False), repeats)

    def _time_split(self, batch: int, repeats: int) -> float:
        """Median seconds of the same batch split over the streams."""
        xs, splits = [self.dummy(1)] * batch, [self.token_split(1.0)] * batch
        pieces = split_batch([sample_gflops(self.cfg, s, 1) for s in splits], self.streams, 0.0)
        return _median_seconds(lambda: self._forward_split(xs, splits, pieces, 1, False), repeats)

    def _side_by_side(self, x: Tensor, capacity: float) -> None:
        """`x` at `capacity` on every stream at once, each on `piece_threads` (calibration)."""
        assert self._pool is not None

        def piece() -> None:
            _use_threads(self.piece_threads)
            with torch.inference_mode():
                self.model(x, capacity)

        futures = [self._pool.submit(piece) for _ in range(self.streams - 1)]
        piece()
        for future in futures:
            future.result()

    @property
    def piece_threads(self) -> int:
        """Intra-op threads of one sub-batch of a split batch (and of a batch run serially)."""
        return max(1, (self.threads or 1) // self.streams)

    def set_full_width_rows(self, rows: float | None, max_batch: int, repeats: int = 2) -> None:
        """What one more matrix product costs the model, in rows of full-width work (`plan_runs` in
        model/inference.py): `rows` when given, else measured here for each way a batch runs on the CPU.
        Split over the streams (and serially): one forward on every stream at once, each with the intra-op
        threads of a sub-batch (`rows_pieces`).  Whole on every intra-op thread (`rows_whole`): there each
        operation also wakes the other threads, so a product costs more."""
        if rows is not None:
            self.rows_pieces = self.rows_whole = rows
        else:
            batches = [b for b in THREAD_BATCHES if b <= max(max_batch, 1)]
            forward = self._side_by_side if self._pool is not None else None
            margin = SPLIT_MARGIN if self._pool is not None else 1.0  # forwards side by side, or not
            self.rows_pieces = self._measure_rows(batches, repeats, self.piece_threads, forward, margin)
            self.rows_whole = self.rows_pieces
            if self._pool is not None and (self.threads or 1) > self.piece_threads:
                self.rows_whole = self._measure_rows(batches, repeats, self.threads or 1, None, margin)
        self.model.full_width_rows = self.rows_pieces
        log.info(
            "one more matrix product costs %.0f token rows of full-width work (%.0f for a batch on every "
            "intra-op thread)",
            self.rows_pieces,
            self.rows_whole,
        )

    def _plan_for(self, threads: int) -> None:
        """Runs of experts planned with the product cost of a forward on `threads` intra-op threads (once
        measured)."""
        if self.rows_pieces is not None and self.rows_whole is not None:
            self.model.full_width_rows = self.rows_whole if threads > self.piece_threads else self.rows_pieces

    def _measure_rows(
        self,
        batches: list[int],
        repeats: int,
        threads: int,
        forward: Callable[[Tensor, float], None] | None,
        margin: float,
    ) -> float:
        _use_threads(threads)
        try:
            return max(
                calibrate_full_width(
                    self.model, batches, repeats=repeats, budget_s=1.0, forward=forward, margin=margin
                )
                for _ in range(CALIBRATIONS)
            )
        finally:
            _use_threads(self.threads or 1)

    def close(self) -> None:
        if self.compiled is not None:
            self.compiled.close()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def dense_work(self, frames: int, samples: int) -> float:
        """GFLOPs of `samples` inputs of `frames` frames at capacity 1.0.  How a batch runs (split, one thread
        or all) is judged on it: what streams and fewer threads save is per-operation overhead, and a lower
        capacity has as many operations (more, with more token groups), not fewer."""
        return samples * gflops(self.cfg, 1.0, frames)

    def whole_threads(self, work: float) -> int | None:
        """Intra-op threads of a batch run whole with `work` dense GFLOPs."""
        return 1 if work <= self.serial_gflops else self.threads

    def split(self, frames: int, splits: Sequence[tuple[int, ...]]) -> list[list[int]]:
        """The sub-batches a batch of these token splits runs as."""
        if self._pool is None or len(splits) < 2:  # no stream threads: one stream, or closed
            return [list(range(len(splits)))]
        costs = [sample_gflops(self.cfg, s, frames) for s in splits]
        work = self.dense_work(frames, len(splits))
        return split_batch(costs, self.streams, self.min_stream_gflops, work=work)

    def run(self, batch: Sequence[InferRequest], splits: Sequence[tuple[int, ...]]) -> BatchOutput:
        """Forward one batch of requests of same-shaped (T, C, H, W) inputs, each at the token split its
        planning chose (`Level.counts`): the model gets the splits as they are."""
        start = time.perf_counter()
        xs, top_ks, routing = [r.x for r in batch], [r.top_k for r in batch], [r.routing for r in batch]
        k = min(max(top_ks), self.cfg.num_classes)
        want_experts = any(routing)
        frames = int(xs[0].shape[0])
        pieces = self.split(frames, splits)
        if len(pieces) == 1:
            threads = self.whole_threads(self.dense_work(frames, len(splits)))
            self._plan_for(threads or 1)
            parts = [self._forward(xs, splits, threads, k, want_experts)]
        else:
            self._plan_for(self.piece_threads)
            parts = self._forward_split(xs, splits, pieces, k, want_experts)
        if self.device.type == "cuda":  # the outputs are on the host already; the clock waits for the device
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        located = {i: (p, j) for p, piece in enumerate(pieces) for j, i in enumerate(piece)}
        samples = []
        for i, tk in enumerate(top_ks):
            p, j = located[i]
            part = parts[p]
            kk = min(tk, self.cfg.num_classes)
            samples.append(
                SampleOutput(
                    logits=part.logits[j].tolist(),
                    top_indices=part.top_i[j, :kk].tolist(),
                    top_probs=part.top_p[j, :kk].tolist(),
                    realised=float(part.capacity[j]),
                    counts=tuple(int(c) for c in part.counts[j].tolist()),
                    gflops=float(part.gflops[j]),
                    experts=part.experts[j] if part.experts is not None and routing[i] else None,
                )
            )
        return BatchOutput(samples, seconds)

    def _forward_split(
        self,
        xs: list[Tensor],
        splits: Sequence[tuple[int, ...]],
        pieces: list[list[int]],
        k: int,
        experts: bool,
    ) -> list[_Part]:
        """The first sub-batch on this thread, the others on the stream threads; every one is waited for
        before an error is raised, so that no thread is still computing when the next batch starts."""
        assert self._pool is not None
        threads = max(1, (self.threads or 1) // len(pieces))

        def piece_args(piece: list[int]) -> tuple[list[Tensor], list[tuple[int, ...]]]:
            return [xs[i] for i in piece], [splits[i] for i in piece]

        futures: list[Future[_Part]] = [
            self._pool.submit(self._forward, *piece_args(piece), threads, k, experts) for piece in pieces[1:]
        ]
        parts: list[_Part] = []
        error: BaseException | None = None
        try:
            parts.append(self._forward(*piece_args(pieces[0]), threads, k, experts))
        except BaseException as exc:  # noqa: BLE001 - re-raised below, after the other sub-batches
            error = exc
        for future in futures:
            try:
                parts.append(future.result())
            except BaseException as exc:  # noqa: BLE001
                error = error or exc
        if error is not None:
            raise error
        return parts

    def _forward(
        self, xs: list[Tensor], splits: Sequence[tuple[int, ...]], threads: int | None, k: int, experts: bool
    ) -> _Part:
        if threads is not None:
            _use_threads(threads)
        with torch.inference_mode():
            x = self._to_device(xs)
            compiled = None if self.compiled is None else self.compiled.lookup(x, splits, count=self.serving)
            if compiled is not None and not bool(torch.isfinite(x).all()):
                compiled = None  # eagerly, for the model's error
            if self.graphs is not None:
                logits, expert_map, ran = self.graphs(x, splits)
                capacity, counts, gf = accounting(self.cfg, ran, int(x.shape[1]))
            elif compiled is not None:
                logits, expert_map = compiled(x)
                capacity, counts, gf = accounting(self.cfg, splits, int(x.shape[1]))
            else:
                out = self.model(x, splits=splits)
                logits, expert_map = out.logits, out.experts
                capacity, counts, gf = out.capacity, out.expert_counts, out.gflops
            logits = logits.float()
            top = logits.softmax(dim=-1).topk(k, dim=-1)
            return _Part(
                logits=logits.cpu(),
                top_p=top.values.cpu(),
                top_i=top.indices.cpu(),
                capacity=capacity,
                counts=counts,
                gflops=gf,
                experts=expert_map.cpu() if experts else None,
            )

    def _to_device(self, xs: list[Tensor]) -> Tensor:
        """The batch on the model's device; on CUDA stacked into pinned (page-locked) host memory first, so
        that the copy is asynchronous and the host goes on queueing the forward behind it."""
        if self.device.type != "cuda":
            return torch.stack(xs).to(self.device, non_blocking=True)
        host = torch.empty((len(xs), *xs[0].shape), dtype=xs[0].dtype, pin_memory=True)
        torch.stack(xs, out=host)
        return host.to(self.device, non_blocking=True)

    def smallest_split(self, frames: int, max_batch: int) -> int:
        """The smallest batch at capacity 1.0, up to `max_batch`, that runs on every stream; 0 if none."""
        if self.streams < 2:
            return 0
        dense = self.token_split(1.0)
        for b in range(self.streams, max_batch + 1):
            if len(self.split(frames, [dense] * b)) == self.streams:
                return b
        return 0

    def dummy(self, frames: int) -> Tensor:
        c = self.cfg
        return torch.zeros(frames, c.in_chans, c.img_size, c.img_size)

    def token_split(self, capacity: float) -> tuple[int, ...]:
        """The token split of `capacity` (warm-up and calibration: served requests come planned)."""
        return expert_counts(capacity, self.cfg.num_tokens, self.cfg.num_experts)

    def dummy_batch(self, frames: int, capacities: Sequence[float]) -> list[InferRequest]:
        """Requests of zero inputs at `capacities`, top-1, for warm-up and calibration."""
        x = self.dummy(frames)
        kind = "image" if frames == 1 else "clip"  # the calibration's inputs: one image, or one full clip
        return [InferRequest(x, kind, Budget("capacity", c), top_k=1) for c in capacities]

    def run_dummy(self, frames: int, capacities: Sequence[float]) -> BatchOutput:
        """One forward of a batch of zero inputs at `capacities`."""
        return self.run(self.dummy_batch(frames, capacities), [self.token_split(c) for c in capacities])

    def time_batch(self, frames: int, batch: int, capacity: float, repeats: int) -> float:
        """Median seconds of `repeats` forwards of a uniform batch."""
        times = [self.run_dummy(frames, [capacity] * batch).seconds for _ in range(repeats)]
        return statistics.median(times)

    def describe(self) -> dict[str, Any]:
        ck = self.checkpoint
        return {
            "path": str(ck.path) if ck.path else None,
            "sha256": ck.sha256,
            "meta": ck.meta,
            "full_width_rows": self.model.full_width_rows if self.rows_pieces is None else self.rows_pieces,
            "full_width_rows_whole": self.rows_whole,
            "packed_weights": inference.PACKED and self.device.type == "cpu" and self.dtype == torch.float32,
            "threads": self.threads,
            "serial_gflops": self.serial_gflops,
            "streams": self.streams,
            "stream_min_gflops": self.min_stream_gflops if math.isfinite(self.min_stream_gflops) else None,
            "dtype": dtype_name(self.dtype),
            "cuda_graphs": self.graphs is not None,
            "compiled_plans": None if self.compiled is None else self.compiled.describe(),
        }


def _median_seconds(run: Callable[[], object], repeats: int) -> float:
    """Median seconds of `repeats` calls of `run`, after one untimed call (warm-up of that shape and way)."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def warm_up_and_calibrate(
    runner: Runner, latency: LatencyModel, settings: Settings, kinds: list[int]
) -> None:
    """Warm the model up and measure the latency model: batch sizes x capacities x input kinds (frames per
    sample), plus one mixed batch per kind so that the cost of an extra token split is identifiable."""
    s, cfg = settings, runner.cfg
    runner.setup_threads(s.threads)
    if s.calibrate:  # else the runner keeps the settings' thresholds (STREAM_MIN_GFLOPS and 0 when unset)
        if s.warmup_iters:
            runner.time_batch(1, 1, 1.0, s.warmup_iters)
        runner.calibrate_threads(
            s.max_batch_size, max(3, s.calibration_repeats), s.stream_min_gflops, s.serial_max_gflops
        )
    if s.full_width_rows is not None or s.calibrate:
        runner.set_full_width_rows(s.full_width_rows, s.max_batch_size, s.calibration_repeats)
    for frames in kinds:
        if s.warmup_iters:
            runner.time_batch(frames, 1, 1.0, s.warmup_iters)
            split = runner.smallest_split(frames, s.max_batch_size)
            if split:  # the stream threads' first forward (thread pools, allocator arenas) is slow
                runner.time_batch(frames, split, 1.0, 1)
        if not s.calibrate:
            continue
        sizes = sorted({min(b, s.max_batch_size) for b in s.calibration_batch_sizes})
        for b in sizes:
            for c in s.calibration_capacities:
                if runner.graphs is not None:  # capture first: the measurements time replays
                    runner.time_batch(frames, b, c, 1)
                seconds = runner.time_batch(frames, b, c, s.calibration_repeats)
                latency.observe(frames, 1, b * gflops(cfg, c, frames), seconds, calibration=True)
                latency.observe_uniform(frames, b, c, seconds)
        b = sizes[-1]
        if b > 1:
            caps = [cfg.min_capacity, 1.0] * (b // 2) + [1.0] * (b % 2)
            if runner.graphs is not None:
                runner.run_dummy(frames, caps)
            out = runner.run_dummy(frames, caps)
            latency.observe(
                frames, 2, sum(gflops(cfg, c, frames) for c in caps), out.seconds, calibration=True
            )
        log.info("latency model for %d-frame inputs: %s", frames, latency.to_dict().get(str(frames)))
