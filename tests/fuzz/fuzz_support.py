"""Shared pieces of the property tests that feed Kynara bad input at volume.

Every property here has the same shape: whatever goes in, the code under
test ends in an answer or in a named error (a ``KynaraError`` subclass),
never in any other exception. The strategies below make the bad input:
byte mutations of good input, and structurally generated documents.

The number of examples scales with ``KYNARA_FUZZ_SCALE`` (default 1), so a
developer can run a longer campaign locally without editing the tests:
``KYNARA_FUZZ_SCALE=20 python -m pytest tests/fuzz``. A failing example is
printed with a ``@reproduce_failure`` blob.
"""

from __future__ import annotations

import math
import os
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

__all__ = [
    "TEXT",
    "fuzz_settings",
    "json_like",
    "mutated",
    "to_toml",
]

# Most tests run a few hundred cheap examples; the scale multiplies that.
SCALE_ENV = "KYNARA_FUZZ_SCALE"

# Any code point a UTF-8 encoder accepts: surrogates cannot travel in
# protobuf strings or UTF-8 files, so they are not bad input anyone can send.
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)


def fuzz_settings(max_examples: int, **overrides) -> settings:
    """Settings for a fuzz property: no deadline, examples times the scale.

    Args:
        max_examples: examples at scale 1.
        **overrides: any other ``hypothesis.settings`` keyword.

    Returns:
        The settings, to use as a decorator.
    """
    scale = max(1, int(os.environ.get(SCALE_ENV, "1")))
    return settings(
        max_examples=max_examples * scale,
        # Wall-clock deadlines flake on a loaded CI machine; speed is for
        # benchmarks, not for these tests.
        deadline=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        **overrides,
    )


def _flip_bit(data: bytes, position: int, bit: int) -> bytes:
    if not data:
        return data
    index = position % len(data)
    return data[:index] + bytes([data[index] ^ (1 << bit)]) + data[index + 1 :]


def _truncate(data: bytes, position: int) -> bytes:
    return data[: position % (len(data) + 1)]


def _splice(data: bytes, position: int, other: bytes, start: int) -> bytes:
    index = position % (len(data) + 1)
    return data[:index] + other[start % (len(other) + 1) :]


def _insert(data: bytes, position: int, chunk: bytes) -> bytes:
    index = position % (len(data) + 1)
    return data[:index] + chunk + data[index:]


def _delete(data: bytes, position: int, length: int) -> bytes:
    index = position % (len(data) + 1)
    return data[:index] + data[index + length :]


def _duplicate(data: bytes, position: int, length: int) -> bytes:
    index = position % (len(data) + 1)
    return data[:index] + data[index : index + length] + data[index:]


@st.composite
def mutated(draw, seeds: st.SearchStrategy[bytes], max_steps: int = 4) -> bytes:
    """A good input changed by a few bit flips, truncations, splices, inserts.

    Args:
        seeds: the good inputs; splices take their tail from another one.
        max_steps: at most this many mutations are stacked.

    Returns:
        The mutated bytes (possibly still valid, which is fine).
    """
    data = draw(seeds)
    positions = st.integers(0, 1 << 16)
    for _ in range(draw(st.integers(1, max_steps))):
        step = draw(st.sampled_from(("flip", "cut", "splice", "insert", "del", "dup")))
        at = draw(positions)
        if step == "flip":
            data = _flip_bit(data, at, draw(st.integers(0, 7)))
        elif step == "cut":
            data = _truncate(data, at)
        elif step == "splice":
            data = _splice(data, at, draw(seeds), draw(positions))
        elif step == "insert":
            data = _insert(data, at, draw(st.binary(min_size=1, max_size=8)))
        elif step == "del":
            data = _delete(data, at, draw(st.integers(1, 16)))
        else:
            data = _duplicate(data, at, draw(st.integers(1, 32)))
    return data


def json_like(keys: st.SearchStrategy[str], max_leaves: int = 20):
    """Nested documents of the kinds YAML, JSON and TOML decode to.

    Args:
        keys: map keys; mix in the schema's own names so that generated
            documents get past the first field check now and then.
        max_leaves: bound on the size of one document.

    Returns:
        A strategy of None, bools, ints, floats, strings, lists and dicts.
    """
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(1 << 70), 1 << 70),
        st.floats(allow_nan=True, allow_infinity=True),
        TEXT,
    )
    return st.recursive(
        scalars,
        lambda children: st.one_of(
            st.lists(children, max_size=4),
            st.dictionaries(keys, children, max_size=5),
        ),
        max_leaves=max_leaves,
    )


def _toml_string(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return (
        '"'
        + "".join(
            f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else c
            for c in escaped
        )
        + '"'
    )


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        items = (f"{_toml_string(k)} = {_toml_value(v)}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    raise TypeError(f"TOML has no {type(value).__name__}")


def to_toml(document: dict[str, Any]) -> bytes:
    """Write a document as TOML, tables inline; a small stand-in for tomli-w.

    Raises:
        TypeError: a value TOML cannot hold (None, or a key that is not a str).
    """
    lines = []
    for key, value in document.items():
        if not isinstance(key, str):
            raise TypeError("TOML keys are strings")
        lines.append(f"{_toml_string(key)} = {_toml_value(value)}")
    return ("\n".join(lines) + "\n").encode()
