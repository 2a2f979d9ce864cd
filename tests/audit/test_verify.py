"""verify_log on a real LMDB log that an attacker edited directly, and the
Merkle proofs the store serves, against a plain recursive tree."""

from __future__ import annotations

import hashlib
import os
import random
import re

import msgspec
import pytest

from kynara_sidecar.audit import merkle
from kynara_sidecar.audit.chain import ProblemKind
from kynara_sidecar.audit.keys import encode_base64url, generate_key
from kynara_sidecar.audit.store import AuditStore
from kynara_sidecar.audit.verify import (
    NO_WITNESS_NOTE,
    format_report,
    verify_log,
    verify_store,
)
from kynara_sidecar.errors import AuditUnavailable

from ._evidence import RawEvidence, node_key, write_sealed_log
from ._support import RawLog, make_record, seq_key


def _write_log(path, count: int, batch: int = 3) -> None:
    store = AuditStore.open(path)
    records = [make_record(n) for n in range(1, count + 1)]
    for start in range(0, count, batch):
        store.append_batch(records[start : start + batch])
    store.close()


def _flip_byte(raw: RawLog, seq: int, index: int) -> None:
    data = bytearray(raw.get(b"records", seq_key(seq)))
    data[index] ^= 0x01
    raw.put(b"records", seq_key(seq), bytes(data))


def _delete(raw: RawLog, seq: int) -> None:
    raw.delete(b"records", seq_key(seq))
    raw.delete(b"chain", seq_key(seq))


def _swap(raw: RawLog, first: int, second: int) -> None:
    a = raw.get(b"records", seq_key(first))
    b = raw.get(b"records", seq_key(second))
    raw.put(b"records", seq_key(first), b)
    raw.put(b"records", seq_key(second), a)


def _set_head(raw: RawLog, seq: int) -> None:
    raw.put(b"meta", b"head", seq_key(seq) + raw.get(b"chain", seq_key(seq)))


def _tamper(path, action) -> None:
    raw = RawLog(path)
    try:
        action(raw)
    finally:
        raw.close()


def test_intact_log_reports_ok_in_one_line(tmp_path):
    _write_log(tmp_path / "log", 42)

    report = verify_log(tmp_path / "log")
    first, *notes = format_report(report).splitlines()

    assert report.ok
    assert (report.records, report.head_seq) == (42, 42)
    assert re.fullmatch(r"ok: 42 records, head 42 [0-9a-f]{64}", first)
    assert notes == [
        f"note: {NO_WITNESS_NOTE}",
        "note: no trusted keys given: no signature was checked",
        "note: no checkpoint covers these records yet: nothing in them is signed",
    ]


def test_empty_log_verifies(tmp_path):
    AuditStore.open(tmp_path / "log").close()

    lines = format_report(verify_log(tmp_path / "log")).splitlines()

    assert lines == [
        "ok: 0 records, head 0 " + "0" * 64,
        f"note: {NO_WITNESS_NOTE}",
        "note: no trusted keys given: no signature was checked",
    ]


@pytest.mark.parametrize(
    ("action", "line"),
    [
        (
            lambda raw: _flip_byte(raw, 7, 40),
            r"record 7: edited: chain hash mismatch: stored [0-9a-f]{64}, "
            r"recomputed [0-9a-f]{64}",
        ),
        (
            lambda raw: _delete(raw, 5),
            r"record 5: missing: record 5 missing: after record 4 comes 6",
        ),
        (
            lambda raw: _swap(raw, 3, 4),
            r"record 3: reordered: record stored at 3 says it is record 4",
        ),
        (
            lambda raw: _set_head(raw, 8),
            r"record 8: head_mismatch: head names record 8, but the log ends at "
            r"record 10",
        ),
        (
            lambda raw: _delete(raw, 10),
            r"record 10: truncated_tail: head names record 10, but the log ends at "
            r"record 9",
        ),
        (
            lambda raw: raw.put(b"chain", seq_key(2), bytes(32)),
            r"record 2: edited: chain hash mismatch: stored 0{64}, "
            r"recomputed [0-9a-f]{64}",
        ),
    ],
    ids=["edited-byte", "deleted", "swapped", "head-rewound", "tail-cut", "hash"],
)
def test_verify_names_the_first_bad_record_and_what_is_wrong(tmp_path, action, line):
    _write_log(tmp_path / "log", 10)
    _tamper(tmp_path / "log", action)

    report = verify_log(tmp_path / "log")

    assert not report.ok
    assert re.fullmatch(line, format_report(report).splitlines()[0])


def test_verify_of_a_missing_log_is_refused(tmp_path):
    with pytest.raises(AuditUnavailable, match="no audit log at"):
        verify_log(tmp_path / "absent")


_TAMPERS = ["flip", "delete", "swap", "head", "chain"]


