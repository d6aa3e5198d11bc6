"""`serving.service.server` and `serving.service.metrics`: the shared gRPC server shape (health NOT_SERVING until
the service says otherwise, reflection, metrics on their own address, a clear refusal when the
address cannot be bound) and `serve_until_signal`'s exit status and drain."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from serving.service import server as server_module
from serving.service.metrics import LATENCY_BUCKETS, ServiceMetrics
from serving.service.server import (
    HEALTH_SERVICE,
    LOG_FORMAT,
    GrpcServer,
    configure_logging,
    serve_until_signal,
)
from serving.service.startup import StartupError
from tests.helpers.ranks import free_port

SERVICE = "bagel.v1.Test"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def test_the_metrics_have_the_documented_names_labels_and_buckets():
    metrics = ServiceMetrics("test")
    metrics.requests.labels(code="OK").inc()
    metrics.phase_seconds.labels(phase="denoise").observe(0.3)
    metrics.model_load_seconds.set(4.0)
    metrics.peak_memory_bytes.labels(rank="0", kind="reserved").set(9.0)
    metrics.auth_failures.labels(reason="missing_token").inc(2)
    sample = metrics.registry.get_sample_value
    assert sample("bagel_test_requests_total", {"code": "OK"}) == 1.0
    assert sample("bagel_test_phase_seconds_bucket", {"phase": "denoise", "le": "0.25"}) == 0.0
    assert sample("bagel_test_phase_seconds_bucket", {"phase": "denoise", "le": "0.5"}) == 1.0
    assert sample("bagel_test_model_load_seconds") == 4.0
    assert sample("bagel_test_peak_memory_bytes", {"rank": "0", "kind": "reserved"}) == 9.0
    assert sample("bagel_test_auth_failures_total", {"reason": "missing_token"}) == 2.0
    assert LATENCY_BUCKETS == (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
    docs = {m.name: m.documentation for m in metrics.registry.collect()}
    assert docs["bagel_test_requests"] == "Generate calls by final gRPC status code"
    assert docs["bagel_test_phase_seconds"] == "Wall time per phase of a request"
    assert docs["bagel_test_auth_failures"] == (
        "Calls refused before they ran: missing_token, invalid_token, client_not_allowed"
    )
    assert docs["bagel_test_model_load_seconds"].startswith("Seconds from the start of loading")
    assert docs["bagel_test_peak_memory_bytes"] == (
        "Peak GPU memory of a rank since it started: reserved by the caching allocator, or "
        "allocated to tensors"
    )
    buckets = [
        s.labels["le"] for m in metrics.registry.collect() for s in m.samples if "le" in s.labels
    ]
    assert buckets == [*(str(float(b)) for b in LATENCY_BUCKETS), "+Inf"]


def test_two_services_keep_their_metrics_apart():
    a, b = ServiceMetrics("a"), ServiceMetrics("a")
    a.requests.labels(code="OK").inc()
    assert b.registry.get_sample_value("bagel_a_requests_total", {"code": "OK"}) is None


def test_metrics_are_served_over_http_until_closed():
    metrics = ServiceMetrics("test")
    metrics.model_load_seconds.set(2.5)
    port = free_port()
    metrics.serve("127.0.0.1", port)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            assert "bagel_test_model_load_seconds 2.5" in reply.read().decode()
    finally:
        metrics.close()
    assert metrics._http is None
    metrics.close()  # a second close does nothing
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1)


def test_metrics_listen_on_the_host_given_only():
    metrics = ServiceMetrics("test")
    port = free_port()
    metrics.serve("127.0.0.2", port)
    try:
        with urllib.request.urlopen(f"http://127.0.0.2:{port}/metrics", timeout=5) as reply:
            assert reply.status == 200
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1)
    finally:
        metrics.close()


def _health(port: int, service: str) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def _reflected(port: int) -> set[str]:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        [reply] = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
        return {s.name for s in reply.list_services_response.service}


def test_a_server_starts_not_serving_reflects_its_services_and_says_serving_when_told():
    registered = []
    metrics_port = free_port()

    async def run() -> None:
        server = GrpcServer(
            SERVICE,
            "127.0.0.1:0",
            registered.append,
            ServiceMetrics("test"),
            "127.0.0.2",
            metrics_port,
        )
        assert server.port is None  # not bound yet
        port = await server.start()
        assert port == server.port and port > 0
        assert len(registered) == 1
        statuses = await asyncio.to_thread(lambda: [_health(port, s) for s in ("", SERVICE)])
        assert statuses == [NOT_SERVING, NOT_SERVING]
        assert await asyncio.to_thread(_reflected, port) == {
            SERVICE,
            HEALTH_SERVICE,
            "grpc.reflection.v1alpha.ServerReflection",
        }
        url = f"http://127.0.0.2:{metrics_port}/metrics"
        assert await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).status) == 200
        with pytest.raises(OSError):  # only on the metrics host given
            await asyncio.to_thread(
                urllib.request.urlopen, f"http://127.0.0.1:{metrics_port}/metrics", timeout=1
            )
        await server.set_serving(True)
        statuses = await asyncio.to_thread(lambda: [_health(port, s) for s in ("", SERVICE)])
        assert statuses == [SERVING, SERVING]
        await server.set_serving(False)
        assert await asyncio.to_thread(_health, port, SERVICE) == NOT_SERVING
        await server.stop(0.1)
        assert server.metrics._http is None
        with pytest.raises(grpc.RpcError):
            await asyncio.to_thread(_health, port, "")

    asyncio.run(run())
    assert HEALTH_SERVICE == "grpc.health.v1.Health"


def test_a_server_without_a_metrics_port_serves_no_metrics(monkeypatch):
    served = []
    monkeypatch.setattr(ServiceMetrics, "serve", lambda self, host, port: served.append(port))

    async def run() -> None:
        server = GrpcServer(SERVICE, "127.0.0.1:0", lambda s: None, ServiceMetrics("t"), "h", None)
        await server.start()
        await server.stop(None)

    asyncio.run(run())
    assert served == []


def test_an_address_that_cannot_be_bound_is_one_startup_error():
    async def run() -> None:
        server = GrpcServer(SERVICE, "192.0.2.1:1", lambda s: None, ServiceMetrics("t"), "h", None)
        await server.start()

    with pytest.raises(StartupError) as err:
        asyncio.run(run())
    assert str(err.value) == (
        "--listen 192.0.2.1:1: cannot bind (the port is in use, or the address is not this host's)"
    )


def test_a_server_stopped_before_it_started_closes_its_metrics():
    closed = []
    metrics = ServiceMetrics("t")
    metrics.close = lambda: closed.append(True)
    server = GrpcServer(SERVICE, "127.0.0.1:0", lambda s: None, metrics, "h", None)
    asyncio.run(server.stop(0))
    assert closed == [True]


class FakeService:
    def __init__(self, fail: BaseException | None = None) -> None:
        self.fail = fail
        self.loaded: asyncio.Future | None = None
        self.stopped: list[float] = []

    async def start(self) -> int:
        self.loaded = asyncio.get_running_loop().create_future()
        if self.fail is not None:
            asyncio.get_running_loop().call_later(0.05, self.loaded.set_exception, self.fail)
        return 1234

    async def stop(self, drain_s: float) -> None:
        self.stopped.append(drain_s)


def test_a_failed_load_stops_the_server_and_exits_1(caplog):
    service = FakeService(fail=RuntimeError("no weights"))
    with caplog.at_level(logging.INFO, logger="serving.service.server"):
        status = asyncio.run(serve_until_signal(service, "h:1", 2.5, "loading the model"))
    assert status == 1 and service.stopped == [2.5]
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "listening on h:1 (port 1234); loading the model",
        "loading the model failed: RuntimeError: no weights",
        "stopping: draining in-flight requests for up to 2.5 s",
        "stopped",
    ]
    assert caplog.records[1].levelno == logging.ERROR


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_drains_and_exits_0_while_the_model_is_still_loading(sig, caplog):
    service = FakeService()

    async def run() -> int:
        asyncio.get_running_loop().call_later(0.1, os.kill, os.getpid(), sig)
        return await serve_until_signal(service, "h:1", 0.5, "loading")

    with caplog.at_level(logging.INFO, logger="serving.service.server"):
        assert asyncio.run(run()) == 0
    assert service.stopped == [0.5]
    assert [r.getMessage() for r in caplog.records][-2:] == [
        "stopping: draining in-flight requests for up to 0.5 s",
        "stopped",
    ]


def test_a_signal_after_a_successful_load_exits_0():
    service = FakeService()

    async def run() -> int:
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(serve_until_signal(service, "h:1", 0.0, "loading"))
        await asyncio.sleep(0.05)
        service.loaded.set_result(None)
        loop.call_later(0.1, os.kill, os.getpid(), signal.SIGTERM)
        return await task

    assert asyncio.run(run()) == 0
    assert service.stopped == [0.0]


def test_logging_goes_to_stderr_with_time_level_and_logger(monkeypatch):
    calls = []
    monkeypatch.setattr(server_module.logging, "basicConfig", lambda **kw: calls.append(kw))
    configure_logging()
    assert calls == [
        {"level": logging.INFO, "format": LOG_FORMAT, "stream": server_module.sys.stderr}
    ]
    assert LOG_FORMAT == "%(asctime)s %(levelname)s %(name)s: %(message)s"
