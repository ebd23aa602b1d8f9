"""Marks every test by the folder it lives in (tests/model -> `model`, ...).

This is the suite's one marker hook: the folders' conftest files hold fixtures only, and the helpers the
tests share live in tests/support.  It also keeps the servers the tests start from compiling forwards.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

_FOLDERS = ("model", "server", "clients", "docker", "bench")

# Servers the tests start (and whatever they start) compile no forwards in the background: a compile takes
# a core for 15-30 s.  tests/server/test_compiled.py turns it on where it is the subject.
os.environ.setdefault("MONE_COMPILED_PLANS", "false")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    root = Path(__file__).parent
    for item in items:
        try:
            part = Path(item.path).relative_to(root).parts[0]
        except ValueError:
            continue
        if part in _FOLDERS:
            item.add_marker(getattr(pytest.mark, part))
