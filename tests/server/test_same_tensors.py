"""Training and serving reach the model with the same tensors (model/preprocess.py).

A file in a training folder (`mone.model.data.load_image_folder` / `load_clip_folder`, normalised by
`mone.model.preprocess.normalize` as training and evaluation do) and the same file sent to `/v1/classify`
must be
bit for bit the same model input; so must a Fashion-MNIST picture and the PNG of it.  The server's side is the
tensor its runner hands to the model's forward, captured in an app started in-process.  Pictures are chosen so
that the old divergences would show: sizes that need resizing, RGB pictures for a grey model, transparency,
an EXIF orientation, and clips longer than the model's frame count.
"""

from __future__ import annotations

import gzip
import io
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from fastapi import FastAPI
from PIL import Image
from torch import Tensor

from mone.model import MoNE, MoNEConfig, save_checkpoint
from mone.model.data import load_clip_folder, load_fashion_mnist, load_image_folder
from mone.model.preprocess import normalize
from mone.server.http.app import create_app
from tests.support.media import encode, encode_clip
from tests.support.models import fast_settings

pytestmark = pytest.mark.anyio

SAMPLE_GIF = Path(__file__).resolve().parents[2] / "clients" / "web" / "samples" / "sweep.gif"
CONFIGS = {
    "grey-28": MoNEConfig.from_variant("Mi/4", num_classes=2),
    "rgb-32": MoNEConfig.from_variant(
        "Mi/4", num_classes=2, in_chans=3, img_size=32, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)
    ),
}


class Captured:
    """The inputs the served model's forward received, in order."""

    def __init__(self) -> None:
        self.inputs: list[Tensor] = []

    def take(self) -> Tensor:
        assert len(self.inputs) == 1, f"expected one forward, got {len(self.inputs)}"
        return self.inputs.pop()


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def cfg(request: pytest.FixtureRequest) -> MoNEConfig:
    return CONFIGS[request.param]


@pytest.fixture(scope="module")
async def served(
    cfg: MoNEConfig, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[httpx.AsyncClient, Captured]]:
    """A server of a random model of `cfg`, and what reaches that model's forward."""
    path = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    save_checkpoint(path, MoNE(cfg).eval(), labels=["a", "b"])
    app: FastAPI = create_app(fast_settings(path, calibrate=False))
    async with app.router.lifespan_context(app):
        model = app.state.engine.runner.model
        captured = Captured()
        forward = model.forward

        def capture(x: Tensor, *args: Any, **kwargs: Any) -> Any:
            captured.inputs.append(x.detach().clone())
            return forward(x, *args, **kwargs)

        model.forward = capture
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            yield client, captured


async def served_input(
    served: tuple[httpx.AsyncClient, Captured], path: Path, content_type: str, kind: str = "auto"
) -> Tensor:
    """The model input (T, C, H, W) of the file at `path` sent to /v1/classify."""
    client, captured = served
    captured.inputs.clear()
    files = {"file": (path.name, path.read_bytes(), content_type)}
    r = await client.post("/v1/classify", files=files, data={"kind": kind})
    assert r.status_code == 200, r.text
    x = captured.take()
    assert x.shape[0] == 1
    return x[0]


def training_input(x: Tensor, cfg: MoNEConfig) -> Tensor:
    """One uint8 training item (C, H, W) or (T, C, H, W) as training and evaluation feed it to the model."""
    return normalize(x.unsqueeze(0), cfg.mean, cfg.std)[0]


