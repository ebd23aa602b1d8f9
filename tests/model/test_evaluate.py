"""mone-eval's report: the default's acceptance targets and the ablation table (model/evaluate.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mone.model import MoNE, MoNEConfig, save_checkpoint
from mone.model.evaluate import ablation_rows, ablation_table, check_targets, parse_args

pytestmark = pytest.mark.model


def curve(acc: list[float], clip: list[float]) -> dict[str, list[float]]:
    caps = [0.25, 0.3, 0.5, 1.0]
    return {"capacities": caps, "gflops": [0.3, 0.35, 0.53, 1.0], "accuracy": acc, "clip_accuracy": clip}


def test_targets_pass_and_fail_by_their_thresholds() -> None:
    res = {
        "mone": curve([91.5, 92.0, 92.9, 93.4], [87.0, 87.5, 88.5, 89.0]),
        "dense": {"accuracy": 93.6, "gflops": 1.0},
        "random_router": {"capacities": [0.25, 0.3, 0.5, 1.0], "accuracy": [90.0, 91.0, 92.0, 93.4]},
    }
    t = check_targets(res)
    assert t["dense >= 93.0"] == [93.6, True]
    assert t["MoNE@1.0 >= dense - 0.3"][-1]  # 93.4 >= 93.3
    assert t["MoNE@0.5 >= dense - 0.8"][-1]  # 92.9 >= 92.8
    assert t["MoNE@0.5 GFLOPs <= 0.55 x dense"] == [0.53, True]
    assert not t["MoNE@0.25 >= dense - 2.0"][-1]  # 91.5 < 91.6
    assert t["learned >= random + 1.0 at 0.25"][-1]
    assert not t["learned >= random + 1.0 at 0.5"][-1]  # 92.9 < 93.0
    assert t["clips@1.0 >= 88.0"] == [89.0, True]
    assert t["clips@0.3 >= clips@1.0 - 2.0"] == [87.5, 89.0, True]
    res["mone"]["clip_accuracy"] = [80.0, 86.8, 88.0, 88.9]
    assert check_targets(res)["clips@0.3 >= clips@1.0 - 2.0"][-1] is False


def checkpoint(path: Path, seed: int, train_gflops: float) -> str:
    torch.manual_seed(seed)
    net = MoNE(MoNEConfig.from_variant("Mi/4", num_classes=10))
    with torch.no_grad():
        torch.nn.init.normal_(net.head.weight, std=0.5)
    save_checkpoint(path, net, meta={"train_gflops": train_gflops})
    return str(path)


def test_ablation_rows_report_flops_and_gains(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    images = (torch.randint(0, 256, (40, 1, 28, 28), generator=gen, dtype=torch.uint8), torch.arange(40) % 10)
    clips = (torch.randint(0, 256, (6, 8, 1, 28, 28), generator=gen, dtype=torch.uint8), torch.arange(6))
    entries = (
        ("base", checkpoint(tmp_path / "a", 0, 100.0)),
        ("+ part", checkpoint(tmp_path / "b", 1, 110.0)),
    )
    rows = ablation_rows(entries, images, clips, (1.0, 0.5))
    assert [r["name"] for r in rows] == ["base", "+ part"]
    assert rows[1]["train_flops_ratio"] == 1.1
    assert set(rows[0]["accuracy"]) == {"1", "0.5"}
    assert set(rows[0]["clip_accuracy"]) == {"1", "0.3"}
    assert "gain" not in rows[0]
    for key in ("accuracy", "clip_accuracy"):
        for c, a in rows[1][key].items():
            assert rows[1]["gain"][key][c] == pytest.approx(a - rows[0][key][c])
    table = ablation_table(rows).splitlines()
    assert len(table) == 4
    assert table[0].startswith("| variant | training GFLOPs | × first | images @1 % | images @0.5 %")
    assert "| + part | 110 | 1.100 |" in table[3]
    assert "(+" in table[3] or "(-" in table[3]


def test_ablation_arguments() -> None:
    cfg = parse_args(
        ["--ablation", "paper=runs/a/last", "+ ema=runs/a/ema", "--limit", "100", "--device", "cpu"]
    )
    assert cfg.ablation == (("paper", "runs/a/last"), ("+ ema", "runs/a/ema"))
    assert cfg.limit == 100
    with pytest.raises(SystemExit):
        parse_args(["--ablation", "no-equals-sign"])
