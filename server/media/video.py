"""Clip decoding with PyAV: allow-listed demuxer and codec, limits on streams, size, duration, frames and
decode time.  The result is `num_frames` uint8 frames, already in the model's mode and size, made by
`mone.model.preprocess.clip_pixels` (what training makes of a clip file too).

This module imports no torch: it is what the decode worker processes (`mone.server.media.decode_pool`) run,
and it is also called directly in the in-thread mode (`decode_isolation=thread`).
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import av
import numpy as np

from mone.model.preprocess import clip_pixels
from mone.server.config import Settings
from mone.server.errors import BadInputError, OverLimitError, ServeError, TooLargeError, UnsupportedMediaError

if TYPE_CHECKING:
    from PIL import Image

    from mone.model import MoNEConfig

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


@dataclass(frozen=True)
class ClipShape:
    """What the model takes from a clip (a plain value, cheap to send to a worker process)."""

    img_size: int
    in_chans: int
    num_frames: int

    @classmethod
    def of(cls, cfg: MoNEConfig) -> ClipShape:
        return cls(cfg.img_size, cfg.in_chans, cfg.num_frames)


ClipDecoder = Callable[[bytes, str, ClipShape, Settings], np.ndarray]
"""(data, sniffed format, shape, settings) -> uint8 frames (T, H, W) or (T, H, W, C); raises ServeError."""


def decode_video(data: bytes, fmt: str, shape: ClipShape, settings: Settings) -> np.ndarray:
    """`shape.num_frames` frames sampled evenly from the first video stream, converted and resized."""
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
        return _sample_frames(container, shape, settings, deadline)
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


def _sample_frames(container: Any, shape: ClipShape, settings: Settings, deadline: float) -> np.ndarray:
    stream = _check_stream(container, settings)
    # Each frame is converted and resized as it is decoded, so that only small frames are kept.
    return clip_pixels(
        _frames(container, stream, settings, deadline), shape.in_chans, shape.img_size, shape.num_frames
    )


def _frames(container: Any, stream: Any, settings: Settings, deadline: float) -> Iterator[Image.Image]:
    """The stream's frames as RGB pictures, each after the time and count checks."""
    count = 0
    for frame in container.decode(stream):
        if time.monotonic() > deadline:
            raise OverLimitError(f"decoding took longer than {settings.max_decode_seconds:g} s")
        if frame.time is not None and frame.time > settings.max_video_seconds:
            raise OverLimitError(f"clip lasts longer than {settings.max_video_seconds:g} s")
        if count >= settings.max_video_frames:
            raise OverLimitError(f"clip has more than {settings.max_video_frames} frames")
        count += 1
        yield frame.to_image()
    if not count:
        raise BadInputError("the clip has no decodable frames")
