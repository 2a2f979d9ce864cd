"""CEL conditions: compiled and checked once at load, evaluated per request.

Conditions run on cel-expr-python, the official C++ CEL runtime. A policy
may call the CEL standard library (``size``, ``has``, ``in``, ``matches``,
``contains``, ``startsWith``, ``endsWith``, ``all``, ``exists``,
``exists_one``, ``map``, ``filter``, the conversions ``int``, ``uint``,
``double``, ``string``, ``bytes``, ``bool``, ``timestamp``, ``duration``,
``type``, ``dyn`` and the timestamp accessors ``getFullYear`` ...
``getMilliseconds``, each with an optional time zone) and, deliberately,
one extension: strings (``charAt``, ``indexOf``, ``lastIndexOf``,
``lowerAscii``, ``upperAscii``, ``replace``, ``split``, ``substring``,
``trim``, ``join``, ``format``, ``reverse``, ``strings.quote``), because
case-insensitive matching of caller-supplied text is what policies need
most. The math, optional, encoders and bindings extensions are not
enabled: nothing in a permission rule needs them yet, and each one widens
what an author must review. Any other function is a load error.

The semantics are CEL's, and ``tests/policy/test_cel_semantics.py`` checks
each through the engine: an error on one side of ``||`` (``&&``) does not
sink a true (false) other side; int, uint and double compare on one number
line in either order (``==`` across other types is false, not an error);
int and uint arithmetic that overflows is an error, never a wrap; and
``getHours()`` without a zone is UTC, whatever offset a literal was written
with. A condition sees these variables; every map is ``map(string, dyn)``:

=============  ==============================================================
``principal``  the principal being evaluated: ``id``, ``kind``, ``roles``
               (inheritance resolved), ``attr`` (directory attributes)
``user``       the first principal of the chain, same shape
``agent``      the last principal of the chain, same shape
``chain``      ``ids`` (list of principal ids), ``depth`` (int)
``action``     the action name (string)
``resource``   ``kind``, ``id``, ``attr`` (the caller's resource attributes)
``context``    what the caller supplied
``env``        what the daemon knows: ``now`` (timestamp), ``daemon_id``,
               ``agent_id``, ``environment``, ``region``, ``labels`` (map),
               ``peer``
``limits``     the declared limits this request can form, by name: ``count``
               (int), ``sum`` (summing limits), ``ceiling``, ``remaining``,
               ``exceeded`` (bool: counting this request passes the
               ceiling) and ``window_start`` (timestamp); see
               ``policy.limits``. A limit the request cannot form (a key
               part or the amount missing or of the wrong type) is absent,
               so a condition reading it errors and fails closed.
=============  ==============================================================

A condition reads a limit only as ``limits.<name>`` (``has(limits.<name>)``
too); any other use of ``limits`` (``limits[x]``, ``limits`` alone) is a
load error giving line and column, so the names a condition reads
(``Condition.limits``) are known at load, where the compiler refuses a
name no policy file declares. After ``limits.<name>`` comes one of
``LIMIT_FIELDS`` or nothing (the limit as a whole value), in ``has()`` too;
a misspelt field (``limits.x.exceded``), an index (``limits.x["count"]``)
or a select on a field's value (``limits.x.exceeded.exceeded``) is a load
error as well, since it would load and then fail every request. The
(name, field) pairs read are ``Condition.limit_fields``, where the compiler
refuses ``sum`` on a limit that counts decisions.

At load a condition is parsed and type-checked against those declarations,
and its result must be ``bool`` (or ``dyn``, checked again per request). The
checker leaves literal conversions to run time, so this module folds them
itself: every ``timestamp("...")`` and ``duration("...")`` literal must
convert, and every literal time zone given to ``getHours`` and its siblings
must be an IANA zone or a fixed offset. It finds them in the checked
expression (``Expression.serialize()``, a ``cel.expr.CheckedExpr``), read
with a small protobuf wire reader because the CEL protos are not shipped in
Python.

At run time ``Condition.evaluate`` never raises for an evaluation error: the
runtime hands back an error value, which becomes a ``ConditionFailure`` the
engine treats as failing closed.
"""

