"""Compiling policy and directory documents: checks, roles and the index."""

from __future__ import annotations

import re
import types

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kynara_sidecar.decision import Timestamp
from kynara_sidecar.errors import PolicyError
from kynara_sidecar.policy.compiler import (
    compile_directory,
    compile_policy_set,
)
from kynara_sidecar.policy.loader import compile_documents, decode_document
from kynara_sidecar.policy.names import pattern_matches

DIRECTORY = "format_version: 1\nkind: directory\nprincipals: [{id: u, kind: user}]\n"


def policy(name: str, body: str) -> str:
    return f"format_version: 1\nkind: policy\nname: {name}\n{body}"


def rule(rule_id="a", actions="[x.read]", resources="[x]", roles="[r]", extra=""):
    return (
        f"  - {{id: {rule_id}, effect: allow, actions: {actions}, "
        f"resources: {resources}, roles: {roles}{extra}}}\n"
    )


def compile_texts(files: dict[str, str]):
    sources = [decode_document(name, text.encode()) for name, text in files.items()]
    return compile_documents(sources)


BASE = policy("base", "roles: {r: {}}\n")


@pytest.mark.parametrize(
    ("files", "message"),
    [
        (
            {"a.yaml": BASE, "b.yaml": policy("base", "")},
            "b.yaml:$.name: expected policy names unique across the set, got "
            "'base', also named in a.yaml",
        ),
        (
            {"a.yaml": BASE, "b.yaml": policy("p", "rules:\n" + rule() + rule())},
            "b.yaml:$.rules[1].id: expected rule ids unique within policy 'p', "
            "got 'a' again",
        ),
        (
            {"a.yaml": BASE, "b.yaml": policy("p", "rules:\n" + rule(actions="[a*]"))},
            "b.yaml:$.rules[0].actions[0]: rule 'a' actions: expected an action "
            "name, 'name.*' or '*', got 'a*'",
        ),
        (
            {
                "a.yaml": BASE,
                "b.yaml": policy("p", "rules:\n" + rule(resources="[x, '*.b']")),
            },
            "b.yaml:$.rules[0].resources[1]: rule 'a' resources: expected a resource "
            "kind name, 'name.*' or '*', got '*.b'",
        ),
        (
            {"a.yaml": BASE, "b.yaml": policy("p", "rules:\n" + rule(roles="[r, q]"))},
            "b.yaml:$.rules[0].roles[1]: rule 'a' roles: expected a role defined in a "
            "policy file, got 'q'",
        ),
        (
            {"a.yaml": policy("p", "roles: {r: {inherits: [ghost]}}\n")},
            "a.yaml:$.roles.r.inherits[0]: expected a role defined in a policy "
            "file, got 'ghost'",
        ),
        (
            {
                "a.yaml": policy(
                    "p",
                    "roles: {r: {inherits: [s]}, s: {inherits: [t]}, "
                    "t: {inherits: [s]}}\n",
                )
            },
            "a.yaml:$.roles.s.inherits: expected role inheritance without cycles, "
            "got s -> t -> s",
        ),
        (
            {"a.yaml": policy("p", "roles: {r: {inherits: [r]}}\n")},
            "a.yaml:$.roles.r.inherits: expected role inheritance without cycles, "
            "got r -> r",
        ),
        (
            {
                "a.yaml": policy("p", "roles: {r: {}, s: {}}\n"),
                "b.yaml": policy("q", "roles: {r: {inherits: [s]}}\n"),
            },
            "b.yaml:$.roles.r: expected role 'r' to match its definition in "
            "a.yaml, got a different definition",
        ),
        (
            {"a.yaml": policy("p", "roles: {'r r': {}}\n")},
            "a.yaml:$.roles.r r: expected a role name of dot-separated "
            "[A-Za-z0-9_-] segments, got 'r r'",
        ),
        (
            {"a.yaml": BASE, "b.yaml": policy("p", "rules:\n" + rule("a/b"))},
            "b.yaml:$.rules[0].id: expected a rule id of dot-separated "
            "[A-Za-z0-9_-] segments, got 'a/b'",
        ),
        (
            {"a.yaml": BASE, "b.yaml": policy("p q", "")},
            "b.yaml:$.name: expected a policy name of dot-separated "
            "[A-Za-z0-9_-] segments, got 'p q'",
        ),
        (
            {
                "a.yaml": BASE,
                "b.yaml": policy("p", "rules:\n" + rule(extra=", condition: '1 =='")),
            },
            "b.yaml:$.rules[0].condition: rule 'a' condition: expected a valid CEL "
            "expression, got Syntax error: ",
        ),
        (
            {
                "a.yaml": BASE,
                "b.yaml": policy(
                    "p", "rules:\n" + rule(extra=", condition: 'action == 1.0'")
                ),
            },
            "b.yaml:$.rules[0].condition: rule 'a' condition: expected a valid CEL "
            "expression, got found no matching overload for '_==_' applied to "
            "'(string, double)' at line 1 column 8",
        ),
    ],
)
def test_bad_policy_set_is_refused(files, message):
    files.setdefault("dir.yaml", DIRECTORY)

    with pytest.raises(PolicyError, match="^" + re.escape(message)):
        compile_texts(files)


