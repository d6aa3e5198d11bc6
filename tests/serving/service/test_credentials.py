"""Credentials replaced while a service runs (`serving.service.credentials`): the server's and the
link's stores read real files made by `tests.helpers.certs`; the reloader runs on a real event loop
with a real SIGHUP. The reloads seen by a live server are in `tests/serving/service/test_security.py`."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from pathlib import Path

import grpc
import pytest

from serving.service.access import Refusal
from serving.service.credentials import (
    ClientCredentialStore,
    CredentialReloader,
    ServerCredentialStore,
    file_signature,
)
from serving.service.security import (
    MISSING_TOKEN,
    ClientSecurity,
    SecurityError,
    ServerSecrets,
    ServerSecurity,
)
from tests.helpers.certs import TestCertificates, make_certificates
from tests.helpers.servicer_calls import Aborted, CallerContext, stream_of

LOGGER = "serving.service.credentials"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> TestCertificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))


def _private(path: Path, text: str) -> str:
    path.write_text(text)
    path.chmod(0o600)
    return str(path)


class Records:
    def __init__(self) -> None:
        self.refusals = []

    def record(self, reason, method, peer, detail="") -> None:
        self.refusals.append(reason)


class Details:
    method = "/test.Echo/Echo"
    invocation_metadata = ()


class NamedCaller(CallerContext):
    def peer(self) -> str:
        return "ipv4:10.0.0.1:5"

    def auth_context(self) -> dict:
        return {"peer_dns": [b"gateway"]}


def _refusal_of(interceptor, context) -> grpc.StatusCode | None:
    """The status the interceptor gives a call without a token from `context`'s certificate."""

    async def echo(request, context):
        return request

    async def continuation(details):
        return grpc.unary_unary_rpc_method_handler(echo)

    async def call():
        handler = await interceptor.intercept_service(continuation, Details())
        if handler.unary_unary is not None:
            return await handler.unary_unary("a", context)
        return [item async for item in handler.stream_stream(stream_of([]), context)]

    try:
        asyncio.run(call())
    except Aborted:
        return context.status[0]
    return None


# ServerCredentialStore


def test_given_secrets_are_used_without_reading_the_files():
    store = ServerCredentialStore(
        ServerSecurity(auth_token_file="/nonexistent/tokens"), ServerSecrets(tokens=("a", "b"))
    )
    assert store.tokens == ("a", "b")
    assert store.paths == ("/nonexistent/tokens",)
    assert store.server_credentials() is None  # no certificate: plaintext
    assert store._next_configuration() is None  # gRPC's fetcher: keep what it has


def test_server_credentials_require_a_client_certificate_only_with_a_ca(certs, monkeypatch):
    made = []

    def dynamic(initial, fetcher, require_client_authentication=False):
        made.append(require_client_authentication)
        return "credentials"

    monkeypatch.setattr(grpc, "dynamic_ssl_server_credentials", dynamic)
    assert ServerCredentialStore(ServerSecurity(certs.server_cert, certs.server_key)).server_credentials() == "credentials"  # fmt: skip
    mtls = ServerSecurity(certs.server_cert, certs.server_key, tls_ca=certs.ca)
    assert ServerCredentialStore(mtls).server_credentials() == "credentials"
    assert made == [False, True]


def test_no_interceptor_when_there_is_nothing_to_check():
    assert ServerCredentialStore(ServerSecurity(), ServerSecrets()).interceptors(Records()) == []


def test_allowed_clients_alone_check_the_names_and_ask_no_token():
    security = ServerSecurity("c.pem", "k.pem", tls_ca="ca.pem", allowed_clients=("gateway",))
    [interceptor] = ServerCredentialStore(security, ServerSecrets()).interceptors(Records())
    assert _refusal_of(interceptor, NamedCaller()) is None
    security = ServerSecurity("c.pem", "k.pem", tls_ca="ca.pem", allowed_clients=("prefill",))
    [interceptor] = ServerCredentialStore(security, ServerSecrets()).interceptors(Records())
    assert _refusal_of(interceptor, NamedCaller()) == grpc.StatusCode.PERMISSION_DENIED


