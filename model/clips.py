"""Deterministic synthetic clips: a Fashion-MNIST item moving and scaling over a static textured canvas.

Each clip has T frames (8 by default) of the item's size (28x28 for Fashion-MNIST).  The item shrinks to
45-80 % of the canvas, glides in a straight line and changes scale smoothly; the background is a faint
smooth texture that does not change over time.  Most tokens of a frame are therefore background, and
most tokens of a clip repeat across frames: the redundancy MoNE exploits by giving such tokens the small
nested experts (Jain et al., NeurIPS 2024, Sec. 4.4 on video).  The label of a clip is its item's label.

A clip is a pure function of (item, seed): `make_clip(image, seed)`.  The evaluation set is
`eval_clips()`: one clip for each of the first 500 test images, seeds 0..499.  PyAV (optional) writes
clips as mp4 for the server tests and the demo page.

Shape legend: B clips, T frames, C channels, H = W pixels.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

NUM_FRAMES = 8
TEST_CLIPS = 500
_SCALE = (0.45, 0.8)  # item size / canvas size
_BACKGROUND_MAX = 48  # brightest background pixel, of 255; items are far brighter


def clip_params(seed: int, num_frames: int = NUM_FRAMES) -> np.ndarray:
    """Per-frame (scale, centre x, centre y) of one clip, (T, 3), in canvas-normalised [-1, 1] units."""
    rng = np.random.default_rng([seed, 0x4D6F4E45])
    s0, s1 = rng.uniform(*_SCALE, size=2)
    t = np.linspace(0.0, 1.0, num_frames)
    scale = s0 + (s1 - s0) * t  # (T,)
    # Start and end centres keep the whole item on the canvas at its scale in those frames.
    c0 = rng.uniform(-1.0 + s0, 1.0 - s0, size=2)
    c1 = rng.uniform(-1.0 + s1, 1.0 - s1, size=2)
    centre = c0[None] + (c1 - c0)[None] * t[:, None]  # (T, 2)
    return np.concatenate([scale[:, None], centre], axis=1)


def background(seed: int, size: int, channels: int) -> Tensor:
    """A static smooth texture (C, size, size) in [0, _BACKGROUND_MAX], float."""
    rng = np.random.default_rng([seed, 0x42474E44])
    coarse = torch.from_numpy(rng.uniform(0.0, 1.0, size=(1, channels, 4, 4)).astype(np.float32))
    fine = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True).clamp(0, 1)
    return fine[0] * _BACKGROUND_MAX


def make_clips(images: Tensor, seeds: Sequence[int], num_frames: int = NUM_FRAMES) -> Tensor:
    """Clips (B, T, C, H, W) uint8 of `images` (B, C, H, W) uint8; clip i is drawn with seed seeds[i]."""
    B, C, H, W = images.shape
    if len(seeds) != B:
        raise ValueError(f"{len(seeds)} seeds for {B} images")
    if B == 0:
        return images.new_zeros(0, num_frames, C, H, W)
    params = torch.from_numpy(np.stack([clip_params(int(s), num_frames) for s in seeds])).float()  # (B, T, 3)
    scale, cx, cy = params[..., 0], params[..., 1], params[..., 2]
    theta = torch.zeros(B, num_frames, 2, 3)
    # Output pixel p samples the item at (p - centre) / scale: the item is shrunk by `scale` and moved.
    theta[..., 0, 0] = 1.0 / scale
    theta[..., 1, 1] = 1.0 / scale
    theta[..., 0, 2] = -cx / scale
    theta[..., 1, 2] = -cy / scale
    grid = F.affine_grid(theta.view(B * num_frames, 2, 3), [B * num_frames, C, H, W], align_corners=False)
    src = images.float().unsqueeze(1).expand(B, num_frames, C, H, W).reshape(B * num_frames, C, H, W)
    item = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    item = item.view(B, num_frames, C, H, W)
    bg = torch.stack([background(int(s), H, C) for s in seeds])  # (B, C, H, W)
    frames = torch.maximum(item, bg.unsqueeze(1))  # items are bright on black: composite by max
    return frames.round().clamp(0, 255).to(torch.uint8)


def make_clip(image: Tensor, seed: int, num_frames: int = NUM_FRAMES) -> Tensor:
    """One clip (T, C, H, W) uint8 of one image (C, H, W) uint8."""
    return make_clips(image.unsqueeze(0), [seed], num_frames)[0]


def eval_clips(
    images: Tensor, labels: Tensor, count: int = TEST_CLIPS, num_frames: int = NUM_FRAMES
) -> tuple[Tensor, Tensor]:
    """The fixed evaluation clips: clip i shows test image i with seed i, i < count."""
    count = min(count, images.shape[0])
    return make_clips(images[:count], list(range(count)), num_frames), labels[:count].clone()


def write_mp4(clip: Tensor, path: str | os.PathLike[str], fps: int = 8, upscale: int = 4) -> Path:
    """Write a (T, C, H, W) uint8 clip as H.264 mp4 with PyAV, upscaled by `upscale` (nearest)."""
    try:
        import av
    except ImportError as exc:
        raise RuntimeError("writing mp4 needs PyAV: pip install av") from exc
    T, C, H, W = clip.shape
    frames = clip.repeat_interleave(upscale, dim=2).repeat_interleave(upscale, dim=3)
    if C == 1:
        frames = frames.expand(T, 3, H * upscale, W * upscale)
    rgb = frames.permute(0, 2, 3, 1).contiguous().numpy()  # (T, H, W, 3)
    out = Path(path)
    with av.open(str(out), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = rgb.shape[2], rgb.shape[1]
        stream.pix_fmt = "yuv420p"
        for a in rgb:
            for packet in stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out
