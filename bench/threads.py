"""How a batch should run on the CPU: the forward through the server's own `Runner`, on a worker thread as
mone-serve runs it (the loading thread kept to one intra-op thread, so that the worker's OpenMP team is the
only one), for each batch size and capacity, three ways side by side:

    whole     one forward on every intra-op thread
    serial    one forward on one intra-op thread
    streams   the batch split over the streams, each sub-batch on its own thread

    python -m bench.threads                                  # the shipped checkpoint
    python -m bench.threads --variant S/16 --batches 1 2 4   # a random S/16
    python -m bench.threads --full-width-rows 528            # the product cost fixed instead of measured

What start-up decides from such measurements (`Runner.calibrate_threads`, `serial_max_gflops`,
`stream_min_gflops`) is printed first.  Rounds take the ways in turn; the table shows medians of rounds of
the median of `--repeats` batches, in ms.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch

from bench import serve as bs
from mone.model import load_checkpoint
from mone.server.config import Settings
from mone.server.core.runner import Runner, serial_thread

WAYS = ("whole", "serial", "streams")


Table = dict[tuple[int, str, float], float]


def measure(runner: Runner, batches: list[int], caps: list[float], rounds: int, repeats: int) -> Table:
    """{(batch, way, capacity): median ms}; run on the calling thread, which must be the runner's."""
    out: dict[tuple[int, str, float], list[float]] = {}
    base_threads, base_min = runner.threads, runner.min_stream_gflops
    for _ in range(rounds):
        for b in batches:
            for way in WAYS:
                if way == "streams" and (runner.streams < 2 or b < 2):
                    continue
                runner.threads = 1 if way == "serial" else base_threads
                runner.min_stream_gflops = 0.0 if way == "streams" else float("inf")
                runner.serial_gflops = 0.0
                for c in caps:
                    splits = [runner.token_split(c)] * b
                    batch = runner.dummy_batch(1, [c] * b)
                    runner.run(batch, splits)  # warm-up of this shape and way
                    times = [runner.run(batch, splits).seconds for _ in range(repeats)]
                    out.setdefault((b, way, c), []).append(1e3 * statistics.median(times))
    runner.threads, runner.min_stream_gflops = base_threads, base_min
    return {k: statistics.median(v) for k, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=None, help="default: the shipped checkpoint")
    p.add_argument("--variant", default=None, help="a randomly initialised variant instead (e.g. S/16)")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    p.add_argument("--capacities", nargs="+", type=float, default=[1.0, 0.5, 0.25])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--full-width-rows", type=float, default=None, help="default: measured, as at start-up")
    args = p.parse_args(argv)
    serial_thread()  # as the server's event loop, which loads the model
    with tempfile.TemporaryDirectory() as tmp:
        if args.variant:
            ckpt = bs.random_checkpoint(args.variant, Path(tmp))
        else:
            ckpt = args.checkpoint or bs.SHIPPED
        runner = Runner.from_settings(load_checkpoint(ckpt), torch.device("cpu"), Settings())
        result: dict[str, Any] = {}

        def work() -> None:  # a thread of its own, as the engine's inference thread
            runner.setup_threads(None)
            runner.time_batch(1, 1, 1.0, 2)
            runner.calibrate_threads(max(args.batches))
            decided = (runner.serial_gflops, runner.min_stream_gflops)
            runner.set_full_width_rows(args.full_width_rows, max(args.batches))
            result["decided"] = (*decided, runner.model.full_width_rows)
            result["table"] = measure(runner, args.batches, args.capacities, args.rounds, args.repeats)

        thread = threading.Thread(target=work)
        thread.start()
        thread.join()
        runner.close()
    serial, streams, rows = result["decided"]
    table = result["table"]
    print(f"# bench.threads, {ckpt if not args.variant else 'random ' + args.variant}, {os.cpu_count()} CPUs")
    print(
        f"start-up decides: one thread up to {serial:.3g} GFLOPs of work; streams from {streams:.3g} "
        f"GFLOPs a stream; one more product costs {rows:.0f} rows ({runner.threads} threads, "
        f"{runner.streams} streams)"
    )
    print()
    print("| batch | way | " + " | ".join(f"{c:g}" for c in args.capacities) + " |")
    print("|---|---|" + "---|" * len(args.capacities))
    for b in args.batches:
        for way in WAYS:
            if (b, way, args.capacities[0]) in table:
                cells = " | ".join(f"{table[(b, way, c)]:.2f}" for c in args.capacities)
                print(f"| {b} | {way} | {cells} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
