"""Replay: recorded requests re-decided against candidate policy sets."""

from __future__ import annotations

import contextlib
import io
import re
import shutil

import lmdb
import msgspec
import pytest
from cases_loader import load_cases
from fault_helpers import DaemonProcess
from kynara.v1 import decision_pb2 as pb
from limits_support import limits_policies, request_with
from support import SHIPPED_POLICIES, small_refund

from kynara_sidecar import engine
from kynara_sidecar.audit.chain import decode_record
from kynara_sidecar.audit.record import (
    AuditRecordV1,
    record_from_decision,
    request_from_record,
)
from kynara_sidecar.audit.store import AuditStore, policy_set_changes
from kynara_sidecar.decision import DecisionRequest, Env, Resource, Timestamp, UInt64
from kynara_sidecar.errors import PolicyError
from kynara_sidecar.policy.loader import load_policies
from kynara_sidecar.policy_tests import decide, look_limits, parse_request
from kynara_sidecar.replay import (
    format_change,
    format_report,
    load_stored_policies,
    replay_log,
    replay_main,
    replay_record,
    unrecorded_limits,
)

CASES = load_cases()
# A Monday, 23:00 in Berlin: outside the shipped business hours.
NIGHT = "2026-12-07T22:00:00Z"
SUMMARY = re.compile(r"^(\d+) records replayed, (\d+) would change$")


def crm_read() -> pb.DecideRequest:
    return pb.DecideRequest(
        asserted_chain=["alice"],
        action="crm.contact.read",
        resource=pb.Resource(kind="crm.contact", id="c-1"),
    )


def large_refund() -> pb.DecideRequest:
    request = small_refund()
    request.resource.attributes["amount"].int_value = 90_000
    return request


@pytest.fixture
def policies(tmp_path):
    """A copy of the shipped policies the daemon serves from."""
    path = tmp_path / "policies"
    shutil.copytree(SHIPPED_POLICIES, path)
    return path


@pytest.fixture
def lowered(tmp_path):
    """The shipped policies with the refund limit cut from 500.00 to 10.00."""
    path = tmp_path / "lowered"
    shutil.copytree(SHIPPED_POLICIES, path)
    lower_refund_limit(path)
    return path


def lower_refund_limit(path) -> None:
    payments = path / "payments.yaml"
    text = payments.read_text()
    assert text.count("50000") == 2
    payments.write_text(text.replace("50000", "1000"))


def run_replay(policies, audit, **options) -> list[str]:
    out = io.StringIO()

    code = replay_main(policies, audit, out=out, **options)

    assert code == 0
    return out.getvalue().splitlines()


def summary(lines: list[str]) -> tuple[int, int]:
    match = SUMMARY.match(lines[-1])
    assert match, lines
    return int(match[1]), int(match[2])


def records(store: AuditStore) -> list[AuditRecordV1]:
    with contextlib.closing(store.iter_records()) as stored:
        return [decode_record(item.record_bytes) for item in stored]


# ------------------------------------------------------- record -> request


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_every_case_replays_to_its_own_decision(case):
    loaded = load_policies(SHIPPED_POLICIES)
    env = Env(now=case.now, daemon_id="d", agent_id=case.request.chain[-1])
    decision = engine.evaluate(loaded.policy_set, loaded.directory, case.request, env)
    record = record_from_decision(
        request=case.request, env=env, decision=decision, decision_id="x"
    )

    replayed = replay_record(record, loaded)

    assert (replayed.effect, replayed.reason_code) == (
        decision.effect,
        decision.reason_code,
    )


