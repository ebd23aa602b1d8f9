"""`mone-train`: train a MoNE ViT (or its dense baseline) on images and clips.

Recipe: AdamW, linear warm-up then cosine decay, label smoothing, random-crop + flip augmentation; a dense
baseline is the same network at capacity 1.0 (every token on the full expert).  Adaptive training samples
one effective capacity per step from {0.15, 0.25, ..., 0.95} plus 1.0 (Jain et al., NeurIPS 2024, Sec. 5
"Adaptive model"; mone-paper.md section 5), so one checkpoint serves every budget.  Clip batches (moving
Fashion-MNIST items, `model.clips`) are interleaved with image batches so the temporal transformer learns.

Runs on CPU, one CUDA GPU (bf16 autocast) or several through `torchrun` (DDP; gloo on CPU).  Every epoch
writes `<out>/last/` (a loadable checkpoint) and `<out>/train_state.pt` (optimizer and counters, loaded
with weights_only=True); `--resume` continues from them.  The data order and augmentation of epoch e depend
only on (seed, e), so a resumed run sees the same batches as an uninterrupted one.

Shape legend: B batch, T frames, C channels, H = W pixels.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from model.checkpoint import load_checkpoint, save_checkpoint
from model.clips import make_clips
from model.config import MoNEConfig
from model.data import ImageSet, load_clip_folder, load_fashion_mnist, load_image_folder, normalize
from model.flops import gflops
from model.vit import MoNE

try:
    from tqdm import tqdm
except ImportError:  # the progress bar is optional (extra "train")
    tqdm = None

log = logging.getLogger("mone.train")
ADAPTIVE_GRID = (0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95)
STATE_FILE = "train_state.pt"


@dataclass(frozen=True)
class TrainConfig:
    """One training run.

    Args:
        out: run directory (checkpoint `last/`, `train_state.pt`, `log.jsonl`).
        variant: model variant, e.g. "Mi/4" (Fashion-MNIST) or "S/16".
        data_dir: Fashion-MNIST directory; None for the Debian package's location.
        image_folder: train on root/<class>/* images instead of Fashion-MNIST.
        clip_folder: clips root/<class>/* (videos, .npy or frame folders) for the clip batches; by default
            clips are generated from the training images.
        val_size: the last `val_size` training items are held out for validation.
        train_limit: use only the first `train_limit` training items (smoke tests).
        epochs, batch_size, lr, min_lr, warmup_steps, weight_decay, label_smoothing: the optimisation recipe.
        capacity: fixed effective capacity (1.0: dense baseline); ignored with `adaptive`.
        adaptive: sample the capacity per step from ADAPTIVE_GRID plus 1.0.
        full_rate: probability of capacity 1.0 in adaptive steps.
        clip_every: one clip batch after every `clip_every` image batches (0: images only).
        clip_batch_size: clips per clip batch (a clip costs T images).
        num_frames: frames per clip.
        init_from: start from this checkpoint's weights (fine-tuning).
        alpha_init: set the router scale alpha (Eq. 1) to this value before training (not on --resume).
        resume: continue `out` from its last epoch.
        max_steps: stop after this many steps (0: no limit).
        seed: everything random derives from it.
        threads: torch CPU threads.
        crop_pad: random-crop padding in pixels (0: no crop).
        hflip: random horizontal flips.
        val_capacities: capacities evaluated on the validation split every epoch.
        val_clips: validation clips (made from validation images) evaluated every epoch.
        progress: show a progress bar.
    """

    out: str = "runs/default"
    variant: str = "Mi/4"
    data_dir: str | None = None
    image_folder: str | None = None
    clip_folder: str | None = None
    val_size: int = 5000
    train_limit: int = 0
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_steps: int = 500
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    capacity: float = 1.0
    adaptive: bool = False
    full_rate: float = 0.1
    clip_every: int = 4
    clip_batch_size: int = 16
    num_frames: int = 8
    init_from: str | None = None
    alpha_init: float | None = None
    resume: bool = False
    max_steps: int = 0
    seed: int = 0
    threads: int = 2
    crop_pad: int = 2
    hflip: bool = True
    val_capacities: tuple[float, ...] = (1.0, 0.5, 0.25)
    val_clips: int = 256
    progress: bool = True


# -- data ------------------------------------------------------------------------------------------------
@dataclass
class Data:
    train: ImageSet
    val: ImageSet
    clips: ImageSet | None  # pre-made clip set, or None to generate clips from `train`


def load_data(cfg: TrainConfig, mcfg: MoNEConfig) -> Data:
    if cfg.image_folder:
        full = load_image_folder(cfg.image_folder, mcfg.img_size, mcfg.in_chans)
        order = torch.randperm(len(full), generator=torch.Generator().manual_seed(cfg.seed))
        full = full.subset(order)  # folders are sorted by class: shuffle once before the split
    else:
        full = load_fashion_mnist("train", cfg.data_dir)
    n_val = min(cfg.val_size, len(full) // 5)
    train, val = full.subset(slice(0, len(full) - n_val)), full.subset(slice(len(full) - n_val, len(full)))
    if cfg.train_limit:
        train = train.subset(slice(0, cfg.train_limit))
    clips = None
    if cfg.clip_folder:
        clips = load_clip_folder(cfg.clip_folder, mcfg.img_size, mcfg.in_chans, cfg.num_frames)
    return Data(train, val, clips)


def augment(x: Tensor, gen: torch.Generator, pad: int, hflip: bool) -> Tensor:
    """Random crop with zero padding and horizontal flip of uint8 (B, C, H, W) images."""
    B, C, H, W = x.shape
    if pad:
        xp = F.pad(x, (pad, pad, pad, pad))
        oy = torch.randint(0, 2 * pad + 1, (B,), generator=gen)
        ox = torch.randint(0, 2 * pad + 1, (B,), generator=gen)
        rows = (oy[:, None] + torch.arange(H))[:, None, :, None]  # (B, 1, H, 1)
        cols = (ox[:, None] + torch.arange(W))[:, None, None, :]  # (B, 1, 1, W)
        x = xp[torch.arange(B)[:, None, None, None], torch.arange(C)[None, :, None, None], rows, cols]
    if hflip:
        flip = torch.rand(B, generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x


# -- schedule ----------------------------------------------------------------------------------------------
def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to cfg.min_lr at `total` steps."""
    warm = min(cfg.warmup_steps, max(total // 10, 1))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    t = min((step - warm) / max(total - warm, 1), 1.0)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * t))


def sample_capacity(cfg: TrainConfig, gen: torch.Generator) -> float:
    if not cfg.adaptive:
        return cfg.capacity
    if float(torch.rand((), generator=gen)) < cfg.full_rate:
        return 1.0
    return ADAPTIVE_GRID[int(torch.randint(len(ADAPTIVE_GRID), (), generator=gen))]


def steps_per_epoch(n_train: int, cfg: TrainConfig) -> tuple[int, int]:
    """(image steps, clip steps) in one epoch."""
    image_steps = max(n_train // cfg.batch_size, 1)
    return image_steps, (image_steps // cfg.clip_every if cfg.clip_every else 0)


# -- model and optimizer -----------------------------------------------------------------------------------
def param_groups(net: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only: no decay for biases, norms, position tables and the router scale alpha."""
    decay, no_decay = [], []
    for name, p in net.named_parameters():
        if p.ndim <= 1 or name.endswith(("pos_embed", "temporal_pos")):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_dist() -> Dist:
    """Join the torchrun process group if there is one (nccl on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world == 1:
        return Dist(device=torch.device("cuda" if cuda else "cpu"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(dist.get_rank(), world, device)


# -- evaluation --------------------------------------------------------------------------------------------
@torch.no_grad()
def accuracy(net: MoNE, x: Tensor, y: Tensor, capacity: float, batch: int = 500) -> float:
    """Top-1 accuracy (%) of uint8 items x at `capacity`."""
    net.eval()
    cfg = net.cfg
    device = next(net.parameters()).device
    correct = 0
    for i in range(0, len(y), batch):
        xb = normalize(x[i : i + batch].to(device), cfg.mean, cfg.std)
        correct += int((net(xb, capacity).logits.argmax(-1).cpu() == y[i : i + batch]).sum())
    return 100.0 * correct / max(len(y), 1)


def validate(net: MoNE, data: Data, cfg: TrainConfig, clips: tuple[Tensor, Tensor]) -> dict[str, float]:
    caps = cfg.val_capacities if cfg.adaptive else (cfg.capacity,)
    out = {f"val_acc@{c:g}": accuracy(net, data.val.x, data.val.y, c) for c in caps}
    if cfg.clip_every and len(clips[1]):
        for c in sorted({max(caps), 0.3 if cfg.adaptive else cfg.capacity}, reverse=True):
            out[f"val_clip_acc@{c:g}"] = accuracy(net, clips[0], clips[1], c, batch=64)
    return out


def val_clips(data: Data, cfg: TrainConfig) -> tuple[Tensor, Tensor]:
    count = cfg.val_clips
    if not cfg.clip_every or not count:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    if data.clips is not None:
        return data.clips.x[-count:], data.clips.y[-count:]
    n = min(count, len(data.val))
    # Seeds far from the training clip seeds, so validation clips never repeat a training clip.
    return make_clips(data.val.x[:n], [10**9 + i for i in range(n)], cfg.num_frames), data.val.y[:n]


# -- training ----------------------------------------------------------------------------------------------
def _batch(
    data: Data, cfg: TrainConfig, idx: Tensor, clip: bool, step: int, gen: torch.Generator
) -> tuple[Tensor, Tensor]:
    """uint8 items and labels of one step: augmented images (B, C, H, W) or clips (B, T, C, H, W)."""
    if clip and data.clips is not None:
        return data.clips.x[idx], data.clips.y[idx]
    x = augment(data.train.x[idx], gen, cfg.crop_pad, cfg.hflip)
    if clip:
        seeds = [cfg.seed * 1_000_003 + step * cfg.clip_batch_size + i for i in range(len(idx))]
        return make_clips(x, seeds, cfg.num_frames), data.train.y[idx]
    return x, data.train.y[idx]


def train(cfg: TrainConfig) -> Path:
    """Run (or resume) training; returns the directory of the final checkpoint."""
    torch.set_num_threads(cfg.threads)
    dd = setup_dist()
    out = Path(cfg.out)
    torch.manual_seed(cfg.seed)
    if cfg.init_from:
        net = load_checkpoint(cfg.init_from).model
    else:
        net = MoNE(MoNEConfig.from_variant(cfg.variant, num_classes=10, num_frames=cfg.num_frames))
    if cfg.alpha_init is not None:
        with torch.no_grad():
            net.alpha.fill_(cfg.alpha_init)
    data = load_data(cfg, net.cfg)
    if net.cfg.num_classes != len(data.train.classes):
        raise ValueError(f"model has {net.cfg.num_classes} classes, data {len(data.train.classes)}")
    net.to(dd.device)
    opt = torch.optim.AdamW(param_groups(net, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999))
    state: dict[str, Any] = {"epoch": 0, "step": 0, "wall_s": 0.0, "train_gflops": 0.0}
    if cfg.resume and (out / STATE_FILE).is_file():
        ck = load_checkpoint(out / "last")
        net.load_state_dict(ck.model.state_dict())
        saved = torch.load(out / STATE_FILE, weights_only=True, map_location=dd.device)
        opt.load_state_dict(saved["optimizer"])
        state = {k: saved[k] for k in state}
        if dd.main:
            log.info("resumed %s at epoch %d, step %d", out, state["epoch"], state["step"])
    model: nn.Module = net
    if dd.world > 1:
        model = nn.parallel.DistributedDataParallel(
            net, device_ids=[dd.device] if dd.device.type == "cuda" else None
        )
    if dd.main:
        out.mkdir(parents=True, exist_ok=True)
    image_steps, clip_steps = steps_per_epoch(len(data.train), cfg)
    total = (image_steps + clip_steps) * cfg.epochs
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    vclips = val_clips(data, cfg)
    amp = dd.device.type == "cuda"
    logf = (out / "log.jsonl").open("a") if dd.main else None
    step = int(state["step"])
    t_start = time.monotonic() - float(state["wall_s"])
    for epoch in range(int(state["epoch"]), cfg.epochs):
        if step >= total:
            break
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        perm = torch.randperm(len(data.train), generator=gen)
        n_clip_items = len(data.clips) if data.clips is not None else len(data.train)
        plan = []
        for i in range(image_steps):
            plan.append(("image", perm[i * cfg.batch_size : (i + 1) * cfg.batch_size]))
            if cfg.clip_every and (i + 1) % cfg.clip_every == 0:
                plan.append(("clip", torch.randint(n_clip_items, (cfg.clip_batch_size,), generator=gen)))
        # Capacities and augmentation use their own stream, so both kinds of step stay reproducible.
        cap_gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch + 7)
        start_step = epoch * (image_steps + clip_steps)
        bar = None
        if dd.main and cfg.progress and tqdm is not None:
            bar = tqdm(
                total=min(len(plan), total - start_step),
                desc=f"epoch {epoch + 1}/{cfg.epochs}",
                mininterval=2.0,
            )
        model.train()
        t_epoch, seen, loss_sum, loss_n = time.monotonic(), 0, 0.0, 0
        for kind, idx in plan:
            if step >= total:
                break
            capacity = sample_capacity(cfg, cap_gen)
            x, y = _batch(data, cfg, idx[dd.rank :: dd.world], kind == "clip", step, cap_gen)
            x = normalize(x.to(dd.device), net.cfg.mean, net.cfg.std)
            y = y.to(dd.device)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, cfg)
            with torch.autocast(dd.device.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(x, capacity).logits
            loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            with torch.no_grad():
                # Project alpha onto [0, 1): the forward clamps it, and below 0 the clamp would cut the
                # router's only gradient path (Eq. 1) for good.
                net.alpha.clamp_(0.0, 1.0 - 1e-6)
            frames = x.shape[1] if x.dim() == 5 else 1
            # Forward + backward ~ 3x the forward FLOPs (Kaplan et al. 2020), summed over ranks.
            state["train_gflops"] += 3 * gflops(net.cfg, capacity, frames) * len(idx)
            step += 1
            seen += len(idx) * frames
            loss_sum, loss_n = loss_sum + loss.item(), loss_n + 1
            if bar is not None:
                rate = seen / max(time.monotonic() - t_epoch, 1e-9)
                bar.set_postfix(loss=f"{loss.item():.3f}", cap=f"{capacity:.2f}", img_s=f"{rate:.0f}")
                bar.update(1)
            if logf is not None and step % 50 == 0:
                rec: dict[str, Any] = {"step": step, "epoch": epoch, "loss": round(loss.item(), 4)}
                rec.update(capacity=capacity)
                rec.update(kind=kind, lr=opt.param_groups[0]["lr"], alpha=round(net.alpha.item(), 4))
                logf.write(json.dumps(rec) + "\n")
                logf.flush()
        if bar is not None:
            bar.close()
        state.update(epoch=epoch + 1, step=step, wall_s=time.monotonic() - t_start)
        train_s = time.monotonic() - t_epoch
        if dd.main:
            metrics = validate(net, data, cfg, vclips)
            summary = {"epoch": epoch + 1, "step": step, "train_loss": round(loss_sum / max(loss_n, 1), 4)}
            summary.update(metrics, wall_s=round(state["wall_s"], 1))
            summary.update(train_gflops=round(state["train_gflops"], 1), epoch_train_s=round(train_s, 1))
            summary.update(frames_per_s=round(seen * dd.world / max(train_s, 1e-9), 1))
            assert logf is not None
            logf.write(json.dumps(summary) + "\n")
            logf.flush()
            log.info("%s", summary)
            _save(net, data, cfg, out, opt, state)
        if dd.world > 1:
            dist.barrier()
    if logf is not None:
        logf.close()
    if dd.world > 1:
        dist.destroy_process_group()
    return out / "last"


def _save(
    net: MoNE, data: Data, cfg: TrainConfig, out: Path, opt: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    meta = {"train_config": dataclasses.asdict(cfg), **{k: state[k] for k in state}}
    save_checkpoint(out / "last", net, labels=data.train.classes, meta=meta)
    tmp = out / (STATE_FILE + ".tmp")
    torch.save({"optimizer": opt.state_dict(), **state}, tmp)
    tmp.replace(out / STATE_FILE)


# -- command line ------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> TrainConfig:
    defaults = TrainConfig()
    p = argparse.ArgumentParser(prog="mone-train", description=__doc__.split("\n\n")[0])
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif isinstance(default, tuple):
            p.add_argument(flag, type=float, nargs="+", default=list(default))
        elif default is None:  # optional fields: "float | None" or "str | None"
            kind = float if str(f.type).startswith("float") else str
            p.add_argument(flag, type=kind, default=None)
        else:
            p.add_argument(flag, type=type(default), default=default)
    args = vars(p.parse_args(argv))
    args["val_capacities"] = tuple(args["val_capacities"])
    return TrainConfig(**args)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    np.random.seed(cfg.seed)
    train(cfg)


if __name__ == "__main__":
    main()
