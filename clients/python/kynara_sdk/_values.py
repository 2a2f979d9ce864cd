"""Python values to the wire's typed ``Value``, exactly, on either transport.

The daemon keeps integers exact end to end and a timestamp a timestamp, so
the conversion here refuses anything it would have to guess at: a naive
``datetime`` (which instant?), an integer beyond uint64, a key that is not a
string, lists and maps nested deeper than the daemon reads (``MAX_DEPTH``;
a structure that contains itself is one). Every error names the key path,
such as ``context.items[2].when``, so the caller can find the bad value in a
nested structure.

Two encoders share these rules: ``to_packable_map`` for the fast path
(MessagePack, protos/fastpath.md "Values") and ``to_value_map`` for gRPC
(``kynara.v1.Value``). The second imports the protobuf stubs when first
called, so the fast path never needs them.
"""

from __future__ import annotations

import datetime
import struct
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from msgspec.msgpack import Ext

if TYPE_CHECKING:
    from kynara.v1 import decision_pb2

__all__ = [
    "DURATION_EXT",
    "MAX_DEPTH",
    "UINT64_EXT",
    "UInt64",
    "to_packable",
    "to_packable_map",
    "to_value",
    "to_value_map",
]

MIN_INT64 = -(2**63)
MAX_INT64 = 2**63 - 1
MAX_UINT64 = 2**64 - 1
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
_MICROSECOND = datetime.timedelta(microseconds=1)
_MICROS_PER_SECOND = 1_000_000
_NANOS_PER_MICRO = 1_000
# Lists and maps nested in one value at most: the daemon's limit
# (kynara_sidecar.server.wire.MAX_VALUE_DEPTH), checked here so a deeper
# value fails with its key path before protobuf, whose own decoder gives up
# past 100 message levels with a DecodeError, sees it.
MAX_DEPTH = 16
# The fast path's MessagePack extension types (protos/fastpath.md, "Values").
UINT64_EXT = 1
DURATION_EXT = 2
_U64 = struct.Struct(">Q")
_DURATION = struct.Struct(">qi")


class UInt64(int):
    """Marks an integer as unsigned 64-bit (CEL ``uint``).

    A plain ``int`` travels as int64 when it fits and as uint64 only when it
    is too large for int64; wrap it in ``UInt64`` to make a small value
    unsigned too, e.g. ``UInt64(7)`` for a policy comparing against ``7u``.
    """

    __slots__ = ()


def to_value(value: Any, path: str = "value") -> decision_pb2.Value:
    """Convert one Python value to a wire ``Value``.

    Args:
        value: bool, int, ``UInt64``, float, str, bytes, aware ``datetime``,
            ``timedelta``, list or tuple of values, or dict of str to values.
        path: where the value sits, used in error messages.

    Returns:
        The ``kynara.v1.Value`` holding the value.

    Raises:
        TypeError: the value, or a value or key nested in it, has a type with
            no wire form; the message names its key path and type.
        ValueError: an integer is out of range, a ``datetime`` is naive, or
            lists and maps are nested more than ``MAX_DEPTH`` deep; the
            message names its key path.
    """
    from kynara.v1 import decision_pb2

    out = decision_pb2.Value()
    _fill(out, value, path, 0)
    return out


def to_value_map(values: Mapping[str, Any] | None, path: str) -> dict[str, Any]:
    """Convert a dict of str to values into a dict of wire ``Value``.

    Args:
        values: the mapping to convert; ``None`` is an empty mapping.
        path: where the mapping sits, e.g. ``resource.attributes``.

    Returns:
        A new dict of str to ``kynara.v1.Value``.

    Raises:
        TypeError, ValueError: as ``to_value``.
    """
    if values is None:
        return {}
    if not isinstance(values, Mapping):
        raise TypeError(
            f"{path}: expected a dict of str to values, got {type(values).__name__}"
        )
    return {
        _key(key, path): to_value(item, f"{path}.{key}") for key, item in values.items()
    }


