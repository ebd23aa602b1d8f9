"""uvicorn's httptools protocol with receipt deadlines and a bound on the request head, which uvicorn lacks
(slowloris; docs/reliability.md rows 3 and 4).

A connection must deliver a request's headers within `header_timeout_s` of opening (or of the previous
response) and its body within `body_timeout_s` of the headers; otherwise it is closed.  uvicorn's own
keep-alive timeout still closes idle connections sooner.  The request line and headers may take at most
`MAX_HEAD_BYTES`; a longer head gets 431 and the connection is closed.  (httptools, unlike h11, buffers a
header of any length; h11 is bounded but, in pure Python, costs the event loop about 0.3 ms more per request.)
"""

from __future__ import annotations

import asyncio
import enum
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from mone.server.config import get_settings

MAX_HEAD_BYTES = 64 * 1024  # request line + headers; h11 allows 16 KiB, nginx 4 x 8 KiB by default


class _Owed(enum.Enum):
    """What the client still owes on this connection."""

    HEAD = "head"  # the next request's line and headers (nothing of it may have arrived yet)
    BODY = "body"  # the body of a request whose headers are in
    NOTHING = "nothing"  # a whole request is in; the server is answering it


class DeadlineHttpToolsProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        settings = get_settings()
        self.header_timeout = settings.header_timeout_s
        self.body_timeout = settings.body_timeout_s
        self._receipt_timer: asyncio.TimerHandle | None = None
        self._owed = _Owed.HEAD
        self._head_bytes = 0  # bytes of an incomplete head received in earlier reads

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._receipt_timer = self.loop.call_later(seconds, self._receipt_expired)

    def _disarm(self) -> None:
        if self._receipt_timer is not None:
            self._receipt_timer.cancel()
        self._receipt_timer = None

    def _receipt_expired(self) -> None:
        self._receipt_timer = None
        if not self.transport.is_closing():
            self.logger.info("closing a connection that was too slow to send its request")
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.header_timeout)

    def data_received(self, data: bytes) -> None:
        owed = self._owed
        super().data_received(data)
        if self.parser is None or self.transport.is_closing():
            return
        # A read that completes a head is not counted, so a head may pass the bound by one read.
        if owed is _Owed.HEAD and self._owed is _Owed.HEAD:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._refuse_head()

    def _refuse_head(self) -> None:
        msg = b"request line and headers longer than %d bytes" % MAX_HEAD_BYTES
        self.logger.info("closing a connection whose request head passed %d bytes", MAX_HEAD_BYTES)
        self._disarm()
        self.transport.write(
            b"".join(
                [
                    STATUS_LINE[431],
                    b"content-type: text/plain; charset=utf-8\r\n",
                    b"content-length: %d\r\n" % len(msg),
                    b"connection: close\r\n\r\n",
                    msg,
                ]
            )
        )
        self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._owed is _Owed.NOTHING:  # pipelined before the previous answer was sent
            self._owed = _Owed.HEAD
            self._arm(self.header_timeout)

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._owed = _Owed.BODY
        self._head_bytes = 0
        self._arm(self.body_timeout)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._owed = _Owed.NOTHING
        self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._owed is _Owed.NOTHING and not self.transport.is_closing():
            self._owed = _Owed.HEAD
            self._arm(self.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)
