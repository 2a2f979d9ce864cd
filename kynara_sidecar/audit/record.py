"""The audit record, ``AuditRecordV1``, and the exact JSON form of typed values.

One record is written for every decision, every approval event, each start
and stop marker and each chain break. The record is the unit that is hashed
into the chain (``kynara_sidecar.audit.chain``), so its JSON form is a
contract: fields are only ever added, always optional, never renamed, and a
reader ignores keys it does not know.

Typed values (the context, resource attributes, env and limit values) are
stored as one-key JSON objects naming their type, so that a replay gets back
exactly what the engine saw and a reader in any language needs no schema:

    {"int": "9007199254740993"}  {"uint": "5"}  {"double": 1.5}
    {"string": "x"}  {"bool": true}  {"bytes": "<base64>"}
    {"timestamp": "2026-12-04T09:00:00.000000001Z"}  {"duration": "1.5s"}
    {"list": [...]}  {"map": {"key": {...}}}

Integers are decimal strings because many JSON parsers read numbers as
doubles and would round anything past 2**53. Non-finite doubles are the
strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"``, which JSON cannot
spell as numbers.

Everything here is pure: values in, values out.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import enum
import hashlib
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

import msgspec

from kynara_sidecar.audit.redact import (
    REDACTED_TAG,
    REDACTION_SECTIONS,
    Redactor,
    lookup,
)
from kynara_sidecar.decision import (
    ConditionError,
    Decision,
    DecisionRequest,
    Duration,
    Env,
    MatchedRule,
    PrincipalRef,
    Resource,
    Timestamp,
    UInt64,
)

__all__ = [
    "RECORD_KINDS",
    "RECORD_VERSION",
    "ApprovalEntry",
    "AuditRecordV1",
    "ChainEntry",
    "ChainBreakEntry",
    "ConditionErrorEntry",
    "GatewayEntry",
    "KeyRotationEntry",
    "LimitEntry",
    "MarkerEntry",
    "MatchedRuleEntry",
    "RecordKind",
    "ResourceEntry",
    "RiskEntry",
    "RiskFactorEntry",
    "chain_entries",
    "condition_error_entries",
    "document_digest",
    "decode_value",
    "encode_value",
    "env_entry",
    "format_duration",
    "format_timestamp",
    "marker_record",
    "matched_rule_entries",
    "parse_duration",
    "parse_timestamp",
    "record_from_decision",
    "request_from_record",
    "resource_entry",
]

# The record format written by this code; readers of a later format keep
# reading v1 records because fields are only ever added.
RECORD_VERSION = 1

NANOS_PER_SECOND = 1_000_000_000


class RecordKind(enum.StrEnum):
    """The record kinds this daemon writes; ``kind`` itself is a plain str."""

    DECISION = "decision"
    APPROVAL_REQUESTED = "approval_requested"
    # A review that did not resolve the approval (one of several approvers).
    APPROVAL_REVIEWED = "approval_reviewed"
    APPROVAL_RESOLVED = "approval_resolved"
    MARKER = "marker"
    CHAIN_BREAK = "chain_break"
    KEY_ROTATION = "key_rotation"
    # What became of an answered decision afterwards (its ``outcome``, e.g.
    # "cancelled": the caller gave up on a forwarded call), naming it by
    # ``decision_id``; the decision record itself is never rewritten.
    OUTCOME = "outcome"


RECORD_KINDS = frozenset(kind.value for kind in RecordKind)


# Nested entries keep their defaults in the JSON (no omit_defaults): they are
# small, and a reader should see `"known": true` rather than have to know
# that an absent key means true.


class ChainEntry(msgspec.Struct, kw_only=True):
    """A principal of the delegation chain as the directory resolved it."""

    id: str
    kind: str = ""
    roles: list[str] = []
    known: bool = True
    active: bool = True


class ResourceEntry(msgspec.Struct, kw_only=True):
    """The resource; ``attributes`` maps names to typed values (JSON form)."""

    kind: str
    id: str = ""
    attributes: dict[str, Any] = {}


class MatchedRuleEntry(msgspec.Struct, kw_only=True):
    policy: str
    rule: str
    effect: str
    principal: str
    shadow: bool = False


class ConditionErrorEntry(msgspec.Struct, kw_only=True):
    policy: str
    rule: str
    principal: str
    message: str


class ApprovalEntry(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The approval a record is about: asked for or reused (on a
    require_approval decision and ``approval_requested``), reviewed
    (``approval_reviewed``), resolved (``approval_resolved``), or used or
    refused (on a decision that named it)."""

    id: str
    url: str = ""
    expires_at: str = ""
    # Who approved it so far, distinct, in review order.
    reviewers: list[str] = []
    # "approved", "rejected" or "expired" on approval_resolved records.
    resolution: str = ""
    resolved_at: str = ""
    comment: str = ""
    # The approval's state after this record: pending, approved, rejected,
    # expired or used.
    state: str = ""
    # The binding digest ("sha256:<hex>") of the request it authorizes.
    digest: str = ""
    created_at: str = ""
    # What reviewers must be: how many distinct approvers, one role of each
    # listed group, and whether a principal of the chain may review.
    approvals_needed: int = 0
    reviewer_roles: list[list[str]] = []
    allow_self_approval: bool = False
    # The asking rules, "policy/rule" (for principal).
    rules: list[str] = []
    # On a review: who reviewed, with which verdict, and where from
    # ("daemon" or a fleet inbox).
    reviewer: str = ""
    verdict: str = ""
    via: str = ""
    # The decision that asked for the approval.
    decision_id: str = ""
    # The decision that used it (state "used").
    used_by: str = ""
    # The top-level context keys the digest leaves out.
    volatile_context: list[str] = []
    # On approval_requested: the agent's earlier approvals of the same
    # request (digest) that ended rejected or expired, most recent first.
    previous: list[str] = []


