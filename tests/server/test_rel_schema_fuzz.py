"""Schemathesis over the live server's OpenAPI (docs/reliability.md row 5): schema-valid and schema-violating
requests generated for every operation, with the bearer key, must never get a 5xx.  Bounded: a few
examples per operation and phase, one real mone-serve process on 127.0.0.1."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.server.rel_load import figures, launch

pytestmark = pytest.mark.slow
KEY = "rel-schema-key-0123"
EXAMPLES = os.environ.get("REL_SCHEMA_EXAMPLES", "15")


def _schemathesis() -> list[str]:
    exe = Path(sys.executable).with_name("schemathesis")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("schemathesis")
    if found is None:
        pytest.skip("schemathesis is not installed (pip install -e '.[dev]')")
    return [found]


def test_rel_schemathesis_finds_no_server_error(tmp_path: Path) -> None:
    server = launch("--api-key", KEY, "--max-batch-size", "8")
    try:
        cmd = [*_schemathesis(), "run", server.base + "/openapi.json", "--checks", "not_a_server_error"]
        cmd += ["--max-examples", EXAMPLES, "--seed", "7", "--continue-on-failure", "--request-timeout", "20"]
        cmd += ["--header", f"Authorization: Bearer {KEY}"]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path)
        healthy = httpx.get(server.base + "/healthz", timeout=5).status_code
        fivexx = sum(
            v
            for k, v in server.live_metrics().items()
            if re.search(r"code=5\d\d", k) and k.startswith("mone_requests_total")
        )
    finally:
        server.stop()
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-4000:]
    assert healthy == 200
    assert fivexx == 0
    cases = re.search(r"(\d+) generated, (\d+) passed", out)
    assert cases is not None, out[-2000:]
    figures("schemathesis", generated=int(cases[1]), passed=int(cases[2]), server_5xx=fivexx)
