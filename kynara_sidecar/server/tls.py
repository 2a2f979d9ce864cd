"""A listener's serving certificate: a PEM certificate (chain) and its
private key, checked as a pair, and re-read when the files change.

Certificates are renewed in place (cert-manager, a rotated Kubernetes
Secret), so each TLS listener asks for the newest pair before each new
handshake: gRPC (the admin listener) through ``ServingCertificate.fetch``,
aiohttp (the HTTP listener) through the server-name callback of the
``ssl.SSLContext`` that ``ServingCertificate.ssl_context`` returns, which
hands the connection a context loaded with the renewed pair. Either way
both files are read (a few KiB; TLS connections to these listeners are few
and long-lived) and parsed only when their bytes changed, so no renewal is
missed however close together two writes fall. A renewed pair is served to
the next connection without a restart; a broken one keeps the previous pair
and is logged once.

A gRPC listener given a client CA (the agent listener's
``agent.tls.client_ca_file``) requires every client to present a
certificate that CA signed; the CA file is watched with the pair, so a
rotated CA bundle is trusted from the next handshake on.
"""

from __future__ import annotations

import logging
import pathlib
import ssl
import threading
from collections.abc import Callable
from typing import NamedTuple, TypeVar

import grpc
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from kynara_sidecar.errors import ConfigError

__all__ = [
    "CertificatePair",
    "ServingCertificate",
    "load_certificate_pair",
    "load_client_ca",
]

log = logging.getLogger("kynara.server")

_Served = TypeVar("_Served")


class CertificatePair(NamedTuple):
    """A PEM certificate chain (leaf first) and the leaf's private key."""

    cert_pem: bytes
    key_pem: bytes
    # The leaf's serial number, for logs.
    serial: int
    # PEM certificates of the CAs that sign client certificates; empty
    # when clients are not asked for one.
    client_ca_pem: bytes = b""


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


def load_client_ca(ca_file: str, section: str = "agent.tls") -> bytes:
    """Read ``ca_file``: the PEM certificates of the CAs whose client
    certificates a listener accepts.

    Raises:
        ConfigError: the file cannot be read or holds no PEM certificate;
            the message names ``section``'s ``client_ca_file``.
    """
    ca_pem = _read(f"{section}.client_ca_file", ca_file, "CA certificates")
    return _check_ca(ca_pem, ca_file, section)


def _check_ca(ca_pem: bytes, ca_file: str, section: str) -> bytes:
    try:
        x509.load_pem_x509_certificates(ca_pem)
    except ValueError as err:
        raise ConfigError(
            f"{section}.client_ca_file: expected PEM CA certificates in {ca_file}, "
            f"got none readable ({err})"
        ) from None
    return ca_pem


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


def _contents(paths: tuple[str, ...]) -> tuple[bytes, ...] | str:
    """The files' bytes, or why they cannot be read."""
    try:
        return tuple(pathlib.Path(path).read_bytes() for path in paths)
    except (OSError, ValueError) as err:
        return str(err)