class RiskFactorEntry(msgspec.Struct, kw_only=True):
    """One named part of a risk score: ``points = weight * fraction``."""

    name: str
    weight: float
    fraction: float
    points: float
    detail: str = ""


class RiskEntry(msgspec.Struct, kw_only=True):
    """An approval's risk score, 0..100, and every factor of it."""

    score: int
    factors: list[RiskFactorEntry] = []


class GatewayEntry(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The front door a request came through (the MCP gateway, say)."""

    server: str = ""
    tool: str = ""
    # Lower-case hex SHA-256 of the canonical JSON of the tool arguments, so
    # the record proves what was called without holding the arguments
    # themselves; when an argument was redacted from the record, that digest
    # keyed with the redaction key ("hmac-sha256:<key id>:<hex>", see
    # Redactor.seal_digest), or "" when there is no key.
    args_digest: str = ""


class LimitEntry(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What one declared limit was for a decision, under its name in
    ``AuditRecordV1.limits``.

    ``count`` and ``sum`` are what the window held before this decision
    (this daemon's counted decisions at or after ``window_start``, pending
    ones included); ``remote_count`` and ``remote_sum`` the other daemons'
    part of a fleet limit as last seen. ``counted`` says the decision added
    ``amount`` to it (its row in the log's ``limits`` database is written in
    the same transaction). ``sum``, ``ceiling``, ``amount`` and
    ``remote_sum`` hold the ``encode_value`` JSON form (an int or a double).
    ``error`` is why the limit had no value for this request: a key part
    or the amount missing, of the wrong type, or kept out of records by
    audit.redact with no redaction key to seal it; a summed field that
    audit.redact keeps out of records; a fleet limit with no central store,
    or its central store out of touch; the limit's rows in the log damaged.
    Conditions reading it failed closed. Where the key and amount were
    formed (the store or rows problems) the decision may still be
    ``counted``, so no decision goes uncounted meanwhile; otherwise nothing
    was counted.
    """

    key: str = ""
    # What the limit counted when this decision was decided (its
    # definition's digest): counts under another definition of the same
    # name are not added to this one.
    definition: str = ""
    scope: str = "daemon"
    window_start: str = ""
    count: int = 0
    sum: dict[str, Any] | None = None
    ceiling: dict[str, Any] | None = None
    counted: bool = False
    amount: dict[str, Any] | None = None
    remote_count: int = 0
    remote_sum: dict[str, Any] | None = None
    error: str = ""


class MarkerEntry(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A lifecycle event of the daemon: "start", "stop", "reload", ..."""

    event: str
    version: str = ""
    detail: str = ""


class KeyRotationEntry(msgspec.Struct, kw_only=True):
    """A new audit signing key, vouched for by the old one (``rotation``)."""

    old_key_id: str
    new_key_id: str
    # The new public key: the raw 32 bytes, unpadded base64url.
    new_public_key: str
    # The old key's Ed25519 signature over rotation.signed_bytes(), unpadded
    # base64url.
    signature: str


class ChainBreakEntry(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Where the previous chain stopped verifying, on a new chain's first
    record, so the gap stays visible."""

    previous_log_id: str
    # The last record of the previous log that verified, and its chain hash.
    last_good_seq: int = 0
    last_good_chain_hash: str = ""
    # The problem verification found: its kind and record.
    problem: str = ""
    problem_seq: int = 0
    # Where the previous log's files were moved, for the investigation.
    kept_at: str = ""


class AuditRecordV1(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One audit record; ``kind`` says which of the optional parts apply.

    Only ``v``, ``kind`` and ``time`` are required. ``seq`` is assigned by the
    store when the record is appended; whatever the caller put there is
    replaced. Typed values (``context``, ``env``, ``limits`` and the
    resource's attributes) hold the JSON form of ``encode_value``.

    NOTE: one struct with a string ``kind`` rather than a msgspec tagged union
    of one struct per kind: every kind shares most fields, and a reader must
    keep decoding records of kinds added after it was written.
    """

    v: int
    kind: str
    time: str
    seq: int = 0
    daemon_id: str = ""
    decision_id: str = ""
    request_id: str = ""
    # "development" when the subject was asserted rather than established.
    identity_mode: str = ""
    chain: list[ChainEntry] = []
    action: str = ""
    resource: ResourceEntry | None = None
    context: dict[str, Any] = {}
    env: dict[str, Any] = {}
    decision: str = ""
    reason_code: str = ""
    reason: str = ""
    matched_rules: list[MatchedRuleEntry] = []
    condition_errors: list[ConditionErrorEntry] = []
    shadow_effect: str = ""
    policy_revision: str = ""
    directory_revision: str = ""
    # JSON paths (such as "$.context.card_number") masked before writing.
    redactions: list[str] = []
    approval: ApprovalEntry | None = None
    # The names of the risk factors that scored points; ``risk`` has them all.
    risk_factors: list[str] = []
    risk: RiskEntry | None = None
    # Limit name -> what it was for this decision (read or counted).
    limits: dict[str, LimitEntry] = {}
    gateway: GatewayEntry | None = None
    # What became of the answer after it was decided, e.g. "cancelled".
    outcome: str = ""
    marker: MarkerEntry | None = None
    # For chain_break: what verification found, in its own words.
    error: str = ""
    chain_break: ChainBreakEntry | None = None
    key_rotation: KeyRotationEntry | None = None


# ---------------------------------------------------------------- time forms

_TIMESTAMP_RE = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?Z$"
)
_DURATION_RE = re.compile(r"^(-)?(\d+)(?:\.(\d{1,9}))?s$")
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


def _fraction(nanos: int) -> str:
    return "." + f"{nanos:09d}".rstrip("0") if nanos else ""


def format_timestamp(value: Timestamp) -> str:
    """Format an instant as RFC 3339 UTC with nanoseconds.

    Trailing zeros of the fraction are dropped, and it is left out when
    zero: ``2026-12-04T09:00:00Z``, ``2026-12-04T09:00:00.000000001Z``.

    Args:
        value: the instant; ``nanos`` must be in ``[0, 1e9)``.

    Returns:
        The RFC 3339 string, always four-digit years.

    Raises:
        ValueError: the nanos are out of range or the year is outside
            0001..9999 (the range of CEL and RFC 3339).
    """
    if not 0 <= value.nanos < NANOS_PER_SECOND:
        raise ValueError(
            f"timestamp nanos must be in [0, 999999999], got {value.nanos}"
        )
    try:
        moment = _EPOCH + datetime.timedelta(seconds=value.seconds)
    except OverflowError:
        moment = None
    if moment is None or moment.year > 9999:
        raise ValueError(
            f"timestamp must lie in years 0001..9999, got {value.seconds} seconds"
        )
    # NOTE: not strftime("%Y"), which drops the zero padding of years
    # before 1000 on glibc.
    return (
        f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}T"
        f"{moment.hour:02d}:{moment.minute:02d}:{moment.second:02d}"
        f"{_fraction(value.nanos)}Z"
    )


# The last whole second format_now formatted, and its text: decisions come
# many to a second, so the date and time are formatted once per second.
_last_second: tuple[int, str] = (0, "1970-01-01T00:00:00")


def _format_now(value: Timestamp) -> str:
    """``format_timestamp`` for a record's own instant (the clock's time),
    reusing the formatting of the previous instant's second."""
    global _last_second
    if not 0 <= value.nanos < NANOS_PER_SECOND:
        return format_timestamp(value)  # raises, naming the nanos
    seconds, text = _last_second
    if value.seconds != seconds:
        text = format_timestamp(Timestamp(value.seconds))[:-1]
        _last_second = (value.seconds, text)
    return f"{text}{_fraction(value.nanos)}Z"


def parse_timestamp(text: str) -> Timestamp:
    """Parse the form ``format_timestamp`` writes (UTC, ``Z`` suffix).

    Raises:
        ValueError: ``text`` is not ``YYYY-MM-DDTHH:MM:SS[.fraction]Z``.
    """
    match = _TIMESTAMP_RE.match(text)
    if match is None:
        raise ValueError(
            f"expected an RFC 3339 UTC timestamp such as "
            f"'2026-12-04T09:00:00.5Z', got {text!r}"
        )
    *fields, fraction = match.groups()
    try:
        moment = datetime.datetime(*map(int, fields), tzinfo=datetime.UTC)
    except ValueError as err:
        raise ValueError(f"invalid timestamp {text!r}: {err}") from None
    delta = moment - _EPOCH
    nanos = int((fraction or "").ljust(9, "0"))
    return Timestamp(delta.days * 86_400 + delta.seconds, nanos)


def format_duration(value: Duration) -> str:
    """Format a span as seconds with a fraction: ``1.5s``, ``-0.000000001s``.

    Raises:
        ValueError: ``nanos`` is outside ``(-1e9, 1e9)`` or its sign differs
            from that of ``seconds``.
    """
    seconds, nanos = value.seconds, value.nanos
    if not -NANOS_PER_SECOND < nanos < NANOS_PER_SECOND or (seconds * nanos < 0):
        raise ValueError(
            "duration nanos must be in (-1e9, 1e9) with the sign of seconds, "
            f"got seconds={seconds} nanos={nanos}"
        )
    sign = "-" if seconds < 0 or nanos < 0 else ""
    return f"{sign}{abs(seconds)}{_fraction(abs(nanos))}s"


def parse_duration(text: str) -> Duration:
    """Parse the form ``format_duration`` writes.

    Raises:
        ValueError: ``text`` is not ``[-]seconds[.fraction]s``.
    """
    match = _DURATION_RE.match(text)
    if match is None:
        raise ValueError(f"expected a duration such as '1.5s', got {text!r}")
    negative, seconds, fraction = match.groups()
    sign = -1 if negative else 1
    nanos = int((fraction or "").ljust(9, "0"))
    return Duration(sign * int(seconds), sign * nanos)


# --------------------------------------------------------------- typed values


def encode_value(value: Any) -> dict[str, Any]:
    """Convert a typed value into its exact JSON form (see the module doc).

    Tuples are written as lists. ``bool`` is checked before ``int`` and
    ``UInt64`` before ``int``, since each is a subclass of the next.

    Args:
        value: int, UInt64, float, str, bool, bytes, Timestamp, Duration, or a
            list, tuple or str-keyed dict of those.

    Returns:
        A one-key dict naming the type, ready for JSON.

    Raises:
        TypeError: a value (or map key) of another type; the message gives
            its path, such as ``$.items[2]``.
        ValueError: a Timestamp or Duration out of range.
    """
    return _encode(value, "$")


def _encode(value: Any, path: str) -> dict[str, Any]:
    # Dispatch order matters: bool < int and UInt64 < int.
    if isinstance(value, bool):
        return {"bool": value}
    if isinstance(value, UInt64):
        return {"uint": str(int(value))}
    if isinstance(value, int):
        return {"int": str(value)}
    if isinstance(value, float):
        return {"double": value if math.isfinite(value) else _nonfinite(value)}
    if isinstance(value, str):
        return {"string": value}
    if isinstance(value, bytes):
        return {"bytes": base64.b64encode(value).decode("ascii")}
    if isinstance(value, Timestamp):
        return {"timestamp": format_timestamp(value)}
    if isinstance(value, Duration):
        return {"duration": format_duration(value)}
    if isinstance(value, list | tuple):
        return {"list": [_encode(v, f"{path}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, Mapping):
        return {"map": _encode_map(value, path)}
    raise TypeError(
        f"cannot encode the value at {path}: expected int, UInt64, float, str, "
        f"bool, bytes, Timestamp, Duration, list or dict, got "
        f"{type(value).__name__}"
    )


def _encode_map(value: Mapping[Any, Any], path: str) -> dict[str, Any]:
    out = {}
    for key, item in value.items():
        if not isinstance(key, str):
            raise TypeError(
                f"cannot encode the map at {path}: expected str keys, got "
                f"{type(key).__name__} {key!r}"
            )
        # The common exact types first, without building the item's path
        # (it is only needed to name a value that cannot be encoded).
        kind = type(item)
        if kind is str:
            out[key] = {"string": item}
        elif kind is int:
            out[key] = {"int": str(item)}
        else:
            out[key] = _encode(item, f"{path}.{key}")
    return out


def _nonfinite(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"


_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def decode_value(data: Any) -> Any:
    """Convert the JSON form back into the typed value ``encode_value`` took.

    Args:
        data: a one-key dict as found in a decoded record.

    Returns:
        The typed value; lists come back as lists, maps as dicts.

    Raises:
        ValueError: ``data`` is not a one-key dict with a known type name and
            a well-formed value, or it is a redacted value
            (``{"redacted": ...}``, see ``audit.redact``); the message gives
            its path.
    """
    return _decode(data, "$")


def _decode(data: Any, path: str) -> Any:
    if not isinstance(data, dict) or len(data) != 1:
        raise ValueError(
            f"expected a one-key object naming the type at {path}, got {data!r}"
        )
    ((tag, raw),) = data.items()
    if tag == REDACTED_TAG:
        raise ValueError(
            f"the value at {path} was redacted before writing ({raw!r}): "
            "a keyed hash cannot be decoded"
        )
    if tag == "list" and isinstance(raw, list):
        return [_decode(item, f"{path}[{i}]") for i, item in enumerate(raw)]
    if tag == "map" and isinstance(raw, dict):
        return {key: _decode(item, f"{path}.{key}") for key, item in raw.items()}
    decoder = _DECODERS.get(tag)
    if decoder is None:
        raise ValueError(
            f"unknown value type {tag!r} at {path}: expected one of "
            f"{', '.join(sorted(_DECODERS))}"
        )
    try:
        return decoder(raw)
    except (ValueError, binascii.Error) as err:
        # The leaf's own message says what was expected; add only where.
        raise ValueError(f"bad {tag} at {path}: {err}") from None


def _decode_int(raw: Any) -> int:
    if not isinstance(raw, str) or not _INT_RE.match(raw):
        raise ValueError(f"expected a decimal string, got {raw!r}")
    return int(raw)


def _decode_uint(raw: Any) -> UInt64:
    if not isinstance(raw, str) or not _UINT_RE.match(raw):
        raise ValueError(f"expected a string of decimal digits, got {raw!r}")
    return UInt64(int(raw))


def _decode_double(raw: Any) -> float:
    if isinstance(raw, str) and raw in _NONFINITE:
        return _NONFINITE[raw]
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise ValueError(f"expected a number, 'NaN' or '(-)Infinity', got {raw!r}")
    return float(raw)


def _decode_bytes(raw: Any) -> bytes:
    if not isinstance(raw, str):
        raise ValueError(f"expected a base64 string, got {raw!r}")
    return base64.b64decode(raw, validate=True)


def _expect(kind: type, convert: Any = None) -> Any:
    def decode(raw: Any) -> Any:
        if not isinstance(raw, kind):
            raise ValueError(f"expected a JSON {_JSON_NAMES[kind]}, got {raw!r}")
        return convert(raw) if convert else raw

    return decode


_INT_RE = re.compile(r"^-?[0-9]+$")
_UINT_RE = re.compile(r"^[0-9]+$")
_JSON_NAMES = {str: "string", bool: "boolean", list: "array", dict: "object"}

_DECODERS = {
    "int": _decode_int,
    "uint": _decode_uint,
    "double": _decode_double,
    "string": _expect(str),
    "bool": _expect(bool),
    "bytes": _decode_bytes,
    "timestamp": _expect(str, parse_timestamp),
    "duration": _expect(str, parse_duration),
    # Reached only when the payload has the wrong JSON type.
    "list": _expect(list),
    "map": _expect(dict),
}


# ------------------------------------------------- decision values to entries


def document_digest(document: Any) -> str:
    """``"sha256:<hex>"`` of the canonical JSON (sorted keys, no spaces,
    UTF-8) of a document of plain values, typed values in their record form
    (``encode_value``): an approval's binding digest, which a verifier
    recomputes from a record alone."""
    canonical = msgspec.json.encode(document, order="sorted")
    return "sha256:" + hashlib.sha256(canonical).hexdigest()


def chain_entries(chain: Iterable[PrincipalRef]) -> list[ChainEntry]:
    """Convert the resolved delegation chain into record entries."""
    return [
        ChainEntry(
            id=p.id, kind=p.kind, roles=list(p.roles), known=p.known, active=p.active
        )
        for p in chain
    ]


def matched_rule_entries(rules: Iterable[MatchedRule]) -> list[MatchedRuleEntry]:
    """Convert matched rules into record entries (effects as strings)."""
    return [
        MatchedRuleEntry(
            policy=r.policy,
            rule=r.rule,
            effect=str(r.effect),
            principal=r.principal,
            shadow=r.shadow,
        )
        for r in rules
    ]


def condition_error_entries(
    errors: Iterable[ConditionError],
) -> list[ConditionErrorEntry]:
    """Convert condition errors into record entries."""
    return [
        ConditionErrorEntry(
            policy=e.policy, rule=e.rule, principal=e.principal, message=e.message
        )
        for e in errors
    ]


def resource_entry(resource: Resource) -> ResourceEntry:
    """Convert the resource, encoding its attributes as typed values.

    Raises:
        TypeError: an attribute holds a value ``encode_value`` cannot encode.
    """
    return ResourceEntry(
        kind=resource.kind,
        id=resource.id,
        attributes=_encode_map(resource.attributes, "$.resource.attributes"),
    )


def env_entry(env: Env) -> dict[str, Any]:
    """Convert the env into a map of typed values, as policies see it.

    Every field is kept, empty or not, so a replay sees the same ``env``.
    """
    fields = {name: getattr(env, name) for name in env.__struct_fields__}
    return _encode_map(fields, "$.env")


# _env_entry spells out Env's fields; one added to Env must be added there.
_ENV_FIELDS = (
    "now", "daemon_id", "agent_id", "environment", "region", "labels", "peer",
)  # fmt: skip
if Env.__struct_fields__ != _ENV_FIELDS:
    raise RuntimeError(f"record._env_entry expects Env fields {_ENV_FIELDS}")


# The last env _env_entry encoded, but for ``now``: (daemon_id, agent_id,
# environment, region, peer), the labels mapping and a copy of it, and the
# encoded fields. A daemon's env differs from one request to the next only
# in ``now`` (and the peer and agent in some modes), so it is encoded once.
_last_env: tuple[tuple[str, ...], Any, dict[str, Any], dict[str, Any]] | None = None


def _env_entry(env: Env, now: str) -> dict[str, Any]:
    # env_entry with env.now already formatted (the record's time): the
    # same map, every field in declaration order.
    global _last_env
    key = (env.daemon_id, env.agent_id, env.environment, env.region, env.peer)
    labels = env.labels
    last = _last_env
    if last is None or last[0] != key or last[1] is not labels or last[2] != labels:
        encoded = _encode_map(
            {
                "daemon_id": env.daemon_id,
                "agent_id": env.agent_id,
                "environment": env.environment,
                "region": env.region,
                "labels": labels,
                "peer": env.peer,
            },
            "$.env",
        )
        last = _last_env = (key, labels, dict(labels), encoded)
    return {"now": {"timestamp": now}, **last[3]}


# Per decision (by identity; the engine answers repeated verdicts with the
# same Decision object), the record's parts that come from it alone: the
# chain, matched rules and condition errors as entries, and the effects and
# reason code as strings. Records share these lists, which nothing changes
# once a record is built.
_decision_parts: dict[int, tuple[Decision, tuple[Any, ...]]] = {}
_MAX_DECISION_PARTS = 1024


def _parts_of(decision: Decision) -> tuple[Any, ...]:
    found = _decision_parts.get(id(decision))
    # The entry holds the decision, so its id is not reused while kept.
    if found is not None and found[0] is decision:
        return found[1]
    parts = (
        chain_entries(decision.chain),
        matched_rule_entries(decision.matched_rules),
        condition_error_entries(decision.condition_errors),
        str(decision.effect),
        str(decision.reason_code),
        str(decision.shadow_effect or ""),
    )
    if len(_decision_parts) >= _MAX_DECISION_PARTS:
        _decision_parts.clear()
    _decision_parts[id(decision)] = (decision, parts)
    return parts


def record_from_decision(
    *,
    request: DecisionRequest,
    env: Env,
    decision: Decision,
    decision_id: str,
    identity_mode: str = "",
    daemon_id: str | None = None,
    redactions: Iterable[str] = (),
    time: str | None = None,
    redactor: Redactor | None = None,
) -> AuditRecordV1:
    """Build the ``decision`` record of one answered request.

    The request is the one the engine decided on; ``redactor`` then hashes
    or drops the configured context and resource attributes in the record
    only, and the paths it redacted join ``redactions``.

    Args:
        request: the request as the engine evaluated it (unredacted).
        env: the env the engine used; ``env.now`` is the decision instant.
        decision: the engine's answer.
        decision_id: the id returned to the caller.
        identity_mode: "development" when the chain was asserted, else "".
        daemon_id: this daemon's log origin; defaults to ``env.daemon_id``.
        redactions: JSON paths the caller masked already, if any.
        time: RFC 3339 time of the record; defaults to ``env.now``.
        redactor: the configured redaction rules; none redacts nothing.

    Returns:
        The record, with ``seq`` left for the store to assign.

    Raises:
        TypeError: a context or attribute value cannot be encoded.
    """
    resource = resource_entry(request.resource)
    context = _encode_map(request.context, "$.context")
    masked = list(redactions)
    if redactor:
        context, resource.attributes, found = redactor.apply(
            context, resource.attributes
        )
        masked += found
    now = _format_now(env.now)
    chain, matched, errors, effect, reason_code, shadow_effect = _parts_of(decision)
    return AuditRecordV1(
        v=RECORD_VERSION,
        kind=RecordKind.DECISION,
        time=time if time is not None else now,
        daemon_id=env.daemon_id if daemon_id is None else daemon_id,
        decision_id=decision_id,
        request_id=request.request_id,
        identity_mode=identity_mode,
        chain=chain,
        action=request.action,
        resource=resource,
        context=context,
        env=_env_entry(env, now),
        decision=effect,
        reason_code=reason_code,
        reason=decision.reason,
        matched_rules=matched,
        condition_errors=errors,
        shadow_effect=shadow_effect,
        policy_revision=decision.policy_revision,
        directory_revision=decision.directory_revision,
        redactions=masked,
    )


def request_from_record(record: AuditRecordV1) -> tuple[DecisionRequest, Env]:
    """Rebuild the request and env a decision record was decided from.

    The inverse of ``record_from_decision`` as far as the engine is
    concerned: the chain is the resolved chain's ids (the daemon's agent
    included, as the engine saw it), and the typed values come back exactly,
    ``env.now`` among them. Env keys this version does not know are ignored.

    A record with ``redactions`` is refused: a hashed or dropped value is
    not what the engine saw, and deciding on something else would report
    changes no policy made.

    Args:
        record: a ``decision`` record.

    Returns:
        ``(request, env)``, ready for ``engine.evaluate``.

    Raises:
        ValueError: the record is not a decision, has no resource or no
            chain, was redacted (the message lists each redacted path and
            whether it was hashed or dropped), or a typed value (``env.now``
            included) is malformed; the message gives the path, such as
            ``$.env.now``.
    """
    if record.kind != RecordKind.DECISION:
        raise ValueError(
            f"expected a {RecordKind.DECISION.value!r} record, got {record.kind!r} "
            f"at seq {record.seq}"
        )
    if record.resource is None or not record.chain:
        missing = "resource" if record.resource is None else "chain"
        raise ValueError(f"decision record {record.seq} has no {missing}")
    if record.redactions:
        raise ValueError(
            f"decision record {record.seq} was redacted before writing, so it "
            "cannot be replayed without deciding on other input: "
            + ", ".join(_redaction_kinds(record))
        )
    resource = Resource(
        kind=record.resource.kind,
        id=record.resource.id,
        attributes=_decode_map(record.resource.attributes, "$.resource.attributes"),
    )
    request = DecisionRequest(
        chain=tuple(entry.id for entry in record.chain),
        action=record.action,
        resource=resource,
        context=_decode_map(record.context, "$.context"),
        request_id=record.request_id,
    )
    return request, _env_from_entry(record.env)


def _redaction_kinds(record: AuditRecordV1) -> list[str]:
    # "<path> (hashed)" or "<path> (dropped)" for each redacted path.
    sections = {
        REDACTION_SECTIONS["context"]: record.context,
        REDACTION_SECTIONS["resource_attributes"]: (
            record.resource.attributes if record.resource else {}
        ),
    }
    out = []
    for path in record.redactions:
        kind = "dropped"
        for prefix, values in sections.items():
            if path.startswith(prefix + "."):
                found = lookup(values, path.removeprefix(prefix + "."))
                if isinstance(found, dict) and REDACTED_TAG in found:
                    kind = "hashed"
        out.append(f"{path} ({kind})")
    return out


def _decode_map(raw: Mapping[str, Any], path: str) -> dict[str, Any]:
    return {key: _decode(item, f"{path}.{key}") for key, item in raw.items()}


def _env_from_entry(raw: Mapping[str, Any]) -> Env:
    fields = _decode_map(
        {key: value for key, value in raw.items() if key in Env.__struct_fields__},
        "$.env",
    )
    if not isinstance(fields.get("now"), Timestamp):
        raise ValueError(
            f"expected a timestamp at $.env.now, got {raw.get('now', 'nothing')!r}"
        )
    try:
        return msgspec.convert(fields, Env, from_attributes=True)
    except msgspec.ValidationError as err:
        raise ValueError(f"bad env in record: {err}") from None


def marker_record(
    event: str,
    daemon_id: str,
    time: Timestamp | str,
    version: str = "",
    *,
    identity_mode: str = "",
    detail: str = "",
) -> AuditRecordV1:
    """Build a ``marker`` record.

    Args:
        event: "start", "stop", "reload", ...
        daemon_id: this daemon's log origin.
        time: the instant, as a Timestamp or already in RFC 3339.
        version: the daemon's version.
        identity_mode: "development" when asserted chains are trusted.
        detail: free text, e.g. the reason for a stop.

    Returns:
        The record, with ``seq`` left for the store to assign.
    """
    return AuditRecordV1(
        v=RECORD_VERSION,
        kind=RecordKind.MARKER,
        time=time if isinstance(time, str) else format_timestamp(time),
        daemon_id=daemon_id,
        identity_mode=identity_mode,
        marker=MarkerEntry(event=event, version=version, detail=detail),
    )
