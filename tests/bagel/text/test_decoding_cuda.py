"""Text decoding on CUDA (GPU only): the CUDA-graphed step gives each request of a batch the
tokens the eager step gives it, in fp32 and bf16, and fp32 on the GPU gives the CPU's tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bagel.checkpoints.checkpoint import load_bagel
from bagel.kernels.graphs import GraphedCall
from bagel.prompting.contexts import Segment, SegmentKind, mixed_sequence
from bagel.text.decoding import Sampling, TextDecoder, decode

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
NO_END = -1
LENGTHS = [40, 17, 64, 5, 33]


def prompts(model, count: int):
    out = []
    for i in range(count):
        ids = tuple(range(3 + i, 3 + i + 6 + 5 * i))
        seq = mixed_sequence(model, [Segment(SegmentKind.TEXT, len(ids), ids)])
        out.append((seq, len(ids)))
    return out


def batched(model, graphs: bool) -> tuple[dict[int, list[int]], TextDecoder]:
    decoder = TextDecoder(model, max_batch=8, max_tokens=256, graphs=graphs)
    got: dict[int, list[int]] = {}
    for i, (seq, position) in enumerate(prompts(model, len(LENGTHS))):
        got[i] = [decoder.join(i, seq, position, Sampling(LENGTHS[i]), NO_END).token]
    while decoder.active:
        for t in decoder.step():
            got[t.key].append(t.token)
    return got, decoder


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graphed_steps_equal_eager_steps_for_every_request(tiny_model_dir: Path, dtype):
    model = load_bagel(tiny_model_dir, "prefill", dtype, "cuda", lm_head=True)
    graphed, decoder = batched(model, graphs=True)
    eager, _ = batched(model, graphs=False)
    assert decoder._captured and all(isinstance(c, GraphedCall) for c in decoder._captured.values())
    assert graphed == eager
    assert [len(graphed[i]) for i in range(len(LENGTHS))] == LENGTHS


def test_fp32_on_the_gpu_decodes_the_cpus_tokens(tiny_model_dir: Path):
    gpu = load_bagel(tiny_model_dir, "prefill", torch.float32, "cuda", lm_head=True)
    cpu = load_bagel(tiny_model_dir, "prefill", torch.float32, "cpu", lm_head=True)
    graphed, _ = batched(gpu, graphs=True)
    for i, (seq, position) in enumerate(prompts(cpu, len(LENGTHS))):
        solo = decode(cpu, seq, position, Sampling(LENGTHS[i]), NO_END)
        assert graphed[i] == solo.tokens, i


def test_captures_after_the_cache_grows_are_graphs_and_decode_the_eager_tokens(
    tiny_model_dir: Path,
):
    """Growing the cache drops every capture, and with the last one their memory pool: later
    captures need a new pool (reusing the freed one fails inside PyTorch's allocator)."""
    model = load_bagel(tiny_model_dir, "prefill", torch.float32, "cuda", lm_head=True)

    def run(graphs: bool) -> tuple[list[int], TextDecoder]:
        decoder = TextDecoder(model, max_batch=2, max_tokens=1024, graphs=graphs)
        short, position = prompts(model, 1)[0]
        tokens = [decoder.join(0, short, position, Sampling(8), NO_END).token]
        tokens += [t.token for _ in range(3) for t in decoder.step()]  # captured at capacity 256
        ids = tuple(range(3, 303))  # 300 tokens: the cache grows to 512
        long = mixed_sequence(model, [Segment(SegmentKind.TEXT, len(ids), ids)])
        tokens.append(decoder.join(1, long, len(ids), Sampling(12), NO_END).token)
        while decoder.active:
            tokens += [t.token for t in decoder.step()]
        return tokens, decoder

    graphed, decoder = run(graphs=True)
    eager, _ = run(graphs=False)
    assert decoder.cache.capacity == 512
    assert decoder._captured and all(isinstance(c, GraphedCall) for c in decoder._captured.values())
    assert graphed == eager


def test_steps_launched_ahead_give_each_request_its_tokens_alone_across_joins_and_leaves(
    tiny_model_dir: Path,
):
    """While every request is greedy the next step is launched before `step` returns; a join, a
    sampled neighbour and a leave drop it, and every request still gets its tokens alone."""
    model = load_bagel(tiny_model_dir, "prefill", torch.float32, "cuda", lm_head=True)
    seqs = prompts(model, 3)
    plans = [Sampling(30), Sampling(20, do_sample=True, temperature=0.7, seed=3), Sampling(25)]
    decoder = TextDecoder(model, max_batch=4, max_tokens=256, graphs=True)
    got: dict[int, list[int]] = {}

    def join(i: int) -> None:
        got[i] = [decoder.join(i, *seqs[i], plans[i], NO_END).token]

    def steps(n: int) -> None:
        for _ in range(n):
            for t in decoder.step():
                got[t.key].append(t.token)

    join(0)
    steps(5)
    assert decoder._ahead is not None  # greedy alone: the next step is on its way
    join(1)
    steps(4)
    assert decoder._ahead is None  # a sampled request in the batch: nothing ahead
    join(2)
    steps(3)
    assert decoder.leave(1)
    steps(2)
    assert decoder._ahead is not None
    while decoder.active:
        steps(1)
    for i in (0, 2):
        assert got[i] == decode(model, *seqs[i], plans[i], NO_END).tokens, i
    assert got[1] == decode(model, *seqs[1], plans[1], NO_END).tokens[: len(got[1])]
