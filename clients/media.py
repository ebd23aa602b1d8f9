"""Turn what a caller has (a path, bytes, a PIL image, a numpy array) into an upload.

Arrays and PIL images are encoded as PNG; a clip array (T, H, W[, C]) as an H.264 MP4 with PyAV, or, where
PyAV is missing, as an animated GIF sent with `kind=clip`.
"""

from __future__ import annotations

import io
import mimetypes
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

Kind = Literal["auto", "image", "clip"]
Input = str | os.PathLike[str] | bytes | Image.Image | np.ndarray[Any, Any]

_TYPES = {".mp4": "video/mp4", ".webm": "video/webm", ".gif": "image/gif", ".webp": "image/webp"}


@dataclass(frozen=True)
class Payload:
    data: bytes
    filename: str
    content_type: str
    kind: Kind = "auto"


def to_payload(file: Input) -> Payload:
    """Encode `file` for upload; see the module docstring for what each input becomes."""
    if isinstance(file, bytes):
        return Payload(file, "upload", sniff(file))
    if isinstance(file, str | os.PathLike):
        path = Path(file)
        ctype = _TYPES.get(path.suffix.lower()) or mimetypes.guess_type(path.name)[0]
        data = path.read_bytes()
        return Payload(data, path.name, ctype or sniff(data))
    if isinstance(file, Image.Image):
        return Payload(png_bytes(file), "image.png", "image/png", "image")
    if isinstance(file, np.ndarray):
        return _array_payload(file)
    raise TypeError(f"cannot classify a {type(file).__name__}: give a path, bytes, a PIL image or an array")


def sniff(data: bytes) -> str:
    """Content type from the magic bytes (the server checks them again)."""
    if data.startswith(b"\x89PNG"):
        return "image/png"
    if data.startswith(b"\xff\xd8"):
        return "image/jpeg"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[4:8] == b"ftyp":
        return "video/mp4"
    if data.startswith(b"\x1a\x45\xdf\xa3"):
        return "video/webm"
    return "application/octet-stream"


def as_uint8(arr: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """uint8 pixels; floats are taken to lie in [0, 1]."""
    if arr.dtype == np.uint8:
        return arr
    out: np.ndarray[Any, Any]
    if np.issubdtype(arr.dtype, np.floating):
        out = (np.clip(arr, 0.0, 1.0) * 255).round().astype(np.uint8)
    else:
        out = np.clip(arr, 0, 255).astype(np.uint8)
    return out


def is_clip(arr: np.ndarray[Any, Any]) -> bool:
    """(T, H, W, C) and (T, H, W) with T frames are clips; (H, W) and (H, W, C<=4) are images."""
    return arr.ndim == 4 or (arr.ndim == 3 and arr.shape[-1] not in (1, 3, 4))


def _array_payload(arr: np.ndarray[Any, Any]) -> Payload:
    if arr.ndim not in (2, 3, 4):
        raise ValueError(f"expected (H, W), (H, W, C), (T, H, W) or (T, H, W, C), got shape {arr.shape}")
    pixels = as_uint8(arr)
    if not is_clip(pixels):
        return Payload(png_bytes(Image.fromarray(_squeeze(pixels))), "image.png", "image/png", "image")
    frames = [_squeeze(f) for f in pixels]
    try:
        return Payload(mp4_bytes(frames), "clip.mp4", "video/mp4", "clip")
    except ImportError:
        return Payload(gif_bytes(frames), "clip.gif", "image/gif", "clip")


def _squeeze(frame: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    return frame[..., 0] if frame.ndim == 3 and frame.shape[-1] == 1 else frame


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def gif_bytes(frames: list[np.ndarray[Any, Any]], fps: int = 8) -> bytes:
    images = [Image.fromarray(f) for f in frames]
    buf = io.BytesIO()
    images[0].save(buf, "GIF", save_all=True, append_images=images[1:], duration=1000 // fps, loop=0)
    return buf.getvalue()


def mp4_bytes(frames: list[np.ndarray[Any, Any]], fps: int = 8) -> bytes:
    """H.264 in MP4; frames are padded to even sides, as yuv420p needs."""
    import av

    h, w = frames[0].shape[:2]
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = w + w % 2, h + h % 2
        stream.pix_fmt = "yuv420p"
        for f in frames:
            rgb = np.repeat(f[:, :, None], 3, axis=2) if f.ndim == 2 else f[..., :3]
            rgb = np.pad(rgb, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
            for packet in stream.encode(
                av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            ):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()
