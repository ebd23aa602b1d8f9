"""Wall-clock speed of the MoNE forward against dense ViT references of the same shapes.

    python -m bench.model_speed [--variants S/16 Mi/4] [--batches 1 32] [--repeats 7] [--json]

For each variant and batch size, times (median of repeats, interleaved round robin so that drift hits every
row alike) the two dense references (`F.linear` + SDPA, and the fused `nn.TransformerEncoder` fast path)
and the MoNE model at each capacity, all in fp32 under inference mode.  `speedup` is against the faster
reference; `efficiency` = speedup / (dense GFLOPs / MoNE GFLOPs).  Memory: resident weight bytes, and the
peak activation memory of one forward (max RSS growth, each in a fresh subprocess).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from bench.references import FusedViT, PlainViT
from model import MoNE, MoNEConfig, gflops
from server.memory import release_free_memory

CAPACITIES = (1.0, 0.75, 0.5, 0.25)


def build(variant: str) -> MoNE:
    cfg = MoNEConfig.from_variant(variant, num_classes=1000 if variant != "Mi/4" else 10)
    torch.manual_seed(0)
    return MoNE(cfg).eval()


def median_times(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.inference_mode():
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        for _ in range(repeats):
            for name, fn in fns.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_peak(variant: str, batch: int, which: str) -> float:
    """Peak resident memory growth (MB) of one forward pass, in this process (Linux: resets VmHWM first)."""
    net = build(variant)
    cfg = net.cfg
    x = torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size)
    fn: Callable[[], object] = (
        functools.partial(net, x, capacity=1.0) if which == "mone" else functools.partial(PlainViT(net), x)
    )
    with torch.inference_mode():
        fn()  # allocator warm, lazy inits done
        gc.collect()
        release_free_memory()  # so that RSS counts live memory only
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS to the current RSS
        before = _status_kb("VmRSS")
        fn()
        peak = _status_kb("VmHWM")
    return (peak - before) / 1024


def peak_activation_mb(variant: str, batch: int, which: str) -> float:
    """`measure_peak` in a fresh interpreter, so that the two models do not share an allocator's history."""
    code = f"from bench.model_speed import measure_peak; print(measure_peak({variant!r}, {batch}, {which!r}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def run(variant: str, batch: int, repeats: int) -> list[dict[str, object]]:
    net = build(variant)
    net.calibrate_full_width()  # as the server does at start-up
    cfg = net.cfg
    x = torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size)
    plain, fused = PlainViT(net), FusedViT(net)
    fns: dict[str, Callable[[], object]] = {"dense_plain": lambda: plain(x), "dense_fused": lambda: fused(x)}
    for c in CAPACITIES:
        fns[f"mone_{c}"] = functools.partial(net, x, capacity=c)
    t = median_times(fns, repeats)
    dense_name = min(("dense_plain", "dense_fused"), key=t.__getitem__)
    dense_t = t[dense_name]
    dense_gf = gflops(cfg, 1.0)
    dense_params = sum(p.numel() for n, p in net.named_parameters() if not n.startswith(("router", "alpha")))
    rows: list[dict[str, object]] = []
    for name in ("dense_plain", "dense_fused", *[f"mone_{c}" for c in CAPACITIES]):
        c = float(name.split("_")[1]) if name.startswith("mone") else 1.0
        gf = gflops(cfg, c)
        ratio = gf / dense_gf
        speedup = dense_t / t[name]
        rows.append(
            {
                "variant": variant,
                "batch": batch,
                "model": name.split("_")[0] if name.startswith("mone") else name,
                "capacity": c,
                "latency_ms": round(t[name] * 1e3, 2),
                "images_per_s": round(batch / t[name], 1),
                "gflops": round(gf, 3),
                "gflops_ratio": round(ratio, 3),
                "speedup": round(speedup, 3),
                "efficiency": round(speedup / (1 / ratio), 3),
                "reference": dense_name,
            }
        )
    mone_weights = sum(p.numel() * p.element_size() for p in net.parameters())
    rows.append(
        {
            "variant": variant,
            "batch": batch,
            "model": "memory",
            "weight_bytes_ratio": round(mone_weights / (dense_params * 4), 4),
            "peak_activation_mb_mone_1.0": round(peak_activation_mb(variant, batch, "mone"), 1),
            "peak_activation_mb_dense_plain": round(peak_activation_mb(variant, batch, "plain"), 1),
        }
    )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variants", nargs="+", default=["S/16", "Mi/4"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", action="store_true", help="one JSON object per row")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cols = [
        ("variant", 7),
        ("batch", 5),
        ("model", 11),
        ("capacity", 8),
        ("latency_ms", 10),
        ("images_per_s", 12),
        ("gflops_ratio", 12),
        ("speedup", 7),
        ("efficiency", 10),
    ]
    if not args.json:
        print(
            f"# {platform.processor() or platform.machine()}, {args.threads} threads, "
            f"torch {torch.__version__}"
        )
        print(" ".join(f"{name:>{w}}" for name, w in cols))
    for variant in args.variants:
        for batch in args.batches:
            for row in run(variant, batch, args.repeats):
                if args.json:
                    print(json.dumps(row), flush=True)
                elif row["model"] == "memory":
                    mem = ", ".join(
                        f"{k} {v}" for k, v in row.items() if k not in ("variant", "batch", "model")
                    )
                    print(f"{variant:>7} {batch:>5} memory: {mem}", flush=True)
                else:
                    print(" ".join(f"{row[name]!s:>{w}}" for name, w in cols), flush=True)


if __name__ == "__main__":
    main()
