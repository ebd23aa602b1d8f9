"""`bench.ab`: the variant syntax and the summary table (the runs themselves need servers: `bench.serve`'s
helpers, exercised by the end-to-end tests)."""

import argparse
import subprocess
import sys
import time

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from bench.ab import Measured, compute_totals, group_cpu_seconds, parse_variant, request_fields, table


def test_a_variant_names_its_environment_and_arguments() -> None:
    v = parse_variant("spin:GOMP_SPINCOUNT=300000 OMP_WAIT_POLICY=:--inference-nice 0 --threads 2")
    assert v.name == "spin"
    assert v.env == {"GOMP_SPINCOUNT": "300000", "OMP_WAIT_POLICY": ""}
    assert v.extra == ["--inference-nice", "0", "--threads", "2"]
    base = parse_variant("base")
    assert (base.env, base.extra) == ({}, [])
    assert parse_variant("nice0::--inference-nice 0").extra == ["--inference-nice", "0"]


@pytest.mark.parametrize("spec", ["", "two words", "x:NOEQUALS", "x:=value"])
def test_a_malformed_variant_is_refused(spec: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_variant(spec)


def test_the_table_gives_medians_and_ratios_to_the_first_server() -> None:
    results = {
        "LitServe": [Measured(10.0, "", cpu_ms=4.0), Measured(12.0, "", cpu_ms=5.0), Measured(11.0, "")],
        "base": [
            Measured(9.0, "", 0.98, 3000.0, (20.0, 10.0), 3.5),
            Measured(13.2, "", 0.99, 3100.0, (30.0, 12.0), 3.1),
            Measured(12.1, "", 0.97, 2900.0, (25.0, 11.0), 3.3),
        ],
    }
    rows = table(["LitServe", "base"], results).splitlines()
    assert rows[0].startswith("| server | req/s | vs LitServe |")
    assert rows[2] == "| LitServe | 11.0 | 1.00x | 4.50 | - | - | - | - |"
    assert rows[3] == "| base | 12.1 | 1.10x | 3.30 | 98% | 3000 | 25.0 | 11.0 |"


def test_compute_totals_read_the_histogram_over_its_labels() -> None:
    registry = CollectorRegistry()
    other = Histogram("mone_queue_duration_seconds", "queue", registry=registry)
    compute = Histogram("mone_compute_duration_seconds", "compute", ["device"], registry=registry)
    other.observe(9.0)
    compute.labels("cpu").observe(1.5)
    compute.labels("cpu").observe(2.0)
    compute.labels("cuda").observe(0.5)
    assert compute_totals(generate_latest(registry).decode()) == (4.0, 3.0)
    assert compute_totals("") == (0.0, 0.0)


def test_capacity_default_sends_no_budget() -> None:
    assert request_fields("0.5") == {"capacity": "0.5"}
    assert request_fields("default") == {}


def test_group_cpu_seconds_counts_every_process_of_the_group() -> None:
    """A process group of two busy processes accrues about twice the CPU time of one."""
    code = "import time\nend = time.process_time() + 0.4\nwhile time.process_time() < end: pass"
    script = (
        f"import subprocess, sys\nc = subprocess.Popen([sys.executable, '-c', {code!r}])\n{code}\nc.wait()"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    seen = 0.0
    while parent.poll() is None:
        seen = max(seen, group_cpu_seconds(parent.pid))
        time.sleep(0.02)
    assert seen >= 0.6  # both processes busy, read before they exit
    assert group_cpu_seconds(parent.pid) == 0.0  # nothing left in the group
