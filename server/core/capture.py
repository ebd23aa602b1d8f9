"""The forward captured once per (batch size, frames, token split) and replayed: one launch sequence a batch.

On a GPU every operation of the nested forward is a kernel launch, and a layer runs up to four matrix
products per projection where a dense layer runs one; at small batches the launches, not the arithmetic,
set the time.  A captured graph (CUDA graphs) replays the whole forward's kernels with one call.

A graph holds fixed shapes and fixed memory, so a capture is keyed by what fixes them: the padded batch size,
the frames per sample and the token split (tokens per expert, which sets every matrix product's rows).  A
batch is grouped by token split (samples do not interact in the forward, so each group runs on its own);
each group is copied into the static input of the smallest captured batch size that holds it (the rows
beyond it keep whatever they held: their outputs are never read), replayed, and its rows of the static
outputs copied out before anything else replays.  Groups larger than the largest size run in pieces.  A key
whose capture fails (an operation the device cannot capture) runs eagerly from then on, as does everything
when capture is off; at most `max_graphs` graphs are kept, the least recently used dropped first.

A captured forward runs one product per expert for every split (`plan_runs` in model/inference.py with no cost
per product): runs of several experts at full width with masks exist to save per-operation overhead, which a
replay no longer pays.  A graph cannot hold a copy from pageable host memory, and the model's forward still
makes one for every split that uses several experts (the run of each expert, `MoNE.encode_frames`); until the
model keeps those small index tensors on the device, such splits fail to capture and run eagerly (one warning
per key), and only single-expert splits (capacity 1.0, and the lowest capacity) replay.

The device calls sit behind `GraphBackend` (`CudaGraphs` on CUDA), so that the keying, padding and fallback
run on the CPU in the tests with a backend that replays by calling the forward again.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from mone.model import MoNE, MoNEConfig, realised_capacity, sample_gflops

log = logging.getLogger("mone.capture")

Key = tuple[int, int, tuple[int, ...]]  # (batch size, frames, token split)
Outputs = tuple[Tensor, Tensor]  # logits (B, classes), experts (B, T, N) int8


class Graph(Protocol):
    def replay(self) -> None: ...


class GraphBackend(Protocol):
    def capture(self, fn: Callable[[], Outputs]) -> tuple[Graph, Outputs]:
        """Capture `fn`; the graph and the outputs that every replay overwrites."""
        ...


class CudaGraphs:
    """torch.cuda.CUDAGraph capture: `warmup` eager runs on a side stream (lazy initialisations, the
    allocator's first blocks), then the capture, each graph in a memory pool of its own."""

    def __init__(self, device: torch.device, warmup: int = 2) -> None:
        self.device = device
        self.warmup = warmup

    def capture(self, fn: Callable[[], Outputs]) -> tuple[Graph, Outputs]:
        side = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                fn()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            out = fn()
        return graph, out


def capture_sizes(max_batch: int) -> list[int]:
    """Powers of two below `max_batch`, and `max_batch`: a batch pads to at most twice its size."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return [*sizes, max(1, max_batch)]


def accounting(
    cfg: MoNEConfig, splits: Sequence[tuple[int, ...]], frames: int
) -> tuple[Tensor, Tensor, Tensor]:
    """(B,) realised capacity, (B, E) token split and (B,) GFLOPs of each sample, as `MoNE.forward` reports
    them."""
    f64 = torch.float64
    return (
        torch.tensor([realised_capacity(s) for s in splits], dtype=f64),
        torch.tensor([list(s) for s in splits], dtype=torch.long),
        torch.tensor([sample_gflops(cfg, s, frames) for s in splits], dtype=f64),
    )


@dataclass
class _Entry:
    graph: Graph
    x: Tensor  # static input (b, T, C, H, W)
    logits: Tensor
    experts: Tensor


@dataclass
class Piece:
    """Samples of a batch that run as one replay (or one eager forward)."""

    key: Key
    rows: list[int]  # indices into the batch


class CapturedForward:
    """Runs a model's batches through captured graphs.

    Args:
        model: the model, on its device, in its inference dtype.
        backend: how graphs are captured and replayed; None runs every batch eagerly.
        sizes: the batch sizes captured (see `capture_sizes`).
        max_graphs: graphs kept at once.
        per_expert: capture one product per expert for every split (see the module's note).
    """

    def __init__(
        self,
        model: MoNE,
        backend: GraphBackend | None,
        sizes: Sequence[int],
        *,
        max_graphs: int = 64,
        per_expert: bool = True,
    ) -> None:
        if not sizes or min(sizes) < 1:
            raise ValueError("capture sizes must be positive")
        self.model = model
        self.cfg = model.cfg
        self.backend = backend
        self.sizes = sorted(set(sizes))
        self.max_graphs = max_graphs
        self.per_expert = per_expert
        self.graphs: OrderedDict[Key, _Entry] = OrderedDict()
        self.failed: set[Key] = set()
        self.captures = self.replays = self.eager = 0

    def bucket(self, n: int) -> int:
        """The captured batch size that holds `n` samples (n at most the largest size)."""
        return next(b for b in self.sizes if b >= n)

    def plan(self, frames: int, splits: Sequence[tuple[int, ...]]) -> list[Piece]:
        """The pieces a batch of these token splits runs as: grouped by split in order of first appearance,
        each group cut into pieces of at most the largest size, each piece keyed by the size it pads to."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, split in enumerate(splits):
            groups.setdefault(tuple(split), []).append(i)
        top = self.sizes[-1]
        pieces = []
        for split, rows in groups.items():
            for s in range(0, len(rows), top):
                part = rows[s : s + top]
                pieces.append(Piece((self.bucket(len(part)), frames, split), part))
        return pieces

    def __call__(
        self, x: Tensor, splits: Sequence[tuple[int, ...]]
    ) -> tuple[Tensor, Tensor, list[tuple[int, ...]]]:
        """Logits (B, classes), experts (B, T, N) int8 on the model's device, and each sample's token split,
        for x (B, T, C, H, W) on the model's device run at `splits` (one per sample, as planned)."""
        B, T = x.shape[:2]
        N = self.cfg.num_tokens
        pieces = self.plan(T, splits)
        logits: Tensor | None = None
        experts = torch.empty(B, T, N, dtype=torch.int8, device=x.device)
        for piece in pieces:
            n = len(piece.rows)
            whole = n == B  # the whole batch in order: no gather, no scatter
            xs = x if whole else x.index_select(0, self._index(piece.rows, x.device))
            out = self._run(piece, xs)
            if out is None:
                res = self.model(xs, splits=[piece.key[2]] * n)
                out_logits, out_experts = res.logits, res.experts
                self.eager += 1
            else:
                out_logits, out_experts = out[0][:n], out[1][:n]
            if logits is None:
                logits = out_logits.new_empty(B, out_logits.shape[-1])
            if whole:
                logits.copy_(out_logits)
                experts.copy_(out_experts)
            else:
                index = self._index(piece.rows, x.device)
                logits.index_copy_(0, index, out_logits)
                experts.index_copy_(0, index, out_experts)
        assert logits is not None
        return logits, experts, [tuple(s) for s in splits]

    @staticmethod
    def _index(rows: list[int], device: torch.device) -> Tensor:
        return torch.tensor(rows, dtype=torch.long).to(device, non_blocking=True)

    def _run(self, piece: Piece, xs: Tensor) -> Outputs | None:
        """Replay the piece's graph (capturing it first if need be); None where it runs eagerly."""
        if self.backend is None or piece.key in self.failed:
            return None
        entry = self.graphs.get(piece.key)
        if entry is None:
            entry = self._capture(piece.key, xs)
            if entry is None:
                return None
        self.graphs.move_to_end(piece.key)
        entry.x[: xs.shape[0]].copy_(xs, non_blocking=True)
        entry.graph.replay()
        self.replays += 1
        return entry.logits, entry.experts

    def _capture(self, key: Key, like: Tensor) -> _Entry | None:
        assert self.backend is not None
        b, split = key[0], key[2]
        dtype = next(self.model.parameters()).dtype
        static = torch.zeros((b, *like.shape[1:]), dtype=dtype, device=like.device)
        static[: like.shape[0]].copy_(like)
        splits = [split] * b
        model = self.model

        def forward() -> Outputs:
            out = model(static, splits=splits)
            return out.logits, out.experts

        keep = model.full_width_rows
        if self.per_expert:
            model.full_width_rows = 0.0
        try:
            graph, (logits, experts) = self.backend.capture(forward)
        except Exception as exc:  # noqa: BLE001 - any capture failure means eager for this key
            self.failed.add(key)
            log.warning("capture of batch %d, %d frame(s), split %s failed, runs eagerly: %s", *key, exc)
            return None
        finally:
            model.full_width_rows = keep
        while len(self.graphs) >= self.max_graphs:
            self.graphs.popitem(last=False)
        entry = _Entry(graph, static, logits, experts)
        self.graphs[key] = entry
        self.captures += 1
        log.info("captured batch %d, %d frame(s), split %s (%d graphs)", *key, len(self.graphs))
        return entry
