"""Our modules against the independent fp64 re-computation in `fp64_reference.py`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bagel.checkpoints.checkpoint import load_bagel
from bagel.diffusion.generation import BlockVelocity, ForwardGraphs
from bagel.network.attention import full_block_attention
from bagel.network.config import BagelConfig
from bagel.network.kv import Branch, ContextKV
from bagel.network.latents import latent_position_ids, patchify, unpatchify
from bagel.network.model import BranchPrefix
from bagel.text.tokenizer import load_tokenizer
from tests.bagel import fp64_reference as ref


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.fixture(scope="module")
def setup(tiny_model_dir: Path):
    config = BagelConfig.from_dir(tiny_model_dir)
    model = load_bagel(tiny_model_dir, "diffusion", dtype=torch.float64)
    sd = {k: v.double() for k, v in load_file(str(tiny_model_dir / "ema.safetensors")).items()}
    tok = load_tokenizer(tiny_model_dir)
    return config, model, sd, tok


def dims(config: BagelConfig) -> dict:
    llm = config.llm
    return dict(
        layers=llm.num_layers, heads=llm.num_heads, kv_heads=llm.num_kv_heads, theta=llm.rope_theta
    )


def test_prefill_kv_matches_fp64_recomputation(setup):
    config, model, sd, tok = setup
    ids = tok.encode_prompt("a red fox in the snow")
    (ctx,) = model.prefill([ids])
    expected = ref.prefill(sd, ids, **dims(config))
    assert ctx.next_rope_position == len(ids)
    for layer, (k, v) in enumerate(expected):
        assert rel_err(ctx.keys[layer], k) < 1e-10
        assert rel_err(ctx.values[layer], v) < 1e-10


def test_batched_prefill_of_unequal_prompts_equals_one_at_a_time(setup):
    _, model, _, tok = setup
    prompts = [
        tok.encode_prompt("a small boat"),
        [],
        tok.encode_prompt("a very long prompt about many things"),
    ]
    batched = model.prefill(prompts)
    for prompt, ctx in zip(prompts, batched, strict=True):
        if not prompt:
            assert ctx.num_tokens == 0 and ctx.next_rope_position == 0
            continue
        (alone,) = model.prefill([prompt])
        for a, b in zip(ctx.keys + ctx.values, alone.keys + alone.values, strict=True):
            assert rel_err(a, b) < 1e-12


@pytest.mark.parametrize("prompt", ["a cat", ""])
def test_generation_forward_matches_fp64_recomputation(setup, prompt):
    config, model, sd, tok = setup
    ids = tok.encode_prompt(prompt) if prompt else []
    (ctx,) = model.prefill([ids])
    rows, cols = 3, 5
    pos_ids = latent_position_ids(rows, cols, config.max_latent_size)
    x_t = torch.randn(
        rows * cols,
        config.patch_dim,
        generator=torch.Generator().manual_seed(1),
        dtype=torch.float64,
    )
    t = torch.tensor(0.7, dtype=torch.float64)
    markers = (tok.start_of_image, tok.end_of_image)
    v = model.forward_block(
        x_t, t, pos_ids, torch.tensor(markers), BranchPrefix.from_contexts([ctx])
    )
    cache = ref.prefill(sd, ids, **dims(config)) if ids else []
    expected = ref.block_velocity(sd, cache, len(ids), x_t, 0.7, pos_ids, markers, **dims(config))
    assert rel_err(v[0], expected) < 1e-6


def test_mot_attention_layer_matches_fp64_recomputation(setup):
    """One layer, both experts, against the re-computation truncated to one layer."""
    config, model, sd, tok = setup
    ids = tok.encode_prompt("two birds")
    (ctx,) = model.prefill([ids])
    pos_ids = latent_position_ids(2, 2, config.max_latent_size)
    x_t = torch.randn(
        4, config.patch_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2)
    )
    t = torch.tensor(0.3, dtype=torch.float64)
    markers = (tok.start_of_image, tok.end_of_image)
    prefix = BranchPrefix.from_contexts([ctx])
    joint, latent = model.embed_block(x_t, t, pos_ids, torch.tensor(markers), 1)
    _, latent = model.forward_layers(joint, latent, prefix, full_block_attention, range(1))
    d = dims(config) | {"layers": 1}
    cache = ref.prefill(sd, ids, **dims(config))[:1]
    # the reference applies the final norm and head; do the same to our one-layer output
    expected = ref.block_velocity(sd, cache, len(ids), x_t, 0.3, pos_ids, markers, **d)
    assert rel_err(model.velocity(latent)[0], expected) < 1e-6


def test_batched_branches_match_one_forward_per_branch(setup):
    config, model, _, tok = setup
    ids = tok.encode_prompt("a lighthouse")
    cond, uncond = model.prefill([ids, []])
    contexts = {Branch.COND: cond, Branch.UNCOND_TEXT: uncond}
    pos_ids = latent_position_ids(4, 4, config.max_latent_size)
    markers = (tok.start_of_image, tok.end_of_image)
    x = torch.randn(16, config.patch_dim, dtype=torch.float64)
    t = torch.tensor(0.9, dtype=torch.float64)
    batched = BlockVelocity(model, contexts, pos_ids, markers, batch_branches=True)(
        x, t, [Branch.COND, Branch.UNCOND_TEXT]
    )
    single = BlockVelocity(model, contexts, pos_ids, markers, batch_branches=False)(
        x, t, [Branch.COND, Branch.UNCOND_TEXT]
    )
    for b in contexts:
        assert rel_err(batched[b], single[b]) < 1e-6
    assert rel_err(batched[Branch.COND], batched[Branch.UNCOND_TEXT]) > 1e-3  # the prefix matters


def test_prefixes_of_unequal_length_are_padded_and_remember_their_lengths():
    k = torch.randn(3, 2, 4)
    short = ContextKV([k], [k.clone()], 3)
    empty = ContextKV([k[:0]], [k[:0]], 0)
    prefix = BranchPrefix.from_contexts([short, empty])
    assert prefix.keys[0].shape == (2, 3, 2, 4)
    assert prefix.lengths == (3, 0) and prefix.ragged
    assert torch.equal(prefix.keys[0][1], torch.zeros(3, 2, 4))
    assert prefix.positions.tolist() == [3, 0]


def test_patchify_order_is_p_q_c_and_round_trips():
    z = torch.arange(16 * 4 * 6, dtype=torch.float32).reshape(16, 4, 6)
    tokens = patchify(z, 2)
    assert tokens.shape == (6, 64)
    # token (row 0, col 1): feature index (p*2 + q)*16 + c holds z[c, p, 2 + q]
    for p in range(2):
        for q in range(2):
            for c in (0, 15):
                assert tokens[1, (p * 2 + q) * 16 + c] == z[c, p, 2 + q]
    assert torch.equal(unpatchify(tokens, 2, 3, 2), z)


def test_forward_graphs_reuse_their_buffers_for_a_new_request_of_the_same_shapes(setup):
    """A kept capture replays on its own copies of the prefix: a second request with other KV
    (same shapes) must get its own answer, not the first request's."""
    config, model, _, tok = setup
    pos_ids = latent_position_ids(2, 3, config.max_latent_size)
    markers = (tok.start_of_image, tok.end_of_image)
    x = torch.randn(6, config.patch_dim, dtype=torch.float64)
    t = torch.tensor(0.8, dtype=torch.float64)
    graphs = ForwardGraphs()
    for prompt in ("a red car", "a big dog"):  # same token count, different KV
        contexts = dict(
            zip(
                (Branch.COND, Branch.UNCOND_TEXT),
                model.prefill([tok.encode_prompt(prompt), []]),
                strict=True,
            )
        )
        kept = BlockVelocity(model, contexts, pos_ids, markers, graphs=graphs)(
            x, t, [Branch.COND, Branch.UNCOND_TEXT]
        )
        fresh = BlockVelocity(model, contexts, pos_ids, markers)(
            x, t, [Branch.COND, Branch.UNCOND_TEXT]
        )
        for b in fresh:
            assert torch.equal(kept[b], fresh[b])
    assert len(graphs._entries) == 1