def test_request_from_record_gives_back_typed_values_and_env_exactly():
    loaded = load_policies(SHIPPED_POLICIES)
    request = DecisionRequest(
        chain=("alice", "support-bot"),
        action="payments.refund.issue",
        resource=Resource(
            kind="payments.refund", id="rf", attributes={"amount": 2**53 + 1}
        ),
        context={"n": UInt64(2**64 - 1), "when": Timestamp(5, 1), "x": [1.5]},
        request_id="r-1",
    )
    env = Env(now=Timestamp(1_796_374_800, 7), region="eu", labels={"a": "b"})
    decision = engine.evaluate(loaded.policy_set, loaded.directory, request, env)
    record = record_from_decision(
        request=request, env=env, decision=decision, decision_id="x"
    )

    got_request, got_env = request_from_record(record)

    assert got_request == request
    assert isinstance(got_request.context["n"], UInt64)
    assert got_env == env


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, r"expected a timestamp at \$\.env\.now, got 'nothing'"),
        ({"now": {"string": "x"}}, r"expected a timestamp at \$\.env\.now"),
        ({"now": {"timestamp": "noon"}}, r"bad timestamp at \$\.env\.now"),
    ],
)
def test_request_from_record_refuses_a_record_without_a_usable_now(env, message):
    record = AuditRecordV1(
        v=1,
        kind="decision",
        time="t",
        chain=[{"id": "alice"}],
        resource={"kind": "payments.refund"},
        env=env,
    )
    record = decode_record(msgspec.json.encode(record))

    with pytest.raises(ValueError, match=message):
        request_from_record(record)


def test_request_from_record_refuses_other_kinds():
    record = AuditRecordV1(v=1, kind="marker", time="t", seq=3)

    with pytest.raises(ValueError, match="expected a 'decision' record, got 'marker'"):
        request_from_record(record)


# ------------------------------------------------------ the daemon's log


def test_log_holds_the_policy_set_under_the_revisions_answers_cite(
    start_daemon, policies
):
    running = start_daemon(f"policy.source={policies}")

    reply = running.stub().Decide(small_refund())

    store = running.daemon._store
    markers = [r for r in records(store) if r.kind == "marker"]
    assert [m.marker.event for m in markers] == ["start", "policy_activated"]
    assert markers[1].policy_revision == reply.policy_revision
    assert markers[1].directory_revision == reply.directory_revision
    stored = load_stored_policies(
        store, reply.policy_revision, reply.directory_revision
    )
    assert stored is not None
    assert stored.policy_set.revision == reply.policy_revision
    source = store.get_policy_source("policy", reply.policy_revision)
    assert source.files["payments.yaml"] == (policies / "payments.yaml").read_bytes()
    assert "directory.yaml" not in source.files


def test_replay_against_the_same_policies_changes_nothing(start_daemon, policies):
    running = start_daemon(f"policy.source={policies}")
    stub = running.stub()
    for request in (small_refund(), large_refund(), crm_read()):
        stub.Decide(request)
    running.call(running.daemon.stop())

    lines = run_replay(policies, running.config.audit.path)

    assert summary(lines) == (3, 0)
    assert len(lines) == 2, lines


@pytest.mark.parametrize("baseline", ["recorded", "original"])
def test_lowered_refund_limit_changes_exactly_the_small_refunds(
    start_daemon, policies, lowered, baseline
):
    running = start_daemon(f"policy.source={policies}")
    stub = running.stub()
    small = [stub.Decide(small_refund()) for _ in range(2)]
    stub.Decide(large_refund())
    stub.Decide(crm_read())
    running.call(running.daemon.stop())

    lines = run_replay(lowered, running.config.audit.path, baseline=baseline)

    assert summary(lines) == (4, 2)
    assert lines[1:3] == [
        f"seq {reply.audit_sequence} {reply.decision_id} payments.refund.issue: "
        "allow (rule_allowed) -> require_approval (approval_required)"
        for reply in small
    ]


