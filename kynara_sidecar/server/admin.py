"""The admin listener's credential check: who is calling, and may they?

Every admin call carries ``authorization: Bearer <secret>``. The secret is
compared with every configured credential (``admin.credentials``), never
stopping at the first match and always over SHA-256 digests of equal
length, so the time a check takes says nothing about which secret came
close. The credential found must carry the role the call needs
(``operator`` for AuditService); a valid credential without it is refused
with ``role_missing`` (PERMISSION_DENIED), no credential or an unknown one
with ``identity_invalid`` (UNAUTHENTICATED).

Admin secrets are never an agent's (the config refuses that), so an agent
holding its own bearer secret cannot read the audit log or resolve its own
approvals. Admin calls are not audited; refusals are logged and counted.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Mapping
from typing import NamedTuple

import grpc

from kynara_sidecar.config import AdminListenerConfig, AdminRole
from kynara_sidecar.errors import IdentityInvalid, RequestError, RoleMissing
from kynara_sidecar.metrics import Metrics

__all__ = ["AdminCaller", "AdminCredentials", "authorization_of", "log_refusal"]

# The metadata field a refusal names, as on the agent listener.
CREDENTIAL_FIELD = "authorization"

log = logging.getLogger("kynara.server")


class AdminCaller(NamedTuple):
    """An authenticated admin caller: its credential name and roles."""

    name: str
    roles: frozenset[AdminRole]


def authorization_of(context: grpc.aio.ServicerContext) -> str:
    """The caller's ``authorization`` metadata, or "" when it sent none."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str):
            return value
    return ""


class AdminCredentials:
    """Finds the admin caller from its bearer secret and checks its role.

    Args:
        credentials: name -> (secret, roles); secrets must differ.
        metrics: counts refusals by code, when given.

    Build from configuration with ``AdminCredentials.from_config``.
    """

    def __init__(
        self,
        credentials: Mapping[str, tuple[bytes, frozenset[AdminRole]]],
        metrics: Metrics | None = None,
    ):
        self._digests = tuple(
            (AdminCaller(name, roles), hashlib.sha256(secret).digest())
            for name, (secret, roles) in credentials.items()
        )
        self._metrics = metrics

    @classmethod
    def from_config(
        cls, config: AdminListenerConfig, metrics: Metrics | None = None
    ) -> AdminCredentials:
        """Read the configured secrets.

        Raises:
            ConfigError: a secret file cannot be read or is too short.
        """
        return cls(config.load_credentials(), metrics)

    def adopt(self, fresh: AdminCredentials) -> None:
        """Check secrets against ``fresh``'s table from now on (SIGHUP: a
        rotated secret file or a changed ``admin.credentials``). One
        assignment, so a check in progress sees the old table or the new."""
        self._digests = fresh._digests

    def authenticate(self, authorization: str) -> AdminCaller:
        """Return the caller whose secret was presented.

        Args:
            authorization: the ``authorization`` metadata, ``Bearer <secret>``.

        Raises:
            IdentityInvalid: on field ``authorization``: missing, not a bearer
                credential, or no admin credential's secret.
        """
        scheme, _, secret = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            # Never echo the value: without a scheme, it is the secret itself.
            got = "another form" if authorization.strip() else "none"
            raise IdentityInvalid(
                "expected 'authorization: Bearer <secret>' metadata with an admin "
                f"credential (admin.credentials), got {got}",
                field=CREDENTIAL_FIELD,
            )
        given = hashlib.sha256(secret.strip().encode()).digest()
        found: AdminCaller | None = None
        # No early exit: every digest is compared on every call.
        for caller, digest in self._digests:
            if hmac.compare_digest(digest, given):
                found = caller
        if found is None:
            raise IdentityInvalid(
                "expected the secret of an admin credential (admin.credentials), "
                "got an unknown one",
                field=CREDENTIAL_FIELD,
            )
        return found

    def authorize(self, authorization: str, role: AdminRole, call: str) -> AdminCaller:
        """Authenticate the caller and check that it carries ``role``.

        Args:
            authorization: the ``authorization`` metadata.
            role: the role the call needs.
            call: the method, for the log line, e.g. "AuditService.GetHead".

        Returns:
            The caller.

        Raises:
            IdentityInvalid: no credential or an unknown one.
            RoleMissing: a known credential without ``role``.
        """
        try:
            caller = self.authenticate(authorization)
            if role not in caller.roles:
                raise RoleMissing(
                    f"expected a credential with the {role} role for {call}, got "
                    f"{caller.name!r} with roles [{', '.join(sorted(caller.roles))}]: "
                    "add the role "
                    f"in admin.credentials.{caller.name}.roles",
                    field=CREDENTIAL_FIELD,
                )
        except (IdentityInvalid, RoleMissing) as err:
            self._refused(err, call)
            raise
        return caller

    def _refused(self, err: IdentityInvalid | RoleMissing, call: str) -> None:
        log_refusal(err, call, self._metrics)


def log_refusal(err: RequestError, call: str, metrics: Metrics | None) -> None:
    """Log and count one refused admin call (``kynara_admin_refusals``, by
    code): a bad credential, a missing role, or a reviewer refused.

    Args:
        err: why it was refused.
        call: the method, e.g. "ApprovalService.Approve".
        metrics: where to count it, when given.
    """
    log.warning(
        "admin call refused",
        extra={
            "fields": {
                "component": "server",
                "listener": "admin",
                "call": call,
                "code": str(err.code),
                "error": str(err),
            }
        },
    )
    if metrics is not None:
        metrics.admin_refusals.labels(str(err.code)).inc()
