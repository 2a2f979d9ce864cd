"""MCP tool arguments as the pipeline's typed attributes, and their digest.

A tool call's ``arguments`` are JSON. Policies read them as the resource's
attributes, typed as the gRPC door types a ``Value`` (``server/wire.py``):

- a JSON integer is an ``int`` (int64) when it fits, else a ``UInt64`` up to
  2**64-1; a number that is neither cannot be decided on and is refused;
- a JSON number with a fraction is a ``float``; NaN and infinities (which
  some JSON parsers let through) are refused: no condition can compare them
  meaningfully;
- strings, booleans, arrays and objects map to ``str``, ``bool``, ``list``
  and ``dict``;
- ``null`` in an object means the entry is absent (a policy's ``has()``
  sees no key); ``null`` in an array has no such reading and is refused.

The bounds are the gRPC door's: lists and maps nested at most
``wire.MAX_VALUE_DEPTH`` deep, map keys non-empty and without NUL. Past
that, at most ``MAX_ARGUMENT_VALUES`` values in all, so one call cannot make
the decision walk an unbounded document. A refusal is ``InvalidRequest``
whose ``field`` is the argument's path, such as ``arguments.items[2]``.

The audit record keeps the arguments' digest (``arguments_digest``), not the
arguments: the SHA-256 of their canonical JSON as received.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from typing import Any

import msgspec

from kynara_sidecar.decision import UInt64, Value
from kynara_sidecar.errors import InvalidRequest
from kynara_sidecar.server.wire import MAX_VALUE_DEPTH

__all__ = [
    "MAX_ARGUMENT_VALUES",
    "arguments_digest",
    "to_attributes",
]

# Values (scalars, lists and maps, at any depth) in one call's arguments.
# Tool arguments are a handful of fields; ten thousand leaves room for a
# batch of records while bounding the work one call can cause.
MAX_ARGUMENT_VALUES = 10_000
MIN_INT64 = -(2**63)
MAX_INT64 = 2**63 - 1
MAX_UINT64 = 2**64 - 1

# Keys written as ``.key`` in a field path; others as ``['key']``.
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _key_path(path: str, key: str) -> str:
    return f"{path}.{key}" if _PLAIN_KEY.fullmatch(key) else f"{path}[{key!r}]"


class _Converter:
    """One conversion: counts values across the whole argument tree."""

    def __init__(self) -> None:
        self.count = 0

    def value(self, value: Any, path: str, depth: int) -> Value:
        self.count += 1
        if self.count > MAX_ARGUMENT_VALUES:
            raise InvalidRequest(
                f"expected at most {MAX_ARGUMENT_VALUES} values in a tool call's "
                "arguments, got more",
                field=path,
            )
        # bool before int: a JSON true is a Python int too.
        if isinstance(value, bool | str):
            return value
        if isinstance(value, int):
            return _integer(value, path)
        if isinstance(value, float):
            if not math.isfinite(value):
                raise InvalidRequest(
                    f"expected a finite number, got {value!r}", field=path
                )
            return value
        if value is None:
            raise InvalidRequest(
                "expected a value, got null inside a list (only an object's "
                "entry may be null, meaning absent)",
                field=path,
            )
        if isinstance(value, list | tuple | Mapping) and depth >= MAX_VALUE_DEPTH:
            raise InvalidRequest(
                f"expected lists and maps nested at most {MAX_VALUE_DEPTH} deep",
                field=path,
            )
        if isinstance(value, list | tuple):
            return [
                self.value(item, f"{path}[{i}]", depth + 1)
                for i, item in enumerate(value)
            ]
        if isinstance(value, Mapping):
            return self.map(value, path, depth + 1)
        raise InvalidRequest(
            f"expected a JSON value, got {type(value).__name__}", field=path
        )

    def map(
        self, entries: Mapping[Any, Any], path: str, depth: int
    ) -> dict[str, Value]:
        out: dict[str, Value] = {}
        for key, item in entries.items():
            # The gRPC door's rule: the CEL runtime cuts strings at NUL, so
            # "a" and "a\x00b" would collide in a policy's view of the map.
            if not isinstance(key, str) or not key or "\x00" in key:
                raise InvalidRequest(
                    f"expected a non-empty key without NUL, got {key!r}", field=path
                )
            if item is None:
                continue
            out[key] = self.value(item, _key_path(path, key), depth)
        return out


def _integer(value: int, path: str) -> int:
    if MIN_INT64 <= value <= MAX_INT64:
        return value
    if MAX_INT64 < value <= MAX_UINT64:
        return UInt64(value)
    raise InvalidRequest(
        f"expected an integer in {MIN_INT64}..{MAX_UINT64} (int64 or uint64), "
        f"got {value}",
        field=path,
    )


def to_attributes(arguments: Mapping[str, Any] | None) -> dict[str, Value]:
    """Type a tool call's arguments as the resource's attributes.

    Args:
        arguments: the ``arguments`` of a ``tools/call``, as decoded JSON;
            None when the call has none.

    Returns:
        A new dict; entries holding null are left out.

    Raises:
        InvalidRequest: a value cannot be typed or is past a bound; ``field``
            is its path (``arguments.<path>``), the message names what was
            found.
    """
    if arguments is None:
        return {}
    if not isinstance(arguments, Mapping):
        raise InvalidRequest(
            f"expected an object, got {type(arguments).__name__}", field="arguments"
        )
    return _Converter().map(arguments, "arguments", 0)


def arguments_digest(arguments: Mapping[str, Any] | None) -> str:
    """The lower-case hex SHA-256 of the arguments' canonical JSON.

    Canonical: keys sorted, no spaces, UTF-8; no arguments digest as
    ``{}``. Computed on the arguments as received (nulls included), so the
    same call digests alike whatever order its keys came in.
    """
    encoded = msgspec.json.encode(
        arguments if arguments is not None else {}, order="sorted"
    )
    return hashlib.sha256(encoded).hexdigest()
