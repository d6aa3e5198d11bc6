"""ParallelConfig.validate: every problem reported at once, with the valid choices listed."""

from __future__ import annotations

import pytest

from diffusion_service.parallel import registry
from diffusion_service.parallel.config import ParallelConfig


def test_ulysses_not_dividing_kv_heads_lists_valid_degrees():
    with pytest.raises(ValueError) as err:
        ParallelConfig(ulysses=3).validate(num_heads=28, num_kv_heads=4)
    message = str(err.value)
    assert "ulysses=3 does not divide the 4 KV heads; valid ulysses degrees: 1, 2, 4" in message
    assert "Valid topologies for 3 ranks and 4 KV heads: (cfg_parallel=1, ring=3, ulysses=1)" in (
        message
    )


def test_world_not_product_says_product_and_lists_choices():
    with pytest.raises(ValueError) as err:
        ParallelConfig(ulysses=2, ring=2).validate(num_heads=28, num_kv_heads=4, world=6)
    message = str(err.value)
    assert "world size 6 does not equal cfg_parallel x ring x ulysses = 1 x 2 x 2 = 4" in message
    for c, r, u in ((1, 6, 1), (1, 3, 2), (2, 3, 1), (3, 2, 1), (3, 1, 2)):
        assert f"(cfg_parallel={c}, ring={r}, ulysses={u})" in message


def test_cfg_parallel_beyond_the_branches_lists_valid_degrees():
    with pytest.raises(ValueError, match="valid cfg_parallel degrees: 1, 2, 3"):
        ParallelConfig(cfg_parallel=4).validate(num_heads=28, num_kv_heads=4)


def test_non_positive_degree_is_rejected():
    with pytest.raises(ValueError, match="ring must be a positive integer, got 0"):
        ParallelConfig(ring=0).validate(num_heads=28, num_kv_heads=4)


def test_valid_layouts_respect_kv_heads_and_cfg_limit():
    layouts = ParallelConfig.valid_layouts(4, num_kv_heads=4)
    assert [(c.cfg_parallel, c.ring, c.ulysses) for c in layouts] == [
        (1, 4, 1),
        (1, 2, 2),
        (1, 1, 4),
        (2, 2, 1),
        (2, 1, 2),
    ]
    assert ParallelConfig(ulysses=3) not in ParallelConfig.valid_layouts(3, num_kv_heads=4)


def test_valid_layout_passes():
    ParallelConfig(ulysses=2, cfg_parallel=2).validate(num_heads=28, num_kv_heads=4, world=4)


@pytest.mark.parametrize(
    ("ulysses", "ring", "name"),
    [(1, 1, "none"), (2, 1, "ulysses"), (1, 2, "ring"), (2, 2, "usp")],
)
def test_default_sp_attention_follows_the_degrees(ulysses, ring, name):
    config = ParallelConfig(ulysses=ulysses, ring=ring, cfg_parallel=2)
    assert config.sp_attention_name == registry.default_sp_attention(config) == name
    config.validate(num_heads=28, num_kv_heads=4)


def test_unknown_sp_attention_lists_the_registered_names():
    with pytest.raises(ValueError) as err:
        ParallelConfig(ulysses=2, sp_attention="ulyses").validate(num_heads=28, num_kv_heads=4)
    assert "unknown sp_attention 'ulyses'; valid names: none, ulysses, ring, usp" in str(err.value)


def test_sp_attention_on_degrees_it_does_not_support_lists_the_ones_that_fit():
    with pytest.raises(ValueError) as err:
        ParallelConfig(ulysses=2, sp_attention="ring").validate(num_heads=28, num_kv_heads=4)
    message = str(err.value)
    assert (
        "sp_attention 'ring' needs ulysses == kv_gather == 1 < ring, not ulysses=2, kv_gather=1, "
        "ring=1" in message
    )
    assert "valid sp_attention for these degrees: ulysses" in message


def test_sp_attention_problem_is_reported_with_the_topology_problems():
    with pytest.raises(ValueError) as err:
        ParallelConfig(ulysses=3, sp_attention="usp").validate(num_heads=28, num_kv_heads=4)
    message = str(err.value)
    assert "valid ulysses degrees: 1, 2, 4" in message
    assert "sp_attention 'usp' needs ring > 1 and ulysses > 1" in message


def test_registering_a_taken_name_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        registry.register("ring", registry.lookup("ring"))
