"""Names: how principal ids, roles, actions and resource kinds are compared.

One rule, applied by ``canonical_name`` at load (directory ids, role names,
rule actions and kinds) and at request time (``asserted_chain[i]``,
``action``, ``resource.kind``) alike: two names are the same name exactly
when their Unicode NFC forms are equal, code point for code point. No case
folding, no trimming: ``Alice`` and ``alice`` are two principals. Before
comparing, a name is refused when it holds

- a compatibility variant that NFKC would fold into another character
  (fullwidth ``ａ``, small roman numeral ``ⅰ``, ligatures, superscripts): a
  name must read the same under NFKC, as UTS #39 asks of identifiers;
- a control, format, surrogate, private-use or unassigned code point
  (categories Cc, Cf, Cs, Co, Cn), which covers the zero-width space and
  joiners, the byte order mark and the bidirectional overrides;
- another default-ignorable code point that renders as nothing (the
  combining grapheme joiner, variation selectors, Hangul fillers);
- a space or separator (categories Zs, Zl, Zp): ids are identifiers, and a
  trailing space is the oldest way to make a second ``alice``;
- letters from more than one script, such as Latin with Cyrillic or Greek
  (``pаypal`` with a Cyrillic ``а``), except the mixtures that UTS #39's
  "highly restrictive" level allows: Latin with Han and Hiragana/Katakana,
  with Han and Bopomofo, or with Han and Hangul.

NOTE: Python's ``unicodedata`` has no Script property, so a letter's script
is the first word of its Unicode name (``CYRILLIC SMALL LETTER A``), with
``CJK`` read as Han and ``FULLWIDTH``/``HALFWIDTH`` read through to the
script after it. That is exact for the confusable scripts that matter here
(Latin, Greek, Cyrillic, Armenian, Cherokee) and stricter than UTS #39
elsewhere (mathematical letters form their own "script"). A name written
wholly in one script that looks like another (all-Cyrillic ``аdmin``) is
not detected; that needs the UTS #39 confusables table.

Which names may use which characters:

- actions and resource kinds are dotted ASCII names: dot-separated segments
  of ``[A-Za-z0-9_-]+``, such as ``payments.refund.issue`` (so NFC leaves
  them unchanged and the rule above holds trivially);
- roles, policy names and rule ids, written by policy authors, are dotted
  ASCII names too;
- principal ids come from identity providers and may be any Unicode text
  the rule above accepts (``zoë``, ``山田``, ``alice@example.com``); the
  directory stores, and looks up, their NFC form.

A pattern is a name (that name only), ``name.*`` (every descendant of
``name`` at any depth, never ``name`` itself), or ``*`` (every name).
Nothing else is a pattern: no ``a*``, no ``*.b``, no ``a.*.c``, which keeps
matching a dictionary lookup over ``candidate_patterns``: rules on
``tool.process`` and ``tool.process.cancel`` match neither
``tool.process.approve`` nor ``tool.processx``.
"""

from __future__ import annotations

import re
import unicodedata

__all__ = [
    "NAME_PATTERN",
    "MAX_NAME_LENGTH",
    "WILDCARD",
    "canonical_name",
    "check_dotted_name",
    "candidate_patterns",
    "is_valid_name",
    "is_valid_pattern",
    "pattern_matches",
]

NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")
WILDCARD = "*"
# Names are dotted identifiers; 256 characters is far past any real one.
MAX_NAME_LENGTH = 256
_CHILDREN = ".*"


# Code points outside categories Cc/Cf/Cs/Co/Cn that still render as
# nothing (Unicode's Default_Ignorable_Code_Point, minus the Cf ones).
_INVISIBLE = frozenset(
    (0x034F, 0x115F, 0x1160, 0x17B4, 0x17B5, 0x2800, 0x3164, 0xFFA0)
    + tuple(range(0x180B, 0x1810))
    + tuple(range(0xFE00, 0xFE10))
    + tuple(range(0xE0100, 0xE01F0))
)
_REFUSED_CATEGORIES = {
    "Cc": "a control character",
    "Cf": "a zero-width or format character",
    "Cs": "a surrogate",
    "Co": "a private-use character",
    "Cn": "an unassigned code point",
    "Zs": "a space",
    "Zl": "a line separator",
    "Zp": "a paragraph separator",
}
# UTS #39 "highly restrictive": the script mixtures real names use.
_MIXTURES = (
    frozenset({"LATIN", "HAN", "HIRAGANA", "KATAKANA"}),
    frozenset({"LATIN", "HAN", "BOPOMOFO"}),
    frozenset({"LATIN", "HAN", "HANGUL"}),
)
_WIDTH_PREFIXES = ("FULLWIDTH", "HALFWIDTH")


def canonical_name(value: str) -> str:
    """The NFC form of a name, after refusing characters that deceive.

    The one comparison rule for names, used at load and at request time;
    the module docstring gives the rule and why.

    Args:
        value: A principal id, role, action or resource kind.

    Returns:
        ``value`` in Unicode NFC; equal names have equal results.

    Raises:
        ValueError: ``value`` is empty or not a string, or holds a control,
            zero-width, format or invisible character, a space or
            separator, or letters from more than one script; the message
            says which code point at which position.
    """
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a non-empty name, got {value!r}")
    name = unicodedata.normalize("NFC", value)
    scripts: dict[str, int] = {}
    for position, char in enumerate(name):
        refused = _refused(char)
        if refused:
            raise ValueError(
                f"expected a name without spaces, control or invisible characters, got "
                f"{refused} (U+{ord(char):04X}) at position {position}"
            )
        if unicodedata.normalize("NFKC", char) != char:
            raise ValueError(
                "expected a name that NFKC leaves unchanged, got a compatibility "
                f"character (U+{ord(char):04X}) at position {position}"
            )
        if unicodedata.category(char).startswith("L"):
            scripts.setdefault(_script(char), position)
    if len(scripts) > 1 and not any(set(scripts) <= mix for mix in _MIXTURES):
        found = " and ".join(
            f"{script.title()} (U+{ord(name[at]):04X} at position {at})"
            for script, at in scripts.items()
        )
        raise ValueError(f"expected letters of one script, got {found}")
    return name


def _refused(char: str) -> str:
    if ord(char) in _INVISIBLE:
        return "an invisible character"
    return _REFUSED_CATEGORIES.get(unicodedata.category(char), "")


def _script(char: str) -> str:
    words = unicodedata.name(char, "UNKNOWN").split()
    if words[0] in _WIDTH_PREFIXES and len(words) > 1:
        words = words[1:]
    return "HAN" if words[0] == "CJK" else words[0]


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


def check_dotted_name(value: str) -> None:
    """Refuse what is not a dotted name, as an action or resource kind must be.

    Raises:
        ValueError: saying what was expected and what was got.
    """
    if not value:
        raise ValueError("expected a dotted name, got an empty string")
    if len(value) > MAX_NAME_LENGTH or not is_valid_name(value):
        raise ValueError(
            "expected a dotted name of letters, digits, '_' and '-' "
            f"(at most {MAX_NAME_LENGTH} characters), got {value[:80]!r}"
        )