def test_add_linear_folds_the_residual_into_the_matmul_and_equals_the_separate_add():
    from torch import nn

    from bagel.network.layers import add_linear

    torch.manual_seed(0)
    x, residual = (
        torch.randn(2, 5, 8, dtype=torch.float64),
        torch.randn(2, 5, 6, dtype=torch.float64),
    )
    plain = nn.Linear(8, 6, bias=False).double()
    torch.testing.assert_close(add_linear(residual, plain, x), residual + plain(x))
    # Non-contiguous rows (a slice of a longer sequence, as an attention output's latent rows).
    wide = torch.randn(2, 7, 8, dtype=torch.float64)
    torch.testing.assert_close(
        add_linear(residual, plain, wide[:, 2:]), residual + plain(wide[:, 2:])
    )
    biased = nn.Linear(8, 6).double()  # falls back to the separate add, bias included
    torch.testing.assert_close(add_linear(residual, biased, x), residual + biased(x))


def test_packed_qkv_equals_the_three_projections_and_holds_no_weight_twice():
    from bagel.network.config import LLMConfig
    from bagel.network.layers import rope_cos_sin
    from bagel.network.model import UND, MoTAttention

    torch.manual_seed(0)
    cfg = LLMConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4,
        num_kv_heads=2,
    )  # fmt: skip
    attention = MoTAttention(cfg, with_gen=False).requires_grad_(False)
    before = {k: v.clone() for k, v in attention.state_dict().items()}
    x = torch.randn(3, 1, cfg.hidden_size)
    cos, sin = rope_cos_sin(torch.tensor([5, 9, 2]), cfg.head_dim, cfg.rope_theta)
    cos, sin = cos[:, None, None, :], sin[:, None, None, :]
    separate = attention.qkv(x, cos, sin, UND)
    packed = attention.packed_qkv(x, cos, sin, UND)
    for a, b in zip(separate, packed, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    weight, bias = attention.packed_qkv_weights(UND)
    # The linears now view the packed tensors: same values, one storage.
    after = attention.state_dict()
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value), name
    for name in ("q_proj", "k_proj", "v_proj"):
        linear = getattr(attention, name)
        assert linear.weight.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr()
        assert linear.bias.untyped_storage().data_ptr() == bias.untyped_storage().data_ptr()
    assert attention.packed_qkv_weights(UND)[0] is weight  # packed once


