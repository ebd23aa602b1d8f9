"""Image decoding with Pillow: allow-listed formats (Pillow is told the one format to use), limits on size,
pixels and frames, and EXIF orientation.  Frame 0 of an animated image; `mone.server.media.kinds` makes it
model input."""

from __future__ import annotations

import io
import warnings

from PIL import Image

from mone.model.preprocess import upright
from mone.server.config import Settings
from mone.server.errors import BadInputError, OverLimitError, ServeError, TooLargeError

IMAGE_FORMATS = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "gif": "GIF"}  # sniffed name -> Pillow format


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
            return upright(img)
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
