"""The image, built with podman from docker/Dockerfile and run for real: read-only root, tmpfs /tmp, non-root,
healthy, answers /v1/classify and /metrics, and on SIGTERM finishes its in-flight request and exits 0.

Built by docker/build.sh (local debootstrap base, wheels downloaded on the host), as CI builds it.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.live_server import free_port
from tests.support import ROOT
from tests.support.deploy import API_KEY, DOCKER, FAST_ENV, wait_http
from tests.support.media import png_bytes

# With an API key set, /metrics needs it too (unless MONE_METRICS_PUBLIC): the image keeps that default.
METRICS_AUTH = {"authorization": f"Bearer {API_KEY}"}

pytestmark = pytest.mark.slow

TAG = "localhost/mone-serve:test"
CHECKPOINT = ROOT / "checkpoints" / "default"
ENV = {**os.environ, "CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF", str(DOCKER / "containers.conf"))}


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["podman", *args], env=ENV, capture_output=True, text=True, timeout=timeout, check=check
    )


def run_flags(port: int, **env: str) -> list[str]:
    """docs/reliability.md row 29: read-only root, capped tmpfs, no capabilities, loopback port."""
    values = {**FAST_ENV, "MONE_API_KEY": API_KEY, **env}
    if CHECKPOINT.exists():  # the embedded trained checkpoint, not a random model
        values.pop("MONE_RANDOM_INIT")
    flags = ["--read-only", "--tmpfs", "/tmp:rw,size=256m,mode=1777", "--cap-drop", "ALL"]
    flags += ["--security-opt", "no-new-privileges", "--publish", f"127.0.0.1:{port}:8000"]
    for key, value in values.items():
        flags += ["--env", f"{key}={value}"]
    return flags


@pytest.fixture(scope="module")
def image() -> str:
    start = time.monotonic()
    result = subprocess.run(
        [str(DOCKER / "build.sh"), TAG], env=ENV, capture_output=True, text=True, timeout=900, check=False
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    print(f"image built in {time.monotonic() - start:.0f} s")  # noqa: T201
    return TAG


class Container:
    def __init__(self, image: str, name: str, flags: Sequence[str] = (), **env: str) -> None:
        """`podman run` the image with the posture of `run_flags`, after `flags` (limits, restart policy)."""
        self.name = name
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        podman("rm", "--force", "--ignore", name)
        podman("run", "--detach", "--name", name, *flags, *run_flags(self.port, **env), image)

    def logs(self) -> str:
        result = podman("logs", self.name, check=False)
        return result.stdout[-3000:] + result.stderr[-3000:]

    def running(self) -> bool:
        return podman("inspect", "--format", "{{.State.Running}}", self.name).stdout.strip() == "true"

    def wait_ready(self, timeout_s: float = 180) -> None:
        end = time.monotonic() + timeout_s
        while True:
            try:
                wait_http(self.base + "/readyz", 5)
                return
            except AssertionError as exc:
                if not self.running() or time.monotonic() > end:
                    raise AssertionError(f"{exc}\n{self.logs()}") from None

    def inspect(self) -> dict[str, object]:
        data: list[dict[str, object]] = json.loads(podman("inspect", self.name).stdout)
        return data[0]

    def remove(self) -> None:
        podman("rm", "--force", "--ignore", "--time", "5", self.name, check=False)


@pytest.fixture(scope="module")
def container(image: str) -> Iterator[Container]:
    c = Container(image, "mone-test-serve")
    try:
        c.wait_ready()
        yield c
    finally:
        c.remove()


def test_image_config(image: str) -> None:
    data = json.loads(podman("image", "inspect", image).stdout)[0]
    config = data["Config"]
    assert config["User"] == "10001:10001"
    healthcheck = config.get("Healthcheck") or data["Healthcheck"]  # docker: in Config; podman: beside it
    assert "/healthz" in " ".join(healthcheck["Test"])
    assert config["StopSignal"] == "SIGTERM"
    assert "8000/tcp" in config["ExposedPorts"]
    assert "8001/tcp" in config["ExposedPorts"]
    assert "8081/tcp" in config["ExposedPorts"]
    env = dict(e.split("=", 1) for e in config["Env"])
    assert env["MONE_HEALTH_PORT"] == "8001"  # the HEALTHCHECK asks the probe listener
    assert env["MONE_GRPC_PORT"] == "8081"
    assert env["MONE_HOST"] == "0.0.0.0"
    assert "MONE_API_KEY" not in env
    assert "MONE_ALLOW_UNAUTHENTICATED" not in env


def test_refuses_to_start_without_an_api_key(image: str) -> None:
    result = podman(
        "run",
        "--rm",
        "--read-only",
        "--tmpfs",
        "/tmp",
        "--env",
        "MONE_RANDOM_INIT=true",
        image,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "api_key" in result.stderr


def test_serves_classify_and_metrics(container: Container) -> None:
    files = {"file": ("x.png", png_bytes(), "image/png")}
    assert httpx.post(container.base + "/v1/classify", files=files, timeout=30).status_code == 401
    headers = {"Authorization": f"Bearer {API_KEY}"}
    r = httpx.post(
        container.base + "/v1/classify", files=files, data={"capacity": "0.5"}, headers=headers, timeout=30
    )
    assert r.status_code == 200, r.text
    assert r.json()["served"]["capacity"] == pytest.approx(0.5)
    metrics = httpx.get(container.base + "/metrics", headers=METRICS_AUTH, timeout=10).text
    assert metric_sum(metrics, "mone_requests_total", route="/v1/classify", code="200") == 1
    assert "mone_model_info{" in metrics


def test_posture_and_healthcheck(container: Container) -> None:
    assert podman("exec", container.name, "id", "-u").stdout.strip() == "10001"
    denied = podman("exec", container.name, "touch", "/app/x", check=False)
    assert denied.returncode != 0
    assert "Read-only file system" in denied.stderr
    assert podman("exec", container.name, "touch", "/tmp/x").returncode == 0
    health = podman("healthcheck", "run", container.name, check=False)
    assert health.returncode == 0, health.stdout + health.stderr
    state = container.inspect()["State"]
    assert isinstance(state, dict)
    assert state.get("Health", state.get("Healthcheck", {}))["Status"] == "healthy"
    config = container.inspect()["HostConfig"]
    assert isinstance(config, dict)
    assert config["ReadonlyRootfs"] is True


def metric_sum(text: str, name: str, **labels: str) -> float:
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def wait_inflight(base: str, timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        text = httpx.get(base + "/metrics", headers=METRICS_AUTH, timeout=5).text
        if any(line.startswith("mone_inflight_requests 1") for line in text.splitlines()):
            return
        time.sleep(0.02)
    raise AssertionError("the request never showed up as in flight")


def test_sigterm_finishes_in_flight_request_and_exits_zero(image: str) -> None:
    # The longest batch wait, taken whole, keeps one request in flight (queued, then run) for about 1 s.
    c = Container(image, "mone-test-stop", MONE_MAX_BATCH_WAIT_MS="1000", MONE_BATCH_WAIT="always")
    try:
        c.wait_ready()
        result: dict[str, httpx.Response] = {}

        def send() -> None:
            files = {"file": ("x.png", png_bytes(), "image/png")}
            headers = {"Authorization": f"Bearer {API_KEY}"}
            result["r"] = httpx.post(c.base + "/v1/classify", files=files, headers=headers, timeout=60)

        sender = threading.Thread(target=send)
        sender.start()
        wait_inflight(c.base, timeout_s=5)  # the request is queued in the batcher now
        start = time.monotonic()
        podman("stop", "--time", "30", c.name, timeout=60)
        stopped_s = time.monotonic() - start
        sender.join(timeout=30)
        assert result["r"].status_code == 200, result["r"].text
        state = c.inspect()["State"]
        assert isinstance(state, dict)
        assert state["ExitCode"] == 0, c.logs()
        assert stopped_s < 30, stopped_s
        assert "Finished server process" in c.logs() or "Shutting down" in c.logs()
    finally:
        c.remove()


def test_two_workers_report_one_consistent_metrics_page(image: str) -> None:
    """MONE_WORKERS=2 on a read-only root: the multiprocess metrics directory lives on the /tmp tmpfs and
    /metrics from either worker counts the requests of both."""
    c = Container(image, "mone-test-workers", MONE_WORKERS="2")
    try:
        c.wait_ready()
        headers = {"Authorization": f"Bearer {API_KEY}"}
        n = 24
        for i in range(n):
            files = {"file": ("x.png", png_bytes(seed=i), "image/png")}
            r = httpx.post(c.base + "/v1/classify", files=files, headers=headers, timeout=30)
            assert r.status_code == 200, r.text
        for _ in range(4):  # whichever worker answers
            text = httpx.get(c.base + "/metrics", headers=METRICS_AUTH, timeout=10).text
            assert metric_sum(text, "mone_requests_total", route="/v1/classify", code="200") == n
    finally:
        c.remove()
