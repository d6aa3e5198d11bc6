"""Access control under real processes: client -(TLS + token)-> mock prefill service -(mTLS + token,
a certificate the diffusion service's `--tls-allowed-clients` names)-> diffusion service (1 rank).
Refusals are counted and logged without the token, a 60 MB request without a token is refused
before it is read, a certificate outside the allowed list gets PERMISSION_DENIED, every credential
rotates under traffic with no failed call, and risky settings warn or refuse to start.

The mock prefill service's KV is synthetic, so the images are compared with the first one served
(same prompt and seed), not with the language model's reference."""

from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

from client import BagelClient
from protos import PREFILL_SERVICE, GenerateEvent
from protos.options import channel_options
from serving.service.security import ClientSecurity, open_channel
from tests.helpers.certs import NAMED_CLIENT_DNS, TestCertificates, make_certificates
from tests.helpers.metrics import metrics_when
from tests.helpers.processes import ROOT, ServiceProcess, health_status
from tests.helpers.ranks import free_port
from tests.reliability.conftest import Tally, pixels, wait_for
from transport.rpc import diffusion_generate

SMALL = {"height": 32, "width": 32, "num_timesteps": 2, "seed": 3}
REFUSED_BYTES = 60 << 20
SECRET_PREFIX = "SECRET-"


@dataclass
class Secrets:
    directory: Path
    certs: TestCertificates
    diffusion_tokens: Path  # what the diffusion service accepts
    hop_token: Path  # what the prefill service sends it
    prefill_tokens: Path  # what the prefill service accepts


@dataclass
class Services:
    secrets: Secrets
    diffusion: ServiceProcess
    prefill: ServiceProcess
    diffusion_metrics: int
    prefill_metrics: int


def write_private(path: Path, text: str) -> None:
    """Replace `path` at once (a reader never sees half a file), readable by its owner only."""
    staging = path.with_suffix(".new")
    staging.write_text(text)
    staging.chmod(0o600)
    os.replace(staging, path)


@pytest.fixture(scope="module")
def secrets(tmp_path_factory: pytest.TempPathFactory) -> Secrets:
    directory = tmp_path_factory.mktemp("secrets")
    certs = make_certificates(directory)
    found = Secrets(
        directory, certs, directory / "diffusion.tokens", directory / "hop.token",
        directory / "prefill.tokens",
    )  # fmt: skip
    write_private(found.diffusion_tokens, f"{SECRET_PREFIX}hop-old\n")
    write_private(found.hop_token, f"{SECRET_PREFIX}hop-old\n")
    write_private(found.prefill_tokens, f"{SECRET_PREFIX}client-old\n")
    return found


@pytest.fixture(scope="module")
def services(tiny_model_dir: Path, secrets: Secrets) -> Iterator[Services]:
    c = secrets.certs
    diffusion_metrics, prefill_metrics = free_port(), free_port()
    diffusion = ServiceProcess(
        "diffusion_service",
        [
            *("--model", str(tiny_model_dir), "--metrics-port", str(diffusion_metrics)),
            *("--tls-cert", c.server_cert, "--tls-key", c.server_key, "--tls-ca", c.ca),
            *("--auth-token-file", str(secrets.diffusion_tokens)),
            *("--tls-allowed-clients", f"{NAMED_CLIENT_DNS},spiffe://bagel.internal/other"),
        ],
        tls=ClientSecurity(c.ca, c.named_client_cert, c.named_client_key),
    )
    prefill = None
    try:
        diffusion.wait_serving(120)
        prefill = ServiceProcess(
            "prefill_service.mock",
            [
                *("--model", str(tiny_model_dir), "--metrics-port", str(prefill_metrics)),
                *("--diffusion", diffusion.address, "--diffusion-tls-ca", c.ca),
                *("--diffusion-tls-cert", c.named_client_cert),
                *("--diffusion-tls-key", c.named_client_key),
                *("--diffusion-auth-token-file", str(secrets.hop_token)),
                *("--tls-cert", c.server_cert, "--tls-key", c.server_key),
                *("--auth-token-file", str(secrets.prefill_tokens)),
            ],
            tls=ClientSecurity(tls_ca=c.ca),
        )
        prefill.wait_serving(60)
        yield Services(secrets, diffusion, prefill, diffusion_metrics, prefill_metrics)
    finally:
        for service in (prefill, diffusion):
            if service is not None:
                service.__exit__()


