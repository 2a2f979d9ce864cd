"""Taking on a daemon whose log was pruned before the collector first saw it
(it ran without a store, or the store lost its data): its first segment
does not start at 0, so it is refused as a ``gap`` naming the procedure;
``kynara-sidecar new-chain --force`` on the daemon starts a log at 0 whose
first record is a chain_break naming the pruned one, and the collector
takes the daemon on from it. On real logs pruned as retention prunes them,
a real state in tmp_path, and end to end through a running collector fed
by a real dir:// store and the real ``kynara-sidecar new-chain`` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from support import REPO_ROOT, SHIPPED_CONFIG

from kynara_sidecar.audit.keys import save_signing_key
from kynara_sidecar.audit.newchain import start_new_chain
from kynara_sidecar.audit.startup import AuditKeys
from kynara_sidecar.audit.store import AuditStore
from kynara_sidecar.collector.verifier import AlertKind, Verdict

from ._logs import ORIGIN, append_sealed, segments_of, write_log
from .test_collector import (
    dir_store,
    pull_config,
    ship,
    wait_for_a_failed_pull,
    write_config,
)
from .test_verifier import feed, verdicts

ACCEPTED = (Verdict.ACCEPTED, None)
T0 = 1_796_378_400 * 10**9  # 2026-12-04T10:00:00Z


def _pruned_log(tmp_path):
    """A log of 12 records sealed every 4, records 1..8 pruned (as
    retention prunes them on a daemon that ships nowhere)."""
    log = write_log(tmp_path / "log", 12)
    store = AuditStore.open(log.path)
    try:
        assert store.prune(8) == 8
    finally:
        store.close()
    return log


def _new_chain(log) -> str:
    """``kynara-sidecar new-chain --force`` on the log (what the command
    calls); the log now is the new one, its id returned."""
    done = start_new_chain(
        log.path,
        AuditKeys(log.key, None, log.trusted),
        origin=ORIGIN,
        now_nanos=T0,
        force=True,
    )
    assert done.old_log_id == log.log_id
    log.log_id = done.new_log_id
    return done.new_log_id


def test_pruned_log_alone_is_a_gap_that_names_the_procedure(tmp_path, state):
    log = _pruned_log(tmp_path)
    shipped = segments_of(log.path, after=8)  # the shipper resumes at the seam

    (outcome,) = feed(state, shipped, log.trusted)

    assert (outcome.verdict, outcome.kind) == (Verdict.REFUSED, AlertKind.GAP)
    assert "records 1..8 never reached the collector" in outcome.message
    assert "kynara-sidecar new-chain --force" in outcome.message
    assert [a.kind for a in state.alerts(ORIGIN)] == ["gap"]
    # Nothing accepted, nothing refused for good: the frontier is still empty.
    frontier = state.frontier(ORIGIN)
    assert (frontier.log_id, frontier.tree_size, frontier.refused) == ("", 0, "")


def test_each_segment_of_the_pruned_log_is_a_gap(tmp_path, state):
    log = _pruned_log(tmp_path)
    append_sealed(log, 13, 4)

    outcomes = feed(state, segments_of(log.path, after=8), log.trusted)

    assert verdicts(outcomes) == [(Verdict.REFUSED, AlertKind.GAP)] * 2
    assert not any(o.sticky for o in outcomes)
    assert [a.kind for a in state.alerts(ORIGIN)] == ["gap", "gap"]


def test_after_new_chain_the_daemon_is_taken_on_from_the_new_log(tmp_path, state):
    log = _pruned_log(tmp_path)
    old_log = log.log_id
    feed(state, segments_of(log.path, after=8), log.trusted)

    new_log = _new_chain(log)
    append_sealed(log, 2, 4)
    outcomes = feed(state, segments_of(log.path), log.trusted)

    assert verdicts(outcomes) == [ACCEPTED, ACCEPTED]
    frontier = state.frontier(ORIGIN)
    assert (frontier.log_id, frontier.tree_size, frontier.refused) == (new_log, 5, "")
    assert frontier.previous_logs == [old_log]
    # The gap stays on record.
    assert [a.kind for a in state.alerts(ORIGIN)] == ["gap"]


def test_old_log_sent_after_the_new_chain_is_refused(tmp_path, state):
    log = _pruned_log(tmp_path)
    old_log = log.log_id
    (old_segment,) = segments_of(log.path, after=8)
    feed(state, [old_segment], log.trusted)
    _new_chain(log)
    feed(state, segments_of(log.path), log.trusted)

    (outcome,) = feed(state, [old_segment], log.trusted)

    assert (outcome.verdict, outcome.kind) == (
        Verdict.REFUSED,
        AlertKind.DUPLICATE_DAEMON,
    )
    assert f"a segment of log {old_log}, ended by a chain break" in outcome.message
    # Alerted, not sticky: an ended log cannot touch the current one.
    assert state.frontier(ORIGIN).refused == ""


def test_new_chain_before_anything_was_shipped_is_taken_on(tmp_path, state):
    # The operator started the new chain before turning shipping on: the
    # collector never sees the pruned log, and still records the lineage.
    log = _pruned_log(tmp_path)
    old_log = log.log_id
    new_log = _new_chain(log)

    (outcome,) = feed(state, segments_of(log.path), log.trusted)

    assert outcome.verdict == Verdict.ACCEPTED
    frontier = state.frontier(ORIGIN)
    assert (frontier.log_id, frontier.previous_logs) == (new_log, [old_log])


def test_a_gap_before_anything_was_accepted_does_not_stop_the_log_from_zero(
    tmp_path, state
):
    # Segments that arrive out of order at first (a store that delivered
    # the last one early): once the log comes from 0, it is taken on whole.
    log = write_log(tmp_path / "log", 12)
    whole = segments_of(log.path)

    outcomes = feed(state, [whole[2], *whole], log.trusted)

    assert verdicts(outcomes) == [(Verdict.REFUSED, AlertKind.GAP)] + [ACCEPTED] * 3
    assert state.frontier(ORIGIN).tree_size == 12


def _new_chain_cli(log) -> subprocess.CompletedProcess:
    key_file = log.path.parent / "audit-key.pem"
    if not key_file.exists():
        save_signing_key(log.key, key_file)
    env = {k: v for k, v in os.environ.items() if k != "KYNARA_CONFIG"}
    return subprocess.run(
        [
            sys.executable, "-m", "kynara_sidecar.cli", "new-chain", "--force",
            "--config", str(SHIPPED_CONFIG),
            "--set", f"audit.path={log.path}",
            "--set", f"audit.signing_key={key_file}",
            "--set", "audit.witness_path=",
            "--set", f"identity.daemon_id={ORIGIN}",
        ],
        capture_output=True, text=True, timeout=60, cwd=REPO_ROOT, env=env,
    )  # fmt: skip


def test_running_collector_takes_on_a_pruned_daemon_after_new_chain_command(
    tmp_path, start_collector
):
    log = _pruned_log(tmp_path)
    old_log = log.log_id
    store_url = dir_store(tmp_path)
    config = write_config(tmp_path, log, store={"url": store_url, "poll_seconds": 0.05})
    collector = start_collector(config)
    ship(store_url, log.path, after=8)
    found = collector.wait_for(lambda d: d["alerts"], "the gap")
    assert [a["kind"] for a in found["alerts"]] == ["gap"]
    assert "kynara-sidecar new-chain --force" in found["alerts"][0]["message"]

    result = _new_chain_cli(log)

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("new chain ")
    store = AuditStore.open(log.path, readonly=True)
    try:
        log.log_id = store.log_id
    finally:
        store.close()
    append_sealed(log, 2, 4)
    ship(store_url, log.path)
    found = collector.wait_for(lambda d: d["tree_size"] == 5, "the new chain")
    assert (found["log_id"], found["previous_logs"], found["refused"]) == (
        log.log_id,
        [old_log],
        "",
    )
    _, body = collector.get(f"/records?daemon={ORIGIN}&from=1&to=5")
    kinds = [json.loads(line)["kind"] for line in body.splitlines()]
    assert kinds == ["chain_break"] + ["decision"] * 4


def test_pulling_collector_takes_on_a_pruned_daemon_after_new_chain_command(
    tmp_path, start_collector, admin_server
):
    # A pull from 0 fails while the daemon's log is pruned (its
    # AuditService has no records 1..8 to stream): nothing is refused.
    log = _pruned_log(tmp_path)
    old_log = log.log_id
    server = admin_server(log.path)
    collector = start_collector(pull_config(tmp_path, log, server))
    wait_for_a_failed_pull(collector)
    assert (collector.daemon()["tree_size"], collector.daemon()["refused"]) == (0, "")

    server.close_log()
    result = _new_chain_cli(log)
    assert result.returncode == 0, result.stderr
    log.log_id = result.stdout.split()[2]
    append_sealed(log, 2, 4)
    server.open_log()
    found = collector.wait_for(lambda d: d["tree_size"] == 5, "the new chain")

    assert (found["log_id"], found["previous_logs"], found["alerts"]) == (
        log.log_id,
        [old_log],
        [],
    )
