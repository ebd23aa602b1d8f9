"""Shared fixtures for server tests: a small random Mi/4 checkpoint, fast settings and an in-process client.

Every test here is marked `server` (tests/conftest.py); async tests run on anyio's asyncio backend, one
event loop per module so that a module shares one started app.  The helpers behind these fixtures (random
models, fast settings, test pictures) are in tests/support.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi import FastAPI

from mone.server.config import Settings
from mone.server.http.app import create_app
from tests.support.media import fashion_images
from tests.support.models import fast_settings, make_checkpoint


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"), gflops=[0.03, 0.06, 0.12])


@pytest.fixture(scope="module")
def settings(checkpoint_dir: Path) -> Settings:
    return fast_settings(checkpoint_dir)


@pytest.fixture(scope="module")
async def app(settings: Settings) -> AsyncIterator[FastAPI]:
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture(scope="module")
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as c:
        yield c


@pytest.fixture
def images() -> list[np.ndarray]:
    return fashion_images(8)
