"""The SP attention registry: which variant runs on which degrees, the default the degrees
imply, and the errors for a taken or unknown name and a sharding of another topology."""

from __future__ import annotations

import itertools

import pytest

from diffusion_service.parallel import registry
from diffusion_service.parallel.config import ParallelConfig
from diffusion_service.parallel.mesh import ParallelMesh
from diffusion_service.parallel.registry import SPAttention, make_block_attention
from diffusion_service.parallel.sharding import LatentSharding

BUILT_IN = ["none", "ulysses", "ring", "usp", "kv_gather", "kv_gather_ring"]

# (ulysses, ring, kv_gather) -> the variants that run on those degrees.
SUPPORTED = {
    (1, 1, 1): ["none"],
    (2, 1, 1): ["ulysses"],
    (1, 2, 1): ["ring"],
    (2, 2, 1): ["usp"],
    (1, 1, 2): ["kv_gather"],
    (1, 2, 2): ["kv_gather_ring"],
    (2, 1, 2): [],
    (2, 2, 2): ["usp"],
    (3, 1, 1): ["ulysses"],
    (1, 3, 1): ["ring"],
    (1, 1, 3): ["kv_gather"],
    (1, 3, 3): ["kv_gather_ring"],
}


def test_the_built_in_variants_are_registered_in_order():
    assert registry.names() == BUILT_IN


@pytest.mark.parametrize("degrees", SUPPORTED, ids=str)
def test_each_variant_supports_exactly_its_degrees(degrees):
    ulysses, ring, kv_gather = degrees
    config = ParallelConfig(ulysses=ulysses, ring=ring, kv_gather=kv_gather)
    fitting = [n for n in registry.names() if registry.lookup(n).supports(config)]
    assert fitting == SUPPORTED[degrees]


def test_each_variant_says_what_it_requires():
    assert {n: registry.lookup(n).requires for n in BUILT_IN} == {
        "none": "ulysses == ring == 1",
        "ulysses": "ring == 1 < ulysses, no kv_gather",
        "ring": "ulysses == kv_gather == 1 < ring",
        "usp": "ring > 1 and ulysses > 1",
        "kv_gather": "ring == ulysses == 1 < kv_gather",
        "kv_gather_ring": "ring > 1 and kv_gather > 1, no ulysses",
    }


@pytest.mark.parametrize(
    "degrees", [d for d in itertools.product((1, 2), repeat=3) if d[0] == 1 or d[2] == 1]
)
def test_the_default_variant_is_the_one_that_supports_the_degrees(degrees):
    ulysses, ring, kv_gather = degrees
    config = ParallelConfig(ulysses=ulysses, ring=ring, kv_gather=kv_gather)
    assert [registry.default_sp_attention(config)] == SUPPORTED[degrees]


def test_the_default_for_kv_gather_inside_a_ring_and_alone():
    assert registry.default_sp_attention(ParallelConfig(kv_gather=2)) == "kv_gather"
    assert registry.default_sp_attention(ParallelConfig(kv_gather=2, ring=3)) == "kv_gather_ring"
    assert registry.default_sp_attention(ParallelConfig(ring=3)) == "ring"
    assert registry.default_sp_attention(ParallelConfig(ulysses=2, ring=3)) == "usp"


def test_a_taken_name_and_an_unknown_name_are_refused_with_the_names():
    with pytest.raises(ValueError) as err:
        registry.register("ring", registry.lookup("ring"))
    assert str(err.value) == "an SP attention named 'ring' is already registered"
    with pytest.raises(ValueError) as err:
        registry.lookup("rign")
    assert str(err.value) == (
        "unknown sp_attention 'rign'; valid names: none, ulysses, ring, usp, kv_gather, "
        "kv_gather_ring"
    )
    assert err.value.__suppress_context__


def test_a_registered_variant_is_found_by_name_until_unregistered():
    variant = SPAttention(
        build=lambda mesh, s, precision: None, supports=lambda c: True, requires="any"
    )
    registry.register("extra", variant)
    try:
        assert registry.lookup("extra") is variant
        assert registry.names() == [*BUILT_IN, "extra"]
    finally:
        registry.unregister("extra")
    assert registry.names() == BUILT_IN


def test_a_sharding_of_another_topology_is_refused_naming_both():
    mesh = ParallelMesh.build(ParallelConfig(), num_heads=8, num_kv_heads=4)
    with pytest.raises(ValueError) as err:
        make_block_attention(mesh, LatentSharding(37, 2, 1))
    assert str(err.value) == (
        "sharding (degree 2, rank 1) does not match the mesh (sp degree 1, sp rank 0); "
        "use mesh.latent_sharding()"
    )


def test_describe_names_the_inner_split_the_degrees_and_the_variant():
    assert ParallelConfig(ulysses=2, ring=3, cfg_parallel=2).describe() == (
        "ulysses 2, ring 3, cfg 2, sp attention usp"
    )
    assert ParallelConfig(kv_gather=2, sp_attention="kv_gather").describe() == (
        "kv_gather 2, ring 1, cfg 1, sp attention kv_gather"
    )
    assert ParallelConfig().describe() == "ulysses 1, ring 1, cfg 1, sp attention none"


def test_degrees_multiply_into_the_inner_sp_and_world_sizes():
    config = ParallelConfig(kv_gather=2, ring=3, cfg_parallel=2)
    assert (config.inner_degree, config.sp_degree, config.world_size) == (2, 6, 12)
    config = ParallelConfig(ulysses=4, ring=1, cfg_parallel=3)
    assert (config.inner_degree, config.sp_degree, config.world_size) == (4, 4, 12)
