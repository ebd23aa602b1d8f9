"""Picture steps that need no torch: channel conversion, resizing and frame sampling.

Shared by `preprocess` (model input) and `video` (clip decoding), whose worker processes never import
torch, so that starting or replacing one stays cheap.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


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


def model_pixels(img: Image.Image, in_chans: int, img_size: int) -> np.ndarray:
    """One picture in the model's mode and size (bilinear resize, a no-op at that size): uint8 (H, W) or
    (H, W, C)."""
    img = to_model_mode(img, in_chans)
    size = (img_size, img_size)
    if img.size != size:
        img = img.resize(size, Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def sample_indices(num_available: int, num_frames: int) -> list[int]:
    """Indices of `num_frames` frames spread evenly over `num_available` (centre of each segment).

    Fewer frames than asked repeats frames, so a clip always has exactly `num_frames` frames.
    """
    if num_available < 1:
        raise ValueError("a clip needs at least one frame")
    return [min(num_available - 1, int((i + 0.5) * num_available / num_frames)) for i in range(num_frames)]
