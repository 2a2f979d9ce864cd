"""Fleet-scope limits through the central store: two ``FleetLimits`` as two
daemons on one store see each other's counted decisions, over dir:// (a
directory in tmp_path) and nats:// (a real nats-server on loopback).

Waits are bounded (``BOUND``) and only catch a hang; nothing asserts how
long anything took. Staleness is driven by a clock the test holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import textwrap
from collections.abc import AsyncIterator, Callable

import pytest
from store_support import POLL, TIMEOUT, Backend

from kynara_sidecar.decision import Effect
from kynara_sidecar.limits.book import GRACE_NANOS, Counted, Tally
from kynara_sidecar.limits.fleet import (
    FleetLimits,
    decode_document,
    encode_document,
)
from kynara_sidecar.policy import loader
from kynara_sidecar.policy.limits import (
    CalendarUnit,
    CompiledLimit,
    KeyPart,
    Window,
    window_start,
)
from kynara_sidecar.sync import (
    MAX_LIMIT_TALLIES_BYTES,
    Store,
    StoreUnavailable,
    daemon_token,
    open_store,
)

# Generous: a condition that should hold soon, waited for at most this.
BOUND = 20.0
SECOND = 1_000_000_000
HOUR = 3600 * SECOND
# An instant well inside any window the tests use.
T0 = 1_750_000_000 * SECOND
A, B, C = "daemon-a", "daemon-b", "daemon-c"
KEY = '["u-1"]'


def limit(
    name: str = "refunds",
    *,
    ceiling: int | float = 5,
    scope: str = "fleet",
    window: Window | None = None,
) -> CompiledLimit:
    return CompiledLimit(
        name=name,
        policy="payments.yaml",
        actions=("payments.refund.issue",),
        resources=("*",),
        decisions=frozenset({Effect.ALLOW}),
        key=(KeyPart("user"),),
        window=window or Window(rolling_nanos=24 * HOUR),
        ceiling=ceiling,
        scope=scope,
        sum_source="context" if isinstance(ceiling, float) else "",
        sum_field="amount" if isinstance(ceiling, float) else "",
        definition=f"def-{name}",
    )


REFUNDS = limit()
TOTAL = limit("refund_total", ceiling=1000.0)
LOCAL = limit("local_only", scope="daemon")
ACTIVE = {lim.name: lim for lim in (REFUNDS, TOTAL, LOCAL)}


def counted(
    decision: str, time_nanos: int, *, name: str = "refunds", key: str = KEY,
    amount: int | float = 1, definition: str | None = None,
) -> Counted:  # fmt: skip
    """One counted decision, under ``limit(name)``'s definition unless
    ``definition`` says otherwise."""
    if definition is None:
        definition = f"def-{name}"
    return Counted(name, key, time_nanos, amount, decision, definition)


def compiled(body: str) -> dict[str, CompiledLimit]:
    """The limits of a policy file whose ``limits:`` is ``body``, compiled
    as the daemon compiles them (so each has its real definition)."""
    policy = "format_version: 1\nkind: policy\nname: payments\nlimits:\n"
    policy += textwrap.indent(textwrap.dedent(body), "  ")
    directory = "format_version: 1\nkind: directory\nprincipals: []\n"
    loaded = loader.compile_documents(
        [
            loader.decode_document("payments.yaml", policy.encode()),
            loader.decode_document("directory.yaml", directory.encode()),
        ]
    )
    return dict(loaded.policy_set.limits)


class Clock:
    """ns since the epoch, moved by the test."""

    def __init__(self, now: int = T0):
        self.now = now

    def __call__(self) -> int:
        return self.now


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 120))


async def eventually(check: Callable[[], bool], what: str) -> None:
    """Wait (at most BOUND seconds) until ``check()`` holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + BOUND
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"not within {BOUND} s: {what}")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def daemon(
    backend: Backend,
    daemon_id: str,
    clock: Clock,
    *,
    seed: list[Counted] = (),
    limits=ACTIVE,
    **kwargs,
) -> AsyncIterator[FleetLimits]:
    store = backend.open()
    fleet = FleetLimits(store, daemon_id, clock=clock, publish_interval=0.01, **kwargs)
    fleet.activate(limits)
    fleet.seed(seed)
    fleet.launch()
    try:
        yield fleet
    finally:
        await fleet.close()
        await store.close()


def remote_is(fleet: FleetLimits, expected: Tally, name="refunds", start=0):
    return lambda: fleet.remote(name, KEY, start) == expected


# -- the document


