"""Fixtures for client tests: a real mone-serve process on 127.0.0.1 serving a small random checkpoint, and
small inputs.

The checkpoint is a random Mi/4 with a non-zero head (`--random-init` zeros it, so every class would tie) and
Fashion-MNIST labels, so that predictions differ between capacities (tests/support/models.py).  Every test
here is marked `clients` (tests/conftest.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from mone.clients.media import mp4_bytes
from tests.live_server import start_server, stop_server
from tests.support.media import clip_frames, picture


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.support.models import make_checkpoint  # torch, only for the tests that start a server

    return make_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="session")
def server_url(checkpoint_dir: Path) -> Iterator[str]:
    proc, base = start_server(checkpoint_dir)
    try:
        yield base
    finally:
        stop_server(proc)


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
