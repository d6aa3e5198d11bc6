"""The SP attention variants, the mesh and the sharding gather on thread ranks (one process).

The same checks as the gloo tests (`test_sp_attention.py`, `test_mesh.py`,
`test_sharding.py`), run where mutation testing can attribute them: every rank is a thread and
`tests/helpers/thread_ranks.ThreadWorld` stands in for `torch.distributed`. Outputs are held
against the fp64 reference of `reference.py`.
"""

from __future__ import annotations

import re
from dataclasses import replace
from datetime import timedelta

import pytest
import torch

from diffusion_service.parallel import kv_gather, mesh, ring, sharding, ulysses, usp
from diffusion_service.parallel.config import ParallelConfig
from diffusion_service.parallel.kv_gather import (
    KVGatherAttention,
    KVGatherRingAttention,
    gather_kv,
)
from diffusion_service.parallel.mesh import ParallelMesh
from diffusion_service.parallel.registry import make_block_attention
from diffusion_service.parallel.ring import RingAttention, ring_attention_with_lse
from diffusion_service.parallel.sharding import LatentSharding
from diffusion_service.parallel.ulysses import UlyssesAttention, heads_to_seq, seq_to_heads
from diffusion_service.parallel.usp import UnifiedSequenceAttention
from tests.diffusion_service.parallel.reference import (
    HEADS,
    KV_HEADS,
    block_reference,
    make_block_inputs,
    relative_error,
    with_garbage_pad,
)
from tests.diffusion_service.parallel.test_sp_attention import CASES, TOPOLOGIES, _seed
from tests.helpers.thread_ranks import ThreadGroup, ThreadWorld

TOL = 1e-6
BF16 = ("ulysses2", "ring2", "ring2_ulysses2", "kv_gather2", "ring2_kv_gather2")


@pytest.fixture
def threads(monkeypatch):
    """`threads(world)`: a ThreadWorld that the parallel package's modules talk through."""

    def install(world: int) -> ThreadWorld:
        fake = ThreadWorld(world)
        for module in (mesh, ulysses, ring, kv_gather, usp, sharding):
            monkeypatch.setattr(module, "dist", fake)
        for module in (kv_gather, sharding):
            monkeypatch.setattr(module, "all_gather_single", fake.all_gather_into_tensor)
        return fake

    return install


def _attention_rank(config: ParallelConfig):
    def run(rank: int) -> dict:
        m = ParallelMesh.build(config, num_heads=HEADS, num_kv_heads=KV_HEADS)
        results = {}
        for case, (prefix_lens, num_latent) in enumerate(CASES):
            seed = _seed(m.cfg_rank, case)
            x = make_block_inputs(seed, prefix_lens, num_latent)
            shards = m.latent_sharding(num_latent)
            latent_q, latent_k, latent_v = (
                shards.shard(with_garbage_pad(t, shards.padded_len, seed + i))
                for i, t in enumerate((x.latent_q, x.latent_k, x.latent_v))
            )
            qkv = replace(x, latent_q=latent_q, latent_k=latent_k, latent_v=latent_v)
            attn = make_block_attention(m, shards)
            results[case] = attn(qkv)
            if isinstance(attn, RingAttention):
                results[case, "lse"] = attn.attend_with_lse(qkv)[1]
        return results

    return run


