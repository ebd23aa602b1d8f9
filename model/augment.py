"""Training augmentation on whole batches: crop/flip, RandAugment-style ops, random erasing, mixup / cutmix.

Every function draws its randomness from a `torch.Generator` (on the CPU), so a batch's augmentation is a
pure function of (images, generator state): a resumed run sees the same batches as an uninterrupted one.
The ops on uint8 images (`crop_flip`, `rand_augment`, `random_erase`) run before clips are drawn from the
images; `mix` works on the normalised float batch (images or clips) and turns labels into soft targets.

RandAugment (Cubuk et al. 2020) here: each image gets `num_ops` rounds; in each round it draws one op from
`RANDAUG_OPS` and applies it at `magnitude` (0..1 of the op's range) with a random sign.  The op set suits
small grey images of objects centred on a black canvas (Fashion-MNIST): affine ops with zero fill, contrast,
brightness, sharpness, autocontrast, solarize; no colour ops, no equalise or posterize (28 px, 8 bits of grey
carry little to quantise).  Random erasing (Zhong et al. 2020) fills one rectangle per chosen image with
uniform noise.  Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019) pair each item with the batch in
reverse order, one mixing weight per batch, as timm does.

Shape legend: B items, T frames, C channels, H, W pixels, K classes.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

RANDAUG_OPS = (
    "identity",
    "rotate",
    "shear_x",
    "shear_y",
    "translate_x",
    "translate_y",
    "scale",
    "contrast",
    "brightness",
    "sharpness",
    "autocontrast",
    "solarize",
)
# Range of each op at magnitude 1.
MAX_ROTATE_DEG = 30.0
MAX_SHEAR = 0.3
MAX_TRANSLATE = 0.15  # of the image size (4 px on 28)
MAX_SCALE = 0.25  # zoom factor 1 +- this
MAX_ENHANCE = 0.9  # contrast / brightness / sharpness factor 1 +- this (PIL's 0.1 .. 1.9)


def crop_flip(x: Tensor, gen: torch.Generator, pad: int, hflip: bool) -> Tensor:
    """Random crop with zero padding and horizontal flip of uint8 (B, C, H, W) images."""
    B, C, H, W = x.shape
    if pad:
        xp = F.pad(x, (pad, pad, pad, pad))
        oy = torch.randint(0, 2 * pad + 1, (B,), generator=gen)
        ox = torch.randint(0, 2 * pad + 1, (B,), generator=gen)
        rows = (oy[:, None] + torch.arange(H))[:, None, :, None]  # (B, 1, H, 1)
        cols = (ox[:, None] + torch.arange(W))[:, None, None, :]  # (B, 1, 1, W)
        x = xp[torch.arange(B)[:, None, None, None], torch.arange(C)[None, :, None, None], rows, cols]
    if hflip:
        flip = torch.rand(B, generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x


def _affine(x: Tensor, theta: Tensor) -> Tensor:
    """Warp float (b, C, H, W) by output->input affine maps theta (b, 2, 3) in normalised coordinates."""
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _blend(x: Tensor, degenerate: Tensor, factor: Tensor) -> Tensor:
    """PIL ImageEnhance: degenerate + factor * (x - degenerate), per item."""
    return degenerate + factor.view(-1, 1, 1, 1) * (x - degenerate)


def _apply_op(op: str, x: Tensor, m: Tensor) -> Tensor:
    """One op on float (b, C, H, W) in [0, 255]; m (b,) signed magnitudes in [-1, 1]."""
    b = x.shape[0]
    eye = torch.eye(2, 3).expand(b, 2, 3).clone()
    if op == "identity":
        return x
    if op == "rotate":
        a = m * math.radians(MAX_ROTATE_DEG)
        eye[:, 0, 0], eye[:, 0, 1], eye[:, 1, 0], eye[:, 1, 1] = a.cos(), -a.sin(), a.sin(), a.cos()
        return _affine(x, eye)
    if op in ("shear_x", "shear_y"):
        row, col = (0, 1) if op == "shear_x" else (1, 0)
        eye[:, row, col] = m * MAX_SHEAR
        return _affine(x, eye)
    if op in ("translate_x", "translate_y"):
        eye[:, 0 if op == "translate_x" else 1, 2] = 2.0 * m * MAX_TRANSLATE  # normalised units span 2
        return _affine(x, eye)
    if op == "scale":
        s = 1.0 + m * MAX_SCALE
        eye[:, 0, 0], eye[:, 1, 1] = 1.0 / s, 1.0 / s
        return _affine(x, eye)
    factor = 1.0 + m * MAX_ENHANCE
    if op == "contrast":
        mean = x.mean(dim=(1, 2, 3), keepdim=True).expand_as(x)
        return _blend(x, mean, factor)
    if op == "brightness":
        return _blend(x, torch.zeros_like(x), factor)
    if op == "sharpness":
        C = x.shape[1]
        k = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
        smooth = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k.expand(C, 1, 3, 3), groups=C)
        return _blend(x, smooth, factor)
    if op == "autocontrast":
        lo = x.amin(dim=(2, 3), keepdim=True)
        hi = x.amax(dim=(2, 3), keepdim=True)
        span = (hi - lo).clamp_min(1.0)
        return torch.where(hi > lo, (x - lo) * (255.0 / span), x)
    if op == "solarize":
        threshold = (256.0 - 256.0 * m.abs()).view(-1, 1, 1, 1)
        return torch.where(x >= threshold, 255.0 - x, x)
    raise ValueError(f"unknown augmentation op {op!r}; known: {', '.join(RANDAUG_OPS)}")


def rand_augment(x: Tensor, gen: torch.Generator, num_ops: int, magnitude: float) -> Tensor:
    """RandAugment on uint8 (B, C, H, W): `num_ops` rounds of one random op per image at `magnitude`."""
    if not 0.0 <= magnitude <= 1.0:
        raise ValueError(f"magnitude must be in [0, 1], got {magnitude}")
    if num_ops <= 0 or len(x) == 0:
        return x
    out = x.float()
    for _ in range(num_ops):
        pick = torch.randint(len(RANDAUG_OPS), (len(x),), generator=gen)
        sign = torch.where(torch.rand(len(x), generator=gen) < 0.5, -1.0, 1.0)
        for k, op in enumerate(RANDAUG_OPS):
            rows = (pick == k).nonzero().flatten()
            if len(rows) and op != "identity":
                out[rows] = _apply_op(op, out[rows], sign[rows] * magnitude).clamp(0.0, 255.0)
    return out.round().to(torch.uint8)


def random_erase(
    x: Tensor, gen: torch.Generator, prob: float, area: tuple[float, float] = (0.02, 1 / 3)
) -> Tensor:
    """Random erasing on uint8 (B, C, H, W): with probability `prob` per image, one rectangle of `area`
    (fraction of the image) and aspect ratio in [0.3, 3.3] is filled with uniform noise."""
    B, C, H, W = x.shape
    if prob <= 0.0 or B == 0:
        return x
    chosen = torch.rand(B, generator=gen) < prob
    frac = area[0] + (area[1] - area[0]) * torch.rand(B, generator=gen)
    log_r = math.log(0.3) + (math.log(3.3) - math.log(0.3)) * torch.rand(B, generator=gen)
    h = (frac * H * W * log_r.exp()).sqrt().round().clamp(1, H).long()
    w = (frac * H * W / log_r.exp()).sqrt().round().clamp(1, W).long()
    top = (torch.rand(B, generator=gen) * (H - h + 1)).long()
    left = (torch.rand(B, generator=gen) * (W - w + 1)).long()
    rows = torch.arange(H)[None, :, None]
    cols = torch.arange(W)[None, None, :]
    box = (rows >= top[:, None, None]) & (rows < (top + h)[:, None, None])
    box = box & (cols >= left[:, None, None]) & (cols < (left + w)[:, None, None])  # (B, H, W)
    box = (box & chosen[:, None, None])[:, None]  # (B, 1, H, W)
    noise = torch.randint(0, 256, x.shape, generator=gen, dtype=torch.uint8)
    return torch.where(box, noise, x)


def soft_targets(y: Tensor, num_classes: int, smoothing: float) -> Tensor:
    """(B,) labels -> (B, K) label-smoothed one-hot targets."""
    return F.one_hot(y, num_classes).float() * (1.0 - smoothing) + smoothing / num_classes


def mix(
    x: Tensor,
    targets: Tensor,
    gen: torch.Generator,
    mixup_alpha: float,
    cutmix_alpha: float,
    prob: float = 1.0,
    switch_prob: float = 0.5,
) -> tuple[Tensor, Tensor, float]:
    """Mixup or CutMix of a float batch x (B, ..., H, W) with soft targets (B, K).

    With probability `prob` the batch is mixed with itself in reverse order: CutMix (with probability
    `switch_prob` when both are on) pastes one box, the same in every frame of a clip; mixup blends whole
    items.  Returns the batch, the mixed targets and the weight lam of the original items.
    """
    use_mixup, use_cutmix = mixup_alpha > 0, cutmix_alpha > 0
    if not (use_mixup or use_cutmix) or len(x) < 2 or float(torch.rand((), generator=gen)) >= prob:
        return x, targets, 1.0
    cut = use_cutmix and (not use_mixup or float(torch.rand((), generator=gen)) < switch_prob)
    rng = np.random.default_rng(int(torch.randint(2**62, (), generator=gen)))
    lam = float(rng.beta(cutmix_alpha, cutmix_alpha) if cut else rng.beta(mixup_alpha, mixup_alpha))
    other = x.flip(0)
    if cut:
        H, W = x.shape[-2:]
        ch, cw = int(H * math.sqrt(1.0 - lam)), int(W * math.sqrt(1.0 - lam))
        cy, cx = int(rng.integers(H)), int(rng.integers(W))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, H)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, W)
        x = x.clone()
        x[..., y0:y1, x0:x1] = other[..., y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (H * W)  # the pasted area decides the targets
    else:
        x = x * lam + other * (1.0 - lam)
    return x, targets * lam + targets.flip(0) * (1.0 - lam), lam
