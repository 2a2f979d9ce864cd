"""Policy test files beside the policies, and ``kynara-sidecar test``."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

import pytest

from kynara_sidecar.decision import Effect, Timestamp, UInt64
from kynara_sidecar.errors import PolicyError
from kynara_sidecar.policy import load_policies
from kynara_sidecar.policy_tests import (
    decide,
    find_test_files,
    format_report,
    load_request,
    load_test_file,
    run_policy_tests,
)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
SHIPPED = REPO_ROOT / "config" / "policies"
CLI = [sys.executable, "-m", "kynara_sidecar.cli"]

REQUEST = """\
    request:
      now: "2026-12-07T10:00:00+01:00"
      chain: [alice, support-bot]
      action: payments.refund.issue
      resource: {kind: payments.refund, id: rf-1, attributes: {amount: 1200}}
      context: {region: DE}
"""


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=60, cwd=REPO_ROOT
    )


def policies_with_tests(tmp_path: pathlib.Path, tests: str) -> pathlib.Path:
    """The shipped policies in tmp_path, their tests replaced by one file."""
    root = tmp_path / "policies"
    shutil.copytree(SHIPPED, root)
    shutil.rmtree(root / "tests")
    (root / "tests").mkdir()
    (root / "tests" / "t.yaml").write_text("format_version: 1\ntests:\n" + tests)
    return root


def one_test(expect: str, name: str = "small refund") -> str:
    return f"  - name: {name}\n{REQUEST}    expect: {expect}\n"


# --- the shipped tests ---------------------------------------------------------


def test_shipped_policy_tests_pass():
    report = run_policy_tests(SHIPPED)

    assert report.passed, format_report(report)
    assert len(report.results) >= 30


def test_shipped_tests_cover_every_decision():
    report = run_policy_tests(SHIPPED)

    assert {result.test.expect.decision for result in report.results} == set(Effect)


def test_cli_test_passes_on_the_shipped_policies():
    result = run_cli("test", str(SHIPPED))

    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok   tests/payments.yaml: a refund of 50001 minor units requires" in (
        result.stdout
    )
    assert "0 failed" in result.stdout.splitlines()[-1]


def test_cli_test_finds_the_policies_under_the_config_directory():
    result = run_cli("test", str(REPO_ROOT / "config"))

    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith(f"{REPO_ROOT / 'config' / 'policies'}:")
    assert " 0 failed" in result.stdout


def test_cli_test_fails_a_broken_expectation_with_a_readable_diff(tmp_path):
    root = tmp_path / "policies"
    shutil.copytree(SHIPPED, root)
    payments = root / "tests" / "payments.yaml"
    text = payments.read_text()
    payments.write_text(text.replace("decision: require_approval", "decision: allow"))

    result = run_cli("test", str(root))

    assert result.returncode == 1
    lines = result.stdout.splitlines()
    failed = lines.index(
        "FAIL tests/payments.yaml: a refund of 50001 minor units requires approval"
    )
    assert lines[failed + 1] == "       decision: expected allow, got require_approval"
    assert lines[failed + 2].startswith("       reason: rule payments/refund-large")
    assert " passed, 1 failed (policy sha256:" in lines[-1]


# --- comparing ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("expect", "diff"),
    [
        (
            "{decision: deny}",
            ["       decision: expected deny, got allow"],
        ),
        (
            "{decision: allow, reason_code: rule_denied}",
            ["       reason_code: expected rule_denied, got rule_allowed"],
        ),
        (
            "{decision: allow, matched_rules: [payments/refund-large@alice]}",
            [
                "       matched_rules: expected payments/refund-large@alice, got "
                "missing payments/refund-large@alice; unexpected "
                "payments/refund-small@alice, payments/refund-small@support-bot"
            ],
        ),
        (
            "{decision: allow, matched_rules: [payments/refund-small@alice]}",
            [
                "       matched_rules: expected payments/refund-small@alice, got "
                "unexpected payments/refund-small@support-bot"
            ],
        ),
        (
            "{decision: allow, shadow_decision: deny}",
            [
                "       shadow_decision: expected deny, got none (no shadow rule "
                "applied)"
            ],
        ),
    ],
    ids=["decision", "reason_code", "rules_missing", "rules_extra", "shadow"],
)
def test_each_mismatch_is_one_readable_line(tmp_path, expect, diff):
    root = policies_with_tests(tmp_path, one_test(expect))

    report = run_policy_tests(root)

    lines = format_report(report).splitlines()
    assert not report.passed
    assert lines[0] == "FAIL tests/t.yaml: small refund"
    assert lines[1 : 1 + len(diff)] == diff
    assert lines[-1].startswith("0 passed, 1 failed (policy sha256:")


@pytest.mark.parametrize(
    "rules",
    [
        "[payments/refund-small]",
        "[payments/refund-small@alice, payments/refund-small@support-bot]",
        "[payments/refund-small@support-bot, payments/refund-small]",
    ],
)
def test_matched_rules_cite_a_rule_for_any_or_one_principal(tmp_path, rules):
    root = policies_with_tests(
        tmp_path, one_test(f"{{decision: allow, matched_rules: {rules}}}")
    )

    report = run_policy_tests(root)

    assert report.passed, format_report(report)


def test_an_instant_with_any_offset_decides_alike(tmp_path):
    # 05:30-02:00 and 07:30Z are one instant: 08:30 in Berlin, before opening.
    tests = "".join(
        f"  - name: CRM read at {now}\n"
        "    request:\n"
        f"      now: {now!r}\n"
        "      chain: [alice, support-bot]\n"
        "      action: crm.contact.read\n"
        "      resource: {kind: crm.contact}\n"
        "    expect: {decision: deny, reason_code: no_rule_allows}\n"
        for now in ("2026-12-07T05:30:00-02:00", "2026-12-07T07:30:00Z")
    )
    root = policies_with_tests(tmp_path, tests)

    report = run_policy_tests(root)

    assert report.passed, format_report(report)
    assert report.results[0].test.request.now == report.results[1].test.request.now


# --- reading ------------------------------------------------------------------


def test_typed_values_in_a_request(tmp_path):
    path = tmp_path / "req.yaml"
    path.write_text(
        "request:\n"
        "  now: 2026-12-07T09:00:00Z\n"
        "  chain: [alice, support-bot]\n"
        "  action: payments.refund.issue\n"
        "  resource:\n"
        "    kind: payments.refund\n"
        "    attributes:\n"
        "      amount: !uint 5\n"
        "      due: !timestamp '2026-12-08T00:00:00+01:00'\n"
    )

    loaded = load_request(path)

    attributes = loaded.request.resource.attributes
    assert loaded.now == Timestamp(1796634000)
    assert type(attributes["amount"]) is UInt64
    assert attributes["due"] == Timestamp(1796684400)


ALIAS_BOMB = (
    "{"
    + ", ".join(
        ["l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
        + [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, 9)]
    )
    + "}"
)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            "description: x\n",
            r"t.yaml:\$: expected field 'format_version', got nothing",
        ),
        (
            "format_version: 1\ntests: []\n",
            r"t.yaml:\$.tests: expected a non-empty array, got an empty one",
        ),
        (
            "format_version: 1\ntests:\n  - name: x\n" + REQUEST,
            r"t.yaml:\$.tests\[0\]: expected field 'expect', got nothing",
        ),
        (
            "format_version: 1\ntests:\n" + one_test("{decision: permit}"),
            r"t.yaml:\$.tests\[0\].expect.decision: expected one of 'allow', "
            r"'deny', 'require_approval', got 'permit'",
        ),
        (
            "format_version: 1\ntests:\n" + one_test("{decision: allow}") * 2,
            r"t.yaml:\$.tests\[1\].name: expected test names unique within the "
            r"file, got 'small refund' again",
        ),
        (
            "format_version: 1\ntests:\n"
            + one_test("{decision: allow, matched_rules: [refund-small]}"),
            r"t.yaml:\$.tests\[0\].expect.matched_rules\[0\]: expected "
            r"'policy/rule' or 'policy/rule@principal', got 'refund-small'",
        ),
        (
            "format_version: 1\ntests:\n"
            + one_test("{decision: allow}").replace("+01:00", ""),
            r"t.yaml:\$.tests\[0\].request.now: expected an RFC 3339 instant "
            r"with an offset, got '2026-12-07T10:00:00'",
        ),
        (
            "format_version: 1\ntests:\n"
            + one_test("{decision: allow}").replace("amount: 1200", "day: 2026-12-07"),
            r"t.yaml:\$.tests\[0\].request.resource.attributes.day: expected a "
            r"timestamp with time and offset, got the date 2026-12-07",
        ),
        (
            "format_version: 1\ntests:\n"
            + one_test("{decision: allow}").replace("context:", "contxt:"),
            r"t.yaml:\$.tests\[0\].request: expected only known fields, got "
            r"unknown field 'contxt'",
        ),
        (
            "format_version: 1\ntests: [\n",
            r"t.yaml: expected valid YAML, got: ",
        ),
        (
            "format_version: 2\ntests: []\n",
            r"t.yaml:\$.format_version: expected one of '1', got 2",
        ),
        (
            "format_version: 1\ntests: " + "[" * 3000 + "]" * 3000 + "\n",
            r"t.yaml: expected YAML nested less deeply",
        ),
        (
            "format_version: 1\nbomb: " + ALIAS_BOMB + "\ntests: []\n",
            r"t.yaml: expected at most 10000000 values, got \d+ once expanded",
        ),
        (
            "format_version: 1\ntests:\n"
            + one_test("{decision: allow}").replace(
                "payments.refund.issue", "pay ments"
            ),
            r"t.yaml:\$.tests\[0\].request.action: expected a dotted name",
        ),
        (
            "format_version: 1\ntests:\n"
            + one_test("{decision: allow}").replace("alice", "al\u200bice"),
            r"t.yaml:\$.tests\[0\].request.chain\[0\]: expected a name without",
        ),
    ],
    ids=[
        "no_version",
        "no_tests",
        "no_expect",
        "bad_decision",
        "duplicate_name",
        "bad_rule_citation",
        "now_without_offset",
        "date_not_timestamp",
        "unknown_field",
        "bad_yaml",
        "unknown_version",
        "nested_too_deep",
        "alias_bomb",
        "bad_action",
        "invisible_in_chain",
    ],
)
def test_bad_test_file_names_file_location_and_expectation(tmp_path, body, message):
    path = tmp_path / "t.yaml"
    path.write_text(body)

    with pytest.raises(PolicyError, match=message):
        load_test_file(path)


def test_test_files_are_found_only_below_a_tests_directory(tmp_path):
    for name in ("tests/a.yaml", "team/tests/b.yml", "c.yaml", "tests/.d.yaml"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")

    found = find_test_files(tmp_path)

    assert [path.relative_to(tmp_path).as_posix() for path in found] == [
        "team/tests/b.yml",
        "tests/a.yaml",
    ]


def test_loader_does_not_read_test_files_as_policies(tmp_path):
    root = policies_with_tests(tmp_path, one_test("{decision: allow}"))
    (root / "tests" / "junk.yaml").write_text("not: [a policy")

    loaded = load_policies(root)

    assert loaded.policy_set.revision == load_policies(SHIPPED).policy_set.revision


def test_policies_without_tests_are_refused(tmp_path):
    root = tmp_path / "policies"
    shutil.copytree(SHIPPED, root, ignore=shutil.ignore_patterns("tests"))

    with pytest.raises(
        PolicyError, match=r"expected policy test files \(.yaml\) below a 'tests'"
    ):
        run_policy_tests(root)


def test_a_request_decides_as_the_daemon_would():
    loaded = load_policies(SHIPPED)
    request = load_request(REPO_ROOT / "config" / "requests" / "refund-over-limit.yaml")

    decision = decide(loaded, request)

    assert decision.effect is Effect.REQUIRE_APPROVAL
    assert decision.explanation is None


def test_a_request_may_set_the_daemon_env(tmp_path):
    path = tmp_path / "req.yaml"
    path.write_text(
        "request:\n"
        "  now: '2026-12-07T09:00:00Z'\n"
        "  chain: [alice, support-bot]\n"
        "  action: payments.refund.issue\n"
        "  resource: {kind: payments.refund}\n"
        "  env: {environment: prod, region: eu-west-1, labels: {team: pay}}\n"
    )

    env = load_request(path).env

    assert (env.environment, env.region, env.labels) == (
        "prod",
        "eu-west-1",
        {"team": "pay"},
    )
    assert env.agent_id == "support-bot"


# --- limits given by a test ----------------------------------------------------

LIMIT_TESTS = """\
format_version: 1
tests:
  - name: the fifth refund today is allowed
    request:
      now: "2026-12-07T10:00:00+01:00"
      chain: [alice, support-bot]
      action: payments.refund.issue
      resource: {kind: payments.refund, id: rf-1}
      context: {amount: 500}
      limits: {refunds_today: {count: 4}}
    expect: {decision: allow}
  - name: the sixth is denied
    request:
      now: "2026-12-07T10:00:00+01:00"
      chain: [alice, support-bot]
      action: payments.refund.issue
      resource: {kind: payments.refund, id: rf-2}
      context: {amount: 500}
      limits: {refunds_today: {count: 5}, refund_total_week: {sum: 100}}
    expect: {decision: deny, matched_rules: [refunds/refund, refunds/refunds-cap]}
"""


def limit_tests(tmp_path: pathlib.Path, text: str) -> pathlib.Path:
    import sys as _sys

    _sys.path.insert(0, str(REPO_ROOT / "tests"))
    from limits_support import limits_policies

    root = limits_policies(tmp_path / "policies")
    (root / "tests").mkdir()
    (root / "tests" / "refunds.yaml").write_text(text)
    return root


def test_a_test_gives_limit_counts_and_the_outcome_flips_with_them(tmp_path):
    root = limit_tests(tmp_path, LIMIT_TESTS)

    report = run_policy_tests(root)

    assert report.passed, format_report(report)
    assert [r.decision.effect for r in report.results] == [Effect.ALLOW, Effect.DENY]


def test_a_test_giving_an_undeclared_limit_names_file_and_location(tmp_path):
    root = limit_tests(tmp_path, LIMIT_TESTS.replace("{count: 5}", "{count: 5}, x: {}"))

    with pytest.raises(PolicyError) as raised:
        run_policy_tests(root)

    assert str(raised.value) == (
        f"{root / 'tests' / 'refunds.yaml'}:$.tests[1].request.limits.x: expected "
        "a limit the policies declare (refund_total_week, refunds_today), got 'x'"
    )
