"""Hostile media (docs/reliability.md rows 6-12): each input gets its documented status, the decoder of a
refused format is never invoked, no local file is ever read, memory stays bounded and the server stays
healthy."""

from __future__ import annotations

import errno
import os
import subprocess
import threading
import time
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import httpx
import pytest
import torch
from PIL import Image

from mone.model import MoNEConfig
from mone.model.preprocess import pil_to_tensor
from mone.server.config import Settings
from mone.server.errors import (
    BadInputError,
    OverLimitError,
    ServeError,
    TooLargeError,
    UnsupportedMediaError,
)
from mone.server.media.decode import decode
from tests.server import rel_corpus as corpus
from tests.support.media import encode

CFG = MoNEConfig.from_variant("Mi/4", num_classes=10)
S = Settings(random_init=True)
DOCUMENTED = {400, 413, 415, 422}


def _forbid(*_: Any, **__: Any) -> Any:
    raise AssertionError("a decoder was invoked for a refused format")


@pytest.fixture
def no_decoders(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any Pillow open, PyAV open or subprocess (Ghostscript for EPS) fails the test."""
    monkeypatch.setattr(Image, "open", _forbid)
    monkeypatch.setattr(av, "open", _forbid)
    monkeypatch.setattr(subprocess, "Popen", _forbid)


# -- row 6: decompression bombs ----------------------------------------------------------------------------
BOMBS: dict[str, Callable[[], bytes]] = {
    "png_50k_x_50k_header": lambda: corpus.png_claiming(50_000, 50_000),
    "png_65535_x_1": lambda: corpus.png_claiming(65_535, 1),
    "png_7000_x_7000_header": lambda: corpus.png_claiming(7000, 7000),
    "png_9000_zlib_bomb": corpus.png_bomb_real,
    "gif_65535_x_65535_screen": lambda: corpus.gif_claiming(65_535, 65_535),
}


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_rel_bomb_is_413_with_bounded_memory(name: str) -> None:
    data = BOMBS[name]()
    assert len(data) < 200_000, "the bomb itself is small"
    reset = corpus.reset_peak_rss()
    before = corpus.rss_mb()
    t0 = time.monotonic()
    with pytest.raises(TooLargeError, match="too large"):
        decode(data, CFG, S)
    assert time.monotonic() - t0 < 1.0
    grew = (corpus.peak_rss_mb() if reset else corpus.rss_mb()) - before
    assert grew < 64, f"decoding a refused bomb grew memory by {grew:.0f} MB"


def test_rel_huge_later_gif_frame_is_bounded() -> None:
    """A later frame claiming 60000x60000: frame 0 is served (or a 4xx) quickly, with no memory spike."""
    reset = corpus.reset_peak_rss()
    before = corpus.rss_mb()
    t0 = time.monotonic()
    d = decode(corpus.gif_with_huge_later_frame(), CFG, S)  # frame 0 only: the later frame is never read
    assert d.tensor.shape == (1, 1, 28, 28)
    assert float(d.tensor.max()) == float(d.tensor.min()), "frame 0 is uniform black"
    assert time.monotonic() - t0 < 1.0
    grew = (corpus.peak_rss_mb() if reset else corpus.rss_mb()) - before
    assert grew < 64


# -- row 7: disallowed formats, renamed ----------------------------------------------------------------------
@pytest.mark.parametrize("fmt", sorted(corpus.disallowed()))
def test_rel_disallowed_format_is_415_without_its_decoder(fmt: str, no_decoders: None) -> None:
    data = corpus.disallowed()[fmt]
    for kind in ("auto", "image", "clip"):
        with pytest.raises(UnsupportedMediaError) as info:
            decode(data, CFG, S, kind)  # type: ignore[arg-type]
        assert "image/png" in info.value.detail["allowed"]


# -- row 8: corrupt, truncated, zero-byte, random ----------------------------------------------------------
@pytest.mark.parametrize("name", sorted(corpus.corrupt()))
def test_rel_corrupt_input_is_a_clear_4xx(name: str) -> None:
    data = corpus.corrupt()[name]
    with pytest.raises(ServeError) as info:
        decode(data, CFG, S)
    assert isinstance(info.value, BadInputError | UnsupportedMediaError), type(info.value)
    assert info.value.message
    assert len(info.value.message) < 500


# -- row 9: EXIF orientations and odd modes ----------------------------------------------------------------
@pytest.mark.parametrize("orientation", range(2, 9))
@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_rel_exif_orientation_gives_the_upright_picture(orientation: int, fmt: str) -> None:
    extra = {"lossless": True} if fmt == "WEBP" else {}
    stored = corpus.upright().transpose(corpus.ORIENT[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    got = decode(encode(stored, fmt, exif=exif.tobytes(), **extra), CFG, S).tensor[0]
    torch.testing.assert_close(got, pil_to_tensor(corpus.upright(), CFG))


def test_rel_jpeg_exif_orientation_is_applied() -> None:
    """Lossy, so compared to the upright JPEG within a tolerance, and far from the un-rotated picture."""
    want = decode(encode(corpus.upright(), "JPEG", quality=95), CFG, S).tensor[0]
    for orientation in range(2, 9):
        got = decode(corpus.oriented(orientation, "JPEG"), CFG, S).tensor[0]
        assert float((got - want).abs().mean()) < 0.05, orientation


@pytest.mark.parametrize(
    ("mode", "tol"),
    [("RGB", 0.0), ("RGBA", 0.0), ("LA", 0.0), ("P_transparent", 0.0), ("I;16", 0.0), ("CMYK", 0.05)],
)
def test_rel_modes_give_the_same_picture(mode: str, tol: float) -> None:
    want = pil_to_tensor(corpus.upright(), CFG)
    data = corpus.in_mode(mode)
    if mode == "P_transparent":  # index 0 is transparent and flattens onto black; compare to that
        img = Image.open(__import__("io").BytesIO(data))
        want = pil_to_tensor(img, CFG)
    got = decode(data, CFG, S).tensor[0]
    assert got.shape == (1, 28, 28)
    assert torch.isfinite(got).all()
    assert float((got - want).abs().mean()) <= tol + 1e-6, mode


def test_rel_mode_1_is_binary_in_range() -> None:
    got = decode(corpus.in_mode("1"), CFG, S).tensor
    assert set(torch.unique(got).tolist()) <= {-1.0, 1.0}


# -- row 10: animated images -------------------------------------------------------------------------------
def test_rel_gif_over_frame_cap_is_422_quickly() -> None:
    data = corpus.gif_many_frames(1200)
    t0 = time.monotonic()
    with pytest.raises(OverLimitError, match="frames"):
        decode(data, CFG, S)
    assert time.monotonic() - t0 < 1.0


def test_rel_gif_under_frame_cap_serves_frame_0_quickly() -> None:
    data = corpus.gif_many_frames(999)
    t0 = time.monotonic()
    d = decode(data, CFG, S)
    assert time.monotonic() - t0 < 1.0
    assert float(d.tensor.max()) == float(d.tensor.min()) == -1.0, "frame 0 is black"


# -- row 12: clips with absurd duration, size, streams, codec ----------------------------------------------
CLIPS: dict[str, tuple[Callable[[], bytes], type[ServeError]]] = {
    "ten_hours": (lambda: corpus.clip(n=3, rate=Fraction(1, 18000)), OverLimitError),
    "side_5000": (lambda: corpus.clip(n=2, size=(5000, 16), codec="mpeg4"), TooLargeError),
    "two_video_streams": (lambda: corpus.clip(n=2, streams=2), OverLimitError),
    "codec_mpeg2video": (lambda: corpus.clip(n=2, codec="mpeg2video"), UnsupportedMediaError),
    "codec_ffv1_in_mkv": (lambda: _webm_ffv1(), UnsupportedMediaError),
}


def _webm_ffv1() -> bytes:
    return corpus.clip(n=2, codec="ffv1", fmt="matroska")


@pytest.mark.parametrize("name", sorted(CLIPS))
def test_rel_absurd_clip_is_refused_with_the_reason(name: str) -> None:
    build, error = CLIPS[name]
    data = build()
    t0 = time.monotonic()
    with pytest.raises(error):
        decode(data, CFG, S, "clip")
    assert time.monotonic() - t0 < 2.0


def test_rel_clip_frame_cap_stops_decoding() -> None:
    """More frames than max_video_frames: refused once the cap is reached, not after decoding all."""
    data = corpus.clip(n=60, rate=30)
    with pytest.raises(OverLimitError, match="more than 20 frames"):
        decode(data, CFG, Settings(random_init=True, max_video_frames=20), "clip")


# -- row 11: playlists posing as video never read a local file ---------------------------------------------
@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    """A FIFO: opening it for reading blocks until a writer comes, so any read of it would hang the decode."""
    path = tmp_path / "secret.ts"
    os.mkfifo(path)
    return path


def _decode_in_thread(data: bytes, kind: str) -> tuple[bool, BaseException | None]:
    box: dict[str, BaseException | None] = {"exc": None}

    def work() -> None:
        try:
            decode(data, CFG, S, kind)  # type: ignore[arg-type]
        except BaseException as exc:
            box["exc"] = exc

    t = threading.Thread(target=work, daemon=True)
    t.start()
    t.join(5.0)
    return not t.is_alive(), box["exc"]


@pytest.mark.parametrize("name", sorted(corpus.playlists("/x")))
@pytest.mark.parametrize("kind", ["auto", "clip"])
def test_rel_playlist_is_refused_and_reads_no_file(name: str, kind: str, fifo: Path) -> None:
    data = corpus.playlists(str(fifo))[name]
    finished, exc = _decode_in_thread(data, kind)
    if not finished:
        os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # unblock the reader before failing
        pytest.fail("the decoder opened the local file named in the playlist")
    assert isinstance(exc, UnsupportedMediaError | BadInputError), repr(exc)
    # Nobody holds the FIFO open for reading: a non-blocking writer finds no reader.
    with pytest.raises(OSError, match="No such device or address") as info:
        os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    assert info.value.errno == errno.ENXIO


def test_rel_playlist_marker_file_contents_never_reach_the_answer(tmp_path: Path) -> None:
    marker = tmp_path / "marker.txt"
    marker.write_text("MARKER-7f3a")
    atime = marker.stat().st_atime_ns
    for data in corpus.playlists(str(marker)).values():
        with pytest.raises(ServeError) as info:
            decode(data, CFG, S, "clip")
        assert "MARKER" not in info.value.message
    assert marker.stat().st_atime_ns == atime


# -- the same corpus over HTTP: documented codes, then healthy ---------------------------------------------
def _http_corpus() -> dict[str, tuple[bytes, set[int]]]:
    cases: dict[str, tuple[bytes, set[int]]] = {}
    for name, build in BOMBS.items():
        cases[f"bomb:{name}"] = (build(), {413})
    for name, data in corpus.disallowed().items():
        cases[f"format:{name}"] = (data, {415})
    for name, data in corpus.corrupt().items():
        cases[f"corrupt:{name}"] = (data, {400, 415})
    cases["gif:1200_frames"] = (corpus.gif_many_frames(1200), {422})
    cases["gif:huge_later_frame"] = (corpus.gif_with_huge_later_frame(), {200, 400, 413, 422})
    for name, (build, _) in CLIPS.items():
        cases[f"clip:{name}"] = (build(), {413, 415, 422})
    for name, data in corpus.playlists("/etc/passwd").items():
        cases[f"playlist:{name}"] = (data, {400, 415})
    return cases


pytestmark_anyio = pytest.mark.anyio


@pytest.mark.anyio
async def test_rel_http_corpus_gets_documented_codes_then_server_is_healthy(
    client: httpx.AsyncClient,
) -> None:
    corpus.reset_peak_rss()
    before = corpus.rss_mb()
    seen: dict[str, int] = {}
    for name, (data, allowed) in _http_corpus().items():
        r = await client.post("/v1/classify", files={"file": ("upload.png", data, "image/png")})
        seen[name] = r.status_code
        assert r.status_code in allowed, (name, r.status_code, r.text[:200])
        if r.status_code != 200:
            body = r.json()["error"]
            assert body["code"], name
            assert body["message"], name
            assert "root:" not in r.text
    assert all(code in DOCUMENTED | {200} for code in seen.values())
    grew = corpus.peak_rss_mb() - before
    assert grew < 256, f"the corpus grew server memory by {grew:.0f} MB"
    assert (await client.get("/healthz")).status_code == 200
    assert (await client.get("/readyz")).status_code == 200
    ok = await client.post("/v1/classify", files={"file": ("ok.png", encode(corpus.upright()), "image/png")})
    assert ok.status_code == 200


@pytest.mark.anyio
async def test_rel_orientations_have_the_upright_top1_over_http(client: httpx.AsyncClient) -> None:
    async def top1(data: bytes) -> int:
        r = await client.post("/v1/classify?capacity=1", content=data, headers={"content-type": "image/png"})
        assert r.status_code == 200, r.text
        return int(r.json()["top_k"][0]["index"])

    want = await top1(encode(corpus.upright()))
    for orientation in range(2, 9):
        assert await top1(corpus.oriented(orientation)) == want, orientation
