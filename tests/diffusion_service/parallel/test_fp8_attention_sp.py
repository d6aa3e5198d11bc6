"""FP8 attention (`--attention-precision fp8`) under every SP variant, on thread ranks, against
the single-process FP8 attention (`bagel.network.attention.block_attention("fp8")`, which runs
the plain-PyTorch reference of the kernel's quantization on the CPU).

What each variant may differ by follows from what it quantizes together:
- Ulysses gives each rank every key (and every query row) of its heads, laid out as one process
  lays them out, and the scales are per head: it quantizes exactly as one process does.
- KV gather holds every key too, but its query rows are `[markers; own shard]`, so a query
  shares its Q scale with other rows than in one process; Ring (and USP, and KV gather inside
  a Ring) attends each ring block on its own, so K and V get one scale set per block and the
  blocks' partials are merged by LSE. These are other roundings of the same attention, each
  quantizing blocks that are subsets of the single process's blocks (a finer or equal scale per
  element): their error against the exact attention is bounded by the single process's own,
  `E`. The test allows `2 E` against the exact attention, so `3 E` against the single-process
  FP8 result, and requires an error of at least a tenth of `E`, so a path that dropped the FP8
  attention (and came out exact) fails.
Each variant also equals, to fp32 rounding, the same quantization done here in one process:
the reference attention of its query rows to each of its key blocks, merged by LSE.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from bagel.kernels.fp8_attention import fp8_attention_reference
from bagel.network.attention import BlockQKV, block_attention, full_block_attention, sdpa
from diffusion_service.parallel.config import ParallelConfig
from diffusion_service.parallel.lse import merge_attention
from diffusion_service.parallel.mesh import ParallelMesh
from diffusion_service.parallel.registry import make_block_attention
from tests.diffusion_service.parallel.reference import (
    HEADS,
    KV_HEADS,
    block_reference,
    make_block_inputs,
    relative_error,
)
from tests.diffusion_service.parallel.test_sp_attention import CASES, TOPOLOGIES, _seed
from tests.diffusion_service.parallel.test_thread_ranks import threads  # noqa: F401 (fixture)

# The thread-rank cases plus one whose keys and queries span several 128-row scale blocks.
FP8_CASES = [*CASES, ((7, 4), 300)]
# Variants whose ranks quantize exactly as one process does (see above).
SAME_QUANTIZATION = {"ulysses2", "ulysses4", "cfg2_ulysses2"}
EXACT_TOL = 1e-5


def _fp8_rank(config: ParallelConfig, precision: str | None = "fp8"):
    def run(rank: int) -> dict:
        mesh = ParallelMesh.build(config, num_heads=HEADS, num_kv_heads=KV_HEADS)
        results = {}
        for case, (prefix_lens, num_latent) in enumerate(FP8_CASES):
            x = make_block_inputs(_seed(mesh.cfg_rank, case), prefix_lens, num_latent)
            sharding = mesh.latent_sharding(num_latent)
            # Zero pad rows: a pad query shares its Q scale block with real rows, and a zero
            # row leaves the block's scale as it is.
            shards = {f"latent_{n}": sharding.shard(getattr(x, f"latent_{n}")) for n in "qkv"}
            if precision is None:  # the default
                attention = make_block_attention(mesh, sharding)
            else:
                attention = make_block_attention(mesh, sharding, precision)
            results[case] = attention(replace(x, **shards))
        return results

    return run


def _blockwise_fp8(
    x: BlockQKV, rows: tuple[int, int], blocks: list[tuple[int, int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(joint_out, latent_out)` of the queries `[markers; latent rows]` attending to the joint
    keys with the latent block `blocks[0]`, then to each further latent block, every block
    quantized on its own by the reference and the partials merged by LSE."""
    q = torch.cat([x.joint_q, x.latent_q[:, rows[0] : rows[1]]], dim=1)
    out = lse = None
    for i, (start, stop) in enumerate(blocks):
        k, v, mask = x.latent_k[:, start:stop], x.latent_v[:, start:stop], None
        if i == 0:
            k, v = torch.cat([x.joint_k, k], dim=1), torch.cat([x.joint_v, v], dim=1)
            if x.joint_key_mask is not None:
                ones = x.joint_key_mask.new_ones((k.shape[0], stop - start))
                mask = torch.cat([x.joint_key_mask, ones], dim=1)
        elif stop <= start:
            continue
        block_out, block_lse = fp8_attention_reference(q, k, v, mask)
        out, lse = (
            (block_out, block_lse)
            if out is None
            else merge_attention(out, lse, block_out, block_lse)
        )
    joint_len = x.joint_q.shape[1]
    return out[:, :joint_len], out[:, joint_len:]


