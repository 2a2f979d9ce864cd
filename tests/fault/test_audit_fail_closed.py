"""Fail closed (issue #5 point 7): a log that cannot take a record means no
answer, loudly, and never an answer without its record.

Each case breaks the audit log's storage under a real ``kynara-sidecar run``
child and checks, from outside, what an operator and a client see:

- health on the agent socket (NOT_SERVING when the log is down, SERVING
  while it only refuses a batch that did not fit);
- Decide answered UNAVAILABLE with ``kynara-error-code: audit_unavailable``;
- ``kynara_audit_failures_total`` above zero on ``/metrics``;
- a log line naming the setting to change (``audit.path`` or
  ``audit.map_size``);
- for the cases that break mid-run, every decision a client saw answered
  sits in the log, read read-only after the daemon stopped.

Root ignores permission bits, so the unwritable cases run the daemon as
``nobody`` under ``setpriv``; the read-only and full-volume cases use a
small tmpfs mounted here (and unmounted by path at teardown). All of that
needs root: the cases skip, saying why, without it. The daemons' paths sit
in a temporary directory of their own rather than ``tmp_path``, whose
parent only root may enter.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator

import grpc
import pytest
from fault_helpers import (
    CALL_TIMEOUT,
    Answer,
    DaemonProcess,
    ThreadedLoad,
    log_problems,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kynara.v1 import decision_pb2 as pb
from support import NOBODY, START_TIMEOUT, as_nobody

from kynara_sidecar.audit.store import AuditStore

# Each case starts one or two daemons (about a second each) and a few
# hundred decisions at most; the timeout bounds a hang, not the speed.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
FAILURES_METRIC = "kynara_audit_failures_total"
# What the daemon logs once start-up is over, whatever the log's state.
START_LINES = ("serving", "up, not serving")
# The most decisions a fill-up case sends before it gives up: far more
# than the small volumes and maps below hold.
MAX_DECISIONS = 3000
# A status change after a fatal writer error is scheduled on the loop at
# once; this bounds a daemon that never makes it.
HEALTH_WAIT = 10.0


def need_root(what: str) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"{what} needs root (uid {os.geteuid()})")


# ------------------------------------------------------------------ fixtures


@pytest.fixture
def base() -> Iterator[pathlib.Path]:
    """A directory everyone may enter, with run/, keys/ and witness/ open to
    all (0777): the daemon under ``setpriv`` must reach them."""
    path = pathlib.Path(tempfile.mkdtemp(prefix="kynara-fc-"))
    path.chmod(0o755)
    for name in ("run", "keys", "witness"):
        (path / name).mkdir()
        (path / name).chmod(0o777)
    yield path
    shutil.rmtree(path)


@pytest.fixture
def tmpfs(base) -> Iterator[Callable[[str, str], pathlib.Path]]:
    """``mount(name, size)``: a tmpfs at ``base/name``, unmounted at teardown."""
    mounted: list[pathlib.Path] = []

    def mount(name: str, size: str) -> pathlib.Path:
        need_root("mounting a tmpfs")
        point = base / name
        point.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "kynara-test", point],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            pytest.skip(f"mount -t tmpfs refused: {done.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in reversed(mounted):
        subprocess.run(["umount", point], check=True)


@pytest.fixture
def daemons(base, tmpfs) -> Iterator[Callable[..., DaemonProcess]]:
    """``start(audit, *overrides, prefix=())``: a daemon on ``base``'s socket,
    keys and witness; each has its own stderr log; killed at teardown, before
    any tmpfs is unmounted."""
    started: list[DaemonProcess] = []

    def start(audit: pathlib.Path, *overrides: str, prefix=()) -> DaemonProcess:
        daemon = DaemonProcess(
            base / "run" / "agent.sock",
            audit,
            base / f"daemon-{len(started)}.log",
            f"audit.signing_key={base / 'keys' / 'audit.pem'}",
            f"audit.witness_path={base / 'witness'}",
            *overrides,
            prefix=prefix,
        )
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.close()


# ------------------------------------------------------------------- helpers


def log_entries(daemon: DaemonProcess) -> list[dict]:
    """The daemon's JSON log lines so far."""
    lines = daemon.log_text().splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def started(daemon: DaemonProcess) -> dict | None:
    """The line that ends start-up, once it is logged."""
    for entry in log_entries(daemon):
        if entry["logger"] == "kynara.daemon" and entry["msg"] in START_LINES:
            return entry
    return None


def start_line(daemon: DaemonProcess) -> dict:
    """Wait for the line that ends start-up ("serving" or "up, not serving").

    Health alone cannot tell "still starting" from "up, not serving", so the
    status is read only after this line.
    """
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if entry := started(daemon):
            return entry
        exited = daemon.process.poll()
        assert exited is None, f"daemon exited {exited}:\n{daemon.log_text()}"
        time.sleep(0.05)
    raise AssertionError(f"daemon did not finish starting:\n{daemon.log_text()}")


