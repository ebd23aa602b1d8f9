"""Reliability row 22: the container's memory limit is hit.  The process is OOM-killed, the restart policy
brings it back, /readyz goes red then green, and every client gets an answer or a connection error: no hangs.

1. Measure, without a limit (same posture flags as `test_image.py`): the server's steady memory after
   warm-up and some small requests, then the peak while it decodes one of the largest images the default
   limits allow (a palette PNG of `max_image_side` x `max_image_pixels / max_image_side`: about 5 KB encoded,
   hundreds of MB while it is decoded and flattened).
2. Size the limit from that: steady + 1.25 x one large request, rounded up to 64 MiB.  One large request
   fits; two at once do not.
3. Run with `--memory L --memory-swap L` (no swap) and `--restart on-failure`.  One large request alone gets
   200.  Then `BURST` of them at once, each with a timeout, while a probe polls /readyz.

The container runs one server process (`MONE_WORKERS=1`): the restart policy is what brings a killed
server back.  With several workers the kernel kills one worker and the server's supervisor starts another
(docs/deployment.md, "Memory limit").

The OOM kill is confirmed from `State.OOMKilled`, or else from the kernel log: podman 4.3.1 with conmon 2.1.6
on cgroup v1 reports the kill as exit code 137 but leaves `OOMKilled` false (conmon writes its "oom" marker
into its working directory, where podman does not look).  podman restarts the container itself: the
`podman container cleanup` that conmon runs on exit applies the restart policy, no systemd needed.
"""

from __future__ import annotations

import io
import json
import math
import subprocess
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from PIL import Image

from mone.server.config import Settings
from tests.docker import test_image
from tests.docker.test_image import Container, podman
from tests.support.deploy import API_KEY
from tests.support.media import png_bytes

pytestmark = pytest.mark.slow

image = test_image.image  # the same build fixture

NAME = "mone-test-oom"
BURST = 24  # large requests sent at once: about four times the decode threads on 2 cores
REQUEST_TIMEOUT_S = 30.0  # per request (connect, write, read); a request that runs into it has hung
BURST_BOUND_S = 45.0  # every request of the burst must have settled by then
RED_TO_GREEN_BOUND_S = 90.0
MIB = 1024 * 1024
HEADERS = {"Authorization": f"Bearer {API_KEY}"}


def largest_allowed_png() -> bytes:
    """A palette PNG at the default pixel and side limits: tiny on the wire, hundreds of MB decoded."""
    defaults = Settings.model_fields
    width = int(defaults["max_image_side"].default)
    height = int(defaults["max_image_pixels"].default) // width
    buf = io.BytesIO()
    Image.new("P", (width, height), 0).save(buf, format="PNG")
    return buf.getvalue()


def classify(base: str, data: bytes, timeout: float = REQUEST_TIMEOUT_S) -> httpx.Response:
    files = {"file": ("x.png", data, "image/png")}
    return httpx.post(base + "/v1/classify", files=files, headers=HEADERS, timeout=timeout)


def memory(c: Container) -> dict[str, int]:
    """The server process's RSS and peak RSS (PID 1 in the container) and its cgroup's charge and peak."""
    script = (
        "grep -E '^(VmRSS|VmHWM):' /proc/1/status; "
        "for f in memory.current memory.peak memory/memory.usage_in_bytes memory/memory.max_usage_in_bytes; "
        'do [ -r "/sys/fs/cgroup/$f" ] && echo "$f $(cat /sys/fs/cgroup/$f)"; done; true'
    )
    out = podman("exec", c.name, "sh", "-c", script, timeout=30).stdout
    values: dict[str, int] = {}
    for line in out.splitlines():
        key, value = line.split()[:2]
        if key in ("VmRSS:", "VmHWM:"):
            values[key[:-1].lower()] = int(value) * 1024  # kB
        elif key in ("memory.current", "memory/memory.usage_in_bytes"):
            values["cgroup"] = int(value)
        else:
            values["cgroup_peak"] = int(value)
    assert {"vmrss", "vmhwm", "cgroup"} <= values.keys(), out
    return values