def _rank_blocks(
    config: ParallelConfig, sp_rank: int, num_latent: int
) -> tuple[tuple[int, int], list[tuple[int, int]], tuple[int, int]]:
    """The latent query rows SP rank `sp_rank` attends in one call, its key blocks (its own
    first, then the ring's order) as its variant quantizes them, and its own shard's rows."""
    degree = config.sp_degree
    shard = -(-num_latent // degree)

    def span(start: int, length: int) -> tuple[int, int]:
        return min(start, num_latent), min(start + length, num_latent)

    own = span(sp_rank * shard, shard)
    name = config.sp_attention_name
    if name in ("none", "ulysses"):
        return (0, num_latent), [(0, num_latent)], own
    if name == "kv_gather":
        return own, [(0, num_latent)], own
    inner = degree // config.ring
    ring_rank = sp_rank // inner
    ring_blocks = [span(j * inner * shard, inner * shard) for j in range(config.ring)]
    order = [ring_blocks[(ring_rank - step) % config.ring] for step in range(config.ring)]
    rows = ring_blocks[ring_rank] if name == "usp" else own
    return rows, order, own


def _latents(group: list[dict], case: int, num_latent: int) -> torch.Tensor:
    return torch.cat([r[case][1] for r in group], dim=1)[:, :num_latent]


@pytest.mark.parametrize("config", TOPOLOGIES.values(), ids=TOPOLOGIES.keys())
def test_fp8_attention_under_each_sp_variant_equals_the_single_process_fp8_attention(
    threads,  # noqa: F811
    config,
):
    name = next(n for n, c in TOPOLOGIES.items() if c == config)
    results = threads(config.world_size).run(_fp8_rank(config))
    sp = config.sp_degree
    for cfg_rank in range(config.cfg_parallel):
        group = results[cfg_rank * sp : (cfg_rank + 1) * sp]
        for case, (prefix_lens, num_latent) in enumerate(FP8_CASES):
            x = make_block_inputs(_seed(cfg_rank, case), prefix_lens, num_latent)
            joint, latent = block_attention("fp8")(x)
            exact_joint, exact_latent, _, _ = block_reference(x)
            where = f"{name}, cfg rank {cfg_rank}, case {case}"
            got_latent = _latents(group, case, num_latent)
            single_error = max(
                relative_error(latent, exact_latent), relative_error(joint, exact_joint)
            )
            assert single_error > 1e-3, where  # the FP8 quantization is there to be seen
            pairs = [(got_latent, latent, exact_latent)]
            pairs += [(r[case][0], joint, exact_joint) for r in group]
            for sp_rank, r in enumerate(group):
                rows, blocks, own = _rank_blocks(config, sp_rank, num_latent)
                joint_want, latent_want = _blockwise_fp8(x, rows, blocks)
                latent_want = latent_want[:, own[0] - rows[0] : own[1] - rows[0]]
                got = r[case][1][:, : own[1] - own[0]]
                if own[1] > own[0]:  # a shard made only of padding has no row to compare
                    assert relative_error(got, latent_want) < EXACT_TOL, (where, sp_rank)
                assert relative_error(r[case][0], joint_want) < EXACT_TOL, (where, sp_rank)
            for got, single, exact in pairs:
                assert got.dtype == torch.float32, where
                if name in SAME_QUANTIZATION:
                    assert relative_error(got, single) < EXACT_TOL, where
                else:
                    sp_error = relative_error(got, exact)
                    assert single_error / 10 < sp_error < 2 * single_error, where
                    assert relative_error(got, single) < 3 * single_error, where


@pytest.mark.parametrize("name", ["ulysses2", "ring2", "ring2_ulysses2", "kv_gather2"])
def test_fp8_under_sp_differs_from_the_bf16_default_which_is_the_plain_attention(
    threads,  # noqa: F811
    name,
):
    config = TOPOLOGIES[name]
    fp8 = threads(config.world_size).run(_fp8_rank(config, "fp8"))
    default = threads(config.world_size).run(_fp8_rank(config, None))
    bf16 = threads(config.world_size).run(_fp8_rank(config, "bf16"))
    for case, (_, num_latent) in enumerate(FP8_CASES):
        assert torch.equal(_latents(default, case, num_latent), _latents(bf16, case, num_latent))
        x = make_block_inputs(_seed(0, case), *FP8_CASES[case])
        exact = block_reference(x)[1]
        assert relative_error(_latents(default, case, num_latent), exact) < 1e-5
        assert relative_error(_latents(fp8, case, num_latent), exact) > 1e-4


def test_the_single_process_default_is_the_plain_sdpa_bit_for_bit():
    assert block_attention("bf16") is full_block_attention
    x = make_block_inputs(7, (3, 3), 37)
    q = torch.cat([x.joint_q, x.latent_q], dim=1)
    k = torch.cat([x.joint_k, x.latent_k], dim=1)
    v = torch.cat([x.joint_v, x.latent_v], dim=1)
    assert torch.equal(full_block_attention(x)[1], sdpa(q, k, v, None)[:, 2:])


def test_an_unknown_attention_precision_is_refused_naming_the_choices():
    mesh = ParallelMesh.build(ParallelConfig(), num_heads=HEADS, num_kv_heads=KV_HEADS)
    with pytest.raises(ValueError, match=r"'fp16'.*\('bf16', 'fp8'\)"):
        make_block_attention(mesh, mesh.latent_sharding(5), "fp16")
    with pytest.raises(ValueError, match="'int8'"):
        block_attention("int8")
