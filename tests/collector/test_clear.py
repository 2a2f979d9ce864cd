"""Clearing a daemon's sticky refusal (``kynara-collector daemons clear``):
on a real state in tmp_path, and end to end beside a running collector fed
through a real dir:// store."""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys

import pytest

from kynara_sidecar.collector.cli import _build_parser
from kynara_sidecar.collector.state import (
    CollectorState,
    HeldSegment,
    NotRefused,
    StateError,
)
from kynara_sidecar.collector.verifier import AlertKind, Verdict, refusal

from ._logs import (
    ORIGIN,
    append_sealed,
    messages_of,
    restore_copy,
    segments_of,
    write_log,
)
from .test_collector import dir_store, ship_messages, write_config
from .test_verifier import T, feed, verdicts

ACCEPTED = (Verdict.ACCEPTED, None)


def _gap(tmp_path, state):
    """Segments 1..4 accepted, 9..12 refused as a gap (5..8 never came)."""
    log = write_log(tmp_path / "log", 12)
    whole = segments_of(log.path)
    feed(state, [whole[0], whole[2]], log.trusted)
    assert state.frontier(ORIGIN).refused == "gap"
    return log, whole


def test_clear_lifts_a_gap_and_the_next_segment_is_judged_afresh(tmp_path, state):
    log, whole = _gap(tmp_path, state)
    # Refused while the gap stands, however good the segment.
    assert verdicts(feed(state, [whole[1]], log.trusted)) == [
        (Verdict.REFUSED, AlertKind.GAP)
    ]

    cleared = state.clear_refusal(ORIGIN)

    assert (cleared.daemon_id, cleared.refused) == (ORIGIN, "gap")
    assert "records 5..8 never arrived" in cleared.refused_reason
    assert (cleared.log_id, cleared.tree_size) == (log.log_id, 4)
    assert verdicts(feed(state, whole[1:], log.trusted)) == [ACCEPTED, ACCEPTED]
    frontier = state.frontier(ORIGIN)
    assert (frontier.tree_size, frontier.refused, frontier.refused_reason) == (
        12,
        "",
        "",
    )
    # The alert stays for the record.
    assert [a.kind for a in state.alerts(ORIGIN)] == ["gap"]


def test_cleared_fork_is_refused_again_by_the_forked_segment(tmp_path, state):
    log = write_log(tmp_path / "log", 8)
    copy = tmp_path / "copy"
    shutil.copytree(log.path, copy)
    append_sealed(log, 9, 4)
    feed(state, segments_of(log.path), log.trusted)
    restore_copy(copy, log.path)
    append_sealed(log, 9, 4, tag="rewritten ")
    forked = segments_of(log.path, after=8)
    feed(state, forked, log.trusted)
    assert state.frontier(ORIGIN).refused == "fork"

    state.clear_refusal(ORIGIN)
    (again,) = feed(state, forked, log.trusted)

    assert (again.verdict, again.kind, again.sticky) == (
        Verdict.REFUSED,
        AlertKind.FORK,
        False,
    )
    assert state.frontier(ORIGIN).refused == "fork"
    assert state.frontier(ORIGIN).tree_size == 12
    assert [a.kind for a in state.alerts(ORIGIN)] == ["fork", "fork"]


@pytest.mark.parametrize("daemon_id", [ORIGIN, "never-seen"])
def test_clear_of_a_daemon_not_refused_is_refused_naming_it(tmp_path, state, daemon_id):
    log = write_log(tmp_path / "log", 4)
    feed(state, segments_of(log.path), log.trusted)
    before = state.frontier(ORIGIN)

    with pytest.raises(NotRefused, match=f"daemon '{daemon_id}' is not refused"):
        state.clear_refusal(daemon_id)

    assert state.frontier(ORIGIN) == before


def test_refusal_judged_before_a_clear_does_not_undo_it(tmp_path, state):
    # The collector judged junk against the refused frontier, then the
    # operator cleared, then the collector committed its alert.
    _gap(tmp_path, state)
    judged = refusal(state.frontier(ORIGIN), AlertKind.MALFORMED, "no segment")

    state.clear_refusal(ORIGIN)
    state.commit(ORIGIN, judged, time=T, keep_held=True)

    assert state.frontier(ORIGIN).refused == ""
    assert [a.kind for a in state.alerts(ORIGIN)] == ["gap", "malformed"]


def test_clear_drops_a_segment_kept_in_assembly(tmp_path, state):
    _gap(tmp_path, state)
    state.hold(
        ORIGIN,
        HeldSegment(
            checkpoint_json=b"{}", previous_tree_size=4, first_seq=5, tree_size=8
        ),
    )

    cleared = state.clear_refusal(ORIGIN)

    assert cleared.dropped_held
    assert state.held(ORIGIN) is None


