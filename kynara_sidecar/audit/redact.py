"""Redaction: configured context and resource attributes kept out of records.

Policies decide on the real request; only the audit record is redacted. A
rule names an entry of the context or of the resource's attributes and says
what to do with it before the record is written:

    hash   the typed value is replaced by a keyed hash,
           ``{"redacted": "hmac-sha256:<key id>:<64 hex>"}``
    drop   the entry is removed

Either way the record's ``redactions`` lists the JSON path of every entry
that was redacted (``$.context.card_number``,
``$.resource.attributes.owner_email``), so a reader knows the record does not
hold the whole request. A rule whose entry is absent from a request redacts
nothing and is not listed.

The hash is HMAC-SHA256, keyed with the daemon's redaction key
(``audit.redaction_key``), over the canonical bytes of the value's typed JSON
form (``record.encode_value``, keys sorted, no insignificant space; the form
the record would otherwise have held). Equal values therefore hash equal
across records, so an auditor can still see that two decisions concerned the
same card, and whoever holds the key can check a guess:
``keyed_hash(key, encode_value(guess))``. Without the key a short value
(a postcode, a four-digit PIN) cannot be found by trying every candidate,
which a plain SHA-256 would allow.

Names may be dotted paths into maps: ``customer.email`` redacts the key
``email`` of the map-valued entry ``customer``. A name that is itself a key
of the top level is taken whole first, so a context key containing a dot is
still reachable. Rules are applied in the order of their names, so a rule on
a map runs before rules inside it (which then find nothing left to redact).

The form names its key by a key id (16 hex digits of an HMAC of a fixed
label under the key, so the id reveals nothing of the key): after
``audit.redaction_key`` changes, equal values hash differently, and the id
says which key each hash needs.

NOTE: only the context and the resource's attributes are redacted. A
condition error message in the record is the CEL runtime's own text, which
names types and operations ("cannot convert string to int"), not values.

Everything here is pure: the typed JSON forms in, redacted copies out; the
inputs are never changed.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from collections.abc import Mapping
from typing import Any

import msgspec

__all__ = [
    "HASH_PREFIX",
    "MIN_REDACTION_KEY_BYTES",
    "REDACTED_TAG",
    "REDACTION_SECTIONS",
    "RedactAction",
    "Redactor",
    "keyed_hash",
    "lookup",
    "redaction_key_id",
]

# 256 bits: the HMAC's own security level, and out of reach of guessing.
MIN_REDACTION_KEY_BYTES = 32
# The one-key form a hashed value takes in the record.
REDACTED_TAG = "redacted"
HASH_PREFIX = "hmac-sha256:"
_KEY_ID_LABEL = b"kynara redaction key id"
# Rule section -> the JSON path of the map it applies to in the record.
REDACTION_SECTIONS = {
    "context": "$.context",
    "resource_attributes": "$.resource.attributes",
}


class RedactAction(enum.StrEnum):
    """What a rule does to its entry before the record is written."""

    HASH = "hash"
    DROP = "drop"


def keyed_hash(key: bytes, encoded: Any) -> str:
    """The redacted form's hash of one typed value.

    Args:
        key: the redaction key.
        encoded: the value's typed JSON form, as ``encode_value`` returns it.

    Returns:
        ``"hmac-sha256:<key id>:<64 lowercase hex>"``.
    """
    data = msgspec.json.encode(encoded, order="sorted")
    digest = hmac.new(key, data, hashlib.sha256).hexdigest()
    return f"{HASH_PREFIX}{redaction_key_id(key)}:{digest}"


def redaction_key_id(key: bytes) -> str:
    """The id a redacted form names its key by: 16 hex digits."""
    return hmac.new(key, _KEY_ID_LABEL, hashlib.sha256).hexdigest()[:16]


def _resolve(values: Mapping[str, Any], name: str) -> list[str] | None:
    # The keys leading to the entry, or None when it is absent.
    if name in values:
        return [name]
    *parents, leaf = name.split(".")
    node: Any = values
    for part in parents:
        child = node.get(part)
        if not (isinstance(child, dict) and isinstance(child.get("map"), dict)):
            return None
        node = child["map"]
    return [*parents, leaf] if leaf in node else None


def lookup(values: Mapping[str, Any], name: str) -> Any | None:
    """The typed JSON form a rule's name reaches, or ``None`` when absent.

    Args:
        values: a record's context or resource attributes (typed JSON forms).
        name: a rule's name, top-level or dotted.
    """
    keys = _resolve(values, name)
    if keys is None:
        return None
    node: Any = values
    for part in keys[:-1]:
        node = node[part]["map"]
    return node[keys[-1]]


def _replaced(values: Mapping[str, Any], keys: list[str], new: Any) -> dict[str, Any]:
    # A copy of values with the entry at keys set to new (removed when None);
    # only the maps along the path are copied.
    out = dict(values)
    head, *rest = keys
    if rest:
        out[head] = {"map": _replaced(values[head]["map"], rest, new)}
    elif new is None:
        del out[head]
    else:
        out[head] = new
    return out


class Redactor:
    """Applies the configured redaction rules to what a record will hold.

    Args:
        rules: section ("context", "resource_attributes") -> entry name ->
            "hash" or "drop".
        key: the redaction key; needed (at least ``MIN_REDACTION_KEY_BYTES``)
            when any rule hashes.

    Raises:
        ValueError: an unknown section or action, an empty name or name
            part, or a missing or short key; the message names the rule.
    """

    def __init__(
        self, rules: Mapping[str, Mapping[str, str]], key: bytes | None = None
    ):
        self._rules: dict[str, list[tuple[str, RedactAction]]] = {}
        for section, entries in rules.items():
            if section not in REDACTION_SECTIONS:
                raise ValueError(
                    f"redaction section {section!r}: expected one of "
                    f"{', '.join(REDACTION_SECTIONS)}"
                )
            self._rules[section] = [
                (name, _check_rule(section, name, action))
                for name, action in sorted(entries.items())
            ]
        hashes = [
            f"{section}.{name}"
            for section, entries in self._rules.items()
            for name, action in entries
            if action is RedactAction.HASH
        ]
        if hashes and (key is None or len(key) < MIN_REDACTION_KEY_BYTES):
            got = "none" if key is None else f"{len(key)} bytes"
            raise ValueError(
                f"redaction rule {hashes[0]} hashes: expected a key of at least "
                f"{MIN_REDACTION_KEY_BYTES} bytes, got {got}"
            )
        self._key = key or b""

    @classmethod
    def nop(cls) -> Redactor:
        """A redactor with no rules: records hold the whole request."""
        return cls({})

    def __bool__(self) -> bool:
        return any(self._rules.values())

    def apply(
        self, context: Mapping[str, Any], resource_attributes: Mapping[str, Any]
    ) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
        """Redact a record's context and resource attributes.

        Args:
            context: the record's context (typed JSON forms).
            resource_attributes: the resource's attributes (typed JSON forms).

        Returns:
            ``(context, resource_attributes, redactions)``: redacted copies,
            and the JSON paths redacted (context first, each section in the
            order of the rule names). The inputs are left unchanged.
        """
        sections = {"context": context, "resource_attributes": resource_attributes}
        redactions: list[str] = []
        for section, entries in self._rules.items():
            values = sections[section]
            for name, action in entries:
                keys = _resolve(values, name)
                if keys is None:
                    continue
                new = None
                if action is RedactAction.HASH:
                    new = {REDACTED_TAG: keyed_hash(self._key, lookup(values, name))}
                values = _replaced(values, keys, new)
                redactions.append(f"{REDACTION_SECTIONS[section]}.{name}")
            sections[section] = values
        context_out, attrs_out = sections["context"], sections["resource_attributes"]
        redactions.sort(key=lambda path: path.startswith("$.resource"))
        return dict(context_out), dict(attrs_out), redactions

    def covers(self, section: str, name: str) -> bool:
        """Whether some rule of ``section`` ("context" or
        "resource_attributes") would redact the entry ``name`` or part of
        it, or an entry holding it: a value read from there must not reach
        the record in the clear (a limit's key, say)."""
        for rule, _ in self._rules.get(section, ()):
            if (
                rule == name
                or rule.startswith(name + ".")
                or name.startswith(rule + ".")
            ):
                return True
        return False

    def seal_digest(self, digest: str) -> str:
        """A front door's digest of what it received (the MCP gateway's
        ``args_digest``) for a record from which arguments were redacted.

        A plain SHA-256 of the arguments would let anyone holding the record
        guess a redacted low-entropy value and confirm it against the
        digest; keyed with the redaction key it proves the same to whoever
        holds the key and nothing to anyone else. Without a key (drop rules
        only) the digest is left out.

        Returns:
            ``hmac-sha256:<key id>:<hex HMAC of the digest's text>``, or
            ``""`` when there is no key.
        """
        if not self._key:
            return ""
        sealed = hmac.new(self._key, digest.encode(), hashlib.sha256).hexdigest()
        return f"{HASH_PREFIX}{redaction_key_id(self._key)}:{sealed}"


def _check_rule(section: str, name: str, action: str) -> RedactAction:
    if not name or "" in name.split("."):
        raise ValueError(
            f"redaction rule {section}.{name!r}: expected an entry name or a "
            "dotted path such as customer.email"
        )
    try:
        return RedactAction(action)
    except ValueError:
        raise ValueError(
            f"redaction rule {section}.{name}: expected one of "
            f"{', '.join(a.value for a in RedactAction)}, got {action!r}"
        ) from None
