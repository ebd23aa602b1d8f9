"""tests/system.py: a missing system package skips a test, or fails it where they are required (CI)."""

from __future__ import annotations

import pytest

from tests.system import REQUIRE, missing


@pytest.mark.parametrize("value", ["", "0"])
def test_missing_skips_on_a_developer_machine(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(REQUIRE, value)
    with pytest.raises(pytest.skip.Exception, match="apt-get install chromium"):
        missing("Chromium", "chromium")


def test_missing_fails_where_system_packages_are_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(REQUIRE, "1")
    with pytest.raises(pytest.fail.Exception, match="Fashion-MNIST is missing.*a failure, not a skip"):
        missing("Fashion-MNIST", "dataset-fashion-mnist")