from __future__ import annotations

import datetime
import re
import unicodedata
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import msgspec
from cel_expr_python import cel
from cel_expr_python.ext.ext_strings import ExtStrings
from google.protobuf import duration_pb2, timestamp_pb2, wrappers_pb2

from kynara_sidecar.decision import Duration, Timestamp, UInt64
from kynara_sidecar.errors import PolicyError
from kynara_sidecar.policy.limits import is_iana_zone

__all__ = [
    "LIMITS_VARIABLE",
    "LIMIT_FIELDS",
    "TIME_ZONE_FUNCTIONS",
    "VARIABLES",
    "Condition",
    "ConditionFailure",
    "compile_condition",
    "prepare_activation",
    "to_cel_value",
]

_MAP = cel.Type.Map(cel.Type.STRING, cel.Type.DYN)

VARIABLES: Mapping[str, cel.Type] = {
    "principal": _MAP,
    "user": _MAP,
    "agent": _MAP,
    "chain": _MAP,
    "action": cel.Type.STRING,
    "resource": _MAP,
    "context": _MAP,
    "env": _MAP,
    "limits": _MAP,
}

# The variable holding the limits' values; read only by select.
LIMITS_VARIABLE = "limits"
# The fields of one limit's value (``sum`` on summing limits only).
LIMIT_FIELDS = ("count", "sum", "ceiling", "remaining", "exceeded", "window_start")

# The timestamp accessors that take an optional time zone argument.
TIME_ZONE_FUNCTIONS = frozenset(
    {
        "getFullYear",
        "getMonth",
        "getDayOfYear",
        "getDayOfMonth",
        "getDate",
        "getDayOfWeek",
        "getHours",
        "getMinutes",
        "getSeconds",
        "getMilliseconds",
    }
)

# NOTE: no cost limit on evaluation: a comprehension over a caller-supplied
# list runs as long as the list is. agent.max_message_bytes (64 KiB by
# default) bounds the list, and policies are written by their owners, not by
# callers; cel-expr-python 0.1.3 exposes no cost tracker to do better.
_ENV = cel.NewEnv(variables=dict(VARIABLES), extensions=[ExtStrings()])
_RESULT_TYPES = ("BOOL", "DYN")

# Literal folding evaluates the literal with the runtime that will run it.
_PROBE_ENV = cel.NewEnv(variables={"literal": cel.Type.STRING})
_PROBES = {
    "timestamp": _PROBE_ENV.compile("timestamp(literal)"),
    "duration": _PROBE_ENV.compile("duration(literal)"),
    "zone": _PROBE_ENV.compile('timestamp("2000-01-01T00:00:00Z").getHours(literal)'),
}
_FIXED_OFFSET = re.compile(r"[+-][0-9]{2}:[0-9]{2}")
_NUL = "\x00"
_CEL_ERROR = re.compile(r"ERROR: <input>:(\d+):(\d+): ([^\n]*)")


class ConditionFailure(msgspec.Struct, frozen=True):
    """A condition that could not give a bool; ``message`` says why."""

    message: str


