"""An edit's contexts (`bagel.prompting.contexts`): the segments, the mask, and the prefilled KV
against the independent fp64 re-computation, which appends the pieces one at a time as the reference
does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from bagel.checkpoints.checkpoint import load_autoencoder, load_bagel, load_vit
from bagel.network.config import BagelConfig
from bagel.network.kv import Branch
from bagel.network.latents import latent_position_ids, patchify
from bagel.network.vit import ViTConfig
from bagel.prompting.contexts import (
    ContextEncoder,
    EditResize,
    Segment,
    SegmentKind,
    attention_mask,
    edit_segments,
    next_rope_position,
    prepare_edit_image,
)
from bagel.prompting.image_transforms import ResizeRule, patchify_vit
from bagel.text.tokenizer import load_tokenizer
from tests.bagel import fp64_reference as ref
from tests.bagel.network.test_model import dims, rel_err

# Small rules keep the CPU tests fast (the reference's make a 512-pixel minimum).
SMALL = EditResize(ResizeRule(128, 64, 16), ResizeRule(112, 56, 14))


def input_image(width: int = 300, height: int = 200, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def encoder(tiny_model_dir: Path) -> ContextEncoder:
    dtype = torch.float64
    model = load_bagel(tiny_model_dir, "diffusion", dtype=dtype)
    return ContextEncoder(
        model,
        load_vit(tiny_model_dir, dtype=dtype),
        load_autoencoder(tiny_model_dir, dtype=dtype),
        load_tokenizer(tiny_model_dir),
    )


def test_mask_sees_earlier_segments_whole_images_and_causal_text():
    segments = [Segment(SegmentKind.VAE_IMAGE, 3), Segment(SegmentKind.TEXT, 2, (5, 6))]
    expected = torch.tensor(
        [
            [1, 1, 1, 0, 0],
            [1, 1, 1, 0, 0],
            [1, 1, 1, 0, 0],
            [1, 1, 1, 1, 0],
            [1, 1, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(attention_mask(segments, torch.device("cpu")), expected)


def test_an_image_takes_one_rope_position_per_segment_and_text_one_per_token():
    image = [Segment(SegmentKind.VAE_IMAGE, 10), Segment(SegmentKind.VIT_IMAGE, 7)]
    contexts = edit_segments(image, [1, 2, 3], [])
    assert next_rope_position(contexts[Branch.COND]) == 2 + 3
    assert next_rope_position(contexts[Branch.UNCOND_TEXT]) == 2
    assert next_rope_position(contexts[Branch.UNCOND_IMG]) == 3
    assert contexts[Branch.UNCOND_TEXT] == image


def test_the_input_is_resized_by_the_vae_rule_then_the_vit_rule(tiny_model_dir: Path):
    config = BagelConfig.from_dir(tiny_model_dir)
    vit = ViTConfig.from_dir(tiny_model_dir)
    rules = EditResize.reference(config, vit)
    assert rules == EditResize(ResizeRule(1024, 512, 16), ResizeRule(980, 224, 14))
    image = prepare_edit_image(input_image(300, 200), rules)
    # shortest side up to 512, stride 16: 768 x 512; then the ViT's 980 cap leaves 770 x 518
    assert (image.width, image.height) == (768, 512)
    assert tuple(image.vit_pixels.shape) == (3, 518, 770)
    assert image.segments(config) == [
        Segment(SegmentKind.VAE_IMAGE, 32 * 48 + 2),
        Segment(SegmentKind.VIT_IMAGE, 37 * 55 + 2),
    ]


def test_resize_rules_the_model_cannot_take_are_refused(tiny_model_dir: Path):
    config = BagelConfig.from_dir(tiny_model_dir)
    vit = ViTConfig.from_dir(tiny_model_dir)
    EditResize(ResizeRule(128, 64, 16), ResizeRule(112, 56, 14)).check(config, vit)
    with pytest.raises(ValueError, match="VAE resize"):
        EditResize(ResizeRule(2048, 64, 16), SMALL.vit).check(config, vit)
    with pytest.raises(ValueError, match="ViT resize"):
        EditResize(SMALL.vae, ResizeRule(112, 56, 16)).check(config, vit)


def test_text_only_context_equals_the_text_prefill(encoder: ContextEncoder, tiny_model_dir: Path):
    ids = load_tokenizer(tiny_model_dir).encode_prompt("a red fox in the snow")
    seq = encoder.sequence([Segment(SegmentKind.TEXT, len(ids), tuple(ids))], {})
    mixed = list(encoder.model.prefill_mixed_layers(seq))
    (text,) = encoder.model.prefill([ids])
    for layer, (k, v) in enumerate(mixed):
        assert rel_err(k, text.keys[layer]) < 1e-12
        assert rel_err(v, text.values[layer]) < 1e-12


def test_edit_contexts_match_the_fp64_piecewise_recomputation(
    encoder: ContextEncoder, tiny_model_dir: Path
):
    config = encoder.config
    tok = load_tokenizer(tiny_model_dir)
    sd = {k: v.double() for k, v in load_file(str(tiny_model_dir / "ema.safetensors")).items()}
    image = prepare_edit_image(input_image(260, 250, seed=3), SMALL)
    prompt = tok.encode_prompt("make it blue")
    negative = tok.encode_prompt("blurry")
    segments = edit_segments(image.segments(config), prompt, negative)
    contexts = encoder.prefill(segments, image)

    # The pieces, computed once by the (separately tested) encoders.
    latent = encoder.autoencoder.encode(image.vae_pixels[None].double())[0]
    rows, cols = config.latent_grid(image.height, image.width)
    vae = (patchify(latent, 2), latent_position_ids(rows, cols, config.max_latent_size))
    patches, vit_ids = patchify_vit(image.vit_pixels.double(), image.patch_size)
    vit = encoder.vit(patches, vit_ids)
    markers = (tok.start_of_image, tok.end_of_image)
    pieces = {
        Branch.COND: [("vae", vae), ("vit", vit), ("text", torch.tensor(prompt))],
        Branch.UNCOND_TEXT: [("vae", vae), ("vit", vit), ("text", torch.tensor(negative))],
        Branch.UNCOND_IMG: [("text", torch.tensor(prompt))],
    }
    for branch, ctx in contexts.items():
        expected = ref.context_prefill(sd, pieces[branch], markers, **dims(config))
        assert ctx.next_rope_position == next_rope_position(segments[branch])
        assert ctx.num_tokens == expected[0][0].shape[0]
        for layer, (k, v) in enumerate(expected):
            assert rel_err(ctx.keys[layer], k) < 1e-9, (branch, layer)
            assert rel_err(ctx.values[layer], v) < 1e-9, (branch, layer)


def test_uncond_text_is_the_start_of_cond_without_a_negative_prompt(
    encoder: ContextEncoder, tiny_model_dir: Path
):
    config = encoder.config
    tok = load_tokenizer(tiny_model_dir)
    image = prepare_edit_image(input_image(200, 200), SMALL)
    segments = edit_segments(image.segments(config), tok.encode_prompt("make it red"), [])
    contexts = encoder.prefill(segments, image)
    cond, uncond = contexts[Branch.COND], contexts[Branch.UNCOND_TEXT]
    n = uncond.num_tokens
    assert n < cond.num_tokens
    for layer in range(len(cond.keys)):
        assert torch.equal(uncond.keys[layer], cond.keys[layer][:n])
        assert torch.equal(uncond.values[layer], cond.values[layer][:n])
    # and it equals its own computation from scratch
    alone = encoder.prefill({Branch.UNCOND_TEXT: segments[Branch.UNCOND_TEXT]}, image)
    for layer in range(len(cond.keys)):
        assert rel_err(alone[Branch.UNCOND_TEXT].keys[layer], uncond.keys[layer]) < 1e-12