def mib(n: float) -> int:
    return round(n / MIB)


def kernel_oom_kills(container_id: str) -> list[str] | None:
    """The kernel's oom-kill lines that name this container's cgroup; None when the log cannot be read."""
    try:
        result = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return None
    if result.returncode != 0:
        return None
    return [line for line in result.stdout.splitlines() if "oom-kill:" in line and container_id in line]


def events(container_id: str, since: str) -> list[dict[str, object]]:
    query = ["--stream=false", "--since", since, "--filter", f"container={container_id}", "--format", "json"]
    out = podman("events", *query).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


@dataclass
class Probe:
    """Polls /readyz every 100 ms from its own thread: (monotonic time, ready) samples."""

    base: str
    samples: list[tuple[float, bool]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            at = time.monotonic()
            try:
                ready = httpx.get(self.base + "/readyz", timeout=1.0).status_code == 200
            except httpx.HTTPError:
                ready = False
            self.samples.append((at, ready))
            self.stop.wait(0.1)

    def red_then_green(self, after: float) -> tuple[float, float] | None:
        """(first not-ready sample, first ready sample after it) at or after `after`."""
        red = next((t for t, ok in self.samples if t >= after and not ok), None)
        if red is None:
            return None
        green = next((t for t, ok in self.samples if t > red and ok), None)
        return None if green is None else (red, green)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)


@dataclass
class Outcome:
    kind: str  # "answered" (any HTTP status), "errored" (connection refused/reset/closed) or "hanging"
    detail: str
    seconds: float


def send_one(base: str, data: bytes) -> Outcome:
    start = time.monotonic()
    try:
        r = classify(base, data)
        return Outcome("answered", str(r.status_code), time.monotonic() - start)
    except httpx.TimeoutException as exc:
        return Outcome("hanging", type(exc).__name__, time.monotonic() - start)
    except httpx.TransportError as exc:
        return Outcome("errored", type(exc).__name__, time.monotonic() - start)


def measure(image: str, big: bytes) -> tuple[dict[str, int], dict[str, int]]:
    """Steady memory after warm-up and 20 small requests, then the peak of one large request (no limit)."""
    c = Container(image, NAME, MONE_WORKERS="1")
    try:
        c.wait_ready()
        for i in range(20):
            assert classify(c.base, png_bytes(seed=i)).status_code == 200
        steady = memory(c)
        r = classify(c.base, big, timeout=60)
        assert r.status_code == 200, r.text  # legal: within every limit
        return steady, memory(c)
    finally:
        c.remove()


