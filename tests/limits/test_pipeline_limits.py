"""Limits in the decision pipeline: real LMDB, the real writer, a settable
clock; the check and the count as one step."""

from __future__ import annotations

import asyncio
import pathlib

import msgspec
import pytest
from limits_support import (
    ALLOW_REFUNDS,
    ROLES_AND_DIRECTORY,
    deny_rule,
    policy_dir,
    refund_limits,
)
from support import SettableClock, daemon_config

from kynara_sidecar.audit.chain import decode_record
from kynara_sidecar.audit.counters import LIMITS_DB, decode_row, rows_of
from kynara_sidecar.audit.record import decode_value
from kynara_sidecar.audit.store import AuditStore
from kynara_sidecar.audit.writer import AuditWriter
from kynara_sidecar.decision import Effect, Resource
from kynara_sidecar.errors import AuditUnavailable, KynaraError
from kynara_sidecar.limits.book import LimitBook
from kynara_sidecar.metrics import Metrics
from kynara_sidecar.pipeline import IncomingRequest, Pipeline
from kynara_sidecar.policy.loader import load_policies

# A count per customer beside the day's count and the week's total, so a
# request without the customer cannot form one of its keys.
PER_CUSTOMER = """\
  per_customer:
    actions: [payments.refund.issue]
    key: [context.customer]
    window: {rolling: 1h}
    ceiling: 1000
"""


def policies_dir(
    tmp_path: pathlib.Path, daily_effect: str = "deny", daily_ceiling: int = 5
) -> pathlib.Path:
    """The shipped roles and directory with ``refunds.yaml``: refunds
    allowed, then limited per day (``daily_effect`` past
    ``daily_ceiling``), by a week's total and per customer."""
    refunds = refund_limits(
        name="refunds",
        ceiling=daily_ceiling,
        effect=daily_effect,
        total="refund_total",
        allow=True,
        more_limits=PER_CUSTOMER,
        more_rules=deny_rule("per-customer", "per_customer"),
    )
    return policy_dir(
        tmp_path / "policies", {"refunds.yaml": refunds}, shipped=ROLES_AND_DIRECTORY
    )


def refund(
    amount: int = 100, *, user: str = "alice", customer: str = "c1", rid: str = "rf"
) -> IncomingRequest:
    return IncomingRequest(
        action="payments.refund.issue",
        resource=Resource(
            kind="payments.refund", id=rid, attributes={"amount": amount}
        ),
        context={"customer": customer},
        asserted_chain=(user,),
    )


class Harness:
    """A pipeline with its book and writer over one LMDB log; reopenable."""

    def __init__(
        self, tmp_path: pathlib.Path, clock: SettableClock, policies, *overrides: str
    ):
        self.config = daemon_config(tmp_path, *overrides)
        self.clock = clock
        self.policies = policies
        self.path = self.config.audit.path

    async def __aenter__(self) -> Pipeline:
        self.store = AuditStore.open(
            self.path, map_size=self.config.audit.map_size, extra_dbs=(LIMITS_DB,)
        )
        self.writer = AuditWriter(self.store)
        self.writer.start()
        self.book = LimitBook(self.store)
        pipeline = Pipeline(
            self.config, self.writer, Metrics(), self.clock, limits=self.book
        )
        pipeline.activate(load_policies(self.policies))
        return pipeline

    async def __aexit__(self, *exc) -> None:
        await self.writer.close()

    def records(self):
        return [decode_record(r.record_bytes) for r in self.store.iter_records()]

    def rows(self):
        return sorted(decode_row(k, v) for k, v in self.store.iter_state(LIMITS_DB))

    def close(self) -> None:
        self.store.close()


def run(tmp_path, steps, *, daily_effect="deny", daily_ceiling=5):
    clock = SettableClock("2026-12-07T09:00:00Z")
    harness = Harness(
        tmp_path, clock, policies_dir(tmp_path, daily_effect, daily_ceiling)
    )

    async def go():
        async with harness as pipeline:
            return await steps(pipeline, clock)

    try:
        result = asyncio.run(go())
        return result, harness.records(), harness.rows()
    finally:
        harness.close()


