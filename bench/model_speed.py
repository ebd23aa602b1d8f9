"""Wall-clock speed of the MoNE forward against dense ViT references of the same shapes.

    python -m bench.model_speed [--variants S/16 Mi/4] [--batches 1 32] [--repeats 7] [--json]
    python -m bench.model_speed --device cuda --dtype bf16 --compile --graphs --variants S/16 B/16 \
        --batches 1 8 64 256

For each variant and batch size, times (median of repeats, interleaved round robin so that drift hits every
row alike) the dense references (`F.linear` + SDPA; the fused `nn.TransformerEncoder` fast path; and on the
CPU in fp32 `dense_packed`, the first with its products on the packed oneDNN kernels the MoNE forward uses)
and the MoNE model at each capacity, all under inference mode, in fp32 on the CPU by default.  `speedup` is
against the fastest reference; `efficiency` = speedup / (dense GFLOPs / MoNE GFLOPs).  Memory: resident
weight bytes, and the peak activation memory of one forward (max RSS growth, each in a fresh subprocess; on
CUDA the allocator's peak above what was allocated before the forward).

`--device cuda` times on the GPU (synchronising before each reading of the clock); `--dtype bf16` / `fp16`
casts the weights and inputs as the server does (server/core/precision.py); `--compile` adds the `F.linear` +
SDPA reference under `torch.compile` (mode reduce-overhead on CUDA: CUDA graphs) as a third dense reference;
`--graphs` adds the MoNE forward captured per batch and token split as the server runs it on CUDA
(server/core/capture.py), rows `mone_graphs`; `--unpacked` adds the MoNE forward with every product on
`addmm` instead of oneDNN's packed weights (CPU, fp32), rows `mone_addmm`.
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
from typing import cast

import torch
from torch import Tensor

from bench.references import FusedViT, PlainViT
from mone.model import MoNE, MoNEConfig, expert_counts, gflops, inference
from mone.model.inference import calibrate_full_width
from mone.server.core.capture import CapturedForward, CudaGraphs
from mone.server.core.memory import release_free_memory
from mone.server.core.precision import DTYPES, cast_model, dtype_name, resolve_dtype

CAPACITIES = (1.0, 0.75, 0.5, 0.25)


CPU = torch.device("cpu")


def build(variant: str, device: torch.device = CPU, dtype: torch.dtype = torch.float32) -> MoNE:
    cfg = MoNEConfig.from_variant(variant, num_classes=1000 if variant != "Mi/4" else 10)
    torch.manual_seed(0)
    return cast_model(MoNE(cfg).eval().to(device), dtype)


def _no_sync() -> None:
    pass


def synchroniser(device: torch.device) -> Callable[[], None]:
    """What waits for the device's queued work before the clock is read."""
    if device.type == "cuda":
        return functools.partial(torch.cuda.synchronize, device)
    return _no_sync


@functools.cache
def compiled_reference(variant: str, device: torch.device, dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
    """The `F.linear` + SDPA reference under torch.compile, once per variant, device and dtype, with dynamic
    batch size (one compilation serves every batch size; on CUDA, mode reduce-overhead records a CUDA graph
    per batch size)."""
    plain = PlainViT(build(variant, device, dtype))
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    return cast(Callable[[Tensor], Tensor], torch.compile(plain, mode=mode, dynamic=True))


def _unpacked(net: MoNE, x: Tensor, capacity: float) -> object:
    keep, inference.PACKED = inference.PACKED, False
    try:
        return net(x, capacity=capacity)
    finally:
        inference.PACKED = keep


def median_times(
    fns: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 2,
    sync: Callable[[], None] = _no_sync,
) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.inference_mode():
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        sync()
        for _ in range(repeats):
            for name, fn in fns.items():
                start = time.perf_counter()
                fn()
                sync()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_peak(variant: str, batch: int, which: str, dtype: str = "fp32") -> float:
    """Peak resident memory growth (MB) of one forward pass, in this process (Linux: resets VmHWM first)."""
    net = build(variant, CPU, DTYPES[dtype])
    cfg = net.cfg
    x = torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size, dtype=DTYPES[dtype])
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


