"""Verified identities over gRPC: delegation tokens and per-agent secrets."""

from __future__ import annotations

import json
import shutil

import grpc
import kynara_sdk
import pytest
from identity_support import NOW, SigningKey, claims, jwks, unsigned
from kynara.v1 import decision_pb2 as pb
from support import SHIPPED_POLICIES, error_of, read_record, small_refund

# Agents only this test's directory knows: two that may refund and one that
# may only read the CRM.
EXTRA_PRINCIPALS = """
  - id: orchestrator
    kind: agent
    roles: [support_agent]
  - id: sub-agent
    kind: agent
    roles: [support_agent]
  - id: crm-only-agent
    kind: agent
    roles: [crm_reader]
"""


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey("ES256", "idp-1")


@pytest.fixture
def verified(tmp_path, key) -> list[str]:
    """Overrides for verified mode against a policy copy with more agents."""
    policies = tmp_path / "policies"
    shutil.copytree(SHIPPED_POLICIES, policies)
    directory = policies / "directory.yaml"
    directory.write_text(directory.read_text() + EXTRA_PRINCIPALS)
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(json.dumps(jwks(key)))
    issuer = {
        "issuer": "https://idp.example.test",
        "audience": "kynara:support-bot",
        "jwks_file": str(jwks_file),
    }
    return [
        "identity.mode=verified",
        f"identity.issuers=[{json.dumps(issuer)}]",
        f"policy.source={policies}",
    ]


