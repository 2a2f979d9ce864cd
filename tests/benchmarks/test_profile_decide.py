"""profile_decide refuses counts it cannot run with, reports the answers it
counted rather than the count it was asked for, and exits 1 when a request
of the mix is refused or decided otherwise than the shipped policies do."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"
SCRIPT = BENCHMARKS / "profile_decide.py"
sys.path.insert(0, str(BENCHMARKS))
import decide_bench  # noqa: E402
import profile_decide  # noqa: E402

from kynara_sidecar.decision import Decision, Effect, ReasonCode  # noqa: E402
from kynara_sidecar.errors import AuditUnavailable  # noqa: E402


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--in-flight", "0"], "--in-flight: expected more than 0, got 0"),
        (["--in-flight", "-3"], "--in-flight: expected more than 0, got -3"),
        (["--decisions", "0"], "--decisions: expected more than 0, got 0"),
        (["--rounds", "0"], "--rounds: expected more than 0, got 0"),
        (["--group", "-1"], "--group: expected 0 (off) or more, got -1"),
    ],
)
def test_counts_below_one_are_refused_naming_the_option(args, named, capsys):
    with pytest.raises(SystemExit) as exit_:
        profile_decide._parse_args(args)

    assert exit_.value.code == 2
    assert named in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--in-flight", "0"], "--in-flight: expected more than 0, got 0"),
        (["--decisions", "0"], "--decisions: expected more than 0, got 0"),
    ],
)
def test_the_script_says_which_option_was_wrong(args, named):
    done = _run(*args, "--rounds", "1")

    assert done.returncode == 2
    assert named in done.stderr


def test_a_run_reports_the_answers_it_counted_and_exits_0():
    done = _run("--decisions", "7", "--in-flight", "2", "--rounds", "1")

    assert done.returncode == 0, done.stderr
    assert "end to end: 7 answers as expected, 2 in flight" in done.stdout


def test_a_grouped_run_counts_every_answer():
    done = _run("--decisions", "9", "--in-flight", "8", "--group", "4", "--rounds", "1")

    assert done.returncode == 0, done.stderr
    assert "end to end: 9 answers as expected, 8 in flight" in done.stdout


def _answer(effect: str) -> profile_decide.Answer:
    decision = Decision(
        effect=Effect(effect),
        reason_code=next(iter(ReasonCode)),
        reason="",
        chain=(),
    )
    return profile_decide.Answer(decision, "id", 1, "00")


def test_the_tally_counts_wrong_decisions_and_errors_apart_from_answers():
    names = ["small refund", "large refund", "crm read"]
    tally = profile_decide._Tally(names)

    tally.add(0, _answer("allow"))
    tally.add(1, _answer("allow"))
    tally.add(2, _answer("deny"))
    tally.add(0, AuditUnavailable("the log is full"))

    assert tally.answers == 2
    assert tally.wrong == {"large refund: expected require_approval, got allow": 1}
    assert tally.errors == {"AuditUnavailable": 1}


def test_a_pass_with_a_wrong_decision_or_an_error_fails_the_run(capsys):
    e2e = profile_decide.EndToEnd(
        answers=5,
        errors={"AuditUnavailable": 2},
        wrong={"small refund: expected allow, got deny": 1},
        in_flight=1,
        wall_seconds=1.0,
        process_cpu_us=1.0,
        loop_cpu_us=1.0,
        writer_cpu_us=0.0,
        commits=1,
        records_per_commit=1.0,
        commit_us=1.0,
    )

    status = decide_bench.exit_status("profile_decide", profile_decide._failed(e2e))

    assert status == 1
    err = capsys.readouterr().err
    assert "profile_decide: 2 requests refused with AuditUnavailable" in err
    assert "profile_decide: 1 decisions wrong: small refund: expected allow" in err


def test_every_request_of_the_mix_has_its_expected_decisions():
    names = [name for name, _ in decide_bench.request_mix()]

    assert sorted(names) == sorted(decide_bench.MIX_DECISIONS)
    assert decide_bench.wrong_decision("crm read", "deny") is None
    assert decide_bench.wrong_decision("crm read", "require_approval") == (
        "crm read: expected allow or deny, got require_approval"
    )