def peak_gpu_mb(fn: Callable[[], object], device: torch.device) -> float:
    """Peak CUDA memory (MB) that one call of `fn` allocates above what was allocated before it."""
    with torch.inference_mode():
        fn()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def peak_activation_mb(variant: str, batch: int, which: str, dtype: str = "fp32") -> float:
    """`measure_peak` in a fresh interpreter, so that the two models do not share an allocator's history."""
    code = (
        "from bench.model_speed import measure_peak; "
        f"print(measure_peak({variant!r}, {batch}, {which!r}, {dtype!r}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def run(
    variant: str,
    batch: int,
    repeats: int,
    device: torch.device = CPU,
    dtype: torch.dtype = torch.float32,
    compile_dense: bool = False,
    graphs: bool = False,
    unpacked: bool = False,
) -> list[dict[str, object]]:
    net = build(variant, device, dtype)
    calibrate_full_width(net)  # as the server does at start-up
    cfg = net.cfg
    x = torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size, device=device, dtype=dtype)
    plain, fused = PlainViT(net), FusedViT(net).to(device, dtype)
    fns: dict[str, Callable[[], object]] = {"dense_plain": lambda: plain(x), "dense_fused": lambda: fused(x)}
    if inference.PACKED and device.type == "cpu" and dtype == torch.float32:  # the kernels MoNE runs on
        packed = PlainViT(net, packed=True)
        fns["dense_packed"] = lambda: packed(x)
    if compile_dense:
        compiled = compiled_reference(variant, device, dtype)
        fns["dense_compiled"] = lambda: compiled(x)
    for c in CAPACITIES:
        fns[f"mone_{c}"] = functools.partial(net, x, capacity=c)
    if unpacked and "dense_packed" in fns:  # the MoNE forward with every product on `addmm`, side by side
        for c in CAPACITIES:
            fns[f"mone_addmm_{c}"] = functools.partial(_unpacked, net, x, c)
    if graphs:
        captured = CapturedForward(net, CudaGraphs(device), [batch])
        clips = x.unsqueeze(1)
        for c in CAPACITIES:
            split = expert_counts(c, cfg.num_tokens, cfg.num_experts)
            fns[f"mone_graphs_{c}"] = functools.partial(captured, clips, [split] * batch)
    sync = synchroniser(device)
    t = median_times(fns, repeats, warmup=3 if compile_dense or graphs else 2, sync=sync)
    references = [name for name in fns if name.startswith("dense")]
    dense_name = min(references, key=t.__getitem__)
    dense_t = t[dense_name]
    dense_gf = gflops(cfg, 1.0)
    dense_params = sum(p.numel() for n, p in net.named_parameters() if not n.startswith(("router", "alpha")))
    rows: list[dict[str, object]] = []
    default = (device.type, dtype) == ("cpu", torch.float32)
    extra = {} if default else {"device": str(device), "dtype": dtype_name(dtype)}
    for name in fns:
        c = float(name.rsplit("_", 1)[1]) if name.startswith("mone") else 1.0
        gf = gflops(cfg, c)
        ratio = gf / dense_gf
        speedup = dense_t / t[name]
        rows.append(
            {
                "variant": variant,
                "batch": batch,
                "model": name.rsplit("_", 1)[0] if name.startswith("mone") else name,
                "capacity": c,
                "latency_ms": round(t[name] * 1e3, 2),
                "images_per_s": round(batch / t[name], 1),
                "gflops": round(gf, 3),
                "gflops_ratio": round(ratio, 3),
                "speedup": round(speedup, 3),
                "efficiency": round(speedup / (1 / ratio), 3),
                "reference": dense_name,
                **extra,
            }
        )
    mone_weights = sum(p.numel() * p.element_size() for p in net.parameters())
    memory: dict[str, object] = {
        "variant": variant,
        "batch": batch,
        "model": "memory",
        "weight_bytes_ratio": round(mone_weights / (dense_params * net.alpha.element_size()), 4),
    }
    if device.type == "cuda":
        memory["weight_mb"] = round(mone_weights / 2**20, 1)
        memory["peak_gpu_mb_mone_1.0"] = round(peak_gpu_mb(fns["mone_1.0"], device), 1)
        memory["peak_gpu_mb_mone_0.25"] = round(peak_gpu_mb(fns["mone_0.25"], device), 1)
        memory["peak_gpu_mb_dense_plain"] = round(peak_gpu_mb(fns["dense_plain"], device), 1)
        memory["peak_gpu_mb_process"] = round(torch.cuda.max_memory_reserved(device) / 2**20, 1)
    else:
        name = dtype_name(dtype)
        memory["peak_activation_mb_mone_1.0"] = round(peak_activation_mb(variant, batch, "mone", name), 1)
        memory["peak_activation_mb_dense_plain"] = round(peak_activation_mb(variant, batch, "plain", name), 1)
    rows.append(memory)
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
    parser.add_argument("--markdown", action="store_true", help="a markdown table (memory rows below it)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="weights and activations")
    parser.add_argument(
        "--compile", action="store_true", help="add the F.linear + SDPA reference under torch.compile"
    )
    parser.add_argument(
        "--graphs", action="store_true", help="add the MoNE forward captured as CUDA graphs (CUDA only)"
    )
    parser.add_argument(
        "--unpacked",
        action="store_true",
        help="add the MoNE forward with every product on addmm (rows mone_addmm; CPU, fp32)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    if args.graphs and device.type != "cuda":
        parser.error("--graphs needs --device cuda")
    try:
        dtype = resolve_dtype(args.dtype, device)
    except ValueError as exc:
        parser.error(str(exc))
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
    if args.markdown:
        cols.append(("reference", 0))
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
        print(f"`bench.model_speed`, {where}, {args.dtype}, torch {torch.__version__}\n")
        print("| " + " | ".join(name for name, _ in cols) + " |\n|" + "---|" * len(cols))
    elif not args.json:
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        print(
            f"# {platform.processor() or platform.machine()}, {args.threads} threads, "
            f"torch {torch.__version__}"
            + ("" if (device.type, args.dtype) == ("cpu", "fp32") else f"; {where}, {args.dtype}")
        )
        print(" ".join(f"{name:>{w}}" for name, w in cols))
    memory_rows: list[dict[str, object]] = []
    for variant in args.variants:
        for batch in args.batches:
            for row in run(
                variant, batch, args.repeats, device, dtype, args.compile, args.graphs, args.unpacked
            ):
                if args.json:
                    print(json.dumps(row), flush=True)
                elif args.markdown and row["model"] == "memory":
                    memory_rows.append(row)
                elif args.markdown:
                    print("| " + " | ".join(str(row[name]) for name, _ in cols) + " |", flush=True)
                elif row["model"] == "memory":
                    mem = ", ".join(
                        f"{k} {v}" for k, v in row.items() if k not in ("variant", "batch", "model")
                    )
                    print(f"{variant:>7} {batch:>5} memory: {mem}", flush=True)
                else:
                    print(" ".join(f"{row[name]!s:>{w}}" for name, w in cols), flush=True)

    if memory_rows:
        print()
        for row in memory_rows:
            mem = ", ".join(f"{k} {v}" for k, v in row.items() if k not in ("variant", "batch", "model"))
            print(f"- {row['variant']}, batch {row['batch']}: {mem}")


if __name__ == "__main__":
    main()
