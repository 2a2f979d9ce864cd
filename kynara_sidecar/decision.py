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
    "Explanation",
    "MatchedRule",
    "PrincipalExplanation",
    "PrincipalRef",
    "Resource",
    "RuleTrace",
    "Timestamp",
    "UInt64",
    "Verdict",
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

    def to_nanos(self) -> int:
        """Nanoseconds since the epoch."""
        return self.seconds * NANOS_PER_SECOND + self.nanos


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


class Verdict(enum.StrEnum):
    """What a rule's condition gave; a rule without a condition holds."""

    HELD = "held"
    NOT_HELD = "not_held"
    ERRORED = "errored"
    # Its patterns or roles did not match, so the condition was not run.
    NOT_EVALUATED = "not_evaluated"


class RuleTrace(msgspec.Struct, frozen=True):
    """One rule as explain saw it for one principal.

    A rule is traced when its action and resource patterns both matched
    (a candidate, even when its roles did not: a near miss), or when its
    roles matched but a pattern did not (the other near miss).
    """

    policy: str
    rule: str
    effect: Effect
    action_matched: bool
    resource_matched: bool
    roles_matched: bool
    verdict: Verdict
    shadow: bool = False
    condition: str = ""  # the CEL source; empty for a rule without one
    error: str = ""  # the condition's error when ``verdict`` is errored


class PrincipalExplanation(msgspec.Struct, frozen=True):
    """How one principal of the chain was decided, rules in set order.

    ``decided_by`` cites the enforced rule that gave ``effect`` as
    ``policy/rule``; empty when no rule applied (``no_rule_allows``).
    """

    principal: str
    roles: tuple[str, ...]
    effect: Effect
    reason_code: ReasonCode
    decided_by: str = ""
    rules: tuple[RuleTrace, ...] = ()


class Explanation(msgspec.Struct, frozen=True):
    """Why a decision is what it is; asked for per request, never audited.

    ``principals`` is empty when the chain was refused before any rule ran
    (an unknown or inactive principal, a misplaced kind); ``summary`` then
    says why. Otherwise it says how the principals' outcomes combined.
    """

    summary: str
    principals: tuple[PrincipalExplanation, ...] = ()


class Decision(msgspec.Struct, frozen=True):
    """The engine's answer. ``shadow_effect`` is what the answer would have
    been had shadow-mode rules decided; ``None`` when there were none.
    ``explanation`` is filled only when the caller asked for one."""

    effect: Effect
    reason_code: ReasonCode
    reason: str
    chain: tuple[PrincipalRef, ...]
    matched_rules: tuple[MatchedRule, ...] = ()
    condition_errors: tuple[ConditionError, ...] = ()
    policy_revision: str = ""
    directory_revision: str = ""
    shadow_effect: Effect | None = None
    explanation: Explanation | None = None