def test_the_document_is_canonical_and_keeps_ints_and_doubles_apart():
    data = encode_document(
        A,
        T0,
        {
            "total": ("d2", {KEY: [(T0 + 2, 7.5), (T0 + 1, 5.0)]}),
            "count": ("d1", {KEY: [(T0, 1), (T0 + 3, 2**62 + 1)]}),
        },
    )
    assert data == (
        b'{"daemon_id":"daemon-a","limits":{"count":{"definition":"d1","keys":'
        b'{"[\\"u-1\\"]":'
        b"[[1750000000000000000,1],[1750000000000000003,4611686018427387905]]}},"
        b'"total":{"definition":"d2","keys":{"[\\"u-1\\"]":'
        b"[[1750000000000000001,5.0],[1750000000000000002,7.5]]}}},"
        b'"published_at":1750000000000000000,"v":2}'
    )
    document = decode_document(data)
    assert document.limits["count"].definition == "d1"
    (_, big) = document.limits["count"].keys[KEY][1]
    assert big == 2**62 + 1 and isinstance(big, int)
    (_, five) = document.limits["total"].keys[KEY][0]
    assert five == 5.0 and isinstance(five, float)


@pytest.mark.parametrize(
    "data, match",
    [
        (b"[]", "not a limit tallies document"),
        (b'{"v":3,"daemon_id":"a","published_at":1,"limits":{}}', "version 3"),
        # Version 1 held no definitions: its counts could be of anything.
        (
            b'{"v":1,"daemon_id":"a","published_at":1,"limits":{"l":{"k":[[1,1]]}}}',
            "not a limit tallies document",
        ),
        (b'{"v":1,"daemon_id":"a","published_at":1,"limits":{}}', "version 1"),
        (
            b'{"v":2,"daemon_id":"a","published_at":1,"limits":{},"x":1}',
            "not a limit tallies document",
        ),
        (
            b'{"v":2,"daemon_id":"a","published_at":1,'
            b'"limits":{"l":{"definition":"d","keys":{"k":[[1,true]]}}}}',
            "not a limit tallies document",
        ),
        (
            b'{"v":2,"daemon_id":"a","published_at":1,'
            b'"limits":{"l":{"keys":{"k":[[1,1]]}}}}',
            "not a limit tallies document",
        ),
    ],
)
def test_a_document_of_another_shape_is_refused(data, match):
    with pytest.raises(ValueError, match=match):
        decode_document(data)


# -- two daemons, one store


def test_two_daemons_see_each_others_counts_and_not_their_own(backend):
    clock = Clock()

    async def scenario():
        async with (
            daemon(backend, A, clock) as a,
            daemon(backend, B, clock) as b,
        ):
            await eventually(lambda: not a.stale() and not b.stale(), "both heard")
            assert a.remote("refunds", KEY, 0) == Tally(0, 0)
            a.published([counted("d1", T0 - 10), counted("d2", T0 - 5)])
            b.published([counted("d3", T0 - 7)])
            a.published([counted("d4", T0 - 1, name="refund_total", amount=12.5)])
            await eventually(remote_is(b, Tally(2, 2)), "B sees A's two")
            await eventually(remote_is(a, Tally(1, 1)), "A sees B's one")
            await eventually(
                remote_is(b, Tally(1, 12.5), "refund_total"), "B sees A's sum"
            )
            total = b.remote(TOTAL, KEY, 0)
            assert isinstance(total.sum, float)
            # The window: only events at or after its start count.
            assert b.remote("refunds", KEY, T0 - 5) == Tally(1, 1)
            assert b.remote("refunds", KEY, T0 - 4) == Tally(0, 0)
            assert b.remote("refunds", '["u-2"]', 0) == Tally(0, 0)
            # A daemon-scope limit is neither published nor asked for.
            a.published([counted("d5", T0, name="local_only")])
            with pytest.raises(KeyError, match="local_only"):
                b.remote("local_only", KEY, 0)
            assert b.status()["daemons_seen"] == 1
            assert b.status()["publish_errors"] == 0

    run(scenario())


def test_two_daemons_with_one_id_fail_fleet_limits_closed(tmp_path, caplog):
    root = tmp_path / "store"
    root.mkdir()
    backend = Backend("dir", f"dir://{root}", outage=lambda: None, restore=lambda: None)
    clock = Clock()

    async def scenario():
        async with daemon(backend, A, clock) as first:
            await eventually(lambda: not first.stale(), "heard")
            first.published([counted("d1", T0 - 10)])
            clock.now += 1
            async with daemon(backend, A, clock) as second:
                second.published([counted("d2", T0 - 5)])
                clock.now += 1
                first.published([counted("d3", T0 - 3)])
                # Each overwrites the other's document and never sees the
                # other's counts: both must stop trusting fleet limits.
                await eventually(first.stale, "the first noticed the other")
                more = iter(range(10_000))

                def second_noticed() -> bool:
                    # The first keeps deciding, so its puts keep coming.
                    first.published([counted(f"e{next(more)}", T0 - 2)])
                    return second.stale()

                await eventually(second_noticed, "the second noticed the other")
                assert first.remote("refunds", KEY, 0) is None

    run(scenario())
    assert "another daemon puts limit tallies" in caplog.text