def generate(services: Services, token: str, timeout: float = 60.0) -> np.ndarray:
    with BagelClient(
        services.prefill.address, timeout=timeout, tls_ca=services.secrets.certs.ca,
        auth_token=token,
    ) as client:  # fmt: skip
        return pixels(client.generate("a red circle", **SMALL).image)


def auth_failures(port: int, reason: str) -> float:
    name = "auth_failures_total"
    page = metrics_when(port, name)
    match = re.search(rf'^bagel_\w+_{name}{{reason="{reason}"}} (\S+)$', page, re.M)
    return float(match.group(1)) if match else 0.0


def refusal_lines(service: ServiceProcess, reason: str) -> list[str]:
    return [
        line for line in service.log().splitlines() if f": {reason}" in line and "refused" in line
    ]


def test_refusals_are_counted_and_logged_once_per_window_without_the_token(
    services: Services, tally: Tally
):
    with tally.security("refusals counted and logged without the token"):
        wrong = f"{SECRET_PREFIX}wrong-token"
        before = auth_failures(services.prefill_metrics, "invalid_token")
        for _ in range(5):
            with pytest.raises(grpc.RpcError) as err:
                generate(services, wrong)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert err.value.details() == "invalid bearer token"
        missing_before = auth_failures(services.prefill_metrics, "missing_token")
        with BagelClient(
            services.prefill.address, timeout=10, tls_ca=services.secrets.certs.ca
        ) as client, pytest.raises(grpc.RpcError) as err:  # fmt: skip
            client.generate("no token", **SMALL)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert auth_failures(services.prefill_metrics, "invalid_token") == before + 5
        assert auth_failures(services.prefill_metrics, "missing_token") == missing_before + 1
        lines = refusal_lines(services.prefill, "invalid_token")
        assert len(lines) == 1, lines  # five refusals within LOG_EVERY_S: one line
        assert f"refused /{PREFILL_SERVICE}/Generate from ipv4:127.0.0.1:" in lines[0]
        assert SECRET_PREFIX not in services.prefill.log()


def test_a_60_mb_request_without_a_token_is_refused_before_it_is_read(
    services: Services, tally: Tally
):
    with tally.security("a 60 MB request without a token refused in < 100 ms"):
        options = channel_options(max_message_bytes=-1)
        data = os.urandom(1 << 20) * (REFUSED_BYTES >> 20)
        with open_channel(
            services.prefill.address, options, tls_ca=services.secrets.certs.ca
        ) as ch:
            call = ch.unary_stream(
                f"/{PREFILL_SERVICE}/Generate",
                request_serializer=None,
                response_deserializer=GenerateEvent.FromString,
            )
            assert health_status(services.prefill.address, tls=ClientSecurity(tls_ca=services.secrets.certs.ca)) == "SERVING"  # fmt: skip
            times = []
            # At least five calls, and up to 20 until one is under 100 ms: the best is what the
            # refusal costs when the machine's other work (on CI, other test processes and
            # pytest-xdist workers) leaves it the cores; reading the request first took 400 ms
            # and more, so no number of calls gets such a service under 100 ms.
            while len(times) < 5 or (min(times) >= 0.1 and len(times) < 20):
                started = time.perf_counter()
                with pytest.raises(grpc.RpcError) as err:
                    list(call(data, timeout=30))
                times.append(time.perf_counter() - started)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        print(f"refused 60 MB requests: {', '.join(f'{t * 1e3:.0f} ms' for t in times)}")
        assert min(times) < 0.1, times


