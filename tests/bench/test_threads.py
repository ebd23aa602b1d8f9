"""bench.threads: the three ways a batch can run, timed through the server's own Runner."""

from __future__ import annotations

import pytest

from bench import threads


def test_every_batch_is_timed_every_way(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--variant", "Mi/4", "--batches", "1", "2", "--capacities", "1.0", "0.25"]
    assert threads.main([*args, "--rounds", "1", "--repeats", "1", "--full-width-rows", "32"]) == 0
    out = capsys.readouterr().out
    assert "one more product costs 32 rows" in out
    rows = [
        line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ") and "batch" not in line
    ]
    ways = {(int(r[0]), r[1].strip()) for r in rows}
    assert {(1, "whole"), (1, "serial"), (2, "whole"), (2, "serial")} <= ways
    assert (1, "streams") not in ways  # one sample cannot be split
    for r in rows:
        assert all(float(ms) > 0 for ms in r[2:])
