"""The request schema: validation names the faulty field and holds each range's ends; every
field travels through proto and bytes unchanged; the proto and the dataclass list the same
fields."""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
from unittest.mock import patch

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from bagel.network.config import BAGEL_7B
from client import PARAM_NAMES, cli
from client.cli import add_param_arguments
from protos import params_pb2
from serving.codecs import FloatCodec, Range, fields_from_message, fields_to_message
from serving.errors import InvalidParams
from serving.params import (
    CACHE_POLICIES,
    MAX_NEGATIVE_PROMPT_CHARS,
    DBCache,
    GenerationParams,
    NoCache,
    RequestLimits,
    TeaCache,
    cache_policy_name,
    spec,
    validate,
    walk,
)
from tests.serving.examples import EVERY_FIELD, fields_left_at_default

PIXEL_STEP, MAX_SIDE = BAGEL_7B.pixels_per_token, BAGEL_7B.max_image_size
BAGEL_7B_LIMITS = RequestLimits(
    pixel_step=PIXEL_STEP, max_side=MAX_SIDE, num_layers=BAGEL_7B.llm.num_layers
)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("height", 1000, "height=1000 must be a positive multiple of 16"),
        ("width", 2048, "width=2048 must be a positive multiple of 16 and at most 1024"),
        ("num_timesteps", 1, "num_timesteps=1"),
        ("timestep_shift", 0.0, "timestep_shift"),
        ("cfg_text_scale", float("nan"), "cfg_text_scale"),
        ("cfg_interval", (0.8, 0.2), "cfg_interval"),
        (
            "cfg_renorm_type",
            "max",
            "cfg_renorm_type='max' must be one of global, channel, text_channel",
        ),
        ("cfg_renorm_min", 1.5, "cfg_renorm_min"),
        ("seed", -1, "seed=-1"),
    ],
)
def test_invalid_params_name_the_field(field, value, message):
    with pytest.raises(InvalidParams, match=message.replace("(", r"\(").replace("[", r"\[")):
        validate(GenerationParams(**{field: value}), BAGEL_7B_LIMITS)


def test_default_params_are_valid_for_bagel_7b():
    validate(GenerationParams(), BAGEL_7B_LIMITS)
    assert BAGEL_7B.latent_grid(1024, 1024) == (64, 64)


# --- every field, every limit ---------------------------------------------------------------

POLICY_MESSAGES = {
    f.name: f.message_type
    for f in params_pb2.CacheConfig.DESCRIPTOR.oneofs_by_name["policy"].fields
}


def test_the_every_field_example_leaves_no_field_at_its_default():
    assert fields_left_at_default(EVERY_FIELD) == []
    left = fields_left_at_default(GenerationParams(cache=DBCache()))
    assert {f"cache.{f.name}" for f in dataclasses.fields(DBCache)} <= set(left)
    assert "cache" not in left and "height" in left
    validate(EVERY_FIELD, BAGEL_7B_LIMITS)


def test_every_field_survives_proto_and_bytes_unchanged():
    assert GenerationParams.from_proto(EVERY_FIELD.to_proto()) == EVERY_FIELD
    assert GenerationParams.from_bytes(EVERY_FIELD.to_bytes()) == EVERY_FIELD
    msg = EVERY_FIELD.to_proto()
    assert [f.name for f, _ in msg.ListFields()] == [
        f.name for f in params_pb2.GenerationParams.DESCRIPTOR.fields
    ]  # every field set on the wire, so the receiver applies no default of its own
    assert len(msg.cache.db_cache.ListFields()) == len(dataclasses.fields(DBCache))


@pytest.mark.parametrize("policy", [NoCache(), TeaCache(rel_l1_threshold=0.5), DBCache()])
def test_each_cache_policy_survives_the_bytes_unchanged(policy):
    params = GenerationParams(cache=policy, seed=3)
    assert GenerationParams.from_bytes(params.to_bytes()) == params


def test_schema_and_proto_list_the_same_fields_policies_included():
    """The proto conversion, client keywords, CLI flags and rank message are derived from the
    dataclass fields: this bijection is what makes them cover a new field automatically. Fields
    travel by name, so the dataclass may list them in any order."""
    assert sorted(f.name for f in dataclasses.fields(GenerationParams)) == sorted(
        f.name for f in params_pb2.GenerationParams.DESCRIPTOR.fields
    )
    assert list(CACHE_POLICIES) == list(POLICY_MESSAGES)
    for name, cls in CACHE_POLICIES.items():
        # Fields travel by name, so a policy's dataclass may list them in any order.
        assert {f.name for f in dataclasses.fields(cls)} == {
            f.name for f in POLICY_MESSAGES[name].fields
        }, name
        assert cls.wire_number == params_pb2.CacheConfig.DESCRIPTOR.fields_by_name[name].number


