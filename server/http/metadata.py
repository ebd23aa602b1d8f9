"""Model metadata: config, labels, input spec and the capacity -> GFLOPs -> latency (-> accuracy) profile.

Built from the engine's public description (`Engine.describe`, `Engine.profile`), never from its internals.
"""

from __future__ import annotations

from typing import Any

from mone.server.core.budget_kinds import BUDGET_KINDS
from mone.server.core.engine import Engine, KindCost
from mone.server.http.schemas import KindCost as KindCostSchema
from mone.server.http.schemas import ModelInfo, ProfileRow
from mone.server.media.kinds import INPUT_KINDS

PROFILE_CAPACITIES = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)  # and the model's lowest capacity


def _accuracy_at(evaluation: dict[str, Any] | None, capacity: float, key: str) -> float | None:
    if not evaluation or key not in evaluation:
        return None
    for c, a in zip(evaluation.get("capacities", []), evaluation.get(key, []), strict=False):
        if abs(float(c) - capacity) < 1e-6 and a is not None:
            return float(a)
    return None


def _cost(cost: KindCost) -> KindCostSchema:
    return KindCostSchema(
        gflops=cost.gflops,
        latency_ms_batch1=cost.latency_ms_batch1,
        latency_ms_max_batch=cost.latency_ms_max_batch,
    )


def profile(engine: Engine, evaluation: dict[str, Any] | None) -> list[ProfileRow]:
    """One row per capacity: token split, GFLOPs and predicted batch latency per input kind, accuracy."""
    lo = engine.cfg.min_capacity
    capacities = {c for c in PROFILE_CAPACITIES if c >= lo} | {lo}
    if evaluation:
        capacities |= {float(c) for c in evaluation.get("capacities", []) if lo <= float(c) <= 1.0}
    return [
        ProfileRow(
            capacity=p.capacity,
            realised_capacity=p.realised,
            capacity_distribution=list(p.distribution),
            expert_counts=list(p.counts),
            **{name: _cost(p.costs[name]) for name in INPUT_KINDS},  # one field per input kind
            accuracy=_accuracy_at(evaluation, p.capacity, "accuracy"),
            clip_accuracy=_accuracy_at(evaluation, p.capacity, "clip_accuracy"),
        )
        for p in engine.profile(sorted(capacities))
    ]


def model_metadata(engine: Engine, name: str) -> ModelInfo:
    d = engine.describe()
    cfg = d.cfg
    return ModelInfo(
        name=name,
        variant=cfg.variant,
        device=d.device,
        ready=d.ready,
        labels=d.labels,
        config=cfg.to_dict(),
        input={
            **{kind.name: kind.describe(cfg) for kind in INPUT_KINDS.values()},
            "kinds": list(INPUT_KINDS),
            "tensor_shape": [-1, cfg.in_chans, cfg.img_size, cfg.img_size],
        },
        budgets={
            "default_capacity": d.default_capacity,
            "min_capacity": cfg.min_capacity,
            "floor_gflops": d.floor_gflops,
            "dense_gflops": d.dense_gflops,
            "kinds": [kind.describe() for kind in BUDGET_KINDS.values()],
        },
        profile=profile(engine, d.evaluation),
        latency_model=d.latency_model,
        evaluation=d.evaluation,
        batching=d.batching,
        checkpoint=d.checkpoint,
    )
