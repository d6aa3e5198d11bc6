"""Text decoding (`bagel.text.decoding`): greedy tokens against independent recomputations (fp64
from the checkpoint's key names, and transformers' Qwen3 with the und expert's weights), batched
decoding against each request alone, sampling's settings and its reproducibility."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from bagel.checkpoints.checkpoint import load_bagel, load_vit
from bagel.prompting.contexts import ContextEncoder, EditResize, mixed_sequence, prepare_edit_image
from bagel.prompting.conversation import understanding_segments
from bagel.prompting.image_transforms import ResizeRule, patchify_vit
from bagel.text.decoding import Sampling, TextDecoder, decode, filtered_probabilities
from bagel.text.tokenizer import PROMPT_END_TOKEN, load_tokenizer
from tests.bagel import fp64_reference as ref
from tests.bagel.network.test_model import dims

NEW_TOKENS = 64
NO_END = -1  # an end token no logit can pick: every request decodes its full length
SMALL = EditResize(ResizeRule(128, 64, 16), ResizeRule(112, 56, 14))


@pytest.fixture(scope="module")
def fp32(tiny_model_dir: Path):
    model = load_bagel(tiny_model_dir, "prefill", torch.float32, lm_head=True)
    return model, load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def state(tiny_model_dir: Path) -> dict:
    return {k: v.double() for k, v in load_file(str(tiny_model_dir / "ema.safetensors")).items()}


def greedy(length: int = NEW_TOKENS) -> Sampling:
    return Sampling(max_new_tokens=length)


def text_prompt(model, tok, text: str, think: bool = False):
    segments = understanding_segments(tok, [text], think)
    return segments, mixed_sequence(model, segments)


def fp64_greedy(sd: dict, pieces: list, ids: list[int], markers, config, n: int) -> list[int]:
    """Each token the argmax of a from-scratch fp64 pass over the whole sequence so far."""
    out: list[int] = []
    for _ in range(n):
        text = ("text", torch.tensor(ids + out))
        logits = ref.context_logits(sd, [*pieces, text], markers, **dims(config))
        out.append(int(logits.argmax()))
    return out


def test_greedy_text_equals_the_fp64_recomputation_for_64_tokens(fp32, state):
    model, tok = fp32
    segments, prompt = text_prompt(model, tok, "a red circle on a white background")
    ours = decode(model, prompt, prompt.positions[-1].item() + 1, greedy(), NO_END)
    ids = [t for s in segments for t in s.token_ids]
    markers = (tok.start_of_image, tok.end_of_image)
    expected = fp64_greedy(state, [], ids, markers, model.config, NEW_TOKENS)
    assert len(ours.tokens) == NEW_TOKENS and ours.finish == "length"
    assert ours.tokens == expected
    assert len(set(expected)) > 4  # a real sequence, not one token repeated


def test_greedy_text_equals_transformers_qwen3_with_the_und_weights(fp32, tiny_model_dir):
    """transformers' Qwen2 has no QK-norm; its Qwen3 is the same decoder with it (and, with
    `attention_bias`, q/k/v biases; BAGEL's o_proj has none, so that bias is zero)."""
    transformers = pytest.importorskip("transformers")
    model, tok = fp32
    llm = model.config.llm
    hf_config = transformers.Qwen3Config(
        vocab_size=llm.vocab_size,
        hidden_size=llm.hidden_size,
        intermediate_size=llm.intermediate_size,
        num_hidden_layers=llm.num_layers,
        num_attention_heads=llm.num_heads,
        num_key_value_heads=llm.num_kv_heads,
        head_dim=llm.head_dim,
        rms_norm_eps=llm.rms_norm_eps,
        rope_theta=llm.rope_theta,
        max_position_embeddings=llm.max_position_embeddings,
        attention_bias=True,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    hf = transformers.Qwen3ForCausalLM(hf_config).eval()
    ours_state = model.state_dict()
    hf_state = {}
    for name, tensor in ours_state.items():
        key = name.removeprefix("language_model.")
        hf_state[key] = tensor
    for name, tensor in hf.state_dict().items():
        if name.endswith("o_proj.bias"):
            hf_state[name] = torch.zeros_like(tensor)
    missing, unexpected = hf.load_state_dict(hf_state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    segments, prompt = text_prompt(model, tok, "a blue square on a black background")
    ids = torch.tensor([[t for s in segments for t in s.token_ids]])
    with torch.no_grad():
        expected = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[0, ids.shape[1] :].tolist()
    ours = decode(model, prompt, ids.shape[1], greedy(), NO_END)
    assert ours.tokens == expected


def test_greedy_with_an_image_equals_the_fp64_piecewise_recomputation(tiny_model_dir, state):
    dtype = torch.float32
    model = load_bagel(tiny_model_dir, "prefill", dtype, lm_head=True)
    tok = load_tokenizer(tiny_model_dir)
    encoder = ContextEncoder(model, load_vit(tiny_model_dir, dtype), None, tok)
    rng = np.random.default_rng(5)
    image = prepare_edit_image(
        Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)), SMALL
    )
    vit_segment = image.segments(model.config)[1:]
    segments = understanding_segments(tok, [vit_segment, "what shape is this?"], think=False)
    prompt = mixed_sequence(model, segments, encoder.vit_embeddings(image))
    next_position = 1 + sum(s.num_tokens for s in segments[1:])
    ours = decode(model, prompt, next_position, greedy(), NO_END)

    vit64 = load_vit(tiny_model_dir, torch.float64)
    patches, vit_ids = patchify_vit(image.vit_pixels.double(), image.patch_size)
    pieces = [("vit", vit64(patches, vit_ids))]
    ids = [t for s in segments[1:] for t in s.token_ids]
    markers = (tok.start_of_image, tok.end_of_image)
    expected = fp64_greedy(state, pieces, ids, markers, model.config, NEW_TOKENS)
    assert ours.tokens == expected


