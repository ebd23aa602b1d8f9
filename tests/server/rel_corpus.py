"""Hostile media, generated on the fly (nothing large is committed): docs/reliability.md rows 6-12.

Every builder returns bytes small enough to keep in memory; the hostility is in what the headers claim.
"""

from __future__ import annotations

import io
import os
import resource
import struct
import zlib
from fractions import Fraction

import av
import numpy as np
from PIL import Image

from tests.support.media import encode, fashion_images


def upright() -> Image.Image:
    """An asymmetric grey picture (a Fashion-MNIST item with a bright corner mark)."""
    arr = fashion_images(1)[0].copy()
    arr[:6, :3] = 255
    return Image.fromarray(arr)


# -- decompression bombs (row 6) ---------------------------------------------------------------------------
def png_claiming(width: int, height: int) -> bytes:
    """A valid 8x8 PNG whose IHDR claims `width` x `height` (CRC fixed, so only the size is a lie)."""
    data = bytearray(encode(Image.new("L", (8, 8)), "PNG"))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def png_bomb_real(side: int = 9000) -> bytes:
    """A real zlib bomb: a `side` x `side` all-zero 1-bit PNG (a few KB, side² pixels when decoded)."""
    raw = (b"\x00" + b"\x00" * ((side + 7) // 8)) * side
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )


def gif_claiming(width: int, height: int) -> bytes:
    """A GIF whose logical screen claims `width` x `height`."""
    data = bytearray(encode(Image.new("L", (8, 8)), "GIF"))
    data[6:10] = struct.pack("<HH", width, height)
    return bytes(data)


def gif_with_huge_later_frame(width: int = 60000, height: int = 60000) -> bytes:
    """A 2-frame 8x8 GIF whose second image descriptor claims `width` x `height`."""
    frames = [Image.new("L", (8, 8), 0), Image.new("L", (8, 8), 255)]
    data = bytearray(encode(frames[0], "GIF", save_all=True, append_images=frames[1:]))
    second = data.index(b"\x2c", data.index(b"\x2c") + 1)  # image separator of frame 1
    data[second + 5 : second + 9] = struct.pack("<HH", width, height)
    return bytes(data)


def gif_many_frames(n: int) -> bytes:
    frames = [Image.new("L", (4, 4), i % 256) for i in range(n)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=20)


# -- formats outside the allow-list (row 7); each is real bytes of that format -----------------------------
def disallowed() -> dict[str, bytes]:
    img = Image.new("RGB", (16, 16), (200, 10, 10))
    out = {
        "EPS": encode(img, "EPS"),
        "PDF": encode(img, "PDF"),
        "TIFF": encode(img, "TIFF"),
        "BMP": encode(img, "BMP"),
        "ICO": encode(img, "ICO"),
        "PSD": b"8BPS\x00\x01" + b"\x00" * 6 + struct.pack(">HIIHH", 3, 16, 16, 8, 3) + b"\x00" * 64,
        "FITS": (b"SIMPLE  =                    T" + b" " * 50).ljust(2880, b" "),
        "J2K": b"\xff\x4f\xff\x51" + b"\x00" * 60,
        "JP2": b"\x00\x00\x00\x0cjP  \r\n\x87\n" + b"\x00" * 60,
        "SVG": b'<svg xmlns="http://www.w3.org/2000/svg"><image href="file:///etc/passwd"/></svg>',
    }
    return out


# -- corrupt (row 8) ---------------------------------------------------------------------------------------
def corrupt() -> dict[str, bytes]:
    good_png = encode(upright(), "PNG")
    good_jpeg = encode(upright().convert("RGB"), "JPEG")
    rng = np.random.default_rng(7)
    flipped = bytearray(good_png)
    for i in rng.integers(40, len(flipped), 20):
        flipped[int(i)] ^= 0xFF
    return {
        "zero_byte": b"",
        "random_bytes": rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "png_truncated_header": good_png[:20],
        "png_truncated_half": good_png[: len(good_png) // 2],
        "png_bitflips": bytes(flipped),
        "jpeg_truncated": good_jpeg[: len(good_jpeg) // 3],
        "jpeg_magic_only": b"\xff\xd8\xff",
        "gif_header_only": b"GIF89a",
        "webp_header_only": b"RIFF\x10\x00\x00\x00WEBPVP8 ",
        "mp4_ftyp_only": b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2",
        "webm_magic_only": b"\x1a\x45\xdf\xa3" + b"\x00" * 32,
    }


# -- odd modes (row 9) -------------------------------------------------------------------------------------
def in_mode(mode: str) -> bytes:
    """`upright()` stored in `mode` (lossless where the mode allows it)."""
    base = upright()
    if mode == "CMYK":
        return encode(base.convert("CMYK"), "JPEG", quality=100)
    if mode == "P_transparent":
        p = base.convert("P")
        return encode(p, "PNG", transparency=0)
    if mode == "I;16":
        arr = np.asarray(base).astype(np.uint16) * 257
        img = Image.fromarray(arr.astype("<u2"))
        assert img.mode.startswith("I;16"), img.mode
        return encode(img, "PNG")
    return encode(base.convert(mode), "PNG")


ORIENT = {  # EXIF orientation -> the operation that, applied to the upright picture, gives the stored one
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def oriented(orientation: int, fmt: str = "PNG") -> bytes:
    """The upright picture stored transformed, with the EXIF tag that tells a viewer how to undo it."""
    stored = upright().transpose(ORIENT[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(stored, fmt, exif=exif.tobytes())


# -- clips (row 12) ----------------------------------------------------------------------------------------
def clip(
    n: int = 4,
    size: tuple[int, int] = (28, 28),
    rate: Fraction | int = 8,
    codec: str = "libx264",
    streams: int = 1,
    fmt: str = "mp4",
) -> bytes:
    buf = io.BytesIO()
    w, h = size
    with av.open(buf, mode="w", format=fmt) as container:
        outs = []
        for _ in range(streams):
            s = container.add_stream(codec, rate=rate)
            s.width, s.height, s.pix_fmt = w, h, "yuv420p"
            outs.append(s)
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(np.full((h, w, 3), (i * 40) % 256, np.uint8), format="rgb24")
            for s in outs:
                for packet in s.encode(frame):
                    container.mux(packet)
        for s in outs:
            for packet in s.encode():
                container.mux(packet)
    return buf.getvalue()


def playlists(target: str) -> dict[str, bytes]:
    """Playlists and concat lists naming a local `target`, as bare text and behind container magic."""
    hls = f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10.0,\n{target}\n#EXT-X-ENDLIST\n".encode()
    concat = f"ffconcat version 1.0\nfile '{target}'\n".encode()
    return {
        "hls": hls,
        "hls_file_url": hls.replace(target.encode(), f"file://{target}".encode()),
        "concat": concat,
        "hls_behind_ftyp": b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2" + hls,
        "concat_behind_ftyp": b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2" + concat,
        "hls_behind_ebml": b"\x1a\x45\xdf\xa3" + hls,
        "avi_with_hls": b"RIFF\x00\x10\x00\x00AVI LIST" + hls,
        "sdp": f"v=0\nc=IN IP4 127.0.0.1\nm=video 9 RTP/AVP 96\na=x:{target}\n".encode(),
    }


# -- memory ------------------------------------------------------------------------------------------------
def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM (Linux >= 4.0) so that `peak_rss_mb` measures from now on."""
    try:
        with open(f"/proc/{os.getpid()}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return rss_mb()
