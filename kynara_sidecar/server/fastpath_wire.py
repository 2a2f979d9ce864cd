"""Translation between the fast path's MessagePack payloads and the
pipeline's values (``protos/fastpath.md``, version 1).

A front door translates and nothing more. Payloads are decoded once, by
typed msgspec decoders made at import, so the C decoder checks field names
and types; what a type cannot say (the value rules of ``kynara.v1.Value``:
keys, nesting, integer range, extension types) is checked by the same
helpers the gRPC door uses (``server.wire``), so both doors refuse alike.

Errors name the field as a path into the frame's payload, such as
``request.context['when']``; an item of a batch is named relative to the
batch, ``items[2].action``, as on gRPC.

Deep nesting: msgspec's decoders recurse, and one raises ``RecursionError``
on a payload nested some hundreds deep (a few kilobytes). Such a payload is
walked again without recursion (``_deep_path``) to name the field at fault,
as the nesting limit of values names it.

Timestamps: msgspec reads the timestamp extension (type -1) as a
``datetime``, which keeps microseconds only. Values are therefore decoded
as plain Python values first (the common case: no timestamp at all), and a
field that holds a timestamp, or that the plain decoder refused, is read
again value by value from its raw bytes (``_exact_value``), which keeps
nanoseconds and names the value at fault.
"""

from __future__ import annotations

import datetime
import functools
import struct
from typing import Any

import msgspec
from msgspec.msgpack import Ext

from kynara_sidecar.approvals.model import Approval, ApprovalState
from kynara_sidecar.audit.record import decode_value, parse_timestamp
from kynara_sidecar.decision import (
    ConditionError,
    Duration,
    Effect,
    MatchedRule,
    Resource,
    Timestamp,
    UInt64,
)
from kynara_sidecar.errors import (
    ErrorCode,
    InvalidRequest,
    KynaraError,
    ReasonCode,
    RequestError,
    ServiceError,
)
from kynara_sidecar.pipeline import Answer, IncomingRequest
from kynara_sidecar.server.wire import (
    MAX_VALUE_DEPTH,
    check_key,
    check_nesting,
    duration_from_parts,
    timestamp_from_parts,
)

__all__ = [
    "PROTOCOL_VERSION",
    "Cancel",
    "Decide",
    "DecideBatch",
    "FastPathError",
    "Health",
    "Hello",
    "WaitApproval",
    "answer_map",
    "approval_update_map",
    "decode_batch_item",
    "decode_frame",
    "decode_hello",
    "encode_message",
    "error_map",
    "request_from_payload",
]

PROTOCOL_VERSION = 1
# MessagePack extension types of kynara.v1.Value (protos/fastpath.md).
EXT_TIMESTAMP = -1
EXT_UINT64 = 1
EXT_DURATION = 2
INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1


class FastPathError(RequestError):
    """An error of the fast path's own (``deadline_exceeded``, ``cancelled``,
    ``unsupported_version``): a code that is not in ``ErrorCode``."""

    def __init__(self, code: str, message: str, *, field: str = ""):
        super().__init__(message, field=field)
        self.code = code  # type: ignore[assignment]


# ---------------------------------------------------------------- requests


class ResourceV1(msgspec.Struct, forbid_unknown_fields=True):
    """``kynara.v1.Resource`` as a map; values are checked after decoding."""

    kind: str = ""
    id: str = ""
    attributes: msgspec.Raw = msgspec.Raw(b"\x80")


class DecideRequestV1(msgspec.Struct, forbid_unknown_fields=True):
    """``kynara.v1.DecideRequest`` as a map: unknown fields are refused."""

    request_id: str = ""
    delegation_token: str = ""
    asserted_chain: list[str] = []
    action: str = ""
    resource: ResourceV1 = msgspec.field(default_factory=ResourceV1)
    context: msgspec.Raw = msgspec.Raw(b"\x80")
    explain: bool = False
    approval_id: str = ""


class WaitApprovalRequestV1(msgspec.Struct, forbid_unknown_fields=True):
    """``kynara.v1.WaitApprovalRequest`` as a map."""

    approval_id: str = ""