def test_replay_uses_the_records_own_now_not_the_clock(start_daemon, policies, clock):
    running = start_daemon(f"policy.source={policies}")
    stub = running.stub()
    day = stub.Decide(crm_read())
    clock.set(NIGHT)
    night = stub.Decide(crm_read())

    report = replay_log(running.daemon._store, load_policies(policies))

    assert (day.decision, night.decision) == (pb.DECISION_ALLOW, pb.DECISION_DENY)
    assert (report.replayed, report.changes) == (2, [])


def test_reload_stores_the_new_set_and_replays_against_it(start_daemon, policies):
    running = start_daemon(f"policy.source={policies}")
    stub = running.stub()
    before = stub.Decide(small_refund())
    lower_refund_limit(policies)

    assert running.call(running.daemon.reload()) is True
    after = stub.Decide(small_refund())

    store = running.daemon._store
    assert after.policy_revision != before.policy_revision
    assert after.directory_revision == before.directory_revision
    for reply in (before, after):
        stored = load_stored_policies(
            store, reply.policy_revision, reply.directory_revision
        )
        assert stored.policy_set.revision == reply.policy_revision
    events = [r.marker.event for r in records(store) if r.kind == "marker"]
    assert events == ["start", "policy_activated", "policy_activated"]
    assert (before.decision, after.decision) == (
        pb.DECISION_ALLOW,
        pb.DECISION_REQUIRE_APPROVAL,
    )
    # Compared with each record's own set, only the record made before the
    # change would change; compared with what was recorded, the same.
    for baseline in ("original", "recorded"):
        report = replay_log(store, load_policies(policies), baseline=baseline)
        assert [c.seq for c in report.changes] == [before.audit_sequence]


def test_a_refused_reload_stores_nothing(start_daemon, policies):
    running = start_daemon(f"policy.source={policies}")
    (policies / "broken.yaml").write_text("format_version: 1\nkind: policy\n")

    assert running.call(running.daemon.reload()) is False

    events = [r.marker.event for r in records(running.daemon._store) if r.marker]
    assert events == ["start", "policy_activated"]


def test_replay_reads_the_log_of_a_running_daemon_process(tmp_path, lowered):
    audit = tmp_path / "audit"
    daemon = DaemonProcess(tmp_path / "agent.sock", audit, tmp_path / "daemon.log")
    try:
        daemon.wait_serving()
        reply = daemon.decide("r-1")

        lines = run_replay(lowered, audit)

        assert summary(lines) == (1, 1)
        assert lines[1].startswith(f"seq {reply.audit_sequence} {reply.decision_id} ")
        assert daemon.terminate() == 0
    finally:
        daemon.close()


# ------------------------------------------------------ stored revisions


def test_original_baseline_says_when_a_records_set_is_not_stored(tmp_path):
    loaded = load_policies(SHIPPED_POLICIES)
    case = next(c for c in CASES if c.expect["decision"] == "allow")
    env = Env(now=case.now, agent_id=case.request.chain[-1])
    decision = engine.evaluate(loaded.policy_set, loaded.directory, case.request, env)
    record = record_from_decision(
        request=case.request, env=env, decision=decision, decision_id="x"
    )
    store = AuditStore.open(tmp_path / "audit")
    store.append_batch([record])
    store.close()

    lines = run_replay(SHIPPED_POLICIES, tmp_path / "audit", baseline="original")

    assert lines[-2] == (
        f"original policy set not stored: policy {loaded.policy_set.revision}, "
        f"directory {loaded.directory.revision} (1 records compared with their "
        "recorded decision)"
    )
    assert summary(lines) == (1, 0)


def test_a_stored_revision_is_written_once(tmp_path):
    store = AuditStore.open(tmp_path / "audit")
    marker = AuditRecordV1(v=1, kind="marker", time="t")
    first = policy_set_changes("sha256:p", {"a.yaml": b"one"}, "sha256:d", {})
    second = policy_set_changes("sha256:p", {"a.yaml": b"two"}, "sha256:d", {})

    store.append_batch([marker], first)
    store.append_batch([marker], second)

    assert store.get_policy_source("policy", "sha256:p").files == {"a.yaml": b"one"}
    assert store.get_policy_source("policy", "sha256:unknown") is None
    store.close()


