"""TLS, mTLS and bearer tokens on the shared server shape (`serving.service.server.GrpcServer`) with a small
echo service, reached through `serving.service.security.open_channel` (what the client and the prefill
service's link use); certificates are made per session by `tests.helpers.certs`."""

from __future__ import annotations

import argparse
import os
import socket
import ssl
import warnings
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from client import BagelClient, cli
from serving.service import security
from serving.service.access import Refusal, RefusalLog
from serving.service.credentials import ServerCredentialStore
from serving.service.metrics import ServiceMetrics
from serving.service.security import (
    INVALID_TOKEN,
    MAX_TOKEN_BYTES,
    MISSING_TOKEN,
    ClientSecurity,
    SecurityError,
    ServerSecurity,
    is_loopback,
    open_channel,
    read_token_file,
    read_token_set,
    risky_settings,
)
from serving.service.server import GrpcServer
from tests.helpers.certs import TestCertificates, make_certificates
from tests.helpers.event_loop import EventLoopThread
from tests.helpers.processes import health_status

TOKEN = "s3cret-token-0123456789"
ECHO = "test.Echo"
CALL_TIMEOUT_S = 5.0


async def _echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


async def _echo_stream(requests, context: grpc.aio.ServicerContext):
    async for request in requests:
        yield request


def _register(server: grpc.aio.Server) -> None:
    methods = {
        "Echo": grpc.unary_unary_rpc_method_handler(_echo),
        "EchoStream": grpc.stream_stream_rpc_method_handler(_echo_stream),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(ECHO, methods),))


class EchoServer:
    """A GrpcServer serving the echo service (SERVING) with the given security; `credentials`
    reloads its files."""

    def __init__(self, loop_thread: EventLoopThread, options: ServerSecurity) -> None:
        self.loop_thread = loop_thread
        self.credentials = ServerCredentialStore(options)
        self.metrics = ServiceMetrics("echo_test")
        self.server = GrpcServer(
            ECHO,
            "127.0.0.1:0",
            _register,
            self.metrics,
            "127.0.0.1",
            None,
            credentials=self.credentials.server_credentials(),
            interceptors=self.credentials.interceptors(RefusalLog(self.metrics.auth_failures)),
        )
        port = loop_thread.run(self.server.start())
        loop_thread.run(self.server.set_serving(True))
        self.address = f"127.0.0.1:{port}"

    def stop(self) -> None:
        self.loop_thread.run(self.server.stop(None))


def echo(channel: grpc.Channel, payload: bytes = b"ping", metadata=None) -> bytes:
    return channel.unary_unary(f"/{ECHO}/Echo")(payload, timeout=CALL_TIMEOUT_S, metadata=metadata)


def echo_stream(channel: grpc.Channel, payloads: list[bytes]) -> list[bytes]:
    call = channel.stream_stream(f"/{ECHO}/EchoStream")
    return list(call(iter(payloads), timeout=CALL_TIMEOUT_S))


