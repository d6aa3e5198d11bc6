"""The field codecs: each moves its value to and from the proto, checks a caller's value with a
message that names the field, and declares its CLI flag with the schema's help and spellings;
the cache-spec parser names exactly what is wrong with a spec."""

from __future__ import annotations

import argparse
import math
import re

import pytest

from protos import params_pb2
from serving.codecs import (
    CachePolicyCodec,
    EnumNameCodec,
    FloatCodec,
    IntCodec,
    IntervalCodec,
    Range,
    StringCodec,
    enum_names,
)
from serving.errors import InvalidParams
from serving.params import CACHE_POLICIES, DBCache, NoCache, TeaCache, spec

RENORM_PREFIX = "CFG_RENORM_TYPE_"


def renorm_codec() -> EnumNameCodec:
    return EnumNameCodec(params_pb2.CfgRenormType, RENORM_PREFIX)


def test_enum_names_are_the_lower_case_suffixes_with_unspecified_left_out():
    assert enum_names(params_pb2.CfgRenormType, RENORM_PREFIX) == (
        "global",
        "channel",
        "text_channel",
    )
    assert enum_names(params_pb2.OutputFormat, "OUTPUT_FORMAT_") == ("png", "latents")


def test_spec_defaults_are_no_flags_no_bounds_no_key_and_zero_means_zero():
    codec = IntCodec()
    assert spec(codec, "the help") == {
        "codec": codec,
        "help": "the help",
        "flags": (),
        "bounds": None,
        "key": None,
        "zero_means_unlimited": False,
        "modifier": None,
        "when_named": None,
    }


def test_an_unset_optional_scalar_reads_as_none_and_a_set_one_as_its_value():
    msg = params_pb2.GenerationParams()
    assert IntCodec().from_proto(msg, "height") is None
    msg.height = 64
    assert IntCodec().from_proto(msg, "height") == 64


@pytest.mark.parametrize("value", [True, 1.5, "3"])
def test_an_int_field_refuses_bools_floats_and_strings_naming_the_field(value):
    message = re.escape(f"seed must be int, got {value!r}")
    with pytest.raises(TypeError, match=message):
        IntCodec().from_user("seed", value)
    with pytest.raises(InvalidParams, match=message):
        IntCodec().check("seed", value)


def test_a_float_field_takes_ints_as_floats_and_refuses_bools_strings_and_infinities():
    assert FloatCodec().from_user("shift", 2) == 2.0
    assert isinstance(FloatCodec().from_user("shift", 2), float)
    with pytest.raises(TypeError, match=re.escape("shift must be a number, got True")):
        FloatCodec().from_user("shift", True)
    with pytest.raises(InvalidParams, match=re.escape("shift must be a number, got 'a'")):
        FloatCodec().check("shift", "a")
    with pytest.raises(InvalidParams, match=re.escape("shift=inf must be finite")):
        FloatCodec().check("shift", math.inf)


def test_a_string_field_holds_its_limit_and_names_itself_when_too_long_or_not_a_string():
    codec = StringCodec(3)
    codec.check("negative_prompt", "abc")
    with pytest.raises(InvalidParams, match="negative_prompt is longer than 3 characters"):
        codec.check("negative_prompt", "abcd")
    with pytest.raises(InvalidParams, match=re.escape("negative_prompt must be str, got 5")):
        codec.check("negative_prompt", 5)


def test_an_enum_codec_maps_numbers_to_names_and_refuses_unknown_names():
    codec = renorm_codec()
    assert codec.names == ("global", "channel", "text_channel")
    msg = params_pb2.GenerationParams()
    assert codec.from_proto(msg, "cfg_renorm_type") is None
    msg.cfg_renorm_type = params_pb2.CFG_RENORM_TYPE_GLOBAL  # number 1
    assert codec.from_proto(msg, "cfg_renorm_type") == "global"
    codec.to_proto(msg, "cfg_renorm_type", "text_channel")
    assert msg.cfg_renorm_type == params_pb2.CFG_RENORM_TYPE_TEXT_CHANNEL
    assert codec.from_user("renorm", "channel") == "channel"
    with pytest.raises(TypeError, match=re.escape("renorm must be str, got 3")):
        codec.from_user("renorm", 3)
    with pytest.raises(
        ValueError,
        match=re.escape("renorm must be one of global, channel, text_channel, got 'max'"),
    ):
        codec.from_user("renorm", "max")
    with pytest.raises(InvalidParams, match=re.escape("renorm must be str, got 3")):
        codec.check("renorm", 3)


