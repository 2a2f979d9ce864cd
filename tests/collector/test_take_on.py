"""Taking a daemon on from the log an operator names (``kynara-collector
daemons clear ID --reason R --take-on-new-log LOG_ID``), after an old log of
it was replayed to the collector before anything else of it arrived.

The daemon wrote log L0, then ran ``new-chain`` twice (L1, then L2, whose
chain_break names L1). A store writer holding L0's first segment sends it
first: trust on first use takes L0 on, and L2 is a ``duplicate_daemon``
however often it is cleared. On real signed logs, a real state in tmp_path,
and end to end through a running collector fed by a real dir:// store."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from dataclasses import dataclass

import pytest
from kynara.v1 import audit_pb2 as pb

from kynara_sidecar.audit.newchain import start_new_chain
from kynara_sidecar.audit.startup import AuditKeys
from kynara_sidecar.collector.http import daemons_json
from kynara_sidecar.collector.registry import DaemonRegistry
from kynara_sidecar.collector.state import NotRefused, StateError
from kynara_sidecar.collector.verifier import AlertKind, SegmentData, Verdict

from ._logs import ORIGIN, append_sealed, messages_of, segments_of, write_log
from .test_collector import dir_store, ship_messages, write_config
from .test_verifier import feed, verdicts

ACCEPTED = (Verdict.ACCEPTED, None)
DUPLICATE_DAEMON = (Verdict.REFUSED, AlertKind.DUPLICATE_DAEMON)
T0 = 1_796_378_400 * 10**9  # 2026-12-04T10:00:00Z
REASON = "L0 replayed before L2 arrived; OPS-13"


@dataclass
class Lineage:
    """A daemon's three logs and the segments kept of each."""

    log: object  # the SealedLog, now writing the newest log
    ids: list[str]  # L0, L1, L2
    segments: list[list[SegmentData]]
    # The same as the shipper sends them, in messages of 600 bytes or less.
    messages: list[list[pb.Segment]]


def _new_chain(log, offset: int) -> str:
    """``kynara-sidecar new-chain --force`` on the log (what the command
    calls); the log now is the new one, its id returned."""
    done = start_new_chain(
        log.path,
        AuditKeys(log.key, None, log.trusted),
        origin=ORIGIN,
        now_nanos=T0 + offset * 10**9,
        force=True,
    )
    log.log_id = done.new_log_id
    return done.new_log_id


def _lineage(tmp_path) -> Lineage:
    log = write_log(tmp_path / "log", 8)
    ids = [log.log_id]
    segments, messages = [segments_of(log.path)], [messages_of(log.path, 0, 600)]
    for n in (1, 2):
        ids.append(_new_chain(log, n))
        append_sealed(log, 2, 4, tag=f"L{n} ")
        segments.append(segments_of(log.path))
        messages.append(messages_of(log.path, 0, 600))
    return Lineage(log, ids, segments, messages)


def _replayed(tmp_path, state) -> Lineage:
    """The repro: L0's first segment sent first, then L2, refused."""
    lineage = _lineage(tmp_path)
    trusted = lineage.log.trusted
    assert verdicts(feed(state, lineage.segments[0][:1], trusted)) == [ACCEPTED]
    assert verdicts(feed(state, lineage.segments[2][:1], trusted)) == [DUPLICATE_DAEMON]
    return lineage


def test_replayed_old_log_locks_the_daemon_out_without_the_take_on(tmp_path, state):
    lineage = _replayed(tmp_path, state)
    l0, _, l2 = lineage.ids
    assert state.frontier(ORIGIN).refused == "duplicate_daemon"

    state.clear_refusal(ORIGIN)
    outcomes = feed(state, lineage.segments[2], lineage.log.trusted)

    # A plain clear changes nothing: L2's chain_break names L1, not L0.
    assert verdicts(outcomes)[0] == DUPLICATE_DAEMON
    assert f"log {l2} (tree size 1) while log {l0} is current" in outcomes[0].message
    frontier = state.frontier(ORIGIN)
    assert (frontier.log_id, frontier.tree_size, frontier.refused) == (
        l0,
        4,
        "duplicate_daemon",
    )
    assert (frontier.take_on_log, frontier.previous_logs) == ("", [])


