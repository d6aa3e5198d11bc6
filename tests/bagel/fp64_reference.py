"""An independent fp64 re-computation of BAGEL's text-to-image forward, written from the
published description and reading weights by their checkpoint key names. Tests compare our
modules against it; it shares no code with `bagel/`."""

from __future__ import annotations

import math

import torch
from torch import Tensor

LAYER = "language_model.model.layers.{}."


def rms(x: Tensor, w: Tensor, eps: float = 1e-6) -> Tensor:
    return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))


def rope(x: Tensor, pos: Tensor, theta: float) -> Tensor:
    """x [L, H, D] at integer positions pos [L]."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos.double()[:, None] * inv[None, :]
    cos = torch.cat([ang.cos(), ang.cos()], -1)[:, None, :]
    sin = torch.cat([ang.sin(), ang.sin()], -1)[:, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def attend(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor) -> Tensor:
    """q [Lq, H, D], k/v [Lk, Hkv, D], allowed [Lq, Lk] bool."""
    h, hkv = q.shape[1], k.shape[1]
    k = k.repeat_interleave(h // hkv, dim=1)
    v = v.repeat_interleave(h // hkv, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed[None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def expert_qkv(
    sd: dict, i: int, x: Tensor, sfx: str, heads: int, kv_heads: int, pos: Tensor, theta: float
):
    p = LAYER.format(i)
    xn = rms(x, sd[f"{p}input_layernorm{sfx}.weight"])
    q = xn @ sd[f"{p}self_attn.q_proj{sfx}.weight"].T + sd[f"{p}self_attn.q_proj{sfx}.bias"]
    k = xn @ sd[f"{p}self_attn.k_proj{sfx}.weight"].T + sd[f"{p}self_attn.k_proj{sfx}.bias"]
    v = xn @ sd[f"{p}self_attn.v_proj{sfx}.weight"].T + sd[f"{p}self_attn.v_proj{sfx}.bias"]
    d = q.shape[-1] // heads
    q = rms(q.view(-1, heads, d), sd[f"{p}self_attn.q_norm{sfx}.weight"])
    k = rms(k.view(-1, kv_heads, d), sd[f"{p}self_attn.k_norm{sfx}.weight"])
    return rope(q, pos, theta), rope(k, pos, theta), v.view(-1, kv_heads, d)


def expert_out(sd: dict, i: int, x: Tensor, attn: Tensor, sfx: str) -> Tensor:
    p = LAYER.format(i)
    x = x + attn.flatten(-2) @ sd[f"{p}self_attn.o_proj{sfx}.weight"].T
    xn = rms(x, sd[f"{p}post_attention_layernorm{sfx}.weight"])
    mlp = f"{p}mlp{sfx}."
    gate = xn @ sd[f"{mlp}gate_proj.weight"].T
    up = xn @ sd[f"{mlp}up_proj.weight"].T
    return x + (torch.nn.functional.silu(gate) * up) @ sd[f"{mlp}down_proj.weight"].T


def prefill(sd: dict, ids: list[int], layers: int, heads: int, kv_heads: int, theta: float):
    """Causal und pass; returns per-layer (K, V) after QK-norm and RoPE."""
    x = sd["language_model.model.embed_tokens.weight"][torch.tensor(ids, dtype=torch.long)]
    pos = torch.arange(len(ids))
    causal = torch.ones(len(ids), len(ids), dtype=torch.bool).tril()
    cache = []
    for i in range(layers):
        q, k, v = expert_qkv(sd, i, x, "", heads, kv_heads, pos, theta)
        cache.append((k, v))
        x = expert_out(sd, i, x, attend(q, k, v, causal), "")
    return cache


def timestep_embedding(sd: dict, t: float) -> Tensor:
    half = 128
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
    emb = torch.cat([torch.cos(t * freqs), torch.sin(t * freqs)])
    h = emb @ sd["time_embedder.mlp.0.weight"].T + sd["time_embedder.mlp.0.bias"]
    h = torch.nn.functional.silu(h)
    return h @ sd["time_embedder.mlp.2.weight"].T + sd["time_embedder.mlp.2.bias"]


def mixed_layer(
    sd: dict,
    i: int,
    x: Tensor,
    is_gen: Tensor,
    pos: Tensor,
    past_kv: tuple[Tensor, Tensor] | None,
    allowed: Tensor,
    heads: int,
    kv_heads: int,
    theta: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Layer `i` over tokens `x` of which `is_gen` take the gen expert and the rest the und
    expert, attending as `allowed` [n, past + n] says to the past K/V and their own. Returns
    (output, all keys, all values)."""
    qu, ku, vu = expert_qkv(sd, i, x, "", heads, kv_heads, pos, theta)
    qg, kg, vg = expert_qkv(sd, i, x, "_moe_gen", heads, kv_heads, pos, theta)
    sel = is_gen[:, None, None]
    q, k, v = torch.where(sel, qg, qu), torch.where(sel, kg, ku), torch.where(sel, vg, vu)
    pk, pv = past_kv if past_kv is not None else (k[:0], v[:0])
    keys, values = torch.cat([pk, k]), torch.cat([pv, v])
    a = attend(q, keys, values, allowed)
    xu = expert_out(sd, i, x, a, "")
    xg = expert_out(sd, i, x, a, "_moe_gen")
    return torch.where(is_gen[:, None], xg, xu), keys, values