def _key(key: Any, path: str) -> str:
    if not isinstance(key, str):
        raise TypeError(f"{path}: {_key_message(key)}")
    return key


def _key_message(key: Any) -> str:
    return f"expected str keys, got {type(key).__name__} key {key!r}"


def _type_message(value: Any) -> str:
    return (
        "expected bool, int, float, str, bytes, datetime, timedelta,"
        f" list or dict, got {type(value).__name__}"
    )


def _int_message(value: int) -> str:
    return f"expected an integer within int64 or uint64 [-2**63, 2**64-1], got {value}"


def _naive_message(value: datetime.datetime) -> str:
    return (
        f"expected an aware datetime, got a naive one ({value});"
        " a naive datetime is an ambiguous instant, attach a tzinfo"
    )


def _depth_message() -> str:
    return (
        f"expected lists and maps nested at most {MAX_DEPTH} deep,"
        " got deeper (or a list or dict that contains itself)"
    )


def _duration_parts(value: datetime.timedelta) -> tuple[int, int]:
    # A protobuf Duration's seconds and nanos share the sign, while divmod
    # floors; split the magnitude and put the sign back on both.
    micros = value // _MICROSECOND
    sign = -1 if micros < 0 else 1
    seconds, rest = divmod(abs(micros), _MICROS_PER_SECOND)
    return sign * seconds, sign * rest * _NANOS_PER_MICRO


def _fill(out: decision_pb2.Value, value: Any, path: str, depth: int) -> None:
    # Order matters: bool is an int subclass and UInt64 an int subclass, and
    # datetime must be checked before anything that would accept a date.
    if isinstance(value, bool):
        out.bool_value = value
    elif isinstance(value, UInt64):
        _fill_uint(out, int(value), path)
    elif isinstance(value, int):
        _fill_int(out, value, path)
    elif isinstance(value, float):
        out.double_value = value
    elif isinstance(value, str):
        out.string_value = value
    elif isinstance(value, bytes | bytearray | memoryview):
        out.bytes_value = bytes(value)
    elif isinstance(value, datetime.datetime):
        _fill_timestamp(out, value, path)
    elif isinstance(value, datetime.timedelta):
        _fill_duration(out, value)
    elif isinstance(value, list | tuple):
        _check_depth(path, depth)
        out.list_value.SetInParent()
        for index, item in enumerate(value):
            _fill(out.list_value.values.add(), item, f"{path}[{index}]", depth + 1)
    elif isinstance(value, Mapping):
        _check_depth(path, depth)
        out.map_value.SetInParent()
        for key, item in value.items():
            entry = out.map_value.entries[_key(key, path)]
            _fill(entry, item, f"{path}.{key}", depth + 1)
    else:
        raise TypeError(f"{path}: {_type_message(value)}")


def _check_depth(path: str, depth: int) -> None:
    if depth >= MAX_DEPTH:
        raise ValueError(f"{path}: {_depth_message()}")


def _fill_int(out: decision_pb2.Value, value: int, path: str) -> None:
    if MIN_INT64 <= value <= MAX_INT64:
        out.int_value = value
    elif MAX_INT64 < value <= MAX_UINT64:
        # Too large for int64 but exact as uint64: keep it exact rather than
        # fail a caller who never thought about signedness.
        out.uint_value = value
    else:
        raise ValueError(f"{path}: {_int_message(value)}")


def _fill_uint(out: decision_pb2.Value, value: int, path: str) -> None:
    if not 0 <= value <= MAX_UINT64:
        raise ValueError(f"{path}: expected a UInt64 within [0, 2**64-1], got {value}")
    out.uint_value = value


def _fill_timestamp(
    out: decision_pb2.Value, value: datetime.datetime, path: str
) -> None:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{path}: {_naive_message(value)}")
    micros = (value - _EPOCH) // _MICROSECOND
    seconds, rest = divmod(micros, _MICROS_PER_SECOND)
    out.timestamp_value.seconds = seconds
    out.timestamp_value.nanos = rest * _NANOS_PER_MICRO


