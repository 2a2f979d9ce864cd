"""The values a decision is made of: request, env, and the answer.

These are the pipeline's own types, independent of any wire format. Front
doors translate their wire messages into ``DecisionRequest`` and the engine's
``Decision`` back; the engine and the audit log see nothing else.

Typed values are plain Python values with two additions so that nothing is
lost between the wire, the engine and the audit log: ``UInt64`` marks an
unsigned integer (CEL ``uint``), and ``Timestamp`` / ``Duration`` keep
nanoseconds, which ``datetime`` would round away.
"""

from __future__ import annotations

import datetime
import enum
from typing import Any

import msgspec

from kynara_sidecar.errors import ReasonCode

__all__ = [
    "ConditionError",
    "Decision",
    "DecisionRequest",
    "Duration",
    "Effect",
    "Env",
    "MatchedRule",
    "PrincipalRef",
    "Resource",
    "Timestamp",
    "UInt64",
]

NANOS_PER_SECOND = 1_000_000_000


class UInt64(int):
    """An unsigned 64-bit integer; a plain ``int`` is a signed int64."""

    __slots__ = ()


class Timestamp(msgspec.Struct, frozen=True):
    """An instant as seconds and nanoseconds since the Unix epoch (UTC)."""

    seconds: int
    nanos: int = 0

    @classmethod
    def from_datetime(cls, value: datetime.datetime) -> Timestamp:
        """Convert an aware ``datetime``; a naive one is taken as UTC."""
        if value.tzinfo is None:
            value = value.replace(tzinfo=datetime.UTC)
        delta = value - datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
        seconds = delta.days * 86_400 + delta.seconds
        return cls(seconds, delta.microseconds * 1_000)

    @classmethod
    def from_nanos(cls, nanos: int) -> Timestamp:
        seconds, rest = divmod(nanos, NANOS_PER_SECOND)
        return cls(seconds, rest)


class Duration(msgspec.Struct, frozen=True):
    """A signed span of time as seconds and nanoseconds (same sign)."""

    seconds: int
    nanos: int = 0


# A typed value: int (int64), UInt64, float (double), str, bool, bytes,
# Timestamp, Duration, list of values, or dict of str to values.
Value = Any


class Effect(enum.StrEnum):
    """A rule's effect, and a decision. Deny beats require_approval beats allow."""

    ALLOW = "allow"
    DENY = "deny"
    REQUIRE_APPROVAL = "require_approval"


class Resource(msgspec.Struct, frozen=True):
    kind: str
    id: str = ""
    attributes: dict[str, Value] = {}


class DecisionRequest(msgspec.Struct, frozen=True):
    """A validated request whose subject is already established.

    ``chain`` is the delegation chain of principal ids, user first and the
    daemon's own agent last. Roles never travel in a request: the engine
    reads them from the directory.
    """

    chain: tuple[str, ...]
    action: str
    resource: Resource
    context: dict[str, Value] = {}
    request_id: str = ""


class Env(msgspec.Struct, frozen=True):
    """What the daemon itself knows about a request; policies see ``env``.

    ``now`` is read once per request, so every condition of one decision sees
    the same instant.
    """

    now: Timestamp
    daemon_id: str = ""
    agent_id: str = ""
    environment: str = ""
    region: str = ""
    labels: dict[str, str] = {}
    peer: str = ""


class PrincipalRef(msgspec.Struct, frozen=True):
    """A principal of the chain as the directory resolved it."""

    id: str
    kind: str = ""  # "user" or "agent"; empty when not in the directory
    roles: tuple[str, ...] = ()
    known: bool = True
    active: bool = True


class MatchedRule(msgspec.Struct, frozen=True):
    policy: str
    rule: str
    effect: Effect
    principal: str
    shadow: bool = False


class ConditionError(msgspec.Struct, frozen=True):
    policy: str
    rule: str
    principal: str
    message: str


class Decision(msgspec.Struct, frozen=True):
    """The engine's answer. ``shadow_effect`` is what the answer would have
    been had shadow-mode rules decided; ``None`` when there were none."""

    effect: Effect
    reason_code: ReasonCode
    reason: str
    chain: tuple[PrincipalRef, ...]
    matched_rules: tuple[MatchedRule, ...] = ()
    condition_errors: tuple[ConditionError, ...] = ()
    policy_revision: str = ""
    directory_revision: str = ""
    shadow_effect: Effect | None = None
