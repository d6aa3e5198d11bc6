"""The image bytes an answer carries: the service's PNG as it is, or re-encoded as JPEG or WebP
with `output_compression` as the quality."""

from __future__ import annotations

import asyncio
import base64
import io

from PIL import Image

DEFAULT_QUALITY = 100  # OpenAI's default output_compression


def encode_image(png: bytes, output_format: str, compression: int | None) -> bytes:
    if output_format == "png":
        return png
    quality = DEFAULT_QUALITY if compression is None else compression
    with Image.open(io.BytesIO(png)) as image:
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format=output_format.upper(), quality=quality)
    return buffer.getvalue()


def b64(png: bytes, output_format: str, compression: int | None) -> str:
    return base64.b64encode(encode_image(png, output_format, compression)).decode("ascii")


async def b64_off_loop(png: bytes, output_format: str, compression: int | None) -> str:
    """`b64`, re-encoding on a worker thread (tens of ms at 1024²) so the event loop keeps
    serving; a PNG is only base64-encoded, which is quicker than the hop to a thread."""
    if output_format == "png":
        return b64(png, output_format, compression)
    return await asyncio.to_thread(b64, png, output_format, compression)
