"""The load generator's HTTP client (`bench.serve.Connection`) against tiny scripted servers on 127.0.0.1:
keep-alive reuse, the retry of a request whose idle connection the server had closed, and no retry where
the server may have seen the request."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from bench.serve import ClientError, Connection, encode_post

OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: text/plain\r\n\r\nok"
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    return head + await reader.readexactly(length)


async def with_server(handle: Handler, client: Callable[[str], Awaitable[None]]) -> int:
    """Serve `handle` on each connection while `client` runs; the number of connections it was given."""
    connections = 0

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await handle(reader, writer)

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        await client(f"http://127.0.0.1:{port}/v1/classify")
    return connections


def answer_once(answer: bytes) -> Handler:
    """A handler that reads one request, writes `answer` and closes the connection."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer)
        await writer.drain()
        writer.close()

    return handle


def raw(url: str) -> bytes:
    return encode_post(url, b"\x89PNG fake", {"capacity": "1.0"})


def test_keep_alive_connection_is_reused() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(3):
            await read_request(reader)
            writer.write(OK)
        writer.close()

    async def client(url: str) -> None:
        conn = Connection(url, timeout=5)
        for _ in range(3):
            assert await conn.request(raw(url)) == (200, b"ok")
        await conn.close()

    assert asyncio.run(with_server(handle, client)) == 1


def test_request_on_a_connection_closed_while_idle_is_sent_again() -> None:
    """The server answers one request per connection and then closes it, as at its keep-alive timeout: the
    next request on the pooled connection meets a closed socket and goes out again on a fresh one."""

    async def client(url: str) -> None:
        conn = Connection(url, timeout=5)
        for _ in range(3):
            assert await conn.request(raw(url)) == (200, b"ok")
            await asyncio.sleep(0.05)  # the server's close reaches the client while the connection idles
        await conn.close()

    assert asyncio.run(with_server(answer_once(OK), client)) == 3


@pytest.mark.parametrize("answer", [b"", b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nok"])
def test_no_retry_on_a_fresh_connection_or_after_part_of_an_answer(answer: bytes) -> None:
    """A fresh connection closed without an answer, or an answer cut short: the server may have processed
    the request, so the client reports an error instead of sending it twice."""

    async def client(url: str) -> None:
        conn = Connection(url, timeout=5)
        with pytest.raises(ClientError, match="Error"):
            await conn.request(raw(url))
        await conn.close()

    assert asyncio.run(with_server(answer_once(answer), client)) == 1