class DecideBatchRequestV1(msgspec.Struct, forbid_unknown_fields=True):
    """A batch: each item is decoded on its own, so a bad one gets its own
    error while the others are answered."""

    items: list[msgspec.Raw] = []


class _Empty(msgspec.Struct, forbid_unknown_fields=True):
    """The request of ``health`` and ``cancel``: nothing (a key is refused,
    as in every other request)."""


# The envelope: one tagged union, so one decode reads op, deadline and
# request. Unknown keys are refused (a misspelt ``timeout_ms`` must not
# drop a deadline silently), except in the hello, so that a newer client's
# hello still negotiates a version both speak.
class Hello(msgspec.Struct, tag_field="op", tag="hello"):
    versions: list[int] = []
    authorization: str = ""


class Decide(msgspec.Struct, tag_field="op", tag="decide", forbid_unknown_fields=True):
    request: DecideRequestV1 = msgspec.field(default_factory=DecideRequestV1)
    timeout_ms: int | None = None


class DecideBatch(
    msgspec.Struct, tag_field="op", tag="decide_batch", forbid_unknown_fields=True
):
    request: DecideBatchRequestV1 = msgspec.field(default_factory=DecideBatchRequestV1)
    timeout_ms: int | None = None


class WaitApproval(
    msgspec.Struct, tag_field="op", tag="wait_approval", forbid_unknown_fields=True
):
    request: WaitApprovalRequestV1 = msgspec.field(
        default_factory=WaitApprovalRequestV1
    )
    timeout_ms: int | None = None


class Health(msgspec.Struct, tag_field="op", tag="health", forbid_unknown_fields=True):
    request: _Empty = msgspec.field(default_factory=_Empty)
    timeout_ms: int | None = None


class Cancel(msgspec.Struct, tag_field="op", tag="cancel", forbid_unknown_fields=True):
    request: _Empty = msgspec.field(default_factory=_Empty)
    timeout_ms: int | None = None


Frame = Hello | Decide | DecideBatch | WaitApproval | Health | Cancel


def _ext(code: int, data: memoryview) -> Ext:
    return Ext(code, bytes(data))


_FRAME = msgspec.msgpack.Decoder(Frame)
_ITEM = msgspec.msgpack.Decoder(DecideRequestV1)
_VALUES = msgspec.msgpack.Decoder(dict[str, Any], ext_hook=_ext)
_RAW_MAP = msgspec.msgpack.Decoder(dict[str, msgspec.Raw])
_RAW_LIST = msgspec.msgpack.Decoder(list[msgspec.Raw])
_SCALAR = msgspec.msgpack.Decoder(Any, ext_hook=_ext)


_UNKNOWN_FIELD = "Object contains unknown field `"


def _field(error: msgspec.MsgspecError, prefix: str) -> str:
    """The field msgspec's message names (`` - at `$.a.b` ``, and the name
    of an unknown field), as a path below ``prefix``."""
    text, _, where = str(error).partition(" - at `$")
    path = prefix + where.rstrip("`")
    if text.startswith(_UNKNOWN_FIELD):
        path += "." + text[len(_UNKNOWN_FIELD) :].rstrip("`")
    return path.lstrip(".")


def _message(error: msgspec.MsgspecError) -> str:
    return str(error).partition(" - at `$")[0]


def _refused(error: msgspec.MsgspecError, prefix: str = "") -> InvalidRequest:
    if isinstance(error, msgspec.ValidationError):
        return InvalidRequest(_message(error), field=_field(error, prefix))
    return InvalidRequest(
        f"expected MessagePack, could not decode it: {error}", field=prefix
    )


_OPS = ", ".join(
    member.__struct_config__.tag  # type: ignore[attr-defined]
    for member in (Hello, Decide, DecideBatch, WaitApproval, Health, Cancel)
)