def test_a_decision_seeded_and_published_counts_once_and_old_ones_leave(backend):
    clock = Clock()
    old = T0 - 25 * HOUR  # past the 24 h window's reach

    async def scenario():
        seed = [counted("d1", T0 - 3), counted("d0", old)]
        async with (
            daemon(backend, A, clock, seed=seed) as a,
            daemon(backend, B, clock) as b,
        ):
            await eventually(remote_is(b, Tally(1, 1)), "B sees A's seeded one")
            a.published([counted("d1", T0 - 3), counted("d2", T0 - 2)])
            await eventually(remote_is(b, Tally(2, 2)), "B sees d1 once, and d2")
            # A day later, A's next document no longer holds them.
            clock.now = T0 + 25 * HOUR
            a.published([counted("d3", clock.now)])
            await eventually(remote_is(b, Tally(1, 1)), "only d3 is left")

    run(scenario())


def test_a_restarted_daemon_publishes_what_its_book_seeds(backend):
    clock = Clock()

    async def scenario():
        async with daemon(backend, B, clock) as b:
            async with daemon(backend, A, clock) as a:
                a.published([counted(f"d{i}", T0 - i) for i in range(1, 4)])
                await eventually(remote_is(b, Tally(3, 3)), "B sees three")
            # A's process is gone; B keeps its last document.
            assert b.remote("refunds", KEY, 0) == Tally(3, 3)
            seed = [counted(f"d{i}", T0 - i) for i in range(1, 6)]
            async with daemon(backend, A, clock, seed=seed):
                await eventually(remote_is(b, Tally(5, 5)), "B sees the seeded five")

    run(scenario())


def test_limits_no_longer_declared_leave_the_document(backend):
    clock = Clock()

    async def scenario():
        async with (
            daemon(backend, A, clock) as a,
            daemon(backend, B, clock) as b,
        ):
            a.published(
                [counted("d1", T0), counted("d2", T0, name="refund_total", amount=2.0)]
            )
            await eventually(remote_is(b, Tally(1, 1)), "B sees A's count")
            await eventually(
                remote_is(b, Tally(1, 2.0), "refund_total"), "B sees A's sum"
            )
            a.activate({"refund_total": TOTAL})
            await eventually(remote_is(b, Tally(0, 0)), "A's count is gone")
            assert b.remote("refund_total", KEY, 0) == Tally(1, 2.0)
            # B, on the narrower set too, indexes only what it declares.
            b.activate({"refund_total": TOTAL})
            with pytest.raises(KeyError):
                b.remote("refunds", KEY, 0)
            assert b.remote("refund_total", KEY, 0) == Tally(1, 2.0)

    run(scenario())


REFUNDS_TOTAL = """\
refunds:
  actions: [payments.refund.issue]
  sum: {sum}
  key: [{key}]
  scope: fleet
  window: {{rolling: {window}}}
  ceiling: {ceiling}
"""


def refunds_total(
    *, key="user", sum="context.amount", window="24h", ceiling="1000.0"
) -> dict[str, CompiledLimit]:
    return compiled(
        REFUNDS_TOTAL.format(key=key, sum=sum, window=window, ceiling=ceiling)
    )


