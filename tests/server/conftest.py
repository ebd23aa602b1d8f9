"""Shared fixtures for server tests: a small random Mi/4 checkpoint, fast settings and an in-process client.

Every test here is marked `server`; async tests run on anyio's asyncio backend, one event loop per module
so that a module shares one started app.
"""

from __future__ import annotations

import gzip
import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from fastapi import FastAPI
from PIL import Image

from model import MoNE, MoNEConfig, save_checkpoint
from server.app import create_app
from server.config import Settings

LABELS = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
FASHION_TEST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


def make_model(seed: int = 0) -> MoNE:
    """A random Mi/4 with a non-zero head (the default init zeros it) and a non-zero router scale."""
    torch.manual_seed(seed)
    net = MoNE(MoNEConfig.from_variant("Mi/4", num_classes=10))
    torch.nn.init.normal_(net.head.weight, std=0.5)
    return net.eval()


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt")
    profile = {"capacities": [0.25, 0.5, 1.0], "gflops": [0.03, 0.06, 0.12], "accuracy": [0.7, 0.8, 0.9]}
    save_checkpoint(path, make_model(), labels=LABELS, profile=profile, meta={"test": True})
    return path


def fast_settings(checkpoint: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "checkpoint": checkpoint,
        "calibration_batch_sizes": [1, 4],
        "calibration_capacities": [0.125, 1.0],
        "calibration_repeats": 1,
        "warmup_iters": 1,
        "max_batch_size": 8,
        "max_batch_wait_ms": 2.0,
        "threads": 1,
        "decode_workers": 1,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="module")
def settings(checkpoint_dir: Path) -> Settings:
    return fast_settings(checkpoint_dir)


@pytest.fixture(scope="module")
async def app(settings: Settings) -> AsyncIterator[FastAPI]:
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture(scope="module")
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as c:
        yield c


def fashion_images(n: int) -> list[np.ndarray]:
    """n 28x28 uint8 test pictures: Fashion-MNIST's test set when installed, else seeded noise blobs."""
    if FASHION_TEST.exists():
        with gzip.open(FASHION_TEST) as f:
            data = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)
        return [data[i].copy() for i in range(n)]
    rng = np.random.default_rng(0)
    return [(rng.random((28, 28)) * 255).astype(np.uint8) for _ in range(n)]


def encode(img: Image.Image, fmt: str = "PNG", **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def png(arr: np.ndarray) -> bytes:
    return encode(Image.fromarray(arr))


def encode_clip(frames: list[np.ndarray], fmt: str = "mp4", codec: str = "libx264", fps: int = 8) -> bytes:
    """Encode grey uint8 frames as a small clip with PyAV."""
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format=fmt) as container:
        stream = container.add_stream(codec, rate=fps)
        h, w = frames[0].shape[:2]
        stream.width, stream.height = w, h
        stream.pix_fmt = "yuv420p"
        for arr in frames:
            rgb = np.repeat(arr[:, :, None], 3, axis=2) if arr.ndim == 2 else arr
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


@pytest.fixture
def images() -> list[np.ndarray]:
    return fashion_images(8)
