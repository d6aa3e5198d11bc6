"""The tiny shapes example: its training forward is the served forward, its pieces keep their
contracts, and a CPU smoke run writes a checkpoint the normal loaders and the pipeline read."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bagel.checkpoints.checkpoint import load_autoencoder, load_bagel
from bagel.diffusion.generation import BlockVelocity
from bagel.network.autoencoder import AutoEncoder
from bagel.network.config import BagelConfig
from bagel.network.kv import Branch
from bagel.network.latents import latent_position_ids, patchify
from bagel.network.layers import RMSNorm
from bagel.pipeline import Pipeline
from bagel.text.tokenizer import load_tokenizer
from examples.tiny_shapes.architecture import AE_PARAMS, init_bagel, shapes_config
from examples.tiny_shapes.autoencoder import autoencoder_loss, fold_unit_scale
from examples.tiny_shapes.data import ShapeGenerator
from examples.tiny_shapes.flow import (
    TIMESTEP_SHIFT,
    block_velocity,
    flow_loss,
    pad_prompts,
    patchify_batch,
    sample_t,
    text_kv,
)
from serving.params import GenerationParams
from tests.helpers.processes import ROOT

MARKERS = (500, 501)

CHECKPOINT = Path(__file__).resolve().parents[2] / "examples" / "tiny_shapes" / "checkpoint"


@pytest.fixture(scope="module")
def model():
    """The example's architecture with every weight away from its starting value (the velocity
    head starts at zero, norms at one), so that the comparison below is not vacuous."""
    config = shapes_config(vocab_size=512)
    model = init_bagel(config, seed=0)
    generator = torch.Generator().manual_seed(1)
    torch.nn.init.normal_(model.llm2vae.weight, std=0.1, generator=generator)
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.weight.data = 1 + 0.1 * torch.randn(module.weight.shape, generator=generator)
    return model.eval()


def test_training_forward_equals_the_inference_forward_within_1e_5(model):
    """Per sample against `BlockVelocity` over that sample's own prefilled context: padded
    prompts of different lengths, an empty one (BAGEL's uncond context) included."""
    prompts = [[1, 5, 9, 2], [], [3, 4], [7, 8, 9, 10, 11, 12, 13]]
    generator = torch.Generator().manual_seed(0)
    x_t = torch.randn(len(prompts), 64, model.config.patch_dim, generator=generator)
    t = torch.rand(len(prompts), generator=generator)
    pos_ids = latent_position_ids(8, 8, model.config.max_latent_size)
    ids, lengths = pad_prompts(prompts)
    with torch.no_grad():
        trained = block_velocity(
            model, text_kv(model, ids, lengths), x_t, t, pos_ids, torch.tensor(MARKERS)
        )
    for b, prompt in enumerate(prompts):
        [context] = model.prefill([prompt])
        served = BlockVelocity(model, {Branch.COND: context}, pos_ids, MARKERS)
        want = served(x_t[b], t[b], [Branch.COND])[Branch.COND]
        assert (trained[b] - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())


def test_training_forward_equals_the_batched_cfg_branches_served_together(model):
    """The conditional and the empty context in one served forward (ragged prefixes)."""
    prompt = [4, 6, 8, 10, 12]
    cond, uncond = model.prefill([prompt, []])
    pos_ids = latent_position_ids(8, 8, model.config.max_latent_size)
    x_t = torch.randn(64, model.config.patch_dim, generator=torch.Generator().manual_seed(2))
    t = torch.tensor(0.7)
    served = BlockVelocity(model, {Branch.COND: cond, Branch.UNCOND_TEXT: uncond}, pos_ids, MARKERS)
    want = served(x_t, t, [Branch.COND, Branch.UNCOND_TEXT])
    ids, lengths = pad_prompts([prompt, []])
    with torch.no_grad():
        text = text_kv(model, ids, lengths)
        got = block_velocity(
            model, text, x_t.expand(2, -1, -1), t.expand(2), pos_ids, torch.tensor(MARKERS)
        )
    assert (got[0] - want[Branch.COND]).abs().max().item() <= 1e-5
    assert (got[1] - want[Branch.UNCOND_TEXT]).abs().max().item() <= 1e-5
    assert (want[Branch.COND] - want[Branch.UNCOND_TEXT]).abs().max().item() > 1e-3


def test_padding_ids_past_a_prompt_length_do_not_change_anything(model):
    """Training drops a caption to the empty context by setting its length to 0, leaving its ids."""
    ids = torch.tensor([[3, 4, 5, 6], [3, 4, 5, 6]])
    other = torch.tensor([[3, 4, 5, 6], [9, 9, 9, 9]])
    lengths = torch.tensor([4, 0])
    x_t = torch.randn(2, 64, model.config.patch_dim, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([0.3, 0.9])
    pos_ids = latent_position_ids(8, 8, model.config.max_latent_size)
    markers = torch.tensor(MARKERS)
    with torch.no_grad():
        a = block_velocity(model, text_kv(model, ids, lengths), x_t, t, pos_ids, markers)
        b = block_velocity(model, text_kv(model, other, lengths), x_t, t, pos_ids, markers)
    assert torch.equal(a, b) and torch.isfinite(a).all()


def test_flow_loss_has_finite_gradients_with_an_empty_prompt_in_the_batch(model):
    model = init_bagel(model.config, seed=0).train()
    ids, lengths = pad_prompts([[1, 2, 3], [], [4]])
    generator = torch.Generator().manual_seed(4)
    x0 = torch.randn(3, 64, model.config.patch_dim, generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    pos_ids = latent_position_ids(8, 8, model.config.max_latent_size)
    loss = flow_loss(
        model, ids, lengths, x0, sample_t(3, generator), noise, pos_ids, torch.tensor(MARKERS)
    )
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(torch.isfinite(g).all() for g in grads.values() if g is not None)
    # Text-to-image never reads the und expert's output after the last layer's attention (the
    # prompt's K/V and the markers' queries are all it uses), so those weights get no gradient.
    last = f"language_model.model.layers.{model.config.llm.num_layers - 1}."
    unread = {
        f"{last}self_attn.o_proj.weight",
        *(f"{last}mlp.{p}_proj.weight" for p in ("gate", "up", "down")),
        f"{last}post_attention_layernorm.weight",
        "language_model.model.norm.weight",
    }
    assert {n for n, g in grads.items() if g is None} == unread
    # With the zero velocity head the loss starts at E|noise - x0|^2 = 2.
    assert abs(loss.item() - 2.0) < 0.2


def test_sampled_times_follow_the_inference_shift():
    t = sample_t(20_000, torch.Generator().manual_seed(0))
    assert t.min() > 0.0 and t.max() < 1.0
    u = torch.sigmoid(torch.randn(20_000, generator=torch.Generator().manual_seed(0)))
    assert torch.allclose(t, TIMESTEP_SHIFT * u / (1 + (TIMESTEP_SHIFT - 1) * u))
    assert t.median() > 0.7  # shift 3 puts most training where most sampling steps are


def test_patchify_batch_equals_patchify_per_latent():
    z = torch.randn(3, 8, 16, 16)
    batched = patchify_batch(z, 2)
    for b in range(3):
        assert torch.equal(batched[b], patchify(z[b], 2))


def test_generator_is_deterministic_per_seed():
    a, b, c = ShapeGenerator(7).batch(16), ShapeGenerator(7).batch(16), ShapeGenerator(8).batch(16)
    assert torch.equal(a.images, b.images) and a.captions == b.captions
    assert not torch.equal(a.images, c.images)
    assert a.images.shape == (16, 3, 128, 128)
    assert a.images.min() >= -1.0 and a.images.max() <= 1.0


def test_folding_the_latent_scale_keeps_the_reconstruction_and_gives_unit_std():
    torch.manual_seed(0)
    ae = AutoEncoder(AE_PARAMS).eval()
    images = ShapeGenerator(0).batch(4).images
    with torch.no_grad():
        before = ae.decode(ae.encode(images))
        fold_unit_scale(ae, images)
        after = ae.decode(ae.encode(images))
        std = ae.encode(images).std(dim=(0, 2, 3))
    assert (before - after).abs().max() <= 1e-4
    assert torch.allclose(std, torch.ones_like(std), atol=1e-4)


def test_autoencoder_loss_is_finite_and_has_gradients():
    torch.manual_seed(0)
    ae = AutoEncoder(AE_PARAMS)
    loss, parts = autoencoder_loss(ae, ShapeGenerator(0).batch(1).images)
    loss.backward()
    assert torch.isfinite(loss) and set(parts) == {"l1", "l2", "kl"}
    assert ae.encoder.conv_in.weight.grad.abs().sum() > 0


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny-shapes-smoke")
    command = [
        sys.executable,
        "-m",
        "examples.tiny_shapes.train",
        *("--out", str(out), "--device", "cpu", "--seed", "0", "--smoke"),
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    return out


@pytest.mark.slow
def test_smoke_training_writes_the_published_layout(smoke_dir):
    names = {p.name for p in smoke_dir.iterdir()}
    assert {
        "llm_config.json",
        "vit_config.json",
        "ema.safetensors",
        "ae.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.json",
        "merges.txt",
        "train_log.json",
        "model_info.json",
    } <= names
    info = json.loads((smoke_dir / "model_info.json").read_text())
    shipped = json.loads((CHECKPOINT / "model_info.json").read_text())
    assert info == shipped == {"model_name": "tiny-shapes", "native_size": 128}
    size = (smoke_dir / "ema.safetensors").stat().st_size + (
        smoke_dir / "ae.safetensors"
    ).stat().st_size
    assert size < 25e6
    log = json.loads((smoke_dir / "train_log.json").read_text())
    assert log["seed"] == 0 and log["autoencoder"]["steps"] >= 1 and log["flow"]["steps"] >= 1
    assert log["autoencoder"]["losses"] and log["flow"]["losses"] and "device" in log


@pytest.mark.slow
def test_smoke_checkpoint_loads_with_the_normal_loaders(smoke_dir):
    tokenizer = load_tokenizer(smoke_dir)
    config = BagelConfig.from_dir(smoke_dir)
    assert config == shapes_config(tokenizer.vocab_size)
    assert config.latent_grid(128, 128) == (8, 8)
    load_bagel(smoke_dir, "diffusion", config=config)
    load_bagel(smoke_dir, "prefill", config=config)
    assert load_autoencoder(smoke_dir).params == AE_PARAMS


@pytest.mark.slow
def test_smoke_checkpoint_generates_through_the_pipeline(smoke_dir):
    params = GenerationParams(height=128, width=128, num_timesteps=3, seed=1)
    image = Pipeline(smoke_dir, "cpu").generate("a red circle", params).image
    assert image.size == (128, 128)