def test_an_interval_is_a_pair_of_numbers_in_0_1_and_says_so_naming_the_field():
    codec = IntervalCodec()
    assert codec.from_user("window", [0.25, 1]) == (0.25, 1.0)
    with pytest.raises(TypeError, match=re.escape("window must be a pair (lo, hi), got 0.5")):
        codec.from_user("window", 0.5)
    with pytest.raises(TypeError, match=re.escape("window must be a number, got 'a'")):
        codec.from_user("window", (0.1, "a"))
    with pytest.raises(
        InvalidParams, match=re.escape("window must be a pair (lo, hi), got [0.1, 0.2]")
    ):
        codec.check("window", [0.1, 0.2])
    with pytest.raises(InvalidParams, match=re.escape("window must be a number, got 'a'")):
        codec.check("window", (0.1, "a"))
    with pytest.raises(
        InvalidParams, match=re.escape("window=(0.1, 1.5): both ends must be in [0, 1]")
    ):
        codec.check("window", (0.1, 1.5))


def test_an_open_upper_end_excludes_its_bound_and_prints_as_a_parenthesis():
    half_open = Range(0.0, 1.0, hi_open=True)
    assert half_open.contains(0.5) and half_open.contains(0.0)
    assert not half_open.contains(1.0)
    assert str(half_open) == "[0, 1)"
    assert str(Range(0.0, 1.0, lo_open=True)) == "(0, 1]"


def parser_with(codec, name: str, **meta) -> tuple[argparse.ArgumentParser, argparse.Action]:
    parser = argparse.ArgumentParser()
    codec.add_argument(parser, name, spec(codec, "the help", **meta))
    [action] = [a for a in parser._actions if a.dest == name]
    return parser, action


def test_a_scalar_flag_has_the_schema_help_its_type_and_its_extra_spellings():
    parser, action = parser_with(IntCodec(), "num_timesteps", flags=("--steps",))
    assert action.option_strings == ["--num-timesteps", "--steps"]
    assert action.help == "the help"
    assert parser.parse_args(["--steps", "7"]).num_timesteps == 7


def test_an_enum_flag_offers_only_the_enum_names_under_the_schema_help():
    parser, action = parser_with(renorm_codec(), "renorm", flags=("--rn",))
    assert action.option_strings == ["--renorm", "--rn"]
    assert action.choices == ("global", "channel", "text_channel")
    assert action.help == "the help"
    assert parser.parse_args(["--rn", "channel"]).renorm == "channel"


def test_an_interval_flag_takes_lo_and_hi_under_the_schema_help():
    parser, action = parser_with(IntervalCodec(), "window", flags=("--win",))
    assert action.option_strings == ["--window", "--win"]
    assert action.metavar == ("LO", "HI")
    assert action.help == "the help"
    args = parser.parse_args(["--win", "0.25", "0.5"])
    assert IntervalCodec().from_cli(args, "window") == (0.25, 0.5)
    assert IntervalCodec().from_cli(parser.parse_args([]), "window") is None


def cache_codec() -> CachePolicyCodec:
    return CachePolicyCodec(CACHE_POLICIES)


KNOWN = ", ".join(name.replace("_", "") for name in CACHE_POLICIES)


def test_a_cache_flag_takes_a_spec_and_its_help_shows_the_grammar_and_the_names():
    parser, action = parser_with(cache_codec(), "cache", flags=("--step-cache",))
    assert action.option_strings == ["--cache", "--step-cache"]
    assert action.metavar == "SPEC"
    assert action.help == (
        f"the help: NAME[:KEY=VALUE,...][+taylorseer:order=N], NAME one of {KNOWN} "
        "(e.g. dbcache:fn=4,bn=0,warmup=8,threshold=0.24)"
    )
    args = parser.parse_args(["--step-cache", "teacache"])
    assert cache_codec().from_cli(args, "cache") == TeaCache()


