"""The tiny shapes edit training: its forward is the served three-context edit forward, its edit
pairs change exactly what their instruction says, and `check_edit` tells a right edit from a
wrong one."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from bagel.checkpoints.checkpoint import load_bagel, load_vit
from bagel.diffusion.generation import BlockVelocity
from bagel.network.autoencoder import AutoEncoder
from bagel.network.kv import Branch
from bagel.network.latents import latent_position_ids
from bagel.network.layers import RMSNorm
from bagel.network.vit import ImageContextEncoder, ViTConfig
from bagel.prompting.contexts import ContextEncoder, EditImage, edit_segments, prepare_edit_image
from bagel.prompting.image_transforms import patchify_vit
from bagel.testing.tiny import TINY_VIT
from examples.tiny_shapes.architecture import AE_PARAMS, init_bagel, shapes_config
from examples.tiny_shapes.check import (
    EDIT_EVAL_PROMPTS,
    ShapeSpec,
    check_edit,
    describe,
)
from examples.tiny_shapes.data import EDIT_KINDS, Edit, EditPairGenerator, parse_instruction
from examples.tiny_shapes.edit_flow import (
    EditContexts,
    edit_context_kv,
    edit_flow_loss,
    vit_tokens,
)
from examples.tiny_shapes.edit_inputs import EDIT_RESIZE, VIT_SIZE, vit_patches, vit_pixels
from examples.tiny_shapes.flow import block_velocity, pad_prompts, patchify_batch, sample_t
from tests.helpers.processes import ROOT

MARKERS = (500, 501)
TRAINED = ROOT / "examples" / "tiny_shapes" / "checkpoint"


@pytest.fixture(scope="module")
def parts():
    """The example's model, a ViT of the checkpoint's shape and an autoencoder, every weight away
    from its starting value (velocity head zero, norms one) so the comparison is not vacuous."""
    generator = torch.Generator().manual_seed(1)
    model = init_bagel(shapes_config(vocab_size=512), seed=0)
    torch.nn.init.normal_(model.llm2vae.weight, std=0.1, generator=generator)
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.weight.data = 1 + 0.1 * torch.randn(module.weight.shape, generator=generator)
    torch.manual_seed(2)
    vit_config = ViTConfig(
        hidden_size=TINY_VIT["hidden_size"],
        intermediate_size=TINY_VIT["intermediate_size"],
        num_heads=TINY_VIT["num_attention_heads"],
        num_layers=TINY_VIT["layers_in_file"],
    )
    vit = ImageContextEncoder(vit_config, model.config.llm.hidden_size)
    vit.vit_pos_embed.pos_embed.data.normal_(generator=generator)
    ae = AutoEncoder(AE_PARAMS)
    return model.eval(), vit.eval(), ae.eval()


def _image(seed: int) -> EditImage:
    source = EditPairGenerator(seed).edit_batch(1).sources
    return EditImage(source[0], vit_pixels(source)[0], patch_size=14)


def test_training_forward_equals_the_served_edit_forward_within_1e_5(parts):
    """The three contexts `ContextEncoder.prefill` builds (cond, cfg_text, cfg_img) through
    `BlockVelocity`, against one training batch holding the same three contexts."""
    model, vit, ae = parts
    image = _image(0)
    prompt = [1, 17, 40, 41, 2]
    tokenizer = SimpleNamespace(start_of_image=MARKERS[0], end_of_image=MARKERS[1])
    encoder = ContextEncoder(model, vit, ae, tokenizer)
    segments = edit_segments(image.segments(model.config), prompt, [])
    served_contexts = encoder.prefill(segments, image)
    pos_ids = latent_position_ids(8, 8, model.config.max_latent_size)
    generator = torch.Generator().manual_seed(3)
    x_t = torch.randn(64, model.config.patch_dim, generator=generator)
    t = torch.tensor(0.6)
    branches = [Branch.COND, Branch.UNCOND_TEXT, Branch.UNCOND_IMG]
    served = BlockVelocity(model, served_contexts, pos_ids, MARKERS)(x_t, t, branches)

    with torch.no_grad():
        source = patchify_batch(ae.encode(image.vae_pixels[None]), model.config.latent_patch_size)
        patches, ids = patchify_vit(image.vit_pixels, 14)
        text_ids, lengths = pad_prompts([prompt, [], prompt])
        contexts = EditContexts(
            source_tokens=source.expand(3, -1, -1),
            vit_patches=patches[None].expand(3, -1, -1),
            vit_ids=ids,
            has_image=torch.tensor([True, True, False]),
            text_ids=text_ids,
            text_lengths=lengths,
        )
        prefix = edit_context_kv(model, vit, contexts, pos_ids, torch.tensor(MARKERS))
        trained = block_velocity(
            model, prefix, x_t.expand(3, -1, -1), t.expand(3), pos_ids, torch.tensor(MARKERS)
        )
    for b, branch in enumerate(branches):
        want = served[branch]
        assert (trained[b] - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())
        assert prefix.positions[b].item() == served_contexts[branch].next_rope_position
    # The three contexts differ, so each comparison above checks its own context.
    assert (served[Branch.COND] - served[Branch.UNCOND_TEXT]).abs().max() > 1e-3
    assert (served[Branch.COND] - served[Branch.UNCOND_IMG]).abs().max() > 1e-3


def test_batched_vit_tokens_equal_the_per_image_encoder(parts):
    _, vit, _ = parts
    images = vit_pixels(EditPairGenerator(1).edit_batch(3).sources)
    patches = torch.stack([patchify_vit(image, 14)[0] for image in images])
    ids = patchify_vit(images[0], 14)[1]
    with torch.no_grad():
        batched = vit_tokens(vit, patches, ids)
        for b in range(3):
            assert torch.allclose(batched[b], vit(patches[b], ids), atol=1e-6, rtol=1e-5)


def _contexts(has_image: list[bool], texts: list[list[int]], seed: int) -> EditContexts:
    generator = torch.Generator().manual_seed(seed)
    ids, lengths = pad_prompts(texts)
    return EditContexts(
        source_tokens=torch.randn(len(texts), 64, 32, generator=generator),
        vit_patches=torch.randn(len(texts), 64, 588, generator=generator),
        vit_ids=patchify_vit(torch.zeros(3, VIT_SIZE, VIT_SIZE), 14)[1],
        has_image=torch.tensor(has_image),
        text_ids=ids,
        text_lengths=lengths,
    )


def test_absent_images_and_padding_do_not_change_anything(parts):
    """Training drops the image by a flag and the text by a zero length, leaving their data."""
    model, vit, _ = parts
    texts = [[3, 4, 5, 6], [3, 4, 5, 6], [7, 8]]
    a = _contexts([False, True, False], texts, seed=0)
    b = dataclasses.replace(
        _contexts([False, True, False], texts, seed=1),
        source_tokens=a.source_tokens.clone(),
        vit_patches=a.vit_patches.clone(),
    )
    b.source_tokens[[0, 2]] += 5.0
    b.vit_patches[[0, 2]] -= 3.0
    b.text_ids[2, 2:] = 9
    pos_ids = latent_position_ids(8, 8, model.config.max_latent_size)
    x_t = torch.randn(3, 64, 32, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([0.2, 0.5, 0.9])
    markers = torch.tensor(MARKERS)
    with torch.no_grad():
        va = block_velocity(model, edit_context_kv(model, vit, a, pos_ids, markers), x_t, t,
                            pos_ids, markers)  # fmt: skip
        vb = block_velocity(model, edit_context_kv(model, vit, b, pos_ids, markers), x_t, t,
                            pos_ids, markers)  # fmt: skip
    assert torch.equal(va, vb) and torch.isfinite(va).all()


def test_edit_flow_loss_trains_the_vit_and_connector_and_both_experts(parts):
    _, vit, _ = parts
    model = init_bagel(shapes_config(vocab_size=512), seed=0).train()
    torch.nn.init.normal_(model.llm2vae.weight, std=0.02)
    vit = ImageContextEncoder(vit.cfg, model.config.llm.hidden_size).train()
    contexts = _contexts([True, True, False, False], [[1, 2, 3], [], [4], []], seed=2)
    generator = torch.Generator().manual_seed(4)
    x0 = torch.randn(4, 64, 32, generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    pos_ids = latent_position_ids(8, 8, model.config.max_latent_size)
    loss = edit_flow_loss(
        model, vit, contexts, x0, sample_t(4, generator), noise, pos_ids, torch.tensor(MARKERS)
    )
    loss.backward()
    for module in (model, vit):
        for name, p in module.named_parameters():
            assert p.grad is None or torch.isfinite(p.grad).all(), name
    assert vit.vision_model.embeddings.patch_embedding.weight.grad.abs().sum() > 0
    assert vit.connector.fc2.weight.grad.abs().sum() > 0
    layer = model.layers[0].self_attn
    assert layer.k_proj_moe_gen.weight.grad.abs().sum() > 0  # the source latents, gen expert
    assert model.vae2llm.weight.grad.abs().sum() > 0


def test_edit_pairs_change_exactly_the_attribute_their_instruction_names():
    batch = EditPairGenerator(3).edit_batch(24)
    kinds = set()
    for b, text in enumerate(batch.instructions):
        source, target = describe(_pil(batch.sources[b])), describe(_pil(batch.targets[b]))
        edit = parse_instruction(text, source.shape)
        assert edit is not None, text
        kinds.add(edit.kind)
        assert getattr(source, edit.kind) != edit.value
        assert dataclasses.replace(source.edited(edit), centre=target.centre) == target
        assert np.hypot(*np.subtract(source.centre, target.centre)) < 2.5
    assert kinds == set(EDIT_KINDS)


def test_edit_pairs_are_deterministic_per_seed():
    a, b = EditPairGenerator(7).edit_batch(8), EditPairGenerator(7).edit_batch(8)
    assert torch.equal(a.sources, b.sources) and torch.equal(a.targets, b.targets)
    assert a.instructions == b.instructions and a.target_captions == b.target_captions


def _pil(image: torch.Tensor) -> Image.Image:
    array = ((image.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
    return Image.fromarray(array)


def test_eval_edits_cover_every_kind_four_times_and_the_rendered_answer_passes():
    assert len(EDIT_EVAL_PROMPTS) == 12
    assert sorted(p.edit.kind for p in EDIT_EVAL_PROMPTS) == sorted(EDIT_KINDS * 4)
    for prompt in EDIT_EVAL_PROMPTS:
        answer = dataclasses.replace(prompt, source=prompt.source.edited(prompt.edit))
        verdict = check_edit(answer.source_image(), prompt.text, prompt.source)
        assert verdict.passed, (prompt.text, verdict)
        unchanged = check_edit(prompt.source_image(), prompt.text, prompt.source)
        assert not unchanged.passed


def test_check_edit_fails_a_moved_shape_a_changed_kept_attribute_and_noise():
    prompt = EDIT_EVAL_PROMPTS[0]  # red circle on white -> blue
    right = prompt.source.edited(prompt.edit)
    moved = dataclasses.replace(prompt, source=dataclasses.replace(right, centre=(40.0, 40.0)))
    assert not check_edit(moved.source_image(), prompt.text, prompt.source).centre_ok
    squared = dataclasses.replace(prompt, source=dataclasses.replace(right, shape="square"))
    verdict = check_edit(squared.source_image(), prompt.text, prompt.source)
    assert verdict.found.colour_ok and not verdict.found.shape_ok and not verdict.passed
    noise = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    assert not check_edit(noise, prompt.text, prompt.source).passed


def test_check_edit_refuses_an_instruction_the_task_does_not_write():
    source = ShapeSpec("red", "circle", "white", (64.0, 64.0))
    with pytest.raises(ValueError, match="not an edit instruction"):
        check_edit(np.zeros((128, 128, 3)), "make it sparkle", source)
    assert parse_instruction("make the circle blue", "circle") == Edit("colour", "blue")
    assert parse_instruction("make the circle blue", "square") is None


def test_training_vit_input_is_what_the_prefill_makes_of_the_png():
    """`vit_pixels` + `vit_patches` on a batch against `prepare_edit_image` (PIL's bicubic) +
    `patchify_vit` on the 8-bit image: the same patch order and ids, and pixels that differ by
    0.01 of a level of 255 on average (a few edge pixels by up to 9 levels: the two bicubic
    filters round differently)."""
    sources = EditPairGenerator(4).edit_batch(3).sources
    patches, ids = vit_patches(vit_pixels(sources))
    for b in range(3):
        served = prepare_edit_image(_pil(sources[b]), EDIT_RESIZE)
        assert served.vae_pixels.shape == (3, 128, 128)
        want, want_ids = patchify_vit(served.vit_pixels, 14)
        assert torch.equal(ids, want_ids)
        levels = (patches[b] - want).abs() * 127.5
        assert levels.mean().item() < 0.05 and levels.max().item() < 12


@pytest.fixture(scope="module")
def edit_smoke_dir(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("tiny-shapes-edit-smoke")
    command = [
        sys.executable,
        "-m",
        "examples.tiny_shapes.train_edit",
        *("--init", str(TRAINED), "--out", str(out), "--device", "cpu", "--smoke"),
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return out


@pytest.mark.slow
def test_edit_smoke_training_keeps_the_published_layout_and_changes_only_trained_tensors(
    edit_smoke_dir,
):
    with (
        safe_open(TRAINED / "ema.safetensors", "pt") as before,
        safe_open(edit_smoke_dir / "ema.safetensors", "pt") as after,
    ):
        assert set(before.keys()) == set(after.keys())
        changed = set()
        for key in sorted(before.keys()):
            a, b = before.get_tensor(key), after.get_tensor(key)
            assert a.shape == b.shape and a.dtype == b.dtype == torch.bfloat16, key
            if not torch.equal(a, b):
                changed.add(key)
    assert "language_model.lm_head.weight" not in changed
    assert "vit_pos_embed.pos_embed" not in changed and "latent_pos_embed.pos_embed" not in changed
    assert any(k.startswith("vit_model.") for k in changed)
    assert any(k.startswith("connector.") for k in changed)
    assert any("_moe_gen" in k for k in changed) and "llm2vae.weight" in changed
    for name in ("ae.safetensors", "llm_config.json", "vit_config.json", "tokenizer.json"):
        assert (edit_smoke_dir / name).read_bytes() == (TRAINED / name).read_bytes(), name
    log = json.loads((edit_smoke_dir / "edit_train_log.json").read_text())
    assert log["edit"]["steps"] == 2 and len(log["edit_check"]["results"]) == 2
    assert (edit_smoke_dir / "edit_samples.png").is_file()
    load_bagel(edit_smoke_dir, "diffusion")
    load_vit(edit_smoke_dir)
