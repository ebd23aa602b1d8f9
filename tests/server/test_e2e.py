"""End to end against a real `python -m mone.server` (uvicorn) process on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mone.server.cli import main, settings_from_args
from tests.live_server import start_server as start
from tests.live_server import stop_server as stop
from tests.support.media import fashion_images, png


def metric(base: str, name: str, **labels: str) -> float:
    text = httpx.get(base + "/metrics").text
    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


@pytest.fixture(scope="module")
def server(checkpoint_dir: Path) -> Iterator[str]:
    proc, base = start(
        checkpoint_dir, "--max-batch-size", "8", "--max-batch-wait-ms", "1000", "--batch-wait", "always"
    )
    yield base
    stop(proc)


@pytest.mark.slow
def test_classify_against_a_real_server(server: str) -> None:
    r = httpx.post(server + "/v1/classify?capacity=0.5", content=png(fashion_images(1)[0]), timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["served"]["capacity"] == 0.5
    assert metric(server, "mone_requests_total", route="/v1/classify", code="200") >= 1


@pytest.mark.slow
def test_client_disconnect_cancels_queued_work(server: str) -> None:
    """The server batches with a long wait, so a lone request stays queued until its client leaves."""
    before = {n: metric(server, n) for n in ("mone_cancelled_total", "mone_batch_size_count")}
    host, port = server.removeprefix("http://").split(":")
    body = png(fashion_images(1)[0])
    with socket.create_connection((host, int(port))) as sock:
        head = "POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        sock.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.monotonic() + 5
        while metric(server, "mone_inflight_requests") < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
    deadline = time.monotonic() + 5
    while (
        metric(server, "mone_cancelled_total") == before["mone_cancelled_total"]
        and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    assert metric(server, "mone_cancelled_total") == before["mone_cancelled_total"] + 1
    time.sleep(1.2)  # longer than the batch wait: the cancelled request must never run
    assert metric(server, "mone_batch_size_count") == before["mone_batch_size_count"]
    assert metric(server, "mone_inflight_requests") == 0
    assert metric(server, "mone_requests_total", route="/v1/classify", code="499") == 1


@pytest.mark.slow
def test_two_workers_report_one_consistent_metrics(checkpoint_dir: Path) -> None:
    proc, base = start(checkpoint_dir, "--workers", "2", "--no-calibrate")
    try:
        data = png(fashion_images(1)[0])
        with ThreadPoolExecutor(4) as pool:
            codes = list(
                pool.map(
                    lambda _: httpx.post(base + "/v1/classify", content=data, timeout=30).status_code,
                    range(20),
                )
            )
        assert codes == [200] * 20
        for _ in range(5):  # whichever worker answers, it reports the total of both
            assert metric(base, "mone_requests_total", route="/v1/classify", code="200") == 20
    finally:
        stop(proc)


@pytest.fixture
def clean_env() -> Iterator[None]:
    """The CLI exports its settings as MONE_* variables (for uvicorn workers): undo that after the test."""
    saved = dict(os.environ)
    for key in [k for k in os.environ if k.startswith("MONE_") and k != "MONE_COMPILED_PLANS"]:
        del os.environ[key]
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.mark.usefixtures("clean_env")
def test_missing_checkpoint_fails_with_a_clear_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--checkpoint", str(tmp_path / "absent")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err
    assert "--random-init" in err


@pytest.mark.usefixtures("clean_env")
def test_cli_mirrors_settings() -> None:
    args = ["--max-batch-size", "7", "--overload-policy", "degrade", "--no-calibrate"]
    s = settings_from_args([*args, "--calibration-capacities", "0.25,1.0"])
    assert (s.max_batch_size, s.overload_policy, s.calibrate) == (7, "degrade", False)
    assert s.calibration_capacities == [0.25, 1.0]
    assert s.host == "127.0.0.1"
    assert os.environ["MONE_MAX_BATCH_SIZE"] == "7", "workers read the settings from the environment"


@pytest.mark.parametrize("given", [None, "PASSIVE"])
def test_cli_leaves_the_openmp_wait_policy_to_openmp(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], given: str | None
) -> None:
    # Idle threads of the inference thread's team spin a while before they sleep (OpenMP's default); an
    # explicit policy is the operator's.
    if given is None:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    else:
        monkeypatch.setenv("OMP_WAIT_POLICY", given)
    with pytest.raises(SystemExit):
        main(["--help"])
    assert os.environ.get("OMP_WAIT_POLICY") == given
