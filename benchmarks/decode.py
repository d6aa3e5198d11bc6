"""Text decoding speed: tokens/s of `TextDecoder` (the prefill service's decode path) and of the
`DecodeScheduler` that feeds it (a thread of its own, tokens handed to asyncio streams) at several
numbers of concurrent requests, with the requests' joins (one prefill each) and, in the "all
joined" rows, without them; time to first token after an image (ViT + prefill + first
token); and `transformers`' `generate` on a Qwen2 of the same shapes at batch 1. Random weights:
`--preset 7b` has BAGEL-7B-MoT's und expert, LM head and SigLIP shapes; `--preset tiny` runs in
seconds on a CPU.

    python -m benchmarks.decode --preset 7b --device cuda [--batches 1,8,32] [--new-tokens 128]
    python -m benchmarks.decode --preset tiny --device cpu --batches 1,4 --new-tokens 16 --image-size 224
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a script: the repo root, not benchmarks/, heads the import path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import asyncio
import time
from dataclasses import replace

import numpy as np
import torch
from PIL import Image

from bagel.network.config import BAGEL_7B_LLM, BagelConfig, LLMConfig
from bagel.network.model import Bagel, MixedSequence
from bagel.network.vit import ImageContextEncoder, ViTConfig
from bagel.prompting.contexts import ContextEncoder, EditResize, mixed_sequence, prepare_edit_image
from bagel.testing.presets import BAGEL_7B_VIT
from bagel.text.decoding import Sampling, TextDecoder, Token
from benchmarks._report import emit_json
from prefill_service.decode_scheduler import DecodeJob, DecodeScheduler

TINY_LLM = LLMConfig(
    vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=4, num_heads=8,
    num_kv_heads=4,
)  # fmt: skip
TINY_VIT = ViTConfig(hidden_size=64, intermediate_size=128, num_heads=4, num_layers=2)
NO_END = -1  # every request decodes all its tokens


class FakeTokenizer:
    start_of_image, end_of_image = 1, 2


def build(preset: str, device: str, dtype: torch.dtype, layers: int | None):
    llm = BAGEL_7B_LLM if preset == "7b" else TINY_LLM
    if layers is not None:
        llm = replace(llm, num_layers=layers)
    vit_config = BAGEL_7B_VIT if preset == "7b" else TINY_VIT
    config = BagelConfig(llm=llm)
    torch.manual_seed(0)
    with torch.device(device):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            model = Bagel(config, with_gen=False, with_lm_head=True).eval()
            vit = ImageContextEncoder(vit_config, llm.hidden_size).eval()
        finally:
            torch.set_default_dtype(previous)
    model.requires_grad_(False)
    vit.requires_grad_(False)
    return model, ContextEncoder(model, vit, None, FakeTokenizer()), vit_config


def text_prompt(model: Bagel, tokens: int, seed: int) -> tuple[MixedSequence, int]:
    from bagel.prompting.contexts import Segment, SegmentKind

    rng = np.random.default_rng(seed)
    ids = tuple(int(t) for t in rng.integers(3, model.config.llm.vocab_size, tokens))
    segments = [Segment(SegmentKind.TEXT, tokens, ids)]
    return mixed_sequence(model, segments), tokens


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def decoder_rate(decoder: TextDecoder, prompts, new_tokens: int, device: str) -> float:
    """Aggregate decoded tokens/s over the steps of `len(prompts)` requests decoded together."""
    for i, (prompt, position) in enumerate(prompts):
        decoder.join(i, prompt, position, Sampling(new_tokens), NO_END)
    sync(device)
    started = time.perf_counter()
    steps = 0
    while decoder.active:
        decoder.step()
        steps += 1
    sync(device)
    return len(prompts) * steps / (time.perf_counter() - started)


async def scheduler_rates(scheduler: DecodeScheduler, prompts, new_tokens: int):
    """Tokens/s as the service's streams see them: from the first token of any request to the
    last token of all (the joins of the other requests, one prefill each, fall inside it); and
    once all have joined: the tokens after the last request's first token, over the time from
    that token to the last of all."""

    async def one(prompt, position) -> list[float]:
        stream = scheduler.submit(
            DecodeJob(lambda: (prompt, position), Sampling(new_tokens), NO_END)
        )
        return [time.perf_counter() async for item in stream if isinstance(item, Token)]

    times = await asyncio.gather(*(one(p, pos) for p, pos in prompts))
    first = min(t[0] for t in times)
    joined = max(t[0] for t in times)
    last = max(t[-1] for t in times)
    after_joined = sum(1 for t in times for x in t if x > joined)
    return len(prompts) * (new_tokens - 1) / (last - first), after_joined / (last - joined)


def time_to_first_token(
    decoder: TextDecoder, encoder: ContextEncoder, vit: ViTConfig, size: int, device: str
) -> float:
    from bagel.prompting.contexts import Segment, SegmentKind

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    rules = EditResize.reference(encoder.config, vit)
    question = Segment(SegmentKind.TEXT, 16, tuple(range(3, 19)))

    def once() -> float:
        sync(device)
        started = time.perf_counter()
        prepared = prepare_edit_image(image, rules)
        segments = [*prepared.segments(encoder.config)[1:], question]
        prompt = mixed_sequence(encoder.model, segments, encoder.vit_embeddings(prepared))
        decoder.join("ttft", prompt, 2 + question.num_tokens, Sampling(1), NO_END)
        sync(device)
        return time.perf_counter() - started

    once()  # warm
    return min(once() for _ in range(3))


def transformers_rate(llm: LLMConfig, device: str, dtype, prompt_tokens: int, new_tokens: int):
    import transformers

    config = transformers.Qwen2Config(
        vocab_size=llm.vocab_size, hidden_size=llm.hidden_size,
        intermediate_size=llm.intermediate_size, num_hidden_layers=llm.num_layers,
        num_attention_heads=llm.num_heads, num_key_value_heads=llm.num_kv_heads,
        rope_theta=llm.rope_theta, tie_word_embeddings=False,
    )  # fmt: skip
    with torch.device(device):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            model = transformers.Qwen2ForCausalLM(config).eval()
        finally:
            torch.set_default_dtype(previous)
    ids = torch.randint(3, llm.vocab_size, (1, prompt_tokens), device=device)

    def run(n: int) -> float:
        sync(device)
        started = time.perf_counter()
        with torch.no_grad():
            model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                do_sample=False, pad_token_id=0,
            )  # fmt: skip
        sync(device)
        return time.perf_counter() - started

    run(2)
    # per-token time without the prefill: the difference of two lengths
    per_token = (run(new_tokens) - run(1)) / (new_tokens - 1)
    return 1.0 / per_token


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=("tiny", "7b"), default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, help="fewer decoder layers (smoke runs)")
    parser.add_argument("--batches", default="1,8,32", help="concurrent requests, comma-separated")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=1024, help="0: no time-to-first-token")
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    batches = [int(b) for b in args.batches.split(",")]
    llm = BAGEL_7B_LLM if args.preset == "7b" else TINY_LLM
    if args.layers is not None:
        llm = replace(llm, num_layers=args.layers)
    hf = None
    if not args.no_transformers:
        # First: random weights drawn after our CUDA-graph captures trip the generator's
        # capture bookkeeping.
        hf = transformers_rate(llm, device, dtype, args.prompt_tokens, args.new_tokens)
        if device == "cuda":
            torch.cuda.empty_cache()
    model, encoder, vit = build(args.preset, device, dtype, args.layers)
    longest = args.prompt_tokens + 7 * max(batches) + args.new_tokens + 1
    max_tokens = max(longest, 8192 if args.image_size else 0)
    ttft = None
    if args.image_size:
        ttft = time_to_first_token(
            TextDecoder(model, 1, max_tokens), encoder, vit, args.image_size, device
        )
    decoder = TextDecoder(model, max(batches), max_tokens)
    rows = []
    for batch in batches:
        prompts = [text_prompt(model, args.prompt_tokens + 7 * i, i) for i in range(batch)]
        decoder_rate(decoder, prompts, 8, device)  # warm: captures this batch's graphs
        rate = decoder_rate(decoder, prompts, args.new_tokens, device)
        rows.append({"batch": batch, "path": "decoder", "tokens_per_s": rate})
    scheduler = DecodeScheduler(decoder)
    for batch in batches:
        prompts = [text_prompt(model, args.prompt_tokens + 7 * i, i) for i in range(batch)]
        asyncio.run(scheduler_rates(scheduler, prompts, 8))  # warm, as the decoder's rows
        rate, joined = asyncio.run(scheduler_rates(scheduler, prompts, args.new_tokens))
        rows.append({"batch": batch, "path": "scheduler", "tokens_per_s": rate})
        rows.append({"batch": batch, "path": "all joined", "tokens_per_s": joined})
    scheduler.close()

    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"text decoding, preset {args.preset}, {device} ({name}), {dtype}, "
          f"{args.prompt_tokens}+ prompt tokens, {args.new_tokens} new tokens")  # fmt: skip
    base = {r["path"]: r["tokens_per_s"] for r in rows if r["batch"] == batches[0]}
    print(f"{'path':<10} {'batch':>5} {'tokens/s':>10} {'ms/token/req':>13} {'x batch 1':>10}")
    for r in rows:
        per = 1000 * r["batch"] / r["tokens_per_s"]
        print(f"{r['path']:<10} {r['batch']:>5} {r['tokens_per_s']:>10.1f} {per:>13.2f} "
              f"{r['tokens_per_s'] / base[r['path']]:>10.2f}")  # fmt: skip
    if hf is not None:
        ours = base["decoder"]
        print(f"{'hf':<10} {1:>5} {hf:>10.1f} {1000 / hf:>13.2f}   (ours/hf at batch 1: "
              f"{ours / hf:.2f}x)")  # fmt: skip
    if ttft is not None:
        print(f"time to first token after a {args.image_size}² image: {ttft * 1000:.1f} ms")
    emit_json(
        {
            "preset": args.preset,
            "device": name,
            "rows": rows,
            "transformers_tokens_per_s": hf,
            "ttft_image_ms": None if ttft is None else ttft * 1000,
            "image_size": args.image_size,
            "new_tokens": args.new_tokens,
        },  # fmt: skip
        args.json,
    )


if __name__ == "__main__":
    main()
