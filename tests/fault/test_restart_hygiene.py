"""Restart hygiene (issue #3): what a crashed daemon leaves behind does not
block the next start, and a second daemon on a live daemon's paths is refused
without touching the live socket or the live audit log.

Every daemon here is the CLI as an operator runs it, in a child process.
"""

from __future__ import annotations

import pathlib

import pytest
from fault_helpers import (
    DaemonProcess,
    ThreadedLoad,
    cli_run_args,
    log_problems,
    marker_events,
    refusal_lines,
    run_cli,
    socket_inode,
    verify_cli,
)


@pytest.fixture
def paths(tmp_path) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path]:
    """The socket, the audit log and the daemon log of the daemon under test."""
    return tmp_path / "agent.sock", tmp_path / "audit", tmp_path / "daemon.log"


@pytest.fixture
def daemons():
    """Start ``DaemonProcess`` es; each one still running is killed at teardown."""
    started: list[DaemonProcess] = []

    def start(*args, **kwargs) -> DaemonProcess:
        daemon = DaemonProcess(*args, **kwargs)
        started.append(daemon)
        daemon.wait_serving()
        return daemon

    yield start
    for daemon in started:
        daemon.close()


def assert_verifies(audit: pathlib.Path) -> None:
    checked = verify_cli(audit)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.startswith("ok: "), checked.stdout


def test_stale_socket_of_a_killed_daemon_does_not_block_restart(paths, daemons):
    socket, audit, log_path = paths
    first = daemons(socket, audit, log_path)
    before = first.decide("before-kill")
    first.kill()
    assert socket.is_socket(), "SIGKILL should leave the socket file behind"

    restarted = daemons(socket, audit, log_path)
    after = restarted.decide("after-restart")

    assert after.audit_sequence > before.audit_sequence
    assert restarted.terminate() == 0
    assert_verifies(audit)


def leave_lock_of_killed_daemon(daemons, socket, audit, log_path) -> None:
    daemons(socket, audit, log_path).kill()
    socket.unlink()


def leave_lock_with_stale_pid(daemons, socket, audit, log_path) -> None:
    # A lock file some earlier run wrote into, as pid-file locks do.
    pathlib.Path(f"{socket}.lock").write_text("4194303\n")


@pytest.mark.parametrize(
    "leave_lock",
    [leave_lock_of_killed_daemon, leave_lock_with_stale_pid],
    ids=["killed-daemon", "stale-pid-content"],
)
def test_stale_socket_lock_file_does_not_block_restart(paths, daemons, leave_lock):
    socket, audit, log_path = paths
    leave_lock(daemons, socket, audit, log_path)
    assert pathlib.Path(f"{socket}.lock").exists()
    assert not socket.exists()

    restarted = daemons(socket, audit, log_path)
    reply = restarted.decide("after-stale-lock")

    assert reply.decision_id
    assert restarted.terminate() == 0
    assert_verifies(audit)


SAME_PATHS = "same-paths"
SAME_SOCKET = "same-socket"
SAME_AUDIT = "same-audit"


def second_paths(case: str, tmp_path: pathlib.Path, socket, audit):
    other = tmp_path / "second"
    other_socket = other / "agent.sock"
    other_audit = other / "audit"
    return {
        SAME_PATHS: (socket, audit),
        SAME_SOCKET: (socket, other_audit),
        SAME_AUDIT: (other_socket, audit),
    }[case]


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        (SAME_PATHS, "agent.socket {socket} is in use by another daemon"),
        (SAME_SOCKET, "agent.socket {socket} is in use by another daemon"),
        (SAME_AUDIT, "audit log {audit} is in use by another process"),
    ],
    ids=[SAME_PATHS, SAME_SOCKET, SAME_AUDIT],
)
def test_second_daemon_is_refused_and_first_keeps_serving(
    tmp_path, paths, daemons, case, expected
):
    socket, audit, log_path = paths
    first = daemons(socket, audit, log_path)
    live_inode = socket_inode(socket)
    their_socket, their_audit = second_paths(case, tmp_path, socket, audit)
    load = ThreadedLoad(first.target, threads=2, prefix="live").start()

    second = run_cli(cli_run_args(their_socket, their_audit))
    load.stop()
    after = first.decide("after-second")

    assert second.returncode != 0
    assert "Traceback" not in second.stderr, second.stderr
    message = expected.format(socket=their_socket, audit=their_audit)
    refusal = refusal_lines(second.stderr)
    assert len(refusal) == 1, second.stderr
    assert refusal[0].startswith("kynara-sidecar run: ")
    assert message in refusal[0]
    # The live socket is the very same file, and the first daemon answered
    # on it before, during and after the refused start.
    assert socket_inode(socket) == live_inode
    assert load.errors == []
    assert load.answers
    if their_socket != socket:
        assert not their_socket.exists(), "the refused daemon bound its socket"
    assert first.terminate() == 0
    # Had the second daemon opened the log for writing it would have added a
    # start marker (or broken the chain that verify walks).
    assert marker_events(audit) == ["start", "policy_activated", "stop"]
    assert log_problems(audit, load.answers) == []
    assert after.audit_sequence > max(a.audit_sequence for a in load.answers)
    assert_verifies(audit)
