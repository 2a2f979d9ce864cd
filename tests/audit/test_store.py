"""The LMDB store: appends, reads, atomic batches, limits and locking."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap

import lmdb
import msgspec
import pytest

from kynara_sidecar.audit.chain import GENESIS_HASH, decode_record, encode_record
from kynara_sidecar.audit.store import AuditStore, Head
from kynara_sidecar.audit.verify import verify_log
from kynara_sidecar.errors import AuditUnavailable

from ._support import RawLog, make_record, seq_key

APPROVALS = b"approvals"


def test_appended_records_read_back_as_stored_and_chained(open_store):
    store = open_store()

    appended = store.append_batch([make_record(1), make_record(2)])
    appended += store.append_batch([make_record(3)])

    assert [a.seq for a in appended] == [1, 2, 3]
    prev = GENESIS_HASH
    for item in appended:
        prev = hashlib.sha256(prev + item.record_bytes).digest()
        assert item.chain_hash == prev
        stored = store.get(item.seq)
        assert (stored.record_bytes, stored.chain_hash) == (item.record_bytes, prev)
        assert decode_record(stored.record_bytes).seq == item.seq
    assert store.head() == Head(3, prev)
    assert [r.seq for r in store.iter_records(start=2)] == [2, 3]
    assert store.get(4) is None


def test_record_bytes_are_the_canonical_encoding_with_the_assigned_seq(open_store):
    store = open_store()
    record = msgspec.structs.replace(make_record(1), seq=99)

    (appended,) = store.append_batch([record])

    assert appended.seq == 1
    assert appended.record_bytes == encode_record(
        msgspec.structs.replace(record, seq=1)
    )


def test_empty_log_has_the_genesis_head(open_store):
    store = open_store()

    assert store.head() == Head(0, GENESIS_HASH)
    assert store.stored_head() is None
    assert list(store.iter_records()) == []


def test_decision_records_are_indexed_by_decision_id(open_store):
    store = open_store()

    store.append_batch([make_record(1), make_record(2)])

    assert store.find_decision("dec-2") == 2
    assert store.find_decision("dec-9") is None


def test_state_changes_commit_with_the_records(open_store):
    store = open_store(extra_dbs=[APPROVALS])
    store.append_batch([make_record(1)], [(APPROVALS, b"a1", b"pending")])

    store.append_batch(
        [make_record(2)], [(APPROVALS, b"a1", None), (APPROVALS, b"a2", b"used")]
    )

    assert store.get_state(APPROVALS, b"a1") is None
    assert store.get_state(APPROVALS, b"a2") == b"used"
    assert store.head().seq == 2


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            (b"grants", b"k", b"v"),
            r"state change 0 \(b'grants', b'k'\): database must be one of the "
            r"extra_dbs \(b'approvals'\), got b'grants'",
        ),
        ((APPROVALS, b"", b"v"), r"key must be 1\.\.511 bytes, got 0"),
        ((APPROVALS, b"k" * 512, b"v"), r"key must be 1\.\.511 bytes, got 512"),
        ((APPROVALS, b"k", "v"), r"value must be bytes or None, got str"),
    ],
)
def test_malformed_state_change_fails_the_batch_before_writing(
    open_store, change, message
):
    store = open_store(extra_dbs=[APPROVALS])

    with pytest.raises(ValueError, match=message):
        store.append_batch([make_record(1)], [change])

    assert store.head() == Head(0, GENESIS_HASH)


def test_batch_is_one_transaction_a_failing_state_change_aborts_it_all(open_store):
    store = open_store(extra_dbs=[APPROVALS], map_size=256 * 1024)
    store.append_batch([make_record(1)], [(APPROVALS, b"kept", b"1")])
    before = store.head()

    with pytest.raises(AuditUnavailable, match="is full"):
        store.append_batch(
            [make_record(2), make_record(3)],
            [(APPROVALS, b"kept", None), (APPROVALS, b"huge", bytes(1 << 20))],
        )

    assert store.head() == before
    assert store.get(2) is None
    assert store.find_decision("dec-2") is None
    assert store.get_state(APPROVALS, b"kept") == b"1"
    assert store.get_state(APPROVALS, b"huge") is None


def test_a_record_that_cannot_be_encoded_aborts_the_batch(open_store):
    store = open_store()
    bad = msgspec.structs.replace(make_record(2), context={"x": object()})

    with pytest.raises(TypeError, match="Encoding objects of type object"):
        store.append_batch([make_record(1), bad])

    assert store.head() == Head(0, GENESIS_HASH)
    assert store.get(1) is None


def test_full_log_refuses_the_batch_writes_nothing_and_stays_readable(tmp_path):
    store = AuditStore.open(tmp_path / "log", map_size=256 * 1024)
    appended = []
    with pytest.raises(AuditUnavailable) as caught:
        for n in range(1, 10_000):
            appended += store.append_batch([make_record(n, reason="x" * 2000)])
    head = store.head()

    assert caught.match(
        r"audit log .*log is full \(map_size=262144 bytes\): raise audit\.map_size"
    )
    assert isinstance(caught.value.__cause__, lmdb.MapFullError)
    assert head == Head(appended[-1].seq, appended[-1].chain_hash)
    assert store.get(head.seq + 1) is None
    assert len(list(store.iter_records())) == head.seq
    used, size = store.usage()
    assert 0 < used <= size == 256 * 1024
    store.close()
    report = verify_log(tmp_path / "log")
    assert report.ok and report.records == head.seq


def test_usage_grows_with_the_log(open_store):
    store = open_store(map_size=1 << 22)
    used_before, size = store.usage()

    store.append_batch([make_record(n, reason="y" * 500) for n in range(200)])

    used_after, _ = store.usage()
    assert used_before < used_after <= size == 1 << 22


@pytest.mark.parametrize("durability", ["durable", "deferred"])
def test_log_survives_close_and_reopen(tmp_path, durability):
    store = AuditStore.open(tmp_path / "log", durability=durability)
    store.append_batch([make_record(1), make_record(2)])
    store.sync()
    head = store.head()
    store.close()

    reopened = AuditStore.open(tmp_path / "log", durability=durability)
    reopened.append_batch([make_record(3)])

    assert reopened.get(2).chain_hash == head.chain_hash
    assert reopened.head().seq == 3
    reopened.close()
    assert verify_log(tmp_path / "log").ok


def test_second_writer_on_the_same_path_is_refused(open_store, tmp_path):
    open_store()

    with pytest.raises(
        AuditUnavailable, match=r"audit log .*/log is in use by another process"
    ):
        AuditStore.open(tmp_path / "log")


def test_writer_lock_is_released_on_close(tmp_path):
    AuditStore.open(tmp_path / "log").close()

    store = AuditStore.open(tmp_path / "log")

    store.close()


def _run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_another_process_cannot_open_a_held_log_for_writing(open_store, tmp_path):
    open_store()

    result = _run_python(
        f"""
        from kynara_sidecar.audit.store import AuditStore
        from kynara_sidecar.errors import AuditUnavailable
        try:
            AuditStore.open({str(tmp_path / "log")!r})
        except AuditUnavailable as err:
            print("refused:", err)
        """
    )

    assert result.stdout.startswith("refused: audit log "), result.stderr
    assert "is in use by another process" in result.stdout


def test_another_process_verifies_a_log_the_daemon_holds(open_store, tmp_path):
    store = open_store()
    store.append_batch([make_record(n) for n in range(1, 6)])

    result = _run_python(
        f"""
        from kynara_sidecar.audit.verify import format_report, verify_log
        print(format_report(verify_log({str(tmp_path / "log")!r})))
        """
    )
    store.append_batch([make_record(6)])

    assert result.stdout.startswith("ok: 5 records, head 5 "), result.stderr


def test_second_open_in_the_same_process_says_to_share_the_store(open_store, tmp_path):
    AuditStore.open(tmp_path / "log").close()
    open_store(readonly=True)

    with pytest.raises(
        AuditUnavailable,
        match=r"audit log .*/log is already open in this process: read through",
    ):
        AuditStore.open(tmp_path / "log", readonly=True)


def test_read_only_store_refuses_appends(open_store, tmp_path):
    writer = open_store()
    writer.append_batch([make_record(1)])
    writer.close()

    reader = open_store(readonly=True)

    assert reader.get(1) is not None
    with pytest.raises(AuditUnavailable, match="is open read-only: cannot append"):
        reader.append_batch([make_record(2)])


def test_unknown_format_version_is_refused(tmp_path):
    AuditStore.open(tmp_path / "log").close()
    raw = RawLog(tmp_path / "log")
    raw.put(b"meta", b"format_version", b"2")
    raw.close()

    with pytest.raises(
        AuditUnavailable,
        match=r"has format version b'2', this daemon reads b'1': point audit\.path",
    ):
        AuditStore.open(tmp_path / "log")


def test_log_with_records_but_no_format_version_is_refused(tmp_path):
    store = AuditStore.open(tmp_path / "log")
    store.append_batch([make_record(1)])
    store.close()
    raw = RawLog(tmp_path / "log")
    raw.delete(b"meta", b"format_version")
    raw.close()

    with pytest.raises(
        AuditUnavailable, match=r"is not a Kynara audit log \(no format_version\)"
    ):
        AuditStore.open(tmp_path / "log")


def test_read_only_open_of_a_missing_log_is_refused(tmp_path):
    with pytest.raises(AuditUnavailable, match=r"no audit log at .*nothing"):
        AuditStore.open(tmp_path / "nothing", readonly=True)


def test_unwritable_directory_is_refused_with_the_setting(tmp_path):
    (tmp_path / "file").write_text("not a directory")

    with pytest.raises(
        AuditUnavailable,
        match=r"cannot open audit log .*file/log for writing \(.*\): check "
        r"audit\.path and its permissions",
    ):
        AuditStore.open(tmp_path / "file" / "log")


def test_record_beyond_the_head_is_never_overwritten(tmp_path):
    store = AuditStore.open(tmp_path / "log")
    store.append_batch([make_record(1), make_record(2)])
    store.close()
    raw = RawLog(tmp_path / "log")
    first_head = raw.get(b"meta", b"head")
    raw.put(b"meta", b"head", seq_key(1) + first_head[8:])
    raw.close()
    store = AuditStore.open(tmp_path / "log")

    with pytest.raises(
        AuditUnavailable, match="already holds records beyond its head 1"
    ):
        store.append_batch([make_record(3)])

    assert store.get(2).record_bytes.count(b'"seq":2') == 1
    store.close()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"durability": "eventually"}, "audit.durability must be 'durable' or"),
        ({"extra_dbs": [b"meta"]}, "extra database name b'meta' is reserved"),
    ],
)
def test_bad_open_options_are_refused(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        AuditStore.open(tmp_path / "log", **options)


def test_reads_inside_reading_see_one_snapshot_while_appends_go_on(open_store):
    store = open_store()
    store.append_batch([make_record(n) for n in range(1, 4)])

    with store.reading():
        store.append_batch([make_record(n) for n in range(4, 6)])
        head = store.head()
        seqs = [record.seq for record in store.iter_records()]
        missing = store.get(5)

    assert head.seq == 3 and seqs == [1, 2, 3] and missing is None
    assert store.head().seq == 5
    assert [record.seq for record in store.iter_records()] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("readonly", [True, False])
def test_a_truncated_data_file_is_refused_not_a_crash(open_store, tmp_path, readonly):
    store = open_store()
    for n in range(1, 200):
        store.append_batch([make_record(n, reason="x" * 500)])
    store.close()
    data = tmp_path / "log" / "data.mdb"
    os.truncate(data, data.stat().st_size // 2)

    with pytest.raises(AuditUnavailable, match="data.mdb is truncated: its header"):
        AuditStore.open(tmp_path / "log", readonly=readonly)


def test_an_emptied_data_file_is_refused_not_a_new_log(open_store, tmp_path):
    store = open_store()
    store.append_batch([make_record(1)])
    store.close()
    os.truncate(tmp_path / "log" / "data.mdb", 0)

    with pytest.raises(AuditUnavailable, match="data.mdb is empty"):
        AuditStore.open(tmp_path / "log")
