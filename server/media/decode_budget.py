"""How many pixels the server decodes at once, across requests.

What a decode costs in memory is set by the decoded size, not the upload: a 5 KB palette PNG at the pixel
limit (8192 x 4882) takes about 650 MiB on its way through Pillow's mode conversions (up to ~17 bytes a
pixel), and decodes run concurrently on a thread pool sized by the host's cores.  `PixelBudget` caps the
sum of the pixels being decoded (`max_decode_pixels`): a request whose image does not fit waits, in
arrival order, until earlier decodes finish, and gets 503 + Retry-After if it waits longer than
`request_timeout_s`.  Small images (a 28x28 item is 784 pixels) share the budget freely.
"""

from __future__ import annotations

import asyncio
import io
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from PIL import Image

from mone.server.errors import OverloadedError
from mone.server.media.decode import IMAGE_FORMATS, sniff


def header_pixels(data: bytes) -> int:
    """Width x height from an image's header (nothing is decoded); 0 for clips and unreadable data."""
    fmt = sniff(data)
    if fmt not in IMAGE_FORMATS:
        return 0
    try:
        with Image.open(io.BytesIO(data), formats=[IMAGE_FORMATS[fmt]]) as img:
            w, h = img.size
            return int(w) * int(h)
    except Exception:  # not an image Pillow knows, or malformed: the decoder reports it
        return 0


class PixelBudget:
    """A weighted FIFO semaphore over pixels.  Args: total (pixels), wait_s (longest wait before 503)."""

    def __init__(self, total: int, wait_s: float) -> None:
        self.total = total
        self.wait_s = wait_s
        self.used = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    @asynccontextmanager
    async def hold(self, pixels: int) -> AsyncIterator[None]:
        n = max(0, min(pixels, self.total))  # one image larger than the budget runs alone
        await self._acquire(n)
        try:
            yield
        finally:
            self._release(n)

    async def _acquire(self, n: int) -> None:
        if not self._waiters and self.used + n <= self.total:
            self.used += n
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((n, fut))
        try:
            await asyncio.wait_for(asyncio.shield(fut), self.wait_s)
        except BaseException as exc:
            if fut.done() and not fut.cancelled():
                self._release(n)  # granted while the wait was being given up
            else:
                fut.cancel()
                self._wake()  # a large waiter at the head may have held back smaller ones
            if isinstance(exc, TimeoutError):
                raise OverloadedError(
                    f"the server is decoding {self.used} pixels, its budget is {self.total}; retry shortly",
                    retry_after=1.0,
                ) from None
            raise

    def _release(self, n: int) -> None:
        self.used -= n
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            n, fut = self._waiters[0]
            if fut.cancelled():
                self._waiters.popleft()
                continue
            if self.used + n > self.total:
                return
            self._waiters.popleft()
            self.used += n
            fut.set_result(None)
