"""Compile decoded documents into the immutable policy set and directory.

Compilation checks what the decoder cannot: unique policy names and rule
ids, well-formed action and resource patterns, roles that exist, role
inheritance without cycles, one definition per role, CEL conditions
(see ``conditions``), the declared limits (see ``limits``: names unique
across the set) and that every limit a condition reads as
``limits.<name>`` is declared in some file of the set (and sums, where it
reads ``limits.<name>.sum``). It resolves role
inheritance and indexes the rules by (resource kind pattern, action
pattern), so a lookup for a request touches only the rules that can
apply: for kind ``a.b`` and action ``x.y`` it reads the buckets of every
pair from ``candidate_patterns("a.b")`` and ``candidate_patterns("x.y")``.

What a lookup costs does not grow with the set: the buckets hold the rules
themselves, grouped by kind pattern, so a request reads at most a dozen
small maps and merges the few buckets it finds, already in set order. The
other per-set work is linear: each distinct condition source is compiled
once per compile run and shared by every rule that repeats it (conditions
are pure, and every condition is checked against the same variables), and
the action names for metric labels are collected once, here.

The results are frozen structs over tuples and ``MappingProxyType``: a
request holds one policy set and one directory for its whole evaluation,
and a reload builds new ones rather than changing these.
"""

from __future__ import annotations

import datetime
import hashlib
import heapq
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Literal

import msgspec

from kynara_sidecar.decision import Effect, Timestamp
from kynara_sidecar.errors import PolicyError
from kynara_sidecar.policy.conditions import (
    Condition,
    compile_condition,
    to_cel_value,
)
from kynara_sidecar.policy.limits import CompiledLimit, compile_limits
from kynara_sidecar.policy.model import (
    ApprovalDocument,
    DirectoryDocument,
    Mode,
    PolicyDocument,
    RoleDocument,
    RuleDocument,
    SourceDocument,
)
from kynara_sidecar.policy.names import (
    candidate_patterns,
    canonical_name,
    is_valid_name,
    is_valid_pattern,
)

__all__ = [
    "ANY_ROLE",
    "MAX_ACTION_LABELS",
    "CompiledRule",
    "Directory",
    "PolicySet",
    "Principal",
    "compile_directory",
    "compile_policy_set",
    "compute_revision",
]

# In a rule's roles: any principal in the directory.
ANY_ROLE = "*"
# Actions that may be a metric's ``action`` label value (``action_names``):
# each is a series per decision outcome that a scrape carries, so a set
# naming tens of thousands of actions (69,263 in the generated 100,000-rule
# set) would make every scrape that large. A thousand covers a hand-written
# set whole; the rest count under ``other``.
MAX_ACTION_LABELS = 1000

_IndexKey = tuple[str, str]
# Kind pattern -> action pattern -> the rules under that pair, in set order.
_Buckets = Mapping[str, Mapping[str, tuple["CompiledRule", ...]]]


class CompiledRule(msgspec.Struct, frozen=True):
    """A rule ready to evaluate; ``order`` is its place in the whole set."""

    policy: str
    id: str
    effect: Effect
    actions: tuple[str, ...]
    resources: tuple[str, ...]
    roles: frozenset[str]
    condition: Condition | None
    shadow: bool
    order: int
    description: str = ""
    # A require_approval rule's review settings; None for other effects,
    # and for a require_approval rule that names none (the defaults).
    approval: ApprovalDocument | None = None

    def applies_to(self, roles: frozenset[str]) -> bool:
        """Tell whether a principal with these effective roles is covered."""
        return ANY_ROLE in self.roles or not self.roles.isdisjoint(roles)