@pytest.mark.parametrize(
    "change", [{"key": "agent"}, {"sum": "resource.attr.amount"}], ids=["key", "sum"]
)
def test_a_redefined_limit_counts_none_of_the_other_definitions_decisions(
    backend, change, caplog
):
    """B redefines the limit under its name (another key or sum): while A
    keeps the first definition, neither adds the other's decisions; B
    back on the first definition, each adds the other's again."""
    clock = Clock()
    first, second = refunds_total(), refunds_total(**change)
    old, new = first["refunds"].definition, second["refunds"].definition
    assert old != new

    def spent(decision, at, amount, definition):
        return Counted("refunds", KEY, at, amount, decision, definition)

    async def scenario():
        async with (
            daemon(backend, A, clock, limits=first) as a,
            daemon(backend, B, clock, limits=first) as b,
        ):
            a.published([spent("a1", T0 - 3, 2.5, old)])
            b.published([spent("b1", T0 - 2, 4.0, old)])
            await eventually(remote_is(b, Tally(1, 2.5)), "B adds A's")
            await eventually(remote_is(a, Tally(1, 4.0)), "A adds B's")

            b.activate(second)
            b.seed([])  # B's book holds nothing of the new definition
            # A decision of the old definition committing after the
            # activation is not the new one's.
            b.published([spent("b0", T0 - 1, 16.0, old)])
            b.published([spent("b2", T0 - 1, 8.0, new)])
            await eventually(
                lambda: a.status()["defined_otherwise"] == 1, "A holds B's as other"
            )
            assert b.status()["defined_otherwise"] == 1
            assert a.remote(first["refunds"], KEY, 0) == Tally(0, 0.0)
            assert b.remote(second["refunds"], KEY, 0) == Tally(0, 0.0)
            reader = backend.open()
            try:
                held = decode_document((await reader.limit_tallies())[B])
            finally:
                await reader.close()
            assert held.limits["refunds"].definition == new
            assert held.limits["refunds"].keys == {KEY: [(T0 - 1, 8.0)]}
            # A request still on the first definition gets no remote part
            # of the second's from B.
            with pytest.raises(KeyError, match="definition"):
                b.remote(first["refunds"], KEY, 0)

            # Back to the first definition: B's book gives its decisions
            # of it again (``LimitBook.held``).
            b.activate(first)
            b.seed([spent("b1", T0 - 2, 4.0, old)])
            await eventually(remote_is(a, Tally(1, 4.0)), "A adds B's again")
            assert b.remote(first["refunds"], KEY, 0) == Tally(1, 2.5)
            assert a.status()["defined_otherwise"] == 0
            assert b.status()["defined_otherwise"] == 0

    with caplog.at_level(logging.WARNING, logger="kynara.limits"):
        run(scenario())
    noticed = [
        r.fields
        for r in caplog.records
        if r.getMessage().startswith("fleet limit defined otherwise")
    ]
    assert {
        "from_daemon": B,
        "limit": "refunds",
        "their_definition": new,
        "definition": old,
    }.items() <= noticed[0].items()


def test_a_window_or_ceiling_changed_keeps_the_definition_and_the_counts(tmp_path):
    """What a limit counts is unchanged when only its window and ceiling
    differ: the two daemons add each other's decisions."""
    root = tmp_path / "store"
    root.mkdir()
    backend = Backend("dir", f"dir://{root}", lambda: None, lambda: None)
    clock = Clock()
    first = refunds_total()
    other = refunds_total(window="48h", ceiling="2000.0")
    definition = first["refunds"].definition
    assert other["refunds"].definition == definition

    async def scenario():
        async with (
            daemon(backend, A, clock, limits=first) as a,
            daemon(backend, B, clock, limits=other) as b,
        ):
            a.published([Counted("refunds", KEY, T0, 2.5, "a1", definition)])
            b.published([Counted("refunds", KEY, T0, 1.5, "b1", definition)])
            await eventually(remote_is(b, Tally(1, 2.5)), "B adds A's")
            await eventually(remote_is(a, Tally(1, 1.5)), "A adds B's")
            assert a.status()["defined_otherwise"] == 0

    run(scenario())


def test_a_remote_sum_of_doubles_is_exact_and_rounded_once(tmp_path):
    """B's remote sum of what A and C hold is the correctly rounded sum of
    every amount (``math.fsum``), at any window start: absorbed small
    amounts, tenths, subnormals, huge values and random ones."""
    root = tmp_path / "store"
    root.mkdir()
    backend = Backend("dir", f"dir://{root}", lambda: None, lambda: None)
    clock = Clock()
    rng = random.Random(13)
    amounts = {
        "absorbed": [1e16, 1.0, 1.0, 1.0, 1.0],
        "tenths": [0.1] * 10,
        "subnormal": [5e-324, 5e-324, 2.2250738585072014e-308, 1e-310],
        "huge": [1e300, 1e284, 1.0, 1e-300],
    }
    for case in range(40):
        amounts[f"random-{case}"] = [
            rng.random() * 2.0 ** rng.randint(-1074, 1000)
            for _ in range(rng.randint(1, 30))
        ]
    # A plain left-to-right sum is not correctly rounded here.
    assert sum(amounts["absorbed"]) != math.fsum(amounts["absorbed"])
    assert sum(amounts["tenths"]) != math.fsum(amounts["tenths"])

    def events(publisher: int) -> list[Counted]:
        return [
            counted(f"{name}-{i}", T0 - i, name="refund_total", key=name, amount=amount)
            for name, values in amounts.items()
            for i, amount in enumerate(values)
            if i % 2 == publisher
        ]

    def sums(fleet: FleetLimits, start: int) -> dict[str, Tally]:
        return {name: fleet.remote(TOTAL, name, start) for name in amounts}

    def expected(start: int) -> dict[str, Tally]:
        return {
            name: Tally(len(held), math.fsum(held))
            for name, values in amounts.items()
            for held in [[a for i, a in enumerate(values) if T0 - i >= start]]
        }

    async def scenario():
        async with (
            daemon(backend, A, clock) as a,
            daemon(backend, C, clock) as c,
            daemon(backend, B, clock) as b,
        ):
            a.published(events(0))
            c.published(events(1))
            await eventually(lambda: sums(b, 0) == expected(0), "B sums A's and C's")
            for start in (T0 - 3, T0 - 1, T0):
                assert sums(b, start) == expected(start)
            assert all(isinstance(t.sum, float) for t in sums(b, 0).values())

    run(scenario())


