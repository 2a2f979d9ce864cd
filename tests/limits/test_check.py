"""One request's limit values (limits.check) at their edges: sums past
int64, doubles at the ceiling, and what the gRPC answer makes of them."""

from __future__ import annotations

import textwrap

import msgspec

from kynara_sidecar import engine
from kynara_sidecar.audit.record import encode_value
from kynara_sidecar.decision import DecisionRequest, Effect, Env, Resource, Timestamp
from kynara_sidecar.limits import check
from kynara_sidecar.limits.book import Counted, LimitBook
from kynara_sidecar.policy.loader import compile_documents, decode_document
from kynara_sidecar.server.decision_service import _number

NOW = 1_796_634_000 * 10**9
POLICY = textwrap.dedent(
    """\
    format_version: 1
    kind: policy
    name: p
    limits:
      big:
        actions: [pay.refund]
        sum: context.amount
        decisions: [deny]
        key: [agent]
        window: {rolling: 1h}
        ceiling: 9223372036854775807
      fine:
        actions: [pay.refund]
        sum: context.cents
        key: [agent]
        window: {rolling: 1h}
        ceiling: 10.0
      few:
        actions: [pay.refund]
        key: [agent]
        window: {rolling: 1h}
        ceiling: 3
    roles:
      r: {}
    rules:
      - id: allow
        effect: allow
        actions: [pay.refund]
        resources: [pay.order]
        roles: [r]
      - id: few
        effect: deny
        actions: [pay.refund]
        resources: [pay.order]
        roles: [r]
        condition: limits.few.exceeded
    """
)
DIRECTORY = textwrap.dedent(
    """\
    format_version: 1
    kind: directory
    principals:
      - {id: u, kind: user, roles: [r]}
      - {id: a, kind: agent, roles: [r]}
    """
)


def loaded():
    sources = [
        decode_document("p.yaml", POLICY.encode()),
        decode_document("d.yaml", DIRECTORY.encode()),
    ]
    return compile_documents(sources)


def request(**context) -> DecisionRequest:
    return DecisionRequest(
        chain=("u", "a"),
        action="pay.refund",
        resource=Resource("pay.order", "o1"),
        context={"amount": 1, "cents": 1.0, **context},
    )


def look(policies, book, subject):
    limits = policies.policy_set.limits
    every = tuple(limits[name] for name in sorted(limits))
    return check.look(every, every, subject, {}, NOW, book)


def test_a_sum_past_int64_reads_as_int64_and_spoils_no_other_limit():
    policies = loaded()
    book = LimitBook(None)
    big = 2**63 - 1
    definition = policies.policy_set.limits["big"].definition
    book.add(
        Counted("big", '["a"]', NOW - 10, big, f"d{i}", definition) for i in range(2)
    )
    looked = look(policies, book, request())

    value = looked.values["big"]
    assert value["sum"] == big
    assert value["remaining"] == -(2**63 - 1)
    assert value["exceeded"] is True
    # The record keeps the exact sum.
    assert looked.entries["big"].sum == encode_value(2 * big)
    decision = engine.evaluate(
        policies.policy_set,
        policies.directory,
        request(),
        Env(now=Timestamp.from_nanos(NOW)),
        limits=looked.values,
    )
    assert decision.effect is Effect.ALLOW, decision.reason


def test_a_double_sum_at_its_ceiling_is_exceeded_by_the_smallest_amount():
    policies = loaded()
    book = LimitBook(None)
    definition = policies.policy_set.limits["fine"].definition
    book.add([Counted("fine", '["a"]', NOW - 10, 10.0, "d1", definition)])
    looked = look(policies, book, request(cents=5e-324))

    assert looked.values["fine"]["sum"] == 10.0
    assert looked.values["fine"]["exceeded"] is True
    assert look(policies, book, request(cents=0.0)).values["fine"]["exceeded"] is False


def test_the_answer_carries_any_recorded_sum_as_a_typed_value():
    assert _number(encode_value(5)).int_value == 5
    assert _number(encode_value(2**63)).uint_value == 2**63
    assert _number(encode_value(2**64 + 1)).double_value == float(2**64)
    assert _number(encode_value(1.5)).double_value == 1.5


def test_each_entry_holds_its_own_ceiling():
    """Entries of one ceiling do not share its record form: a change to
    one (a record being built) reaches no other."""
    policies = loaded()
    book = LimitBook(None)
    first = look(policies, book, request()).entries["few"]
    first.ceiling["int"] = "999"
    second = look(policies, book, request()).entries["few"]

    assert second.ceiling == encode_value(3)


def test_an_entry_without_the_limits_definition_does_not_apply():
    """A recorded entry counts for a limit only under its definition; one
    without any is no value of a defined limit."""
    policies = loaded()
    limit = policies.policy_set.limits["few"]
    entry = look(policies, LimitBook(None), request()).entries["few"]

    assert check.applies(entry, limit)
    assert not check.applies(msgspec.structs.replace(entry, definition=""), limit)