def _frame_refused(error: msgspec.MsgspecError) -> InvalidRequest:
    """The refusal of an envelope msgspec refused: a missing or unknown
    ``op`` is named ``op`` and lists the ops."""
    refused = _refused(error)
    text = _message(error)
    if text == "Object missing required field `op`":
        return InvalidRequest(f"expected an op, one of {_OPS}; got none", field="op")
    if refused.field == "op" and text.startswith("Invalid value "):
        got = text[len("Invalid value ") :]
        return InvalidRequest(
            f"expected one op, one of {_OPS}, given once; got {got}", field="op"
        )
    return refused


def _too_deep(payload: memoryview | bytes, prefix: str = "") -> InvalidRequest:
    path = _deep_path(bytes(payload), DEEP_WALK_LIMIT)
    return InvalidRequest(
        f"expected lists and maps nested at most {MAX_VALUE_DEPTH} deep in a "
        "value, got a payload nested deeper than the decoder follows",
        field=_render(path, prefix),
    )


def decode_frame(payload: memoryview | bytes) -> Frame:
    """The op of a frame after the hello, with its request.

    Raises:
        InvalidRequest: not one MessagePack map, a missing or unknown
            ``op``, a key the op does not define, a field of the wrong type
            (named), or nesting too deep to decode (the field named).
    """
    try:
        return _FRAME.decode(payload)
    except msgspec.MsgspecError as err:
        raise _frame_refused(err) from None
    except RecursionError:
        raise _too_deep(payload) from None


def decode_hello(payload: memoryview | bytes) -> Hello:
    """The connection's first frame, which must be a hello.

    Raises:
        InvalidRequest: it is not a hello (or not MessagePack).
    """
    try:
        frame = _FRAME.decode(payload)
    except msgspec.MsgspecError as err:
        refused = _frame_refused(err)
        raise InvalidRequest(
            f"expected a hello as the first frame ({refused})",
            field=refused.field or "op",
        ) from None
    except RecursionError:
        refused = _too_deep(payload)
        raise InvalidRequest(
            f"expected a hello as the first frame ({refused})",
            field=refused.field or "op",
        ) from None
    if type(frame) is not Hello:
        op = type(frame).__struct_config__.tag
        raise InvalidRequest(
            f"expected a hello as the first frame, got op {op!r}", field="op"
        )
    return frame


def decode_batch_item(raw: msgspec.Raw) -> DecideRequestV1:
    """One item of a batch; errors name the field within the item."""
    try:
        return _ITEM.decode(raw)
    except msgspec.MsgspecError as err:
        raise _refused(err) from None
    except RecursionError:
        raise _too_deep(raw) from None


# ------------------------------------------------------------ deep nesting


# How deep ``_deep_path`` looks: past the frame's own levels (envelope,
# request, resource, a batch's items) and the values' limit, yet far below
# where msgspec's decoders give up, so it finds the first place any value
# is nested too deep.
DEEP_WALK_LIMIT = MAX_VALUE_DEPTH + 8
# The most MessagePack items ``_deep_path`` reads before it settles for the
# path it has reached: a bound on the loop's time for a huge frame.
MAX_WALK_ITEMS = 1 << 17
# Fields whose values are ``kynara.v1.Value`` maps: below them keys are
# named as ``['key']``, and nesting counts from them.
_VALUE_FIELDS = ("context", "attributes")

# Bytes after the first byte of each fixed-size MessagePack type.
_FIXED = {0xC0: 0, 0xC2: 0, 0xC3: 0, 0xCA: 4, 0xCB: 8, 0xCC: 1, 0xCD: 2}
_FIXED |= {0xCE: 4, 0xCF: 8, 0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8}
_FIXED |= {0xD4: 2, 0xD5: 3, 0xD6: 5, 0xD7: 9, 0xD8: 17}
# Types whose length follows the first byte: its size, and extra bytes (an
# extension's type byte).
_SIZED = {0xC4: (1, 0), 0xC5: (2, 0), 0xC6: (4, 0), 0xC7: (1, 1), 0xC8: (2, 1)}
_SIZED |= {0xC9: (4, 1), 0xD9: (1, 0), 0xDA: (2, 0), 0xDB: (4, 0)}
_CONTAINERS = {0xDC: (2, False), 0xDD: (4, False), 0xDE: (2, True), 0xDF: (4, True)}


