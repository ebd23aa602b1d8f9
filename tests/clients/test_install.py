"""The client's own distribution (clients/pyproject.toml) installs into a clean virtual environment without
torch or FastAPI, and talks to a real server from there."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT
from tests.support.media import picture

CLIENT_CHECK = """
import importlib.util, io, json, sys
import numpy as np
from PIL import Image
import mone.clients as clients
from mone.clients import MoneClient
buf = io.BytesIO()
Image.fromarray(np.load(sys.argv[2])).save(buf, "PNG")
with MoneClient(sys.argv[1], timeout=30) as client:
    r = client.classify(buf.getvalue(), capacity=0.5)
server_side = ("torch", "fastapi", "uvicorn", "mone.server", "mone.model")
print(json.dumps({
    "label": r.label,
    "capacity": r.capacity,
    "loaded": sorted(m for m in server_side if m in sys.modules),
    "from": clients.__file__,
    "installed": sorted(m for m in server_side if importlib.util.find_spec(m) is not None),
}))
"""


def test_the_client_carries_the_servers_wire_models() -> None:
    wire = ROOT / "clients" / "wire.py"
    assert wire.is_symlink()
    assert wire.resolve() == (ROOT / "server" / "http" / "schemas.py").resolve()


@pytest.mark.slow
def test_the_client_installs_without_torch_and_serves_a_request(tmp_path: Path, server_url: str) -> None:
    # A copy of clients/ (the link resolved, as a build does), so that the build leaves nothing in the tree.
    source = tmp_path / "clients"
    shutil.copytree(ROOT / "clients", source, symlinks=False, ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    install = subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(source)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    listed = subprocess.run(
        [str(py), "-m", "pip", "list", "--format", "json"], capture_output=True, text=True, check=True
    )
    names = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert {"mone-client", "httpx", "pydantic", "numpy", "pillow"} <= names, names
    assert not names & {"torch", "fastapi", "uvicorn", "safetensors", "mone-serve", "av"}, names
    image = tmp_path / "picture.npy"
    import numpy as np

    np.save(image, picture())
    # Run from a folder of its own, so that neither the checkout's packages nor the copy are importable.
    work = tmp_path / "work"
    work.mkdir()
    run = subprocess.run(
        [str(py), "-c", CLIENT_CHECK, server_url, str(image)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=work,
        env={"PATH": f"{venv / 'bin'}:/usr/bin:/bin"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout)
    assert Path(result["from"]).is_relative_to(venv), result["from"]
    assert result["loaded"] == []
    assert result["installed"] == []
    assert result["capacity"] == pytest.approx(0.5, abs=0.05)
    assert isinstance(result["label"], str)
    assert result["label"]
    health = subprocess.run(
        [str(venv / "bin" / "mone"), "--url", server_url, "health"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=work,
    )
    assert health.returncode == 0, health.stdout + health.stderr
