"""verify_log on a real LMDB log that an attacker edited directly."""

from __future__ import annotations

import os
import random
import re

import pytest

from kynara_sidecar.audit.chain import ProblemKind
from kynara_sidecar.audit.store import AuditStore
from kynara_sidecar.audit.verify import format_report, verify_log
from kynara_sidecar.errors import AuditUnavailable

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

    assert report.ok
    assert (report.records, report.head_seq) == (42, 42)
    assert re.fullmatch(r"ok: 42 records, head 42 [0-9a-f]{64}", format_report(report))


def test_empty_log_verifies(tmp_path):
    AuditStore.open(tmp_path / "log").close()

    assert format_report(verify_log(tmp_path / "log")) == "ok: 0 records, head 0 " + (
        "0" * 64
    )


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
            r"record 10: head_mismatch: head names record 10, but the log ends at "
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
    assert re.fullmatch(line, format_report(report))


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
        kind = ProblemKind.HEAD_MISMATCH if seq == count else ProblemKind.MISSING
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
