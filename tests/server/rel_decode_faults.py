"""A clip decoder that misbehaves on request, for the decode worker tests (docs/reliability.md row 13).

It runs inside the decode worker processes, so it imports nothing heavy (no torch, no pytest).  A payload
that ends with one of the markers below misbehaves; any other payload is decoded normally by
`mone.server.media.video.decode_video`.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import time

import av
import numpy as np

from mone.server.config import Settings
from mone.server.media.video import VIDEO_FORMATS, ClipShape, decode_video

HANG = b"\x00MONE-TEST-HANG"
SEGFAULT = b"\x00MONE-TEST-SEGV"
EXIT = b"\x00MONE-TEST-EXIT"


def ignore_every_signal() -> None:
    """Ignore every signal that can be ignored, process-wide (SIGTERM, SIGINT, SIGHUP, ...)."""
    for sig in signal.valid_signals():
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            continue
        with contextlib.suppress(OSError, ValueError):
            signal.signal(sig, signal.SIG_IGN)


class StallingReader(io.BytesIO):
    """Serves the first `stall_at` bytes of a clip, then never returns from `read`: a demuxer waiting inside
    one FFmpeg call for data that never comes.  Every signal but SIGKILL is ignored first, so only the
    pool's kill can end it."""

    def __init__(self, data: bytes, stall_at: int) -> None:
        super().__init__(data)
        self.stall_at = stall_at

    def read(self, size: int | None = -1) -> bytes:
        if self.tell() + (size if size is not None and size >= 0 else 1) > self.stall_at:
            ignore_every_signal()
            while True:
                time.sleep(3600)
        return super().read(size)


def misbehaving_decode(data: bytes, fmt: str, shape: ClipShape, settings: Settings) -> np.ndarray:
    if data.endswith(HANG):
        clip = data[: -len(HANG)]
        # Called from FFmpeg's I/O callback: the hang is inside av.open, where no frame check can run.
        av.open(StallingReader(clip, len(clip) // 2), mode="r", format=VIDEO_FORMATS[fmt])
        raise AssertionError("unreachable: the reader never returns")
    if data.endswith(SEGFAULT):
        os.kill(os.getpid(), signal.SIGSEGV)
    if data.endswith(EXIT):
        os._exit(3)
    return decode_video(data, fmt, shape, settings)
