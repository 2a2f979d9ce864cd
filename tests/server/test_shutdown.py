"""Graceful shutdown: NOT_SERVING, refuse new work, finish what is in flight."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2
from kynara.v1 import decision_pb2 as pb
from kynara.v1 import decision_pb2_grpc
from support import REPO_ROOT, error_of, hold_decisions, small_refund

from kynara_sidecar.audit.chain import decode_record
from kynara_sidecar.audit.store import AuditStore

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# A call may legitimately wait out the drain, so the client's deadline is
# well past the grace: a DEADLINE_EXCEEDED then means a call hung.
GRACE_SECONDS = 3
CALL_TIMEOUT = 30


def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_stop_finishes_in_flight_request_and_refuses_new_ones(start_daemon):
    running = start_daemon("shutdown_grace_seconds=10")
    release = hold_decisions(running)
    pool = concurrent.futures.ThreadPoolExecutor(2)
    in_flight = pool.submit(running.stub().Decide, small_refund())
    wait_until(lambda: running.daemon.pipeline._in_flight == 1)

    stopping = asyncio.run_coroutine_threadsafe(running.daemon.stop(), running.loop)
    wait_until(lambda: running.daemon.pipeline._closing)
    status, metadata = error_of(lambda: running.stub().Decide(small_refund()))
    health = running.call(
        running.daemon._health[0].Check(health_pb2.HealthCheckRequest(), None)
    )
    release()
    answer = in_flight.result(10)
    stopping.result(15)
    pool.shutdown()

    assert status == grpc.StatusCode.UNAVAILABLE
    assert metadata["kynara-error-code"] == "shutting_down"
    assert health.status == NOT_SERVING
    assert answer.decision == pb.DECISION_ALLOW
    store = AuditStore.open(running.config.audit.path, readonly=True)
    records = [decode_record(r.record_bytes) for r in store.iter_records()]
    store.close()
    assert records[answer.audit_sequence - 1].decision_id == answer.decision_id
    assert records[-1].kind == "marker" and records[-1].marker.event == "stop"


def test_stop_gives_up_on_a_stuck_request_after_the_grace(start_daemon):
    running = start_daemon("shutdown_grace_seconds=1")
    hold_decisions(running)  # never released
    pool = concurrent.futures.ThreadPoolExecutor(1)
    stuck = pool.submit(running.stub().Decide, small_refund(), timeout=30)
    wait_until(lambda: running.daemon.pipeline._in_flight == 1)

    running.call(running.daemon.stop(), timeout=10)

    with pytest.raises(grpc.RpcError) as ended:
        stuck.result(10)
    pool.shutdown()
    assert ended.value.code() in (
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNAVAILABLE,
    )


@pytest.mark.slow
def test_sigterm_under_load_exits_zero_and_loses_no_answer(tmp_path):
    socket = tmp_path / "agent.sock"
    audit = tmp_path / "audit"
    log_path = tmp_path / "daemon.log"
    with log_path.open("w") as log_file:
        process = subprocess.Popen(
            [
                sys.executable, "-m", "kynara_sidecar.cli", "run",
                "--config", "config/kynara.yaml",
                "--set", f"agent.socket={socket}", "--set", "agent.port=0",
                "--set", f"agent.fast_socket={tmp_path / 'agent.fast.sock'}",
                "--set", "health.port=0", "--set", "http.port=0",
                "--set", f"audit.path={audit}",
                "--set", f"audit.signing_key={tmp_path / 'keys' / 'audit.pem'}",
                "--set", f"audit.witness_path={tmp_path / 'witness'}",
                "--set", f"shutdown_grace_seconds={GRACE_SECONDS}",
            ],
            cwd=REPO_ROOT, stderr=log_file,
        )  # fmt: skip
        wait_until(socket.exists)
        answered: list[pb.DecideResponse] = []
        failures: list[tuple[str, str]] = []
        stop = threading.Event()

        def load() -> None:
            with grpc.insecure_channel(f"unix://{socket}") as channel:
                stub = decision_pb2_grpc.DecisionServiceStub(channel)
                while not stop.is_set():
                    try:
                        answered.append(
                            stub.Decide(small_refund(), timeout=CALL_TIMEOUT)
                        )
                    except grpc.RpcError as err:
                        metadata = dict(err.trailing_metadata() or ())
                        code = metadata.get("kynara-error-code", "")
                        failures.append((err.code().name, code))
                        if err.code() is not grpc.StatusCode.UNAVAILABLE or code:
                            continue
                        return  # the daemon is gone

        threads = [threading.Thread(target=load) for _ in range(4)]
        for thread in threads:
            thread.start()
        wait_until(lambda: len(answered) > 200, timeout=30)
        process.send_signal(signal.SIGTERM)
        exit_code = process.wait(timeout=30)
        stop.set()
        for thread in threads:
            thread.join(30)

    store = AuditStore.open(audit, readonly=True)
    logged = {decode_record(r.record_bytes).decision_id for r in store.iter_records()}
    store.close()
    messages = [json.loads(line)["msg"] for line in log_path.read_text().splitlines()]
    assert exit_code == 0
    assert {a.decision_id for a in answered} <= logged
    assert {status for status, _ in failures} <= {"UNAVAILABLE", "CANCELLED"}
    shutdown = [
        "stopping",
        "drained",
        "listeners closed",
        "audit log closed",
        "stopped",
    ]
    assert [m for m in messages if m in shutdown] == shutdown
