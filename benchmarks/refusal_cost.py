"""What a unary request costs the service to refuse for want of a token, against serving one of the
same size: a grpc.aio server on 127.0.0.1 with the services' access check (`serving.service.access`,
shared server shape and options) and an echo method, reached by a synchronous client over
plaintext and over TLS. The refusal answers without reading the request; the accepted call reads
and decodes it. Prints the median and best ms of `--repeats` calls per row; the last line is one
JSON object.

    python -m benchmarks.refusal_cost [--mb 60] [--repeats 7] [--json PATH]
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a script: the repo root, not benchmarks/, heads the import path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import asyncio
import logging
import os
import statistics
import tempfile
import threading
import time

import grpc

from benchmarks._report import emit_json
from serving.service.access import RefusalLog
from serving.service.credentials import ServerCredentialStore
from serving.service.metrics import ServiceMetrics
from serving.service.security import ServerSecurity, open_channel
from serving.service.server import GrpcServer

TOKEN = "benchmark-token"


async def _echo_size(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return len(request).to_bytes(8, "little")


def _register(server: grpc.aio.Server) -> None:
    methods = {"Size": grpc.unary_unary_rpc_method_handler(_echo_size)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Echo", methods),))


def _certificates(directory: Path) -> tuple[str, str, str]:
    """(CA, server certificate, server key), made with `cryptography` (a dev dependency)."""
    from tests.helpers.certs import make_certificates

    made = make_certificates(directory)
    return made.ca, made.server_cert, made.server_key


def measure(security: ServerSecurity, tls_ca: str | None, payload: bytes, repeats: int) -> dict:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    metrics = ServiceMetrics("refusal_benchmark")
    store = ServerCredentialStore(security)
    server = GrpcServer(
        "bench.Echo", "127.0.0.1:0", _register, metrics, "127.0.0.1", None,
        credentials=store.server_credentials(),
        interceptors=store.interceptors(RefusalLog(metrics.auth_failures)),
    )  # fmt: skip
    port = asyncio.run_coroutine_threadsafe(server.start(), loop).result(30)
    options = [("grpc.max_send_message_length", -1)]
    rows = {}
    with open_channel(f"127.0.0.1:{port}", options, tls_ca=tls_ca) as channel:
        call = channel.unary_unary("/bench.Echo/Size")
        call(b"warm", metadata=[("authorization", f"Bearer {TOKEN}")], timeout=30)
        for label, metadata in (("refused", ()), ("accepted", (("authorization", f"Bearer {TOKEN}"),))):  # fmt: skip
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                try:
                    call(payload, metadata=metadata, timeout=60)
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.UNAUTHENTICATED, e
                times.append((time.perf_counter() - started) * 1e3)
            rows[label] = {"median_ms": round(statistics.median(times), 1), "best_ms": round(min(times), 1)}  # fmt: skip
    asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=60, help="request size in MiB")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the JSON here")
    args = parser.parse_args()
    logging.getLogger("serving.service.access").setLevel(logging.ERROR)  # one refusal line per row
    payload = os.urandom(1 << 20) * args.mb
    with tempfile.TemporaryDirectory() as scratch:
        token = Path(scratch) / "token"
        token.write_text(TOKEN)
        token.chmod(0o600)
        ca, cert, key = _certificates(Path(scratch))
        transports = {
            "plaintext": (ServerSecurity(auth_token_file=str(token)), None),
            "TLS": (ServerSecurity(cert, key, auth_token_file=str(token)), ca),
        }
        print(f"{args.mb} MiB unary request, {os.cpu_count()} CPUs, {args.repeats} calls per row")
        print(f"{'transport':<12}{'call':<10}{'median ms':>12}{'best ms':>10}")
        results = {}
        for name, (security, tls_ca) in transports.items():
            results[name] = measure(security, tls_ca, payload, args.repeats)
            for label, row in results[name].items():
                print(f"{name:<12}{label:<10}{row['median_ms']:>12.1f}{row['best_ms']:>10.1f}")
    emit_json({"mb": args.mb, "repeats": args.repeats, "results": results}, args.json)


if __name__ == "__main__":
    main()
