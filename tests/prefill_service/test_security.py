"""Both hops secured: client -TLS + token-> prefill service (in-process) -mTLS + token-> diffusion
service (a real process started with the flags), over the tiny checkpoint. Each hop has its own
token; certificates are made per module by `tests.helpers.certs`."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from client import BagelClient
from prefill_service.server import serve
from prefill_service.settings import PrefillSettings, parse_settings
from serving.service.security import ClientSecurity, ServerSecurity
from tests.helpers.certs import TestCertificates, make_certificates
from tests.helpers.processes import ServiceProcess
from tests.prefill_service.conftest import RunningPrefill

CLIENT_TOKEN = "client-token-7f3a"
HOP_TOKEN = "diffusion-hop-token-91c2"
SMALL = {"height": 32, "width": 32, "num_timesteps": 2}


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> TestCertificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    directory = tmp_path_factory.mktemp("tokens")
    paths = {}
    for name, token in (("client", CLIENT_TOKEN), ("hop", HOP_TOKEN), ("wrong", "not-it")):
        (directory / name).write_text(token + "\n")
        (directory / name).chmod(0o600)
        paths[name] = str(directory / name)
    return paths


@pytest.fixture(scope="module")
def hop_tls(certs: TestCertificates) -> ClientSecurity:
    """The prefill service's side of the mTLS hop (no token: health needs none)."""
    return ClientSecurity(tls_ca=certs.ca, tls_cert=certs.client_cert, tls_key=certs.client_key)


@pytest.fixture(scope="module")
def diffusion(tiny_model_dir: Path, certs: TestCertificates, tokens, hop_tls) -> Iterator:
    args = [
        *("--model", str(tiny_model_dir)),
        *("--tls-cert", certs.server_cert, "--tls-key", certs.server_key, "--tls-ca", certs.ca),
        *("--auth-token-file", tokens["hop"]),
    ]
    with ServiceProcess("diffusion_service", args, tls=hop_tls) as service:
        yield service.wait_serving()


def prefill_settings(tiny_model_dir, certs, tokens, diffusion, hop_token: str) -> PrefillSettings:
    return PrefillSettings(
        model_dir=str(tiny_model_dir),
        listen="127.0.0.1:0",
        diffusion=diffusion.address,
        connect_timeout_s=3.0,
        security=ServerSecurity(
            certs.server_cert, certs.server_key, auth_token_file=tokens["client"]
        ),
        diffusion_security=ClientSecurity(
            tls_ca=certs.ca,
            tls_cert=certs.client_cert,
            tls_key=certs.client_key,
            auth_token_file=tokens[hop_token],
        ),
    )


@pytest.fixture(scope="module")
def prefill(loop_thread, tiny_model_dir, certs, tokens, diffusion, lm_source_session):
    settings = prefill_settings(tiny_model_dir, certs, tokens, diffusion, "hop")
    running = RunningPrefill(loop_thread, settings, lm_source_session)
    yield running
    running.stop()


def test_image_through_both_secured_hops(prefill, certs):
    with BagelClient(
        prefill.address, timeout=60, tls_ca=certs.ca, auth_token=CLIENT_TOKEN
    ) as client:
        assert client.health() == "SERVING"
        result = client.generate("A cute cat", seed=3, **SMALL)
    assert (result.width, result.height, result.seed) == (32, 32, 3)
    assert result.image is not None and result.png.startswith(b"\x89PNG")


def test_client_without_the_token_gets_unauthenticated_but_health(prefill, certs):
    with BagelClient(prefill.address, timeout=10, tls_ca=certs.ca) as client:
        assert client.health() == "SERVING"
        with pytest.raises(grpc.RpcError) as caught:
            client.generate("A cute cat", seed=3, **SMALL)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    other_hops_token = BagelClient(
        prefill.address, timeout=10, tls_ca=certs.ca, auth_token=HOP_TOKEN
    )
    with other_hops_token as client, pytest.raises(grpc.RpcError) as caught:
        client.generate("A cute cat", seed=3, **SMALL)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_prefill_with_the_wrong_hop_token_is_refused_by_the_diffusion_service(
    loop_thread, tiny_model_dir, certs, tokens, diffusion, lm_source_session
):
    settings = prefill_settings(tiny_model_dir, certs, tokens, diffusion, "wrong")
    running = RunningPrefill(loop_thread, settings, lm_source_session)
    try:
        with (
            BagelClient(
                running.address, timeout=20, tls_ca=certs.ca, auth_token=CLIENT_TOKEN
            ) as client,
            pytest.raises(grpc.RpcError) as caught,
        ):
            client.generate("A cute cat", seed=3, **SMALL)
    finally:
        running.stop()
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert HOP_TOKEN not in caught.value.details() and "not-it" not in caught.value.details()


def test_prefill_flags_reach_the_settings(certs, tokens, capsys):
    settings = parse_settings(
        [
            *("--model", "m", "--tls-cert", certs.server_cert, "--tls-key", certs.server_key),
            *("--tls-ca", certs.ca, "--auth-token-file", tokens["client"]),
            *("--diffusion-tls-ca", certs.ca, "--diffusion-tls-cert", certs.client_cert),
            *("--diffusion-tls-key", certs.client_key),
            *("--diffusion-auth-token-file", tokens["hop"]),
        ]
    )
    assert settings.security == ServerSecurity(
        certs.server_cert, certs.server_key, certs.ca, tokens["client"]
    )
    assert settings.diffusion_security == ClientSecurity(
        certs.ca, certs.client_cert, certs.client_key, tokens["hop"]
    )
    assert settings.diffusion_token_flag == "--diffusion-auth-token-file"
    plain = parse_settings(["--model", "m"])
    assert plain.security == ServerSecurity()
    assert plain.diffusion_security == ClientSecurity()
    insecure = parse_settings(["--model", "m", "--allow-insecure-token-file"])
    assert insecure.diffusion_token_flag is None
    for argv, line in [
        (
            ["--diffusion-tls-cert", "c"],
            "--diffusion-tls-cert and --diffusion-tls-key (a client certificate and its key) go "
            "together",
        ),
        (["--tls-key", "k"], "--tls-cert and --tls-key go together"),
    ]:
        with pytest.raises(SystemExit) as exited:
            parse_settings(["--model", "m", *argv])
        assert exited.value.code == 2
        assert capsys.readouterr().err == f"python -m prefill_service: error: {line}\n"


def test_prefill_with_an_empty_token_file_exits_at_start_up(tmp_path: Path, caplog):
    empty = tmp_path / "token"
    empty.write_text("\n")
    empty.chmod(0o600)
    settings = PrefillSettings(
        model_dir="unused",
        listen="127.0.0.1:0",
        security=ServerSecurity(auth_token_file=str(empty)),
    )
    assert asyncio.run(serve(settings, lambda: pytest.fail("must not load"))) == 2
    assert "is empty" in caplog.text


def test_diffusion_service_with_an_empty_token_file_exits_at_start_up(
    tiny_model_dir: Path, tmp_path: Path
):
    empty = tmp_path / "token"
    empty.write_text(" \n")
    empty.chmod(0o600)
    args = ["--model", str(tiny_model_dir), "--auth-token-file", str(empty)]
    with ServiceProcess("diffusion_service", args) as service:
        assert service.proc.wait(60) == 2
    assert f"error: the token file {empty} is empty" in service.log()
