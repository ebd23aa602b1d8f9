"""`mone-train`: train a MoNE ViT (or its dense baseline) on images and clips.

Recipe: AdamW, linear warm-up then cosine decay, label-smoothed soft targets, augmentation (random crop and
flip; optionally RandAugment-style ops, random erasing and mixup/CutMix, `mone.model.augment`).  A dense
baseline is the same network at capacity 1.0 (every token on the full expert).  The capacity schedule
(`mone.model.recipe.CapacitySchedule`) decides which effective capacities a step trains: one fixed capacity,
one
drawn per step from {0.15, 0.25, ..., 0.95} plus 1.0 (the paper's adaptive model, Jain et al., NeurIPS 2024,
Sec. 5; docs/model.md section 5), or a sandwich of 1.0 and lower capacities whose forwards the 1.0 forward
teaches by in-place distillation (`--distill`).  An EMA of the weights (`--ema-decay`) is validated and
saved beside them.  Clip batches (moving Fashion-MNIST items, `mone.model.clips`) are interleaved with image
batches (`--clip-every` or `--clip-share`) so the temporal transformer and per-frame routing learn.

The run's length is either --epochs or a budget of training FLOPs (`--budget-epochs`, forward + backward =
3 x the analytic forward FLOPs of every capacity a step runs), so that runs with different schedules can be
compared at equal training compute; `--max-minutes` bounds the wall clock with the schedule still annealed.
`--from-timm FILE` starts from a timm ViT's weights (`mone.model.timm_import`).

Runs on CPU, one CUDA GPU (bf16 autocast) or several through `torchrun` (DDP; gloo on CPU).  Every epoch
writes `<out>/last/` (a loadable checkpoint), `<out>/ema/` (with an EMA) and `<out>/train_state.pt`
(optimizer, EMA and counters, loaded with weights_only=True); `--resume` continues from them.  The data order
and augmentation of epoch e depend only on (seed, e), so a resumed run sees the same batches as an
uninterrupted one.

Shape legend: B batch, T frames, C channels, H = W pixels.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from mone.model.augment import crop_flip, mix, rand_augment, random_erase, soft_targets
from mone.model.checkpoint import load_checkpoint, save_checkpoint
from mone.model.clips import make_clips
from mone.model.config import MoNEConfig
from mone.model.data import ImageSet, load_clip_folder, load_fashion_mnist, load_image_folder
from mone.model.flops import gflops
from mone.model.preprocess import normalize
from mone.model.recipe import ADAPTIVE_GRID, EMA, SCHEDULES, CapacitySchedule, capacity_loss
from mone.model.timm_import import config_from_timm_state_dict, from_timm_state_dict, read_timm_weights
from mone.model.vit import MoNE

try:
    from tqdm import tqdm
except ImportError:  # the progress bar is optional (extra "train")
    tqdm = None

log = logging.getLogger("mone.train")
__all__ = ["ADAPTIVE_GRID", "HELP", "TrainConfig", "lr_at", "parse_args", "train"]
STATE_FILE = "train_state.pt"


@dataclass(frozen=True)
class TrainConfig:
    """One training run; `HELP` describes every field (it is also the `--help` text of its option)."""

    out: str = "runs/default"
    variant: str = "Mi/4"
    data_dir: str | None = None
    image_folder: str | None = None
    clip_folder: str | None = None
    val_size: int = 5000
    train_limit: int = 0
    epochs: int = 10
    budget_epochs: float = 0.0
    max_minutes: float = 0.0
    batch_size: int = 128
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_steps: int = 500
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    capacity: float = 1.0
    adaptive: bool = False
    schedule: str = "auto"
    capacity_grid: tuple[float, ...] = ADAPTIVE_GRID
    full_rate: float = 0.1
    lower: int = 2
    sandwich_min: bool = False
    distill: float = 0.0
    distill_temperature: float = 1.0
    ema_decay: float = 0.0
    clip_every: int = 4
    clip_share: float = 0.0
    clip_batch_size: int = 16
    num_frames: int = 8
    init_from: str | None = None
    from_timm: str | None = None
    timm_heads: int = 0
    timm_norm: str = "imagenet"
    alpha_init: float | None = None
    resume: bool = False
    max_steps: int = 0
    seed: int = 0
    threads: int = 2
    crop_pad: int = 2
    hflip: bool = True
    randaug_ops: int = 0
    randaug_magnitude: float = 0.5
    erase_prob: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    mix_prob: float = 1.0
    val_capacities: tuple[float, ...] = (1.0, 0.5, 0.25)
    val_clips: int = 256
    log_every: int = 50
    progress: bool = True

    def capacity_schedule(self) -> CapacitySchedule:
        kind = self.schedule
        if kind == "auto":
            kind = "single" if self.adaptive else "fixed"
        return CapacitySchedule(
            kind, self.capacity, self.capacity_grid, self.full_rate, self.lower, self.sandwich_min
        )


HELP: dict[str, str] = {
    "out": "run directory: checkpoints last/ (and ema/), train_state.pt, log.jsonl",
    "variant": "model variant, e.g. Mi/4 or TiG/2 (28x28 grey, Fashion-MNIST) or S/16 (224 px RGB)",
    "data_dir": "Fashion-MNIST directory (IDX files); default: the Debian package's location",
    "image_folder": "train on ROOT/<class>/* images instead of Fashion-MNIST",
    "clip_folder": "clips ROOT/<class>/* (videos, animated GIFs, .npy or frame folders) for the clip "
    "batches; default: clips drawn from the training images",
    "val_size": "the last N training items are held out for validation (at most a fifth of them)",
    "train_limit": "train on the first N training items only (0: all; for smoke tests)",
    "epochs": "epochs to train (the cosine schedule spans them); ignored with --budget-epochs",
    "budget_epochs": "train until the training FLOPs equal this many dense epochs of the training images "
    "(E x images x 3 x the forward GFLOPs at capacity 1.0), whatever the schedule or the clip share; "
    "the learning rate follows the share of the budget spent. 0: train --epochs",
    "max_minutes": "wall-clock limit: the learning rate follows the larger of the budget share and the time "
    "share, so the schedule still ends (annealed) by the limit. 0: none",
    "batch_size": "images per image batch (over all processes)",
    "lr": "peak learning rate (AdamW)",
    "min_lr": "learning rate at the end of the cosine decay",
    "warmup_steps": "linear warm-up steps (at most a tenth of the run)",
    "weight_decay": "AdamW weight decay of the weight matrices (none on biases, norms, positions, alpha)",
    "label_smoothing": "label smoothing of the targets",
    "capacity": "effective capacity of every step with the fixed schedule (1.0: the dense baseline)",
    "adaptive": "shorthand for --schedule single (one capacity per step from the grid)",
    "schedule": "capacities of a step: fixed (--capacity), single (one from --capacity-grid, 1.0 with "
    "probability --full-rate), sandwich (1.0, then --lower capacities from the grid); auto: single with "
    "--adaptive, else fixed",
    "capacity_grid": "capacities the single and sandwich schedules draw from",
    "full_rate": "single schedule: probability that a step trains capacity 1.0",
    "lower": "sandwich schedule: lower capacities per step (drawn from the grid without replacement)",
    "sandwich_min": "sandwich schedule: the grid's smallest capacity is always one of the lower ones",
    "distill": "in-place distillation weight w (sandwich only): each lower capacity's loss is "
    "(1-w) x labels + w x KL to the same step's capacity-1.0 predictions. 0: labels only",
    "distill_temperature": "softmax temperature of the distillation term",
    "ema_decay": "keep an EMA of the weights with this decay (e.g. 0.999), validated every epoch and "
    "saved as <out>/ema. 0: no EMA",
    "clip_every": "one clip batch after every N image batches (0: images only); see --clip-share",
    "clip_share": "share of the steps that are clip steps, e.g. 0.3 (overrides --clip-every when > 0)",
    "clip_batch_size": "clips per clip batch (a clip costs --num-frames images)",
    "num_frames": "frames per clip",
    "init_from": "start from the weights of this mone checkpoint (fine-tuning)",
    "from_timm": "start from a timm ViT checkpoint (global_pool='avg', class_token=False): a state-dict "
    "file (.safetensors, .pt/.pth/.bin) in timm's key layout; the head is replaced when the data has "
    "another number of classes",
    "timm_heads": "attention heads of the --from-timm model (not stored in its weights); 0: width / 64",
    "timm_norm": "input normalisation of the --from-timm model: imagenet (mean 0.485,0.456,0.406) or "
    "inception (mean = std = 0.5, timm's augreg ViTs)",
    "alpha_init": "set the router scale alpha (Eq. 1) to this value before training (not on --resume)",
    "resume": "continue --out from its last epoch (weights, optimizer, EMA, counters)",
    "max_steps": "stop after this many steps (0: no limit)",
    "seed": "seed of everything random (data order, augmentation, capacities, initialisation)",
    "threads": "torch CPU threads",
    "crop_pad": "random crop with this zero padding in pixels (0: no crop)",
    "hflip": "random horizontal flips",
    "randaug_ops": "RandAugment: ops per image (0: off); ops suit small grey images (model/augment.py)",
    "randaug_magnitude": "RandAugment magnitude, 0..1 of each op's range",
    "erase_prob": "random erasing: probability per image of one noise-filled rectangle",
    "mixup": "mixup Beta(a, a) parameter a (0: off)",
    "cutmix": "CutMix Beta(a, a) parameter a (0: off); with both on, each mixed batch picks one",
    "mix_prob": "probability that a batch is mixed (mixup or CutMix)",
    "val_capacities": "capacities validated every epoch (non-fixed schedules)",
    "val_clips": "validation clips (made from validation images) evaluated every epoch",
    "log_every": "write a step record (loss, capacities, learning rate, alpha) to log.jsonl every N steps",
    "progress": "show a progress bar",
}
CHOICES: dict[str, tuple[str, ...]] = {
    "schedule": ("auto", *SCHEDULES),
    "timm_norm": ("imagenet", "inception"),
}


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
        full = load_fashion_mnist("train", cfg.data_dir, mcfg.img_size, mcfg.in_chans)
    n_val = min(cfg.val_size, len(full) // 5)
    train, val = full.subset(slice(0, len(full) - n_val)), full.subset(slice(len(full) - n_val, len(full)))
    if cfg.train_limit:
        train = train.subset(slice(0, cfg.train_limit))
    clips = None
    if cfg.clip_folder:
        clips = load_clip_folder(cfg.clip_folder, mcfg.img_size, mcfg.in_chans, cfg.num_frames)
    return Data(train, val, clips)


def augment(x: Tensor, gen: torch.Generator, cfg: TrainConfig) -> Tensor:
    """The uint8 augmentation of one batch (B, C, H, W): crop/flip, RandAugment, random erasing."""
    x = crop_flip(x, gen, cfg.crop_pad, cfg.hflip)
    x = rand_augment(x, gen, cfg.randaug_ops, cfg.randaug_magnitude)
    return random_erase(x, gen, cfg.erase_prob)


# -- schedule ----------------------------------------------------------------------------------------------
def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to cfg.min_lr at `total` steps."""
    warm = min(cfg.warmup_steps, max(total // 10, 1))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    t = min((step - warm) / max(total - warm, 1), 1.0)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * t))


def lr_at_progress(step: int, progress: float, warm: int, cfg: TrainConfig) -> float:
    """Cosine decay from cfg.lr to cfg.min_lr over `progress` (0..1 of a budget of FLOPs or time), times a
    linear warm-up over the first `warm` steps: however early the budget ends, the run ends annealed."""
    t = min(max(progress, 0.0), 1.0)
    cosine = cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * t))
    return cosine * min(1.0, (step + 1) / max(warm, 1))


