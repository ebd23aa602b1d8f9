"""Fixtures for client tests: a real mone-serve process on 127.0.0.1 serving a small random checkpoint, and
small inputs.

The checkpoint is a random Mi/4 with a non-zero head (`--random-init` zeros it, so every class would tie) and
Fashion-MNIST labels, so that predictions differ between capacities.  Every test here is marked `clients`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clients.media import mp4_bytes
from tests.live_server import free_port, start_server, stop_server  # noqa: F401  (re-exported)

ROOT = Path(__file__).resolve().parents[2]


LABELS = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]


def make_checkpoint(path: Path) -> Path:
    import torch

    from model import MoNE, MoNEConfig, save_checkpoint

    torch.manual_seed(0)
    net = MoNE(MoNEConfig.from_variant("Mi/4", num_classes=10))
    torch.nn.init.normal_(net.head.weight, std=0.5)
    profile = {"capacities": [0.25, 0.5, 1.0], "accuracy": [0.7, 0.8, 0.9]}
    return save_checkpoint(path, net.eval(), labels=LABELS, profile=profile, meta={"test": True})


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="session")
def server_url(checkpoint_dir: Path) -> Iterator[str]:
    proc, base = start_server(checkpoint_dir)
    try:
        yield base
    finally:
        stop_server(proc)


def picture(seed: int = 0, size: int = 28) -> np.ndarray:
    """A grey picture: a bright square on a dark background, placed by `seed`."""
    rng = np.random.default_rng(seed)
    arr = (rng.random((size, size)) * 40).astype(np.uint8)
    x, y = rng.integers(0, size // 2, 2)
    arr[y : y + size // 3, x : x + size // 3] = 230
    return arr


def clip_frames(frames: int = 8, size: int = 28) -> np.ndarray:
    """(T, H, W) uint8: a square moving left to right."""
    out = np.zeros((frames, size, size), dtype=np.uint8)
    for t in range(frames):
        x = t * (size - 8) // max(1, frames - 1)
        out[t, 10:18, x : x + 8] = 255
    return out


@pytest.fixture
def image_path(tmp_path: Path) -> Path:
    path = tmp_path / "square.png"
    Image.fromarray(picture()).save(path)
    return path


@pytest.fixture
def clip_path(tmp_path: Path) -> Path:
    path = tmp_path / "moving.mp4"
    path.write_bytes(mp4_bytes(list(clip_frames())))
    return path
