"""The PNG encoder: PIL decodes its files to exactly the input pixels, its chunks and zlib stream
check out byte by byte, its bytes do not depend on the thread count, it compresses what can be
compressed, and it names what is wrong with an input it cannot encode."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from serving.imaging import png
from serving.imaging.png import SIGNATURE, adler32_combine, encode_png


def noise(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def gradient(height: int, width: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // width, y * 255 // height, (x + y) * 127 // (width + height)], -1)


SMOOTH = gradient(1024, 1024).astype(np.uint8)


def decoded(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as image:
        image.load()
        return np.asarray(image)


def chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    """(type, data) of every chunk, asserting each one's CRC."""
    assert png[:8] == SIGNATURE
    found, at = [], 8
    while at < len(png):
        (length,) = struct.unpack(">I", png[at : at + 4])
        kind, data = png[at + 4 : at + 8], png[at + 8 : at + 8 + length]
        (crc,) = struct.unpack(">I", png[at + 8 + length : at + 12 + length])
        assert crc == zlib.crc32(kind + data), f"bad CRC on chunk {len(found)} ({kind!r})"
        found.append((kind, data))
        at += 12 + length
    assert at == len(png)
    return found


@pytest.mark.parametrize(
    "pixels",
    [noise((1024, 1024, 3)), SMOOTH]
    + [noise((h, w, 3), seed=h * w) for h, w in [(1, 1), (1, 7), (7, 1), (33, 17), (257, 131)]],
    ids=["noise-1024", "gradient-1024", "1x1", "1x7", "7x1", "33x17", "257x131"],
)
@pytest.mark.parametrize("threads", [1, 4])
def test_pil_decodes_rgb_to_exactly_the_input(pixels, threads):
    out = decoded(encode_png(pixels, threads=threads))
    assert out.shape == pixels.shape and out.dtype == np.uint8
    assert np.array_equal(out, pixels)


@pytest.mark.parametrize(
    "shape, mode",
    [((300, 500), "L"), ((300, 500, 1), "L"), ((300, 500, 4), "RGBA"), ((1, 1, 4), "RGBA")],
)
def test_pil_decodes_grey_and_rgba_to_exactly_the_input(shape, mode):
    pixels = noise(shape)
    with Image.open(io.BytesIO(encode_png(pixels))) as image:
        assert image.mode == mode
        expected = pixels.reshape(shape[:2]) if mode == "L" else pixels
        assert np.array_equal(np.asarray(image), expected)


@pytest.mark.parametrize("pixels", [noise((1024, 1024, 3)), SMOOTH, noise((257, 131, 4))])
def test_the_bytes_are_the_same_for_any_thread_count(pixels):
    one = encode_png(pixels, threads=1)
    assert encode_png(pixels, threads=2) == one
    assert encode_png(pixels, threads=4) == one


@pytest.mark.parametrize("level", [0, 1, 6, 9])
def test_chunks_and_zlib_stream_check_out(level):
    pixels = noise((700, 900, 3))
    found = chunks(encode_png(pixels, level=level, threads=4))
    kinds = [kind for kind, _ in found]
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and found[-1][1] == b""
    assert set(kinds[1:-1]) == {b"IDAT"} and len(kinds) > 3  # several bands: several IDATs
    assert found[0][1] == struct.pack(">IIBBBBB", 900, 700, 8, 2, 0, 0, 0)
    # zlib.decompress checks the header's FCHECK and the Adler-32 trailer.
    raw = zlib.decompress(b"".join(data for kind, data in found if kind == b"IDAT"))
    assert len(raw) == 700 * (1 + 900 * 3)


def test_a_smooth_picture_compresses_to_well_under_its_raw_size():
    assert len(encode_png(SMOOTH)) < 0.4 * SMOOTH.nbytes


def test_a_non_contiguous_array_is_encoded_as_its_contiguous_copy():
    pixels = noise((64, 80, 3))
    view = pixels[:, ::-1]
    assert not view.flags.c_contiguous
    assert encode_png(view) == encode_png(np.ascontiguousarray(view))


@pytest.mark.parametrize(
    "pixels, fault",
    [
        (np.zeros((4, 4, 3), np.float32), "uint8 pixels, got dtype float32"),
        (np.zeros((4, 4, 3), np.uint16), "uint8 pixels, got dtype uint16"),
        (np.zeros((4, 4, 2), np.uint8), "got shape [4, 4, 2]"),
        (np.zeros((2, 4, 4, 3), np.uint8), "got shape [2, 4, 4, 3]"),
        (np.zeros(12, np.uint8), "got shape [12]"),
        (np.zeros((0, 4, 3), np.uint8), "at least 1x1 pixels, got shape [0, 4, 3]"),
        ([[0, 1], [2, 3]], "a numpy array, got list"),
    ],
)
def test_an_input_it_cannot_encode_is_a_value_error_naming_the_fault(pixels, fault):
    with pytest.raises(ValueError, match=fault.replace("[", r"\[")):
        encode_png(pixels)


@pytest.mark.parametrize(
    "level, threads, fault", [(10, 1, "level"), (-1, 1, "level"), (1, 0, "threads")]
)
def test_a_bad_level_or_thread_count_is_a_value_error(level, threads, fault):
    with pytest.raises(ValueError, match=fault):
        encode_png(noise((4, 4, 3)), level=level, threads=threads)


def test_adler32_combine_equals_the_checksum_of_the_joined_bytes():
    rng = np.random.default_rng(1)
    for size_a, size_b in [(0, 5), (5, 0), (1, 1), (70_000, 123_457), (3, 5_000_000)]:
        a, b = rng.bytes(size_a), rng.bytes(size_b)
        combined = adler32_combine(zlib.adler32(a), zlib.adler32(b), len(b))
        assert combined == zlib.adler32(a + b)
    high = b"\xff" * 100_000  # sums that wrap the modulus many times over
    assert adler32_combine(zlib.adler32(high), zlib.adler32(high), len(high)) == zlib.adler32(
        high + high
    )


@pytest.mark.parametrize("level", range(10))
def test_the_zlib_header_is_zlibs_own_for_every_level(level):
    assert png._zlib_header(level) == zlib.compress(b"x", level)[:2]


def test_the_default_level_is_1():
    pixels = np.arange(48 * 32 * 3, dtype=np.uint8).reshape(48, 32, 3)
    assert png.encode_png(pixels) == png.encode_png(pixels, level=1)
    assert png.encode_png(pixels) != png.encode_png(pixels, level=2)
