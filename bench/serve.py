"""Serving benchmark: mone-serve against LitServe on the same checkpoint, batch size and wait, on 127.0.0.1.

    python -m bench.serve                 # both models, full durations
    python -m bench.serve --quick         # short smoke run (shipped model only)
    python -m bench.serve --write         # also file the tables as bench/runs/<date>-serve-<HHMM>.md

Models: the shipped checkpoint (checkpoints/default, or a random Mi/4 when it is absent) and a random S/16
at 224 px (compute-bound).  The same asyncio client drives both servers: closed loop at several
concurrencies and open loop at fixed rates.  Reported: requests/s, p50/p99 latency (client side), and for
`latency_ms` runs the share of requests the server reports as met; for open-loop runs, how late the client
sent its requests (a client that cannot keep its schedule measures itself).  The headline ratios (capacity 1.0
and 0.5 against LitServe at the top concurrency) are medians over `--rounds` rounds that take the three runs
in turn (in reverse every other round), both servers up, the one not measured stopped with SIGSTOP; a round's
run lasts at least `--round-batches` dense batches of the model alone.  Also: /healthz p99 on the API port and
on the probe listener while inference saturates the machine (probed from a process of its own), and
mone-serve's resident memory after warm-up and after many requests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import torch
from PIL import Image

from mone.model import MoNE, MoNEConfig, load_checkpoint, save_checkpoint
from mone.model.checkpoint import read_checkpoint_info
from mone.server.core.precision import DTYPES, cast_model, resolve_dtype

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "checkpoints" / "default"
RELEASE_IDLE_S = 1.0  # mone-serve's release_memory_idle_s: free heap pages go back after this long idle
REST_S = RELEASE_IDLE_S + 1.0  # idle time before an at-rest RSS reading


@dataclass
class Run:
    label: str
    requests: int
    errors: int
    seconds: float
    latencies: list[float]
    met: int = 0
    budgeted: int = 0
    rejected: int = 0
    lags: list[float] | None = None  # open loop: how late each request left against its schedule
    misses: list[str] = field(default_factory=list)  # latency_ms answers not met: the server's account
    failures: dict[str, int] = field(default_factory=dict)  # errors by HTTP status or client exception

    def fail(self, kind: str) -> None:
        self.errors += 1
        self.failures[kind] = self.failures.get(kind, 0) + 1

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) * 1e3 if self.latencies else float("nan")

    def row(self) -> str:
        met = f"{100 * self.met / self.budgeted:.1f} %" if self.budgeted else "-"
        return (
            f"| {self.label} | {self.rps:.1f} | {self.pct(50):.1f} | {self.pct(99):.1f} | {met} | "
            f"{self.rejected} | {self.errors} | {self.lag()} |"
        )

    def lag(self) -> str:
        if not self.lags:
            return "-"
        return f"{float(np.percentile(self.lags, 99)) * 1e3:.1f}"


HEADER = (
    "| run | req/s | p50 ms | p99 ms | met latency_ms | rejected (429/503) | errors | client lag p99 ms |\n"
    "|---|---|---|---|---|---|---|---|"
)


# -- processes ----------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A server subprocess in its own process group (LitServe's workers outlive a plain SIGTERM)."""

    def __init__(
        self,
        cmd: list[str],
        health: str,
        base: str,
        health_port: int = 0,
        env: dict[str, str] | None = None,
        log: Path | None = None,
    ) -> None:
        self.health_port = health_port
        env = {**os.environ, **(env or {}), "PYTHONPATH": str(ROOT)}
        # With `log`, the server's output (its access log: a line per request) goes there, not to ours.
        out = open(log, "ab") if log is not None else None  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, stdout=out, stderr=out)
        self.base = base
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = log.read_text(errors="replace")[-2000:] if log is not None else ""
                raise RuntimeError(f"{cmd[:4]} exited with {self.proc.returncode}\n{tail}")
            try:
                if httpx.get(base + health, timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"{cmd[:4]} did not become healthy")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def pause(self) -> None:
        """SIGSTOP the whole group: an idle LitServe polls its queues (about 0.2 CPU seconds per second on
        this machine), which would be taken from whichever server is being measured."""
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.proc.pid, signal.SIGCONT)
        time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def start_mone(
    ckpt: Path,
    args: argparse.Namespace,
    *extra: str,
    env: dict[str, str] | None = None,
    log: Path | None = None,
) -> Server:
    """mone-serve on `ckpt` with the benchmark's batching settings, `extra` arguments and `env` on top of
    this process's environment."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "mone.server",
        "--checkpoint",
        str(ckpt),
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    cmd += ["--max-batch-size", str(args.batch), "--max-batch-wait-ms", str(args.wait_ms)]
    health_port = free_port()
    cmd += ["--max-queue-size", str(args.queue), "--limit-concurrency", "4096"]
    cmd += ["--health-port", str(health_port), "--release-memory-idle-s", str(RELEASE_IDLE_S)]
    if getattr(args, "dtype", "fp32") != "fp32":
        cmd += ["--inference-dtype", args.dtype]
    cmd += extra
    return Server(cmd, "/readyz", f"http://127.0.0.1:{port}", health_port, env, log)


def start_litserve(ckpt: Path, args: argparse.Namespace) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "bench.litserve_peer", "--checkpoint", str(ckpt), "--port", str(port)]
    cmd += ["--max-batch-size", str(args.batch), "--batch-timeout-ms", str(args.wait_ms)]
    cmd += ["--dtype", getattr(args, "dtype", "fp32")]
    cmd += ["--workers-per-device", str(getattr(args, "lit_workers", 1))]
    cmd += ["--threads", str(getattr(args, "lit_threads", 0))]
    return Server(cmd, "/health", f"http://127.0.0.1:{port}")


# -- client ----------
# The load generator shares the two cores with the server it measures, so it must spend as little CPU per
# request as it can: httpx took about 4 ms per request here (multipart encoding, its connection pool), this
# client well under 1 ms.  Requests are encoded once; answers are read by Content-Length.
BOUNDARY = "mone-bench-boundary"


def encode_post(url: str, body: bytes, fields: dict[str, str]) -> bytes:
    """A whole multipart/form-data POST of `body` as the form field `file`, plus `fields`."""
    parts = [
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
        for k, v in fields.items()
    ]
    parts.append(
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
        "Content-Type: image/png\r\n\r\n".encode()
        + body
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )
    payload = b"".join(parts)
    u = urlsplit(url)
    head = (
        f"POST {u.path} HTTP/1.1\r\nHost: {u.netloc}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    return head.encode() + payload


class ClientError(Exception):
    pass


class _ClosedBeforeAnswerError(ConnectionError):
    """The server closed the connection before any byte of the answer."""


_STALE = (_ClosedBeforeAnswerError, ConnectionResetError, BrokenPipeError)


class Connection:
    """One persistent HTTP/1.1 connection, opened on first use and again after the server closed it."""

    def __init__(self, url: str, timeout: float = 60.0) -> None:
        u = urlsplit(url)
        self.host, self.port, self.timeout = u.hostname or "127.0.0.1", u.port or 80, timeout
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        """Send one encoded request; (status, body) of the answer.  Raises ClientError.

        A kept-alive connection that the server closed while it sat idle (its keep-alive timeout) ends before
        the first byte of an answer; the request is then sent again once on a fresh connection, as pooling
        HTTP clients do.  Nothing of it can have been processed."""
        reused = self.writer is not None
        try:
            return await self._exchange(raw)
        except ClientError as e:
            if not (reused and isinstance(e.__cause__, _STALE)):
                raise
        return await self._exchange(raw)

    async def _exchange(self, raw: bytes) -> tuple[int, bytes]:
        try:
            async with asyncio.timeout(self.timeout):
                await self.connect()
                assert self.reader is not None
                assert self.writer is not None
                self.writer.write(raw)
                try:
                    head = await self.reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError as e:
                    if e.partial:
                        raise
                    raise _ClosedBeforeAnswerError from e
                status = int(head[9:12])
                lower = head.lower()
                at = lower.find(b"\r\ncontent-length:")
                if at < 0:
                    raise ValueError("answer without Content-Length")
                length = int(lower[at + 17 : lower.index(b"\r\n", at + 2)])
                body = await self.reader.readexactly(length)
                if b"\r\nconnection: close" in lower:
                    await self.close()
                return status, body
        except (
            OSError,
            TimeoutError,
            ValueError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
        ) as e:
            await self.close()
            raise ClientError(type(e).__name__) from e

    async def connect(self) -> None:
        """Open the connection now rather than on the first request."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def close(self) -> None:
        writer, self.reader, self.writer = self.writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def _one(conn: Connection, raw: bytes, budgeted: bool, run: Run) -> None:
    start = time.perf_counter()
    try:
        status, body = await conn.request(raw)
    except ClientError as e:
        run.fail(str(e))
        return
    if status in (429, 503):
        run.rejected += 1
        return
    if status != 200:
        run.fail(f"HTTP {status}")
        return
    run.latencies.append(time.perf_counter() - start)
    run.requests += 1
    if budgeted:
        answer = json.loads(body)
        run.budgeted += 1
        if answer.get("served", {}).get("deadline_met"):
            run.met += 1
        else:
            t, served = answer.get("timing", {}), answer.get("served", {})
            run.misses.append(
                f"{t.get('total_ms', 0):.0f} ms = decode {t.get('decode_ms', 0):.0f} + queue "
                f"{t.get('queue_ms', 0):.0f} + compute {t.get('compute_ms', 0):.0f} (planned "
                f"{served.get('planned_ms') or 0:.0f}, capacity {served.get('capacity', 0):.2f}, batch "
                f"{answer.get('batch_size')})"
            )


