"""`make certs`: a private CA and the certificates, keys and tokens that docker-compose.secure.yml
mounts (TLS, mTLS and a token on both hops), one folder per reader so each container sees only
its own secrets:

    OUT/ca/          ca.crt, ca.key          the CA; its key never leaves this folder
    OUT/diffusion/   ca.crt, server.crt/key  serves TLS as "diffusion"; mTLS against ca.crt (the
                                             certificate may also act as a client: health checks)
                     hop.token               the token the prefill service must send
    OUT/prefill/     ca.crt, server.crt/key  serves TLS as "prefill"
                     client.crt/key          its client certificate for hop 2 (SAN DNS "prefill",
                                             what the diffusion service's --tls-allowed-clients names)
                     hop.token, client.token the hop's token; the tokens it accepts from clients
    OUT/client/      ca.crt, client.token    what a client of the front door needs
    OUT/gateway/     ca.crt, client.token    the same, for the HTTP gateway's hop to the prefill

Server certificates also name localhost and 127.0.0.1 (health checks inside the container, the
published port on the host). EC P-256 keys, made with `cryptography`. Keys and tokens are written
mode 0600; `--owner UID:GID` (as root) hands the service folders to the containers' user.

Run it again to rotate, with the services running (they reload changed files within 2 s): the CA
stays (clients keep trusting it) and every certificate and key is new; each accepting token file
gets a new token as a second line, and only `ROTATION_PAUSE_S` later, once the accepting services
have reloaded, do the sending files (prefill/hop.token, client/client.token) switch to it. Then
`--drop-old-tokens` leaves only the new ones (docs/security.md, "Rotating certificates and
tokens").

    .venv/bin/python scripts/make_certs.py [--out out/certs] [--days 90] [--owner 10001:10001]
    .venv/bin/python scripts/make_certs.py --drop-old-tokens
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import secrets
import sys
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOCAL_NAMES = ("localhost", "127.0.0.1")
TOKEN_BYTES = 32
ROTATION_PAUSE_S = (
    5.0  # more than twice the services' file watch (serving.service.credentials.POLL_S)
)
ACCEPTING = ("diffusion/hop.token", "prefill/client.token")
CONTAINERS = ("diffusion", "prefill", "gateway")  # the folders the containers mount


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(names: tuple[str, ...]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def _sign(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    days: int,
    *,
    usage: tuple[x509.ObjectIdentifier, ...] = (),
    names: tuple[str, ...] = (),
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    issuer, signing_key = (ca[0].subject, ca[1]) if ca else (_name(subject), key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca is None, path_length=None), critical=True)
    )
    if ca is None:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
    if usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(usage)), critical=False)
    if names:
        builder = builder.add_extension(_san(names), critical=False)
    return builder.sign(signing_key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write(path: Path, data: bytes, mode: int) -> None:
    """Replace `path` at once (a service that reloads never reads half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(path.name + ".new")
    staging.write_bytes(data)
    staging.chmod(mode)
    os.replace(staging, path)


def _ca(folder: Path, days: int) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = folder / "ca.crt", folder / "ca.key"
    if cert_path.exists() and key_path.exists():
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return cert, key
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _sign("bagel-serve CA", key, None, days * 10)
    _write(cert_path, _pem(cert), 0o644)
    _write(key_path, _key_pem(key), 0o600)
    return cert, key


def _leaf(
    folder: Path,
    stem: str,
    subject: str,
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    days: int,
    usage: tuple[x509.ObjectIdentifier, ...],
    names: tuple[str, ...],
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    _write(folder / f"{stem}.key", _key_pem(key), 0o600)
    _write(
        folder / f"{stem}.crt", _pem(_sign(subject, key, ca, days, usage=usage, names=names)), 0o644
    )


def _add_token(path: Path) -> str:
    """A new random token, as the file's last line (the one before it, if any, stays)."""
    token = secrets.token_urlsafe(TOKEN_BYTES)
    old = path.read_text().split() if path.exists() else []
    _write(path, "".join(f"{t}\n" for t in [*old[-1:], token]).encode(), 0o600)
    return token


def _copy_token(source: Path, target: Path, *, last_only: bool) -> None:
    tokens = source.read_text().split()
    _write(
        target, "".join(f"{t}\n" for t in (tokens[-1:] if last_only else tokens)).encode(), 0o600
    )


def make_certs(out: Path, days: int) -> None:
    ca = _ca(out / "ca", days)
    ca_pem = _pem(ca[0])
    # A server certificate may present itself as a client too: a container's health check then
    # passes the diffusion service's mTLS handshake (health is open to any certificate of the CA).
    server = (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)
    for service in ("diffusion", "prefill"):
        _write(out / service / "ca.crt", ca_pem, 0o644)
        _leaf(out / service, "server", service, ca, days, server, (service, *LOCAL_NAMES))
    client = (ExtendedKeyUsageOID.CLIENT_AUTH,)
    _leaf(out / "prefill", "client", "prefill", ca, days, client, ("prefill",))
    # The accepting side lists the old and the new token; the sending side switches to the new
    # one only once the accepting side has had time to reload.
    rotating = (out / ACCEPTING[0]).exists()
    for accepting in ACCEPTING:
        _add_token(out / accepting)
    if rotating:
        print(f"new tokens accepted; the senders switch in {ROTATION_PAUSE_S:g} s")
        time.sleep(ROTATION_PAUSE_S)
    _copy_token(out / "diffusion" / "hop.token", out / "prefill" / "hop.token", last_only=True)
    for sender in ("client", "gateway"):
        _write(out / sender / "ca.crt", ca_pem, 0o644)
        _copy_token(out / "prefill" / "client.token", out / sender / "client.token", last_only=True)


def drop_old_tokens(out: Path) -> None:
    for accepting in ACCEPTING:
        _copy_token(out / accepting, out / accepting, last_only=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("out/certs"))
    parser.add_argument("--days", type=int, default=90, help="validity of the certificates")
    parser.add_argument(
        "--owner",
        metavar="UID:GID",
        help="hand the containers' folders (diffusion, prefill, gateway) to this user (the image's "
        "is 10001:10001)",
    )
    parser.add_argument(
        "--drop-old-tokens",
        action="store_true",
        help="after a rotation: the services accept only the newest tokens (nothing else changes)",
    )
    args = parser.parse_args(argv)
    if args.drop_old_tokens:
        drop_old_tokens(args.out)
        print("old tokens dropped")
        return 0
    make_certs(args.out, args.days)
    if args.owner:
        uid, _, gid = args.owner.partition(":")
        for service in CONTAINERS:
            for path in [args.out / service, *(args.out / service).iterdir()]:
                os.chown(path, int(uid), int(gid or uid))
    print(
        f"certificates, keys and tokens in {args.out}/ ({', '.join(CONTAINERS)}, client; CA in ca/)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
