"""Preprocessing shared by serving, training and evaluation (no web framework imported here).

A picture becomes model input in one way only: convert to the model's channels (Pillow "L" for one channel,
"RGB" for three), resize to img_size x img_size with Pillow's bilinear filter (a no-op when the size already
matches), scale to [0, 1] and normalise with the config's mean and std.  Fashion-MNIST pictures are white
objects on black; nothing is inverted.

Shape legend: T frames, C channels, H = W = img_size.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from mone.model import MoNEConfig
from mone.model.data import normalize
from mone.server.media.frames import model_pixels, sample_indices, to_model_mode

__all__ = [
    "array_frames_to_tensor",
    "frames_to_tensor",
    "model_pixels",
    "normalised_array",
    "pil_to_tensor",
    "sample_indices",
    "to_model_mode",
]


def pil_to_tensor(img: Image.Image, cfg: MoNEConfig) -> Tensor:
    """One picture -> normalised float32 tensor (C, H, W) for `cfg`."""
    return torch.from_numpy(normalised_array(model_pixels(img, cfg.in_chans, cfg.img_size), cfg))


def normalised_array(pixels: np.ndarray, cfg: MoNEConfig) -> np.ndarray:
    """uint8 (..., H, W) or (..., H, W, C) pixels -> float32 (..., C, H, W), (x / 255 - mean) / std.

    NumPy only: the server calls this from many decoding threads at once, and a torch op there would start an
    OpenMP team per thread that competes with the inference threads for the cores.  The table it looks values
    up in is `mone.model.data.normalize` (what training and evaluation use) applied to the 256 values of each
    channel, so the results are bit for bit the same.
    """
    C = cfg.in_chans
    if C > 1 and (pixels.ndim < 3 or pixels.shape[-1] != C):
        raise ValueError(f"expected (..., H, W, {C}) pixels, got shape {pixels.shape}")
    table = _lookup_table(cfg.mean, cfg.std)
    H, W = pixels.shape[-3:-1] if C > 1 else pixels.shape[-2:]
    out = np.empty((*pixels.shape[: pixels.ndim - (3 if C > 1 else 2)], C, H, W), dtype=np.float32)
    for c in range(C):
        np.take(table[c], pixels[..., c] if C > 1 else pixels, out=out[..., c, :, :])
    return out


@functools.lru_cache(maxsize=16)
def _lookup_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(C, 256) float32: each uint8 value of each channel through `mone.model.data.normalize`."""
    values = torch.arange(256, dtype=torch.uint8).expand(len(mean), 1, 256)  # (C, H=1, W=256)
    table = normalize(values, mean, std).reshape(len(mean), 256).numpy()
    table.flags.writeable = False
    return table


def frames_to_tensor(frames: Sequence[Image.Image], cfg: MoNEConfig) -> Tensor:
    """Already-sampled frames -> (T, C, H, W)."""
    pixels = np.stack([model_pixels(f, cfg.in_chans, cfg.img_size) for f in frames])
    return torch.from_numpy(normalised_array(pixels, cfg))


def array_frames_to_tensor(frames: np.ndarray, cfg: MoNEConfig) -> Tensor:
    """Sampled frames already in the model's mode and size, uint8 (T, H, W) or (T, H, W, C) -> (T, C, H, W).

    The same arithmetic as `pil_to_tensor`, on the whole clip at once.
    """
    return torch.from_numpy(normalised_array(np.ascontiguousarray(frames, dtype=np.uint8), cfg))