def test_memory_limit_oom_kill_restarts_and_clients_never_hang(
    image: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # conmon 2.1.6 on cgroup v1 writes its "oom" marker into its working directory (inherited from
    # `podman run`) instead of the container's bundle, which is why podman never sees it: keep it out of
    # the checkout, and report it.
    monkeypatch.chdir(tmp_path)
    big = largest_allowed_png()
    steady, after_big = measure(image, big)
    # VmHWM includes start-up; the large request's cost is its peak over the steady RSS.
    per_request = after_big["vmhwm"] - steady["vmrss"]
    assert per_request > 100 * MIB, (steady, after_big)
    limit = math.ceil((steady["vmrss"] + 1.25 * per_request) / (64 * MIB)) * 64 * MIB
    assert steady["vmrss"] + per_request < limit < steady["vmrss"] + 2 * per_request

    flags = ["--memory", str(limit), "--memory-swap", str(limit), "--restart", "on-failure"]
    c = Container(image, NAME, flags=flags, MONE_WORKERS="1")
    probe: Probe | None = None
    try:
        since = datetime.now(UTC).isoformat()
        c.wait_ready()
        info = c.inspect()
        container_id = str(info["Id"])
        assert info["RestartCount"] == 0
        host_config = info["HostConfig"]
        assert isinstance(host_config, dict)
        assert host_config["Memory"] == limit
        assert host_config["MemorySwap"] == limit

        # One large request fits under the limit.
        assert classify(c.base, png_bytes()).status_code == 200
        limited_steady = memory(c)
        r = classify(c.base, big, timeout=60)
        assert r.status_code == 200, r.text
        one_big = memory(c)

        probe = Probe(c.base)
        time.sleep(0.5)
        assert probe.samples
        assert all(ok for _, ok in probe.samples), "not ready before the burst"
        burst_start = time.monotonic()
        with ThreadPoolExecutor(max_workers=BURST) as pool:
            futures = [pool.submit(send_one, c.base, big) for _ in range(BURST)]
            done, not_done = wait(futures, timeout=BURST_BOUND_S)
            outcomes = [f.result() for f in done]
            for f in not_done:
                f.cancel()
        burst_s = time.monotonic() - burst_start

        end = burst_start + RED_TO_GREEN_BOUND_S
        while probe.red_then_green(burst_start) is None and time.monotonic() < end:
            time.sleep(0.2)
        flip = probe.red_then_green(burst_start)
        probe.close()

        answered = [o for o in outcomes if o.kind == "answered"]
        errored = [o for o in outcomes if o.kind == "errored"]
        hanging = sum(o.kind == "hanging" for o in outcomes) + len(not_done)
        after = c.inspect()
        state = after["State"]
        assert isinstance(state, dict)
        died = [e for e in events(container_id, since) if e.get("Status") == "died"]
        exit_codes = [e.get("ContainerExitCode", 0) for e in died]
        kernel = kernel_oom_kills(container_id)
        after_ok = classify(c.base, png_bytes(seed=99)) if flip else None

        figures = {
            "limit_mib": mib(limit),
            "steady_rss_mib": mib(steady["vmrss"]),
            "steady_cgroup_mib": mib(steady["cgroup"]),
            "large_request_mib": mib(per_request),
            "large_png_bytes": len(big),
            "limited_steady_rss_mib": mib(limited_steady["vmrss"]),
            "one_large_peak_rss_mib": mib(one_big["vmhwm"]),
            "one_large_peak_cgroup_mib": mib(one_big.get("cgroup_peak", 0)),
            "sent": BURST,
            "answered": dict(Counter(o.detail for o in answered)),
            "errored": dict(Counter(o.detail for o in errored)),
            "hanging": hanging,
            "slowest_s": round(max((o.seconds for o in outcomes), default=0.0), 2),
            "burst_s": round(burst_s, 2),
            "red_to_green_s": round(flip[1] - flip[0], 1) if flip else None,
            "exit_codes": exit_codes,
            "oom_killed_state": state.get("OOMKilled"),
            "conmon_oom_marker": (tmp_path / "oom").exists(),
            "kernel_oom_kills": None if kernel is None else len(kernel),
            "restart_count": after["RestartCount"],
        }
        print(f"\nREL-FIGURES memory_limit {json.dumps(figures, sort_keys=True)}")  # noqa: T201

        # Every client settled within its timeout: an answer or a connection error, none left waiting.
        assert not hanging, figures
        assert len(answered) + len(errored) == BURST, figures
        assert errored, f"nobody saw the kill: {figures}"
        # The kernel killed it for memory.
        assert 137 in exit_codes, figures
        if not state.get("OOMKilled"):
            assert kernel is not None, "State.OOMKilled is false and the kernel log cannot be read"
            assert kernel, f"exit 137 but no oom-kill of this container in the kernel log: {figures}"
        # The restart policy brought it back, with the same limit.
        restarts = after["RestartCount"]
        assert isinstance(restarts, int)
        assert restarts >= 1, figures
        host_config = after["HostConfig"]
        assert isinstance(host_config, dict)
        assert host_config["Memory"] == limit
        # Health went red, then green; and it serves again.
        assert flip is not None, f"/readyz did not go red then green in {RED_TO_GREEN_BOUND_S} s: {figures}"
        assert after_ok is not None
        assert after_ok.status_code == 200, after_ok.text
    finally:
        if probe is not None:
            probe.close()
        c.remove()