def sample_capacity(cfg: TrainConfig, gen: torch.Generator) -> float:
    """One capacity of the single-capacity schedules (fixed / single)."""
    return cfg.capacity_schedule().capacities(gen)[0]


def steps_per_epoch(n_train: int, cfg: TrainConfig) -> tuple[int, int]:
    """(image steps, clip steps) in one epoch."""
    image_steps = max(n_train // cfg.batch_size, 1)
    if cfg.clip_share > 0:
        return image_steps, max(round(image_steps * cfg.clip_share / (1.0 - cfg.clip_share)), 1)
    return image_steps, (image_steps // cfg.clip_every if cfg.clip_every else 0)


def step_plan(cfg: TrainConfig, image_steps: int, clip_steps: int) -> list[bool]:
    """Order of one epoch's steps (True: a clip step): with --clip-share the clip steps are spread evenly
    among the image steps, else one follows every --clip-every image steps."""
    plan: list[bool] = []
    done = 0
    for i in range(image_steps):
        plan.append(False)
        due = (i + 1) * clip_steps // image_steps if cfg.clip_share else (i + 1) // max(cfg.clip_every, 1)
        due = min(due, clip_steps)
        plan += [True] * (due - done)
        done = due
    return plan


def budget_gflops(cfg: TrainConfig, mcfg: MoNEConfig, n_train: int) -> float:
    """Training GFLOPs of --budget-epochs dense epochs (forward + backward = 3 x forward)."""
    return cfg.budget_epochs * n_train * 3 * gflops(mcfg, 1.0)


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


def build_model(cfg: TrainConfig) -> tuple[MoNE, Data]:
    """The model to train (new, --init-from or --from-timm) and the data, with matching class counts."""
    if cfg.from_timm:
        state = read_timm_weights(cfg.from_timm)
        heads = cfg.timm_heads or max(int(state["patch_embed.proj.weight"].shape[0]) // 64, 1)
        norm = {} if cfg.timm_norm == "imagenet" else {"mean": (0.5,) * 3, "std": (0.5,) * 3}
        tcfg = config_from_timm_state_dict(state, heads, num_frames=cfg.num_frames)
        if tcfg.in_chans != 3:
            norm = {}
        data = load_data(cfg, tcfg)
        net = from_timm_state_dict(
            state, heads, cfg.seed, len(data.train.classes), num_frames=cfg.num_frames, **norm
        )
        return net, data
    if cfg.init_from:
        net = load_checkpoint(cfg.init_from).model
    else:
        net = MoNE(MoNEConfig.from_variant(cfg.variant, num_classes=10, num_frames=cfg.num_frames))
    data = load_data(cfg, net.cfg)
    if net.cfg.num_classes != len(data.train.classes):
        raise ValueError(f"model has {net.cfg.num_classes} classes, data {len(data.train.classes)}")
    return net, data


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


def validate(
    net: MoNE, data: Data, cfg: TrainConfig, clips: tuple[Tensor, Tensor], prefix: str = ""
) -> dict[str, float]:
    fixed = cfg.capacity_schedule().kind == "fixed"
    caps = (cfg.capacity,) if fixed else cfg.val_capacities
    out = {f"{prefix}val_acc@{c:g}": accuracy(net, data.val.x, data.val.y, c) for c in caps}
    if len(clips[1]):
        for c in sorted({max(caps), cfg.capacity if fixed else 0.3}, reverse=True):
            out[f"{prefix}val_clip_acc@{c:g}"] = accuracy(net, clips[0], clips[1], c, batch=64)
    return out


def val_clips(data: Data, cfg: TrainConfig) -> tuple[Tensor, Tensor]:
    count = cfg.val_clips
    if not (cfg.clip_every or cfg.clip_share) or not count:
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
    x = augment(data.train.x[idx], gen, cfg)
    if clip:
        seeds = [cfg.seed * 1_000_003 + step * cfg.clip_batch_size + i for i in range(len(idx))]
        return make_clips(x, seeds, cfg.num_frames), data.train.y[idx]
    return x, data.train.y[idx]


def _steps(
    plan: list[tuple[str, Tensor]],
    data: Data,
    cfg: TrainConfig,
    mcfg: MoNEConfig,
    schedule: CapacitySchedule,
    gen: torch.Generator,
    first_step: int,
    dd: Dist,
) -> Iterator[tuple[str, int, list[float], Tensor, Tensor]]:
    """Each step of `plan` in order: (kind, items over all ranks, capacities, normalised (mixed) batch of this
    rank, soft targets).  Capacities, augmentation and mixing draw from `gen` in this fixed order."""
    pin = dd.device.type == "cuda"
    for i, (kind, idx) in enumerate(plan):
        caps = schedule.capacities(gen)
        x8, y = _batch(data, cfg, idx[dd.rank :: dd.world], kind == "clip", first_step + i, gen)
        x = normalize(x8, mcfg.mean, mcfg.std)
        targets = soft_targets(y, mcfg.num_classes, cfg.label_smoothing)
        x, targets, _ = mix(x, targets, gen, cfg.mixup, cfg.cutmix, cfg.mix_prob)
        if pin:
            x, targets = x.pin_memory(), targets.pin_memory()
        yield kind, len(idx), caps, x, targets


_END = object()


class Prefetch:
    """Runs an iterator in a thread, `depth` items ahead of the consumer; exceptions reach the consumer.

    `close()` stops the thread (also when the consumer stopped early)."""

    def __init__(self, items: Iterator[Any], depth: int = 2) -> None:
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(items,), daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, items: Iterator[Any]) -> None:
        try:
            for item in items:
                if not self._put(item):
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            self._put(exc)
            return
        self._put(_END)

    def __iter__(self) -> Iterator[Any]:
        while True:
            item = self._queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def run_length(
    cfg: TrainConfig,
    mcfg: MoNEConfig,
    schedule: CapacitySchedule,
    image_steps: int,
    clip_steps: int,
    budget: float,
) -> tuple[int, float]:
    """The run's length in steps (what the learning-rate schedule spans) and its epochs (inf under a FLOPs
    budget, which ends the run instead)."""
    if budget:
        # Steps the budget buys, for the warm-up cap only: the schedule follows the FLOPs spent.
        per_epoch = 3 * (image_steps * cfg.batch_size * schedule.mean_gflops(mcfg))
        per_epoch += 3 * clip_steps * cfg.clip_batch_size * schedule.mean_gflops(mcfg, cfg.num_frames)
        total = max(round(budget / per_epoch * (image_steps + clip_steps)), 1)
        epochs: float = math.inf
    else:
        total = (image_steps + clip_steps) * cfg.epochs
        epochs = cfg.epochs
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    return total, epochs


def epoch_plan(
    cfg: TrainConfig, data: Data, epoch: int, image_steps: int, clip_steps: int
) -> list[tuple[str, Tensor]]:
    """The epoch's steps in order: ("image", indices of a shuffled batch) or ("clip", drawn clip items);
    reproducible from the seed and the epoch."""
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
    perm = torch.randperm(len(data.train), generator=gen)
    n_clip_items = len(data.clips) if data.clips is not None else len(data.train)
    plan, b = [], 0
    for clip in step_plan(cfg, image_steps, clip_steps):
        if clip:
            plan.append(("clip", torch.randint(n_clip_items, (cfg.clip_batch_size,), generator=gen)))
        else:
            plan.append(("image", perm[b * cfg.batch_size : (b + 1) * cfg.batch_size]))
            b += 1
    return plan


def train_step(
    model: nn.Module,
    net: MoNE,
    opt: torch.optim.Optimizer,
    x: Tensor,
    targets: Tensor,
    caps: list[float],
    cfg: TrainConfig,
    dd: Dist,
) -> float:
    """One optimiser step over the step's capacities (the first is the distillation teacher); returns the
    summed loss.  `model` is `net`, or `net` under DistributedDataParallel."""
    opt.zero_grad(set_to_none=True)
    amp = dd.device.type == "cuda"
    teacher = None
    step_loss = 0.0
    for j, capacity in enumerate(caps):
        # Under DDP, all but the step's last backward accumulate gradients without an all-reduce.
        sync = dd.world == 1 or j == len(caps) - 1
        ctx = contextlib.nullcontext() if sync else model.no_sync()  # type: ignore[operator]
        with ctx:
            with torch.autocast(dd.device.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(x, capacity).logits.float()
            loss = capacity_loss(logits, targets, teacher, cfg.distill, cfg.distill_temperature)
            loss.backward()  # type: ignore[no-untyped-call]
        if j == 0 and cfg.distill:
            teacher = logits.detach()
        step_loss += loss.item()
    opt.step()
    with torch.no_grad():
        # Project alpha onto [0, 1): the forward clamps it, and below 0 the clamp would cut the router's only
        # gradient path (Eq. 1) for good.
        net.alpha.clamp_(0.0, 1.0 - 1e-6)
    return step_loss


def resume(
    cfg: TrainConfig, out: Path, net: MoNE, opt: torch.optim.Optimizer, ema: EMA | None, dd: Dist
) -> dict[str, Any]:
    """The run's state (epoch, step, wall time, training GFLOPs): where `out` left off when resuming (the
    weights, optimiser and EMA are loaded too), else the start."""
    state: dict[str, Any] = {"epoch": 0, "step": 0, "wall_s": 0.0, "train_gflops": 0.0}
    if not (cfg.resume and (out / STATE_FILE).is_file()):
        return state
    ck = load_checkpoint(out / "last")
    net.load_state_dict(ck.model.state_dict())
    saved = torch.load(out / STATE_FILE, weights_only=True, map_location=dd.device)
    opt.load_state_dict(saved["optimizer"])
    if ema is not None and "ema" in saved:
        ema.load_state_dict(saved["ema"])
    state = {k: saved[k] for k in state}
    if dd.main:
        log.info("resumed %s at epoch %d, step %d", out, state["epoch"], state["step"])
    return state


def run_progress(
    cfg: TrainConfig, dd: Dist, step: int, total: int, spent_gflops: float, budget: float, elapsed: float
) -> float:
    """Share of the run done: steps (or FLOPs with a budget), or wall time if that is further."""
    done = spent_gflops / budget if budget else step / total
    if cfg.max_steps:
        done = max(done, step / cfg.max_steps)
    if cfg.max_minutes:
        if dd.world > 1:  # every rank must see the same clock, or they would stop at different steps
            t = torch.tensor([elapsed], dtype=torch.float64, device=dd.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            elapsed = float(t.item())
        done = max(done, elapsed / (60.0 * cfg.max_minutes))
    return done


def train(cfg: TrainConfig) -> Path:
    """Run (or resume) training; returns the directory of the final checkpoint."""
    torch.set_num_threads(cfg.threads)
    dd = setup_dist()
    out = Path(cfg.out)
    torch.manual_seed(cfg.seed)
    schedule = cfg.capacity_schedule()
    if cfg.distill and schedule.kind != "sandwich":
        raise ValueError("--distill needs --schedule sandwich (its capacity-1.0 forward is the teacher)")
    if not 0.0 <= cfg.clip_share < 1.0:
        raise ValueError(f"--clip-share must be in [0, 1), got {cfg.clip_share}")
    net, data = build_model(cfg)
    if cfg.alpha_init is not None:
        with torch.no_grad():
            net.alpha.fill_(cfg.alpha_init)
    net.to(dd.device)
    if dd.device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for the fp32 validation forwards
    opt = torch.optim.AdamW(param_groups(net, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999))
    ema = EMA(net, cfg.ema_decay) if cfg.ema_decay else None
    state = resume(cfg, out, net, opt, ema, dd)
    model: nn.Module = net
    if dd.world > 1:
        model = nn.parallel.DistributedDataParallel(
            net, device_ids=[dd.device] if dd.device.type == "cuda" else None
        )
    if dd.main:
        out.mkdir(parents=True, exist_ok=True)
    image_steps, clip_steps = steps_per_epoch(len(data.train), cfg)
    budget = budget_gflops(cfg, net.cfg, len(data.train))
    total, epochs = run_length(cfg, net.cfg, schedule, image_steps, clip_steps, budget)
    warm = min(cfg.warmup_steps, max(total // 10, 1))
    vclips = val_clips(data, cfg)
    logf = (out / "log.jsonl").open("a") if dd.main else None
    step = int(state["step"])
    t_start = time.monotonic() - float(state["wall_s"])

    def progress() -> float:
        return run_progress(cfg, dd, step, total, state["train_gflops"], budget, time.monotonic() - t_start)

    epoch = int(state["epoch"])
    while epoch < epochs and progress() < 1.0:
        plan = epoch_plan(cfg, data, epoch, image_steps, clip_steps)
        # Capacities and augmentation use their own stream, so both kinds of step stay reproducible.
        cap_gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch + 7)
        bar = None
        if dd.main and cfg.progress and tqdm is not None:
            bar = tqdm(total=len(plan), desc=f"epoch {epoch + 1}", mininterval=2.0)
        model.train()
        t_epoch, seen, loss_sum, loss_n = time.monotonic(), 0, 0.0, 0
        # Batches are drawn and augmented on the CPU by a thread a few steps ahead of the model.
        batches = Prefetch(_steps(plan, data, cfg, net.cfg, schedule, cap_gen, step, dd), depth=3)
        try:
            for kind, n_items, caps, x, targets in batches:
                done = progress()
                if done >= 1.0:
                    break
                x = x.to(dd.device, non_blocking=True)
                targets = targets.to(dd.device, non_blocking=True)
                if budget or cfg.max_minutes:
                    lr = lr_at_progress(step, done, warm, cfg)
                else:
                    lr = lr_at(step, total, cfg)
                for g in opt.param_groups:
                    g["lr"] = lr
                step_loss = train_step(model, net, opt, x, targets, caps, cfg, dd)
                if ema is not None:
                    ema.update(net, step)
                frames = x.shape[1] if x.dim() == 5 else 1
                # Forward + backward ~ 3x the forward FLOPs (Kaplan et al. 2020), summed over ranks.
                state["train_gflops"] += 3 * sum(gflops(net.cfg, c, frames) for c in caps) * n_items
                step += 1
                seen += n_items * frames
                loss_sum, loss_n = loss_sum + step_loss / len(caps), loss_n + 1
                if bar is not None:
                    rate = seen / max(time.monotonic() - t_epoch, 1e-9)
                    mean_loss = step_loss / len(caps)
                    bar.set_postfix(loss=f"{mean_loss:.3f}", cap=f"{min(caps):.2f}", img_s=f"{rate:.0f}")
                    bar.update(1)
                if logf is not None and cfg.log_every and step % cfg.log_every == 0:
                    rec = {"step": step, "epoch": epoch, "loss": round(step_loss / len(caps), 4)}
                    rec |= {"capacity": caps[-1], "capacities": caps, "kind": kind, "lr": lr}
                    logf.write(json.dumps(rec | {"alpha": round(net.alpha.item(), 4)}) + "\n")
                    logf.flush()
        finally:
            batches.close()
        if bar is not None:
            bar.close()
        epoch += 1
        state.update(epoch=epoch, step=step, wall_s=time.monotonic() - t_start)
        train_s = time.monotonic() - t_epoch
        if dd.main:
            summary = {"epoch": epoch, "step": step, "train_loss": round(loss_sum / max(loss_n, 1), 4)}
            summary.update(validate(net, data, cfg, vclips))
            if ema is not None:
                summary.update(validate(cast(MoNE, ema.model), data, cfg, vclips, prefix="ema_"))
            summary.update(wall_s=round(state["wall_s"], 1), train_gflops=round(state["train_gflops"], 1))
            summary.update(epoch_train_s=round(train_s, 1))
            if budget:
                summary.update(budget_gflops=round(budget, 1))
            summary.update(frames_per_s=round(seen * dd.world / max(train_s, 1e-9), 1))
            assert logf is not None
            logf.write(json.dumps(summary) + "\n")
            logf.flush()
            log.info("%s", summary)
            _save(net, ema, data, cfg, out, opt, state)
        if dd.world > 1:
            dist.barrier()
    if logf is not None:
        logf.close()
    if dd.world > 1:
        dist.destroy_process_group()
    return out / "last"


def _save(
    net: MoNE,
    ema: EMA | None,
    data: Data,
    cfg: TrainConfig,
    out: Path,
    opt: torch.optim.Optimizer,
    state: dict[str, Any],
) -> None:
    meta = {"train_config": dataclasses.asdict(cfg), **{k: state[k] for k in state}}
    save_checkpoint(out / "last", net, labels=data.train.classes, meta=meta)
    extra: dict[str, Any] = {}
    if ema is not None:
        ema_meta = {**meta, "ema_decay": ema.decay}
        save_checkpoint(out / "ema", cast(MoNE, ema.model), labels=data.train.classes, meta=ema_meta)
        extra["ema"] = ema.state_dict()
    tmp = out / (STATE_FILE + ".tmp")
    torch.save({"optimizer": opt.state_dict(), **state, **extra}, tmp)
    tmp.replace(out / STATE_FILE)


# -- command line ------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    defaults = TrainConfig()
    p = argparse.ArgumentParser(
        prog="mone-train",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        help_text = HELP[f.name]
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif isinstance(default, tuple):
            p.add_argument(flag, type=float, nargs="+", default=list(default), help=help_text)
        elif default is None:  # optional fields: "float | None" or "str | None"
            kind = float if str(f.type).startswith("float") else str
            p.add_argument(flag, type=kind, default=None, help=help_text)
        else:
            choices = CHOICES.get(f.name)
            p.add_argument(flag, type=type(default), default=default, choices=choices, help=help_text)
    return p


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    args = vars(build_parser().parse_args(argv))
    for f in dataclasses.fields(TrainConfig):
        if isinstance(args[f.name], list):
            args[f.name] = tuple(args[f.name])
    return TrainConfig(**args)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    np.random.seed(cfg.seed)
    train(cfg)


if __name__ == "__main__":
    main()