class PolicySet(msgspec.Struct, frozen=True):
    """Every rule of every policy file, with roles resolved and indexed.

    ``roles`` maps each role to its effective roles (itself and everything
    it inherits, transitively).
    """

    revision: str
    rules: tuple[CompiledRule, ...]
    roles: Mapping[str, frozenset[str]]
    index: Mapping[_IndexKey, tuple[int, ...]]
    # The actions that may be metric label values: the first
    # ``MAX_ACTION_LABELS`` distinct actions rules name exactly (not by
    # pattern), in set order; any other action is labelled ``other``.
    action_names: frozenset[str] = frozenset()
    # ``index`` again, holding the rules and grouped by kind pattern.
    buckets: _Buckets = MappingProxyType({})
    # Declared limit name -> limit, in name order (``policy.limits``).
    limits: Mapping[str, CompiledLimit] = MappingProxyType({})

    def effective_roles(self, roles: Iterable[str]) -> frozenset[str]:
        """Resolve inheritance: the given roles and every role they inherit.

        A role this set does not define counts as itself only, so a
        directory compiled against an older set keeps its plain roles.
        """
        resolved: set[str] = set()
        for role in roles:
            resolved |= self.roles.get(role, frozenset((role,)))
        return frozenset(resolved)

    def candidate_rules(self, kind: str, action: str) -> tuple[CompiledRule, ...]:
        """The rules whose resource and action patterns match, in set order.

        Args:
            kind: The request's resource kind.
            action: The request's action.

        Returns:
            Rules in file name order, then rule order; role and condition
            are left to the caller.
        """
        found: list[tuple[CompiledRule, ...]] = []
        action_patterns: tuple[str, ...] = ()
        for kind_pattern in candidate_patterns(kind):
            by_action = self.buckets.get(kind_pattern)
            if by_action is None:
                continue
            action_patterns = action_patterns or candidate_patterns(action)
            for action_pattern in action_patterns:
                bucket = by_action.get(action_pattern)
                if bucket is not None:
                    found.append(bucket)
        if len(found) == 1:
            return found[0]
        return _merged(found)


class Principal(msgspec.Struct, frozen=True):
    """A principal of the directory; ``roles`` as assigned, unresolved."""

    id: str
    kind: str
    roles: tuple[str, ...]
    attributes: Mapping[str, Any]
    active: bool = True
    # ``attributes`` as the CEL runtime takes them, converted once at load
    # rather than on every decision that names this principal.
    cel_attributes: Any = None


class Directory(msgspec.Struct, frozen=True):
    """The principals that may appear in a delegation chain."""

    revision: str
    principals: Mapping[str, Principal]
    # Roles principals hold that the policy set does not define, kept
    # (``compile_directory(..., unknown_roles="keep")``); each counts as
    # itself only. Empty when compiled with "refuse".
    unknown_roles: frozenset[str] = frozenset()

    def lookup(self, principal_id: str) -> Principal | None:
        """The principal with this id, or None when the directory lacks it.

        Ids compare after Unicode NFC (see ``names``), so a decomposed
        ``zoe\u0308`` finds ``zoë``; callers refuse unsafe ids before.
        """
        return self.principals.get(unicodedata.normalize("NFC", principal_id))


def compute_revision(documents: Iterable[SourceDocument]) -> str:
    """``sha256:<hex>`` over the sorted file names and contents.

    Each name and content is length-prefixed so that no two different file
    sets hash alike by moving bytes from one field to the next.
    """
    digest = hashlib.sha256()
    for document in sorted(documents, key=lambda item: item.name):
        for part in (document.name.encode(), document.content):
            digest.update(len(part).to_bytes(8, "big"))
            digest.update(part)
    return "sha256:" + digest.hexdigest()


def compile_policy_set(documents: Sequence[SourceDocument]) -> PolicySet:
    """Check and compile policy documents into one immutable set.

    Args:
        documents: Decoded policy files; their order does not matter, they
            are taken in name order.

    Returns:
        The compiled set.

    Raises:
        PolicyError: For the first problem found, naming file and location.
    """
    ordered = sorted(documents, key=lambda item: item.name)
    for source in ordered:
        if not isinstance(source.document, PolicyDocument):
            raise PolicyError("expected a policy document", path=source.path)
    definitions = _collect_roles(ordered)
    roles = _resolve_roles(definitions)
    limits = compile_limits(ordered)
    rules = _compile_rules(ordered, frozenset(roles), limits)
    index = _index(rules)
    return PolicySet(
        revision=compute_revision(ordered),
        rules=rules,
        roles=MappingProxyType(roles),
        index=MappingProxyType(index),
        action_names=_label_actions(rules),
        buckets=_buckets(index, rules),
        limits=MappingProxyType(dict(limits)),
    )


