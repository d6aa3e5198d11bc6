"""One decoding step over a batch of requests: the slot cache that holds every request's keys
and values, and the step's forward through the und expert, whose shapes depend only on the
(rows, key-span) buckets, so it can be captured as a CUDA graph."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from bagel.kernels import fused, fused_decode
from bagel.network.layers import compute_dtype, rope_cos_sin
from bagel.network.model import UND, Bagel, MoTAttention


class SlotCache:
    """Per layer, K and V of every slot: `[slots, kv_heads, capacity, head_dim]`, so a batch's
    keys are one strided view and a step writes each request's new key at its own length. The
    capacity grows (doubling, contents kept) as the longest request needs, up to `max_capacity`."""

    def __init__(self, model: Bagel, slots: int, max_capacity: int, capacity: int = 256) -> None:
        llm = model.config.llm
        weight = model.language_model.model.embed_tokens.weight
        self.slots, self.max_capacity = slots, max_capacity
        self.capacity = min(capacity, max_capacity)
        shape = (slots, llm.num_kv_heads, self.capacity, llm.head_dim)
        self.keys = [weight.new_zeros(shape) for _ in range(llm.num_layers)]
        self.values = [weight.new_zeros(shape) for _ in range(llm.num_layers)]

    def ensure(self, tokens: int) -> bool:
        """Room for `tokens` keys per slot; True if the tensors were reallocated."""
        if tokens <= self.capacity:
            return False
        if tokens > self.max_capacity:
            raise ValueError(f"{tokens} tokens exceed the cache's {self.max_capacity}")
        capacity = bucket(tokens, self.capacity, self.max_capacity)

        def grown(old: Tensor) -> Tensor:
            new = old.new_zeros((*old.shape[:2], capacity, old.shape[3]))
            new[:, :, : self.capacity] = old
            return new

        self.keys = [grown(k) for k in self.keys]
        self.values = [grown(v) for v in self.values]
        self.capacity = capacity
        return True

    def fill(self, slot: int, keys: list[Tensor], values: list[Tensor]) -> None:
        """A prefilled prompt's K/V (per layer `[tokens, kv_heads, head_dim]`) into `slot`."""
        for cache_k, cache_v, k, v in zip(self.keys, self.values, keys, values, strict=True):
            cache_k[slot, :, : k.shape[0]] = k.transpose(0, 1)
            cache_v[slot, :, : v.shape[0]] = v.transpose(0, 1)

    def move(self, source: int, target: int, length: int) -> None:
        for cache in (*self.keys, *self.values):
            cache[target, :, :length] = cache[source, :, :length]


def bucket(n: int, smallest: int, largest: int) -> int:
    """The power of two (at least `smallest`, at most `largest`) that holds `n`."""
    size = smallest
    while size < n:
        size *= 2
    return min(size, largest)


def decode_step(
    model: Bagel, cache: SlotCache, span: int, tokens: Tensor, positions: Tensor, lengths: Tensor
) -> Tensor:
    """One token per row through the und expert: row `b` is slot `b`, feeding `tokens[b]` at
    RoPE `positions[b]` after its `lengths[b]` cached keys; its K/V are written into the slot.
    Returns logits `[rows, vocab]`. Shapes depend only on (rows, span): the step is graphable."""
    llm = model.config.llm
    rows = tokens.shape[0]
    groups = llm.num_heads // llm.num_kv_heads
    x = model.language_model.model.embed_tokens(tokens)[:, None]
    # Tables and mask once per step, in the forms the layers read (no conversion per layer).
    cos, sin = rope_cos_sin(positions, llm.head_dim, llm.rope_theta)
    wide = compute_dtype(x)
    cos, sin = cos.to(wide)[:, None, None, :], sin.to(wide)[:, None, None, :]
    slot = torch.arange(rows, device=tokens.device)
    head = torch.arange(llm.num_kv_heads, device=tokens.device)
    # Keys at or below each row's new one are real; the rest of the span is another's or unused.
    visible = torch.arange(span, device=tokens.device)[None] <= lengths[:, None]
    mask = torch.zeros(visible.shape, dtype=x.dtype, device=x.device)
    mask = mask.masked_fill_(~visible, -math.inf)[:, None, None, :]
    for index, layer in enumerate(model.layers):
        h = getattr(layer, f"input_layernorm{UND}")(x)
        cache_k, cache_v = cache.keys[index], cache.values[index]
        q = _attention_input(layer.self_attn, h, cos, sin, cache_k, cache_v, lengths, slot, head)
        # The query heads of one KV head stand in for SDPA's query length: no KV copies.
        grouped = q.view(rows, llm.num_kv_heads, groups, llm.head_dim)
        attn = F.scaled_dot_product_attention(
            grouped, cache_k[:rows, :, :span], cache_v[:rows, :, :span], attn_mask=mask
        )
        x = layer.finish(x, attn.reshape(rows, 1, llm.num_heads, llm.head_dim), UND, packed=True)
    last = model.language_model.model.norm(x[:, 0])
    return model.language_model.lm_head(last)


def _attention_input(
    attention: MoTAttention,
    h: Tensor,
    cos: Tensor,
    sin: Tensor,
    cache_k: Tensor,
    cache_v: Tensor,
    lengths: Tensor,
    slot: Tensor,
    head: Tensor,
) -> Tensor:
    """A layer's q `[rows, 1, heads, D]` for the normed input `h`, with each row's new key and
    value written into its slot at its length: one fused kernel on CUDA (`fused_decode`)."""
    if fused.applies(h):
        weight, bias = attention.packed_qkv_weights(UND)
        q_norm, k_norm = getattr(attention, f"q_norm{UND}"), getattr(attention, f"k_norm{UND}")
        q = fused_decode.qkv_into_cache(
            F.linear(h[:, 0], weight, bias), (q_norm.weight, q_norm.eps),
            (k_norm.weight, k_norm.eps), cos, sin, cache_k, cache_v, lengths, attention.num_heads,
        )  # fmt: skip
        return q[:, None]
    q, k, v = attention.packed_qkv(h, cos, sin, UND)
    where = (slot[:, None], head[None, :], lengths[:, None])
    cache_k.index_put_(where, k[:, 0])
    cache_v.index_put_(where, v[:, 0])
    return q
