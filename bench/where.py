"""Where a served request's time goes: py-spy samples of a real server under an outside load, by stage.

    python -m bench.where                                  # shipped checkpoint, 16 clients, capacity 1.0
    python -m bench.where --clients 1 --capacity 0.25
    python -m bench.where --variant S/16 --clients 1       # a random S/16 at 224 px

Starts one mone-serve (bench.serve's batching settings), drives it with `hey` (raw PNG or JPEG body, budget
in the query string) and samples every thread of the server with py-spy (`--nonblocking`, so the server is
never paused; idle threads are not sampled).  Each sample is charged to the innermost stage it is in:

    forward    the model (model/), the runner's forward, compiled forwards and CUDA graphs
    decode     sniffing, decoding and preprocessing the upload (server/media/, model/preprocess, PIL, PyAV)
    batching   budgets, batching, scheduling, the latency model, the engine and the runner around the forward
    metrics    Prometheus (prometheus_client, server/http/metrics.py) and the access log
    response   building and serialising answers (pydantic, build_response, json)
    framework  FastAPI / Starlette routing, middleware and request parsing (multipart)
    http       uvicorn, httptools, the asyncio event loop's own work
    other      anything else

and shown per thread (the event loop, the inference threads, the rest) as a share of all samples and as busy
thread milliseconds per request answered (running, not waiting; the forward's own worker threads are not
sampled, so its row is the wall time of the inference threads).
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import serve as bs
from bench.budget import add_server_args, checkpoint_of, cpu_model, drive_hey, make_inputs

# Innermost match wins; checked in this order for each frame.
_AT = r"(?:\(|/)"  # py-spy writes a frame as "name (path/file.py:line)", paths relative to sys.path
STAGES: list[tuple[str, re.Pattern[str]]] = [
    (
        "forward",
        re.compile(
            rf"Runner\._forward\b|{_AT}server/core/(compiled|capture)\.py|{_AT}model/(?!preprocess\.py)|{_AT}torch/"
        ),
    ),
    ("decode", re.compile(rf"{_AT}server/media/|{_AT}model/preprocess\.py|{_AT}(PIL|av)/")),
    ("batching", re.compile(rf"{_AT}server/core/|{_AT}concurrent/")),
    ("metrics", re.compile(rf"{_AT}prometheus_client/|{_AT}server/http/(metrics|access)\.py|{_AT}logging/")),
    ("response", re.compile(rf"{_AT}pydantic|build_response|{_AT}json/")),
    ("framework", re.compile(rf"{_AT}(fastapi|starlette|multipart|python_multipart)/")),
    ("http", re.compile(rf"{_AT}(uvicorn|asyncio)/|httptools|selectors\.py")),
]
ORDER = [name for name, _ in STAGES] + ["other"]


def stage_of(frames: list[str]) -> str:
    """The stage of the innermost frame that belongs to one (frames run from the root to the leaf)."""
    for frame in reversed(frames):
        for name, pattern in STAGES:
            if pattern.search(frame):
                return name
    return "other"


def thread_group(label: str) -> str:
    if "MainThread" in label:
        return "event loop"
    if "mone-infer" in label or "mone-stream" in label:
        return "inference"
    return "other threads"


def summarise(raw: str) -> dict[str, collections.Counter[str]]:
    """Samples per thread group and stage from py-spy's raw (collapsed) output."""
    out: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        out[thread_group(frames[0])][stage_of(frames[1:])] += int(count)
    return out


def table(samples: dict[str, collections.Counter[str]], rate: int, requests: float) -> str:
    total = sum(sum(c.values()) for c in samples.values()) or 1
    head = "| thread | " + " | ".join(ORDER) + " | all |\n|---|" + "---|" * (len(ORDER) + 1)
    lines = [head]
    for group in ("event loop", "inference", "other threads"):
        c = samples.get(group, collections.Counter())
        cells = [f"{100 * c[s] / total:.1f} % ({c[s] / rate / requests * 1e3:.2f})" for s in ORDER]
        lines.append(
            f"| {group} | " + " | ".join(cells) + f" | {sum(c.values()) / rate / requests * 1e3:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_server_args(p)
    p.add_argument("--clients", type=int, default=16, help="concurrent clients")
    p.add_argument("--capacity", type=float, default=1.0, help="capacity every request asks for")
    p.add_argument("--seconds", type=float, default=10.0, help="length of the sampled run")
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--raw", type=Path, help="also keep py-spy's raw samples in this file")
    args = p.parse_args(argv)
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(pyspy).exists() or shutil.which("hey") is None:
        print("bench.where needs py-spy (pip) and hey (apt) on the PATH", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        ckpt, cfg = checkpoint_of(args, tmp)
        path, content_type, _ = make_inputs(cfg, tmp)["image"]
        # One process, whose threads the table breaks down (with several workers, each is such a process).
        server = bs.start_mone(ckpt, args, "--workers", "1", log=tmp / "server.log")
        try:
            url = f"{server.base}/v1/classify?capacity={args.capacity:g}"
            drive_hey(url, path, content_type, args.clients, 2.0)  # warm-up
            raw = tmp / "pyspy.txt"
            load = subprocess.Popen(
                ["hey", "-z", f"{args.seconds + 2:g}s", "-c", str(args.clients), "-o", "csv", "-m", "POST"]
                + ["-T", content_type, "-D", str(path), url],
                stdout=subprocess.PIPE,
                text=True,
            )
            time.sleep(1.0)
            spy = [
                pyspy,
                "record",
                "--pid",
                str(server.proc.pid),
                "-d",
                f"{args.seconds:g}",
                "-r",
                str(args.rate),
            ]
            spy += ["-f", "raw", "-o", str(raw), "--threads", "--nonblocking"]
            subprocess.run(spy, check=True, capture_output=True)
            out, _ = load.communicate()
            answered = sum(1 for line in out.splitlines()[1:] if line.split(",")[6:7] == ["200"])
            requests = answered * args.seconds / (args.seconds + 2)  # those inside the sampled window
            text = raw.read_text()
            if args.raw:
                args.raw.write_text(text)
        finally:
            server.stop()
    model = f"random {cfg.variant}" if args.variant else f"{ckpt.name} ({cfg.variant})"
    print(
        f"# bench.where, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {cpu_model()}, {model}, "
        f"capacity {args.capacity:g}, {args.clients} clients, {answered / (args.seconds + 2):.1f} req/s; "
        f"share of samples (busy thread ms per request)\n"
    )
    print(table(summarise(text), args.rate, max(requests, 1.0)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
