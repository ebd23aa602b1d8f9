"""Marks every test by the folder it lives in (tests/model -> `model`, ...).

This is the suite's one marker hook: the folders' conftest files hold fixtures only, and the helpers the
tests share live in tests/support.
"""

from __future__ import annotations

from pathlib import Path

import pytest

_FOLDERS = ("model", "server", "clients", "docker", "bench")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    root = Path(__file__).parent
    for item in items:
        try:
            part = Path(item.path).relative_to(root).parts[0]
        except ValueError:
            continue
        if part in _FOLDERS:
            item.add_marker(getattr(pytest.mark, part))
