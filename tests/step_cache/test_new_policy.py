"""Adding a policy is one module plus its proto message: `every_other_step.py`, registered here
and with `params.proto`'s message built at run time, is parsed from a `--cache` spec, listed in
the CLI's help, carried on the wire, validated, passes the generic policy tests, and runs in the
sampler, with no other file changed."""

from __future__ import annotations

import argparse
import importlib

import pytest
import torch
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from bagel.pipeline import Pipeline
from protos import params_pb2
from serving.codecs import fields_from_message, fields_to_message
from serving.errors import InvalidParams
from serving.params import (
    CACHE_SPEC,
    GenerationParams,
    RequestLimits,
    cache_policy_name,
    validate,
)
from step_cache.collective import CollectiveStepCache, make_step_cache
from step_cache.registry import POLICIES, register, unregister
from tests.step_cache.synthetic import assert_reuses_when_nothing_changes, constant, drive

FD = descriptor_pb2.FieldDescriptorProto


@pytest.fixture
def policy():
    """The test policy, registered for one test only (registering is what importing a module of
    `step_cache/policies/` does)."""
    module = importlib.import_module("tests.step_cache.every_other_step")
    register(module.EveryOtherStep)
    yield module.EveryOtherStep
    unregister(module.EveryOtherStep)


def wire_types():
    """`params.proto` with the policy's message and its `CacheConfig.policy` member added."""
    file = descriptor_pb2.FileDescriptorProto()
    params_pb2.DESCRIPTOR.CopyToProto(file)
    message = file.message_type.add(name="EveryOtherStep")
    for number, name in enumerate(("period", "taylorseer_order"), start=1):
        message.oneof_decl.add(name=f"_{name}")  # proto3 `optional`
        message.field.add(
            name=name,
            number=number,
            type=FD.TYPE_UINT32,
            label=FD.LABEL_OPTIONAL,
            oneof_index=number - 1,
            proto3_optional=True,
        )
    config = next(m for m in file.message_type if m.name == "CacheConfig")
    config.field.add(
        name="every_other_step",
        number=max(f.number for f in config.field) + 1,
        type=FD.TYPE_MESSAGE,
        type_name=".bagel.v1.EveryOtherStep",
        label=FD.LABEL_OPTIONAL,
        oneof_index=[o.name for o in config.oneof_decl].index("policy"),
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("bagel.v1.GenerationParams"))


def test_a_new_policy_is_named_parsed_and_listed_in_the_help(policy):
    assert list(POLICIES)[-1] == "every_other_step"
    parsed = CACHE_SPEC.parse("everyotherstep:p=3+taylorseer:order=2")
    assert parsed == policy(period=3, taylorseer_order=2)
    assert cache_policy_name(parsed) == "everyotherstep+taylorseer"
    parser = argparse.ArgumentParser()
    CACHE_SPEC.add_argument(parser, "cache", {"help": "h", "flags": ()})
    served = ", ".join(name.replace("_", "") for name in POLICIES)
    assert served.endswith(", everyotherstep")
    assert served in parser.format_help().replace("\n", " ")


def limits(num_layers: int) -> RequestLimits:
    return RequestLimits(pixel_step=16, max_side=1024, num_layers=num_layers)


def test_a_new_policy_travels_on_the_wire_and_is_validated(policy):
    wire = wire_types()
    params = GenerationParams(seed=3, cache=policy(period=5, taylorseer_order=1))
    msg = fields_to_message(params, wire())
    assert msg.cache.every_other_step.period == 5
    back = wire.FromString(msg.SerializeToString())
    assert GenerationParams(**fields_from_message(GenerationParams, back)) == params
    with pytest.raises(InvalidParams, match=r"cache.period=1 must be in \[2, 100\]"):
        validate(GenerationParams(cache=policy(period=1)), limits(num_layers=2))
    validate(GenerationParams(cache=policy()), limits(num_layers=2))
    with pytest.raises(InvalidParams, match="leaves none of the model's 1 blocks to cache"):
        validate(GenerationParams(cache=policy()), limits(num_layers=1))


def test_a_new_policy_passes_the_generic_tests_and_decides_without_communicating(policy):
    run = assert_reuses_when_nothing_changes(policy.eager())
    assert run.pattern() == "CRCRCRCR" and run.reduce_calls == 0
    assert drive(policy(period=3), constant(1.0, 7)).pattern() == "CRRCRRC"
    assert isinstance(make_step_cache(policy(), 4, lambda x: x), CollectiveStepCache)


def test_a_new_policy_runs_in_the_sampler(policy, tiny_model_dir):
    pipeline = Pipeline(tiny_model_dir, "cpu")
    contexts = pipeline.prefill("a green apple")
    params = GenerationParams(height=32, width=32, num_timesteps=6, seed=1, cache=policy())
    hits: list[int] = []
    latents = pipeline.denoise(
        contexts,
        params,
        step_cache=make_step_cache(params.cache, 4, lambda x: x),
        on_step=lambda done, total, hit: hits.append(done - 1) if hit else None,
    )
    assert hits == [1, 3]
    uncached = pipeline.denoise(contexts, params)
    assert not torch.equal(latents, uncached)
    assert ((latents - uncached).abs().max() / uncached.abs().max()).item() < 0.5