def test_take_on_new_log_takes_the_daemon_on_from_the_named_log(
    tmp_path, state, caplog
):
    lineage = _replayed(tmp_path, state)
    l0, l1, l2 = lineage.ids

    cleared = state.clear_refusal(ORIGIN, take_on_log=l2, reason=REASON)

    assert (cleared.refused, cleared.take_on_log, cleared.ended_log) == (
        "duplicate_daemon",
        l2,
        l0,
    )
    with caplog.at_level(logging.INFO, logger="kynara.collector"):
        outcomes = feed(state, lineage.segments[2], lineage.log.trusted)

    assert verdicts(outcomes) == [ACCEPTED, ACCEPTED]
    frontier = state.frontier(ORIGIN)
    assert (frontier.log_id, frontier.tree_size, frontier.refused) == (l2, 5, "")
    assert frontier.previous_logs == [l0, l1]
    assert (frontier.take_on_log, frontier.take_on_reason) == ("", "")
    assert outcomes[0].taken_on is not None and outcomes[1].taken_on is None
    (line,) = [
        r for r in caplog.records if r.getMessage().startswith("daemon taken on")
    ]
    assert line.levelname == "INFO"
    assert line.fields["reason"] == REASON
    assert (line.fields["log_id"], line.fields["chain_break_names"]) == (l2, l1)
    assert line.fields["previous_logs"] == [l0, l1]


def test_a_waiting_take_on_may_name_another_log_and_shows(tmp_path, state):
    lineage = _replayed(tmp_path, state)
    l0, l1, l2 = lineage.ids
    state.clear_refusal(ORIGIN, take_on_log=l1, reason="mistyped")

    # Not refused now, yet the waiting take-on may be pointed elsewhere.
    cleared = state.clear_refusal(ORIGIN, take_on_log=l2, reason=REASON)
    shown = daemons_json(state, DaemonRegistry.exact({ORIGIN: lineage.log.trusted}))
    outcomes = feed(state, lineage.segments[2], lineage.log.trusted)

    assert cleared.take_on_log == l2
    (daemon,) = shown["daemons"]
    assert daemon["take_on_log"] == l2
    assert verdicts(outcomes) == [ACCEPTED, ACCEPTED]
    assert state.frontier(ORIGIN).log_id == l2
    with pytest.raises(NotRefused):
        state.clear_refusal(ORIGIN, take_on_log=l1, reason=REASON)


def test_old_logs_sent_after_the_take_on_are_refused(tmp_path, state):
    lineage = _replayed(tmp_path, state)
    l0, l1, _ = lineage.ids
    trusted = lineage.log.trusted
    state.clear_refusal(ORIGIN, take_on_log=lineage.ids[2], reason=REASON)
    feed(state, lineage.segments[2], trusted)

    (l0_next,) = feed(state, lineage.segments[0][1:], trusted)
    assert verdicts([l0_next]) == [DUPLICATE_DAEMON]
    assert f"log {l0}, ended by an operator's take-on" in l0_next.message
    # Alerted, not sticky: no clear before the next one is judged.
    (l1_first,) = feed(state, lineage.segments[1][:1], trusted)
    assert verdicts([l1_first]) == [DUPLICATE_DAEMON]
    assert f"log {l1}, ended by a chain break" in l1_first.message
    # The segment of L0 accepted before is still only a duplicate.
    assert verdicts(feed(state, lineage.segments[0][:1], trusted)) == [
        (Verdict.DUPLICATE, None)
    ]
    assert (state.frontier(ORIGIN).tree_size, state.frontier(ORIGIN).refused) == (
        5,
        "",
    )


def test_ended_log_sent_while_the_take_on_waits_is_refused(tmp_path, state):
    lineage = _replayed(tmp_path, state)
    l0, _, l2 = lineage.ids
    trusted = lineage.log.trusted
    state.clear_refusal(ORIGIN, take_on_log=l2, reason=REASON)

    (outcome,) = feed(state, lineage.segments[0][1:], trusted)

    # L0 5..8 extends what was accepted, but the operator ended L0.
    assert verdicts([outcome]) == [DUPLICATE_DAEMON]
    assert (
        f"ended by an operator's take-on, while the daemon waits to be taken "
        f"on from log {l2} ({REASON})"
    ) in outcome.message
    frontier = state.frontier(ORIGIN)
    # Alerted, not sticky: the take-on keeps waiting, no clear needed.
    assert (frontier.tree_size, frontier.refused, frontier.take_on_log) == (4, "", l2)
    assert verdicts(feed(state, lineage.segments[2], trusted)) == [ACCEPTED] * 2
    assert state.frontier(ORIGIN).log_id == l2


def test_named_log_is_never_taken_on_from_its_middle(tmp_path, state):
    lineage = _replayed(tmp_path, state)
    trusted = lineage.log.trusted
    state.clear_refusal(ORIGIN, take_on_log=lineage.ids[2], reason=REASON)

    (middle,) = feed(state, lineage.segments[2][1:], trusted)

    assert (middle.verdict, middle.kind, middle.sticky) == (
        Verdict.REFUSED,
        AlertKind.GAP,
        False,
    )
    assert "taken on only from 0: records 1..1 never reached" in middle.message
    frontier = state.frontier(ORIGIN)
    assert (frontier.log_id, frontier.refused, frontier.take_on_log) == (
        lineage.ids[0],
        "",
        lineage.ids[2],
    )
    # The gap did not stick: the log from 0 is taken on after it.
    assert verdicts(feed(state, lineage.segments[2], trusted)) == [ACCEPTED] * 2


