"""`mone-eval`: accuracy vs GFLOPs of a MoNE checkpoint on Fashion-MNIST test images and test clips.

Methods, each over the same 10k test images and the fixed test clips (`mone.model.clips.eval_clips`):
  * MoNE with its learned router at capacities CAPACITIES (Jain et al., NeurIPS 2024);
  * the same weights with a random router (router probabilities replaced by the softmax of seeded Gaussian
    logits, the paper's router ablation, Fig. 7c);
  * the dense baseline (a second checkpoint, evaluated at capacity 1.0);
  * ToMe on the dense baseline (Bolya et al., ICLR 2023; `mone.model.tome`) at several merge rates r, which
    span the GFLOPs range of the MoNE curve;
  * an ablation (`--ablation NAME=CHECKPOINT ...`): recipe variants side by side, each at a few capacities,
    with its training FLOPs (from the checkpoint) against the first's and what each row gained over the
    row above, so that a ladder of runs that each add one part of the recipe shows what that part bought.
The MoNE profile {capacities, gflops, accuracy, clip_gflops, clip_accuracy} is written into the checkpoint
(the server publishes it); everything goes to a results JSON, and optionally to a plot and a markdown table.
Evaluation is deterministic: no augmentation, fixed clips, fixed random-router seed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mone.model.checkpoint import load_checkpoint, save_checkpoint
from mone.model.clips import TEST_CLIPS, eval_clips
from mone.model.data import load_fashion_mnist
from mone.model.flops import gflops
from mone.model.preprocess import normalize
from mone.model.tome import tome_forward, tome_gflops
from mone.model.vit import MoNE

log = logging.getLogger("mone.eval")
CAPACITIES = (0.125, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.75, 0.9, 1.0)
TOME_R = (0, 4, 8, 10, 12)
RANDOM_CLIP_CAPACITIES = (0.25, 0.5)
RANDOM_ROUTER_SEED = 1234


@dataclass(frozen=True)
class EvalConfig:
    """Args:
    checkpoint: the MoNE checkpoint directory (its profile is rewritten unless `no_write_profile`);
        None to evaluate only the dense baseline.
    dense: the dense baseline checkpoint (for the dense point and ToMe); None to skip both.
    data_dir: Fashion-MNIST directory; None for the Debian package's location.
    capacities: MoNE capacities.
    tome_r: ToMe tokens merged per layer.
    clips: number of test clips.
    out: results JSON path.
    plot: PNG path, or None.
    table: markdown table path, or None.
    write_profile: store the profile in the checkpoint.
    random_router: evaluate the random-router ablation.
    threads: torch CPU threads.
    device: where the models run ("cpu", "cuda").
    limit: evaluate on the first `limit` test images only (0: all).
    ablation: (name, checkpoint) pairs for the ablation table.
    ablation_capacities: image capacities of the ablation; clips run at 1.0 and 0.3.
    ablation_table: markdown path for the ablation table, or None.
    """

    checkpoint: str | None = "checkpoints/default"
    dense: str | None = "checkpoints/dense"
    data_dir: str | None = None
    capacities: tuple[float, ...] = CAPACITIES
    tome_r: tuple[int, ...] = TOME_R
    clips: int = TEST_CLIPS
    out: str = "docs/results.json"
    plot: str | None = "docs/accuracy_vs_gflops.png"
    table: str | None = None
    write_profile: bool = True
    random_router: bool = True
    threads: int = 2
    device: str = "cpu"
    limit: int = 0
    ablation: tuple[tuple[str, str], ...] = ()
    ablation_capacities: tuple[float, ...] = (1.0, 0.5, 0.25)
    ablation_table: str | None = None


# -- building blocks -----------------------------------------------------------------------------------------
@torch.no_grad()
def predict(fn: Any, x: Tensor, batch: int) -> Tensor:
    """Argmax predictions of fn(normalised batch) -> logits over uint8 items x, in batches."""
    preds = [fn(x[i : i + batch]).argmax(-1) for i in range(0, len(x), batch)]
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


def accuracy_of(fn: Any, x: Tensor, y: Tensor, batch: int) -> float:
    return round(100.0 * float((predict(fn, x, batch) == y).float().mean()), 2)


def _device(net: MoNE) -> torch.device:
    return next(net.parameters()).device


def mone_fn(net: MoNE, capacity: float) -> Any:
    cfg, dev = net.cfg, _device(net)
    return lambda xb: net(normalize(xb.to(dev), cfg.mean, cfg.std), capacity).logits.cpu()


def tome_fn(net: MoNE, r: int) -> Any:
    cfg, dev = net.cfg, _device(net)
    return lambda xb: tome_forward(net, normalize(xb.to(dev), cfg.mean, cfg.std), r).cpu()


@contextlib.contextmanager
def random_router(net: MoNE, seed: int = RANDOM_ROUTER_SEED) -> Iterator[None]:
    """Replace the router's probabilities by softmax(N(0, 1) logits) from a seeded generator: tokens go to
    experts at random, with the same per-expert counts (EPR still enforces the capacities)."""
    gen = torch.Generator().manual_seed(seed)
    router = net.router
    E = router.proj.out_features

    def forward(x: Tensor) -> Tensor:
        logits = torch.randn(*x.shape[:-1], E, generator=gen).to(x.device, x.dtype)
        return logits.softmax(dim=-1)  # (F, N, E)

    router.forward = forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        del router.forward  # back to the class method


def mone_curve(
    net: MoNE, images: tuple[Tensor, Tensor], clips: tuple[Tensor, Tensor], caps: tuple[float, ...]
) -> dict[str, list[float]]:
    T = clips[0].shape[1]
    res: dict[str, list[float]] = {"capacities": [], "gflops": [], "accuracy": [], "clip_gflops": []}
    res["clip_accuracy"] = []
    for c in caps:
        t = time.monotonic()
        res["capacities"].append(c)
        res["gflops"].append(round(gflops(net.cfg, c), 6))
        res["accuracy"].append(accuracy_of(mone_fn(net, c), *images, batch=1000))
        res["clip_gflops"].append(round(gflops(net.cfg, c, T), 6))
        res["clip_accuracy"].append(
            accuracy_of(mone_fn(net, c), *clips, batch=125) if len(clips[1]) else float("nan")
        )
        log.info("capacity %.3f: %.2f %% images, %.2f %% clips (%.0f s)", c, res["accuracy"][-1],
                 res["clip_accuracy"][-1], time.monotonic() - t)  # fmt: skip
    return res


def random_curve(
    net: MoNE, images: tuple[Tensor, Tensor], clips: tuple[Tensor, Tensor], caps: tuple[float, ...]
) -> dict[str, list[float]]:
    """Random-router accuracy on images at every capacity and on clips at RANDOM_CLIP_CAPACITIES."""
    T = clips[0].shape[1]
    res: dict[str, list[float]] = {"capacities": list(caps), "gflops": [], "accuracy": []}
    res.update(clip_capacities=[], clip_gflops=[], clip_accuracy=[])
    for c in caps:
        with random_router(net):  # a fresh generator per capacity: every point is reproducible on its own
            res["gflops"].append(round(gflops(net.cfg, c), 6))
            res["accuracy"].append(accuracy_of(mone_fn(net, c), *images, batch=1000))
        if c in RANDOM_CLIP_CAPACITIES and len(clips[1]):
            with random_router(net):
                res["clip_capacities"].append(c)
                res["clip_gflops"].append(round(gflops(net.cfg, c, T), 6))
                res["clip_accuracy"].append(accuracy_of(mone_fn(net, c), *clips, batch=125))
        log.info("random router %.3f: %.2f %%", c, res["accuracy"][-1])
    return res


def tome_curve(
    dense: MoNE, images: tuple[Tensor, Tensor], clips: tuple[Tensor, Tensor], rs: tuple[int, ...]
) -> dict[str, list[float]]:
    T = clips[0].shape[1]
    res: dict[str, list[float]] = {
        "r": [],
        "gflops": [],
        "accuracy": [],
        "clip_gflops": [],
        "clip_accuracy": [],
    }
    for r in rs:
        res["r"].append(r)
        res["gflops"].append(round(tome_gflops(dense.cfg, r), 6))
        res["accuracy"].append(accuracy_of(tome_fn(dense, r), *images, batch=1000))
        res["clip_gflops"].append(round(tome_gflops(dense.cfg, r, T), 6))
        res["clip_accuracy"].append(
            accuracy_of(tome_fn(dense, r), *clips, batch=125) if len(clips[1]) else float("nan")
        )
        log.info("ToMe r=%d: %.2f %% images, %.2f %% clips", r, res["accuracy"][-1], res["clip_accuracy"][-1])
    return res


def interp_accuracy(curve: dict[str, list[float]], at_gflops: float, clip: bool = False) -> float:
    """Accuracy of a curve linearly interpolated at `at_gflops`."""
    g = curve["clip_gflops" if clip else "gflops"]
    a = curve["clip_accuracy" if clip else "accuracy"]
    order = np.argsort(g)
    return float(np.interp(at_gflops, np.asarray(g)[order], np.asarray(a)[order]))


ABLATION_CLIP_CAPACITIES = (1.0, 0.3)


def ablation_rows(
    entries: tuple[tuple[str, str], ...],
    images: tuple[Tensor, Tensor],
    clips: tuple[Tensor, Tensor],
    caps: tuple[float, ...],
    device: str = "cpu",
) -> list[dict[str, Any]]:
    """One row per (name, checkpoint): accuracy at `caps` (images) and at 1.0 / 0.3 (clips), the training
    FLOPs recorded in the checkpoint, their ratio to the first row's, and the gain over the row above."""
    rows: list[dict[str, Any]] = []
    for name, path in entries:
        ck = load_checkpoint(path, device=device)
        row: dict[str, Any] = {"name": name, "checkpoint": path, "train_gflops": ck.meta.get("train_gflops")}
        row["accuracy"] = {f"{c:g}": accuracy_of(mone_fn(ck.model, c), *images, batch=500) for c in caps}
        row["clip_accuracy"] = {
            f"{c:g}": accuracy_of(mone_fn(ck.model, c), *clips, batch=125)
            for c in ABLATION_CLIP_CAPACITIES
            if len(clips[1])
        }
        first = rows[0] if rows else row
        if row["train_gflops"] and first["train_gflops"]:
            row["train_flops_ratio"] = round(row["train_gflops"] / first["train_gflops"], 3)
        if rows:
            above = rows[-1]
            row["gain"] = {
                key: {c: round(a - above[key][c], 2) for c, a in row[key].items()}
                for key in ("accuracy", "clip_accuracy")
            }
        rows.append(row)
        log.info("ablation %s: %s %s", name, row["accuracy"], row["clip_accuracy"])
    return rows