@pytest.mark.parametrize(
    ("principals", "message"),
    [
        (
            "[{id: u, kind: user}, {id: u, kind: agent}]",
            "dir.yaml:$.principals[1].id: expected unique principal ids, got 'u' again",
        ),
        (
            "[{id: u, kind: user, roles: [r, boss]}]",
            "dir.yaml:$.principals[0].roles[1]: expected a role defined in a policy "
            "file, got 'boss'",
        ),
        (
            "[{id: u, kind: user, roles: ['*']}]",
            "dir.yaml:$.principals[0].roles[0]: expected a role defined in a policy "
            "file, got '*'",
        ),
        (
            "[{id: u, kind: user, attributes: {born: 2001-02-03}}]",
            "dir.yaml:$.principals[0].attributes.born: expected a string, number, "
            "bool, timestamp, list or map, got date",
        ),
        (
            '[{id: u, kind: user, attributes: {"a\\0b": 1}}]',
            "dir.yaml:$.principals[0].attributes: expected map keys without NUL "
            "characters, got 'a\\x00b'",
        ),
        (
            "[{id: u, kind: user, attributes: {a: {1: x}}}]",
            "dir.yaml:$.principals[0].attributes.a: expected string map keys, "
            "got int 1",
        ),
    ],
)
def test_bad_directory_is_refused(principals, message):
    files = {
        "a.yaml": BASE,
        "dir.yaml": f"format_version: 1\nkind: directory\nprincipals: {principals}",
    }

    with pytest.raises(PolicyError, match="^" + re.escape(message)):
        compile_texts(files)


def test_identical_role_definitions_in_two_files_are_fine():
    loaded = compile_texts(
        {
            "a.yaml": policy("p", "roles: {r: {inherits: [s]}, s: {}}\n"),
            "b.yaml": policy("q", "roles: {r: {inherits: [s]}}\n"),
            "dir.yaml": DIRECTORY,
        }
    )

    assert loaded.policy_set.roles["r"] == frozenset({"r", "s"})


def test_effective_roles_resolve_inheritance_transitively():
    loaded = compile_texts(
        {
            "a.yaml": policy(
                "p",
                "roles: {lead: {inherits: [senior, auditor]}, "
                "senior: {inherits: [clerk]}, clerk: {}, auditor: {}, other: {}}\n",
            ),
            "dir.yaml": DIRECTORY,
        }
    )

    effective = loaded.policy_set.effective_roles(["lead"])

    assert effective == frozenset({"lead", "senior", "clerk", "auditor"})
    assert loaded.policy_set.effective_roles(["clerk", "other"]) == frozenset(
        {"clerk", "other"}
    )
    assert loaded.policy_set.effective_roles(["gone"]) == frozenset({"gone"})


