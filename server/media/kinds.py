"""The input kinds the server takes, in one place: an image or a clip.

An `InputKind` holds everything the server knows about one kind: its name (the request's `kind` and the
answer's), the containers it is decoded from, which of them it is when a request says `kind=auto`, how many
frames the model sees of one sample, how the bytes become frames (`decode`), and what `/v1/models` publishes
of it.  The decoding stage (`mone.server.media.decode`), the engine's per-kind planning (frames per sample),
the metrics' and access log's `kind` label and `/v1/models` all read `INPUT_KINDS`; none spells a kind out.

Adding a kind (say a burst of stills sent as one multi-page TIFF) is one more entry here with its decoder in
this room, plus the wire schema's `kind` values (`server/http/schemas.py`, shared with the client, which
cannot import the server), the client's `Kind` and `--kind` choices (`clients/media.py`, `clients/cli.py`),
and the load generator's sample inputs where it should send the new kind (`clients/bench.py`).
docs/architecture.md walks through it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from mone.model.preprocess import array_frames_to_tensor, frames_to_tensor
from mone.server.media.image import decode_image
from mone.server.media.video import ClipShape, decode_video

if TYPE_CHECKING:
    from torch import Tensor

    from mone.model import MoNEConfig
    from mone.server.config import Settings
    from mone.server.media.video import ClipDecoder

# Sniffed container name -> MIME type, for every container any kind takes.
CONTENT_TYPES = {
    "jpeg": "image/jpeg",
    "png": "image/png",
    "webp": "image/webp",
    "gif": "image/gif",
    "mp4": "video/mp4",
    "webm": "video/webm",
}

# decode(data, fmt, cfg, settings, clips) -> (T, C, H, W) normalised frames
Decoder = Callable[[bytes, str, "MoNEConfig", "Settings", "ClipDecoder | None"], "Tensor"]


@dataclass(frozen=True)
class InputKind:
    """One kind of input.

    Attributes:
        name: the request's `kind` value and the answer's.
        formats: sniffed containers this kind is decoded from.
        auto: those of `formats` that are this kind when the request says `kind=auto`.
        frames: frames per sample the model sees, from its config.
        decode: bytes of one of `formats` -> (T, C, H, W) normalised frames; errors are `ServeError`s.
        in_process: decoded in the server's own process, so held against its budget of pixels in decoding
            (`mone.server.media.decode_budget`); clips are decoded in worker processes instead.
        extra: what `/v1/models` publishes of it besides its formats, from the model's config.
    """

    name: str
    formats: tuple[str, ...]
    auto: tuple[str, ...]
    frames: Callable[[MoNEConfig], int]
    decode: Decoder
    in_process: bool
    extra: Callable[[MoNEConfig], dict[str, Any]]

    def describe(self, cfg: MoNEConfig) -> dict[str, Any]:
        """This kind as `/v1/models` lists it under `input`."""
        return {"formats": [CONTENT_TYPES[f] for f in self.formats], **self.extra(cfg)}


def _decode_image(
    data: bytes, fmt: str, cfg: MoNEConfig, settings: Settings, clips: ClipDecoder | None
) -> Tensor:
    return frames_to_tensor([decode_image(data, fmt, settings)], cfg)


def _decode_clip(
    data: bytes, fmt: str, cfg: MoNEConfig, settings: Settings, clips: ClipDecoder | None
) -> Tensor:
    frames = (clips or decode_video)(data, fmt, ClipShape.of(cfg), settings)
    return array_frames_to_tensor(frames, cfg)


IMAGE = InputKind(
    name="image",
    formats=("jpeg", "png", "webp", "gif"),  # a GIF's frame 0
    auto=("jpeg", "png", "webp", "gif"),
    frames=lambda cfg: 1,
    decode=_decode_image,
    in_process=True,
    extra=lambda cfg: {
        "channels": cfg.in_chans,
        "size": [cfg.img_size, cfg.img_size],
        "mean": list(cfg.mean),
        "std": list(cfg.std),
    },
)
CLIP = InputKind(
    name="clip",
    formats=("mp4", "webm", "gif"),  # an animated GIF's frames
    auto=("mp4", "webm"),
    frames=lambda cfg: cfg.num_frames,
    decode=_decode_clip,
    in_process=False,
    extra=lambda cfg: {"frames": cfg.num_frames},
)

INPUT_KINDS: Mapping[str, InputKind] = MappingProxyType({k.name: k for k in (IMAGE, CLIP)})


def kind_for(fmt: str, asked: str) -> InputKind:
    """The kind a request's input is decoded as: the one asked for, or under `auto` the kind whose `auto`
    formats hold `fmt`.  Raises KeyError for a kind that does not exist (the wire schema refuses it first)."""
    if asked != "auto":
        return INPUT_KINDS[asked]
    return next(k for k in INPUT_KINDS.values() if fmt in k.auto)
