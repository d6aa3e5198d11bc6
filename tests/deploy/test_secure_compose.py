"""docker-compose.secure.yml and `make certs` (scripts/make_certs.py), without Docker: the override
secures both hops with flags each service's parser accepts; every file a command or health check
names is one that `make certs` writes into that service's folder, keys and tokens mode 0600; the
certificates it makes work together over real gRPC (the prefill service's client certificate
passes the diffusion service's mTLS and --tls-allowed-clients, the diffusion certificate names
"diffusion", a certificate outside the list is refused); and running it again rotates everything
but the CA, with the new tokens accepted before they are sent."""

from __future__ import annotations

import importlib.util
import shlex
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from diffusion_service.settings import parse_settings
from gateway.__main__ import parse_settings as parse_gateway_settings
from prefill_service.settings import parse_settings as parse_prefill_settings
from serving.service.access import RefusalLog
from serving.service.credentials import ServerCredentialStore
from serving.service.metrics import ServiceMetrics
from serving.service.security import ServerSecurity, open_channel
from serving.service.server import GrpcServer
from tests.deploy.test_compose_files import BASE, ROOT, SERVICES, command, interpolated, services
from tests.helpers.event_loop import EventLoopThread

SECURE = ROOT / "docker-compose.secure.yml"
SECRET_KEY_FILES = ("server.key", "client.key", "hop.token", "client.token")


def _make_certs_module():
    spec = importlib.util.spec_from_file_location("make_certs", ROOT / "scripts" / "make_certs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_certs = _make_certs_module()


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("certs")
    assert make_certs.main(["--out", str(out)]) == 0
    return out


def certs_paths(argv: list[str]) -> list[str]:
    return [a for a in argv if a.startswith("/certs/")]


def on_host(path: str, made: Path, service: str) -> str:
    return str(made / service / path.removeprefix("/certs/"))


def test_the_override_names_the_two_services_and_mounts_each_its_own_folder_read_only():
    secure = services(SECURE)
    assert set(secure) == SERVICES
    for name, service in secure.items():
        [volume] = service["volumes"]
        assert volume["target"] == "/certs" and volume["read_only"] is True
        assert interpolated(volume["source"]) == f"./out/certs/{name}"
        assert volume["bind"]["create_host_path"] is False
        assert interpolated(service["user"]) == "10001:10001"


def test_both_hops_get_tls_and_tokens_and_hop_2_mtls_with_the_prefill_certificate_allowed():
    secure = services(SECURE)
    diffusion = parse_settings(command({**services(BASE)["diffusion"], **secure["diffusion"]})[3:])
    d = diffusion.security
    assert d.tls_cert and d.tls_key and d.tls_ca and d.auth_token_file
    assert d.allowed_clients == ("prefill",)
    prefill = parse_prefill_settings(command(secure["prefill"])[3:])
    assert prefill.security.tls_cert and prefill.security.auth_token_file
    hop = prefill.diffusion_security
    assert hop.tls_ca and hop.tls_cert and hop.auth_token_file
    assert prefill.diffusion_token_flag == "--diffusion-auth-token-file"
    assert prefill.diffusion_addresses == ("diffusion:50052",)
    gateway = parse_gateway_settings(command(secure["gateway"])[3:]).prefill_security
    assert gateway.tls_ca and gateway.auth_token_file  # the front door's TLS and token


def test_every_file_the_commands_and_health_checks_name_is_made_by_make_certs(made: Path):
    for name, service in services(SECURE).items():
        argv = command(service) + service["healthcheck"]["test"]
        named = certs_paths(argv)
        assert named, name
        for path in named:
            assert Path(on_host(path, made, name)).is_file(), (name, path)
        for secret in SECRET_KEY_FILES:
            file = made / name / secret
            if file.exists():
                assert file.stat().st_mode & 0o777 == 0o600, file
    assert (made / "ca" / "ca.key").stat().st_mode & 0o777 == 0o600
    assert not any((made / folder / "ca.key").exists() for folder in ("diffusion", "prefill"))


async def _echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


@pytest.fixture(scope="module")
def diffusion_like(made: Path) -> Iterator[str]:
    """A server with exactly the diffusion service's security flags from the override, the paths
    mapped to the made folder."""
    argv = command(services(SECURE)["diffusion"])
    settings = parse_settings(
        [on_host(a, made, "diffusion") if a.startswith("/certs/") else a for a in argv[3:]]
    )
    security: ServerSecurity = settings.security
    metrics = ServiceMetrics("secure_compose_test")
    store = ServerCredentialStore(security)
    loop = EventLoopThread()

    def register(server: grpc.aio.Server) -> None:
        methods = {"E": grpc.unary_unary_rpc_method_handler(_echo)}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.E", methods),))

    server = GrpcServer(
        "t.E", "127.0.0.1:0", register, metrics, "127.0.0.1", None,
        credentials=store.server_credentials(),
        interceptors=store.interceptors(RefusalLog(metrics.auth_failures)),
    )  # fmt: skip
    port = loop.run(server.start())
    yield f"127.0.0.1:{port}"
    loop.run(server.stop(None))
    loop.close()


def _call(address: str, made: Path, cert: str, key: str) -> bytes:
    """Echo through a channel that verifies the server as "diffusion" (the name prefill dials)."""
    token = (made / "prefill" / "hop.token").read_text().strip()
    options = [("grpc.ssl_target_name_override", "diffusion")]
    with open_channel(
        address, options, tls_ca=made / "prefill" / "ca.crt", tls_cert=cert, tls_key=key,
        auth_token=token,
    ) as channel:  # fmt: skip
        return channel.unary_unary("/t.E/E")(b"ping", timeout=10)


def test_the_made_certificates_pass_mtls_the_allow_list_and_the_token(
    made: Path, diffusion_like: str
):
    client = (str(made / "prefill" / "client.crt"), str(made / "prefill" / "client.key"))
    assert _call(diffusion_like, made, *client) == b"ping"
    # the diffusion service's own certificate (its health check's) is not on the list
    own = (str(made / "diffusion" / "server.crt"), str(made / "diffusion" / "server.key"))
    with pytest.raises(grpc.RpcError) as err:
        _call(diffusion_like, made, *own)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_running_make_certs_again_rotates_all_but_the_ca_and_accepts_new_tokens_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(make_certs, "ROTATION_PAUSE_S", 0.0)
    out = tmp_path / "certs"
    make_certs.main(["--out", str(out)])
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    make_certs.main(["--out", str(out)])
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    ca = {Path("ca/ca.crt"), Path("ca/ca.key"), *(Path(f"{s}/ca.crt") for s in ("diffusion", "prefill", "client", "gateway"))}  # fmt: skip
    assert all(after[p] == before[p] for p in ca)
    assert all(after[p] != before[p] for p in set(after) - ca)
    accepted = (out / "diffusion" / "hop.token").read_text().split()
    assert accepted[0] == before[Path("diffusion/hop.token")].decode().strip()
    assert (out / "prefill" / "hop.token").read_text().split() == accepted[1:]
    make_certs.main(["--out", str(out), "--drop-old-tokens"])
    assert (out / "diffusion" / "hop.token").read_text().split() == accepted[1:]
    for sender in ("client", "gateway"):
        assert (out / "prefill" / "client.token").read_text().split() == (
            (out / sender / "client.token").read_text().split()
        )


def test_make_certs_is_a_make_target():
    makefile = (ROOT / "Makefile").read_text()
    assert "\ncerts: " in makefile
    recipe = makefile.split("\ncerts: ", 1)[1].splitlines()[1]
    assert shlex.split(recipe)[1:3] == ["scripts/make_certs.py", "--out"]
