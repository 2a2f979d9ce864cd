"""A record is encoded once: ``chain.sequenced`` completes its unsequenced
bytes with the sequence number, byte for byte what ``encode_record`` gives;
and a committed batch wakes its callers' loop once."""

from __future__ import annotations

import asyncio

import hypothesis
import msgspec
from hypothesis import strategies as st

from kynara_sidecar.audit.chain import encode_record, encode_unsequenced, sequenced
from kynara_sidecar.audit.record import (
    RECORD_VERSION,
    AuditRecordV1,
    GatewayEntry,
    RecordKind,
)
from kynara_sidecar.audit.writer import AuditWriter, _set_futures

from ._support import make_record
from .test_writer import Commits

_TEXT = st.text(max_size=12)
_RECORDS = st.builds(
    AuditRecordV1,
    v=st.integers(min_value=0, max_value=3),
    kind=st.sampled_from([kind.value for kind in RecordKind]),
    time=_TEXT,
    seq=st.integers(min_value=0, max_value=10),
    decision_id=_TEXT,
    action=_TEXT,
    # Keys that look like the top-level ones the bytes are cut at.
    context=st.dictionaries(
        st.sampled_from(["seq", "shadow_effect", "time", "v", "a,", '"x"']),
        st.builds(dict, string=_TEXT),
        max_size=4,
    ),
    shadow_effect=st.sampled_from(["", "allow", "deny", '"time":"', "\\"]),
    gateway=st.none() | st.builds(GatewayEntry, server=_TEXT, tool=_TEXT),
    outcome=_TEXT,
)


@hypothesis.given(record=_RECORDS, seq=st.integers(min_value=1, max_value=2**63))
def test_sequenced_bytes_equal_encoding_the_numbered_record(record, seq):
    expected = encode_record(msgspec.structs.replace(record, seq=seq))

    assert sequenced(encode_unsequenced(record), record, seq) == expected


def test_a_store_given_the_bytes_stores_what_it_would_have_encoded(open_store):
    records = [make_record(n) for n in range(5)]
    given = open_store("given")
    encoded = open_store("encoded")

    ours = given.append_batch(
        records, unsequenced=[encode_unsequenced(r) for r in records]
    )
    theirs = encoded.append_batch(records)

    assert [a.record_bytes for a in ours] == [a.record_bytes for a in theirs]
    assert ours[-1].chain_hash == theirs[-1].chain_hash
    assert b'"seq":5,' in ours[-1].record_bytes


def test_a_batch_of_callers_wakes_their_loop_once(open_store):
    store = open_store()
    count = 24
    writer = None
    # The first record commits alone; the rest queue behind it, one batch.
    commits = Commits(hold_until=lambda size: writer.pending + size >= count)
    writer = AuditWriter(store, on_commit=commits)
    wakeups = []

    async def main():
        loop = asyncio.get_running_loop()
        original = loop.call_soon_threadsafe

        def counting(callback, *args, **kwargs):
            if callback is _set_futures:
                wakeups.append(len(args[0]))
            return original(callback, *args, **kwargs)

        loop.call_soon_threadsafe = counting
        writer.start()
        first = asyncio.ensure_future(writer.append(make_record(0)))
        await asyncio.sleep(0)
        rest = [writer.append(make_record(n)) for n in range(1, count)]
        results = await asyncio.gather(first, *rest)
        await writer.close()
        return results

    results = asyncio.run(main())

    assert [r.seq for r in results] == list(range(1, count + 1))
    assert sum(commits.sizes) == count
    # One wakeup per committed batch, carrying every caller of it.
    assert wakeups == commits.sizes
    assert len(wakeups) < count


def test_a_record_that_cannot_be_encoded_fails_its_caller_alone(open_store):
    store = open_store()
    writer = AuditWriter(store)
    bad = AuditRecordV1(
        v=RECORD_VERSION,
        kind=RecordKind.DECISION,
        time="2026-12-04T09:00:00Z",
        context={"x": object()},
    )

    async def main():
        writer.start()
        outcomes = await asyncio.gather(
            writer.append(bad), writer.append(make_record(1)), return_exceptions=True
        )
        await writer.close()
        return outcomes

    failed, landed = asyncio.run(main())

    assert isinstance(failed, msgspec.EncodeError | TypeError)
    assert landed.seq == 1