def test_a_token_file_asks_for_a_token_from_the_last_read_tokens(tmp_path: Path):
    records = Records()
    security = ServerSecurity(auth_token_file=_private(tmp_path / "t", "tok\n"))
    [interceptor] = ServerCredentialStore(security).interceptors(records)
    context = NamedCaller()
    assert _refusal_of(interceptor, context) == grpc.StatusCode.UNAUTHENTICATED
    assert context.status == (grpc.StatusCode.UNAUTHENTICATED, MISSING_TOKEN)
    assert records.refusals == [Refusal.MISSING_TOKEN]


def test_a_reload_logs_what_changed_and_a_refused_one_why(certs, tmp_path: Path, caplog):
    tokens = _private(tmp_path / "tokens", "a\n")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(Path(certs.server_cert).read_bytes())
    key.write_bytes(Path(certs.server_key).read_bytes())
    store = ServerCredentialStore(ServerSecurity(str(cert), str(key), auth_token_file=tokens))
    caplog.set_level("INFO", logger=LOGGER)
    _private(tmp_path / "tokens", "a\nb\n")
    assert store.reload()
    assert store._next_configuration() is None  # the same TLS files: nothing new to hand over
    second = make_certificates(tmp_path / "second", reissue=certs)
    cert.write_bytes(Path(second.server_cert).read_bytes())
    key.write_bytes(Path(second.server_key).read_bytes())
    assert store.reload()
    assert isinstance(store._next_configuration(), grpc.ServerCertificateConfiguration)
    assert store._next_configuration() is None  # handed over once
    key.write_text("half written")
    assert not store.reload()
    assert store.tokens == ("a", "b")
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("INFO", "credentials reloaded: 2 accepted token(s)"),
        (
            "INFO",
            "credentials reloaded: new TLS files for the next handshakes, 2 accepted token(s)",
        ),
        (
            "ERROR",
            f"credentials not reloaded, the previous ones stay: --tls-key {key} is not a PEM file",
        ),
    ]


def test_a_reload_from_tls_to_a_token_alone_hands_no_configuration_over(certs, tmp_path: Path):
    tokens = _private(tmp_path / "tokens", "a\n")
    security = ServerSecurity(auth_token_file=tokens)
    store = ServerCredentialStore(
        security, ServerSecrets(Path(certs.server_cert).read_bytes(), b"key", None, ("x",))
    )
    assert store.reload()
    assert store._next_configuration() is None
    assert store.tokens == ("a",)


# ClientCredentialStore


def test_the_link_store_reads_its_token_and_a_reload_replaces_it(tmp_path: Path, caplog):
    token = _private(tmp_path / "token", "one\n")
    changes = []
    store = ClientCredentialStore(
        ClientSecurity(auth_token_file=token), lambda: changes.append(1), "--link-token"
    )
    assert store.paths == (token,)
    assert store.token.header == "Bearer one"
    caplog.set_level("INFO", logger=LOGGER)
    _private(tmp_path / "token", "two\n")
    assert store.reload()
    assert store.token.header == "Bearer two"
    assert changes == []  # no TLS files changed
    (tmp_path / "token").chmod(0o644)  # every user may read it: refused, the old token stays
    assert not store.reload()
    assert store.token.header == "Bearer two"
    messages = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert messages[0] == ("INFO", "link credentials reloaded")
    assert messages[1][0] == "ERROR"
    assert messages[1][1].startswith(
        "link credentials not reloaded, the previous ones stay: the token file"
    )
    assert "(--link-token) is readable by every user" in messages[1][1]


def test_the_link_store_refuses_a_readable_token_file_only_when_asked(tmp_path: Path):
    token = tmp_path / "token"
    token.write_text("one\n")
    token.chmod(0o644)
    assert ClientCredentialStore(ClientSecurity(auth_token_file=str(token))).reload()
    with pytest.raises(SecurityError, match=r"\(--link-token\) is readable by every user"):
        ClientCredentialStore(ClientSecurity(auth_token_file=str(token)), None, "--link-token")


