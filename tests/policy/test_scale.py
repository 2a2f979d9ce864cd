"""What keeps compiling and looking up linear in the size of a policy set:
each distinct condition compiled once, candidate lookups by the index, and
the generated sets the scale benchmark times (no timings here)."""

from __future__ import annotations

import json
import pathlib
import sys

import pytest

from kynara_sidecar.errors import PolicyError
from kynara_sidecar.metrics import Metrics
from kynara_sidecar.policy import compiler, load_policies
from kynara_sidecar.policy.loader import compile_documents, decode_document
from kynara_sidecar.policy.names import is_valid_name, pattern_matches

BENCHMARKS = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import policy_scale_bench as bench  # noqa: E402 (the benchmark script)

DIRECTORY = {
    "format_version": 1,
    "kind": "directory",
    "principals": [{"id": "u", "kind": "user", "roles": ["r"]}],
}


def json_policy(name: str, rules: list[dict], roles: dict | None = None) -> dict:
    document = {"format_version": 1, "kind": "policy", "name": name, "rules": rules}
    if roles is not None:
        document["roles"] = roles
    return document


def rule(rule_id: str, condition: str = "", actions=("x.read",), resources=("x",)):
    return {
        "id": rule_id,
        "effect": "allow",
        "actions": list(actions),
        "resources": list(resources),
        "roles": ["r"],
        "condition": condition,
    }


def compile_json(*policies: dict):
    sources = [decode_document("directory.json", json.dumps(DIRECTORY).encode())]
    for index, document in enumerate(policies):
        content = json.dumps(document).encode()
        sources.append(decode_document(f"p{index}.json", content))
    return compile_documents(sources)


@pytest.fixture
def compile_calls(monkeypatch) -> list[str]:
    """The sources the compiler hands to compile_condition, in order."""
    calls: list[str] = []
    real = compiler.compile_condition

    def counting(source, **where):
        calls.append(source)
        return real(source, **where)

    monkeypatch.setattr(compiler, "compile_condition", counting)
    return calls


# --- each distinct condition compiled once -----------------------------------


def test_thousand_rules_with_one_condition_compile_it_once(compile_calls):
    condition = "resource.attr.amount <= 50000"
    rules = [rule(f"r{index}", condition) for index in range(1000)]

    loaded = compile_json(json_policy("p", rules, {"r": {}}))

    assert compile_calls == [condition]
    assert len(loaded.policy_set.rules) == 1000
    shared = {id(compiled.condition) for compiled in loaded.policy_set.rules}
    assert len(shared) == 1


def test_conditions_are_shared_across_policies_and_kept_apart_by_source(
    compile_calls,
):
    first = json_policy(
        "a", [rule("r1", "chain.depth <= 3"), rule("r2", "chain.depth <= 3")], {"r": {}}
    )
    # The same expression spelt differently is another source.
    second = json_policy("b", [rule("r1", "chain.depth<=3"), rule("r2")])

    loaded = compile_json(first, second)

    assert compile_calls == ["chain.depth <= 3", "chain.depth<=3"]
    conditions = [compiled.condition for compiled in loaded.policy_set.rules]
    assert conditions[0] is conditions[1]
    assert conditions[2] is not conditions[0]
    assert conditions[2].source == "chain.depth<=3"
    assert conditions[3] is None


def test_each_compile_run_compiles_its_conditions_afresh(compile_calls):
    document = json_policy("p", [rule("r1", "chain.depth <= 3")], {"r": {}})

    first = compile_json(document)
    second = compile_json(document)

    assert compile_calls == ["chain.depth <= 3", "chain.depth <= 3"]
    assert first.policy_set.rules[0].condition is not (
        second.policy_set.rules[0].condition
    )


def test_a_repeated_bad_condition_is_refused_citing_its_first_rule():
    rules = [rule("good", "chain.depth <= 3"), rule("bad1", "chain.depth +")]
    rules.append(rule("bad2", "chain.depth +"))

    with pytest.raises(
        PolicyError,
        match=r"^p0\.json:\$\.rules\[1\]\.condition: rule 'bad1' condition: "
        r"expected a valid CEL expression",
    ):
        compile_json(json_policy("p", rules, {"r": {}}))


def test_shared_conditions_decide_each_rule_as_before():
    rules = [
        rule("small-a", "resource.attr.amount <= 10"),
        {**rule("small-b", "resource.attr.amount <= 10"), "effect": "deny"},
    ]
    loaded = compile_json(json_policy("p", rules, {"r": {}}))
    condition = loaded.policy_set.rules[0].condition

    assert condition is loaded.policy_set.rules[1].condition
    assert condition.evaluate({"resource": {"attr": {"amount": 5}}}) is True
    assert condition.evaluate({"resource": {"attr": {"amount": 50}}}) is False


# --- lookups and what is computed once per set --------------------------------


def test_a_rule_under_two_matching_patterns_is_a_candidate_once():
    both = rule("both", actions=("x.read", "x.*", "*"), resources=("x", "*"))
    loaded = compile_json(
        json_policy(
            "p", [both, rule("plain"), rule("other", actions=("y.read",))], {"r": {}}
        )
    )

    found = loaded.policy_set.candidate_rules("x", "x.read")

    assert [compiled.id for compiled in found] == ["both", "plain"]


