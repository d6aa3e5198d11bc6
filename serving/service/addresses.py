"""`HOST:PORT` addresses as the command lines take them: one, or a comma-separated list."""

from __future__ import annotations


def parse_host_port(text: str, flag: str) -> tuple[str, int]:
    """`HOST:PORT` (an IPv6 host in brackets) as (host, port); ValueError naming `flag`."""
    host, sep, port = text.strip().rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{flag} {text!r} is not HOST:PORT (a port 0-65535)")
    return host, int(port)


def split_addresses(text: str, flag: str) -> tuple[str, ...]:
    """`A,B,...`: each a `HOST:PORT`, in order; ValueError on an empty, malformed or repeated one."""
    addresses = tuple(a.strip() for a in text.split(","))
    if not all(addresses):
        raise ValueError(f"{flag} {text!r}: an address is empty")
    for address in addresses:
        parse_host_port(address, flag)
    repeated = sorted({a for a in addresses if addresses.count(a) > 1})
    if repeated:
        raise ValueError(f"{flag} {text!r}: {', '.join(repeated)} given more than once")
    return addresses