def test_stored_files_that_hash_elsewhere_are_refused(tmp_path):
    loaded = load_policies(SHIPPED_POLICIES)
    files = {p.name: p.read_bytes() for p in SHIPPED_POLICIES.glob("*.yaml")}
    directory = {"directory.yaml": files.pop("directory.yaml")}
    store = AuditStore.open(tmp_path / "audit")
    marker = AuditRecordV1(v=1, kind="marker", time="t")
    store.append_batch(
        [marker],
        policy_set_changes(
            "sha256:forged", files, loaded.directory.revision, directory
        ),
    )

    with pytest.raises(PolicyError, match="expected stored files to compile to"):
        load_stored_policies(store, "sha256:forged", loaded.directory.revision)
    store.close()


def test_a_log_from_before_policy_sets_reads_as_holding_none(tmp_path):
    env = lmdb.open(str(tmp_path / "audit"), max_dbs=8, subdir=True)
    for name in (b"records", b"chain", b"decisions"):
        env.open_db(name)
    with env.begin(write=True) as txn:
        txn.put(b"format_version", b"1", db=env.open_db(b"meta", txn=txn))
    env.close()
    store = AuditStore.open(tmp_path / "audit", readonly=True)

    found = store.get_policy_source("policy", "sha256:p")
    report = replay_log(store, load_policies(SHIPPED_POLICIES), baseline="original")

    store.close()
    assert found is None
    assert (report.replayed, report.changes) == (0, [])


def test_replay_warns_when_the_log_does_not_verify(start_daemon, policies):
    running = start_daemon(f"policy.source={policies}")
    reply = running.stub().Decide(small_refund())
    running.call(running.daemon.stop())
    env = lmdb.open(str(running.config.audit.path), max_dbs=16)
    records = env.open_db(b"records")
    key = reply.audit_sequence.to_bytes(8, "big")
    with env.begin(write=True) as txn:
        stored = txn.get(key, db=records)
        txn.put(key, stored.replace(b'"allow"', b'"deny"'), db=records)
    env.close()

    lines = run_replay(policies, running.config.audit.path)

    assert lines[0].startswith("warning: the log does not verify")
    assert f"record {reply.audit_sequence}: edited" in lines[0]


@pytest.mark.parametrize("count", [0, 2])
def test_a_stored_directory_part_without_exactly_one_file_is_refused(tmp_path, count):
    policy_files = {
        path.name: path.read_bytes()
        for path in sorted(SHIPPED_POLICIES.glob("*.yaml"))
        if path.name != "directory.yaml"
    }
    directory = (SHIPPED_POLICIES / "directory.yaml").read_bytes()
    directory_files = {f"directory-{n}.yaml": directory for n in range(count)}
    changes = policy_set_changes(
        "sha256:" + "1" * 64, policy_files, "sha256:" + "2" * 64, directory_files
    )
    store = AuditStore.open(tmp_path / "audit", map_size=1 << 24)
    try:
        store.append_batch([], changes)
        with pytest.raises(PolicyError) as refused:
            load_stored_policies(store, "sha256:" + "1" * 64, "sha256:" + "2" * 64)
    finally:
        store.close()

    message = str(refused.value)
    assert "expected exactly one directory file" in message
    assert f"got {count}" in message
    assert "sha256:" + "2" * 64 in message


# ------------------------------------------------------------------ limits


def limited_record(tmp_path, count: int, *, ceiling: int = 5) -> AuditRecordV1:
    """A decision record of ``limits_support.REQUEST`` as a daemon would
    have written it after ``count`` refunds by alice today."""
    loaded = load_policies(limits_policies(tmp_path / "recorded", ceiling=ceiling))
    given = parse_request(request_with(f"{{refunds_today: {{count: {count}}}}}"))
    seen = look_limits(loaded, given)
    decision = decide(loaded, given, limits=seen)
    record = record_from_decision(
        request=given.request, env=given.env, decision=decision, decision_id="d-1"
    )
    return msgspec.structs.replace(record, limits=seen.entries)