def test_action_names_are_the_exact_actions_of_the_set():
    rules = [
        rule("a", actions=("x.read", "x.*")),
        rule("b", actions=("y.write", "*")),
    ]

    loaded = compile_json(json_policy("p", rules, {"r": {}}))

    assert loaded.policy_set.action_names == frozenset({"x.read", "y.write"})


def test_action_names_stop_at_the_first_max_action_labels_in_set_order():
    cap = compiler.MAX_ACTION_LABELS
    # a.json comes before b.json: its actions are first, whatever the order
    # the files are given in; a repeated action takes one place.
    first = [rule(f"a{i}", actions=(f"a.n{i}", "a.n0", "a.*")) for i in range(cap - 2)]
    later = [rule(f"b{i}", actions=(f"b.n{i}",)) for i in range(5)]
    sources = [
        decode_document("b.json", json.dumps(json_policy("b", later)).encode()),
        decode_document("directory.json", json.dumps(DIRECTORY).encode()),
        decode_document(
            "a.json", json.dumps(json_policy("a", first, {"r": {}})).encode()
        ),
    ]

    names = compile_documents(sources).policy_set.action_names

    assert len(names) == cap
    assert {f"a.n{i}" for i in range(cap - 2)} <= names
    assert {"b.n0", "b.n1"} <= names
    assert not names & {"b.n2", "b.n3", "b.n4", "a.*"}


def test_an_action_past_the_label_cap_is_counted_as_other():
    cap = compiler.MAX_ACTION_LABELS
    rules = [rule(f"r{i}", actions=(f"x.n{i}",)) for i in range(cap + 1)]
    loaded = compile_json(json_policy("p", rules, {"r": {}}))
    metrics = Metrics()
    metrics.set_policy("p", "d", loaded.policy_set.action_names)

    metrics.count_decision("allow", "x.n0", 0.001)
    metrics.count_decision("allow", f"x.n{cap}", 0.001)

    sample = metrics.registry.get_sample_value
    assert sample("kynara_decisions_total", {"decision": "allow", "action": "x.n0"})
    assert sample("kynara_decisions_total", {"decision": "allow", "action": "other"})
    assert (
        sample("kynara_decisions_total", {"decision": "allow", "action": f"x.n{cap}"})
        is None
    )


def test_compile_documents_finds_the_one_directory_among_many_files():
    policies = [json_policy(f"p{index}", [rule("r")]) for index in range(50)]
    policies[0]["roles"] = {"r": {}}

    loaded = compile_json(*policies)

    assert len(loaded.policy_set.rules) == 50
    assert loaded.directory.lookup("u") is not None


# --- the generated sets ------------------------------------------------------


def test_generated_set_has_the_asked_rules_and_is_reproducible():
    first = bench.generate_policy_set(1000)

    assert first == bench.generate_policy_set(1000)
    assert first != bench.generate_policy_set(1000, seed=bench.DEFAULT_SEED + 1)
    assert all(name.endswith(".json") for name in first)
    rules = sum(len(json.loads(content).get("rules", ())) for content in first.values())
    assert rules == 1000


def test_generated_set_below_its_fixed_rules_is_refused():
    with pytest.raises(ValueError, match="^expected at least 10 rules, got 9$"):
        bench.generate_policy_set(9)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("generated")
    bench.write_policy_set(root, 2000)
    return load_policies(root)


def test_generated_set_loads_from_json_files_with_conditions_shared(generated):
    rules = generated.policy_set.rules
    conditions = [compiled.condition for compiled in rules if compiled.condition]

    assert len(rules) == 2000
    assert {id(c) for c in conditions} == {
        id(c) for c in {c.source: c for c in conditions}.values()
    }
    assert len({c.source for c in conditions}) < len(conditions) / 4
    assert any(compiled.shadow for compiled in rules)
    assert any(p.endswith(".*") for compiled in rules for p in compiled.actions)


@pytest.mark.parametrize("probe", bench.PROBES, ids=lambda probe: probe.name)
def test_probes_have_the_same_few_candidates_at_every_size(probe, generated):
    smallest = compile_documents(
        [
            decode_document(name, content, name=name)
            for name, content in bench.generate_policy_set(10).items()
        ]
    )

    small = smallest.policy_set.candidate_rules(probe.kind, probe.action)
    large = generated.policy_set.candidate_rules(probe.kind, probe.action)

    assert len(small) == probe.candidates
    assert [(r.policy, r.id) for r in large] == [(r.policy, r.id) for r in small]


def test_indexed_lookup_equals_a_scan_on_the_generated_set(generated):
    policy_set = generated.policy_set
    names = {
        pattern.removesuffix(".*")
        for compiled in policy_set.rules[:300]
        for pattern in (*compiled.actions, *compiled.resources)
    }
    kinds = sorted(n for n in names if is_valid_name(n) and n.count(".") == 1)
    actions = sorted(n for n in names if is_valid_name(n) and n.count(".") == 2)
    actions += ["d1.k0.unnamed", "nowhere.at.all"]

    for kind in kinds[:15]:
        for action in actions[:25]:
            scanned = tuple(
                r
                for r in policy_set.rules
                if any(pattern_matches(p, kind) for p in r.resources)
                and any(pattern_matches(p, action) for p in r.actions)
            )
            assert policy_set.candidate_rules(kind, action) == scanned, (kind, action)