def statuses_while_starting(daemon: DaemonProcess) -> set[int]:
    """Every health status the agent socket gave before start-up ended.

    A daemon whose log is down must never say SERVING, not even between
    binding the socket and its start-up line. The window is milliseconds
    wide, so a regression shows in some runs, not all.
    """
    seen: set[int] = set()
    request = health_pb2.HealthCheckRequest()
    deadline = time.monotonic() + START_TIMEOUT
    while not started(daemon):
        exited = daemon.process.poll()
        assert exited is None, f"daemon exited {exited}:\n{daemon.log_text()}"
        assert time.monotonic() < deadline, daemon.log_text()
        if not daemon.socket.exists():
            continue
        # A fresh channel per try: one that failed to connect backs off for
        # a second, longer than the window watched.
        with grpc.insecure_channel(daemon.target) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(request, timeout=1)
            except grpc.RpcError:
                continue
        seen.add(reply.status)
    return seen


def health(daemon: DaemonProcess) -> int:
    """Wait until start-up is over and health on the agent socket answers;
    return its status."""
    start_line(daemon)
    request = health_pb2.HealthCheckRequest()
    with grpc.insecure_channel(daemon.target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            request, timeout=CALL_TIMEOUT, wait_for_ready=True
        )
    return reply.status


def health_after_change(daemon: DaemonProcess, old: int) -> int:
    """The health status once it is no longer ``old`` (or still ``old`` after
    a long wait: the caller's assertion then fails with it)."""
    deadline = time.monotonic() + HEALTH_WAIT
    status = health(daemon)
    while status == old and time.monotonic() < deadline:
        time.sleep(0.05)
        status = health(daemon)
    return status


def refused(daemon: DaemonProcess, request_id: str) -> grpc.RpcError:
    """A Decide that must be refused; returns its error."""
    with pytest.raises(grpc.RpcError) as caught:
        reply = daemon.decide(request_id)
        pytest.fail(f"decided without a log: {reply}")
    return caught.value


def assert_audit_unavailable(err: grpc.RpcError) -> None:
    metadata = dict(err.trailing_metadata() or ())
    assert err.code() == grpc.StatusCode.UNAVAILABLE, err
    assert metadata.get("kynara-error-code") == "audit_unavailable", err


def audit_failures(daemon: DaemonProcess) -> float:
    """``kynara_audit_failures_total`` from /metrics on the daemon's HTTP port."""
    port = start_line(daemon)["http_port"]
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=CALL_TIMEOUT) as response:
        text = response.read().decode()
    found = re.search(rf"^{FAILURES_METRIC} (\S+)$", text, re.MULTILINE)
    assert found, f"{FAILURES_METRIC} not on /metrics:\n{text}"
    return float(found.group(1))


def lines_naming(daemon: DaemonProcess, setting: str) -> list[dict]:
    """Error lines whose ``setting`` field tells the operator what to change."""
    return [
        entry
        for entry in log_entries(daemon)
        if entry["level"] == "error" and entry.get("setting") == setting
    ]


def assert_down(daemon: DaemonProcess, setting: str = "audit.path") -> None:
    """Up but NOT_SERVING, refusing with audit_unavailable, counted, and a
    log line naming ``setting``."""
    assert health(daemon) == NOT_SERVING, daemon.log_text()
    assert_audit_unavailable(refused(daemon, "while-down"))
    assert audit_failures(daemon) > 0
    assert lines_naming(daemon, setting), daemon.log_text()
    assert daemon.process.poll() is None, "the daemon must stay up, not serving"


def answer_of(request_id: str, reply: pb.DecideResponse) -> Answer:
    return Answer(
        request_id, reply.decision_id, reply.audit_sequence, reply.record_hash
    )


# --------------------------------------------------------------------- cases


def test_unwritable_directory_keeps_the_daemon_not_serving(base, daemons):
    prefix = as_nobody()
    # The parent is root's and 0755: nobody cannot create the log in it.
    parent = base / "owned-by-root"
    parent.mkdir(mode=0o755)
    audit = parent / "audit"

    daemon = daemons(audit, prefix=prefix)

    assert SERVING not in statuses_while_starting(daemon)
    assert_down(daemon)
    assert not audit.exists()


def test_read_only_filesystem_keeps_the_daemon_not_serving(daemons, tmpfs):
    volume = tmpfs("ro", "4m")
    audit = volume / "audit"
    first = daemons(audit)
    assert health(first) == SERVING, first.log_text()
    answered = [answer_of("before-ro", first.decide("before-ro"))]
    assert first.terminate() == 0, first.log_text()
    subprocess.run(["mount", "-o", "remount,ro", volume], check=True)

    again = daemons(audit)

    assert_down(again)
    assert again.terminate() == 0, again.log_text()
    assert log_problems(audit, answered) == []


