"""MoNE: Mixture of Nested Experts vision transformers (images and clips).

The names below are imported on first use (PEP 562), so that importing a torch-free module of the package,
such as `mone.model.preprocess` in the server's clip decode worker processes, does not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mone.model.capacity import capacity_distribution, expert_counts, realised_capacity
    from mone.model.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
    from mone.model.config import VARIANTS, MoNEConfig
    from mone.model.flops import gflops, sample_gflops
    from mone.model.vit import MoNE, MoNEOutput

_EXPORTS = {
    "VARIANTS": "mone.model.config",
    "Checkpoint": "mone.model.checkpoint",
    "CheckpointError": "mone.model.checkpoint",
    "MoNE": "mone.model.vit",
    "MoNEConfig": "mone.model.config",
    "MoNEOutput": "mone.model.vit",
    "capacity_distribution": "mone.model.capacity",
    "expert_counts": "mone.model.capacity",
    "gflops": "mone.model.flops",
    "load_checkpoint": "mone.model.checkpoint",
    "realised_capacity": "mone.model.capacity",
    "sample_gflops": "mone.model.flops",
    "save_checkpoint": "mone.model.checkpoint",
}
__all__ = [
    "VARIANTS",
    "Checkpoint",
    "CheckpointError",
    "MoNE",
    "MoNEConfig",
    "MoNEOutput",
    "capacity_distribution",
    "expert_counts",
    "gflops",
    "load_checkpoint",
    "realised_capacity",
    "sample_gflops",
    "save_checkpoint",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