def _item(data: bytes, pos: int) -> tuple[int, int | None, bool, Any]:
    """One MessagePack item's head at ``pos``: where what follows it
    starts, its entry count (None for a scalar), whether it is a map, and
    its text for a string (None otherwise).

    Raises:
        IndexError: the data ends inside it (or ``ValueError``: invalid).
    """
    first = data[pos]
    if first <= 0x7F or first >= 0xE0:
        return pos + 1, None, False, None
    if first <= 0x8F:
        return pos + 1, first & 0x0F, True, None
    if first <= 0x9F:
        return pos + 1, first & 0x0F, False, None
    if first <= 0xBF:
        end = pos + 1 + (first & 0x1F)
        return end, None, False, data[pos + 1 : end].decode(errors="replace")
    if first in _FIXED:
        return pos + 1 + _FIXED[first], None, False, None
    if first in _SIZED:
        size, extra = _SIZED[first]
        length = int.from_bytes(data[pos + 1 : pos + 1 + size], "big")
        start = pos + 1 + size + extra
        text = data[start : start + length] if first >= 0xD9 else None
        text = text.decode(errors="replace") if text is not None else None
        return start + length, None, False, text
    if first in _CONTAINERS:
        size, is_map = _CONTAINERS[first]
        count = int.from_bytes(data[pos + 1 : pos + 1 + size], "big")
        return pos + 1 + size, count, is_map, None
    raise ValueError(f"no MessagePack type starts with {first:#x}")


def _deep_path(data: bytes, limit: int) -> list[str | int]:
    """The path (map keys and list indexes) to the first list or map nested
    more than ``limit`` deep in ``data``, one MessagePack value, read
    without recursion; the path reached so far when the data is malformed
    or longer than ``MAX_WALK_ITEMS`` items."""
    # Per open container: entries left (a map's keys and values both
    # count), whether a map, its next list index, its last key.
    open_: list[list[Any]] = []
    path: list[str | int] = []
    pos = 0
    for _ in range(MAX_WALK_ITEMS):
        here: str | int | None = None
        is_key = False
        if open_:
            top = open_[-1]
            is_key = top[1] and top[0] % 2 == 0
            here = top[3] if top[1] else top[2]
        try:
            pos, count, is_map, text = _item(data, pos)
        except (IndexError, ValueError):
            return path
        if count is not None and not is_key:
            if len(open_) >= limit:
                return path + ([here] if here is not None else [])
            entries = count * 2 if is_map else count
            if entries:
                if open_:
                    path.append(here)  # type: ignore[arg-type]
                open_.append([entries, is_map, 0, "?"])
                continue
            # An empty one is complete at once, as a scalar.
        elif count is not None:
            return path  # a map or list as a key: no value of ours
        elif is_key:
            open_[-1][3] = text if text is not None else "?"
        # The item is complete: count it, closing what it completes.
        while open_:
            top = open_[-1]
            top[0] -= 1
            if not top[1]:
                top[2] += 1
            if top[0]:
                break
            open_.pop()
            if open_:
                path.pop()
        if not open_:
            return []
    return path


def _render(path: list[str | int], prefix: str) -> str:
    """A path from ``_deep_path`` as an error's field below ``prefix``; a
    value is named as the nesting limit names it (``context['a'][0]...``,
    cut at the level past the limit)."""
    field = prefix
    values = bool(prefix)  # below a value map already (its own path)
    left = MAX_VALUE_DEPTH + 1
    for part in path:
        if values:
            if left == 0:
                break
            left -= 1
            field += f"[{part!r}]"
        elif isinstance(part, int):
            field += f"[{part}]"
        else:
            field += f".{part}" if field else part
            values = part in _VALUE_FIELDS
    return field


# ------------------------------------------------------------------ values


class _NeedsExact(Exception):
    """A value the plain decoding cannot keep whole: read it exactly."""


