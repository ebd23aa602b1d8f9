"""The inference dtype: fp32 (the default), or the model's weights and activations in bf16 / fp16.

Low precision is applied by casting, not by autocast: the per-expert path of the forward accumulates each
expert's out-projection in place into the fp32 residual stream (`forward_grouped_` in model/inference.py), and
autocast would hand those in-place products bf16 operands beside fp32 ones, which they refuse.  Cast, every
tensor of the forward has one dtype: the weights are cast once when the runner takes the model, every
floating-point input is cast as it enters the model (a forward pre-hook, so that start-up's own measurements
on random inputs go through it too), and the logits come back as fp32.  It also halves the weights' memory.

bf16 runs on the CPU and on CUDA; fp16 only on CUDA (the CPU has no fast fp16 matrix products).  The
routing decisions (Expert Preferred Routing's top-k) are taken on probabilities of the same precision, so a
token whose scores nearly tie may go to another expert than in fp32: `LOGIT_TOLERANCE` bounds the logits'
error with the same routing, `ROUTED_TOLERANCE` with a token routed apart.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

import torch
from torch import Tensor, nn

DtypeName = Literal["fp32", "bf16", "fp16"]
M = TypeVar("M", bound=nn.Module)
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Largest |logit - fp32 logit| of a sample, relative to its largest |fp32 logit|, where every token goes to
# the expert it goes to in fp32 (capacity 1.0 always): 16 units in the last place of the dtype.  Measured on
# the CPU in bf16 at capacity 1.0: at most 1.3 units on the shipped checkpoint (16 pictures), 9 on a random
# 12-layer model, whose logits are small beside its features.
LOGIT_TOLERANCE: dict[torch.dtype, float] = {
    torch.float32: 0.0,
    torch.bfloat16: 16 * 2.0**-8,
    torch.float16: 16 * 2.0**-11,
}
# The same where routing may differ: below capacity 1.0 a token whose router scores nearly tie can go to
# another expert than in fp32, and its sample moves by more; 32 units.  Measured in bf16 at capacities 0.5
# and 0.25: most samples within LOGIT_TOLERANCE, the largest at 27 units (10.5 %).
ROUTED_TOLERANCE: dict[torch.dtype, float] = {d: 2 * t for d, t in LOGIT_TOLERANCE.items()}


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, d in DTYPES.items() if d == dtype)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The torch dtype of `name` on `device`; ValueError where that device cannot run it."""
    if name not in DTYPES:
        raise ValueError(f"inference dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    dtype = DTYPES[name]
    if dtype == torch.float16 and device.type != "cuda":
        raise ValueError(f"fp16 inference needs a CUDA device, not {device}; use bf16 or fp32")
    return dtype


def _cast_inputs(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    dtype = getattr(module, "_mone_input_dtype", None)
    x = args[0] if args else None
    if dtype is not None and isinstance(x, Tensor) and x.is_floating_point() and x.dtype != dtype:
        return (x.to(dtype), *args[1:]), kwargs
    return None


def cast_model(model: M, dtype: torch.dtype) -> M:
    """Cast `model`'s parameters and buffers to `dtype` in place, and its floating-point input on every call
    from then on; fp32 on an fp32 model leaves it untouched."""
    if dtype == torch.float32 and getattr(model, "_mone_input_dtype", None) is None:
        return model
    model.to(dtype)
    if getattr(model, "_mone_input_dtype", None) is None:
        model.register_forward_pre_hook(_cast_inputs, with_kwargs=True)
    model._mone_input_dtype = dtype  # type: ignore[assignment]
    return model


def model_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype
