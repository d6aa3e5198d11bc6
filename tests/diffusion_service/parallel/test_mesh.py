"""ParallelMesh groups on real gloo processes, built from a ParallelConfig."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from diffusion_service.parallel.config import ParallelConfig
from diffusion_service.parallel.mesh import ParallelMesh, mesh_rank_groups
from tests.helpers.ranks import run_ranks


def _members(group: dist.ProcessGroup) -> torch.Tensor:
    """The global ranks of a group, found by talking over it (not by asking torch)."""
    mine = torch.tensor([dist.get_rank()])
    found = [torch.zeros(1, dtype=torch.long) for _ in range(dist.get_world_size(group))]
    dist.all_gather(found, mine, group=group)
    return torch.cat(found)


def _mesh_rank(rank: int, world: int, config: ParallelConfig) -> dict:
    mesh = ParallelMesh.build(config, num_heads=8, num_kv_heads=4)
    return {
        "coords": torch.tensor(
            [
                mesh.cfg_rank,
                mesh.sp_rank,
                mesh.ring_rank,
                mesh.inner_rank,
            ]  # fmt: skip
        ),
        **{
            f"{kind}_talks": _members(getattr(mesh, f"{kind}_group"))
            for kind in ("inner", "ring", "sp", "cfg")
        },
        **{
            f"{kind}_ranks": torch.tensor(getattr(mesh, f"{kind}_ranks"))
            for kind in ("inner", "ring", "sp", "cfg")
        },
    }


def _groups_of(results: list[dict], kind: str) -> set[tuple[int, ...]]:
    for r in results:
        assert r[f"{kind}_talks"].tolist() == r[f"{kind}_ranks"].tolist()
    return {tuple(r[f"{kind}_ranks"].tolist()) for r in results}


def test_ring2_ulysses2_groups_inner_contiguous_ring_strided():
    results = run_ranks(4, _mesh_rank, ParallelConfig(ulysses=2, ring=2))
    assert _groups_of(results, "inner") == {(0, 1), (2, 3)}
    assert _groups_of(results, "ring") == {(0, 2), (1, 3)}
    assert _groups_of(results, "sp") == {(0, 1, 2, 3)}
    assert _groups_of(results, "cfg") == {(0,), (1,), (2,), (3,)}
    # cfg_rank, sp_rank, ring_rank, inner_rank
    assert [r["coords"].tolist() for r in results] == [
        [0, 0, 0, 0],
        [0, 1, 0, 1],
        [0, 2, 1, 0],
        [0, 3, 1, 1],
    ]


def test_cfg2_ulysses2_groups_cfg_outermost():
    results = run_ranks(4, _mesh_rank, ParallelConfig(ulysses=2, cfg_parallel=2))
    assert _groups_of(results, "inner") == {(0, 1), (2, 3)}
    assert _groups_of(results, "sp") == {(0, 1), (2, 3)}
    assert _groups_of(results, "ring") == {(0,), (1,), (2,), (3,)}
    assert _groups_of(results, "cfg") == {(0, 2), (1, 3)}
    assert [r["coords"].tolist() for r in results] == [
        [0, 0, 0, 0],
        [0, 1, 0, 1],
        [1, 0, 0, 0],
        [1, 1, 0, 1],
    ]


def test_rank_groups_for_cfg2_ring2_ulysses2():
    groups = mesh_rank_groups(ParallelConfig(ulysses=2, ring=2, cfg_parallel=2))
    assert groups["inner"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert groups["ring"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert groups["sp"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert groups["cfg"] == [[0, 4], [1, 5], [2, 6], [3, 7]]


def test_rank_groups_for_ring2_kv_gather2_put_the_kv_gather_ranks_in_the_inner_group():
    groups = mesh_rank_groups(ParallelConfig(kv_gather=2, ring=2))
    assert groups["inner"] == [[0, 1], [2, 3]]
    assert groups["ring"] == [[0, 2], [1, 3]]


def test_single_process_mesh_has_degree_one_and_no_groups():
    mesh = ParallelMesh.build(ParallelConfig(), num_heads=28, num_kv_heads=4)
    assert (mesh.rank, mesh.world, mesh.sp_degree, mesh.sp_rank) == (0, 1, 1, 0)
    assert mesh.sp_group is None and mesh.ring_group is None


def test_build_rejects_a_world_that_is_not_the_product():
    with pytest.raises(ValueError, match="world size 1 does not equal"):
        ParallelMesh.build(ParallelConfig(ring=2), num_heads=8, num_kv_heads=4)
