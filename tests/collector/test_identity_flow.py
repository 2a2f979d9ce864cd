"""From the identity provider to every decision: a user and a group
provisioned over SCIM reach a running daemon as a signed directory revision,
and deactivating the user turns the decisions for their still-valid token
into ``inactive_principal`` denies.

Real parts throughout: the collector's SCIM endpoint on 127.0.0.1, its LMDB
state, a dir:// central store, the collector's directory key, and a daemon in
verified identity mode deciding over gRPC on its Unix socket.
"""

from __future__ import annotations

import json
import time

import grpc
import pytest
from identity_support import NOW, SigningKey, claims, jwks
from kynara.v1 import decision_pb2 as pb
from support import read_record, small_refund

from kynara_sidecar.audit.keys import save_public_key

from .test_scim import KYNARA_EXTENSION, Scim

# How long a change may take to reach the daemon (the bound).
BOUND_SECONDS = 10.0
# How long decisions keep coming after the first deny, to catch an allow.
AFTER_DENY_SECONDS = 2.0
# The shipped policies' roles: support may refund, support_agent acts for it.
FLOW_GROUP_ROLES = {"Support": ["support"], "Support Agents": ["support_agent"]}


@pytest.fixture
def idp() -> SigningKey:
    return SigningKey("ES256", "idp-flow")


@pytest.fixture
def scim(tmp_path):
    home = tmp_path / "collector"
    home.mkdir()
    collector = Scim(home, group_roles=FLOW_GROUP_ROLES)
    collector.store_root.mkdir()
    collector.start()
    yield collector
    collector.stop()


def _daemon_overrides(tmp_path, scim: Scim, idp: SigningKey) -> list[str]:
    public = tmp_path / "directory.pub"
    save_public_key(scim.key.public(), public)
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(json.dumps(jwks(idp)))
    issuer = {
        "issuer": "https://idp.example.test",
        "audience": "kynara:support-bot",
        "jwks_file": str(jwks_file),
    }
    return [
        "identity.mode=verified",
        f"identity.issuers=[{json.dumps(issuer)}]",
        f"directory.store=dir://{scim.store_root}",
        f"directory.trusted_keys=[{json.dumps(str(public))}]",
        "sync.poll_seconds=0.2",
    ]


def _refund_for(token: str):
    request = small_refund()
    del request.asserted_chain[:]
    request.delegation_token = token
    return request


def _decide(stub, request):
    """The reply, or None while the daemon cannot decide yet."""
    try:
        return stub.Decide(request, timeout=5)
    except grpc.RpcError as err:
        if err.code() in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.FAILED_PRECONDITION,
        ):
            return None
        raise


def test_provisioned_user_is_allowed_then_denied_once_deactivated(
    tmp_path, scim, idp, start_daemon
):
    # The daemon's own agent comes from the identity provider too.
    agent = scim.create_user(
        "support-bot",
        **{KYNARA_EXTENSION: {"kind": "agent", "owner": "support"}},
    )
    scim.create_group("Support Agents", [agent["id"]])
    daemon = start_daemon(*_daemon_overrides(tmp_path, scim, idp))
    stub = daemon.stub()
    # Valid well past the test: only the directory may end frank's access.
    token = idp.sign(claims("frank", exp=NOW + 3600))
    request = _refund_for(token)

    user = scim.create_user("frank", emails=[{"value": "frank@example.com"}])
    scim.create_group("Support", [user["id"]])
    deadline = time.monotonic() + BOUND_SECONDS
    seen = []
    while True:
        reply = _decide(stub, request)
        seen.append(None if reply is None else reply.reason_code)
        if reply is not None and reply.decision == pb.DECISION_ALLOW:
            break
        assert time.monotonic() < deadline, f"never allowed; answers: {seen[-5:]}"
        time.sleep(0.05)
    allowed = reply
    record = read_record(daemon, allowed.audit_sequence)
    assert [entry.id for entry in record.chain] == ["frank", "support-bot"]
    published = scim.published()
    assert published is not None and published["frank"]["roles"] == ["support"]
    assert allowed.directory_revision == record.directory_revision

    status, _, body = scim.patch(
        f"/Users/{user['id']}", {"op": "replace", "path": "active", "value": False}
    )
    assert status in (200, 204), body
    deadline = time.monotonic() + BOUND_SECONDS
    while True:
        reply = _decide(stub, request)
        assert reply is not None
        if reply.decision != pb.DECISION_ALLOW:
            break
        assert time.monotonic() < deadline, "still allowed after deactivation"
        time.sleep(0.05)
    assert reply.decision == pb.DECISION_DENY
    assert reply.reason_code == "inactive_principal"
    assert reply.directory_revision != allowed.directory_revision

    answers = []
    until = time.monotonic() + AFTER_DENY_SECONDS
    while time.monotonic() < until:
        later = _decide(stub, request)
        answers.append((later.decision, later.reason_code))
    assert answers and set(answers) == {(pb.DECISION_DENY, "inactive_principal")}
    denied = read_record(daemon, reply.audit_sequence)
    assert denied.reason_code == "inactive_principal"
    assert denied.directory_revision == reply.directory_revision