async def closed_loop(
    url: str, bodies: list[bytes], fields: dict[str, str], concurrency: int, seconds: float, label: str
) -> Run:
    """`concurrency` clients, each with one persistent connection (as a load balancer keeps them), opened
    before the clock starts."""
    run = Run(label, 0, 0, seconds, [])
    raws = [encode_post(url, body, fields) for body in bodies]
    budgeted = "latency_ms" in fields
    clients = [Connection(url) for _ in range(concurrency)]
    end = 0.0
    try:
        await asyncio.gather(*(c.connect() for c in clients))

        async def worker(i: int) -> None:
            n = i
            while time.perf_counter() < end:
                await _one(clients[i], raws[n % len(raws)], budgeted, run)
                n += concurrency

        start = time.perf_counter()
        end = start + seconds
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        run.seconds = time.perf_counter() - start
    finally:
        await asyncio.gather(*(c.close() for c in clients))
    return run


async def open_loop(
    url: str,
    bodies: list[bytes],
    fields: dict[str, str],
    rate: float,
    seconds: float,
    label: str,
    phase: float = 0,
) -> Run:
    """Requests at fixed intervals of 1/rate (shifted by `phase` intervals), whatever the answers do.

    Each request goes out on an idle persistent connection, or on a new one when all are busy (as a load
    balancer keeps them).  The connections a server at its unloaded latency needs are opened before the clock
    starts."""
    run = Run(label, 0, 0, seconds, [], lags=[])
    assert run.lags is not None
    raws = [encode_post(url, body, fields) for body in bodies]
    budgeted = "latency_ms" in fields
    made: list[Connection] = []
    idle: list[Connection] = []

    def connection() -> Connection:
        if idle:
            return idle.pop()
        made.append(Connection(url))
        return made[-1]

    async def fire(raw: bytes, due: float) -> None:
        run.lags.append(time.perf_counter() - due)  # type: ignore[union-attr]
        conn = connection()
        try:
            await _one(conn, raw, budgeted, run)
        finally:
            idle.append(conn)

    try:
        warm = [connection() for _ in range(min(64, max(1, int(rate / 10))))]
        await asyncio.gather(*(c.connect() for c in warm))
        idle.extend(warm)
        tasks = []
        start = time.perf_counter()
        for n in range(int(rate * seconds)):
            due = start + (n + phase) / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(fire(raws[n % len(raws)], due)))
        await asyncio.gather(*tasks)
        run.seconds = time.perf_counter() - start
    finally:
        await asyncio.gather(*(c.close() for c in made))
    return run


