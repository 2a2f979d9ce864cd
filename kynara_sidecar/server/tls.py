"""The admin listener's serving certificate: a PEM certificate (chain) and
its private key, checked as a pair, and re-read when the files change.

Certificates are renewed in place (cert-manager, a rotated Kubernetes
Secret), so gRPC asks ``ServingCertificate.fetch`` before each new TLS
handshake. It reads both files (a few KiB; admin connections are few) and
parses them only when their bytes changed, so no renewal is missed however
close together two writes fall. A renewed pair is served to the next
connection without a restart; a broken one keeps the previous pair and is
logged once.
"""

from __future__ import annotations

import logging
import pathlib
import threading
from typing import NamedTuple

import grpc
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from kynara_sidecar.errors import ConfigError

__all__ = ["CertificatePair", "ServingCertificate", "load_certificate_pair"]

log = logging.getLogger("kynara.server")


class CertificatePair(NamedTuple):
    """A PEM certificate chain (leaf first) and the leaf's private key."""

    cert_pem: bytes
    key_pem: bytes
    # The leaf's serial number, for logs.
    serial: int


def _read(where: str, path: str, what: str) -> bytes:
    try:
        return pathlib.Path(path).read_bytes()
    except (OSError, ValueError) as err:
        raise ConfigError(f"{where}: cannot read the {what}: {err}") from None


def load_certificate_pair(
    cert_file: str, key_file: str, section: str = "admin.tls"
) -> CertificatePair:
    """Read ``cert_file`` and ``key_file`` and check that they belong together.

    Raises:
        ConfigError: a file that cannot be read, is no PEM certificate or
            unencrypted PEM private key, or a key that is not the leaf
            certificate's; the message names the key of ``section``.
    """
    cert_pem = _read(f"{section}.cert_file", cert_file, "certificate")
    key_pem = _read(f"{section}.key_file", key_file, "private key")
    return _check_pair(cert_pem, key_pem, cert_file, key_file, section)


def _check_pair(
    cert_pem: bytes, key_pem: bytes, cert_file: str, key_file: str, section: str
) -> CertificatePair:
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError as err:
        raise ConfigError(
            f"{section}.cert_file: expected a PEM certificate (leaf first) in "
            f"{cert_file}, got none readable ({err})"
        ) from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (TypeError, ValueError, UnsupportedAlgorithm) as err:
        raise ConfigError(
            f"{section}.key_file: expected an unencrypted PEM private key in "
            f"{key_file}, got none readable ({err})"
        ) from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != chain[0].public_key().public_bytes(
        *spki
    ):
        raise ConfigError(
            f"{section}.key_file: expected the private key of the certificate in "
            f"{section}.cert_file ({cert_file}), got the key of another "
            f"certificate in {key_file}"
        )
    return CertificatePair(cert_pem, key_pem, chain[0].serial_number)


def _contents(paths: tuple[str, str]) -> tuple[bytes, bytes] | str:
    """The files' bytes, or why they cannot be read."""
    try:
        return (
            pathlib.Path(paths[0]).read_bytes(),
            pathlib.Path(paths[1]).read_bytes(),
        )
    except (OSError, ValueError) as err:
        return str(err)


class ServingCertificate:
    """The pair a TLS listener serves, re-read when its files change.

    Thread safe: gRPC calls ``fetch`` from its own threads at each handshake.
    """

    def __init__(self, cert_file: str, key_file: str, section: str = "admin.tls"):
        self._files = (cert_file, key_file)
        self._section = section
        self._lock = threading.Lock()
        self._pair = load_certificate_pair(cert_file, key_file, section)
        self._seen: tuple[bytes, bytes] | str = self._pair[:2]

    @property
    def serial(self) -> int:
        """The serial number of the leaf certificate served now."""
        return self._pair.serial

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials serving the pair, and each renewed one."""
        return grpc.dynamic_ssl_server_credentials(
            self._configuration(self._pair), self.fetch
        )

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """The renewed pair when the files changed and hold a good one, else
        None (keep serving the current pair).

        Never raises: an error here would fail the caller's handshake.
        """
        with self._lock:
            seen = _contents(self._files)
            if seen == self._seen:
                return None
            self._seen = seen
            try:
                if isinstance(seen, str):
                    raise ConfigError(f"{self._section}: cannot read: {seen}")
                pair = _check_pair(*seen, *self._files, self._section)
            except ConfigError as err:
                log.warning(
                    "TLS certificate not renewed: keeping the one served",
                    extra=_fields(error=str(err), serial=self._pair.serial),
                )
                return None
            except Exception as err:  # noqa: BLE001 - must not reach gRPC
                log.error(
                    "TLS certificate not renewed: keeping the one served",
                    extra=_fields(error=repr(err), serial=self._pair.serial),
                )
                return None
            if pair[:2] == self._pair[:2]:
                return None
            log.info(
                "TLS certificate renewed",
                extra=_fields(serial=pair.serial, previous=self._pair.serial),
            )
            self._pair = pair
            return self._configuration(pair)

    @staticmethod
    def _configuration(pair: CertificatePair) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(pair.key_pem, pair.cert_pem)]
        )


def _fields(**fields: object) -> dict[str, dict[str, object]]:
    return {"fields": {"component": "admin_tls", **fields}}
