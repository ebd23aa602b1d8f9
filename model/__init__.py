"""MoNE: Mixture of Nested Experts vision transformers (images and clips)."""

from mone.model.capacity import capacity_distribution, expert_counts, realised_capacity
from mone.model.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from mone.model.config import VARIANTS, MoNEConfig
from mone.model.flops import gflops, sample_gflops
from mone.model.vit import MoNE, MoNEOutput

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
