"""Hostile traffic on the wire against a real server on 127.0.0.1 (docs/reliability.md rows 1-4 and 28):
bodies over the limit (declared, chunked, lying), slow senders, garbage request lines and headers, multipart
abuse.  Every one gets a 4xx or a closed connection, never a 5xx; memory stays flat; other clients are
unaffected."""

from __future__ import annotations

import collections
import contextlib
import random
import socket
import statistics
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from mone.server.http.protocol import MAX_HEAD_BYTES
from tests.server.rel_load import Server, figures, launch, total
from tests.support.media import fashion_images, png

pytestmark = pytest.mark.slow
LIMIT = 1_000_000
BODY = png(fashion_images(1)[0])


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    s = launch(
        "--max-body-bytes",
        str(LIMIT),
        "--max-image-bytes",
        str(LIMIT),
        "--header-timeout-s",
        "1.5",
        "--body-timeout-s",
        "2",
        "--limit-concurrency",
        "200",
    )
    yield s
    assert s.proc.poll() is None, "the server died"
    s.stop()


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


def connect(server: Server) -> socket.socket:
    host, port = server.base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def exchange(server: Server, raw: bytes, wait: float = 5.0) -> bytes:
    """Send raw bytes, return what comes back until the server closes or `wait` passes."""
    with connect(server) as sock:
        sock.settimeout(wait)
        with contextlib.suppress(OSError):
            sock.sendall(raw)
        out = b""
        try:
            while chunk := sock.recv(65536):
                out += chunk
                if b"\r\n\r\n" in out and b"connection: close" not in out.lower():
                    break
        except (TimeoutError, OSError):
            pass
        return out


def status_of(reply: bytes) -> int | None:
    if not reply.startswith(b"HTTP/1.1 "):
        return None
    return int(reply[9:12])


def healthy(server: Server) -> None:
    assert httpx.get(server.base + "/healthz", timeout=5).status_code == 200
    r = httpx.post(server.base + "/v1/classify", content=BODY, timeout=10)
    assert r.status_code == 200, r.text


def test_rel_declared_body_over_limit_is_413_before_the_body(server: Server) -> None:
    head = b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
    t0 = time.monotonic()
    reply = exchange(server, head + f"Content-Length: {60 * 1024 * 1024}\r\n\r\n".encode())
    took = time.monotonic() - t0
    assert status_of(reply) == 413, reply[:200]
    assert took < 1.0
    healthy(server)
    figures("declared_body_413", seconds=round(took, 3))


def test_rel_chunked_and_lying_bodies_are_cut_off_with_flat_memory(server: Server) -> None:
    before = rss_mb(server.proc.pid)
    peak = before
    sent_total = 0
    # 1) chunked, endless: stream up to 100 MB until the server answers or hangs up
    with connect(server) as sock:
        sock.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n" % 65536 + b"\0" * 65536 + b"\r\n"
        sock.settimeout(0.001)
        reply = b""
        for i in range(1600):
            try:
                sock.sendall(chunk)
                sent_total += 65536
            except OSError:
                break
            try:
                reply += sock.recv(4096)
                if reply:
                    break
            except (TimeoutError, BlockingIOError, OSError):
                pass
            if i % 50 == 0:
                peak = max(peak, rss_mb(server.proc.pid))
        sock.settimeout(5)
        with contextlib.suppress(OSError):
            reply += sock.recv(4096)
    assert status_of(reply) == 413, reply[:200]
    assert sent_total < 20 * LIMIT, "the server must stop reading soon after the limit"
    # 2) a Content-Length under the limit followed by far more bytes than it declared
    lying = b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 100\r\n\r\n"
    reply2 = exchange(server, lying + b"\0" * (5 * LIMIT))
    assert status_of(reply2) in (None, 400, 413, 415), reply2[:200]
    assert b"HTTP/1.1 5" not in reply2
    peak = max(peak, rss_mb(server.proc.pid))
    assert peak - before < 64, f"RSS grew {peak - before:.0f} MB"
    healthy(server)
    figures(
        "chunked_body", sent_before_413_mb=round(sent_total / 1e6, 1), rss_growth_mb=round(peak - before, 1)
    )


def test_rel_slowloris_is_closed_and_others_unaffected(server: Server) -> None:
    """40 connections trickling header bytes and 10 trickling a body: each is closed at its receipt
    deadline (1.5 s headers, 2 s body); normal requests meanwhile stay fast."""
    closed_after: list[float] = []

    def trickle(prefix: bytes, n: int) -> None:
        t0 = time.monotonic()
        try:
            with connect(server) as sock:
                sock.sendall(prefix)
                for _ in range(n):
                    time.sleep(0.2)
                    sock.sendall(b"a")
                    sock.settimeout(0.01)
                    try:
                        if sock.recv(1) == b"":
                            break
                    except (TimeoutError, BlockingIOError):
                        pass
        except OSError:
            pass
        closed_after.append(time.monotonic() - t0)

    headers = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: "
    body = b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
    threads = [threading.Thread(target=trickle, args=(headers, 50)) for _ in range(40)]
    threads += [threading.Thread(target=trickle, args=(body, 50)) for _ in range(10)]
    for t in threads:
        t.start()
    latencies = []
    with httpx.Client(base_url=server.base, timeout=10) as c:
        for _ in range(20):
            t0 = time.monotonic()
            assert c.post("/v1/classify", content=BODY).status_code == 200
            latencies.append(time.monotonic() - t0)
            time.sleep(0.05)
    for t in threads:
        t.join(15)
    assert len(closed_after) == 50
    assert max(closed_after) < 4.0, sorted(closed_after)[-5:]
    p99 = sorted(latencies)[-1] * 1e3
    assert p99 < 1000
    figures(
        "slowloris",
        slow_connections=50,
        closed_within_s=round(max(closed_after), 2),
        median_closed_s=round(statistics.median(closed_after), 2),
        normal_requests=20,
        normal_max_ms=round(p99, 1),
        normal_median_ms=round(statistics.median(latencies) * 1e3, 1),
    )


