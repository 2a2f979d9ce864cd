"""A real Prometheus scrapes a real daemon after a known workload.

/usr/bin/prometheus (the Debian package) runs on 127.0.0.1 at a free port,
its storage in tmp_path, scraping the daemon's HTTP listener every second.
The daemon answers a known workload over gRPC and the fast path: allows
and denies of a named action, an action no policy names (counted as
``other``), a require_approval a reviewer approves through the admin
listener and its granted retry, and malformed requests. The values are then
read back through Prometheus's HTTP API, from a scrape taken after the
workload ended, and compared exactly.

Without the binary the test is skipped, unless KYNARA_PROMETHEUS_TESTS is
``required`` (as .ci/run sets it), when it fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import socket
import struct
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import msgspec
import pytest
from kynara.v1 import approval_pb2, approval_pb2_grpc
from kynara.v1 import decision_pb2 as pb
from support import free_port, small_refund

PROMETHEUS = os.environ.get("KYNARA_PROMETHEUS", "/usr/bin/prometheus")
# Bounds on waits (Prometheus starting, a scrape landing): a stuck one fails
# the test instead of hanging it. They are not speed checks.
WAIT_SECONDS = 30.0
CALL_TIMEOUT = 30.0
REVIEWER_SECRET = "carol-reviewer-secret-0123456789"
ACTION = "payments.refund.issue"
FAST_HEADER = struct.Struct(">II")
# No proxy from the environment for loopback calls.
HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def require_prometheus() -> None:
    if os.access(PROMETHEUS, os.X_OK):
        return
    missing = f"no Prometheus at {PROMETHEUS}: apt-get install prometheus"
    # .ci/run installs it and sets this, so CI never skips the test.
    if os.environ.get("KYNARA_PROMETHEUS_TESTS") == "required":
        pytest.fail(missing)
    pytest.skip(missing)


class Prometheus:
    """A Prometheus process scraping one target; ``query`` reads its API."""

    def __init__(self, base: str, process: subprocess.Popen[bytes], log: pathlib.Path):
        self.base = base
        self.process = process
        self.log = log

    def get(self, path: str, **params: str) -> Any:
        url = f"{self.base}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with HTTP.open(url, timeout=CALL_TIMEOUT) as response:
            return json.loads(response.read())

    def query(self, expr: str, at: float) -> dict[frozenset, float]:
        """The instant vector of ``expr`` at ``at``: labels (without
        __name__) -> value."""
        answer = self.get("/api/v1/query", query=expr, time=f"{at:.3f}")
        assert answer["status"] == "success", answer
        return {
            frozenset(
                (k, v) for k, v in item["metric"].items() if k != "__name__"
            ): float(item["value"][1])
            for item in answer["data"]["result"]
        }

    def value(self, expr: str, at: float, **labels: str) -> float | None:
        return self.query(expr, at).get(frozenset(labels.items()))

    def scraped_after(self, moment: float) -> float:
        """Wait for a scrape of the daemon that began after ``moment``
        (Unix seconds); return an instant at which it is the latest."""
        deadline = time.monotonic() + WAIT_SECONDS
        while time.monotonic() < deadline:
            now = time.time()
            # timestamp() of a plain selector: when the scrape began (of
            # anything computed, it would be the query's own time).
            seen = self.query('timestamp(up{job="kynara"})', now).values()
            if any(scraped > moment for scraped in seen):
                return now
            time.sleep(0.2)
        pytest.fail(
            f"Prometheus scraped nothing after {moment}: "
            f"{self.get('/api/v1/targets')}; log: {self.log.read_text()[-2000:]}"
        )


@contextlib.contextmanager
def running_prometheus(
    tmp_path: pathlib.Path, target_port: int
) -> Iterator[Prometheus]:
    """Prometheus on 127.0.0.1 scraping ``127.0.0.1:target_port`` every
    second; stopped by its PID at the end."""
    require_prometheus()
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        json.dumps(
            {
                "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
                "scrape_configs": [
                    {
                        "job_name": "kynara",
                        "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}],
                    }
                ],
            }
        )
    )
    log = tmp_path / "prometheus.log"
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
    prometheus = Prometheus(f"http://127.0.0.1:{port}", process, log)
    try:
        wait_ready(prometheus)
        yield prometheus
    finally:
        process.terminate()
        try:
            process.wait(WAIT_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(WAIT_SECONDS)


def wait_ready(prometheus: Prometheus) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        if prometheus.process.poll() is not None:
            pytest.fail(f"prometheus exited: {prometheus.log.read_text()[-2000:]}")
        try:
            with HTTP.open(f"{prometheus.base}/-/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.1)
    pytest.fail(f"prometheus not ready: {prometheus.log.read_text()[-2000:]}")


class FastClient:
    """Just enough of the fast path for a workload: hello, then decide."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(CALL_TIMEOUT)
        self.sock.connect(path)
        self.stream = 0
        assert "ok" in self._call({"op": "hello", "versions": [1]})

    def _call(self, message: dict) -> dict:
        payload = msgspec.msgpack.encode(message)
        self.sock.sendall(FAST_HEADER.pack(len(payload), self.stream) + payload)
        length, stream = FAST_HEADER.unpack(self._read(FAST_HEADER.size))
        assert stream == self.stream
        self.stream += 1
        return msgspec.msgpack.decode(self._read(length))

    def _read(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            assert chunk, "the daemon closed the fast path connection"
            data += chunk
        return data

    def decide(self, request: dict) -> dict:
        return self._call({"op": "decide", "request": request})

    def close(self) -> None:
        self.sock.close()


def fast_refund(user: str = "alice", action: str = ACTION) -> dict:
    return {
        "asserted_chain": [user] if user else [],
        "action": action,
        "resource": {
            "kind": "payments.refund",
            "id": "rf_1",
            "attributes": {"amount": 1200},
        },
    }


def grpc_refund(
    user: str = "alice", action: str = ACTION, amount: int = 1200, approval_id=""
) -> pb.DecideRequest:
    request = small_refund()
    del request.asserted_chain[:]
    if user:
        request.asserted_chain.append(user)
    request.action = action
    request.resource.attributes["amount"].int_value = amount
    request.approval_id = approval_id
    return request


@pytest.fixture
def reviewed_daemon(tmp_path, start_daemon):
    """A daemon with an admin socket where carol reviews."""
    secret = tmp_path / "carol.secret"
    secret.write_text(REVIEWER_SECRET)
    credentials = {"carol": {"secret_file": str(secret), "roles": ["reviewer"]}}
    return start_daemon(
        f"admin.socket={tmp_path / 'admin.sock'}",
        f"admin.credentials={json.dumps(credentials)}",
    )


def test_prometheus_reads_the_workloads_exact_counts(tmp_path, reviewed_daemon):
    require_prometheus()
    running = reviewed_daemon
    agent = running.stub()
    admin = grpc.insecure_channel(f"unix://{running.config.admin.socket}")
    reviews = approval_pb2_grpc.ApprovalServiceStub(admin)
    fast = FastClient(running.config.agent.fast_socket)

    with (
        contextlib.closing(admin),
        contextlib.closing(fast),
        running_prometheus(tmp_path, running.daemon.http_port) as prometheus,
    ):
        grpc_answers = [
            agent.Decide(grpc_refund(), timeout=CALL_TIMEOUT) for _ in range(3)
        ]
        grpc_answers += [
            agent.Decide(grpc_refund(user="dave"), timeout=CALL_TIMEOUT)
            for _ in range(2)
        ]
        grpc_answers.append(
            agent.Decide(grpc_refund(action="made.up.thing"), timeout=CALL_TIMEOUT)
        )
        with pytest.raises(grpc.RpcError) as refused:
            agent.Decide(grpc_refund(user=""), timeout=CALL_TIMEOUT)
        fast_answers = [fast.decide(fast_refund()) for _ in range(2)]
        fast_answers.append(fast.decide(fast_refund(user="dave")))
        fast_answers.append(fast.decide(fast_refund(action="made.up.thing")))
        fast_refused = fast.decide(fast_refund(user=""))
        asked = agent.Decide(grpc_refund(amount=60000), timeout=CALL_TIMEOUT)
        asked_at = time.time()
        while_pending = prometheus.scraped_after(asked_at)
        pending = prometheus.query("kynara_approvals_pending", while_pending)
        reviews.Approve(
            approval_pb2.ReviewRequest(approval_id=asked.approval.id, comment="ok"),
            metadata=(("authorization", f"Bearer {REVIEWER_SECRET}"),),
            timeout=CALL_TIMEOUT,
        )
        granted = agent.Decide(
            grpc_refund(amount=60000, approval_id=asked.approval.id),
            timeout=CALL_TIMEOUT,
        )
        ended = time.time()
        at = prometheus.scraped_after(ended)
        head = running.daemon._store.head().seq
        instance = f"127.0.0.1:{running.daemon.http_port}"

        def value(name: str, **labels: str) -> float | None:
            return prometheus.value(name, at, job="kynara", instance=instance, **labels)

        decisions = prometheus.query("kynara_decisions_total", at)
        errors = prometheus.query("kynara_request_errors_total", at)
        decide_calls = prometheus.query(
            'kynara_grpc_server_handled_total{grpc_method="Decide"}', at
        )
        values = {
            "records": value("kynara_audit_records_total"),
            "head": value("kynara_audit_chain_head"),
            "pending": value("kynara_approvals_pending"),
            "evaluations": value("kynara_evaluation_duration_seconds_count"),
            "appends": value("kynara_audit_append_duration_seconds_count"),
            "approve": value(
                "kynara_grpc_server_handled_total",
                grpc_service="kynara.v1.ApprovalService",
                grpc_method="Approve",
                grpc_code="OK",
            ),
            "decide_started": value(
                "kynara_grpc_server_started_total",
                grpc_service="kynara.v1.DecisionService",
                grpc_method="Decide",
            ),
            "cpu": value("kynara_process_cpu_seconds_total"),
        }
        changes = {
            state: value("kynara_approval_changes_total", state=state)
            for state in ("pending", "approved", "used", "rejected")
        }

    assert [a.decision for a in grpc_answers] == [pb.DECISION_ALLOW] * 3 + [
        pb.DECISION_DENY
    ] * 3
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [a["ok"]["decision"] for a in fast_answers] == [
        "allow", "allow", "deny", "deny",
    ]  # fmt: skip
    assert fast_refused["error"]["code"] == "invalid_request"
    assert asked.decision == pb.DECISION_REQUIRE_APPROVAL
    assert granted.decision == pb.DECISION_ALLOW
    assert list(pending.values()) == [1]
    common = {("job", "kynara"), ("instance", instance)}
    assert decisions == {
        frozenset({*common, ("decision", "allow"), ("action", ACTION)}): 3 + 2 + 1,
        frozenset({*common, ("decision", "deny"), ("action", ACTION)}): 2 + 1,
        frozenset({*common, ("decision", "deny"), ("action", "other")}): 1 + 1,
        frozenset({*common, ("decision", "require_approval"), ("action", ACTION)}): 1,
    }
    assert errors == {frozenset({*common, ("code", "invalid_request")}): 2}
    service = ("grpc_service", "kynara.v1.DecisionService")
    assert decide_calls == {
        frozenset(
            {*common, service, ("grpc_method", "Decide"), ("grpc_code", "OK")}
        ): 8,
        frozenset(
            {
                *common,
                service,
                ("grpc_method", "Decide"),
                ("grpc_code", "INVALID_ARGUMENT"),
            }
        ): 1,
    }
    assert changes == {"pending": 1, "approved": 1, "used": 1, "rejected": None}
    # Every decided request was evaluated once: 12 decisions (the refused
    # ones never reached the engine).
    assert values["evaluations"] == 12
    assert values["records"] == head
    assert values["head"] == head
    assert values["pending"] == 0
    assert values["approve"] == 1
    assert values["decide_started"] == 9
    assert values["appends"] is not None and values["appends"] > 0
    assert values["cpu"] is not None and values["cpu"] > 0
