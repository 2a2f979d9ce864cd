"""Helpers shared by tests: a real daemon on its own loop, requests, records."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import grpc
import pytest
import uvloop
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kynara.v1 import decision_pb2 as pb
from kynara.v1 import decision_pb2_grpc

from kynara_sidecar.audit.chain import decode_record
from kynara_sidecar.audit.record import AuditRecordV1
from kynara_sidecar.audit.store import AuditStore
from kynara_sidecar.audit.writer import AuditWriter
from kynara_sidecar.config import Config, load_config
from kynara_sidecar.daemon import Daemon
from kynara_sidecar.decision import Duration, Timestamp, UInt64
from kynara_sidecar.metrics import Metrics
from kynara_sidecar.pipeline import Pipeline
from kynara_sidecar.policy.loader import load_policies

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
SHIPPED_CONFIG = REPO_ROOT / "config" / "kynara.yaml"
SHIPPED_POLICIES = REPO_ROOT / "config" / "policies"
# A Monday, 10:00 in Berlin (CET): inside the shipped business hours.
DEFAULT_NOW = "2026-12-07T09:00:00Z"


class SettableClock:
    """A clock the test moves; the daemon reads it once per request."""

    def __init__(self, iso: str = DEFAULT_NOW):
        self.set(iso)

    def set(self, iso: str) -> None:
        import datetime

        moment = datetime.datetime.fromisoformat(iso.replace("Z", "+00:00"))
        ts = Timestamp.from_datetime(moment)
        self._nanos = ts.seconds * 1_000_000_000 + ts.nanos

    def __call__(self) -> int:
        return self._nanos


class RunningDaemon:
    """A daemon serving on its own uvloop thread; stop() is registered."""

    def __init__(self, config: Config, clock: SettableClock):
        self.config = config
        self.clock = clock
        self.daemon = Daemon(config, clock=clock)
        self._channels: list[grpc.Channel] = []
        self.loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        try:
            self.call(self.daemon.start())
        except BaseException:
            self._stop_loop()
            raise

    def call(self, coro, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def socket(self) -> str:
        return self.config.agent.socket

    @property
    def target(self) -> str:
        return f"unix://{self.socket}"

    def stub(self) -> decision_pb2_grpc.DecisionServiceStub:
        channel = grpc.insecure_channel(self.target)
        self._channels.append(channel)
        return decision_pb2_grpc.DecisionServiceStub(channel)

    def stop(self) -> None:
        """Stop the daemon and its loop; a second call does nothing."""
        if self.loop.is_closed():
            return
        for channel in self._channels:
            channel.close()
        self._channels.clear()
        try:
            self.call(self.daemon.stop())
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def daemon_config(tmp_path: pathlib.Path, *overrides: str) -> Config:
    """The shipped config moved into tmp_path, with free ports."""
    return load_config(
        SHIPPED_CONFIG,
        [
            f"agent.socket={tmp_path / 'agent.sock'}",
            f"agent.fast_socket={tmp_path / 'agent.fast.sock'}",
            "agent.port=0",
            "health.port=0",
            "http.port=0",
            f"policy.source={SHIPPED_POLICIES}",
            f"audit.path={tmp_path / 'audit'}",
            f"audit.signing_key={tmp_path / 'keys' / 'audit.pem'}",
            f"audit.witness_path={tmp_path / 'witness'}",
            "audit.map_size=67108864",
            "shutdown_grace_seconds=5",
            *overrides,
        ],
    )


def run_pipeline(
    tmp_path: pathlib.Path, steps, *, activate: bool = True
) -> tuple[Any, list[AuditRecordV1]]:
    """Run ``steps(pipeline)`` (a coroutine function) on a pipeline with its
    own writer over real LMDB in ``tmp_path``, the shipped policies active
    unless ``activate`` is False; returns its result and every record
    committed, decoded. An error ``steps`` raises is raised here."""
    config = daemon_config(tmp_path)
    store = AuditStore.open(config.audit.path, map_size=config.audit.map_size)

    async def run():
        writer = AuditWriter(store)
        writer.start()
        pipeline = Pipeline(config, writer, Metrics(), SettableClock())
        if activate:
            pipeline.activate(load_policies(SHIPPED_POLICIES))
        try:
            return await steps(pipeline)
        finally:
            await writer.close()

    try:
        result = asyncio.run(run())
        records = [decode_record(r.record_bytes) for r in store.iter_records()]
        return result, records
    finally:
        store.close()


def value_to_proto(value: Any) -> pb.Value:
    """Convert a typed pipeline value to the wire, as an agent would send it."""
    if isinstance(value, bool):
        return pb.Value(bool_value=value)
    if isinstance(value, UInt64):
        return pb.Value(uint_value=value)
    if isinstance(value, int):
        return pb.Value(int_value=value)
    if isinstance(value, float):
        return pb.Value(double_value=value)
    if isinstance(value, str):
        return pb.Value(string_value=value)
    if isinstance(value, bytes):
        return pb.Value(bytes_value=value)
    if isinstance(value, Timestamp):
        out = pb.Value()
        out.timestamp_value.seconds, out.timestamp_value.nanos = (
            value.seconds,
            value.nanos,
        )
        return out
    if isinstance(value, Duration):
        out = pb.Value()
        out.duration_value.seconds, out.duration_value.nanos = (
            value.seconds,
            value.nanos,
        )
        return out
    if isinstance(value, list | tuple):
        return pb.Value(
            list_value=pb.ListValue(values=[value_to_proto(v) for v in value])
        )
    if isinstance(value, dict):
        entries = {k: value_to_proto(v) for k, v in value.items()}
        return pb.Value(map_value=pb.MapValue(entries=entries))
    raise TypeError(f"cannot send a {type(value).__name__} as a Value")


def wire_request(request, **overrides) -> pb.DecideRequest:
    """The case's request as an agent would send it: the daemon adds its agent."""
    message = pb.DecideRequest(
        asserted_chain=list(request.chain[:-1]),
        action=request.action,
        resource=pb.Resource(
            kind=request.resource.kind,
            id=request.resource.id,
            attributes={
                k: value_to_proto(v) for k, v in request.resource.attributes.items()
            },
        ),
        context={k: value_to_proto(v) for k, v in request.context.items()},
        request_id=request.request_id,
    )
    for key, value in overrides.items():
        setattr(message, key, value)
    return message


