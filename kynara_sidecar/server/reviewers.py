"""Who is reviewing: the reviewer behind a bearer token, or a refusal.

A reviewer proves who they are with one of two tokens:

- an **admin credential's secret** (``admin.credentials``) whose roles hold
  ``reviewer``; the reviewer's principal id is the credential's
  ``principal`` (default its name) and their roles ``reviewer`` plus its
  ``reviewer_roles``;
- a **reviewer JWT** signed by one of ``approvals.reviewer_issuers``,
  verified with the same rules as delegation tokens (``identity``:
  asymmetric algorithms only, ``none`` refused, issuer, signature, audience,
  expiry within the allowed clock skew); ``sub`` is the reviewer and the
  claim ``roles_claim`` their roles, which must hold ``reviewer``.

Either principal id is held to the rule for principal ids
(``policy.names.canonical_name``: NFC, no spaces, control or zero-width
characters, no mixed scripts) and used in its NFC form, so ``alice\u200b``,
``carol `` or a Cyrillic ``аlice`` can neither pass for the request's user
(self approval) nor review a second time as "another" reviewer. A JWT whose
``sub`` breaks it is ``IdentityInvalid``; such a ``principal`` in the config
is a ``ConfigError``.

What an agent holds is recognised and refused with ``RoleMissing``
(PERMISSION_DENIED), never mistaken for a reviewer: its bearer secret
(``identity.agents``) and its delegation tokens (``identity.issuers``, whose
issuer and audience the config keeps apart from every reviewer issuer's).
A token a daemon would take as a delegation token is refused even when it
also names a reviewer audience, and so is a reviewer JWT naming an actor
(an ``act`` claim): one token never opens both doors. So is an admin
credential without the reviewer role. Anything else is
``IdentityInvalid`` (UNAUTHENTICATED).

Secrets are compared as in ``server.admin``: every configured secret, an
agent's included, is compared on every call, over SHA-256 digests of equal
length and with no early exit, so the time a check takes says nothing about
which secret came close. A JWT is only tried when no secret matched.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jwt

from kynara_sidecar.approvals.eligibility import REVIEWER_ROLE
from kynara_sidecar.approvals.model import Reviewer
from kynara_sidecar.config import (
    AdminListenerConfig,
    AdminRole,
    Config,
    IdentityMode,
)
from kynara_sidecar.errors import (
    ConfigError,
    IdentityInvalid,
    RequestError,
    RoleMissing,
)
from kynara_sidecar.identity import MAX_TOKEN_BYTES, Issuer, TokenVerifier
from kynara_sidecar.metrics import Metrics
from kynara_sidecar.policy.names import canonical_name
from kynara_sidecar.server.admin import log_refusal

__all__ = [
    "AdminReviewer",
    "admin_reviewers",
    "ReviewerAuth",
    "ReviewerIssuer",
    "token_expiry_ns",
    "token_of",
]

# The metadata field (and form field) a refusal names.
CREDENTIAL_FIELD = "authorization"
# A roles claim longer than this is no list of a person's roles; bounding it
# bounds what a token can make the daemon hold.
MAX_ROLES = 256
MAX_ROLE_CHARS = 128
# As identity's bound on a delegation chain's principal ids.
MAX_PRINCIPAL_CHARS = 256


@dataclass(frozen=True)
class AdminReviewer:
    """An admin credential as the reviewer check sees it.

    Attributes:
        secret: its bearer secret.
        roles: its admin roles (``reviewer`` among them to review).
        principal: the reviewer's principal id.
        reviewer_roles: the reviewer roles rules may require.
    """

    secret: bytes
    roles: frozenset[str]
    principal: str
    reviewer_roles: frozenset[str] = frozenset()


@dataclass(frozen=True)
class ReviewerIssuer:
    """A trusted issuer of reviewer JWTs, and the claim holding the roles."""

    issuer: Issuer
    roles_claim: str = "roles"


def token_of(authorization: str) -> str:
    """The token of ``authorization: Bearer <token>`` metadata.

    Raises:
        IdentityInvalid: none, or not a bearer credential. The value is never
            echoed: without its scheme it may be the secret itself.
    """
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        got = "another form" if authorization.strip() else "none"
        raise IdentityInvalid(
            "expected 'authorization: Bearer <token>' metadata with a reviewer's "
            "admin secret (admin.credentials) or reviewer JWT "
            f"(approvals.reviewer_issuers), got {got}",
            field=CREDENTIAL_FIELD,
        )
    return token.strip()


def token_expiry_ns(token: str) -> int | None:
    """When a reviewer JWT expires (its ``exp``, in nanoseconds since the
    epoch), or None for a token that is no JWT with a numeric ``exp`` (an
    admin secret).

    The claims are read without verifying them: call this only for a token
    ``ReviewerAuth.authenticate`` has accepted (which requires ``exp``), to
    end a sign-in session no later than the token it was opened with.
    """
    if not _looks_like_jwt(token):
        return None
    try:
        exp = jwt.decode(token, options={"verify_signature": False}).get("exp")
    except jwt.PyJWTError:
        return None
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        return None
    if not math.isfinite(exp):
        return None
    return int(exp * 1_000_000_000)


def _audiences(claims: Mapping[str, Any]) -> tuple[str, ...]:
    aud = claims.get("aud")
    if isinstance(aud, str):
        return (aud,)
    if isinstance(aud, list):
        return tuple(a for a in aud if isinstance(a, str))
    return ()


def _looks_like_jwt(token: str) -> bool:
    return token.count(".") == 2 and len(token) <= MAX_TOKEN_BYTES


def admin_reviewers(
    admin: AdminListenerConfig,
    loaded: Mapping[str, tuple[bytes, frozenset[AdminRole]]],
) -> dict[str, AdminReviewer]:
    """The admin credentials as reviewers: ``loaded`` is
    ``admin.load_credentials()``, read once by the caller."""
    return {
        name: AdminReviewer(
            secret=secret,
            roles=frozenset(str(role) for role in roles),
            principal=admin.credentials[name].principal or name,
            reviewer_roles=frozenset(admin.credentials[name].reviewer_roles),
        )
        for name, (secret, roles) in loaded.items()
    }


class ReviewerAuth:
    """Finds the reviewer behind a token, or says why there is none.

    Args:
        credentials: admin credential name -> what it holds.
        issuers: the trusted reviewer-JWT issuers.
        agent_secrets: agent id -> bearer secret (``identity.agents``),
            recognised to be refused.
        delegation_issuers: the delegation-token issuers
            (``identity.issuers``), whose tokens are recognised to be refused.
        max_clock_skew_seconds: as ``identity.max_clock_skew_seconds``.
        clock: nanoseconds since the epoch (the daemon's clock).
        metrics: counts refusals by code (``authorize``), when given.

    Raises:
        ConfigError: two reviewer issuers with one ``iss`` and audience.

    Build a daemon's with ``ReviewerAuth.from_config``.
    """

    def __init__(
        self,
        credentials: Mapping[str, AdminReviewer],
        issuers: Sequence[ReviewerIssuer] = (),
        *,
        agent_secrets: Mapping[str, bytes] | None = None,
        delegation_issuers: Sequence[Issuer] = (),
        max_clock_skew_seconds: float = 0.0,
        clock: Callable[[], int] = time.time_ns,
        metrics: Metrics | None = None,
    ):
        self._admin = tuple(
            (
                name,
                dataclasses.replace(
                    credential,
                    principal=_admin_principal(name, credential.principal),
                ),
                hashlib.sha256(credential.secret).digest(),
            )
            for name, credential in credentials.items()
        )
        self._agents = tuple(
            (agent, hashlib.sha256(secret).digest())
            for agent, secret in (agent_secrets or {}).items()
        )
        # A reviewer token is checked exactly as a delegation token is
        # (TokenVerifier.claims); only what is read from it differs.
        self._issuers: dict[tuple[str, str], tuple[ReviewerIssuer, TokenVerifier]]
        self._issuers = {}
        for i, issuer in enumerate(issuers):
            key = (issuer.issuer.issuer, issuer.issuer.audience)
            if key in self._issuers:
                raise ConfigError(
                    f"approvals.reviewer_issuers[{i}]: expected each issuer and "
                    f"audience once, got {key[0]!r} with audience {key[1]!r} again"
                )
            verifier = TokenVerifier([issuer.issuer], max_clock_skew_seconds)
            self._issuers[key] = (issuer, verifier)
        self._reviewer_iss = {key[0]: found for key, found in self._issuers.items()}
        self._delegation_iss = frozenset(i.issuer for i in delegation_issuers)
        self._delegation_aud = frozenset(
            (i.issuer, i.audience) for i in delegation_issuers
        )
        self._delegation = (
            TokenVerifier(delegation_issuers, max_clock_skew_seconds)
            if delegation_issuers
            else None
        )
        self._clock = clock
        self._metrics = metrics
        self._watchers: list[Callable[[frozenset[str]], None]] = []

    def adopt_credentials(self, fresh: ReviewerAuth) -> frozenset[str]:
        """Take ``fresh``'s admin credentials from now on (SIGHUP: a rotated
        secret file or a changed ``admin.credentials``); issuers and agents
        stay as they are. One assignment, as ``AdminCredentials.adopt``.

        Returns the names of the credentials that were removed or changed
        (secret, roles, principal or reviewer roles), after telling each
        ``watch_credentials`` callback of them, so that a sign-in session
        opened with one ends (``review_page.SessionStore.end_credentials``)
        rather than outlive it. Unchanged credentials keep their sessions.
        """
        before = {name: credential for name, credential, _ in self._admin}
        after = {name: credential for name, credential, _ in fresh._admin}
        changed = frozenset(
            name for name, credential in before.items() if after.get(name) != credential
        )
        self._admin = fresh._admin
        if changed:
            for ended in self._watchers:
                ended(changed)
        return changed

    def watch_credentials(self, ended: Callable[[frozenset[str]], None]) -> None:
        """Call ``ended`` with the names of the admin credentials each
        ``adopt_credentials`` removed or changed (never with an empty set).
        The review page's and the playground's session stores watch here."""
        self._watchers.append(ended)

    @classmethod
    def from_config(
        cls,
        config: Config,
        *,
        clock: Callable[[], int] = time.time_ns,
        metrics: Metrics | None = None,
    ) -> ReviewerAuth:
        """The reviewers of a daemon: its admin credentials, its reviewer
        issuers, and its agents' credentials to refuse.

        Raises:
            ConfigError: a secret or JWKS cannot be read.
        """
        credentials = admin_reviewers(config.admin, config.admin.load_credentials())
        issuers = [
            ReviewerIssuer(
                issuer.load(f"approvals.reviewer_issuers[{i}]"), issuer.roles_claim
            )
            for i, issuer in enumerate(config.approvals.reviewer_issuers)
        ]
        identity = config.identity
        verified = identity.mode is IdentityMode.VERIFIED
        return cls(
            credentials,
            issuers,
            agent_secrets=identity.load_agent_secrets() if identity.agents else {},
            delegation_issuers=identity.load_issuers() if verified else (),
            max_clock_skew_seconds=identity.max_clock_skew_seconds,
            clock=clock,
            metrics=metrics,
        )

    @property
    def configured(self) -> bool:
        """Whether anyone could sign in: an admin reviewer or an issuer."""
        return bool(self._issuers) or any(
            REVIEWER_ROLE in credential.roles for _, credential, _ in self._admin
        )

    def authenticate(self, token: str) -> Reviewer:
        """Return the reviewer who holds ``token``.

        Args:
            token: an admin credential's secret or a reviewer JWT, without
                any ``Bearer`` scheme.

        Raises:
            IdentityInvalid: none, or no credential or issuer knows it, or a
                JWT that fails a check (the message says which).
            RoleMissing: a valid credential that may not review: an admin
                credential without the reviewer role, an agent's bearer
                secret, a delegation token, a reviewer JWT whose roles lack
                ``reviewer``.
        """
        token = token.strip()
        if not token:
            raise IdentityInvalid(
                "expected a reviewer's admin secret or reviewer JWT, got none",
                field=CREDENTIAL_FIELD,
            )
        given = hashlib.sha256(token.encode()).digest()
        admin = self._match_admin(given)
        agent = self._match_agent(given)
        if admin is not None:
            return self._admin_reviewer(*admin)
        if agent:
            raise RoleMissing(
                "agent credentials cannot review: expected a reviewer's admin "
                f"secret or reviewer JWT, got the bearer secret of agent {agent!r}",
                field=CREDENTIAL_FIELD,
            )
        if _looks_like_jwt(token):
            return self._jwt_reviewer(token)
        raise IdentityInvalid(
            "expected a reviewer's admin secret (admin.credentials) or reviewer "
            "JWT (approvals.reviewer_issuers), got an unknown token",
            field=CREDENTIAL_FIELD,
        )

    def authorize(self, authorization: str, call: str) -> Reviewer:
        """Authenticate ``authorization: Bearer <token>`` metadata; log and
        count a refusal as every admin refusal is.

        Args:
            authorization: the metadata value.
            call: the method, for the log line, e.g. "ApprovalService.Approve".

        Raises:
            IdentityInvalid, RoleMissing: as ``authenticate``.
        """
        try:
            return self.authenticate(token_of(authorization))
        except (IdentityInvalid, RoleMissing) as err:
            self.refused(err, call)
            raise

    def refused(self, err: RequestError, call: str) -> None:
        """Log and count one refused reviewer call (a bad credential, a
        missing role, a self-approval)."""
        log_refusal(err, call, self._metrics)

    def _match_admin(self, given: bytes) -> tuple[str, AdminReviewer] | None:
        found: tuple[str, AdminReviewer] | None = None
        # No early exit: every digest is compared on every call.
        for name, credential, digest in self._admin:
            if hmac.compare_digest(digest, given):
                found = (name, credential)
        return found

    def _match_agent(self, given: bytes) -> str:
        found = ""
        for agent, digest in self._agents:
            if hmac.compare_digest(digest, given):
                found = agent
        return found

    def _admin_reviewer(self, name: str, credential: AdminReviewer) -> Reviewer:
        if AdminRole.REVIEWER not in credential.roles:
            raise RoleMissing(
                f"expected a credential with the {REVIEWER_ROLE} role, got "
                f"{name!r} with roles [{', '.join(sorted(credential.roles))}]: add "
                f"the role in admin.credentials.{name}.roles",
                field=CREDENTIAL_FIELD,
            )
        return Reviewer(
            id=credential.principal,
            roles=frozenset({REVIEWER_ROLE}) | credential.reviewer_roles,
            credential=name,
        )

    def _jwt_reviewer(self, token: str) -> Reviewer:
        try:
            # Read only to choose the verifier; trusted once it verifies.
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError as err:
            raise IdentityInvalid(
                f"malformed: expected a compact JWT: {err}", field=CREDENTIAL_FIELD
            ) from None
        iss = unverified.get("iss")
        if self._delegation is not None and self._delegation_audience(unverified):
            # One token for both doors would let whoever holds it, an agent
            # included, review: a token a daemon would take as a delegation
            # token never signs a reviewer in, whatever other audience it
            # names.
            self._refuse_delegation_token(token)
        for aud in _audiences(unverified):
            found = self._issuers.get((iss, aud)) if isinstance(iss, str) else None
            if found is not None:
                return self._verified_reviewer(token, *found)
        if iss in self._delegation_iss and self._delegation is not None:
            if iss not in self._reviewer_iss or self._delegation_audience(unverified):
                self._refuse_delegation_token(token)
        if iss in self._reviewer_iss:
            # A known reviewer issuer with none of its audiences: verify with
            # one of its entries, whose audience check then says what was
            # expected and what was got (after the signature, as for
            # delegation tokens).
            return self._verified_reviewer(token, *self._reviewer_iss[iss])
        raise IdentityInvalid(
            "issuer: expected a reviewer JWT from one of "
            f"{sorted({key[0] for key in self._issuers})} "
            f"(approvals.reviewer_issuers) with its audience, got iss {iss!r}",
            field=CREDENTIAL_FIELD,
        )

    def _delegation_audience(self, unverified: Mapping[str, Any]) -> bool:
        iss = unverified.get("iss")
        return any((iss, aud) in self._delegation_aud for aud in _audiences(unverified))

    def _now(self) -> float:
        return self._clock() / 1_000_000_000

    def _verified_reviewer(
        self, token: str, issuer: ReviewerIssuer, verifier: TokenVerifier
    ) -> Reviewer:
        try:
            claims = verifier.claims(token, self._now())
        except IdentityInvalid as err:
            raise IdentityInvalid(
                f"reviewer token: {err}", field=CREDENTIAL_FIELD
            ) from None
        if "act" in claims:
            raise RoleMissing(
                "agent credentials cannot review: expected a reviewer JWT, got one "
                "naming an actor (an `act` claim): a token delegated to an agent",
                field=CREDENTIAL_FIELD,
            )
        sub = _principal_of_sub(claims["sub"])
        roles = _roles(claims.get(issuer.roles_claim), issuer.roles_claim)
        if REVIEWER_ROLE not in roles:
            raise RoleMissing(
                f"expected a reviewer JWT whose {issuer.roles_claim!r} claim holds "
                f"{REVIEWER_ROLE!r}, got {sub!r} with roles "
                f"[{', '.join(sorted(roles))}]",
                field=CREDENTIAL_FIELD,
            )
        return Reviewer(id=sub, roles=roles, credential=issuer.issuer.issuer)

    def _refuse_delegation_token(self, token: str) -> None:
        assert self._delegation is not None
        try:
            self._delegation.verify(token, self._now())
        except IdentityInvalid as err:
            raise IdentityInvalid(
                f"delegation token: {err}", field=CREDENTIAL_FIELD
            ) from None
        raise RoleMissing(
            "agent credentials cannot review: expected a reviewer's admin secret "
            "or reviewer JWT, got a delegation token (identity.issuers)",
            field=CREDENTIAL_FIELD,
        )


def _principal_of_sub(sub: object) -> str:
    # The reviewer is compared with a request's chain (self approval) and
    # with other reviewers (one review each) by the principal id rule, so
    # `alice\u200b` or a Cyrillic `аlice` cannot pass for a second person.
    if not isinstance(sub, str) or not 0 < len(sub) <= MAX_PRINCIPAL_CHARS:
        raise IdentityInvalid(
            "reviewer token: claims: expected sub to be a principal id of "
            f"1..{MAX_PRINCIPAL_CHARS} characters, got {str(sub)[:80]!r}",
            field=CREDENTIAL_FIELD,
        )
    try:
        return canonical_name(sub)
    except ValueError as err:
        raise IdentityInvalid(
            f"reviewer token: claims: sub {sub[:80]!r} is no principal id: {err}",
            field=CREDENTIAL_FIELD,
        ) from None


def _admin_principal(name: str, principal: str) -> str:
    try:
        return canonical_name(principal)
    except ValueError as err:
        raise ConfigError(
            f"credentials.{name}.principal (admin.credentials or "
            f"inbox.credentials): {principal[:80]!r} is no principal id: {err}"
        ) from None


def _roles(value: object, claim: str) -> frozenset[str]:
    if value is None:
        return frozenset()
    # Some identity providers send a single role as a string.
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or len(items) > MAX_ROLES:
        raise IdentityInvalid(
            f"reviewer token: claims: expected {claim!r} to be a list of at most "
            f"{MAX_ROLES} role names, got {type(value).__name__}",
            field=CREDENTIAL_FIELD,
        )
    roles: set[str] = set()
    for item in items:
        if not isinstance(item, str) or not 0 < len(item) <= MAX_ROLE_CHARS:
            raise IdentityInvalid(
                f"reviewer token: claims: expected {claim!r} to hold role names "
                f"of 1..{MAX_ROLE_CHARS} characters, got {str(item)[:80]!r}",
                field=CREDENTIAL_FIELD,
            )
        roles.add(item)
    return frozenset(roles)