def test_rel_request_head_is_bounded(server: Server) -> None:
    """A head (request line and headers) over `MAX_HEAD_BYTES` gets 431 and a closed connection; one just
    under it is served.  httptools would otherwise buffer a header that never ends, for as long as the
    receipt deadline allows."""

    def send_head(header_bytes: int, complete: bool) -> bytes:
        head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * header_bytes
        if complete:
            head += b"\r\n\r\n"
        with connect(server) as sock:
            for i in range(0, len(head), 8192):
                sock.sendall(head[i : i + 8192])
                time.sleep(0.002)  # several reads on the server's side
            sock.settimeout(5.0)
            reply = b""
            with contextlib.suppress(OSError):
                while chunk := sock.recv(65536):
                    reply += chunk
                    if complete and b"\r\n\r\n" in reply:
                        break
        return reply

    over = send_head(MAX_HEAD_BYTES + 1024, complete=False)  # the last read passes the bound: all is read
    assert over.startswith(b"HTTP/1.1 431"), over[:100]
    assert b"connection: close" in over.lower()
    under = send_head(MAX_HEAD_BYTES - 1024, complete=True)
    assert under.startswith(b"HTTP/1.1 200"), under[:100]
    healthy(server)


GARBAGE = [
    b"GARBAGE\r\n\r\n",
    b"GET / HTTP/9.9\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nno colon here\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n",
    b"GET /\x00\x01 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"G\xffT / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
    b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /v1/models/%ff%fe HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /v2/models/../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\r\n\r\n\r\n",
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
]


def test_rel_garbage_requests_get_4xx_or_close(server: Server) -> None:
    rng = random.Random(4)
    cases = list(GARBAGE)
    for _ in range(80):  # random request lines and header blocks
        line = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
        cases.append(rng.choice([line, b"GET / HTTP/1.1\r\n" + line + b"\r\n\r\n", line + b"\r\n\r\n"]))
    seen: dict[str, int] = {}
    for raw in cases:
        status = status_of(exchange(server, raw, wait=3.0))
        seen[str(status)] = seen.get(str(status), 0) + 1
        assert status is None or status < 500 or status == 503, (raw[:80], status)
    assert server.proc.poll() is None
    healthy(server)
    fivexx = sum(v for k, v in server.live_metrics().items() if 'code="5' in k or "code=5" in k)
    assert fivexx == 0
    figures("garbage_requests", sent=len(cases), replies=seen)


def test_rel_multipart_abuse_is_refused_fast(server: Server) -> None:
    boundary = "xyz"
    many = "".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="f{i}"\r\n\r\nv\r\n' for i in range(2000)
    )
    many += f"--{boundary}--\r\n"
    huge_field = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="capacity"\r\n\r\n'
        + "9" * 900_000
        + f"\r\n--{boundary}--\r\n"
    )
    many_files = (
        "".join(
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a{i}.png"\r\n'
            f"Content-Type: image/png\r\n\r\nx\r\n"
            for i in range(500)
        )
        + f"--{boundary}--\r\n"
    )
    flood = "&".join(f"k{i}=v" for i in range(100_000))
    cases = {
        "2000_parts": (many.encode(), f"multipart/form-data; boundary={boundary}"),
        "huge_non_file_field": (huge_field.encode(), f"multipart/form-data; boundary={boundary}"),
        "500_files": (many_files.encode(), f"multipart/form-data; boundary={boundary}"),
        "urlencoded_flood": (flood.encode(), "application/x-www-form-urlencoded"),
        "no_boundary": (b"--x\r\n\r\n", "multipart/form-data"),
    }
    health: list[float] = []
    answers: list[int | str] = []  # status codes, or the error a probe got; asserted below
    stop = threading.Event()

    def probe() -> None:
        with httpx.Client(base_url=server.base, timeout=5) as c:
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    answers.append(c.get("/healthz").status_code)
                except httpx.HTTPError as exc:
                    answers.append(type(exc).__name__)
                health.append(time.monotonic() - t0)
                time.sleep(0.01)

    prober = threading.Thread(target=probe)
    prober.start()
    out = {}
    try:
        for name, (data, ctype) in cases.items():
            t0 = time.monotonic()
            r = httpx.post(
                server.base + "/v1/classify", content=data, headers={"content-type": ctype}, timeout=10
            )
            out[name] = (r.status_code, round(time.monotonic() - t0, 3))
            assert r.status_code in (400, 413, 415, 422), (name, r.status_code, r.text[:200])
            assert time.monotonic() - t0 < 2.0, name
    finally:
        stop.set()
        prober.join()
    assert answers
    assert set(answers) == {200}, collections.Counter(answers)
    assert max(health) < 0.5, f"event loop blocked: /healthz took {max(health) * 1e3:.0f} ms"
    healthy(server)
    figures("multipart_abuse", results=out, health_max_ms=round(max(health) * 1e3, 1))


def test_rel_no_5xx_and_nothing_in_flight_after_all_of_the_above(server: Server) -> None:
    m = server.live_metrics()
    assert total(m, "mone_inflight_requests") == 0
    five = {k: v for k, v in m.items() if k.startswith("mone_requests_total") and "code=5" in k and v}
    assert not five, five
