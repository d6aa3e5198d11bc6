"""The model's one attention seam.

The generation block is `[markers ; latent tokens]`. The markers (and the prompt KV in front of
them) are *joint* tokens: every process holds all of them. The latent tokens may be a slice of
the whole latent sequence when a caller shards it; the model does not know or care. A
`BlockAttention` receives both groups in one `BlockQKV` and returns `(joint_out, latent_out)`,
so a sequence-parallel implementation can be plugged in without the model changing.

Conventions for every implementation:
- shapes: q `[B, L, H, D]`, k/v `[B, L, Hkv, D]`, `H % Hkv == 0`; query head `h` reads KV head
  `h // (H // Hkv)` (contiguous groups, as in Qwen2's `repeat_kv`);
- attention is non-causal, softmax scale `1/sqrt(D)`;
- `joint_key_mask` `[B, Lj]` bool, True marks a real key (prefixes of different CFG branches are
  right-padded to one length); None means all joint keys are real;
- every query sees every real joint key and every latent key;
- outputs have the dtype of `q`.

`AttentionPrecision` says how the generation block's queries attend: "bf16" (the model's dtype,
the default) or "fp8" (Q·K^T and P·V in e4m3, `bagel.kernels.fp8_attention`). Whoever builds
the `BlockAttention` picks it (`block_attention` here, the SP variants in `diffusion_service`);
the prefill's causal text attention (`masked_sdpa`) has no FP8 form.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal, Protocol, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from bagel import envs
from bagel.kernels import fp8_attention as fp8

AttentionPrecision = Literal["bf16", "fp8"]
ATTENTION_PRECISIONS: tuple[AttentionPrecision, ...] = get_args(AttentionPrecision)


@dataclass(frozen=True)
class BlockQKV:
    """The inputs of one block attention: the joint tokens' q/k/v and key mask, and this
    process's latent tokens' q/k/v (all of them, or its shard)."""

    joint_q: Tensor
    joint_k: Tensor
    joint_v: Tensor
    joint_key_mask: Tensor | None
    latent_q: Tensor
    latent_k: Tensor
    latent_v: Tensor


class BlockAttention(Protocol):
    def __call__(self, x: BlockQKV) -> tuple[Tensor, Tensor]:
        """`(joint_out, latent_out)`, shaped like `x.joint_q` and `x.latent_q`."""
        ...


def expand_kv_heads(x: Tensor, num_heads: int) -> Tensor:
    """`[B, L, Hkv, D]` -> `[B, L, H, D]` by repeating each KV head over its query group."""
    groups = num_heads // x.shape[2]
    return x if groups == 1 else x.repeat_interleave(groups, dim=2)


def sdpa(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, causal: bool = False) -> Tensor:
    """Plain attention on `[B, L, H, D]` / `[B, L, Hkv, D]` tensors, via torch SDPA."""
    if key_mask is None:
        # Without a mask the fused kernels read the KV heads as they are (no copies per group).
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            is_causal=causal,
            enable_gqa=True,
        )
        return out.transpose(1, 2)
    heads = q.shape[2]
    k = expand_kv_heads(k, heads)
    v = expand_kv_heads(v, heads)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=key_mask[:, None, None, :],
        is_causal=causal,
    )
    return out.transpose(1, 2)


def masked_sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Attention with a full boolean mask `[B, Lq, Lk]` (True = attend), e.g. causal + padding."""
    heads = q.shape[2]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        expand_kv_heads(k, heads).transpose(1, 2),
        expand_kv_heads(v, heads).transpose(1, 2),
        attn_mask=mask[:, None],
    )
    return out.transpose(1, 2)


def fp8_attention_kernel_runs(device: torch.device | str) -> bool:
    """Whether FP8 attention on `device` runs the Triton kernel (a GPU with FP8 tensor cores,
    Triton, `BAGEL_FP8_ATTENTION_KERNEL` on); elsewhere it runs the reference, slower than bf16.
    On a GPU this initialises CUDA."""
    device = torch.device(device)
    return device.type == "cuda" and envs.switch_on(envs.FP8_ATTENTION_KERNEL) and fp8.available()


def fp8_attention_with_lse(
    q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None
) -> tuple[Tensor, Tensor]:
    """FP8 attention: `(out [B, Lq, H, D] in q's dtype, lse [B, Lq, H] fp32)`, a query with no
    real key giving 0 and -inf. The Triton kernel where it runs (a GPU with FP8 tensor cores,
    half-precision inputs, head dim 64 or 128, `BAGEL_FP8_ATTENTION_KERNEL` on), else its
    plain-PyTorch reference, which quantizes alike."""
    k, v = k.to(q.dtype), v.to(q.dtype)
    if (
        q.dtype in (torch.bfloat16, torch.float16)
        and q.shape[-1] in (64, 128)
        and fp8_attention_kernel_runs(q.device)
    ):
        return fp8.fp8_attention(q, k, v, key_mask)
    out, lse = fp8.fp8_attention_reference(q, k, v, key_mask)
    return out.to(q.dtype), lse


def attend(
    q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, precision: AttentionPrecision
) -> Tensor:
    """Non-causal attention of `q` to `k, v` (`key_mask [B, Lk]` or None) in `precision`, in
    q's dtype."""
    if precision == "fp8":
        return fp8_attention_with_lse(q, k, v, key_mask)[0]
    return sdpa(q, k, v, key_mask)


def attend_block(
    joint_q: Tensor,
    latent_q: Tensor,
    k: Tensor,
    v: Tensor,
    key_mask: Tensor | None,
    precision: AttentionPrecision = "bf16",
) -> tuple[Tensor, Tensor]:
    """The joint and the latent queries against the same keys `[joint; latent]` (`key_mask`
    `[B, Lk]` or None), in one attention call over `[joint_q; latent_q]`. Two calls would spare
    the concatenation and the copy of the output's latent rows, but the call of the two joint
    rows alone reads every key with one thread block per head, which costs more than it spares
    (docs/benchmarks.md, "Where one forward's GPU time goes")."""
    out = attend(torch.cat([joint_q, latent_q], dim=1), k, v, key_mask, precision)
    joint_len = joint_q.shape[1]
    return out[:, :joint_len], out[:, joint_len:]


def full_block_attention(
    x: BlockQKV, precision: AttentionPrecision = "bf16"
) -> tuple[Tensor, Tensor]:
    """The single-process `BlockAttention`: all tokens attend to all keys."""
    k = torch.cat([x.joint_k, x.latent_k], dim=1)
    v = torch.cat([x.joint_v, x.latent_v], dim=1)
    mask = None
    if x.joint_key_mask is not None:
        latent_mask = x.joint_key_mask.new_ones(x.latent_k.shape[:2])
        mask = torch.cat([x.joint_key_mask, latent_mask], dim=1)
    return attend_block(x.joint_q, x.latent_q, k, v, mask, precision)


def block_attention(precision: AttentionPrecision) -> BlockAttention:
    """The single-process `BlockAttention` in `precision`."""
    check_attention_precision(precision)
    if precision == "bf16":
        return full_block_attention
    return functools.partial(full_block_attention, precision=precision)


def check_attention_precision(precision: str) -> None:
    if precision not in ATTENTION_PRECISIONS:
        raise ValueError(f"attention precision {precision!r}: one of {ATTENTION_PRECISIONS}")
