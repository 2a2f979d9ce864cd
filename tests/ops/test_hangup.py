"""SIGHUP at any moment of a daemon's life, started as operators start it
(the ``kynara-sidecar`` console script): during start-up (imports, config),
while serving (a reload) and during and after the stop. None may end it.

What the process does with SIGHUP at a moment is read from
/proc/<pid>/status (``SigIgn``, ``SigCgt``), so the test knows when it may
start signalling: before the entry point ran, the interpreter's default
action still applies, and no program can close that window.
"""

from __future__ import annotations

import pathlib
import signal
import subprocess
import sys
import threading
import time

from ops_daemon import WAIT_SECONDS, DaemonProcess, wait_for

CONSOLE_SCRIPT = pathlib.Path(sys.executable).with_name("kynara-sidecar")
# Bounds on the signals sent (each phase also ends by itself).
MAX_HANGUPS = 3000
HANGUP_GAP_SECONDS = 0.002


def hangup_disposition(pid: int) -> str | None:
    """``default``, ``ignored`` or ``caught``; None once the process is gone."""
    try:
        status = pathlib.Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    masks = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    if "SigIgn" not in masks:  # a zombie has no masks left
        return None
    bit = 1 << (signal.SIGHUP - 1)
    if int(masks["SigIgn"], 16) & bit:
        return "ignored"
    return "caught" if int(masks["SigCgt"], 16) & bit else "default"


class Hangups:
    """Sends SIGHUP to a starting process, from the first moment it no
    longer takes the default action until told to stop; records the
    dispositions it saw."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.sent = 0
        self.done = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, process: subprocess.Popen) -> None:
        self._thread = threading.Thread(target=self._run, args=(process,))
        self._thread.start()

    def _run(self, process: subprocess.Popen) -> None:
        deadline = time.monotonic() + WAIT_SECONDS
        while time.monotonic() < deadline and not self.done.is_set():
            state = hangup_disposition(process.pid)
            if state is None:
                return
            if not self.seen or self.seen[-1] != state:
                self.seen.append(state)
            if state != "default":
                break
        while not self.done.is_set() and self.sent < MAX_HANGUPS:
            if process.poll() is not None:
                return
            process.send_signal(signal.SIGHUP)
            self.sent += 1
            state = hangup_disposition(process.pid)
            if state is not None and self.seen[-1] != state:
                self.seen.append(state)
            time.sleep(HANGUP_GAP_SECONDS)

    def stop(self) -> None:
        self.done.set()
        if self._thread is not None:
            self._thread.join(WAIT_SECONDS)


def test_sighup_never_ends_the_daemon(tmp_path):
    assert CONSOLE_SCRIPT.exists(), f"no console script at {CONSOLE_SCRIPT}"
    starting = Hangups()
    try:
        daemon = DaemonProcess(
            tmp_path, command=(str(CONSOLE_SCRIPT),), on_exec=starting.start
        )
    finally:
        starting.stop()
    try:
        # Ignored from before the CLI's imports, then the loop's handler
        # (which a child spawned meanwhile does not inherit).
        # (The read may come too late to see the default action.)
        after_exec = [state for state in starting.seen if state != "default"]
        assert after_exec[:2] == ["ignored", "caught"], starting.seen
        assert starting.sent > 0
        assert hangup_disposition(daemon.process.pid) == "caught"
        wait_for(
            lambda: any(r["msg"] == "config reloaded" for r in daemon.records()),
            "a reload for the SIGHUPs",
        )

        daemon.process.send_signal(signal.SIGTERM)
        stopping = []
        for _ in range(MAX_HANGUPS):
            if daemon.process.poll() is not None:
                break
            daemon.process.send_signal(signal.SIGHUP)
            state = hangup_disposition(daemon.process.pid)
            if state is not None and (not stopping or stopping[-1] != state):
                stopping.append(state)
            time.sleep(HANGUP_GAP_SECONDS)
        daemon.process.wait(WAIT_SECONDS)
    finally:
        code = daemon.stop()

    assert code == 0, daemon.log_path.read_text()[-2000:]
    assert "default" not in stopping, stopping
    assert "stopped" in [r["msg"] for r in daemon.records()]