class Condition:
    """A compiled, checked CEL condition.

    Args:
        source: The CEL text, kept for audit and error messages.
        expression: The compiled expression.
        variables: The declared variables (``VARIABLES``) the expression
            names, read from the checked expression at load. A caller may
            reuse a result across activations that differ only in variables
            not listed here (``principal``, from one principal of the chain
            to the next). Defaults to all of them, which claims nothing.
        limits: The limit names the expression reads as
            ``limits.<name>``, read from the checked expression at load.
        limit_fields: The (name, field) pairs it reads: a field of
            ``LIMIT_FIELDS``, or ``""`` for the limit as a whole value
            (``has(limits.x)``, ``limits.x == ...``). Defaults to each name
            of ``limits`` as a whole value.
    """

    __slots__ = ("_expression", "limit_fields", "limits", "source", "variables")

    def __init__(
        self,
        source: str,
        expression: cel.Expression,
        variables: frozenset[str] = frozenset(VARIABLES),
        limits: frozenset[str] = frozenset(),
        limit_fields: frozenset[tuple[str, str]] | None = None,
    ):
        self.source = source
        self._expression = expression
        self.variables = variables
        self.limits = limits
        self.limit_fields = (
            frozenset((name, "") for name in limits)
            if limit_fields is None
            else limit_fields
        )

    def __repr__(self) -> str:
        return f"Condition({self.source!r})"

    def evaluate(self, data: Mapping[str, Any]) -> bool | ConditionFailure:
        """Evaluate against an activation of CEL values.

        Args:
            data: Variable name to value, already passed through
                ``to_cel_value``.

        Returns:
            The bool result, or a ``ConditionFailure`` for an evaluation
            error or a result that is not a bool. Never raises for those.
        """
        try:
            value = self._expression.eval(data=data)
        except (TypeError, ValueError, RuntimeError) as err:
            # The runtime reports bad data as an error value; this guards
            # the binding itself, so a decision still fails closed.
            return ConditionFailure(f"could not evaluate: {err}")
        return _result(value)

    def evaluate_prepared(self, activation: cel.Activation) -> bool | ConditionFailure:
        """``evaluate`` against variables prepared once by
        ``prepare_activation``: several conditions over the same variables
        hand them to the runtime once instead of once each."""
        try:
            value = self._expression.eval(activation=activation)
        except (TypeError, ValueError, RuntimeError) as err:
            return ConditionFailure(f"could not evaluate: {err}")
        return _result(value)


def _result(value: cel.Value) -> bool | ConditionFailure:
    # A bool is by far the usual result; only a bool value is True or False.
    result = value.value()
    if result is True or result is False:
        return result
    kind = value.type().name()
    if kind == "ERROR":
        return ConditionFailure(str(result))
    return ConditionFailure(f"expected a bool result, got {kind.lower()}")


def prepare_activation(data: Mapping[str, Any]) -> cel.Activation | ConditionFailure:
    """Variables for ``Condition.evaluate_prepared``: ``data`` as
    ``Condition.evaluate`` takes it (already through ``to_cel_value``).

    Values the runtime cannot take are reported by each evaluation, as
    ``evaluate`` reports them; a failure here (the binding refusing the
    mapping itself) is returned for the caller to give every condition.
    """
    try:
        return _ENV.Activation(data=data)
    except (TypeError, ValueError, RuntimeError) as err:
        return ConditionFailure(f"could not evaluate: {err}")


def compile_condition(
    source: str, *, path: str = "", location: str = "", rule: str = ""
) -> Condition:
    """Parse, type-check and fold the literals of a CEL condition.

    Args:
        source: The CEL text.
        path: The file it came from, for errors.
        location: Where in the document, such as ``$.rules[2].condition``.
        rule: The rule id, for errors.

    Returns:
        The compiled condition.

    Raises:
        PolicyError: The text does not parse or type-check (the message
            gives line and column), its result type is not bool, a
            timestamp, duration or time zone literal is invalid, or it uses
            ``limits`` other than as ``limits.<name>`` followed by one of
            ``LIMIT_FIELDS`` or nothing.
    """
    prefix = f"rule {rule!r} condition: " if rule else "condition: "

    def refuse(message: str) -> PolicyError:
        return PolicyError(prefix + message, path=path, location=location)

    try:
        source.encode("utf-8")
    except UnicodeEncodeError as err:
        raise refuse(f"expected UTF-8 text, got {err.reason}") from None
    if not unicodedata.is_normalized("NFC", source):
        # Names compare after NFC; a decomposed literal ("zoë" as e + U+0308)
        # would never equal one, and a deny rule would silently never fire.
        position = next(
            i
            for i, char in enumerate(source)
            if unicodedata.normalize("NFC", source[: i + 1]) != source[: i + 1]
        )
        raise refuse(
            "expected text in Unicode NFC (names compare after NFC), got a "
            f"decomposed character at position {position}"
        )
    try:
        expression = _ENV.compile(source)
        # The runtime reports some type errors (a map key of a type CEL does
        # not allow) only when asked for the result type.
        result = expression.return_type().name()
    except RuntimeError as err:
        raise refuse(_describe_cel_error(str(err))) from err
    if result not in _RESULT_TYPES:
        raise refuse(f"expected a bool result, got {result.lower()}")
    expr, positions = _read_checked_expr(expression.serialize())
    problem = _check_literals(source, expr, positions)
    if problem:
        raise refuse(problem)
    read = _LimitsRead()
    read.walk(expr)
    if read.problems:
        node_id, problem = min(
            read.problems, key=lambda item: positions.get(item[0], 0)
        )
        line, column = _line_column(source, positions.get(node_id, 0))
        raise refuse(f"{problem} at line {line} column {column}")
    return Condition(
        source,
        expression,
        _variables_named(expr),
        frozenset(name for name, _ in read.fields),
        frozenset(read.fields),
    )


