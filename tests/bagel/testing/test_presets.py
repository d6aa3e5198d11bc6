"""The 7b preset describes the published BAGEL-7B-MoT checkpoint key for key (checked without
writing its 29 GB), and the random-checkpoint writer streams files that every loader reads."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from bagel.checkpoints.checkpoint import (
    VIT_PREFIXES,
    ema_keys_for,
    load_autoencoder,
    load_bagel,
    load_vit,
)
from bagel.network.autoencoder import AutoEncoderParams
from bagel.network.config import BAGEL_7B_LLM, BagelConfig, LLMConfig
from bagel.network.model import Bagel
from bagel.network.vit import ImageContextEncoder, ViTConfig
from bagel.pipeline import Pipeline
from bagel.testing import tiny
from bagel.testing.presets import (
    BAGEL_7B_VIT,
    LM_HEAD,
    CheckpointShape,
    TensorSpec,
    ema_specs,
    llm_config_json,
    sincos_position_table,
    vit_config_json,
    write_random_checkpoint,
    write_streamed,
)
from serving.params import GenerationParams

# Shapes of the published ema.safetensors (shared/reference/bagel_model.md, section 1).
PUBLISHED_SHAPES = {
    "language_model.model.embed_tokens.weight": (152064, 3584),
    "language_model.lm_head.weight": (152064, 3584),
    "language_model.model.norm.weight": (3584,),
    "language_model.model.norm_moe_gen.weight": (3584,),
    "language_model.model.layers.27.self_attn.q_proj.weight": (3584, 3584),
    "language_model.model.layers.27.self_attn.k_proj.weight": (512, 3584),
    "language_model.model.layers.27.self_attn.v_proj_moe_gen.bias": (512,),
    "language_model.model.layers.27.self_attn.q_norm_moe_gen.weight": (128,),
    "language_model.model.layers.0.mlp_moe_gen.down_proj.weight": (3584, 18944),
    "language_model.model.layers.0.mlp.gate_proj.weight": (18944, 3584),
    "time_embedder.mlp.0.weight": (3584, 256),
    "time_embedder.mlp.2.weight": (3584, 3584),
    "vae2llm.weight": (3584, 64),
    "llm2vae.weight": (64, 3584),
    "latent_pos_embed.pos_embed": (4096, 3584),
    "vit_pos_embed.pos_embed": (4900, 3584),
    "connector.fc1.weight": (3584, 1152),
    "connector.fc2.weight": (3584, 3584),
    "vit_model.vision_model.embeddings.patch_embedding.weight": (1152, 588),
    "vit_model.vision_model.embeddings.position_embedding.weight": (4900, 1152),
    "vit_model.vision_model.encoder.layers.25.mlp.fc1.weight": (4304, 1152),
    "vit_model.vision_model.post_layernorm.bias": (1152,),
}


def shapes_of(module: torch.nn.Module, wanted=lambda key: True) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items() if wanted(k)}


def test_7b_preset_has_the_published_shapes_and_size():
    specs = {s.name: s.shape for s in ema_specs(CheckpointShape.bagel_7b())}
    for key, shape in PUBLISHED_SHAPES.items():
        assert specs[key] == shape, key
    assert not any(".layers.28." in k for k in specs)  # 28 decoder layers, 0-27
    assert not any("encoder.layers.26." in k for k in specs)  # BAGEL's ViT keeps layers 0-25
    params = sum(math.prod(s) for s in specs.values())
    assert round(params / 1e9, 3) == 14.607  # 29.2 GB in bf16, as published


def test_7b_configs_are_the_published_values():
    llm = llm_config_json(BAGEL_7B_LLM)
    assert llm["hidden_size"] == 3584 and llm["num_hidden_layers"] == 28
    assert llm["num_attention_heads"] == 28 and llm["num_key_value_heads"] == 4
    assert llm["intermediate_size"] == 18944 and llm["vocab_size"] == 152064
    assert llm["rope_theta"] == 1e6 and llm["rms_norm_eps"] == 1e-6
    assert llm["max_position_embeddings"] == 32768 and llm["rope_scaling"] is None
    assert llm["tie_word_embeddings"] is False
    assert LLMConfig.from_qwen2_json(llm) == BAGEL_7B_LLM
    assert LLMConfig.from_qwen2_json(llm).head_dim == 128
    vit = vit_config_json(BAGEL_7B_VIT)
    assert vit["num_hidden_layers"] == 27  # the file's count; BAGEL drops the last layer
    assert (vit["hidden_size"], vit["intermediate_size"], vit["num_attention_heads"]) == (
        1152,
        4304,
        16,
    )
    assert (vit["patch_size"], vit["image_size"]) == (14, 980)
    assert ViTConfig.from_siglip_json(vit) == BAGEL_7B_VIT


def test_7b_ema_keys_are_exactly_what_the_loaders_read():
    """Each loader's module, built from the config files the preset writes, finds every key it
    expects with its shape; and no key of the file is read by none of them but the LM head."""
    shape = CheckpointShape.bagel_7b()
    specs = {s.name: s.shape for s in ema_specs(shape)}
    llm = LLMConfig.from_qwen2_json(llm_config_json(shape.config.llm))
    vit = ViTConfig.from_siglip_json(vit_config_json(shape.vit))
    config = BagelConfig(llm=llm)
    read: set[str] = set()
    with torch.device("meta"):
        loaders = {
            "diffusion": (Bagel(config, with_gen=True), ema_keys_for("diffusion")),
            "prefill": (Bagel(config, with_gen=False), ema_keys_for("prefill")),
            "vit": (
                ImageContextEncoder(vit, llm.hidden_size),
                lambda k: k.startswith(VIT_PREFIXES),
            ),
        }
    for role, (module, wanted) in loaders.items():
        expected = shapes_of(module)
        in_file = {k: s for k, s in specs.items() if wanted(k)}
        assert in_file == expected, role
        read |= expected.keys()
    assert specs.keys() - read == {LM_HEAD}


def small_shape() -> CheckpointShape:
    """BAGEL's structure at a few MB: both experts, GQA, the ViT, a narrow FLUX VAE."""
    llm = LLMConfig(
        vocab_size=512,  # the tiny tokenizer's ids
        hidden_size=64,
        intermediate_size=96,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
    )
    vit = ViTConfig(hidden_size=32, intermediate_size=48, num_heads=2, num_layers=2)
    return CheckpointShape(BagelConfig(llm=llm, vae=AutoEncoderParams(ch=32)), vit)


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("small-random")
    # A budget below most tensors' size: each waits alone, still in order.
    write_random_checkpoint(directory, small_shape(), seed=3, workers=3, budget_bytes=1024)
    return directory


