"""The image-context encoder equals transformers' SigLIP where NaViT reduces to it and an fp64
re-derivation elsewhere; `load_vit` reads the published keys; the input transforms follow the
reference's resize rule and NaViT position ids."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from bagel.checkpoints.checkpoint import CheckpointError, load_vit
from bagel.network.vit import ImageContextEncoder, SiglipNaViT, ViTConfig
from bagel.prompting.image_transforms import (
    VAE_RESIZE,
    VIT_RESIZE,
    ResizeRule,
    edit_inputs,
    navit_position_ids,
    patchify_vit,
    resize,
    resized_size,
    to_tensor,
)
from bagel.testing.tiny import sincos_position_table

# A small tower whose position grid is 6 x 6 patches (84 px at patch 14).
SMALL = ViTConfig(
    hidden_size=48, intermediate_size=96, num_heads=4, num_layers=3, patch_size=14, image_size=84
)
LLM_HIDDEN = 64


def _randomise(module: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            # LayerNorm weights near 1, everything else small but not tiny.
            param.copy_(1.0 + 0.1 * noise if "norm" in name and "weight" in name else 0.2 * noise)


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.abs().max()).item()


def _hf_siglip_with_weights_of(vit: SiglipNaViT):
    transformers = pytest.importorskip("transformers")
    cfg = vit.cfg
    hf_config = transformers.SiglipVisionConfig(
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_channels=cfg.num_channels,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=cfg.layer_norm_eps,
        vision_use_head=False,
    )
    hf_config._attn_implementation = "eager"
    hf = transformers.SiglipVisionModel(hf_config).eval()
    # transformers 5 drops the `vision_model.` level that 4.x (and BAGEL's file) has.
    hf_keys = set(hf.state_dict())
    prefix = "" if "embeddings.patch_embedding.weight" in hf_keys else "vision_model."
    state = {prefix + k: v.clone() for k, v in vit.state_dict().items()}
    # The checkpoint's Linear over (p, q, c) patches is SigLIP's conv with its weight permuted.
    p, c = cfg.patch_size, cfg.num_channels
    key = prefix + "embeddings.patch_embedding.weight"
    state[key] = state[key].reshape(cfg.hidden_size, p, p, c).permute(0, 3, 1, 2)
    assert set(state) <= hf_keys, sorted(set(state) - hf_keys)
    missing = {k for k in hf_keys - set(state) if "position_ids" not in k}
    assert not missing, sorted(missing)
    hf.load_state_dict(state, strict=False)
    return hf


def test_vit_equals_transformers_siglip_when_the_image_fills_the_position_grid():
    vit = SiglipNaViT(SMALL).eval()
    _randomise(vit, seed=1)
    hf = _hf_siglip_with_weights_of(vit)
    image = torch.rand(
        3, SMALL.image_size, SMALL.image_size, generator=torch.Generator().manual_seed(2)
    )
    image = image * 2 - 1
    patches, ids = patchify_vit(image, SMALL.patch_size, SMALL.max_patches_per_side)
    # Full grid: NaViT's ids are 0..N-1, exactly SigLIP's position ids.
    assert torch.equal(ids, torch.arange(SMALL.max_patches_per_side**2))
    with torch.no_grad():
        ours = vit(patches, ids)
        theirs = hf(pixel_values=image[None]).last_hidden_state[0]
    assert ours.shape == theirs.shape == (36, SMALL.hidden_size)
    assert _relative_error(ours, theirs) < 1e-5


def _fp64_image_tokens(
    state: dict[str, torch.Tensor], cfg: ViTConfig, image: torch.Tensor
) -> torch.Tensor:
    """BAGEL's ViT context tokens from the published description, in fp64, written with none of
    `bagel.network.vit`: a stride-p convolution for the patch embedding, explicit loops for
    positions, explicit softmax attention, LayerNorm and tanh-GELU by formula."""
    w = {k: v.double() for k, v in state.items()}
    x_img = image.double()
    p, c, hidden = cfg.patch_size, cfg.num_channels, cfg.hidden_size
    pre = "vit_model.vision_model."

    def layer_norm(x, name):
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + cfg.layer_norm_eps) * w[name + ".weight"] + w[
            name + ".bias"
        ]

    def linear(x, name):
        return x @ w[name + ".weight"].T + w[name + ".bias"]

    def gelu_tanh(x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))

    conv_weight = w[pre + "embeddings.patch_embedding.weight"].reshape(hidden, p, p, c)
    conv = torch.nn.functional.conv2d(
        x_img[None],
        conv_weight.permute(0, 3, 1, 2),
        w[pre + "embeddings.patch_embedding.bias"],
        stride=p,
    )[0]  # [hidden, rows, cols]
    rows, cols = conv.shape[1:]
    ids = [r * cfg.max_patches_per_side + q for r in range(rows) for q in range(cols)]
    x = conv.reshape(hidden, -1).T + w[pre + "embeddings.position_embedding.weight"][ids]

    heads, d = cfg.num_heads, cfg.head_dim
    for i in range(cfg.num_layers):
        lp = f"{pre}encoder.layers.{i}."
        h = layer_norm(x, lp + "layer_norm1")
        q, k, v = (
            linear(h, lp + f"self_attn.{n}_proj").reshape(-1, heads, d).transpose(0, 1)
            for n in ("q", "k", "v")
        )
        attn = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d), dim=-1) @ v
        x = x + linear(attn.transpose(0, 1).reshape(-1, hidden), lp + "self_attn.out_proj")
        h = layer_norm(x, lp + "layer_norm2")
        x = x + linear(gelu_tanh(linear(h, lp + "mlp.fc1")), lp + "mlp.fc2")
    x = layer_norm(x, pre + "post_layernorm")
    x = linear(gelu_tanh(linear(x, "connector.fc1")), "connector.fc2")
    return x + w["vit_pos_embed.pos_embed"][ids]


def test_image_context_tokens_match_fp64_for_a_non_square_image():
    encoder = ImageContextEncoder(SMALL, LLM_HIDDEN).eval()
    _randomise(encoder, seed=3)
    encoder.vit_pos_embed.pos_embed.data = sincos_position_table(
        SMALL.max_patches_per_side, LLM_HIDDEN
    )
    # 3 x 5 patches: ids skip across rows of the 6-wide grid, so this is not plain SigLIP.
    image = torch.rand(3, 3 * 14, 5 * 14, generator=torch.Generator().manual_seed(4)) * 2 - 1
    patches, ids = patchify_vit(image, SMALL.patch_size, SMALL.max_patches_per_side)
    with torch.no_grad():
        ours = encoder(patches, ids)
    expected = _fp64_image_tokens(encoder.state_dict(), SMALL, image)
    assert ours.dtype == torch.float32 and ours.shape == (15, LLM_HIDDEN)
    assert _relative_error(ours, expected) < 1e-5


def test_bagel_vit_config_drops_the_last_layer_of_the_json():
    so400m = {
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_attention_heads": 16,
        "num_hidden_layers": 27,
        "patch_size": 14,
        "image_size": 980,
    }
    cfg = ViTConfig.from_siglip_json(so400m)
    assert cfg.num_layers == 26
    assert cfg.max_patches_per_side == 70 and cfg.patch_dim == 588 and cfg.head_dim == 72
    with torch.device("meta"):
        encoder = ImageContextEncoder(cfg, 3584)
    shapes = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    assert shapes["vit_model.vision_model.embeddings.patch_embedding.weight"] == (1152, 588)
    assert shapes["vit_model.vision_model.embeddings.position_embedding.weight"] == (4900, 1152)
    assert shapes["connector.fc1.weight"] == (3584, 1152)
    assert shapes["connector.fc2.weight"] == (3584, 3584)
    assert shapes["vit_pos_embed.pos_embed"] == (4900, 3584)
    assert "vit_model.vision_model.encoder.layers.25.mlp.fc2.bias" in shapes
    assert "vit_model.vision_model.encoder.layers.26.mlp.fc2.bias" not in shapes


def test_load_vit_reads_the_tiny_checkpoint(tiny_model_dir: Path):
    encoder = load_vit(tiny_model_dir)
    assert encoder.cfg.num_layers == 1  # vit_config.json claims 2, as the real file claims 27
    file = load_file(str(tiny_model_dir / "ema.safetensors"))
    for name, tensor in encoder.state_dict().items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, file[name].float()), name
    image = to_tensor(Image.new("RGB", (28, 42), (200, 30, 90)))
    patches, ids = patchify_vit(image)
    with torch.no_grad():
        tokens = encoder(patches, ids)
    assert tokens.shape == (6, 128) and torch.isfinite(tokens).all()


def test_load_vit_names_every_bad_key_at_once(tiny_model_dir: Path, tmp_path: Path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_model_dir, bad)
    state = load_file(str(bad / "ema.safetensors"))
    state.pop("connector.fc2.bias")
    state["vit_model.vision_model.encoder.layers.1.mlp.fc1.bias"] = torch.zeros(64)
    state["vit_pos_embed.pos_embed"] = torch.zeros(3, 5)
    save_file(state, bad / "ema.safetensors")
    with pytest.raises(CheckpointError) as err:
        load_vit(bad)
    message = str(err.value)
    assert "missing key: connector.fc2.bias" in message
    assert "unexpected key: vit_model.vision_model.encoder.layers.1.mlp.fc1.bias" in message
    assert "wrong shape: vit_pos_embed.pos_embed: file [3, 5], model [4900, 128]" in message


@pytest.mark.parametrize(
    ("rule", "size", "expected"),
    [
        # Small: scaled up until the shortest side reaches the minimum.
        (VAE_RESIZE, (300, 200), (768, 512)),
        (VIT_RESIZE, (300, 200), (336, 224)),
        # Large: scaled down until the longest side fits.
        (VAE_RESIZE, (2000, 1000), (1024, 512)),
        (VIT_RESIZE, (2000, 1000), (980, 490)),
        (VAE_RESIZE, (1024, 1024), (1024, 1024)),
        (VIT_RESIZE, (1024, 1024), (980, 980)),
        # Rounded to the stride: 768/14 = 54.9 -> 55, 512/14 = 36.6 -> 37.
        (VIT_RESIZE, (768, 512), (770, 518)),
        # Elongated: the pixel budget, then the max side, win over the min side; 220.5 rounds
        # half to even as in the reference.
        (VAE_RESIZE, (4000, 100), (1024, 32)),
    ],
)
def test_resized_size_follows_the_reference_rule(rule: ResizeRule, size, expected):
    assert resized_size(*size, rule) == expected


@pytest.mark.parametrize("rule", [VAE_RESIZE, VIT_RESIZE])
def test_resized_sides_are_stride_multiples_within_bounds(rule: ResizeRule):
    for width in (17, 200, 513, 999, 1500, 3000):
        for height in (31, 250, 640, 1024, 2100):
            w, h = resized_size(width, height, rule)
            assert w % rule.stride == 0 and h % rule.stride == 0
            assert max(w, h) <= rule.max_size and w * h <= rule.max_pixels
            if max(width, height) <= 2 * min(width, height):
                assert min(w, h) >= rule.min_size


def test_edit_inputs_resize_for_the_vae_then_for_the_vit():
    image = Image.new("RGBA", (300, 200), (255, 0, 0, 0))  # fully transparent: white
    vae, vit = edit_inputs(image)
    assert vae.shape == (3, 512, 768) and vit.shape == (3, 518, 770)
    assert torch.allclose(vae, torch.ones_like(vae)) and torch.allclose(vit, torch.ones_like(vit))
    assert resize(Image.new("RGB", (1024, 1024)), VAE_RESIZE).size == (1024, 1024)


def test_to_tensor_maps_pixels_to_minus_one_one():
    image = Image.new("RGB", (2, 1))
    image.putpixel((0, 0), (0, 255, 51))
    image.putpixel((1, 0), (255, 0, 204))
    tensor = to_tensor(image)
    expected = torch.tensor([[[-1.0, 1.0]], [[1.0, -1.0]], [[-0.6, 0.6]]])
    assert tensor.shape == (3, 1, 2) and torch.allclose(tensor, expected)


def test_navit_position_ids_of_a_small_grid():
    assert navit_position_ids(2, 3).tolist() == [0, 1, 2, 70, 71, 72]
    assert navit_position_ids(3, 2, max_per_side=4).tolist() == [0, 1, 4, 5, 8, 9]
    with pytest.raises(ValueError):
        navit_position_ids(71, 1)


def test_patchify_vit_orders_patches_row_major_with_p_q_c_features():
    image = torch.arange(3 * 28 * 42, dtype=torch.float32).reshape(3, 28, 42)
    patches, ids = patchify_vit(image)
    assert patches.shape == (6, 14 * 14 * 3)
    assert ids.tolist() == [0, 1, 2, 70, 71, 72]
    # Patch 4 is row 1, column 1; within it, feature (p, q, c) is pixel (14 + p, 14 + q) of channel c.
    expected = image[:, 14:28, 14:28].permute(1, 2, 0).reshape(-1)
    assert torch.equal(patches[4], expected)
    with pytest.raises(ValueError):
        patchify_vit(torch.zeros(3, 20, 28))
