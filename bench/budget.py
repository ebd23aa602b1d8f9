"""Does a lower budget buy a faster answer?  Capacities side by side through a real server.

    python -m bench.budget                        # the shipped checkpoint, 28 px PNGs and the sample GIF
    python -m bench.budget --variant S/16         # a random S/16 at 224 px (JPEG images, 8-frame clips)
    python -m bench.budget --checkpoint DIR --rounds 3 --seconds 8 --json

One mone-serve (bench.serve's batching settings, everything else default) is driven from outside its
process: by `hey` (Debian's package; Go, one process) when it is installed, else by client processes of
bench.serve's own HTTP client.  `hey` posts the raw file as the body with the budget in the query string;
the fallback sends multipart uploads.  For each capacity: throughput at `--clients` concurrent clients and
p50 / p99 latency of one client alone, for images and for clips.  Rounds take the capacities in turn (in
reverse every other round) and the table shows medians over rounds, each capacity's ratio to capacity 1.0,
and the server's CPU time per request (its process, user + system, from /proc) and the batches' compute
time per request (from /metrics).  Cost is monotone when each lower capacity serves at least the throughput
and at most the single-request p50 of the capacity above it (within `--tolerance`, the run-to-run spread).
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from bench import serve as bs
from bench.ab import compute_counters, group_cpu_seconds
from mone.model import MoNEConfig
from mone.model.checkpoint import read_checkpoint_info

CAPACITIES = (1.0, 0.5, 0.25)
SAMPLES = bs.ROOT / "clients" / "web" / "samples"


@dataclass
class Point:
    """One run: a kind of input at one capacity and concurrency."""

    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_ms: float  # server CPU per request
    compute_ms: float  # batch compute (wall) per request


@dataclass
class Cell:
    runs: list[Point] = field(default_factory=list)

    def median(self, name: str) -> float:
        return float(statistics.median(getattr(p, name) for p in self.runs))


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown CPU"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def parse_hey_csv(text: str, seconds: float) -> tuple[float, float, float, int]:
    """Requests/s answered 200, p50 and p99 latency in ms of those, and other outcomes, from `hey -o csv`
    (one row per request: response-time, ..., status-code, offset)."""
    ok: list[float] = []
    other = 0
    for line in text.splitlines()[1:]:
        cols = line.split(",")
        if len(cols) < 8:
            continue
        if cols[6] == "200":
            ok.append(float(cols[0]) * 1e3)
        else:
            other += 1
    if not ok:
        return 0.0, float("nan"), float("nan"), other
    p50, p99 = np.percentile(ok, [50, 99])
    return len(ok) / seconds, float(p50), float(p99), other


def drive_hey(
    url: str, body: Path, content_type: str, clients: int, seconds: float
) -> tuple[float, float, float, int]:
    cmd = ["hey", "-z", f"{seconds}s", "-c", str(clients), "-o", "csv", "-m", "POST", "-T", content_type]
    out = subprocess.run([*cmd, "-D", str(body), url], capture_output=True, text=True, check=True).stdout
    return parse_hey_csv(out, seconds)


def drive_python(
    url: str, body: bytes, fields: dict[str, str], clients: int, seconds: float
) -> tuple[float, float, float, int]:
    run = bs.drive("closed", url, [body], fields, clients, seconds, "budget", procs=min(clients, 4))
    return run.rps, run.pct(50), run.pct(99), run.errors


def measure(
    server: bs.Server,
    use_hey: bool,
    inp: tuple[Path, str, str],
    capacity: float,
    clients: int,
    seconds: float,
) -> Point:
    path, content_type, kind = inp
    cpu0, (sum0, _) = group_cpu_seconds(server.proc.pid), compute_counters(server.base)
    query = f"capacity={capacity:g}" + ("&kind=clip" if kind == "clip" else "")
    if use_hey:
        rps, p50, p99, errors = drive_hey(
            f"{server.base}/v1/classify?{query}", path, content_type, clients, seconds
        )
    else:
        fields = {"capacity": f"{capacity:g}", **({"kind": "clip"} if kind == "clip" else {})}
        rps, p50, p99, errors = drive_python(
            server.base + "/v1/classify", path.read_bytes(), fields, clients, seconds
        )
    cpu, (sum1, _) = group_cpu_seconds(server.proc.pid) - cpu0, compute_counters(server.base)
    served = max(rps * seconds, 1.0)
    return Point(rps, p50, p99, errors, cpu / served * 1e3, (sum1 - sum0) / served * 1e3)


def compiled_plans(base: str) -> dict[str, int] | None:
    """The compiled-plans section of /v1/models (the worker that answers), or None when they are off."""
    models = httpx.get(base + "/v1/models", timeout=10, headers={"Connection": "close"}).json()["models"]
    found = models[0].get("checkpoint", {}).get("compiled_plans")
    return None if found is None else {k: v for k, v in found.items() if isinstance(v, int)}


def wait_for_compiled(
    server: bs.Server,
    use_hey: bool,
    inputs: dict[str, tuple[Path, str, str]],
    clients: int,
    timeout_s: float,
) -> str:
    """Serve every input and capacity, alone and at `clients` concurrent clients, until every worker that
    answers has what that traffic compiles (`compiled_plans`: one forward per batch size it forms, 15-40 s
    each on 2 vCPUs) loaded, nothing queued and nothing more loaded over one more pass, so that the runs time
    what a warm server serves.  Returns what the workers reported, or '' when compiled plans are off."""
    want = len(inputs) * len(CAPACITIES)
    deadline = time.monotonic() + timeout_s
    seen: list[dict[str, int]] = []
    before: set[tuple[int, int]] = set()
    while time.monotonic() < deadline:
        for inp in inputs.values():
            for c in CAPACITIES:  # short runs on fresh connections, which land on every worker
                measure(server, use_hey, inp, c, 1, 0.3)
                measure(server, use_hey, inp, c, clients, 0.5)
        seen = [p for p in (compiled_plans(server.base) for _ in range(8)) if p is not None]
        if not seen:
            return ""
        now = {(p["loaded"], p["failed"]) for p in seen}
        if all(p["loaded"] >= want and p["queued"] == 0 for p in seen) and now == before:
            break
        before = now
        time.sleep(2.0)
    return ", ".join(sorted({f"{p['loaded']} loaded, {p['failed']} failed" for p in seen}))


def make_inputs(cfg: MoNEConfig, tmp: Path) -> dict[str, tuple[Path, str, str]]:
    """An image of the model's size (PNG at 28 px, JPEG otherwise) and an 8-frame clip (the sample GIF for a
    28-px grey model, else a GIF of the model's size)."""
    rng = np.random.default_rng(0)
    mode = "L" if cfg.in_chans == 1 else "RGB"
    shape = (cfg.img_size, cfg.img_size) if cfg.in_chans == 1 else (cfg.img_size, cfg.img_size, 3)
    image = tmp / ("image.png" if cfg.img_size <= 32 else "image.jpg")
    if cfg.img_size == 28 and (SAMPLES / "shirt.png").exists():
        shutil.copy(SAMPLES / "shirt.png", image)
    else:
        Image.fromarray((rng.random(shape) * 255).astype(np.uint8), mode).save(image, quality=90)
    clip = tmp / "clip.gif"
    if cfg.img_size == 28 and (SAMPLES / "sweep.gif").exists():
        shutil.copy(SAMPLES / "sweep.gif", clip)
    else:
        frames = [
            Image.fromarray((rng.random(shape) * 255).astype(np.uint8), mode) for _ in range(cfg.num_frames)
        ]
        buf = io.BytesIO()
        frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100)
        clip.write_bytes(buf.getvalue())
    kinds = {"image": (image, "image/png" if image.suffix == ".png" else "image/jpeg", "image")}
    if cfg.temporal_depth or cfg.num_frames > 1:
        kinds["clip"] = (clip, "image/gif", "clip")
    return kinds


