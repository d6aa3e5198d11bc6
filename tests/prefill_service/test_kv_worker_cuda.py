"""The KV-prefill worker on a GPU (GPU only): frames computed on its own CUDA stream equal the
frames computed in process on the default stream bit for bit, the worker runs on a stream of
its own, and a prefill pass (no copies to the host) waits for the GPU nowhere."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bagel.checkpoints.checkpoint import load_bagel
from prefill_service.kv_worker import KVWorker
from prefill_service.prefill import LanguageModelKV, PrefillStats, request_frames
from serving.params import GenerationParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.fixture(scope="module")
def source(tiny_model_dir: Path) -> LanguageModelKV:
    return LanguageModelKV(tiny_model_dir, "cuda", image_input=False)


def frames(source: LanguageModelKV, prompt: str, negative: str) -> list[list[bytes]]:
    params = GenerationParams(height=64, width=64, seed=1, negative_prompt=negative)
    planned = source.plan(prompt, params)
    return request_frames(
        source, planned, request_id="cuda-1", params=params, stats=PrefillStats(), chunk_size=512
    )


@pytest.mark.parametrize("negative", ["", "blurry, low quality"])
def test_frames_from_the_worker_stream_equal_the_in_process_frames(source, negative):
    prompt = "A cute cat sitting on a blue sofa"
    expected = list(frames(source, prompt, negative))
    streams: list[torch.cuda.Stream] = []
    worker = KVWorker()
    try:

        def recorded():
            for batch in frames(source, prompt, negative):
                streams.append(torch.cuda.current_stream())
                yield batch

        got = list(worker.submit(recorded()).batches())
    finally:
        worker.close()
    assert got == expected
    assert streams and all(s == streams[0] for s in streams)
    assert streams[0] != torch.cuda.default_stream()  # the worker's own stream


def test_a_prefill_pass_waits_for_the_gpu_nowhere_and_matches_fp32_on_the_cpu(
    source, tiny_model_dir
):
    prompts = [list(range(5, 20)), list(range(7, 12)), []]  # ragged: the padding mask is built
    list(source.model.prefill_layers(prompts))  # warm: kernels compiled, pinned blocks cached
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        layers = list(source.model.prefill_layers(prompts))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(layers) == source.config.llm.num_layers

    # The ids and the mask arrived whole: the bf16 K/V follow the fp32 prefill on the CPU.
    reference = load_bagel(tiny_model_dir, "prefill", torch.float32, "cpu").prefill(prompts)
    for layer, (keys, values) in enumerate(layers):
        for b, context in enumerate(reference):
            for got, want in ((keys[b], context.keys[layer]), (values[b], context.values[layer])):
                assert got.shape == want.shape
                if want.numel():
                    err = (got.float().cpu() - want).abs().max()
                    assert err <= 0.05 * want.abs().max(), (layer, b)
