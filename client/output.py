"""Where the client writes an image: the format follows the file's extension (PNG as the server
sent it; JPEG and WebP re-encoded at a quality), and the path is checked before the call, so a
bad one fails in a second instead of after the whole generation."""

from __future__ import annotations

import io
import os
from pathlib import Path

from PIL import Image

# extension -> PIL format name
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
DEFAULT_QUALITY = 90


class OutputPathError(ValueError):
    """The output path cannot take the result; the message says why."""


def image_format(path: Path) -> str:
    """The PIL format `path`'s extension names; OutputPathError for any other extension."""
    fmt = IMAGE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise OutputPathError(
            f"{path}: unknown image extension {path.suffix!r}; use one of "
            f"{', '.join(sorted(IMAGE_FORMATS))}"
        )
    return fmt


def check_writable(path: Path) -> None:
    """Create `path`'s folder if needed and check that the file can be written there."""
    if path.is_dir():
        raise OutputPathError(f"{path} is a directory")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputPathError(f"cannot create {path.parent}: {e.strerror or e}") from None
    target = path if path.exists() else path.parent
    if not os.access(target, os.W_OK):
        raise OutputPathError(f"{target} is not writable")


def encode(png: bytes, image: Image.Image | None, fmt: str, quality: int) -> bytes:
    """The bytes to write: the server's PNG as it is, or `image` re-encoded as `fmt`."""
    if fmt == "PNG":
        return png
    if image is None:
        raise ValueError("no decoded image to re-encode")
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format=fmt, quality=quality)
    return buffer.getvalue()
