"""SIGKILL during a burst of counted decisions (issue #13): the limits rows
are written in the transaction of the record that counts, so a crash cannot
leave the counters and the log disagreeing.

Each round drives the CLI daemon (durable audit, the default; the shipped
policies plus two limits every allowed refund counts) from client threads,
SIGKILLs it after a set time, and then, with no daemon running, checks the
log from outside: every answered decision is in it, the limits rows are
exactly the counted entries of the records, and ``check_limits`` recomputes
every seen count and sum. A restarted daemon on the same log must continue
the counts: its first decision sees what the log says. After the last round
the daemon stops with SIGTERM and ``kynara-sidecar verify`` passes.
"""

from __future__ import annotations

import pathlib
import time

import pytest
from fault_helpers import (
    CALL_TIMEOUT,
    Answer,
    DaemonProcess,
    ThreadedLoad,
    log_problems,
    verify_cli,
)
from limits_support import policy_dir, refund_limits
from support import small_refund

from kynara_sidecar.audit.chain import decode_record
from kynara_sidecar.audit.counters import LIMITS_DB, decode_row, rows_of
from kynara_sidecar.audit.record import AuditRecordV1, decode_value, parse_timestamp
from kynara_sidecar.audit.store import AuditStore
from kynara_sidecar.audit.verify import check_limits, recompute_totals

COUNT, TOTAL = "refunds_per_user", "refund_total"
ALICE, SUPPORT_BOT = '["alice"]', '["support-bot"]'
# The kill moments, seconds of load after the daemon serves: early in the
# burst, and after many group commits. Three rounds keep the test near ten
# seconds.
KILL_AFTER = (0.3, 0.7, 1.1)
CLIENT_THREADS = 4
# About 900 decisions a round at ~4 KiB each; room for every round.
MAP_SIZE = "audit.map_size=268435456"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def policies(root: pathlib.Path) -> pathlib.Path:
    """The shipped policies plus a count per user over a rolling day and a
    week's total per agent, both with ceilings no burst reaches: every
    allowed refund counts in both."""
    limits = refund_limits(
        count=COUNT,
        window="{rolling: 1d}",
        ceiling=1_000_000_000,
        count_rule="refunds-per-user",
        total=TOTAL,
        total_ceiling=1_000_000_000_000,
    )
    return policy_dir(root, {"refund-limits.yaml": limits})


def nanos(text: str) -> int:
    stamp = parse_timestamp(text)
    return stamp.seconds * 1_000_000_000 + stamp.nanos


def read_log(audit: pathlib.Path):
    """(seq, record) of every record, the limits rows, and check_limits'
    report; opened read-only."""
    store = AuditStore.open(audit, readonly=True, extra_dbs=(LIMITS_DB,))
    try:
        with store.reading():
            records = [
                (s.seq, decode_record(s.record_bytes)) for s in store.iter_records()
            ]
            rows = sorted(decode_row(k, v) for k, v in store.iter_state(LIMITS_DB))
            report = check_limits(store)
        return records, rows, report
    finally:
        store.close()


def burst_and_kill(daemon: DaemonProcess, seconds: float, prefix: str) -> list[Answer]:
    """Drive the daemon from client threads for ``seconds``, SIGKILL it,
    return what the clients saw answered.

    Raises:
        AssertionError: a call failed before the kill, or was refused with
            a kynara error code.
    """
    load = ThreadedLoad(daemon.target, CLIENT_THREADS, prefix).start()
    time.sleep(seconds)
    killed_at = time.monotonic()
    daemon.kill()
    load.stop()
    refused = [e for e in load.errors if e.at < killed_at or e.code]
    assert refused == [], f"{prefix}: calls failed while the daemon ran"
    assert load.answers, f"{prefix}: nothing answered in {seconds} s"
    return load.answers


def assert_counters_are_the_log(audit: pathlib.Path, answers, where: str) -> int:
    """The log holds every answer; its rows are its records' counted
    entries; every seen value recomputes. Returns how many rows."""
    assert log_problems(audit, answers) == [], where
    records, rows, report = read_log(audit)
    expected = sorted(decode_row(k, v) for _, r in records for k, v in rows_of(r))
    assert rows == expected, f"{where}: the limits rows differ from the records"
    assert report.ok, f"{where}: {report.mismatches[:3]}"
    assert report.counted == len(rows) and report.not_checkable == 0
    return len(rows)


def probe_sees_the_log(daemon: DaemonProcess, audit: pathlib.Path, rid: str):
    """A restarted daemon's first decision: its seen count and sum must be
    what the records before it counted in its window."""
    request = small_refund()
    request.request_id = rid
    answer = daemon.stub().Decide(request, timeout=CALL_TIMEOUT)
    records, _, _ = read_log(audit)
    before = [r for seq, r in records if seq < answer.audit_sequence]
    probe: AuditRecordV1 = dict(records)[answer.audit_sequence]
    assert probe.decision_id == answer.decision_id
    for name, key in ((COUNT, ALICE), (TOTAL, SUPPORT_BOT)):
        entry = probe.limits[name]
        since = nanos(entry.window_start)
        group = (name, entry.definition, key)
        count, total = recompute_totals(before, since).get(group, (0, 0))
        assert entry.key == key
        assert entry.count == count, f"{rid}: {name} saw {entry.count}, log {count}"
        if name == TOTAL:
            assert decode_value(entry.sum) == total, f"{rid}: {name} saw another sum"
        else:
            # A counting limit's record holds no sum: the count is all.
            assert entry.sum is None
        assert entry.counted
    return answer, probe


def test_sigkill_mid_burst_leaves_the_limits_rows_equal_to_the_log(tmp_path):
    socket, audit = tmp_path / "agent.sock", tmp_path / "audit"
    log_path = tmp_path / "daemon.log"
    overrides = (f"policy.source={policies(tmp_path / 'policies')}", MAP_SIZE)
    seen: list[Answer] = []
    rows_after: list[int] = []
    daemon = DaemonProcess(socket, audit, log_path, *overrides)
    try:
        for n, seconds in enumerate(KILL_AFTER):
            daemon.wait_serving()
            seen += burst_and_kill(daemon, seconds, prefix=f"r{n}")
            daemon.close()
            rows_after.append(
                assert_counters_are_the_log(audit, seen, f"after kill {n}")
            )
            daemon = DaemonProcess(socket, audit, log_path, *overrides)
            daemon.wait_serving()
            answer, probe = probe_sees_the_log(daemon, audit, f"probe-{n}")
            seen.append(
                Answer(
                    f"probe-{n}",
                    answer.decision_id,
                    answer.audit_sequence,
                    answer.record_hash,
                )
            )
            # Nothing was counted between the kill and the probe.
            assert probe.limits[COUNT].count == rows_after[-1] // 2
        exit_code = daemon.terminate()
    finally:
        daemon.close()

    assert exit_code == 0, daemon.log_text()
    print(f"{len(seen)} answers; limits rows after each kill: {rows_after}")
    assert rows_after == sorted(rows_after) and rows_after[0] > 0
    total_rows = assert_counters_are_the_log(audit, seen, "after SIGTERM")
    # Every row is a (count, sum) pair of one allowed refund.
    records, _, _ = read_log(audit)
    allowed = [r for _, r in records if r.kind == "decision" and r.decision == "allow"]
    assert total_rows == 2 * len(allowed)
    checked = verify_cli(audit)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.startswith("ok: ")
    assert f"limits: {total_rows} rows stored for {total_rows} counted" in (
        checked.stdout
    )
