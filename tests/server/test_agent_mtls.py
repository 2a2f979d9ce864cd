"""Client certificates as the per-agent credential on the agent listener's
TLS port (agent.tls): real certificates from a test CA, a real daemon
serving mutual TLS on 127.0.0.1, bearer agents beside certificate agents."""

from __future__ import annotations

import json
import shutil

import grpc
import kynara_sdk
import pytest
from identity_support import SigningKey, claims, jwks
from kynara.v1 import decision_pb2 as pb
from kynara.v1 import decision_pb2_grpc
from support import SHIPPED_POLICIES, daemon_config, error_of, read_record, small_refund
from tls_support import Authority, write_pair

from kynara_sidecar.errors import ConfigError

TRUST_DOMAIN = "spiffe://kynara.test/agent"
# orchestrator and sub-agent are agents only this test's directory knows;
# support-bot is in the shipped one.
EXTRA_PRINCIPALS = """
  - id: orchestrator
    kind: agent
    roles: [support_agent]
  - id: sub-agent
    kind: agent
    roles: [support_agent]
"""
# Agents by certificate: agent id -> the URI SAN its certificate carries.
CERTIFICATE_AGENTS = {
    "support-bot": f"{TRUST_DOMAIN}/support-bot",
    "sub-agent": f"{TRUST_DOMAIN}/sub-agent",
}
BEARER_AGENT, BEARER_SECRET = "orchestrator", "orchestrator-secret-0123456789"


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey("ES256", "idp-1")


@pytest.fixture(scope="module")
def authority() -> Authority:
    return Authority("kynara agents CA")


class Setup:
    """Files and settings of a multi-agent daemon with agent.tls."""

    def __init__(self, tmp_path, key: SigningKey, authority: Authority):
        self.tmp_path = tmp_path
        self.authority = authority
        policies = tmp_path / "policies"
        shutil.copytree(SHIPPED_POLICIES, policies)
        directory = policies / "directory.yaml"
        directory.write_text(directory.read_text() + EXTRA_PRINCIPALS)
        jwks_file = tmp_path / "jwks.json"
        jwks_file.write_text(json.dumps(jwks(key)))
        served = write_pair(tmp_path, authority.issue(), "server")
        self.ca_file = tmp_path / "agents-ca.crt"
        self.ca_file.write_bytes(authority.pem)
        self.tls = {**served.settings(), "client_ca_file": str(self.ca_file)}
        secret_file = tmp_path / "orchestrator.secret"
        secret_file.write_text(BEARER_SECRET + "\n")
        self.agents: dict[str, object] = {BEARER_AGENT: str(secret_file)}
        for agent, uri in CERTIFICATE_AGENTS.items():
            self.agents[agent] = {"certificate_uri": uri}

    def overrides(self, **replaced: str) -> list[str]:
        settings = {
            "identity.mode": "verified",
            "identity.issuers": json.dumps([self.issuer_settings()]),
            "policy.source": str(self.tmp_path / "policies"),
            "identity.agent_id": "",
            "identity.agents": json.dumps(self.agents),
            "agent.host": "127.0.0.1",
            "agent.tls": json.dumps(self.tls),
            **replaced,
        }
        return [f"{key}={value}" for key, value in settings.items()]

    def issuer_settings(self) -> dict[str, str]:
        return {
            "issuer": "https://idp.example.test",
            "audience": "kynara:support-bot",
            "jwks_file": str(self.tmp_path / "jwks.json"),
        }

    def client_files(self, *uris: str, authority: Authority | None = None):
        """Write a client certificate for ``uris``; returns (cert, key) paths."""
        issued = (authority or self.authority).issue_client(*uris)
        stem = f"client-{issued[2]:x}"
        pair = write_pair(self.tmp_path, issued, stem)
        return str(pair.cert_file), str(pair.key_file)


@pytest.fixture
def setup(tmp_path, key, authority) -> Setup:
    return Setup(tmp_path, key, authority)


@pytest.fixture
def daemon(start_daemon, setup):
    return start_daemon(*setup.overrides())


def tls_stub(daemon, setup: Setup, cert_file: str | None, key_file: str | None):
    """A DecisionService stub over TLS to the daemon's TCP port, presenting
    the client certificate in ``cert_file`` (none when None)."""
    pems = {}
    if cert_file is not None:
        with open(cert_file, "rb") as cert, open(key_file, "rb") as private:
            pems = {"certificate_chain": cert.read(), "private_key": private.read()}
    credentials = grpc.ssl_channel_credentials(setup.authority.pem, **pems)
    channel = grpc.secure_channel(f"127.0.0.1:{daemon.daemon.tcp_port}", credentials)
    daemon._channels.append(channel)
    return decision_pb2_grpc.DecisionServiceStub(channel)