def test_a_log_other_than_the_named_one_is_judged_as_before(tmp_path, state):
    lineage = _replayed(tmp_path, state)
    state.clear_refusal(ORIGIN, take_on_log=lineage.ids[2], reason=REASON)
    # Another log from 0 under the same key, with no chain_break.
    other = write_log(tmp_path / "other", 4, key=lineage.log.key)

    outcomes = feed(state, segments_of(other.path), lineage.log.trusted)

    assert verdicts(outcomes) == [DUPLICATE_DAEMON]
    assert state.frontier(ORIGIN).take_on_log == lineage.ids[2]


@pytest.mark.parametrize(
    ("which", "expected"),
    [
        ("l0", "already used that log (it is its accepted log)"),
        ("short", "expected a log id of 32 lowercase hex digits"),
    ],
)
def test_take_on_of_a_log_not_new_is_refused_and_nothing_changes(
    tmp_path, state, which, expected
):
    lineage = _replayed(tmp_path, state)
    before = state.frontier(ORIGIN)
    log_id = lineage.ids[0] if which == "l0" else "abc"

    with pytest.raises(StateError, match=re.escape(expected)):
        state.clear_refusal(ORIGIN, take_on_log=log_id, reason=REASON)

    assert state.frontier(ORIGIN) == before


def test_ended_log_cannot_be_named_again(tmp_path, state):
    lineage = _replayed(tmp_path, state)
    l0, _, l2 = lineage.ids
    state.clear_refusal(ORIGIN, take_on_log=l2, reason=REASON)
    feed(state, lineage.segments[0][1:], lineage.log.trusted)  # alerted

    with pytest.raises(
        StateError,
        match=f"take-on-new-log {l0}: .* already used that log \\(it is ended\\)",
    ):
        state.clear_refusal(ORIGIN, take_on_log=l0, reason=REASON)

    assert state.frontier(ORIGIN).take_on_log == l2


def _clear_cli(config, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable, "-m", "kynara_sidecar.collector.cli",
            "daemons", "clear", ORIGIN, "--config", str(config), *extra,
        ],
        capture_output=True, timeout=60,
    )  # fmt: skip


def test_running_collector_takes_on_the_new_chain_after_the_cli_take_on(
    tmp_path, start_collector, caplog
):
    # Through a store, L2's first segment was consumed when it was refused:
    # the daemon starts a new chain (L3, naming L2), and the operator names
    # L3 for the take-on.
    lineage = _lineage(tmp_path)
    l0, _, l2 = lineage.ids
    store_url = dir_store(tmp_path)
    config = write_config(
        tmp_path, lineage.log, store={"url": store_url, "poll_seconds": 0.05}
    )
    collector = start_collector(config)
    ship_messages(
        store_url, [m for m in lineage.messages[0] if m.previous_tree_size == 0]
    )
    collector.wait_for(lambda d: d["tree_size"] == 4, "L0's replayed segment")
    ship_messages(store_url, lineage.messages[2])
    found = collector.wait_for(lambda d: d["refused"], "the refusal of L2")
    assert (found["log_id"], found["refused"]) == (l0, "duplicate_daemon")
    l3 = _new_chain(lineage.log, 3)
    append_sealed(lineage.log, 2, 4, tag="L3 ")

    result = _clear_cli(config, "--reason", REASON, "--take-on-new-log", l3)

    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert (printed["take_on_log"], printed["ended_log"], printed["reason"]) == (
        l3,
        l0,
        REASON,
    )
    (line,) = [json.loads(x) for x in result.stderr.splitlines()]
    assert (line["level"], line["take_on_log"], line["ended_log"]) == ("info", l3, l0)
    with caplog.at_level(logging.INFO, logger="kynara.collector"):
        ship_messages(store_url, messages_of(lineage.log.path, 0, 600))
        found = collector.wait_for(lambda d: d["tree_size"] == 5, "L3 taken on")
    assert (found["log_id"], found["previous_logs"], found["refused"]) == (
        l3,
        [l0, l2],
        "",
    )
    taken = [r for r in caplog.records if r.getMessage().startswith("daemon taken on")]
    assert [(r.fields["log_id"], r.fields["reason"]) for r in taken] == [(l3, REASON)]
