"""Who may call (`serving.service.access`): the refusal log, the token check and the client
certificate names, on the interceptor called in process with stand-in calls; the certificate names
as a real mTLS handshake reports them in `test_the_allowed_names_are_read_from_a_real_handshake`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from serving.service.access import (
    CLIENT_NOT_ALLOWED,
    AccessInterceptor,
    Refusal,
    RefusalLog,
    caller_names,
)
from serving.service.credentials import ServerCredentialStore
from serving.service.metrics import ServiceMetrics
from serving.service.security import INVALID_TOKEN, MISSING_TOKEN, ServerSecurity, open_channel
from serving.service.server import GrpcServer
from tests.helpers.certs import NAMED_CLIENT_DNS, make_certificates
from tests.helpers.event_loop import EventLoopThread
from tests.helpers.servicer_calls import Aborted, CallerContext, stream_of

METHOD = "/test.Echo/Echo"
PEER = "ipv4:10.0.0.1:5"


class Details:
    """The `grpc.HandlerCallDetails` an interceptor is given."""

    def __init__(self, method: str | None = METHOD, metadata=()) -> None:
        self.method = method
        self.invocation_metadata = metadata


class PeerContext(CallerContext):
    """A caller with an address and the SAN names its certificate showed."""

    def __init__(self, dns: tuple[bytes, ...] = (), uris: tuple[bytes, ...] = ()) -> None:
        super().__init__()
        self._auth = {"peer_dns": list(dns), "peer_uri": list(uris)}

    def peer(self) -> str:
        return PEER

    def auth_context(self) -> dict[str, list[bytes]]:
        return self._auth


class Records:
    """A RefusalLog stand-in: what was recorded."""

    def __init__(self) -> None:
        self.refusals: list[tuple] = []

    def record(self, reason, method, peer, detail="") -> None:
        self.refusals.append((reason, method, peer, detail))


def _bytes(text: str) -> bytes:
    return text.encode()


def _echo_handlers() -> dict[str, grpc.RpcMethodHandler]:
    """One handler per shape, async and sync behaviours, each echoing its request(s) in upper
    case; they carry a deserializer and serializer so that passing them on can be checked."""

    async def uu(request, context):
        return request.upper()

    def uu_sync(request, context):
        return request.upper()

    async def us(request, context):
        for part in request.split(","):
            yield part.upper()

    def us_sync(request, context):
        return iter([part.upper() for part in request.split(",")])

    async def su(requests, context):
        return ",".join([r.upper() async for r in requests])

    async def ss(requests, context):
        async for request in requests:
            yield request.upper()

    codec = {"request_deserializer": bytes.decode, "response_serializer": _bytes}
    return {
        "uu": grpc.unary_unary_rpc_method_handler(uu, **codec),
        "uu_sync": grpc.unary_unary_rpc_method_handler(uu_sync, **codec),
        "us": grpc.unary_stream_rpc_method_handler(us, **codec),
        "us_sync": grpc.unary_stream_rpc_method_handler(us_sync, **codec),
        "su": grpc.stream_unary_rpc_method_handler(su, **codec),
        "ss": grpc.stream_stream_rpc_method_handler(ss, **codec),
    }


def _intercept(interceptor, handler, details=None) -> grpc.RpcMethodHandler:
    seen = []

    async def continuation(call_details):
        seen.append(call_details)
        return handler

    details = details or Details()
    result = asyncio.run(interceptor.intercept_service(continuation, details))
    assert seen == [details]  # the handler is looked up for this call
    return result


async def _call(handler: grpc.RpcMethodHandler, request, context) -> object:
    """Calls `handler`'s behaviour as the server would; a response stream comes back as a list."""
    behavior = (
        handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    )
    result = behavior(request, context)
    if handler.response_streaming:
        return [item async for item in result]
    return await result


def _run(handler, request, context) -> object:
    return asyncio.run(_call(handler, request, context))


# RefusalLog


def test_the_window_counts_from_the_last_logged_line_not_from_zero(caplog):
    now = [1000.0]
    refusals = RefusalLog(None, every_s=10.0, clock=lambda: now[0])
    with caplog.at_level("WARNING", logger="serving.service.access"):
        refusals.record(Refusal.MISSING_TOKEN, "/a.B/C", "p")
        now[0] = 1009.0  # inside the window: counted, not logged
        refusals.record(Refusal.MISSING_TOKEN, "/a.B/C", "p")
        now[0] = 1010.0  # exactly one window after the first line: logged
        refusals.record(Refusal.MISSING_TOKEN, "/a.B/C", "p")
        now[0] = 1019.5
        refusals.record(Refusal.MISSING_TOKEN, "/a.B/C", "p")
    assert [r.getMessage() for r in caplog.records] == [
        "refused /a.B/C from p: missing_token",
        "refused /a.B/C from p: missing_token (1 more since the last such line)",
    ]


