"""The example refund agent, run as a script against a scripted daemon."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from sdk_scripted import Abort, answer

SCRIPT = (
    Path(__file__).resolve().parents[2]
    / "clients"
    / "python"
    / "examples"
    / "refund_agent.py"
)
# A subprocess start-up bound, not a speed assertion: it only stops a hung run.
RUN_LIMIT_SECONDS = 60


def run_agent(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "KYNARA_TARGET"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=RUN_LIMIT_SECONDS,
        check=False,
    )


@pytest.mark.parametrize("contact", ["allow", "deny"])
def test_session_prints_one_line_per_call_and_exits_zero(daemon, contact):
    daemon.then(
        answer("allow", "d-small", reason_code="rule_allowed"),
        answer("require_approval", "d-large", reason_code="approval_required"),
        answer("deny", "d-kp", reason_code="rule_denied"),
        answer(contact, "d-contact", reason_code=f"{contact}-code"),
    )

    result = run_agent("--target", daemon.target)

    assert result.returncode == 0, result.stderr
    # Under each allowed call, indented, what the tool did.
    printed = result.stdout.splitlines()
    done = [line.strip() for line in printed if line.startswith("  ")]
    lines = [line.split() for line in printed if not line.startswith("  ")]
    assert done == ["refund rf_1001 of 1200 issued"] + (
        ["contact ct_77 read"] if contact == "allow" else []
    )
    assert [line[-3:] for line in lines] == [
        ["allow", "rule_allowed", "d-small"],
        ["require_approval", "approval_required", "d-large"],
        ["deny", "rule_denied", "d-kp"],
        [contact, f"{contact}-code", "d-contact"],
    ]
    refund_small, refund_large, refund_kp, contact_read = daemon.requests
    assert {tuple(r.asserted_chain) for r in daemon.requests} == {("alice",)}
    assert refund_small.resource.attributes["amount"].int_value == 1200
    assert refund_large.resource.attributes["amount"].int_value == 250_000
    assert refund_kp.context["region"].string_value == "kp"
    assert (contact_read.action, contact_read.resource.kind) == (
        "crm.contact.read",
        "crm.contact",
    )
    assert contact_read.context["region"].string_value == "DE"


def test_daemon_refusing_to_answer_exits_one_and_names_the_code(daemon):
    daemon.then(Abort(grpc.StatusCode.UNAVAILABLE, "no policy", "policy_not_ready"))

    result = run_agent("--target", daemon.target)

    assert result.returncode == 1
    assert "error" in result.stdout.splitlines()[0]
    assert "policy_not_ready" in result.stdout.splitlines()[0]
    calls = [line for line in result.stdout.splitlines() if not line.startswith(" ")]
    assert len(calls) == 4


def test_unreachable_daemon_exits_nonzero_with_one_line_on_how_to_start_it(
    absent_target,
):
    result = run_agent("--target", absent_target)

    assert result.returncode == 2
    assert result.stdout == ""
    [message] = result.stderr.splitlines()
    assert absent_target in message
    assert "scripts/run" in message
