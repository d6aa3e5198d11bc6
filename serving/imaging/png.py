"""PNG encoding for the services' image responses: row bands are filtered and deflated in parallel
threads (zlib and numpy release the GIL) and joined into one zlib stream, the way pigz does for
gzip, because PIL's single-threaded encode of a 1024x1024 picture is a large part of a request
(docs/benchmarks.md, "PNG encoding").

Every row takes the Up filter (each byte minus the byte above it): one vectorised subtraction; at
zlib level 1 its files are only a little larger than those of PIL's per-row adaptive choice, and
noise does not compress under any filter.
Each band ends on a sync flush, so its bytes are whole and its back-references stay inside it; the
band boundaries depend only on the image's size, so the output is the same for any thread count.
"""

from __future__ import annotations

import functools
import math
import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

SIGNATURE = b"\x89PNG\r\n\x1a\n"
COLOR_TYPES = {1: 0, 3: 2, 4: 6}  # channels -> PNG colour type: grey, RGB, RGBA
UP_FILTER = 2  # PNG filter type byte

MAX_BANDS = 32
MIN_BAND_BYTES = 64 * 1024  # smaller bands lose ratio at each flush and gain no parallelism
THREADED_MIN_BYTES = 256 * 1024  # below this the pool's hand-offs cost more than they save
ADLER_BASE = 65521


def default_threads() -> int:
    return min(8, os.cpu_count() or 1)


def encode_png(pixels: np.ndarray, level: int = 1, threads: int | None = None) -> bytes:
    """The PNG file of `pixels`: uint8 `[H, W]` (grey), `[H, W, 1]` (grey), `[H, W, 3]` (RGB) or
    `[H, W, 4]` (RGBA), 8 bits per sample, zlib `level` 0-9. A non-contiguous array is copied to C
    order first. `threads` (default `min(8, cpu_count)`) bounds how many bands deflate at once; it
    never changes the bytes. Raises ValueError naming what is wrong with the input."""
    pixels = _checked(pixels)
    if not 0 <= level <= 9:
        raise ValueError(f"the zlib level must be 0 to 9, got {level}")
    threads = default_threads() if threads is None else threads
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    height, width = pixels.shape[:2]
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    rows = pixels.reshape(height, width * channels)
    stride = 1 + rows.shape[1]  # the filter type byte heads every row
    band_rows = max(math.ceil(MIN_BAND_BYTES / stride), math.ceil(height / MAX_BANDS))
    starts = range(0, height, band_rows)
    deflate = functools.partial(
        _deflate_band, rows, level=level, band_rows=band_rows, last_start=starts[-1]
    )
    if threads == 1 or len(starts) == 1 or height * stride < THREADED_MIN_BYTES:
        bands = [deflate(start) for start in starts]
    else:
        bands = list(_pool(threads).map(deflate, starts))

    checksum = bands[0].adler
    for band in bands[1:]:
        checksum = adler32_combine(checksum, band.adler, band.length)
    trailer = struct.pack(">I", checksum)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, COLOR_TYPES[channels], 0, 0, 0)
    parts = [SIGNATURE, _chunk(b"IHDR", ihdr)]
    for band in bands[:-1]:
        parts += [_idat_head(len(band.payload)), band.payload, struct.pack(">I", band.crc)]
    last = bands[-1]
    parts += [
        _idat_head(len(last.payload) + len(trailer)),
        last.payload,
        trailer,
        struct.pack(">I", zlib.crc32(trailer, last.crc)),
        _chunk(b"IEND", b""),
    ]
    return b"".join(parts)


def adler32_combine(first: int, second: int, second_length: int) -> int:
    """The Adler-32 of A+B from those of A and of B (zlib's adler32_combine, which Python's zlib
    does not expose), so that each band's checksum can be taken in its own thread."""
    a1, b1 = first & 0xFFFF, first >> 16
    a2, b2 = second & 0xFFFF, second >> 16
    a = (a1 + a2 - 1) % ADLER_BASE
    b = (b1 + b2 + second_length * (a1 - 1)) % ADLER_BASE
    return b << 16 | a


@dataclass(frozen=True)
class _Band:
    """One band's share of the IDAT stream, deflated in a worker."""

    payload: bytes  # the IDAT chunk's data: the zlib header on the first band, then deflate
    crc: int  # the chunk's CRC-32 so far: over b"IDAT" and `payload`
    adler: int  # Adler-32 of the band's filtered bytes
    length: int  # the band's filtered bytes


def _checked(pixels: np.ndarray) -> np.ndarray:
    if not isinstance(pixels, np.ndarray):
        raise ValueError(f"encode_png takes a numpy array, got {type(pixels).__name__}")
    if pixels.dtype != np.uint8:
        raise ValueError(f"encode_png takes uint8 pixels, got dtype {pixels.dtype}")
    grey = pixels.ndim == 2
    if not (grey or (pixels.ndim == 3 and pixels.shape[2] in COLOR_TYPES)):
        raise ValueError(
            f"encode_png takes an [H, W] or [H, W, 1|3|4] array, got shape {list(pixels.shape)}"
        )
    if pixels.shape[0] == 0 or pixels.shape[1] == 0:
        raise ValueError(f"a PNG is at least 1x1 pixels, got shape {list(pixels.shape)}")
    return np.ascontiguousarray(pixels)


def _zlib_header(level: int) -> bytes:
    """CMF (deflate, 32 KiB window) and FLG: zlib's level hint, FCHECK making the pair a multiple
    of 31."""
    cmf = 0x78
    hint = 0 if level < 2 else 1 if level < 6 else 2 if level == 6 else 3
    flg = hint << 6
    flg += 31 - (cmf << 8 | flg) % 31
    return bytes((cmf, flg))


def _deflate_band(
    rows: np.ndarray, start: int, *, level: int, band_rows: int, last_start: int
) -> _Band:
    """Up-filters rows `start:start + band_rows` and deflates them; a sync flush ends every band
    but the last, so the bands' outputs concatenate into one deflate stream."""
    stop = min(start + band_rows, rows.shape[0])
    filtered = np.empty((stop - start, 1 + rows.shape[1]), np.uint8)
    filtered[:, 0] = UP_FILTER
    if start == 0:  # the row above the first is zeros
        filtered[0, 1:] = rows[0]
        np.subtract(rows[1:stop], rows[: stop - 1], out=filtered[1:, 1:])
    else:
        np.subtract(rows[start:stop], rows[start - 1 : stop - 1], out=filtered[:, 1:])
    compressor = zlib.compressobj(level, zlib.DEFLATED, -15)
    head = _zlib_header(level) if start == 0 else b""
    flush = zlib.Z_FINISH if start == last_start else zlib.Z_SYNC_FLUSH
    payload = b"".join((head, compressor.compress(filtered), compressor.flush(flush)))
    crc = zlib.crc32(payload, zlib.crc32(b"IDAT"))
    return _Band(payload, crc, zlib.adler32(filtered), filtered.size)


def _idat_head(length: int) -> bytes:
    return struct.pack(">I", length) + b"IDAT"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@functools.cache
def _pool(threads: int) -> ThreadPoolExecutor:
    """One pool per thread count, made on first use and kept for the process."""
    return ThreadPoolExecutor(threads, thread_name_prefix="png-encode")