def test_a_logged_refusal_shows_its_detail_and_at_most_200_characters_of_method_and_peer(caplog):
    refusals = RefusalLog(None)
    with caplog.at_level("WARNING", logger="serving.service.access"):
        refusals.record(Refusal.CLIENT_NOT_ALLOWED, "/" + "m" * 300, "p" * 300, "names: a")
    [line] = [r.getMessage() for r in caplog.records]
    assert line == f"refused /{'m' * 199} from {'p' * 200}: client_not_allowed (names: a)"


# The token check


def test_a_call_without_a_token_or_with_a_wrong_one_is_refused_before_its_handler_runs():
    handlers = _echo_handlers()
    records = Records()
    interceptor = AccessInterceptor(lambda: ("tok",), records)
    for metadata, reason, message in (
        ((), Refusal.MISSING_TOKEN, MISSING_TOKEN),
        ((("authorization", "Bearer other"),), Refusal.INVALID_TOKEN, INVALID_TOKEN),
    ):
        for handler in handlers.values():
            refusal = _intercept(interceptor, handler, Details(METHOD, metadata))
            assert refusal.request_deserializer is None  # the request is never read
            context = PeerContext()
            with pytest.raises(Aborted):
                _run(refusal, stream_of([]), context)
            assert context.status == (grpc.StatusCode.UNAUTHENTICATED, message)
            assert records.refusals[-1] == (reason, METHOD, PEER, "")
    assert len(records.refusals) == 2 * len(handlers)


def test_the_right_token_gets_the_handler_itself():
    handler = _echo_handlers()["uu"]
    interceptor = AccessInterceptor(lambda: ("old", "tok"), Records())
    assert _intercept(interceptor, handler, Details(METHOD, [("authorization", "Bearer tok")])) is (
        handler
    )


def test_the_tokens_are_read_at_each_call():
    handler = _echo_handlers()["uu"]
    tokens = ["a"]
    interceptor = AccessInterceptor(lambda: tokens, Records())
    details = Details(METHOD, [("authorization", "Bearer b")])
    assert _intercept(interceptor, handler, details) is not handler
    tokens[:] = ["b"]
    assert _intercept(interceptor, handler, details) is handler


@pytest.mark.parametrize(
    "method",
    ["/grpc.health.v1.Health/Check", "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"],
)
def test_health_and_reflection_need_no_token(method):
    handler = _echo_handlers()["uu"]
    interceptor = AccessInterceptor(lambda: ("tok",), Records(), ["client"])
    assert _intercept(interceptor, handler, Details(method)) is handler


@pytest.mark.parametrize(
    "method",
    ["/Xgrpc.health.v1.Health/Check", "/grpc.health.v1.HealthX/Check", "/grpc.health.v1/Health"],
)
def test_only_the_exact_open_service_names_are_open(method):
    records = Records()
    interceptor = AccessInterceptor(lambda: ("tok",), records)
    refusal = _intercept(interceptor, _echo_handlers()["uu"], Details(method))
    with pytest.raises(Aborted):
        _run(refusal, stream_of([]), PeerContext())
    assert records.refusals == [(Refusal.MISSING_TOKEN, method, PEER, "")]


def test_an_unknown_method_is_left_to_grpc():
    assert _intercept(AccessInterceptor(lambda: ("tok",), Records()), None) is None


def test_a_call_without_a_method_name_is_logged_with_an_empty_one():
    records = Records()
    refusal = _intercept(
        AccessInterceptor(lambda: ("tok",), records), _echo_handlers()["uu"], Details(None)
    )
    with pytest.raises(Aborted):
        _run(refusal, stream_of([]), PeerContext())
    assert records.refusals == [(Refusal.MISSING_TOKEN, "", PEER, "")]


# The client certificate names


def test_without_allowed_names_any_caller_gets_the_handler_itself():
    handler = _echo_handlers()["uu"]
    assert _intercept(AccessInterceptor(None, Records()), handler) is handler


def test_an_allowed_name_is_served_in_every_shape_with_the_handlers_codecs():
    interceptor = AccessInterceptor(None, Records(), ["Prefill.Example", "spiffe://e/Prefill"])
    for dns, uris in (((b"prefill.EXAMPLE",), ()), ((b"other",), (b"spiffe://e/Prefill",))):
        for name, handler in _echo_handlers().items():
            checked = _intercept(interceptor, handler, Details(f"/test.Echo/{name}"))
            assert checked is not handler
            assert (checked.request_streaming, checked.response_streaming) == (
                handler.request_streaming,
                handler.response_streaming,
            )
            assert checked.request_deserializer is bytes.decode
            assert checked.response_serializer is _bytes
            request = stream_of(["a", "b"]) if handler.request_streaming else "a,b"
            expected = {"uu": "A,B", "su": "A,B"}.get(name.removesuffix("_sync"), ["A", "B"])
            context = PeerContext(dns, uris)
            assert _run(checked, request, context) == expected, name
            assert context.status is None


def test_an_allowed_callers_handler_gets_the_calls_context():
    interceptor = AccessInterceptor(None, Records(), ["prefill"])

    async def unary(request, context):
        return context.peer()

    async def streaming(request, context):
        yield context.peer()

    for handler, expected in (
        (grpc.unary_unary_rpc_method_handler(unary), PEER),
        (grpc.unary_stream_rpc_method_handler(streaming), [PEER]),
    ):
        checked = _intercept(interceptor, handler)
        assert _run(checked, "a", PeerContext((b"prefill",))) == expected


