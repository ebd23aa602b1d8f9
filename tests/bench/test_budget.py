"""`bench.budget`: reading hey's per-request CSV, the table's ratios and monotone check, and one short run
against a real server."""

from __future__ import annotations

import math
import re

import pytest

from bench.budget import CAPACITIES, Cell, Point, main, parse_hey_csv, table


def test_hey_csv_gives_rate_and_percentiles_of_the_answers_that_succeeded() -> None:
    rows = ["response-time,DNS+dialup,DNS,Request-write,Response-delay,Response-read,status-code,offset"]
    rows += [f"{0.001 * (i + 1):.4f},0,0,0,0,0,200,{i * 0.01:.4f}" for i in range(100)]
    rows += ["0.5000,0,0,0,0,0,429,0.5", "0.6000,0,0,0,0,0,503,0.6"]
    rps, p50, p99, other = parse_hey_csv("\n".join(rows), seconds=2.0)
    assert rps == 50.0
    assert p50 == pytest.approx(50.5)
    assert 99.0 <= p99 <= 100.0
    assert other == 2
    assert math.isnan(parse_hey_csv(rows[0], 1.0)[1])


def _cells(rps: dict[float, float], p50: dict[float, float]) -> dict[tuple[str, float, str], Cell]:
    cells = {}
    for c in CAPACITIES:
        cells[("image", c, "load")] = Cell([Point(rps[c], 9.0, 20.0, 0, 1.0, 2.0)])
        cells[("image", c, "one")] = Cell([Point(100.0, p50[c], 2 * p50[c], 0, 1.0, 2.0)])
    return cells


def test_the_table_gives_ratios_to_capacity_one_and_judges_monotone_cost() -> None:
    text, monotone = table(
        _cells({1.0: 100, 0.5: 150, 0.25: 220}, {1.0: 10, 0.5: 7, 0.25: 5}), ["image"], 0.03
    )
    assert monotone
    quarter = next(line for line in text.splitlines() if line.startswith("| image | 0.25 "))
    assert "| 2.20 |" in quarter  # throughput ratio
    assert "| 2.00 |" in quarter  # single request: twice as fast
    _, slower_alone = table(
        _cells({1.0: 100, 0.5: 150, 0.25: 220}, {1.0: 10, 0.5: 7, 0.25: 7.5}), ["image"], 0.03
    )
    assert not slower_alone
    _, fewer = table(_cells({1.0: 100, 0.5: 90, 0.25: 220}, {1.0: 10, 0.5: 7, 0.25: 5}), ["image"], 0.03)
    assert not fewer
    _, within = table(_cells({1.0: 100, 0.5: 98, 0.25: 220}, {1.0: 10, 0.5: 10.2, 0.25: 5}), ["image"], 0.03)
    assert within


@pytest.mark.slow
def test_a_short_run_against_a_real_server(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--variant", "Mi/4", "--rounds", "1", "--seconds", "0.6", "--one-seconds", "0.4", "--clients", "4",
          "--loadgen", "python"])  # fmt: skip
    out = capsys.readouterr().out
    header = out.splitlines()[0]
    assert re.match(r"# bench\.budget, \d{4}-\d\d-\d\d \d\d:\d\d UTC, ", header), header  # date and CPU
    rows = [line for line in out.splitlines() if re.match(r"\| (image|clip) \| ", line)]
    assert len(rows) == 2 * len(CAPACITIES)
    for row in rows:
        cols = [c.strip() for c in row.strip("|").split("|")]
        assert float(cols[2]) > 0, row  # requests answered
        assert cols[-1] == "0", row  # no errors
    assert "cost monotone in the budget" in out
