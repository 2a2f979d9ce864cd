"""Helpers for the fault tests: the CLI daemon as a child process, client load
from threads, and the audit log read from outside the daemon.

The daemon runs as ``python -m kynara_sidecar.cli run`` so that a test can
SIGKILL it: an in-process daemon (``support.RunningDaemon``) cannot crash
without taking pytest with it. The log is read in the test process, which is
not the daemon's, so LMDB's one-environment-per-process rule is kept.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from typing import IO, NamedTuple

import grpc
from kynara.v1 import decision_pb2 as pb
from kynara.v1 import decision_pb2_grpc
from support import (
    REPO_ROOT,
    SHIPPED_POLICIES,
    small_refund,
    value_to_proto,
    wait_serving,
)

from kynara_sidecar.audit.chain import decode_record
from kynara_sidecar.audit.store import AuditStore

__all__ = [
    "CLI",
    "Answer",
    "DaemonProcess",
    "LoadError",
    "ThreadedLoad",
    "cli_run_args",
    "log_problems",
    "marker_events",
    "refusal_lines",
    "run_cli",
    "socket_inode",
    "verify_cli",
]

CLI = [sys.executable, "-m", "kynara_sidecar.cli"]
# Start-up takes about 0.3 s on a laptop; 30 s leaves room for a loaded CI box.
START_TIMEOUT = 30.0
# A call that takes this long is stuck, not slow; the test then fails.
CALL_TIMEOUT = 10.0
# A refused daemon exits within a second; this bounds a hang.
CLI_TIMEOUT = 60.0
# Three items per DecideBatch: one of each decision, committed together.
BATCH_ITEMS = 3


def cli_run_args(socket: pathlib.Path, audit: pathlib.Path, *overrides: str):
    """``kynara-sidecar run`` on the shipped config with its paths moved.

    Args:
        socket: ``agent.socket``.
        audit: ``audit.path``.
        overrides: more ``section.key=value`` settings.

    Returns:
        The argv, to run with ``cwd=REPO_ROOT``.
    """
    settings = [
        f"agent.socket={socket}",
        f"agent.fast_socket={socket.parent / 'agent.fast.sock'}",
        "agent.port=0",
        "health.port=0",
        "http.port=0",
        f"policy.source={SHIPPED_POLICIES}",
        f"audit.path={audit}",
        f"audit.signing_key={audit.parent / 'keys' / 'audit.pem'}",
        f"audit.witness_path={audit.parent / 'witness'}",
        "audit.map_size=67108864",
        "shutdown_grace_seconds=5",
        *overrides,
    ]
    args = [*CLI, "run", "--config", "config/kynara.yaml"]
    for setting in settings:
        args += ["--set", setting]
    return args


def run_cli(args: list[str]) -> subprocess.CompletedProcess:
    """Run a CLI command to completion from the repository root."""
    return subprocess.run(
        args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=CLI_TIMEOUT
    )


def verify_cli(audit: pathlib.Path) -> subprocess.CompletedProcess:
    """``kynara-sidecar verify``, as an operator runs it: the daemon's public
    key trusted, its witness consulted."""
    return run_cli(
        [
            *CLI,
            "verify",
            "--audit",
            str(audit),
            "--trusted-key",
            str(audit.parent / "keys" / "audit.pub"),
            "--witness",
            str(audit.parent / "witness"),
        ]
    )


def refusal_lines(stderr: str) -> list[str]:
    """The stderr lines that are not JSON log lines: what a person reads."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    return [line for line in lines if not line.startswith("{")]


class DaemonProcess:
    """One ``kynara-sidecar run`` child process; stderr goes to ``log_path``.

    Args:
        socket: ``agent.socket``.
        audit: ``audit.path``.
        log_path: where the daemon's stderr is written (appended to, so
            restarts on the same paths keep one log).
        overrides: more ``section.key=value`` settings.
        prefix: a command the daemon runs under, e.g. ``setpriv`` to drop
            root.
    """

    def __init__(
        self,
        socket: pathlib.Path,
        audit: pathlib.Path,
        log_path: pathlib.Path,
        *overrides: str,
        prefix: Iterable[str] = (),
    ):
        self.socket = socket
        self.audit = audit
        self.log_path = log_path
        self._log: IO[str] = log_path.open("a")
        self.process = subprocess.Popen(
            [*prefix, *cli_run_args(socket, audit, *overrides)],
            cwd=REPO_ROOT,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )
        self._channels: list[grpc.Channel] = []

    @property
    def target(self) -> str:
        return f"unix://{self.socket}"

    def wait_serving(self) -> None:
        """Wait until health on the agent socket says SERVING."""
        wait_serving(self.target, self.process, self.log_path)

    def stub(self) -> decision_pb2_grpc.DecisionServiceStub:
        """A stub on a fresh channel to the agent socket, closed by ``close``."""
        channel = grpc.insecure_channel(self.target)
        self._channels.append(channel)
        return decision_pb2_grpc.DecisionServiceStub(channel)

    def decide(self, request_id: str = "") -> pb.DecideResponse:
        """One allowed decision over the agent socket."""
        request = small_refund()
        request.request_id = request_id
        return self.stub().Decide(request, timeout=CALL_TIMEOUT)

    def kill(self) -> None:
        """SIGKILL: no drain, no stop marker, socket and lock files left."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=CLI_TIMEOUT)

    def terminate(self) -> int:
        """SIGTERM and wait; returns the exit status."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=CLI_TIMEOUT)

    def close(self) -> None:
        """Kill the process if it still runs and release channels and log."""
        for channel in self._channels:
            channel.close()
        self._channels.clear()
        if self.process.poll() is None:
            self.kill()
        self._log.close()

    def log_text(self) -> str:
        """The daemon's stderr so far (the child writes the file directly)."""
        return self.log_path.read_text()


class Answer(NamedTuple):
    """A decision a client saw answered, and where the answer says it is."""

    request_id: str
    decision_id: str
    audit_sequence: int
    record_hash: str


class LoadError(NamedTuple):
    """A call that got no answer: when, its status and its kynara code."""

    at: float
    status: str
    code: str


def _request_variants() -> list[pb.DecideRequest]:
    # allow, require_approval and deny: every decision kind goes through
    # the same append, and each kind's record must survive a crash.
    allow = small_refund()
    approval = small_refund()
    approval.resource.attributes["amount"].int_value = 60_000
    deny = small_refund()
    deny.context["region"].CopyFrom(value_to_proto("KP"))
    return [allow, approval, deny]


class ThreadedLoad:
    """Client threads calling Decide (and one DecideBatch) until stopped.

    Every thread has its own channel and records, independently of the
    daemon, each answer it received and each call that failed. Request ids
    are unique per load (``<prefix>-<thread>-<n>``).

    Args:
        target: the gRPC target, e.g. ``unix:///tmp/x/agent.sock``.
        threads: how many client threads; the last one uses DecideBatch.
        prefix: the request id prefix, unique per round.
    """

    def __init__(self, target: str, threads: int, prefix: str):
        self._target = target
        self._prefix = prefix
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.answers: list[Answer] = []
        self.errors: list[LoadError] = []
        self._threads = [
            threading.Thread(
                target=self._drive, args=(n, n == threads - 1), daemon=True
            )
            for n in range(threads)
        ]

    def start(self) -> ThreadedLoad:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        """Stop and join every thread.

        Raises:
            AssertionError: a thread is stuck in a call past its timeout.
        """
        self._stop.set()
        for thread in self._threads:
            thread.join(CALL_TIMEOUT + 5)
            assert not thread.is_alive(), "a client thread is stuck"

    def _drive(self, index: int, batch: bool) -> None:
        variants = _request_variants()
        with grpc.insecure_channel(self._target) as channel:
            stub = decision_pb2_grpc.DecisionServiceStub(channel)
            for n in itertools.count():
                if self._stop.is_set():
                    return
                ids = [f"{self._prefix}-{index}-{n}-{i}" for i in range(BATCH_ITEMS)]
                try:
                    if batch:
                        self._batch(stub, variants, ids)
                    else:
                        self._single(stub, variants[n % len(variants)], ids[0])
                except grpc.RpcError as err:
                    metadata = dict(err.trailing_metadata() or ())
                    code = metadata.get("kynara-error-code", "")
                    self._fail(LoadError(time.monotonic(), err.code().name, code))
                    # The daemon is gone or refusing: do not spin on it.
                    self._stop.wait(0.02)

    def _single(self, stub, request: pb.DecideRequest, request_id: str) -> None:
        request = _with_id(request, request_id)
        reply = stub.Decide(request, timeout=CALL_TIMEOUT)
        self._record([(request_id, reply)])

    def _batch(self, stub, variants: list[pb.DecideRequest], ids: list[str]) -> None:
        items = [_with_id(v, i) for v, i in zip(variants, ids, strict=True)]
        reply = stub.DecideBatch(
            pb.DecideBatchRequest(items=items), timeout=CALL_TIMEOUT
        )
        answered = []
        for request_id, item in zip(ids, reply.items, strict=True):
            if item.WhichOneof("outcome") == "decision":
                answered.append((request_id, item.decision))
            else:
                self._fail(LoadError(time.monotonic(), "item", item.error.code))
        self._record(answered)

    def _record(self, replies: Iterable[tuple[str, pb.DecideResponse]]) -> None:
        answers = [
            Answer(rid, r.decision_id, r.audit_sequence, r.record_hash)
            for rid, r in replies
        ]
        with self._lock:
            self.answers.extend(answers)

    def _fail(self, error: LoadError) -> None:
        with self._lock:
            self.errors.append(error)


def _with_id(request: pb.DecideRequest, request_id: str) -> pb.DecideRequest:
    out = pb.DecideRequest()
    out.CopyFrom(request)
    out.request_id = request_id
    return out


def log_problems(audit: pathlib.Path, answers: Iterable[Answer]) -> list[str]:
    """Check that every answered decision is in the log where it was said to be.

    Opens the log read-only; works while a daemon in another process appends.

    Args:
        audit: the log's directory.
        answers: what the clients saw.

    Returns:
        One line per problem (empty when every answer is in place): a record
        missing at its sequence, another decision there, a chain hash that
        differs from the answer's, a decisions index that disagrees, or two
        answers claiming one sequence.
    """
    problems = []
    claimed: dict[int, str] = {}
    store = AuditStore.open(audit, readonly=True)
    try:
        for answer in answers:
            seq = answer.audit_sequence
            if seq in claimed:
                problems.append(f"seq {seq}: answered twice ({claimed[seq]})")
            claimed[seq] = answer.request_id
            problems += _answer_problems(store, answer)
    finally:
        store.close()
    return problems


def _answer_problems(store: AuditStore, answer: Answer) -> list[str]:
    where = f"seq {answer.audit_sequence} ({answer.request_id})"
    stored = store.get(answer.audit_sequence)
    if stored is None:
        return [f"{where}: answered but not in the log"]
    record = decode_record(stored.record_bytes)
    problems = []
    if record.decision_id != answer.decision_id:
        problems.append(f"{where}: holds decision {record.decision_id!r}")
    if record.request_id != answer.request_id:
        problems.append(f"{where}: holds request {record.request_id!r}")
    if stored.chain_hash.hex() != answer.record_hash:
        problems.append(f"{where}: chain hash {stored.chain_hash.hex()} differs")
    if store.find_decision(answer.decision_id) != answer.audit_sequence:
        problems.append(f"{where}: decisions index says otherwise")
    return problems


def marker_events(audit: pathlib.Path) -> list[str]:
    """The ``marker.event`` of every marker record, in log order."""
    store = AuditStore.open(audit, readonly=True)
    try:
        with contextlib.closing(store.iter_records()) as records:
            decoded = [decode_record(stored.record_bytes) for stored in records]
        return [r.marker.event for r in decoded if r.marker is not None]
    finally:
        store.close()


def socket_inode(path: pathlib.Path) -> int:
    """The inode of a file, to tell "the same socket" from "a new one"."""
    return os.stat(path).st_ino
