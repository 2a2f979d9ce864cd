"""The daemon's log lines as an operator reads them: a real daemon process
driven through allow, deny, approval, bad requests and a reload; every
stderr line is parsed, in JSON (the default) and in text."""

from __future__ import annotations

import json
import re
from typing import Any, NamedTuple

import grpc
import pytest
from kynara.v1 import decision_pb2 as pb
from ops_daemon import (
    CALL_TIMEOUT,
    DaemonProcess,
    FastClient,
    refund,
    wait_for_new_revision,
)

DAEMON_ID = "support-bot-local"  # identity.daemon_id in the shipped config
FIXED = ("time", "level", "logger", "msg", "component", "daemon_id")
LEVELS = {"debug", "info", "warning", "error"}
# A value the caller sends that no log line may show.
SECRET = "sk-live-4f1c9e0d7a2b8e6f"
TEXT_LINE = re.compile(
    r'(?P<time>\S+Z) (?P<level>\w+) (?P<logger>\S+) (?P<msg>"(?:[^"\\]|\\.)*"|\S+)'
    r"(?P<rest>.*)"
)
TEXT_FIELD = re.compile(r' ([A-Za-z_][\w.]*)=("(?:[^"\\]|\\.)*"|\S+)')


def drive(daemon: DaemonProcess) -> dict[str, Any]:
    """Allow, deny, approval and two bad requests (gRPC and fast path), all
    carrying SECRET; then a reload with a changed policy. Returns the
    answers that have a decision id."""
    answers: dict[str, Any] = {}
    with daemon.channel() as channel:
        stub = daemon.stub(channel)
        answers["allow"] = stub.Decide(refund(1200, card=SECRET), timeout=CALL_TIMEOUT)
        answers["deny"] = stub.Decide(refund(-5, card=SECRET), timeout=CALL_TIMEOUT)
        answers["approval"] = stub.Decide(
            refund(60000, card=SECRET), timeout=CALL_TIMEOUT
        )
        bad = refund(1200, card=SECRET)
        bad.action = ""
        with pytest.raises(grpc.RpcError) as refused:
            stub.Decide(bad, timeout=CALL_TIMEOUT)
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        fast = FastClient(str(daemon.fast_socket))
        try:
            message = fast.decide(
                {
                    "action": "payments.refund.issue",
                    "resource": {
                        "kind": "payments.refund",
                        "attributes": {"c": SECRET},
                    },
                    "not_a_field": SECRET,
                }
            )
        finally:
            fast.close()
        assert message["error"]["code"] == "invalid_request"
        before = answers["allow"].policy_revision
        daemon.change_payments_policy("2")
        daemon.reload()
        wait_for_new_revision(stub, before, "the reloaded policy")
    assert answers["allow"].decision == pb.DECISION_ALLOW
    assert answers["deny"].decision == pb.DECISION_DENY
    assert answers["approval"].decision == pb.DECISION_REQUIRE_APPROVAL
    return answers


class Driven(NamedTuple):
    """A daemon that ``drive`` went through and that was then stopped."""

    daemon: DaemonProcess
    answers: dict[str, Any]
    exit_code: int


def run_driven(daemon: DaemonProcess) -> Driven:
    """``drive`` the daemon, then stop it (also when driving failed)."""
    try:
        answers = drive(daemon)
    finally:
        exit_code = daemon.stop()
    return Driven(daemon, answers, exit_code)


@pytest.fixture(scope="module")
def driven(tmp_path_factory) -> Driven:
    """One daemon logging JSON (the default), driven and stopped, whose whole
    log every test here reads: each test only reads, and a daemon of its
    own would log the same lines, so one run serves them all."""
    return run_driven(DaemonProcess(tmp_path_factory.mktemp("json")))


def test_every_line_is_json_with_the_fixed_fields(driven):
    answers = driven.answers
    assert driven.exit_code == 0
    lines = driven.daemon.records()  # fails on a line that is not JSON

    messages = [line["msg"] for line in lines]
    assert "serving" in messages and "stopped" in messages
    assert "config reloaded" in messages
    for line in lines:
        assert all(key in line for key in FIXED), line
        assert line["daemon_id"] == DAEMON_ID, line
        assert line["level"] in LEVELS, line
        assert line["logger"].startswith("kynara."), line
        assert line["component"], line
    policy = [line for line in lines if line["component"] == "policy"]
    assert [line["msg"] for line in policy] == ["policy activated"] * 2
    assert all(line["policy_revision"].startswith("sha256:") for line in policy)
    # The reload's line names the revision the answers then carry.
    assert policy[0]["policy_revision"] == answers["allow"].policy_revision
    assert policy[1]["policy_revision"] != policy[0]["policy_revision"]


def test_lines_about_a_decision_carry_its_id(driven):
    answers = driven.answers
    lines = driven.daemon.records()

    (opened,) = [line for line in lines if line["msg"] == "approval opened"]
    assert opened["decision_id"] == answers["approval"].decision_id
    assert opened["approval_id"] == answers["approval"].approval.id
    assert opened["component"] == "approvals"
    about_approvals = [line for line in lines if "approval_id" in line]
    assert about_approvals and all("decision_id" in line for line in about_approvals)


def test_request_payloads_never_reach_the_log(driven):
    text = driven.daemon.log_path.read_text()
    assert text.count("\n") > 10
    assert SECRET not in text
    # Nor the attribute's name as a key of some logged payload.
    assert '"card"' not in text


def parse_text(line: str) -> dict[str, Any]:
    """A text line back into the fields it carries (values as JSON where
    they are quoted or numbers, else as they stand)."""
    match = TEXT_LINE.fullmatch(line)
    assert match, f"not a text log line: {line!r}"
    fields: dict[str, Any] = {
        key: match[key] for key in ("time", "level", "logger", "msg")
    }
    rest = match["rest"]
    assert TEXT_FIELD.sub("", rest) == "", f"stray text in {line!r}"
    for key, value in [("msg", match["msg"])] + TEXT_FIELD.findall(rest):
        try:
            fields[key] = json.loads(value)
        except ValueError:
            fields[key] = value
    return fields


def test_log_format_text_gives_the_same_fields(driven, tmp_path):
    as_json = driven.daemon
    as_text = run_driven(
        DaemonProcess(tmp_path / "text", post=("--log-format", "text"))
    ).daemon
    assert (driven.exit_code, as_text.process.returncode) == (0, 0)
    json_lines = as_json.records()
    text_lines = [parse_text(line) for line in as_text.lines()]

    assert len(text_lines) > 10
    for line in text_lines:
        assert all(key in line for key in FIXED), line
        assert line["daemon_id"] == DAEMON_ID
        assert line["level"] in LEVELS
    assert SECRET not in as_text.log_path.read_text()
    # The same lines with the same field names (times, ids and ports differ
    # between the two daemons, and start-up steps may interleave).
    assert shapes(text_lines) == shapes(json_lines)


def shapes(lines: list[dict[str, Any]]) -> list[tuple[str, tuple[str, ...]]]:
    return sorted((line["msg"], tuple(sorted(line))) for line in lines)
