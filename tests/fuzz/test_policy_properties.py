"""Bad policy files at volume: a compiled set, or PolicyError naming a path.

Policy files come from operators and, later, from signed bundles; a reload
must never take the daemon down. Whatever bytes a file holds, in whichever
of the three formats, ``decode_document`` returns a document or raises
``PolicyError`` citing that file, and ``compile_documents`` /
``load_policies`` return ``LoadedPolicies`` or ``PolicyError`` citing a
file or the root. A condition that compiles then evaluates to an answer
for any request, and an erroring condition never allows.
"""

from __future__ import annotations

import pathlib
import tempfile
from typing import Any

import msgspec
import pytest
import yaml
from fuzz_support import TEXT, fuzz_settings, json_like, mutated, to_toml
from hypothesis import assume, given
from hypothesis import strategies as st
from support import SHIPPED_POLICIES

from kynara_sidecar import engine
from kynara_sidecar.decision import (
    DecisionRequest,
    Duration,
    Effect,
    Env,
    Resource,
    Timestamp,
    UInt64,
)
from kynara_sidecar.errors import PolicyError
from kynara_sidecar.policy.conditions import Condition, compile_condition
from kynara_sidecar.policy.loader import (
    LoadedPolicies,
    compile_documents,
    decode_document,
    load_policies,
)
from kynara_sidecar.policy.model import SourceDocument

# Large inputs are the point here; hypothesis warns when it prints them.
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")

SUFFIXES = (".yaml", ".yml", ".json", ".toml")
# Files only: the policy tests under tests/ are no policies.
SHIPPED = {
    path.name: path.read_bytes()
    for path in sorted(SHIPPED_POLICIES.iterdir())
    if path.is_file()
}
SHIPPED_RAW = {name: yaml.safe_load(content) for name, content in SHIPPED.items()}
# The schema's own words, so generated documents get past the first check.
SCHEMA_KEYS = (
    "format_version",
    "kind",
    "name",
    "mode",
    "description",
    "roles",
    "rules",
    "inherits",
    "id",
    "effect",
    "actions",
    "resources",
    "condition",
    "principals",
    "attributes",
    "active",
)
SCHEMA_WORDS = (
    "policy",
    "directory",
    "allow",
    "deny",
    "require_approval",
    "shadow",
    "enforce",
    "user",
    "agent",
    "*",
    "payments.*",
    "support",
    "employee",
)


# --- the properties, stated once -------------------------------------------------


def check_document(path: str, content: bytes) -> SourceDocument | None:
    """Decode one file: a document, or PolicyError citing this path."""
    try:
        return decode_document(path, content)
    except PolicyError as err:
        assert err.path == path, f"error cites {err.path!r}, not {path!r}: {err}"
        assert str(err).startswith(path), str(err)
        return None


def check_set(documents: list[SourceDocument], root: str = "policies") -> None:
    """Compile a set: LoadedPolicies, or PolicyError citing a file or root."""
    paths = {document.path for document in documents} | {root}
    try:
        loaded = compile_documents(documents, root=root)
    except PolicyError as err:
        assert err.path in paths, f"error cites {err.path!r}: {err}"
    else:
        assert isinstance(loaded, LoadedPolicies)


def shipped_documents(replace: str = "") -> list[SourceDocument]:
    """The shipped files, decoded, leaving out the one named ``replace``."""
    return [
        decode_document(name, content)
        for name, content in SHIPPED.items()
        if name != replace
    ]


# --- strategies ----------------------------------------------------------------------


def _encode(raw: Any, suffix: str) -> bytes:
    if suffix == ".json":
        return msgspec.json.encode(raw)
    if suffix == ".toml":
        if not isinstance(raw, dict):
            raise TypeError("a TOML document is a table")
        return to_toml(raw)
    return msgspec.yaml.encode(raw)


def _encodable(raw: Any, suffix: str) -> bytes | None:
    try:
        return _encode(raw, suffix)
    except (msgspec.EncodeError, TypeError, ValueError, OverflowError):
        # TOML has no null and no top-level array; skip what it cannot say.
        return None


SEEDS = tuple(SHIPPED.values()) + tuple(
    encoded
    for suffix in (".json", ".toml")
    for raw in SHIPPED_RAW.values()
    if (encoded := _encodable(raw, suffix)) is not None
)