def test_directory_resolves_principals_and_keeps_typed_attributes():
    loaded = compile_texts(
        {
            "a.yaml": BASE,
            "dir.yaml": (
                "format_version: 1\nkind: directory\nprincipals:\n"
                "  - id: u\n    kind: agent\n    roles: [r]\n    active: false\n"
                "    attributes: {seen: 2026-01-01T00:00:00Z, tags: [a], m: {k: 1}}\n"
            ),
        }
    )

    principal = loaded.directory.lookup("u")

    assert (principal.kind, principal.roles, principal.active) == (
        "agent",
        ("r",),
        False,
    )
    assert principal.attributes["seen"] == Timestamp(1767225600)
    assert principal.attributes["tags"] == ("a",)
    assert loaded.directory.lookup("nobody") is None


def test_compiled_set_is_immutable():
    loaded = compile_texts(
        {
            "a.yaml": policy("p", "roles: {r: {}}\nrules:\n" + rule()),
            "d.yaml": DIRECTORY,
        }
    )
    policy_set = loaded.policy_set

    assert isinstance(policy_set.roles, types.MappingProxyType)
    assert isinstance(policy_set.index, types.MappingProxyType)
    assert isinstance(loaded.directory.principals, types.MappingProxyType)
    with pytest.raises(AttributeError):
        policy_set.revision = "sha256:0"  # type: ignore[misc]
    with pytest.raises(TypeError):
        policy_set.roles["x"] = frozenset()  # type: ignore[index]


def test_compile_policy_set_orders_rules_by_file_name_then_position():
    sources = [
        decode_document(name, text.encode())
        for name, text in [
            ("b.yaml", policy("q", "rules:\n" + rule("b1") + rule("b2"))),
            ("a.yaml", policy("p", "roles: {r: {}}\nrules:\n" + rule("a1"))),
        ]
    ]

    policy_set = compile_policy_set(sources)

    assert [r.id for r in policy_set.rules] == ["a1", "b1", "b2"]
    assert [r.id for r in policy_set.candidate_rules("x", "x.read")] == [
        "a1",
        "b1",
        "b2",
    ]


def test_compile_directory_refuses_a_policy_document():
    source = decode_document("a.yaml", BASE.encode())
    policy_set = compile_policy_set([source])

    with pytest.raises(PolicyError, match=r"^a\.yaml: expected a directory document$"):
        compile_directory(source, policy_set)


# --- the index agrees with a linear scan ------------------------------------------

SEGMENT = st.sampled_from(["a", "b", "c"])
NAMES = st.lists(SEGMENT, min_size=1, max_size=3).map(".".join)
PATTERNS = st.one_of(NAMES, NAMES.map(lambda name: name + ".*"), st.just("*"))
RULES = st.lists(
    st.tuples(
        st.lists(PATTERNS, min_size=1, max_size=3),
        st.lists(PATTERNS, min_size=1, max_size=3),
    ),
    max_size=12,
)


@given(rules=RULES, kind=NAMES, action=NAMES)
def test_indexed_lookup_equals_linear_scan(rules, kind, action):
    body = "roles: {r: {}}\nrules:\n" + "".join(
        rule(f"r{index}", f"{actions!r}", f"{resources!r}")
        for index, (actions, resources) in enumerate(rules)
    )
    body = body if rules else "roles: {r: {}}\nrules: []\n"
    policy_set = compile_policy_set(
        [decode_document("p.yaml", policy("p", body).encode())]
    )

    indexed = policy_set.candidate_rules(kind, action)
    scanned = tuple(
        r
        for r in policy_set.rules
        if any(pattern_matches(p, kind) for p in r.resources)
        and any(pattern_matches(p, action) for p in r.actions)
    )

    assert indexed == scanned
