"""`build_request`: keyword arguments map to the right proto fields, and only those given are set."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from client import PARAM_NAMES, build_request
from client.request import image_bytes
from protos import CfgRenormType, params_pb2
from serving.params import DBCache, GenerationParams
from tests.serving.examples import EVERY_FIELD, fields_left_at_default


def test_every_keyword_maps_to_its_proto_field():
    request = build_request(
        "A cute cat",
        height=512,
        width=768,
        num_timesteps=30,
        timestep_shift=2.5,
        cfg_text_scale=4,
        cfg_img_scale=1.5,
        cfg_interval=(0.4, 1.0),
        cfg_renorm_type="text_channel",
        cfg_renorm_min=0.25,
        seed=52,
        negative_prompt="blurry",
        request_id="r-1",
    )
    p = request.params
    assert request.prompt == "A cute cat" and request.request_id == "r-1"
    assert (p.height, p.width, p.num_timesteps, p.seed) == (512, 768, 30, 52)
    assert (p.timestep_shift, p.cfg_text_scale, p.cfg_img_scale) == (2.5, 4.0, 1.5)
    assert (p.cfg_interval.lo, p.cfg_interval.hi, p.cfg_renorm_min) == (0.4, 1.0, 0.25)
    assert p.cfg_renorm_type == CfgRenormType.CFG_RENORM_TYPE_TEXT_CHANNEL
    assert p.negative_prompt == "blurry"


def test_unset_keywords_leave_fields_unset_for_server_defaults():
    request = build_request("A cat", seed=None, height=None)
    p = request.params
    for name in ("height", "width", "num_timesteps", "timestep_shift", "cfg_text_scale", "seed"):
        assert not p.HasField(name), name
    assert not p.HasField("cfg_interval") and not request.HasField("request_id")
    assert p.cfg_renorm_type == CfgRenormType.CFG_RENORM_TYPE_UNSPECIFIED


def test_zero_is_sent_as_a_value_not_as_unset():
    p = build_request("A cat", seed=0, cfg_img_scale=0.0).params
    assert p.HasField("seed") and p.seed == 0 and p.HasField("cfg_img_scale")


def test_steps_is_an_alias_of_num_timesteps():
    assert build_request("A cat", steps=12).params.num_timesteps == 12
    with pytest.raises(TypeError, match="not both"):
        build_request("A cat", steps=12, num_timesteps=13)


@pytest.mark.parametrize("name", ["guidance", "num_steps", "size", "cfg_scale"])
def test_unknown_keyword_is_a_type_error(name):
    with pytest.raises(TypeError, match=name):
        build_request("A cat", **{name: 1})
    assert name not in PARAM_NAMES


@pytest.mark.parametrize(
    ("params", "error"),
    [
        ({"height": 512.0}, TypeError),
        ({"seed": True}, TypeError),
        ({"cfg_text_scale": "4"}, TypeError),
        ({"cfg_interval": (0.4,)}, TypeError),
        ({"cfg_renorm_type": "per_pixel"}, ValueError),
        ({"negative_prompt": 3}, TypeError),
        ({"height": -16}, ValueError),
    ],
)
def test_values_the_wire_cannot_carry_are_rejected(params, error):
    with pytest.raises(error):
        build_request("A cat", **params)


def test_every_schema_field_given_as_a_keyword_arrives_unchanged():
    assert fields_left_at_default(EVERY_FIELD) == []
    request = build_request("A cat", request_id="r-2", **EVERY_FIELD.__dict__)
    assert request.request_id == "r-2"
    assert GenerationParams.from_proto(request.params) == EVERY_FIELD
    assert set(EVERY_FIELD.__dict__) <= PARAM_NAMES


def test_cache_keyword_takes_a_policy_or_a_spec_string():
    policy = DBCache(fn_compute_blocks=2, max_cached_steps=0)
    assert GenerationParams.from_proto(build_request("A cat", cache=policy).params).cache == policy
    from_spec = build_request("A cat", cache="dbcache:fn=2,max_cached=-1").params
    assert GenerationParams.from_proto(from_spec).cache == policy
    with pytest.raises(TypeError):
        build_request("A cat", cache=3)


def test_an_input_image_travels_as_bytes_from_bytes_a_path_or_a_pil_image(tmp_path):
    raw = b"\x89PNG not checked here"
    path = tmp_path / "in.png"
    path.write_bytes(raw)
    assert image_bytes(raw) == raw
    assert image_bytes(path) == raw == image_bytes(str(path))
    encoded = image_bytes(Image.new("RGB", (3, 2), (255, 0, 0)))
    assert Image.open(io.BytesIO(encoded)).getpixel((2, 1)) == (255, 0, 0)
    with pytest.raises(TypeError, match="bytes, a path or a PIL image"):
        image_bytes(3)  # type: ignore[arg-type]
    request = build_request("edit", input_images=[raw])
    assert list(request.input_images) == [raw]


def test_think_and_its_sampling_settings_go_to_their_own_fields():
    request = build_request(
        "a cat", think=True, think_temperature=0.7, think_do_sample=True, think_top_k=None
    )
    assert request.HasField("think") and request.think is True
    assert request.think_sampling == params_pb2.TextSampling(temperature=0.7, do_sample=True)
    off = build_request("a cat", think=False)
    assert off.HasField("think") and off.think is False and not off.HasField("think_sampling")
    plain = build_request("a cat", think_seed=None)
    assert not plain.HasField("think") and not plain.HasField("think_sampling")


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"think": 1}, "think must be a bool, got 1"),
        ({"request_id": 5}, "request_id must be a str, got 5"),
        ({"width": "wide"}, "width must be int, got 'wide'"),
        ({"think_top_k": 1.5}, "think_top_k must be int, got 1.5"),
        ({"bogus": 1, "other": 2}, "unexpected keyword argument(s): bogus, other"),
    ],
)
def test_a_bad_keyword_is_a_type_error_naming_it(params, message):
    with pytest.raises(TypeError) as info:
        build_request("a cat", **params)
    assert str(info.value) == message
