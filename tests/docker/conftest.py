"""Shared helpers for the deployment tests: paths, free ports, a tiny PNG, and a local mone-serve process.

Every test here is marked `docker`.  Everything listens on 127.0.0.1 only and every wait is bounded.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.live_server import free_port  # noqa: F401  (re-exported)

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
API_KEY = "deploy-test-key-0123"

# Fast start-up for tests: a small calibration grid and one warm-up pass.
FAST_ENV = {
    "MONE_RANDOM_INIT": "true",
    "MONE_CALIBRATION_BATCH_SIZES": "[1,4]",
    "MONE_CALIBRATION_CAPACITIES": "[0.125,1.0]",
    "MONE_CALIBRATION_REPEATS": "1",
    "MONE_WARMUP_ITERS": "1",
    "MONE_MAX_BATCH_SIZE": "8",
    "MONE_THREADS": "1",
}


def png_bytes(side: int = 28, seed: int = 0) -> bytes:
    img = Image.effect_noise((side, side), 40 + seed).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def wait_http(url: str, timeout_s: float, ok: int = 200, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Poll `url` until it answers `ok`; fail after `timeout_s` or when `proc` exits."""
    end = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode} before {url} answered")
        try:
            r = httpx.get(url, timeout=2.0)
            if r.status_code == ok:
                return
            last = f"{r.status_code} {r.text[:200]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.5)
    raise AssertionError(f"{url} did not answer {ok} within {timeout_s} s (last: {last})")


def stop_group(proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> int:
    """SIGTERM the process group we started, then SIGKILL it if it has not exited in time."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    return int(proc.returncode)


@pytest.fixture(scope="module")
def local_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mone-serve` process (random Mi/4) on 127.0.0.1; yields its base URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = {**os.environ, **FAST_ENV, "MONE_HOST": "127.0.0.1", "MONE_PORT": str(port)}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "server"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(base + "/readyz", 120, proc=proc)
        yield base
    finally:
        stop_group(proc)