def rpc_error(fn, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        fn(*args, **kwargs)
    return caught.value


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> TestCertificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("token") / "token"
    path.write_text(f"  {TOKEN}\n\n")  # surrounding whitespace is not part of the token
    path.chmod(0o600)
    return str(path)


@pytest.fixture(scope="module")
def loop_thread() -> Iterator[EventLoopThread]:
    thread = EventLoopThread()
    yield thread
    thread.close()


def _server(loop_thread: EventLoopThread, options: ServerSecurity) -> Iterator[EchoServer]:
    server = EchoServer(loop_thread, options)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tls_server(loop_thread, certs) -> Iterator[EchoServer]:
    yield from _server(loop_thread, ServerSecurity(certs.server_cert, certs.server_key))


@pytest.fixture(scope="module")
def mtls_server(loop_thread, certs) -> Iterator[EchoServer]:
    options = ServerSecurity(certs.server_cert, certs.server_key, tls_ca=certs.ca)
    yield from _server(loop_thread, options)


@pytest.fixture(scope="module")
def tls_token_server(loop_thread, certs, token_file) -> Iterator[EchoServer]:
    options = ServerSecurity(certs.server_cert, certs.server_key, auth_token_file=token_file)
    yield from _server(loop_thread, options)


@pytest.fixture(scope="module")
def plaintext_token_server(loop_thread, token_file) -> Iterator[EchoServer]:
    yield from _server(loop_thread, ServerSecurity(auth_token_file=token_file))


# TLS and mTLS


def test_tls_client_verifying_the_ca_reaches_a_tls_server(tls_server, certs):
    with open_channel(tls_server.address, [], tls_ca=certs.ca) as channel:
        assert echo(channel, b"hello") == b"hello"
        assert echo_stream(channel, [b"a", b"b"]) == [b"a", b"b"]


def test_tls_server_answers_for_localhost_as_well(tls_server, certs):
    address = tls_server.address.replace("127.0.0.1", "localhost")
    with open_channel(address, [], tls_ca=certs.ca) as channel:
        assert echo(channel) == b"ping"


def test_plaintext_client_against_a_tls_server_fails_unavailable(tls_server):
    with grpc.insecure_channel(tls_server.address) as channel:
        assert rpc_error(echo, channel).code() == grpc.StatusCode.UNAVAILABLE


def test_tls_client_rejects_a_server_signed_by_a_ca_it_does_not_trust(tls_server, certs):
    with open_channel(tls_server.address, [], tls_ca=certs.other_ca) as channel:
        assert rpc_error(echo, channel).code() == grpc.StatusCode.UNAVAILABLE


def test_mtls_server_admits_a_client_certificate_from_its_ca(mtls_server, certs):
    tls = {"tls_ca": certs.ca, "tls_cert": certs.client_cert, "tls_key": certs.client_key}
    with open_channel(mtls_server.address, [], **tls) as channel:
        assert echo(channel) == b"ping"


def test_mtls_server_rejects_a_client_without_a_certificate(mtls_server, certs):
    with open_channel(mtls_server.address, [], tls_ca=certs.ca) as channel:
        assert rpc_error(echo, channel).code() == grpc.StatusCode.UNAVAILABLE
    assert health_status(mtls_server.address, tls=ClientSecurity(tls_ca=certs.ca)).startswith(
        "error:"
    )


def test_mtls_server_rejects_a_client_certificate_from_another_ca(mtls_server, certs):
    tls = {
        "tls_ca": certs.ca,
        "tls_cert": certs.rogue_client_cert,
        "tls_key": certs.rogue_client_key,
    }
    with open_channel(mtls_server.address, [], **tls) as channel:
        assert rpc_error(echo, channel).code() == grpc.StatusCode.UNAVAILABLE


# Bearer tokens


def test_call_without_a_token_is_unauthenticated(tls_token_server, certs):
    with open_channel(tls_token_server.address, [], tls_ca=certs.ca) as channel:
        error = rpc_error(echo, channel)
        assert (error.code(), error.details()) == (grpc.StatusCode.UNAUTHENTICATED, MISSING_TOKEN)
        streamed = rpc_error(echo_stream, channel, [b"a"])
        assert streamed.code() == grpc.StatusCode.UNAUTHENTICATED


def test_call_with_a_wrong_token_is_unauthenticated_and_the_token_is_not_echoed(
    tls_token_server, certs
):
    wrong = "wrong-token-ABCDEF"
    with open_channel(tls_token_server.address, [], tls_ca=certs.ca, auth_token=wrong) as ch:
        error = rpc_error(echo, ch)
        streamed = rpc_error(echo_stream, ch, [b"a"])
    assert (error.code(), error.details()) == (grpc.StatusCode.UNAUTHENTICATED, INVALID_TOKEN)
    assert streamed.code() == grpc.StatusCode.UNAUTHENTICATED
    assert wrong not in error.details() and TOKEN not in error.details()


def test_a_prefix_of_the_token_or_another_scheme_is_refused(plaintext_token_server):
    with grpc.insecure_channel(plaintext_token_server.address) as channel:
        for value, details in (
            (f"Bearer {TOKEN[:-1]}", INVALID_TOKEN),
            (f"Bearer {TOKEN}x", INVALID_TOKEN),
            (f"Basic {TOKEN}", MISSING_TOKEN),
            ("Bearer ", MISSING_TOKEN),
        ):
            error = rpc_error(echo, channel, metadata=[("authorization", value)])
            assert (error.code(), error.details()) == (grpc.StatusCode.UNAUTHENTICATED, details)


def test_right_token_over_tls_as_call_credentials_is_served(tls_token_server, certs):
    with open_channel(tls_token_server.address, [], tls_ca=certs.ca, auth_token=TOKEN) as ch:
        assert echo(ch, b"ok") == b"ok"
        assert echo_stream(ch, [b"x", b"y"]) == [b"x", b"y"]


def test_right_token_over_plaintext_as_metadata_is_served(plaintext_token_server):
    with open_channel(plaintext_token_server.address, [], auth_token=TOKEN) as channel:
        assert echo(channel, b"ok") == b"ok"
        assert echo_stream(channel, [b"x"]) == [b"x"]
    with grpc.insecure_channel(plaintext_token_server.address) as channel:
        assert echo(channel, metadata=[("authorization", f"bearer {TOKEN}")]) == b"ping"


def test_health_and_reflection_stay_open_without_a_token(tls_token_server, certs):
    assert health_status(tls_token_server.address, tls=ClientSecurity(tls_ca=certs.ca)) == (
        "SERVING"
    )
    with BagelClient(tls_token_server.address, timeout=CALL_TIMEOUT_S, tls_ca=certs.ca) as client:
        assert client.health() == "SERVING"
    with open_channel(tls_token_server.address, [], tls_ca=certs.ca) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        [reply] = list(stub.ServerReflectionInfo(iter([request]), timeout=CALL_TIMEOUT_S))
    assert ECHO in {s.name for s in reply.list_services_response.service}


def test_the_token_is_compared_with_hmac_compare_digest(plaintext_token_server, monkeypatch):
    compared = []
    real = security.hmac.compare_digest

    def spy(a, b):
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(security.hmac, "compare_digest", spy)
    with open_channel(plaintext_token_server.address, [], auth_token=TOKEN) as channel:
        assert echo(channel) == b"ping"
    assert compared == [(TOKEN.encode(), TOKEN.encode())]


# Start-up checks


def test_token_file_is_stripped_and_an_empty_one_is_refused(tmp_path: Path, token_file):
    assert read_token_file(token_file) == TOKEN
    empty = tmp_path / "empty"
    empty.write_text(" \n\t\n")
    empty.chmod(0o600)
    with pytest.raises(SecurityError, match="is empty"):
        read_token_file(empty)
    with pytest.raises(SecurityError, match="is empty"):
        ServerSecurity(auth_token_file=str(empty)).load()
    with pytest.raises(SecurityError, match="cannot read"):
        read_token_file(tmp_path / "missing")
    spaced = tmp_path / "spaced"
    spaced.write_text("two words")
    with pytest.raises(SecurityError, match="printable ASCII"):
        read_token_file(spaced)


def test_inconsistent_tls_options_are_refused(certs, tmp_path: Path):
    with pytest.raises(SecurityError, match="--tls-cert and --tls-key"):
        ServerSecurity(tls_cert=certs.server_cert)
    with pytest.raises(SecurityError, match="--tls-ca"):
        ServerSecurity(tls_ca=certs.ca)
    with pytest.raises(SecurityError, match="certificate and its key"):
        ClientSecurity(tls_cert=certs.client_cert)
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello")
    with pytest.raises(SecurityError, match="not a PEM file"):
        ServerSecurity(str(not_pem), certs.server_key).load()


def test_loaded_secrets_do_not_show_in_repr(certs, token_file):
    secrets = ServerSecurity(certs.server_cert, certs.server_key, auth_token_file=token_file)
    assert TOKEN not in repr(secrets.load()) and "PRIVATE KEY" not in repr(secrets.load())


# The command line client


def test_cli_health_over_tls_needs_no_token(tls_token_server, certs, capsys):
    argv = ["health", "--server", tls_token_server.address, "--tls-ca", certs.ca]
    assert cli.main([*argv, "--timeout", "5"]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"


def test_cli_refuses_a_certificate_without_its_key_and_an_empty_token_file(
    certs, tmp_path: Path, capsys
):
    with pytest.raises(SystemExit) as exited:
        cli.parse_args(["health", "--tls-cert", certs.client_cert])
    assert exited.value.code == 2
    empty = tmp_path / "empty"
    empty.write_text("")
    assert cli.main(["health", "--server", "127.0.0.1:1", "--auth-token-file", str(empty)]) == 2
    assert "is empty" in capsys.readouterr().err


def test_cli_health_presents_its_client_certificate_to_an_mtls_server(
    mtls_server, certs, token_file, capsys
):
    argv = ["health", "--server", mtls_server.address, "--tls-ca", certs.ca]
    client_cert = ["--tls-cert", certs.client_cert, "--tls-key", certs.client_key]
    assert cli.main([*argv, "--timeout", "5"]) == 1  # no certificate: the handshake fails
    assert "UNAVAILABLE" in capsys.readouterr().err
    assert cli.main([*argv, *client_cert, "--auth-token-file", token_file]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"


# Refusals, reloads and start-up checks (serving.service.access, serving.service.credentials)


def test_the_refusal_log_counts_every_refusal_and_logs_one_line_per_reason_and_window(caplog):
    metrics = ServiceMetrics("refusal_test")
    now = [0.0]
    log = RefusalLog(metrics.auth_failures, every_s=10.0, clock=lambda: now[0])
    with caplog.at_level("WARNING", logger="serving.service.access"):
        for _ in range(3):
            log.record(Refusal.INVALID_TOKEN, "/a.B/C", "ipv4:1.2.3.4:5")
        log.record(Refusal.MISSING_TOKEN, "/a.B/C", "ipv4:1.2.3.4:5")
        now[0] = 10.5
        log.record(Refusal.INVALID_TOKEN, "/a.B/C", "ipv4:1.2.3.4:6")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "refused /a.B/C from ipv4:1.2.3.4:5: invalid_token",
        "refused /a.B/C from ipv4:1.2.3.4:5: missing_token",
        "refused /a.B/C from ipv4:1.2.3.4:6: invalid_token (2 more since the last such line)",
    ]
    counted = {
        s.labels["reason"]: s.value
        for m in metrics.registry.collect()
        for s in m.samples
        if s.name == "bagel_refusal_test_auth_failures_total"
    }
    assert counted == {"invalid_token": 4.0, "missing_token": 1.0}


def test_a_reload_applies_new_tokens_to_the_next_call_and_a_bad_file_keeps_the_old(
    loop_thread, tmp_path: Path
):
    tokens = tmp_path / "tokens"
    tokens.write_text("old-token\n")
    tokens.chmod(0o600)
    server = EchoServer(loop_thread, ServerSecurity(auth_token_file=str(tokens)))
    try:

        def works(token: str) -> bool:
            with open_channel(server.address, [], auth_token=token) as channel:
                try:
                    return echo(channel) == b"ping"
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.UNAUTHENTICATED
                    return False

        tokens.write_text("old-token\nnew-token\n")
        assert server.credentials.reload()
        assert works("old-token") and works("new-token")
        tokens.write_text("new-token\n")
        assert server.credentials.reload()
        assert works("new-token") and not works("old-token")
        tokens.write_text("\n")  # half written: refused, the previous tokens stay
        assert not server.credentials.reload()
        assert works("new-token")
    finally:
        server.stop()


def test_a_reloaded_server_certificate_is_presented_from_the_next_handshake(
    loop_thread, tmp_path: Path
):
    first = make_certificates(tmp_path / "first")
    server = EchoServer(loop_thread, ServerSecurity(first.server_cert, first.server_key))
    try:
        with open_channel(server.address, [], tls_ca=first.ca) as channel:
            assert echo(channel) == b"ping"
            second = make_certificates(tmp_path / "second", reissue=first)
            for new, old in ((second.server_cert, first.server_cert), (second.server_key, first.server_key)):  # fmt: skip
                os.replace(new, old)
            assert server.credentials.reload()
            assert echo(channel) == b"ping"  # the open connection keeps its handshake
        assert _presented(server.address, first.ca) == _der(first.server_cert)
    finally:
        server.stop()


def _presented(address: str, ca: str) -> bytes:
    context = ssl.create_default_context(cafile=ca)
    context.set_alpn_protocols(["h2"])
    host, port = address.rsplit(":", 1)
    with (
        socket.create_connection((host, int(port)), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        return tls.getpeercert(binary_form=True)


def _der(path: str) -> bytes:
    return ssl.PEM_cert_to_DER_cert(Path(path).read_text())


def test_start_up_refuses_a_readable_token_file_a_long_token_and_a_mismatched_key(
    certs, tmp_path: Path
):
    readable = tmp_path / "readable"
    readable.write_text("token\n")
    readable.chmod(0o604)
    with pytest.raises(SecurityError, match=r"readable by every user \(mode 0604\)"):
        ServerSecurity(auth_token_file=str(readable)).load()
    assert ServerSecurity(auth_token_file=str(readable), allow_insecure_token_file=True).load()
    with pytest.raises(SecurityError, match="readable by every user"):
        ClientSecurity(auth_token_file=str(readable)).read_token("--diffusion-auth-token-file")
    long = tmp_path / "long"
    long.write_text("x" * (MAX_TOKEN_BYTES + 1))
    long.chmod(0o600)
    with pytest.raises(SecurityError, match="has 4097 bytes; at most 4096"):
        ServerSecurity(auth_token_file=str(long)).load()
    with pytest.raises(SecurityError, match="are not a pair"):
        ServerSecurity(certs.server_cert, certs.client_key).load()
    two = tmp_path / "two"
    two.write_text("a\nb\n")
    assert read_token_set(two) == ("a", "b")
    with pytest.raises(SecurityError, match="holds 2 tokens; a client sends one"):
        read_token_file(two)


@pytest.mark.parametrize(
    ("listen", "loopback"),
    [
        ("127.0.0.1:1", True), ("127.8.0.1:1", True), ("localhost:1", True), ("[::1]:1", True),
        ("unix:/tmp/s", True), ("0.0.0.0:1", False), ("[::]:1", False), ("10.0.0.1:1", False),
        ("diffusion:50052", False),
    ],
)  # fmt: skip
def test_loopback_addresses(listen, loopback):
    assert is_loopback(listen) is loopback


def test_risky_settings_warn_about_plaintext_tokens_and_listeners():
    token = ServerSecurity(auth_token_file="t")
    assert len(risky_settings("127.0.0.1:1", token)) == 1
    assert len(risky_settings("0.0.0.0:1", token)) == 2
    assert risky_settings("0.0.0.0:1", ServerSecurity()) == [
        "--listen 0.0.0.0:1 reaches beyond this host without TLS: prompts, images and KV caches "
        "cross the network in plaintext (docs/security.md)"
    ]
    assert risky_settings("127.0.0.1:1", ServerSecurity()) == []


def test_allowed_clients_need_mtls():
    with pytest.raises(SecurityError, match="--tls-allowed-clients needs mTLS"):
        ServerSecurity(allowed_clients=("prefill",))


# The checks' edges and messages


def test_a_token_file_that_is_not_ascii_cannot_be_read(tmp_path: Path):
    path = tmp_path / "token"
    path.write_bytes("t\u00f6ken\n".encode())
    with pytest.raises(SecurityError, match=f"cannot read the token file {path}: 'ascii' codec"):
        read_token_file(path)


def test_every_printable_ascii_character_may_be_in_a_token(tmp_path: Path):
    printable = "".join(chr(c) for c in range(ord("!"), ord("~") + 1))
    path = tmp_path / "token"
    path.write_text(f"{printable}\n{'x' * MAX_TOKEN_BYTES}\n")
    assert read_token_set(path) == (printable, "x" * MAX_TOKEN_BYTES)
    for bad in ("a\x7fb", "a\x1fb"):
        path.write_text(bad)
        with pytest.raises(SecurityError, match="printable ASCII without spaces"):
            read_token_file(path)


def test_a_long_token_is_named_by_its_line_among_the_tokens(tmp_path: Path):
    path = tmp_path / "tokens"
    path.write_text(f"short\n\n{'y' * (MAX_TOKEN_BYTES + 2)}\n")
    with pytest.raises(SecurityError) as refused:
        read_token_set(path)
    assert str(refused.value) == (
        f"token 2 in {path} has {MAX_TOKEN_BYTES + 2} bytes; at most {MAX_TOKEN_BYTES} fit within "
        "gRPC's metadata limits on every client"
    )


def test_a_missing_file_is_named_by_its_option(certs, tmp_path: Path, token_file):
    missing = str(tmp_path / "missing.pem")
    with pytest.raises(SecurityError, match=f"^cannot read the token file {missing}: "):
        security.check_token_file_mode(missing, "--auth-token-file")
    for options, what in (
        (ServerSecurity(missing, certs.server_key), "--tls-cert"),
        (ServerSecurity(certs.server_cert, missing), "--tls-key"),
        (ServerSecurity(certs.server_cert, certs.server_key, tls_ca=missing), "--tls-ca"),
    ):
        with pytest.raises(SecurityError, match=f"^cannot read {what} {missing}: "):
            options.load()
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("x")
    for options, what in (
        (ServerSecurity(certs.server_cert, str(not_pem)), "--tls-key"),
        (ServerSecurity(certs.server_cert, certs.server_key, tls_ca=str(not_pem)), "--tls-ca"),
    ):
        with pytest.raises(SecurityError, match=f"^{what} {not_pem} is not a PEM file$"):
            options.load()


def test_load_reads_every_file_it_names(certs, token_file):
    secrets = ServerSecurity(
        certs.server_cert, certs.server_key, tls_ca=certs.ca, auth_token_file=token_file
    ).load()
    assert secrets.certificate == Path(certs.server_cert).read_bytes()
    assert secrets.private_key == Path(certs.server_key).read_bytes()
    assert secrets.client_ca == Path(certs.ca).read_bytes()
    assert secrets.tokens == (TOKEN,)
    assert secrets.tls
    assert ServerSecurity().load() == security.ServerSecrets()
    assert not ServerSecurity(auth_token_file=token_file).load().tls


def test_a_readable_token_file_is_named_by_its_option(tmp_path: Path):
    readable = tmp_path / "readable"
    readable.write_text("token\n")
    readable.chmod(0o644)
    with pytest.raises(SecurityError) as refused:
        ServerSecurity(auth_token_file=str(readable)).load()
    assert str(refused.value) == (
        f"the token file {readable} (--auth-token-file) is readable by every user (mode 0644): "
        "chmod 600 it, or pass --allow-insecure-token-file"
    )
    with pytest.raises(SecurityError, match=r"\(--link-token\) is readable"):
        ClientSecurity(auth_token_file=str(readable)).read_token("--link-token")
    assert ClientSecurity(auth_token_file=str(readable)).read_token() == "token"
    assert ClientSecurity().read_token("--link-token") is None


def test_the_key_pair_check_raises_no_warning(certs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        security.check_key_pair(certs.server_cert, certs.server_key)


def test_the_option_refusals_say_what_goes_with_what(certs):
    for kwargs, message in (
        ({"tls_key": certs.server_key}, "--tls-cert and --tls-key go together"),
        (
            {"tls_ca": certs.ca},
            "--tls-ca (require client certificates) needs --tls-cert and --tls-key",
        ),
        (
            {"tls_cert": certs.server_cert, "tls_key": certs.server_key, "allowed_clients": ("a",)},
            "--tls-allowed-clients needs mTLS: --tls-ca as well as --tls-cert and --tls-key",
        ),
    ):
        with pytest.raises(SecurityError) as refused:
            ServerSecurity(**kwargs)
        assert str(refused.value) == message
    with pytest.raises(SecurityError) as refused:
        ClientSecurity(tls_key=certs.client_key)
    assert str(refused.value) == (
        "--tls-cert and --tls-key (a client certificate and its key) go together"
    )
    for make in (open_channel, security.open_aio_channel):
        with pytest.raises(SecurityError) as refused:
            make("127.0.0.1:1", [], tls_key=certs.client_key)
        assert str(refused.value) == "a client certificate and its key go together"
    for empty in ("", " "):
        with pytest.raises(SecurityError) as refused:
            security.TokenHolder(empty)
        assert str(refused.value) == "the bearer token is empty"
        with pytest.raises(SecurityError, match="^the bearer token is empty$"):
            security.open_aio_channel("127.0.0.1:1", [], auth_token=empty)


@pytest.mark.parametrize(
    ("metadata", "token"),
    [
        ([("authorization", b"Bearer tok\xe9")], "tok\u00e9"),
        ([("Authorization", "BEARER  tok ")], "tok"),
        ([("x-other", "Bearer no"), ("authorization", "Basic no"), ("authorization", "Bearer t")], "t"),
        ([("authorization", "Bearer a b")], "a b"),
        ([("authorization", "Bearer")], None),
        ([], None),
        (None, None),
    ],
)  # fmt: skip
def test_presented_token(metadata, token):
    assert security.presented_token(metadata) == token


@pytest.mark.parametrize(
    ("address", "loopback"),
    [("unix-abstract:bagel", True), ("Xlocalhost:1", False), ("[::1]X:1", False)],
)
def test_loopback_addresses_edges(address, loopback):
    assert is_loopback(address) is loopback


def test_the_plaintext_token_warning_names_the_listener(certs):
    assert risky_settings("127.0.0.1:5", ServerSecurity(auth_token_file="t")) == [
        "--auth-token-file without --tls-cert: bearer tokens cross 127.0.0.1:5 in plaintext, "
        "readable by anyone on the path"
    ]
    tls = ServerSecurity(certs.server_cert, certs.server_key, auth_token_file="t")
    assert risky_settings("0.0.0.0:5", tls) == []


def test_client_names():
    assert security.client_names(" a.example, spiffe://e/b ,,") == ("a.example", "spiffe://e/b")
    for empty in ("", " , "):
        with pytest.raises(argparse.ArgumentTypeError, match="^name at least one SAN"):
            security.client_names(empty)


# What the channels are opened with


class GrpcCalls:
    """Stands in for grpc's channel and credential constructors and records their arguments."""

    NAMES = (
        "insecure_channel", "secure_channel", "intercept_channel", "ssl_channel_credentials",
        "composite_channel_credentials", "metadata_call_credentials",
        "access_token_call_credentials",
    )  # fmt: skip

    def __init__(self, monkeypatch) -> None:
        self.calls = []
        for name in self.NAMES:
            monkeypatch.setattr(grpc, name, self._recorder(name))
        for name in ("insecure_channel", "secure_channel"):
            monkeypatch.setattr(grpc.aio, name, self._recorder(f"aio.{name}"))

    def _recorder(self, name):
        def record(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            return name

        return record


def test_a_plaintext_channel_gets_the_options_and_the_token_as_metadata(monkeypatch):
    grpc_calls = GrpcCalls(monkeypatch)
    options = [("grpc.max_send_message_length", 1)]
    assert open_channel("h:1", options) == "insecure_channel"
    assert open_channel("h:1", options, auth_token=" tok ") == "intercept_channel"
    [plain, tokened, intercepted] = grpc_calls.calls
    assert plain == tokened == ("insecure_channel", ("h:1",), {"options": options})
    name, (channel, interceptor), _ = intercepted
    assert (name, channel) == ("intercept_channel", "insecure_channel")
    assert interceptor._token.header == "Bearer tok"


def test_a_tls_channel_reads_each_file_it_is_given(certs, monkeypatch):
    grpc_calls = GrpcCalls(monkeypatch)
    options = [("grpc.max_send_message_length", 1)]
    pem = {p: Path(p).read_bytes() for p in (certs.ca, certs.client_cert, certs.client_key)}
    open_channel("h:1", options, tls_cert=certs.client_cert, tls_key=certs.client_key)
    open_channel("h:1", options, tls_ca=certs.ca, auth_token="tok")
    no_ca, secure, with_ca, token, composite, secure_with_token = grpc_calls.calls
    assert no_ca == (
        "ssl_channel_credentials",
        (),
        {
            "root_certificates": None,
            "private_key": pem[certs.client_key],
            "certificate_chain": pem[certs.client_cert],
        },
    )
    assert secure == ("secure_channel", ("h:1", "ssl_channel_credentials"), {"options": options})
    assert with_ca[2] == {
        "root_certificates": pem[certs.ca],
        "private_key": None,
        "certificate_chain": None,
    }
    plugin = token[1][0]
    sent = []
    plugin(None, lambda metadata, error: sent.append((metadata, error)))
    assert sent == [((("authorization", "Bearer tok"),), None)]
    assert composite[1] == ("ssl_channel_credentials", "metadata_call_credentials")
    assert secure_with_token[1] == ("h:1", "composite_channel_credentials")


def test_a_tls_channel_names_the_file_it_cannot_read(certs, tmp_path: Path, monkeypatch):
    GrpcCalls(monkeypatch)  # a file left unread fails here, not in grpc's core
    missing = str(tmp_path / "missing")
    for kwargs, what in (
        ({"tls_ca": missing}, "the CA certificate"),
        ({"tls_cert": certs.client_cert, "tls_key": missing}, "the client key"),
        ({"tls_cert": missing, "tls_key": certs.client_key}, "the client certificate"),
    ):
        for make in (open_channel, security.open_aio_channel):
            with pytest.raises(SecurityError, match=f"^cannot read {what} {missing}: "):
                make("h:1", [], **kwargs)


def test_client_security_opens_its_channel_with_its_files_and_token(certs, tmp_path, monkeypatch):
    opened = []
    monkeypatch.setattr(security, "open_channel", lambda *a, **kw: opened.append((a, kw)))
    token = tmp_path / "token"
    token.write_text("file-token\n")
    options = [("a", 1)]
    tls = ClientSecurity(certs.ca, certs.client_cert, certs.client_key, str(token))
    holder = security.TokenHolder("held")
    tls.open_channel("h:1", options)
    tls.open_channel("h:1", options, holder)
    ClientSecurity().open_channel("h:1", options)
    (args, from_file), (_, given), (_, plain) = opened
    assert args == ("h:1", options)
    assert {k: v for k, v in from_file.items() if k != "auth_token"} == {
        "tls_ca": certs.ca,
        "tls_cert": certs.client_cert,
        "tls_key": certs.client_key,
    }
    assert from_file["auth_token"].header == "Bearer file-token"
    assert given["auth_token"] is holder
    assert plain == {"tls_ca": None, "tls_cert": None, "tls_key": None, "auth_token": None}


def test_the_metadata_interceptor_adds_the_token_and_keeps_every_other_detail():
    holder = security.TokenHolder("tok")
    interceptor = security.BearerTokenMetadata(holder)
    details = security._CallDetails("/a.B/C", 3.5, [("k", "v")], "creds", True, "gzip")
    seen = []

    def continuation(call_details, request):
        seen.append((call_details, request))
        return "call"

    for intercept in (
        interceptor.intercept_unary_unary,
        interceptor.intercept_unary_stream,
        interceptor.intercept_stream_unary,
        interceptor.intercept_stream_stream,
    ):
        assert intercept(continuation, details, "request") == "call"
    expected = security._CallDetails(
        "/a.B/C", 3.5, [("k", "v"), ("authorization", "Bearer tok")], "creds", True, "gzip"
    )
    assert seen == [(expected, "request")] * 4
    holder.set("new")
    interceptor.intercept_unary_unary(continuation, details._replace(metadata=None), "r")
    assert seen[-1][0].metadata == [("authorization", "Bearer new")]


def test_an_aio_channel_sends_the_token_as_metadata_over_plaintext(certs, monkeypatch):
    grpc_calls = GrpcCalls(monkeypatch)
    options = [("a", 1)]
    assert security.open_aio_channel("h:1", options) == ("aio.insecure_channel", ())
    assert security.open_aio_channel("h:1", options, auth_token=" tok ") == (
        "aio.insecure_channel",
        (("authorization", "Bearer tok"),),
    )
    assert grpc_calls.calls == [("aio.insecure_channel", ("h:1",), {"options": options})] * 2


def test_an_aio_channel_over_tls_sends_the_token_as_call_credentials(certs, monkeypatch):
    grpc_calls = GrpcCalls(monkeypatch)
    options = [("a", 1)]
    pem = {p: Path(p).read_bytes() for p in (certs.ca, certs.client_cert, certs.client_key)}
    assert security.open_aio_channel(
        "h:1", options, tls_cert=certs.client_cert, tls_key=certs.client_key
    ) == ("aio.secure_channel", ())
    assert security.open_aio_channel("h:1", options, tls_ca=certs.ca, auth_token=" tok ") == (
        "aio.secure_channel",
        (),
    )
    assert grpc_calls.calls == [
        (
            "ssl_channel_credentials",
            (),
            {
                "root_certificates": None,
                "private_key": pem[certs.client_key],
                "certificate_chain": pem[certs.client_cert],
            },
        ),
        ("aio.secure_channel", ("h:1", "ssl_channel_credentials"), {"options": options}),
        (
            "ssl_channel_credentials",
            (),
            {"root_certificates": pem[certs.ca], "private_key": None, "certificate_chain": None},
        ),
        ("access_token_call_credentials", ("tok",), {}),
        (
            "composite_channel_credentials",
            ("ssl_channel_credentials", "access_token_call_credentials"),
            {},
        ),
        ("aio.secure_channel", ("h:1", "composite_channel_credentials"), {"options": options}),
    ]


def test_aio_channels_reach_token_servers(loop_thread, tls_token_server, plaintext_token_server, certs):  # fmt: skip
    async def call(address: str, **kwargs) -> bytes:
        channel, metadata = security.open_aio_channel(address, [], auth_token=TOKEN, **kwargs)
        async with channel:
            echo_call = channel.unary_unary(f"/{ECHO}/Echo")
            return await echo_call(b"aio", metadata=metadata, timeout=CALL_TIMEOUT_S)

    assert loop_thread.run(call(plaintext_token_server.address)) == b"aio"
    assert loop_thread.run(call(tls_token_server.address, tls_ca=certs.ca)) == b"aio"
