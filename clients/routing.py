"""Draw a routing map: the input with each patch shaded by the nested expert that processed it.

Expert 0 is the smallest (cheapest); the palette runs from cool to warm so that "where the compute went"
reads at a glance.  Clips are drawn as a row of frames.  The web page uses the same palette
(`clients/web/app.js`).
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from mone.clients.media import Kind, Payload, as_uint8

# Smallest expert first (viridis stops); a model with more experts than colours reuses the last one.
PALETTE: list[tuple[int, int, int]] = [
    (68, 1, 84),
    (59, 82, 139),
    (33, 145, 140),
    (94, 201, 98),
    (253, 231, 37),
    (255, 160, 40),
    (230, 80, 40),
    (180, 20, 30),
]
ALPHA = 0.5


def sample_indices(num_available: int, num_frames: int) -> list[int]:
    """The frames the server samples from a clip (centre of each of `num_frames` equal segments)."""
    return [min(num_available - 1, int((i + 0.5) * num_available / num_frames)) for i in range(num_frames)]


def frames_of(payload: Payload, kind: Kind | None = None) -> list[np.ndarray[Any, Any]]:
    """Decode an upload locally into RGB frames (all of a clip's, or the one of an image)."""
    if payload.content_type.startswith("video/"):
        import av

        with av.open(io.BytesIO(payload.data), mode="r") as container:
            return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    img = Image.open(io.BytesIO(payload.data))
    if (kind or payload.kind) != "clip":
        return [np.asarray(img.convert("RGB"))]
    frames = []
    for i in range(getattr(img, "n_frames", 1)):
        img.seek(i)
        frames.append(np.asarray(img.convert("RGB")))
    return frames


def render(
    frames: list[np.ndarray[Any, Any]], routing: list[list[list[int]]], size: int = 224
) -> Image.Image:
    """One tile per routed frame (frames sampled as the server does), side by side, with a legend."""
    picked = [frames[i] for i in sample_indices(len(frames), len(routing))]
    tiles = [_tile(f, np.asarray(r), size) for f, r in zip(picked, routing, strict=True)]
    experts = max(int(np.max(r)) for r in routing) + 1
    cols = min(len(tiles), 4)
    rows = -(-len(tiles) // cols)
    gap, legend = 4, 24
    canvas = Image.new("RGB", (cols * (size + gap) - gap, rows * (size + gap) + legend), (255, 255, 255))
    for i, tile in enumerate(tiles):
        canvas.paste(tile, ((i % cols) * (size + gap), (i // cols) * (size + gap)))
    draw = ImageDraw.Draw(canvas)
    y = rows * (size + gap) + 4
    for e in range(max(experts, 1)):
        x = 4 + e * 70
        draw.rectangle((x, y, x + 14, y + 14), fill=PALETTE[min(e, len(PALETTE) - 1)])
        draw.text((x + 18, y + 2), f"expert {e + 1}", fill=(0, 0, 0))
    return canvas


def _tile(frame: np.ndarray[Any, Any], experts: np.ndarray[Any, Any], size: int) -> Image.Image:
    """(gh, gw) expert ids over one frame, as a size x size RGB image."""
    base = Image.fromarray(as_uint8(frame)).convert("RGB").resize((size, size), Image.Resampling.NEAREST)
    colours = np.array(PALETTE, dtype=np.float32)[np.minimum(experts, len(PALETTE) - 1)]  # (gh, gw, 3)
    gh, gw = experts.shape
    overlay = np.kron(colours, np.ones((-(-size // gh), -(-size // gw), 1), dtype=np.float32))[:size, :size]
    mixed = (1 - ALPHA) * np.asarray(base, dtype=np.float32) + ALPHA * overlay
    tile = Image.fromarray(mixed.round().astype(np.uint8))
    draw = ImageDraw.Draw(tile)
    for k in range(1, gh):
        draw.line((0, k * size // gh, size, k * size // gh), fill=(255, 255, 255), width=1)
    for k in range(1, gw):
        draw.line((k * size // gw, 0, k * size // gw, size), fill=(255, 255, 255), width=1)
    return tile
