"""`mone bench`: a load generator for mone-serve.

Closed loop (`concurrency` workers, each sending its next request when the last one is answered) or open
loop (arrivals at `rate` per second, Poisson, whatever the server's speed).  Each request draws its budget
from a weighted mix, of any kinds the server lists (`mone bench` asks `/v1/models` for them).  The client
does not retry here: a 429 is a result, counted under its status.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np

from mone.clients.client import AsyncMoneClient
from mone.clients.errors import MoneError
from mone.clients.media import Input
from mone.clients.schemas import NAMED_BUDGETS

BUDGETS = NAMED_BUDGETS  # the kinds a mix may name when the server's own list is not at hand
MAX_IN_FLIGHT = 1024  # open loop: beyond this the generator, not the server, would be the bottleneck


@dataclass(frozen=True)
class Budget:
    type: str | None  # None: the server default
    value: float | None
    weight: float = 1.0

    @property
    def name(self) -> str:
        return f"{self.type}={self.value:g}" if self.type else "default"

    def get(self, kind: str) -> float | None:
        return self.value if self.type == kind else None

    def option(self) -> dict[str, float] | None:
        """As the client's `budget=` argument (None: the server default)."""
        return {self.type: self.value} if self.type and self.value is not None else None


def parse_mix(text: str | None, kinds: Sequence[str] = BUDGETS) -> list[Budget]:
    """ "capacity=1.0:0.5,latency_ms=50:0.5" -> budgets with weights (weight defaults to 1); TYPE is one of
    `kinds` (the server's, `AsyncMoneClient.budget_kinds`) or `default`."""
    kinds = tuple(kinds)
    if not text:
        return [Budget(None, None)]
    mix = []
    for part in text.split(","):
        spec, _, weight = part.strip().partition(":")
        kind, _, value = spec.partition("=")
        if kind == "default" and not value:
            mix.append(Budget(None, None, float(weight or 1)))
            continue
        if kind not in kinds or not value:
            raise ValueError(f"bad mix entry {part!r}: expected TYPE=VALUE[:WEIGHT], TYPE one of {kinds}")
        mix.append(Budget(kind, float(value), float(weight or 1)))
    if any(b.weight <= 0 for b in mix):
        raise ValueError("mix weights must be positive")
    return mix


@dataclass
class Sample:
    budget: str
    latency_s: float
    status: int  # 200, an HTTP error status, or 0 for a transport failure
    gflops: float = 0.0
    dense_gflops: float = 0.0
    capacity: float | None = None
    deadline_met: bool | None = None


@dataclass
class Report:
    mode: str
    wall_s: float
    load: float = 0.0  # closed loop: concurrency; open loop: offered rate (requests per second)
    samples: list[Sample] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        ok = [s for s in self.samples if s.status == 200]
        timed = [s.deadline_met for s in ok if s.deadline_met is not None]
        gflops, dense = sum(s.gflops for s in ok), sum(s.dense_gflops for s in ok)
        by_budget = {}
        for name in sorted({s.budget for s in self.samples}):
            group = [s for s in ok if s.budget == name]
            by_budget[name] = {
                "requests": sum(s.budget == name for s in self.samples),
                "ok": len(group),
                **_percentiles([s.latency_s for s in group]),
                "mean_capacity": _mean([s.capacity for s in group if s.capacity is not None]),
            }
        return {
            "mode": self.mode,
            "concurrency" if self.mode == "closed" else "offered_rps": self.load,
            "duration_s": self.wall_s,
            "requests": len(self.samples),
            "ok": len(ok),
            "throughput_rps": len(ok) / self.wall_s if self.wall_s > 0 else 0.0,
            "latency_ms": _percentiles([s.latency_s for s in ok]),
            "deadline_hit_rate": sum(timed) / len(timed) if timed else None,
            "gflops_served": gflops,
            "gflops_dense": dense,
            "compute_saved": 1 - gflops / dense if dense > 0 else None,
            "errors": {
                str(k): v
                for k, v in sorted(Counter(s.status for s in self.samples if s.status != 200).items())
            },
            "by_budget": by_budget,
        }


def _percentiles(latencies: list[float]) -> dict[str, float | None]:
    if not latencies:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    ms = np.asarray(latencies) * 1e3
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(ms.mean())}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


class _Progress:
    """A one-line progress bar on stderr (only where stderr is a terminal, unless forced)."""

    def __init__(self, total: float, unit: str, enabled: bool, stream: TextIO = sys.stderr) -> None:
        self.total, self.unit, self.enabled, self.stream = total, unit, enabled, stream
        self.last = 0.0

    def update(self, done: float, count: int, errors: int, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self.last < 0.2 and not force):
            return
        self.last = now
        frac = min(1.0, done / self.total) if self.total else 1.0
        bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
        digits = 1 if self.unit == "s" else 0
        counts = f"{done:.{digits}f}/{self.total:.{digits}f} {self.unit}"
        self.stream.write(f"\r[{bar}] {counts}  {count} answered, {errors} errors")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


