"""Decoding stage: encoded bytes -> model input, with the limits of docs/reliability.md section 1.

The container is recognised from its magic bytes first, and only an allow-listed decoder is ever invoked
(Pillow is told the one format to use; PyAV gets an explicit demuxer, so playlist demuxers such as HLS or
concat that could open local files are never reached).  Every failure is a `ServeError` (4xx), never a
500.  Runs in a worker thread; it is CPU work.  The kinds of input, and how each is decoded, are
`mone.server.media.kinds`; clip decoding itself lives in `mone.server.media.video`.  What a decoded picture
or clip becomes (mode, size, frames, normalisation) is `mone.model.preprocess`, which training and
evaluation use too.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from mone.model import MoNEConfig
from mone.server.config import Settings
from mone.server.errors import (
    BadInputError,
    InvalidParamsError,
    UnsupportedMediaError,
)
from mone.server.media.image import IMAGE_FORMATS
from mone.server.media.kinds import CONTENT_TYPES, INPUT_KINDS, kind_for
from mone.server.media.video import VIDEO_FORMATS, ClipDecoder

__all__ = ["CONTENT_TYPES", "IMAGE_FORMATS", "VIDEO_FORMATS", "Decoded", "decode", "sniff"]

FORMAT_NAMES = {"jpeg": "JPEG", "png": "PNG", "webp": "WebP", "gif": "GIF", "mp4": "MP4", "webm": "WebM"}


@dataclass
class Decoded:
    """A decoded request input: (T, C, H, W) normalised frames, and the kind it was decoded as."""

    tensor: Tensor
    kind: str
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


def decode(
    data: bytes, cfg: MoNEConfig, settings: Settings, kind: str = "auto", clips: ClipDecoder | None = None
) -> Decoded:
    """Bytes of an input of one of the kinds of `INPUT_KINDS` (an image: JPEG/PNG/WebP/GIF frame 0; a clip:
    MP4/WebM/animated GIF) -> model input.

    Clips go to `clips` (the server's `DecodePool` of killable worker processes) when given, else they are
    decoded in the calling thread.  Images are always decoded here: Pillow is bounded by the pixel limits.
    """
    if not data:
        raise BadInputError("empty payload")
    fmt = sniff(data)
    if fmt is None:
        taken = "; ".join(
            f"{k.name}s: {', '.join(FORMAT_NAMES[f] for f in k.formats)}" for k in INPUT_KINDS.values()
        )
        raise UnsupportedMediaError(f"unsupported format; {taken}", allowed=sorted(CONTENT_TYPES.values()))
    if kind != "auto" and kind not in INPUT_KINDS:
        raise InvalidParamsError(f"kind must be auto or one of {', '.join(INPUT_KINDS)}, got {kind!r}")
    as_kind = kind_for(fmt, kind)
    if fmt not in as_kind.formats:
        others = [k.name for k in INPUT_KINDS.values() if fmt in k.formats]
        raise BadInputError(f"{fmt} cannot be read as kind={as_kind.name}; send it with kind={others[0]}")
    return Decoded(as_kind.decode(data, fmt, cfg, settings, clips), as_kind.name, fmt)
