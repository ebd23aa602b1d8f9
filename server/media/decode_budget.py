"""How many pixels the server decodes at once, across requests.

What a decode costs in memory is set by the decoded size, not the upload: a 5 KB palette PNG at the pixel
limit (8192 x 4882) takes about 650 MiB on its way through Pillow's mode conversions (up to ~17 bytes a
pixel), and decodes run concurrently on a thread pool sized by the host's cores.  `PixelBudget` caps the
sum of the pixels being decoded (`max_decode_pixels`): a request whose image does not fit waits, in
arrival order, until earlier decodes finish, and gets 503 + Retry-After if it waits longer than
`request_timeout_s`.  Small images (a 28x28 item is 784 pixels) share the budget freely.

`BudgetedDecoder` is the decode stage of every request: it holds the server's one `PixelBudget` (the app
owns it, through its request pipeline) and decodes each payload under it, off the event loop unless small.
"""

from __future__ import annotations

import asyncio
import io
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from PIL import Image

from mone.model import MoNEConfig
from mone.server.config import Settings
from mone.server.errors import OverloadedError
from mone.server.media.decode import Decoded, decode, sniff
from mone.server.media.image import IMAGE_FORMATS
from mone.server.media.kinds import INPUT_KINDS
from mone.server.media.video import ClipDecoder

# A small image is decoded on the event loop (`inline_decode_pixels`): a 28x28 PNG takes about 50 us, less
# than handing it to a thread and back.  The byte cap bounds what Pillow may scan (a GIF's frame count).
INLINE_DECODE_BYTES = 64 << 10


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


class BudgetedDecoder:
    """Decodes request payloads within the server's budget of pixels in decoding.

    Args:
        cfg: the model's config (input size, channels, frames per clip).
        settings: the decode limits, `max_decode_pixels`, `request_timeout_s` and `inline_decode_pixels`.
        clips: the pool of clip decode workers; None decodes clips in a thread of this process.
        budget: the pixel budget (default: one of `max_decode_pixels`, waited on up to `request_timeout_s`).
    """

    def __init__(
        self,
        cfg: MoNEConfig,
        settings: Settings,
        clips: ClipDecoder | None = None,
        budget: PixelBudget | None = None,
    ) -> None:
        self.cfg = cfg
        self.settings = settings
        self.clips = clips
        self.budget = budget or PixelBudget(settings.max_decode_pixels, settings.request_timeout_s)

    async def decode(self, data: bytes, kind: str = "auto") -> Decoded:
        """Decode off the event loop (clips in `clips`, the worker processes, when given), images within the
        budget of pixels; small images on the loop itself."""
        cfg, settings, clips = self.cfg, self.settings, self.clips
        held = kind == "auto" or (kind in INPUT_KINDS and INPUT_KINDS[kind].in_process)
        pixels = header_pixels(data) if held else 0
        async with self.budget.hold(pixels):
            if 0 < pixels <= settings.inline_decode_pixels and len(data) <= INLINE_DECODE_BYTES:
                return decode(data, cfg, settings, kind, clips)
            return await asyncio.to_thread(decode, data, cfg, settings, kind, clips)
