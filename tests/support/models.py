"""Small random models, checkpoints of them and server settings that start quickly.

The default initialisation zeros the classifier head (every class would tie) and alpha, so the builders
here draw a non-zero head; `make_net` also sets alpha and spreads the router, so that logits depend on
everything.  Each builder seeds torch first: the same arguments give the same weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mone.model import MoNE, MoNEConfig, save_checkpoint
from mone.server.config import Settings

LABELS = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]


def make_model(
    variant: str = "Mi/4",
    seed: int = 0,
    *,
    alpha: float | None = None,
    router_std: float | None = None,
    **overrides: object,
) -> MoNE:
    """A random model in eval mode (10 classes unless `overrides` say otherwise) with a non-zero head;
    `alpha` sets the MLP scale and `router_std` redraws the router's weights when given."""
    torch.manual_seed(seed)
    overrides.setdefault("num_classes", 10)
    net = MoNE(MoNEConfig.from_variant(variant, **overrides))  # type: ignore[arg-type]
    with torch.no_grad():
        torch.nn.init.normal_(net.head.weight, std=0.5)
        if alpha is not None:
            net.alpha.fill_(alpha)
        if router_std is not None:
            net.router.proj.weight.normal_(std=router_std)
    return net.eval()


def make_net(variant: str = "Mi/4", alpha: float = 0.3, seed: int = 0, **overrides: object) -> MoNE:
    """A random model whose head and alpha are non-zero, so that logits depend on everything.

    Its router is spread wider than the init: router probabilities (and the MLP scale) differ per token.
    """
    return make_model(variant, seed, alpha=alpha, router_std=0.5, **overrides)


def make_checkpoint(path: Path, gflops: list[float] | None = None) -> Path:
    """`make_model()` saved to the directory `path` with `LABELS` and an evaluation profile of accuracy per
    capacity (0.25, 0.5, 1.0), and of `gflops` per capacity when given; returns `path`."""
    profile: dict[str, list[float]] = {"capacities": [0.25, 0.5, 1.0]}
    if gflops is not None:
        profile["gflops"] = gflops
    profile["accuracy"] = [0.7, 0.8, 0.9]
    return save_checkpoint(path, make_model(), labels=LABELS, profile=profile, meta={"test": True})


def fast_settings(checkpoint: Path, **overrides: Any) -> Settings:
    """Settings for `checkpoint` that start fast: a small calibration grid, one warm-up, one thread."""
    values: dict[str, Any] = {
        "checkpoint": checkpoint,
        "calibration_batch_sizes": [1, 4],
        "calibration_capacities": [0.125, 1.0],
        "calibration_repeats": 1,
        "warmup_iters": 1,
        "max_batch_size": 8,
        "max_batch_wait_ms": 2.0,
        "threads": 1,
        "decode_workers": 1,
        "compiled_plans": False,  # tests/server/test_compiled.py compiles; elsewhere it only adds load
    }
    values.update(overrides)
    return Settings(**values)