def _scalar_ext(ext: Ext, path: str) -> Any:
    data = ext.data
    if ext.code == EXT_UINT64:
        if len(data) != 8:
            raise InvalidRequest(
                f"expected 8 bytes in extension type {EXT_UINT64} (uint64), "
                f"got {len(data)}",
                field=path,
            )
        return UInt64(int.from_bytes(data, "big"))
    if ext.code == EXT_DURATION:
        if len(data) != 12:
            raise InvalidRequest(
                f"expected 12 bytes in extension type {EXT_DURATION} (duration), "
                f"got {len(data)}",
                field=path,
            )
        seconds, nanos = struct.unpack(">qi", data)
        return duration_from_parts(Duration(seconds, nanos), path)
    raise InvalidRequest(
        f"expected extension type {EXT_TIMESTAMP}, {EXT_UINT64} or "
        f"{EXT_DURATION}, got {ext.code}",
        field=path,
    )


def _value(value: Any, path: str, depth: int) -> Any:
    kind = type(value)
    if kind is str or kind is float or kind is bool or kind is bytes:
        return value
    if kind is int:
        if INT64_MIN <= value <= INT64_MAX:
            return value
        raise InvalidRequest(
            f"expected an integer in the int64 range, got {value}; send a "
            f"uint64 as extension type {EXT_UINT64}",
            field=path,
        )
    if kind is dict:
        check_nesting(depth, path)
        return _map(value, path, depth + 1)
    if kind is list:
        check_nesting(depth, path)
        return [_value(item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value)]
    if kind is Ext:
        return _scalar_ext(value, path)
    if kind is datetime.datetime:
        raise _NeedsExact
    if value is None:
        raise InvalidRequest("expected a value, got nil", field=path)
    raise InvalidRequest(f"expected a value, got {kind.__name__}", field=path)


def _map(entries: dict[Any, Any], path: str, depth: int) -> dict[str, Any]:
    out = {}
    for key, value in entries.items():
        if type(key) is not str:
            raise InvalidRequest(
                f"expected string keys, got {type(key).__name__} {key!r:.80}",
                field=path,
            )
        check_key(key, path)
        out[key] = _value(value, f"{path}[{key!r}]", depth)
    return out


# The heads of an extension whose type byte follows a length: its size.
_EXT_LENGTHS = {0xC7: 1, 0xC8: 2, 0xC9: 4}
# A fixext's first byte: its data's size.
_FIXEXT_SIZES = {0xD4: 1, 0xD5: 2, 0xD6: 4, 0xD7: 8, 0xD8: 16}


def _exact_timestamp(data: bytes, path: str) -> Timestamp | None:
    """The timestamp extension that ``data`` holds, with its nanoseconds, in
    any extension format (MessagePack's spec puts the 32- and 64-bit forms
    in a fixext and the 96-bit one in an ext 8, but the type is what counts);
    None when ``data`` is no timestamp.

    Raises:
        InvalidRequest: its data is not 4, 8 or 12 bytes long.
    """
    first = data[0]
    if first in _FIXEXT_SIZES:
        length, start = _FIXEXT_SIZES[first], 1
    elif first in _EXT_LENGTHS:
        size = _EXT_LENGTHS[first]
        length, start = int.from_bytes(data[1 : 1 + size], "big"), 1 + size
    else:
        return None
    if data[start : start + 1] != b"\xff" or len(data) != start + 1 + length:
        return None
    stamp = data[start + 1 :]
    if length == 4:
        return timestamp_from_parts(Timestamp(int.from_bytes(stamp, "big")), path)
    if length == 8:
        packed = int.from_bytes(stamp, "big")
        nanos, seconds = packed >> 34, packed & ((1 << 34) - 1)
        return timestamp_from_parts(Timestamp(seconds, nanos), path)
    if length == 12:
        nanos, seconds = struct.unpack(">Iq", stamp)
        return timestamp_from_parts(Timestamp(seconds, nanos), path)
    raise InvalidRequest(
        f"expected 4, 8 or 12 bytes in extension type {EXT_TIMESTAMP} "
        f"(timestamp), got {length}",
        field=path,
    )


