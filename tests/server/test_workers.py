"""How many worker processes `workers` 0 (auto) starts, and a supervisor that reports a failed start-up."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from mone.server.config import Settings
from mone.server.workers import (
    MAX_AUTO_WORKERS,
    SMALL_MODEL_GFLOPS,
    image_gflops,
    resolve_processes,
    usable_cpus,
)
from tests.live_server import ROOT, free_port, server_env, start_server, stop_server


def settings(**values: object) -> Settings:
    return Settings.model_validate(values)


def layout(s: Settings, cpus: int, gpu: bool | None = None) -> tuple[int, int | None]:
    p = resolve_processes(s, cpus=cpus, gpu=gpu)
    return p.workers, p.threads


def test_a_small_model_on_a_cpu_runs_one_process_per_core(checkpoint_dir: Path) -> None:
    s = settings(checkpoint=checkpoint_dir)
    work = image_gflops(s)
    assert work is not None
    assert work <= SMALL_MODEL_GFLOPS, "the test checkpoint is a small Mi/4"
    assert layout(s, cpus=4, gpu=False) == (4, 1)
    assert layout(s, cpus=1, gpu=False) == (1, 1)
    # Threads set: as many processes of that many threads as the cores hold.
    assert layout(settings(checkpoint=checkpoint_dir, threads=2), cpus=4, gpu=False) == (2, 2)
    assert layout(settings(checkpoint=checkpoint_dir, threads=8), cpus=4, gpu=False) == (1, 8)
    # Many cores: at most MAX_AUTO_WORKERS processes, sharing the cores.
    assert layout(s, cpus=64, gpu=False) == (MAX_AUTO_WORKERS, 64 // MAX_AUTO_WORKERS)


def test_a_large_model_a_gpu_or_an_explicit_setting_runs_as_told(checkpoint_dir: Path) -> None:
    large = settings(random_init=True, random_variant="S/16", random_classes=1000)
    work = image_gflops(large)
    assert work is not None
    assert work > SMALL_MODEL_GFLOPS
    assert layout(large, cpus=4, gpu=False) == (1, None)
    assert layout(settings(checkpoint=checkpoint_dir), cpus=4, gpu=True) == (1, None)
    assert layout(settings(checkpoint=checkpoint_dir, workers=3), cpus=4) == (3, None)
    # A config that cannot be read: one process, whose loading then reports the error.
    assert layout(settings(checkpoint=checkpoint_dir / "missing"), cpus=4, gpu=False) == (1, None)


def test_usable_cpus_honours_a_cgroup_quota(tmp_path: Path) -> None:
    mask = len(os.sched_getaffinity(0))
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # --cpus 1.5
    assert usable_cpus(tmp_path) == min(mask, 2)
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert usable_cpus(tmp_path) == mask
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")  # cgroup v1, one CPU
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert usable_cpus(tmp_path) == 1
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert usable_cpus(tmp_path) == mask


def test_deciding_needs_no_torch(checkpoint_dir: Path) -> None:
    """The command line decides before uvicorn starts the workers, from the checkpoint's config; its
    supervisor stays free of torch."""
    code = (
        "import sys; from mone.server.workers import resolve_processes;"
        "from mone.server.config import Settings;"
        f"p = resolve_processes(Settings(checkpoint={str(checkpoint_dir)!r}), cpus=2, gpu=False);"
        "assert p.workers == 2, p; assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=server_env(), cwd=ROOT, timeout=60)


@pytest.mark.slow
def test_auto_starts_the_processes_it_reports(checkpoint_dir: Path) -> None:
    """`--workers 0` on this machine: the processes it resolves to are started and answer."""
    expected = min(MAX_AUTO_WORKERS, usable_cpus())
    proc, base = start_server(checkpoint_dir, "--workers", "0", "--no-calibrate")
    try:
        info = httpx.get(base + "/v1/models", timeout=10).json()["models"][0]
        codes = [
            httpx.post(
                base + "/v1/classify",
                content=(ROOT / "clients/web/samples/shirt.png").read_bytes(),
                timeout=30,
            ).status_code
            for _ in range(8)
        ]
        children = subprocess.run(
            ["ps", "-o", "pid=", "--ppid", str(proc.pid)], capture_output=True, text=True, check=False
        ).stdout.split()
    finally:
        stop_server(proc)
    assert info["batching"]["workers"] == expected
    assert info["checkpoint"]["threads"] == 1  # the tests' --threads 1
    assert codes == [200] * 8
    if expected > 1:  # the supervisor's children: the workers (and multiprocessing's resource tracker)
        assert len(children) >= expected


@pytest.mark.slow
def test_several_workers_that_fail_to_start_exit_non_zero(checkpoint_dir: Path, tmp_path: Path) -> None:
    """Every worker refuses tampered weights; the supervisor stops and the command fails, as with one."""
    bad = tmp_path / "tampered"
    shutil.copytree(checkpoint_dir, bad)
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (bad / "model.safetensors").write_bytes(bytes(data))
    env = server_env()
    cmd = [sys.executable, "-m", "mone.server", "--checkpoint", str(bad), "--port", str(free_port())]
    cmd += ["--workers", "2", "--threads", "1", "--no-calibrate"]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr[-2000:]
    assert "the weights do not match" in done.stderr


def listening_sockets(port: int) -> int:
    """Sockets listening on 127.0.0.1:port, from /proc/net/tcp (state 0A)."""
    entries = (Path("/proc/net/tcp").read_text().splitlines())[1:]
    local = f"0100007F:{port:04X}"
    return sum(1 for e in entries if e.split()[1] == local and e.split()[3] == "0A")


@pytest.mark.slow
def test_each_worker_listens_on_a_socket_of_its_own(checkpoint_dir: Path) -> None:
    """With two workers the port has two listening sockets (SO_REUSEPORT), so the kernel spreads connections
    over both instead of the first worker to wake taking every waiting one."""
    proc, base = start_server(checkpoint_dir, "--workers", "2", "--no-calibrate")
    try:
        port = int(base.rsplit(":", 1)[1])
        deadline = time.monotonic() + 60  # /readyz answered by one; the other may still be starting
        while listening_sockets(port) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        sockets = listening_sockets(port)
    finally:
        stop_server(proc)
    assert sockets == 2


def test_several_workers_refuse_a_port_in_use(checkpoint_dir: Path) -> None:
    """SO_REUSEPORT would let the workers share a port another server listens on; they refuse it instead."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = server_env()
        cmd = [sys.executable, "-m", "mone.server", "--checkpoint", str(checkpoint_dir), "--port", str(port)]
        cmd += ["--workers", "2", "--no-calibrate"]
        done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 3
    assert "Address already in use" in done.stderr
