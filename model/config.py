"""MoNE model configuration: one frozen dataclass and one table of named variants.

Variants are strings "<width>/<patch>" decoded from `VARIANTS` (big_vision style).  Widths, depths and heads
for Ti/S/B/L are those of the ViT paper (Dosovitskiy et al. 2021, Table 1) and DeiT (Touvron et al. 2021)
for Ti.  "Mi" is our small variant for 28x28 single-channel inputs (Fashion-MNIST and its clips); "TiG" has
ViT-Ti's width, depth and heads on the same 28x28 grey inputs ("TiG/2": 196 tokens of 2x2 pixels, about
ViT-Ti/16's compute at 224 px; docs/model.md says why).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any

# name: (dim, depth, heads, defaults for the input)
VARIANTS: dict[str, dict[str, Any]] = {
    "Mi": {"dim": 128, "depth": 6, "heads": 4, "img_size": 28, "in_chans": 1, "temporal_depth": 1},
    "TiG": {"dim": 192, "depth": 12, "heads": 3, "img_size": 28, "in_chans": 1, "temporal_depth": 1},
    "Ti": {"dim": 192, "depth": 12, "heads": 3},
    "S": {"dim": 384, "depth": 12, "heads": 6},
    "B": {"dim": 768, "depth": 12, "heads": 12},
    "L": {"dim": 1024, "depth": 24, "heads": 16},
}

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class MoNEConfig:
    """Architecture of a MoNE ViT (images) / factorised-encoder ViViT (clips).

    Args:
        img_size: input height and width in pixels.
        patch_size: square patch size; tokens per frame N = (img_size // patch_size) ** 2.
        in_chans: input channels (3 for RGB, 1 for grey).
        num_classes: classifier outputs.
        dim: model width D.
        depth: spatial transformer layers (MoNE applies here).
        heads: attention heads (dim must divide).
        mlp_ratio: MLP hidden = mlp_ratio * dim, the same for every expert.
        num_experts: nested experts E; expert i has width dim / 2**(E-i).
        num_frames: maximum frames per clip (size of the temporal position table).
        temporal_depth: full-capacity temporal transformer layers over per-frame tokens
            (0: frames are averaged).
        mean, std: per-channel input normalisation, applied by the caller's preprocessing.
        variant: the variant string this config came from, for display.
    """

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    dim: int = 384
    depth: int = 12
    heads: int = 6
    mlp_ratio: int = 4
    num_experts: int = 4
    num_frames: int = 8
    temporal_depth: int = 0
    mean: tuple[float, ...] = _IMAGENET_MEAN
    std: tuple[float, ...] = _IMAGENET_STD
    variant: str = field(default="S/16")

    def __post_init__(self) -> None:
        positive = ("img_size", "patch_size", "in_chans", "num_classes", "dim", "depth", "heads", "mlp_ratio")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.num_frames, int) or self.num_frames < 1:
            raise ValueError(f"num_frames must be a positive integer, got {self.num_frames!r}")
        if not isinstance(self.temporal_depth, int) or self.temporal_depth < 0:
            raise ValueError(f"temporal_depth must be a non-negative integer, got {self.temporal_depth!r}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}")
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")
        if not isinstance(self.num_experts, int) or not 1 <= self.num_experts <= 8:
            raise ValueError(f"num_experts must be an integer in [1, 8], got {self.num_experts!r}")
        if self.dim % (2 ** (self.num_experts - 1)):
            raise ValueError(
                f"dim {self.dim} is not divisible by 2**(num_experts-1) = {2 ** (self.num_experts - 1)}"
            )
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise ValueError(
                f"mean/std need one value per input channel ({self.in_chans}), "
                f"got {self.mean!r} / {self.std!r}"
            )
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std!r}")

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """Tokens per frame, N."""
        return self.grid * self.grid

    @property
    def expert_dims(self) -> tuple[int, ...]:
        """Widths d_1 < ... < d_E of the nested experts (docs/model.md section 1.1)."""
        E = self.num_experts
        return tuple(self.dim // 2 ** (E - i) for i in range(1, E + 1))

    @property
    def min_capacity(self) -> float:
        """Smallest effective capacity: every token on the smallest expert (1/8 for E=4)."""
        return 1.0 / float(2 ** (self.num_experts - 1))

    @classmethod
    def from_variant(cls, variant: str, **overrides: Any) -> MoNEConfig:
        """Decode "S/16" (or "Mi/4", ...) from `VARIANTS`; keyword arguments override decoded values."""
        match = re.fullmatch(r"(?P<name>[A-Za-z]+)/(?P<patch>\d+)", variant)
        if match is None or match["name"] not in VARIANTS:
            known = ", ".join(f"{k}/<patch>" for k in VARIANTS)
            raise ValueError(f"unknown variant {variant!r}; expected one of {known}, e.g. 'S/16'")
        values: dict[str, Any] = dict(VARIANTS[match["name"]])
        values["patch_size"] = int(match["patch"])
        values["variant"] = variant
        if values.get("in_chans", 3) == 1:
            values.setdefault("mean", (0.5,))
            values.setdefault("std", (0.5,))
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown config field(s) {sorted(unknown)} for MoNEConfig")
        values.update(overrides)
        if "in_chans" in overrides and "mean" not in overrides:
            c = values["in_chans"]
            values["mean"] = (0.5,) * c if c != 3 else _IMAGENET_MEAN
            values["std"] = (0.5,) * c if c != 3 else _IMAGENET_STD
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MoNEConfig:
        if not isinstance(data, dict):
            raise ValueError(f"config must be a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown config field(s) {sorted(unknown)}")
        values = dict(data)
        for key in ("mean", "std"):
            if key in values:
                values[key] = tuple(float(v) for v in values[key])
        return cls(**values)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)
