"""`mone-train` end to end on a small subset of Fashion-MNIST (model/train.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import load_checkpoint
from model.data import FASHION_MNIST_DIR
from model.train import ADAPTIVE_GRID, TrainConfig, lr_at, parse_args, train
from tests.system import missing

pytestmark = pytest.mark.model


@pytest.fixture
def fashion_mnist() -> Path:
    """The data set the training runs read; its absence skips them (fails them in CI, tests/system.py)."""
    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        missing("Fashion-MNIST", "dataset-fashion-mnist")
    return FASHION_MNIST_DIR


SMALL = [
    "--train-limit", "640", "--val-size", "200", "--val-clips", "16", "--batch-size", "64",
    "--clip-every", "4", "--clip-batch-size", "8", "--lr", "2e-3", "--warmup-steps", "3",
    "--val-capacities", "1.0", "0.25", "--no-progress", "--threads", "2",
]  # fmt: skip


def epochs_of(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "train_loss" in r]


def test_parse_args_into_frozen_config() -> None:
    cfg = parse_args(["--out", "x", "--adaptive", "--epochs", "3", "--val-capacities", "1", "0.5"])
    assert isinstance(cfg, TrainConfig)
    assert cfg.adaptive
    assert cfg.epochs == 3
    assert cfg.val_capacities == (1.0, 0.5)
    with pytest.raises(AttributeError):
        cfg.epochs = 4  # type: ignore[misc]


def test_lr_schedule_warms_up_then_decays() -> None:
    cfg = TrainConfig(lr=1e-3, min_lr=1e-5, warmup_steps=10)
    lrs = [lr_at(s, 200, cfg) for s in range(200)]
    assert lrs[0] < lrs[9] == pytest.approx(1e-3)
    assert lrs[-1] == pytest.approx(1e-5, rel=0.05)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert min(ADAPTIVE_GRID) == 0.15
    assert max(ADAPTIVE_GRID) == 0.95


@pytest.mark.usefixtures("fashion_mnist")
def test_smoke_run_checkpoint_and_resume(tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(parse_args(["--out", str(out), "--epochs", "2", "--adaptive", *SMALL]))
    first = epochs_of(out)
    assert [r["epoch"] for r in first] == [1, 2]
    assert first[1]["train_loss"] < first[0]["train_loss"] < 2.35  # starts near ln(10) and falls
    ck = load_checkpoint(out / "last")
    assert ck.labels[0] == "T-shirt/top"
    assert ck.meta["epoch"] == 2
    with torch.no_grad():
        assert ck.model(torch.zeros(2, 1, 28, 28), 0.5).logits.shape == (2, 10)
    # --resume continues from epoch 2 with the saved optimizer state.
    train(parse_args(["--out", str(out), "--epochs", "3", "--adaptive", "--resume", *SMALL]))
    resumed = epochs_of(out)
    assert [r["epoch"] for r in resumed] == [1, 2, 3]
    assert resumed[2]["step"] > resumed[1]["step"]
    assert load_checkpoint(out / "last").meta["epoch"] == 3


@pytest.mark.usefixtures("fashion_mnist")
def test_fixed_capacity_and_init_from(tmp_path: Path) -> None:
    base = tmp_path / "dense"
    args = ["--epochs", "1", "--max-steps", "4", *SMALL]
    train(parse_args(["--out", str(base), "--capacity", "1.0", *args]))
    tuned = tmp_path / "tuned"
    init = ["--init-from", str(base / "last"), "--alpha-init", "0.3"]
    train(parse_args(["--out", str(tuned), *init, "--capacity", "0.5", *args]))
    alpha = load_checkpoint(tuned / "last").model.alpha.item()
    assert 0.0 < alpha < 1.0
    assert alpha == pytest.approx(0.3, abs=0.02)  # set, then moved by at most a few Adam steps
    rec = epochs_of(tuned)[-1]
    assert "val_acc@0.5" in rec
    assert rec["step"] == 4


@pytest.mark.slow
@pytest.mark.usefixtures("fashion_mnist")
def test_ddp_two_processes_gloo(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "model.train", "--out", str(out), "--epochs", "1", "--max-steps", "6", "--adaptive",
           *SMALL[:-2], "--threads", "1"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = epochs_of(out)[-1]
    assert rec["step"] == 6
    ck = load_checkpoint(out / "last")
    assert ck.meta["step"] == 6


@pytest.mark.slow
@pytest.mark.usefixtures("fashion_mnist")
def test_default_recipe_script_runs_both_chains(tmp_path: Path) -> None:
    """scripts/train-default.sh (the shipped checkpoint's recipe) runs its five stages, each from the last."""
    runs = tmp_path / "runs"
    small = [a for a in SMALL if a != "--no-progress"][:-2]
    env = {
        **os.environ,
        "RUNS": str(runs),
        "PY": f"{sys.executable} -m model.train",
        **dict.fromkeys(["EPOCHS", "EPOCHS2", "STAGE1", "FT", "FT2"], "1"),
        "EXTRA": " ".join([*small, "--threads", "1", "--max-steps", "3"]),
    }
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        ["bash", str(root / "scripts" / "train-default.sh")],
        env=env, cwd=root, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    logs = "".join(p.read_text()[-2000:] for p in runs.glob("*.log"))
    assert proc.returncode == 0, proc.stdout + proc.stderr + logs
    for name in ("dense", "dense2", "stage1", "mone", "mone2"):
        assert epochs_of(runs / name)[-1]["step"] == 3, name
    parent = {"dense2": "dense", "mone": "stage1", "mone2": "mone"}
    for name, before in parent.items():
        meta = load_checkpoint(runs / name / "last").meta["train_config"]
        assert meta["init_from"] == str(runs / before / "last")
        assert meta["adaptive"] == name.startswith("mone")
    assert "MoNE" in proc.stdout
    assert "dense baseline" in proc.stdout
