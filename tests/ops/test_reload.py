"""SIGHUP reload under load: a real daemon process, clients looping Decide
over gRPC and the fast path; no request may fail across any reload, good or
bad, and every answer names the revision that decided it."""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any

import grpc
from kynara.v1 import audit_pb2, audit_pb2_grpc
from ops_daemon import (
    CALL_TIMEOUT,
    CONFIG_REFUSED,
    DaemonProcess,
    FastClient,
    refund,
    wait_for,
    wait_for_new_revision,
)
from support import fast_refund

# How long the load runs on after each reload, so that requests cross it
# and keep coming once it is done: a bound on the test's length, not a
# measurement.
PHASE_SECONDS = 1.5
GRPC_CLIENTS = 2
FAST_CLIENTS = 2
BROKEN_POLICY = """\
format_version: 1
kind: policy
name: payments
rules:
  - id: refund-small
    effect: maybe
    actions: [payments.refund.issue]
    resources: [payments.refund]
    roles: [support]
"""


class Load:
    """Clients deciding in a loop until stopped; every answer and every
    failure kept in the order they came back."""

    def __init__(self, daemon: DaemonProcess):
        self._daemon = daemon
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._order = itertools.count()
        # (order, client, policy revision) of each answer.
        self.answers: list[tuple[int, str, str]] = []
        # (client, what went wrong) of each failed request.
        self.failures: list[tuple[str, str]] = []
        self._threads = [
            threading.Thread(target=self._grpc, args=(f"grpc-{n}",))
            for n in range(GRPC_CLIENTS)
        ] + [
            threading.Thread(target=self._fast, args=(f"fast-{n}",))
            for n in range(FAST_CLIENTS)
        ]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(CALL_TIMEOUT + 5)
        assert not any(t.is_alive() for t in self._threads), "a client hung"

    def _answered(self, client: str, revision: str) -> None:
        with self._lock:
            self.answers.append((next(self._order), client, revision))

    def _failed(self, client: str, what: str) -> None:
        with self._lock:
            self.failures.append((client, what))

    def _grpc(self, client: str) -> None:
        with self._daemon.channel() as channel:
            stub = self._daemon.stub(channel)
            while not self._stop.is_set():
                try:
                    answer = stub.Decide(refund(), timeout=CALL_TIMEOUT)
                except grpc.RpcError as err:
                    self._failed(client, f"{err.code().name}: {err.details()}")
                    continue
                self._answered(client, answer.policy_revision)

    def _fast(self, client: str) -> None:
        fast = FastClient(str(self._daemon.fast_socket))
        try:
            while not self._stop.is_set():
                try:
                    message = fast.decide(fast_refund())
                except OSError as err:
                    self._failed(client, repr(err))
                    return
                if "ok" not in message:
                    self._failed(client, repr(message))
                    continue
                self._answered(client, message["ok"]["policy_revision"])
        finally:
            fast.close()

    def revisions(self) -> set[str]:
        with self._lock:
            return {rev for _, _, rev in self.answers}

    def count(self) -> int:
        with self._lock:
            return len(self.answers)

    def seen(self, revision: str) -> set[str]:
        """The clients that got an answer from ``revision``."""
        with self._lock:
            return {client for _, client, rev in self.answers if rev == revision}

    def mark(self) -> int:
        """A point in the answers' order: later answers come after it."""
        with self._lock:
            return next(self._order)

    def run_for(self, seconds: float) -> None:
        """Let the clients decide a while longer (at least some answers)."""
        before = self.count()
        time.sleep(seconds)
        wait_for(lambda: self.count() > before, "answers to keep coming")


CLIENTS = {f"grpc-{n}" for n in range(GRPC_CLIENTS)} | {
    f"fast-{n}" for n in range(FAST_CLIENTS)
}


def errors_since(daemon: DaemonProcess, start: int, msg: str) -> list[dict[str, Any]]:
    return [
        line
        for line in daemon.records()[start:]
        if line["level"] == "error" and line["msg"] == msg
    ]


POLICY_REFUSED = "policy reload refused; previous policy stays active"