def _is_map(first: int) -> bool:
    return 0x80 <= first <= 0x8F or first in (0xDE, 0xDF)


def _is_list(first: int) -> bool:
    return 0x90 <= first <= 0x9F or first in (0xDC, 0xDD)


def _exact_value(raw: msgspec.Raw, path: str, depth: int) -> Any:
    data = bytes(raw)
    if not data:
        raise InvalidRequest("expected a value, got nothing", field=path)
    first = data[0]
    if _is_map(first):
        check_nesting(depth, path)
        return _exact_map(data, path, depth + 1)
    if _is_list(first):
        check_nesting(depth, path)
        try:
            items = _RAW_LIST.decode(data)
        except msgspec.MsgspecError as err:
            raise _refused(err, path) from None
        return [
            _exact_value(item, f"{path}[{i}]", depth + 1)
            for i, item in enumerate(items)
        ]
    stamp = _exact_timestamp(data, path)
    if stamp is not None:
        return stamp
    try:
        value = _SCALAR.decode(data)
    except msgspec.MsgspecError as err:
        raise _refused(err, path) from None
    try:
        return _value(value, path, depth)
    except _NeedsExact:
        # Every timestamp form is read above: this is a defect, not the
        # caller's, but the caller gets an answer naming the value.
        raise InvalidRequest(
            f"expected a value this daemon can read exactly, got {value!r:.80}",
            field=path,
        ) from None


def _exact_map(data: bytes | msgspec.Raw, path: str, depth: int) -> dict[str, Any]:
    try:
        entries = _RAW_MAP.decode(data)
    except msgspec.MsgspecError as err:
        raise _refused(err, path) from None
    out = {}
    for key, value in entries.items():
        check_key(key, path)
        out[key] = _exact_value(value, f"{path}[{key!r}]", depth)
    return out


def _values(raw: msgspec.Raw, path: str) -> dict[str, Any]:
    """A request's ``context`` or ``resource.attributes`` as pipeline values."""
    try:
        return _map(_VALUES.decode(raw), path, 0)
    except (msgspec.MsgspecError, _NeedsExact):
        # A timestamp, or something the plain decoder refused without a
        # precise place: read it again value by value.
        return _exact_map(raw, path, 0)
    except RecursionError:
        raise _too_deep(raw, path) from None


def request_from_payload(
    request: DecideRequestV1, peer: str, authorization: str, prefix: str
) -> IncomingRequest:
    """Translate a decoded decide request into the pipeline's request.

    Args:
        request: the decoded map.
        peer: the connection's peer, as gRPC names a Unix peer.
        authorization: the connection's credential (from its hello).
        prefix: where the request sits in the payload, for error fields
            (``request.`` for a decide, "" for a batch item, which the
            answer names ``items[i]``).

    Raises:
        InvalidRequest: naming the first malformed value.
    """
    resource = request.resource
    return IncomingRequest(
        action=request.action,
        resource=Resource(
            kind=resource.kind,
            id=resource.id,
            attributes=_values(resource.attributes, f"{prefix}resource.attributes"),
        ),
        context=_values(request.context, f"{prefix}context"),
        asserted_chain=tuple(request.asserted_chain),
        delegation_token=request.delegation_token,
        request_id=request.request_id,
        peer=peer,
        authorization=authorization,
        explain=request.explain,
        approval_id=request.approval_id,
    )


# ----------------------------------------------------------------- answers


# An approval's expiry goes out with every answer that cites it (a retry
# of a pending one, say): the few distinct ones are converted once.
_TIMESTAMP_EXTS = 1024


@functools.lru_cache(maxsize=_TIMESTAMP_EXTS)
def _timestamp_ext(text: str) -> Ext | msgspec.UnsetType:
    """An RFC 3339 time as the timestamp extension (12-byte form, so any
    second of years 0001..9999 fits); unset for ""."""
    if not text:
        return msgspec.UNSET
    moment = parse_timestamp(text)
    return Ext(EXT_TIMESTAMP, struct.pack(">Iq", moment.nanos, moment.seconds))


