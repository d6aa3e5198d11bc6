"""BAGEL's Qwen2 Mixture-of-Transformers language model and generation heads, in plain PyTorch.

Module and parameter names equal the published `ema.safetensors` key names. Every decoder layer
holds two experts: the "und" weights (`q_proj`, `mlp`, ...) for text and marker tokens and the
"gen" weights (`q_proj_moe_gen`, `mlp_moe_gen`, ...) for VAE latent tokens. A model built with
`with_gen=False` holds only what prefill needs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bagel.kernels import fused, streams
from bagel.kernels.streams import beside, join
from bagel.network.attention import BlockAttention, BlockQKV, full_block_attention, masked_sdpa
from bagel.network.config import BagelConfig, LLMConfig
from bagel.network.kv import ContextKV
from bagel.network.layers import (
    PositionTable,
    RMSNorm,
    SwiGLU,
    TimestepEmbedder,
    TokenRows,
    add_linear,
    apply_rope,
    compute_dtype,
    pack_linears,
    rope_cos_sin,
)

UND = ""  # parameter-name suffix of the understanding expert
GEN = "_moe_gen"  # ... and of the generation expert


@dataclass
class BranchPrefix:
    """The prefixes of a batch of CFG branches, right-padded to one length, plus each branch's
    RoPE position for the generation block. Built once per request, reused every step."""

    keys: list[Tensor]  # per layer [B, P_max, Hkv, D]
    values: list[Tensor]
    lengths: tuple[int, ...]  # real prefix tokens of each branch; the rest is padding
    positions: Tensor  # [B] int64

    @property
    def ragged(self) -> bool:
        """Whether the branches' prefixes differ in length (then each attends on its own)."""
        return len(set(self.lengths)) > 1

    @classmethod
    def from_contexts(cls, contexts: Sequence[ContextKV]) -> BranchPrefix:
        lengths = tuple(c.num_tokens for c in contexts)
        longest = max(lengths)
        num_layers = len(contexts[0].keys)
        ref = contexts[0].keys[0]
        keys, values = [], []
        for layer in range(num_layers):
            k = ref.new_zeros((len(contexts), longest, *ref.shape[1:]))
            v = torch.zeros_like(k)
            for b, ctx in enumerate(contexts):
                k[b, : lengths[b]] = ctx.keys[layer]
                v[b, : lengths[b]] = ctx.values[layer]
            keys.append(k)
            values.append(v)
        positions = torch.tensor([c.next_rope_position for c in contexts], device=ref.device)
        return cls(keys=keys, values=values, lengths=lengths, positions=positions)

    def clone(self) -> BranchPrefix:
        return BranchPrefix(
            keys=[k.clone() for k in self.keys],
            values=[v.clone() for v in self.values],
            lengths=self.lengths,
            positions=self.positions.clone(),
        )

    def copy_(self, other: BranchPrefix) -> None:
        """Take `other`'s contents into these tensors (same shapes), keeping their addresses."""
        if other.lengths != self.lengths:
            raise ValueError(f"prefix lengths {other.lengths} differ from {self.lengths}")
        for mine, theirs in zip(self.keys + self.values, other.keys + other.values, strict=True):
            mine.copy_(theirs, non_blocking=True)
        self.positions.copy_(other.positions, non_blocking=True)


@dataclass
class MixedSequence:
    """One context as the prefill's input when its tokens are not all text (image editing):
    token embeddings, which expert each token takes, its RoPE position, and who attends to whom.
    `bagel.prompting.contexts` builds them."""

    embeddings: Tensor  # [L, hidden]
    gen_index: Tensor  # [n_gen] int64: tokens of the gen expert (VAE latents)
    und_index: Tensor  # [L - n_gen] int64: every other token
    positions: Tensor  # [L] int64 RoPE positions
    mask: Tensor  # [L, L] bool, True = the row's token attends to the column's