def _label_actions(rules: Sequence[CompiledRule]) -> frozenset[str]:
    """The first ``MAX_ACTION_LABELS`` distinct exact actions, in set order
    (file name order, then rule order, then each rule's action order)."""
    names: dict[str, None] = {}
    for rule in rules:
        for action in rule.actions:
            if is_valid_name(action):
                names[action] = None
                if len(names) == MAX_ACTION_LABELS:
                    return frozenset(names)
    return frozenset(names)


def compile_directory(
    source: SourceDocument,
    policy_set: PolicySet,
    *,
    unknown_roles: Literal["refuse", "keep"] = "refuse",
) -> Directory:
    """Check and compile the directory against the roles the policies define.

    Args:
        source: The decoded directory file.
        policy_set: The set whose roles the principals may hold.
        unknown_roles: What a role the set does not define does: "refuse"
            (a directory shipped with the policies, where it is a typo) or
            "keep" (a signed directory from the collector, whose group to
            role table is configured apart from the policies: the role
            counts as itself only, and the result's ``unknown_roles``
            names it so the caller can warn; refusing would also hold back
            a deactivation).

    Returns:
        The compiled directory.

    Raises:
        PolicyError: A principal id refused by ``canonical_name``, a
            duplicate id (after NFC), an undefined role (unless kept), or an
            attribute value that is not a typed value.
    """
    if unknown_roles not in ("refuse", "keep"):
        raise ValueError(
            f"unknown_roles: expected 'refuse' or 'keep', got {unknown_roles!r}"
        )
    unknown: set[str] = set()
    document = source.document
    if not isinstance(document, DirectoryDocument):
        raise PolicyError("expected a directory document", path=source.path)
    principals: dict[str, Principal] = {}
    for index, entry in enumerate(document.principals):
        where = f"$.principals[{index}]"
        try:
            principal_id = canonical_name(entry.id)
        except ValueError as err:
            raise PolicyError(
                f"principal id {entry.id!r}: {err}",
                path=source.path,
                location=f"{where}.id",
            ) from None
        if principal_id in principals:
            # Compared in NFC: a composed and a decomposed "zoë" are one id.
            raise PolicyError(
                f"expected unique principal ids, got {entry.id!r} again",
                path=source.path,
                location=f"{where}.id",
            )
        for position, role in enumerate(entry.roles):
            if unknown_roles == "keep" and role not in policy_set.roles:
                unknown.add(role)
                continue
            _require_role(
                role, policy_set.roles, source.path, f"{where}.roles[{position}]"
            )
        attributes = _typed(entry.attributes, source.path, f"{where}.attributes")
        principals[principal_id] = Principal(
            id=principal_id,
            kind=entry.kind.value,
            roles=entry.roles,
            attributes=attributes,
            active=entry.active,
            cel_attributes=to_cel_value(attributes),
        )
    return Directory(
        compute_revision([source]),
        MappingProxyType(principals),
        unknown_roles=frozenset(unknown),
    )


# --- roles ---------------------------------------------------------------------


class _RoleSource(msgspec.Struct, frozen=True):
    definition: RoleDocument
    path: str


def _collect_roles(sources: Sequence[SourceDocument]) -> dict[str, _RoleSource]:
    found: dict[str, _RoleSource] = {}
    for source in sources:
        for role, definition in source.document.roles.items():
            where = f"$.roles.{role}"
            _check_name(role, "a role name", source.path, where)
            earlier = found.get(role)
            if earlier and earlier.definition != definition:
                raise PolicyError(
                    f"expected role {role!r} to match its definition in "
                    f"{earlier.path}, got a different definition",
                    path=source.path,
                    location=where,
                )
            found.setdefault(role, _RoleSource(definition, source.path))
    for role, found_role in found.items():
        for position, parent in enumerate(found_role.definition.inherits):
            where = f"$.roles.{role}.inherits[{position}]"
            _require_role(parent, found, found_role.path, where)
    return found


def _resolve_roles(found: Mapping[str, _RoleSource]) -> dict[str, frozenset[str]]:
    resolved: dict[str, frozenset[str]] = {}
    for role in found:
        _resolve_role(role, found, resolved, ())
    return resolved


