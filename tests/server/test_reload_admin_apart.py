"""A reload reads no file through the config (load_config's read_files), so
the daemon itself keeps a rotated admin secret apart from every agent's."""

from __future__ import annotations

import grpc
from kynara.v1 import audit_pb2 as pb
from kynara.v1 import audit_pb2_grpc
from test_audit_service import AGENT_SECRET, OPERATOR_SECRET, bearer
from test_audit_service import admin_overrides as admin_overrides  # a fixture
from test_audit_service import multi_agent as multi_agent  # a fixture


def test_a_reload_refuses_an_admin_secret_rotated_to_an_agents(
    tmp_path, start_daemon, admin_overrides, multi_agent
):
    running = start_daemon(*admin_overrides, *multi_agent)
    # A reload's loader reads no secret file: the config as it was.
    running.daemon._reload_config = lambda: running.config
    (tmp_path / "ops.secret").write_text(AGENT_SECRET + "\n")

    reloaded = running.call(running.daemon.reload())

    with grpc.insecure_channel(f"unix://{running.config.admin.socket}") as channel:
        head = audit_pb2_grpc.AuditServiceStub(channel).GetHead(
            pb.GetHeadRequest(), metadata=bearer(OPERATOR_SECRET), timeout=10
        )
    assert reloaded is False
    # The secret in use stays.
    assert head.checkpoint.origin == running.config.identity.daemon_id