def decisions(records):
    return [r for r in records if r.kind == "decision"]


def test_the_sixth_refund_of_a_day_is_denied_and_every_record_says_what_it_saw(
    tmp_path,
):
    async def steps(pipeline, clock):
        return [await pipeline.decide(refund(rid=f"rf{i}")) for i in range(6)]

    answers, records, rows = run(tmp_path, steps)

    assert [a.decision.effect for a in answers] == [Effect.ALLOW] * 5 + [Effect.DENY]
    assert answers[-1].decision.reason_code.value == "rule_denied"
    denying = [
        m.rule for m in answers[-1].decision.matched_rules if m.effect is Effect.DENY
    ]
    assert denying == ["refunds-per-day"] * 2
    seen = [r.limits["refunds_today"] for r in decisions(records)]
    assert [e.count for e in seen] == [0, 1, 2, 3, 4, 5]
    assert [e.counted for e in seen] == [True] * 5 + [False]
    assert {e.key for e in seen} == {'["alice"]'}
    # Local midnight in Berlin (CET) on 2026-12-07.
    assert {e.window_start for e in seen} == {"2026-12-06T23:00:00Z"}
    assert decode_value(seen[0].ceiling) == 5
    # The rows are the counted entries of the records, nothing else.
    expected = sorted(
        decode_row(k, v) for r in decisions(records) for k, v in rows_of(r)
    )
    assert rows == expected
    assert len([r for r in rows if r.limit == "refunds_today"]) == 5


def test_a_rule_may_require_approval_past_the_ceiling_instead(tmp_path):
    async def steps(pipeline, clock):
        return [
            (await pipeline.decide(refund(rid=f"rf{i}"))).decision.effect
            for i in range(7)
        ]

    effects, records, _ = run(tmp_path, steps, daily_effect="require_approval")

    assert effects == [Effect.ALLOW] * 5 + [Effect.REQUIRE_APPROVAL] * 2
    # require_approval is not counted (decisions: [allow]): still five.
    assert [r.limits["refunds_today"].count for r in decisions(records)][-2:] == [5, 5]


@pytest.mark.parametrize(
    ("first", "last_of_day", "next_day"),
    [
        # 2026-10-25 has 25 hours in Berlin (CEST -> CET at 03:00).
        ("2026-10-24T22:00:00Z", "2026-10-25T22:59:59.999Z", "2026-10-25T23:00:00Z"),
        # 2026-03-29 has 23 hours (CET -> CEST at 02:00).
        ("2026-03-28T23:00:00Z", "2026-03-29T21:59:59.999Z", "2026-03-29T22:00:00Z"),
    ],
    ids=["25-hour-day", "23-hour-day"],
)
def test_the_window_resets_at_local_midnight_across_a_daylight_saving_change(
    tmp_path, first, last_of_day, next_day
):
    async def steps(pipeline, clock):
        clock.set(first)
        early = [
            (await pipeline.decide(refund(rid=f"a{i}"))).decision.effect
            for i in range(5)
        ]
        clock.set(last_of_day)
        late = (await pipeline.decide(refund(rid="late"))).decision.effect
        clock.set(next_day)
        fresh = (await pipeline.decide(refund(rid="fresh"))).decision.effect
        return early, late, fresh

    (early, late, fresh), records, _ = run(tmp_path, steps)

    assert early == [Effect.ALLOW] * 5
    assert late is Effect.DENY
    assert fresh is Effect.ALLOW
    starts = [r.limits["refunds_today"].window_start for r in decisions(records)]
    assert starts[0] == first.replace(".000", "") and starts[-1] == next_day


