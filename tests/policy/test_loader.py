"""Reading and validating policy and directory files."""

from __future__ import annotations

import json
import pathlib
import re
import shutil

import pytest

from kynara_sidecar.errors import PolicyError
from kynara_sidecar.policy import load_policies
from kynara_sidecar.policy.loader import decode_document
from kynara_sidecar.policy.model import DirectoryDocument, PolicyDocument

SHIPPED = pathlib.Path(__file__).resolve().parents[2] / "config" / "policies"
HEAD = "format_version: 1\nkind: policy\nname: p\n"
RULE = "rules: [{id: a, effect: allow, actions: [a], resources: [b], roles: [c]%s}]"
DIRECTORY = "format_version: 1\nkind: directory\nprincipals: [{id: u, kind: %s}]"
POLICY = HEAD + "roles: {c: {}}\n" + RULE % ""


@pytest.mark.parametrize(
    ("path", "text", "message"),
    [
        (
            "p.yaml",
            HEAD + RULE.replace("allow", "permit") % "",
            "p.yaml:$.rules[0].effect: expected one of 'allow', 'deny', "
            "'require_approval', got 'permit'",
        ),
        (
            "p.yaml",
            HEAD + RULE % ", colour: red",
            "p.yaml:$.rules[0]: expected only known fields, got unknown field 'colour'",
        ),
        (
            "p.yaml",
            HEAD + "owner: me",
            "p.yaml:$: expected only known fields, got unknown field 'owner'",
        ),
        (
            "p.yaml",
            HEAD + "roles: {sup: {inherit: [a]}}",
            "p.yaml:$.roles.sup: expected only known fields, got unknown field "
            "'inherit'",
        ),
        (
            "p.yaml",
            HEAD + "roles: {sup: {inherits: 3}}",
            "p.yaml:$.roles.sup.inherits: expected array, got int",
        ),
        (
            "p.yaml",
            HEAD + "roles:\n  sup: {}\n  Yes: {}",
            "p.yaml:$.roles.Yes: expected a role name as text, got bool 'Yes' on "
            "line 6 (YAML reads an unquoted true, false, yes, no, on, off, null, ~, "
            "number or date as no text)",
        ),
        (
            "p.yaml",
            HEAD + RULE % ", mode: dry-run",
            "p.yaml:$.rules[0].mode: expected one of 'enforce', 'shadow', got "
            "'dry-run'",
        ),
        (
            "p.yaml",
            HEAD + RULE.replace("actions: [a]", "actions: []") % "",
            "p.yaml:$.rules[0].actions: expected a non-empty array, got an empty one",
        ),
        (
            "p.yaml",
            HEAD + RULE.replace("id: a, ", "") % "",
            "p.yaml:$.rules[0]: expected field 'id', got nothing",
        ),
        (
            "p.yaml",
            HEAD + RULE % ", condition: 5",
            "p.yaml:$.rules[0].condition: expected str, got int",
        ),
        (
            "p.yaml",
            "format_version: 2\nkind: policy\nname: p",
            "p.yaml:$.format_version: expected format_version 1, got 2",
        ),
        (
            "p.yaml",
            "format_version: true\nkind: policy\nname: p",
            "p.yaml:$.format_version: expected format_version 1, got True",
        ),
        (
            "p.yaml",
            "kind: policy\nname: p",
            "p.yaml:$.format_version: expected format_version 1, got nothing",
        ),
        (
            "p.yaml",
            "format_version: 1\nkind: rules\nname: p",
            "p.yaml:$.kind: expected kind 'policy' or 'directory', got 'rules'",
        ),
        ("p.yaml", "- 1", "p.yaml:$: expected a mapping at the top, got list"),
        (
            "d.yaml",
            DIRECTORY % "robot",
            "d.yaml:$.principals[0].kind: expected one of 'user', 'agent', got 'robot'",
        ),
        ("p.yaml", HEAD + "name: [x", "p.yaml: expected valid YAML, got: while "),
        ("p.json", '{"format_version": ', "p.json: expected valid JSON, got: "),
        ("p.toml", "format_version = ", "p.toml: expected valid TOML, got: "),
        (
            "p.txt",
            POLICY,
            "p.txt: expected a file ending .json, .toml, .yaml, .yml, got '.txt'",
        ),
    ],
)
def test_bad_document_is_refused(path, text, message):
    with pytest.raises(PolicyError, match="^" + re.escape(message)):
        decode_document(path, text.encode())


def test_refusal_carries_path_and_location():
    with pytest.raises(PolicyError) as caught:
        decode_document("x/p.yaml", (HEAD + RULE % ", mode: dry").encode())

    assert caught.value.path == "x/p.yaml"
    assert caught.value.location == "$.rules[0].mode"


