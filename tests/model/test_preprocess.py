"""The one picture and clip transform (model/preprocess.py) and the training loaders that use it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mone.model.data import load_clip_folder
from mone.model.preprocess import (
    channels_first,
    clip_pixels,
    model_pixels,
    picture,
    sample_indices,
)

pytestmark = pytest.mark.model


def test_sample_indices_are_segment_centres() -> None:
    assert sample_indices(16, 8) == [1, 3, 5, 7, 9, 11, 13, 15]
    assert sample_indices(12, 8) == [0, 2, 3, 5, 6, 8, 9, 11]
    assert sample_indices(8, 8) == list(range(8))
    assert sample_indices(3, 8) == [0, 0, 0, 1, 1, 2, 2, 2]  # too few frames: repeated, always 8
    assert sample_indices(1, 4) == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="at least one frame"):
        sample_indices(0, 8)


@pytest.mark.parametrize(
    ("shape", "mode"), [((5, 7), "L"), ((5, 7, 1), "L"), ((5, 7, 3), "RGB"), ((5, 7, 4), "RGBA")]
)
def test_arrays_are_pictures(shape: tuple[int, ...], mode: str) -> None:
    a = np.arange(np.prod(shape), dtype=np.uint8).reshape(shape)
    img = picture(a)
    assert img.mode == mode
    assert img.size == (7, 5)
    assert np.array_equal(np.asarray(img), a[..., 0] if shape[-1:] == (1,) else a)


def test_arrays_must_be_uint8_pictures() -> None:
    with pytest.raises(ValueError, match="uint8"):
        picture(np.zeros((4, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="shape"):
        picture(np.zeros((4, 4, 2), dtype=np.uint8))


def test_an_array_and_its_image_give_the_same_pixels() -> None:
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, size=(20, 30, 4), dtype=np.uint8)
    for chans, size in ((1, 16), (3, 16), (1, 30)):
        want = model_pixels(Image.fromarray(rgba, "RGBA"), chans, size)
        assert np.array_equal(model_pixels(rgba, chans, size), want)


def test_grey_is_pillow_luma_not_a_channel_mean() -> None:
    rgb = np.zeros((4, 4, 3), dtype=np.uint8)
    rgb[..., 1] = 200  # pure green: luma 0.587 * 200 = 117, a channel mean would be 67
    assert int(model_pixels(rgb, 1, 4)[0, 0]) == 117


def test_clip_pixels_converts_each_frame_then_samples() -> None:
    frames = np.stack([np.full((6, 10, 3), 10 * t, dtype=np.uint8) for t in range(12)])  # (T', H, W, C)
    clip = clip_pixels(frames, 3, 8, 8)
    assert clip.shape == (8, 8, 8, 3)
    assert clip[:, 0, 0, 0].tolist() == [10 * i for i in sample_indices(12, 8)]
    assert channels_first(clip, 3).shape == (8, 3, 8, 8)
    assert channels_first(clip_pixels(frames, 1, 8, 8), 1).shape == (8, 1, 8, 8)


def test_clip_folder_of_arrays_and_frame_images_is_sampled_like_served_clips(tmp_path: Path) -> None:
    frames = np.stack([np.full((30, 40, 3), (10 * t, 5 * t, 0), dtype=np.uint8) for t in range(12)])
    (tmp_path / "arr").mkdir()
    np.save(tmp_path / "arr" / "c.npy", frames)
    (tmp_path / "pics" / "c").mkdir(parents=True)
    for t, f in enumerate(frames):
        Image.fromarray(f).save(tmp_path / "pics" / "c" / f"{t:02d}.png")
    ds = load_clip_folder(tmp_path, size=16, channels=1, num_frames=8)
    assert ds.x.shape == (2, 8, 1, 16, 16)
    want = torch.from_numpy(channels_first(clip_pixels(list(frames), 1, 16, 8), 1))
    assert torch.equal(ds.x[0], want)
    assert torch.equal(ds.x[1], want)


def test_the_module_does_not_import_torch() -> None:
    """The server's clip decode workers import it and must stay free of torch."""
    code = "import sys, model.preprocess, server.media.video; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
