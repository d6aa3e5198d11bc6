"""`python -m gateway --listen HOST:PORT --prefill HOST:PORT[,HOST:PORT...]`: the HTTP gateway.
A bad setting, an unreadable file or a taken port ends it at once with one line and exit status 2."""

from __future__ import annotations

import logging
import socket
import sys

import uvicorn

from gateway.app import create_app
from gateway.settings import GatewaySettings
from serving import flags
from serving.service.addresses import parse_host_port
from serving.service.security import SecurityError, read_pem
from serving.service.server import configure_logging

PROG = "python -m gateway"
log = logging.getLogger("gateway")


def parse_settings(argv: list[str] | None = None) -> GatewaySettings:
    return flags.parse_settings(GatewaySettings, PROG, argv)


def bind(listen: str) -> socket.socket:
    """The listening socket, bound here so that a taken port is refused before anything starts."""
    host, port = parse_host_port(listen, "--listen")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that name it, and without it
    # an answer's headers and body (two writes) wait out the client's delayed ACK (~40 ms).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise SecurityError(f"--listen {listen}: cannot bind: {e.strerror or e}") from None
    return sock


def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(argv)
    try:
        # As the services check theirs: the PEM files, the key pair, the token file's mode.
        tokens = settings.server_security().load().tokens
        prefill = settings.prefill_security
        prefill.read_token()
        for path, what in (
            (prefill.tls_ca, "--prefill-tls-ca"),
            (prefill.tls_cert, "--prefill-tls-cert"),
            (prefill.tls_key, "--prefill-tls-key"),
        ):
            if path:
                read_pem(path, what)
        sock = bind(settings.listen)
    except (SecurityError, ValueError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    configure_logging()
    app = create_app(settings, tokens)
    config = uvicorn.Config(
        app,
        access_log=False,  # gateway.middleware logs each request, with its id
        log_config=None,
        ssl_certfile=settings.tls_cert,
        ssl_keyfile=settings.tls_key,
        timeout_graceful_shutdown=10,
    )
    port = sock.getsockname()[1]
    log.info(
        "serving HTTP%s on %s (port %d), prefill %s",
        "S" if settings.tls_cert else "",
        settings.listen,
        port,
        settings.prefill,
    )
    uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
