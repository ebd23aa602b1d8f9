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
from server.frames import sample_indices, to_model_mode

__all__ = [
    "array_frames_to_tensor",
    "frames_to_tensor",
    "normalise",
    "pil_to_tensor",
    "sample_indices",
    "to_model_mode",
]


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


def frames_to_tensor(frames: Sequence[Image.Image], cfg: MoNEConfig) -> Tensor:
    """Already-sampled frames -> (T, C, H, W)."""
    return torch.stack([pil_to_tensor(f, cfg) for f in frames])


def array_frames_to_tensor(frames: np.ndarray, cfg: MoNEConfig) -> Tensor:
    """Sampled frames already in the model's mode and size, uint8 (T, H, W) or (T, H, W, C) -> (T, C, H, W).

    The same arithmetic as `pil_to_tensor`, on the whole clip at once.
    """
    x = torch.from_numpy(np.ascontiguousarray(frames, dtype=np.uint8)).float().div_(255.0)
    x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
    return normalise(x, cfg)