def _random_tamper(rng: random.Random, raw: RawLog, count: int):
    """Damage the log one way; return the (seq, kinds) verify must report."""
    how = rng.choice(_TAMPERS)
    seq = rng.randint(1, count)
    if how == "flip":
        data = raw.get(b"records", seq_key(seq))
        _flip_byte(raw, seq, rng.randrange(len(data)))
        return seq, {ProblemKind.EDITED, ProblemKind.REORDERED}
    if how == "delete":
        _delete(raw, seq)
        kind = (
            ProblemKind.TRUNCATED_TAIL
            if seq == count
            else ProblemKind.TRUNCATED_FRONT
            if seq == 1
            else ProblemKind.MISSING
        )
        return seq, {kind}
    if how == "swap" and count > 1:
        first = rng.randint(1, count - 1)
        _swap(raw, first, rng.randint(first + 1, count))
        return first, {ProblemKind.REORDERED}
    if how == "head" and count > 1:
        seq = rng.randint(1, count - 1)
        _set_head(raw, seq)
        return seq, {ProblemKind.HEAD_MISMATCH}
    stored = bytearray(raw.get(b"chain", seq_key(seq)))
    stored[rng.randrange(32)] ^= 0x80
    raw.put(b"chain", seq_key(seq), bytes(stored))
    # A changed chain hash shows at its own record, or (for the last) also
    # as a head that no longer matches.
    return seq, {ProblemKind.EDITED}


def test_seeded_random_append_tamper_verify_loop(tmp_path):
    seed = int(os.environ.get("KYNARA_AUDIT_SEED", random.randrange(2**32)))
    print(f"audit tamper loop seed: {seed} (rerun with KYNARA_AUDIT_SEED={seed})")
    rng = random.Random(seed)

    for round_ in range(25):
        path = tmp_path / f"log{round_}"
        count = rng.randint(1, 30)
        _write_log(path, count, batch=rng.randint(1, 8))
        assert verify_log(path).ok, f"seed {seed} round {round_}: intact log"

        raw = RawLog(path)
        try:
            seq, kinds = _random_tamper(rng, raw, count)
        finally:
            raw.close()
        report = verify_log(path)

        assert not report.ok, f"seed {seed} round {round_}: tamper not found"
        assert report.problem.seq == seq, f"seed {seed} round {round_}: {report}"
        assert report.problem.kind in kinds, f"seed {seed} round {round_}: {report}"


# ------------------------------------------------------------------ proofs


def _plain_root(records: list[bytes]) -> bytes:
    """RFC 9162's MTH, written out as the RFC states it, for comparison."""
    if not records:
        return hashlib.sha256(b"").digest()
    if len(records) == 1:
        return hashlib.sha256(b"\x00" + records[0]).digest()
    split = 1
    while split * 2 < len(records):
        split *= 2
    left, right = _plain_root(records[:split]), _plain_root(records[split:])
    return hashlib.sha256(b"\x01" + left + right).digest()


def _record_bytes(store: AuditStore) -> list[bytes]:
    return [stored.record_bytes for stored in store.iter_records()]


@pytest.mark.parametrize("size", [1, 2, 3, 7, 8, 1000])
def test_every_record_has_an_inclusion_proof_against_the_plain_root(open_store, size):
    store = open_store()
    records = [make_record(n) for n in range(1, size + 1)]
    for start in range(0, size, 64):
        store.append_batch(records[start : start + 64])
    data = _record_bytes(store)
    root = _plain_root(data)

    proofs = [store.inclusion_proof(seq, size) for seq in range(1, size + 1)]

    assert store.merkle_root(size) == root
    for seq, proof in enumerate(proofs, start=1):
        leaf = merkle.leaf_hash(data[seq - 1])
        assert merkle.verify_inclusion(leaf, seq - 1, size, proof, root), seq


@pytest.mark.parametrize("size", [1, 2, 3, 7, 8, 1000])
def test_a_proof_for_a_changed_record_fails(open_store, size):
    store = open_store()
    store.append_batch([make_record(n) for n in range(1, size + 1)])
    data = _record_bytes(store)
    root = store.merkle_root(size)
    seq = (size + 1) // 2

    changed = data[seq - 1].replace(b"allowed", b"allowes")

    assert changed != data[seq - 1]
    proof = store.inclusion_proof(seq, size)
    assert merkle.verify_inclusion(
        merkle.leaf_hash(data[seq - 1]), seq - 1, size, proof, root
    )
    assert not merkle.verify_inclusion(
        merkle.leaf_hash(changed), seq - 1, size, proof, root
    )