def small_refund(**context) -> pb.DecideRequest:
    """A refund alice asks support-bot for: allowed by the shipped policies."""
    return pb.DecideRequest(
        asserted_chain=["alice"],
        action="payments.refund.issue",
        resource=pb.Resource(
            kind="payments.refund",
            id="rf_1",
            attributes={"amount": pb.Value(int_value=1200)},
        ),
        context={k: value_to_proto(v) for k, v in context.items()},
    )


def fast_refund(amount: int = 1200) -> dict[str, Any]:
    """The refund alice asks support-bot for, in the fast path's map form:
    allowed by the shipped policies below 500.00, held for approval above."""
    return {
        "asserted_chain": ["alice"],
        "action": "payments.refund.issue",
        "resource": {
            "kind": "payments.refund",
            "id": "rf_1",
            "attributes": {"amount": amount},
        },
    }


def operator_admin(tmp_path: pathlib.Path, secret: str) -> list[str]:
    """Config overrides for an admin socket in ``tmp_path`` with one
    credential, ``ops``, of the operator role, its secret written to
    ``tmp_path/operator.secret``: what ``operator_cli`` calls."""
    secret_file = tmp_path / "operator.secret"
    secret_file.write_text(secret)
    return [
        f"admin.socket={tmp_path / 'admin.sock'}",
        f"admin.credentials={{ops: {{secret_file: {secret_file}, roles: [operator]}}}}",
    ]