def _fill_duration(out: decision_pb2.Value, value: datetime.timedelta) -> None:
    out.duration_value.seconds, out.duration_value.nanos = _duration_parts(value)


def to_packable_map(values: Mapping[str, Any] | None, path: str) -> dict[str, Any]:
    """Convert a dict of str to values into what the fast path writes.

    The result holds only what msgspec's MessagePack encoder writes as the
    fast path's ``Value`` forms: int (int64), ``Ext`` type 1 (uint64) and
    type 2 (duration), float, str, bool, bytes, aware ``datetime`` (the
    timestamp extension), lists and dicts of those.

    Args:
        values: the mapping to convert; ``None`` is an empty mapping.
        path: where the mapping sits, e.g. ``resource.attributes``.

    Raises:
        TypeError, ValueError: as ``to_value``, with the same messages, so a
            bad value reads alike on both transports.
    """
    if values is None:
        return {}
    if not isinstance(values, Mapping):
        raise TypeError(
            f"{path}: expected a dict of str to values, got {type(values).__name__}"
        )
    out = {}
    for key, item in values.items():
        try:
            out[_key(key, path)] = _pack(item, 0)
        except _Refused as err:
            raise err.at(f"{path}.{key}") from None
    return out


def to_packable(value: Any, path: str = "value") -> Any:
    """Convert one value as ``to_packable_map`` converts each of its values."""
    try:
        return _pack(value, 0)
    except _Refused as err:
        raise err.at(path) from None


class _Refused(Exception):
    # A value _pack cannot send. The key path is built only on this way out,
    # innermost key first, so a good value pays nothing for error messages.
    def __init__(self, error: type[Exception], message: str, where: str = "") -> None:
        super().__init__(message)
        self.error = error
        self.message = message
        self.parts = [where] if where else []

    def inside(self, part: str) -> _Refused:
        self.parts.append(part)
        return self

    def at(self, path: str) -> Exception:
        return self.error(f"{path}{''.join(reversed(self.parts))}: {self.message}")


def _pack(value: Any, depth: int) -> Any:
    kind = type(value)
    # The common kinds first, by exact type; subclasses go the long way.
    if kind is str or kind is float or kind is bool:
        return value
    if kind is int:
        if MIN_INT64 <= value <= MAX_INT64:
            return value
        return _pack_int(value)
    if kind is dict or kind is list or kind is tuple:
        return _pack_container(value, depth)
    # Order matters as in _fill: bool and UInt64 are int subclasses.
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, UInt64):
        if not 0 <= value <= MAX_UINT64:
            raise _Refused(
                ValueError, f"expected a UInt64 within [0, 2**64-1], got {value}"
            )
        return Ext(UINT64_EXT, _U64.pack(value))
    if isinstance(value, int):
        return _pack(int(value), depth)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise _Refused(ValueError, _naive_message(value))
        return value
    if isinstance(value, datetime.timedelta):
        return Ext(DURATION_EXT, _DURATION.pack(*_duration_parts(value)))
    if isinstance(value, list | tuple | Mapping):
        return _pack_container(value, depth)
    raise _Refused(TypeError, _type_message(value))


def _pack_int(value: int) -> Any:
    if MAX_INT64 < value <= MAX_UINT64:
        return Ext(UINT64_EXT, _U64.pack(value))
    raise _Refused(ValueError, _int_message(value))


def _pack_container(value: Any, depth: int) -> Any:
    if depth >= MAX_DEPTH:
        raise _Refused(ValueError, _depth_message())
    depth += 1
    if isinstance(value, list | tuple):
        out_list = []
        for index, item in enumerate(value):
            try:
                out_list.append(_pack(item, depth))
            except _Refused as err:
                raise err.inside(f"[{index}]") from None
        return out_list
    out = {}
    for key, item in value.items():
        if not isinstance(key, str):
            raise _Refused(TypeError, _key_message(key))
        try:
            out[key] = _pack(item, depth)
        except _Refused as err:
            raise err.inside(f".{key}") from None
    return out