def test_read_only_state_cannot_be_cleared(tmp_path, state):
    _gap(tmp_path, state)
    state.close()
    readonly = CollectorState.open(tmp_path / "state", map_size=1 << 26, readonly=True)
    try:
        with pytest.raises(StateError, match="cannot be written"):
            readonly.clear_refusal(ORIGIN)
        assert readonly.frontier(ORIGIN).refused == "gap"
    finally:
        readonly.close()


@pytest.mark.parametrize(
    "argv",
    [
        ["daemons", "clear", "bot-7", "--config", "c.yaml", "--reason", "OPS-1"],
        ["daemons", "--config", "c.yaml", "clear", "bot-7", "--reason", "OPS-1"],
    ],
)
def test_clear_takes_the_config_before_or_after_the_subcommand(argv):
    args = _build_parser().parse_args([*argv, "--set", "state.map_size=1"])

    assert (args.daemons_command, args.daemon_id, args.reason) == (
        "clear",
        "bot-7",
        "OPS-1",
    )
    assert (args.config, args.overrides) == ("c.yaml", ["state.map_size=1"])


def test_daemons_without_a_subcommand_still_lists():
    args = _build_parser().parse_args(["daemons", "--config", "c.yaml"])

    assert (args.daemons_command, args.config, args.overrides) == (
        None,
        "c.yaml",
        [],
    )


def _clear_cli(config: pathlib.Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable, "-m", "kynara_sidecar.collector.cli",
            "daemons", "clear", ORIGIN, "--config", str(config), *extra,
        ],
        capture_output=True, timeout=60,
    )  # fmt: skip


def test_clear_beside_a_running_collector_resumes_the_daemon(tmp_path, start_collector):
    log = write_log(tmp_path / "log", 12)
    messages = messages_of(log.path, 0, 600)
    by_start = {
        p: [m for m in messages if m.previous_tree_size == p] for p in (0, 4, 8)
    }
    store_url = dir_store(tmp_path)
    config = write_config(tmp_path, log, store={"url": store_url, "poll_seconds": 0.05})
    collector = start_collector(config)
    ship_messages(store_url, by_start[0] + by_start[8])
    collector.wait_for(lambda d: d["refused"] == "gap", "the gap")

    result = _clear_cli(config, "--reason", "segment 5..8 was lost in transit")

    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert (printed["daemon_id"], printed["refused"], printed["tree_size"]) == (
        ORIGIN,
        "gap",
        4,
    )
    (line,) = [json.loads(x) for x in result.stderr.splitlines()]
    assert (line["level"], line["msg"], line["daemon_id"], line["refused"]) == (
        "info",
        "daemon refusal cleared",
        ORIGIN,
        "gap",
    )
    assert line["reason"] == "segment 5..8 was lost in transit"
    assert collector.daemon()["refused"] == ""

    ship_messages(store_url, by_start[4])
    found = collector.wait_for(lambda d: d["tree_size"] == 8, "tree size 8")
    assert (found["refused"], [a["kind"] for a in found["alerts"]]) == ("", ["gap"])

    again = _clear_cli(config, "--reason", "OPS-2")
    assert again.returncode == 1
    assert f"daemon '{ORIGIN}' is not refused" in again.stderr.decode()


def test_clear_on_a_mistyped_state_path_creates_nothing(tmp_path):
    log = write_log(tmp_path / "log", 4)
    config = write_config(tmp_path, log)
    missing = tmp_path / "no-such-state"

    result = _clear_cli(config, "--set", f"state.path={missing}", "--reason", "x")

    assert result.returncode == 1
    assert f"no collector state at {missing}" in result.stderr.decode()
    assert not missing.exists()


def test_clear_needs_a_reason(tmp_path, capsys):
    with pytest.raises(SystemExit) as usage:
        _build_parser().parse_args(["daemons", "clear", "bot-7", "--config", "c.yaml"])

    assert usage.value.code == 2
    assert "--reason" in capsys.readouterr().err


def test_clear_of_an_empty_daemon_id_names_the_id(tmp_path, state):
    _gap(tmp_path, state)

    with pytest.raises(NotRefused, match="expected a daemon id, got an empty one"):
        state.clear_refusal("")

    assert state.frontier(ORIGIN).refused == "gap"


def test_clear_cli_refuses_an_empty_id_or_reason_before_opening_the_state(tmp_path):
    log = write_log(tmp_path / "log", 4)
    config = write_config(tmp_path, log)
    missing = tmp_path / "no-such-state"

    for daemon_id, reason, expected in [
        ("", "OPS-1", "expected a daemon id, got an empty one"),
        (ORIGIN, " ", "--reason is empty"),
    ]:
        result = subprocess.run(
            [
                sys.executable, "-m", "kynara_sidecar.collector.cli",
                "daemons", "clear", daemon_id, "--config", str(config),
                "--set", f"state.path={missing}", "--reason", reason,
            ],
            capture_output=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 1, result.stderr
        assert expected in result.stderr.decode()
        assert "lmdb" not in result.stderr.decode().lower()
