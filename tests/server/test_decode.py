"""Decoding and preprocessing: formats, modes, orientation, limits (docs/reliability.md rows 6-12)."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from mone.model import MoNEConfig
from mone.model.preprocess import normalised_array, normalize, pil_to_tensor, sample_indices
from mone.server.config import Settings
from mone.server.errors import BadInputError, OverLimitError, TooLargeError, UnsupportedMediaError
from mone.server.media.decode import decode, sniff
from tests.support.media import encode, encode_clip, fashion_images

CFG = MoNEConfig.from_variant("Mi/4", num_classes=10)
S = Settings(random_init=True)


def test_pil_to_tensor_matches_manual_normalisation() -> None:
    arr = fashion_images(1)[0]
    x = pil_to_tensor(Image.fromarray(arr), CFG)
    assert x.shape == (1, 28, 28)
    want = (torch.from_numpy(arr).float() / 255 - 0.5) / 0.5
    torch.testing.assert_close(x[0], want)


@pytest.mark.parametrize("variant", ["Mi/4", "S/16"])
def test_normalisation_is_bit_identical_to_training(variant: str) -> None:
    """Every uint8 value of every channel, through the server's NumPy path and through the torch
    normalisation that training and offline evaluation use: the same float32 bits."""
    cfg = MoNEConfig.from_variant(variant, num_classes=3)
    values = np.arange(256, dtype=np.uint8).reshape(16, 16)
    hwc = np.stack([np.roll(values, 37 * c) for c in range(cfg.in_chans)], axis=-1)  # (16, 16, C)
    pixels = hwc[..., 0] if cfg.in_chans == 1 else hwc
    want = normalize(torch.from_numpy(np.ascontiguousarray(hwc.transpose(2, 0, 1))), cfg.mean, cfg.std)
    got = normalised_array(pixels, cfg)
    assert got.dtype == np.float32
    assert got.shape == (cfg.in_chans, 16, 16)
    assert np.array_equal(got.view(np.int32), want.numpy().view(np.int32))
    clip = normalised_array(np.stack([pixels, pixels[::-1]]), cfg)  # (T, H, W[, C]) -> (T, C, H, W)
    assert np.array_equal(clip[0], got)
    assert np.array_equal(clip[1], got[:, ::-1])
    side = cfg.img_size  # a picture of the model's size: pil_to_tensor leaves it unresized
    full = np.resize(hwc, (side, side, cfg.in_chans))
    want = normalize(torch.from_numpy(np.ascontiguousarray(full.transpose(2, 0, 1))), cfg.mean, cfg.std)
    picture = Image.fromarray(full[..., 0] if cfg.in_chans == 1 else full)
    assert torch.equal(pil_to_tensor(picture, cfg), want)


def test_resize_and_rgb_model() -> None:
    rgb = MoNEConfig.from_variant("Ti/16", num_classes=3)
    x = pil_to_tensor(Image.new("RGB", (300, 200), (255, 0, 0)), rgb)
    assert x.shape == (3, 224, 224)
    assert x[0].mean() > x[1].mean()


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F"])
def test_every_mode_converts_to_the_model_channels(mode: str) -> None:
    arr = fashion_images(1)[0]
    base = Image.fromarray(arr)
    if mode == "I;16":
        img = Image.fromarray(arr.astype(np.uint16) * 257)  # true 16-bit range
        assert img.mode.startswith("I;16")
    else:
        img = base.convert(mode) if mode not in ("I", "F") else base.convert("I").convert(mode)
    x = pil_to_tensor(img, CFG)
    assert x.shape == (1, 28, 28)
    assert float(x.min()) >= -1.0 - 1e-6
    assert float(x.max()) <= 1.0 + 1e-6
    assert float(x.std()) > 0.05  # the picture survived the conversion


def test_exif_orientation_is_applied() -> None:
    arr = fashion_images(1)[0]
    upright = Image.fromarray(arr)
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = encode(stored, "PNG", exif=exif.tobytes())
    got = decode(data, CFG, S).tensor[0]
    torch.testing.assert_close(got, pil_to_tensor(upright, CFG))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF"])
def test_allowed_image_formats(fmt: str) -> None:
    d = decode(encode(Image.fromarray(fashion_images(1)[0]), fmt), CFG, S)
    assert d.kind == "image"
    assert d.tensor.shape == (1, 1, 28, 28)


@pytest.mark.parametrize("fmt", ["TIFF", "BMP", "PPM", "ICO"])
def test_disallowed_formats_are_415(fmt: str) -> None:
    data = encode(Image.new("RGB", (28, 28)), fmt)
    assert sniff(data) is None
    with pytest.raises(UnsupportedMediaError):
        decode(data, CFG, S)


@pytest.mark.parametrize(
    "data", [b"", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, b"\xff\xd8\xff\xe0garbage", b"GIF89a"]
)
def test_corrupt_inputs_are_bad_input(data: bytes) -> None:
    with pytest.raises(BadInputError):
        decode(data, CFG, S)


def test_truncated_png_is_bad_input() -> None:
    data = encode(Image.fromarray(fashion_images(1)[0]), "PNG")
    with pytest.raises(BadInputError):
        decode(data[: len(data) // 2], CFG, S)


def _png_with_size(width: int, height: int) -> bytes:
    data = bytearray(encode(Image.new("L", (8, 8)), "PNG"))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


@pytest.mark.parametrize(("w", "h"), [(50_000, 50_000), (9000, 10), (7000, 7000)])
def test_decompression_bomb_is_too_large(w: int, h: int) -> None:
    with pytest.raises(TooLargeError):
        decode(_png_with_size(w, h), CFG, S)


def test_animated_gif_reads_frame_0_and_caps_frames() -> None:
    frames = [Image.fromarray(a) for a in fashion_images(3)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    first = decode(encode(frames[0], "GIF"), CFG, S).tensor
    torch.testing.assert_close(decode(data, CFG, S).tensor, first)
    with pytest.raises(OverLimitError):
        decode(data, CFG, Settings(random_init=True, max_animated_frames=2))


def test_image_byte_limit() -> None:
    data = encode(Image.fromarray(fashion_images(1)[0]), "PNG")
    with pytest.raises(TooLargeError):
        decode(data, CFG, Settings(random_init=True, max_image_bytes=len(data) - 1))


def test_sample_indices_are_even_and_exact() -> None:
    assert sample_indices(16, 8) == [1, 3, 5, 7, 9, 11, 13, 15]
    assert sample_indices(3, 8) == [0, 0, 0, 1, 1, 2, 2, 2]
    assert len(sample_indices(1000, 8)) == 8


@pytest.mark.parametrize(("fmt", "codec"), [("mp4", "libx264"), ("webm", "libvpx")])
def test_clip_decodes_to_num_frames(fmt: str, codec: str) -> None:
    rng = np.random.default_rng(1)
    frames = [np.full((28, 28), v, np.uint8) for v in np.linspace(0, 255, 16).astype(np.uint8)]
    frames = [np.clip(f.astype(int) + rng.integers(0, 3, f.shape), 0, 255).astype(np.uint8) for f in frames]
    d = decode(encode_clip(frames, fmt, codec), CFG, S)
    assert d.kind == "clip"
    assert d.tensor.shape == (8, 1, 28, 28)
    means = d.tensor.mean(dim=(1, 2, 3))
    assert bool((means[1:] > means[:-1]).all()), "frames must be in time order, spread over the clip"


def test_animated_gif_as_clip() -> None:
    frames = [Image.fromarray(a) for a in fashion_images(4)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    d = decode(data, CFG, S, kind="clip")
    assert d.kind == "clip"
    assert d.tensor.shape == (8, 1, 28, 28)


def test_clip_limits() -> None:
    frames = [np.full((28, 28), 10 * i, np.uint8) for i in range(16)]
    data = encode_clip(frames, "mp4", "libx264", fps=4)  # 4 s
    with pytest.raises(OverLimitError):
        decode(data, CFG, Settings(random_init=True, max_video_seconds=2))
    with pytest.raises(OverLimitError):
        decode(data, CFG, Settings(random_init=True, max_video_frames=10))
    with pytest.raises(TooLargeError):
        decode(data, CFG, Settings(random_init=True, max_video_side=16))


def test_still_image_as_clip_and_video_as_image_are_bad_input() -> None:
    with pytest.raises(BadInputError):
        decode(encode(Image.new("L", (28, 28)), "PNG"), CFG, S, kind="clip")
    data = encode_clip([np.zeros((28, 28), np.uint8)] * 2)
    with pytest.raises(BadInputError):
        decode(data, CFG, S, kind="image")


def test_playlist_is_refused_before_any_demuxer() -> None:
    hls = b"#EXTM3U\n#EXT-X-MEDIA-SEQUENCE:0\n#EXTINF:10.0,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n"
    with pytest.raises(UnsupportedMediaError):
        decode(hls, CFG, S, kind="clip")
