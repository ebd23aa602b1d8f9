"""The predict stage: one batched forward pass of the model, run on the engine's single worker thread.

Loading (checkpoint or random initialisation), device choice, warm-up and latency calibration live here too:
everything that touches the model's weights.  Nothing here knows about queues or HTTP.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from model import Checkpoint, MoNE, MoNEConfig, gflops, load_checkpoint, save_checkpoint
from server.config import Settings
from server.latency import LatencyModel

log = logging.getLogger("mone.runner")


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
    return load_checkpoint(path, device=device, expected_sha256=settings.checkpoint_sha256)


class Runner:
    """Runs batches through the model.

    Args:
        checkpoint: the loaded model.
        device: where inputs go.
    """

    def __init__(self, checkpoint: Checkpoint, device: torch.device) -> None:
        self.checkpoint = checkpoint
        self.model = checkpoint.model.to(device).eval()
        self.cfg = checkpoint.config
        self.device = device

    def run(
        self, xs: list[Tensor], capacities: list[float], top_ks: list[int], routing: list[bool]
    ) -> BatchOutput:
        """Forward one batch of same-shaped (T, C, H, W) inputs with one e_c each."""
        start = time.perf_counter()
        with torch.inference_mode():
            x = torch.stack(xs).to(self.device, non_blocking=True)
            out = self.model(x, capacity=capacities)
            probs = out.logits.float().softmax(dim=-1)
            k = min(max(top_ks), self.cfg.num_classes)
            top = probs.topk(k, dim=-1)
            logits = out.logits.float().cpu()
            top_p, top_i = top.values.cpu(), top.indices.cpu()
            experts = out.experts.cpu() if any(routing) else None
        seconds = time.perf_counter() - start
        samples = []
        for i, tk in enumerate(top_ks):
            kk = min(tk, self.cfg.num_classes)
            samples.append(
                SampleOutput(
                    logits=logits[i].tolist(),
                    top_indices=top_i[i, :kk].tolist(),
                    top_probs=top_p[i, :kk].tolist(),
                    realised=float(out.capacity[i]),
                    counts=tuple(int(c) for c in out.expert_counts[i].tolist()),
                    gflops=float(out.gflops[i]),
                    experts=experts[i] if experts is not None and routing[i] else None,
                )
            )
        return BatchOutput(samples, seconds)

    def dummy(self, frames: int) -> Tensor:
        c = self.cfg
        return torch.zeros(frames, c.in_chans, c.img_size, c.img_size)

    def time_batch(self, frames: int, batch: int, capacity: float, repeats: int) -> float:
        """Median seconds of `repeats` forwards of a uniform batch."""
        xs = [self.dummy(frames)] * batch
        times = [
            self.run(xs, [capacity] * batch, [1] * batch, [False] * batch).seconds for _ in range(repeats)
        ]
        return statistics.median(times)

    def describe(self) -> dict[str, Any]:
        ck = self.checkpoint
        return {
            "path": str(ck.path) if ck.path else None,
            "sha256": ck.sha256,
            "meta": ck.meta,
        }


def warm_up_and_calibrate(
    runner: Runner, latency: LatencyModel, settings: Settings, kinds: list[int]
) -> None:
    """Warm the model up and measure the latency model: batch sizes x capacities x input kinds (frames per
    sample), plus one mixed batch per kind so that the cost of an extra token split is identifiable."""
    s, cfg = settings, runner.cfg
    if s.threads:
        torch.set_num_threads(s.threads)
    for frames in kinds:
        if s.warmup_iters:
            runner.time_batch(frames, 1, 1.0, s.warmup_iters)
        if not s.calibrate:
            continue
        sizes = sorted({min(b, s.max_batch_size) for b in s.calibration_batch_sizes})
        for b in sizes:
            for c in s.calibration_capacities:
                seconds = runner.time_batch(frames, b, c, s.calibration_repeats)
                latency.observe(frames, 1, b * gflops(cfg, c, frames), seconds, calibration=True)
        b = sizes[-1]
        if b > 1:
            caps = [cfg.min_capacity, 1.0] * (b // 2) + [1.0] * (b % 2)
            out = runner.run([runner.dummy(frames)] * b, caps, [1] * b, [False] * b)
            latency.observe(
                frames, 2, sum(gflops(cfg, c, frames) for c in caps), out.seconds, calibration=True
            )
        log.info("latency model for %d-frame inputs: %s", frames, latency.to_dict().get(str(frames)))