def test_fields_travel_by_name_so_the_schema_may_list_them_in_any_order():
    reordered = dataclasses.make_dataclass(
        "ReorderedParams",
        [
            (
                f.name,
                f.type,
                dataclasses.field(
                    default=f.default, default_factory=f.default_factory, metadata=f.metadata
                ),
            )
            for f in reversed(dataclasses.fields(GenerationParams))
        ],
        frozen=True,
    )
    value = reordered(
        **{f.name: getattr(EVERY_FIELD, f.name) for f in dataclasses.fields(EVERY_FIELD)}
    )
    msg = fields_to_message(value, params_pb2.GenerationParams())
    assert msg == EVERY_FIELD.to_proto()
    assert reordered(**fields_from_message(reordered, msg)) == value


def test_every_field_has_a_client_keyword_and_a_cli_flag():
    parser = argparse.ArgumentParser()
    add_param_arguments(parser)
    names = [f.name for f in dataclasses.fields(GenerationParams)]
    assert set(names) <= {action.dest for action in parser._actions}
    assert set(names) <= PARAM_NAMES


@pytest.mark.parametrize(
    "cls",
    [cls for cls in CACHE_POLICIES.values() if dataclasses.fields(cls)],
    ids=lambda cls: cls.__name__,
)
def test_every_cache_policy_field_can_be_set_from_a_cache_spec(cls):
    """The CLI's `--cache` spec reaches every field of every policy, by its short key, and the
    fields of a `+MODIFIER` (TaylorSeer) by that modifier's keys."""
    [cache_field] = [f for f in dataclasses.fields(GenerationParams) if f.name == "cache"]
    name = next(n for n, c in CACHE_POLICIES.items() if c is cls)
    expected, options, modifiers = {}, [], {}
    for f in dataclasses.fields(cls):
        expected[f.name] = 2 if f.metadata["modifier"] else 3 if f.type == "int" else 0.5
        pair = f"{f.metadata['key'] or f.name}={expected[f.name]}"
        if f.metadata["modifier"]:
            modifiers.setdefault(f.metadata["modifier"], []).append(pair)
        else:
            options.append(pair)
    assert fields_left_at_default(cls(**expected)) == []
    text = f"{name}:{','.join(options)}" + "".join(
        f"+{m}:{','.join(pairs)}" for m, pairs in modifiers.items()
    )
    assert cache_field.metadata["codec"].parse(text) == cls(**expected)