class MoTAttention(nn.Module):
    """Self-attention projections of both experts: q/k/v with bias, o without, per-head QK-norm."""

    def __init__(self, cfg: LLMConfig, with_gen: bool) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
        )
        for suffix in (UND, GEN) if with_gen else (UND,):
            self.add_module(
                f"q_proj{suffix}", nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim)
            )
            self.add_module(
                f"k_proj{suffix}", nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim)
            )
            self.add_module(
                f"v_proj{suffix}", nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim)
            )
            self.add_module(
                f"o_proj{suffix}",
                nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False),
            )
            self.add_module(f"q_norm{suffix}", RMSNorm(cfg.head_dim, cfg.rms_norm_eps))
            self.add_module(f"k_norm{suffix}", RMSNorm(cfg.head_dim, cfg.rms_norm_eps))
        self._packed: dict[str, tuple[Tensor, Tensor]] = {}  # `packed_qkv_weights`

    def qkv(
        self, x: Tensor, cos: Tensor, sin: Tensor, expert: str
    ) -> tuple[Tensor, Tensor, Tensor]:
        """`x` `[B, L, hidden]` -> q `[B, L, H, D]`, k/v `[B, L, Hkv, D]`; QK-norm, then RoPE, in fp32.

        `x` may also come quantized from an FP8 norm (`bagel.network.fp8.QuantizedRows`): only the
        projections read it, so dtypes below follow their output.
        """
        shape = x.shape[:-1]
        q = getattr(self, f"q_proj{expert}")(x).view(*shape, self.num_heads, self.head_dim)
        k = getattr(self, f"k_proj{expert}")(x).view(*shape, self.num_kv_heads, self.head_dim)
        v = getattr(self, f"v_proj{expert}")(x).view(*shape, self.num_kv_heads, self.head_dim)
        return self.norm_rope(q, k, v, cos, sin, expert)

    def packed_qkv(self, x: Tensor, cos: Tensor, sin: Tensor, expert: str):
        """`qkv` with the three projections as one GEMM over `packed_qkv_weights`: for a few
        rows (text decoding) each projection streams its weights, and one call streams them
        once with one launch. Each output is the same dot product; the GEMM may split it
        differently, so low bits can differ from `qkv`'s."""
        weight, bias = self.packed_qkv_weights(expert)
        q, k, v = F.linear(x, weight, bias).split(
            (self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim,
             self.num_kv_heads * self.head_dim), dim=-1,
        )  # fmt: skip
        q = q.unflatten(-1, (self.num_heads, self.head_dim))
        k = k.unflatten(-1, (self.num_kv_heads, self.head_dim))
        v = v.unflatten(-1, (self.num_kv_heads, self.head_dim))
        return self.norm_rope(q, k, v, cos, sin, expert)

    def packed_qkv_weights(self, expert: str) -> tuple[Tensor, Tensor]:
        """`expert`'s q, k and v weights `[(H + 2 Hkv) D, hidden]` and biases as one tensor each.
        The first call packs them and leaves the three `nn.Linear`s viewing the packed tensors,
        so no weight is held twice (pack after the model has moved to its device)."""
        packed = self._packed.get(expert)
        if packed is None:
            linears = [getattr(self, f"{n}_proj{expert}") for n in ("q", "k", "v")]
            packed = self._packed[expert] = pack_linears(linears)
        return packed

    def norm_rope(self, q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, expert: str):
        """QK-norm, then RoPE, of projected q `[..., H, D]` and k `[..., Hkv, D]`."""
        q_norm, k_norm = getattr(self, f"q_norm{expert}"), getattr(self, f"k_norm{expert}")
        if fused.applies(q):  # the same arithmetic in one pass over q and one over k
            q = fused.qk_norm_rope(q, q_norm.weight, cos, sin, q_norm.eps)
            k = fused.qk_norm_rope(k, k_norm.weight, cos, sin, k_norm.eps)
            return q, k, v
        wide = compute_dtype(q)
        q = apply_rope(q_norm(q.to(wide)), cos, sin).to(v.dtype)
        k = apply_rope(k_norm(k.to(wide)), cos, sin).to(v.dtype)
        return q, k, v


class MoTDecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig, with_gen: bool) -> None:
        super().__init__()
        self.self_attn = MoTAttention(cfg, with_gen)
        for suffix in (UND, GEN) if with_gen else (UND,):
            self.add_module(f"mlp{suffix}", SwiGLU(cfg.hidden_size, cfg.intermediate_size))
            self.add_module(f"input_layernorm{suffix}", RMSNorm(cfg.hidden_size, cfg.rms_norm_eps))
            self.add_module(
                f"post_attention_layernorm{suffix}", RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            )

    def norm_qkv(self, x: Tensor, cos: Tensor, sin: Tensor, expert: str):
        """The input norm of `expert` (`UND` or `GEN`), then its q, k, v (`qkv`)."""
        return self.self_attn.qkv(getattr(self, f"input_layernorm{expert}")(x), cos, sin, expert)

    def finish(self, x: Tensor, attn: Tensor, expert: str, packed: bool = False) -> Tensor:
        """The rest of the layer after attention, with `expert`'s weights: `o_proj` plus the
        residual, then the post-attention norm and the MLP plus the residual (`packed`: the
        MLP's gate and up as one GEMM, `SwiGLU.activation`)."""
        # Both residual adds ride in the matmuls that produce what is added (`add_linear`).
        x = add_linear(x, getattr(self.self_attn, f"o_proj{expert}"), attn.flatten(-2))
        mlp_in = getattr(self, f"post_attention_layernorm{expert}")(x)
        return getattr(self, f"mlp{expert}").add_to(x, mlp_in, packed)

    def forward_text(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, need_output: bool
    ) -> tuple[Tensor | None, Tensor, Tensor]:
        """Und-expert pass over text `[B, L, hidden]` attending as `mask` `[B or 1, L, L]`
        allows (causal, padding masked); returns (output, k, v)."""
        q, k, v = self.norm_qkv(x, cos, sin, UND)
        attn = masked_sdpa(q, k, v, mask)
        return (self.finish(x, attn, UND) if need_output else None), k, v

    def forward_mixed(
        self, x: Tensor, seq: MixedSequence, cos: Tensor, sin: Tensor, need_output: bool
    ) -> tuple[Tensor | None, Tensor, Tensor]:
        """One layer over a context whose tokens belong to either expert (`seq.gen_index`: the
        gen expert's, the rest the und expert's), attending as `seq.mask` allows; `x`
        `[1, L, hidden]`, `cos`/`sin` `[L, 1, D]`. Returns (output, k, v)."""
        parts = [(e, i) for e, i in ((UND, seq.und_index), (GEN, seq.gen_index)) if i.numel()]
        length = x.shape[1]
        att = self.self_attn
        q = x.new_empty(1, length, att.num_heads, att.head_dim)
        k = x.new_empty(1, length, att.num_kv_heads, att.head_dim)
        v = torch.empty_like(k)
        for expert, index in parts:
            q[:, index], k[:, index], v[:, index] = self.norm_qkv(
                x[:, index], cos[index], sin[index], expert
            )
        attn = masked_sdpa(q, k, v, seq.mask[None])
        if not need_output:
            return None, k, v
        out = torch.empty_like(x)
        for expert, index in parts:
            out[:, index] = self.finish(x[:, index], attn[:, index], expert)
        return out, k, v

    def forward_block(
        self,
        joint: Tensor,
        latent: Tensor,
        cos: Tensor,
        sin: Tensor,
        prefix_k: Tensor,
        prefix_v: Tensor,
        prefix_lengths: tuple[int, ...] | None,
        attention: BlockAttention,
        marker_stream: torch.cuda.Stream | None = None,
    ) -> tuple[Tensor, Tensor]:
        """One layer over the generation block: markers by the und expert, latents by the gen
        expert, one shared non-causal attention over [prefix ; markers ; latents].

        With `prefix_lengths` (branches whose prefixes differ in length) each branch attends on
        its own over its real prefix keys: no padding mask, so the fastest kernels apply. With
        `marker_stream` the markers' projections and MLP run on it, beside the latents'
        (`bagel.kernels.streams`); the markers' output is then `marker_stream`'s to finish.
        """
        with beside(marker_stream, joint):
            jq, jk, jv = self.norm_qkv(joint, cos, sin, UND)
        lq, lk, lv = self.norm_qkv(latent, cos, sin, GEN)
        join(marker_stream)
        if prefix_lengths is None:
            joint_k = torch.cat([prefix_k, jk], dim=1)
            joint_v = torch.cat([prefix_v, jv], dim=1)
            joint_attn, latent_attn = attention(BlockQKV(jq, joint_k, joint_v, None, lq, lk, lv))
        else:
            outs = []
            for b, n in enumerate(prefix_lengths):
                one = slice(b, b + 1)
                joint_k = torch.cat([prefix_k[one, :n], jk[one]], dim=1)
                joint_v = torch.cat([prefix_v[one, :n], jv[one]], dim=1)
                qkv = BlockQKV(jq[one], joint_k, joint_v, None, lq[one], lk[one], lv[one])
                outs.append(attention(qkv))
            joint_attn = torch.cat([o[0] for o in outs])
            latent_attn = torch.cat([o[1] for o in outs])
        with beside(marker_stream, joint_attn):
            joint = self.finish(joint, joint_attn, UND)
        return joint, self.finish(latent, latent_attn, GEN)


