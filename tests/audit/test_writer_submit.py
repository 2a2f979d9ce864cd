"""AuditWriter.submit: append_all without a coroutine, for a door's groups."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from kynara_sidecar.audit.chain import encode_record
from kynara_sidecar.audit.verify import verify_store
from kynara_sidecar.audit.writer import AuditWriter
from kynara_sidecar.errors import AuditUnavailable

from ._support import make_record


def _submit(writer, records, **options):
    """Submit on the running loop; a future of what on_done got."""
    landed = asyncio.get_running_loop().create_future()
    writer.submit(records, (), lambda *outcome: landed.set_result(outcome), **options)
    return landed


def test_submitted_records_commit_in_order_in_one_transaction(open_store):
    store = open_store()
    sizes = []
    writer = AuditWriter(store, on_commit=lambda size, _: sizes.append(size))
    records = [make_record(n) for n in range(5)]

    async def main():
        writer.start()
        outcome = await _submit(writer, records)
        await writer.close()
        return outcome

    appended, error = asyncio.run(main())

    assert error is None
    assert [a.seq for a in appended] == [1, 2, 3, 4, 5]
    assert sizes == [5]
    stored = [store.get(a.seq).record_bytes for a in appended]
    assert stored == [a.record_bytes for a in appended]
    assert appended[2].record_bytes == encode_record(
        msgspec.structs.replace(records[2], seq=3)
    )
    assert verify_store(store, None, None).ok


def test_a_failed_commit_reaches_on_done_and_nothing_is_logged(open_store):
    store = open_store()
    writer = AuditWriter(store)

    def failing(*args, **kwargs):
        raise AuditUnavailable("audit log: the disk said no")

    store.append_batch = failing

    async def main():
        writer.start()
        outcome = await _submit(writer, [make_record(1), make_record(2)])
        await writer.close()
        return outcome

    appended, error = asyncio.run(main())

    assert appended is None
    assert isinstance(error, AuditUnavailable)
    assert "the disk said no" in str(error)
    assert store.head().seq == 0


def test_submit_to_a_closed_writer_raises_before_queueing(open_store):
    store = open_store()
    writer = AuditWriter(store)
    called = []

    async def main():
        writer.start()
        await writer.close()
        writer.submit([make_record(1)], (), lambda *outcome: called.append(outcome))

    with pytest.raises(AuditUnavailable, match="is closed"):
        asyncio.run(main())
    assert called == []


def test_submit_refuses_bytes_that_do_not_match_the_records(open_store):
    writer = AuditWriter(open_store())

    async def main():
        writer.start()
        try:
            writer.submit([make_record(1)], (), print, encoded=[b"{}", b"{}"])
        finally:
            await writer.close()

    with pytest.raises(ValueError, match="expected the bytes of 1 records, got 2"):
        asyncio.run(main())
