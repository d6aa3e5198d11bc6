"""Default sets fill only what a request leaves unset: editing's defaults (`serving.imaging.input_images.
EDIT_DEFAULTS` plus the input's size, as the prefill servicer passes them to `from_proto`) and
the diffusion service's `--default-cache`. For every field a default set can fill, a request
that sets it, to another value or to the schema's own default, keeps its value."""

from __future__ import annotations

import dataclasses

import pytest

from protos import params_pb2
from serving.imaging.input_images import EDIT_DEFAULTS
from serving.params import GenerationParams
from step_cache.registry import POLICIES
from tests.serving.examples import EVERY_FIELD

# What the prefill servicer passes for an edit whose input resizes to 384x512.
EDIT = {**EDIT_DEFAULTS, "width": 512, "height": 384}
FIELDS = {f.name: f for f in dataclasses.fields(GenerationParams)}
SCHEMA_DEFAULTS = GenerationParams()


def wire(**values) -> params_pb2.GenerationParams:
    """A request message that sets exactly `values`."""
    msg = params_pb2.GenerationParams()
    for name, value in values.items():
        FIELDS[name].metadata["codec"].to_proto(msg, name, value)
    return msg


def test_every_edit_default_is_a_field_and_differs_from_the_schema_default():
    """Otherwise the tests below could not tell who won."""
    for name, value in EDIT.items():
        assert name in FIELDS, name
        assert value != getattr(SCHEMA_DEFAULTS, name), name
        assert getattr(EVERY_FIELD, name) != getattr(SCHEMA_DEFAULTS, name), name


@pytest.mark.parametrize("name", sorted(EDIT))
def test_an_unset_field_takes_the_edit_default(name):
    assert getattr(GenerationParams.from_proto(wire(seed=1), EDIT), name) == EDIT[name]


@pytest.mark.parametrize("name", sorted(EDIT))
def test_a_field_the_request_sets_wins_over_the_edit_default(name):
    for value in (getattr(EVERY_FIELD, name), getattr(SCHEMA_DEFAULTS, name)):
        if value == EDIT[name]:
            continue  # the same value cannot show who won
        got = GenerationParams.from_proto(wire(seed=1, **{name: value}), EDIT)
        assert getattr(got, name) == value, (name, value)
        # The other defaults still apply.
        for other, default in EDIT.items():
            if other != name:
                assert getattr(got, other) == default, (name, other)


def test_the_request_under_edit_defaults_keeps_every_field_it_sets():
    got = GenerationParams.from_proto(EVERY_FIELD.to_proto(), EDIT)
    assert got == EVERY_FIELD


POLICY_NAMES = sorted(POLICIES)


@pytest.mark.parametrize("default", POLICY_NAMES)
@pytest.mark.parametrize("requested", POLICY_NAMES)
def test_a_cache_policy_the_request_sets_wins_over_the_default_cache(requested, default):
    """Each registered policy, sent on the wire, against each as the service's default (the
    diffusion servicer's `from_proto(msg).with_cache_default(settings.default_cache)`)."""
    policy = POLICIES[requested].eager()
    default_policy = POLICIES[default]()  # the class defaults; the request sends eager()
    got = GenerationParams.from_proto(wire(seed=1, cache=policy)).with_cache_default(default_policy)
    assert got.cache == policy
    unset = GenerationParams.from_proto(wire(seed=1)).with_cache_default(default_policy)
    assert unset.cache == default_policy


def test_a_request_that_asks_for_no_caching_keeps_it_under_a_caching_default():
    none = POLICIES["none"]()
    got = GenerationParams.from_proto(wire(seed=1, cache=none))
    assert got.cache == none  # set on the wire: not "unset"
    assert got.with_cache_default(POLICIES["db_cache"]()).cache == none