def test_stale_after_the_store_goes_then_fresh_when_it_returns(backend):
    clock = Clock()
    stale_after = 30 * SECOND

    async def scenario():
        async with (
            daemon(backend, A, clock, max_staleness_seconds=30.0) as a,
            daemon(backend, B, clock, max_staleness_seconds=30.0) as b,
        ):
            a.published([counted("d1", T0)])
            await eventually(remote_is(b, Tally(1, 1)), "B sees A's one")
            backend.outage()
            await eventually(lambda: not b.status()["watching"], "B notices")
            # Within the grace, B still answers from what it has ...
            assert b.remote("refunds", KEY, 0) == Tally(1, 1)
            assert b.status()["stale"] is False
            # ... past it, fleet limits are absent (fail closed).
            clock.now += stale_after + 1
            assert b.remote("refunds", KEY, 0) is None
            assert b.status()["stale"] is True
            # A's publishes fail meanwhile; they are counted, not raised.
            a.published([counted("d2", clock.now)])
            await eventually(lambda: a.status()["publish_errors"] > 0, "A fails")
            backend.restore()
            await eventually(lambda: not b.stale(), "B hears the store again")
            await eventually(remote_is(b, Tally(2, 2)), "B sees A's second")

    run(scenario())


def test_never_heard_is_stale(tmp_path):
    clock = Clock()

    async def scenario():
        missing = open_store(f"dir://{tmp_path / 'nowhere'}", timeout=TIMEOUT)
        fleet = FleetLimits(missing, A, clock=clock)
        fleet.activate(ACTIVE)
        assert fleet.remote("refunds", KEY, 0) is None
        fleet.launch()
        try:
            await eventually(lambda: fleet.status()["publish_errors"] > 0, "fails")
            assert fleet.remote("refunds", KEY, 0) is None
            assert fleet.status()["last_heard_ns"] is None
        finally:
            await fleet.close()

    run(scenario())


# -- bounded documents and foreign writers


def test_a_document_too_large_is_not_put_and_others_keep_the_last(backend, caplog):
    clock = Clock()
    many = [counted(f"x{i}", T0 - i) for i in range(60_000)]

    async def scenario():
        async with (
            daemon(backend, A, clock) as a,
            daemon(backend, B, clock) as b,
        ):
            a.published([counted("d1", T0)])
            await eventually(remote_is(b, Tally(1, 1)), "B sees A's one")
            with caplog.at_level(logging.ERROR, logger="kynara.limits"):
                a.published(many)
                await eventually(
                    lambda: (
                        f"at most {MAX_LIMIT_TALLIES_BYTES}"
                        in a.status()["last_publish_error"]
                    ),
                    "refused for its size",
                )
            assert b.remote("refunds", KEY, 0) == Tally(1, 1)

    run(scenario())
    refused = [
        r for r in caplog.records if r.getMessage() == "limit tallies not published"
    ]
    assert refused and refused[0].levelno == logging.ERROR


def test_a_foreign_or_malformed_document_is_refused_and_the_rest_counted(
    tmp_path, caplog
):
    root = tmp_path / "store"
    root.mkdir()
    backend = Backend("dir", f"dir://{root}", lambda: None, lambda: None)
    clock = Clock()
    limits_dir = root / "limits"

    async def scenario():
        async with (
            daemon(backend, A, clock) as a,
            daemon(backend, B, clock) as b,
        ):
            a.published([counted("d1", T0)])
            await eventually(remote_is(b, Tally(1, 1)), "B sees A's one")
            # C's file claims to be A's; another is no JSON; a third has a
            # double where the limit counts integers.
            refunds = REFUNDS.definition
            forged = encode_document(A, T0, {"refunds": (refunds, {KEY: [(T0, 1)]})})
            (limits_dir / f"{daemon_token(C)}.json").write_bytes(forged)
            (limits_dir / f"{daemon_token('d-x')}.json").write_bytes(b"{")
            (limits_dir / f"{daemon_token('d-y')}.json").write_bytes(
                encode_document("d-y", T0, {"refunds": (refunds, {KEY: [(T0, 1.0)]})})
            )
            (limits_dir / "not-a-token!.json").write_bytes(forged)
            await eventually(
                lambda: b.status()["refused_documents"] >= 3, "B refuses three"
            )
            assert b.remote("refunds", KEY, 0) == Tally(1, 1)

    with caplog.at_level(logging.ERROR):
        run(scenario())
    refused = {
        r.fields["from_daemon"]: r.fields["error"]
        for r in caplog.records
        if r.getMessage() == "limit tallies document refused"
    }
    assert "not the one it is stored under" in refused[C]
    assert "not a limit tallies document" in refused["d-x"]
    assert "expected a non-negative integer" in refused["d-y"]
    # The store's reader skips a name that is no daemon token, and says so.
    assert any(
        "not named by a daemon token" in r.fields.get("error", "")
        for r in caplog.records
        if r.getMessage() == "malformed store entry"
    )


