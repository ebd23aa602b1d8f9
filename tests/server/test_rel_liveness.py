"""Against a real `mone-serve --random-init` process: a hung forward turns liveness red, and a full queue
refuses an upload from its headers, before its body is read."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.server.rel_load import Server, free_port, launch, total
from tests.support.media import fashion_images, png

pytestmark = pytest.mark.slow
BODY = png(fashion_images(1)[0])


def _post_in_thread(base: str, results: list[int | str]) -> threading.Thread:
    """POST one image from a thread; its status (or error) lands in `results`, asserted by the caller."""

    def post() -> None:
        try:
            results.append(httpx.post(base + "/v1/classify", content=BODY, timeout=60).status_code)
        except httpx.HTTPError as exc:
            results.append(type(exc).__name__)

    thread = threading.Thread(target=post)
    thread.start()
    return thread


def _get(url: str) -> tuple[int, dict[str, object]]:
    r = httpx.get(url, timeout=2)
    return r.status_code, r.json()


def _wait_inflight(server: Server, n: int, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if total(server.live_metrics(), "mone_inflight_requests") >= n:
            return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize(
    ("limit", "flags", "after_s"),
    [
        ("predicted time", ["--stuck-batch-factor", "2", "--stuck-batch-min-s", "1.5"], 1.5),
        ("ceiling", ["--stuck-batch-min-s", "1000", "--stuck-batch-ceiling-s", "1.5"], 1.5),
    ],
)
def test_rel_a_hung_forward_turns_liveness_red(
    tmp_path: Path, limit: str, flags: list[str], after_s: float
) -> None:
    """A forward that hangs: /healthz (main port and probe port) and /v2/health/live stay 200 until the
    batch has run past its limit, then answer 503 `stuck`; once the forward returns they are 200 again and
    the request is answered."""
    hang = tmp_path / "hang"
    health_port = free_port()
    server = launch("--health-port", str(health_port), *flags, env={"REL_HANG_FILE": str(hang)})
    probe = f"http://127.0.0.1:{health_port}/healthz"
    results: list[int | str] = []
    stuck_body: dict[str, object] = {}
    seen: list[tuple[float, int, int, int]] = []  # (seconds since the request, main, probe, OIP) statuses
    try:
        assert _get(server.base + "/healthz") == (200, {"status": "ok"})
        hang.touch()
        t0 = time.monotonic()
        poster = _post_in_thread(server.base, results)
        assert _wait_inflight(server, 1)
        while time.monotonic() - t0 < after_s + 8:
            main, body = _get(server.base + "/healthz")
            seen.append(
                (
                    time.monotonic() - t0,
                    main,
                    _get(probe)[0],
                    httpx.get(server.base + "/v2/health/live").status_code,
                )
            )
            if main == 503:
                stuck_body = body
                break
            time.sleep(0.05)
        # Red on every liveness route at once (the probe listener and OIP read the same engine state).
        red = (_get(probe), httpx.get(server.base + "/v2/health/live", timeout=2))
        hang.unlink()
        poster.join(30)
        after = (_get(server.base + "/healthz"), _get(probe)[0])
    finally:
        hang.unlink(missing_ok=True)
        server.stop()
    assert not poster.is_alive()
    assert results == [200], results
    first_red = next(t for t, main, _, _ in seen if main == 503)
    assert first_red >= after_s - 0.2, seen  # not before the limit
    before_limit = [statuses for t, *statuses in seen if t < after_s - 0.2]
    assert before_limit, seen
    assert all(statuses == [200, 200, 200] for statuses in before_limit), seen
    assert stuck_body["status"] == "stuck"
    assert float(stuck_body["batch_running_s"]) > float(stuck_body["limit_s"])  # type: ignore[arg-type]
    assert red[0][0] == 503
    assert red[0][1]["status"] == "stuck"
    assert red[1].status_code == 503
    assert red[1].json()["live"] is False
    assert after == ((200, {"status": "ok"}), 200)


def _answer(sock: socket.socket) -> bytes:
    """One whole HTTP answer (head and Content-Length body) read from `sock`."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def _raw(port: int, head: str, body: bytes = b"", timeout: float = 5.0) -> tuple[socket.socket, bytes]:
    """Send a request head (and part of a body) on a new connection; returns it and the whole answer."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.sendall(head.encode() + body)
    return sock, _answer(sock)


def test_rel_full_queue_refuses_from_the_headers_before_the_body(tmp_path: Path) -> None:
    """One request hangs in the model and one fills the queue of 1.  An upload declaring 20 MB gets its 429
    after 1 KiB of it was sent (the rest never is) and the connection is closed; a small complete request
    gets its 429 on a connection that stays usable.  Once the forward returns, the two are answered."""
    hang = tmp_path / "hang"
    server = launch("--max-batch-size", "1", "--max-queue-size", "1", env={"REL_HANG_FILE": str(hang)})
    port = int(server.base.rsplit(":", 1)[1])
    results: list[int | str] = []
    try:
        hang.touch()
        first = _post_in_thread(server.base, results)
        assert _wait_inflight(server, 1)
        second = _post_in_thread(server.base, results)
        assert _wait_inflight(server, 2)
        head = (
            "POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            f"Content-Length: {20 * 1024 * 1024}\r\n\r\n"
        )
        t0 = time.monotonic()
        big, big_answer = _raw(port, head, b"\0" * 1024)
        big_s = time.monotonic() - t0
        big.settimeout(5)
        try:  # the server closes the connection: EOF, or a reset for the body it never read
            while big.recv(65536):
                pass
            closed = True
        except ConnectionResetError:
            closed = True
        except TimeoutError:
            closed = False
        big.close()
        small_head = (
            "POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            f"Content-Length: {len(BODY)}\r\n\r\n"
        )
        small, small_answer = _raw(port, small_head, BODY)
        small.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        again = _answer(small)
        small.close()
        hang.unlink()
        first.join(30)
        second.join(30)
        rejected = total(server.live_metrics(), "mone_rejected_total", reason="overloaded")
    finally:
        hang.unlink(missing_ok=True)
        server.stop()
    assert big_answer.startswith(b"HTTP/1.1 429"), big_answer[:200]
    assert b"retry-after:" in big_answer.lower()
    assert b"connection: close" in big_answer.lower()
    assert closed
    assert big_s < 2.0, big_s
    assert small_answer.startswith(b"HTTP/1.1 429"), small_answer[:200]
    assert b"connection: close" not in small_answer.lower()
    assert again.startswith(b"HTTP/1.1 200"), again[:200]
    assert sorted(results) == [200, 200], results
    assert rejected >= 2
