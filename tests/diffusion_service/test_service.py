"""The diffusion service as a real process: real ranks, real gRPC clients on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import io
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from bagel.pipeline import Pipeline
from diffusion_service.engine import Engine
from diffusion_service.job import JobSpec
from serving.errors import ServiceError
from serving.params import GenerationParams
from tests.diffusion_service.kv_stream import generate, kv_frames, latents_of
from tests.helpers.metrics import metrics_when
from tests.helpers.processes import ROOT, ServiceProcess, children_of, health_status, pids_with_arg
from tests.helpers.ranks import free_port
from transport.rpc import diffusion_generate

PARAMS = GenerationParams(height=48, width=80, num_timesteps=8, seed=11)
SLOW = GenerationParams(height=128, width=128, num_timesteps=200, seed=1)


@pytest.fixture(scope="module")
def pipeline(tiny_model_dir: Path) -> Pipeline:
    return Pipeline(tiny_model_dir, "cpu")


@pytest.fixture(scope="module")
def contexts(pipeline):
    return pipeline.prefill("a yellow submarine", negative_prompt="grey")


def service(model_dir: Path, *args: str) -> ServiceProcess:
    return ServiceProcess("diffusion_service", ["--model", str(model_dir), *args])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def ulysses2(tiny_model_dir):
    with service(tiny_model_dir, "--ulysses", "2", "--max-queue", "2") as svc:
        yield svc.wait_serving()


def test_png_through_the_service_equals_the_in_process_reference(ulysses2, pipeline, contexts):
    events = generate(ulysses2.address, kv_frames(contexts, pipeline.config.fingerprint(), PARAMS))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "accepted" and kinds[-2:] == ["timings", "image"]
    progress = [e.progress for e in events if e.WhichOneof("event") == "progress"]
    assert [(p.step, p.total_steps) for p in progress] == [(i, 7) for i in range(1, 8)]
    image = np.asarray(Image.open(io.BytesIO(events[-1].image.png)).convert("RGB"), dtype=int)
    reference = np.asarray(
        pipeline.decode(pipeline.denoise(contexts, PARAMS), PARAMS.height, PARAMS.width), dtype=int
    )
    assert image.shape == reference.shape == (48, 80, 3)
    assert np.abs(image - reference).max() <= 1
    timings = events[-2].timings
    assert timings.denoise_ms > 0 and timings.decode_ms > 0 and timings.HasField("broadcast_ms")


# Each topology starts a service of its own; `make test` keeps the two that combine two kinds of
# parallelism, the single kinds are `slow` (CI runs every one).
@pytest.mark.parametrize(
    "topology",
    [
        pytest.param(("--ring", "2"), id="ring2", marks=pytest.mark.slow),
        pytest.param(("--ulysses", "2", "--ring", "2"), id="u2xr2"),
        pytest.param(("--cfg-parallel", "2"), id="cfg2", marks=pytest.mark.slow),
        pytest.param(("--cfg-parallel", "2", "--ulysses", "2"), id="cfg2xu2"),
        pytest.param(("--ring", "3"), id="ring3", marks=pytest.mark.slow),
    ],
)
def test_every_topology_through_the_service_equals_the_single_process_latents(
    tiny_model_dir, pipeline, contexts, topology
):
    expected = pipeline.denoise(contexts, PARAMS)  # 15 tokens: divides none of the degrees
    reference = np.asarray(pipeline.decode(expected, PARAMS.height, PARAMS.width), dtype=int)
    fp = pipeline.config.fingerprint()
    with service(tiny_model_dir, *topology) as svc:
        svc.wait_serving()
        got = latents_of(generate(svc.address, kv_frames(contexts, fp, PARAMS, latents_only=True)))
        png = generate(svc.address, kv_frames(contexts, fp, PARAMS))[-1].image.png
    assert rel_err(got, expected) < 1e-5
    image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=int)
    assert np.abs(image - reference).max() <= 1


@pytest.mark.slow  # an interpreter per refused topology: ~8 s
def test_invalid_topologies_fail_at_start_up_listing_the_valid_choices(tiny_model_dir):
    for args, expected in (
        (["--ulysses", "3"], "valid ulysses degrees: 1, 2, 4"),
        (["--ulysses", "8"], "valid ulysses degrees: 1, 2, 4"),
    ):
        run = subprocess.run(
            [sys.executable, "-m", "diffusion_service", "--model", str(tiny_model_dir), *args],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 2, run.stderr
        assert expected in run.stderr


def test_wrong_fingerprint_is_invalid_argument_and_the_service_keeps_serving(
    ulysses2, pipeline, contexts
):
    with pytest.raises(grpc.RpcError) as err:
        generate(ulysses2.address, kv_frames(contexts, "0" * 32, PARAMS))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "fingerprint" in err.value.details()
    bad = GenerationParams(height=40, width=80, num_timesteps=8)
    with pytest.raises(grpc.RpcError) as err:
        generate(ulysses2.address, kv_frames(contexts, pipeline.config.fingerprint(), bad))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "height=40" in err.value.details()
    events = generate(ulysses2.address, kv_frames(contexts, pipeline.config.fingerprint(), PARAMS))
    assert events[-1].WhichOneof("event") == "image"


def _stream_until_step(address, frames, step, timeout=60.0, cancel=True):
    channel = grpc.insecure_channel(address)
    call = __import__("transport.rpc", fromlist=["x"]).diffusion_generate(channel)(
        frames, timeout=timeout
    )
    try:
        for event in call:
            if event.WhichOneof("event") == "progress" and event.progress.step >= step and cancel:
                call.cancel()
        return None
    except grpc.RpcError as e:
        return e
    finally:
        channel.close()


def test_cancel_and_deadline_mid_denoising_end_the_call_and_the_next_request_is_correct(
    ulysses2, pipeline, contexts
):
    fp = pipeline.config.fingerprint()
    err = _stream_until_step(ulysses2.address, kv_frames(contexts, fp, SLOW), step=3)
    assert err.code() == grpc.StatusCode.CANCELLED
    err = _stream_until_step(
        ulysses2.address, kv_frames(contexts, fp, SLOW), 0, timeout=1.5, cancel=False
    )
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    start = time.monotonic()
    expected = pipeline.denoise(contexts, PARAMS)
    got = latents_of(generate(ulysses2.address, kv_frames(contexts, fp, PARAMS, latents_only=True)))
    assert rel_err(got, expected) < 1e-5
    assert time.monotonic() - start < 30  # the stopped jobs did not keep the ranks busy


def test_a_queue_of_2_takes_exactly_2_behind_the_running_job_and_refuses_the_rest(
    ulysses2, pipeline, contexts
):
    """`--max-queue 2`: with one job running, 4 more requests give queue positions 1 and 2 and
    exactly 2 RESOURCE_EXHAUSTED."""
    fp = pipeline.config.fingerprint()
    running = threading.Event()
    channel = grpc.insecure_channel(ulysses2.address)
    first = diffusion_generate(channel)(kv_frames(contexts, fp, SLOW), timeout=60)

    def follow_first() -> None:
        try:
            for event in first:
                if event.WhichOneof("event") == "progress":
                    running.set()
        except grpc.RpcError:
            pass

    follower = threading.Thread(target=follow_first)
    follower.start()
    outcomes: list = []

    def queued_request() -> None:
        positions = []
        with grpc.insecure_channel(ulysses2.address) as ch:
            try:
                for event in diffusion_generate(ch)(kv_frames(contexts, fp, SLOW), timeout=4.0):
                    if event.WhichOneof("event") == "accepted":
                        positions.append(event.accepted.queue_position)
                outcomes.append(("finished", positions))
            except grpc.RpcError as e:
                outcomes.append((e.code().name, positions, e.details()))

    try:
        assert running.wait(30), "the first job did not start"
        threads = [threading.Thread(target=queued_request) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    finally:
        first.cancel()
        follower.join(10)
        channel.close()
    refused = [o for o in outcomes if o[0] == "RESOURCE_EXHAUSTED"]
    queued = [o for o in outcomes if o[0] != "RESOURCE_EXHAUSTED"]
    assert len(refused) == 2, outcomes
    assert all(o[1] == [] and "the queue is full (2 requests waiting)" in o[2] for o in refused)
    assert sorted(p for o in queued for p in o[1]) == [1, 2], outcomes
    assert {o[0] for o in queued} == {"DEADLINE_EXCEEDED"}, outcomes


def test_reflection_lists_the_services(ulysses2):
    with grpc.insecure_channel(ulysses2.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        (reply,) = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
    names = {s.name for s in reply.list_services_response.service}
    assert {"bagel.v1.Diffusion", "grpc.health.v1.Health"} <= names


@pytest.mark.slow  # a 2-rank group killed and restarted: ~11 s
def test_a_dead_rank_fails_the_request_with_unavailable_and_the_group_restarts(
    tiny_model_dir, pipeline, contexts
):
    fp = pipeline.config.fingerprint()
    long_job = GenerationParams(height=128, width=128, num_timesteps=1000, seed=1)
    with service(tiny_model_dir, "--ulysses", "2", "--collective-timeout", "10") as svc:
        svc.wait_serving()
        (launcher,) = children_of(svc.proc.pid)
        (worker,) = children_of(launcher)
        steps: list[int] = []
        outcome: list = []

        def follow() -> None:
            with grpc.insecure_channel(svc.address) as channel:
                try:
                    for event in diffusion_generate(channel)(
                        kv_frames(contexts, fp, long_job), timeout=60
                    ):
                        if event.WhichOneof("event") == "progress":
                            steps.append(event.progress.step)
                    outcome.append("finished")
                except grpc.RpcError as e:
                    outcome.append(e)

        statuses: list[str] = []
        watch_channel = grpc.insecure_channel(svc.address)
        watch = health_pb2_grpc.HealthStub(watch_channel).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=90
        )

        def watch_health() -> None:
            try:
                for reply in watch:
                    statuses.append(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
                    if statuses[-2:] == ["NOT_SERVING", "SERVING"]:
                        return
            except grpc.RpcError:
                pass

        watcher = threading.Thread(target=watch_health)
        watcher.start()
        thread = threading.Thread(target=follow)
        thread.start()
        deadline = time.monotonic() + 30
        while len(steps) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(worker, signal.SIGKILL)
        thread.join(60)
        watcher.join(60)
        watch.cancel()
        watch_channel.close()
        assert statuses[0] == "SERVING" and statuses[-2:] == ["NOT_SERVING", "SERVING"], statuses
        assert outcome and isinstance(outcome[0], grpc.RpcError), outcome
        assert outcome[0].code() == grpc.StatusCode.UNAVAILABLE, outcome[0].details()
        assert steps[-1] < 1000
        svc.wait_serving(60)
        (new_worker,) = children_of(launcher)
        assert new_worker != worker
        got = latents_of(generate(svc.address, kv_frames(contexts, fp, PARAMS, latents_only=True)))
        assert rel_err(got, pipeline.denoise(contexts, PARAMS)) < 1e-5


@pytest.mark.slow  # a 4-rank service started for its SIGTERM: ~12 s
def test_health_goes_not_serving_on_sigterm_and_no_rank_process_is_left(tiny_model_dir):
    svc = service(tiny_model_dir, "--ulysses", "2", "--ring", "2")
    try:
        svc.wait_serving()
        assert health_status(svc.address, "bagel.v1.Diffusion") == "SERVING"
        assert len(pids_with_arg(f"--listen {svc.address}")) == 5  # rank 0, launcher, 3 workers
        assert svc.stop() == 0
        assert svc.leftover_pids() == []
    finally:
        svc.__exit__()


@pytest.mark.slow  # four interpreters for the torchrun form of the refusal tested above
def test_a_torchrun_world_that_is_not_the_product_of_the_degrees_fails_listing_valid_choices(
    tiny_model_dir,
):
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "3", "-m", "diffusion_service",
         "--model", str(tiny_model_dir), "--ulysses", "2", "--listen", "127.0.0.1:0"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode != 0
    output = run.stdout + run.stderr
    assert "world size 3" in output, output[-3000:]
    assert (
        "Valid topologies for 3 ranks and 4 KV heads: (cfg_parallel=1, ring=3, ulysses=1)" in output
    )


@pytest.mark.slow  # a torchrun agent and two workers: ~20 s; the launcher forms run in `make test`
def test_the_service_joins_a_world_started_by_torchrun(tiny_model_dir, pipeline, contexts):
    args = ["--nproc-per-node", "2", "-m", "diffusion_service", "--model", str(tiny_model_dir)]
    with ServiceProcess("torch.distributed.run", [*args, "--ulysses", "2"]) as svc:
        svc.wait_serving()
        frames = kv_frames(contexts, pipeline.config.fingerprint(), PARAMS, latents_only=True)
        got = latents_of(generate(svc.address, frames))
        assert rel_err(got, pipeline.denoise(contexts, PARAMS)) < 1e-5
        svc.stop()
        assert svc.leftover_pids() == []


def test_metrics_count_requests_steps_kv_bytes_and_phases(tiny_model_dir, pipeline, contexts):
    metrics_port = free_port()
    with service(tiny_model_dir, "--metrics-port", str(metrics_port)) as svc:
        svc.wait_serving()
        generate(svc.address, kv_frames(contexts, pipeline.config.fingerprint(), PARAMS))
        with pytest.raises(grpc.RpcError):
            generate(svc.address, kv_frames(contexts, "0" * 32, PARAMS))
        # The servicer counts a failed request after `context.abort` has sent its status, so the
        # client can see the status first: wait (bounded) for the count instead of racing it.
        text = metrics_when(metrics_port, 'requests_total{code="INVALID_ARGUMENT"}')
    assert 'bagel_diffusion_requests_total{code="OK"} 1.0' in text
    assert 'bagel_diffusion_requests_total{code="INVALID_ARGUMENT"} 1.0' in text
    assert 'bagel_diffusion_steps_total{cached="false",policy="none"} 7.0' in text
    kv_bytes = float(
        next(
            line.split()[1]
            for line in text.splitlines()
            if line.startswith("bagel_diffusion_kv_bytes_total")
        )
    )
    assert kv_bytes > 0
    assert 'bagel_diffusion_phase_seconds_count{phase="denoise"} 1.0' in text
    load_s = next(
        float(line.split()[1])
        for line in text.splitlines()
        if line.startswith("bagel_diffusion_model_load_seconds ")
    )
    assert load_s > 0
    assert "bagel_diffusion_peak_memory_bytes{" not in text  # GPU ranks only


# ---- hostile senders, bounded uploads, non-finite values, start and stop -------------------


@pytest.mark.parametrize(
    "request_id",
    ["forged\n2026-12-01 INFO diffusion_service: request admin: done", "z\x1b[2J" * 25_000],
    ids=["newline", "100k"],
)
def test_a_bad_request_id_in_the_header_is_rejected_and_never_logged_raw(
    ulysses2, pipeline, contexts, request_id
):
    fp = pipeline.config.fingerprint()
    with pytest.raises(grpc.RpcError) as err:
        generate(ulysses2.address, kv_frames(contexts, fp, PARAMS, request_id=request_id))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request_id must be 1 to 128 printable ASCII characters" in err.value.details()
    assert request_id[:20] not in err.value.details()
    log = ulysses2.log()
    assert request_id[:20] not in log and "\x1b" not in log
    events = generate(ulysses2.address, kv_frames(contexts, fp, PARAMS, request_id="ok-2"))
    assert events[0].accepted.request_id == "ok-2" and events[-1].WhichOneof("event") == "image"


def _with_value(contexts, value: float):
    """`contexts` with one value of the cond context's layer-1 V replaced by `value`."""
    out = dict(contexts)
    kind, cond = next(iter(contexts.items()))
    values = [v.clone() for v in cond.values]
    values[1].view(-1)[7] = value
    out[kind] = dataclasses.replace(cond, values=values)
    return out


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_kv_cache_with_nan_or_inf_is_invalid_argument_and_makes_no_image(
    ulysses2, pipeline, contexts, value
):
    fp = pipeline.config.fingerprint()
    with pytest.raises(grpc.RpcError) as err:
        generate(ulysses2.address, kv_frames(_with_value(contexts, value), fp, PARAMS))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "the KV cache holds NaN or Inf values (first in context 0 (cond) layer 1 V)" in (
        err.value.details()
    )
    events = generate(ulysses2.address, kv_frames(contexts, fp, PARAMS))
    assert events[-1].WhichOneof("event") == "image"