def block_velocity(
    sd: dict,
    cache: list[tuple[Tensor, Tensor]],
    position: int,
    x_t: Tensor,
    t: float,
    pos_ids: Tensor,
    markers: tuple[int, int],
    layers: int,
    heads: int,
    kv_heads: int,
    theta: float,
) -> Tensor:
    """One generation forward of one branch: velocity [n, 64]."""
    n = x_t.shape[0]
    lat = x_t @ sd["vae2llm.weight"].T + sd["vae2llm.bias"] + timestep_embedding(sd, t)
    lat = lat + sd["latent_pos_embed.pos_embed"][pos_ids]
    emb = sd["language_model.model.embed_tokens.weight"]
    # order: start marker, latents, end marker; markers use und weights
    x = torch.cat([emb[markers[0]][None], lat, emb[markers[1]][None]])
    is_gen = torch.zeros(n + 2, dtype=torch.bool)
    is_gen[1:-1] = True
    pos = torch.full((n + 2,), position)
    past = cache[0][0].shape[0] if cache else 0
    allowed = torch.ones(n + 2, past + n + 2, dtype=torch.bool)
    for i in range(layers):
        past_kv = cache[i] if cache else None
        x, _, _ = mixed_layer(sd, i, x, is_gen, pos, past_kv, allowed, heads, kv_heads, theta)
    h = rms(x[1:-1], sd["language_model.model.norm_moe_gen.weight"])
    return h @ sd["llm2vae.weight"].T + sd["llm2vae.bias"]


def context_prefill(
    sd: dict,
    pieces: list[tuple[str, Tensor]],
    markers: tuple[int, int],
    layers: int,
    heads: int,
    kv_heads: int,
    theta: float,
):
    """An edit context, appended piece by piece as the reference's `update_context_*` calls do:
    ("text", token ids [n]) causal at one position per token; ("vae", latent tokens [n, 64] with
    their table rows) and ("vit", connector outputs [n, hidden]) between the image markers, at one
    position, non-causal. Returns per-layer (K, V) of the whole context."""
    return context_forward(sd, pieces, markers, layers, heads, kv_heads, theta)[0]


def context_logits(sd: dict, pieces: list, markers: tuple[int, int], **dims) -> Tensor:
    """The LM head's logits [vocab] after the last token of the context `pieces` (the last
    piece text): what greedy decoding takes the argmax of."""
    _, x = context_forward(sd, pieces, markers, **dims)
    h = rms(x[-1], sd["language_model.model.norm.weight"])
    return h @ sd["language_model.lm_head.weight"].T


def context_forward(
    sd: dict,
    pieces: list[tuple[str, Tensor]],
    markers: tuple[int, int],
    layers: int,
    heads: int,
    kv_heads: int,
    theta: float,
):
    """`context_prefill`, also returning the last piece's output states [n, hidden]."""
    emb = sd["language_model.model.embed_tokens.weight"]
    cache: list[tuple[Tensor, Tensor]] = []
    position = 0
    for kind, data in pieces:
        if kind == "text":
            x = emb[data]
            n = x.shape[0]
            pos = torch.arange(position, position + n)
            own = torch.ones(n, n, dtype=torch.bool).tril()
            is_gen = torch.zeros(n, dtype=torch.bool)
            position += n
        else:
            if kind == "vae":
                tokens, rows = data
                body = tokens @ sd["vae2llm.weight"].T + sd["vae2llm.bias"]
                body = body + timestep_embedding(sd, 0.0) + sd["latent_pos_embed.pos_embed"][rows]
            else:
                body = data
            x = torch.cat([emb[markers[0]][None], body, emb[markers[1]][None]])
            n = x.shape[0]
            pos = torch.full((n,), position)
            own = torch.ones(n, n, dtype=torch.bool)
            is_gen = torch.zeros(n, dtype=torch.bool)
            is_gen[1:-1] = kind == "vae"
            position += 1
        past = cache[0][0].shape[0] if cache else 0
        allowed = torch.cat([torch.ones(n, past, dtype=torch.bool), own], dim=1)
        new_cache = []
        for i in range(layers):
            past_kv = cache[i] if cache else None
            x, keys, values = mixed_layer(
                sd, i, x, is_gen, pos, past_kv, allowed, heads, kv_heads, theta
            )
            new_cache.append((keys, values))
        cache = new_cache
    return cache, x
