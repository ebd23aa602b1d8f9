"""`mone-train` end to end on a small subset of Fashion-MNIST (model/train.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from mone.model import gflops, load_checkpoint
from mone.model.data import FASHION_MNIST_DIR
from mone.model.train import ADAPTIVE_GRID, TrainConfig, lr_at, parse_args, step_plan, steps_per_epoch, train
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
           "-m", "mone.model.train", "--out", str(out), "--epochs", "1", "--max-steps", "6", "--adaptive",
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
        "PY": f"{sys.executable} -m mone.model.train",
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


def test_every_option_has_a_help_text() -> None:
    from mone.model.evaluate import build_parser as eval_parser
    from mone.model.train import build_parser

    for parser in (build_parser(), eval_parser()):
        for action in parser._actions:
            if action.dest != "help":
                assert action.help, f"{parser.prog} {action.option_strings} has no help"
    assert "in-place distillation" in build_parser().format_help()


def test_clip_share_spreads_clip_steps_evenly() -> None:
    cfg = TrainConfig(batch_size=10, clip_share=0.25)
    image_steps, clip_steps = steps_per_epoch(400, cfg)
    assert (image_steps, clip_steps) == (40, 13)
    plan = step_plan(cfg, image_steps, clip_steps)
    assert plan.count(True) == 13
    assert plan.count(False) == 40
    gaps = [i for i, clip in enumerate(plan) if clip]
    assert max(b - a for a, b in zip(gaps, gaps[1:], strict=False)) <= 5  # no long runs without clips
    every = TrainConfig(batch_size=10, clip_every=4)
    assert step_plan(every, *steps_per_epoch(400, every))[:5] == [False, False, False, False, True]


@pytest.mark.usefixtures("fashion_mnist")
def test_distillation_needs_the_sandwich_schedule(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sandwich"):
        train(parse_args(["--out", str(tmp_path / "x"), "--adaptive", "--distill", "0.5", *SMALL]))


@pytest.mark.usefixtures("fashion_mnist")
def test_budget_run_with_the_full_recipe(tmp_path: Path) -> None:
    """Sandwich + distillation + augmentation + clip share + EMA: the run stops at its FLOPs budget, logs the
    EMA's validation and saves it beside the trained weights; --resume restores the EMA."""
    out = tmp_path / "mone"
    recipe = [
        "--schedule", "sandwich", "--lower", "2", "--sandwich-min", "--distill", "0.5",
        "--distill-temperature", "2", "--ema-decay", "0.9", "--randaug-ops", "2", "--erase-prob", "0.5",
        "--mixup", "0.2", "--cutmix", "1.0", "--clip-share", "0.3", "--budget-epochs", "0.5",
        "--epochs", "100", "--log-every", "1",
    ]  # fmt: skip
    train(parse_args(["--out", str(out), *recipe, *SMALL]))
    recs = epochs_of(out)
    last = recs[-1]
    mcfg = load_checkpoint(out / "last").config
    budget = 0.5 * 640 * 3 * gflops(mcfg, 1.0)
    assert last["budget_gflops"] == pytest.approx(budget, rel=1e-3)
    # The run ends on the first step past the budget: at most one sandwich step (three capacities) over.
    step_cost = 3 * 64 * (gflops(mcfg, 1.0) + gflops(mcfg, 0.95) + gflops(mcfg, 0.15))
    assert budget <= last["train_gflops"] <= budget + step_cost
    assert len(recs) == 1  # half an epoch's worth of dense FLOPs, spent inside the first epoch
    for key in ("val_acc@1", "val_acc@0.25", "ema_val_acc@1", "ema_val_acc@0.25", "ema_val_clip_acc@0.3"):
        assert key in last
    steps = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "capacities" in r]
    assert steps
    assert all(r["capacities"][0] == 1.0 and 0.15 in r["capacities"] for r in steps)
    ema = load_checkpoint(out / "ema")
    trained = load_checkpoint(out / "last")
    assert ema.meta["ema_decay"] == 0.9
    assert ema.meta["train_config"]["distill"] == 0.5
    differ = [
        k for k, v in ema.model.state_dict().items() if not torch.equal(v, trained.model.state_dict()[k])
    ]
    assert differ  # the average is not the last weights
    state = torch.load(out / "train_state.pt", weights_only=True)
    assert set(state["ema"]) == set(ema.model.state_dict())
    # A larger budget continues the same run; the EMA goes on from the saved average.
    train(
        parse_args(
            ["--out", str(out), *recipe[:-4], "--budget-epochs", "1.2", "--epochs", "100", "--resume", *SMALL]
        )
    )
    more = epochs_of(out)
    assert more[-1]["train_gflops"] >= 2 * budget
    assert more[-1]["step"] > last["step"]