def test_two_requests_racing_for_the_last_unit_get_one_allow(tmp_path):
    async def steps(pipeline, clock):
        for i in range(4):
            await pipeline.decide(refund(rid=f"rf{i}"))
        together = await asyncio.gather(
            pipeline.decide(refund(rid="x")), pipeline.decide(refund(rid="y"))
        )
        batch = await pipeline.decide_all([refund(rid="p"), refund(rid="q")])
        return [a.decision.effect for a in together], batch

    (together, batch), records, rows = run(tmp_path, steps)

    assert sorted(together) == sorted([Effect.ALLOW, Effect.DENY])
    assert [a.decision.effect for a in batch] == [Effect.DENY, Effect.DENY]
    assert len([r for r in rows if r.limit == "refunds_today"]) == 5


def test_a_running_total_under_a_thousand_concurrent_decisions_never_passes_its_ceiling(
    tmp_path,
):
    amounts = [(i * 37) % 90 + 1 for i in range(1000)]

    async def steps(pipeline, clock):
        # Users differ so the daily count does not decide; the agent's
        # weekly total (ceiling 10,000) does.
        answers = await asyncio.gather(
            *(
                pipeline.decide(
                    refund(
                        amount,
                        user=("alice", "bob")[i % 2],
                        customer=f"c{i}",
                        rid=f"r{i}",
                    )
                )
                for i, amount in enumerate(amounts)
            ),
            return_exceptions=True,
        )
        return answers

    answers, records, rows = run(tmp_path, steps, daily_ceiling=100_000)

    allowed = [
        amount
        for amount, answer in zip(amounts, answers, strict=True)
        if not isinstance(answer, BaseException)
        and answer.decision.effect is Effect.ALLOW
    ]
    assert not [a for a in answers if isinstance(a, BaseException)]
    assert sum(allowed) <= 10000
    assert sum(allowed) > 10000 - 90
    total_rows = [r for r in rows if r.limit == "refund_total"]
    assert sum(r.amount for r in total_rows) == sum(allowed)
    # Every decision saw exactly what the log held before it.
    running = 0
    for record in decisions(records):
        entry = record.limits["refund_total"]
        amount = decode_value(record.resource.attributes["amount"])
        assert decode_value(entry.sum) == running
        if entry.counted:
            running += decode_value(entry.amount)
        else:
            # Denied only because this amount would pass the ceiling.
            assert record.decision == "deny"
            assert running + amount > 10000


def test_a_request_that_cannot_form_the_key_fails_closed_and_says_why(tmp_path):
    async def steps(pipeline, clock):
        missing = msgspec.structs.replace(refund(), context={})
        negative = refund(-5)
        return await pipeline.decide(missing), await pipeline.decide(negative)

    (missing, negative), records, rows = run(tmp_path, steps)

    assert missing.decision.effect is Effect.DENY
    assert missing.decision.reason_code.value == "condition_error"
    assert "limit per_customer has no value: key part context.customer" in (
        missing.decision.reason
    )
    first, second = decisions(records)
    assert "customer" in first.limits["per_customer"].error
    assert not first.limits["per_customer"].counted
    assert negative.decision.effect is Effect.DENY
    assert second.limits["refund_total"].error
    assert not [r for r in rows if r.decision_id == negative.decision_id]


def test_a_reason_names_only_the_limits_a_condition_reads(tmp_path):
    """A limit only counted (no condition reads it) that has no value is
    in the record, not in the reason of a condition that failed on
    another limit."""
    counted_only = PER_CUSTOMER.replace("per_customer", "customer_tally", 1)
    refunds = refund_limits(
        name="refunds",
        total="refund_total",
        allow=True,
        more_limits=PER_CUSTOMER + counted_only,
        more_rules=deny_rule("per-customer", "per_customer"),
    )
    policies = policy_dir(
        tmp_path / "policies", {"refunds.yaml": refunds}, shipped=ROLES_AND_DIRECTORY
    )
    harness = Harness(tmp_path, SettableClock("2026-12-07T09:00:00Z"), policies)

    async def go():
        async with harness as pipeline:
            return await pipeline.decide(msgspec.structs.replace(refund(), context={}))

    try:
        answer = asyncio.run(go())
        (record,) = decisions(harness.records())
    finally:
        harness.close()
    assert answer.decision.reason_code.value == "condition_error"
    assert "limit per_customer has no value" in answer.decision.reason
    assert "customer" in record.limits["customer_tally"].error
    assert "customer_tally" not in answer.decision.reason


