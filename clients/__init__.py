"""Clients of mone-serve: the Python client, the `mone` command line and its load generator.

Importing this package needs pydantic, httpx, numpy and Pillow, never torch or FastAPI.
"""

from mone.clients.client import AsyncMoneClient, MoneClient, RetryPolicy
from mone.clients.errors import (
    BadRequest,
    DeadlineExceeded,
    MoneError,
    NotFound,
    NotReady,
    Overloaded,
    ServerError,
    Timeout,
    TransportError,
    Unauthorized,
)
from mone.clients.schemas import Result

__all__ = [
    "AsyncMoneClient",
    "BadRequest",
    "DeadlineExceeded",
    "MoneClient",
    "MoneError",
    "NotFound",
    "NotReady",
    "Overloaded",
    "Result",
    "RetryPolicy",
    "ServerError",
    "Timeout",
    "TransportError",
    "Unauthorized",
]
