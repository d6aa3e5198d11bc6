"""How the latent token sequence is split over the ranks of a sequence-parallel group.

Shard `i` is the contiguous slice `[i * shard_len, (i + 1) * shard_len)` of the sequence padded
at the end to `degree * shard_len`; only the last shard(s) hold pad tokens, so any image size
works with any degree. The diffusion loop keeps latents sharded and gathers once at the end.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from bagel.network.attention import AttentionPrecision
from diffusion_service.parallel.collectives import all_gather_single


@dataclass(frozen=True)
class LatentSharding:
    """Shard `rank` of `num_tokens` latent tokens split over `degree` ranks."""

    num_tokens: int
    degree: int
    rank: int

    def __post_init__(self) -> None:
        if self.num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {self.num_tokens}")
        if self.degree < 1:
            raise ValueError(f"degree must be >= 1, got {self.degree}")
        if not 0 <= self.rank < self.degree:
            raise ValueError(f"rank {self.rank} is outside [0, {self.degree})")

    @property
    def shard_len(self) -> int:
        """Tokens per shard, pad included: the same on every rank."""
        return -(-self.num_tokens // self.degree)

    @property
    def padded_len(self) -> int:
        return self.shard_len * self.degree

    @property
    def start(self) -> int:
        return self.rank * self.shard_len

    @property
    def stop(self) -> int:
        return self.start + self.shard_len

    @property
    def num_valid(self) -> int:
        """Real (non-pad) tokens in this rank's shard; they come first in the shard."""
        return self.valid_len(self.rank)

    def valid_len(self, shard: int) -> int:
        """Real tokens in shard `shard` (0 for a shard made only of padding)."""
        return max(0, min(self.shard_len, self.num_tokens - shard * self.shard_len))

    def pad(self, x: Tensor, dim: int = 1) -> Tensor:
        """Zero-pad the full sequence `x` (length `num_tokens` along `dim`) to `padded_len`."""
        self._check_len(x, dim, (self.num_tokens,))
        missing = self.padded_len - self.num_tokens
        if missing == 0:
            return x
        shape = list(x.shape)
        shape[dim] = missing
        return torch.cat([x, x.new_zeros(shape)], dim=dim)

    def shard(self, x: Tensor, dim: int = 1) -> Tensor:
        """This rank's shard (a new contiguous tensor) of a full or already padded sequence."""
        self._check_len(x, dim, (self.num_tokens, self.padded_len))
        if x.shape[dim] == self.num_tokens:
            x = self.pad(x, dim)
        return x.narrow(dim, self.start, self.shard_len).contiguous()

    def gather(self, local: Tensor, group: dist.ProcessGroup | None, dim: int = 1) -> Tensor:
        """All-gather the shards of `group` (group rank `i` holds shard `i`) and drop the pad.

        Returns the full `num_tokens` sequence along `dim` on every rank of the group.
        """
        self._check_len(local, dim, (self.shard_len,))
        dim = dim % local.dim()
        if self.degree == 1:
            return local
        if dist.get_world_size(group) != self.degree:
            raise ValueError(
                f"group has {dist.get_world_size(group)} ranks, sharding degree is {self.degree}"
            )
        # One collective into one buffer: shards stacked on a new leading dim, then laid
        # side by side along `dim`.
        local = local.contiguous()
        flat = local.new_empty((self.degree * local.shape[0], *local.shape[1:]))
        all_gather_single(flat, local, group=group)
        full = flat.unflatten(0, (self.degree, local.shape[0])).movedim(0, dim)
        full = full.flatten(dim, dim + 1)
        return full.narrow(dim, 0, self.num_tokens)

    def _check_len(self, x: Tensor, dim: int, allowed: tuple[int, ...]) -> None:
        if x.shape[dim] not in allowed:
            raise ValueError(
                f"expected length {' or '.join(map(str, allowed))} along dim {dim}, "
                f"got shape {tuple(x.shape)}"
            )


def check_group(group: dist.ProcessGroup, size: int, rank: int, name: str) -> None:
    """ValueError unless `group` has the `size` ranks a variant was given, with this rank at group
    rank `rank`: the degrees come from the mesh's config, and this only confirms the group the
    mesh built agrees with them."""
    if dist.get_world_size(group) != size:
        raise ValueError(f"{name} group has {dist.get_world_size(group)} ranks, expected {size}")
    if dist.get_rank(group) != rank:
        raise ValueError(f"{name} group rank is {dist.get_rank(group)}, expected {rank}")


class OneGroupAttention:
    """Base of the SP variants that attend over one process group: the group, this rank's shard
    of the latents (its degree the group's degree, its rank this rank's place in the group,
    confirmed by `check_group`) and the attention's precision. `GROUP` names the group in
    messages."""

    GROUP = "SP"

    def __init__(
        self,
        group: dist.ProcessGroup,
        sharding: LatentSharding,
        precision: AttentionPrecision = "bf16",
    ) -> None:
        check_group(group, sharding.degree, sharding.rank, self.GROUP)
        self.group = group
        self.sharding = sharding
        self.precision = precision
