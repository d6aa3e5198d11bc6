"""The prefill service computes every request's KV on its one KV-prefill worker thread, over real
gRPC against the fake diffusion service: the frames that arrive are the in-process frames bit
for bit, consecutive requests share the thread, a cancelled call computes no further layer, a
failure keeps its status, and the server's stop joins the thread."""

from __future__ import annotations

import threading

import grpc
import pytest

from client import BagelClient
from prefill_service.prefill import PrefillStats, request_frames
from prefill_service.settings import PrefillSettings
from serving.errors import ServiceError
from serving.params import GenerationParams
from tests.prefill_service.conftest import RunningPrefill
from tests.prefill_service.test_kv_worker import wait_until

SMALL = {"height": 64, "width": 64}
WAIT_S = 10.0


def test_frames_that_arrive_equal_the_in_process_frames_bit_for_bit(
    prefill, fake_diffusion, lm_source
):
    prompt, negative = "A cute cat sitting on a blue sofa", "blurry"
    with BagelClient(prefill.address, timeout=30) as client:
        client.generate(prompt, seed=52, negative_prompt=negative, request_id="bits-1", **SMALL)
    [call] = fake_diffusion.calls

    # The same request, computed on this thread by the KV source itself (no worker, no service).
    source = lm_source.inner
    params = GenerationParams.from_proto(call.received.params)
    in_process = request_frames(
        source,
        source.plan(prompt, params),
        request_id="bits-1",
        params=params,
        stats=PrefillStats(),
        chunk_size=prefill.server.settings.chunk_size,
    )
    expected = [frame for batch in in_process for frame in batch]
    assert len(call.raw) == len(expected) > 2 + source.config.llm.num_layers
    assert call.raw == expected


def test_the_kv_of_consecutive_requests_is_computed_on_the_one_worker_thread(
    prefill, fake_diffusion, lm_source
):
    threads: list[threading.Thread] = []
    lm_source.before_layer = lambda index: threads.append(threading.current_thread())
    with BagelClient(prefill.address, timeout=30) as client:
        client.generate("A cute cat", seed=1, **SMALL)
        client.generate("A red apple", seed=2, **SMALL)
    worker = prefill.server.worker.thread
    assert len(threads) == 2 * lm_source.config.llm.num_layers  # every layer of both
    assert set(threads) == {worker} and worker.is_alive()
    assert worker is not threading.current_thread()


def test_a_cancelled_call_computes_no_further_layer_and_the_next_request_is_served(
    prefill, fake_diffusion, lm_source
):
    num_layers = lm_source.config.llm.num_layers
    events = None
    cancelled = threading.Event()

    def before_layer(index: int) -> None:
        if index == 1 and not cancelled.is_set():
            # Cancel the caller's call while the worker is about to compute layer 1, and hold
            # the layer until the cancel has reached the diffusion call (the job is cancelled
            # before the downstream call is).
            fake_diffusion.layer0_seen.wait(WAIT_S)
            events.cancel()
            cancelled.set()
            fake_diffusion.calls[0].ended.wait(WAIT_S)

    lm_source.before_layer = before_layer
    with BagelClient(prefill.address) as client:
        events = client.stream("A cute cat", seed=3, timeout=30, **SMALL)
        with pytest.raises(grpc.RpcError) as info:
            list(events)
    assert info.value.code() is grpc.StatusCode.CANCELLED
    assert cancelled.is_set()
    [call] = fake_diffusion.calls
    # (A cancel in the middle of the stream can reach the fake as the end of its requests.)
    assert call.ended.wait(WAIT_S) and call.received is None and not call.completed
    assert wait_until(lambda: prefill.server.worker.jobs == 0)  # the job is dropped
    # Layers 0 and 1 (in progress at the cancel); never the rest.
    assert len(lm_source.layer_done_times) == 2 < num_layers

    lm_source.reset()
    fake_diffusion.reset()
    with BagelClient(prefill.address, timeout=30) as client:
        assert client.generate("A red apple", seed=4, **SMALL).seed == 4
    assert len(lm_source.layer_done_times) == num_layers


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (RuntimeError("device fell off the bus"), grpc.StatusCode.INTERNAL),
        (
            ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, "out of GPU memory"),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        ),
    ],
    ids=["runtime", "service-error"],
)
def test_a_failure_in_the_kv_computation_keeps_its_status(
    prefill, fake_diffusion, lm_source, error, code
):
    def before_layer(index: int) -> None:
        if index == 2:
            raise error

    lm_source.before_layer = before_layer
    with BagelClient(prefill.address, timeout=30) as client, pytest.raises(grpc.RpcError) as info:
        client.generate("A cute cat", seed=3, **SMALL)
    assert info.value.code() is code
    assert str(error) in info.value.details()
    [call] = fake_diffusion.calls
    assert call.ended.wait(WAIT_S) and call.received is None
    lm_source.reset()
    with BagelClient(prefill.address, timeout=30) as client:
        assert client.generate("A cute cat", seed=5, **SMALL).seed == 5


def test_the_servers_stop_joins_its_kv_worker(
    loop_thread, tiny_model_dir, fake_diffusion, lm_source
):
    settings = PrefillSettings(
        model_dir=str(tiny_model_dir), listen="127.0.0.1:0", diffusion=fake_diffusion.address
    )
    running = RunningPrefill(loop_thread, settings, lm_source)
    worker = running.server.worker
    try:
        with BagelClient(running.address, timeout=30) as client:
            assert client.generate("A cute cat", seed=6, **SMALL).seed == 6
        assert worker.thread.is_alive()
    finally:
        running.stop()
    assert not worker.thread.is_alive()