def refusal(call) -> tuple[grpc.StatusCode, dict[str, str], str]:
    """Run a call that must fail; return its status, trailers and message."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    err = info.value
    return err.code(), dict(err.trailing_metadata() or ()), err.details()


def token_refund(token: str):
    request = small_refund()
    del request.asserted_chain[:]
    request.delegation_token = token
    return request


def test_valid_token_is_decided_and_recorded_as_verified(start_daemon, verified, key):
    daemon = start_daemon(*verified)

    reply = daemon.stub().Decide(token_refund(key.sign(claims("alice"))))

    assert reply.reason_code == "rule_allowed"
    record = read_record(daemon, reply.audit_sequence)
    assert record.identity_mode == "verified"
    assert [entry.id for entry in record.chain] == ["alice", "support-bot"]


def test_three_hop_chain_is_evaluated_hop_by_hop(start_daemon, verified, key):
    daemon = start_daemon(*verified)
    token = key.sign(claims("alice", "orchestrator", "sub-agent"))

    reply = daemon.stub().Decide(token_refund(token))

    assert reply.reason_code == "rule_allowed"
    record = read_record(daemon, reply.audit_sequence)
    assert [entry.id for entry in record.chain] == [
        "alice",
        "orchestrator",
        "sub-agent",
        "support-bot",
    ]


def test_extra_hop_lacking_permission_denies(start_daemon, verified, key):
    daemon = start_daemon(*verified)
    token = key.sign(claims("alice", "orchestrator", "crm-only-agent"))

    reply = daemon.stub().Decide(token_refund(token))

    assert reply.reason_code == "no_rule_allows"
    assert "crm-only-agent" in reply.reason


@pytest.mark.parametrize(
    ("actors", "reason_code"),
    [(("ghost-agent",), "unknown_principal"), ((), "inactive_principal")],
    ids=["unknown_hop", "inactive_user"],
)
def test_each_hop_must_be_known_and_active(
    start_daemon, verified, key, actors, reason_code
):
    daemon = start_daemon(*verified)
    user = "alice" if actors else "dave"

    reply = daemon.stub().Decide(token_refund(key.sign(claims(user, *actors))))

    assert reply.reason_code == reason_code


def test_token_naming_this_agent_last_is_not_doubled(start_daemon, verified, key):
    daemon = start_daemon(*verified)

    reply = daemon.stub().Decide(token_refund(key.sign(claims("alice", "support-bot"))))

    record = read_record(daemon, reply.audit_sequence)
    assert [entry.id for entry in record.chain] == ["alice", "support-bot"]


def _bad(key: SigningKey, case: str) -> str:
    return {
        "expired": lambda: key.sign(claims("alice", exp=NOW - 60)),
        "not_yet_valid": lambda: key.sign(claims("alice", nbf=NOW + 60)),
        "wrong_audience": lambda: key.sign(claims("alice", aud="kynara:x")),
        "wrong_key": lambda: SigningKey("ES256", "idp-1").sign(claims("alice")),
        "alg_none": lambda: unsigned(claims("alice")),
        "malformed": lambda: "eyJhbGciOiJub25lIn0.e30",
        "missing": lambda: "",
    }[case]()


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("expired", "expired:"),
        ("not_yet_valid", "not yet valid:"),
        ("wrong_audience", "audience:"),
        ("wrong_key", "signature:"),
        ("alg_none", "algorithm: 'none' is refused"),
        ("malformed", "malformed:"),
        ("missing", "malformed: expected a delegation token"),
    ],
)
def test_bad_token_is_identity_invalid(start_daemon, verified, key, case, reason):
    daemon = start_daemon(*verified)

    status, metadata, message = refusal(
        lambda: daemon.stub().Decide(token_refund(_bad(key, case)))
    )

    assert status == grpc.StatusCode.UNAUTHENTICATED
    assert metadata["kynara-error-code"] == "identity_invalid"
    assert metadata["kynara-error-field"] == "delegation_token"
    assert message.startswith(reason)


def test_asserted_chain_is_refused_in_verified_mode(start_daemon, verified, key):
    daemon = start_daemon(*verified)
    request = small_refund()
    request.delegation_token = key.sign(claims("alice"))

    status, metadata = error_of(lambda: daemon.stub().Decide(request))

    assert status == grpc.StatusCode.UNAUTHENTICATED
    assert metadata["kynara-error-code"] == "identity_invalid"
    assert metadata["kynara-error-field"] == "asserted_chain"


# --- multi-agent mode -------------------------------------------------------

SECRETS = {
    "support-bot": "support-secret-0123456789",
    "sub-agent": "sub-secret-0123456789",
}


@pytest.fixture
def multi_agent(tmp_path, verified) -> list[str]:
    agents = {}
    for agent, secret in SECRETS.items():
        path = tmp_path / f"{agent}.secret"
        path.write_text(secret + "\n")
        agents[agent] = str(path)
    return [*verified, "identity.agent_id=", f"identity.agents={json.dumps(agents)}"]


def _as(agent: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {SECRETS[agent]}"),)


def test_multi_agent_caller_is_the_last_actor(start_daemon, multi_agent, key):
    daemon = start_daemon(*multi_agent)
    token = key.sign(claims("alice", "orchestrator", "sub-agent"))

    reply = daemon.stub().Decide(token_refund(token), metadata=_as("sub-agent"))

    assert reply.reason_code == "rule_allowed"
    record = read_record(daemon, reply.audit_sequence)
    assert [e.id for e in record.chain] == ["alice", "orchestrator", "sub-agent"]


def test_token_for_another_agent_is_identity_invalid(start_daemon, multi_agent, key):
    daemon = start_daemon(*multi_agent)
    token_for_b = key.sign(claims("alice", "sub-agent"))

    status, metadata, message = refusal(
        lambda: daemon.stub().Decide(
            token_refund(token_for_b), metadata=_as("support-bot")
        )
    )

    assert status == grpc.StatusCode.UNAUTHENTICATED
    assert metadata["kynara-error-code"] == "identity_invalid"
    assert metadata["kynara-error-field"] == "delegation_token"
    assert "calling agent 'support-bot', got 'sub-agent'" in message


@pytest.mark.parametrize(
    "metadata",
    [(), (("authorization", "Bearer not-a-configured-secret"),)],
    ids=["missing", "unknown"],
)
def test_multi_agent_caller_without_valid_secret_is_identity_invalid(
    start_daemon, multi_agent, key, metadata
):
    daemon = start_daemon(*multi_agent)
    token = key.sign(claims("alice", "support-bot"))

    status, trailers = error_of(
        lambda: daemon.stub().Decide(token_refund(token), metadata=metadata)
    )

    assert status == grpc.StatusCode.UNAUTHENTICATED
    assert trailers["kynara-error-code"] == "identity_invalid"
    assert trailers["kynara-error-field"] == "authorization"


def test_multi_agent_batch_uses_the_callers_secret(start_daemon, multi_agent, key):
    daemon = start_daemon(*multi_agent)
    good = token_refund(key.sign(claims("alice", "sub-agent")))
    other = token_refund(key.sign(claims("alice", "support-bot")))
    batch = pb.DecideBatchRequest(items=[good, other])

    reply = daemon.stub().DecideBatch(batch, metadata=_as("sub-agent"))

    assert reply.items[0].decision.reason_code == "rule_allowed"
    assert reply.items[1].error.code == "identity_invalid"
    assert reply.items[1].error.field == "items[1].delegation_token"


def test_sdk_sends_the_agent_secret_from_its_file(start_daemon, multi_agent, key):
    daemon = start_daemon(*multi_agent)
    secret_file = daemon.config.identity.agents["sub-agent"]
    token = key.sign(claims("alice", "orchestrator", "sub-agent"))

    with kynara_sdk.Client(daemon.target, secret_file=secret_file) as sdk:
        answer = sdk.decide(
            "payments.refund.issue",
            resource_kind="payments.refund",
            attributes={"amount": 1200},
            token=token,
        )
    with kynara_sdk.Client(daemon.target) as anonymous:
        with pytest.raises(kynara_sdk.KynaraError) as refused:
            anonymous.decide(
                "payments.refund.issue", resource_kind="payments.refund", token=token
            )

    assert answer.decision == "allow"
    assert answer.chain[-1] == "sub-agent"
    assert refused.value.code == "identity_invalid"