schema_keys = st.one_of(st.sampled_from(SCHEMA_KEYS), TEXT)
schema_values = st.one_of(
    st.sampled_from(SCHEMA_WORDS),
    st.lists(st.sampled_from(SCHEMA_WORDS), max_size=3),
    json_like(schema_keys, max_leaves=8),
)


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    found = [prefix]
    if isinstance(node, dict):
        for key, child in node.items():
            found += _paths(child, (*prefix, key))
    elif isinstance(node, list):
        for index, child in enumerate(node):
            found += _paths(child, (*prefix, index))
    return found


def _set_at(node: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    head, rest = path[0], path[1:]
    copy = dict(node) if isinstance(node, dict) else list(node)
    copy[head] = _set_at(copy[head], rest, value)
    return copy


def _delete_at(node: Any, path: tuple) -> Any:
    if len(path) == 1:
        copy = dict(node) if isinstance(node, dict) else list(node)
        del copy[path[0]]
        return copy
    head = path[0]
    copy = dict(node) if isinstance(node, dict) else list(node)
    copy[head] = _delete_at(copy[head], path[1:])
    return copy


@st.composite
def edited_documents(draw) -> tuple[str, Any]:
    """A shipped document with a few values replaced, deleted or added."""
    name = draw(st.sampled_from(sorted(SHIPPED_RAW)))
    raw = SHIPPED_RAW[name]
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_paths(raw)))
        step = draw(st.sampled_from(("set", "delete", "add")))
        if step == "delete" and path:
            raw = _delete_at(raw, path)
        elif step == "add" and isinstance(_get(raw, path), dict):
            added = {draw(schema_keys): draw(schema_values)}
            raw = _set_at(raw, path, {**_get(raw, path), **added})
        else:
            raw = _set_at(raw, path, draw(schema_values))
    return name, raw


def _get(node: Any, path: tuple) -> Any:
    for part in path:
        node = node[part]
    return node


# --- decoding single files ---------------------------------------------------


@fuzz_settings(300)
@given(suffix=st.sampled_from(SUFFIXES), content=st.binary(max_size=512))
def test_arbitrary_bytes_decode_or_name_the_file(suffix, content):

    check_document(f"policies/fuzz{suffix}", content)


@fuzz_settings(300)
@given(content=mutated(st.sampled_from(SEEDS)), suffix=st.sampled_from(SUFFIXES))
def test_mutated_shipped_files_decode_or_name_the_file(content, suffix):

    check_document(f"policies/mutant{suffix}", content)


@fuzz_settings(300)
@given(
    raw=json_like(schema_keys, max_leaves=30).filter(lambda r: isinstance(r, dict)),
    suffix=st.sampled_from(SUFFIXES),
)
def test_generated_documents_decode_or_name_the_file(raw, suffix):
    content = _encodable(raw, suffix)
    assume(content is not None)

    check_document(f"policies/generated{suffix}", content)


# --- compiling whole sets ----------------------------------------------------


@fuzz_settings(300)
@given(edit=edited_documents(), suffix=st.sampled_from(SUFFIXES))
def test_edited_shipped_set_compiles_or_names_a_file(edit, suffix):
    name, raw = edit
    content = _encodable(raw, suffix)
    assume(content is not None)
    path = name.rsplit(".", 1)[0] + suffix

    document = check_document(path, content)

    if document is not None:
        check_set([*shipped_documents(replace=name), document])


@fuzz_settings(200)
@given(
    name=st.sampled_from(sorted(SHIPPED)),
    content=mutated(st.sampled_from(tuple(SHIPPED.values()))),
)
def test_mutated_shipped_set_compiles_or_names_a_file(name, content):

    document = check_document(name, content)

    if document is not None:
        check_set([*shipped_documents(replace=name), document])


@fuzz_settings(40)
@given(
    files=st.dictionaries(
        st.sampled_from(sorted(SHIPPED)),
        mutated(st.sampled_from(tuple(SHIPPED.values())), max_steps=2),
        max_size=3,
    ),
    drop=st.sets(st.sampled_from(sorted(SHIPPED)), max_size=2),
)
def test_policy_directory_on_disk_loads_or_names_a_path(files, drop):
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp) / "policies"
        root.mkdir()
        for name, content in SHIPPED.items():
            if name not in drop:
                (root / name).write_bytes(files.get(name, content))

        try:
            loaded = load_policies(root)
        except PolicyError as err:
            assert err.path.startswith(str(root)), f"cites {err.path!r}: {err}"
        else:
            assert isinstance(loaded, LoadedPolicies)


