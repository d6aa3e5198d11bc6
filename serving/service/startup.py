"""Start-up checks both services (and anything else that serves) run before they load or fork
anything: a misconfiguration ends the process with one line naming the fault and exit status 2,
never a traceback, and never a service that looks as if it serves.

- `--listen` must be HOST:PORT (gRPC would read a bare host as port 443);
- the port must be free: gRPC's servers share a port by default (SO_REUSEPORT), so a second
  server would silently take half the traffic (`protos.options.server_options` turns it off,
  and `check_port_free` says so before the model loads);
- `--device cuda` needs a CUDA build of torch and enough visible GPUs (`bagel.devices`);
- the model directory must hold a complete checkpoint (`bagel.checkpoints.check_checkpoint`).

The last two are the model package's to judge (this package imports no torch); `require` turns
their one-line answer into a StartupError.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import sys
from collections.abc import Iterator

from serving.service.addresses import parse_host_port

EXIT_MISCONFIGURED = 2


class StartupError(Exception):
    """A misconfiguration found at start-up; the message is the one line the operator sees."""


def parse_listen(listen: str, flag: str = "--listen") -> tuple[str, int]:
    """(host, port) of a HOST:PORT address ("[::1]:50051" for IPv6); StartupError otherwise."""
    try:
        return parse_host_port(listen, flag)
    except ValueError as e:
        raise StartupError(str(e)) from None


def check_port_free(listen: str, flag: str = "--listen") -> None:
    """StartupError if something already listens on `listen`'s port (port 0: any free one)."""
    host, port = parse_listen(listen, flag)
    if port == 0:
        return
    try:
        addresses = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as e:
        raise StartupError(f"{flag} {listen!r}: cannot resolve {host!r}: {e.strerror}") from None
    failures = []
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            # As gRPC binds: SO_REUSEADDR lets a port in TIME_WAIT be taken, not a listening one.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise StartupError(
                        f"{flag} {listen}: port {port} is already in use (is another server "
                        "running there?)"
                    ) from None
                failures.append(e)
    # One family the host lacks (::1 without IPv6) is gRPC's to skip; none bindable is ours.
    if len(failures) == len(addresses):
        reason = failures[0].strerror or str(failures[0])
        raise StartupError(f"{flag} {listen}: cannot bind: {reason} (not an address of this host?)")


def require(fault: str | None) -> None:
    """StartupError for a fault found by a check that returns one line (None: no fault), such as
    `bagel.devices.device_fault` or `bagel.checkpoints.check_checkpoint.model_dir_fault`."""
    if fault is not None:
        raise StartupError(fault)


@contextlib.contextmanager
def exit_on_misconfiguration() -> Iterator[None]:
    """Turn a StartupError inside the block into its one line on stderr and exit status 2."""
    try:
        yield
    except StartupError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_MISCONFIGURED) from None
