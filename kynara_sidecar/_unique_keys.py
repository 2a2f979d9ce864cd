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
the mapping's keys may override them, as YAML intends. A mapping used as a
merge source is checked too, when it is merged: the base copies its pairs
without building it, so a rule whose merged ``effect: deny`` is followed by
``effect: allow`` in the same source would otherwise be read as an allow.

Two merge sources (``<<: [*a, *b]``, or two ``<<:`` lines) that give one key
different values are refused as well (``DuplicateKeyError`` with
``merged=True``, naming the key and the lines of both). YAML says the first
source wins, but the base constructor keeps one or the other depending on
whether the key's text happens to be the same string object in memory, and
a policy whose meaning hangs on the order of its merges is one an edit can
silently turn around. Both sources may give a key the same value: the very
same node (one anchor reached twice), or scalars of the same tag and text.
For the same reason a source that merges a key and overrides it brings its
override, as it reads itself (the base may keep the merged value instead).

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
    its second occurrence and ``first_line`` that of its first. ``merged``
    says the two occurrences are in two merge sources of one mapping that
    give the key different values, not in one mapping.
    """

    def __init__(self, key: Any, line: int, first_line: int, *, merged: bool = False):
        self.key = key
        self.line = line
        self.first_line = first_line
        self.merged = merged
        if merged:
            message = (
                f"line {line}: key {key!r} merged again with another value "
                f"(first merged from line {first_line}); expected merge sources "
                "to agree on a key they both give"
            )
        else:
            message = (
                f"line {line}: key {key!r} given again (first on line {first_line}); "
                "expected each key once in a mapping"
            )
        super().__init__(message)


class UniqueKeys:
    """A YAML loader mixin that refuses a key given twice in one mapping.

    Mix it in before the loader: ``class Loader(UniqueKeys, yaml.SafeLoader)``.
    """

    def __init__(self, stream: Any):
        super().__init__(stream)  # type: ignore[call-arg]
        # id(mapping node) -> its own pairs, for each mapping with a merge.
        self._own_pairs: dict[int, list[tuple[yaml.Node, yaml.Node]]] = {}
        # id(mapping node) of each merge source whose own pairs were checked.
        self._checked_sources: set[int] = set()

    def construct_document(self, node: yaml.Node) -> Any:
        # Both tables are keyed by node id, which a later document of the
        # same stream may reuse once this one's nodes are gone.
        try:
            return super().construct_document(node)  # type: ignore[misc]
        finally:
            self._own_pairs.clear()
            self._checked_sources.clear()

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        # The base drops merge keys from the node's list of pairs in place
        # and puts what they bring in a new list before it; that list may
        # be made before the mapping is built (when another mapping merges
        # this one), so its own pairs are kept here, the first time only.
        pairs = node.value
        sources = _merge_sources(node)
        brought = self._merge(sources) if sources else []
        super().flatten_mapping(node)  # type: ignore[misc]
        if node.value is not pairs:
            self._own_pairs.setdefault(id(node), pairs)
            # What the base brings keeps one pair per key by the identity
            # of the key's text, so it may keep a source's merged value
            # and drop the source's own override of it: each source's
            # keys are put here as the source itself reads them.
            node.value = brought + pairs

    def _merge(
        self, sources: list[yaml.MappingNode]
    ) -> list[tuple[yaml.Node, yaml.Node]]:
        """The pairs ``sources`` bring, one per key, each source's own
        after what it merges itself.

        Raises:
            DuplicateKeyError: a source gives a key twice among its own
                pairs, or two sources give one key different values.
        """
        merged: dict[Any, tuple[yaml.Node, yaml.Node]] = {}
        unhashable: list[tuple[yaml.Node, yaml.Node]] = []
        for source in sources:
            # Flattened first (a no-op when it already was), so that its
            # pairs are all it brings, its own after what it merges.
            self.flatten_mapping(source)
            if id(source) not in self._checked_sources:
                self._checked_sources.add(id(source))
                _check_mapping(self, self._own_pairs.get(id(source), source.value))
            brought: dict[Any, tuple[yaml.Node, yaml.Node]] = {}
            for key_node, value_node in source.value:
                key = self.construct_object(key_node, deep=True)  # type: ignore[attr-defined]
                try:
                    brought[key] = (key_node, value_node)
                except TypeError:
                    # Kept for the base constructor to refuse.
                    unhashable.append((key_node, value_node))
            for key, (key_node, value_node) in brought.items():
                first_key, first_value = merged.setdefault(key, (key_node, value_node))
                if first_value is value_node or _same_scalar(first_value, value_node):
                    continue
                raise DuplicateKeyError(
                    key,
                    key_node.start_mark.line + 1,
                    first_key.start_mark.line + 1,
                    merged=True,
                )
        return [*merged.values(), *unhashable]

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


def _merge_sources(node: yaml.MappingNode) -> list[yaml.MappingNode]:
    """The mappings ``node`` merges, in order; a source that is not a
    mapping is left for the base constructor to refuse."""
    sources: list[yaml.MappingNode] = []
    for key_node, value_node in node.value:
        if key_node.tag != _MERGE_TAG:
            continue
        if isinstance(value_node, yaml.MappingNode):
            sources.append(value_node)
        elif isinstance(value_node, yaml.SequenceNode):
            sources.extend(
                item for item in value_node.value if isinstance(item, yaml.MappingNode)
            )
    return sources


def _same_scalar(first: yaml.Node, second: yaml.Node) -> bool:
    return (
        isinstance(first, yaml.ScalarNode)
        and isinstance(second, yaml.ScalarNode)
        and (first.tag, first.value) == (second.tag, second.value)
    )


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
