"""IDX loader, Fashion-MNIST discovery and folder data sets (model/data.py)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from mone.model.data import (
    FASHION_MNIST_CLASSES,
    DataError,
    load_clip_folder,
    load_fashion_mnist,
    load_image_folder,
    read_idx,
)
from mone.model.preprocess import normalize

pytestmark = pytest.mark.model


def idx_bytes(a: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, a.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in a.shape)
    return header + a.astype(np.uint8).tobytes()


def write_fake_fmnist(root: Path, n: int = 6) -> None:
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 10
        (root / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images)))
        (root / f"{prefix}-labels-idx1-ubyte").write_bytes(idx_bytes(labels))


def test_read_idx_gz_and_raw(tmp_path: Path) -> None:
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a.idx").write_bytes(idx_bytes(a))
    (tmp_path / "a.idx.gz").write_bytes(gzip.compress(idx_bytes(a)))
    np.testing.assert_array_equal(read_idx(tmp_path / "a.idx"), a)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.idx.gz"), a)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b[:-5], "header says"),  # truncated data
        (lambda b: b + b"\x00", "header says"),  # trailing bytes
        (lambda b: b"\x01\x02" + b[2:], "bad magic"),
        (lambda b: b[:2] + b"\x07" + b[3:], "element type"),
        (lambda b: b[:6], "truncated IDX header"),
        (lambda b: b"", "bad magic"),
    ],
)
def test_read_idx_rejects_corrupt_files(tmp_path: Path, mutate, message: str) -> None:
    good = idx_bytes(np.zeros((3, 28, 28), dtype=np.uint8))
    path = tmp_path / "bad-images-idx3-ubyte"
    path.write_bytes(mutate(good))
    with pytest.raises(DataError, match=message) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_rejects_corrupt_gzip(tmp_path: Path) -> None:
    path = tmp_path / "x-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((2, 2), dtype=np.uint8)))[:-12])
    with pytest.raises(DataError, match="corrupt gzip"):
        read_idx(path)


def test_missing_data_set_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", tmp_path)


def test_fashion_mnist_from_a_directory(tmp_path: Path) -> None:
    write_fake_fmnist(tmp_path)
    ds = load_fashion_mnist("test", tmp_path)
    assert ds.x.shape == (6, 1, 28, 28)
    assert ds.x.dtype == torch.uint8
    assert ds.y.tolist() == [0, 1, 2, 3, 4, 5]
    assert ds.classes == FASHION_MNIST_CLASSES


def test_image_folder(tmp_path: Path) -> None:
    Image = pytest.importorskip("PIL.Image")
    for cls, value in (("cats", 10), ("dogs", 200)):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.fromarray(np.full((40, 30, 3), value + i, dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    ds = load_image_folder(tmp_path, size=28, channels=1)
    assert ds.classes == ["cats", "dogs"]
    assert ds.x.shape == (4, 1, 28, 28)
    assert ds.y.tolist() == [0, 0, 1, 1]
    assert int(ds.x[2, 0, 5, 5]) == 200


def test_clip_folder_npy(tmp_path: Path) -> None:
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        np.save(tmp_path / cls / "c.npy", np.zeros((12, 28, 28), dtype=np.uint8))
    ds = load_clip_folder(tmp_path, size=28, channels=1, num_frames=8)
    assert ds.x.shape == (2, 8, 1, 28, 28)
    assert ds.y.tolist() == [0, 1]


def test_empty_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no class sub-folders"):
        load_image_folder(tmp_path, 28, 1)


def test_normalize() -> None:
    x = torch.tensor([[[[0, 255]]]], dtype=torch.uint8)
    assert normalize(x, (0.5,), (0.5,)).flatten().tolist() == [-1.0, 1.0]
