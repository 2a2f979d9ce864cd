"""Reading YAML and JSON that refuse a key given twice in one mapping.

YAML and JSON both keep the last of two equal keys in a mapping without a
word, so a forgotten line below an edit undoes it: a policy rule with two
``effect:`` keys, or a config section given twice, would be read as
something its author did not write. Every YAML file the product reads (the
config, policy and directory files, bundles, policy tests and explain
requests) goes through a loader with ``UniqueKeys`` mixed in, and JSON policy
files through ``check_json_keys``; both raise ``DuplicateKeyError`` naming
the key and the lines of both occurrences. TOML needs neither: its decoder
refuses a key given twice already.

``UniqueKeys`` checks a mapping's own keys once the base constructor has
built it. Keys brought in by a YAML merge (``<<: *base``) are not its own:
the mapping's keys may override them, as YAML intends.

JSON is decoded by msgspec (about four times faster than the standard
library's decoder with a hook per object, on a set of 100,000 rules) and
checked afterwards: outside strings, a JSON text has exactly one colon per
key. Encoded again, the decoded value has one colon per key it kept and the
same colons in its strings, so when both texts hold as many colons, no key
was dropped. Only when the counts differ, or an escaped colon (``\\u003a``)
makes counting unsure, is the text scanned token by token to find the key
and its line; a policy set of 100,000 rules in JSON takes about 0.1 s more
to load for the check.
"""

from __future__ import annotations

import json
import re
from typing import Any

import msgspec
import yaml

__all__ = [
    "DuplicateKeyError",
    "UniqueKeyLoader",
    "UniqueKeys",
    "check_json_keys",
    "load_yaml",
]

_MERGE_TAG = "tag:yaml.org,2002:merge"
# The two ways a JSON string can spell ":" other than itself.
_ESCAPED_COLONS = (b"\\u003a", b"\\u003A")
# Valid JSON read as strings and structure; numbers, literals, commas and
# blanks between them are skipped.
_JSON_TOKEN = re.compile(rb'"(?:[^"\\]+|\\.)*"|[{}\[\]:]')
_JSON_ENCODER = msgspec.json.Encoder()


class DuplicateKeyError(yaml.YAMLError):
    """A mapping names one key twice.

    A ``yaml.YAMLError``, so a reader that already reports bad YAML reports
    this too. ``key`` is the key as decoded, ``line`` the line (from 1) of
    its second occurrence and ``first_line`` that of its first.
    """

    def __init__(self, key: Any, line: int, first_line: int):
        self.key = key
        self.line = line
        self.first_line = first_line
        super().__init__(
            f"line {line}: key {key!r} given again (first on line {first_line}); "
            "expected each key once in a mapping"
        )


class UniqueKeys:
    """A YAML loader mixin that refuses a key given twice in one mapping.

    Mix it in before the loader: ``class Loader(UniqueKeys, yaml.SafeLoader)``.
    """

    def __init__(self, stream: Any):
        super().__init__(stream)  # type: ignore[call-arg]
        # id(mapping node) -> its own pairs, for each mapping with a merge.
        self._own_pairs: dict[int, list[tuple[yaml.Node, yaml.Node]]] = {}

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        # The base drops merge keys from the node's list of pairs in place
        # and puts what they bring in a new list before it; that list may
        # be made before the mapping is built (when another mapping merges
        # this one), so its own pairs are kept here, the first time only.
        pairs = node.value
        super().flatten_mapping(node)  # type: ignore[misc]
        if node.value is not pairs:
            self._own_pairs.setdefault(id(node), pairs)

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict:
        mapping = super().construct_mapping(node, deep)  # type: ignore[misc]
        own = self._own_pairs.get(id(node))
        # With nothing merged, as many entries as pairs means no key came
        # twice: the common case costs a comparison, the rest a check of
        # each own key.
        if own is not None or len(mapping) != len(node.value):
            _check_mapping(self, node.value if own is None else own)
        return mapping


# The C parser when PyYAML has it (as msgspec.yaml uses): policy files of
# many thousand rules parse several times faster than in pure Python.
_SafeLoader: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class UniqueKeyLoader(UniqueKeys, _SafeLoader):
    """``yaml.safe_load``'s loader (on the C parser when there is one) that
    refuses a key given twice in one mapping."""


def load_yaml(content: bytes | str) -> Any:
    """Decode YAML as ``yaml.safe_load`` does, but refusing duplicate keys.

    Raises:
        DuplicateKeyError: a mapping names one key twice.
        yaml.YAMLError: the text is not valid YAML.
    """
    return yaml.load(content, Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader)


def check_json_keys(content: bytes, decoded: Any) -> None:
    """Refuse a JSON text in which some object names one key twice.

    Args:
        content: The JSON text, already decoded without error.
        decoded: What it decoded to (the last of equal keys kept).

    Raises:
        DuplicateKeyError: naming the key and the lines of both occurrences.
    """
    counted = content.count(b":")
    if counted == _JSON_ENCODER.encode(decoded).count(b":") and not any(
        escaped in content for escaped in _ESCAPED_COLONS
    ):
        return
    _find_json_duplicate(content)


def _check_mapping(loader: Any, pairs: list[tuple[yaml.Node, yaml.Node]]) -> None:
    first: dict[Any, int] = {}
    for key_node, _ in pairs:
        if key_node.tag == _MERGE_TAG:
            continue
        # Already built: the constructor hands back the object it keeps.
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        try:
            seen = first.get(key)
        except TypeError:
            continue  # an unhashable key: the base constructor refuses it
        if seen is not None:
            raise DuplicateKeyError(key, line, seen)
        first[key] = line


def _find_json_duplicate(content: bytes) -> None:
    # One object's keys (key -> line) per open object; None for an array.
    open_values: list[dict[str, int] | None] = []
    line, counted_to = 1, 0
    last_string: re.Match[bytes] | None = None
    for token in _JSON_TOKEN.finditer(content):
        text = token.group()
        if text == b"{":
            open_values.append({})
        elif text == b"[":
            open_values.append(None)
        elif text in (b"}", b"]"):
            open_values.pop()
        elif text == b":" and last_string is not None and open_values:
            keys = open_values[-1]
            if keys is None:
                continue  # not reached in valid JSON
            line += content.count(b"\n", counted_to, last_string.start())
            counted_to = last_string.start()
            key = json.loads(last_string.group())
            if key in keys:
                raise DuplicateKeyError(key, line, keys[key])
            keys[key] = line
        else:
            last_string = token
