"""The input images of an edit request: the checks every image passes before any compute, and the
settings an edit takes where the request leaves them unset.

A bad image is the caller's fault and ends the call as INVALID_ARGUMENT naming what is wrong; it
never turns an edit into text-to-image.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from typing import Any

from PIL import Image, UnidentifiedImageError

from serving.errors import InvalidParams

MAX_INPUT_IMAGES = 1
MAX_INPUT_IMAGE_BYTES = 32 * 1024 * 1024
MAX_INPUT_IMAGE_PIXELS = 50_000_000  # e.g. 8192 x 6100; decoded as RGB that is 150 MB
ACCEPTED_FORMATS = ("PNG", "JPEG")

# BAGEL's editing settings (its notebook and app): image guidance 2.0 over the whole schedule,
# renormalised per text channel. Height and width default to the input's resized size.
EDIT_DEFAULTS: dict[str, Any] = {
    "cfg_img_scale": 2.0,
    "cfg_interval": (0.0, 1.0),
    "cfg_renorm_type": "text_channel",
}


def decode_input_images(images: Sequence[bytes]) -> list[Image.Image]:
    """Every input image decoded to RGB, or InvalidParams naming the first bad one."""
    if len(images) > MAX_INPUT_IMAGES:
        raise InvalidParams(
            f"{len(images)} input images were sent; at most {MAX_INPUT_IMAGES} is accepted"
        )
    return [decode_input_image(data, f"input_images[{i}]") for i, data in enumerate(images)]


def decode_input_image(data: bytes, name: str = "input image") -> Image.Image:
    if not data:
        raise InvalidParams(f"{name} is empty")
    if len(data) > MAX_INPUT_IMAGE_BYTES:
        raise InvalidParams(
            f"{name} is {len(data)} bytes; the limit is {MAX_INPUT_IMAGE_BYTES} bytes"
        )
    try:
        with warnings.catch_warnings():  # the pixel limit below is ours, and lower
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except Image.DecompressionBombError as e:
        raise InvalidParams(f"{name} is too large: {e}") from None
    except UnidentifiedImageError:
        raise InvalidParams(f"{name} is not a PNG or JPEG image") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise InvalidParams(f"{name} is not a decodable PNG or JPEG image: {e}") from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise InvalidParams(f"{name} has no pixels ({width}x{height})")
    if width * height > MAX_INPUT_IMAGE_PIXELS:
        raise InvalidParams(
            f"{name} is {width}x{height} pixels; the limit is {MAX_INPUT_IMAGE_PIXELS} pixels"
        )
    try:
        image.load()
    except (OSError, ValueError, SyntaxError) as e:
        raise InvalidParams(f"{name} does not decode ({image.format}): {e}") from None
    try:
        return image.convert("RGBA" if has_alpha(image) else "RGB")
    except (OSError, ValueError) as e:
        raise InvalidParams(f"{name} ({image.mode}) does not convert to RGB: {e}") from None


def has_alpha(image: Image.Image) -> bool:
    """Whether the image has transparency (composited onto white later, as the reference does)."""
    return image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