async def run(
    client: AsyncMoneClient,
    inputs: list[Input],
    mix: list[Budget],
    *,
    concurrency: int | None = None,
    rate: float | None = None,
    duration: float | None = None,
    requests: int | None = None,
    progress: bool = False,
    seed: int = 0,
) -> Report:
    """Send load until `duration` seconds have passed or `requests` were sent, whichever comes first."""
    if (concurrency is None) == (rate is None):
        raise ValueError("give exactly one of concurrency (closed loop) or rate (open loop)")
    if duration is None and requests is None:
        raise ValueError("give a duration or a number of requests")
    rng = random.Random(seed)  # budgets and inputs
    arrivals = random.Random(seed + 1)  # open-loop gaps, a stream of their own
    weights = [b.weight for b in mix]
    report = Report("closed" if concurrency else "open", 0.0, float(concurrency or rate or 0))
    bar = _Progress(requests or duration or 0, "requests" if requests else "s", progress)
    start = time.monotonic()
    sent = 0

    def more() -> bool:
        elapsed_ok = duration is None or time.monotonic() - start < duration
        return elapsed_ok and (requests is None or sent < requests)

    async def one() -> None:
        budget = rng.choices(mix, weights)[0]
        file = inputs[rng.randrange(len(inputs))]
        t0 = time.monotonic()
        try:
            r = await client.classify(file, budget=budget.option())
            sample = Sample(
                budget.name, time.monotonic() - t0, 200, r.gflops, r.dense_gflops, r.capacity, r.deadline_met
            )
        except MoneError as exc:
            sample = Sample(budget.name, time.monotonic() - t0, exc.status)
        report.samples.append(sample)
        errors = sum(s.status != 200 for s in report.samples)
        done = len(report.samples) if requests else time.monotonic() - start
        bar.update(done, len(report.samples), errors)

    if concurrency:

        async def worker() -> None:
            nonlocal sent
            while more():
                sent += 1
                await one()

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    else:
        assert rate is not None
        tasks: set[asyncio.Task[None]] = set()
        next_at = start
        while more():
            next_at += arrivals.expovariate(rate)
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            if not more():
                break
            if len(tasks) >= MAX_IN_FLIGHT:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            sent += 1
            task = asyncio.create_task(one())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
    report.wall_s = time.monotonic() - start
    errors = sum(s.status != 200 for s in report.samples)
    bar.update(len(report.samples) if requests else report.wall_s, len(report.samples), errors, force=True)
    bar.close()
    return report


def format_report(d: dict[str, Any]) -> str:
    """The human-readable summary printed by `mone bench`."""

    def ms(v: float | None) -> str:
        return f"{v:8.1f} ms" if v is not None else "       - "

    lat = d["latency_ms"]
    load = (
        f"concurrency {d['concurrency']:g}" if "concurrency" in d else f"{d['offered_rps']:g} req/s offered"
    )
    lines = [
        f"mode            {d['mode']} loop ({load}), {d['duration_s']:.2f} s",
        f"requests        {d['requests']} sent, {d['ok']} ok",
        f"throughput      {d['throughput_rps']:.1f} req/s",
        f"latency         p50 {ms(lat['p50'])}   p90 {ms(lat['p90'])}   p99 {ms(lat['p99'])}",
    ]
    if d["deadline_hit_rate"] is not None:
        lines.append(f"deadlines met   {100 * d['deadline_hit_rate']:.1f} %")
    if d["compute_saved"] is not None:
        lines.append(
            f"compute         {d['gflops_served']:.3f} GFLOPs served vs {d['gflops_dense']:.3f} dense "
            f"({100 * d['compute_saved']:.1f} % saved)"
        )
    errors = ", ".join(f"{k}: {v}" for k, v in d["errors"].items()) or "none"
    lines.append(f"errors          {errors}")
    lines.append("")
    lines.append(f"{'budget':<22}{'sent':>6}{'ok':>6}{'p50':>11}{'p99':>11}{'mean e_c':>10}")
    for name, b in d["by_budget"].items():
        cap = f"{b['mean_capacity']:.3f}" if b["mean_capacity"] is not None else "-"
        lines.append(f"{name:<22}{b['requests']:>6}{b['ok']:>6}{ms(b['p50']):>11}{ms(b['p99']):>11}{cap:>10}")
    return "\n".join(lines)
