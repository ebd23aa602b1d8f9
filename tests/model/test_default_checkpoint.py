"""The committed default checkpoint (checkpoints/default): loads, is small, and its profile reproduces."""

from __future__ import annotations

from pathlib import Path

import pytest

from mone.model import gflops, load_checkpoint
from mone.model.data import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, load_fashion_mnist
from mone.model.evaluate import accuracy_of, mone_fn
from tests.system import missing

pytestmark = pytest.mark.model
ROOT = Path(__file__).resolve().parents[2]
DEFAULT = ROOT / "checkpoints" / "default"


def test_default_checkpoint_loads_with_profile() -> None:
    ck = load_checkpoint(DEFAULT)
    assert ck.labels == FASHION_MNIST_CLASSES
    assert ck.config.variant == "Mi/4"
    assert sum(f.stat().st_size for f in DEFAULT.iterdir()) < 25 * 2**20
    p = ck.profile
    assert p is not None
    n = len(p["capacities"])
    assert n >= 10
    assert all(len(p[k]) == n for k in ("gflops", "accuracy", "clip_gflops", "clip_accuracy"))
    for c, g in zip(p["capacities"], p["gflops"], strict=True):
        assert g == pytest.approx(gflops(ck.config, c), abs=1e-6)  # stored rounded to 1e-6
    assert p["gflops"] == sorted(p["gflops"])


@pytest.mark.slow
def test_profile_accuracy_reproduces_on_the_test_set() -> None:
    if not FASHION_MNIST_DIR.is_dir():
        missing("Fashion-MNIST", "dataset-fashion-mnist")
    ck = load_checkpoint(DEFAULT)
    test = load_fashion_mnist("test")
    profile = dict(zip(ck.profile["capacities"], ck.profile["accuracy"], strict=True))  # type: ignore[index]
    for c in (0.5, 1.0):
        acc = accuracy_of(mone_fn(ck.model, c), test.x, test.y, batch=1000)
        assert abs(acc - profile[c]) <= 0.3, (c, acc, profile[c])
