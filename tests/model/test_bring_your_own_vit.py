"""Bring your own ViT, from the command line only: a timm-layout weights file and a folder of labelled images
-> `mone-train --from-timm` (a real process) -> a checkpoint -> a real `mone-serve` process classifies."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from mone.model import load_checkpoint
from mone.model.preprocess import normalize
from tests.live_server import ROOT, start_server, stop_server
from tests.model.test_timm_import import TimmLikeViT

pytestmark = pytest.mark.slow
CLASSES = ["blue", "green", "red"]


def picture(label: int, seed: int, size: int = 40) -> np.ndarray:
    """A noisy image whose dominant channel is the class, (size, size, 3) uint8."""
    rng = np.random.default_rng([label, seed])
    a = rng.integers(0, 90, size=(size, size, 3))
    a[..., 2 - label] += 150  # blue -> channel 2, green -> 1, red -> 0
    return a.clip(0, 255).astype(np.uint8)


def png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def test_timm_weights_to_served_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    vit = TimmLikeViT(img=32, patch=8, dim=64, depth=2, heads=4)  # 7 classes: the data has 3
    weights = tmp_path / "my-vit.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(weights))
    folder = tmp_path / "images"
    for label, name in enumerate(CLASSES):
        (folder / name).mkdir(parents=True)
        for i in range(12):  # 40x40 files: the trainer resizes them to the model's 32x32
            (folder / name / f"{i}.png").write_bytes(png(picture(label, i)))
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "mone.model.train", "--from-timm", str(weights), "--timm-heads", "4",
        "--image-folder", str(folder), "--out", str(out), "--adaptive", "--epochs", "4",
        "--batch-size", "8", "--clip-every", "0", "--val-size", "6", "--val-capacities", "1.0", "0.5",
        "--lr", "2e-3", "--warmup-steps", "2", "--no-progress", "--threads", "1",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ck = load_checkpoint(out / "last")
    assert ck.labels == CLASSES
    cfg = ck.config
    assert (cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.dim, cfg.depth, cfg.num_classes) == (
        32,
        8,
        3,
        64,
        2,
        3,
    )
    # The fine-tune changed the backbone it started from, and kept its shape.
    assert not torch.equal(ck.model.blocks[0].mlp.fc1.weight, vit.blocks[0].mlp.fc1.weight)

    sample = picture(0, 99, size=32)  # model-sized: the server and the offline forward see the same pixels
    x = torch.from_numpy(sample).permute(2, 0, 1).unsqueeze(0)
    with torch.no_grad():
        offline = int(ck.model(normalize(x, cfg.mean, cfg.std), 1.0).logits.argmax(-1))
    server, base = start_server(out / "last")
    try:
        r = httpx.post(
            base + "/v1/classify",
            files={"file": ("blue.png", png(sample), "image/png")},
            data={"capacity": "1.0"},
            timeout=30,
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["top_k"][0]["label"] == CLASSES[offline]
        assert body["served"]["capacity"] == pytest.approx(1.0)
        models = httpx.get(base + "/v1/models", timeout=10).json()
        assert "blue" in str(models)
    finally:
        stop_server(server)
