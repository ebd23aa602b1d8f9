"""Decoding stage: encoded bytes -> model input, with the limits of reliability.md.

The container is recognised from its magic bytes first, and only an allow-listed decoder is ever invoked
(Pillow is told the one format to use; PyAV gets an explicit demuxer, so playlist demuxers such as HLS or
concat that could open local files are never reached).  Every failure is a `ServeError` (4xx), never a
500.  Runs in a worker thread; it is CPU work.
"""

from __future__ import annotations

import io
import time
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import av
from PIL import Image, ImageOps
from torch import Tensor

from model import MoNEConfig
from server.config import Settings
from server.errors import BadInputError, OverLimitError, ServeError, TooLargeError, UnsupportedMediaError
from server.preprocess import frames_to_tensor, sample_indices, to_model_mode

Kind = Literal["auto", "image", "clip"]
IMAGE_FORMATS = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "gif": "GIF"}
VIDEO_FORMATS = {"mp4": "mp4", "webm": "matroska", "gif": "gif"}  # sniffed name -> FFmpeg demuxer
VIDEO_CODECS = {
    "h264",
    "hevc",
    "vp8",
    "vp9",
    "av1",
    "mpeg4",
    "gif",
    "mjpeg",
    "libdav1d",
    "libvpx",
    "libvpx-vp9",
}
CONTENT_TYPES = {
    "jpeg": "image/jpeg",
    "png": "image/png",
    "webp": "image/webp",
    "gif": "image/gif",
    "mp4": "video/mp4",
    "webm": "video/webm",
}


@dataclass
class Decoded:
    """A decoded request input: (T, C, H, W) normalised frames."""

    tensor: Tensor
    kind: Literal["image", "clip"]
    format: str

    @property
    def frames(self) -> int:
        return int(self.tensor.shape[0])


