"""ParallelMesh groups on real gloo processes, and validate_topology's messages."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from diffusion_service.parallel.mesh import (
    ParallelMesh,
    mesh_rank_groups,
    valid_topologies,
    validate_topology,
)
from tests.helpers.ranks import run_ranks


def _members(group: dist.ProcessGroup) -> torch.Tensor:
    """The global ranks of a group, found by talking over it (not by asking torch)."""
    mine = torch.tensor([dist.get_rank()])
    found = [torch.zeros(1, dtype=torch.long) for _ in range(dist.get_world_size(group))]
    dist.all_gather(found, mine, group=group)
    return torch.cat(found)


def _mesh_rank(rank: int, world: int, cfg: int, ring: int, ulysses: int) -> dict:
    mesh = ParallelMesh.build(cfg, ring, ulysses, num_heads=8, num_kv_heads=4)
    return {
        "coords": torch.tensor(
            [
                mesh.cfg_rank,
                mesh.sp_rank,
                mesh.ring_rank,
                mesh.ulysses_rank,
                mesh.ring_next,
                mesh.ring_prev,
            ]  # fmt: skip
        ),
        **{
            f"{kind}_talks": _members(getattr(mesh, f"{kind}_group"))
            for kind in ("ulysses", "ring", "sp", "cfg")
        },
        **{
            f"{kind}_ranks": torch.tensor(getattr(mesh, f"{kind}_ranks"))
            for kind in ("ulysses", "ring", "sp", "cfg")
        },
    }


def _groups_of(results: list[dict], kind: str) -> set[tuple[int, ...]]:
    for r in results:
        assert r[f"{kind}_talks"].tolist() == r[f"{kind}_ranks"].tolist()
    return {tuple(r[f"{kind}_ranks"].tolist()) for r in results}


def test_ring2_ulysses2_groups_ulysses_contiguous_ring_strided():
    results = run_ranks(4, _mesh_rank, 1, 2, 2)
    assert _groups_of(results, "ulysses") == {(0, 1), (2, 3)}
    assert _groups_of(results, "ring") == {(0, 2), (1, 3)}
    assert _groups_of(results, "sp") == {(0, 1, 2, 3)}
    assert _groups_of(results, "cfg") == {(0,), (1,), (2,), (3,)}
    # cfg_rank, sp_rank, ring_rank, ulysses_rank, ring_next, ring_prev
    assert [r["coords"].tolist() for r in results] == [
        [0, 0, 0, 0, 2, 2],
        [0, 1, 0, 1, 3, 3],
        [0, 2, 1, 0, 0, 0],
        [0, 3, 1, 1, 1, 1],
    ]


def test_cfg2_ulysses2_groups_cfg_outermost():
    results = run_ranks(4, _mesh_rank, 2, 1, 2)
    assert _groups_of(results, "ulysses") == {(0, 1), (2, 3)}
    assert _groups_of(results, "sp") == {(0, 1), (2, 3)}
    assert _groups_of(results, "ring") == {(0,), (1,), (2,), (3,)}
    assert _groups_of(results, "cfg") == {(0, 2), (1, 3)}
    assert [r["coords"][:4].tolist() for r in results] == [
        [0, 0, 0, 0],
        [0, 1, 0, 1],
        [1, 0, 0, 0],
        [1, 1, 0, 1],
    ]


def test_rank_groups_for_cfg2_ring2_ulysses2():
    groups = mesh_rank_groups(2, 2, 2)
    assert groups["ulysses"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert groups["ring"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert groups["sp"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert groups["cfg"] == [[0, 4], [1, 5], [2, 6], [3, 7]]


def test_single_process_mesh_has_degree_one_and_no_groups():
    mesh = ParallelMesh.build(1, 1, 1, num_heads=28, num_kv_heads=4)
    assert (mesh.rank, mesh.world, mesh.sp_degree, mesh.sp_rank) == (0, 1, 1, 0)
    assert mesh.sp_group is None and mesh.ring_group is None


def test_ulysses_not_dividing_kv_heads_lists_valid_degrees():
    with pytest.raises(ValueError) as err:
        validate_topology(1, 1, 3, 3, num_kv_heads=4, num_heads=28)
    message = str(err.value)
    assert "ulysses=3 does not divide the 4 KV heads; valid ulysses degrees: 1, 2, 4" in message
    assert "(cfg_parallel=1, ring=3, ulysses=1)" in message


def test_world_not_product_says_product_and_lists_choices():
    with pytest.raises(ValueError) as err:
        validate_topology(1, 2, 2, 6, num_kv_heads=4, num_heads=28)
    message = str(err.value)
    assert "world size 6 does not equal cfg_parallel x ring x ulysses = 1 x 2 x 2 = 4" in message
    for c, r, u in ((1, 6, 1), (1, 3, 2), (2, 3, 1), (3, 2, 1), (3, 1, 2)):
        assert f"(cfg_parallel={c}, ring={r}, ulysses={u})" in message


def test_valid_topologies_respect_kv_heads_and_cfg_limit():
    assert valid_topologies(4, num_kv_heads=4) == [
        (1, 4, 1),
        (1, 2, 2),
        (1, 1, 4),
        (2, 2, 1),
        (2, 1, 2),
    ]
    assert (1, 1, 3) not in valid_topologies(3, num_kv_heads=4)


def test_build_rejects_a_world_that_is_not_the_product():
    with pytest.raises(ValueError, match="world size 1 does not equal"):
        ParallelMesh.build(1, 2, 1, num_heads=8, num_kv_heads=4)


def test_valid_topology_passes():
    validate_topology(2, 1, 2, 4, num_kv_heads=4, num_heads=28)
