"""The tiny checkpoint has the published layout, and loading reports every fault by name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from bagel.checkpoints.checkpoint import CheckpointError, load_autoencoder, load_bagel
from bagel.network.config import BAGEL_7B, BagelConfig
from bagel.network.model import Bagel

# The published ema.safetensors layout, per layer (prefix language_model.model.layers.{i}.).
LAYER_KEYS = [
    "self_attn.q_proj.weight", "self_attn.q_proj.bias",
    "self_attn.k_proj.weight", "self_attn.k_proj.bias",
    "self_attn.v_proj.weight", "self_attn.v_proj.bias",
    "self_attn.o_proj.weight",
    "self_attn.q_norm.weight", "self_attn.k_norm.weight",
    "self_attn.q_proj_moe_gen.weight", "self_attn.q_proj_moe_gen.bias",
    "self_attn.k_proj_moe_gen.weight", "self_attn.k_proj_moe_gen.bias",
    "self_attn.v_proj_moe_gen.weight", "self_attn.v_proj_moe_gen.bias",
    "self_attn.o_proj_moe_gen.weight",
    "self_attn.q_norm_moe_gen.weight", "self_attn.k_norm_moe_gen.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
    "mlp_moe_gen.gate_proj.weight", "mlp_moe_gen.up_proj.weight", "mlp_moe_gen.down_proj.weight",
    "input_layernorm.weight", "post_attention_layernorm.weight",
    "input_layernorm_moe_gen.weight", "post_attention_layernorm_moe_gen.weight",
]  # fmt: skip
MODEL_KEYS = [
    "language_model.model.embed_tokens.weight",
    "language_model.model.norm.weight",
    "language_model.model.norm_moe_gen.weight",
    "language_model.lm_head.weight",
    "time_embedder.mlp.0.weight", "time_embedder.mlp.0.bias",
    "time_embedder.mlp.2.weight", "time_embedder.mlp.2.bias",
    "vae2llm.weight", "vae2llm.bias",
    "llm2vae.weight", "llm2vae.bias",
    "latent_pos_embed.pos_embed",
]  # fmt: skip
SKIPPED_PREFIXES = ("vit_model.", "connector.", "vit_pos_embed.")


def real_layout(num_layers: int) -> set[str]:
    keys = set(MODEL_KEYS)
    for i in range(num_layers):
        keys |= {f"language_model.model.layers.{i}.{k}" for k in LAYER_KEYS}
    return keys


def test_tiny_checkpoint_has_the_published_files_and_key_names(tiny_model_dir: Path):
    for name in ("llm_config.json", "vit_config.json", "ema.safetensors", "ae.safetensors"):
        assert (tiny_model_dir / name).is_file(), name
    llm = json.loads((tiny_model_dir / "llm_config.json").read_text())
    with safe_open(str(tiny_model_dir / "ema.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("vae2llm.weight").dtype == torch.bfloat16
        assert f.get_slice("latent_pos_embed.pos_embed").get_shape() == [4096, llm["hidden_size"]]
        assert f.get_slice("vae2llm.weight").get_shape() == [llm["hidden_size"], 64]
        assert f.get_slice("llm2vae.weight").get_shape() == [64, llm["hidden_size"]]
        assert f.get_slice("time_embedder.mlp.0.weight").get_shape() == [llm["hidden_size"], 256]
    llm_keys = {k for k in keys if not k.startswith(SKIPPED_PREFIXES)}
    assert llm_keys == real_layout(llm["num_hidden_layers"])
    for prefix in SKIPPED_PREFIXES:
        assert any(k.startswith(prefix) for k in keys), f"no {prefix}* keys, unlike the real file"


def test_full_bagel_7b_config_builds_on_meta_with_13_6b_text_to_image_parameters():
    with torch.device("meta"):
        model = Bagel(BAGEL_7B, with_gen=True)
    count = sum(p.numel() for p in model.parameters())
    assert 13.5e9 < count < 13.7e9, count
    assert all(p.device.type == "meta" for p in model.parameters())
    keys = set(model.state_dict())
    assert keys == real_layout(28) - {"language_model.lm_head.weight"}
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    p = "language_model.model.layers.0."
    assert shapes[p + "self_attn.q_proj.weight"] == (3584, 3584)
    assert shapes[p + "self_attn.k_proj_moe_gen.weight"] == (512, 3584)
    assert shapes[p + "self_attn.q_norm.weight"] == (128,)
    assert shapes[p + "mlp_moe_gen.down_proj.weight"] == (3584, 18944)
    assert shapes["latent_pos_embed.pos_embed"] == (4096, 3584)


def test_prefill_role_reads_no_generation_weights(tiny_model_dir: Path):
    model = load_bagel(tiny_model_dir, "prefill")
    names = set(model.state_dict())
    assert not any("_moe_gen" in n for n in names)
    assert not any(n.startswith(("vae2llm", "time_embedder", "latent_pos_embed")) for n in names)


def _tampered_copy(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    state = load_file(str(dst / "ema.safetensors"))
    edit(state)
    save_file(state, str(dst / "ema.safetensors"))
    return dst


def test_missing_key_is_named(tiny_model_dir: Path, tmp_path: Path):
    key = "language_model.model.layers.2.mlp_moe_gen.up_proj.weight"
    bad = _tampered_copy(tiny_model_dir, tmp_path / "m", lambda s: s.pop(key))
    with pytest.raises(CheckpointError, match=rf"missing key: {key}"):
        load_bagel(bad, "diffusion")


def test_unexpected_key_is_named(tiny_model_dir: Path, tmp_path: Path):
    key = "language_model.model.layers.1.self_attn.extra_proj.weight"
    bad = _tampered_copy(tiny_model_dir, tmp_path / "u", lambda s: s.update({key: torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=rf"unexpected key: {key}"):
        load_bagel(bad, "prefill")


def test_wrong_shape_is_named_with_both_shapes(tiny_model_dir: Path, tmp_path: Path):
    key = "vae2llm.weight"
    bad = _tampered_copy(
        tiny_model_dir, tmp_path / "s", lambda s: s.update({key: torch.zeros(3, 5)})
    )
    with pytest.raises(
        CheckpointError, match=r"wrong shape: vae2llm.weight: file \[3, 5\], model \[128, 64\]"
    ):
        load_bagel(bad, "diffusion")


def test_all_faults_are_listed_in_one_error(tiny_model_dir: Path, tmp_path: Path):
    def edit(s):
        s.pop("llm2vae.bias")
        s["time_embedder.extra"] = torch.zeros(1)

    bad = _tampered_copy(tiny_model_dir, tmp_path / "all", edit)
    with pytest.raises(CheckpointError) as err:
        load_bagel(bad, "diffusion")
    assert "missing key: llm2vae.bias" in str(err.value)
    assert "unexpected key: time_embedder.extra" in str(err.value)


def test_loading_converts_to_the_requested_dtype(tiny_model_dir: Path):
    model = load_bagel(tiny_model_dir, "diffusion", dtype=torch.float32)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    ae = load_autoencoder(tiny_model_dir, dtype=torch.float32)
    assert ae.params.ch == 32


def test_fingerprint_is_stable_and_shape_sensitive(tiny_model_dir: Path):
    a = BagelConfig.from_dir(tiny_model_dir)
    b = BagelConfig.from_dir(tiny_model_dir)
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != BAGEL_7B.fingerprint()


def test_an_unreadable_checkpoint_says_so_not_file_not_found(tiny_model_dir: Path, monkeypatch):
    import bagel.checkpoints.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint.os, "access", lambda path, mode: False)
    with pytest.raises(PermissionError, match="ema.safetensors is not readable by this user"):
        load_bagel(tiny_model_dir, "prefill")


def test_token_rows_keep_only_the_marker_rows_and_embed_them_as_the_full_table(
    tiny_model_dir: Path,
):
    from bagel.network.layers import TokenRows
    from bagel.text.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    markers = (tokenizer.start_of_image, tokenizer.end_of_image)
    full = load_bagel(tiny_model_dir, "diffusion", dtype=torch.float32)
    small = load_bagel(tiny_model_dir, "diffusion", dtype=torch.float32, token_rows=markers)
    rows = small.language_model.model.embed_tokens
    assert isinstance(rows, TokenRows)
    assert rows.weight.shape == (2, full.config.llm.hidden_size)
    ids = torch.tensor([markers[1], markers[0], markers[1]])
    assert torch.equal(rows(ids), full.language_model.model.embed_tokens(ids))
    # Everything else is the same model.
    others = {k: v for k, v in full.state_dict().items() if "embed_tokens" not in k}
    assert others.keys() == {k for k in small.state_dict() if "embed_tokens" not in k}
    for name, tensor in others.items():
        assert torch.equal(small.state_dict()[name], tensor), name


def test_a_generation_forward_refuses_markers_the_token_rows_do_not_hold(tiny_model_dir: Path):
    from bagel.diffusion.generation import BlockVelocity
    from bagel.network.latents import latent_position_ids

    model = load_bagel(tiny_model_dir, "diffusion", dtype=torch.float32, token_rows=(5, 6))
    pos_ids = latent_position_ids(2, 2, model.config.max_latent_size)
    with pytest.raises(ValueError, match=r"marker ids \(5, 7\) are not among"):
        BlockVelocity(model, {}, pos_ids, (5, 7))
    with pytest.raises(ValueError, match="not rows of a"):
        load_bagel(tiny_model_dir, "diffusion", token_rows=(10**9,))