def test_a_caller_outside_the_allowed_names_is_permission_denied_before_the_handler_runs():
    records = Records()
    interceptor = AccessInterceptor(None, records, ["prefill", "spiffe://e/prefill"])
    ran = []

    async def handled(request, context):
        ran.append(request)
        return request

    for dns, uris, shown in (
        ((b"gateway", b"b.example"), (b"spiffe://e/Prefill",), "b.example, gateway, spiffe://e/Prefill"),
        ((), (), "none"),
    ):  # fmt: skip
        for make in (grpc.unary_unary_rpc_method_handler, grpc.unary_stream_rpc_method_handler):
            checked = _intercept(interceptor, make(handled))
            context = PeerContext(dns, uris)
            with pytest.raises(Aborted):
                _run(checked, "request", context)
            assert context.status == (
                grpc.StatusCode.PERMISSION_DENIED,
                f"{CLIENT_NOT_ALLOWED} (its SAN names: {shown}; see --tls-allowed-clients)",
            )
            assert records.refusals[-1] == (
                Refusal.CLIENT_NOT_ALLOWED,
                METHOD,
                PEER,
                f"names: {shown}",
            )
    assert ran == []


def test_the_names_shown_in_a_refusal_are_cut_at_300_characters():
    interceptor = AccessInterceptor(None, Records(), ["prefill"])
    checked = _intercept(interceptor, _echo_handlers()["uu"])
    context = PeerContext((b"x" * 400,))
    with pytest.raises(Aborted):
        _run(checked, "a", context)
    assert f"(its SAN names: {'x' * 300}; see" in context.status[1]


def test_a_caller_needs_the_token_as_well_as_an_allowed_name():
    interceptor = AccessInterceptor(lambda: ("tok",), Records(), ["prefill"])
    handler = _echo_handlers()["uu"]
    refusal = _intercept(interceptor, handler)
    context = PeerContext((b"prefill",))
    with pytest.raises(Aborted):
        _run(refusal, stream_of([]), context)
    assert context.status == (grpc.StatusCode.UNAUTHENTICATED, MISSING_TOKEN)
    checked = _intercept(interceptor, handler, Details(METHOD, [("authorization", "Bearer tok")]))
    context = PeerContext((b"other",))
    with pytest.raises(Aborted):
        _run(checked, "a", context)
    assert context.status[0] == grpc.StatusCode.PERMISSION_DENIED


def test_caller_names_are_the_san_dns_names_without_case_and_the_uris_as_they_are():
    auth = {
        "peer_dns": [b"Prefill.Example", b"b\xffc"],
        "peer_uri": [b"spiffe://Example/Prefill"],
        "x509_common_name": [b"cn"],
    }
    assert caller_names(auth) == {"prefill.example", "b\ufffdc", "spiffe://Example/Prefill"}
    assert caller_names({"peer_uri": [b"spiffe://e/a"]}) == {"spiffe://e/a"}
    assert caller_names({"peer_dns": [b"A"]}) == {"a"}
    assert caller_names({}) == frozenset()


# A real handshake


@pytest.fixture(scope="module")
def loop_thread() -> Iterator[EventLoopThread]:
    thread = EventLoopThread()
    yield thread
    thread.close()


async def _echo(request: bytes, context) -> bytes:
    return request


def test_the_allowed_names_are_read_from_a_real_handshake(loop_thread, tmp_path: Path, caplog):
    certs = make_certificates(tmp_path)
    metrics = ServiceMetrics("access_test")
    store = ServerCredentialStore(
        ServerSecurity(
            certs.server_cert,
            certs.server_key,
            tls_ca=certs.ca,
            allowed_clients=(NAMED_CLIENT_DNS,),
        )
    )

    def register(server) -> None:
        methods = {"Echo": grpc.unary_unary_rpc_method_handler(_echo)}
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("test.Echo", methods),)
        )

    server = GrpcServer(
        "test.Echo",
        "127.0.0.1:0",
        register,
        metrics,
        "127.0.0.1",
        None,
        credentials=store.server_credentials(),
        interceptors=store.interceptors(RefusalLog(metrics.auth_failures)),
    )
    port = loop_thread.run(server.start())
    try:
        address = f"127.0.0.1:{port}"

        def call(cert: str, key: str) -> bytes:
            with open_channel(address, [], tls_ca=certs.ca, tls_cert=cert, tls_key=key) as ch:
                return ch.unary_unary(METHOD)(b"ping", timeout=5)

        assert call(certs.named_client_cert, certs.named_client_key) == b"ping"
        with (
            caplog.at_level(logging.WARNING, logger="serving.service.access"),
            pytest.raises(grpc.RpcError) as refused,
        ):
            call(certs.client_cert, certs.client_key)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "client_not_allowed (names: none)" in caplog.text
    finally:
        loop_thread.run(server.stop(None))
