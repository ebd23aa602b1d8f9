"""Training and evaluation data: Fashion-MNIST from its IDX files, and users' own image / clip folders.

Fashion-MNIST (Xiao, Rasul and Vollgraf 2017, arXiv 1708.07747) ships as four IDX files (LeCun's MNIST
format); on Debian they come with the package `dataset-fashion-mnist`.  Every loader returns uint8 tensors
(B, C, H, W) or clips (B, T, C, H, W) and int64 labels; normalisation happens on the batch, next to the model.

Shape legend: B items, T frames, C channels, H, W pixels.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
}
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
_CLIP_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".npy"}


class DataError(ValueError):
    """A data file is missing, corrupt or does not match what the caller expects."""


@dataclass
class ImageSet:
    """Items and labels in memory.

    Attributes:
        x: uint8 (B, C, H, W) images or (B, T, C, H, W) clips.
        y: int64 (B,) class indices.
        classes: class names, index = label.
    """

    x: Tensor
    y: Tensor
    classes: list[str]

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, index: Tensor | slice) -> ImageSet:
        return ImageSet(self.x[index], self.y[index], self.classes)


# -- IDX ---------------------------------------------------------------------------------------------------
def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed), validating its magic number, dims and size.

    Raises:
        DataError: the file is missing, not IDX, truncated or has trailing bytes.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such file")
    try:
        raw = gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{p}: corrupt gzip stream ({exc})") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{p}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    dtype_code, ndim = raw[2], raw[3]
    if dtype_code not in _IDX_DTYPES:
        raise DataError(f"{p}: unknown IDX element type 0x{dtype_code:02x}")
    if not 1 <= ndim <= 4:
        raise DataError(f"{p}: unsupported number of IDX dimensions {ndim}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{p}: truncated IDX header")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = _IDX_DTYPES[dtype_code]
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"{p}: IDX header says {dims} ({expected} bytes of data), "
            f"but the file holds {len(raw) - header} bytes"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _find(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    raise DataError(
        f"Fashion-MNIST file {stem}(.gz) not found in {root}. Install the data set with "
        "`apt-get install dataset-fashion-mnist` (or run `make setup`), or pass --data-dir."
    )


def load_fashion_mnist(split: str = "train", root: str | os.PathLike[str] | None = None) -> ImageSet:
    """Fashion-MNIST `split` ("train": 60k, "test": 10k) as uint8 (B, 1, 28, 28) images."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    base = Path(root) if root is not None else FASHION_MNIST_DIR
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(_find(base, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find(base, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise DataError(f"{base}: images {images.shape} and labels {labels.shape} do not match")
    if labels.size and (labels.min() < 0 or labels.max() >= len(FASHION_MNIST_CLASSES)):
        raise DataError(f"{base}: labels outside 0..9")
    x = torch.from_numpy(images.copy()).unsqueeze(1)  # (B, 1, 28, 28)
    y = torch.from_numpy(labels.astype(np.int64))
    return ImageSet(x, y, list(FASHION_MNIST_CLASSES))


# -- folders -----------------------------------------------------------------------------------------------
def _class_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        raise DataError(f"{root}: not a directory (expected one sub-folder per class)")
    dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not dirs:
        raise DataError(f"{root}: no class sub-folders")
    return dirs


def _load_image(path: Path, size: int, channels: int) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - pillow is an optional dependency
        raise DataError("reading image folders needs pillow: pip install pillow") from exc
    with Image.open(path) as src:
        im = src.convert("L" if channels == 1 else "RGB").resize((size, size), Image.Resampling.BILINEAR)
        a = np.asarray(im, dtype=np.uint8)
    return a[None] if channels == 1 else a.transpose(2, 0, 1)  # (C, H, W)


def load_image_folder(root: str | os.PathLike[str], size: int, channels: int) -> ImageSet:
    """Images under root/<class>/*.png|jpg|..., resized to size x size, as uint8 (B, C, H, W)."""
    xs, ys = [], []
    dirs = _class_dirs(Path(root))
    for label, d in enumerate(dirs):
        for f in sorted(d.iterdir()):
            if f.suffix.lower() in _IMAGE_SUFFIXES:
                xs.append(_load_image(f, size, channels))
                ys.append(label)
    if not xs:
        raise DataError(f"{root}: no images found in its class sub-folders")
    return ImageSet(torch.from_numpy(np.stack(xs)), torch.tensor(ys), [d.name for d in dirs])


def _frames_to_clip(frames: np.ndarray, size: int, channels: int, num_frames: int) -> np.ndarray:
    """(T', H, W[, 3]) uint8 frames -> (num_frames, C, size, size), sampling frames evenly."""
    pick = np.linspace(0, len(frames) - 1, num_frames).round().astype(int)
    t = torch.from_numpy(np.ascontiguousarray(frames[pick])).float()
    t = t.unsqueeze(1) if t.dim() == 3 else t.permute(0, 3, 1, 2)  # (T, C', H, W)
    if t.shape[1] != channels:
        t = t.mean(dim=1, keepdim=True) if channels == 1 else t.expand(-1, channels, -1, -1)
    t = torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    return t.round().clamp(0, 255).to(torch.uint8).numpy()


def read_clip_file(path: Path) -> np.ndarray:
    """Frames of a video file (PyAV) or a .npy array, as uint8 (T, H, W) or (T, H, W, 3)."""
    if path.suffix.lower() == ".npy":
        a = np.load(path, allow_pickle=False)
        if a.ndim not in (3, 4):
            raise DataError(f"{path}: expected (T, H, W) or (T, H, W, C) frames, got shape {a.shape}")
        return np.asarray(a, dtype=np.uint8)
    try:
        import av
    except ImportError as exc:
        raise DataError("reading video files needs PyAV: pip install av") from exc
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    if not frames:
        raise DataError(f"{path}: no video frames")
    return np.asarray(np.stack(frames), dtype=np.uint8)


def load_clip_folder(root: str | os.PathLike[str], size: int, channels: int, num_frames: int) -> ImageSet:
    """Clips under root/<class>/ (video files, .npy arrays, or sub-folders of frame images), as uint8
    (B, T, C, H, W) with T = num_frames sampled evenly over each clip."""
    xs, ys = [], []
    dirs = _class_dirs(Path(root))
    for label, d in enumerate(dirs):
        for f in sorted(d.iterdir()):
            if f.is_dir():
                files = sorted(g for g in f.iterdir() if g.suffix.lower() in _IMAGE_SUFFIXES)
                if not files:
                    continue
                frames = np.stack([_load_image(g, size, channels) for g in files])  # (T', C, H, W)
                frames = frames[:, 0] if channels == 1 else frames.transpose(0, 2, 3, 1)
            elif f.suffix.lower() in _CLIP_SUFFIXES:
                frames = read_clip_file(f)
            else:
                continue
            xs.append(_frames_to_clip(frames, size, channels, num_frames))
            ys.append(label)
    if not xs:
        raise DataError(f"{root}: no clips found in its class sub-folders")
    return ImageSet(torch.from_numpy(np.stack(xs)), torch.tensor(ys), [d.name for d in dirs])


def normalize(x: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """uint8 (..., C, H, W) -> float (x/255 - mean) / std, per channel."""
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    return (x.float() / 255.0 - m) / s
