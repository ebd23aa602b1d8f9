"""The one path from a picture or a clip to model input, for training, evaluation and serving alike.

A picture becomes model input in one way only:

1. `upright`: frame 0 of the file, its EXIF orientation applied (a training file and an upload alike);
2. `to_model_mode`: Pillow's conversion to the model's channels ("L" for one, "RGB" for three; "L" is
   Pillow's ITU-R 601-2 luma, not a channel mean), transparency flattened onto black, 16/32-bit grey scaled
   to 8 bits;
3. `model_pixels`: resized to img_size x img_size with Pillow's bilinear filter (a no-op when the size
   already matches), as uint8 (H, W) or (H, W, C);
4. `normalised_array` (NumPy, what the server runs) or `normalize` (torch, on a uint8 batch next to the model,
   what training and evaluation run): x / 255, minus the config's mean, over its std, per channel.  Both give
   the same float32 bits for every uint8 value (the NumPy path looks them up in a table built by `normalize`).

Fashion-MNIST pictures are white objects on black; nothing is inverted.  The data set's uint8 (1, 28, 28)
tensors are already what steps 1-3 make of a 28x28 grey PNG, so a 28x28 grey model trains on them as they are.

A clip is its frames in decoding order, each through steps 2-3, of which `num_frames` are kept: frame
`sample_indices(n, T)[i]` is the one at the centre of segment i when the n frames are cut into T equal
segments; a clip with fewer frames than asked repeats frames, so it always has exactly T.  This was the
server's rule, kept so that served clips do not change; training, which took `linspace(0, n - 1, T)`, now uses
it too.  Centres also weigh every part of the clip alike and stay off its first and last frames, where fades
and cuts tend to be.  Both the server's clip decoding (`mone.server.media.video`) and the training loaders
(`mone.model.data`)
call `clip_pixels`, which converts each frame as it arrives, so that a long clip never holds its full-size
frames.

Arrays are pictures too: uint8 (H, W) is grey, (H, W, 1) grey, (H, W, 3) RGB, (H, W, 4) RGBA; a clip is
(T, H, W) or (T, H, W, C) (`picture`, `model_pixels`, `clip_pixels`).

This module imports no torch: the server's clip decode worker processes run it and never load torch.  The
functions that return tensors import it when called.

Shape legend: T frames, C channels, H = W = img_size.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

if TYPE_CHECKING:
    from torch import Tensor

    from mone.model.config import MoNEConfig

__all__ = [
    "Picture",
    "array_frames_to_tensor",
    "channels_first",
    "clip_pixels",
    "frames_to_tensor",
    "model_pixels",
    "normalised_array",
    "normalize",
    "open_picture",
    "picture",
    "pil_to_tensor",
    "sample_indices",
    "to_model_mode",
    "upright",
]

Picture = Image.Image | np.ndarray
"""A Pillow image, or uint8 pixels (H, W) or (H, W, C) with C in 1, 3, 4."""
_ARRAY_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


# -- pictures ------------------------------------------------------------------------------------------------
def upright(img: Image.Image) -> Image.Image:
    """Frame 0 of an opened picture, loaded, with its EXIF orientation applied (a new image)."""
    img.seek(0)
    img.load()
    out = ImageOps.exif_transpose(img)  # a copy, also when there is nothing to turn
    return out if out is not None else img


def open_picture(path: str | os.PathLike[str]) -> Image.Image:
    """A picture file as `upright` makes it (the file is closed on return)."""
    with Image.open(path) as src:
        return upright(src)


def picture(pixels: np.ndarray) -> Image.Image:
    """uint8 (H, W) or (H, W, C) pixels, C in 1, 3, 4, as a Pillow image ("L", "RGB", "RGBA")."""
    if pixels.dtype != np.uint8:
        raise ValueError(f"pictures are uint8 pixels, got {pixels.dtype}")
    if pixels.ndim == 3 and pixels.shape[-1] in _ARRAY_MODES:
        mode = _ARRAY_MODES[pixels.shape[-1]]
        return Image.fromarray(pixels[..., 0] if mode == "L" else np.ascontiguousarray(pixels), mode)
    if pixels.ndim == 2:
        return Image.fromarray(np.ascontiguousarray(pixels), "L")
    raise ValueError(f"expected (H, W) or (H, W, C) pixels with C in 1, 3, 4, got shape {pixels.shape}")


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


def model_pixels(img: Picture, in_chans: int, img_size: int) -> np.ndarray:
    """One picture in the model's mode and size (bilinear resize, a no-op at that size): uint8 (H, W) or
    (H, W, C)."""
    img = to_model_mode(img if isinstance(img, Image.Image) else picture(img), in_chans)
    size = (img_size, img_size)
    if img.size != size:
        img = img.resize(size, Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def channels_first(pixels: np.ndarray, in_chans: int) -> np.ndarray:
    """`model_pixels` layout (..., H, W) or (..., H, W, C) -> (..., C, H, W), the layout of training data."""
    if in_chans == 1:
        return pixels[..., None, :, :]
    return np.moveaxis(pixels, -1, -3)


# -- clips ---------------------------------------------------------------------------------------------------
def sample_indices(num_available: int, num_frames: int) -> list[int]:
    """Indices of `num_frames` frames spread evenly over `num_available` (centre of each segment).

    Fewer frames than asked repeats frames, so a clip always has exactly `num_frames` frames.
    """
    if num_available < 1:
        raise ValueError("a clip needs at least one frame")
    return [min(num_available - 1, int((i + 0.5) * num_available / num_frames)) for i in range(num_frames)]


def clip_pixels(frames: Iterable[Picture], in_chans: int, img_size: int, num_frames: int) -> np.ndarray:
    """A clip's frames in decoding order -> `num_frames` of them (`sample_indices`), each through
    `model_pixels`: uint8 (T, H, W) or (T, H, W, C).

    Each frame is converted as it arrives, so only small frames are kept while a long clip is decoded.
    """
    small = [model_pixels(f, in_chans, img_size) for f in frames]
    return np.stack([small[i] for i in sample_indices(len(small), num_frames)])


# -- normalisation -------------------------------------------------------------------------------------------
def normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 (..., C, H, W) -> float32 (x / 255 - mean) / std, per channel (on x's device)."""
    import torch

    m = torch.tensor(tuple(mean), dtype=torch.float32, device=x.device).view(-1, 1, 1)
    s = torch.tensor(tuple(std), dtype=torch.float32, device=x.device).view(-1, 1, 1)
    return (x.float() / 255.0 - m) / s


