"""uvicorn's h11 protocol with receipt deadlines, which uvicorn lacks (slowloris; reliability.md row 3).

A connection must deliver a request's headers within `header_timeout_s` of opening (or of the previous
response) and its body within `body_timeout_s` of the headers; otherwise it is closed.  uvicorn's own
keep-alive timeout still closes idle connections sooner.
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from server.config import get_settings


class DeadlineH11Protocol(H11Protocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        settings = get_settings()
        self.header_timeout = settings.header_timeout_s
        self.body_timeout = settings.body_timeout_s
        self._receipt_timer: asyncio.TimerHandle | None = None
        self._waiting_for: object = None

    def _arm(self, state: object, seconds: float) -> None:
        self._disarm()
        self._waiting_for = state
        self._receipt_timer = self.loop.call_later(seconds, self._receipt_expired)

    def _disarm(self) -> None:
        if self._receipt_timer is not None:
            self._receipt_timer.cancel()
        self._receipt_timer = None
        self._waiting_for = None

    def _receipt_expired(self) -> None:
        self._receipt_timer = None
        if not self.transport.is_closing():
            self.logger.info("closing a connection that was too slow to send its request")
            self.transport.close()

    def _follow(self) -> None:
        """Keep one timer running for whatever part of the request the client still owes."""
        state = self.conn.their_state
        if state is h11.IDLE:
            if self._waiting_for is not h11.IDLE:
                self._arm(h11.IDLE, self.header_timeout)
        elif state is h11.SEND_BODY:
            if self._waiting_for is not h11.SEND_BODY:
                self._arm(h11.SEND_BODY, self.body_timeout)
        else:
            self._disarm()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(h11.IDLE, self.header_timeout)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._follow()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)