def test_batched_requests_of_different_lengths_each_get_their_solo_tokens(fp32):
    model, tok = fp32
    texts = ["a red circle", "a green triangle on a white background, large", "square", "blue"]
    lengths = [40, 25, 33, 12]
    prompts = [text_prompt(model, tok, t)[1] for t in texts]
    solo = [
        decode(model, p, p.positions[-1].item() + 1, greedy(n), NO_END).tokens
        for p, n in zip(prompts, lengths, strict=True)
    ]
    decoder = TextDecoder(model, max_batch=3, max_tokens=128, graphs=False)
    got: dict[int, list[int]] = {i: [] for i in range(len(texts))}
    waiting = list(range(len(texts)))

    def join(i: int) -> None:
        p = prompts[i]
        first = decoder.join(i, p, p.positions[-1].item() + 1, greedy(lengths[i]), NO_END)
        got[i].append(first.token)

    # Three join at once, the fourth when a slot frees; one leaves in the middle of the batch.
    for i in waiting[:3]:
        join(i)
    pending = waiting[3:]
    while decoder.active or pending:
        if pending and decoder.has_room():
            join(pending.pop(0))
        for t in decoder.step():
            got[t.key].append(t.token)
    assert [got[i] for i in range(len(texts))] == solo


def test_a_request_that_leaves_frees_its_slot_and_the_rest_continue(fp32):
    model, tok = fp32
    prompts = [text_prompt(model, tok, t)[1] for t in ("a red circle", "a blue square now")]
    solo = decode(model, prompts[1], prompts[1].positions[-1].item() + 1, greedy(20), NO_END)
    decoder = TextDecoder(model, max_batch=2, max_tokens=64, graphs=False)
    tokens = []
    for i, p in enumerate(prompts):
        first = decoder.join(i, p, p.positions[-1].item() + 1, greedy(20), NO_END)
        if i == 1:
            tokens.append(first.token)
    for t in decoder.step():
        if t.key == 1:
            tokens.append(t.token)
    assert decoder.leave(0) and not decoder.leave(0)
    assert decoder.has_room()
    while decoder.active:
        tokens += [t.token for t in decoder.step()]
    assert tokens == solo.tokens


def test_decoding_stops_at_the_end_token_and_at_stop_tokens(fp32):
    model, tok = fp32
    _, prompt = text_prompt(model, tok, "a red circle")
    position = prompt.positions[-1].item() + 1
    free = decode(model, prompt, position, greedy(20), NO_END).tokens
    end = decode(model, prompt, position, greedy(20), end_token=free[5])
    assert end.tokens == free[: free.index(free[5]) + 1] and end.finish == "stop"
    stop = decode(model, prompt, position, Sampling(20, stop_tokens=(free[3],)), NO_END)
    assert stop.tokens == free[: free.index(free[3]) + 1] and stop.finish == "stop"
    real_end = tok.special_ids[PROMPT_END_TOKEN]
    capped = decode(model, prompt, position, greedy(7), real_end)
    assert len(capped.tokens) <= 7


def test_seeded_sampling_is_reproducible_and_seeds_differ(fp32):
    model, tok = fp32
    _, prompt = text_prompt(model, tok, "a green triangle")
    position = prompt.positions[-1].item() + 1

    def sample(seed: int) -> list[int]:
        sampling = Sampling(32, do_sample=True, temperature=1.5, top_p=0.95, top_k=50, seed=seed)
        return decode(model, prompt, position, sampling, NO_END).tokens

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)
    assert sample(7) != decode(model, prompt, position, greedy(32), NO_END).tokens


def test_top_k_and_top_p_keep_the_most_likely_tokens_and_renormalize():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    probs = filtered_probabilities(logits, Sampling(do_sample=True, temperature=1.0, top_k=2))
    full = logits.softmax(-1)
    assert torch.allclose(probs[:2], full[:2] / full[:2].sum()) and not probs[2:].any()
    # top_p 0.7: the first token holds ~0.64 (< 0.7), so the second is kept too, then no more
    probs = filtered_probabilities(logits, Sampling(do_sample=True, temperature=1.0, top_p=0.7))
    assert probs[:2].all() and not probs[2:].any()
    assert abs(probs.sum().item() - 1.0) < 1e-6
    cold = filtered_probabilities(logits, Sampling(do_sample=True, temperature=0.1))
    assert cold[0] > 0.99


def test_the_decoder_refuses_a_model_without_lm_head_and_a_prompt_too_long(fp32, tiny_model_dir):
    model, tok = fp32
    with pytest.raises(ValueError, match="LM head"):
        TextDecoder(load_bagel(tiny_model_dir, "prefill"), 1, 16)
    _, prompt = text_prompt(model, tok, "a red circle")
    decoder = TextDecoder(model, 1, 16, graphs=False)
    with pytest.raises(ValueError, match="exceed"):
        decoder.join(0, prompt, 10, greedy(16), NO_END)