def test_every_pair_of_checkpoints_of_a_run_has_a_consistency_proof(tmp_path):
    log = write_sealed_log(
        tmp_path / "log", 150, segment=7, batch=3, witness_root=tmp_path / "w"
    )
    store = AuditStore.open(log.path, readonly=True)
    try:
        checkpoints = list(store.iter_checkpoints())
        data = _record_bytes(store)
        proofs = {
            (old.tree_size, new.tree_size): store.consistency_proof(
                old.tree_size, new.tree_size
            )
            for old in checkpoints
            for new in checkpoints
            if old.tree_size <= new.tree_size
        }
    finally:
        store.close()
    roots = {cp.tree_size: bytes.fromhex(cp.root) for cp in checkpoints}

    assert len(checkpoints) == len(log.checkpoints) > 15
    assert all(roots[size] == _plain_root(data[:size]) for size in roots)
    for (old, new), proof in proofs.items():
        assert merkle.verify_consistency(old, new, roots[old], roots[new], proof), (
            old,
            new,
        )
        if old < new:
            wrong = hashlib.sha256(roots[old]).digest()
            assert not merkle.verify_consistency(old, new, wrong, roots[new], proof)


# ----------------------------------------------- sealed logs, seeded loop


_SEALED_TAMPERS = ["flip", "delete", "swap", "node", "index", "cut", "forge"]


def _sealed_tamper(rng: random.Random, raw: RawEvidence, log, count: int):
    """Damage a sealed, witnessed log one way; return (seq, kinds)."""
    how = rng.choice(_SEALED_TAMPERS)
    seq = rng.randint(1, count)
    if how == "flip":
        _flip_byte(raw, seq, rng.randrange(len(raw.get(b"records", seq_key(seq)))))
        return seq, {ProblemKind.EDITED, ProblemKind.REORDERED}
    if how == "delete" and 1 < seq < count:
        _delete(raw, seq)
        return seq, {ProblemKind.MISSING}
    if how == "swap" and count > 1:
        first = rng.randint(1, count - 1)
        _swap(raw, first, rng.randint(first + 1, count))
        return first, {ProblemKind.REORDERED}
    if how == "node":
        raw.put(b"nodes", node_key(0, seq - 1), bytes(32))
        return seq, {ProblemKind.EDITED}
    if how == "index":
        raw.put(b"decisions", f"dec-{seq}".encode(), seq_key(seq % count + 1))
        return seq, {ProblemKind.EDITED}
    if how == "cut" and count > 1:
        keep = rng.randint(1, count - 1)
        for gone in range(keep + 1, count + 1):
            _delete(raw, gone)
        for size_key in raw.keys(b"checkpoints"):
            if int.from_bytes(size_key, "big") > keep:
                raw.delete(b"checkpoints", size_key)
        raw.delete(b"meta", b"head_checkpoint")
        _set_head(raw, keep)
        return min(s for s in log.checkpoints if s > keep), {ProblemKind.TRUNCATED_TAIL}
    size = rng.choice(log.checkpoints)
    cp = raw.checkpoint(size)
    forged = generate_key().sign(b"x")
    raw.put_checkpoint(msgspec.structs.replace(cp, signature=encode_base64url(forged)))
    return size, {ProblemKind.BAD_SIGNATURE}


def test_seeded_random_sealed_log_tamper_loop(tmp_path):
    seed = int(os.environ.get("KYNARA_AUDIT_SEED", random.randrange(2**32)))
    print(f"sealed tamper loop seed: {seed} (rerun with KYNARA_AUDIT_SEED={seed})")
    rng = random.Random(seed)

    for round_ in range(25):
        path = tmp_path / f"log{round_}"
        count = rng.randint(2, 40)
        log = write_sealed_log(
            path,
            count,
            segment=rng.randint(1, 9),
            batch=rng.randint(1, 6),
            witness_root=tmp_path / f"w{round_}",
        )
        where = f"seed {seed} round {round_}"
        assert verify_log(path, log.trusted, log.witness_root).ok, where

        raw = RawEvidence(path)
        try:
            seq, kinds = _sealed_tamper(rng, raw, log, count)
        finally:
            raw.close()
        report = verify_log(path, log.trusted, log.witness_root)

        assert not report.ok, f"{where}: tamper not found"
        assert report.problem.seq == seq, f"{where}: {format_report(report)}"
        assert report.problem.kind in kinds, f"{where}: {format_report(report)}"


class _RacingStore(AuditStore):
    """Appends a record right after the verifier read the head: what a
    daemon committing beside ``verify`` does at the worst moment."""

    armed = raced = False

    def stored_head(self):
        head = super().stored_head()
        if self.armed and not self.raced:
            self.raced = True
            self.append_batch([make_record(head.seq + 1)])
        return head


def test_verify_reads_one_snapshot_while_the_log_grows(tmp_path):
    log = write_sealed_log(tmp_path / "log", 9, witness_root=tmp_path / "w")
    store = _RacingStore.open(log.path)
    store.armed = True
    try:
        report = verify_store(store, log.trusted, log.witness())
        grown = store.head().seq
    finally:
        store.close()

    assert store.raced and grown == 10
    assert report.ok, format_report(report)
    assert (report.records, report.head_seq) == (9, 9)