@pytest.mark.parametrize("config", TOPOLOGIES.values(), ids=TOPOLOGIES.keys())
def test_sp_attention_on_thread_ranks_equals_fp64_attention(threads, config):
    results = threads(config.world_size).run(_attention_rank(config))
    sp = config.sp_degree
    for cfg_rank in range(config.cfg_parallel):
        group = results[cfg_rank * sp : (cfg_rank + 1) * sp]
        for case, (prefix_lens, num_latent) in enumerate(CASES):
            x = make_block_inputs(_seed(cfg_rank, case), prefix_lens, num_latent)
            ref_joint, ref_latent, ref_joint_lse, ref_latent_lse = block_reference(x)
            where = f"cfg rank {cfg_rank}, case {case}"
            latent = torch.cat([r[case][1] for r in group], dim=1)
            assert latent.shape[1] == sp * -(-num_latent // sp), where
            assert latent.dtype == torch.float32, where
            assert relative_error(latent[:, :num_latent], ref_latent) < TOL, where
            for r in group:
                assert r[case][0].dtype == torch.float32, where
                assert relative_error(r[case][0], ref_joint) < TOL, where
            if (case, "lse") in group[0]:
                joint_len = ref_joint.shape[1]
                lse = torch.cat([r[case, "lse"][:, joint_len:] for r in group], dim=1)
                assert relative_error(lse[:, :num_latent], ref_latent_lse) < TOL, where
                for r in group:
                    assert relative_error(r[case, "lse"][:, :joint_len], ref_joint_lse) < TOL


@pytest.mark.parametrize("config", [TOPOLOGIES[name] for name in BF16], ids=list(BF16))
def test_sp_attention_keeps_bf16_inputs_in_bf16(threads, config):
    x = make_block_inputs(3, (7, 4), 13, dtype=torch.bfloat16)
    ref_joint, ref_latent, _, _ = block_reference(x)

    def run(rank: int):
        m = ParallelMesh.build(config, num_heads=HEADS, num_kv_heads=KV_HEADS)
        shards = m.latent_sharding(13)
        qkv = replace(x, **{f"latent_{n}": shards.shard(getattr(x, f"latent_{n}")) for n in "qkv"})
        return make_block_attention(m, shards)(qkv)

    results = threads(config.world_size).run(run)
    latent = torch.cat([r[1] for r in results], dim=1)[:, :13]
    assert latent.dtype == results[0][0].dtype == torch.bfloat16
    assert relative_error(latent, ref_latent) < 2e-2
    assert relative_error(results[0][0], ref_joint) < 2e-2


def _mesh_coords(config: ParallelConfig):
    def run(rank: int) -> dict:
        m = ParallelMesh.build(config, num_heads=8, num_kv_heads=4)
        return {
            "rank": (m.rank, m.world),
            "coords": (m.cfg_rank, m.sp_rank, m.ring_rank, m.inner_rank),
            "groups": tuple(
                getattr(m, f"{kind}_group").ranks for kind in ("inner", "ring", "sp", "cfg")
            ),
            "ranks": (m.inner_ranks, m.ring_ranks, m.sp_ranks, m.cfg_ranks),
            "degrees": (m.cfg_parallel, m.ring, m.inner, m.sp_degree),
        }

    return run


def test_mesh_on_eight_thread_ranks_places_every_rank_and_creates_each_group_once(threads):
    config = ParallelConfig(ulysses=2, ring=2, cfg_parallel=2)
    world = threads(8)
    results = world.run(_mesh_coords(config))
    assert [r["rank"] for r in results] == [(r, 8) for r in range(8)]
    assert [r["coords"] for r in results] == [
        (0, 0, 0, 0),
        (0, 1, 0, 1),
        (0, 2, 1, 0),
        (0, 3, 1, 1),
        (1, 0, 0, 0),
        (1, 1, 0, 1),
        (1, 2, 1, 0),
        (1, 3, 1, 1),
    ]
    for r in results:
        assert r["groups"] == r["ranks"]
        assert r["degrees"] == (2, 2, 2, 4)
    assert results[5]["ranks"] == ((4, 5), (5, 7), (4, 5, 6, 7), (1, 5))
    # Every group once, in the layout's order; the whole world is never a new group.
    assert world.new_groups == [
        (0, 1),
        (2, 3),
        (4, 5),
        (6, 7),
        (0, 2),
        (1, 3),
        (4, 6),
        (5, 7),
        (0, 1, 2, 3),
        (4, 5, 6, 7),
        (0, 4),
        (1, 5),
        (2, 6),
        (3, 7),
    ]


def test_mesh_reuses_the_world_and_shared_member_lists(threads):
    world = threads(3)
    results = world.run(_mesh_coords(ParallelConfig(ring=3)))
    # ring == sp == the world: the world group; each rank alone in its inner and cfg group.
    assert world.new_groups == [(0,), (1,), (2,)]
    for rank, r in enumerate(results):
        assert r["groups"] == ((rank,), (0, 1, 2), (0, 1, 2), (rank,))


def test_mesh_of_a_ring_of_five_places_ring_rank_r_at_rank_r(threads):
    results = threads(5).run(_mesh_coords(ParallelConfig(ring=5)))
    assert [r["coords"] for r in results] == [(0, r, r, 0) for r in range(5)]


def _ring_peers(config: ParallelConfig):
    """Runs one ring attention over the mesh's ring group; the world records whom it addressed."""

    def run(rank: int) -> None:
        m = ParallelMesh.build(config, num_heads=HEADS, num_kv_heads=KV_HEADS)
        x = make_block_inputs(0, (3,), 4)
        ring_attention_with_lse(m.ring_group, m.ring_rank, x, [4] * m.ring)

    return run


@pytest.mark.parametrize(
    "config, sends",
    [
        # Strided ring groups (0, 2), (1, 3), (4, 6), (5, 7): each rank's one neighbour.
        (
            ParallelConfig(ulysses=2, ring=2, cfg_parallel=2),
            {0: 2, 1: 3, 2: 0, 3: 1, 4: 6, 5: 7, 6: 4, 7: 5},
        ),
        (ParallelConfig(ring=5), {0: 1, 1: 2, 2: 3, 3: 4, 4: 0}),
        (ParallelConfig(kv_gather=2, ring=3), {0: 2, 1: 3, 2: 4, 3: 5, 4: 0, 5: 1}),
    ],
    ids=["ring2_ulysses2_cfg2", "ring5", "ring3_kv_gather2"],
)
def test_ring_sends_to_the_next_ring_rank_and_receives_from_the_previous(threads, config, sends):
    """Ring names its neighbours by group rank; they are the mesh's ring members, by global rank."""
    world = threads(config.world_size)
    world.run(_ring_peers(config))
    steps = config.ring - 1  # one send and one receive per step but the last
    assert sorted(world.p2p) == sorted(
        [("isend", rank, to) for rank, to in sends.items()] * steps
        + [("irecv", to, rank) for rank, to in sends.items()] * steps
    )


def test_mesh_latent_sharding_is_the_sp_shard_of_the_rank(threads):
    config = ParallelConfig(ring=2, cfg_parallel=2)

    def run(rank: int):
        s = ParallelMesh.build(config, num_heads=8, num_kv_heads=4).latent_sharding(13)
        return (s.num_tokens, s.degree, s.rank)

    assert threads(4).run(run) == [(13, 2, 0), (13, 2, 1), (13, 2, 0), (13, 2, 1)]


def test_sharding_gather_on_thread_ranks_returns_the_whole_sequence(threads):
    full = torch.arange(5 * 13 * 2).reshape(5, 13, 2).float()

    def run(rank: int):
        out = {}
        for dim in (1, -2):
            s = LatentSharding(13, 3, rank)
            out[dim] = s.gather(s.shard(full, dim), None, dim)
        return out

    for result in threads(3).run(run):
        assert torch.equal(result[1], full)
        assert torch.equal(result[-2], full)


def test_sharding_gather_along_the_last_dim(threads):
    full = torch.arange(3 * 7).reshape(3, 7).float()

    def run(rank: int):
        s = LatentSharding(7, 2, rank)
        return s.gather(s.shard(full, -1), None, -1)

    for result in threads(2).run(run):
        assert torch.equal(result, full)


def test_sharding_gather_rejects_a_group_of_another_size(threads):
    def run(rank: int):
        s = LatentSharding(8, 2, rank)
        s.gather(torch.zeros(1, 4), ThreadGroup((0, 1, 2)))

    with pytest.raises(ValueError, match="group has 3 ranks, sharding degree is 2"):
        threads(3).run(run)


def test_gather_kv_joins_k_and_v_shards_in_group_order(threads):
    def run(rank: int):
        k = torch.full((1, 2, 1, 1), float(rank))
        return gather_kv(None, 3, k, k + 10)

    for keys, values in threads(3).run(run):
        assert keys.flatten().tolist() == [0, 0, 1, 1, 2, 2]
        assert values.flatten().tolist() == [10, 10, 11, 11, 12, 12]


def test_seq_to_heads_and_back_is_the_identity_with_and_without_a_front(threads):
    gen = torch.Generator().manual_seed(0)
    shards = [torch.randn(2, 3, 4, 5, generator=gen) for _ in range(2)]
    front = torch.randn(2, 2, 4, 5, generator=gen)

    def run(rank: int):
        fronts = [front[:, :, 2 * rank : 2 * rank + 2]]
        [whole] = seq_to_heads(None, 2, [shards[rank]], fronts)
        [bare] = seq_to_heads(None, 2, [shards[rank]])
        return whole, bare, heads_to_seq(None, 2, whole, 2)

    results = threads(2).run(run)
    for rank, (whole, bare, (front_back, shard_back)) in enumerate(results):
        heads = slice(2 * rank, 2 * rank + 2)
        expected = torch.cat([front[:, :, heads], *(s[:, :, heads] for s in shards)], dim=1)
        assert torch.equal(whole, expected)
        assert torch.equal(bare, expected[:, 2:])
        assert torch.equal(front_back, front)
        assert torch.equal(shard_back, shards[rank])


def test_seq_to_heads_rejects_heads_that_do_not_split(threads):
    def run(rank: int):
        seq_to_heads(None, 2, [torch.zeros(1, 2, 3, 4)])

    with pytest.raises(ValueError, match="3 heads cannot be split over 2 Ulysses ranks"):
        threads(2).run(run)


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda g: UlyssesAttention(g, LatentSharding(8, 3, 0)),
            "Ulysses group has 2 ranks, expected 3",
        ),
        (
            lambda g: RingAttention(g, LatentSharding(8, 2, 1 - g.ranks.index(0))),
            "ring group rank is 0, expected 1",
        ),
        (
            lambda g: UnifiedSequenceAttention(g, g, LatentSharding(8, 2, 0), ulysses=2, ring=2),
            "sharding degree 2 != ring 2 x ulysses 2",
        ),
        (
            lambda g: KVGatherRingAttention(g, g, LatentSharding(8, 2, 0), inner=2, ring=2),
            "sharding degree 2 != ring 2 x inner 2",
        ),
    ],
)
def test_variants_refuse_a_sharding_their_group_does_not_hold(threads, make, message):
    def run(rank: int):
        if rank == 0:
            make(ThreadGroup((0, 1)))

    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        threads(2).run(run)


