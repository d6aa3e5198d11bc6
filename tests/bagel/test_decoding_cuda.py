"""Text decoding on CUDA (GPU only): the CUDA-graphed step gives each request of a batch the
tokens the eager step gives it, in fp32 and bf16, and fp32 on the GPU gives the CPU's tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bagel.checkpoint import load_bagel
from bagel.contexts import Segment, SegmentKind, mixed_sequence
from bagel.decoding import Sampling, TextDecoder, decode
from bagel.graphs import GraphedCall

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
