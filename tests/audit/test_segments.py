"""Segments sealed by the writer: signed checkpoints, the witness, the head
at close, retention."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from kynara_sidecar.audit import merkle
from kynara_sidecar.audit.checkpoint import (
    CheckpointKind,
    sign_checkpoint,
    verify_checkpoint,
)
from kynara_sidecar.audit.keys import generate_key
from kynara_sidecar.audit.witness import Witness, WitnessError
from kynara_sidecar.audit.writer import AuditWriter, Sealing
from kynara_sidecar.decision import Timestamp

from ._support import make_record

ORIGIN = "daemon-a"
# 2026-12-04T09:00:00Z in nanoseconds.
T0 = 1_796_374_800 * 1_000_000_000


class Clock:
    def __init__(self, nanos: int = T0):
        self.nanos = nanos

    def __call__(self) -> int:
        return self.nanos


class Seen:
    """An on_checkpoint hook that keeps what it was given."""

    def __init__(self):
        self.calls: list[tuple[object, str | None]] = []

    def __call__(self, checkpoint, witness_error):
        self.calls.append((checkpoint, witness_error))


def _sealing(key, *, witness=None, records=4, seconds=3600.0, **more):
    return Sealing(
        key=key,
        origin=ORIGIN,
        segment_records=records,
        segment_seconds=seconds,
        clock=more.pop("clock", Clock()),
        witness=witness,
        **more,
    )


def _run(writer: AuditWriter, count: int, *, close: bool = True, one_by_one=True):
    async def main():
        writer.start()
        if one_by_one:
            for n in range(count):
                await writer.append(make_record(n))
        else:
            await asyncio.gather(*(writer.append(make_record(n)) for n in range(count)))
        if close:
            await writer.close()

    asyncio.run(main())


def _leaves(store):
    return [merkle.leaf_hash(r.record_bytes) for r in store.iter_records()]


def test_segments_seal_by_count_with_checkpoints_that_verify(open_store, tmp_path):
    store = open_store()
    key = generate_key()
    writer = AuditWriter(store, sealing=_sealing(key, records=4))

    _run(writer, 10, close=False)
    sizes = [cp.tree_size for cp in store.iter_checkpoints()]
    leaves = _leaves(store)

    assert sizes == [4, 8]
    for checkpoint in store.iter_checkpoints():
        verify_checkpoint(checkpoint, {key.key_id: key.public()})
        size = checkpoint.tree_size
        assert checkpoint.root == merkle.root(leaves[:size]).hex()
        assert checkpoint.chain_hash == store.get(size).chain_hash.hex()
        assert checkpoint.origin == ORIGIN
    asyncio.run(writer.close())


def test_close_seals_the_open_segment_and_signs_a_head(open_store, tmp_path):
    store = open_store()
    key = generate_key()
    witness = Witness(tmp_path / "witness", ORIGIN, store.log_id)
    seen = Seen()
    writer = AuditWriter(
        store, sealing=_sealing(key, witness=witness, on_checkpoint=seen)
    )

    _run(writer, 6)
    head = store.head_checkpoint()

    assert [cp.tree_size for cp in store.iter_checkpoints()] == [4, 6]
    assert head.kind == CheckpointKind.HEAD
    assert head.tree_size == 6 == store.head().seq
    assert head.root == merkle.root(_leaves(store)).hex()
    assert [cp.tree_size for cp in witness.checkpoints()] == [4, 6]
    assert witness.head() == head
    assert witness.latest().tree_size == 6
    assert [(cp.kind, error) for cp, error in seen.calls] == [
        ("checkpoint", None),
        ("checkpoint", None),
        ("head", None),
    ]


def test_a_quiet_log_is_sealed_by_age(open_store):
    store = open_store()
    key = generate_key()
    writer = AuditWriter(store, sealing=_sealing(key, records=1000, seconds=0.05))

    async def main():
        writer.start()
        await writer.append(make_record(1))
        await writer.append(make_record(2))
        deadline = time.monotonic() + 10
        while store.latest_checkpoint() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        sealed = store.latest_checkpoint()
        await writer.close()
        return sealed

    sealed = asyncio.run(main())

    assert sealed is not None and sealed.tree_size == 2


def test_a_witness_that_cannot_be_written_is_loud_and_caught_up(open_store, tmp_path):
    store = open_store()
    key = generate_key()
    blocked = tmp_path / "witness"
    blocked.write_text("a file where the witness directory should be")
    witness = Witness(blocked, ORIGIN, store.log_id)
    seen = Seen()
    writer = AuditWriter(
        store, sealing=_sealing(key, witness=witness, on_checkpoint=seen, records=2)
    )

    async def main():
        writer.start()
        for n in range(4):
            await writer.append(make_record(n))
        errors = [error for _, error in seen.calls]
        os.remove(blocked)
        for n in range(4, 6):
            await writer.append(make_record(n))
        await writer.close()
        return errors

    errors = asyncio.run(main())

    assert len(errors) == 2 and all("audit.witness_path" in e for e in errors)
    # The missed checkpoints were written at the next seal; nothing was lost.
    assert [cp.tree_size for cp in witness.checkpoints()] == [2, 4, 6]
    assert seen.calls[-1][1] is None
    assert store.head().seq == 6


def test_retention_prunes_old_segments_and_keeps_the_seam(open_store):
    store = open_store()
    key = generate_key()
    clock = Clock()
    pruned: list[int] = []
    writer = AuditWriter(
        store,
        sealing=_sealing(
            key, records=3, clock=clock, retention_seconds=60, on_prune=pruned.append
        ),
    )

    async def main():
        writer.start()
        for n in range(6):
            await writer.append(make_record(n))
        clock.nanos += 120 * 1_000_000_000
        for n in range(6, 9):
            await writer.append(make_record(n))
        await writer.close()

    asyncio.run(main())

    assert pruned == [6]
    assert store.seam() == 6
    assert store.get(6) is None and store.get(7) is not None
    # The seam still proves what is kept: record 7 against the checkpoint at 9.
    checkpoint = store.checkpoint(9)
    proof = store.inclusion_proof(7, 9)
    assert merkle.verify_inclusion(
        merkle.leaf_hash(store.get(7).record_bytes),
        6,
        9,
        proof,
        bytes.fromhex(checkpoint.root),
    )


def test_a_restarted_writer_seals_from_where_the_log_stands(open_store, tmp_path):
    key = generate_key()
    store = open_store()
    _run(AuditWriter(store, sealing=_sealing(key, records=4)), 5)
    store.close()
    store = open_store()

    _run(AuditWriter(store, sealing=_sealing(key, records=4)), 5)

    assert [cp.tree_size for cp in store.iter_checkpoints()] == [4, 5, 9, 10]
    assert store.merkle_root(10) == merkle.root(_leaves(store))


def test_a_log_written_before_the_tree_gets_its_nodes_when_opened(open_store, tmp_path):
    import lmdb

    store = open_store()
    _run(AuditWriter(store), 11)
    expected = merkle.root(_leaves(store))
    store.close()
    env = lmdb.open(str(tmp_path / "log"), max_dbs=16)
    with env.begin(write=True) as txn:
        txn.drop(env.open_db(b"nodes", txn=txn), delete=True)
    env.close()

    reopened = open_store()

    assert reopened.merkle_root(11) == expected
    assert reopened.node(0, 10) == merkle.leaf_hash(reopened.get(11).record_bytes)


def test_checkpoints_the_witness_missed_are_written_at_the_next_start(
    open_store, tmp_path
):
    key = generate_key()
    store = open_store()
    witness = Witness(tmp_path / "witness", ORIGIN, store.log_id)
    _run(AuditWriter(store, sealing=_sealing(key, witness=witness)), 5)
    # As if the witness was away for a while and the daemon then died.
    (witness.path / "checkpoint-00000000000000000004.json").unlink()
    (witness.path / "checkpoint-00000000000000000005.json").unlink()
    (witness.path / "head.json").unlink()

    writer = AuditWriter(store, sealing=_sealing(key, witness=witness))
    writer.start()
    asyncio.run(writer.close())

    assert [cp.tree_size for cp in witness.checkpoints()] == [4, 5]


def test_a_witness_file_renamed_to_another_size_is_refused(open_store, tmp_path):
    store = open_store()
    witness = Witness(tmp_path / "witness", ORIGIN, store.log_id)
    _run(AuditWriter(store, sealing=_sealing(generate_key(), witness=witness)), 5)
    (witness.path / "checkpoint-00000000000000000004.json").rename(
        witness.path / "checkpoint-00000000000000000009.json"
    )

    with pytest.raises(WitnessError, match="holds the checkpoint of tree size 4"):
        witness.checkpoints()


def test_verify_beside_a_writer_reads_the_witness_before_its_snapshot(
    open_store, tmp_path
):
    from kynara_sidecar.audit.verify import verify_store

    key = generate_key()
    store = open_store()
    witness_root = tmp_path / "witness"

    def commit_and_witness(first: int) -> None:
        # What a daemon does for a segment: commit it sealed, then witness.
        made = []

        def seal(size, root, chain):
            made.append(
                sign_checkpoint(
                    kind=CheckpointKind.CHECKPOINT, origin=ORIGIN,
                    log_id=store.log_id, tree_size=size, root=root,
                    chain_hash=chain, time=Timestamp.from_nanos(T0), key=key,
                )
            )  # fmt: skip
            return made[-1]

        store.append_batch([make_record(first), make_record(first + 1)], seal=seal)
        Witness(witness_root, ORIGIN, store.log_id).write(made[-1])

    class BusyWitness(Witness):
        """A witness a daemon writes to while verify is reading it."""

        def checkpoints(self):
            commit_and_witness(90)
            return super().checkpoints()

    commit_and_witness(1)
    commit_and_witness(3)
    busy = BusyWitness(witness_root, ORIGIN, store.log_id)

    report = verify_store(store, {key.key_id: key.public()}, busy)

    assert report.ok, report
    assert report.head_seq == 6