@pytest.mark.parametrize(
    "shard, message",
    [
        (1, "Ulysses group rank is 0, expected 1"),  # ring rank 0, Ulysses rank 1
        (2, "ring group rank is 0, expected 1"),  # ring rank 1, Ulysses rank 0
    ],
)
@pytest.mark.parametrize("variant", ["usp", "kv_gather_ring"])
def test_two_level_variants_refuse_a_shard_held_by_other_ranks(threads, variant, shard, message):
    """Rank 0 is inner rank 0 of (0, 1) and ring rank 0 of (0, 2): it holds shard 0 of 4 only."""
    if variant == "kv_gather_ring":
        message = message.replace("Ulysses", "KV gather")

    def run(rank: int):
        if rank == 0:
            inner, outer = ThreadGroup((0, 1)), ThreadGroup((0, 2))
            sharding = LatentSharding(8, 4, shard)
            if variant == "usp":
                UnifiedSequenceAttention(inner, outer, sharding, ulysses=2, ring=2)
            else:
                KVGatherRingAttention(inner, outer, sharding, inner=2, ring=2)

    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        threads(4).run(run)


def test_ring_and_kv_gather_ring_count_the_real_tokens_of_each_ring_block(threads):
    def run(rank: int):
        if rank != 0:
            return None
        ring2 = RingAttention(ThreadGroup((0, 1)), LatentSharding(3, 2, 0))
        usp2x2 = UnifiedSequenceAttention(
            ThreadGroup((0, 1)), ThreadGroup((0, 2)), LatentSharding(5, 4, 0), ulysses=2, ring=2
        )
        kvr = KVGatherRingAttention(
            ThreadGroup((0, 1)), ThreadGroup((0, 2)), LatentSharding(5, 4, 0), inner=2, ring=2
        )
        return ring2.block_valid, usp2x2.block_valid, kvr.block_valid

    # 3 tokens over 2 shards of 2; 5 over 4 shards of 2, two shards per ring block.
    assert threads(4).run(run)[0] == ([2, 1], [4, 1], [4, 1])