def ablation_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: each variant's accuracy, with the gain over the row above in parentheses."""
    caps = list(rows[0]["accuracy"]) if rows else []
    clip_caps = list(rows[0]["clip_accuracy"]) if rows else []
    head = ["variant", "training GFLOPs", "× first"]
    head += [f"images @{c} %" for c in caps] + [f"clips @{c} %" for c in clip_caps]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for row in rows:
        g = row.get("train_gflops")
        cells = [row["name"], f"{g:.4g}" if g else "–", f"{row.get('train_flops_ratio', float('nan')):.3f}"]
        for key, cs in (("accuracy", caps), ("clip_accuracy", clip_caps)):
            for c in cs:
                cell = f"{row[key][c]:.2f}"
                if "gain" in row:
                    cell += f" ({row['gain'][key][c]:+.2f})"
                cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# -- report ---------------------------------------------------------------------------------------------
def check_targets(res: dict[str, Any]) -> dict[str, Any]:
    """The acceptance targets of the default model, computed from the results (test set)."""
    mone = res["mone"]
    acc = dict(zip(mone["capacities"], mone["accuracy"], strict=True))
    clip = dict(zip(mone["capacities"], mone["clip_accuracy"], strict=True))
    out: dict[str, Any] = {}
    if "dense" in res:
        d = res["dense"]["accuracy"]
        dg = res["dense"]["gflops"]
        out["dense >= 93.0"] = [d, d >= 93.0]
        out["MoNE@1.0 >= dense - 0.3"] = [acc[1.0], acc[1.0] >= d - 0.3]
        out["MoNE@0.5 >= dense - 0.8"] = [acc[0.5], acc[0.5] >= d - 0.8]
        out["MoNE@0.5 GFLOPs <= 0.55 x dense"] = [
            round(gflops_ratio(mone, 0.5, dg), 3),
            gflops_ratio(mone, 0.5, dg) <= 0.55,
        ]
        out["MoNE@0.25 >= dense - 2.0"] = [acc[0.25], acc[0.25] >= d - 2.0]
        tome = res.get("tome")
        if tome:
            for frac in (0.5, 0.35):
                target = frac * dg
                i = int(np.argmin([abs(g - target) for g in tome["gflops"]]))
                g, a = tome["gflops"][i], tome["accuracy"][i]
                m = interp_accuracy(mone, g)
                out[f"MoNE >= ToMe at {g / dg:.2f}x dense GFLOPs (r={tome['r'][i]})"] = [
                    round(m, 2),
                    a,
                    m >= a,
                ]
    rnd = res.get("random_router")
    if rnd:
        racc = dict(zip(rnd["capacities"], rnd["accuracy"], strict=True))
        for c in (0.5, 0.25):
            out[f"learned >= random + 1.0 at {c}"] = [acc[c], racc[c], acc[c] >= racc[c] + 1.0]
    out["clips@1.0 >= 88.0"] = [clip[1.0], clip[1.0] >= 88.0]
    out["clips@0.3 >= clips@1.0 - 2.0"] = [clip[0.3], clip[1.0], clip[0.3] >= clip[1.0] - 2.0]
    return out


