"""Helpers of the load and chaos tests: a real mone-serve process on 127.0.0.1, a bounded async load
generator with a per-request log, metrics read live (`/metrics`) or after the process died (its
PROMETHEUS_MULTIPROC_DIR files), and the accounting identity checked from both sides."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from tests.live_server import free_port  # noqa: F401  (re-exported)

ROOT = Path(__file__).resolve().parents[2]
FAST = [
    "--random-init",
    "--no-calibrate",
    "--warmup-iters",
    "1",
    "--threads",
    "1",
    "--workers",
    "1",
    "--log-level",
    "warning",
]


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    base: str
    metrics_dir: Path
    log: Path
    headers: dict[str, str] = field(default_factory=dict)  # the bearer key, when the server has one

    def live_metrics(self) -> dict[str, float]:
        return parse(httpx.get(self.base + "/metrics", timeout=5, headers=self.headers).text)

    def dead_metrics(self) -> dict[str, float]:
        """Counters as the process left them (multiprocess files survive a SIGKILL)."""
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(self.metrics_dir))  # type: ignore[no-untyped-call]
        return {_key(s.name, s.labels): s.value for fam in registry.collect() for s in fam.samples}

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.wait(timeout=10)


def launch(*args: str, slow_ms: float = 0, timeout: float = 90, env: dict[str, str] | None = None) -> Server:
    port = free_port()
    metrics_dir = Path(tempfile.mkdtemp(prefix="rel-metrics-"))
    extra = env or {}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MONE_", "PROMETHEUS_", "REL_"))}
    env |= {
        "PYTHONPATH": str(ROOT),
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        "REL_SLOW_MS": str(slow_ms),
        "MONE_COMPILED_PLANS": os.environ.get("MONE_COMPILED_PLANS", "false"),  # see tests/conftest.py
        **extra,
    }
    log = metrics_dir / "server.log"
    cmd = [sys.executable, "-m", "tests.server.rel_server", *FAST, "--port", str(port), *args]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, start_new_session=True, stdout=out, stderr=out)
    server = Server(proc, f"http://127.0.0.1:{port}", metrics_dir, log)
    if "--api-key" in args:
        server.headers = {"authorization": f"Bearer {args[args.index('--api-key') + 1]}"}
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(server.base + "/readyz", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    server.stop()
    raise RuntimeError("server did not become ready")


def _key(name: str, labels: dict[str, str]) -> str:
    if not labels:
        return name
    return name + "{" + ",".join(f"{k}={v}" for k, v in sorted(labels.items())) + "}"


def parse(text: str) -> dict[str, float]:
    return {_key(s.name, s.labels): s.value for f in text_string_to_metric_families(text) for s in f.samples}


def total(m: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    want = [f"{k}={v}" for k, v in labels.items()]
    out = 0.0
    for key, value in m.items():
        base, _, rest = key.partition("{")
        if base == name and all(w in rest.rstrip("}").split(",") for w in want):
            out += value
    return out


def server_account(m: dict[str, float]) -> dict[str, float]:
    accepted = total(m, "mone_accepted_total")
    succeeded = total(m, "mone_succeeded_total")
    failed = total(m, "mone_failed_total")
    cancelled = total(m, "mone_cancelled_total")
    return {
        "accepted": accepted,
        "succeeded": succeeded,
        "failed": failed,
        "cancelled": cancelled,
        "unsettled": accepted - succeeded - failed - cancelled,
        "rejected": total(m, "mone_rejected_total"),
        "batches": total(m, "mone_batch_size_count"),
    }


@dataclass
class Outcome:
    status: int | None  # None: no HTTP answer (the error is in `error`)
    error: str = ""
    seconds: float = 0.0
    retry_after: str | None = None
    sent_at: float = 0.0


@dataclass
class Load:
    outcomes: list[Outcome] = field(default_factory=list)

    def codes(self) -> collections.Counter[str]:
        return collections.Counter(str(o.status) if o.status is not None else o.error for o in self.outcomes)

    def count(self, *statuses: int) -> int:
        return sum(1 for o in self.outcomes if o.status in statuses)

    @property
    def errors(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status is None]

    def hung(self) -> int:
        return sum(1 for o in self.outcomes if o.error == "ReadTimeout" or o.error == "hung")


async def one(client: httpx.AsyncClient, url: str, body: bytes, timeout: float) -> Outcome:
    t0 = time.monotonic()
    try:
        r = await client.post(url, content=body, headers={"content-type": "image/png"}, timeout=timeout)
        return Outcome(r.status_code, seconds=time.monotonic() - t0, retry_after=r.headers.get("retry-after"))
    except httpx.HTTPError as exc:
        return Outcome(None, type(exc).__name__, time.monotonic() - t0)


async def burst(
    base: str, n: int, body: bytes, *, path: str = "/v1/classify", timeout: float = 20.0, stagger: float = 0.0
) -> Load:
    """n requests at once (or `stagger` s apart), each on its own connection; nothing outlives `timeout`."""
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits) as client:

        async def later(i: int) -> Outcome:
            await asyncio.sleep(i * stagger)
            return await one(client, base + path, body, timeout)

        outs = await asyncio.gather(*(later(i) for i in range(n)))
    return Load(list(outs))


def figures(name: str, **values: object) -> None:
    """One line per test for docs/reliability.md (`pytest -s` shows it)."""
    print(f"\nREL-FIGURES {name} {json.dumps(values, sort_keys=True)}")
