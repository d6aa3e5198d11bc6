"""`serving.imaging.input_images`: the checks every input image passes before any compute, each failure an
InvalidParams that names the image and what is wrong with it."""

from __future__ import annotations

import io
import warnings

import pytest
from PIL import Image

from serving.errors import InvalidParams
from serving.imaging import input_images as images
from serving.imaging.input_images import decode_input_image, decode_input_images, has_alpha


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kwargs)
    return out.getvalue()


def test_a_png_decodes_to_rgb_with_its_pixels():
    source = Image.new("RGB", (3, 2), (10, 20, 30))
    [decoded] = decode_input_images([encode(source)])
    assert decoded.mode == "RGB" and decoded.size == (3, 2)
    assert decoded.getpixel((2, 1)) == (10, 20, 30)


def test_transparency_is_kept_as_rgba_and_grey_becomes_rgb():
    rgba = decode_input_image(encode(Image.new("RGBA", (2, 2), (1, 2, 3, 4))))
    assert rgba.mode == "RGBA" and rgba.getpixel((0, 0)) == (1, 2, 3, 4)
    grey = decode_input_image(encode(Image.new("L", (2, 2), 7)))
    assert grey.mode == "RGB" and grey.getpixel((1, 1)) == (7, 7, 7)
    jpeg = decode_input_image(encode(Image.new("RGB", (8, 8), (200, 0, 0)), "JPEG"))
    assert jpeg.mode == "RGB" and jpeg.size == (8, 8)


def test_has_alpha_for_alpha_modes_and_a_transparency_entry_only():
    assert [has_alpha(Image.new(mode, (1, 1))) for mode in ("RGBA", "LA", "PA")] == [True] * 3
    assert not has_alpha(Image.new("RGB", (1, 1)))
    assert not has_alpha(Image.new("P", (1, 1)))
    palette = Image.open(io.BytesIO(encode(Image.new("P", (1, 1)), transparency=0)))
    assert has_alpha(palette)


def test_more_images_than_accepted_are_refused_with_the_count():
    data = encode(Image.new("RGB", (1, 1)))
    with pytest.raises(InvalidParams) as err:
        decode_input_images([data, data])
    assert str(err.value) == "2 input images were sent; at most 1 is accepted"
    assert decode_input_images([]) == []


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "input_images[0] is empty"),
        (b"GIF89a" + bytes(20), "input_images[0] is not a PNG or JPEG image"),
    ],
)
def test_a_bad_image_is_named_by_its_place(data, message):
    with pytest.raises(InvalidParams) as err:
        decode_input_images([data])
    assert str(err.value).startswith(message)


def test_an_image_over_the_byte_limit_is_refused_before_decoding(monkeypatch):
    monkeypatch.setattr(images, "MAX_INPUT_IMAGE_BYTES", 10)
    with pytest.raises(InvalidParams) as err:
        decode_input_image(bytes(11), "img")
    assert str(err.value) == "img is 11 bytes; the limit is 10 bytes"
    with pytest.raises(InvalidParams, match="img is empty|not a PNG"):
        decode_input_image(bytes(10), "img")  # at the limit: decoded, and not an image


def test_an_image_over_the_pixel_limit_is_refused_with_its_size(monkeypatch):
    data = encode(Image.new("RGB", (4, 3)))
    monkeypatch.setattr(images, "MAX_INPUT_IMAGE_PIXELS", 11)
    with pytest.raises(InvalidParams) as err:
        decode_input_image(data, "img")
    assert str(err.value) == "img is 4x3 pixels; the limit is 11 pixels"
    monkeypatch.setattr(images, "MAX_INPUT_IMAGE_PIXELS", 12)
    assert decode_input_image(data).size == (4, 3)


def test_a_truncated_image_does_not_decode_and_says_its_format():
    data = encode(Image.effect_noise((64, 64), 50).convert("RGB"))
    with pytest.raises(InvalidParams) as err:
        decode_input_image(data[: len(data) // 2], "img")
    assert str(err.value).startswith("img does not decode (PNG): ")


def test_a_decompression_bomb_is_too_large(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5)  # PIL's own error at twice its limit
    with pytest.raises(InvalidParams) as err:
        decode_input_image(encode(Image.new("RGB", (4, 4))), "img")
    assert str(err.value).startswith("img is too large: ")


def test_the_default_name_is_input_image():
    with pytest.raises(InvalidParams, match="^input image is empty$"):
        decode_input_image(b"")


def test_edit_defaults_are_bagels_editing_settings():
    assert images.EDIT_DEFAULTS == {
        "cfg_img_scale": 2.0,
        "cfg_interval": (0.0, 1.0),
        "cfg_renorm_type": "text_channel",
    }
    assert (images.MAX_INPUT_IMAGES, images.MAX_INPUT_IMAGE_BYTES) == (1, 32 * 1024 * 1024)
    assert images.MAX_INPUT_IMAGE_PIXELS == 50_000_000
    assert images.ACCEPTED_FORMATS == ("PNG", "JPEG")


def test_a_gif_is_refused_though_pil_reads_it():
    with pytest.raises(InvalidParams, match="^img is not a PNG or JPEG image$"):
        decode_input_image(encode(Image.new("RGB", (2, 2)), "GIF"), "img")


def test_a_one_pixel_image_decodes():
    for size in ((1, 1), (1, 5), (5, 1)):
        assert decode_input_image(encode(Image.new("RGB", size, (9, 8, 7)))).size == size


def test_pils_decompression_warning_is_not_ours_to_raise(monkeypatch):
    """Between PIL's limit and twice it PIL only warns; our own pixel limit decides."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert decode_input_image(encode(Image.new("RGB", (4, 4)))).size == (4, 4)