def _resolve_role(
    role: str,
    found: Mapping[str, _RoleSource],
    resolved: dict[str, frozenset[str]],
    path: tuple[str, ...],
) -> frozenset[str]:
    if role in path:
        cycle = " -> ".join((*path[path.index(role) :], role))
        raise PolicyError(
            f"expected role inheritance without cycles, got {cycle}",
            path=found[role].path,
            location=f"$.roles.{role}.inherits",
        )
    if role not in resolved:
        effective = {role}
        for parent in found[role].definition.inherits:
            effective |= _resolve_role(parent, found, resolved, (*path, role))
        resolved[role] = frozenset(effective)
    return resolved[role]


def _require_role(
    role: str, known: Mapping[str, Any], path: str, where: str, prefix: str = ""
) -> None:
    if role not in known:
        raise PolicyError(
            f"{prefix}expected a role defined in a policy file, got {role!r}",
            path=path,
            location=where,
        )


# --- rules ---------------------------------------------------------------------


def _compile_rules(
    sources: Sequence[SourceDocument],
    roles: frozenset[str],
    limits: Mapping[str, CompiledLimit],
) -> tuple[CompiledRule, ...]:
    rules: list[CompiledRule] = []
    first_seen: dict[str, str] = {}
    # Source text -> its compiled condition, for this run: a set repeats a
    # few checks across many rules, and each is compiled and checked once.
    conditions: dict[str, Condition] = {}
    for source in sources:
        document = source.document
        if document.name in first_seen:
            raise PolicyError(
                f"expected policy names unique across the set, got "
                f"{document.name!r}, also named in {first_seen[document.name]}",
                path=source.path,
                location="$.name",
            )
        first_seen[document.name] = source.path
        _check_name(document.name, "a policy name", source.path, "$.name")
        rule_ids: set[str] = set()
        for index, rule in enumerate(document.rules):
            where = f"$.rules[{index}]"
            if rule.id in rule_ids:
                raise PolicyError(
                    f"expected rule ids unique within policy {document.name!r}, "
                    f"got {rule.id!r} again",
                    path=source.path,
                    location=f"{where}.id",
                )
            _check_name(rule.id, "a rule id", source.path, f"{where}.id")
            rule_ids.add(rule.id)
            rules.append(
                _compile_rule(
                    rule,
                    document,
                    source.path,
                    where,
                    roles,
                    len(rules),
                    conditions,
                    limits,
                )
            )
    return tuple(rules)


def _compile_rule(
    rule: RuleDocument,
    document: PolicyDocument,
    path: str,
    where: str,
    roles: frozenset[str],
    order: int,
    conditions: dict[str, Condition],
    limits: Mapping[str, CompiledLimit],
) -> CompiledRule:
    # The rule id leads each message, as it does for conditions, so an
    # author finds the rule without counting list positions.
    cite = f"rule {rule.id!r}"
    _check_patterns(
        rule.actions, "an action", path, f"{where}.actions", f"{cite} actions: "
    )
    _check_patterns(
        rule.resources,
        "a resource kind",
        path,
        f"{where}.resources",
        f"{cite} resources: ",
    )
    for position, role in enumerate(rule.roles):
        if role != ANY_ROLE:
            _require_role(
                role, roles, path, f"{where}.roles[{position}]", f"{cite} roles: "
            )
    condition = None
    if rule.condition.strip():
        condition = conditions.get(rule.condition)
        if condition is None:
            # A source that fails raises here, citing the first rule with it.
            condition = compile_condition(
                rule.condition, path=path, location=f"{where}.condition", rule=rule.id
            )
            conditions[rule.condition] = condition
        for name in sorted(condition.limits):
            if name not in limits:
                raise PolicyError(
                    f"{cite} condition: expected a limit declared in a policy "
                    f"file of the set, got limits.{name}",
                    path=path,
                    location=f"{where}.condition",
                )
        for name, field in sorted(condition.limit_fields):
            if field == "sum" and not limits[name].sums:
                raise PolicyError(
                    f"{cite} condition: expected .sum only on a limit that "
                    f"declares sum, got limits.{name}.sum on limit {name!r}, "
                    f"which counts decisions (read limits.{name}.count)",
                    path=path,
                    location=f"{where}.condition",
                )
    if rule.approval is not None and rule.effect is not Effect.REQUIRE_APPROVAL:
        raise PolicyError(
            f"{cite} approval: expected only on a require_approval rule, "
            f"got effect {str(rule.effect)!r}",
            path=path,
            location=f"{where}.approval",
        )
    for position, role in enumerate(
        rule.approval.reviewer_roles if rule.approval else ()
    ):
        if not role or not role.isprintable() or len(role) > 128:
            raise PolicyError(
                f"{cite} approval.reviewer_roles: expected names of 1..128 "
                f"printable characters, got {role!r}",
                path=path,
                location=f"{where}.approval.reviewer_roles[{position}]",
            )
    return CompiledRule(
        policy=document.name,
        id=rule.id,
        effect=rule.effect,
        actions=rule.actions,
        resources=rule.resources,
        roles=frozenset(rule.roles),
        condition=condition,
        shadow=Mode.SHADOW in (document.mode, rule.mode),
        order=order,
        description=rule.description,
        approval=rule.approval,
    )


