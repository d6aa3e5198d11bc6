"""Ulysses sequence parallelism: trade sequence shards for head shards with one all-to-all.

Each rank turns its latent slice with all heads into the whole latent sequence with `1/u` of the
heads, attends locally with the replicated joint tokens in front, and trades back. GQA groups are
contiguous, so query-head chunk `i` reads exactly KV-head chunk `i`: no KV replication needed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from bagel.network.attention import AttentionPrecision, BlockQKV, attend
from diffusion_service.parallel.sharding import OneGroupAttention


def _all_to_all(send: Tensor, group: dist.ProcessGroup) -> Tensor:
    """`send [u, ...]`: chunk `i` goes to group rank `i`; chunk `i` of the result came from it."""
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv


def _copy(dst: Tensor, src: Tensor) -> None:
    """`dst.copy_(src)` for the strided layout changes around the all-to-all.

    The strided copy kernel pays per element, so rows whose bytes split into 8-byte words are
    moved as int64: four bf16 values per element instead of one.
    """
    if src.dtype == dst.dtype and _splits_into_words(src) and _splits_into_words(dst):
        src, dst = src.view(torch.int64), dst.view(torch.int64)
    dst.copy_(src)


def _splits_into_words(x: Tensor) -> bool:
    ratio, rem = divmod(8, x.element_size())
    if rem or x.numel() == 0 or x.stride(-1) != 1 or x.shape[-1] % ratio:
        return False
    strides = [s for s, n in zip(x.stride()[:-1], x.shape[:-1], strict=True) if n > 1]
    return x.storage_offset() % ratio == 0 and all(s % ratio == 0 for s in strides)


def head_chunk(x: Tensor, degree: int, index: int) -> Tensor:
    """Heads `[index * H/degree, (index + 1) * H/degree)` of `x [B, L, H, D]` (a view)."""
    per_rank = x.shape[2] // degree
    return x[:, :, index * per_rank : (index + 1) * per_rank]


def seq_to_heads(
    group: dist.ProcessGroup,
    degree: int,
    shards: Sequence[Tensor],
    fronts: Sequence[Tensor] | None = None,
) -> list[Tensor]:
    """Trade sequence shards `[B, S, Hx, D]` over the `degree` (u) ranks of `group` for the whole
    sequence with `Hx/u` heads.

    All tensors travel in one all-to-all. Result `j` is `[B, F + u*S, Hx/u, D]`: `fronts[j]`
    (`[B, F, Hx/u, D]`, already this rank's heads) followed by the shards of group ranks
    0..u-1 in order, written straight into one buffer so joining the front costs no extra copy.
    """
    batch, shard_len, _, head_dim = shards[0].shape
    counts = []
    for x in shards:
        if x.shape[2] % degree != 0:
            raise ValueError(f"{x.shape[2]} heads cannot be split over {degree} Ulysses ranks")
        counts.append(x.shape[2] // degree)
    offsets = [sum(counts[:j]) for j in range(len(counts))]
    ref = shards[0]
    send = ref.new_empty((degree, batch, shard_len, sum(counts), head_dim))
    for x, count, offset in zip(shards, counts, offsets, strict=True):
        _copy(
            send[..., offset : offset + count, :],
            x.unflatten(2, (degree, count)).permute(2, 0, 1, 3, 4),
        )
    recv = _all_to_all(send, group)  # [u (source shard), B, S, sum(counts), D]
    fronts = fronts if fronts is not None else [None] * len(shards)
    results = []
    for count, offset, front in zip(counts, offsets, fronts, strict=True):
        front_len = 0 if front is None else front.shape[1]
        out = ref.new_empty((batch, front_len + degree * shard_len, count, head_dim))
        if front is not None:
            _copy(out[:, :front_len], front)
        _copy(
            out[:, front_len:].unflatten(1, (degree, shard_len)),
            recv[..., offset : offset + count, :].permute(1, 0, 2, 3, 4),
        )
        results.append(out)
    return results


def heads_to_seq(
    group: dist.ProcessGroup, degree: int, out: Tensor, front_len: int
) -> tuple[Tensor, Tensor]:
    """Inverse of `seq_to_heads` over the `degree` (u) ranks of `group`, for an attention output
    `[B, F + u*S, H/u, D]`.

    Returns the front rows `[B, F, H, D]` and this rank's sequence shard `[B, S, H, D]`, all
    heads. The front (the two marker rows) rides in every destination's chunk of the same
    all-to-all: it adds `(u-1) * F` rows per rank, the same bytes an all-gather would move,
    without a second collective and its latency.
    """
    batch, total, heads, head_dim = out.shape
    shard_len = (total - front_len) // degree
    send = out.new_empty((degree, batch, front_len + shard_len, heads, head_dim))
    _copy(send[:, :, :front_len], out[:, :front_len].unsqueeze(0).expand(degree, -1, -1, -1, -1))
    _copy(
        send[:, :, front_len:], out[:, front_len:].unflatten(1, (degree, shard_len)).transpose(0, 1)
    )
    recv = _all_to_all(send, group)  # [u (source head chunk), B, F + S, H/u, D]
    full = out.new_empty((batch, front_len + shard_len, degree, heads, head_dim))
    _copy(full, recv.permute(1, 2, 0, 3, 4))
    full = full.flatten(2, 3)
    return full[:, :front_len], full[:, front_len:]


class UlyssesAttention(OneGroupAttention):
    """`BlockAttention` over a Ulysses group; `sharding` is this rank's shard of the latents, its
    degree the Ulysses degree and its rank this rank's Ulysses rank."""

    GROUP = "Ulysses"

    def __call__(self, x: BlockQKV) -> tuple[Tensor, Tensor]:
        degree, index = self.sharding.degree, self.sharding.rank
        fronts = [head_chunk(t, degree, index) for t in (x.joint_q, x.joint_k, x.joint_v)]
        q, k, v = seq_to_heads(self.group, degree, [x.latent_q, x.latent_k, x.latent_v], fronts)
        # Pad keys all sit at the end of the gathered sequence: cut them off rather than mask
        # them, so the unmasked case keeps the fastest kernel.
        num_keys = x.joint_k.shape[1] + self.sharding.num_tokens
        out = attend_local(q, k[:, :num_keys], v[:, :num_keys], x.joint_key_mask, self.precision)
        return heads_to_seq(self.group, degree, out, x.joint_q.shape[1])


def attend_local(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    joint_key_mask: Tensor | None,
    precision: AttentionPrecision = "bf16",
) -> Tensor:
    """Attention of `q` to keys `[joint; latent]` on this rank's heads, in the dtype of `q`.

    `joint_key_mask [B, Lj]` covers the first `Lj` keys; the latent keys are all real. Each
    rank holds every key of its heads, so FP8 quantizes them as one process would.
    """
    mask = None
    if joint_key_mask is not None:
        latent = joint_key_mask.new_ones((k.shape[0], k.shape[1] - joint_key_mask.shape[1]))
        mask = torch.cat([joint_key_mask, latent], dim=1)
    if precision == "fp8":
        return attend(q, k, v, mask, precision)
    if mask is not None:
        mask = mask[:, None, None, :]
    # enable_gqa lets the fused kernels read each KV head for its whole query group, instead of
    # copying K and V to the query head count.
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, enable_gqa=True
    )
    return out.transpose(1, 2)
