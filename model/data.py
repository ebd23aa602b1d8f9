"""Training and evaluation data: Fashion-MNIST from its IDX files, and users' own image / clip folders.

Fashion-MNIST (Xiao, Rasul and Vollgraf 2017, arXiv 1708.07747) ships as four IDX files (LeCun's MNIST
format); on Debian they come with the package `dataset-fashion-mnist`.  Every loader returns uint8 tensors
(B, C, H, W) or clips (B, T, C, H, W) and int64 labels; normalisation happens on the batch, next to the model
(`mone.model.preprocess.normalize`).

Pictures and clips from folders go through `mone.model.preprocess`, the transform the server applies to an
upload: a model trained on a folder sees each file exactly as it will see the same file sent to the server.

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

from mone.model.preprocess import channels_first, clip_pixels, model_pixels, open_picture, picture

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
_CLIP_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".gif", ".npy"}


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


def load_fashion_mnist(
    split: str = "train", root: str | os.PathLike[str] | None = None, size: int = 28, channels: int = 1
) -> ImageSet:
    """Fashion-MNIST `split` ("train": 60k, "test": 10k) as uint8 (B, channels, size, size) images.

    The data set's own 28x28 grey pictures are what `mone.model.preprocess` makes of a 28x28 grey picture, so
    at the default size and channels they are returned as they are; any other size or channel count sends each
    picture through `mone.model.preprocess.model_pixels`, as the server would.
    """
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
    if channels != 1 or images.shape[1:] != (size, size):
        images = np.stack([model_pixels(picture(a), channels, size) for a in images])
    x = torch.from_numpy(np.ascontiguousarray(channels_first(images, channels)))  # (B, C, H, W)
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
    """One picture file -> uint8 (C, size, size), as the server makes it of the same file."""
    try:
        return channels_first(model_pixels(open_picture(path), channels, size), channels)
    except OSError as exc:
        raise DataError(f"{path}: cannot read the picture ({exc})") from exc


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


def load_clip_file(path: Path, size: int, channels: int, num_frames: int) -> np.ndarray:
    """A video file (PyAV; mp4, webm, animated GIF, ...) or a .npy array of uint8 frames (T, H, W) or
    (T, H, W, C) -> uint8 (num_frames, C, size, size), sampled and converted by
    `mone.model.preprocess.clip_pixels` (video frames are decoded to RGB pictures, as the server decodes an
    uploaded clip)."""
    if path.suffix.lower() == ".npy":
        a = np.load(path, allow_pickle=False)
        if a.ndim not in (3, 4) or a.dtype != np.uint8 or len(a) == 0:
            raise DataError(
                f"{path}: expected uint8 (T, H, W) or (T, H, W, C) frames, got {a.dtype} {a.shape}"
            )
        try:
            return channels_first(clip_pixels(a, channels, size, num_frames), channels)
        except ValueError as exc:
            raise DataError(f"{path}: {exc}") from exc
    try:
        import av
    except ImportError as exc:
        raise DataError("reading video files needs PyAV: pip install av") from exc
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            # RGB pictures, as the server turns the frames of an uploaded clip into pictures
            # (server/media/video.py)
            pictures = (f.to_image() for f in container.decode(stream))  # type: ignore[no-untyped-call]
            frames = clip_pixels(pictures, channels, size, num_frames)
    except (av.FFmpegError, IndexError, ValueError) as exc:
        raise DataError(f"{path}: cannot read the clip ({exc})") from exc
    return channels_first(frames, channels)


def load_clip_folder(root: str | os.PathLike[str], size: int, channels: int, num_frames: int) -> ImageSet:
    """Clips under root/<class>/ (video files, .npy arrays, or sub-folders of frame images), as uint8
    (B, T, C, H, W) with T = num_frames sampled at the centres of equal segments of each clip
    (`mone.model.preprocess.sample_indices`)."""
    xs, ys = [], []
    dirs = _class_dirs(Path(root))
    for label, d in enumerate(dirs):
        for f in sorted(d.iterdir()):
            if f.is_dir():
                files = sorted(g for g in f.iterdir() if g.suffix.lower() in _IMAGE_SUFFIXES)
                if not files:
                    continue
                pictures = (open_picture(g) for g in files)
                xs.append(channels_first(clip_pixels(pictures, channels, size, num_frames), channels))
            elif f.suffix.lower() in _CLIP_SUFFIXES:
                xs.append(load_clip_file(f, size, channels, num_frames))
            else:
                continue
            ys.append(label)
    if not xs:
        raise DataError(f"{root}: no clips found in its class sub-folders")
    return ImageSet(torch.from_numpy(np.stack(xs)), torch.tensor(ys), [d.name for d in dirs])