# --- conditions -----------------------------------------------------------------------


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


ZONES = st.one_of(
    st.sampled_from(
        (
            "Europe/Berlin",
            "UTC",
            "+02:00",
            "-25:00",
            "Mars/Olympus",
            "",
            "America",
            "../etc/passwd",
            "/etc/localtime",
            "Europe/Berlin\x00",
        )
    ),
    TEXT,
)
ATOMS = st.one_of(
    st.sampled_from(
        (
            "resource.attr.amount",
            "resource.attr",
            "resource.kind",
            "resource.id",
            "context.region",
            "context",
            "principal.roles",
            "principal.attr.team",
            "principal.id",
            "user.kind",
            "agent.id",
            "chain.depth",
            "chain.ids",
            "action",
            "env.now",
            "env.labels",
            "env.region",
            "null",
            "true",
            "false",
            "[]",
            "{}",
        )
    ),
    st.integers(-(1 << 64), 1 << 64).map(str),
    st.integers(0, 1 << 65).map(lambda n: f"{n}u"),
    st.floats(allow_nan=False).map(repr),
    TEXT.map(_quoted),
    TEXT.map(lambda t: "b" + _quoted(t)),
    TEXT.map(lambda t: f"timestamp({_quoted(t)})"),
    TEXT.map(lambda t: f"duration({_quoted(t)})"),
    st.sampled_from(("1h30m", "-5s", "9999999999999h")).map(
        lambda t: f"duration({_quoted(t)})"
    ),
    TEXT,
)
BINARY = ("==", "!=", "<", "<=", ">", ">=", "&&", "||", "+", "-", "*", "/", "%", "in")
FUNCTIONS = ("size", "int", "uint", "double", "string", "bytes", "type", "dyn")
METHODS = (
    "startsWith",
    "endsWith",
    "contains",
    "matches",
    "lowerAscii",
    "split",
    "size",
    "trim",
    "indexOf",
)


def _compose(children):
    pair = st.tuples(children, children)
    return st.one_of(
        st.builds(
            lambda a, op, b: f"{a} {op} {b}",
            children,
            st.sampled_from(BINARY),
            children,
        ),
        children.map(lambda a: f"!{a}"),
        children.map(lambda a: f"-{a}"),
        children.map(lambda a: f"({a})"),
        st.builds(lambda c, a, b: f"{c} ? {a} : {b}", children, children, children),
        st.builds(lambda f, a: f"{f}({a})", st.sampled_from(FUNCTIONS), children),
        st.builds(
            lambda a, m, b: f"{a}.{m}({b})",
            children,
            st.sampled_from(METHODS),
            children,
        ),
        st.builds(lambda a, z: f"{a}.getHours({_quoted(z)})", children, ZONES),
        st.builds(lambda a, z: f"{a}.getDayOfWeek({_quoted(z)})", children, ZONES),
        st.builds(lambda a, b: f"{a}[{b}]", children, children),
        st.builds(
            lambda a, b: f"has({a}.{b})", children, st.sampled_from(("x", "amount"))
        ),
        pair.map(lambda ab: f"[{ab[0]}, {ab[1]}]"),
        pair.map(lambda ab: f"{{{ab[0]}: {ab[1]}}}"),
        st.builds(
            lambda a, q, b: f"{a}.{q}(v, {b})",
            children,
            st.sampled_from(("exists", "all", "exists_one", "map", "filter")),
            children,
        ),
    )


cel_expressions = st.recursive(ATOMS, _compose, max_leaves=8)
conditions = st.one_of(
    cel_expressions,
    st.builds(lambda a, b: f"{a} == {b}", cel_expressions, cel_expressions),
    TEXT,
)

ROLES = decode_document("roles.yaml", SHIPPED["roles.yaml"])
DIRECTORY = decode_document("directory.yaml", SHIPPED["directory.yaml"])
NOW = Env(now=Timestamp(1_796_634_000), daemon_id="fuzz", agent_id="support-bot")
context_values = st.one_of(
    st.integers(-(1 << 63), (1 << 63) - 1),
    st.integers(0, (1 << 64) - 1).map(UInt64),
    st.floats(),
    TEXT,
    st.binary(max_size=8),
    st.booleans(),
    st.builds(Timestamp, st.integers(-62_135_596_800, 253_402_300_799)),
    st.builds(Duration, st.integers(-315_576_000_000, 315_576_000_000)),
    st.lists(st.integers(), max_size=3),
)