def to_cel_value(value: Any) -> Any:
    """Convert a typed request value into what the CEL runtime accepts.

    Args:
        value: int (int64), ``UInt64``, float, str, bool, bytes,
            ``Timestamp``, ``Duration``, an aware ``datetime``, a list or
            tuple, or a mapping of str to such values.

    Returns:
        The same value with ``UInt64`` as ``UInt64Value`` (CEL ``uint``),
        timestamps and durations as their protobuf well-known types, tuples
        as lists and mappings as dicts, recursively.

    Raises:
        ValueError: A map key holds a NUL character, which the runtime
            would cut short (and so could make two keys collide).
    """
    match value:
        case UInt64():
            return wrappers_pb2.UInt64Value(value=int(value))
        case Timestamp(seconds=seconds, nanos=nanos):
            return timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)
        case Duration(seconds=seconds, nanos=nanos):
            return duration_pb2.Duration(seconds=seconds, nanos=nanos)
        case datetime.datetime():
            return to_cel_value(Timestamp.from_datetime(value))
        case str():
            # NOTE: cel-expr-python 0.1.3 cuts a plain str or bytes at its
            # first NUL when it converts it; the wrapper types keep it whole.
            return wrappers_pb2.StringValue(value=value) if _NUL in value else value
        case bytes():
            return wrappers_pb2.BytesValue(value=value)
        case bool() | int() | float():
            return value
        case Mapping():
            return {_map_key(key): to_cel_value(item) for key, item in value.items()}
        case list() | tuple():
            return [to_cel_value(item) for item in value]
    return value


def _map_key(key: str) -> str:
    if isinstance(key, str) and _NUL in key:
        raise ValueError(f"expected map keys without NUL characters, got {key!r}")
    return key


def _describe_cel_error(text: str) -> str:
    found = _CEL_ERROR.findall(text)
    if not found:
        return f"expected a valid CEL expression, got: {text}"
    details = "; ".join(
        f"{message} at line {line} column {column}" for line, column, message in found
    )
    return f"expected a valid CEL expression, got {details}"


# --- literal folding -----------------------------------------------------------


class _Call(NamedTuple):
    function: str
    has_target: bool
    # (node id, value) of each argument that is a string literal.
    string_args: tuple[tuple[int, str], ...]
    arg_count: int


def _check_literals(source: str, expr: bytes, positions: Mapping[int, int]) -> str:
    for call in _calls(expr):
        problem = _check_call(call)
        if problem:
            node_id = call.string_args[0][0]
            line, column = _line_column(source, positions.get(node_id, 0))
            return f"{problem} at line {line} column {column}"
    return ""


