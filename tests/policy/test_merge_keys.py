"""A key given twice inside a YAML merge source is refused too.

PyYAML copies a merge source's pairs into the mapping that merges it
without building the source, so the check on a built mapping's own keys
never sees them. Policies, the config and policy tests all read YAML
through ``UniqueKeys``; each case here loaded silently (the last of the
two keys kept) before the source's own pairs were checked.
"""

from __future__ import annotations

import pytest
import yaml

from kynara_sidecar._unique_keys import DuplicateKeyError, UniqueKeyLoader, load_yaml
from kynara_sidecar.config import load_config
from kynara_sidecar.errors import ConfigError, PolicyError
from kynara_sidecar.policy.loader import decode_document
from kynara_sidecar.policy_tests import load_request

HEAD = "format_version: 1\nkind: policy\nname: p\nroles: {c: {}}\nrules:\n"
# The deny is given first in the merged source and an allow below it.
ANCHORED = HEAD + (
    "  - <<: &blocked\n"  # 6
    "      effect: deny\n"  # 7
    "      actions: ['*']\n"
    "      resources: ['*']\n"
    "      roles: ['*']\n"
    "      effect: allow\n"  # 11
    "    id: blocked-region\n"
)
INLINE = HEAD + (
    "  - {<<: {effect: deny, effect: allow}, id: a, actions: [a], resources: [b],\n"
    "     roles: [c]}\n"
)


def duplicate(line: int, key: str, first: int) -> str:
    return (
        f"line {line}: key {key!r} given again (first on line {first}); "
        "expected each key once in a mapping"
    )


def merged_again(line: int, key: str, first: int) -> str:
    return (
        f"line {line}: key {key!r} merged again with another value "
        f"(first merged from line {first}); expected merge sources "
        "to agree on a key they both give"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [(ANCHORED, duplicate(11, "effect", 7)), (INLINE, duplicate(6, "effect", 6))],
    ids=["anchored", "inline"],
)
def test_a_merge_source_with_a_key_given_twice_is_refused(text, message):
    unmerged = text.replace("<<: &blocked", "rule:").replace("<<:", "rule:")

    with pytest.raises(PolicyError) as refused:
        decode_document("x/p.yaml", text.encode())
    with pytest.raises(PolicyError) as refused_unmerged:
        decode_document("x/q.yaml", unmerged.encode())

    assert str(refused.value) == f"x/p.yaml: {message}"
    assert str(refused_unmerged.value) == f"x/q.yaml: {message}"


def test_a_source_merged_by_many_rules_is_refused_at_its_first_use():
    text = ANCHORED + "  - {<<: *blocked, id: again}\n"

    with pytest.raises(DuplicateKeyError) as refused:
        load_yaml(text)

    assert (refused.value.key, refused.value.line) == ("effect", 11)


def test_a_source_merged_by_a_source_is_checked_for_its_own_keys():
    text = "a: &a {x: 1, x: 2}\nb: &b {<<: *a, y: 1}\nc: {<<: *b}\n"
    nested = "c: {<<: {<<: {x: 1, x: 2}, y: 1}}\n"

    for source in (text, nested):
        with pytest.raises(DuplicateKeyError) as refused:
            load_yaml(source)
        assert (refused.value.key, refused.value.merged) == ("x", False)


@pytest.mark.parametrize(
    "text",
    [
        "a: &a {x: deny, y: 1}\nb: &b {x: allow}\nc: {<<: [*a, *b]}\n",
        "a: &a {x: deny, y: 1}\nb: &b {x: allow}\nc: {<<: *a, <<: *b}\n",
        "c: {<<: [{long-key-name: deny}, {long-key-name: allow}]}\n",
    ],
    ids=["list", "two-merge-lines", "inline-list"],
)
def test_two_merge_sources_giving_a_key_different_values_are_refused(text):
    with pytest.raises(DuplicateKeyError) as refused:
        load_yaml(text)

    assert refused.value.merged
    assert str(refused.value).startswith(f"line {refused.value.line}: key ")
    assert "merged again with another value" in str(refused.value)


def test_a_policy_whose_merges_disagree_is_refused_naming_both_lines():
    text = HEAD + (
        "  - &deny {effect: deny, actions: [a], resources: [b], roles: [c], id: d}\n"
        "  - &allow {effect: allow, actions: [a], resources: [b], roles: [c], id: e}\n"
        "  - <<: [*deny, *allow]\n"
        "    id: f\n"
    )

    with pytest.raises(PolicyError) as refused:
        decode_document("x/p.yaml", text.encode())

    assert str(refused.value) == "x/p.yaml: " + merged_again(7, "effect", 6)


def test_merge_sources_that_agree_or_share_a_node_still_load():
    text = (
        "a: &a {x: deny, y: 1}\n"
        "b: &b {x: deny, z: 2}\n"
        "d: &d {<<: *a, w: 3}\n"
        "c: {<<: [*a, *b, *d, *a], x: allow}\n"
    )

    loaded = load_yaml(text)

    assert loaded["c"] == {"x": "allow", "y": 1, "z": 2, "w": 3}
    assert loaded["d"] == {"x": "deny", "y": 1, "w": 3}


def test_a_merge_source_overriding_what_it_merges_agrees_with_itself():
    # b overrides a's x with its own: what b brings is x: 2, once.
    text = "a: &a {x: 1}\nb: &b {<<: *a, x: 2}\nc: {<<: [*b, *a]}\n"

    with pytest.raises(DuplicateKeyError) as refused:
        load_yaml(text)
    loaded = load_yaml(text.replace("[*b, *a]", "[*b]"))

    assert (refused.value.key, refused.value.merged) == ("x", True)
    assert loaded["c"] == {"x": 2}


def test_every_document_of_a_stream_is_checked_on_its_own():
    text = "a: &a {x: 1, y: 2}\nc: {<<: *a}\n"
    stream = "---\n" + text + "---\n" + text.replace("y: 2", "x: 2")

    documents = yaml.load_all(stream, Loader=UniqueKeyLoader)  # noqa: S506
    first = next(documents)
    with pytest.raises(DuplicateKeyError) as refused:
        next(documents)

    assert first["c"] == {"x": 1, "y": 2}
    assert (refused.value.key, refused.value.line) == ("x", 5)


def test_the_config_refuses_a_key_given_twice_in_a_merge_source(tmp_path):
    path = tmp_path / "kynara.yaml"
    path.write_text(
        "identity: {mode: development, agent_id: bot}\n"
        "env:\n  labels:\n    <<: {team: a, team: b}\n    tier: x\n"
    )

    with pytest.raises(ConfigError) as refused:
        load_config(path)

    assert str(refused.value) == (
        f"{path}: cannot read config: " + duplicate(4, "team", 4)
    )


def test_a_request_file_refuses_a_key_given_twice_in_a_merge_source(tmp_path):
    path = tmp_path / "request.yaml"
    path.write_text(
        "request:\n"
        '  now: "2026-12-07T10:00:00+01:00"\n'
        "  chain: [alice, support-bot]\n"
        "  action: payments.refund.issue\n"
        "  resource: {kind: payments.refund, id: rf-1}\n"
        "  context: {<<: {region: DE, region: FR}}\n"
    )

    with pytest.raises(PolicyError) as refused:
        load_request(path)

    assert str(refused.value) == f"{path}: " + duplicate(6, "region", 6)