@pytest.mark.parametrize("output_format", ["png", "latents"])
def test_non_finite_latents_at_the_end_are_data_loss_not_an_image(output_format):
    spec = JobSpec(7, dataclasses.replace(PARAMS, output_format=output_format))
    latents = torch.zeros(1, 16, 3, 5)
    latents[0, 3, 1, 2] = float("nan")
    with pytest.raises(ServiceError) as err:
        Engine._output(SimpleNamespace(autoencoder=None, config=None), spec, latents)
    assert err.value.code == grpc.StatusCode.DATA_LOSS
    assert err.value.message == (
        "job 7: the denoised latents hold NaN or Inf values (1 of 240); no image was made"
    )


def _kv_bytes(contexts) -> int:
    return sum(t.numel() * t.element_size() for c in contexts.values() for t in c.keys + c.values)


@pytest.fixture(scope="module")
def limited(tiny_model_dir, contexts):
    """One rank, a 1.5 s idle timeout, and room for one upload of `contexts` in flight."""
    room = str(_kv_bytes(contexts) * 3 // 2)
    args = ("--kv-idle-timeout", "1.5", "--max-inflight-kv-bytes", room)
    with service(tiny_model_dir, *args) as svc:
        yield svc.wait_serving()


class ParkedUpload:
    """Sends the header and two chunks, then keeps the stream open and silent until `release`."""

    def __init__(self, address: str, frames) -> None:
        self.channel = grpc.insecure_channel(address)
        self.sent = threading.Event()
        self._release = threading.Event()
        self.outcome: list = []
        frames = list(frames)

        def requests():
            yield from frames[:3]
            self.sent.set()
            self._release.wait(30)

        def run() -> None:
            try:
                self.outcome.append(list(diffusion_generate(self.channel)(requests(), timeout=30)))
            except grpc.RpcError as e:
                self.outcome.append(e)

        self.started = time.monotonic()
        self.thread = threading.Thread(target=run)
        self.thread.start()
        assert self.sent.wait(10)

    def result(self):
        self.thread.join(20)
        self._release.set()
        self.channel.close()
        return self.outcome[0]

    def release(self) -> None:
        self._release.set()


def test_an_upload_that_stops_sending_is_deadline_exceeded_after_the_idle_timeout(
    limited, pipeline, contexts
):
    fp = pipeline.config.fingerprint()
    parked = ParkedUpload(limited.address, kv_frames(contexts, fp, PARAMS))
    err = parked.result()
    assert isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "no KV frame for 1.5 s after" in err.details() and "abandoned" in err.details()
    assert 1.4 < time.monotonic() - parked.started < 5
    events = generate(limited.address, kv_frames(contexts, fp, PARAMS))
    assert events[-1].WhichOneof("event") == "image"


def test_a_silent_upload_gives_its_room_in_the_in_flight_budget_to_the_next(
    limited, pipeline, contexts
):
    fp = pipeline.config.fingerprint()
    parked = ParkedUpload(limited.address, kv_frames(contexts, fp, PARAMS))
    try:  # no room beside the parked upload until it has been silent for --kv-stall-timeout
        events = generate(limited.address, kv_frames(contexts, fp, PARAMS))
    finally:
        parked.release()
    assert events[-1].WhichOneof("event") == "image"
    err = parked.result()
    assert isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "upload evicted after" in err.details() and "without progress" in err.details()


@pytest.mark.slow  # a service in a session of its own, loaded, then SIGTERM: ~15 s
def test_requests_while_loading_are_unavailable_and_sigterm_to_the_group_stops_quietly(
    tiny_model_dir, pipeline, contexts
):
    """Started in a session of its own, so that `killpg` reaches rank 0 and the launcher (the
    workers sit in groups of their own)."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    log_file = tempfile.NamedTemporaryFile(prefix="diffusion-", suffix=".log")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "diffusion_service", "--model", str(tiny_model_dir),
         "--ulysses", "2", "--listen", address],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"},
        stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    fp = pipeline.config.fingerprint()
    try:
        early: grpc.RpcError | None = None
        deadline = time.monotonic() + 60
        while early is None and time.monotonic() < deadline:
            try:
                generate(address, kv_frames(contexts, fp, PARAMS), timeout=5)
                break  # loaded before we got through: nothing to see
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.UNAVAILABLE and "loading" in e.details():
                    early = e
                else:
                    assert e.code() == grpc.StatusCode.UNAVAILABLE, e.details()
                    time.sleep(0.01)  # not listening yet
        assert early is not None and early.details() == (
            "the diffusion service is loading (its ranks are starting); retry shortly"
        )
        while health_status(address, "bagel.v1.Diffusion") != "SERVING":
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)
        assert generate(address, kv_frames(contexts, fp, PARAMS))[-1].WhichOneof("event") == "image"
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(30) == 0
        assert pids_with_arg(f"--listen {address}") == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log = Path(log_file.name).read_text(errors="replace")
        log_file.close()
    assert "stopped" in log
    assert "restarting the rank group failed" not in log
    assert "Traceback" not in log and "SystemExit" not in log, log