def test_a_removed_document_is_forgotten(tmp_path):
    root = tmp_path / "store"
    root.mkdir()
    backend = Backend("dir", f"dir://{root}", lambda: None, lambda: None)
    clock = Clock()

    async def scenario():
        async with daemon(backend, B, clock) as b:
            async with daemon(backend, A, clock) as a:
                a.published([counted("d1", T0)])
                await eventually(remote_is(b, Tally(1, 1)), "B sees A's one")
            (root / "limits" / f"{daemon_token(A)}.json").unlink()
            await eventually(remote_is(b, Tally(0, 0)), "A's document is gone")
            assert b.status()["daemons_seen"] == 0

    run(scenario())


def test_the_store_refuses_a_document_over_its_bound(backend):
    async def scenario():
        store = backend.open()
        try:
            await store.connect()
            with pytest.raises(ValueError, match=str(MAX_LIMIT_TALLIES_BYTES)):
                await store.put_limit_tallies(A, b"x" * (MAX_LIMIT_TALLIES_BYTES + 1))
            await store.put_limit_tallies(A, b"{}")
            await store.put_limit_tallies(B, b"[]")
            await store.put_limit_tallies(A, b'{"v":1}')
            assert await store.limit_tallies() == {A: b'{"v":1}', B: b"[]"}
        finally:
            await store.close()

    run(scenario())


@pytest.mark.parametrize(
    "window",
    [
        Window(calendar=CalendarUnit.MONTH, time_zone="UTC"),
        Window(calendar=CalendarUnit.DAY, time_zone="Europe/Berlin"),
        Window(calendar=CalendarUnit.WEEK, time_zone="Pacific/Kiritimati"),
        Window(rolling_nanos=24 * HOUR),
    ],
    ids=["month", "berlin-day", "kiritimati-week", "rolling"],
)
def test_own_events_stay_published_from_their_window_start_less_the_grace(
    tmp_path, window
):
    """A daemon's document keeps an own event while its window (as
    ``window_start`` opens it at the publisher's clock, less the grace for
    clocks a moment apart) holds it, and not one moment longer."""
    root = tmp_path / "store"
    root.mkdir()
    backend = Backend("dir", f"dir://{root}", lambda: None, lambda: None)
    clock = Clock()
    period = limit("period", window=window)
    start = window_start(window, T0)

    async def scenario():
        async with (
            daemon(backend, A, clock, limits={"period": period}) as a,
            daemon(backend, B, clock, limits={"period": period}) as b,
        ):
            a.published(
                [
                    counted("in", start, name="period"),
                    counted("grace", start - GRACE_NANOS, name="period"),
                    counted("out", start - GRACE_NANOS - 1, name="period"),
                    counted("now", T0, name="period"),
                ]
            )
            await eventually(remote_is(b, Tally(3, 3), "period"), "B sees three")
            # The one left out stays out (not merely late).
            a.published([counted("later", T0 + 1, name="period")])
            await eventually(remote_is(b, Tally(4, 4), "period"), "B sees four")
            # Within the window, B counts only what its start holds.
            assert b.remote("period", KEY, start) == Tally(3, 3)

    run(scenario())


def test_status_says_what_the_lead_exports():
    fleet = FleetLimits(open_store("dir:///nonexistent-kynara-store"), A)
    fleet.activate(ACTIVE)
    status = fleet.status()
    assert status["fleet_limits"] == ["refund_total", "refunds"]
    assert status["stale"] is True
    assert status["daemons_seen"] == 0
    assert status["publish_errors"] == 0
    assert status["last_heard_ns"] is None


def test_bad_settings_are_refused():
    store = open_store("dir:///nonexistent-kynara-store")
    with pytest.raises(ValueError, match="max_staleness_seconds"):
        FleetLimits(store, A, max_staleness_seconds=0)
    with pytest.raises(ValueError, match="publish_interval"):
        FleetLimits(store, A, publish_interval=-1)


# -- NATS permissions: a daemon writes only its own tallies