def test_a_new_field_is_one_dataclass_line_and_one_proto_field():
    """A schema with one more field, and `params.proto` with one more field (built here as a
    descriptor): the codecs move it to and from the wire, validation checks its range and the
    CLI gets its flag, with no other code changed."""
    file = descriptor_pb2.FileDescriptorProto()
    params_pb2.DESCRIPTOR.CopyToProto(file)
    message = next(m for m in file.message_type if m.name == "GenerationParams")
    message.oneof_decl.add(name="_guidance_rescale")  # proto3 `optional`
    message.field.add(
        name="guidance_rescale",
        number=max(f.number for f in message.field) + 1,
        type=descriptor_pb2.FieldDescriptorProto.TYPE_DOUBLE,
        label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
        oneof_index=len(message.oneof_decl) - 1,
        proto3_optional=True,
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    wire_type = message_factory.GetMessageClass(
        pool.FindMessageTypeByName("bagel.v1.GenerationParams")
    )
    extended = dataclasses.make_dataclass(
        "ExtendedParams",
        [
            (
                "guidance_rescale",
                float,
                dataclasses.field(
                    default=0.0,
                    metadata=spec(FloatCodec(), "guidance rescale", bounds=Range(0.0, 1.0)),
                ),
            )
        ],
        bases=(GenerationParams,),
        frozen=True,
    )
    value = extended(**{**EVERY_FIELD.__dict__, "guidance_rescale": 0.75})
    msg = fields_to_message(value, wire_type())
    assert msg.guidance_rescale == 0.75
    back = wire_type.FromString(msg.SerializeToString())
    assert extended(**fields_from_message(extended, back)) == value
    assert sorted(f.name for f in dataclasses.fields(extended)) == sorted(
        f.name for f in back.DESCRIPTOR.fields
    )
    with pytest.raises(InvalidParams, match=r"guidance_rescale=1.5 must be in \[0, 1\]"):
        validate(extended(guidance_rescale=1.5), BAGEL_7B_LIMITS)
    with patch.object(cli, "GenerationParams", extended):
        parser = argparse.ArgumentParser()
        cli.add_param_arguments(parser)
        args = parser.parse_args(["--guidance-rescale", "0.5"])
        args.request_id = None
        assert cli.generation_params(args)["guidance_rescale"] == 0.5


def ranged_fields():
    """(dotted name, params with that field set to a value) builders for every bounded field,
    the nested policy fields included."""
    for policy in (None, *(cls() for cls in CACHE_POLICIES.values())):
        holder = GenerationParams if policy is None else type(policy)
        for f in dataclasses.fields(holder):
            bounds = f.metadata["bounds"]
            if bounds is None:
                continue
            name = f.name if policy is None else f"cache.{f.name}"
            where = "" if policy is None else f"{type(policy).__name__}."
            yield pytest.param(name, f.type, bounds, policy, id=where + f.name)


def with_value(name: str, value, policy):
    if policy is None:
        return GenerationParams(**{name: value})
    field_name = name.removeprefix("cache.")
    return GenerationParams(cache=dataclasses.replace(policy, **{field_name: value}))


def outside(value, direction: int, is_int: bool):
    return value + direction if is_int else math.nextafter(value, direction * math.inf)


# A model deep enough that the ranges' ends, not whether a cache leaves a block, decide.
DEEP_MODEL = RequestLimits(pixel_step=PIXEL_STEP, max_side=MAX_SIDE, num_layers=10**6)


@pytest.mark.parametrize(("name", "kind", "bounds", "policy"), list(ranged_fields()))
def test_each_range_holds_its_closed_ends_and_rejects_just_past_them(name, kind, bounds, policy):
    is_int = kind in ("int", int)
    lo, hi = (int(bounds.lo), int(bounds.hi)) if is_int else (bounds.lo, bounds.hi)
    for end, direction, is_open in ((lo, -1, bounds.lo_open), (hi, +1, bounds.hi_open)):
        at_end = with_value(name, end, policy)
        if is_open:
            with pytest.raises(InvalidParams, match=re.escape(name)):
                validate(at_end, DEEP_MODEL)
            inside = end + 1 if is_int else math.nextafter(end, -direction * math.inf)
            validate(with_value(name, inside, policy), DEEP_MODEL)
        else:
            validate(at_end, DEEP_MODEL)
        with pytest.raises(InvalidParams, match=re.escape(f"{name}=")):
            validate(with_value(name, outside(end, direction, is_int), policy), DEEP_MODEL)


def test_the_ranges_say_what_the_help_and_proto_say():
    bounds = {f.name: f.metadata["bounds"] for f in dataclasses.fields(GenerationParams)}
    assert str(bounds["num_timesteps"]) == "[2, 1000]"
    assert str(bounds["timestep_shift"]) == "(0, 100]"
    assert str(bounds["cfg_renorm_min"]) == "[0, 1]"
    assert bounds["seed"].hi == 2**63 - 1  # the largest int64, the proto's type


@pytest.mark.parametrize("name", ["height", "width"])
def test_image_sides_hold_the_step_and_the_maximum_and_nothing_between(name):
    for ok in (PIXEL_STEP, 2 * PIXEL_STEP, MAX_SIDE):
        validate(GenerationParams(**{name: ok}), BAGEL_7B_LIMITS)
    for bad in (
        0,
        -PIXEL_STEP,
        PIXEL_STEP - 1,
        PIXEL_STEP + 1,
        MAX_SIDE + PIXEL_STEP,
        MAX_SIDE - 1,
    ):
        with pytest.raises(InvalidParams, match=f"{name}={bad}"):
            validate(GenerationParams(**{name: bad}), BAGEL_7B_LIMITS)


@pytest.mark.parametrize("interval", [(0.0, 1.0), (0.0, 0.0), (1.0, 1.0), (0.5, 0.5)])
def test_cfg_interval_holds_both_ends_of_0_1_and_an_empty_window(interval):
    validate(GenerationParams(cfg_interval=interval), BAGEL_7B_LIMITS)


@pytest.mark.parametrize(
    "interval",
    [(math.nextafter(0.0, -1.0), 1.0), (0.0, math.nextafter(1.0, 2.0)), (0.5, 0.4999999)],
)
def test_cfg_interval_just_outside_0_1_or_reversed_is_invalid(interval):
    with pytest.raises(InvalidParams, match="cfg_interval"):
        validate(GenerationParams(cfg_interval=interval), BAGEL_7B_LIMITS)


def test_negative_prompt_holds_exactly_its_limit_of_characters():
    validate(GenerationParams(negative_prompt="x" * MAX_NEGATIVE_PROMPT_CHARS), BAGEL_7B_LIMITS)
    with pytest.raises(InvalidParams, match="negative_prompt is longer than 16384 characters"):
        validate(
            GenerationParams(negative_prompt="x" * (MAX_NEGATIVE_PROMPT_CHARS + 1)), BAGEL_7B_LIMITS
        )


def with_cache(policy) -> GenerationParams:
    return GenerationParams(height=16, width=16, cache=policy)


def test_db_cache_must_leave_exactly_one_block_or_more_to_cache():
    four = RequestLimits(pixel_step=16, max_side=1024, num_layers=4)
    validate(with_cache(DBCache(fn_compute_blocks=3, bn_compute_blocks=0)), four)
    validate(with_cache(DBCache(fn_compute_blocks=2, bn_compute_blocks=1)), four)
    for fn, bn in ((4, 0), (3, 1), (2, 2)):
        with pytest.raises(InvalidParams, match=f"= {fn + bn} leaves none of the model's 4"):
            validate(with_cache(DBCache(fn_compute_blocks=fn, bn_compute_blocks=bn)), four)
    one = RequestLimits(pixel_step=16, max_side=1024, num_layers=1)
    validate(with_cache(TeaCache()), one)
    validate(with_cache(NoCache()), one)
    validate(with_cache(None), one)  # unset: the service's default


def test_each_request_limit_holds_its_bound_and_rejects_one_step_past_it():
    """The sides are inclusive at `pixel_step` and `max_side`; a cache must leave one of
    `num_layers` blocks: Fn + Bn = num_layers - 1 passes, num_layers fails."""
    limits = RequestLimits(pixel_step=8, max_side=64, num_layers=3)
    validate(GenerationParams(height=8, width=64), limits)
    validate(GenerationParams(height=64, width=8), limits)
    for name, bad in (("height", 72), ("width", 72), ("height", 0), ("width", 12)):
        with pytest.raises(InvalidParams, match=f"{name}={bad} must be a positive multiple of 8 "):
            validate(GenerationParams(**{"height": 8, "width": 8, name: bad}), limits)
    small = {"height": 8, "width": 8}
    validate(
        GenerationParams(**small, cache=DBCache(fn_compute_blocks=1, bn_compute_blocks=1)), limits
    )
    with pytest.raises(InvalidParams, match="leaves none of the model's 3 blocks to cache"):
        validate(
            GenerationParams(**small, cache=DBCache(fn_compute_blocks=2, bn_compute_blocks=1)),
            limits,
        )


def test_a_policy_the_registry_does_not_hold_is_refused_as_unknown():
    @dataclasses.dataclass(frozen=True)
    class Unregistered(TeaCache):
        pass

    with pytest.raises(InvalidParams, match="cache=.* is not a known policy"):
        validate(with_cache(Unregistered()), BAGEL_7B_LIMITS)


def test_unset_seed_becomes_a_random_one_and_zero_stays_zero():
    msg = GenerationParams(seed=0).to_proto()
    assert GenerationParams.from_proto(msg).seed == 0
    msg.ClearField("seed")
    seeds = {GenerationParams.from_proto(msg).seed for _ in range(8)}
    assert len(seeds) > 1 and all(0 <= s < 2**31 for s in seeds)


def test_an_enum_number_no_name_has_is_invalid_params():
    msg = params_pb2.GenerationParams(cfg_renorm_type=9)
    with pytest.raises(InvalidParams, match="cfg_renorm_type=9 is not a known value"):
        GenerationParams.from_proto(msg)


@pytest.mark.parametrize(
    ("policy", "name"),
    [
        (None, "none"),
        (NoCache(), "none"),
        (TeaCache(), "teacache"),
        (TeaCache(taylorseer_order=1), "teacache+taylorseer"),
        (DBCache(), "dbcache"),
        (DBCache(taylorseer_order=2), "dbcache+taylorseer"),
    ],
)
def test_a_policy_is_named_as_its_cache_spec_starts(policy, name):
    assert cache_policy_name(policy) == name


def test_the_cache_default_applies_only_where_the_request_left_the_policy_unset():
    unset = GenerationParams(seed=5)
    assert unset.with_cache_default(TeaCache()) == GenerationParams(seed=5, cache=TeaCache())
    chosen = GenerationParams(seed=5, cache=NoCache())
    assert chosen.with_cache_default(TeaCache()) is chosen


def test_walk_names_top_level_fields_plainly_and_policy_fields_under_cache():
    names = [name for name, _, _ in walk(GenerationParams(cache=TeaCache()))]
    assert names[0] == "height"
    assert "cache" in names and "cache.rel_l1_threshold" in names


def test_a_side_of_one_pixel_is_valid_where_the_step_is_one():
    validate(
        GenerationParams(height=1, width=1), RequestLimits(pixel_step=1, max_side=16, num_layers=1)
    )


def test_an_unset_seed_is_drawn_from_the_whole_31_bit_range():
    msg = GenerationParams().to_proto()
    msg.ClearField("seed")
    seeds = [GenerationParams.from_proto(msg).seed for _ in range(8)]
    assert max(seeds) >= 2**16