def test_full_volume_mid_run_fails_closed(daemons, tmpfs):
    """The volume fills long before the map (512 KiB of tmpfs, 64 MiB map).

    LMDB reports the full volume as ENOSPC, or as EIO when its write came up
    short (the commit then fails in either case), never as MapFull, so the
    writer takes it as fatal: the batch is refused with audit_unavailable,
    every later append is refused too (a log that failed a write cannot be
    trusted to be complete), and health turns NOT_SERVING until an operator
    frees space and restarts. Concurrent single and batched decisions run
    into it; each one answered before is in the log.
    """
    audit = tmpfs("full", "512k") / "audit"
    daemon = daemons(audit, "audit.map_size=67108864")
    assert health(daemon) == SERVING, daemon.log_text()

    load = ThreadedLoad(daemon.target, threads=4, prefix="fill").start()
    deadline = time.monotonic() + START_TIMEOUT
    while not load.errors and time.monotonic() < deadline:
        time.sleep(0.05)
    load.stop()

    assert load.errors, "the volume never filled"
    assert {error.code for error in load.errors} == {"audit_unavailable"}
    assert load.answers, "nothing was decided before the volume filled"
    assert health_after_change(daemon, SERVING) == NOT_SERVING, daemon.log_text()
    assert_audit_unavailable(refused(daemon, "after-full"))
    assert audit_failures(daemon) > 0
    assert lines_naming(daemon, "audit.path"), daemon.log_text()
    daemon.terminate()
    assert log_problems(audit, load.answers) == []


def test_full_map_mid_run_refuses_and_stays_serving(base, daemons):
    """The map (256 KiB) fills while the volume has room.

    MapFull is the one storage error the writer survives: the batch that did
    not fit is refused with audit_unavailable and nothing of it is written,
    later batches are tried again (a smaller one may still fit, and then
    decisions resume), and health stays SERVING since the log itself is
    sound. The "audit log full" line naming audit.map_size is logged once
    per spell of refusals, not once per refusal: the first refusal after an
    answer starts a spell. Decisions here are sequential and alike, so
    usually one spell follows the first refusal; a later decision whose
    index entry lands on a page with room may still fit and start another.
    """
    audit = base / "audit"
    daemon = daemons(audit, "audit.map_size=262144")
    assert health(daemon) == SERVING, daemon.log_text()

    answers: list[Answer] = []
    refusals: list[grpc.RpcError] = []
    # One entry per decision: whether it was refused.
    outcomes: list[bool] = []
    # Ten refusals in a row make a spell long enough to count its lines.
    while len(outcomes) < MAX_DECISIONS and outcomes[-10:] != [True] * 10:
        request_id = f"map-{len(outcomes)}"
        try:
            answers.append(answer_of(request_id, daemon.decide(request_id)))
        except grpc.RpcError as err:
            refusals.append(err)
            outcomes.append(True)
        else:
            outcomes.append(False)
    spells = sum(
        now and not before
        for before, now in zip([False, *outcomes[:-1]], outcomes, strict=True)
    )

    assert refusals, "the map never filled"
    for err in refusals:
        assert_audit_unavailable(err)
    full_lines = [
        entry
        for entry in log_entries(daemon)
        if entry["msg"].startswith("audit log full")
    ]
    assert spells >= 1
    assert len(full_lines) == spells, (outcomes, full_lines)
    assert full_lines[0]["setting"] == "audit.map_size"
    assert "audit.map_size" in full_lines[0]["error"]
    assert audit_failures(daemon) >= len(refusals)
    assert health(daemon) == SERVING, daemon.log_text()
    daemon.terminate()
    assert log_problems(audit, answers) == []


def make_log(audit: pathlib.Path) -> None:
    AuditStore.open(audit).close()


def log_dir_is_a_file(audit: pathlib.Path) -> list[str]:
    audit.write_text("not a directory\n")
    return []


def data_file_unreadable(audit: pathlib.Path) -> list[str]:
    # The daemon (nobody) owns the directory and may lock it, but not read
    # the data file: only the open of LMDB itself fails.
    prefix = as_nobody()
    make_log(audit)
    for path in (audit, *audit.iterdir()):
        os.chown(path, NOBODY, NOBODY)
    (audit / "data.mdb").chmod(0o000)
    return prefix


@pytest.mark.parametrize(
    "spoil", [log_dir_is_a_file, data_file_unreadable], ids=["file", "unreadable"]
)
def test_start_up_check_keeps_an_unusable_log_not_serving(base, daemons, spoil):
    audit = base / "audit"
    prefix = spoil(audit)

    daemon = daemons(audit, prefix=prefix)

    assert SERVING not in statuses_while_starting(daemon)
    assert_down(daemon)
    assert "not serving" in start_line(daemon)["msg"]