@pytest.fixture
def users_server(tmp_path):
    """TLS and a user per daemon, limited as ``daemon_permissions`` says;
    the collector's as ``collector_permissions`` says."""
    from nats_support import NatsServer
    from sync.test_nats_auth import Site, _secret, _user

    from kynara_sidecar.sync.nats_store import (
        collector_permissions,
        daemon_permissions,
    )

    site = Site(tmp_path)
    site.passwords["c"] = _secret(site.dir, "c")
    users = [
        _user(
            "collector",
            site.password("collector"),
            collector_permissions("_INBOX.collector"),
        ),
        _user("a", site.password("a"), daemon_permissions(A, "_INBOX.a")),
        _user("b", site.password("b"), daemon_permissions(B, "_INBOX.b")),
        # A daemon of a deployment set up before fleet-scope limits.
        _user(
            "c", site.password("c"), without_limits(daemon_permissions(C, "_INBOX.c"))
        ),
    ]
    config = (
        "jetstream {}\n"
        + site.tls_block()
        + f"authorization {{users: [{', '.join(users)}]}}\n"
    )
    server = NatsServer(tmp_path, config=config)
    yield server, site
    server.stop()


def without_limits(permissions: dict[str, list[str]]) -> dict[str, list[str]]:
    return {
        kind: [subject for subject in subjects if "kynara_limits" not in subject]
        for kind, subjects in permissions.items()
    }


def store_of(server, site, user: str) -> Store:
    """``user``'s store; the collector's makes the limits bucket at connect,
    as the collector's configuration opens it."""
    connection = site.connection(user).load("sync.nats")
    return open_store(
        server.url,
        timeout=TIMEOUT,
        nats=connection,
        declares_limits=user == "collector",
    )


def test_a_daemon_puts_only_its_own_tallies_and_reads_every_daemons(users_server):
    server, site = users_server
    clock = Clock()

    async def scenario():
        collector = store_of(server, site, "collector")
        await collector.connect()  # creates the stream and the buckets
        store_a, store_b = store_of(server, site, "a"), store_of(server, site, "b")
        a = FleetLimits(store_a, A, clock=clock, publish_interval=0.01)
        b = FleetLimits(store_b, B, clock=clock, publish_interval=0.01)
        try:
            for fleet in (a, b):
                fleet.activate(ACTIVE)
                fleet.launch()
            a.published([counted("d1", T0)])
            b.published([counted("d2", T0), counted("d3", T0)])
            await eventually(remote_is(b, Tally(1, 1)), "B reads A's")
            await eventually(remote_is(a, Tally(2, 2)), "A reads B's")
            assert a.status()["publish_errors"] == 0
            forged = encode_document(B, T0, {"refunds": ("", {KEY: []})})
            with pytest.raises(StoreUnavailable, match="refused by the server"):
                await store_a.put_limit_tallies(B, forged)
            # B's document is still B's own.
            document = decode_document((await collector.limit_tallies())[B])
            assert document.limits["refunds"].keys == {KEY: [(T0, 1), (T0, 1)]}
        finally:
            for fleet in (a, b):
                await fleet.close()
            for store in (store_a, store_b, collector):
                await store.close()

    run(scenario())


def test_a_daemon_without_limit_permissions_connects_ships_and_takes_reviews(
    users_server,
):
    """A deployment set up before fleet-scope limits: the daemon's user has
    no kynara_limits subject at all. Connecting, shipping, status,
    approvals and reviews work as before; only the limit tallies calls are
    refused, naming the subject."""
    server, site = users_server

    async def scenario():
        collector = store_of(server, site, "collector")
        await collector.connect()
        await collector.put_review(C, "ap1", "rv1", b"review for c")
        old = store_of(server, site, "c")
        try:
            await old.connect()
            assert await old.ship_segment(C, "m1", b"segment") is True
            await old.put_status(C, b"{}")
            await old.put_approval(C, "ap1", b"approval")
            watch = old.watch_reviews(C)
            (review,) = await anext(watch)
            await watch.aclose()
            assert review.data == b"review for c"
            await old.drop_review(C, "ap1", "rv1")
            with pytest.raises(StoreUnavailable, match="refused by the server"):
                await old.put_limit_tallies(C, b"{}")
            with pytest.raises(StoreUnavailable, match="refused by the server"):
                await old.limit_tallies()
        finally:
            await old.close()
            await collector.close()

    run(scenario())


