"""Capacity schedules, in-place distillation and the weight EMA (model/recipe.py)."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mone.model import MoNEConfig, gflops
from mone.model.recipe import (
    ADAPTIVE_GRID,
    EMA,
    CapacitySchedule,
    capacity_loss,
    distill_loss,
    soft_cross_entropy,
)


def draws(schedule: CapacitySchedule, n: int, seed: int = 0) -> list[list[float]]:
    gen = torch.Generator().manual_seed(seed)
    return [schedule.capacities(gen) for _ in range(n)]


# -- schedules ---------------------------------------------------------------------------------------------
def test_fixed_schedule_is_one_capacity() -> None:
    assert draws(CapacitySchedule("fixed", capacity=0.5), 5) == [[0.5]] * 5


def test_single_schedule_trains_full_capacity_at_its_rate() -> None:
    steps = draws(CapacitySchedule("single", full_rate=0.25), 4000)
    assert all(len(s) == 1 for s in steps)
    counts = Counter(s[0] for s in steps)
    assert set(counts) <= {1.0, *ADAPTIVE_GRID}
    assert counts[1.0] / 4000 == pytest.approx(0.25, abs=0.03)
    assert set(counts) == {1.0, *ADAPTIVE_GRID}  # every grid value is drawn


def test_sandwich_runs_full_capacity_first_then_distinct_lower_ones() -> None:
    schedule = CapacitySchedule("sandwich", grid=(0.2, 0.4, 0.6, 0.8), lower=2, with_min=True)
    steps = draws(schedule, 300)
    for s in steps:
        assert s[0] == 1.0
        assert len(s) == 3
        assert 0.2 in s[1:]  # with_min: the grid's smallest every step
        assert len(set(s[1:])) == 2
        assert set(s[1:]) <= {0.2, 0.4, 0.6, 0.8}
    others = Counter(c for s in steps for c in s[1:] if c != 0.2)
    assert set(others) == {0.4, 0.6, 0.8}
    plain = draws(CapacitySchedule("sandwich", grid=(0.2, 0.4, 0.6, 0.8), lower=1), 200)
    assert Counter(s[1] for s in plain)[0.2] < 100  # without with_min the smallest is one of four


def test_schedules_are_reproducible_from_the_generator() -> None:
    schedule = CapacitySchedule("sandwich", lower=3)
    assert draws(schedule, 50, seed=7) == draws(schedule, 50, seed=7)
    assert draws(schedule, 50, seed=7) != draws(schedule, 50, seed=8)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"kind": "random"}, "random"),
        ({"kind": "sandwich", "lower": 10}, "lower"),
        ({"full_rate": 2.0}, "2.0"),
    ],
)
def test_bad_schedules_raise(kwargs: dict[str, object], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        CapacitySchedule(**kwargs)  # type: ignore[arg-type]


def test_mean_gflops_counts_every_capacity_of_a_step() -> None:
    cfg = MoNEConfig.from_variant("Mi/4", num_classes=10)
    assert CapacitySchedule("fixed").mean_gflops(cfg) == pytest.approx(gflops(cfg, 1.0))
    grid = (0.25, 0.5)
    both = CapacitySchedule("sandwich", grid=grid, lower=2).mean_gflops(cfg)
    assert both == pytest.approx(gflops(cfg, 1.0) + gflops(cfg, 0.25) + gflops(cfg, 0.5))
    single = CapacitySchedule("single", grid=grid, full_rate=0.0).mean_gflops(cfg, frames=8)
    expected = (gflops(cfg, 0.25, 8) + gflops(cfg, 0.5, 8)) / 2
    assert single == pytest.approx(expected, rel=0.05)


# -- losses ------------------------------------------------------------------------------------------------
def test_distill_loss_is_zero_at_the_teacher_and_positive_elsewhere() -> None:
    torch.manual_seed(0)
    teacher = torch.randn(6, 10)
    assert distill_loss(teacher.clone(), teacher).item() == pytest.approx(0.0, abs=1e-6)
    assert distill_loss(torch.randn(6, 10), teacher).item() > 0.01


def test_distill_loss_matches_kl_and_scales_by_temperature_squared() -> None:
    torch.manual_seed(1)
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    p, q = F.softmax(t, -1), F.softmax(s, -1)
    kl = (p * (p.log() - q.log())).sum(-1).mean()
    assert distill_loss(s, t).item() == pytest.approx(kl.item(), rel=1e-5)
    T = 3.0
    pT, qT = F.softmax(t / T, -1), F.softmax(s / T, -1)
    klT = (pT * (pT.log() - qT.log())).sum(-1).mean() * T * T
    assert distill_loss(s, t, T).item() == pytest.approx(klT.item(), rel=1e-5)


def test_distillation_gradient_reaches_the_student_only() -> None:
    student = torch.randn(3, 4, requires_grad=True)
    teacher = torch.randn(3, 4, requires_grad=True)
    distill_loss(student, teacher).backward()  # type: ignore[no-untyped-call]
    assert student.grad is not None
    assert student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_capacity_loss_mixes_labels_and_teacher() -> None:
    torch.manual_seed(2)
    logits, teacher = torch.randn(5, 3), torch.randn(5, 3)
    targets = F.one_hot(torch.tensor([0, 1, 2, 0, 1]), 3).float()
    ce = soft_cross_entropy(logits, targets)
    assert ce.item() == pytest.approx(F.cross_entropy(logits, targets.argmax(-1)).item(), rel=1e-6)
    assert capacity_loss(logits, targets, None, 0.5, 1.0).item() == pytest.approx(ce.item())
    assert capacity_loss(logits, targets, teacher, 0.0, 1.0).item() == pytest.approx(ce.item())
    mixed = capacity_loss(logits, targets, teacher, 0.25, 2.0).item()
    assert mixed == pytest.approx(
        0.75 * ce.item() + 0.25 * distill_loss(logits, teacher, 2.0).item(), rel=1e-6
    )


# -- EMA ---------------------------------------------------------------------------------------------------
def test_ema_averages_weights_with_a_warm_up() -> None:
    net = nn.Linear(3, 2)
    with torch.no_grad():
        net.weight.fill_(0.0)
    ema = EMA(net, decay=0.9)
    assert ema.rate(0) == pytest.approx(0.1)  # (1 + 0) / (10 + 0): the start is forgotten fast
    assert ema.rate(10_000) == 0.9
    with torch.no_grad():
        net.weight.fill_(1.0)
    ema.update(net, step=0)
    assert ema.model.weight.mean().item() == pytest.approx(0.9)  # 0.1 * 0 + 0.9 * 1
    avg = ema.model.weight.mean().item()
    for step in range(1000, 1010):
        ema.update(net, step)
        nxt = ema.model.weight.mean().item()
        assert nxt == pytest.approx(0.9 * avg + 0.1 * 1.0)
        avg = nxt
    assert not any(p.requires_grad for p in ema.model.parameters())
    assert net.weight.requires_grad  # the trained model is untouched


def test_ema_copies_integer_buffers_and_round_trips() -> None:
    net = nn.BatchNorm1d(4)
    ema = EMA(net, decay=0.99)
    net.num_batches_tracked.fill_(7)
    ema.update(net, step=100)
    assert int(ema.model.num_batches_tracked) == 7
    other = EMA(net, decay=0.99)
    other.load_state_dict(ema.state_dict())
    for k, v in ema.state_dict().items():
        assert torch.equal(v, other.state_dict()[k])
    with pytest.raises(ValueError, match="1.5"):
        EMA(net, decay=1.5)
    assert math.isfinite(ema.model.running_mean.sum().item())
