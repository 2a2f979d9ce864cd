"""A key given twice in one mapping is refused wherever a policy is read.

Policy and directory files (YAML, JSON, TOML), bundles, policy test files
and explain requests: each names the file, the line and the key.
"""

from __future__ import annotations

import json
import pathlib
import random
import shutil
import subprocess
import sys

import pytest

from kynara_sidecar._unique_keys import DuplicateKeyError, check_json_keys, load_yaml
from kynara_sidecar.audit.keys import generate_key
from kynara_sidecar.decision import Timestamp
from kynara_sidecar.errors import PolicyError
from kynara_sidecar.policy import load_policies
from kynara_sidecar.policy.loader import decode_document
from kynara_sidecar.policy_tests import load_request, load_test_file
from kynara_sidecar.sync.bundle import (
    BundleError,
    BundleProblem,
    build_bundle,
    build_manifest,
    pack_bundle,
    verify_bundle,
)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
SHIPPED = REPO_ROOT / "config" / "policies"
KEY = generate_key()

YAML_RULE = """\
format_version: 1
kind: policy
name: p
roles: {c: {}}
rules:
  - id: a
    effect: deny
    actions: [a]
    resources: [b]
    roles: [c]
    effect: allow
"""
JSON_RULE = """\
{"format_version": 1, "kind": "policy", "name": "p", "roles": {"c": {}},
 "rules": [
  {"id": "a", "effect": "deny", "actions": ["a"], "resources": ["b"],
   "description": "a: b, \\"c\\": d", "roles": ["c"],
   "effect": "allow"}]}
"""


def duplicate(line: int, key: str, first: int) -> str:
    return (
        f"line {line}: key {key!r} given again (first on line {first}); "
        "expected each key once in a mapping"
    )


def test_a_rule_with_two_effects_is_refused_naming_file_line_and_key(tmp_path):
    root = tmp_path / "policies"
    shutil.copytree(SHIPPED, root, ignore=shutil.ignore_patterns("tests"))
    payments = root / "payments.yaml"
    lines = payments.read_text().splitlines(keepends=True)
    first = lines.index("    effect: deny\n") + 1
    lines.insert(first + 1, "    effect: allow\n")
    payments.write_text("".join(lines))

    with pytest.raises(PolicyError) as refused:
        load_policies(root)

    assert refused.value.path == str(payments)
    assert str(refused.value) == f"{payments}: " + duplicate(first + 2, "effect", first)


TWICE = [
    ("rule.yaml", YAML_RULE, duplicate(11, "effect", 7)),
    ("rule.json", JSON_RULE, duplicate(5, "effect", 3)),
    (
        "roles.yaml",
        "format_version: 1\nkind: policy\nname: p\nroles:\n"
        "  sup: {inherits: [a]}\n  sup: {}\n",
        duplicate(6, "sup", 5),
    ),
    (
        "rules.yaml",
        "format_version: 1\nkind: policy\nname: p\nrules: []\nrules: []\n",
        duplicate(5, "rules", 4),
    ),
    (
        "flow.yaml",
        "format_version: 1\nkind: policy\nname: p\n"
        "rules: [{id: a, effect: deny, effect: allow}]\n",
        duplicate(4, "effect", 4),
    ),
    (
        "escaped.json",
        '{"format_version": 1,\n"kind": "policy",\n"\\u006bind": "directory"}',
        duplicate(3, "kind", 2),
    ),
    (
        "directory.yaml",
        "format_version: 1\nkind: directory\nprincipals:\n"
        "  - id: u\n    kind: user\n    attributes: {tier: 1, tier: 2}\n",
        duplicate(6, "tier", 6),
    ),
]


@pytest.mark.parametrize(
    ("name", "text", "message"), TWICE, ids=[name for name, *_ in TWICE]
)
def test_a_key_given_twice_is_refused_naming_line_and_key(name, text, message):
    with pytest.raises(PolicyError) as refused:
        decode_document(f"x/{name}", text.encode())

    assert str(refused.value) == f"x/{name}: {message}"


def test_toml_refuses_a_key_given_twice_itself():
    text = 'format_version = 1\nkind = "policy"\nname = "p"\nname = "q"\n'

    with pytest.raises(PolicyError, match=r"^x/p\.toml: expected valid TOML, .*line 4"):
        decode_document("x/p.toml", text.encode())


def test_a_merge_may_be_overridden_but_not_a_key_of_ones_own():
    base = (
        "format_version: 1\nkind: policy\nname: p\nroles: {c: {}}\nrules:\n"
        "  - &base {id: a, effect: deny, actions: [a], resources: [b], roles: [c]}\n"
    )
    merged = base + "  - {<<: *base, id: b, effect: allow}\n"
    twice = base + "  - {<<: *base, id: b, id: c}\n"

    rules = decode_document("m.yaml", merged.encode()).document.rules
    with pytest.raises(PolicyError) as refused:
        decode_document("t.yaml", twice.encode())

    assert [(rule.id, rule.effect) for rule in rules] == [("a", "deny"), ("b", "allow")]
    assert rules[1].actions == ("a",)
    assert str(refused.value) == "t.yaml: " + duplicate(7, "id", 7)


