"""LatentSharding: slice arithmetic, padding, and the gather over real gloo processes."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from diffusion_service.parallel.sharding import LatentSharding
from tests.helpers.ranks import run_ranks


def test_thirteen_tokens_over_four_ranks_pad_the_last_shard():
    shards = [LatentSharding(13, 4, r) for r in range(4)]
    assert [s.shard_len for s in shards] == [4, 4, 4, 4]
    assert shards[0].padded_len == 16
    assert [(s.start, s.stop) for s in shards] == [(0, 4), (4, 8), (8, 12), (12, 16)]
    assert [s.num_valid for s in shards] == [4, 4, 4, 1]


def test_shards_made_only_of_padding_have_no_valid_tokens():
    assert [LatentSharding(2, 4, r).num_valid for r in range(4)] == [1, 1, 0, 0]


def test_shard_of_full_or_padded_sequence_concatenates_back():
    x = torch.arange(2 * 37 * 3).reshape(2, 37, 3).float()
    shards = [LatentSharding(37, 3, r) for r in range(3)]
    local = [s.shard(x, dim=1) for s in shards]
    assert torch.equal(torch.cat(local, dim=1)[:, :37], x)
    assert torch.equal(torch.cat(local, dim=1)[:, 37:], torch.zeros(2, 2, 3))
    assert torch.equal(shards[1].shard(shards[1].pad(x)), local[1])


def test_shard_rejects_wrong_length():
    with pytest.raises(ValueError, match="expected length 13 or 16"):
        LatentSharding(13, 4, 0).shard(torch.zeros(1, 14))


def _gather_rank(rank: int, world: int) -> dict:
    full = torch.arange(5 * 13 * 2).reshape(5, 13, 2).float()
    out = {}
    for dim in (1, -2):
        sharding = LatentSharding(13, world, rank)
        out[f"dim{dim}"] = sharding.gather(sharding.shard(full, dim), dist.group.WORLD, dim)
    return out


def test_gather_returns_the_full_sequence_without_pad_on_every_rank():
    full = torch.arange(5 * 13 * 2).reshape(5, 13, 2).float()
    for result in run_ranks(3, _gather_rank):
        assert torch.equal(result["dim1"], full)
        assert torch.equal(result["dim-2"], full)