def test_new_link_tls_files_call_on_tls_change_once(certs, tmp_path: Path, caplog):
    ca = tmp_path / "ca.pem"
    ca.write_bytes(Path(certs.ca).read_bytes())
    changes = []
    store = ClientCredentialStore(ClientSecurity(tls_ca=str(ca)), lambda: changes.append(1))
    assert store.token is None
    caplog.set_level("INFO", logger=LOGGER)
    assert store.reload()
    assert changes == []
    ca.write_bytes(Path(certs.other_ca).read_bytes())
    assert store.reload()
    assert changes == [1]
    assert store.reload()
    assert changes == [1]
    assert [r.getMessage() for r in caplog.records] == [
        "link credentials reloaded",
        "link credentials reloaded (new TLS files: a new channel)",
        "link credentials reloaded",
    ]
    ca.unlink()  # a missing file: refused
    assert not store.reload()
    assert changes == [1]


def test_a_new_client_certificate_or_key_is_a_tls_change(certs, tmp_path: Path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(Path(certs.client_cert).read_bytes())
    key.write_bytes(Path(certs.client_key).read_bytes())
    changes = []
    security = ClientSecurity(certs.ca, str(cert), str(key))
    store = ClientCredentialStore(security, lambda: changes.append(1))
    assert store.paths == (certs.ca, str(cert), str(key))
    assert store.reload()
    assert changes == []
    cert.write_bytes(Path(certs.named_client_cert).read_bytes())
    assert store.reload()
    assert changes == [1]
    key.write_bytes(Path(certs.named_client_key).read_bytes())
    assert store.reload()
    assert changes == [1, 1]
    assert ClientCredentialStore(security).reload()  # without a callback


def test_the_link_store_compares_the_files_as_bytes(certs, tmp_path: Path):
    ca = tmp_path / "ca.pem"  # text before the PEM block is allowed, in any encoding
    ca.write_bytes(b"issued by the caf\xe9 CA\n" + Path(certs.ca).read_bytes())
    changes = []
    store = ClientCredentialStore(ClientSecurity(tls_ca=str(ca)), lambda: changes.append(1))
    assert store.reload()
    assert changes == []


def test_a_link_store_without_a_token_stays_without_one(certs):
    store = ClientCredentialStore(ClientSecurity(tls_ca=certs.ca))
    assert store.reload()
    assert store.token is None


# file_signature


def test_a_file_signature_changes_with_a_rewrite_and_reads_a_missing_file_as_none(tmp_path: Path):
    path = tmp_path / "f"
    path.write_text("a")
    missing = str(tmp_path / "missing")
    first = file_signature([str(path), missing])
    assert first[1] is None and first[0] is not None
    assert file_signature([missing, str(path)]) == (None, first[0])
    assert file_signature([str(path), missing]) == first
    os.utime(path, ns=(1, 1))  # the same size, another modification time
    assert file_signature([str(path), missing]) != first
    second = file_signature([str(path)])
    path.write_text("ab")  # another size
    os.utime(path, ns=(1, 1))
    assert file_signature([str(path)]) != second
    third = file_signature([str(path)])
    (tmp_path / "g").write_text("ab")
    os.utime(tmp_path / "g", ns=(1, 1))
    os.replace(tmp_path / "g", path)  # replaced: another inode
    assert file_signature([str(path)]) != third


# CredentialReloader


async def _until(condition, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


class Store:
    """A Reloadable that counts its reloads."""

    def __init__(self, paths: tuple[str, ...], loads: bool = True) -> None:
        self.paths = paths
        self.loads = loads
        self.reloads = 0

    def reload(self) -> bool:
        self.reloads += 1
        return self.loads


def test_the_reloader_keeps_only_stores_with_files_and_reloads_each():
    failing, loading, empty = Store(("a",), loads=False), Store(("b",)), Store(())
    reloader = CredentialReloader([failing, loading, empty], poll_s=0.5)
    assert reloader.stores == [failing, loading]
    assert reloader.poll_s == 0.5
    assert not reloader.reload()
    assert (failing.reloads, loading.reloads, empty.reloads) == (1, 1, 0)
    failing.loads = True
    assert reloader.reload()


def test_the_reloader_polls_the_files_of_each_store(tmp_path: Path, caplog):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("1")
    b.write_text("1")
    first, second = Store((str(a),)), Store((str(b),))
    reloader = CredentialReloader([first, second], poll_s=0.01)

    async def scenario():
        reloader.start()
        await asyncio.sleep(0.1)
        assert (first.reloads, second.reloads) == (0, 0)
        b.write_text("22")
        await _until(lambda: second.reloads)
        a.unlink()
        await _until(lambda: first.reloads)
        await asyncio.sleep(0.1)  # each change is reloaded once
        assert (first.reloads, second.reloads) == (1, 1)
        reloader.stop()
        await asyncio.sleep(0)
        assert reloader._task.cancelled()

    caplog.set_level("INFO", logger=LOGGER)
    asyncio.run(scenario())
    assert [r.getMessage() for r in caplog.records] == ["credential files changed: reloading"] * 2


def test_sighup_reloads_every_store_until_stop(tmp_path: Path, caplog):
    store = Store((str(tmp_path / "a"),))
    reloader = CredentialReloader([store], poll_s=60)

    async def scenario():
        reloader.start()
        try:
            signal.raise_signal(signal.SIGHUP)
            await _until(lambda: store.reloads)
            await asyncio.sleep(0.05)
            assert store.reloads == 1
        finally:
            reloader.stop()
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_DFL

    caplog.set_level("INFO", logger=LOGGER)
    asyncio.run(scenario())
    assert "SIGHUP: reloading credentials" in [r.getMessage() for r in caplog.records]


def test_a_reloader_without_stores_starts_nothing():
    reloader = CredentialReloader([Store(())])

    async def scenario():
        before = signal.getsignal(signal.SIGHUP)  # SIG_IGN under nohup
        reloader.start()
        assert reloader._task is None
        assert signal.getsignal(signal.SIGHUP) == before
        reloader.stop()
        assert signal.getsignal(signal.SIGHUP) == before

    asyncio.run(scenario())


def test_a_reloader_started_off_the_main_thread_polls_without_a_signal_handler(tmp_path: Path):
    path = tmp_path / "a"
    path.write_text("1")
    store = Store((str(path),))
    reloader = CredentialReloader([store], poll_s=0.01)

    async def scenario():
        reloader.start()
        await asyncio.sleep(0.05)  # the watch has read the first signatures
        path.write_text("22")
        await _until(lambda: store.reloads)
        reloader.stop()

    finished = []
    thread = threading.Thread(target=lambda: finished.append(asyncio.run(scenario())))
    thread.start()
    thread.join(10)
    assert finished == [None] and store.reloads == 1


@pytest.mark.parametrize("error", [ValueError, RuntimeError, NotImplementedError])
def test_a_loop_that_cannot_take_signals_still_polls(tmp_path: Path, error: type[Exception]):
    """A loop off the main thread raises RuntimeError (or ValueError from `signal`); one that takes
    no signals at all raises NotImplementedError: the reloader then only polls."""
    path = tmp_path / "a"
    path.write_text("1")
    store = Store((str(path),))
    reloader = CredentialReloader([store], poll_s=0.01)

    def refuse(*args) -> None:
        raise error("no signals here")

    async def scenario():
        loop = asyncio.get_running_loop()
        loop.add_signal_handler = loop.remove_signal_handler = refuse
        reloader.start()
        await asyncio.sleep(0.05)  # the watch has read the first signatures
        path.write_text("22")
        await _until(lambda: store.reloads)
        reloader.stop()

    asyncio.run(scenario())