def test_counts_taken_by_a_commit_that_failed_are_given_back(tmp_path):
    async def steps(pipeline, clock):
        for i in range(4):
            await pipeline.decide(refund(rid=f"rf{i}"))
        real = pipeline._writer

        class Failing:
            async def append_all(self, records, changes=(), **kw):
                raise AuditUnavailable("disk full")

        pipeline._writer = Failing()
        with pytest.raises(AuditUnavailable):
            await pipeline.decide(refund(rid="lost"))
        pipeline._writer = real
        return (await pipeline.decide(refund(rid="again"))).decision.effect

    effect, records, rows = run(tmp_path, steps)

    assert effect is Effect.ALLOW
    assert [r.limits["refunds_today"].count for r in decisions(records)] == [
        0,
        1,
        2,
        3,
        4,
    ]


def test_counts_survive_a_restart_from_the_logs_rows(tmp_path):
    clock = SettableClock("2026-12-07T09:00:00Z")
    harness = Harness(tmp_path, clock, policies_dir(tmp_path))

    async def first():
        async with harness as pipeline:
            for i in range(3):
                await pipeline.decide(refund(rid=f"rf{i}"))

    async def second():
        async with harness as pipeline:
            answers = [await pipeline.decide(refund(rid=f"n{i}")) for i in range(3)]
            return [a.decision.effect for a in answers]

    try:
        asyncio.run(first())
    finally:
        harness.close()
    try:
        effects = asyncio.run(second())
    finally:
        harness.close()
    assert effects == [Effect.ALLOW, Effect.ALLOW, Effect.DENY]


def test_errors_are_kynara_errors_not_counts(tmp_path):
    async def steps(pipeline, clock):
        bad = msgspec.structs.replace(refund(), action="Not A Name")
        with pytest.raises(KynaraError):
            await pipeline.decide(bad)
        return (await pipeline.decide(refund())).decision.effect

    effect, records, rows = run(tmp_path, steps)
    assert effect is Effect.ALLOW
    assert len([r for r in rows if r.limit == "refunds_today"]) == 1


def test_a_decision_that_saw_a_count_later_taken_back_still_verifies(tmp_path):
    from kynara_sidecar.audit.verify import check_limits

    clock = SettableClock("2026-12-07T09:00:00Z")
    harness = Harness(tmp_path, clock, policies_dir(tmp_path))

    async def go():
        async with harness as pipeline:
            real = pipeline._writer
            calls = []

            class FailsFirst:
                async def append_all(self, records, changes=(), **kw):
                    calls.append(records)
                    if len(calls) == 1:
                        await asyncio.sleep(0)
                        raise AuditUnavailable("log full")
                    return await real.append_all(records, changes, **kw)

            pipeline._writer = FailsFirst()
            return await asyncio.gather(
                pipeline.decide(refund(rid="lost")),
                pipeline.decide(refund(rid="kept")),
                return_exceptions=True,
            )

    try:
        lost, kept = asyncio.run(go())
        report = check_limits(harness.store)
        records = decisions(harness.records())
    finally:
        harness.close()
    assert isinstance(lost, AuditUnavailable)
    assert kept.decision.effect is Effect.ALLOW
    # It saw the lost decision's count, which the log never held.
    assert [r.limits["refunds_today"].count for r in records] == [1]
    assert report.ok, report.mismatches
    # One entry per limit the decision counted in: three.
    assert report.seen_above == 3


