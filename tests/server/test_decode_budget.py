"""The budget of pixels in decoding (server/media/decode_budget.py): waits in order, never oversubscribes,
gives 503 after its wait, and is released whatever happens to the decode; and where an image is decoded."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from PIL import Image

import mone.server.media.decode_budget
from mone.model import MoNEConfig
from mone.server.config import Settings
from mone.server.errors import OverloadedError
from mone.server.media.decode import Decoded, decode
from mone.server.media.decode_budget import BudgetedDecoder, PixelBudget, header_pixels
from tests.support.media import encode

pytestmark = pytest.mark.anyio


def test_header_pixels_reads_the_size_without_decoding() -> None:
    assert header_pixels(encode(Image.new("L", (8192, 4882)), "PNG")) == 8192 * 4882
    assert header_pixels(encode(Image.new("RGB", (30, 20)), "JPEG")) == 600
    assert header_pixels(b"\x00\x00\x00\x18ftypmp42") == 0  # a clip: not an image
    assert header_pixels(b"\x89PNG\r\n\x1a\n" + b"\0" * 32) == 0  # malformed: the decoder reports it


async def test_holders_never_exceed_the_budget_and_wait_in_order() -> None:
    budget = PixelBudget(100, wait_s=5.0)
    peak, order = 0, []

    async def decode(name: str, pixels: int, seconds: float) -> None:
        nonlocal peak
        async with budget.hold(pixels):
            order.append(name)
            peak = max(peak, budget.used)
            await asyncio.sleep(seconds)

    await asyncio.gather(
        decode("a", 60, 0.05), decode("b", 60, 0.01), decode("c", 10, 0.01), decode("big", 500, 0.01)
    )
    assert peak <= 100
    assert order == ["a", "b", "c", "big"]  # c fits beside a but queues behind b: first come, first served
    assert budget.used == 0


async def test_a_wait_past_the_limit_is_503_and_releases_nothing_it_did_not_take() -> None:
    budget = PixelBudget(100, wait_s=0.05)
    async with budget.hold(100):
        with pytest.raises(OverloadedError) as info:
            async with budget.hold(1):
                pass
        assert info.value.retry_after == 1.0
        assert budget.used == 100
    assert budget.used == 0
    async with budget.hold(100):  # the timed-out waiter left no trace in the queue
        assert budget.used == 100


async def test_a_failing_or_cancelled_decode_gives_its_pixels_back() -> None:
    budget = PixelBudget(100, wait_s=5.0)
    with pytest.raises(ValueError, match="corrupt"):
        async with budget.hold(70):
            raise ValueError("corrupt")
    assert budget.used == 0

    async def hold_long() -> None:
        async with budget.hold(80):
            await asyncio.sleep(10)

    holder = asyncio.create_task(hold_long())
    await asyncio.sleep(0.01)
    waiter = asyncio.create_task(hold_long())  # waits: 80 + 80 > 100
    await asyncio.sleep(0.01)
    waiter.cancel()
    holder.cancel()
    await asyncio.gather(holder, waiter, return_exceptions=True)
    assert budget.used == 0
    async with budget.hold(100):
        assert budget.used == 100


@pytest.mark.parametrize(
    ("size", "inline_pixels", "on_loop"),
    [((28, 28), 16_384, True), ((200, 200), 16_384, False), ((28, 28), 0, False)],
)
async def test_small_images_decode_on_the_loop_and_the_rest_in_a_thread(
    monkeypatch: pytest.MonkeyPatch, size: tuple[int, int], inline_pixels: int, on_loop: bool
) -> None:
    """An image within `inline_decode_pixels` is decoded where it arrives, on the event loop's thread (a
    hand-off would cost more); a larger one, or any with the setting at 0, in a worker thread.  Either way
    it holds its pixels of the decoding budget while it decodes and gives them back."""
    seen: list[tuple[threading.Thread, int]] = []
    cfg = MoNEConfig.from_variant("Mi/4", num_classes=10)
    settings = Settings(inline_decode_pixels=inline_pixels)
    budget = PixelBudget(10**6, 5.0)

    def recording(*args: Any) -> Decoded:
        seen.append((threading.current_thread(), budget.used))
        return decode(*args)

    monkeypatch.setattr(mone.server.media.decode_budget, "decode", recording)
    data = encode(Image.new("L", size, 128), "PNG")
    out = await BudgetedDecoder(cfg, settings, budget=budget).decode(data)
    assert out.tensor.shape[-2:] == (28, 28)
    [(thread, held)] = seen
    assert (thread is threading.current_thread()) == on_loop
    assert held == size[0] * size[1]
    assert budget.used == 0
