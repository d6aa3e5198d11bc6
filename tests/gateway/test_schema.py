"""The HTTP request schema is derived from `GenerationParams`: every schema field is a request
field (but those OpenAI's fields stand for), with the codec's type and the field's bounds; form
fields convert as their JSON counterparts."""

from __future__ import annotations

import dataclasses

import pytest
from pydantic import ValidationError

from gateway.schema import (
    COVERED_BY_OPENAI,
    ImageEditRequest,
    ImageGenerationRequest,
    form_value,
    schema_values,
)
from serving.params import GenerationParams


@pytest.mark.parametrize("model", [ImageGenerationRequest, ImageEditRequest])
def test_every_schema_field_is_a_request_field_with_its_help(model):
    for f in dataclasses.fields(GenerationParams):
        if f.name in COVERED_BY_OPENAI:
            continue
        assert f.name in model.model_fields, f.name
        assert model.model_fields[f.name].description == f.metadata["help"]


@pytest.mark.parametrize(
    ("name", "bad", "good"),
    [("num_timesteps", 1, 2), ("partial_images", 4, 3), ("timestep_shift", 0.0, 0.5)],
)
def test_the_schemas_bounds_are_the_fields_constraints(name, bad, good):
    with pytest.raises(ValidationError):
        ImageGenerationRequest(prompt="p", **{name: bad})
    assert getattr(ImageGenerationRequest(prompt="p", **{name: good}), name) == good


def test_enum_fields_take_only_their_names_and_set_values_travel():
    with pytest.raises(ValidationError):
        ImageGenerationRequest(prompt="p", cfg_renorm_type="sideways")
    body = ImageGenerationRequest(
        prompt="p", cfg_renorm_type="channel", cfg_interval=[0.1, 0.9], cache="teacache"
    )
    assert schema_values(body) == {
        "cfg_renorm_type": "channel",
        "cfg_interval": (0.1, 0.9),
        "cache": "teacache",
    }


@pytest.mark.parametrize(
    "values", [["0.2,1"], ["[0.2, 1]"], ["0.2", "1"]], ids=["lo,hi", "json", "repeated"]
)
def test_a_pair_comes_from_a_form_in_every_spelling(values):
    body = ImageEditRequest.model_validate(
        {"prompt": "p", "cfg_interval": form_value("cfg_interval", values)}
    )
    assert body.cfg_interval == (0.2, 1.0)


def test_scalar_form_fields_convert_as_json_ones():
    body = ImageEditRequest.model_validate(
        {name: form_value(name, [v]) for name, v in [("prompt", "p"), ("seed", "7"), ("n", "2")]}
    )
    assert (body.seed, body.n) == (7, 2)