def _check_name(name: str, what: str, path: str, where: str) -> None:
    if not is_valid_name(name):
        raise PolicyError(
            f"expected {what} of dot-separated [A-Za-z0-9_-] segments, got {name!r}",
            path=path,
            location=where,
        )


def _check_patterns(
    patterns: Sequence[str], what: str, path: str, where: str, prefix: str
) -> None:
    for position, pattern in enumerate(patterns):
        if not is_valid_pattern(pattern):
            raise PolicyError(
                f"{prefix}expected {what} name, 'name.*' or '*', got {pattern!r}",
                path=path,
                location=f"{where}[{position}]",
            )


def _merged(buckets: Sequence[tuple[CompiledRule, ...]]) -> tuple[CompiledRule, ...]:
    # Each bucket is in set order; a rule with two patterns that both match
    # sits in two of them, next to itself once merged.
    merged: list[CompiledRule] = []
    last = -1
    for rule in heapq.merge(*buckets, key=_order):
        if rule.order != last:
            merged.append(rule)
            last = rule.order
    return tuple(merged)


def _order(rule: CompiledRule) -> int:
    return rule.order


def _buckets(
    index: Mapping[_IndexKey, tuple[int, ...]], rules: Sequence[CompiledRule]
) -> _Buckets:
    grouped: dict[str, dict[str, tuple[CompiledRule, ...]]] = {}
    for (kind, action), positions in index.items():
        grouped.setdefault(kind, {})[action] = tuple(rules[p] for p in positions)
    return MappingProxyType(
        {kind: MappingProxyType(by_action) for kind, by_action in grouped.items()}
    )


def _index(rules: Sequence[CompiledRule]) -> dict[_IndexKey, tuple[int, ...]]:
    buckets: dict[_IndexKey, list[int]] = {}
    for rule in rules:
        keys = {(kind, action) for kind in rule.resources for action in rule.actions}
        for key in sorted(keys):
            buckets.setdefault(key, []).append(rule.order)
    return {key: tuple(positions) for key, positions in buckets.items()}


# --- directory attributes ------------------------------------------------------


def _typed(value: Any, path: str, where: str) -> Any:
    """Freeze a decoded attribute value into the typed values rules see."""
    match value:
        case bool() | int() | float() | str() | bytes():
            return value
        case datetime.datetime():
            return Timestamp.from_datetime(value)
        case dict():
            return MappingProxyType(
                {
                    _attribute_key(key, path, where): _typed(
                        item, path, f"{where}.{key}"
                    )
                    for key, item in value.items()
                }
            )
        case list() | tuple():
            return tuple(
                _typed(item, path, f"{where}[{position}]")
                for position, item in enumerate(value)
            )
    raise PolicyError(
        "expected a string, number, bool, timestamp, list or map, got "
        f"{type(value).__name__}",
        path=path,
        location=where,
    )


def _attribute_key(key: Any, path: str, where: str) -> str:
    if not isinstance(key, str):
        raise PolicyError(
            f"expected string map keys, got {type(key).__name__} {key!r}",
            path=path,
            location=where,
        )
    # The CEL runtime cuts a key at its first NUL, so two keys could collide.
    if "\x00" in key:
        raise PolicyError(
            f"expected map keys without NUL characters, got {key!r}",
            path=path,
            location=where,
        )
    return key
