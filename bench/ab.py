"""Side-by-side A/B of mone-serve variants, and optionally LitServe, under one closed-loop load.

  python -m bench.ab --model s16 --lit --variants base spin:GOMP_SPINCOUNT=300000 "nice0::--inference-nice 0"
  python -m bench.ab --model shipped --probe --variants base "wait2::--max-batch-wait-ms 2"

A variant is `name[:ENV=V ENV2=V2[:--extra --args]]`: a mone-serve started with those environment variables
and command-line arguments on top of `bench.serve`'s batching settings.  Every server starts first; then
each round runs every server in turn (in reverse every other round) with the others stopped (SIGSTOP), so
that a machine whose speed drifts moves them alike.  Printed: each run; then per server the median req/s
and its ratio to the first server, and for mone-serve the share of the wall time its batches were computing
and their mean compute time (from /metrics: what the server does besides the model shows up as the rest),
and for every server the CPU time its processes spent per request served (user + system, from /proc: less
noisy than req/s on a machine whose speed drifts, since it does not count the time the server waited).
With `--probe`, /healthz on the API port and on the probe listener is timed during each mone-serve run from
a process of its own (p99 in ms).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from bench import serve as bs
from mone.model import MoNEConfig
from mone.model.checkpoint import read_checkpoint_info


@dataclass
class Variant:
    name: str
    env: dict[str, str] = field(default_factory=dict)
    extra: list[str] = field(default_factory=list)


def parse_variant(spec: str) -> Variant:
    """`name[:ENV=V ...[:--args ...]]`."""
    name, _, rest = spec.partition(":")
    envs, _, extra = rest.partition(":")
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise argparse.ArgumentTypeError(f"variant {spec!r}: the name must be letters, digits, '.', '_', '-'")
    env = {}
    for pair in envs.split():
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise argparse.ArgumentTypeError(f"variant {spec!r}: {pair!r} is not ENV=VALUE")
        env[key] = value
    return Variant(name, env, extra.split())


def compute_counters(base: str) -> tuple[float, float]:
    """Seconds spent computing batches and batches computed so far, from the server's /metrics."""
    return compute_totals(httpx.get(base + "/metrics", timeout=10).text)


def compute_totals(text: str) -> tuple[float, float]:
    """`mone_compute_duration_seconds` sum and count in a Prometheus exposition, over every label."""
    total = {"_sum": 0.0, "_count": 0.0}
    for family in text_string_to_metric_families(text):
        if family.name == "mone_compute_duration_seconds":
            for sample in family.samples:
                suffix = sample.name.removeprefix(family.name)
                if suffix in total:
                    total[suffix] += sample.value
    return total["_sum"], total["_count"]


@dataclass
class Measured:
    """One run of one server."""

    rps: float
    row: str
    busy: float | None = None  # share of the wall time mone-serve's batches were computing
    batch_ms: float | None = None  # their mean compute time
    healthz_p99: tuple[float, float] | None = None  # API port, probe listener
    cpu_ms: float | None = None  # CPU time of the server's processes per request served


def measure(
    server: bs.Server,
    path: str,
    fields: dict[str, str],
    bodies: list[bytes],
    label: str,
    args: argparse.Namespace,
) -> Measured:
    """One closed-loop run of `args.seconds` against `server` (resumed for it, stopped again after)."""
    mone = path == "/v1/classify"
    server.resume()
    try:
        before = compute_counters(server.base) if mone else None
        start = time.perf_counter()
        with ProcessPoolExecutor(1) as pool:
            urls = [server.base + "/healthz", f"http://127.0.0.1:{server.health_port}/healthz"]
            probes = (
                pool.submit(bs.probe, urls, max(1.0, args.seconds - 2), 1.0) if mone and args.probe else None
            )
            url = server.base + path
            cpu = group_cpu_seconds(server.proc.pid)
            run = asyncio.run(bs.closed_loop(url, bodies, fields, args.concurrency, args.seconds, label))
            cpu = group_cpu_seconds(server.proc.pid) - cpu
            health = probes.result() if probes else None
        wall = time.perf_counter() - start
        after = compute_counters(server.base) if mone else None
    finally:
        server.pause()
    out = Measured(run.rps, run.row())
    if run.requests:
        out.cpu_ms = 1e3 * cpu / run.requests
        out.row += f" CPU {out.cpu_ms:.2f} ms a request;"
    if before and after and after[1] > before[1]:
        out.busy = (after[0] - before[0]) / wall
        out.batch_ms = 1e3 * (after[0] - before[0]) / (after[1] - before[1])
        out.row += f" computing {out.busy:.0%} of the time, {out.batch_ms:.0f} ms a batch"
    if health:
        api, listener = (float(np.percentile(t, 99)) * 1e3 for t in health)
        out.healthz_p99 = (api, listener)
        out.row += f"; /healthz p99 {api:.1f} ms, probe listener {listener:.1f} ms"
    return out


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU seconds of the live processes of a process group (a server and its workers), from
    /proc/PID/stat; 0 where /proc is not there."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if int(fields[2]) == pgid:  # after the command: state, ppid, pgrp, ...; utime and stime are 11, 12
            total += int(fields[11]) + int(fields[12])
    return total / tick


