"""Fixtures for model tests: a small random model (tests/support/models.py builds it)."""

from __future__ import annotations

import pytest

from mone.model import MoNE
from tests.support.models import make_net


@pytest.fixture
def net() -> MoNE:
    return make_net()