def upload(host: Tensor, device: torch.device) -> Tensor:
    """`host` on `device`; to a GPU from pinned memory without waiting (the copy is ordered on
    the current stream, before anything queued after it there)."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


class Qwen2MoTModel(nn.Module):
    def __init__(self, cfg: LLMConfig, with_gen: bool) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(MoTDecoderLayer(cfg, with_gen) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if with_gen:
            self.norm_moe_gen = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def keep_token_rows(self, token_ids: Sequence[int], device: torch.device | str) -> None:
        """Shrink the embedding table to the rows of `token_ids` (`TokenRows`); on a meta
        model the rows are loaded afterwards and their lookup index lives on `device`."""
        table = self.embed_tokens.weight
        rows = TokenRows(table, token_ids)
        rows.sorted_ids = rows.sorted_ids.to(device)
        self.embed_tokens = rows


class LanguageModel(nn.Module):
    """Holds `model` so that parameter names start with `language_model.model.`; the LM head is
    built only with `with_lm_head` (text decoding): text-to-image never reads it."""

    def __init__(self, cfg: LLMConfig, with_gen: bool, with_lm_head: bool = False) -> None:
        super().__init__()
        self.model = Qwen2MoTModel(cfg, with_gen)
        if with_lm_head:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)


class Bagel(nn.Module):
    """The text-to-image subset of BAGEL: prefill (und expert) and the generation forward."""

    def __init__(
        self, config: BagelConfig, with_gen: bool = True, with_lm_head: bool = False
    ) -> None:
        super().__init__()
        self.config = config
        self.with_gen = with_gen
        self.with_lm_head = with_lm_head
        self._side_stream: torch.cuda.Stream | None = None  # `_marker_stream`, made on first use
        llm = config.llm
        self.language_model = LanguageModel(llm, with_gen, with_lm_head)
        if with_gen:
            self.time_embedder = TimestepEmbedder(llm.hidden_size, config.timestep_embed_dim)
            self.vae2llm = nn.Linear(config.patch_dim, llm.hidden_size)
            self.llm2vae = nn.Linear(llm.hidden_size, config.patch_dim)
            self.latent_pos_embed = PositionTable(config.max_latent_size**2, llm.hidden_size)

    @property
    def layers(self) -> nn.ModuleList:
        return self.language_model.model.layers

    def rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """The RoPE cos/sin tables of integer `positions` at this model's head size and theta."""
        llm = self.config.llm
        return rope_cos_sin(positions, llm.head_dim, llm.rope_theta)

    # ---- prefill: the und expert over the prompt of each CFG context -------------------------

    @torch.no_grad()
    def prefill_layers(
        self, prompts: Sequence[Sequence[int]]
    ) -> Iterator[tuple[list[Tensor], list[Tensor]]]:
        """Run the prompts (a batch, right-padded) causally; yield, layer by layer, each prompt's K
        and V `[tokens, kv_heads, head_dim]` as soon as that layer has produced them."""
        lengths = [len(p) for p in prompts]
        longest = max(lengths, default=0)
        embed = self.language_model.model.embed_tokens
        device = embed.weight.device
        if longest == 0:
            empty = embed.weight.new_zeros(
                0, self.config.llm.num_kv_heads, self.config.llm.head_dim
            )
            for _ in self.layers:
                yield [empty for _ in prompts], [empty for _ in prompts]
            return
        # The ids and the padding mask are built on the host and uploaded without a wait for the
        # GPU (pinned memory, non-blocking copy), so the CPU goes straight on to the layers.
        ids = torch.zeros(len(prompts), longest, dtype=torch.long)
        for b, p in enumerate(prompts):
            ids[b, : len(p)] = torch.tensor(list(p), dtype=torch.long)
        ids = upload(ids, device)
        # Built once for all layers: causal, and padding keys masked when lengths differ.
        mask = torch.ones(longest, longest, dtype=torch.bool, device=device).tril()[None]
        if min(lengths) != longest:
            key_mask = torch.arange(longest)[None] < torch.tensor(lengths)[:, None]
            mask = mask & upload(key_mask, device)[:, None, :]
        cos, sin = self.rope(torch.arange(longest, device=device))
        cos, sin = cos[:, None, :], sin[:, None, :]
        x = embed(ids)
        last = len(self.layers) - 1
        for index, layer in enumerate(self.layers):
            x, k, v = layer.forward_text(x, cos, sin, mask, need_output=index < last)
            yield (
                [k[b, :n].contiguous() for b, n in enumerate(lengths)],
                [v[b, :n].contiguous() for b, n in enumerate(lengths)],
            )

    @torch.no_grad()
    def prefill_mixed_layers(self, seq: MixedSequence) -> Iterator[tuple[Tensor, Tensor]]:
        """Run one mixed context (`MixedSequence`); yield each layer's K and V
        `[tokens, kv_heads, head_dim]` as soon as that layer has produced them."""
        cos, sin = self.rope(seq.positions)
        cos, sin = cos[:, None, :], sin[:, None, :]
        x = seq.embeddings[None]
        last = len(self.layers) - 1
        for index, layer in enumerate(self.layers):
            x, k, v = layer.forward_mixed(x, seq, cos, sin, need_output=index < last)
            yield k[0], v[0]

    def prefill(self, prompts: Sequence[Sequence[int]]) -> list[ContextKV]:
        keys: list[list[Tensor]] = [[] for _ in prompts]
        values: list[list[Tensor]] = [[] for _ in prompts]
        for layer_keys, layer_values in self.prefill_layers(prompts):
            for b in range(len(prompts)):
                keys[b].append(layer_keys[b])
                values[b].append(layer_values[b])
        return [
            ContextKV(keys[b], values[b], next_rope_position=len(p)) for b, p in enumerate(prompts)
        ]

    # ---- generation block: [<|vision_start|>, latents, <|vision_end|>] ------------------------

    def embed_block(
        self, x_t: Tensor, t: Tensor, pos_ids: Tensor, marker_ids: Tensor, batch: int
    ) -> tuple[Tensor, Tensor]:
        """Latent tokens `x_t` `[n, patch_dim]` at flow time `t` (0-d) with table rows `pos_ids`
        -> (marker states `[B, 2, hidden]`, latent states `[B, n, hidden]`), same for every branch."""
        dtype = self.vae2llm.weight.dtype
        latent = (
            self.vae2llm(x_t.to(dtype))
            + self.time_embedder(t.reshape(1))
            + self.latent_pos_embed(pos_ids)
        )
        joint = self.language_model.model.embed_tokens(marker_ids)
        return joint.expand(batch, -1, -1), latent.expand(batch, -1, -1)

    def forward_layers(
        self,
        joint: Tensor,
        latent: Tensor,
        prefix: BranchPrefix,
        attention: BlockAttention,
        layers: range | None = None,
    ) -> tuple[Tensor, Tensor]:
        cos, sin = self.rope(prefix.positions)
        cos, sin = cos[:, None, None, :], sin[:, None, None, :]
        side = self._marker_stream(latent)
        for index in layers if layers is not None else range(len(self.layers)):
            joint, latent = self.layers[index].forward_block(
                joint,
                latent,
                cos,
                sin,
                prefix.keys[index],
                prefix.values[index],
                prefix.lengths if prefix.ragged else None,
                attention,
                side,
            )
        join(side)
        return joint, latent

    def _marker_stream(self, latent: Tensor) -> torch.cuda.Stream | None:
        """The side stream of this model's generation forwards on `latent`'s GPU, or None."""
        if not streams.wanted(latent):
            return None
        if self._side_stream is None or self._side_stream.device != latent.device:
            self._side_stream = torch.cuda.Stream(latent.device)
        return self._side_stream

    def velocity(self, latent: Tensor) -> Tensor:
        """Final gen norm and `llm2vae`: latent states -> predicted velocity, in fp32."""
        return self.llm2vae(self.language_model.model.norm_moe_gen(latent)).float()

    @torch.no_grad()
    def forward_block(
        self,
        x_t: Tensor,
        t: Tensor,
        pos_ids: Tensor,
        marker_ids: Tensor,
        prefix: BranchPrefix,
        attention: BlockAttention = full_block_attention,
    ) -> Tensor:
        """One generation forward for every branch in `prefix`: velocity `[B, n, patch_dim]`."""
        joint, latent = self.embed_block(x_t, t, pos_ids, marker_ids, prefix.positions.shape[0])
        _, latent = self.forward_layers(joint, latent, prefix, attention)
        return self.velocity(latent)
