"""Self-signed certificates for the TLS tests, made with `cryptography` (EC P-256, so in
milliseconds): a CA, a server certificate for 127.0.0.1 and localhost, a client certificate from
the same CA (no SAN), one naming `NAMED_CLIENT_DNS` and `NAMED_CLIENT_URI` in its SAN, and a client
certificate from another CA that no server trusts. `make_certificates` may be called again on the
same CA (`reissue`) to rotate the certificates."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_FOR = datetime.timedelta(days=1)
NAMED_CLIENT_DNS = "prefill.bagel.internal"
NAMED_CLIENT_URI = "spiffe://bagel.internal/prefill"


@dataclass(frozen=True)
class TestCertificates:
    """PEM file paths (as str, like the command-line flags)."""

    __test__ = False  # not a test class, whatever pytest makes of its name

    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    other_ca: str  # a CA nobody trusts
    rogue_client_cert: str  # signed by `other_ca`
    rogue_client_key: str
    named_client_cert: str  # SAN: NAMED_CLIENT_DNS and NAMED_CLIENT_URI
    named_client_key: str


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    usage: x509.ObjectIdentifier | None = None,
    hosts: tuple[str, ...] = (),
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, signing_key = (issuer[0].subject, issuer[1]) if issuer else (_name(subject), key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALID_FOR)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if hosts:
        names = [
            x509.UniformResourceIdentifier(h)
            if "://" in h
            else x509.IPAddress(ipaddress.ip_address(h))
            if h[0].isdigit()
            else x509.DNSName(h)
            for h in hosts
        ]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(signing_key, hashes.SHA256())


def _write(directory: Path, stem: str, cert: x509.Certificate, key=None) -> tuple[str, str]:
    cert_path = directory / f"{stem}.crt"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path = directory / f"{stem}.key"
    if key is not None:
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return str(cert_path), str(key_path)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


_CAS: dict[str, tuple[x509.Certificate, ec.EllipticCurvePrivateKey]] = {}  # CA path -> CA


def make_certificates(directory: Path, reissue: TestCertificates | None = None) -> TestCertificates:
    """Write every certificate and key under `directory`; with `reissue`, new certificates and
    keys from the CAs of that earlier set (a rotation: clients keep trusting the CA)."""
    key = _key
    if reissue is None:
        ca_key, other_key = key(), key()
        ca = _certificate("BAGEL test CA", ca_key, None, ca=True)
        other_ca = _certificate("untrusted test CA", other_key, None, ca=True)
    else:
        ca, ca_key = _CAS[reissue.ca]
        other_ca, other_key = _CAS[reissue.other_ca]
    server_key, client_key, rogue_key, named_key = key(), key(), key(), key()
    server = _certificate(
        "bagel-service",
        server_key,
        (ca, ca_key),
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        hosts=("127.0.0.1", "localhost"),
    )
    client = _certificate(
        "bagel-client", client_key, (ca, ca_key), usage=ExtendedKeyUsageOID.CLIENT_AUTH
    )
    rogue = _certificate(
        "rogue-client", rogue_key, (other_ca, other_key), usage=ExtendedKeyUsageOID.CLIENT_AUTH
    )
    named = _certificate(
        "prefill",
        named_key,
        (ca, ca_key),
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
        hosts=(NAMED_CLIENT_DNS, NAMED_CLIENT_URI),
    )
    server_paths = _write(directory, "server", server, server_key)
    named_paths = _write(directory, "named-client", named, named_key)
    client_paths = _write(directory, "client", client, client_key)
    rogue_paths = _write(directory, "rogue", rogue, rogue_key)
    certificates = TestCertificates(
        ca=_write(directory, "ca", ca)[0],
        server_cert=server_paths[0],
        server_key=server_paths[1],
        client_cert=client_paths[0],
        client_key=client_paths[1],
        other_ca=_write(directory, "other-ca", other_ca)[0],
        rogue_client_cert=rogue_paths[0],
        rogue_client_key=rogue_paths[1],
        named_client_cert=named_paths[0],
        named_client_key=named_paths[1],
    )
    _CAS[certificates.ca] = (ca, ca_key)
    _CAS[certificates.other_ca] = (other_ca, other_key)
    return certificates