def token_refund(token: str) -> pb.DecideRequest:
    request = small_refund()
    del request.asserted_chain[:]
    request.delegation_token = token
    return request


@pytest.mark.parametrize("agent", sorted(CERTIFICATE_AGENTS))
def test_each_certificate_agent_decides_as_itself(daemon, setup, key, agent):
    stub = tls_stub(daemon, setup, *setup.client_files(CERTIFICATE_AGENTS[agent]))

    reply = stub.Decide(token_refund(key.sign(claims("alice", agent))), timeout=30)

    assert reply.reason_code == "rule_allowed"
    record = read_record(daemon, reply.audit_sequence)
    assert [entry.id for entry in record.chain] == ["alice", agent]


def test_token_for_another_agent_is_refused(daemon, setup, key):
    stub = tls_stub(daemon, setup, *setup.client_files(CERTIFICATE_AGENTS["sub-agent"]))
    token_for_support_bot = key.sign(claims("alice", "support-bot"))

    status, trailers = error_of(
        lambda: stub.Decide(token_refund(token_for_support_bot), timeout=30)
    )

    assert status == grpc.StatusCode.UNAUTHENTICATED
    assert trailers["kynara-error-code"] == "identity_invalid"
    assert trailers["kynara-error-field"] == "delegation_token"


@pytest.mark.parametrize(
    "metadata",
    [(), (("authorization", f"Bearer {BEARER_SECRET}"),)],
    ids=["alone", "beside_a_valid_secret"],
)
def test_certificate_naming_no_agent_is_identity_invalid(daemon, setup, key, metadata):
    stub = tls_stub(daemon, setup, *setup.client_files(f"{TRUST_DOMAIN}/ghost"))
    token = key.sign(claims("alice", BEARER_AGENT))

    status, trailers = error_of(
        lambda: stub.Decide(token_refund(token), metadata=metadata, timeout=30)
    )
    batch = stub.DecideBatch(
        pb.DecideBatchRequest(items=[token_refund(token)]),
        metadata=metadata,
        timeout=30,
    )

    # The code an unknown bearer secret gets (test_verified_identity).
    assert status == grpc.StatusCode.UNAUTHENTICATED
    assert trailers["kynara-error-code"] == "identity_invalid"
    assert trailers["kynara-error-field"] == "client_certificate"
    assert batch.items[0].error.code == "identity_invalid"


def test_certificate_naming_two_agents_is_identity_invalid(daemon, setup, key):
    both = setup.client_files(*CERTIFICATE_AGENTS.values())
    stub = tls_stub(daemon, setup, *both)

    status, trailers = error_of(
        lambda: stub.Decide(
            token_refund(key.sign(claims("alice", "sub-agent"))), timeout=30
        )
    )

    assert status == grpc.StatusCode.UNAUTHENTICATED
    assert trailers["kynara-error-code"] == "identity_invalid"


@pytest.mark.parametrize("client", ["other_ca", "no_certificate"])
def test_handshake_refuses_a_certificate_from_another_ca_or_none(
    daemon, setup, key, client
):
    files: tuple[str | None, str | None] = (None, None)
    if client == "other_ca":
        files = setup.client_files(
            CERTIFICATE_AGENTS["sub-agent"], authority=Authority("another CA")
        )
    stub = tls_stub(daemon, setup, *files)

    status, trailers = error_of(
        lambda: stub.Decide(
            token_refund(key.sign(claims("alice", "sub-agent"))), timeout=30
        )
    )

    # No call reached the service: the TLS handshake failed.
    assert status == grpc.StatusCode.UNAVAILABLE
    assert "kynara-error-code" not in trailers


def test_bearer_agent_works_beside_certificate_agents(daemon, key):
    token = key.sign(claims("alice", BEARER_AGENT))
    metadata = (("authorization", f"Bearer {BEARER_SECRET}"),)

    reply = daemon.stub().Decide(token_refund(token), metadata=metadata)
    status, trailers = error_of(lambda: daemon.stub().Decide(token_refund(token)))

    assert reply.reason_code == "rule_allowed"
    record = read_record(daemon, reply.audit_sequence)
    assert [entry.id for entry in record.chain] == ["alice", BEARER_AGENT]
    # A certificate agent has no secret to send on the Unix socket.
    assert trailers["kynara-error-field"] == "authorization"


def test_python_sdk_connects_with_a_client_certificate(daemon, setup, key):
    cert_file, key_file = setup.client_files(CERTIFICATE_AGENTS["sub-agent"])
    token = key.sign(claims("alice", "orchestrator", "sub-agent"))

    with kynara_sdk.Client(
        f"127.0.0.1:{daemon.daemon.tcp_port}",
        cert_file=cert_file,
        key_file=key_file,
        ca_file=str(setup.ca_file),
        timeout=30,
    ) as sdk:
        answer = sdk.decide(
            "payments.refund.issue",
            resource_kind="payments.refund",
            attributes={"amount": 1200},
            token=token,
        )

    assert answer.decision == "allow"
    assert answer.chain == ("alice", "orchestrator", "sub-agent")


