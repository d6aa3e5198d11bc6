"""The prefill -> diffusion hop under abuse and faults, on one pair whose hop runs through a TCP
proxy (`tests.helpers.tcp_proxy`): four uploads that announce 1 GiB each and go silent cannot
lock a valid request out of `--max-inflight-kv-bytes` (default 4 GiB); a connection cut
mid-upload ends the request UNAVAILABLE, and one stalled mid-upload ends it DEADLINE_EXCEEDED at
the caller's deadline; after each, the next request equals the reference and nothing leaks
(uploads and reserved bytes back to 0, file descriptors and memory as before)."""

from __future__ import annotations

import dataclasses
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from bagel.pipeline import Pipeline
from client import BagelClient
from protos import DiffusionFrame
from protos.options import channel_options
from tests.helpers.metrics import metrics_when
from tests.helpers.processes import ServiceProcess
from tests.helpers.ranks import free_port
from tests.helpers.tcp_proxy import TcpProxy
from tests.reliability.conftest import PROMPT, SMALL, ServicePair, Tally, kv_bytes, pixels
from transport.encoder import encode_kv
from transport.rpc import diffusion_generate

SEED = 5
ANNOUNCED = 1 << 30
IDLE_TIMEOUT_S = 4.0
STALL_S = 1.0  # the service's default --kv-stall-timeout