def sniff(data: bytes) -> str | None:
    """Container name from magic bytes, or None for anything outside the allow-list."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[4:8] == b"ftyp":
        return "mp4"
    if data[:4] == b"\x1a\x45\xdf\xa3":
        return "webm"
    return None


def decode(data: bytes, cfg: MoNEConfig, settings: Settings, kind: Kind = "auto") -> Decoded:
    """Bytes of an image (JPEG/PNG/WebP/GIF frame 0) or clip (MP4/WebM/animated GIF) -> model input."""
    if not data:
        raise BadInputError("empty payload")
    fmt = sniff(data)
    if fmt is None:
        raise UnsupportedMediaError(
            "unsupported format; images: JPEG, PNG, WebP, GIF; clips: MP4, WebM, animated GIF",
            allowed=sorted(CONTENT_TYPES.values()),
        )
    as_clip = kind == "clip" or (kind == "auto" and fmt in ("mp4", "webm"))
    if as_clip:
        if fmt not in VIDEO_FORMATS:
            raise BadInputError(f"{fmt} is a still-image format; send it with kind=image")
        frames = decode_video(data, fmt, cfg, settings)
        return Decoded(frames_to_tensor(frames, cfg), "clip", fmt)
    if fmt not in IMAGE_FORMATS:
        raise BadInputError(f"{fmt} is a video format; send it with kind=clip")
    img = decode_image(data, fmt, settings)
    return Decoded(frames_to_tensor([img], cfg), "image", fmt)


def decode_image(data: bytes, fmt: str, settings: Settings) -> Image.Image:
    """Frame 0 of an allow-listed image, EXIF orientation applied, after the size and frame checks."""
    if len(data) > settings.max_image_bytes:
        raise TooLargeError(f"image is {len(data)} bytes, the limit is {settings.max_image_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=[IMAGE_FORMATS[fmt]])
            _check_image_size(img.size, settings)
            n_frames = int(getattr(img, "n_frames", 1))
            if n_frames > settings.max_animated_frames:
                raise OverLimitError(
                    f"image has {n_frames} frames, the limit is {settings.max_animated_frames}",
                    frames=n_frames,
                )
            img.seek(0)
            img.load()
            out = ImageOps.exif_transpose(img)
            return out if out is not None else img
    except ServeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise TooLargeError(f"image too large: {exc}") from exc
    except Exception as exc:  # Pillow raises many types on malformed files; all are bad input
        raise BadInputError(f"could not decode {fmt} image: {exc}") from exc


def _check_image_size(size: tuple[int, int], settings: Settings) -> None:
    w, h = size
    if max(w, h) > settings.max_image_side or w * h > settings.max_image_pixels:
        raise TooLargeError(
            f"image too large: {w}x{h}; limits are {settings.max_image_side} px per side and "
            f"{settings.max_image_pixels} pixels",
            width=w,
            height=h,
        )


def decode_video(data: bytes, fmt: str, cfg: MoNEConfig, settings: Settings) -> list[Image.Image]:
    """`cfg.num_frames` frames sampled evenly from the first video stream, converted and resized."""
    if len(data) > settings.max_body_bytes:
        raise TooLargeError(f"clip is {len(data)} bytes, the limit is {settings.max_body_bytes}")
    deadline = time.monotonic() + settings.max_decode_seconds
    try:
        container = av.open(
            io.BytesIO(data), mode="r", format=VIDEO_FORMATS[fmt], options={"probesize": "5000000"}
        )
    except Exception as exc:
        raise BadInputError(f"could not open {fmt} clip: {exc}") from exc
    try:
        return _sample_frames(container, cfg, settings, deadline)
    except ServeError:
        raise
    except Exception as exc:
        raise BadInputError(f"could not decode {fmt} clip: {exc}") from exc
    finally:
        container.close()


def _check_stream(container: Any, settings: Settings) -> Any:
    streams = list(container.streams.video)
    if not streams:
        raise BadInputError("the container has no video stream")
    if len(streams) > settings.max_video_streams:
        raise OverLimitError(f"{len(streams)} video streams, the limit is {settings.max_video_streams}")
    stream = streams[0]
    codec = stream.codec_context.name
    if codec not in VIDEO_CODECS:
        raise UnsupportedMediaError(f"video codec {codec!r} is not allowed", allowed=sorted(VIDEO_CODECS))
    w, h = stream.codec_context.width, stream.codec_context.height
    if max(w, h) > settings.max_video_side:
        raise TooLargeError(f"video is {w}x{h}, the limit is {settings.max_video_side} px per side")
    if container.duration is not None and container.duration / av.time_base > settings.max_video_seconds:
        seconds = container.duration / av.time_base
        raise OverLimitError(f"clip lasts {seconds:.1f} s, the limit is {settings.max_video_seconds:g} s")
    return stream


def _sample_frames(container: Any, cfg: MoNEConfig, settings: Settings, deadline: float) -> list[Image.Image]:
    stream = _check_stream(container, settings)
    size = (cfg.img_size, cfg.img_size)
    frames: list[Image.Image] = []
    for frame in container.decode(stream):
        if time.monotonic() > deadline:
            raise OverLimitError(f"decoding took longer than {settings.max_decode_seconds:g} s")
        if frame.time is not None and frame.time > settings.max_video_seconds:
            raise OverLimitError(f"clip lasts longer than {settings.max_video_seconds:g} s")
        if len(frames) >= settings.max_video_frames:
            raise OverLimitError(f"clip has more than {settings.max_video_frames} frames")
        # Convert and resize now (the same two steps as pil_to_tensor) so that only small frames are kept.
        img = to_model_mode(frame.to_image(), cfg.in_chans)
        frames.append(img if img.size == size else img.resize(size, Image.Resampling.BILINEAR))
    if not frames:
        raise BadInputError("the clip has no decodable frames")
    return [frames[i] for i in sample_indices(len(frames), cfg.num_frames)]