def pattern(h: int, w: int, seed: int, channels: int = 3) -> np.ndarray:
    """A picture with detail everywhere (smooth gradients and noise), so that any difference in the
    conversion, the resize filter or the frame choice changes some pixels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), (xx + yy) * 4 % 256], axis=-1)
    noise = rng.integers(-40, 41, size=(h, w, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)[..., :channels]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[Path, str]]]:
    """root/<class>/<file>: files that each need some part of the transform."""
    root = tmp_path_factory.mktemp("images")
    (root / "a").mkdir()
    (root / "b").mkdir()
    files: dict[str, tuple[Path, str]] = {}

    def add(cls: str, name: str, data: bytes, content_type: str) -> None:
        path = root / cls / name
        path.write_bytes(data)
        files[name] = (path, content_type)

    add("a", "0-rgb-40x30.png", encode(Image.fromarray(pattern(30, 40, 1))), "image/png")
    add("a", "1-grey-28.png", encode(Image.fromarray(pattern(28, 28, 2, 1)[..., 0])), "image/png")
    rgba = np.concatenate([pattern(36, 36, 3), pattern(36, 36, 4, 1)], axis=-1)
    add("a", "2-rgba-36.png", encode(Image.fromarray(rgba, "RGBA")), "image/png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    jpeg = encode(Image.fromarray(pattern(24, 50, 5)), "JPEG", quality=90, exif=exif.tobytes())
    add("b", "3-rgb-50x24-exif.jpg", jpeg, "image/jpeg")
    add("b", "4-rgb-32.jpg", encode(Image.fromarray(pattern(32, 32, 6)), "JPEG", quality=85), "image/jpeg")
    yield files
    shutil.rmtree(root)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str, str]]:
    """root/<class>/<clip>: an RGB mp4 of 12 frames (more than the model's 8: sampling matters, and the
    frames need resizing) and the web page's animated GIF sample (sent with kind=clip)."""
    root = tmp_path_factory.mktemp("clips")
    (root / "moving").mkdir()
    (root / "sweep").mkdir()
    frames = [np.roll(pattern(30, 40, 7), 3 * t, axis=1) for t in range(12)]
    mp4 = root / "moving" / "c.mp4"
    mp4.write_bytes(encode_clip(frames))
    files = {mp4.name: (mp4, "video/mp4", "auto")}
    if SAMPLE_GIF.is_file():
        gif = root / "sweep" / "sweep.gif"
        shutil.copyfile(SAMPLE_GIF, gif)
    else:  # the web client's samples are not part of every install
        gif = root / "sweep" / "made.gif"
        pictures = [Image.fromarray(pattern(28, 28, 10 + t)) for t in range(10)]
        buf = io.BytesIO()
        pictures[0].save(buf, "GIF", save_all=True, append_images=pictures[1:], duration=100)
        gif.write_bytes(buf.getvalue())
    files[gif.name] = (gif, "image/gif", "clip")
    return files


async def test_image_folder_items_are_served_as_trained(
    cfg: MoNEConfig,
    served: tuple[httpx.AsyncClient, Captured],
    image_folder: dict[str, tuple[Path, str]],
) -> None:
    ds = load_image_folder(next(iter(image_folder.values()))[0].parents[1], cfg.img_size, cfg.in_chans)
    assert len(ds) == len(image_folder)
    for i, (path, content_type) in enumerate(sorted(image_folder.values())):
        got = await served_input(served, path, content_type)  # (1, C, H, W)
        want = training_input(ds.x[i], cfg)
        assert got.shape == (1, cfg.in_chans, cfg.img_size, cfg.img_size)
        assert torch.equal(got[0], want), path.name


async def test_clip_folder_items_are_served_as_trained(
    cfg: MoNEConfig,
    served: tuple[httpx.AsyncClient, Captured],
    clip_folder: dict[str, tuple[Path, str, str]],
) -> None:
    root = next(iter(clip_folder.values()))[0].parents[1]
    ds = load_clip_folder(root, cfg.img_size, cfg.in_chans, cfg.num_frames)
    assert ds.classes == ["moving", "sweep"]
    for i, (path, content_type, kind) in enumerate(sorted(clip_folder.values())):
        got = await served_input(served, path, content_type, kind)
        want = training_input(ds.x[i], cfg)
        assert got.shape == (cfg.num_frames, cfg.in_chans, cfg.img_size, cfg.img_size)
        assert torch.equal(got, want), path.name
        assert not torch.equal(got[0], got[-1]), "the clip's frames should differ"


def write_idx(root: Path, images: np.ndarray) -> None:
    def idx(a: np.ndarray) -> bytes:
        return (
            bytes([0, 0, 0x08, a.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in a.shape) + a.tobytes()
        )

    labels = np.arange(len(images), dtype=np.uint8) % 10
    (root / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx(images)))
    (root / "t10k-labels-idx1-ubyte").write_bytes(idx(labels))


async def test_fashion_mnist_items_are_served_as_trained(
    cfg: MoNEConfig, served: tuple[httpx.AsyncClient, Captured], tmp_path: Path
) -> None:
    """The data set's uint8 tensors (used as they are by a 28x28 grey model, resized by the shared transform
    otherwise) and a PNG of the same 28x28 picture."""
    images = np.stack([pattern(28, 28, 20 + i, 1)[..., 0] for i in range(3)])
    write_idx(tmp_path, images)
    ds = load_fashion_mnist("test", tmp_path, cfg.img_size, cfg.in_chans)
    if (cfg.img_size, cfg.in_chans) == (28, 1):
        assert torch.equal(ds.x[:, 0], torch.from_numpy(images))  # no copy through Pillow on the fast path
    for i, a in enumerate(images):
        path = tmp_path / f"{i}.png"
        path.write_bytes(encode(Image.fromarray(a)))
        got = await served_input(served, path, "image/png")
        assert torch.equal(got[0], training_input(ds.x[i], cfg))
