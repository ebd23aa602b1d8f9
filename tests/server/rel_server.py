"""`python -m tests.server.rel_server [mone-serve flags]`: mone-serve with an optionally slowed model.

REL_SLOW_MS=<ms> makes every forward sleep that long first (the model stub of docs/reliability.md rows 16, 17,
21 and 23: it keeps batches in flight long enough to be interrupted).  REL_FAIL_ONCE=1 makes the first
forward after warm-up raise, as a CUDA out-of-memory error would.  REL_BLOCK_ROUTE=1 adds
`GET /rel/block?seconds=<s>`, which blocks the event loop that long (stuck; docs/reliability.md row 24).
REL_HANG_FILE=<path> makes every forward hang while that file exists (a stuck inference thread).
"""

from __future__ import annotations

import os
import time
from typing import Any

from mone.server.cli import main
from mone.server.core import runner


def _patch() -> None:
    slow = float(os.environ.get("REL_SLOW_MS", "0")) / 1e3
    run = runner.Runner.run

    hang = os.environ.get("REL_HANG_FILE")

    def slowed(self: runner.Runner, *args: Any) -> Any:
        if slow:
            time.sleep(slow)
        while hang and os.path.exists(hang):  # a hung forward, for as long as the test keeps the file
            time.sleep(0.01)
        return run(self, *args)

    runner.Runner.run = slowed  # type: ignore[method-assign]
    if os.environ.get("REL_BLOCK_ROUTE"):
        _add_block_route()


def _add_block_route() -> None:
    from fastapi import FastAPI

    from mone.server.http import app as app_module

    factory = app_module.app_factory

    def with_block() -> FastAPI:
        application = factory()

        async def block(seconds: float) -> dict[str, float]:
            time.sleep(seconds)  # on the event loop, on purpose
            return {"blocked_s": seconds}

        application.add_api_route("/rel/block", block, methods=["GET"])
        application.router.routes.insert(0, application.router.routes.pop())  # before the web page's mount
        return application

    app_module.app_factory = with_block


if __name__ == "__main__":
    _patch()
    raise SystemExit(main())
