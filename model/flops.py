"""Analytic FLOPs of a MoNE forward pass, and a FLOP counter that also sees CPU attention.

Counts matrix products only (patch embedding, router, projections, attention scores and values, temporal
transformer, head), with a multiply-add as 2 FLOPs: the convention of `torch.utils.flop_counter`.  Norms,
GELU, softmax and adds are linear in the token count and left out, as every ViT FLOPs table does.

Per frame and spatial layer (docs/model.md section 3.2): sum_j k_j * 2 * d_j * (3D + D + 2 * mlp_ratio * D)
for the sliced projections, plus 4 * N^2 * D for attention, which always runs at full width.  The temporal
layers of a one-frame input (an image) compute only V and the out-projection, as inference runs them.

The analytic functions need no torch (the server's command line sizes its worker processes with them before
anything loads torch); only `count_flops` imports it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from mone.model.capacity import expert_counts
from mone.model.config import MoNEConfig


def spatial_frame_flops(cfg: MoNEConfig, counts: Sequence[int]) -> int:
    D, N, E = cfg.dim, cfg.num_tokens, cfg.num_experts
    hidden = cfg.mlp_ratio * D
    flops = 2 * N * D * cfg.in_chans * cfg.patch_size**2  # patch embedding
    flops += 2 * N * D * E  # router
    per_layer = sum(
        2 * k * d * (3 * D + D + 2 * hidden) for k, d in zip(counts, cfg.expert_dims, strict=True)
    )
    per_layer += 4 * N * N * D  # Q K^T and A V at full width
    return flops + cfg.depth * per_layer


def clip_tail_flops(cfg: MoNEConfig, frames: int) -> int:
    D = cfg.dim
    hidden = cfg.mlp_ratio * D
    if frames == 1:  # attention over a single key returns its value: only V and the out-projection run
        per_layer = 2 * D * (2 * D + 2 * hidden)
    else:
        per_layer = 2 * frames * D * (4 * D + 2 * hidden) + 4 * frames * frames * D
    return cfg.temporal_depth * per_layer + 2 * D * cfg.num_classes


def sample_gflops(cfg: MoNEConfig, counts: Sequence[int], frames: int = 1) -> float:
    """GFLOPs of one sample of `frames` frames whose frames are split over experts as `counts`."""
    return (frames * spatial_frame_flops(cfg, counts) + clip_tail_flops(cfg, frames)) / 1e9


def gflops(cfg: MoNEConfig, capacity: float, frames: int = 1) -> float:
    """GFLOPs of one image (frames=1) or clip at effective capacity `capacity`."""
    return sample_gflops(cfg, expert_counts(capacity, cfg.num_tokens, cfg.num_experts), frames)


def _cpu_sdpa_flops(
    query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any
) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return int(sdpa_flop_count(query, key, value))  # type: ignore[no-untyped-call]


def _packed_linear_flops(x_shape: Any, w_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    rows = 1
    for n in x_shape[:-1]:
        rows *= int(n)
    return 2 * rows * int(w_shape[0]) * int(w_shape[1])  # the packed weight keeps its (out, in) shape


def _addmm_flops(
    self_shape: Any, a_shape: Any, b_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any
) -> int:
    return 2 * int(a_shape[0]) * int(a_shape[1]) * int(b_shape[1])


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs that `torch.utils.flop_counter` measures while running fn().

    The stock counter has no formula for the CPU flash-attention kernel, for in-place `addmm_` nor for
    oneDNN's packed linear (`model/inference.py`) and would count them as 0; we register the formulas it
    uses for the CUDA attention kernels and for `addmm`, and the product's for the packed linear.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    mapping: dict[Any, Any] = {
        aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
        aten.addmm_: _addmm_flops,
    }
    if hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        mapping[torch.ops.mkldnn._linear_pointwise] = _packed_linear_flops
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return int(counter.get_total_flops())