def table(cells: dict[tuple[str, float, str], Cell], kinds: list[str], tolerance: float) -> tuple[str, bool]:
    """The markdown table and whether cost is monotone in the budget for every kind."""
    head = (
        "| input | capacity | req/s, N clients | × of 1.0 | p50 ms, 1 client | p99 ms | × faster than 1.0 "
        "| server CPU ms/req | compute ms/req | errors |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    lines, monotone = [head], True
    for kind in kinds:
        base_rps, base_p50 = (
            cells[(kind, 1.0, "load")].median("rps"),
            cells[(kind, 1.0, "one")].median("p50_ms"),
        )
        prev: tuple[float, float] | None = None
        for c in CAPACITIES:
            load, one = cells[(kind, c, "load")], cells[(kind, c, "one")]
            rps, p50 = load.median("rps"), one.median("p50_ms")
            errors = sum(p.errors for p in load.runs + one.runs)
            lines.append(
                f"| {kind} | {c:g} | {rps:.1f} | {rps / base_rps:.2f} | {p50:.2f} "
                f"| {one.median('p99_ms'):.2f} | {base_p50 / p50:.2f} | {load.median('cpu_ms'):.2f} "
                f"| {load.median('compute_ms'):.2f} | {errors} |"
            )
            if prev is not None and (rps < prev[0] * (1 - tolerance) or p50 > prev[1] * (1 + tolerance)):
                monotone = False
            prev = (rps, p50)
    return "\n".join(lines), monotone


def add_server_args(p: argparse.ArgumentParser) -> None:
    """The model and batching options of a benchmark that starts one mone-serve."""
    p.add_argument("--checkpoint", type=Path, default=bs.SHIPPED, help="checkpoint directory to serve")
    p.add_argument("--variant", help="serve a randomly initialised model of this variant instead (e.g. S/16)")
    p.add_argument("--batch", type=int, default=32, help="mone-serve --max-batch-size")
    p.add_argument("--wait-ms", type=float, default=5.0, help="mone-serve --max-batch-wait-ms")
    p.add_argument("--queue", type=int, default=128, help="mone-serve --max-queue-size")


def checkpoint_of(args: argparse.Namespace, tmp: Path) -> tuple[Path, MoNEConfig]:
    """The checkpoint to serve (a random one of `--variant`, written into `tmp`) and its config."""
    if args.variant:
        overrides = {"num_classes": 10} if args.variant.startswith("Mi") else {}
        ckpt = bs.random_checkpoint(args.variant, tmp, **overrides)
    else:
        ckpt = args.checkpoint
    return ckpt, MoNEConfig.from_dict(read_checkpoint_info(ckpt)["config"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_server_args(p)
    p.add_argument("--clients", type=int, default=16, help="concurrent clients of the throughput runs")
    p.add_argument("--seconds", type=float, default=6.0, help="length of each throughput run")
    p.add_argument("--one-seconds", type=float, default=4.0, help="length of each single-client run")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the table shows medians")
    p.add_argument("--no-clips", action="store_true", help="images only")
    p.add_argument(
        "--loadgen", choices=["auto", "hey", "python"], default="auto", help="auto: hey when installed"
    )
    p.add_argument("--tolerance", type=float, default=0.03, help="spread allowed by the monotone check")
    p.add_argument("--server-arg", action="append", default=[], help="extra mone-serve argument (repeatable)")
    p.add_argument("--json", action="store_true", help="also print every run as a JSON line")
    p.add_argument(
        "--compile-wait",
        type=float,
        default=1200.0,
        help="seconds to wait for the compiled forwards of the measured traffic before measuring",
    )
    args = p.parse_args(argv)
    use_hey = args.loadgen == "hey" or (args.loadgen == "auto" and shutil.which("hey") is not None)
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        ckpt, cfg = checkpoint_of(args, tmp)
        inputs = make_inputs(cfg, tmp)
        if args.no_clips:
            inputs.pop("clip", None)
        extra = [a for arg in args.server_arg for a in arg.split()]
        server = bs.start_mone(ckpt, args, *extra, log=tmp / "server.log")
        cells: dict[tuple[str, float, str], Cell] = {}
        try:
            for inp in inputs.values():  # warm-up: every shape once
                for c in CAPACITIES:
                    measure(server, use_hey, inp, c, args.clients, 1.0)
            compiled = wait_for_compiled(server, use_hey, inputs, args.clients, args.compile_wait)
            if compiled:
                print(f"# compiled forwards: {compiled}", flush=True)
            for r in range(args.rounds):
                for kind, inp in inputs.items():
                    for c in bs.round_order(list(CAPACITIES), r):
                        for mode, clients, secs in (
                            ("load", args.clients, args.seconds),
                            ("one", 1, args.one_seconds),
                        ):
                            point = measure(server, use_hey, inp, c, clients, secs)
                            cells.setdefault((kind, c, mode), Cell()).runs.append(point)
                            if args.json:
                                print(
                                    json.dumps(
                                        {
                                            "round": r,
                                            "kind": kind,
                                            "capacity": c,
                                            "mode": mode,
                                            **point.__dict__,
                                        }
                                    )
                                )
        finally:
            server.stop()
    text, monotone = table(cells, list(inputs), args.tolerance)
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    model = f"random {cfg.variant}" if args.variant else f"{ckpt.name} ({cfg.variant})"
    print(
        f"# bench.budget, {now}, {cpu_model()}, {model}, {cfg.img_size} px; load generator: "
        f"{'hey (raw body)' if use_hey else 'python client processes (multipart)'}; {args.clients} clients "
        f"x {args.seconds:g} s and 1 client x {args.one_seconds:g} s, median of {args.rounds} rounds\n"
    )
    print(text)
    print(f"\ncost monotone in the budget (within {args.tolerance:.0%}): {'yes' if monotone else 'NO'}")
    return 0 if monotone else 1


if __name__ == "__main__":
    raise SystemExit(main())