def _client_process(
    mode: str,
    url: str,
    bodies: list[bytes],
    fields: dict[str, str],
    load: float,
    seconds: float,
    label: str,
    phase: float,
) -> Run:
    if mode == "closed":
        return asyncio.run(closed_loop(url, bodies, fields, int(load), seconds, label))
    return asyncio.run(open_loop(url, bodies, fields, load, seconds, label, phase))


def drive(
    mode: str,
    url: str,
    bodies: list[bytes],
    fields: dict[str, str],
    load: float,
    seconds: float,
    label: str,
    procs: int = 1,
) -> Run:
    """Closed loop at concurrency `load` or open loop at `load` req/s, split over `procs` client processes
    (one Python client tops out at a few hundred requests/s)."""
    procs = max(1, min(procs, int(load))) if mode == "closed" else max(1, procs)
    if procs == 1:
        return _client_process(mode, url, bodies, fields, load, seconds, label, 0.0)
    shares = (
        [load // procs + (i < load % procs) for i in range(procs)]
        if mode == "closed"
        else [load / procs] * procs
    )
    with ProcessPoolExecutor(procs) as pool:
        parts = list(
            pool.map(
                _client_process,
                [mode] * procs,
                [url] * procs,
                [bodies] * procs,
                [fields] * procs,
                shares,
                [seconds] * procs,
                [label] * procs,
                [i / procs for i in range(procs)],
            )
        )
    merged = Run(label, 0, 0, max(p.seconds for p in parts), [])
    for part in parts:
        merged.requests += part.requests
        merged.errors += part.errors
        merged.latencies += part.latencies
        merged.met += part.met
        merged.budgeted += part.budgeted
        merged.rejected += part.rejected
        merged.misses += part.misses
        for kind, count in part.failures.items():
            merged.failures[kind] = merged.failures.get(kind, 0) + count
        if part.lags is not None:
            merged.lags = (merged.lags or []) + part.lags
    return merged


def _summary(times: list[float]) -> str:
    return (
        f"p50 {1e3 * statistics.median(times):.1f} ms, p99 {1e3 * float(np.percentile(times, 99)):.1f} ms "
        f"({len(times)} probes)"
    )


def probe(urls: list[str], seconds: float, delay: float = 0.0, interval: float = 0.02) -> list[list[float]]:
    """After `delay` seconds, GET each url every `interval` seconds for `seconds`, from this process (one
    thread per url); the round-trip times.  Run in a process of its own so that the load generator's event
    loop, busy with hundreds of requests, does not add its own delays to what is measured."""
    import threading

    out: list[list[float]] = [[] for _ in urls]
    time.sleep(delay)

    def loop(url: str, times: list[float]) -> None:
        end = time.perf_counter() + seconds
        with httpx.Client(timeout=10) as client:
            while time.perf_counter() < end:
                start = time.perf_counter()
                client.get(url)
                times.append(time.perf_counter() - start)
                time.sleep(interval)

    threads = [threading.Thread(target=loop, args=(u, t)) for u, t in zip(urls, out, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


# -- scenarios ----------
def make_images(cfg: MoNEConfig, n: int = 32) -> list[bytes]:
    rng = np.random.default_rng(0)
    mode = "L" if cfg.in_chans == 1 else "RGB"
    shape = (cfg.img_size, cfg.img_size) if cfg.in_chans == 1 else (cfg.img_size, cfg.img_size, 3)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray((rng.random(shape) * 255).astype(np.uint8), mode).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def random_checkpoint(variant: str, tmp: Path, **overrides: Any) -> Path:
    torch.manual_seed(0)
    net = MoNE(MoNEConfig.from_variant(variant, **overrides)).eval()
    return save_checkpoint(tmp / variant.replace("/", "_"), net, meta={"random_init": True})


def model_times(ckpt: Path, batch: int, repeats: int = 3, dtype: str = "fp32") -> dict[float, float]:
    """Median seconds of one full batch at capacities 1.0 and 0.5, the model alone (no server)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ck = load_checkpoint(ckpt, device=device)
    cast_model(ck.model, resolve_dtype(dtype, device))
    c = ck.config
    x = torch.randn(batch, c.in_chans, c.img_size, c.img_size, device=device)
    times = {}
    with torch.inference_mode():
        for capacity in (1.0, 0.5, 1.0, 0.5):  # first pass of each warms up
            samples = []
            for _ in range(repeats):
                start = time.perf_counter()
                ck.model(x, capacity=capacity).logits.cpu()
                samples.append(time.perf_counter() - start)
            times[capacity] = statistics.median(samples)
    return times


def round_seconds(seconds: float, min_batches: int, batch_s: float) -> float:
    """How long each headline round runs: at least `seconds`, and at least `min_batches` dense batches.  A
    closed loop of twice the batch size keeps two batches in flight, so that its count moves in lumps of a
    whole batch; a run of a few batches is measured to within one lump, 15-20 % on a compute-bound model."""
    return max(seconds, min_batches * batch_s)


def round_order(contenders: list[Any], r: int) -> list[Any]:
    """Round r takes the contenders in turn, in reverse on odd rounds, so that no server always runs first
    (after the other one's load) or last."""
    return contenders if r % 2 == 0 else contenders[::-1]


@dataclass
class Memory:
    """RSS of the mone-serve process at rest (MB): after start-up, over a warm-up cycle, after the load."""

    warm: float
    loaded: float
    after: float
    served: int
    trace: list[float]
    busy: list[float]


class ModelBench:
    """One model's serving benchmark, phase by phase: throughput against LitServe, /healthz under saturation,
    memory after many requests, and `degrade` under open-loop overload.  Rows are printed as they come."""

    def __init__(self, name: str, ckpt: Path, cfg: MoNEConfig, args: argparse.Namespace) -> None:
        self.ckpt, self.args = ckpt, args
        self.bodies = make_images(cfg)
        self.top = max(args.concurrency)
        self.small = cfg.img_size <= 64  # memory_requests for it, memory_requests_large otherwise
        self.rss_warm = 0.0
        self.lines = [f"\n### {name} ({cfg.variant}, {cfg.img_size} px)\n", HEADER]
        self.runs: dict[str, Run] = {}
        self.rounds: dict[str, list[float]] = {}

    def show(self, run: Run) -> Run:
        self.runs[run.label] = run
        self.lines.append(run.row())
        print(run.row(), flush=True)
        return run

    def closed(self, url: str, fields: dict[str, str], clients: int, seconds: float, label: str) -> Run:
        return asyncio.run(closed_loop(url, self.bodies, fields, clients, seconds, label))

    def run(self) -> list[str]:
        args = self.args
        # The model alone first, while nothing else runs: the capacity 0.5 speed-up and the length of the
        # rounds.
        alone = model_times(self.ckpt, args.batch, dtype=getattr(args, "dtype", "fp32"))
        round_s = round_seconds(args.seconds, args.round_batches, alone[1.0])
        with contextlib.ExitStack() as servers:
            peer = start_litserve(self.ckpt, args)
            servers.callback(peer.stop)
            mone = self.throughput(peer, round_s, servers)
            health = self.health(mone)
            memory = self.memory(mone)
        degraded = self.degrade()
        summary = self.summary(alone, round_s, health, memory, degraded)
        for line in summary:
            print(line, flush=True)
        return [*self.lines, "", *summary]

    def throughput(self, peer: Server, round_s: float, servers: contextlib.ExitStack) -> Server:
        """Each server at each concurrency, then the headline rounds; returns the running mone-serve."""
        args, top, secs = self.args, self.top, self.args.seconds
        for c in args.concurrency:
            self.show(self.closed(peer.base + "/predict", {}, c, secs, f"LitServe dense, c={c}"))
        peer.pause()  # kept for the side-by-side rounds below, stopped meanwhile
        mone = start_mone(self.ckpt, args)
        servers.callback(mone.stop)
        url = mone.base + "/v1/classify"
        self.rss_warm = mone.rss_mb()
        for c in args.concurrency:
            self.show(self.closed(url, {"capacity": "1.0"}, c, secs, f"mone capacity 1.0, c={c}"))
        self.show(self.closed(url, {"capacity": "0.5"}, top, secs, f"mone capacity 0.5, c={top}"))
        # The headline ratios: the three saturating runs in turn, `rounds` times, medians.  A machine whose
        # speed drifts by 10-15 % over minutes (shared cloud cores) moves every server alike within a round.
        # Only the server being measured runs; the other is stopped (SIGSTOP).
        contenders = [
            ("LitServe dense", peer, peer.base + "/predict", {}),
            ("mone capacity 1.0", mone, url, {"capacity": "1.0"}),
            ("mone capacity 0.5", mone, url, {"capacity": "0.5"}),
        ]
        for r in range(args.rounds):
            for name, server, u, fields in round_order(contenders, r):
                for other in {peer, mone} - {server}:
                    other.pause()
                server.resume()
                run = self.closed(u, fields, top, round_s, f"round {r + 1}: {name}, c={top}")
                self.rounds.setdefault(name, []).append(run.rps)
                self.show(run)
        peer.resume()  # so that it can take its SIGTERM; mone ran the last round
        peer.stop()
        return mone

    def health(self, mone: Server) -> list[list[float]]:
        """/healthz on the API port and on the probe listener (health_port) while the CPU is saturated,
        measured from a process of its own, starting once the load has built up."""
        secs = self.args.seconds
        with ProcessPoolExecutor(1) as pool:
            urls = [mone.base + "/healthz", f"http://127.0.0.1:{mone.health_port}/healthz"]
            probes = pool.submit(probe, urls, max(1.0, secs - 2), 1.0)
            self.closed(mone.base + "/v1/classify", {"capacity": "1.0"}, self.top, secs, "probe load")
            return probes.result()

    def memory(self, mone: Server) -> Memory:
        """After the runs above, one warm-up cycle at each of the mixed capacities (so that the allocator has
        seen every batch shape); the baseline is the median RSS over that cycle.  Then `memory_requests` more
        at the same capacities in turn; the final figure is the median over the last cycle.  Each reading is
        taken at rest, once the server has been idle long enough to hand its free heap pages back
        (`release_memory_idle_s`, server/core/memory.py); the reading taken the moment the load stops (batch
        buffers still cached) is kept too, for the peak."""
        args = self.args
        target = args.memory_requests if self.small else args.memory_requests_large
        mixed = ["1.0", "0.5", "0.25"]
        trace: list[float] = []
        busy: list[float] = []
        served = 0
        url = mone.base + "/v1/classify"
        while len(trace) < len(mixed) or served < target:
            cap = mixed[len(trace) % len(mixed)]
            run = self.closed(url, {"capacity": cap}, self.top, args.seconds / 2, "memory load")
            served += run.requests if len(trace) >= len(mixed) else 0
            busy.append(mone.rss_mb())
            time.sleep(REST_S)
            trace.append(mone.rss_mb())
        loaded = statistics.median(trace[: len(mixed)])
        after = statistics.median(trace[-len(mixed) :])
        return Memory(self.rss_warm, loaded, after, served, trace, busy)

    def degrade(self) -> Run:
        """Open loop at 1.5x the dense saturation, with and without a latency budget of 3x the unloaded
        dense p50, on a server started with `--overload-policy degrade`."""
        runs, secs = self.runs, self.args.seconds
        dense_lat = runs["mone capacity 1.0, c=1"].pct(50) if "mone capacity 1.0, c=1" in runs else 50.0
        saturation = max(r.rps for k, r in runs.items() if k.startswith("mone capacity 1.0"))
        rate, budget = 1.5 * saturation, 3 * dense_lat
        server = start_mone(self.ckpt, self.args, "--overload-policy", "degrade")
        try:
            url, procs = server.base + "/v1/classify", self.args.client_procs
            label = f"open {rate:.0f}/s, capacity 1.0"
            self.show(drive("open", url, self.bodies, {"capacity": "1.0"}, rate, secs, label, procs))
            label = f"open {rate:.0f}/s, latency_ms={budget:.0f}, degrade"
            fields = {"latency_ms": f"{budget:.1f}"}
            return self.show(drive("open", url, self.bodies, fields, rate, secs, label, procs))
        finally:
            server.stop()

    def summary(
        self,
        alone: dict[float, float],
        round_s: float,
        health: list[list[float]],
        memory: Memory,
        degraded: Run,
    ) -> list[str]:
        rounds, top, m = self.rounds, self.top, memory
        lit = max(statistics.median(rounds["LitServe dense"]), 1e-9)
        dense = statistics.median(rounds["mone capacity 1.0"])
        half = statistics.median(rounds["mone capacity 0.5"])
        speedup = alone[1.0] / alone[0.5]

        def per_round(name: str) -> str:
            pairs = zip(rounds[name], rounds["LitServe dense"], strict=True)
            return ", ".join(f"{r / max(li, 1e-9):.2f}x" for r, li in pairs)

        trace = " ".join(f"{v:.0f}" for v in m.trace[:: max(1, len(m.trace) // 12)])
        summary = [
            f"- throughput at capacity 1.0, c={top}, median of {self.args.rounds} interleaved rounds of "
            f"{round_s:.0f} s: mone "
            f"{dense:.1f} req/s vs LitServe {lit:.1f} req/s ({dense / lit:.2f}x; per round "
            f"{per_round('mone capacity 1.0')})",
            f"- mone at capacity 0.5 vs LitServe dense, same rounds: {half / lit:.2f}x (per round "
            f"{per_round('mone capacity 0.5')}; the model alone, batch {self.args.batch}: {speedup:.2f}x "
            "from capacity 1.0 to 0.5)",
            f"- /healthz under saturation (closed loop, c={top}, probed every 20 ms from a separate "
            "process): "
            f"API port {_summary(health[0])}; probe listener (health_port) {_summary(health[1])}",
            f"- mone-serve RSS at rest: {m.warm:.0f} MB after start-up, {m.loaded:.0f} MB over a warm-up "
            f"cycle at capacities 1.0/0.5/0.25 (median); {m.after:.0f} MB over the last cycle after "
            f"{m.served} more requests ({100 * (m.after / m.loaded - 1):+.1f} %; trace {trace}); the moment "
            f"each load stopped: max {max(m.busy):.0f} MB, median {statistics.median(m.busy):.0f} MB",
        ]
        if degraded.misses:
            shown = degraded.misses[:: max(1, len(degraded.misses) // 8)]
            summary.append(
                f"- latency_ms misses under `degrade` ({len(degraded.misses)}; server's timing): "
                + "; ".join(shown)
            )
        for label, run in self.runs.items():
            if run.failures:
                kinds = ", ".join(f"{k}: {v}" for k, v in sorted(run.failures.items()))
                summary.append(f"- errors in `{label}`: {kinds}")
        return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short smoke run of the shipped model only")
    p.add_argument("--models", default="shipped,s16", help="comma list of shipped, s16")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--concurrency", default="1,8,32,64")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds for the headline ratios")
    p.add_argument(
        "--round-batches",
        type=int,
        default=12,
        help="each headline round lasts at least this many dense batches of the model alone",
    )
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--wait-ms", type=float, default=5.0)
    p.add_argument("--queue", type=int, default=128)
    p.add_argument("--memory-requests", type=int, default=10_000, help="memory check, 28 px model")
    p.add_argument("--memory-requests-large", type=int, default=10_000, help="memory check, 224 px model")
    p.add_argument("--client-procs", type=int, default=1, help="client processes generating the load")
    p.add_argument(
        "--write", action="store_true", help="file the tables as bench/runs/<date>-serve-<HHMM>.md"
    )
    p.add_argument(
        "--dtype", choices=list(DTYPES), default="fp32", help="both servers' inference dtype (bf16: on a GPU)"
    )
    args = p.parse_args()
    if args.quick:
        args.models, args.seconds, args.concurrency, args.memory_requests = "shipped", 3.0, "1,16", 500
        args.rounds, args.round_batches = 1, 1
    args.concurrency = [int(c) for c in str(args.concurrency).split(",")]
    started = time.gmtime()
    lines = [f"## bench.serve, {time.strftime('%Y-%m-%d %H:%M UTC', started)}", ""]
    lines.append(
        f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, cuda={torch.cuda.is_available()}; "
    )
    if torch.cuda.is_available():
        lines[-1] += f"GPU {torch.cuda.get_device_name()}; "
    lines.append(f"batch {args.batch}, wait {args.wait_ms} ms, {args.seconds:g} s per run, {args.dtype}")
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            if model == "shipped":
                ckpt = SHIPPED if SHIPPED.exists() else random_checkpoint("Mi/4", Path(tmp), num_classes=10)
                name = "shipped checkpoint" if SHIPPED.exists() else "random Mi/4 (no shipped checkpoint yet)"
            else:
                ckpt, name = random_checkpoint("S/16", Path(tmp), num_classes=1000), "random S/16"
            cfg = MoNEConfig.from_dict(read_checkpoint_info(ckpt)["config"])
            lines += ModelBench(name, ckpt, cfg, args).run()
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        # One file per run; bench/RESULTS.md holds only the current figures, copied from the newest run.
        path = ROOT / "bench" / "runs" / time.strftime("%Y-%m-%d-serve-%H%M.md", started)
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        print(f"filed as {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