def operator_cli(
    tmp_path: pathlib.Path, command: tuple[str, ...], *extra: str
) -> subprocess.CompletedProcess[str]:
    """``kynara-sidecar <command> <extra>`` as an operator runs it against
    the admin socket ``operator_admin`` set up in ``tmp_path``, with its
    secret file, in a subprocess."""
    return subprocess.run(
        [
            sys.executable, "-m", "kynara_sidecar.cli", *command,
            "--config", str(SHIPPED_CONFIG),
            "--set", f"admin.socket={tmp_path / 'admin.sock'}",
            "--credential-file", str(tmp_path / "operator.secret"), *extra,
        ],
        capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
    )  # fmt: skip


def error_of(call) -> tuple[grpc.StatusCode, dict[str, str]]:
    """Run a call that must fail; return its status and trailing metadata."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    err = info.value
    return err.code(), dict(err.trailing_metadata() or ())


def read_record(running: RunningDaemon, seq: int) -> AuditRecordV1:
    """Read a committed record through the daemon's own store."""
    stored = running.daemon._store.get(seq)
    assert stored is not None, f"no record {seq}"
    return decode_record(stored.record_bytes)


# A cold start imports grpc and compiles the policies: well under a second
# here, but the machine is shared.
START_TIMEOUT = 30.0


def wait_serving(
    target: str, process: subprocess.Popen, log_path: pathlib.Path
) -> None:
    """Wait until a daemon process reports SERVING on gRPC health at target.

    Raises:
        AssertionError: the process exited or did not serve in time; the
            message carries its log.
    """
    deadline = time.monotonic() + START_TIMEOUT
    request = health_pb2.HealthCheckRequest()
    while time.monotonic() < deadline:
        exited = process.poll()
        assert exited is None, f"daemon exited {exited}:\n{log_path.read_text()}"
        with contextlib.suppress(grpc.RpcError):
            with grpc.insecure_channel(target) as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(request, timeout=1)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        time.sleep(0.05)
    raise AssertionError(f"daemon did not serve:\n{log_path.read_text()}")


# The unprivileged user tests run the daemon or the CLI as, so that
# permission bits apply (root ignores them).
NOBODY = 65534
AS_NOBODY = ("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups")


@functools.cache
def _nobody_cannot_run() -> str | None:
    """Why nobody cannot run the product here, or None when it can."""
    if os.geteuid() != 0:
        return f"needs root to switch users (uid {os.geteuid()})"
    if shutil.which("setpriv") is None:
        return "setpriv (util-linux) is not installed"
    probe = subprocess.run(
        [*AS_NOBODY, sys.executable, "-c", "import kynara_sidecar"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    if probe.returncode != 0:
        # A checkout under a directory only its owner may enter (mktemp -d
        # makes 0700 ones) cannot be imported by another user.
        error = probe.stderr.strip().splitlines()[-1:] or ["no output"]
        return f"user {NOBODY} cannot import this checkout: {error[0]}"
    return None


def as_nobody() -> tuple[str, ...]:
    """The prefix that runs a command as nobody; skips, saying why, when
    that cannot be done here."""
    reason = _nobody_cannot_run()
    if reason is not None:
        pytest.skip(f"running as nobody: {reason}")
    return AS_NOBODY


def hold_decisions(running):
    """Hold every decision before the audit writer (``append_all`` and the
    fast path's ``submit``) until the returned function opens the gate."""

    async def make_gate():
        return asyncio.Event()

    gate = running.call(make_gate())
    writer = running.daemon._writer
    original = writer.append_all

    async def held(records, state_changes=(), **options):
        records = tuple(records)
        if any(record.kind == "decision" for record in records):
            await gate.wait()
        return await original(records, state_changes, **options)

    writer.append_all = held
    # The fast path hands its groups to ``submit``: held alike.
    original_submit = writer.submit
    holding: set[asyncio.Task] = set()

    def held_submit(records, state_changes, on_done, **options):
        records = tuple(records)
        if not any(record.kind == "decision" for record in records):
            return original_submit(records, state_changes, on_done, **options)

        async def later():
            await gate.wait()
            original_submit(records, state_changes, on_done, **options)

        task = asyncio.get_running_loop().create_task(later())
        holding.add(task)
        task.add_done_callback(holding.discard)

    writer.submit = held_submit
    return lambda: running.loop.call_soon_threadsafe(gate.set)
