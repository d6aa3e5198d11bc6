"""The start-up checks: HOST:PORT, a port in use (and gRPC's SO_REUSEPORT off), a CUDA device
on a torch without CUDA; each a one-line StartupError, turned into exit status 2."""

from __future__ import annotations

import asyncio
import socket

import grpc
import pytest
import torch

from bagel.devices import device_fault
from protos.options import server_options
from serving.service.metrics import ServiceMetrics
from serving.service.server import GrpcServer
from serving.service.startup import (
    StartupError,
    check_port_free,
    exit_on_misconfiguration,
    parse_listen,
    require,
)


@pytest.mark.parametrize(
    ("listen", "parsed"),
    [
        ("127.0.0.1:50051", ("127.0.0.1", 50051)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
        ("[::1]:65535", ("::1", 65535)),
        ("localhost:1", ("localhost", 1)),
    ],
)
def test_host_port_is_parsed(listen, parsed):
    assert parse_listen(listen) == parsed


@pytest.mark.parametrize("listen", ["localhost", "127.0.0.1", ":50051", "host:", "h:65536", "h:x"])
def test_anything_but_host_port_is_refused_naming_the_flag(listen):
    with pytest.raises(StartupError) as info:
        parse_listen(listen)
    assert str(info.value) == f"--listen {listen!r} is not HOST:PORT (a port 0-65535)"


def test_a_port_someone_listens_on_is_refused():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(StartupError) as info:
            check_port_free(f"127.0.0.1:{port}")
    assert str(info.value) == (
        f"--listen 127.0.0.1:{port}: port {port} is already in use (is another server running "
        "there?)"
    )
    check_port_free(f"127.0.0.1:{port}")  # free again once closed


def test_port_zero_and_a_free_port_pass():
    check_port_free("127.0.0.1:0")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    check_port_free(f"127.0.0.1:{port}")


def test_port_zero_needs_no_lookup_and_a_bad_address_names_its_flag():
    check_port_free("no-such-host.invalid:0")  # any free port: nothing to check
    with pytest.raises(StartupError, match=r"^--metrics-listen 'x' is not HOST:PORT"):
        check_port_free("x", "--metrics-listen")


def test_an_unresolvable_host_is_named():
    with pytest.raises(StartupError, match=r"^--listen 'no-such-host\.invalid:5': cannot resolve"):
        check_port_free("no-such-host.invalid:5")


def test_grpc_servers_do_not_share_a_port():
    """With gRPC's default SO_REUSEPORT both servers would bind and split the connections; our
    server options turn it off, so the second one fails to start."""
    assert ("grpc.so_reuseport", 0) in server_options()

    async def two_servers() -> None:
        first = GrpcServer(
            "test.First", "127.0.0.1:0", lambda s: None, ServiceMetrics("test"), "", None
        )
        port = await first.start()
        second = GrpcServer(
            "test.Second", f"127.0.0.1:{port}", lambda s: None, ServiceMetrics("test"), "", None
        )
        try:
            with pytest.raises(StartupError) as info:
                await second.start()
            assert str(info.value) == (
                f"--listen 127.0.0.1:{port}: cannot bind (the port is in use, or the address "
                "is not this host's)"
            )
        finally:
            await first.stop(None)

    asyncio.run(two_servers())


def test_the_default_grpc_options_would_share_the_port():
    """The check above bites: without the option a second server binds the same port."""

    async def shared() -> int:
        first = grpc.aio.server()
        port = first.add_insecure_port("127.0.0.1:0")
        await first.start()
        second = grpc.aio.server()
        try:
            return second.add_insecure_port(f"127.0.0.1:{port}") == port
        finally:
            await first.stop(None)

    assert asyncio.run(shared())


def test_cuda_on_a_cpu_only_torch_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    assert device_fault("cpu") is None
    assert device_fault("cuda") == (
        f"--device cuda: this torch ({torch.__version__}) is a CPU-only build; install a CUDA "
        "build (README, 'Set-up') or use --device cpu"
    )


def test_cuda_with_too_few_gpus_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert device_fault("cuda", 1) is None
    assert device_fault("cuda", 2) == (
        "--device cuda: 2 GPU(s) needed (one per rank), 1 visible (check CUDA_VISIBLE_DEVICES "
        "and the driver)"
    )


def test_a_startup_error_is_one_line_on_stderr_and_exit_2(capsys):
    with pytest.raises(SystemExit) as info, exit_on_misconfiguration():
        require(None)
        require("--model /x: missing file: /x/ema.safetensors")
    assert info.value.code == 2
    assert capsys.readouterr().err == "error: --model /x: missing file: /x/ema.safetensors\n"


def test_an_address_of_another_host_cannot_be_bound_and_says_why():
    with pytest.raises(StartupError) as info:
        check_port_free("192.0.2.1:5")  # TEST-NET-1: no host has it
    assert str(info.value) == (
        "--listen 192.0.2.1:5: cannot bind: Cannot assign requested address "
        "(not an address of this host?)"
    )
