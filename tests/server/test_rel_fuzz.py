"""Property-based fuzzing of the decoding entry point (docs/reliability.md rows 8 and 13): whatever the bytes,
`decode` either returns a finite tensor of the model's shape or raises one of the documented errors (400,
413, 415, 422), within a time bound.  Inputs are random bytes and structured mutations (bit flips,
truncation, splices, overwritten size fields, trailing bytes) of valid PNG, JPEG, GIF, WebP, MP4 and WebM
seeds.  Every seed must decode, and so must some of the mutations (a campaign in which nothing decodes would
test only the refusals).  Clips are decoded as the server decodes them, in a `DecodePool` of worker
processes that are killed at the decode budget; the pool must still be whole at the end.

CI runs a short bounded campaign; REL_FUZZ_EXAMPLES=N runs a longer one (see docs/reliability.md).
"""

from __future__ import annotations

import os
import time
from functools import cache

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mone.model import MoNEConfig
from mone.server.config import Settings
from mone.server.errors import BadInputError, OverLimitError, TooLargeError, UnsupportedMediaError
from mone.server.media.decode import decode
from mone.server.media.decode_pool import DecodePool
from tests.server import rel_corpus as corpus
from tests.support.media import encode, encode_clip

CFG = MoNEConfig.from_variant("Mi/4", num_classes=10)
S = Settings(random_init=True, max_decode_seconds=2.0)
DOCUMENTED = (BadInputError, UnsupportedMediaError, TooLargeError, OverLimitError)
EXAMPLES = int(os.environ.get("REL_FUZZ_EXAMPLES", "300"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,  # a per-example wall bound is asserted below instead (first calls import codecs)
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
    derandomize=os.environ.get("REL_FUZZ_RANDOM") is None,
)
STATS = {"executions": 0, "ok": 0, "documented_errors": 0, "slowest_s": 0.0, "mutated": 0, "mutated_ok": 0}
WORKERS = 2


@cache
def clip_pool() -> DecodePool:
    pool = DecodePool(WORKERS)
    pool.wait_ready()
    return pool


@cache
def seeds() -> list[bytes]:
    pic = corpus.upright()
    frames = [np.full((16, 16), 30 * i, np.uint8) for i in range(4)]
    still = [Image.new("L", (8, 8), 40 * i) for i in range(3)]
    return [
        encode(pic, "PNG"),
        encode(pic.convert("RGB"), "JPEG"),
        encode(pic, "WEBP"),
        encode(pic, "GIF"),
        encode(still[0], "GIF", save_all=True, append_images=still[1:]),
        corpus.oriented(6, "JPEG"),
        encode_clip(frames, "mp4", "libx264"),
        encode_clip(frames, "webm", "libvpx"),
    ]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(seeds())))
    # Zero edits, or trailing bytes only, leave a file that decodes: the campaign covers the success path too.
    for _ in range(draw(st.integers(0, 8))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "int32", "splice", "append"]))
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        if op == "append":
            data += draw(st.binary(min_size=1, max_size=64))
        elif op == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[i:]
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=64))
        elif op == "delete":
            del data[i : i + draw(st.integers(1, 64))]
        elif op == "int32":  # size and length fields: the interesting values
            value = draw(st.sampled_from([0, 1, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF]))
            data[i : i + 4] = value.to_bytes(4, draw(st.sampled_from(["big", "little"])))
        else:
            other = draw(st.sampled_from(seeds()))
            j = draw(st.integers(0, len(other) - 1))
            data[i:] = other[j:]
    return bytes(data)


def check(data: bytes, kind: str) -> bool:
    """True when `data` decoded (to a finite tensor of the model's shape), False for a documented error."""
    STATS["executions"] += 1
    ok = False
    t0 = time.monotonic()
    try:
        d = decode(data, CFG, S, kind, clip_pool())  # type: ignore[arg-type]
    except DOCUMENTED:
        STATS["documented_errors"] += 1
    else:
        STATS["ok"] += 1
        ok = True
        assert d.tensor.shape[1:] == (1, 28, 28)
        assert d.tensor.shape[0] in (1, CFG.num_frames)
        assert torch.isfinite(d.tensor).all()
    took = time.monotonic() - t0
    STATS["slowest_s"] = max(STATS["slowest_s"], took)
    assert took < S.max_decode_seconds + 3.0, f"decode took {took:.1f} s"
    return ok


SEED_KINDS = ["png", "jpeg", "webp", "gif", "animated_gif", "oriented_jpeg", "mp4", "webm"]


@pytest.mark.parametrize("index", range(len(SEED_KINDS)), ids=SEED_KINDS)
def test_rel_fuzz_every_seed_decodes(index: int) -> None:
    """The mutations start from files that decode: each seed gives an image, or a clip of the model's
    frames, so the campaign below explores around inputs the decoder accepts."""
    data = seeds()[index]
    d = decode(data, CFG, S, "auto", clip_pool())
    clip = SEED_KINDS[index] in ("mp4", "webm")
    assert d.tensor.shape == ((CFG.num_frames if clip else 1), 1, 28, 28)
    assert torch.isfinite(d.tensor).all()
    assert check(data, "auto")


KINDS = st.sampled_from(["auto", "image", "clip"])


@FUZZ
@given(data=st.binary(max_size=4096), kind=KINDS)
def test_rel_fuzz_random_bytes(data: bytes, kind: str) -> None:
    check(data, kind)


@FUZZ
@given(data=mutated(), kind=KINDS)
def test_rel_fuzz_mutated_media(data: bytes, kind: str) -> None:
    STATS["mutated"] += 1
    STATS["mutated_ok"] += check(data, kind)


@FUZZ
@given(data=mutated())
def test_rel_fuzz_header_then_garbage(data: bytes) -> None:
    """The first 16 bytes of a valid file (so the sniffer says yes), then mutated remains."""
    check(data[:16] + data[16:][::-1], "auto")


@pytest.fixture(scope="module", autouse=True)
def report() -> object:
    pool = clip_pool()  # started before the timed decodes
    yield None
    alive = pool.alive()
    pool.close()
    print(f"\nREL-FIGURES fuzz_decode {STATS} clip_pool={vars(pool.stats)} workers_alive={alive}")
    assert alive == WORKERS, "the decode pool shrank"
    if STATS["mutated"] >= 50:  # a campaign that only ever raised would not have tested decoding
        assert STATS["mutated_ok"] > 0, STATS
