"""Synthetic clip generator (model/clips.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mone.model.clips import NUM_FRAMES, eval_clips, make_clip, make_clips

pytestmark = pytest.mark.model


def item(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(1, 28, 28, dtype=torch.uint8)
    x[:, 6:22, 8:20] = torch.randint(120, 256, (1, 16, 12), generator=g, dtype=torch.uint8)
    return x


def test_deterministic_for_a_seed() -> None:
    a = make_clip(item(), seed=7)
    b = make_clip(item(), seed=7)
    c = make_clip(item(), seed=8)
    assert a.shape == (NUM_FRAMES, 1, 28, 28)
    assert a.dtype == torch.uint8
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_batch_equals_single_clips() -> None:
    images = torch.stack([item(0), item(1)])
    batch = make_clips(images, [3, 4])
    assert torch.equal(batch[0], make_clip(images[0], 3))
    assert torch.equal(batch[1], make_clip(images[1], 4))


def test_item_moves_and_background_is_static() -> None:
    clip = make_clip(item(), seed=5).float()  # (T, 1, 28, 28)
    assert not torch.equal(clip[0], clip[-1])  # the item moves or scales
    # Most 4x4 patches barely change between consecutive frames: redundant tokens.
    patches = clip.unfold(2, 4, 4).unfold(3, 4, 4)  # (T, 1, 7, 7, 4, 4)
    change = (patches[1:] - patches[:-1]).abs().amax(dim=(-1, -2))  # (T-1, 1, 7, 7)
    assert (change < 8).float().mean() > 0.4
    assert clip.max() > 100  # the item is visible


def test_test_clips_are_fixed() -> None:
    images = torch.stack([item(i) for i in range(5)])
    labels = torch.arange(5)
    x1, y1 = eval_clips(images, labels, count=3)
    x2, _ = eval_clips(images, labels, count=3)
    assert x1.shape == (3, NUM_FRAMES, 1, 28, 28)
    assert torch.equal(x1, x2)
    assert y1.tolist() == [0, 1, 2]


def test_write_mp4(tmp_path: Path) -> None:
    av = pytest.importorskip("av")
    from mone.model.clips import write_mp4

    path = write_mp4(make_clip(item(), seed=1), tmp_path / "c.mp4")
    with av.open(str(path)) as container:
        frames = list(container.decode(video=0))
    assert len(frames) == NUM_FRAMES
    assert (frames[0].width, frames[0].height) == (112, 112)