def gflops_ratio(mone: dict[str, list[float]], cap: float, dense_gflops: float) -> float:
    return mone["gflops"][mone["capacities"].index(cap)] / dense_gflops


def markdown_table(res: dict[str, Any]) -> str:
    mone, rnd = res["mone"], res.get("random_router")
    dense_g = res["dense"]["gflops"] if "dense" in res else mone["gflops"][-1]
    lines = [
        "| capacity | GFLOPs (image) | × dense | MoNE images % | random router % | GFLOPs (clip) "
        "| MoNE clips % |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i, c in enumerate(mone["capacities"]):
        r = f"{rnd['accuracy'][i]:.2f}" if rnd else "–"
        lines.append(
            f"| {c:g} | {mone['gflops'][i]:.4f} | {mone['gflops'][i] / dense_g:.2f} "
            f"| {mone['accuracy'][i]:.2f} | "
            f"{r} | {mone['clip_gflops'][i]:.3f} | {mone['clip_accuracy'][i]:.2f} |"
        )
    if "tome" in res:
        t = res["tome"]
        lines += ["", "| ToMe r | GFLOPs (image) | × dense | dense+ToMe images % | GFLOPs (clip) | clips % | "
                  "MoNE at same GFLOPs % |", "|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for i, r in enumerate(t["r"]):
            lines.append(
                f"| {r} | {t['gflops'][i]:.4f} | {t['gflops'][i] / dense_g:.2f} | {t['accuracy'][i]:.2f} | "
                f"{t['clip_gflops'][i]:.3f} | {t['clip_accuracy'][i]:.2f} "
                f"| {interp_accuracy(mone, t['gflops'][i]):.2f} |"
            )
    return "\n".join(lines) + "\n"


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, clip in zip(axes, (False, True), strict=True):
        g, a = ("clip_gflops", "clip_accuracy") if clip else ("gflops", "accuracy")
        mone = res["mone"]
        ax.plot(mone[g], mone[a], "o-", label="MoNE (learned router)")
        rnd = res.get("random_router")
        if rnd and rnd[g]:
            ax.plot(rnd[g], rnd[a], "s--", label="MoNE, random router")
        if "tome" in res:
            ax.plot(res["tome"][g], res["tome"][a], "^-.", label="dense ViT + ToMe")
        if "dense" in res:
            ax.plot([res["dense"][g]], [res["dense"][a]], "k*", markersize=12, label="dense ViT")
        ax.set_xlabel("GFLOPs per " + ("clip (8 frames)" if clip else "image"))
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_title("Fashion-MNIST test " + ("clips" if clip else "images"))
        ax.grid(alpha=0.3)
        lo = min(min(res["mone"][a]), 50.0)
        ax.set_ylim(max(lo - 2, 0), 100)
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Run the selected methods; results of methods not run are kept from an existing `cfg.out` file, so
    the dense baseline and the MoNE model can be evaluated in separate sittings."""
    torch.set_num_threads(cfg.threads)
    t0 = time.monotonic()
    out = Path(cfg.out)
    res: dict[str, Any] = json.loads(out.read_text()) if out.is_file() else {}
    ck = load_checkpoint(cfg.checkpoint, device=cfg.device) if cfg.checkpoint else None
    shape = (ck.config.img_size, ck.config.in_chans) if ck else (28, 1)
    test = load_fashion_mnist("test", cfg.data_dir, *shape)
    if cfg.limit:
        test = test.subset(slice(0, cfg.limit))
    images = (test.x, test.y)
    num_frames = ck.config.num_frames if ck else 8
    clips = eval_clips(test.x, test.y, min(cfg.clips, len(test)), num_frames)
    res.update(test_images=len(test), test_clips=len(clips[1]))
    if cfg.ablation:
        res["ablation"] = ablation_rows(cfg.ablation, images, clips, cfg.ablation_capacities, cfg.device)
        if cfg.ablation_table:
            Path(cfg.ablation_table).parent.mkdir(parents=True, exist_ok=True)
            Path(cfg.ablation_table).write_text(ablation_table(res["ablation"]))
    if ck is not None:
        res["checkpoint"] = cfg.checkpoint
        res["mone"] = mone_curve(ck.model, images, clips, cfg.capacities)
        if cfg.random_router:
            res["random_router"] = random_curve(ck.model, images, clips, cfg.capacities)
    if cfg.dense:
        dense = load_checkpoint(cfg.dense, device=cfg.device).model
        tome = tome_curve(dense, images, clips, cfg.tome_r)
        res.update(dense_checkpoint=cfg.dense, tome=tome)
        if 0 in tome["r"]:
            i = tome["r"].index(0)
            res["dense"] = {k: tome[k][i] for k in ("gflops", "accuracy", "clip_gflops", "clip_accuracy")}
    if "mone" in res:
        res["targets"] = check_targets(res)
    res["eval_wall_s"] = round(time.monotonic() - t0, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    if ck is None or "mone" not in res:
        return res
    if cfg.write_profile:
        profile = {
            k: res["mone"][k] for k in ("capacities", "gflops", "accuracy", "clip_gflops", "clip_accuracy")
        }
        profile.update(test_images=len(test), test_clips=len(clips[1]))
        save_checkpoint(
            ck.path or cfg.checkpoint or ".", ck.model, labels=ck.labels, profile=profile, meta=ck.meta
        )
    if cfg.plot:
        plot(res, Path(cfg.plot))
    if cfg.table:
        Path(cfg.table).write_text(markdown_table(res))
    return res


def _named_checkpoint(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=CHECKPOINT, got {text!r}")
    return name, path


def build_parser() -> argparse.ArgumentParser:
    d = EvalConfig()
    p = argparse.ArgumentParser(
        prog="mone-eval",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--checkpoint", default=d.checkpoint, help="MoNE checkpoint (its profile is rewritten); 'none': skip"
    )
    p.add_argument(
        "--dense", default=d.dense, help="dense baseline checkpoint (dense point and ToMe); 'none': skip both"
    )
    p.add_argument(
        "--data-dir", default=d.data_dir, help="Fashion-MNIST directory; default: the Debian package's"
    )
    p.add_argument("--capacities", type=float, nargs="+", default=list(d.capacities), help="MoNE capacities")
    p.add_argument(
        "--tome-r", type=int, nargs="+", default=list(d.tome_r), help="ToMe tokens merged per layer"
    )
    p.add_argument("--clips", type=int, default=d.clips, help="test clips (clip i: test image i, seed i)")
    p.add_argument("--out", default=d.out, help="results JSON (methods not run keep their earlier results)")
    p.add_argument("--plot", default=d.plot, help="accuracy-vs-GFLOPs PNG; '' for none")
    p.add_argument(
        "--table", default=d.table, help="markdown table of the MoNE, random-router and ToMe curves"
    )
    p.add_argument(
        "--write-profile",
        action=argparse.BooleanOptionalAction,
        default=d.write_profile,
        help="store the MoNE curve as the checkpoint's profile (what the server publishes)",
    )
    p.add_argument(
        "--random-router",
        action=argparse.BooleanOptionalAction,
        default=d.random_router,
        help="evaluate the random-router ablation too",
    )
    p.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads")
    p.add_argument("--device", default=d.device, help="where the models run: cpu, cuda, cuda:1, ...")
    p.add_argument("--limit", type=int, default=d.limit, help="first N test images only (0: all 10,000)")
    p.add_argument(
        "--ablation",
        type=_named_checkpoint,
        nargs="+",
        default=[],
        metavar="NAME=CHECKPOINT",
        help="recipe variants side by side (training FLOPs, accuracy, gain over the row above), in order",
    )
    p.add_argument(
        "--ablation-capacities",
        type=float,
        nargs="+",
        default=list(d.ablation_capacities),
        help="image capacities of the ablation (clips: 1.0 and 0.3)",
    )
    p.add_argument("--ablation-table", default=d.ablation_table, help="markdown path for the ablation table")
    return p


def parse_args(argv: list[str] | None = None) -> EvalConfig:
    a = build_parser().parse_args(argv)
    return EvalConfig(
        checkpoint=None if a.checkpoint in (None, "", "none") else a.checkpoint,
        dense=None if a.dense in (None, "", "none") else a.dense,
        data_dir=a.data_dir,
        capacities=tuple(a.capacities),
        tome_r=tuple(a.tome_r),
        clips=a.clips,
        out=a.out,
        plot=a.plot or None,
        table=a.table or None,
        write_profile=a.write_profile,
        random_router=a.random_router,
        threads=a.threads,
        device=a.device,
        limit=a.limit,
        ablation=tuple(a.ablation),
        ablation_capacities=tuple(a.ablation_capacities),
        ablation_table=a.ablation_table or None,
    )


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    res = evaluate(cfg)
    for name, value in res.get("targets", {}).items():
        log.info("target %s: %s", name, value)


if __name__ == "__main__":
    main()