def normalised_array(pixels: np.ndarray, cfg: MoNEConfig) -> np.ndarray:
    """uint8 (..., H, W) or (..., H, W, C) pixels -> float32 (..., C, H, W), (x / 255 - mean) / std.

    NumPy only: the server calls this from many decoding threads at once, and a torch op there would start an
    OpenMP team per thread that competes with the inference threads for the cores.  The table it looks values
    up in is `normalize` (what training and evaluation use) applied to the 256 values of each channel, so the
    results are bit for bit the same.
    """
    C = cfg.in_chans
    if C > 1 and (pixels.ndim < 3 or pixels.shape[-1] != C):
        raise ValueError(f"expected (..., H, W, {C}) pixels, got shape {pixels.shape}")
    table = _lookup_table(tuple(cfg.mean), tuple(cfg.std))
    H, W = pixels.shape[-3:-1] if C > 1 else pixels.shape[-2:]
    out = np.empty((*pixels.shape[: pixels.ndim - (3 if C > 1 else 2)], C, H, W), dtype=np.float32)
    for c in range(C):
        np.take(table[c], pixels[..., c] if C > 1 else pixels, out=out[..., c, :, :])
    return out


@functools.lru_cache(maxsize=16)
def _lookup_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(C, 256) float32: each uint8 value of each channel through `normalize`."""
    import torch

    values = torch.arange(256, dtype=torch.uint8).expand(len(mean), 1, 256)  # (C, H=1, W=256)
    table = normalize(values, mean, std).reshape(len(mean), 256).numpy()
    table.flags.writeable = False
    return table


# -- model input ---------------------------------------------------------------------------------------------
def pil_to_tensor(img: Picture, cfg: MoNEConfig) -> Tensor:
    """One picture -> normalised float32 tensor (C, H, W) for `cfg`."""
    import torch

    return torch.from_numpy(normalised_array(model_pixels(img, cfg.in_chans, cfg.img_size), cfg))


def frames_to_tensor(frames: Sequence[Picture], cfg: MoNEConfig) -> Tensor:
    """Already-sampled frames -> (T, C, H, W)."""
    import torch

    pixels = np.stack([model_pixels(f, cfg.in_chans, cfg.img_size) for f in frames])
    return torch.from_numpy(normalised_array(pixels, cfg))


def array_frames_to_tensor(frames: np.ndarray, cfg: MoNEConfig) -> Tensor:
    """Sampled frames already in the model's mode and size, uint8 (T, H, W) or (T, H, W, C) -> (T, C, H, W).

    The same arithmetic as `pil_to_tensor`, on the whole clip at once.
    """
    import torch

    return torch.from_numpy(normalised_array(np.ascontiguousarray(frames, dtype=np.uint8), cfg))