class ApprovalV1(msgspec.Struct):
    """``kynara.v1.Approval`` as a map."""

    id: str
    url: str
    state: str
    reviewers: list[str]
    risk_score: int
    expires_at: Ext | msgspec.UnsetType = msgspec.UNSET


class RuleTraceV1(msgspec.Struct):
    policy: str
    rule: str
    effect: Effect
    action_matched: bool
    resource_matched: bool
    roles_matched: bool
    verdict: str
    shadow: bool
    condition: str
    error: str


class PrincipalExplanationV1(msgspec.Struct):
    principal: str
    roles: tuple[str, ...]
    decision: Effect
    reason_code: ReasonCode
    decided_by: str
    rules: list[RuleTraceV1]


class ExplanationV1(msgspec.Struct):
    summary: str
    principals: list[PrincipalExplanationV1]


class MatchedRuleV1(msgspec.Struct):
    policy: str
    rule: str
    effect: Effect
    principal: str
    shadow: bool


class ConditionErrorV1(msgspec.Struct):
    policy: str
    rule: str
    principal: str
    message: str


class DecisionV1(msgspec.Struct):
    """``kynara.v1.DecideResponse`` as a map; ``explanation`` and
    ``approval`` only when present."""

    decision: Effect
    decision_id: str
    matched_rules: list[MatchedRuleV1]
    reason_code: ReasonCode
    reason: str
    policy_revision: str
    directory_revision: str
    audit_sequence: int
    record_hash: str
    condition_errors: list[ConditionErrorV1]
    chain: list[str]
    request_id: str
    explanation: ExplanationV1 | msgspec.UnsetType = msgspec.UNSET
    approval: ApprovalV1 | msgspec.UnsetType = msgspec.UNSET
    limits: dict[str, LimitSeenV1] | msgspec.UnsetType = msgspec.UNSET


class LimitSeenV1(msgspec.Struct, omit_defaults=True):
    """``kynara.v1.LimitSeen`` as a map: what a limit was for an explained
    decision. Numbers are plain msgpack ints or floats (a sum past uint64,
    which the log keeps exact, as the nearest float)."""

    key: str
    scope: str
    count: int
    ceiling: int | float | msgspec.UnsetType = msgspec.UNSET
    window_start: Ext | msgspec.UnsetType = msgspec.UNSET
    sum: int | float | msgspec.UnsetType = msgspec.UNSET
    remote_count: int = 0
    remote_sum: int | float | msgspec.UnsetType = msgspec.UNSET
    counted: bool = False
    amount: int | float | msgspec.UnsetType = msgspec.UNSET
    error: str = ""


def _number(encoded: dict[str, Any] | None) -> int | float | msgspec.UnsetType:
    if encoded is None:
        return msgspec.UNSET
    value = decode_value(encoded)
    if isinstance(value, int) and not -(2**63) <= value < 2**64:
        return float(value)
    return value


def _limits(answer: Answer) -> dict[str, LimitSeenV1] | msgspec.UnsetType:
    # Explained answers only, as on gRPC: the limits are part of the why.
    if not answer.limits or answer.decision.explanation is None:
        return msgspec.UNSET
    return {
        name: LimitSeenV1(
            key=entry.key,
            scope=entry.scope,
            count=entry.count,
            ceiling=_number(entry.ceiling),
            window_start=_timestamp_ext(entry.window_start),
            sum=_number(entry.sum),
            remote_count=entry.remote_count,
            remote_sum=_number(entry.remote_sum),
            counted=entry.counted,
            amount=_number(entry.amount),
            error=entry.error,
        )
        for name, entry in answer.limits.items()
    }


def _matched(rule: MatchedRule) -> MatchedRuleV1:
    return MatchedRuleV1(
        rule.policy, rule.rule, rule.effect, rule.principal, rule.shadow
    )


