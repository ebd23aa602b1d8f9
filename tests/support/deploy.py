"""What the deployment tests share: the docker/ folder, the settings of a fast-starting mone-serve,
waiting for an HTTP answer and stopping a process group.  Every wait is bounded."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import httpx

from tests.support import ROOT

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
