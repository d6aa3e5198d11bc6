"""The decode scheduler: requests that join while others decode get their solo tokens, and a
cancelled request is out of the batch before the next step."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
import torch

from bagel.checkpoints.checkpoint import load_bagel
from bagel.prompting.contexts import Segment, SegmentKind, mixed_sequence
from bagel.text.decoding import Sampling, TextDecoder, Token, decode
from prefill_service.decode_scheduler import DecodeJob, DecodeScheduler, Prefilled
from prefill_service.model_turns import ModelTurns

NO_END = -1


class RecordingDecoder(TextDecoder):
    """Records the keys in the batch at every step."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.batches: list[set] = []

    def step(self) -> list[Token]:
        self.batches.append({r.key for r in self.active})
        return super().step()


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path):
    return load_bagel(tiny_model_dir, "prefill", torch.float32, lm_head=True)


def job(model, i: int, length: int) -> DecodeJob:
    ids = tuple(range(5 + i, 12 + 2 * i))
    seq = mixed_sequence(model, [Segment(SegmentKind.TEXT, len(ids), ids)])
    return DecodeJob(lambda: (seq, len(ids)), Sampling(length), NO_END)


def test_late_joiners_get_their_solo_tokens_and_a_cancelled_request_leaves_at_once(model):
    decoder = RecordingDecoder(model, max_batch=4, max_tokens=1100, graphs=False)
    scheduler = DecodeScheduler(decoder)

    async def run() -> tuple[dict[int, list[int]], int, int]:
        tokens: dict[int, list[int]] = {}

        async def read(i: int, length: int, delay: float) -> None:
            await asyncio.sleep(delay)
            stream = scheduler.submit(job(model, i, length))
            tokens[i] = []
            async for item in stream:
                if not isinstance(item, Prefilled):
                    tokens[i].append(item.token)

        cancelled = scheduler.submit(job(model, 9, 1000))
        seen = 0
        async for item in cancelled:
            seen += not isinstance(item, Prefilled)
            if seen == 5:
                break
        cancelled.cancel()
        steps_at_cancel = len(decoder.batches)
        await asyncio.gather(read(0, 30, 0.0), read(1, 12, 0.01), read(2, 20, 0.02))
        return tokens, cancelled.key, steps_at_cancel

    try:
        tokens, cancelled_key, steps_at_cancel = asyncio.run(run())
    finally:
        scheduler.close()
    for i, length in ((0, 30), (1, 12), (2, 20)):
        j = job(model, i, length)
        prompt, position = j.build()
        assert tokens[i] == decode(model, prompt, position, j.sampling, NO_END).tokens, i
    # The step running when the cancel came may finish; none after it holds the request.
    holding = [n for n, keys in enumerate(decoder.batches) if cancelled_key in keys]
    assert holding and max(holding) <= steps_at_cancel


def test_joins_and_steps_wait_for_their_turn_on_the_model(model):
    """While another user of the model (the KV-prefill worker) holds a turn, no request joins
    and no step runs; once it lets go, the request decodes its solo tokens."""
    turns = ModelTurns()
    decoder = RecordingDecoder(model, max_batch=2, max_tokens=64, graphs=False)
    scheduler = DecodeScheduler(decoder, turns)
    held, release = threading.Event(), threading.Event()

    def other_user() -> None:
        with turns:
            held.set()
            release.wait(10)

    user = threading.Thread(target=other_user)
    user.start()

    async def run() -> list[int]:
        assert held.wait(10)
        stream = scheduler.submit(job(model, 0, 6))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(anext(stream), 0.3)  # neither joined nor stepped
        assert decoder.batches == [] and not decoder.active
        release.set()
        return [item.token async for item in stream if not isinstance(item, Prefilled)]

    try:
        tokens = asyncio.run(run())
    finally:
        release.set()
        user.join(10)
        scheduler.close()
    j = job(model, 0, 6)
    prompt, position = j.build()
    assert tokens == decode(model, prompt, position, j.sampling, NO_END).tokens
