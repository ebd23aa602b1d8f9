"""A real mone-serve process (uvicorn via `python -m mone.server`) on a free loopback port, for e2e tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_env() -> dict[str, str]:
    """The test process's environment without mone-serve settings, with the source tree importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MONE_", "PROMETHEUS_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / ".namespace"), str(ROOT)])
    env["MONE_COMPILED_PLANS"] = os.environ.get("MONE_COMPILED_PLANS", "false")  # see tests/conftest.py
    return env


def start_server(
    checkpoint: Path, *args: str, stderr: IO[bytes] | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    """`checkpoint` served by a real uvicorn process; returns it and its base URL once /readyz answers 200.
    Its stderr (logs, the access log) goes to `stderr` when given, else to the test's."""
    port = free_port()
    env = server_env()
    cmd = [
        sys.executable,
        "-m",
        "mone.server",
        "--checkpoint",
        str(checkpoint),
        "--port",
        str(port),
        "--threads",
        "1",
        "--workers",
        "1",
    ]
    cmd += ["--calibration-batch-sizes", "1,2", "--calibration-repeats", "1", "--log-level", "warning", *args]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, start_new_session=True, stderr=stderr)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(base + "/readyz", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop_server(proc)
    raise RuntimeError("server did not become ready")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server's process group (it drains), SIGKILL after 30 s."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
