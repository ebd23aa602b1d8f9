"""Start MoNE from a timm ViT: map an average-pool, class-token-free timm `VisionTransformer` onto MoNE.

MoNE adds no parameters to a ViT beyond the router (and alpha), so a pretrained ViT is a MoNE whose router is
untrained: at capacity 1.0 it reproduces the ViT exactly, and nested fine-tuning (mone-train --init-from)
teaches the smaller experts and the router; `mone-train --from-timm FILE` does both from the command line
(`read_timm_weights` reads the file).  Supported timm layout: `global_pool='avg'`,
`class_token=False`, no register tokens, no layer scale, no q/k norm, `fc_norm` after pooling.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mone.model.config import MoNEConfig
from mone.model.vit import MoNE

_BLOCK_KEYS = (
    "norm1.weight",
    "norm1.bias",
    "attn.qkv.weight",
    "attn.qkv.bias",
    "attn.proj.weight",
    "attn.proj.bias",
    "norm2.weight",
    "norm2.bias",
    "mlp.fc1.weight",
    "mlp.fc1.bias",
    "mlp.fc2.weight",
    "mlp.fc2.bias",
)
_UNSUPPORTED = ("cls_token", "reg_token", ".ls1.", ".ls2.", "q_norm", "k_norm", "attn_pool", "norm.weight")


def config_from_timm_state_dict(state: Mapping[str, Tensor], heads: int, **overrides: Any) -> MoNEConfig:
    """Infer the MoNE config (width, depth, patch, channels, image size, classes) from timm weights."""
    try:
        proj = state["patch_embed.proj.weight"]  # (D, C, p, p)
        pos = state["pos_embed"]  # (1, N, D)
        head = state["head.weight"]  # (classes, D)
    except KeyError as exc:
        raise ValueError(f"not a timm ViT state dict: {exc.args[0]!r} is missing") from exc
    D, C, p, _ = proj.shape
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    grid = int(round(pos.shape[1] ** 0.5))
    if grid * grid != pos.shape[1]:
        raise ValueError(
            f"pos_embed has {pos.shape[1]} positions: a class token or register tokens are not supported"
        )
    mlp_ratio = state["blocks.0.mlp.fc1.weight"].shape[0] // D
    values: dict[str, Any] = {
        "img_size": grid * p,
        "patch_size": p,
        "in_chans": C,
        "num_classes": head.shape[0],
        "dim": D,
        "depth": depth,
        "heads": heads,
        "mlp_ratio": mlp_ratio,
        "temporal_depth": 0,
        "variant": f"timm-{D}x{depth}/{p}",
    }
    if C != 3:
        values["mean"], values["std"] = (0.5,) * C, (0.5,) * C
    values.update(overrides)
    return MoNEConfig(**values)


def mone_state_dict_from_timm(state: Mapping[str, Tensor], cfg: MoNEConfig) -> dict[str, Tensor]:
    """Rename timm keys to MoNE's; raise ValueError naming what does not fit."""
    bad = sorted(k for k in state if any(u in k for u in _UNSUPPORTED) and not k.startswith("fc_norm"))
    if bad:
        raise ValueError(
            f"unsupported timm ViT features (need global_pool='avg', class_token=False): {bad[:4]}"
        )
    out: dict[str, Tensor] = {
        "patch_embed.weight": state["patch_embed.proj.weight"],
        "patch_embed.bias": state["patch_embed.proj.bias"],
        "pos_embed": state["pos_embed"],
        "head.weight": state["head.weight"],
        "head.bias": state["head.bias"],
    }
    for name in ("fc_norm.weight", "fc_norm.bias"):
        if name not in state:
            raise ValueError(
                f"{name} is missing: export the timm model with global_pool='avg' (fc_norm after pooling)"
            )
        out[name] = state[name]
    for i in range(cfg.depth):
        for key in _BLOCK_KEYS:
            out[f"blocks.{i}.{key}"] = state[f"blocks.{i}.{key}"]
    return out


def read_timm_weights(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """A timm state dict from a file: safetensors, or a torch file (.pt/.pth/.bin) read with
    weights_only=True; a torch file may wrap the weights as {"state_dict": ...}, {"model": ...} or
    {"state_dict_ema": ...}, and a "module." prefix (DDP) is dropped."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p}: no such file")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        raw: Any = load_file(str(p))
    else:
        try:
            raw = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:  # a pickle with objects, or not a torch file at all
            raise ValueError(f"{p}: not a torch state dict readable with weights_only=True ({exc})") from exc
        for key in ("state_dict", "model", "state_dict_ema"):
            if isinstance(raw, dict) and isinstance(raw.get(key), dict):
                raw = raw[key]
                break
    if not isinstance(raw, dict) or not all(isinstance(v, Tensor) for v in raw.values()):
        raise ValueError(f"{p}: expected a mapping of parameter names to tensors")
    return {k.removeprefix("module."): v for k, v in raw.items()}


def from_timm_state_dict(
    state: Mapping[str, Tensor], heads: int, seed: int = 0, num_classes: int | None = None, **overrides: Any
) -> MoNE:
    """A MoNE holding the timm weights, with a freshly initialised router (seeded) and alpha = 0.

    With `num_classes` other than the checkpoint's, the classifier is new (zero-initialised, as for
    fine-tuning) and everything else comes from the checkpoint.
    """
    new_head = num_classes is not None and num_classes != int(state["head.weight"].shape[0])
    if new_head:
        overrides["num_classes"] = num_classes
    cfg = config_from_timm_state_dict(state, heads, **overrides)
    torch.manual_seed(seed)
    net = MoNE(cfg)
    mapped = mone_state_dict_from_timm(state, cfg)
    allowed_missing = {"router.proj.weight", "router.proj.bias", "alpha"}
    if new_head:
        mapped = {k: v for k, v in mapped.items() if not k.startswith("head.")}
        allowed_missing |= {"head.weight", "head.bias"}
    if cfg.temporal_depth:
        allowed_missing |= {k for k in net.state_dict() if k.startswith(("temporal_", "temporal_blocks."))}
    missing, unexpected = net.load_state_dict(mapped, strict=False)
    if set(missing) - allowed_missing or unexpected:
        raise ValueError(
            f"timm weights do not fit: missing {sorted(set(missing) - allowed_missing)}, "
            f"unexpected {unexpected}"
        )
    return net.eval()


def from_timm(model: torch.nn.Module, seed: int = 0) -> MoNE:
    """Convert a live timm `VisionTransformer` (reads its head count and normalisation from the model)."""
    heads = int(model.blocks[0].attn.num_heads)  # type: ignore[index, union-attr]
    overrides: dict[str, Any] = {}
    data_cfg = getattr(model, "pretrained_cfg", None) or {}
    if "mean" in data_cfg and "std" in data_cfg:
        overrides["mean"], overrides["std"] = tuple(data_cfg["mean"]), tuple(data_cfg["std"])
    return from_timm_state_dict(model.state_dict(), heads, seed=seed, **overrides)