def test_python_sdk_refuses_tls_to_a_socket_and_half_a_pair(setup):
    cert_file, key_file = setup.client_files(CERTIFICATE_AGENTS["sub-agent"])

    with pytest.raises(ValueError, match="Unix socket carries no TLS"):
        kynara_sdk.Client(
            "unix:///run/kynara/agent.sock", cert_file=cert_file, key_file=key_file
        )
    with pytest.raises(ValueError, match="key_file: expected a path"):
        kynara_sdk.Client("127.0.0.1:50151", cert_file=cert_file)


# --- configuration -----------------------------------------------------------


def test_certificate_agent_needs_agent_tls(tmp_path, setup):
    with pytest.raises(
        ConfigError, match=r"identity\.agents\.\S+: expected agent\.tls"
    ):
        daemon_config(tmp_path, *setup.overrides(**{"agent.tls": "{}"}))


def test_agent_tls_needs_a_client_ca(tmp_path, setup):
    tls = {key: value for key, value in setup.tls.items() if key != "client_ca_file"}

    with pytest.raises(ConfigError, match=r"agent\.tls\.client_ca_file: expected"):
        daemon_config(tmp_path, *setup.overrides(**{"agent.tls": json.dumps(tls)}))


def test_two_agents_with_one_certificate_uri_are_refused(tmp_path, setup):
    agents = {**setup.agents, "sub-agent": setup.agents["support-bot"]}

    with pytest.raises(ConfigError, match=r"expected its own URI"):
        daemon_config(
            tmp_path, *setup.overrides(**{"identity.agents": json.dumps(agents)})
        )


def test_certificate_uri_must_be_an_absolute_uri(tmp_path, setup):
    agents = {**setup.agents, "sub-agent": {"certificate_uri": "sub agent"}}

    with pytest.raises(ConfigError, match=r"sub-agent\.certificate_uri: expected"):
        daemon_config(
            tmp_path, *setup.overrides(**{"identity.agents": json.dumps(agents)})
        )


def test_agent_port_with_tls_may_leave_loopback(tmp_path, setup):
    config = daemon_config(tmp_path, *setup.overrides(**{"agent.host": "0.0.0.0"}))
    plain = {"agent.host": "0.0.0.0", "agent.tls": "{}", "identity.agents": "{}"}

    assert config.agent.tls.enabled
    with pytest.raises(ConfigError, match=r"agent\.host: expected a loopback"):
        daemon_config(
            tmp_path, *setup.overrides(**plain, **{"identity.agent_id": "support-bot"})
        )


def test_rotated_client_ca_is_trusted_from_the_next_handshake(daemon, setup, key):
    renewed = Authority("kynara agents CA, renewed")
    uri = CERTIFICATE_AGENTS["sub-agent"]
    old_files = setup.client_files(uri)
    new_files = setup.client_files(uri, authority=renewed)
    token = token_refund(key.sign(claims("alice", "sub-agent")))

    setup.ca_file.write_bytes(renewed.pem)
    reply = tls_stub(daemon, setup, *new_files).Decide(token, timeout=30)
    status, _ = error_of(
        lambda: tls_stub(daemon, setup, *old_files).Decide(token, timeout=30)
    )

    assert reply.reason_code == "rule_allowed"
    assert status == grpc.StatusCode.UNAVAILABLE


def test_wait_approval_knows_the_certificate_agent(daemon, setup, key):
    own = tls_stub(daemon, setup, *setup.client_files(CERTIFICATE_AGENTS["sub-agent"]))
    other_uri = CERTIFICATE_AGENTS["support-bot"]
    other = tls_stub(daemon, setup, *setup.client_files(other_uri))
    large = token_refund(key.sign(claims("alice", "sub-agent")))
    large.resource.attributes["amount"].int_value = 90_000

    asked = own.Decide(large, timeout=30)
    request = pb.WaitApprovalRequest(approval_id=asked.approval.id)
    first = next(iter(own.WaitApproval(request, timeout=30)))
    status, trailers = error_of(
        lambda: next(iter(other.WaitApproval(request, timeout=30)))
    )

    assert asked.decision == pb.DECISION_REQUIRE_APPROVAL
    assert first.approval_id == asked.approval.id
    # Another agent's approval is not found, exactly as an unknown id.
    assert status == grpc.StatusCode.NOT_FOUND
    assert trailers["kynara-error-code"] == "not_found"