def test_a_limit_that_counts_something_else_under_its_name_starts_afresh(tmp_path):
    clock = SettableClock("2026-12-07T09:00:00Z")
    root = policies_dir(tmp_path)
    harness = Harness(tmp_path, clock, root)

    async def go():
        async with harness as pipeline:
            for i in range(5):
                await pipeline.decide(refund(rid=f"rf{i}"))
            before = await pipeline.decide(refund(rid="sixth"))
            # Same name, now a sum of amounts: the five counts are no sum.
            text = (root / "refunds.yaml").read_text()
            (root / "refunds.yaml").write_text(
                text.replace(
                    "    key: [user]\n",
                    "    sum: resource.attr.amount\n    key: [user]\n",
                    1,
                ).replace("ceiling: 5\n", "ceiling: 1000\n", 1)
            )
            pipeline.activate(load_policies(root))
            after = await pipeline.decide(refund(100, rid="summed"))
            # And back: the five counted before are its own again.
            (root / "refunds.yaml").write_text(text)
            pipeline.activate(load_policies(root))
            back = await pipeline.decide(refund(rid="again"))
            return before, after, back

    try:
        before, after, back = asyncio.run(go())
        records = decisions(harness.records())
    finally:
        harness.close()
    assert before.decision.effect is Effect.DENY
    summed = records[-2].limits["refunds_today"]
    assert (summed.count, decode_value(summed.sum)) == (0, 0)
    assert after.decision.effect is Effect.ALLOW
    assert back.decision.effect is Effect.DENY
    assert records[-1].limits["refunds_today"].count == 5
    assert summed.definition != records[-1].limits["refunds_today"].definition


def test_a_damaged_row_fails_the_limit_closed_after_a_restart(tmp_path):
    import lmdb

    clock = SettableClock("2026-12-07T09:00:00Z")
    harness = Harness(tmp_path, clock, policies_dir(tmp_path))

    async def first():
        async with harness as pipeline:
            for i in range(5):
                await pipeline.decide(refund(rid=f"rf{i}"))

    async def second():
        async with harness as pipeline:
            return await pipeline.decide(refund(rid="sixth"))

    try:
        asyncio.run(first())
    finally:
        harness.close()
    env = lmdb.open(str(harness.path), max_dbs=16, subdir=True)
    with env.begin(write=True) as txn:
        db = env.open_db(LIMITS_DB, txn=txn)
        key = next(k for k, _ in txn.cursor(db) if k.startswith(b"refunds_today\x00"))
        txn.put(key, b"{", db=db)
    env.close()
    try:
        answer = asyncio.run(second())
        record = decisions(harness.records())[-1]
    finally:
        harness.close()
    assert answer.decision.effect is Effect.DENY
    assert answer.decision.reason_code.value == "condition_error"
    assert "could not be counted" in record.limits["refunds_today"].error


def test_a_caller_cancelled_mid_commit_keeps_its_count_as_its_record_stays(
    tmp_path,
):
    async def steps(pipeline, clock):
        for i in range(4):
            await pipeline.decide(refund(rid=f"rf{i}"))
        fifth = asyncio.ensure_future(pipeline.decide(refund(rid="cancelled")))
        # Decided and queued: now the caller goes away mid-commit.
        await asyncio.sleep(0)
        fifth.cancel()
        with pytest.raises(asyncio.CancelledError):
            await fifth
        return (await pipeline.decide(refund(rid="sixth"))).decision.effect

    sixth, records, rows = run(tmp_path, steps)

    # The cancelled caller's record is in the log, so it counts.
    assert [r.resource.id for r in decisions(records)][-2:] == ["cancelled", "sixth"]
    assert sixth is Effect.DENY
    assert len([r for r in rows if r.limit == "refunds_today"]) == 5


def redacting(tmp_path, rule: str, *, key: bool = True) -> Harness:
    """A harness whose ``audit.redact`` is ``rule``, with a redaction key
    unless ``key`` is False (then ``rule`` may only drop)."""
    overrides = [f"audit.redact={rule}"]
    if key:
        key_file = tmp_path / "redaction.key"
        key_file.write_text("k" * 40)
        overrides.append(f"audit.redaction_key={key_file}")
    return Harness(
        tmp_path,
        SettableClock("2026-12-07T09:00:00Z"),
        policies_dir(tmp_path),
        *overrides,
    )