def _condition_error(error: ConditionError) -> ConditionErrorV1:
    return ConditionErrorV1(error.policy, error.rule, error.principal, error.message)


def _explanation(answer: Answer) -> ExplanationV1 | msgspec.UnsetType:
    explanation = answer.decision.explanation
    if explanation is None:
        return msgspec.UNSET
    return ExplanationV1(
        summary=explanation.summary,
        principals=[
            PrincipalExplanationV1(
                principal=item.principal,
                roles=item.roles,
                decision=item.effect,
                reason_code=item.reason_code,
                decided_by=item.decided_by,
                rules=[
                    RuleTraceV1(
                        policy=trace.policy,
                        rule=trace.rule,
                        effect=trace.effect,
                        action_matched=trace.action_matched,
                        resource_matched=trace.resource_matched,
                        roles_matched=trace.roles_matched,
                        verdict=str(trace.verdict),
                        shadow=trace.shadow,
                        condition=trace.condition,
                        error=trace.error,
                    )
                    for trace in item.rules
                ],
            )
            for item in explanation.principals
        ],
    )


def _approval(approval: Approval | None) -> ApprovalV1 | msgspec.UnsetType:
    if approval is None:
        return msgspec.UNSET
    return ApprovalV1(
        id=approval.id,
        url=approval.url,
        state=str(approval.state),
        reviewers=list(approval.approvers),
        risk_score=approval.risk.score,
        expires_at=_timestamp_ext(approval.expires_at),
    )


def answer_map(answer: Answer) -> DecisionV1:
    """The decision map of an answer (``DecideResponse``'s map form)."""
    decision = answer.decision
    return DecisionV1(
        decision=decision.effect,
        decision_id=answer.decision_id,
        matched_rules=[_matched(rule) for rule in decision.matched_rules],
        reason_code=decision.reason_code,
        reason=decision.reason,
        policy_revision=decision.policy_revision,
        directory_revision=decision.directory_revision,
        audit_sequence=answer.audit_sequence,
        record_hash=answer.record_hash,
        condition_errors=[_condition_error(e) for e in decision.condition_errors],
        chain=[principal.id for principal in decision.chain],
        request_id=answer.request_id,
        explanation=_explanation(answer),
        approval=_approval(answer.approval),
        limits=_limits(answer),
    )


class ApprovalUpdateV1(msgspec.Struct):
    """``kynara.v1.ApprovalUpdate`` as a map."""

    approval_id: str
    state: str
    approvals: int
    approvals_needed: int
    reviewers: list[str]
    comment: str
    expires_at: Ext | msgspec.UnsetType = msgspec.UNSET


def approval_update_map(approval: Approval) -> ApprovalUpdateV1:
    """One state of a wait, as ``DecisionService.approval_update`` has it."""
    comment = ""
    if approval.state is ApprovalState.REJECTED and approval.reviews:
        comment = approval.reviews[-1].comment
    return ApprovalUpdateV1(
        approval_id=approval.id,
        state=str(approval.state),
        approvals=len(approval.approvers),
        approvals_needed=approval.requirement.approvers,
        reviewers=list(approval.approvers),
        comment=comment,
        expires_at=_timestamp_ext(approval.expires_at),
    )


class ErrorV1(msgspec.Struct):
    code: str
    message: str
    field: str


def error_map(error: KynaraError) -> ErrorV1:
    """The error map of a refusal; unknown errors are ``internal``."""
    if isinstance(error, RequestError | ServiceError):
        return ErrorV1(str(error.code), str(error), error.field)
    return ErrorV1(str(ErrorCode.INTERNAL), str(error), "")


_ENCODER = msgspec.msgpack.Encoder()
_HEADER = struct.Struct(">II")


def encode_message(stream: int, message: Any) -> bytearray:
    """One frame: the header and ``message`` encoded as MessagePack."""
    frame = bytearray(_HEADER.size)
    _ENCODER.encode_into(message, frame, _HEADER.size)
    _HEADER.pack_into(frame, 0, len(frame) - _HEADER.size, stream)
    return frame
