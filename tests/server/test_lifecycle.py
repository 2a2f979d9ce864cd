"""Health, metrics, reload and shutdown of a real daemon."""

from __future__ import annotations

import os
import shutil
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kynara.v1 import decision_pb2 as pb
from support import (
    SHIPPED_POLICIES,
    RunningDaemon,
    daemon_config,
    error_of,
    small_refund,
)

from kynara_sidecar.errors import ListenerError, PolicyError

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def health_status(target: str, service: str = "") -> int:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service)).status


def scrape(running) -> str:
    url = f"http://127.0.0.1:{running.daemon.http_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as reply:
        return reply.read().decode()


def test_health_serving_on_agent_socket_and_health_port(daemon):
    assert health_status(daemon.target) == SERVING
    assert health_status(daemon.target, "kynara.v1.DecisionService") == SERVING
    assert health_status(f"127.0.0.1:{daemon.daemon.health_port}") == SERVING


def test_health_port_serves_nothing_but_health(daemon):
    channel = grpc.insecure_channel(f"127.0.0.1:{daemon.daemon.health_port}")
    from kynara.v1 import decision_pb2_grpc

    stub = decision_pb2_grpc.DecisionServiceStub(channel)
    with pytest.raises(grpc.RpcError) as info:
        stub.Decide(small_refund())
    channel.close()

    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_metrics_count_decisions_with_bounded_action_label(daemon):
    stub = daemon.stub()
    stub.Decide(small_refund())
    improvised = small_refund()
    improvised.action = "payments.refund.improvised.by.model"
    stub.Decide(improvised)

    text = scrape(daemon)

    assert (
        'kynara_decisions_total{action="payments.refund.issue",decision="allow"} 1.0'
        in text
    )
    assert 'kynara_decisions_total{action="other",decision="deny"} 1.0' in text
    assert "improvised" not in text
    assert "kynara_audit_records_total" in text
    assert "kynara_audit_map_used_bytes" in text


def test_metrics_count_errors_by_code(daemon):
    bad = small_refund()
    bad.action = ""
    error_of(lambda: daemon.stub().Decide(bad))

    text = scrape(daemon)

    assert 'kynara_request_errors_total{code="invalid_request"} 1.0' in text


def test_reload_with_bad_policy_keeps_previous_set(start_daemon, tmp_path):
    policies = tmp_path / "policies"
    shutil.copytree(SHIPPED_POLICIES, policies)
    running = start_daemon(f"policy.source={policies}")
    before = running.stub().Decide(small_refund())
    victim = sorted(p for p in policies.rglob("*.yaml"))[0]
    victim.write_text(victim.read_text() + "\nunexpected_key: 1\n")

    reloaded = running.call(running.daemon.reload())
    after = running.stub().Decide(small_refund())

    assert reloaded is False
    assert after.policy_revision == before.policy_revision
    assert after.decision == pb.DECISION_ALLOW
    assert 'kynara_policy_reloads_total{result="error"} 1.0' in scrape(running)


def test_reload_with_good_policy_swaps_revision(start_daemon, tmp_path):
    policies = tmp_path / "policies"
    shutil.copytree(SHIPPED_POLICIES, policies)
    running = start_daemon(f"policy.source={policies}")
    before = running.stub().Decide(small_refund())
    victim = sorted(p for p in policies.rglob("*.yaml"))[0]
    victim.write_text(victim.read_text() + "\n# a comment changes the revision\n")

    assert running.call(running.daemon.reload()) is True
    after = running.stub().Decide(small_refund())

    assert after.policy_revision != before.policy_revision


def test_closing_pipeline_answers_shutting_down(daemon):
    daemon.daemon.pipeline.close()

    status, metadata = error_of(lambda: daemon.stub().Decide(small_refund()))

    assert status == grpc.StatusCode.UNAVAILABLE
    assert metadata["kynara-error-code"] == "shutting_down"