def test_a_certificate_outside_the_allowed_list_is_permission_denied(
    services: Services, tally: Tally
):
    with tally.security("a client certificate outside --tls-allowed-clients refused"):
        c = services.secrets.certs
        before = auth_failures(services.diffusion_metrics, "client_not_allowed")
        token = services.secrets.hop_token.read_text().strip()
        with open_channel(
            services.diffusion.address, channel_options(), tls_ca=c.ca, tls_cert=c.client_cert,
            tls_key=c.client_key, auth_token=token,
        ) as channel, pytest.raises(grpc.RpcError) as err:  # fmt: skip
            list(diffusion_generate(channel)(iter([b""]), timeout=10))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "not allowed to call this service" in err.value.details()
        assert auth_failures(services.diffusion_metrics, "client_not_allowed") == before + 1
        assert wait_for(lambda: refusal_lines(services.diffusion, "client_not_allowed"), 5)
        assert "bagel-client" not in err.value.details()  # no SAN: "its SAN names: none"
        # the named certificate (the prefill service's) passes: a request through the hop works
        first = generate(services, f"{SECRET_PREFIX}client-old")
        assert first.shape == (32, 32, 3)


class Traffic:
    """Requests one after another on a thread, each with the token of the moment."""

    def __init__(self, services: Services, token: str) -> None:
        self.services = services
        self.token = token
        self.images: list[np.ndarray] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.images.append(generate(self.services, self.token))
            except grpc.RpcError as e:
                self.failures.append(f"{e.code().name}: {e.details()}")

    def served_after(self, count: int, more: int = 2, timeout: float = 30.0) -> None:
        assert wait_for(lambda: len(self.images) >= count + more, timeout), self.failures

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)


def reload(service: ServiceProcess, what: str = "credentials reloaded") -> None:
    """SIGHUP, then wait until the service logged one more reload."""
    before = service.log().count(what)
    os.kill(service.proc.pid, signal.SIGHUP)
    assert wait_for(lambda: service.log().count(what) > before, 10), service.log()[-2000:]


