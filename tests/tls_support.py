"""Certificates for the TLS tests, made with ``cryptography``: a test CA
(``Authority``) issuing leaves for the loopback addresses, a self-signed
leaf for any names (``self_signed``), a pair written where a listener's
``tls`` settings point (``write_pair``), and the serial number a listener
serves (``served_serial``). One place, so every listener's tests trust and
renew certificates the same way."""

from __future__ import annotations

import datetime
import ipaddress
import pathlib
import socket
import ssl
from typing import NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

LOOPBACK_NAMES = ("127.0.0.1", "127.0.0.2", "::1")
# Bounds a handshake; no assertion depends on how long it takes.
HANDSHAKE_TIMEOUT = 10


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _validity(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    """Valid from five minutes ago (clock skew) for a day."""
    now = datetime.datetime.now(datetime.UTC)
    return builder.not_valid_before(
        now - datetime.timedelta(minutes=5)
    ).not_valid_after(now + datetime.timedelta(days=1))


class Authority:
    """A test CA that issues leaf certificates for the loopback addresses."""

    def __init__(self, name: str):
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.name = subject
        self.cert = (
            self._builder(subject, self.key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), False
            )
            .sign(self.key, hashes.SHA256())
        )
        self.pem = self.cert.public_bytes(serialization.Encoding.PEM)

    def _builder(self, subject: x509.Name, public_key) -> x509.CertificateBuilder:
        return _validity(
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
        )

    def issue(self, key=None) -> tuple[bytes, bytes, int]:
        """A leaf for localhost and the loopback addresses: (cert PEM, key
        PEM, serial)."""
        key = key or ec.generate_private_key(ec.SECP256R1())
        names = [x509.DNSName("localhost")] + [
            x509.IPAddress(ipaddress.ip_address(name)) for name in LOOPBACK_NAMES
        ]
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kynara")])
        cert = (
            self._builder(subject, key.public_key())
            .add_extension(x509.SubjectAlternativeName(names), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    self.key.public_key()
                ),
                False,
            )
            .sign(self.key, hashes.SHA256())
        )
        return (
            cert.public_bytes(serialization.Encoding.PEM),
            _key_pem(key),
            cert.serial_number,
        )

    def issue_client(self, *uris: str) -> tuple[bytes, bytes, int]:
        """A client leaf whose subject alternative names are ``uris`` (URI
        SANs, e.g. SPIFFE IDs): (cert PEM, key PEM, serial)."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "agent")])
        builder = self._builder(subject, key.public_key())
        if uris:
            names = [x509.UniformResourceIdentifier(uri) for uri in uris]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), False)
        cert = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
            False,
        ).sign(self.key, hashes.SHA256())
        return (
            cert.public_bytes(serialization.Encoding.PEM),
            _key_pem(key),
            cert.serial_number,
        )


def self_signed(*names: str) -> tuple[bytes, bytes, int]:
    """A self-signed leaf for ``names`` (DNS names or IP addresses): (cert
    PEM, key PEM, serial). It is its own trust root."""
    if not names:
        raise ValueError("self_signed: name at least one DNS name or IP address")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kynara")])
    alternatives: list[x509.GeneralName] = []
    for name in names:
        try:
            alternatives.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alternatives.append(x509.DNSName(name))
    cert = (
        _validity(
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
        )
        .add_extension(x509.SubjectAlternativeName(alternatives), False)
        .sign(key, hashes.SHA256())
    )
    return (
        cert.public_bytes(serialization.Encoding.PEM),
        _key_pem(key),
        cert.serial_number,
    )


def stray_key() -> bytes:
    """A PEM private key that no certificate made here belongs to: what a
    renewal gone wrong leaves beside the certificate."""
    return _key_pem(ec.generate_private_key(ec.SECP256R1()))


class PairFiles(NamedTuple):
    """Where ``write_pair`` put a certificate and its key, and its serial."""

    cert_file: pathlib.Path
    key_file: pathlib.Path
    serial: int

    def settings(self) -> dict[str, str]:
        """The listener's ``tls`` settings naming these files."""
        return {"cert_file": str(self.cert_file), "key_file": str(self.key_file)}


def write_pair(
    directory: pathlib.Path, issued: tuple[bytes, bytes, int], stem: str = "tls"
) -> PairFiles:
    """Write ``issued`` (cert PEM, key PEM, serial, as ``Authority.issue``
    and ``self_signed`` return it) to ``directory/<stem>.crt`` and
    ``<stem>.key``."""
    cert_pem, key_pem, serial = issued
    cert_file, key_file = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert_file.write_bytes(cert_pem)
    key_file.write_bytes(key_pem)
    return PairFiles(cert_file, key_file, serial)


def served_serial(host: str, port: int, context: ssl.SSLContext) -> int:
    """The serial number of the certificate a fresh TLS handshake with
    ``host:port`` is given, the handshake checked as ``context`` says."""
    with socket.create_connection((host, port), timeout=HANDSHAKE_TIMEOUT) as raw:
        with context.wrap_socket(raw, server_hostname=host) as tls:
            der = tls.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der).serial_number