class ServingCertificate:
    """The pair a TLS listener serves, re-read when its files change.

    Thread safe: gRPC calls ``fetch`` from its own threads at each handshake.

    With ``client_ca_file`` (gRPC only: ``credentials``), every client must
    present a certificate that one of its CAs signed, or the handshake fails.

    Raises:
        ConfigError: at construction, the files do not hold a pair (see
            ``load_certificate_pair``) or the CA file no certificate.
    """

    def __init__(
        self,
        cert_file: str,
        key_file: str,
        section: str = "admin.tls",
        listener: str = "",
        *,
        client_ca_file: str = "",
    ):
        self._files: tuple[str, ...] = (cert_file, key_file)
        self._section = section
        # Which listener serves it, for logs: agent, admin, http or collector.
        self._listener = listener or section.split(".")[0]
        self._lock = threading.Lock()
        self._pair = load_certificate_pair(cert_file, key_file, section)
        if client_ca_file:
            self._files += (client_ca_file,)
            self._pair = self._pair._replace(
                client_ca_pem=load_client_ca(client_ca_file, section)
            )
        self._seen: tuple[bytes, ...] | str = self._served_bytes(self._pair)
        self._context: ssl.SSLContext | None = None

    @property
    def serial(self) -> int:
        """The serial number of the leaf certificate served now."""
        return self._pair.serial

    def credentials(self) -> grpc.ServerCredentials:
        """gRPC server credentials serving the pair, and each renewed one."""
        return grpc.dynamic_ssl_server_credentials(
            self._configuration(self._pair),
            self.fetch,
            require_client_authentication=bool(self._pair.client_ca_pem),
        )

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """The renewed pair when the files changed and hold a good one, else
        None (keep serving the current pair).

        Never raises: an error here would fail the caller's handshake.
        """
        return self._renewed(self._configuration)

    def ssl_context(self) -> ssl.SSLContext:
        """A server context (TLS 1.2 or later) serving the pair, and each
        renewed one to the connections that start after the renewal.

        Each handshake runs the context's server-name callback (OpenSSL runs
        it whether or not the client sent a name, as clients reaching an IP
        address do not); it checks the files and moves the connection to a
        context loaded with the newest good pair.
        """
        base = self._load_context(self._pair)
        self._context = base

        def select(connection, _server_name, _context) -> None:
            renewed = self._renewed(self._load_context)
            if renewed is not None:
                self._context = renewed
            if self._context is not base:
                connection.context = self._context

        base.sni_callback = select
        return base

    def _renewed(self, serve: Callable[[CertificatePair], _Served]) -> _Served | None:
        """``serve(pair)`` for a renewed good pair, else None.

        ``serve`` may raise ConfigError to refuse the pair, which then counts
        as a bad renewal. Never raises.
        """
        with self._lock:
            seen = _contents(self._files)
            if seen == self._seen:
                return None
            self._seen = seen
            try:
                if isinstance(seen, str):
                    raise ConfigError(f"{self._section}: cannot read: {seen}")
                pair = _check_pair(*seen[:2], *self._files[:2], self._section)
                if len(seen) > 2:
                    ca = _check_ca(seen[2], self._files[2], self._section)
                    pair = pair._replace(client_ca_pem=ca)
                if self._served_bytes(pair) == self._served_bytes(self._pair):
                    return None
                served = serve(pair)
            except ConfigError as err:
                log.warning(
                    "TLS certificate not renewed: keeping the one served",
                    extra=self._fields(error=str(err), serial=_hex(self._pair.serial)),
                )
                return None
            except Exception as err:  # noqa: BLE001 - must not fail a handshake
                log.error(
                    "TLS certificate not renewed: keeping the one served",
                    extra=self._fields(error=repr(err), serial=_hex(self._pair.serial)),
                )
                return None
            log.info(
                "TLS certificate renewed",
                extra=self._fields(
                    serial=_hex(pair.serial), previous=_hex(self._pair.serial)
                ),
            )
            self._pair = pair
            return served

    def _load_context(self, pair: CertificatePair) -> ssl.SSLContext:
        """A server context loaded with ``pair``.

        ``ssl`` loads certificates from files only, so the files are read
        again and must still hold ``pair``; a write between the check and the
        load raises ConfigError, and the next handshake reads them anew.
        """
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(*self._files[:2])
        except (OSError, ssl.SSLError) as err:
            raise ConfigError(
                f"{self._section}: cannot load the certificate and key: {err}"
            ) from None
        if _contents(self._files[:2]) != pair[:2]:
            raise ConfigError(
                f"{self._section}: the files changed while being loaded; "
                "the next connection reads them again"
            )
        return context

    def _served_bytes(self, pair: CertificatePair) -> tuple[bytes, ...]:
        """What of ``pair`` the watched files hold, in their order."""
        if len(self._files) > 2:
            return (pair.cert_pem, pair.key_pem, pair.client_ca_pem)
        return (pair.cert_pem, pair.key_pem)

    @staticmethod
    def _configuration(pair: CertificatePair) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(pair.key_pem, pair.cert_pem)], pair.client_ca_pem or None
        )

    def _fields(self, **fields: object) -> dict[str, dict[str, object]]:
        return {"fields": {"component": "server", "listener": self._listener, **fields}}


def _hex(serial: int) -> str:
    """A certificate serial as ``openssl x509 -serial`` prints it: upper
    case hex digits, an even number of them (a JSON number would lose the
    digits of a 20-byte serial in many log tools)."""
    digits = f"{serial:X}"
    return "0" * (len(digits) % 2) + digits
