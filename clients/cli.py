"""`mone`: classify files, inspect models and the capacity profile, check health and load-test a server.

    mone classify shirt.png clip.mp4 --capacity 0.5 --routing
    mone classify shirt.png --budget latency_ms=50
    mone models
    mone profile --out profile.png
    mone bench --concurrency 8 --duration 10 --mix capacity=1:0.5,capacity=0.25:0.5 shirt.png

The server is --url or $MONE_URL (default http://127.0.0.1:8000); the API key --api-key or $MONE_API_KEY.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from mone.clients import bench
from mone.clients.client import DEFAULT_URL, AsyncMoneClient, MoneClient, RetryPolicy
from mone.clients.errors import MoneError
from mone.clients.media import Input, to_payload
from mone.clients.plot import COLOURS, Series, line_panels
from mone.clients.routing import frames_of, render
from mone.clients.schemas import ModelInfo, Result, budget_kinds


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mone", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help=f"server URL (default: $MONE_URL or {DEFAULT_URL})")
    parser.add_argument("--api-key", help="Bearer token (default: $MONE_API_KEY)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request (default: 30)")
    parser.add_argument("--protocol", choices=["native", "oip"], default="native")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("classify", help="classify images or clips")
    p.add_argument("files", nargs="+", type=Path, metavar="FILE")
    _add_budget(p)
    p.add_argument("--deadline-ms", type=float, help="hard deadline: 504 instead of a late answer")
    p.add_argument(
        "--kind",
        help="auto, or an input kind the server lists (`mone models`: image, clip); auto: MP4/WebM are "
        "clips, GIF an image",
    )
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--routing", action="store_true", help="write FILE.routing.png: patches shaded by expert")
    p.add_argument("--out", type=Path, default=None, help="folder for routing maps (default: next to FILE)")
    p.add_argument("--json", action="store_true", help="one JSON object per file, one per line")

    p = sub.add_parser("models", help="list the served models")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("health", help="liveness and readiness")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("profile", help="plot capacity -> GFLOPs -> latency -> accuracy")
    p.add_argument("--model", help="model name (default: the first served)")
    p.add_argument("--out", type=Path, default=Path("profile.png"))
    p.add_argument("--json", action="store_true", help="print the profile rows as JSON")

    p = sub.add_parser("bench", help="load generator")
    p.add_argument("files", nargs="+", type=Path, metavar="FILE", help="inputs, drawn at random")
    loop = p.add_mutually_exclusive_group(required=True)
    loop.add_argument("--concurrency", type=int, help="closed loop: requests in flight")
    loop.add_argument("--rate", type=float, help="open loop: arrivals per second (Poisson)")
    p.add_argument("--duration", type=float, help="seconds to send for")
    p.add_argument("--requests", type=int, help="requests to send")
    p.add_argument(
        "--mix",
        help="budgets TYPE=VALUE[:WEIGHT],... e.g. capacity=1:0.5,latency_ms=50:0.5; TYPE: any kind the "
        "server lists (`mone models`) or default",
    )
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    return parser


def _add_budget(p: argparse.ArgumentParser) -> None:
    budget = p.add_mutually_exclusive_group()
    budget.add_argument(
        "--capacity",
        type=float,
        help="effective capacity e_c in [min_capacity, 1] (1/8 for 4 experts; see `mone models`)",
    )
    budget.add_argument("--gflops", type=float, help="GFLOPs per sample")
    budget.add_argument("--latency-ms", type=float, help="server-side latency budget")
    budget.add_argument(
        "--budget",
        type=_kind_value,
        metavar="KIND=VALUE",
        help="any budget kind the server lists (`mone models`), e.g. latency_ms=50",
    )


def _kind_value(text: str) -> tuple[str, float]:
    kind, sep, value = text.partition("=")
    try:
        if sep and kind.strip():
            return kind.strip(), float(value)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected KIND=VALUE, got {text!r}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    common: dict[str, Any] = {"api_key": args.api_key, "timeout": args.timeout, "protocol": args.protocol}
    try:
        if args.command == "bench":
            return _bench(args, common)
        with MoneClient(args.url, **common) as client:
            command = {"classify": _classify, "models": _models, "health": _health, "profile": _profile}
            return command[args.command](client, args)
    except MoneError as exc:
        print(f"mone: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"mone: {exc}", file=sys.stderr)
        return 2


def _classify(client: MoneClient, args: argparse.Namespace) -> int:
    failed = 0
    for path in args.files:
        try:
            payload = to_payload(path)
            result = client.classify(
                path,
                capacity=args.capacity,
                gflops=args.gflops,
                latency_ms=args.latency_ms,
                budget=dict([args.budget]) if args.budget else None,
                deadline_ms=args.deadline_ms,
                top_k=args.top_k,
                routing=args.routing,
                kind=args.kind,
            )
        except MoneError as exc:
            failed += 1
            print(f"mone: {path}: {exc}", file=sys.stderr)
            continue
        routing_png = None
        if args.routing and result.routing:
            folder = args.out or path.parent
            folder.mkdir(parents=True, exist_ok=True)
            routing_png = folder / f"{path.stem}.routing.png"
            render(frames_of(payload, args.kind), result.routing).save(routing_png)
        if args.json:
            record = {"file": str(path), **result.model_dump(exclude={"native", "routing"})}
            if routing_png:
                record["routing_png"] = str(routing_png)
            print(json.dumps(record))
        else:
            print(format_result(str(path), result))
            if routing_png:
                print(f"  routing map: {routing_png}")
    return 1 if failed else 0


def format_result(name: str, r: Result) -> str:
    saved = 100 * (1 - r.gflops / r.dense_gflops) if r.dense_gflops else 0.0
    deadline = "" if r.deadline_met is None else ("  deadline met" if r.deadline_met else "  deadline MISSED")
    lines = [
        f"{name}: capacity {r.capacity:.3f} (realised {r.realised_capacity:.3f})  "
        f"{r.gflops:.4f} GFLOPs ({saved:.0f} % below dense)  {r.timing.total_ms:.1f} ms{deadline}",
        f"  {'#':>3}  {'label':<20}{'prob':>8}",
    ]
    lines += [f"  {i:>3}  {p.label:<20}{p.prob:>8.4f}" for i, p in enumerate(r.top_k, 1)]
    return "\n".join(lines)


def _models(client: MoneClient, args: argparse.Namespace) -> int:
    models = client.models()
    if args.json:
        print(json.dumps([m.model_dump() for m in models], indent=2))
        return 0
    print(
        f"{'name':<16}{'variant':<10}{'device':<8}{'ready':<7}{'classes':>8}  GFLOPs per image (floor-dense)"
    )
    for m in models:
        floor, dense = m.profile[0].image.gflops, m.profile[-1].image.gflops
        ready = str(m.ready)
        print(
            f"{m.name:<16}{m.variant:<10}{m.device:<8}{ready:<7}{len(m.labels):>8}  {floor:.4f}-{dense:.4f}"
        )
    for kind in budget_kinds(models[0]) if models else []:
        unit = f" ({kind.unit})" if kind.unit else ""
        print(f"  --budget {kind.name}=VALUE{unit}: {kind.description}")
    return 0


def _health(client: MoneClient, args: argparse.Namespace) -> int:
    live, ready = client.health(), client.ready()
    if args.json:
        print(json.dumps({"url": client.url, "live": live, "ready": ready}))
    else:
        print(f"{client.url}: live={'yes' if live else 'no'} ready={'yes' if ready else 'no'}")
    return 0 if live and ready else 1


def _profile(client: MoneClient, args: argparse.Namespace) -> int:
    info = client.model(args.model)
    if args.json:
        print(json.dumps([r.model_dump() for r in info.profile], indent=2))
    else:
        print(
            f"{'capacity':>9}{'realised':>10}{'GFLOPs image':>14}{'ms image':>10}"
            f"{'GFLOPs clip':>13}{'ms clip':>10}{'accuracy':>10}"
        )
        for r in info.profile:
            acc = f"{r.accuracy:.3f}" if r.accuracy is not None else "-"
            print(
                f"{r.capacity:>9.3f}{r.realised_capacity:>10.3f}{r.image.gflops:>14.4f}"
                f"{r.image.latency_ms_batch1:>10.2f}{r.clip.gflops:>13.4f}{r.clip.latency_ms_batch1:>10.2f}{acc:>10}"
            )
    plot_profile(info).save(args.out)
    print(f"profile plot: {args.out}", file=sys.stderr if args.json else sys.stdout)
    return 0


def plot_profile(info: ModelInfo) -> Image.Image:
    """Three panels against capacity: GFLOPs per input kind, predicted latency, accuracy (if evaluated)."""
    rows = info.profile
    xs = [r.capacity for r in rows]
    batch = info.batching.get("max_batch_size", "max")
    gflops: list[Series] = [
        ("image", xs, [r.image.gflops for r in rows], COLOURS[0]),
        ("clip", xs, [r.clip.gflops for r in rows], COLOURS[1]),
    ]
    latency: list[Series] = [
        ("image, batch 1", xs, [r.image.latency_ms_batch1 for r in rows], COLOURS[0]),
        ("clip, batch 1", xs, [r.clip.latency_ms_batch1 for r in rows], COLOURS[1]),
        (f"image, batch {batch}", xs, [r.image.latency_ms_max_batch for r in rows], COLOURS[2]),
    ]
    accuracy: list[Series] = [
        ("image", xs, [r.accuracy for r in rows], COLOURS[0]),
        ("clip", xs, [r.clip_accuracy for r in rows], COLOURS[1]),
    ]
    panels = [("GFLOPs per sample", gflops), ("predicted compute (ms)", latency), ("accuracy", accuracy)]
    return line_panels(f"{info.name} ({info.variant}): capacity profile", "capacity e_c", panels)


def _bench(args: argparse.Namespace, common: dict[str, Any]) -> int:
    if args.duration is None and args.requests is None:
        raise ValueError("give --duration or --requests")
    inputs: list[Input] = [p.read_bytes() for p in args.files]
    progress = sys.stderr.isatty() if args.progress is None else args.progress

    async def go() -> bench.Report:
        async with AsyncMoneClient(args.url, retry=RetryPolicy(retries=0), **common) as client:
            kinds = [kind.name for kind in await client.budget_kinds()] if args.mix else bench.BUDGETS
            mix = bench.parse_mix(args.mix, kinds)
            return await bench.run(
                client,
                inputs,
                mix,
                concurrency=args.concurrency,
                rate=args.rate,
                duration=args.duration,
                requests=args.requests,
                progress=progress,
                seed=args.seed,
            )

    summary = asyncio.run(go()).to_dict()
    print(json.dumps(summary, indent=2) if args.json else bench.format_report(summary))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
