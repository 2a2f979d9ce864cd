"""Redaction through a real daemon: policies see the values, records do not."""

from __future__ import annotations

import hashlib
import hmac
import shutil

import pytest
from kynara.v1 import decision_pb2 as pb
from support import SHIPPED_POLICIES, read_record, small_refund

KEY = b"0123456789abcdef0123456789abcdef-redaction"
BLOCKED_CARD = "4111-1111-1111-1111"
OTHER_CARD = "5500-0000-0000-0004"
EMAIL = "carol.private@blocked.example"

# Denies a refund to a card of the test range for a customer of the blocked
# domain: the deny proves the engine saw both real values.
CARD_POLICY = """\
format_version: 1
kind: policy
name: card-check
rules:
  - id: blocked-test-card
    effect: deny
    actions: [payments.refund.issue]
    resources: [payments.refund]
    roles: [support, support_agent]
    condition: >-
      has(context.card_number) && has(context.customer)
      && context.card_number.startsWith("4111")
      && context.customer.email.endsWith("@blocked.example")
"""


@pytest.fixture
def redacting_daemon(tmp_path, start_daemon):
    policies = tmp_path / "policies"
    shutil.copytree(SHIPPED_POLICIES, policies)
    (policies / "card-check.yaml").write_text(CARD_POLICY)
    key_file = tmp_path / "redaction.key"
    key_file.write_bytes(KEY + b"\n")
    return start_daemon(
        f"policy.source={policies}",
        "audit.redact={context: {card_number: hash, customer.email: drop}}",
        f"audit.redaction_key={key_file}",
    )


def refund_for(card: str) -> pb.DecideRequest:
    request = small_refund()
    request.context["card_number"].string_value = card
    customer = request.context["customer"].map_value.entries
    customer["email"].string_value = EMAIL
    customer["tier"].string_value = "gold"
    return request


def card_hash(card: str) -> str:
    canonical = b'{"string":"' + card.encode() + b'"}'
    key_id = hmac.new(KEY, b"kynara redaction key id", hashlib.sha256).hexdigest()
    digest = hmac.new(KEY, canonical, hashlib.sha256).hexdigest()
    return f"hmac-sha256:{key_id[:16]}:{digest}"


def test_policies_decide_on_values_the_record_does_not_hold(redacting_daemon):
    stub = redacting_daemon.stub()

    blocked = stub.Decide(refund_for(BLOCKED_CARD))
    other = stub.Decide(refund_for(OTHER_CARD))

    assert blocked.decision == pb.DECISION_DENY
    # Once for each principal of the chain: alice and support-bot.
    denied_by = [r.rule for r in blocked.matched_rules if r.effect == pb.DECISION_DENY]
    assert denied_by == ["blocked-test-card", "blocked-test-card"]
    assert other.decision == pb.DECISION_ALLOW
    for reply, card in ((blocked, BLOCKED_CARD), (other, OTHER_CARD)):
        stored = redacting_daemon.daemon._store.get(reply.audit_sequence)
        assert card.encode() not in stored.record_bytes
        assert EMAIL.encode() not in stored.record_bytes
        record = read_record(redacting_daemon, reply.audit_sequence)
        assert record.context["card_number"] == {"redacted": card_hash(card)}
        assert record.context["customer"] == {"map": {"tier": {"string": "gold"}}}
        assert record.redactions == [
            "$.context.card_number",
            "$.context.customer.email",
        ]
        assert record.decision == ("deny" if card == BLOCKED_CARD else "allow")


def test_a_request_without_the_fields_lists_no_redactions(redacting_daemon):
    reply = redacting_daemon.stub().Decide(small_refund(region="DE"))

    record = read_record(redacting_daemon, reply.audit_sequence)
    assert reply.decision == pb.DECISION_ALLOW
    assert record.redactions == []
    assert record.context == {"region": {"string": "DE"}}
