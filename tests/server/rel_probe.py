"""`python -m tests.server.rel_probe OUT URL [INTERVAL_S]`: probe URL as a kubelet does, from a process of
its own, until SIGTERM; then write every probe to OUT as JSON lines `[sent_at, status, seconds]`.

Each probe is a new connection (no keep-alive) with a 5 s timeout; status 0 means no HTTP answer.
`sent_at` is `time.monotonic()`, which on Linux is the same clock in every process.
"""

from __future__ import annotations

import http.client
import json
import signal
import sys
import time
from types import FrameType
from urllib.parse import urlsplit

stop = False


def _stop(signum: int, frame: FrameType | None) -> None:
    global stop
    stop = True


def probe(host: str, port: int, path: str) -> tuple[int, float]:
    t0 = time.monotonic()
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        r.read()
        status = r.status
    except OSError:
        status = 0
    finally:
        conn.close()
    return status, time.monotonic() - t0


def main(out: str, url: str, interval: float = 0.02) -> None:
    signal.signal(signal.SIGTERM, _stop)
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    rows = []
    while not stop:
        sent = time.monotonic()
        status, seconds = probe(host, port, parts.path or "/")
        rows.append([sent, status, seconds])
        time.sleep(interval)
    with open(out, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]) if len(sys.argv) > 3 else 0.02)
