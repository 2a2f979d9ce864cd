"""The binding digest: one request, one digest; any other request, another."""

from __future__ import annotations

import hashlib

import hypothesis
import pytest
from hypothesis import strategies as st

from kynara_sidecar.approvals.binding import binding_digest, encoded_binding_digest
from kynara_sidecar.audit.record import encode_value
from kynara_sidecar.decision import Resource, Timestamp, UInt64

CHAIN = ("alice", "support-bot")
ACTION = "payments.refund.issue"
R1 = Resource(kind="payments.refund", id="R1", attributes={"amount": 60000})


def digest(chain=CHAIN, action=ACTION, resource=R1, context=None, volatile=()):
    return binding_digest(chain, action, resource, context or {}, volatile)


def test_digest_is_sha256_of_the_canonical_json_with_typed_values():
    expected = hashlib.sha256(
        b'{"action":"payments.refund.issue","chain":["alice","support-bot"],'
        b'"context":{"reason":{"string":"damaged"}},'
        b'"resource":{"attributes":{"amount":{"int":"60000"}},"id":"R1",'
        b'"kind":"payments.refund"}}'
    ).hexdigest()

    got = digest(context={"reason": "damaged"})

    assert got == f"sha256:{expected}"


@pytest.mark.parametrize(
    "changed",
    [
        {
            "resource": Resource(
                kind="payments.refund", id="R2", attributes=R1.attributes
            )
        },
        {
            "resource": Resource(
                kind="payments.refund", id="R1", attributes={"amount": 60001}
            )
        },
        # Same number, other type: a policy can tell them apart, so can this.
        {
            "resource": Resource(
                kind="payments.refund", id="R1", attributes={"amount": UInt64(60000)}
            )
        },
        {
            "resource": Resource(
                kind="payments.credit", id="R1", attributes=R1.attributes
            )
        },
        {"chain": ("bob", "support-bot")},
        {"chain": ("alice", "orchestrator", "support-bot")},
        {"action": "payments.refund.cancel"},
        {"context": {"reason": "other"}},
        {"context": {"reason": "damaged", "extra": True}},
    ],
    ids=[
        "resource-id",
        "amount",
        "amount-type",
        "resource-kind",
        "user",
        "longer-chain",
        "action",
        "context-value",
        "context-key",
    ],
)
def test_any_other_request_binds_another_digest(changed):
    base = digest(context={"reason": "damaged"})

    other = digest(**{"context": {"reason": "damaged"}, **changed})

    assert other != base


def test_volatile_context_entries_do_not_change_the_digest():
    base = digest(context={"reason": "damaged"}, volatile=["trace_id"])

    retried = digest(
        context={"reason": "damaged", "trace_id": "t-2"}, volatile=["trace_id"]
    )

    assert retried == base


def test_volatile_names_only_top_level_keys():
    nested = {"meta": {"trace_id": "a"}}
    other = {"meta": {"trace_id": "b"}}

    assert digest(context=nested, volatile=["trace_id"]) != digest(
        context=other, volatile=["trace_id"]
    )


def test_timestamps_bind_to_the_nanosecond():
    at = Timestamp(1_800_000_000, 1)
    later = Timestamp(1_800_000_000, 2)

    assert digest(context={"at": at}) != digest(context={"at": later})


@hypothesis.given(
    st.dictionaries(
        st.text(min_size=1, max_size=8),
        st.one_of(st.integers(-(2**63), 2**63 - 1), st.text(max_size=8), st.booleans()),
        max_size=5,
    )
)
def test_key_order_does_not_change_the_digest(context):
    reversed_context = dict(reversed(list(context.items())))

    assert digest(context=context) == digest(context=reversed_context)


@pytest.mark.parametrize("volatile", [(), ("trace",), ("trace", "absent")])
def test_digest_from_the_records_typed_values_is_the_same(volatile):
    resource = Resource(
        kind="payments.refund",
        id="R1",
        attributes={"amount": 60000, "big": UInt64(7), "at": Timestamp(5, 1)},
    )
    context = {"trace": "t-1", "reason": "damaged", "tags": ["a", 1.5]}
    typed = encode_value(dict(resource.attributes))["map"]
    typed_context = encode_value(context)["map"]

    got = encoded_binding_digest(
        CHAIN, ACTION, resource.kind, resource.id, typed, typed_context, volatile
    )

    assert got == digest(resource=resource, context=context, volatile=volatile)
    assert "trace" in typed_context  # the record's map is left whole