def _check_call(call: _Call) -> str:
    if call.arg_count != 1 or len(call.string_args) != 1:
        return ""
    literal = call.string_args[0][1]
    if call.function in ("timestamp", "duration") and not call.has_target:
        if _probe(call.function, literal):
            return ""
        example = "2026-12-07T09:00:00Z" if call.function == "timestamp" else "1h30m"
        return (
            f"expected a {call.function} literal such as {example!r}, got {literal!r}"
        )
    if call.function in TIME_ZONE_FUNCTIONS and call.has_target:
        if _is_time_zone(literal) and _probe("zone", literal):
            return ""
        return (
            "expected an IANA time zone such as 'Europe/Berlin' or a fixed "
            f"offset such as '+02:00', got {literal!r}"
        )
    return ""


def _probe(kind: str, literal: str) -> bool:
    return _PROBES[kind].eval(data={"literal": literal}).type().name() != "ERROR"


def _is_time_zone(name: str) -> bool:
    # As a limit's window: a zone of the database, never one following the
    # host's clock (``localtime``), where two daemons would disagree.
    return bool(_FIXED_OFFSET.fullmatch(name)) or is_iana_zone(name)


def _line_column(source: str, offset: int) -> tuple[int, int]:
    before = source[:offset]
    line = before.count("\n") + 1
    return line, offset - (before.rfind("\n") + 1) + 1


# --- a minimal protobuf wire reader for cel.expr.CheckedExpr ------------------
# Field numbers from cel/expr/checked.proto and cel/expr/syntax.proto.

_ANY_VALUE = 2
_CHECKED_EXPR = 4
_CHECKED_SOURCE_INFO = 5
_SOURCE_INFO_POSITIONS = 4
_EXPR_ID = 2
_EXPR_CONST = 3
_EXPR_IDENT = 4
_IDENT_NAME = 1
_EXPR_CALL = 6
_CONST_STRING = 6
_CALL_TARGET, _CALL_FUNCTION, _CALL_ARGS = 1, 2, 3
_STRUCT_ENTRIES = 2
_EXPR_SELECT = 5
_SELECT_OPERAND, _SELECT_FIELD, _SELECT_TEST_ONLY = 1, 2, 3
_EXPR_LIST = 7
_LIST_ELEMENTS = 1
_EXPR_STRUCT = 8
_EXPR_COMPREHENSION = 9
# Expr kind -> fields of that message holding child Exprs: a select's
# operand, a list's elements, a comprehension's iter_range, accu_init,
# loop_condition, loop_step and result. Struct entries hold them at
# map_key and value.
_CHILD_FIELDS = {
    _EXPR_SELECT: (_SELECT_OPERAND,),
    _EXPR_LIST: (_LIST_ELEMENTS,),
    _EXPR_COMPREHENSION: (2, 4, 5, 6, 7),
}
_ENTRY_CHILD_FIELDS = (3, 4)


