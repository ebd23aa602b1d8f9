"""Test inputs: pictures as arrays, and images and clips encoded as a client would send them."""

from __future__ import annotations

import gzip
import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

FASHION_TEST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


def fashion_images(n: int) -> list[np.ndarray]:
    """n 28x28 uint8 test pictures: Fashion-MNIST's test set when installed, else seeded noise blobs."""
    if FASHION_TEST.exists():
        with gzip.open(FASHION_TEST) as f:
            data = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)
        return [data[i].copy() for i in range(n)]
    rng = np.random.default_rng(0)
    return [(rng.random((28, 28)) * 255).astype(np.uint8) for _ in range(n)]


def picture(seed: int = 0, size: int = 28) -> np.ndarray:
    """A grey picture: a bright square on a dark background, placed by `seed`."""
    rng = np.random.default_rng(seed)
    arr = (rng.random((size, size)) * 40).astype(np.uint8)
    x, y = rng.integers(0, size // 2, 2)
    arr[y : y + size // 3, x : x + size // 3] = 230
    return arr


def clip_frames(frames: int = 8, size: int = 28) -> np.ndarray:
    """(T, H, W) uint8: a square moving left to right."""
    out = np.zeros((frames, size, size), dtype=np.uint8)
    for t in range(frames):
        x = t * (size - 8) // max(1, frames - 1)
        out[t, 10:18, x : x + 8] = 255
    return out


def encode(img: Image.Image, fmt: str = "PNG", **kwargs: Any) -> bytes:
    """`img` saved in the format `fmt` (PIL's name), with PIL's save options `kwargs`."""
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def png(arr: np.ndarray) -> bytes:
    """A uint8 array as PNG."""
    return encode(Image.fromarray(arr))


def png_bytes(side: int = 28, seed: int = 0) -> bytes:
    """An RGB PNG of PIL's noise effect, `side` pixels square; `seed` shifts its spread."""
    img = Image.effect_noise((side, side), 40 + seed).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def encode_clip(frames: list[np.ndarray], fmt: str = "mp4", codec: str = "libx264", fps: int = 8) -> bytes:
    """Encode grey uint8 frames as a small clip with PyAV."""
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format=fmt) as container:
        stream = container.add_stream(codec, rate=fps)
        h, w = frames[0].shape[:2]
        stream.width, stream.height = w, h
        stream.pix_fmt = "yuv420p"
        for arr in frames:
            rgb = np.repeat(arr[:, :, None], 3, axis=2) if arr.ndim == 2 else arr
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()