def run_harness(harness: Harness, *requests: IncomingRequest):
    async def go():
        async with harness as pipeline:
            return [await pipeline.decide(request) for request in requests]

    try:
        answers = asyncio.run(go())
        records = decisions(harness.records())
        raw = b"".join(r.record_bytes for r in harness.store.iter_records())
        rows = harness.rows()
    finally:
        harness.close()
    return answers, records, raw, rows


@pytest.mark.parametrize(
    "rule",
    ["{context: {customer: hash}}", "{context: {customer: drop, note: hash}}"],
    ids=["hashed", "dropped"],
)
def test_a_redacted_key_part_is_kept_sealed_everywhere(tmp_path, rule):
    # With a redaction key (read when some rule hashes), a dropped key part
    # is sealed as a hashed one is.
    harness = redacting(tmp_path, rule)
    answers, records, raw, rows = run_harness(
        harness, refund(customer="secret-customer"), refund(customer="secret-customer")
    )

    assert [a.decision.effect for a in answers] == [Effect.ALLOW, Effect.ALLOW]
    customer = [r.limits["per_customer"] for r in records]
    assert customer[0].key.startswith("hmac-sha256:")
    assert customer[0].key == customer[1].key
    assert [e.count for e in customer] == [0, 1]
    assert b"secret-customer" not in raw
    assert not any("secret-customer" in row.key for row in rows)


def test_a_key_part_dropped_with_no_redaction_key_fails_the_limit_closed(tmp_path):
    harness = redacting(tmp_path, "{context: {customer: drop}}", key=False)
    answers, records, raw, rows = run_harness(harness, refund(customer="secret-c"))

    customer = records[0].limits["per_customer"]
    assert "key part context.customer is dropped from records by audit.redact" in (
        customer.error
    )
    assert customer.key == "" and not customer.counted
    assert answers[0].decision.effect is Effect.DENY
    assert answers[0].decision.reason_code.value == "condition_error"
    assert b"secret-c" not in raw
    assert not [row for row in rows if row.limit == "per_customer"]


def test_a_limit_summing_a_redacted_value_fails_closed(tmp_path):
    harness = redacting(tmp_path, "{resource_attributes: {amount: hash}}")
    answers, records, raw, rows = run_harness(harness, refund(4242))

    total = records[0].limits["refund_total"]
    assert "audit.redact" in total.error and total.amount is None
    assert answers[0].decision.effect is Effect.DENY
    assert answers[0].decision.reason_code.value == "condition_error"
    assert b"4242" not in raw
    assert not [row for row in rows if row.limit == "refund_total"]


def test_a_limit_with_no_value_still_counts_what_it_counts(tmp_path):
    fleet_only = (
        """\
format_version: 1
kind: policy
name: refunds
limits:
  fleet_refunds:
    actions: [payments.refund.issue]
    key: [user]
    window: {rolling: 1d}
    ceiling: 3
    scope: fleet
rules:
"""
        + ALLOW_REFUNDS
    )
    root = policy_dir(
        tmp_path / "policies",
        {"refunds.yaml": fleet_only},
        shipped=ROLES_AND_DIRECTORY,
    )
    harness = Harness(tmp_path, SettableClock("2026-12-07T09:00:00Z"), root)
    # No central store: the fleet limit has no value, but no rule of the
    # refund reads it; its decisions must still be counted for later.
    answers, records, raw, rows = run_harness(harness, refund(rid="a"), refund(rid="b"))

    assert [a.decision.effect for a in answers] == [Effect.ALLOW] * 2
    entries = [r.limits["fleet_refunds"] for r in records]
    assert all("central store" in e.error for e in entries)
    assert [e.counted for e in entries] == [True, True]
    assert len([r for r in rows if r.limit == "fleet_refunds"]) == 2