def test_sighup_under_load_switches_revision_and_keeps_it_on_bad_reloads(tmp_path):
    daemon = DaemonProcess(tmp_path)
    payments = daemon.policies / "payments.yaml"
    try:
        with Load(daemon) as load:
            wait_for(lambda: load.count() > 0, "a first answer")
            first = load.answers[0][2]
            wait_for(lambda: load.seen(first) == CLIENTS, "every client answered")

            # A changed policy: answers move to the new revision.
            daemon.change_payments_policy("second")
            daemon.reload()
            wait_for(lambda: load.revisions() - {first}, "a new revision")
            (second,) = load.revisions() - {first}
            wait_for(lambda: load.seen(second) == CLIENTS, "all on the new revision")
            load.run_for(PHASE_SECONDS)

            # A broken policy: refused, naming the file; the revision stays.
            logged = len(daemon.lines())
            payments.write_text(BROKEN_POLICY)
            daemon.reload()
            wait_for(lambda: errors_since(daemon, logged, POLICY_REFUSED), "the error")
            policy_refused = load.mark()
            load.run_for(PHASE_SECONDS)
            (policy_error,) = errors_since(daemon, logged, POLICY_REFUSED)

            # A broken config file, with a good third policy beside it: the
            # whole reload is refused, naming the key; nothing changes.
            logged = len(daemon.lines())
            daemon.change_payments_policy("third")
            daemon.set(**{"agent.max_message_bytes": "big"})
            daemon.reload()
            wait_for(lambda: errors_since(daemon, logged, CONFIG_REFUSED), "the error")
            config_refused = load.mark()
            load.run_for(PHASE_SECONDS)
            (config_error,) = errors_since(daemon, logged, CONFIG_REFUSED)
            answers = list(load.answers)
            failures = list(load.failures)
    finally:
        exit_code = daemon.stop()

    assert failures == []
    assert exit_code == 0
    assert {rev for _, _, rev in answers} == {first, second}
    for client in CLIENTS:
        # Each client saw the first revision, then the second, never back...
        seen = [rev for _, who, rev in answers if who == client]
        switch = seen.index(second)
        assert set(seen[:switch]) == {first} and set(seen[switch:]) == {second}
        # ...and was answered after each bad reload was refused.
        later = [n for n, who, _ in answers if who == client]
        assert max(later) > config_refused > policy_refused, client
    assert str(payments) in policy_error["error"]
    assert "effect" in policy_error["error"]
    assert policy_error["policy_revision"] == second
    assert "agent.max_message_bytes" in config_error["error"]
    assert str(daemon.config_path) in config_error["error"]


def test_sighup_applies_log_level_and_names_keys_that_need_a_restart(
    daemon_process,
):
    daemon = daemon_process
    logged = len(daemon.lines())
    with daemon.channel() as channel:
        stub = daemon.stub(channel)
        before = stub.Decide(refund(), timeout=CALL_TIMEOUT).policy_revision
        daemon.set(**{"log.level": "warning", "agent.max_message_bytes": 131072})
        daemon.change_payments_policy("new")
        daemon.reload()
        # The config reload comes first in a SIGHUP, then the policies; a
        # line about the activation is written before the next request.
        wait_for_new_revision(stub, before, "the new policy")
    lines = daemon.records()[logged:]
    warnings = [line for line in lines if line["level"] == "warning"]
    assert [line["msg"] for line in warnings] == [
        "config changes not applied: restart to apply"
    ]
    assert warnings[0]["settings"] == ["agent.max_message_bytes"]
    assert "log.level" in warnings[0]["live"]
    # At warning, neither "config reloaded" nor "policy activated" is logged.
    assert [line for line in lines if line["level"] in ("info", "debug")] == []


def test_sighup_rotates_admin_secrets_and_keeps_them_on_a_bad_file(tmp_path):
    """A rotated secret file is read again on SIGHUP: the old secret is
    refused from then on and the new one served; an unreadable one keeps
    the secrets in use."""
    secret = tmp_path / "operator.secret"
    secret.write_text("old-operator-secret-0123456789\n")
    admin_socket = tmp_path / "admin.sock"
    daemon = DaemonProcess(
        tmp_path,
        {
            "admin.socket": str(admin_socket),
            "admin.credentials": {
                "ops": {"secret_file": str(secret), "roles": ["operator"]}
            },
        },
    )

    def head(with_secret: str) -> grpc.StatusCode:
        with grpc.insecure_channel(f"unix://{admin_socket}") as channel:
            stub = audit_pb2_grpc.AuditServiceStub(channel)
            try:
                stub.GetHead(
                    audit_pb2.GetHeadRequest(),
                    metadata=[("authorization", f"Bearer {with_secret}")],
                    timeout=CALL_TIMEOUT,
                )
            except grpc.RpcError as err:
                return err.code()
            return grpc.StatusCode.OK

    try:
        assert head("old-operator-secret-0123456789") == grpc.StatusCode.OK
        secret.write_text("new-operator-secret-9876543210\n")
        rotated = daemon.reload_and_wait("the reload")
        old = head("old-operator-secret-0123456789")
        new = head("new-operator-secret-9876543210")

        # Too short to be a secret: refused, and the new secret stays.
        secret.write_text("zq9x\n")
        refused = daemon.reload_and_wait("the refused reload")
        kept = head("new-operator-secret-9876543210")
    finally:
        exit_code = daemon.stop()

    # No setting changed, yet the reload says what it re-read.
    assert rotated["msg"] == "config reloaded"
    assert (rotated["applied"], rotated["admin_secrets_reread"]) == ([], 1)
    assert old == grpc.StatusCode.UNAUTHENTICATED
    assert new == grpc.StatusCode.OK
    assert refused["msg"] == CONFIG_REFUSED
    assert str(secret) in refused["error"]
    assert "zq9x" not in refused["error"]
    assert kept == grpc.StatusCode.OK
    assert exit_code == 0