def _policy_with(condition: str, effect: str) -> SourceDocument:
    rule = {
        "id": "fuzzed",
        "effect": effect,
        "actions": ["payments.refund.issue"],
        "resources": ["payments.refund"],
        "roles": ["*"],
        "condition": condition,
    }
    document = {"format_version": 1, "kind": "policy", "name": "fuzz", "rules": [rule]}
    return decode_document("fuzz.json", msgspec.json.encode(document))


@fuzz_settings(400)
@given(condition=conditions)
def test_conditions_compile_or_name_the_file(condition):
    try:
        compiled = compile_condition(condition, path="p.yaml", location="$.c")
    except PolicyError as err:
        assert (err.path, err.location) == ("p.yaml", "$.c"), str(err)
    else:
        assert isinstance(compiled, Condition)


@fuzz_settings(300)
@given(
    condition=cel_expressions,
    effect=st.sampled_from(tuple(Effect)),
    amount=context_values,
    context=st.dictionaries(st.sampled_from(("region", "x")), context_values),
)
def test_compiled_conditions_decide_and_never_allow_on_error(
    condition, effect, amount, context
):
    try:
        policy = _policy_with(condition, effect)
        loaded = compile_documents([ROLES, DIRECTORY, policy])
    except PolicyError as err:
        assert err.path == "fuzz.json", str(err)
        return
    request = DecisionRequest(
        chain=("alice", "support-bot"),
        action="payments.refund.issue",
        resource=Resource(
            kind="payments.refund", id="r", attributes={"amount": amount}
        ),
        context=context,
    )

    decision = engine.evaluate(loaded.policy_set, loaded.directory, request, NOW)

    assert decision.effect in tuple(Effect)
    if decision.condition_errors:
        assert decision.effect is not Effect.ALLOW, decision.reason


# --- escapes the fuzzers found, each now a named error ------------------------------


def _nested(open_: bytes, close: bytes, depth: int) -> bytes:
    return open_ * depth + close * depth


def _alias_bomb(levels: int = 9) -> bytes:
    """A directory of ~400 bytes whose YAML aliases expand to 10**levels values."""
    anchors = ["l0: &l0 [x, x, x, x, x, x, x, x, x, x]"] + [
        f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]"
        for i in range(1, levels)
    ]
    return (
        "format_version: 1\nkind: directory\nprincipals:\n"
        "  - {id: alice, kind: user, attributes: {" + ", ".join(anchors) + "}}\n"
    ).encode()


@pytest.mark.parametrize("content", [b"1: 2", b"true: x", b"2001-01-01: x"])
def test_yaml_top_level_key_that_is_not_a_string_is_policy_error(content):
    with pytest.raises(PolicyError) as info:
        decode_document("p.yaml", content)

    assert info.value.path == "p.yaml"


@pytest.mark.parametrize(
    ("path", "content"),
    [
        ("p.json", _nested(b"[", b"]", 1000)),
        ("p.json", b'{"a":' * 1000 + b"1" + b"}" * 1000),
        ("p.toml", b"a = " + _nested(b"[", b"]", 600)),
    ],
    ids=["json-lists", "json-objects", "toml-arrays"],
)
def test_deeply_nested_file_is_policy_error(path, content):
    with pytest.raises(PolicyError) as info:
        decode_document(path, content)

    assert info.value.path == path


def test_yaml_alias_bomb_in_the_directory_is_refused_at_decode():
    # Only decode is called: compiling this document is the hang itself.
    with pytest.raises(PolicyError) as info:
        decode_document("directory.yaml", _alias_bomb())

    assert info.value.path == "directory.yaml"


def test_condition_with_a_lone_surrogate_is_policy_error():
    with pytest.raises(PolicyError):
        compile_condition('"\ud800" == "a"', path="p.yaml", location="$.c")


@pytest.mark.parametrize("condition", ["{[1]: true}", "{context: true}"])
def test_condition_whose_result_is_an_odd_map_literal_is_policy_error(condition):
    with pytest.raises(PolicyError) as info:
        compile_condition(condition, path="p.yaml", location="$.rules[0].condition")

    assert info.value.path == "p.yaml"
