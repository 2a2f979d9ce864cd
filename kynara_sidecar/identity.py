"""Verified identities: delegation tokens and per-agent credentials.

Theory of operation. In ``identity.mode: verified`` nobody's word is taken
for who is asking:

- The **delegation token** is a JWT signed by a configured issuer. Its
  ``sub`` is the user; RFC 8693 ``act`` claims nest one per hop, the
  outermost naming the latest actor and the innermost the earliest, so
  ``{sub: alice, act: {sub: agent-b, act: {sub: agent-a}}}`` is the chain
  ``alice -> agent-a -> agent-b``. ``TokenVerifier.verify`` checks, in this
  order: the shape, the algorithm (``none`` and anything not configured for
  the issuer are refused before any key is touched), the issuer, the
  signature, the audience, and expiry and not-before against the daemon's
  clock with a bounded skew. Any failure is ``IdentityInvalid`` on the field
  ``delegation_token`` whose message starts with the check that failed;
  there is never a fallback to an asserted chain.
- **This daemon's agent** is the chain's last principal. With one agent per
  daemon it comes from ``identity.agent_id`` and is appended unless the
  token already names it as its latest actor (an orchestrator's token may
  end with the agent it delegated to, or stop before it). With
  ``identity.agents`` the caller proves which agent it is with a bearer
  secret or, on the agent listener's TLS port, a client certificate whose
  URI SAN names it (``AgentCredentials``), and the token's latest actor must
  be that agent: one agent cannot spend a token minted for another. On a
  connection with a client certificate the certificate alone names the
  agent: a bearer secret sent beside it is not consulted, and a certificate
  naming no agent is refused as an unknown secret is.

Every principal of the chain is then evaluated by the engine, which denies
unknown and inactive ones; nothing here looks at the directory.

The module is pure: the clock and the keys are passed in, nothing is read
from disk or logged.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# PyJWT (with its `crypto` extra) rather than joserfc or python-jose: it is
# the most used and actively maintained JOSE library for Python, parses
# JWKS into keys for RS256, ES256 and EdDSA through `cryptography`, and
# refuses any algorithm the caller did not list, `none` included.
# python-jose is unmaintained; joserfc would do the same job with a smaller
# user base.
import jwt

from kynara_sidecar.errors import ConfigError, IdentityInvalid

__all__ = [
    "AgentCredentials",
    "Issuer",
    "PeerCertificate",
    "MAX_DELEGATION_HOPS",
    "MAX_TOKEN_BYTES",
    "SUPPORTED_ALGORITHMS",
    "TokenVerifier",
    "parse_jwks",
    "place_agent",
    "split_asserted_chain",
]

# Asymmetric only: the daemon holds issuers' public keys and nothing that
# could mint a token. HS256 would make every daemon a possible forger.
SUPPORTED_ALGORITHMS = ("RS256", "ES256", "EdDSA")
# A JWT with a few nested actors is well under 2 KiB; 16 KiB bounds the
# work spent on a token before its signature is checked.
MAX_TOKEN_BYTES = 16 * 1024
# user -> orchestrator -> sub-agents: a handful of hops in practice. Kept
# one below the pipeline's chain depth so this daemon's agent still fits.
MAX_DELEGATION_HOPS = 14
MAX_PRINCIPAL_LENGTH = 256

_TOKEN_FIELD = "delegation_token"
_CREDENTIAL_FIELD = "authorization"
# Where a client certificate that names no agent is reported: no request
# field carries it, the connection does.
_CERTIFICATE_FIELD = "client_certificate"


@dataclass(frozen=True)
class Issuer:
    """One trusted issuer of delegation tokens.

    Attributes:
        issuer: the exact ``iss`` its tokens carry.
        audience: the ``aud`` this daemon accepts from it.
        keys: its public keys, parsed by ``parse_jwks``.
        algorithms: the algorithms accepted from it.
    """

    issuer: str
    audience: str
    keys: tuple[jwt.PyJWK, ...]
    algorithms: frozenset[str]


def parse_jwks(
    document: object, algorithms: Iterable[str], where: str
) -> tuple[jwt.PyJWK, ...]:
    """Parse a JWKS document into public verification keys.

    Args:
        document: the decoded JWKS, ``{"keys": [...]}``.
        algorithms: the algorithms the issuer may use; every key must fit one.
        where: the config path of the document, for error messages.

    Returns:
        The keys, in document order.

    Raises:
        ConfigError: not a JWKS, no keys, a key that does not parse, holds
            private material, is not for signing, or fits no allowed
            algorithm.
    """
    allowed = set(algorithms)
    if not isinstance(document, Mapping) or not isinstance(document.get("keys"), list):
        raise ConfigError(f'{where}: expected a JWKS object {{"keys": [...]}}')
    if not document["keys"]:
        raise ConfigError(f"{where}: expected at least one key, got none")
    return tuple(
        _parse_jwk(jwk, allowed, f"{where}.keys[{i}]")
        for i, jwk in enumerate(document["keys"])
    )


def _parse_jwk(jwk: object, allowed: set[str], where: str) -> jwt.PyJWK:
    if not isinstance(jwk, Mapping):
        raise ConfigError(f"{where}: expected a JWK object, got {type(jwk).__name__}")
    private = sorted({"d", "p", "q", "k"} & set(jwk))
    if private:
        raise ConfigError(
            f"{where}: expected a public key, got private members {private}; "
            "the daemon needs only the issuer's public keys"
        )
    if jwk.get("use", "sig") != "sig":
        raise ConfigError(f"{where}.use: expected 'sig', got {jwk['use']!r}")
    try:
        key = jwt.PyJWK(dict(jwk))
    except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError) as err:
        raise ConfigError(f"{where}: cannot load key: {err}") from err
    if key.algorithm_name not in allowed:
        raise ConfigError(
            f"{where}: expected a key for one of {sorted(allowed)}, "
            f"got one for {key.algorithm_name!r}"
        )
    return key


def _invalid(message: str) -> IdentityInvalid:
    return IdentityInvalid(message, field=_TOKEN_FIELD)


# NumericDates past year 9999 are no dates; bounding them also keeps an
# integer too large for a float (10**400) from overflowing the comparison.
MAX_NUMERIC_DATE = 253_402_300_799


def _is_number(value: object) -> bool:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    if isinstance(value, int):
        return abs(value) <= MAX_NUMERIC_DATE
    return math.isfinite(value) and abs(value) <= MAX_NUMERIC_DATE


class TokenVerifier:
    """Verifies delegation tokens against the configured issuers.

    Args:
        issuers: the trusted issuers; their ``iss`` values must differ.
        max_clock_skew_seconds: how far the issuer's clock and ours may
            disagree when checking ``exp`` and ``nbf``.
    """

    def __init__(self, issuers: Sequence[Issuer], max_clock_skew_seconds: float):
        self._issuers = {issuer.issuer: issuer for issuer in issuers}
        self._skew = max_clock_skew_seconds

    def verify(self, token: str, now: float) -> tuple[str, ...]:
        """Verify a token and return the delegation chain it carries.

        Args:
            token: the compact JWT from the request.
            now: the daemon's clock, in seconds since the epoch.

        Returns:
            ``(user, earliest actor, ..., latest actor)``; only the user when
            the token has no ``act`` claim.

        Raises:
            IdentityInvalid: on field ``delegation_token``, the message
                starting with the check that failed (``malformed``,
                ``algorithm``, ``issuer``, ``signature``, ``audience``,
                ``claims``, ``expired``, ``not yet valid``, ``chain``).
        """
        return _chain_of(self.claims(token, now))

    def claims(self, token: str, now: float) -> dict[str, Any]:
        """Verify a token and return its claims, without reading a chain.

        The same checks, in the same order, as ``verify``; for tokens that
        carry something other than a delegation chain (a reviewer's JWT).

        Args:
            token: the compact JWT.
            now: the daemon's clock, in seconds since the epoch.

        Returns:
            The verified claims (``sub``, ``iss``, ``aud`` and ``exp`` present).

        Raises:
            IdentityInvalid: as ``verify``, except ``chain``.
        """
        header, unverified = self._read_unverified(token)
        issuer = self._issuer_of(unverified)
        algorithm = self._algorithm_of(header, issuer)
        claims = self._verified_claims(token, header, algorithm, issuer, unverified)
        self._check_lifetime(claims, now)
        return claims

    def _read_unverified(self, token: str) -> tuple[dict[str, Any], dict[str, Any]]:
        if not token:
            raise _invalid(
                "malformed: expected a delegation token (a signed JWT) in "
                "identity.mode=verified, got none"
            )
        if len(token) > MAX_TOKEN_BYTES:
            raise _invalid(
                f"malformed: expected at most {MAX_TOKEN_BYTES} bytes, got {len(token)}"
            )
        try:
            header = jwt.get_unverified_header(token)
            # Read only to choose the issuer and its keys; nothing from this
            # decode is trusted until the signature is checked below.
            claims = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError as err:
            raise _invalid(f"malformed: expected a compact JWT: {err}") from None
        return header, claims

    def _issuer_of(self, claims: dict[str, Any]) -> Issuer:
        iss = claims.get("iss")
        issuer = self._issuers.get(iss) if isinstance(iss, str) else None
        if issuer is None:
            raise _invalid(
                f"issuer: expected one of {sorted(self._issuers)}, got {iss!r}"
            )
        return issuer

    def _algorithm_of(self, header: dict[str, Any], issuer: Issuer) -> str:
        alg = header.get("alg")
        if isinstance(alg, str) and alg.lower() == "none":
            raise _invalid("algorithm: 'none' is refused; tokens must be signed")
        if alg not in issuer.algorithms:
            raise _invalid(
                f"algorithm: expected one of {sorted(issuer.algorithms)} for "
                f"issuer {issuer.issuer!r}, got {alg!r}"
            )
        return alg

    def _verified_claims(
        self,
        token: str,
        header: dict[str, Any],
        algorithm: str,
        issuer: Issuer,
        unverified: dict[str, Any],
    ) -> dict[str, Any]:
        kid = header.get("kid")
        keys = [
            key
            for key in issuer.keys
            if key.algorithm_name == algorithm and (kid is None or key.key_id == kid)
        ]
        for key in keys:
            try:
                return jwt.decode(
                    token,
                    key,
                    algorithms=[algorithm],
                    audience=issuer.audience,
                    issuer=issuer.issuer,
                    # exp and nbf are checked by _check_lifetime against the
                    # daemon's clock, which tests and replay control;
                    # PyJWT would read the wall clock.
                    options={
                        "verify_exp": False,
                        "verify_nbf": False,
                        "verify_iat": False,
                        "require": ["exp", "sub", "iss", "aud"],
                    },
                )
            except jwt.InvalidSignatureError:
                continue
            except jwt.InvalidAudienceError:
                raise _invalid(
                    f"audience: expected {issuer.audience!r}, "
                    f"got {unverified.get('aud')!r}"
                ) from None
            except jwt.MissingRequiredClaimError as err:
                raise _invalid(
                    f"claims: missing required claim {err.claim!r}"
                ) from None
            except jwt.PyJWTError as err:
                raise _invalid(f"claims: {err}") from None
        which = f"with kid {kid!r} " if kid is not None else ""
        raise _invalid(
            f"signature: does not verify with any {algorithm} key {which}"
            f"of issuer {issuer.issuer!r}"
        )

    def _check_lifetime(self, claims: dict[str, Any], now: float) -> None:
        exp, nbf, iat = claims["exp"], claims.get("nbf"), claims.get("iat")
        if not _is_number(exp) or any(
            value is not None and not _is_number(value) for value in (nbf, iat)
        ):
            raise _invalid(
                f"claims: expected exp, nbf and iat as NumericDate numbers, "
                f"got exp={exp!r} nbf={nbf!r} iat={iat!r}"
            )
        # RFC 7519: valid while now < exp, and from nbf on.
        if now >= exp + self._skew:
            raise _invalid(
                f"expired: exp {exp} is not after now {now:.0f} within the "
                f"allowed clock skew of {self._skew} s"
            )
        if nbf is not None and now < nbf - self._skew:
            raise _invalid(
                f"not yet valid: nbf {nbf} is after now {now:.0f} beyond the "
                f"allowed clock skew of {self._skew} s"
            )
        # A token issued later than now was minted by a clock we cannot
        # trust, or ahead of time to outlive a revocation: refused alike.
        if iat is not None and now < iat - self._skew:
            raise _invalid(
                f"issued in the future: iat {iat} is after now {now:.0f} beyond "
                f"the allowed clock skew of {self._skew} s"
            )


def _principal(value: object, where: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_PRINCIPAL_LENGTH:
        raise _invalid(
            f"chain: expected {where} to be a principal id of "
            f"1..{MAX_PRINCIPAL_LENGTH} characters, got {str(value)[:80]!r}"
        )
    return value


def _chain_of(claims: dict[str, Any]) -> tuple[str, ...]:
    """``(user, earliest actor, ..., latest actor)`` from sub and nested act."""
    user = _principal(claims["sub"], "sub")
    actors: list[str] = []
    act, where = claims.get("act"), "act"
    while act is not None:
        if len(actors) == MAX_DELEGATION_HOPS:
            raise _invalid(
                f"chain: expected at most {MAX_DELEGATION_HOPS} nested act claims"
            )
        if not isinstance(act, dict):
            raise _invalid(f"chain: expected {where} to be an object with a sub")
        actors.append(_principal(act.get("sub"), f"{where}.sub"))
        act, where = act.get("act"), f"{where}.act"
    return (user, *reversed(actors))


def split_asserted_chain(text: str) -> tuple[str, ...]:
    """Split an asserted chain (development mode) into its principals.

    The text is comma-separated, user first, e.g. ``"alice, agent-a"``;
    whitespace around each id is stripped. Empty or blank text is no chain
    at all, ``()``. An empty item (``"alice,,agent-a"``, a trailing comma)
    is refused rather than dropped: a chain that silently loses a hop would
    be evaluated for other principals than the sender wrote.

    Raises:
        ValueError: an item is empty; the message names its position.
    """
    if not text.strip():
        return ()
    items = tuple(item.strip() for item in text.split(","))
    for position, item in enumerate(items):
        if not item:
            raise ValueError(
                f"asserted chain: item {position} (counting from 0, user first) "
                f"is empty in {text!r}; expected comma-separated ids such as "
                "'alice,agent-a'"
            )
    return items


def place_agent(
    chain: tuple[str, ...], agent: str, *, must_be_last: bool
) -> tuple[str, ...]:
    """Put this daemon's agent at the end of a verified chain.

    Args:
        chain: ``(user, actors...)`` from ``TokenVerifier.verify``.
        agent: the agent the daemon serves this caller for.
        must_be_last: multi-agent mode: the token's latest actor must be
            ``agent``; otherwise it is appended unless already last.

    Returns:
        The chain ending with ``agent``.

    Raises:
        IdentityInvalid: ``must_be_last`` and the latest actor is another
            agent, or the token names no actor at all.
    """
    latest = chain[-1] if len(chain) > 1 else None
    if latest == agent:
        return chain
    if must_be_last:
        raise _invalid(
            f"chain: expected the token's latest actor to be the calling agent "
            f"{agent!r}, got {latest!r}"
        )
    return (*chain, agent)


@dataclass(frozen=True, slots=True)
class PeerCertificate:
    """The client certificate the caller's TLS handshake verified: set by a
    front door from its connection, never from anything the request says."""

    # Its URI subject alternative names, in the certificate's order.
    uris: tuple[str, ...] = ()


class AgentCredentials:
    """Finds the calling agent from its bearer secret or its client
    certificate (multi-agent mode).

    Args:
        secrets: agent id -> its bearer secret; secrets must differ.
        certificates: a client certificate's URI SAN -> the agent it names.
    """

    def __init__(
        self,
        secrets: Mapping[str, bytes],
        certificates: Mapping[str, str] | None = None,
    ):
        # Compare digests, so every comparison has the same length and the
        # time taken reveals neither a secret's length nor its prefix.
        self._digests = tuple(
            (agent, hashlib.sha256(secret).digest())
            for agent, secret in secrets.items()
        )
        self._certificates = dict(certificates or {})

    def authenticate(
        self, authorization: str, certificate: PeerCertificate | None = None
    ) -> str:
        """Return the agent whose credential the caller presented: its
        client certificate when the connection has one, else its secret.

        Args:
            authorization: the ``authorization`` metadata, ``Bearer <secret>``.
            certificate: the connection's verified client certificate.

        Returns:
            The agent id.

        Raises:
            IdentityInvalid: on field ``authorization``: missing, not a
                bearer credential, or no agent's secret; on field
                ``client_certificate``: a certificate naming no agent, or
                more than one.
        """
        if certificate is not None:
            return self._certified(certificate)
        scheme, _, secret = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            # Never echo the value: without its scheme it may be the secret.
            if not scheme:
                got = "none"
            elif scheme.lower() == "bearer":
                got = "an empty bearer secret"
            elif not secret.strip():
                got = "a value without the 'Bearer ' scheme"
            else:
                got = "another scheme"
            raise IdentityInvalid(
                "expected 'authorization: Bearer <secret>' metadata naming the "
                f"calling agent, got {got}",
                field=_CREDENTIAL_FIELD,
            )
        given = hashlib.sha256(secret.strip().encode()).digest()
        found = ""
        # No early exit: every agent's digest is compared on every call.
        for agent, digest in self._digests:
            if hmac.compare_digest(digest, given):
                found = agent
        if not found:
            raise IdentityInvalid(
                "expected the bearer secret of a configured agent "
                "(identity.agents), got an unknown one",
                field=_CREDENTIAL_FIELD,
            )
        return found

    def _certified(self, certificate: PeerCertificate) -> str:
        named = {
            self._certificates[uri]
            for uri in certificate.uris
            if uri in self._certificates
        }
        if len(named) == 1:
            return named.pop()
        # URIs are not secrets: naming them helps whoever issued the cert.
        shown = ", ".join(repr(uri[:200]) for uri in certificate.uris[:4]) or "none"
        raise IdentityInvalid(
            "expected a client certificate whose URI SAN is one configured "
            "agent's certificate_uri (identity.agents), got "
            + (
                f"one naming {len(named)} agents ({', '.join(sorted(named))})"
                if named
                else f"one naming no agent (URI SANs: {shown})"
            ),
            field=_CERTIFICATE_FIELD,
        )