def test_yaml_json_and_toml_are_accepted_alike():
    policy = {
        "format_version": 1,
        "kind": "policy",
        "name": "p",
        "roles": {"c": {}},
        "rules": [
            {
                "id": "a",
                "effect": "allow",
                "actions": ["a"],
                "resources": ["b"],
                "roles": ["c"],
            }
        ],
    }
    toml = (
        'format_version = 1\nkind = "policy"\nname = "p"\n[roles.c]\n'
        '[[rules]]\nid = "a"\neffect = "allow"\nactions = ["a"]\n'
        'resources = ["b"]\nroles = ["c"]\n'
    )

    documents = [
        decode_document(path, text.encode()).document
        for path, text in [
            ("p.yaml", POLICY),
            ("p.yml", POLICY),
            ("p.json", json.dumps(policy)),
            ("p.toml", toml),
        ]
    ]

    assert all(isinstance(document, PolicyDocument) for document in documents)
    assert all(document == documents[0] for document in documents)


def test_directory_document_keeps_attribute_types():
    text = (
        "format_version: 1\nkind: directory\nprincipals:\n"
        "  - {id: u, kind: user, attributes: {level: 3, ratio: 0.5, tags: [a]}}\n"
    )

    document = decode_document("d.yaml", text.encode()).document

    assert isinstance(document, DirectoryDocument)
    assert document.principals[0].attributes == {
        "level": 3,
        "ratio": 0.5,
        "tags": ["a"],
    }
    assert document.principals[0].active is True


# --- whole directories -------------------------------------------------------------


def write(root: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_shipped_policies_load():
    loaded = load_policies(SHIPPED)

    assert loaded.directory.lookup("alice").roles == ("support",)
    assert {rule.policy for rule in loaded.policy_set.rules} == {
        "admin",
        "crm",
        "payments",
        "region-block",
    }


def test_other_extensions_and_hidden_paths_are_ignored(tmp_path):
    write(
        tmp_path,
        {
            "policy.yaml": POLICY,
            "nested/dir.yml": DIRECTORY % "user",
            "README.md": "not a policy",
            "policy.yaml.bak": "not yaml: [",
            # A Kubernetes ConfigMap mount holds every file twice.
            "..data/policy.yaml": POLICY,
            ".hidden.yaml": "broken: [",
        },
    )

    loaded = load_policies(tmp_path)

    assert [rule.id for rule in loaded.policy_set.rules] == ["a"]
    assert loaded.directory.lookup("u").kind == "user"


def test_revision_depends_on_names_and_contents_only(tmp_path):
    first = write(tmp_path / "one", {"p.yaml": POLICY, "d.yaml": DIRECTORY % "user"})
    second = tmp_path / "two"
    shutil.copytree(first, second)

    same = load_policies(first), load_policies(second)
    (second / "p.yaml").write_text(POLICY + "\n# edited\n")
    edited = load_policies(second)

    assert same[0].policy_set.revision == same[1].policy_set.revision
    assert same[0].directory.revision == same[1].directory.revision
    assert edited.policy_set.revision != same[0].policy_set.revision
    assert edited.directory.revision == same[0].directory.revision


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({}, "expected policy files ending .json, .toml, .yaml, .yml, got none"),
        ({"README.md": "x"}, "expected policy files ending"),
        ({"p.yaml": POLICY}, "expected exactly one directory file, got none"),
        (
            {"p.yaml": POLICY, "a.yaml": DIRECTORY % "user", "b.json": "{}"},
            "b.json:$.format_version: expected format_version 1, got nothing",
        ),
    ],
)
def test_bad_policy_directory_is_refused(tmp_path, files, message):
    write(tmp_path, files)

    with pytest.raises(PolicyError, match=re.escape(message)):
        load_policies(tmp_path)


def test_two_directory_files_are_refused(tmp_path):
    write(
        tmp_path,
        {"p.yaml": POLICY, "a.yaml": DIRECTORY % "user", "b.yaml": DIRECTORY % "agent"},
    )

    with pytest.raises(PolicyError) as caught:
        load_policies(tmp_path)

    assert str(caught.value) == (
        f"{tmp_path}: expected exactly one directory file, got "
        f"{tmp_path / 'a.yaml'}, {tmp_path / 'b.yaml'}"
    )


def test_missing_root_is_refused(tmp_path):
    with pytest.raises(
        PolicyError,
        match=re.escape(f"{tmp_path / 'nope'}: expected a directory of policy files"),
    ):
        load_policies(tmp_path / "nope")