def test_packed_gate_up_equals_the_two_projections_and_holds_no_weight_twice():
    from bagel.network.layers import SwiGLU

    torch.manual_seed(0)
    mlp = SwiGLU(64, 96).requires_grad_(False)
    before = {k: v.clone() for k, v in mlp.state_dict().items()}
    x = torch.randn(3, 1, 64)
    separate = mlp.activation(x)
    residual = torch.randn(3, 1, 64)
    torch.testing.assert_close(mlp.activation(x, packed=True), separate, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        mlp.add_to(residual, x, packed=True), mlp.add_to(residual, x), rtol=1e-6, atol=1e-6
    )
    packed = mlp.packed_gate_up()
    assert packed.shape == (2 * 96, 64)
    after = mlp.state_dict()
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value), name
    for linear in (mlp.gate_proj, mlp.up_proj):
        assert linear.weight.untyped_storage().data_ptr() == packed.untyped_storage().data_ptr()
    assert mlp.packed_gate_up() is packed  # packed once
    # Gate first, then up: swapped halves would give another activation.
    gate, up = (x @ packed.t()).chunk(2, dim=-1)
    torch.testing.assert_close(separate, torch.nn.functional.silu(gate) * up)
    assert not torch.allclose(separate, torch.nn.functional.silu(up) * gate)