def test_without_the_collector_a_daemon_may_not_make_the_limits_bucket(
    users_server,
):
    """Daemons' users may look the limits bucket up, not create it: with
    no collector started the first put is refused (and says so), while
    connecting needs no limits bucket at all."""
    server, site = users_server

    async def scenario():
        # The collector's user, opened as a store that does not declare
        # the limits bucket: the stream and the other buckets only.
        others = open_store(
            server.url,
            timeout=TIMEOUT,
            nats=site.connection("collector").load("store.nats"),
        )
        daemon_a = store_of(server, site, "a")
        try:
            await others.connect()
            await daemon_a.connect()
            with pytest.raises(StoreUnavailable, match="refused by the server"):
                await daemon_a.put_limit_tallies(A, b"{}")
            # The collector's store makes it; the same daemon then puts.
            collector = store_of(server, site, "collector")
            await collector.connect()
            await collector.close()
            await daemon_a.put_limit_tallies(A, b"{}")
            assert await daemon_a.limit_tallies() == {A: b"{}"}
        finally:
            await daemon_a.close()
            await others.close()

    run(scenario())


def test_an_open_server_makes_the_limits_bucket_on_first_use_only(nats_server):
    """Without permissions a daemon's store makes the limits bucket itself,
    on its first limit tallies call, never at connect."""

    async def scenario():
        import nats

        store = open_store(nats_server.url, timeout=TIMEOUT)
        client = await nats.connect(nats_server.url)
        try:
            await store.connect()
            js = client.jetstream()
            names = {info.config.name async for info in _streams(js)}
            assert "KV_kynara_limits" not in names
            assert "KV_kynara_reviews" in names
            assert await store.limit_tallies() == {}
            names = {info.config.name async for info in _streams(js)}
            assert "KV_kynara_limits" in names
        finally:
            await client.close()
            await store.close()

    run(scenario())


async def _streams(js):
    for info in await js.streams_info():
        yield info


# -- stopping within a bound


class StuckStore:
    """A store whose connect hangs and, like a NATS connect in progress,
    takes no notice of a cancellation until ``release``; or, with
    ``down``, fails at once as an unreachable store does."""

    url = "nats://stuck.invalid:4222"

    def __init__(self, *, down: bool = False):
        self.down = down
        self.released = asyncio.Event()
        self.connects = 0
        self.puts = 0
        self.closed = False

    async def connect(self) -> None:
        self.connects += 1
        if self.down:
            raise StoreUnavailable(f"{self.url}: connect: refused")
        while not self.released.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await self.released.wait()

    async def put_limit_tallies(self, daemon_id: str, data: bytes) -> None:
        self.puts += 1

    async def limit_tallies(self) -> dict[str, bytes]:
        return {}

    async def watch_limit_tallies(self):
        await asyncio.Event().wait()
        yield "", b""

    async def close(self) -> None:
        self.closed = True


def test_close_leaves_a_stuck_connect_behind_within_its_bound():
    async def scenario():
        store = StuckStore()
        fleet = FleetLimits(store, A, publish_interval=0.01)
        fleet.activate(ACTIVE)
        fleet.launch()
        fleet.published([counted("d1", T0)])
        await eventually(lambda: store.connects == 2, "both tasks connecting")
        assert await fleet.close(0.2) is False
        assert not fleet.started
        # The stuck connect let go: no final put, since the store never
        # answered.
        store.released.set()
        await asyncio.sleep(0)
        assert store.puts == 0

    run(scenario())


def test_close_skips_the_final_put_to_a_store_that_is_down():
    async def scenario():
        store = StuckStore(down=True)
        fleet = FleetLimits(store, A, publish_interval=0.01)
        fleet.activate(ACTIVE)
        fleet.launch()
        await eventually(lambda: fleet.status()["publish_errors"] >= 1, "a failure")
        fleet.published([counted("d1", T0)])
        connects = store.connects
        assert await fleet.close(5.0) is True
        assert store.puts == 0
        assert store.connects == connects
        assert store.closed

    run(scenario())


def test_close_puts_what_changed_since_the_last_put(tmp_path):
    """A decision published right before the stop still reaches the store
    (the final put), and the store is closed."""
    root = tmp_path / "store"
    root.mkdir()

    async def scenario():
        store = open_store(f"dir://{root}", timeout=TIMEOUT, poll_seconds=POLL)
        fleet = FleetLimits(store, A, publish_interval=3600.0, clock=Clock())
        fleet.activate(ACTIVE)
        fleet.launch()
        await eventually(
            lambda: fleet.status()["last_published_ns"] is not None, "first put"
        )
        # The next put would wait out the publish interval: close makes it.
        fleet.published([counted("d1", T0)])
        assert await fleet.close(5.0) is True
        reader = open_store(f"dir://{root}", timeout=TIMEOUT)
        document = decode_document((await reader.limit_tallies())[A])
        assert document.limits["refunds"].keys == {KEY: [(T0, 1)]}
        assert document.limits["refunds"].definition == REFUNDS.definition

    run(scenario())
