"""Parts of the training recipe beyond the paper's: capacity schedules, in-place distillation, weight EMA.

* **Capacity schedule** (`CapacitySchedule`): which effective capacities a training step runs.
  `fixed`: one capacity (1.0 is the dense baseline).  `single`: one capacity per step drawn from the grid,
  1.0 with probability `full_rate` (the paper's adaptive model, docs/model.md section 5).  `sandwich`: every
  step runs 1.0 first, then `lower` capacities from the grid (the grid's smallest always among them with
  `with_min`), as slimmable networks train their widths (Yu et al. 2019, "sandwich rule").
* **In-place distillation** (Yu and Huang 2019, US-Nets; MatFormer trains nested widths jointly): in a
  sandwich step the full-capacity forward's predictions, detached, teach the lower-capacity forwards of the
  same step, beside the labels: loss_c = (1 - w) * CE(logits_c, targets) + w * T^2 * KL(p_1.0^T || p_c^T).
* **EMA** of the weights (Polyak averaging): evaluated and saved beside the trained weights; the decay
  ramps up as min(decay, (1 + step) / (10 + step)) so that early averages do not hold the initialisation.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mone.model.config import MoNEConfig
from mone.model.flops import gflops

ADAPTIVE_GRID = (0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95)
SCHEDULES = ("fixed", "single", "sandwich")


@dataclass(frozen=True)
class CapacitySchedule:
    """Which capacities one training step runs (see the module docstring).

    Args:
        kind: "fixed", "single" or "sandwich".
        capacity: the capacity of `fixed`.
        grid: capacities that `single` and `sandwich` draw from.
        full_rate: `single`: probability of 1.0 instead of a grid value.
        lower: `sandwich`: lower capacities per step, drawn without replacement from the grid.
        with_min: `sandwich`: the grid's smallest capacity is always one of them.
    """

    kind: str = "single"
    capacity: float = 1.0
    grid: tuple[float, ...] = ADAPTIVE_GRID
    full_rate: float = 0.1
    lower: int = 2
    with_min: bool = False

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"capacity schedule must be one of {SCHEDULES}, got {self.kind!r}")
        if self.kind != "fixed" and not self.grid:
            raise ValueError("the capacity grid is empty")
        if not 0.0 <= self.full_rate <= 1.0:
            raise ValueError(f"full_rate must be in [0, 1], got {self.full_rate}")
        if self.kind == "sandwich" and not 1 <= self.lower <= len(self.grid):
            raise ValueError(f"sandwich needs 1 <= lower <= {len(self.grid)} (the grid), got {self.lower}")

    def capacities(self, gen: torch.Generator) -> list[float]:
        """The capacities of one step; for `sandwich` the first is 1.0 (the teacher)."""
        if self.kind == "fixed":
            return [self.capacity]
        if self.kind == "single":
            if float(torch.rand((), generator=gen)) < self.full_rate:
                return [1.0]
            return [self.grid[int(torch.randint(len(self.grid), (), generator=gen))]]
        pool = list(self.grid)
        picked: list[float] = []
        if self.with_min:
            picked.append(min(pool))
            pool.remove(min(pool))
        order = torch.randperm(len(pool), generator=gen).tolist()
        picked += [pool[i] for i in order[: self.lower - len(picked)]]
        return [1.0, *sorted(picked, reverse=True)]

    def mean_gflops(self, cfg: MoNEConfig, frames: int = 1, draws: int = 2000) -> float:
        """Expected forward GFLOPs of one item in one step (all of the step's capacities), by sampling."""
        gen = torch.Generator().manual_seed(0)
        total = 0.0
        for _ in range(draws if self.kind != "fixed" else 1):
            total += sum(gflops(cfg, c, frames) for c in self.capacities(gen))
        return total / (draws if self.kind != "fixed" else 1)


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy of (B, K) logits against (B, K) target distributions."""
    return -(targets * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


def distill_loss(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), mean over the batch; the teacher is detached.

    Zero when the student's logits equal the teacher's; its gradient flows into the student only.
    """
    t = temperature
    p = F.softmax(teacher.detach().float() / t, dim=-1)
    log_q = F.log_softmax(student.float() / t, dim=-1)
    return F.kl_div(log_q, p, reduction="batchmean") * (t * t)


def capacity_loss(
    logits: Tensor, targets: Tensor, teacher: Tensor | None, weight: float, temperature: float
) -> Tensor:
    """The loss of one capacity's forward: labels, plus the teacher's soft predictions when there is one."""
    ce = soft_cross_entropy(logits, targets)
    if teacher is None or weight <= 0.0:
        return ce
    return (1.0 - weight) * ce + weight * distill_loss(logits, teacher, temperature)


class EMA:
    """Exponential moving average of a model's floating-point parameters and buffers.

    Args:
        model: the model being trained (copied once; the copy holds the average).
        decay: the average's decay per update (e.g. 0.999).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def rate(self, step: int) -> float:
        """The decay used at update `step` (0-based): ramps up to `decay`."""
        return min(self.decay, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = self.rate(step)
        avg = self.model.state_dict()
        for name, value in model.state_dict().items():
            if value.dtype.is_floating_point:
                avg[name].lerp_(value.detach(), 1.0 - d)
            else:
                avg[name].copy_(value)

    def state_dict(self) -> dict[str, Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.model.load_state_dict(state)