def presented_certificate(address: str, certs: TestCertificates) -> bytes:
    """The DER certificate a new TLS handshake with `address` gets (mTLS, ALPN h2)."""
    context = ssl.create_default_context(cafile=certs.ca)
    context.load_cert_chain(certs.named_client_cert, certs.named_client_key)
    context.set_alpn_protocols(["h2"])
    host, port = address.rsplit(":", 1)
    with (
        socket.create_connection((host, int(port)), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        return tls.getpeercert(binary_form=True)


def der(path: str) -> bytes:
    return ssl.PEM_cert_to_DER_cert(Path(path).read_text())


def test_every_credential_rotates_under_traffic_with_no_failed_call(
    services: Services, tally: Tally
):
    with tally.security("tokens, certificates and keys rotated under traffic, no failed call"):
        s, c = services.secrets, services.secrets.certs
        traffic = Traffic(services, f"{SECRET_PREFIX}client-old")
        try:
            traffic.served_after(0)
            # hop token: the diffusion service accepts both, the prefill service sends the new
            # one, the diffusion service drops the old one
            write_private(s.diffusion_tokens, f"{SECRET_PREFIX}hop-old\n{SECRET_PREFIX}hop-new\n")
            reload(services.diffusion)
            traffic.served_after(len(traffic.images))
            write_private(s.hop_token, f"{SECRET_PREFIX}hop-new\n")
            reload(services.prefill, "link credentials reloaded")
            traffic.served_after(len(traffic.images))
            write_private(s.diffusion_tokens, f"{SECRET_PREFIX}hop-new\n")
            reload(services.diffusion)
            traffic.served_after(len(traffic.images))
            # the client's token, the same way
            write_private(
                s.prefill_tokens, f"{SECRET_PREFIX}client-old\n{SECRET_PREFIX}client-new\n"
            )
            reload(services.prefill)
            traffic.token = f"{SECRET_PREFIX}client-new"
            traffic.served_after(len(traffic.images))
            write_private(s.prefill_tokens, f"{SECRET_PREFIX}client-new\n")
            reload(services.prefill)
            traffic.served_after(len(traffic.images))
            # new certificates and keys from the same CA for both services and the hop's client
            fresh = make_certificates(s.directory / "fresh", reissue=c)
            for new, old in (
                (fresh.server_cert, c.server_cert), (fresh.server_key, c.server_key),
                (fresh.named_client_cert, c.named_client_cert),
                (fresh.named_client_key, c.named_client_key),
            ):  # fmt: skip
                os.replace(new, old)
            assert presented_certificate(services.diffusion.address, c) != der(c.server_cert)
            reload(services.diffusion)
            reload(services.prefill)
            reload(services.prefill, "link credentials reloaded")
            traffic.served_after(len(traffic.images))
            assert presented_certificate(services.diffusion.address, c) == der(c.server_cert)
            assert presented_certificate(services.prefill.address, c) == der(c.server_cert)
        finally:
            traffic.stop()
        print(f"rotation: {len(traffic.images)} calls served, {len(traffic.failures)} failed")
        assert traffic.failures == []
        assert len(traffic.images) >= 12
        assert all(np.array_equal(image, traffic.images[0]) for image in traffic.images)
        with pytest.raises(grpc.RpcError) as err:  # the old client token is refused now
            generate(services, f"{SECRET_PREFIX}client-old")
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


# ---- start-up checks ----------------------------------------------------------------------------


def start(module: str, args: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


@pytest.mark.slow  # four interpreters, each refused at start-up: ~10 s
def test_a_world_readable_or_oversized_token_refuses_to_start_with_one_line(
    tiny_model_dir: Path, tmp_path: Path, tally: Tally
):
    with tally.security("start-up refusals: world-readable token file, token over 4 KiB"):
        readable = tmp_path / "readable.token"
        readable.write_text("a-token\n")
        readable.chmod(0o644)
        huge = tmp_path / "huge.token"
        huge.write_text("x" * 4097)
        huge.chmod(0o600)
        model = ["--model", str(tiny_model_dir), "--listen", f"127.0.0.1:{free_port()}"]
        for module in ("diffusion_service", "prefill_service.mock"):
            for token, fragment in (
                (readable, "is readable by every user (mode 0644): chmod 600 it, or pass "
                           "--allow-insecure-token-file"),
                (huge, "has 4097 bytes; at most 4096 fit"),
            ):  # fmt: skip
                done = start(module, [*model, "--auth-token-file", str(token)])
                lines = (done.stdout + done.stderr).strip().splitlines()
                assert done.returncode == 2, (module, lines)
                assert len(lines) == 1 and fragment in lines[0], (module, lines)
                assert "Traceback" not in done.stderr


def test_risky_settings_warn_and_the_override_starts(
    tiny_model_dir: Path, tmp_path: Path, tally: Tally
):
    with tally.security("start-up warnings: token without TLS, non-loopback listener without TLS"):
        readable = tmp_path / "readable.token"
        readable.write_text("a-token\n")
        readable.chmod(0o644)
        port = free_port()
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefill_service.mock", "--model", str(tiny_model_dir),
             "--listen", f"0.0.0.0:{port}", "--diffusion", f"127.0.0.1:{free_port()}",
             "--auth-token-file", str(readable), "--allow-insecure-token-file"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        try:
            assert wait_for(lambda: health_status(f"127.0.0.1:{port}") != "error:UNAVAILABLE", 30)
        finally:
            proc.send_signal(signal.SIGTERM)
            output = proc.communicate(timeout=30)[0]
        warnings = [line for line in output.splitlines() if " WARNING " in line]
        assert any(
            "--auth-token-file without --tls-cert: bearer tokens cross 0.0.0.0:" in w
            for w in warnings
        ), output
        assert any(f"--listen 0.0.0.0:{port} reaches beyond this host without TLS" in w for w in warnings), output  # fmt: skip
