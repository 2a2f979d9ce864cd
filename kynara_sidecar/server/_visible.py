"""Characters a reader cannot see, made visible for people who review.

An approval is shown to a person who decides on what they read: a resource
id, an agent, a comment. Text written by an agent can hold characters that
change what the reader sees without showing themselves: a right-to-left
override (U+202E) that makes ``invoice-\\u202efdp.exe`` read as
``invoice-exe.pdf``, a zero-width space that makes ``alice\\u200b`` look like
``alice``, a NUL, an ESC that starts a terminal escape sequence. Escaping
for HTML or quoting for a shell does not touch them.

So every such character is replaced by its code point written out,
``\\u202E`` (``\\U000E0001`` past the BMP), by the review page (styled so
it stands out) and by the CLI's approval listings. Hidden are:

- what Python's ``str.isprintable`` calls unprintable: control (Cc), format
  (Cf: bidi embeddings, overrides and isolates, zero-width space and
  joiners, the byte order mark, tag characters), surrogate (Cs), private
  use (Co), unassigned (Cn), and every separator but the ASCII space (Zs,
  Zl, Zp: no-break and ideographic spaces, line and paragraph separators);
- the default-ignorable code points outside those categories that render as
  nothing (the list of ``policy/names.py``: the combining grapheme joiner,
  Hangul fillers, variation selectors, ...).

NOTE: a literal backslash stays as it is, so the text ``\\u202E`` typed by
an agent reads like an escaped override in a terminal; the review page
tells them apart by style. Doubling every backslash would make every
Windows path in an attribute harder to read for that corner.

Pure functions, no I/O.
"""

from __future__ import annotations

__all__ = ["escape_char", "is_hidden", "visible_parts", "visible_text"]

# As policy/names.py: default-ignorable code points that Python calls
# printable (combining grapheme joiner, Hangul fillers, Khmer inherent vowels,
# braille blank, Mongolian and other variation selectors).
_INVISIBLE = frozenset(
    (0x034F, 0x115F, 0x1160, 0x17B4, 0x17B5, 0x2800, 0x3164, 0xFFA0)
    + tuple(range(0x180B, 0x1810))
    + tuple(range(0xFE00, 0xFE10))
    + tuple(range(0xE0100, 0xE01F0))
)
# Kept as they are in text that may run over lines (comments, conditions).
_LINE_BREAKS = frozenset("\n\t")


def is_hidden(char: str) -> bool:
    """Whether ``char`` (one code point) would not show itself to a reader."""
    return not char.isprintable() or ord(char) in _INVISIBLE


def escape_char(char: str) -> str:
    """``\\u202E`` for U+202E; ``\\U000E0001`` past the BMP."""
    code = ord(char)
    return f"\\u{code:04X}" if code <= 0xFFFF else f"\\U{code:08X}"


def visible_parts(text: str, *, multiline: bool = False) -> list[tuple[str, bool]]:
    """``text`` cut into runs: ``(run, False)`` for ordinary text and
    ``(char, True)`` for each hidden character, in order.

    Args:
        text: what to show.
        multiline: keep line feeds and tabs as text (a CR LF becomes a line
            feed); otherwise they are hidden characters like the rest.
    """
    if multiline:
        text = text.replace("\r\n", "\n")
    parts: list[tuple[str, bool]] = []
    start = 0
    for index, char in enumerate(text):
        if is_hidden(char) and not (multiline and char in _LINE_BREAKS):
            if start < index:
                parts.append((text[start:index], False))
            parts.append((char, True))
            start = index + 1
    if start < len(text):
        parts.append((text[start:], False))
    return parts


def visible_text(text: str, *, multiline: bool = False) -> str:
    """``text`` with every hidden character written as its code point."""
    return "".join(
        escape_char(run) if hidden else run
        for run, hidden in visible_parts(text, multiline=multiline)
    )