def test_unexpected_fault_is_internal_and_gives_no_answer(daemon, monkeypatch):
    def explode(*_args, **_kwargs):
        raise RuntimeError("engine fault")

    monkeypatch.setattr("kynara_sidecar.engine.evaluate", explode)

    status, metadata = error_of(lambda: daemon.stub().Decide(small_refund()))

    assert status == grpc.StatusCode.INTERNAL
    assert metadata["kynara-error-code"] == "internal"


def test_stop_reports_not_serving(start_daemon):
    running = start_daemon()
    health_target = f"127.0.0.1:{running.daemon.health_port}"
    assert health_status(health_target) == SERVING
    servicer = running.daemon._health[1]

    running.call(running.daemon.stop())

    status = running.call(servicer.Check(health_pb2.HealthCheckRequest(), None))
    assert status.status == NOT_SERVING


def test_second_daemon_on_the_same_socket_is_refused_and_first_keeps_it(
    start_daemon, tmp_path
):
    first = start_daemon()
    other = tmp_path / "other"
    other.mkdir()
    config = daemon_config(other, f"agent.socket={first.socket}")

    with pytest.raises(ListenerError, match="is in use by another daemon"):
        RunningDaemon(config, first.clock)

    assert first.stub().Decide(small_refund()).decision == pb.DECISION_ALLOW


def test_port_in_use_is_a_listener_error_naming_the_setting(start_daemon, tmp_path):
    first = start_daemon()
    other = tmp_path / "other"
    other.mkdir()
    config = daemon_config(other, f"agent.port={first.daemon.tcp_port}")

    with pytest.raises(ListenerError, match=r"agent.port: cannot listen on 127.0.0.1"):
        RunningDaemon(config, first.clock)

    assert first.stub().Decide(small_refund()).decision == pb.DECISION_ALLOW


def test_agent_missing_from_directory_refuses_start(tmp_path, clock):
    config = daemon_config(tmp_path, "identity.agent_id=ghost-bot")

    with pytest.raises(PolicyError, match="identity.agent_id 'ghost-bot' is not in"):
        RunningDaemon(config, clock)


def test_reload_that_drops_the_agent_is_refused(start_daemon, tmp_path):
    policies = tmp_path / "policies"
    shutil.copytree(SHIPPED_POLICIES, policies)
    running = start_daemon(f"policy.source={policies}")
    directory = policies / "directory.yaml"
    directory.write_text(directory.read_text().replace("id: support-bot", "id: x-bot"))

    assert running.call(running.daemon.reload()) is False
    assert running.stub().Decide(small_refund()).decision == pb.DECISION_ALLOW


def test_reload_survives_an_unexpected_loader_fault(daemon, monkeypatch):
    def explode(*_args, **_kwargs):
        raise RuntimeError("loader bug")

    monkeypatch.setattr("kynara_sidecar.daemon.compile_documents", explode)

    assert daemon.call(daemon.daemon.reload()) is False
    assert 'kynara_policy_reloads_total{result="error"} 1.0' in scrape(daemon)


def map_used(text: str) -> float:
    line = next(
        line for line in text.splitlines() if line.startswith("kynara_audit_map_used")
    )
    return float(line.split()[-1])


def test_map_usage_gauge_follows_the_log(daemon):
    before = map_used(scrape(daemon))
    stub = daemon.stub()
    for _ in range(50):
        stub.Decide(small_refund(padding="p" * 4096))

    assert map_used(scrape(daemon)) > before


def test_refusals_before_the_pipeline_are_counted(start_daemon):
    running = start_daemon("agent.max_message_bytes=4096")
    error_of(lambda: running.stub().Decide(small_refund(note="x" * 8192)))

    text = scrape(running)

    assert 'kynara_request_errors_total{code="request_too_large"} 1.0' in text


def test_agent_socket_takes_the_configured_mode(start_daemon):
    running = start_daemon("agent.socket_mode=0640")

    mode = os.stat(running.socket).st_mode & 0o777

    assert mode == 0o640
