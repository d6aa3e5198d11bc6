"""The gateway's operations, all processes real: bearer tokens from a file (two valid at once),
HTTPS on the listener and TLS plus a token on the prefill hop, the prefill service's
UNAUTHENTICATED mapped to 401, the body limit, the concurrency limit, metrics, access logs that
never show a token, the OpenAPI page, and the start-up checks."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.gateway.conftest import (
    MODEL,
    PROMPT,
    SIZE,
    STEPS,
    GatewayProcess,
    decoded,
    http_status,
    wait_for,
)
from tests.helpers.certs import TestCertificates, make_certificates
from tests.helpers.processes import ROOT, ServiceProcess
from tests.helpers.ranks import free_port

TOKENS = ("gateway-token-old-5b1e", "gateway-token-new-c27d")
HOP_TOKEN = "prefill-hop-token-9a04"
SMALL = {"num_timesteps": STEPS}
MAX_BODY = 4096


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> TestCertificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def token_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    directory = tmp_path_factory.mktemp("tokens")
    (directory / "gateway").write_text("\n".join(TOKENS) + "\n\n")
    (directory / "hop").write_text(HOP_TOKEN + "\n")
    for name in ("gateway", "hop"):
        (directory / name).chmod(0o600)  # the prefill service refuses a world-readable one
    return {name: str(directory / name) for name in ("gateway", "hop")}


@pytest.fixture(scope="module")
def secured_prefill(diffusion, certs, token_files) -> Iterator[ServiceProcess]:
    """A prefill service that serves TLS and requires the hop token."""
    args = [
        *("--model", str(MODEL), "--diffusion", diffusion.address),
        *("--tls-cert", certs.server_cert, "--tls-key", certs.server_key),
        *("--auth-token-file", token_files["hop"]),
    ]
    from serving.service.security import ClientSecurity

    with ServiceProcess("prefill_service", args, tls=ClientSecurity(tls_ca=certs.ca)) as service:
        yield service.wait_serving()


@pytest.fixture(scope="module")
def secured(secured_prefill, certs, token_files) -> Iterator[GatewayProcess]:
    """HTTPS, two client tokens, TLS and a token to the prefill service, small limits."""
    args = [
        *("--tls-cert", certs.server_cert, "--tls-key", certs.server_key),
        *("--auth-token-file", token_files["gateway"]),
        *("--prefill-tls-ca", certs.ca, "--prefill-auth-token-file", token_files["hop"]),
        *("--max-body-bytes", str(MAX_BODY), "--max-concurrency", "1"),
    ]
    with GatewayProcess(secured_prefill.address, *args, ca=certs.ca) as service:
        yield service.wait_serving()


def sdk(gateway: GatewayProcess, token: str) -> openai.OpenAI:
    context = ssl.create_default_context(cafile=gateway.ca)
    return gateway.sdk(token, http_client=openai.DefaultHttpxClient(verify=context))


def https(gateway: GatewayProcess, timeout: float = 60) -> http.client.HTTPSConnection:
    host, port = gateway.address.split(":")
    context = ssl.create_default_context(cafile=gateway.ca)
    return http.client.HTTPSConnection(host, int(port), timeout=timeout, context=context)


def get(gateway: GatewayProcess, path: str) -> tuple[int, bytes]:
    connection = https(gateway)
    try:
        connection.request("GET", path)
        reply = connection.getresponse()
        return reply.status, reply.read()
    finally:
        connection.close()


def test_either_token_of_the_file_draws_over_https_and_tls_to_the_prefill_service(secured):
    for token in TOKENS:
        reply = sdk(secured, token).images.generate(prompt=PROMPT, size=SIZE, extra_body=SMALL)
        assert decoded(reply.data[0].b64_json).size == (128, 128)


@pytest.mark.parametrize(
    ("token", "message"),
    [(None, "missing bearer token"), ("gateway-token-old-5b1f", "invalid bearer token")],
    ids=["missing", "wrong"],
)
def test_a_missing_or_wrong_token_gets_401(secured, token, message):
    client = sdk(secured, token or "placeholder")
    headers = {"Authorization": openai.omit} if token is None else {}
    with pytest.raises(openai.AuthenticationError) as err:
        client.models.list(extra_headers=headers)
    assert err.value.status_code == 401
    assert err.value.body["type"] == "authentication_error"
    assert message in err.value.body["message"]
    with pytest.raises(openai.AuthenticationError):
        client.images.generate(prompt=PROMPT, size=SIZE, extra_headers=headers)


def test_health_ready_metrics_and_docs_need_no_token(secured):
    assert get(secured, "/health")[0] == 200
    assert get(secured, "/ready")[0] == 200
    assert get(secured, "/docs")[0] == 200
    assert get(secured, "/metrics")[0] == 200


def test_the_prefill_services_unauthenticated_is_a_401(secured_prefill, certs):
    """A gateway without the hop token: the prefill service refuses it, the client gets 401."""
    args = ["--prefill-tls-ca", certs.ca]
    with GatewayProcess(secured_prefill.address, *args) as gateway:
        gateway.wait_serving()
        with pytest.raises(openai.AuthenticationError) as err:
            gateway.sdk().images.generate(prompt=PROMPT, size=SIZE, extra_body=SMALL)
    assert err.value.body["code"] == "unauthenticated"
    assert "missing bearer token" in err.value.body["message"]


def test_a_body_over_the_limit_gets_413(secured):
    with pytest.raises(openai.APIStatusError) as err:
        sdk(secured, TOKENS[0]).images.generate(prompt="x" * MAX_BODY, size=SIZE)
    assert err.value.status_code == 413
    assert err.value.body["code"] == "request_too_large"
    assert f"larger than {MAX_BODY} bytes" in err.value.body["message"]


def test_a_request_beyond_the_concurrency_limit_gets_429_with_retry_after(secured):
    body = {"prompt": PROMPT, "size": SIZE, "num_timesteps": 1000, "stream": True}
    connection = https(secured)
    try:
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {TOKENS[1]}"}
        connection.request("POST", "/v1/images/generations", json.dumps(body), headers)
        assert connection.getresponse().status == 200
        with pytest.raises(openai.RateLimitError) as err:
            sdk(secured, TOKENS[0]).images.generate(prompt=PROMPT, size=SIZE, extra_body=SMALL)
        assert err.value.response.headers["retry-after"] == "1"
        assert err.value.body["code"] == "concurrency_limit"
        status, page = get(secured, "/metrics")
        assert "bagel_gateway_streams_in_flight 1.0" in page.decode()
    finally:
        connection.close()


def test_metrics_count_requests_by_route_and_status(secured):
    sdk(secured, TOKENS[0]).models.list()
    with pytest.raises(openai.AuthenticationError):
        sdk(secured, "nope").models.list()
    page = get(secured, "/metrics")[1].decode()
    assert 'bagel_gateway_requests_total{route="/v1/models",status="200"}' in page
    assert 'bagel_gateway_requests_total{route="/v1/models",status="401"}' in page
    assert 'bagel_gateway_request_seconds_bucket{le="0.005",route="/v1/models"}' in page


def test_access_logs_carry_the_request_id_and_never_a_token(secured):
    client = sdk(secured, TOKENS[1]).with_options(default_headers={"X-Request-Id": "trace-42"})
    reply = client.images.with_raw_response.generate(prompt=PROMPT, size=SIZE, extra_body=SMALL)
    assert reply.headers["x-request-id"] == "trace-42"
    assert reply.parse().data[0].model_extra["bagel"]["request_id"] == "trace-42"
    assert wait_for(lambda: "request_id=trace-42" in secured.log(), 5)  # logged once it ends
    log = secured.log()
    assert "POST /v1/images/generations 200" in log
    for secret in (*TOKENS, HOP_TOKEN):
        assert secret not in log


def test_the_openapi_schema_lists_every_request_schema_field(secured):
    import dataclasses

    from serving.params import GenerationParams

    schema = json.loads(get(secured, "/openapi.json")[1])
    generation = schema["components"]["schemas"]["ImageGenerationRequest"]["properties"]
    edit = schema["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]
    edit = edit["multipart/form-data"]["schema"]["properties"]
    for f in dataclasses.fields(GenerationParams):
        if f.name not in ("height", "width"):  # `size` carries them
            assert f.name in generation and f.name in edit, f.name
    assert generation["num_timesteps"]["anyOf"][0]["minimum"] == 2


def start(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--listen", "8000"], "--listen '8000' is not HOST:PORT"),
        (["--prefill", "a:1,a:1"], "given more than once"),
        (["--max-concurrency", "0"], "--max-concurrency must be positive"),
        (["--tls-cert", "cert.pem"], "--tls-cert and --tls-key go together"),
        (["--auth-token-file", "/nonexistent/tokens"], "cannot read the token file"),
        (["--tls-cert", "/nonexistent/c.pem", "--tls-key", "/nonexistent/k.pem"], "--tls-cert"),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ],
)
def test_a_misconfigured_gateway_exits_2_with_one_line(args, words):
    run = start(*args)
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and words in run.stderr, run.stderr
    assert "Traceback" not in run.stderr


def test_a_port_in_use_is_refused_at_start(tmp_path: Path):
    with socket.socket() as taken:
        port = free_port()
        taken.bind(("127.0.0.1", port))
        taken.listen()
        run = start("--listen", f"127.0.0.1:{port}")
    assert run.returncode == 2
    assert f"--listen 127.0.0.1:{port}: cannot bind" in run.stderr
    assert run.stderr.count("\n") == 1


def test_the_listening_socket_is_tcp_so_answers_go_out_without_nagle_delay():
    """asyncio sets TCP_NODELAY only on sockets whose protocol is IPPROTO_TCP; without it every
    answer waits for the client's delayed ACK."""
    from gateway.__main__ import bind

    sock = bind("127.0.0.1:0")
    try:
        assert sock.proto == socket.IPPROTO_TCP
    finally:
        sock.close()


def test_a_token_file_every_user_may_read_is_refused_unless_allowed(tmp_path: Path):
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKENS[0] + "\n")
    tokens.chmod(0o644)
    run = start("--auth-token-file", str(tokens), "--listen", "127.0.0.1:0", "--prefill", "x:1")
    assert run.returncode == 2 and "chmod 600 it" in run.stderr, run.stderr
    assert run.stderr.count("\n") == 1
    with GatewayProcess(
        "127.0.0.1:1", "--auth-token-file", str(tokens), "--allow-insecure-token-file"
    ) as gateway:
        gateway.wait_serving()
        assert http_status(f"{gateway.url}/v1/models") == 401


def test_a_request_without_a_token_is_refused_before_its_body_is_read(secured):
    """An oversized or malformed body from a caller without a token gets 401, not 413 or 400."""
    for body in (b"{" * (MAX_BODY + 1), b"not json"):
        connection = https(secured)
        try:
            headers = {"Content-Type": "application/json"}
            connection.request("POST", "/v1/images/generations", body, headers)
            reply = connection.getresponse()
            assert reply.status == 401
            assert json.loads(reply.read())["error"]["code"] == "missing_api_key"
        finally:
            connection.close()