def _varint(buf: bytes, index: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[index]
        index += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, index
        shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    index = 0
    while index < len(buf):
        key, index = _varint(buf, index)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, index = _varint(buf, index)
        elif wire == 2:
            size, index = _varint(buf, index)
            value, index = buf[index : index + size], index + size
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            value, index = buf[index : index + width], index + width
        else:
            raise ValueError(f"expected protobuf wire type 0, 1, 2 or 5, got {wire}")
        yield field, value


def _read_checked_expr(any_bytes: bytes) -> tuple[bytes, dict[int, int]]:
    checked = next(v for f, v in _fields(any_bytes) if f == _ANY_VALUE)
    expr, positions = b"", {}
    for field, value in _fields(checked):
        if field == _CHECKED_EXPR:
            expr = value
        elif field == _CHECKED_SOURCE_INFO:
            for info_field, entry in _fields(value):
                if info_field == _SOURCE_INFO_POSITIONS:
                    pair = dict(_fields(entry))
                    positions[pair.get(1, 0)] = pair.get(2, 0)
    return expr, positions


def _variables_named(expr: bytes) -> frozenset[str]:
    # Every identifier of the checked expression that is a declared
    # variable. A comprehension variable spelt like one (``exists(principal,
    # ...)``) is counted too: that claims a dependency, never hides one.
    return frozenset(name for name in _identifiers(expr) if name in VARIABLES)


_INDEX = "_[_]"
_LIMIT_FIELDS_TEXT = ", ".join(LIMIT_FIELDS[:-1]) + f" or {LIMIT_FIELDS[-1]}"


class _LimitsRead:
    """What a checked expression reads of ``limits``: (name, field) pairs
    in ``fields`` (field ``""`` for a limit as a whole value), and in
    ``problems`` (node id, message) for each use a request could only fail
    on: ``limits`` other than selected (a comprehension variable spelt so
    included: refused, never mistaken), a field a limit does not have, an
    index on a limit, a select or index on a field's value. ``dyn(...)``
    is looked through: it changes no value.

    NOTE: a limit passed through a value first (``[limits.x][0].f``,
    ``{"a": limits.x}.a.f``, a comprehension over a list of limits) is
    only known as a whole-value read; telling its fields needs types the
    checker does not have for ``map(string, dyn)``, so a misspelt field
    there still fails each request (closed) rather than the load."""

    def __init__(self) -> None:
        self.fields: set[tuple[str, str]] = set()
        self.problems: list[tuple[int, str]] = []

    def walk(self, expr: bytes) -> None:
        node_id = 0
        for field, value in _fields(expr):
            if field == _EXPR_ID:
                node_id = value
            elif field == _EXPR_IDENT:
                if _ident_text(value) == LIMITS_VARIABLE:
                    self.problems.append(
                        (
                            node_id,
                            "expected limits read as limits.<name>, got another "
                            "use of limits",
                        )
                    )
            elif field == _EXPR_SELECT:
                self._select(node_id, dict(_fields(value)))
            elif field == _EXPR_CALL:
                self._call(node_id, value)
            elif field == _EXPR_STRUCT:
                for entry in (v for f, v in _fields(value) if f == _STRUCT_ENTRIES):
                    for entry_field, child in _fields(entry):
                        if entry_field in _ENTRY_CHILD_FIELDS:
                            self.walk(child)
            elif field in _CHILD_FIELDS:
                for child_field, child in _fields(value):
                    if child_field in _CHILD_FIELDS[field]:
                        self.walk(child)

    def _select(self, node_id: int, select: dict[int, Any]) -> None:
        operand = select.get(_SELECT_OPERAND, b"")
        selected = select.get(_SELECT_FIELD, b"").decode()
        if _ident_name(operand) == LIMITS_VARIABLE:
            self.fields.add((selected, ""))
            return
        path = _limit_path(operand)
        if path is None:
            self.walk(operand)
        elif len(path) == 1:
            name = path[0]
            if selected in LIMIT_FIELDS:
                self.fields.add((name, selected))
            else:
                self.problems.append(
                    (
                        node_id,
                        f"expected a field of limits.{name} ({_LIMIT_FIELDS_TEXT}) "
                        f"or none, got limits.{name}.{selected}",
                    )
                )
        else:
            name, limit_field = path
            self.problems.append(
                (
                    node_id,
                    f"expected nothing selected from limits.{name}.{limit_field} "
                    f"(a value, not a map), got .{selected} after it",
                )
            )

    def _call(self, node_id: int, call: bytes) -> None:
        function = b""
        children: list[bytes] = []
        for call_field, child in _fields(call):
            if call_field == _CALL_FUNCTION:
                function = child
            elif call_field in (_CALL_TARGET, _CALL_ARGS):
                children.append(child)
        if function.decode() == _INDEX and children:
            path = _limit_path(children[0])
            if path is not None:
                what = "limits." + ".".join(path)
                self.problems.append(
                    (
                        node_id,
                        f"expected {what} read by field (limits.{path[0]}."
                        f"exceeded), got an index on {what}"
                        if len(path) == 1
                        else f"expected no index on {what} (a value, not a "
                        f"map), got one",
                    )
                )
                children = children[1:]
        for child in children:
            self.walk(child)


def _limit_path(expr: bytes) -> tuple[str] | tuple[str, str] | None:
    """``(name,)`` for ``limits.<name>``, ``(name, field)`` for
    ``limits.<name>.<field>`` with a field of ``LIMIT_FIELDS``, either seen
    through ``dyn(...)``; None for anything else (``has(...)`` included,
    which is a bool)."""
    for field, value in _fields(expr):
        if field == _EXPR_SELECT:
            select = dict(_fields(value))
            if select.get(_SELECT_TEST_ONLY):
                return None
            operand = select.get(_SELECT_OPERAND, b"")
            selected = select.get(_SELECT_FIELD, b"").decode()
            if _ident_name(operand) == LIMITS_VARIABLE:
                return (selected,)
            inner = _limit_path(operand)
            if inner is not None and len(inner) == 1 and selected in LIMIT_FIELDS:
                return (inner[0], selected)
            return None
        if field == _EXPR_CALL:
            function, target, args = b"", False, []
            for call_field, child in _fields(value):
                if call_field == _CALL_FUNCTION:
                    function = child
                elif call_field == _CALL_TARGET:
                    target = True
                elif call_field == _CALL_ARGS:
                    args.append(child)
            if function == b"dyn" and not target and len(args) == 1:
                return _limit_path(args[0])
            return None
    return None


def _ident_name(expr: bytes) -> str:
    """The name ``expr`` is, when it is an identifier; else ""."""
    for field, value in _fields(expr):
        if field == _EXPR_IDENT:
            return _ident_text(value)
    return ""


def _ident_text(ident: bytes) -> str:
    """The name of an ``Expr.Ident`` message."""
    return dict(_fields(ident)).get(_IDENT_NAME, b"").decode()


def _identifiers(expr: bytes) -> Iterator[str]:
    for field, value in _fields(expr):
        if field == _EXPR_IDENT:
            yield _ident_text(value)
        elif field == _EXPR_CALL:
            for call_field, child in _fields(value):
                if call_field in (_CALL_TARGET, _CALL_ARGS):
                    yield from _identifiers(child)
        elif field == _EXPR_STRUCT:
            for entry in (v for f, v in _fields(value) if f == _STRUCT_ENTRIES):
                for entry_field, child in _fields(entry):
                    if entry_field in _ENTRY_CHILD_FIELDS:
                        yield from _identifiers(child)
        elif field in _CHILD_FIELDS:
            for child_field, child in _fields(value):
                if child_field in _CHILD_FIELDS[field]:
                    yield from _identifiers(child)


def _calls(expr: bytes) -> Iterator[_Call]:
    for field, value in _fields(expr):
        if field == _EXPR_CALL:
            yield from _read_call(value)
        elif field == _EXPR_STRUCT:
            for entry in (v for f, v in _fields(value) if f == _STRUCT_ENTRIES):
                yield from _children(entry, _ENTRY_CHILD_FIELDS)
        elif field in _CHILD_FIELDS:
            yield from _children(value, _CHILD_FIELDS[field])


def _children(message: bytes, child_fields: tuple[int, ...]) -> Iterator[_Call]:
    for field, value in _fields(message):
        if field in child_fields:
            yield from _calls(value)


def _read_call(call: bytes) -> Iterator[_Call]:
    function, has_target, args = "", False, []
    for field, value in _fields(call):
        if field == _CALL_FUNCTION:
            function = value.decode()
        elif field in (_CALL_TARGET, _CALL_ARGS):
            has_target = has_target or field == _CALL_TARGET
            if field == _CALL_ARGS:
                args.append(value)
            yield from _calls(value)
    literals = tuple(filter(None, map(_string_literal, args)))
    yield _Call(function, has_target, literals, len(args))


def _string_literal(expr: bytes) -> tuple[int, str] | None:
    node_id, literal = 0, None
    for field, value in _fields(expr):
        if field == _EXPR_ID:
            node_id = value
        elif field == _EXPR_CONST:
            for const_field, const in _fields(value):
                if const_field == _CONST_STRING:
                    literal = const.decode()
    return None if literal is None else (node_id, literal)