def test_sharding_gather_over_subgroups_keeps_each_groups_sequence(threads):
    """Four ranks in two groups of two, each group with a sequence of its own."""
    pairs = [ThreadGroup((0, 1)), ThreadGroup((2, 3))]

    def full(group: int) -> torch.Tensor:
        return torch.arange(5.0).reshape(1, 5, 1) + 100 * group

    def run(rank: int):
        s = LatentSharding(5, 2, rank % 2)
        return s.gather(s.shard(full(rank // 2)), pairs[rank // 2])

    for rank, result in enumerate(threads(4).run(run)):
        assert torch.equal(result, full(rank // 2))


def test_sharding_gather_names_the_size_of_the_group_it_was_given(threads):
    def run(rank: int):
        if rank == 0:
            LatentSharding(8, 2, 0).gather(torch.zeros(1, 4), ThreadGroup((0, 1, 2)))

    with pytest.raises(ValueError, match="^group has 3 ranks, sharding degree is 2$"):
        threads(4).run(run)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda g: RingAttention(g, LatentSharding(8, 3, 0)), "ring group has 2 ranks"),
        (lambda g: KVGatherAttention(g, LatentSharding(8, 3, 0)), "KV gather group has 2 ranks"),
    ],
)
def test_a_group_of_another_size_is_refused_naming_the_variant(threads, make, message):
    def run(rank: int):
        if rank == 0:
            make(ThreadGroup((0, 1)))

    with pytest.raises(ValueError, match=f"^{message}, expected 3$"):
        threads(2).run(run)


def test_new_groups_get_the_timeout_given_or_else_the_worlds(threads):
    config = ParallelConfig(ulysses=2, ring=2)
    build = _mesh_coords(config)
    world = threads(4)
    world.group.WORLD = replace(world.group.WORLD, timeout=timedelta(seconds=42))
    world.run(build)
    assert world.new_group_timeouts == [timedelta(seconds=42)] * 8  # all but sp (the world)

    world = threads(4)

    def given(rank: int):
        ParallelMesh.build(config, num_heads=8, num_kv_heads=4, timeout=timedelta(seconds=3))

    world.run(given)
    assert world.new_group_timeouts == [timedelta(seconds=3)] * 8


def test_a_world_whose_backend_keeps_no_timeout_gives_new_groups_none(threads):
    world = threads(2)
    world.group.WORLD = ThreadGroup((0, 1))  # no backend options to read
    world.run(_mesh_coords(ParallelConfig(ulysses=2, cfg_parallel=1)))
    assert world.new_group_timeouts == [None, None]  # the two one-rank ring groups