@pytest.mark.parametrize(("count", "effect"), [(4, "allow"), (5, "deny")])
def test_replay_decides_with_the_recorded_count_not_the_live_one(
    tmp_path, count, effect
):
    record = limited_record(tmp_path, count)
    candidate = load_policies(limits_policies(tmp_path / "candidate"))

    replayed = replay_record(record, candidate)

    assert record.decision == effect
    assert record.limits["refunds_today"].count == count
    assert replayed.effect.value == effect


def test_replay_uses_the_candidates_ceiling_with_the_recorded_count(tmp_path):
    record = limited_record(tmp_path, 4)
    lowered = load_policies(limits_policies(tmp_path / "lowered", ceiling=4))

    replayed = replay_record(record, lowered)

    assert (record.decision, replayed.effect.value) == ("allow", "deny")
    assert "refunds-cap" in {rule.rule for rule in replayed.matched_rules}


def test_a_limit_the_record_lacks_fails_closed_and_is_named(tmp_path):
    record = limited_record(tmp_path, 0)
    record = msgspec.structs.replace(
        record,
        limits={k: v for k, v in record.limits.items() if k != "refunds_today"},
    )
    candidate = load_policies(limits_policies(tmp_path / "candidate"))
    store = AuditStore.open(tmp_path / "audit")
    try:
        store.append_batch([record])
        report = replay_log(store, candidate)
    finally:
        store.close()

    (change,) = report.changes
    assert (change.old_decision, change.new_decision) == ("allow", "deny")
    assert change.new_reason_code == "condition_error"
    assert change.unrecorded_limits == ("refunds_today",)
    assert report.unrecorded == {"refunds_today": 1}
    text = format_change(change)
    assert text.endswith("; not recorded, so failed closed: refunds_today")
    assert "recorded limits: refund_total_week count 0, sum 0" in text
    assert any(
        line.startswith("limit refunds_today: not recorded by 1 replayed record")
        for line in format_report(report)
    )


def test_a_limit_recorded_with_an_error_is_named_unrecorded(tmp_path):
    """An entry that says why the decision had no value is no value to
    replay with: the limit is unrecorded, as one with no entry."""
    record = limited_record(tmp_path, 0)
    errored = msgspec.structs.replace(
        record.limits["refunds_today"], error="the central store is out of touch"
    )
    record = msgspec.structs.replace(
        record, limits={**record.limits, "refunds_today": errored}
    )
    candidate = load_policies(limits_policies(tmp_path / "candidate"))

    recorded, unrecorded = unrecorded_limits(record, candidate)

    assert "refunds_today" in unrecorded
    assert "refunds_today" not in recorded
    assert "refund_total_week" in recorded


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("key: [user]", "key: [agent]"),
        ("{calendar: day, time_zone: Europe/Berlin}", "{rolling: 1h}"),
        ("ceiling: 5\n", "ceiling: 5\n    scope: fleet\n"),
    ],
    ids=["key", "window", "scope"],
)
def test_a_limit_defined_otherwise_is_not_replayed_with_the_recorded_count(
    tmp_path, old, new
):
    record = limited_record(tmp_path, 5)
    root = limits_policies(tmp_path / "candidate")
    text = (root / "refunds.yaml").read_text()
    assert old in text
    (root / "refunds.yaml").write_text(text.replace(old, new, 1))
    candidate = load_policies(root)
    store = AuditStore.open(tmp_path / "audit")
    try:
        store.append_batch([record])
        report = replay_log(store, candidate)
    finally:
        store.close()

    assert report.unrecorded == {"refunds_today": 1}
