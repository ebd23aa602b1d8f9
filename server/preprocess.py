"""Preprocessing shared by serving, training and evaluation (no web framework imported here).

A picture becomes model input in one way only: convert to the model's channels (Pillow "L" for one channel,
"RGB" for three), resize to img_size x img_size with Pillow's bilinear filter (a no-op when the size already
matches), scale to [0, 1] and normalise with the config's mean and std.  Fashion-MNIST pictures are white
objects on black; nothing is inverted.

Shape legend: T frames, C channels, H = W = img_size.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from model import MoNEConfig


def to_model_mode(img: Image.Image, in_chans: int) -> Image.Image:
    """Convert any Pillow mode to "L" (1 channel) or "RGB" (3), flattening transparency onto black."""
    if in_chans not in (1, 3):
        raise ValueError(f"only 1- or 3-channel models are supported, got in_chans={in_chans}")
    target = "L" if in_chans == 1 else "RGB"
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        # 16/32-bit grey: scale the full range to 8 bits rather than clipping at 255.
        arr = np.asarray(img, dtype=np.float64)
        peak = float(arr.max()) if arr.size else 0.0
        sixteen = img.mode.startswith("I;16") or 255.0 < peak <= 65535.0
        hi = 65535.0 if sixteen else 255.0 if peak <= 255.0 else peak
        img = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    return img if img.mode == target else img.convert(target)


def pil_to_tensor(img: Image.Image, cfg: MoNEConfig) -> Tensor:
    """One picture -> normalised float32 tensor (C, H, W) for `cfg`."""
    img = to_model_mode(img, cfg.in_chans)
    size = (cfg.img_size, cfg.img_size)
    if img.size != size:
        img = img.resize(size, Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    x = torch.from_numpy(arr.copy()).float().div_(255.0)
    x = x.unsqueeze(0) if x.dim() == 2 else x.permute(2, 0, 1)  # (C, H, W)
    return normalise(x, cfg)


def normalise(x: Tensor, cfg: MoNEConfig) -> Tensor:
    """(..., C, H, W) in [0, 1] -> (x - mean) / std per channel."""
    mean = torch.tensor(cfg.mean, dtype=x.dtype).view(-1, 1, 1)
    std = torch.tensor(cfg.std, dtype=x.dtype).view(-1, 1, 1)
    return (x - mean) / std


def sample_indices(num_available: int, num_frames: int) -> list[int]:
    """Indices of `num_frames` frames spread evenly over `num_available` (centre of each segment).

    Fewer frames than asked repeats frames, so a clip always has exactly `num_frames` frames.
    """
    if num_available < 1:
        raise ValueError("a clip needs at least one frame")
    return [min(num_available - 1, int((i + 0.5) * num_available / num_frames)) for i in range(num_frames)]


def frames_to_tensor(frames: Sequence[Image.Image], cfg: MoNEConfig) -> Tensor:
    """Already-sampled frames -> (T, C, H, W)."""
    return torch.stack([pil_to_tensor(f, cfg) for f in frames])