@dataclasses.dataclass
class Hop:
    pair: ServicePair
    proxy: TcpProxy
    metrics_port: int

    def metric(self, name: str) -> float:
        page = metrics_when(self.metrics_port, name)
        match = re.search(rf"^{name} (\S+)$", page, re.M)
        assert match, name
        return float(match.group(1))

    def wait_until_no_upload(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while self.metric("bagel_diffusion_kv_uploads_in_flight") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert self.metric("bagel_diffusion_kv_uploads_in_flight") == 0
        assert self.metric("bagel_diffusion_kv_upload_reserved_bytes") == 0


@pytest.fixture(scope="module")
def hop(tiny_model_dir: Path) -> Iterator[Hop]:
    metrics_port = free_port()
    pair = ServicePair(
        tiny_model_dir,
        diffusion_args=[
            "--kv-idle-timeout", str(IDLE_TIMEOUT_S), "--metrics-port", str(metrics_port),
        ],
    )  # fmt: skip
    proxy = None
    try:
        pair.start_diffusion()
        proxy = TcpProxy("127.0.0.1", pair.diffusion_port)
        pair.prefill = ServiceProcess(
            "prefill_service", ["--model", str(tiny_model_dir), "--diffusion", proxy.address]
        )
        yield Hop(pair.wait_serving(), proxy, metrics_port)
    finally:
        pair.close()
        if proxy is not None:
            proxy.close()


@pytest.fixture(scope="module")
def reference(pipeline: Pipeline, contexts) -> np.ndarray:
    params = dataclasses.replace(SMALL, seed=SEED)
    return pixels(pipeline.decode(pipeline.denoise(contexts, params), params.height, params.width))


def request(address: str, timeout: float = 60.0) -> np.ndarray:
    with BagelClient(address, timeout=timeout) as client:
        result = client.generate(
            PROMPT,
            negative_prompt=SMALL.negative_prompt,
            height=SMALL.height,
            width=SMALL.width,
            num_timesteps=SMALL.num_timesteps,
            seed=SEED,
        )
    return pixels(result.image)


def timed_correct_request(hop: Hop, reference: np.ndarray) -> float:
    started = time.perf_counter()
    image = request(hop.pair.prefill.address)
    elapsed = time.perf_counter() - started
    assert np.abs(image - reference).max() <= 1
    return elapsed


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


class Announcer:
    """Sends a consistent header announcing a 1 GiB cache straight to the diffusion service, then
    keeps its stream open and silent until `release`."""

    def __init__(self, address: str, header: bytes) -> None:
        self._release = threading.Event()
        self.outcome: list = []
        self.channel = grpc.insecure_channel(address, options=channel_options())

        def frames() -> Iterator[bytes]:
            yield header
            self._release.wait(60)

        def run() -> None:
            try:
                self.outcome.append(list(diffusion_generate(self.channel)(frames(), timeout=60)))
            except grpc.RpcError as e:
                self.outcome.append(e)

        self.thread = threading.Thread(target=run)
        self.thread.start()

    def finish(self):
        self._release.set()
        self.thread.join(30)
        self.channel.close()
        return self.outcome[0] if self.outcome else None


def announcing_header(contexts, fingerprint: str, nbytes: int) -> bytes:
    """The header of `contexts`' stream with the cond context grown to about `nbytes` in all."""
    first = next(iter(encode_kv(contexts, request_id="announcer", fingerprint=fingerprint)))
    frame = DiffusionFrame.FromString(first)
    header = frame.header
    per_token = header.total_bytes // sum(c.num_tokens for c in header.contexts)
    grow = nbytes // per_token - sum(c.num_tokens for c in header.contexts)
    header.contexts[0].num_tokens += grow
    header.total_bytes += grow * per_token
    return frame.SerializeToString()


def test_four_silent_1_gib_announcers_do_not_lock_out_a_valid_request(
    hop: Hop, pipeline: Pipeline, contexts, reference: np.ndarray, tally: Tally
):
    with tally.fault("four silent 1 GiB uploads holding --max-inflight-kv-bytes"):
        normal = min(timed_correct_request(hop, reference) for _ in range(2))
        header = announcing_header(contexts, pipeline.config.fingerprint(), ANNOUNCED)
        announcers = [Announcer(hop.pair.diffusion_address, header) for _ in range(4)]
        try:
            deadline = time.monotonic() + 10
            while hop.metric("bagel_diffusion_kv_upload_reserved_bytes") < 4 * ANNOUNCED * 0.99:
                assert time.monotonic() < deadline, "the announcers never held the budget"
                time.sleep(0.05)
            time.sleep(STALL_S + 0.2)  # silent past the stall time: each may be evicted now
            elapsed = timed_correct_request(hop, reference)
            assert elapsed < 1.5 * normal + 0.5, (elapsed, normal)
            assert hop.metric("bagel_diffusion_kv_uploads_evicted_total") >= 1
        finally:
            outcomes = [a.finish() for a in announcers]
        evicted = [
            o
            for o in outcomes
            if isinstance(o, grpc.RpcError) and "upload evicted after" in (o.details() or "")
        ]
        assert evicted and all(o.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for o in evicted)
        hop.wait_until_no_upload()


def test_a_hop_cut_mid_upload_ends_the_request_unavailable_and_leaks_nothing(
    hop: Hop, contexts, reference: np.ndarray, tally: Tally
):
    with tally.fault("the prefill-to-diffusion connection reset mid-upload"):
        diffusion_pid, prefill_pid = hop.pair.diffusion.proc.pid, hop.pair.prefill.proc.pid
        timed_correct_request(hop, reference)  # warm: channels and pools as in steady use
        fds = open_fds(diffusion_pid), open_fds(prefill_pid)
        rss = rss_mb(diffusion_pid)
        hop.proxy.cut_after(kv_bytes(contexts) // 2)
        with pytest.raises(grpc.RpcError) as err:
            request(hop.pair.prefill.address, timeout=30)
        assert hop.proxy.triggered.is_set()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
        hop.wait_until_no_upload()
        timed_correct_request(hop, reference)
        assert open_fds(diffusion_pid) <= fds[0] + 2 and open_fds(prefill_pid) <= fds[1] + 2
        assert rss_mb(diffusion_pid) < rss * 1.1


def test_a_hop_stalled_mid_upload_ends_the_request_at_its_deadline_and_leaks_nothing(
    hop: Hop, contexts, reference: np.ndarray, tally: Tally
):
    with tally.fault("the prefill-to-diffusion connection stalled mid-upload"):
        diffusion_pid, prefill_pid = hop.pair.diffusion.proc.pid, hop.pair.prefill.proc.pid
        timed_correct_request(hop, reference)
        fds = open_fds(diffusion_pid), open_fds(prefill_pid)
        rss = rss_mb(diffusion_pid)
        hop.proxy.stall_after(kv_bytes(contexts) // 2)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            request(hop.pair.prefill.address, timeout=5)
        assert hop.proxy.triggered.is_set()
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err.value.details()
        assert time.monotonic() - started < 7
        # The diffusion service gives the stalled upload up after --kv-idle-timeout.
        hop.wait_until_no_upload(IDLE_TIMEOUT_S + 10)
        hop.proxy.resume()  # the path heals
        timed_correct_request(hop, reference)
        assert open_fds(diffusion_pid) <= fds[0] + 2 and open_fds(prefill_pid) <= fds[1] + 2
        assert rss_mb(diffusion_pid) < rss * 1.1
