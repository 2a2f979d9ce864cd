"""A real daemon process for operations tests: its own config file (which a
test may rewrite before a SIGHUP), its own copy of the shipped policies, and
its stderr in a file the test reads line by line."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import grpc
import msgspec
import yaml
from kynara.v1 import decision_pb2 as pb
from kynara.v1 import decision_pb2_grpc
from support import REPO_ROOT, SHIPPED_CONFIG, SHIPPED_POLICIES, wait_serving

# Bounds on waiting for the daemon to do something (start, reload, log a
# line); a daemon that does not fails the test instead of hanging it.
WAIT_SECONDS = 30.0
CALL_TIMEOUT = 30.0
FAST_HEADER = struct.Struct(">II")
# What a SIGHUP's config reload logs: applied, or refused with the old kept.
CONFIG_RELOADED = "config reloaded"
CONFIG_REFUSED = "config reload refused; previous config and policies stay active"
# The shipped payments policy's description; changing it changes the
# policy's revision and nothing it decides.
PAYMENTS_MARK = "Refunds;"


def wait_for(predicate, what: str, timeout: float = WAIT_SECONDS) -> None:
    """Poll ``predicate`` until it holds; fail naming ``what`` if it never does."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def refund(amount: int = 1200, **attributes: Any) -> pb.DecideRequest:
    """A refund alice asks support-bot for: allowed below 500.00, held for
    approval above."""
    values = {"amount": pb.Value(int_value=amount)}
    values.update({k: pb.Value(string_value=v) for k, v in attributes.items()})
    return pb.DecideRequest(
        asserted_chain=["alice"],
        action="payments.refund.issue",
        resource=pb.Resource(kind="payments.refund", id="rf_1", attributes=values),
    )


def wait_for_new_revision(
    stub: decision_pb2_grpc.DecisionServiceStub, before: str, what: str
) -> None:
    """Decide ``refund`` until the answer names a policy revision other
    than ``before``; fail naming ``what`` if none comes."""
    wait_for(
        lambda: stub.Decide(refund(), timeout=CALL_TIMEOUT).policy_revision != before,
        what,
    )


class FastClient:
    """A blocking fast path client that answers one decide at a time."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(CALL_TIMEOUT)
        self.sock.connect(path)
        self._buffer = bytearray()
        self._send(0, {"op": "hello", "versions": [1]})
        self._receive(0)

    def _send(self, stream: int, message: dict[str, Any]) -> None:
        payload = msgspec.msgpack.encode(message)
        self.sock.sendall(FAST_HEADER.pack(len(payload), stream) + payload)

    def _read(self, n: int) -> bytes:
        while len(self._buffer) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the daemon closed the fast path connection")
            self._buffer += chunk
        out = bytes(self._buffer[:n])
        del self._buffer[:n]
        return out

    def _receive(self, stream: int) -> dict[str, Any]:
        length, got = FAST_HEADER.unpack(self._read(FAST_HEADER.size))
        message = msgspec.msgpack.decode(self._read(length))
        assert got == stream, f"answer on stream {got}, expected {stream}"
        return message

    def decide(self, request: dict[str, Any]) -> dict[str, Any]:
        """The answer's map: ``{"ok": decision}`` or ``{"error": ...}``."""
        self._send(1, {"op": "decide", "request": request})
        return self._receive(1)

    def close(self) -> None:
        self.sock.close()


