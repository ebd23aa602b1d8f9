"""Malicious checkpoints (docs/reliability.md row 27): `mone-serve --checkpoint <bad>` exits non-zero with a
clear log, and the pickle's side effect never happens."""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mone.model.checkpoint import checkpoint_digest
from tests.server.rel_load import ROOT, free_port

pytestmark = pytest.mark.slow


class Payload:
    """Unpickling this creates `marker`: the stand-in for arbitrary code run by `torch.load`/`pickle`."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (builtins.open, (self.marker, "w"))


def evil_pickle(marker: Path) -> bytes:
    return pickle.dumps(Payload(marker), protocol=2)


def test_rel_the_payload_is_live(tmp_path: Path) -> None:
    """Control: the payload really runs when unpickled, so its absence below means it was never loaded."""
    marker = tmp_path / "control"
    pickle.loads(evil_pickle(marker))  # noqa: S301 - that is the point
    assert marker.exists()


def _start(checkpoint: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MONE_", "PROMETHEUS_"))}
    env["PYTHONPATH"] = str(ROOT)
    env["MONE_COMPILED_PLANS"] = os.environ.get("MONE_COMPILED_PLANS", "false")  # see tests/conftest.py
    cmd = [sys.executable, "-m", "mone.server", "--checkpoint", str(checkpoint), "--port", str(free_port())]
    cmd += ["--no-calibrate", "--log-level", "info", *args]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=90)


def _bad_checkpoints(good: Path, tmp: Path, marker: Path) -> dict[str, tuple[Path, list[str], str]]:
    """name -> (path, extra flags, what the log must say)."""
    out: dict[str, tuple[Path, list[str], str]] = {}
    payload = evil_pickle(marker)

    # 1. A pickle where the weights should be, with config.json's digest updated to match it.
    d = tmp / "pickle_as_safetensors"
    shutil.copytree(good, d)
    (d / "model.safetensors").write_bytes(payload)
    doc = json.loads((d / "config.json").read_text())
    doc["weights_sha256"] = hashlib.sha256(payload).hexdigest()
    doc["sha256"] = checkpoint_digest(doc)
    (d / "config.json").write_text(json.dumps(doc))
    out["pickle_as_safetensors"] = (d, [], "not a readable safetensors file")

    # 2. A bare pickle (.pt) given as the checkpoint.
    d = tmp / "bare_pickle"
    d.mkdir()
    (d / "model.pt").write_bytes(payload)
    out["bare_pickle_file"] = (d / "model.pt", [], "config.json")

    # 3. Weights tampered with after the digest was recorded.
    d = tmp / "tampered"
    shutil.copytree(good, d)
    data = bytearray((d / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (d / "model.safetensors").write_bytes(bytes(data))
    out["hash_mismatch"] = (d, [], "the weights do not match")

    # 3b. The same, with the digest deleted from config.json so that nothing would be checked.
    d = tmp / "tampered_without_digest"
    shutil.copytree(tmp / "tampered", d)
    doc = json.loads((d / "config.json").read_text())
    del doc["sha256"]
    (d / "config.json").write_text(json.dumps(doc))
    out["digest_deleted"] = (d, [], "sha256 is missing or blank")

    # 3c. Untouched weights under other labels.
    d = tmp / "relabelled"
    shutil.copytree(good, d)
    doc = json.loads((d / "config.json").read_text())
    doc["labels"] = list(reversed(doc["labels"]))
    (d / "config.json").write_text(json.dumps(doc))
    out["labels_swapped"] = (d, [], "config, labels, profile or meta were changed")

    # 4. Untouched weights, but the operator pinned another digest.
    out["pinned_digest_mismatch"] = (good, ["--checkpoint-sha256", "0" * 64], "does not match the pinned")
    # 5. The development opt-out does not lift a pin.
    out["pinned_unverified"] = (
        good,
        ["--checkpoint-sha256", "0" * 64, "--allow-unverified-checkpoint"],
        "does not match the pinned",
    )
    return out


CASES = [
    "pickle_as_safetensors",
    "bare_pickle_file",
    "hash_mismatch",
    "digest_deleted",
    "labels_swapped",
    "pinned_digest_mismatch",
    "pinned_unverified",
]


@pytest.mark.parametrize("case", CASES)
def test_rel_bad_checkpoint_fails_closed_at_start_up(checkpoint_dir: Path, tmp_path: Path, case: str) -> None:
    marker = tmp_path / "PWNED"
    path, flags, says = _bad_checkpoints(checkpoint_dir, tmp_path, marker)[case]
    proc = _start(path, *flags)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log[-2000:]
    assert says in log, log[-2000:]
    assert "Application startup complete" not in log
    assert not marker.exists(), "the pickle in the checkpoint was executed"