@pytest.mark.usefixtures("fashion_mnist")
def test_default_variant_trains(tmp_path: Path) -> None:
    out = tmp_path / "tig"
    args = [
        "--variant",
        "TiG/2",
        "--schedule",
        "sandwich",
        "--lower",
        "1",
        "--distill",
        "0.5",
        "--max-steps",
        "1",
    ]
    small = ["--train-limit", "8", "--val-size", "16", "--batch-size", "4", "--clip-every", "0",
             "--val-capacities", "1.0", "--no-progress", "--threads", "2"]  # fmt: skip
    train(parse_args(["--out", str(out), *args, *small]))
    ck = load_checkpoint(out / "last")
    assert ck.config.variant == "TiG/2"
    assert ck.config.num_tokens == 196
    assert epochs_of(out)[-1]["step"] == 1


@pytest.mark.usefixtures("fashion_mnist")
@pytest.mark.slow
def test_gpu_training_script_runs_tiny_end_to_end(tmp_path: Path) -> None:
    """scripts/train-gpu.sh (the default's GPU recipe) at its tiny scale: both chains at equal FLOPs budgets,
    the ablation ladder, and the evaluation, every file inside the one output folder."""
    out = tmp_path / "gpu-run"
    env = {**os.environ, "TINY": "1", "ABLATION": "1", "PYTHON": sys.executable, "THREADS": "1"}
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        ["bash", str(root / "scripts" / "train-gpu.sh"), str(out)],
        env=env, cwd=root, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    logs = "".join(p.read_text()[-2000:] for p in out.rglob("*.log"))
    assert proc.returncode == 0, proc.stdout + proc.stderr + logs
    dense, mone = epochs_of(out / "dense")[-1], epochs_of(out / "mone")[-1]
    assert dense["budget_gflops"] == mone["budget_gflops"] > 0  # isoFLOPs
    for rec in (dense, mone):
        assert rec["train_gflops"] >= rec["budget_gflops"]
    assert "ema_val_acc@1" in mone
    assert "val_acc@0.25" in mone
    meta = load_checkpoint(out / "mone" / "ema").meta["train_config"]
    assert (meta["schedule"], meta["distill"], meta["clip_share"]) == ("sandwich", 0.5, 0.25)
    assert load_checkpoint(out / "dense" / "last").meta["train_config"]["capacity"] == 1.0
    results = json.loads((out / "eval" / "results.json").read_text())
    assert {"mone", "dense", "tome", "random_router", "targets", "ablation"} <= set(results)
    assert [r["name"] for r in results["ablation"]] == ["dense", "dense+EMA", "MoNE", "MoNE+EMA"]
    ladder = (out / "eval" / "ablation-ladder.md").read_text().splitlines()
    assert len(ladder) == 2 + 6
    assert "+ distillation" in ladder[4]
    ratios = [
        r["train_flops_ratio"]
        for r in json.loads((out / "eval" / "ablation-ladder.json").read_text())["ablation"]
    ]
    assert all(0.8 <= r <= 1.6 for r in ratios)  # equal budgets; a step may overshoot a tiny one
    assert (out / "eval" / "accuracy_vs_gflops.png").stat().st_size > 0
    assert "MoNE+EMA" in proc.stdout


def test_budget_schedule_warms_up_and_ends_annealed_by_progress() -> None:
    from mone.model.train import lr_at_progress

    cfg = TrainConfig(lr=1e-3, min_lr=1e-5)
    assert lr_at_progress(0, 0.0, 10, cfg) == pytest.approx(1e-4)
    assert lr_at_progress(9, 0.0, 10, cfg) == pytest.approx(1e-3)
    assert lr_at_progress(500, 0.5, 10, cfg) == pytest.approx((1e-3 + 1e-5) / 2)
    assert lr_at_progress(500, 1.0, 10, cfg) == pytest.approx(1e-5)
    # A budget that ends inside the warm-up still ends at the minimum.
    assert lr_at_progress(3, 1.0, 300, cfg) == pytest.approx(1e-5 * 4 / 300)
    lrs = [lr_at_progress(s, s / 100, 5, cfg) for s in range(5, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


def test_prefetch_keeps_order_passes_errors_and_stops_early() -> None:
    from mone.model.train import Prefetch

    assert list(Prefetch(iter(range(20)), depth=2)) == list(range(20))

    def failing() -> Iterator[int]:
        yield 1
        raise RuntimeError("bad batch")

    items = iter(Prefetch(failing()))
    assert next(items) == 1
    with pytest.raises(RuntimeError, match="bad batch"):
        next(items)
    early = Prefetch(iter(range(10**6)), depth=2)
    for item in early:
        if item == 3:
            break
    early.close()  # returns: the thread stops although the iterator had more
    assert not early._thread.is_alive()