def checkpoint(model: str, tmp: Path) -> Path:
    if model == "s16":
        return bs.random_checkpoint("S/16", tmp, num_classes=1000)
    return bs.SHIPPED if bs.SHIPPED.exists() else bs.random_checkpoint("Mi/4", tmp, num_classes=10)


def table(names: list[str], results: dict[str, list[Measured]]) -> str:
    """Medians per server, ratios to the first."""

    def median(name: str, pick: Callable[[Measured], float | None], fmt: str) -> str:
        values = [v for v in map(pick, results[name]) if v is not None]
        return format(statistics.median(values), fmt) if values else "-"

    first = statistics.median(m.rps for m in results[names[0]])
    lines = [
        f"| server | req/s | vs {names[0]} | CPU ms a request | computing | ms a batch | /healthz p99 API "
        "| probe listener |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        rps = statistics.median(m.rps for m in results[name])
        cpu = median(name, lambda m: m.cpu_ms, ".2f")
        busy = median(name, lambda m: m.busy, ".0%")
        ms = median(name, lambda m: m.batch_ms, ".0f")
        api = median(name, lambda m: m.healthz_p99[0] if m.healthz_p99 else None, ".1f")
        listener = median(name, lambda m: m.healthz_p99[1] if m.healthz_p99 else None, ".1f")
        lines.append(
            f"| {name} | {rps:.1f} | {rps / max(first, 1e-9):.2f}x | {cpu} | {busy} | {ms} | {api} "
            f"| {listener} |"
        )
    return "\n".join(lines)


def request_fields(capacity: str) -> dict[str, str]:
    """The form fields of a mone-serve run: the capacity asked for, or none (`default`), so that variants
    started with different `--default-capacity` values can be set side by side."""
    return {} if capacity == "default" else {"capacity": capacity}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["shipped", "s16"], default="shipped")
    p.add_argument("--variants", nargs="+", type=parse_variant, default=[parse_variant("base")])
    p.add_argument("--lit", action="store_true", help="LitServe serving the same checkpoint, dense")
    p.add_argument(
        "--lit-workers", type=int, default=1, help="LitServe's inference processes (its workers_per_device)"
    )
    p.add_argument("--lit-threads", type=int, default=0, help="torch threads of each (0: torch's default)")
    p.add_argument(
        "--capacity",
        default="1.0",
        help="the capacity the mone-serve runs ask for; `default`: none, the server's default_capacity",
    )
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--seconds", type=float, default=20.0, help="per run; at least --round-batches batches")
    p.add_argument("--round-batches", type=int, default=12)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--probe", action="store_true", help="time /healthz during the mone-serve runs")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--wait-ms", type=float, default=5.0)
    p.add_argument("--queue", type=int, default=128)
    args = p.parse_args()
    names = (["LitServe"] if args.lit else []) + [v.name for v in args.variants]
    if len(set(names)) != len(names):
        p.error("variant names must be distinct (and not LitServe)")

    results: dict[str, list[Measured]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as running:
        ckpt = checkpoint(args.model, Path(tmp))
        cfg = MoNEConfig.from_dict(read_checkpoint_info(ckpt)["config"])
        bodies = bs.make_images(cfg)
        alone = bs.model_times(ckpt, args.batch)
        args.seconds = bs.round_seconds(args.seconds, args.round_batches, alone[1.0])
        print(
            f"{cfg.variant}, the model alone at batch {args.batch}: {alone[1.0] * 1e3:.0f} ms at capacity "
            f"1.0, {alone[0.5] * 1e3:.0f} ms at 0.5; runs of {args.seconds:.0f} s",
            flush=True,
        )
        servers: list[tuple[str, bs.Server, str, dict[str, str]]] = []

        def started(name: str, server: bs.Server, path: str, fields: dict[str, str]) -> None:
            server.pause()
            running.callback(server.stop)
            running.callback(server.resume)  # a stopped process cannot take its SIGTERM
            servers.append((name, server, path, fields))

        if args.lit:
            started("LitServe", bs.start_litserve(ckpt, args), "/predict", {})
        for v in args.variants:
            started(
                v.name,
                bs.start_mone(ckpt, args, *v.extra, env=v.env),
                "/v1/classify",
                request_fields(args.capacity),
            )
        for r in range(args.rounds):
            for name, server, path, fields in bs.round_order(servers, r):
                measured = measure(server, path, fields, bodies, f"round {r + 1}: {name}", args)
                results[name].append(measured)
                print(measured.row, flush=True)
    print("\n" + table(names, results))


if __name__ == "__main__":
    main()
