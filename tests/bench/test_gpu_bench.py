"""scripts/gpu-bench.sh --tiny: every step of the GPU measurements, end to end on the CPU at small shapes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu-bench.sh"


def test_full_mode_refuses_without_cuda(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the full run would start")
    env = {**os.environ, "PYTHON": sys.executable}
    out = subprocess.run([str(SCRIPT), str(tmp_path)], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "CUDA is not available" in (tmp_path / "summary.md").read_text()
    assert "torch" in (tmp_path / "env.txt").read_text()


@pytest.mark.slow
def test_tiny_mode_runs_every_step(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    out = subprocess.run(
        [str(SCRIPT), "--tiny", str(tmp_path)], env=env, capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary = (tmp_path / "summary.md").read_text()
    for step in ("tests-cuda", "speed-bf16", "budget-s16", "serve-shipped", "budget-shipped", "speed-fp32"):
        assert re.search(rf"^## {step}: done in \d+ s", summary, re.M), (step, summary[-3000:])
        assert (tmp_path / f"{step}.log").exists()
    speed = (tmp_path / "speed-bf16.md").read_text()
    for c in ("1.0", "0.75", "0.5", "0.25"):
        assert re.search(rf"^\| Mi/4 \| 2 \| mone \| {c} \| [\d.]+ \|", speed, re.M), c
    assert "| dense_plain | 1.0 |" in speed
    assert ", bf16," in speed
    serve = (tmp_path / "serve-shipped.md").read_text()
    assert re.search(r"^\| round 1: LitServe dense, c=4 \| [\d.]+ \|", serve, re.M)
    assert re.search(r"^\| open \d+/s, latency_ms=\d+, degrade \| [\d.]+ \|", serve, re.M)
    assert "- throughput at capacity 1.0" in serve
    for name in ("budget-s16", "budget-shipped"):
        table = (tmp_path / f"{name}.md").read_text()
        for c in ("1", "0.5", "0.25"):
            assert re.search(rf"^\| image \| {c} \| [\d.]+ \|", table, re.M), (name, c)
