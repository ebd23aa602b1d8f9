"""Fixtures for the deployment tests: a local mone-serve process (tests/support/deploy.py has the helpers).

Every test here is marked `docker` (tests/conftest.py).  Everything listens on 127.0.0.1 only and every wait
is bounded.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.live_server import free_port
from tests.support import ROOT
from tests.support.deploy import FAST_ENV, stop_group, wait_http


@pytest.fixture(scope="module")
def local_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mone-serve` process (random Mi/4) on 127.0.0.1; yields its base URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = {**os.environ, **FAST_ENV, "MONE_HOST": "127.0.0.1", "MONE_PORT": str(port)}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mone.server"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(base + "/readyz", 120, proc=proc)
        yield base
    finally:
        stop_group(proc)
