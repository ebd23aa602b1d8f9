"""Model metadata: config, labels, input spec and the capacity -> GFLOPs -> latency (-> accuracy) profile."""

from __future__ import annotations

from typing import Any

from mone.server.core.budget_kinds import BUDGET_KINDS
from mone.server.core.engine import Engine
from mone.server.http.schemas import KindCost, ModelInfo, ProfileRow

PROFILE_CAPACITIES = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)  # and the model's lowest capacity


def _accuracy_at(evaluation: dict[str, Any] | None, capacity: float, key: str) -> float | None:
    if not evaluation or key not in evaluation:
        return None
    for c, a in zip(evaluation.get("capacities", []), evaluation.get(key, []), strict=False):
        if abs(float(c) - capacity) < 1e-6 and a is not None:
            return float(a)
    return None


def profile(engine: Engine) -> list[ProfileRow]:
    """One row per capacity: token split, GFLOPs and predicted batch latency per input kind, accuracy."""
    evaluation = engine.runner.checkpoint.profile
    lo = engine.cfg.min_capacity
    capacities = {c for c in PROFILE_CAPACITIES if c >= lo} | {lo}
    if evaluation:
        capacities |= {float(c) for c in evaluation.get("capacities", []) if lo <= float(c) <= 1.0}
    b = engine.settings.max_batch_size
    rows = []
    for c in sorted(capacities):
        costs = {}
        for kind, frames in engine.kinds.items():
            level = engine.planner.level_of(c, frames)
            costs[kind] = KindCost(
                gflops=level.gflops,
                latency_ms_batch1=engine.latency.predict(frames, 1, level.gflops) * 1e3,
                latency_ms_max_batch=engine.latency.predict(frames, 1, b * level.gflops) * 1e3,
            )
        rows.append(
            ProfileRow(
                capacity=c,
                realised_capacity=level.realised,
                capacity_distribution=list(engine.planner.distribution(c)),
                expert_counts=list(level.counts),
                image=costs["image"],
                clip=costs["clip"],
                accuracy=_accuracy_at(evaluation, c, "accuracy"),
                clip_accuracy=_accuracy_at(evaluation, c, "clip_accuracy"),
            )
        )
    return rows


def model_metadata(engine: Engine, name: str) -> ModelInfo:
    cfg, s = engine.cfg, engine.settings
    return ModelInfo(
        name=name,
        variant=cfg.variant,
        device=str(engine.runner.device),
        ready=engine.ready,
        labels=engine.runner.checkpoint.labels,
        config=cfg.to_dict(),
        input={
            "image": {
                "formats": ["image/jpeg", "image/png", "image/webp", "image/gif"],
                "channels": cfg.in_chans,
                "size": [cfg.img_size, cfg.img_size],
                "mean": list(cfg.mean),
                "std": list(cfg.std),
            },
            "clip": {"formats": ["video/mp4", "video/webm", "image/gif"], "frames": cfg.num_frames},
            "tensor_shape": [-1, cfg.in_chans, cfg.img_size, cfg.img_size],
        },
        budgets={
            "default_capacity": s.default_capacity,
            "min_capacity": cfg.min_capacity,
            "floor_gflops": {k: engine.planner.floor(f).gflops for k, f in engine.kinds.items()},
            "dense_gflops": {k: engine.planner.dense_gflops(f) for k, f in engine.kinds.items()},
            "kinds": [kind.describe() for kind in BUDGET_KINDS.values()],
        },
        profile=profile(engine),
        latency_model=engine.latency.to_dict(),
        evaluation=engine.runner.checkpoint.profile,
        batching={
            "max_batch_size": s.max_batch_size,
            "max_batch_wait_ms": s.max_batch_wait_ms,
            "max_queue_size": s.max_queue_size,
            "overload_policy": s.overload_policy,
        },
        checkpoint=engine.runner.describe(),
    )
