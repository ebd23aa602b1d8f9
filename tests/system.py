"""System packages some tests need beyond PyPI (scripts/setup-system.sh installs them as root).

Where one is missing, such a test is skipped on a developer's machine but fails when MONE_REQUIRE_SYSTEM=1,
as in CI (.ci/run): a CI machine on which the set-up could not install the data set or Chromium must not
pass by skipping what it cannot run.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

REQUIRE = "MONE_REQUIRE_SYSTEM"


def required() -> bool:
    return os.environ.get(REQUIRE, "") not in ("", "0")


def missing(what: str, package: str) -> NoReturn:
    """Skip the calling test because `what` is missing, or fail it where system packages are required."""
    message = f"{what} is missing: apt-get install {package} (scripts/setup-system.sh does it as root)"
    if required():
        pytest.fail(f"{message}; {REQUIRE} is set, so this is a failure, not a skip", pytrace=False)
    pytest.skip(message)