def test_random_checkpoint_loads_in_every_role_and_generates_finite_images(small_dir: Path):
    shape = small_shape()
    assert BagelConfig.from_dir(small_dir) == shape.config
    load_bagel(small_dir, "prefill", torch.bfloat16)
    load_vit(small_dir, torch.bfloat16)
    assert load_autoencoder(small_dir).params == shape.config.vae
    params = GenerationParams(height=32, width=32, num_timesteps=3, seed=1)
    generated = Pipeline(small_dir, "cpu", dtype=torch.bfloat16).generate("A cute cat", params)
    assert torch.isfinite(generated.latents).all()
    assert np.asarray(generated.image).std() > 0


def test_random_weights_are_scaled_per_module_kind(small_dir: Path):
    ema = load_file(small_dir / "ema.safetensors")
    layer = "language_model.model.layers.1."
    assert (ema[layer + "input_layernorm_moe_gen.weight"] == 1).all()
    assert (ema[layer + "self_attn.k_norm.weight"] == 1).all()
    assert (ema["vit_model.vision_model.encoder.layers.0.layer_norm1.bias"] == 0).all()
    assert torch.equal(
        ema["latent_pos_embed.pos_embed"], sincos_position_table(64, 64).to(torch.bfloat16)
    )
    assert torch.equal(
        ema["vit_pos_embed.pos_embed"], sincos_position_table(70, 64).to(torch.bfloat16)
    )
    gate = ema[layer + "mlp_moe_gen.gate_proj.weight"].float()
    down = ema[layer + "mlp_moe_gen.down_proj.weight"].float()
    assert gate.std().item() == pytest.approx(64**-0.5, rel=0.1)  # 1/sqrt(fan_in)
    # a residual writer: 1/sqrt(fan_in) / sqrt(2 * layers)
    assert down.std().item() == pytest.approx(96**-0.5 / 2, rel=0.1)


def test_values_depend_on_seed_and_key_not_on_threads_or_budget(tmp_path: Path, small_dir: Path):
    shape = small_shape()
    write_random_checkpoint(tmp_path / "one", shape, seed=3, workers=1)
    assert (tmp_path / "one" / "ema.safetensors").read_bytes() == (
        small_dir / "ema.safetensors"
    ).read_bytes()
    assert (tmp_path / "one" / "ae.safetensors").read_bytes() == (
        small_dir / "ae.safetensors"
    ).read_bytes()
    write_random_checkpoint(tmp_path / "other", shape, seed=4, workers=2)
    with (
        safe_open(str(tmp_path / "other" / "ema.safetensors"), "pt") as a,
        safe_open(str(small_dir / "ema.safetensors"), "pt") as b,
    ):
        key = "language_model.model.embed_tokens.weight"
        assert not torch.equal(a.get_tensor(key), b.get_tensor(key))


def test_streamed_file_is_byte_identical_to_save_file(tmp_path: Path):
    generator = torch.Generator().manual_seed(0)
    tensors = {
        name: torch.randn(shape, generator=generator).to(torch.bfloat16)
        for name, shape in [("b.weight", (3, 5)), ("a.bias", (7,)), ("c", (2, 2, 2))]
    }
    save_file(tensors, tmp_path / "reference.safetensors")
    specs = sorted(
        (TensorSpec(k, tuple(v.shape), "zeros") for k, v in tensors.items()),
        key=lambda s: s.name,
    )
    write_streamed(
        tmp_path / "streamed.safetensors",
        specs,
        lambda spec: tensors[spec.name],
        workers=2,
        budget_bytes=16,
    )
    assert (tmp_path / "streamed.safetensors").read_bytes() == (
        tmp_path / "reference.safetensors"
    ).read_bytes()
    assert not (tmp_path / "streamed.safetensors.partial").exists()


def test_a_failed_draw_leaves_no_checkpoint_file(tmp_path: Path):
    def fail(spec: TensorSpec) -> torch.Tensor:
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        write_streamed(
            tmp_path / "ema.safetensors", [TensorSpec("x", (4,), "zeros")], fail, workers=1
        )
    assert not list(tmp_path.iterdir())  # neither the file nor its partial copy


def test_tiny_flags_are_refused_with_the_tiny_preset(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bagel.testing.tiny", "out", "--layers", "1"])
    with pytest.raises(SystemExit) as exit_info:
        tiny.main()
    assert exit_info.value.code == 2
    assert "--preset 7b only" in capsys.readouterr().err
