"""Dotted names of actions and resource kinds, and the patterns rules use.

A name is dot-separated segments of ``[A-Za-z0-9_-]+``, such as
``payments.refund.issue``. A pattern is a name (that name only), ``name.*``
(every descendant of ``name`` at any depth, never ``name`` itself), or ``*``
(every name). Nothing else is a pattern: no ``a*``, no ``*.b``, no ``a.*.c``,
which keeps matching a dictionary lookup over ``candidate_patterns``.
"""

from __future__ import annotations

import re

__all__ = [
    "NAME_PATTERN",
    "WILDCARD",
    "candidate_patterns",
    "is_valid_name",
    "is_valid_pattern",
    "pattern_matches",
]

NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")
WILDCARD = "*"
_CHILDREN = ".*"


def is_valid_name(value: str) -> bool:
    """Tell whether ``value`` is a dotted name such as ``crm.contact.read``."""
    return isinstance(value, str) and NAME_PATTERN.fullmatch(value) is not None


def is_valid_pattern(value: str) -> bool:
    """Tell whether ``value`` is a name, ``name.*`` or ``*``."""
    if value == WILDCARD or is_valid_name(value):
        return True
    return value.endswith(_CHILDREN) and is_valid_name(value[: -len(_CHILDREN)])


def pattern_matches(pattern: str, name: str) -> bool:
    """Tell whether a valid ``pattern`` matches a valid ``name``.

    Args:
        pattern: A name, ``prefix.*`` or ``*``.
        name: A dotted name.

    Returns:
        True for ``*``; for ``prefix.*`` when ``name`` is a descendant of
        ``prefix`` (``tool.process.*`` matches ``tool.process.cancel`` but
        neither ``tool.process`` nor ``tool.processx``); else equality.
    """
    if pattern == WILDCARD:
        return True
    if pattern.endswith(_CHILDREN):
        return name.startswith(pattern[:-1]) and len(name) > len(pattern) - 1
    return pattern == name


def candidate_patterns(name: str) -> tuple[str, ...]:
    """Every pattern that matches ``name``, most specific first.

    Args:
        name: A dotted name, such as ``a.b.c``.

    Returns:
        ``("a.b.c", "a.b.*", "a.*", "*")`` for ``a.b.c``: the keys under
        which an index by pattern holds the rules that can apply.
    """
    segments = name.split(".")
    parents = tuple(
        ".".join(segments[:end]) + _CHILDREN for end in range(len(segments) - 1, 0, -1)
    )
    return (name, *parents, WILDCARD)
