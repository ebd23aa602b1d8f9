"""Batch augmentation (model/augment.py): shapes, dtypes, determinism, and that each op does something."""

from __future__ import annotations

import pytest
import torch

from mone.model.augment import (
    RANDAUG_OPS,
    _apply_op,
    crop_flip,
    mix,
    rand_augment,
    random_erase,
    soft_targets,
)


def images(b: int = 16, c: int = 1, size: int = 28, seed: int = 0) -> torch.Tensor:
    """uint8 items: a bright rectangle (of varying size) on black, like a Fashion-MNIST item."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.zeros(b, c, size, size, dtype=torch.uint8)
    for i in range(b):
        h, w = int(torch.randint(8, 20, (), generator=gen)), int(torch.randint(8, 20, (), generator=gen))
        x[i, :, 4 : 4 + h, 6 : 6 + w] = torch.randint(90, 255, (c, h, w), generator=gen, dtype=torch.uint8)
    return x


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("c", [1, 3])
def test_uint8_ops_keep_shape_and_dtype(c: int) -> None:
    x = images(c=c, size=32)
    for out in (
        crop_flip(x, gen(), 2, True),
        rand_augment(x, gen(), 2, 0.5),
        random_erase(x, gen(), 0.5),
    ):
        assert out.shape == x.shape
        assert out.dtype == torch.uint8


def test_ops_are_deterministic_given_the_generator() -> None:
    x = images()
    for fn in (
        lambda g: rand_augment(x, g, 2, 0.7),
        lambda g: random_erase(x, g, 0.8),
        lambda g: crop_flip(x, g, 2, True),
    ):
        assert torch.equal(fn(gen(3)), fn(gen(3)))
        assert not torch.equal(fn(gen(3)), fn(gen(4)))


@pytest.mark.parametrize("op", [op for op in RANDAUG_OPS if op != "identity"])
def test_every_randaugment_op_changes_the_image(op: str) -> None:
    x = images(b=4).float()
    m = torch.full((4,), 0.6)
    out = _apply_op(op, x, m)
    assert out.shape == x.shape
    assert (out - x).abs().max() > 1.0, op
    assert torch.equal(_apply_op("identity", x, m), x)


def test_randaugment_magnitude_zero_keeps_pixels_except_autocontrast() -> None:
    x = images(b=32)
    out = rand_augment(x, gen(), 3, 0.0)
    # At magnitude 0 every op is the identity but autocontrast (which has no magnitude): items whose range
    # already spans 0..255 stay exactly as they were.
    full_range = (x.amin(dim=(1, 2, 3)) == 0) & (x.amax(dim=(1, 2, 3)) == 255)
    assert torch.equal(out[full_range], x[full_range])
    with pytest.raises(ValueError, match="magnitude"):
        rand_augment(x, gen(), 1, 1.5)


def test_random_erasing_touches_one_rectangle_per_chosen_image() -> None:
    x = torch.zeros(200, 1, 28, 28, dtype=torch.uint8)
    out = random_erase(x, gen(1), prob=0.5)
    changed = (out != x).flatten(1).any(1)
    assert 60 < int(changed.sum()) < 140  # about half the images
    for i in changed.nonzero().flatten().tolist()[:20]:
        rows, cols = (out[i, 0] != 0).nonzero(as_tuple=True)
        # Noise pixels all lie in one box whose area is at most a third of the image.
        h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert h * w <= 28 * 28 / 3 + 28
    assert torch.equal(random_erase(x, gen(1), prob=0.0), x)


def test_mixup_and_cutmix_mix_targets_by_the_pasted_share() -> None:
    x = torch.randn(8, 1, 28, 28)
    y = soft_targets(torch.arange(8) % 4, 4, 0.0)
    assert torch.allclose(y.sum(-1), torch.ones(8))
    same, ty, lam = mix(x, y, gen(), 0.0, 0.0)
    assert same is x
    assert ty is y
    assert lam == 1.0
    mx, my, lam = mix(x, y, gen(), 0.8, 0.0)
    assert 0.0 <= lam <= 1.0
    assert torch.allclose(mx, lam * x + (1 - lam) * x.flip(0))
    assert torch.allclose(my, lam * y + (1 - lam) * y.flip(0))
    cx, cy, lam = mix(x, y, gen(5), 0.0, 1.0)
    pasted = (cx != x).flatten(1).any(0).float().mean().item()  # share of pixels from the other item
    assert pasted == pytest.approx(1 - lam, abs=1e-6)
    assert torch.allclose(cy.sum(-1), torch.ones(8))
    assert torch.equal(mix(x, y, gen(5), 0.0, 1.0)[0], cx)  # deterministic


def test_cutmix_pastes_the_same_box_in_every_frame_of_a_clip() -> None:
    clips = torch.randn(4, 8, 1, 28, 28)
    y = soft_targets(torch.arange(4), 4, 0.1)
    out, _, lam = mix(clips, y, gen(2), 0.0, 1.0)
    assert out.shape == clips.shape
    box = out != clips  # (B, T, C, H, W)
    assert lam < 1.0
    assert torch.equal(box[:, :1].expand_as(box), box)
