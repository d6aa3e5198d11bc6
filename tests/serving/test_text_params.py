"""The text-sampling schema: it lists the proto's fields, keeps the reference's defaults (the
same as the model's), names the faulty field, and drives the client keywords and CLI flags."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from bagel.text.decoding import Sampling
from client import build_request
from client.text import understand_request
from protos import params_pb2
from serving.errors import InvalidParams
from serving.text_params import (
    TextSampling,
    add_sampling_arguments,
    sampling_from_cli,
    sampling_message,
    sampling_names,
)


def test_the_schema_and_the_proto_list_the_same_fields():
    # Fields travel by name, so their order in the dataclass is free.
    schema = sorted(f.name for f in dataclasses.fields(TextSampling))
    assert schema == sorted(f.name for f in params_pb2.TextSampling.DESCRIPTOR.fields)


def test_defaults_are_the_references_and_the_models():
    ours = TextSampling()
    model = Sampling()
    assert (ours.max_new_tokens, ours.do_sample, ours.temperature) == (1000, False, 0.3)
    for f in dataclasses.fields(TextSampling):
        if f.name != "seed":
            assert getattr(ours, f.name) == getattr(model, f.name), f.name


def test_unset_fields_take_defaults_and_an_unset_seed_a_random_one():
    first = TextSampling.from_proto(params_pb2.TextSampling(top_k=5))
    assert first.top_k == 5 and first.max_new_tokens == 1000
    seeds = {TextSampling.from_proto(params_pb2.TextSampling()).seed for _ in range(5)}
    assert len(seeds) > 1
    pinned = TextSampling.from_proto(params_pb2.TextSampling(seed=4))
    assert TextSampling.from_proto(pinned.to_proto()) == pinned


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"do_sample": True, "temperature": 0.0}, "temperature=0.0 must be > 0 when do_sample"),
        ({"top_p": 0.0}, "top_p=0.0 must be in (0, 1]"),
        ({"top_p": 1.01}, "top_p=1.01 must be in (0, 1]"),
        ({"max_new_tokens": 0}, "max_new_tokens=0 must be in [1, 32768]"),
        ({"top_k": -1}, "top_k=-1 must be in [0, 1000000]"),
        ({"temperature": float("nan")}, "temperature=nan must be finite"),
    ],
)
def test_bad_values_name_the_field(values, message):
    with pytest.raises(InvalidParams) as raised:
        TextSampling(**{**dataclasses.asdict(TextSampling()), **values}).validate()
    assert message in str(raised.value)


def test_greedy_ignores_the_temperature():
    TextSampling(temperature=0.0).validate()


def test_keywords_and_flags_derive_from_the_schema():
    msg = sampling_message(max_new_tokens=5, do_sample=True, top_p=0.5)
    assert (msg.max_new_tokens, msg.do_sample, msg.top_p) == (5, True, 0.5)
    assert not msg.HasField("temperature")
    with pytest.raises(TypeError, match="unexpected keyword"):
        sampling_message(temprature=1.0)
    with pytest.raises(TypeError, match="do_sample must be bool"):
        sampling_message(do_sample=1)
    parser = argparse.ArgumentParser()
    add_sampling_arguments(parser, "think_")
    args = parser.parse_args(["--think-top-k", "7", "--think-do-sample"])
    assert sampling_from_cli(args, "think_") == {
        "think_max_new_tokens": None,
        "think_do_sample": True,
        "think_temperature": None,
        "think_top_p": None,
        "think_top_k": 7,
        "think_seed": None,
    }


def test_requests_carry_think_and_sampling_only_where_asked():
    plain = build_request("a cat")
    assert not plain.HasField("think") and not plain.HasField("think_sampling")
    think = build_request("a cat", think=True, think_temperature=0.7, think_do_sample=True)
    assert think.think and think.think_sampling.temperature == 0.7
    request = understand_request([("user", "hi")], top_k=3, think=True, request_id="r1")
    assert request.sampling.top_k == 3 and request.think and request.request_id == "r1"
    assert request.messages[0].content[0].text == "hi"
    with pytest.raises(TypeError, match="unexpected keyword"):
        understand_request([("user", "hi")], steps=3)


def test_sampling_without_a_prefix_names_flags_keywords_and_help():
    assert sampling_names() == frozenset(f.name for f in dataclasses.fields(TextSampling))
    assert sampling_names("think_") == frozenset(
        "think_" + f.name for f in dataclasses.fields(TextSampling)
    )
    parser = argparse.ArgumentParser(prog="p")
    add_sampling_arguments(parser)
    args = parser.parse_args(["--top-k", "3"])
    assert sampling_from_cli(args)["top_k"] == 3 and sampling_from_cli(args)["seed"] is None
    text = " ".join(parser.format_help().split())
    assert "text sampling:" in text
    seed_help = "with --do-sample: the sampler's seed (unset: the server picks one)"
    assert seed_help in text and f"{seed_help} (default" not in text
    top_k = dataclasses.fields(TextSampling)[4]
    assert top_k.name == "top_k"
    assert f"{top_k.metadata['help']} (default: 0)" in text
    think = argparse.ArgumentParser(prog="p")
    add_sampling_arguments(think, "think_")
    assert "think text sampling:" in " ".join(think.format_help().split())


def test_a_sampled_temperature_must_be_above_zero_and_may_be_below_one():
    TextSampling(do_sample=True, temperature=0.5).validate()
    with pytest.raises(InvalidParams, match="temperature=0.0 must be > 0"):
        TextSampling(do_sample=True, temperature=0.0).validate()


def test_an_unset_seed_is_drawn_below_two_to_the_31(monkeypatch):
    drawn = []
    monkeypatch.setattr("serving.text_params.secrets.randbelow", lambda n: drawn.append(n) or 5)
    assert TextSampling.from_proto(params_pb2.TextSampling()).seed == 5
    assert drawn == [2**31]


def test_unset_keywords_are_skipped_and_unknown_ones_listed():
    msg = sampling_message(temperature=None, top_k=4)
    assert not msg.HasField("temperature") and msg.top_k == 4
    with pytest.raises(TypeError) as err:
        sampling_message(b=1, a=2)
    assert str(err.value) == "unexpected keyword argument(s): a, b"


def test_as_dict_is_every_field_by_name():
    sampling = TextSampling(max_new_tokens=9, top_k=2)
    assert sampling.as_dict() == {
        f.name: getattr(sampling, f.name) for f in dataclasses.fields(TextSampling)
    }
    assert sampling.as_dict()["max_new_tokens"] == 9 and sampling.as_dict()["top_k"] == 2