def test_a_merged_mapping_that_merges_keeps_its_own_keys_apart():
    # z merges y before y is built, flattening y's merge of c into y's
    # pairs: y's key k is its own override, not k given twice.
    text = "c: &c {k: 0, j: 0}\nx: {y: &y {<<: *c, k: 1}}\nz: {<<: *y}\n"

    loaded = load_yaml(text)
    with pytest.raises(DuplicateKeyError) as refused:
        load_yaml(text.replace("k: 1}", "k: 1, k: 2}"))

    assert loaded["x"]["y"] == {"k": 1, "j": 0}
    assert (refused.value.key, refused.value.line) == ("k", 2)


def test_json_with_colons_and_escapes_in_strings_still_loads():
    text = (
        '{"format_version": 1, "kind": "policy", "name": "p", "roles": {"c": {}},'
        ' "description": "at 10:00 \\u003a \\\\u003a \\":\\"",'
        ' "rules": [{"id": "a", "effect": "deny", "actions": ["a"],'
        ' "resources": ["b"], "roles": ["c"], "condition": "now().getHours() < 9"}]}'
    )

    document = decode_document("p.json", text.encode()).document

    assert document.description == json.loads(text)["description"]
    assert document.rules[0].effect == "deny"


JSON_KEYS = ("a", "b", ":", "\\u0061", 'c\\"d', "e")


def _spellings(key: str) -> list[str]:
    return [raw for raw in JSON_KEYS if json.loads(f'"{raw}"') == key]


def _random_json(rng: random.Random, depth: int = 0) -> str:
    roll = rng.random()
    if depth > 3 or roll < 0.3:
        return rng.choice(['"a:b"', '"\\u003a"', "1", "null", '"x"', '"\\\\"', "[]"])
    if roll < 0.5:
        items = [_random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
        return "[" + ",\n".join(items) + "]"
    keys = rng.choices(JSON_KEYS, k=rng.randrange(5))
    pairs = [f'"{key}" :\n{_random_json(rng, depth + 1)}' for key in keys]
    return "{" + ", ".join(pairs) + "}"


def _reference_duplicate(text: str) -> bool:
    found = []

    def pairs_hook(pairs):
        if len({key for key, _ in pairs}) != len(pairs):
            found.append(pairs)
        return dict(pairs)

    json.loads(text, object_pairs_hook=pairs_hook)
    return bool(found)


def test_json_duplicates_are_found_exactly_as_a_full_parse_finds_them():
    rng = random.Random(11)
    texts = [_random_json(rng) for _ in range(600)]
    outcomes = set()

    for text in texts:
        content = text.encode()
        try:
            check_json_keys(content, json.loads(text))
            refused = False
        except DuplicateKeyError as err:
            refused = True
            lines = text.splitlines()
            for line in (err.line, err.first_line):
                assert any(
                    f'"{key}" :' in lines[line - 1] for key in _spellings(err.key)
                )
        assert refused == _reference_duplicate(text), text
        outcomes.add(refused)

    assert outcomes == {True, False}


def test_a_bundle_with_a_key_given_twice_does_not_compile_naming_it(tmp_path):
    root = tmp_path / "policies"
    shutil.copytree(SHIPPED, root, ignore=shutil.ignore_patterns("tests"))
    good = build_bundle(root, KEY, Timestamp(1_796_634_000, 0))
    files = {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in sorted(root.rglob("*.yaml"))
    }
    crm = files["crm.yaml"].decode()
    first = crm.splitlines().index("name: crm") + 1
    files["crm.yaml"] = crm.replace("name: crm\n", "name: crm\nname: sales\n").encode()
    verified = verify_bundle(good, {KEY.key_id: KEY.public()})
    manifest = build_manifest(
        files,
        revision=verified.revision,
        directory_revision=verified.directory_revision,
        created="2026-12-07T09:00:00Z",
        key_id=KEY.key_id,
    )

    with pytest.raises(BundleError) as caught:
        verify_bundle(pack_bundle(files, manifest, KEY), {KEY.key_id: KEY.public()})

    assert caught.value.kind is BundleProblem.DOES_NOT_COMPILE
    assert caught.value.path == "crm.yaml"
    assert str(caught.value).endswith(
        "crm.yaml: " + duplicate(first + 1, "name", first)
    )


REQUEST = """\
request:
  now: "2026-12-07T10:00:00+01:00"
  chain: [alice, support-bot]
  action: payments.refund.issue
  resource: {kind: payments.refund, id: rf-1, attributes: {amount: 1200}}
  context: {region: DE, region: FR}
"""


def test_an_explain_request_with_a_key_given_twice_is_refused(tmp_path):
    path = tmp_path / "request.yaml"
    path.write_text(REQUEST)

    with pytest.raises(PolicyError) as refused:
        load_request(path)

    assert str(refused.value) == f"{path}: " + duplicate(6, "region", 6)


def test_a_policy_test_with_a_key_given_twice_is_refused_by_the_cli(tmp_path):
    root = tmp_path / "policies"
    shutil.copytree(SHIPPED, root)
    tests = root / "tests" / "payments.yaml"
    lines = tests.read_text().splitlines(keepends=True)
    first = next(i for i, line in enumerate(lines) if "decision:" in line) + 1
    lines.insert(first, lines[first - 1].replace("allow", "deny"))
    tests.write_text("".join(lines))

    with pytest.raises(PolicyError) as refused:
        load_test_file(tests)
    done = subprocess.run(
        [sys.executable, "-m", "kynara_sidecar.cli", "test", str(root)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        check=False,
    )

    message = f"{tests}: " + duplicate(first + 1, "decision", first)
    assert str(refused.value) == message
    assert done.returncode != 0
    assert message in done.stdout + done.stderr