class DaemonProcess:
    """``kynara-sidecar run`` with a config file of its own in ``root``.

    Args:
        root: a fresh directory for the config, policies, sockets and log.
        settings: ``section.key`` -> value written into the config file.
        args: extra CLI arguments before and after ``run`` (``pre``, ``post``).
        command: what runs the CLI (default: ``python -m kynara_sidecar.cli``).
        on_exec: called with the process as soon as it started, before
            waiting for it to serve.
    """

    def __init__(
        self,
        root: pathlib.Path,
        settings: dict[str, Any] | None = None,
        *,
        pre: tuple[str, ...] = (),
        post: tuple[str, ...] = (),
        command: tuple[str, ...] = (sys.executable, "-m", "kynara_sidecar.cli"),
        on_exec: Callable[[subprocess.Popen], None] | None = None,
    ):
        self.root = root
        self.policies = root / "policies"
        shutil.copytree(SHIPPED_POLICIES, self.policies)
        self.config_path = root / "kynara.yaml"
        self.socket = root / "agent.sock"
        self.fast_socket = root / "agent.fast.sock"
        self.log_path = root / "daemon.log"
        self.raw = yaml.safe_load(SHIPPED_CONFIG.read_text())
        base = {
            "agent.socket": str(self.socket),
            "agent.fast_socket": str(self.fast_socket),
            "agent.port": 0,
            "health.port": 0,
            "http.port": 0,
            "admin.socket": "",
            "policy.source": str(self.policies),
            "audit.path": str(root / "audit"),
            "audit.signing_key": str(root / "keys" / "audit.pem"),
            "audit.witness_path": str(root / "witness"),
            "audit.map_size": 64 * 1024 * 1024,
            "shutdown_grace_seconds": 5,
        }
        self.set(**{**base, **(settings or {})})
        self._log = self.log_path.open("w")
        self.process = subprocess.Popen(
            [
                *command, *pre, "run", "--config", str(self.config_path), *post,
            ],
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        try:
            if on_exec is not None:
                on_exec(self.process)
            wait_serving(f"unix://{self.socket}", self.process, self.log_path)
        except BaseException:
            self.stop()
            raise

    def set(self, **settings: Any) -> None:
        """Write ``section.key`` (given with ``.``) values into the config
        file; a key given as ``section__key`` works too."""
        for key, value in settings.items():
            *parents, leaf = key.replace("__", ".").split(".")
            node = self.raw
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        self.config_path.write_text(yaml.safe_dump(self.raw, sort_keys=False))

    def reload(self) -> None:
        self.process.send_signal(signal.SIGHUP)

    def reload_and_wait(self, what: str) -> dict[str, Any]:
        """SIGHUP, then wait for the line saying the config was reloaded or
        the reload refused; returns it (fails if there is more than one)."""
        logged = len(self.lines())
        self.reload()

        def outcomes() -> list[dict[str, Any]]:
            return [
                line
                for line in self.records()[logged:]
                if line["msg"] in (CONFIG_RELOADED, CONFIG_REFUSED)
            ]

        wait_for(outcomes, what)
        (outcome,) = outcomes()
        return outcome

    def change_payments_policy(self, tag: str) -> None:
        """Rewrite payments.yaml as shipped with ``tag`` in its description:
        the same rules under a new revision once reloaded."""
        shipped = (SHIPPED_POLICIES / "payments.yaml").read_text()
        assert PAYMENTS_MARK in shipped, "the shipped payments policy changed"
        payments = self.policies / "payments.yaml"
        payments.write_text(shipped.replace(PAYMENTS_MARK, f"Refunds ({tag});"))

    def lines(self) -> list[str]:
        """The stderr lines written so far (a partial last line is left out)."""
        text = self.log_path.read_text()
        return text.splitlines() if text.endswith("\n") else text.splitlines()[:-1]

    def records(self) -> list[dict[str, Any]]:
        """Every stderr line parsed as JSON (fails on a line that is not)."""
        parsed = []
        for line in self.lines():
            try:
                parsed.append(json.loads(line))
            except ValueError as err:
                raise AssertionError(f"log line is not JSON: {line!r}") from err
        return parsed

    def stub(self, channel: grpc.Channel) -> decision_pb2_grpc.DecisionServiceStub:
        return decision_pb2_grpc.DecisionServiceStub(channel)

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(f"unix://{self.socket}")

    def stop(self) -> int:
        """SIGTERM, then wait for the exit; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(WAIT_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(WAIT_SECONDS)
        self._log.close()
        return self.process.returncode