def test_cache_spec_names_are_the_policy_names_without_underscores():
    assert cache_codec().spec_names().startswith("none, teacache, dbcache")
    assert cache_codec().spec_names().split(", ") == [n.replace("_", "") for n in CACHE_POLICIES]


def test_a_cache_option_is_found_by_its_field_name_as_well_as_its_key():
    assert cache_codec().parse("teacache:rel_l1_threshold=0.5") == TeaCache(rel_l1_threshold=0.5)
    assert cache_codec().parse("tea_cache:threshold=0.5") == TeaCache(rel_l1_threshold=0.5)


def test_taylorseer_without_an_order_forecasts_at_order_one():
    assert cache_codec().parse("teacache+taylorseer") == TeaCache(taylorseer_order=1)
    assert cache_codec().parse("dbcache + taylorseer:order=2") == DBCache(taylorseer_order=2)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lru", f"unknown cache policy 'lru'; known: {KNOWN}"),
        ("teacache+fast", "cache spec 'teacache+fast': unknown modifier 'fast'"),
        ("none+taylorseer", "cache spec 'none+taylorseer': none takes no taylorseer"),
        (
            "dbcache+taylorseer:degree=2",
            "cache spec 'dbcache+taylorseer:degree=2': taylorseer takes only order=N",
        ),
        ("teacache:threshold", "cache spec 'teacache:threshold': 'threshold' is not KEY=VALUE"),
        ("dbcache:fn=x", "cache spec 'dbcache:fn=x': fn='x' is not int"),
        (
            "dbcache+taylorseer:order",
            "cache spec 'dbcache+taylorseer:order': 'order' is not KEY=VALUE",
        ),
        ("dbcache:fn=1:2", "cache spec 'dbcache:fn=1:2': fn='1:2' is not int"),
        ("dbcache:fn=4=5", "cache spec 'dbcache:fn=4=5': fn='4=5' is not int"),
        (
            "dbcache+taylorseer:order=1:2",
            "cache spec 'dbcache+taylorseer:order=1:2': order='1:2' is not int",
        ),
        (
            "teacache:speed=2",
            "cache spec 'teacache:speed=2': unknown option 'speed'; known: threshold",
        ),
        (
            "dbcache:taylorseer_order=1",
            "cache spec 'dbcache:taylorseer_order=1': unknown option 'taylorseer_order'; known: "
            "fn, bn, warmup, max_cached, max_continuous, threshold",
        ),
    ],
)
def test_a_bad_cache_spec_names_what_is_wrong(text, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        cache_codec().parse(text)


def test_a_cache_value_is_a_spec_or_a_policy_and_anything_else_names_the_field():
    codec = cache_codec()
    assert codec.from_user("cache", "dbcache:fn=4") == DBCache(fn_compute_blocks=4)
    assert codec.from_user("cache", NoCache()) == NoCache()
    with pytest.raises(
        TypeError,
        match=re.escape("cache must be a spec string or one of NoCache, TeaCache, DBCache, got 3"),
    ):
        codec.from_user("cache", 3)
    codec.check("cache", None)
    with pytest.raises(InvalidParams, match=re.escape("cache=3 is not a known policy")):
        codec.check("cache", 3)


def test_a_policy_member_the_codec_does_not_know_is_invalid_params():
    msg = params_pb2.GenerationParams()
    msg.cache.tea_cache.SetInParent()
    assert cache_codec().from_proto(msg, "cache") == TeaCache()
    with pytest.raises(InvalidParams, match=re.escape("cache.tea_cache is not a known policy")):
        CachePolicyCodec({"none": NoCache}).from_proto(msg, "cache")


def test_a_range_names_integer_bounds_exactly_and_float_bounds_short():
    assert str(Range(0, 2**63 - 1)) == "[0, 9223372036854775807]"
    assert str(Range(0.0, 100.0, lo_open=True)) == "(0, 100]"
    assert str(Range(0.0, 0.25, hi_open=True)) == "[0, 0.25)"
