"""Canonical record bytes, chain hashes and the verification walk (pure)."""

from __future__ import annotations

import hashlib
import json
import re

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kynara_sidecar.audit.chain import (
    GENESIS_HASH,
    ProblemKind,
    chain_hash,
    encode_record,
    verify_chain,
)
from kynara_sidecar.audit.record import RECORD_VERSION, AuditRecordV1, encode_value

from ._support import make_record


def _chain(count: int) -> list[tuple[int, bytes, bytes]]:
    """An in-memory log of ``count`` records: (seq, bytes, chain hash)."""
    entries, prev = [], GENESIS_HASH
    for seq in range(1, count + 1):
        data = encode_record(msgspec.structs.replace(make_record(seq), seq=seq))
        prev = hashlib.sha256(prev + data).digest()
        entries.append((seq, data, prev))
    return entries


def _head(entries):
    return (entries[-1][0], entries[-1][2]) if entries else None


# ---------------------------------------------------------- canonical bytes


def test_equal_records_encode_to_equal_bytes_whatever_the_dict_order():
    first = make_record(1)
    second = msgspec.structs.replace(
        first, context={"b": {"int": "2"}, "a": {"string": "x"}}
    )
    third = msgspec.structs.replace(
        first, context={"a": {"string": "x"}, "b": {"int": "2"}}
    )

    assert encode_record(second) == encode_record(third)
    assert encode_record(first) == encode_record(make_record(1))


def _assert_sorted(pairs):
    keys = [key for key, _ in pairs]
    assert keys == sorted(keys)
    return dict(pairs)


def test_canonical_bytes_have_sorted_keys_at_every_level_and_no_spaces():
    record = msgspec.structs.replace(
        make_record(3),
        context={"zeta": encode_value({"y": 1, "b": [2]}), "alpha": {"bool": True}},
    )

    data = encode_record(record)

    json.loads(data, object_pairs_hook=_assert_sorted)
    assert b" " not in data.replace(b"rule 3 allowed", b"")
    assert b"\n" not in data


@given(
    st.dictionaries(
        st.text(max_size=6), st.integers(min_value=-(2**63), max_value=2**63 - 1)
    )
)
def test_records_equal_in_value_hash_equally(context):
    forward = dict(context.items())
    backward = dict(reversed(list(context.items())))

    def hashed(values):
        record = AuditRecordV1(
            v=RECORD_VERSION,
            kind="decision",
            time="t",
            context={k: encode_value(v) for k, v in values.items()},
        )
        return chain_hash(GENESIS_HASH, encode_record(record))

    assert hashed(forward) == hashed(backward)


def test_chain_hash_is_sha256_of_previous_hash_and_record_bytes():
    entries = _chain(3)
    first, second = entries[0][1], entries[1][1]

    expected_1 = hashlib.sha256(bytes(32) + first).digest()
    expected_2 = hashlib.sha256(expected_1 + second).digest()

    assert chain_hash(GENESIS_HASH, first) == expected_1
    assert chain_hash(expected_1, second) == expected_2
    assert entries[1][2] == expected_2


def test_chain_hash_refuses_a_previous_hash_of_the_wrong_size():
    with pytest.raises(ValueError, match="previous chain hash must be 32 bytes, got 3"):
        chain_hash(b"abc", b"{}")


# ----------------------------------------------------------------- the walk


@pytest.mark.parametrize("count", [0, 1, 5])
def test_intact_log_verifies(count):
    entries = _chain(count)

    report = verify_chain(entries, _head(entries))

    assert report.ok
    assert report.records == count
    assert report.head_seq == count


def _edit_record(entries, seq, data):
    return [(s, data if s == seq else d, h) for s, d, h in entries]


@pytest.mark.parametrize(
    ("tamper", "seq", "kind", "message"),
    [
        (
            lambda e: _edit_record(e, 3, e[2][1].replace(b"allow", b"deny!")),
            3,
            ProblemKind.EDITED,
            "chain hash mismatch: stored [0-9a-f]{64}, recomputed [0-9a-f]{64}",
        ),
        (
            lambda e: _edit_record(e, 2, b"{not json"),
            2,
            ProblemKind.EDITED,
            "stored bytes do not parse as a JSON record with an integer seq",
        ),
        (
            lambda e: [(s, d, b"" if s == 4 else h) for s, d, h in e],
            4,
            ProblemKind.EDITED,
            "chain hash mismatch: stored <none>",
        ),
        (
            lambda e: e[:2] + e[3:],
            3,
            ProblemKind.MISSING,
            "record 3 missing: after record 2 comes 4",
        ),
        (
            lambda e: e[:1] + e[3:],
            2,
            ProblemKind.MISSING,
            r"record 2\.\.3 missing: after record 1 comes 4",
        ),
        (
            lambda e: [(1, *e[0][1:]), (2, *e[2][1:]), (3, *e[1][1:]), *e[3:]],
            2,
            ProblemKind.REORDERED,
            "record stored at 2 says it is record 3",
        ),
        (
            lambda e: [e[0], e[2], e[1], *e[3:]],
            2,
            ProblemKind.MISSING,
            "record 2 missing: after record 1 comes 3",
        ),
    ],
    ids=[
        "edited",
        "unparseable",
        "hash-absent",
        "deleted",
        "two-deleted",
        "swapped",
        "keys-out-of-order",
    ],
)
def test_walk_names_the_first_bad_record(tamper, seq, kind, message):
    entries = _chain(5)

    report = verify_chain(tamper(entries), _head(entries))

    assert not report.ok
    assert (report.problem.seq, report.problem.kind) == (seq, kind)
    assert report.records == seq - 1
    assert re.match(message, report.problem.message)


@pytest.mark.parametrize(
    ("head", "seq", "message"),
    [
        ((3, "hash3"), 3, "head names record 3, but the log ends at record 5"),
        ((7, "zero"), 7, "head names record 7, but the log ends at record 5"),
        ((5, "zero"), 5, "head hash 0{64} differs from record 5's chain hash"),
        (None, 5, "no head is stored, but the log ends at record 5"),
    ],
)
def test_walk_reports_a_head_that_is_not_the_last_record(head, seq, message):
    entries = _chain(5)
    if head is not None:
        head = (head[0], entries[2][2] if head[1] == "hash3" else bytes(32))

    report = verify_chain(entries, head)

    assert report.problem.kind == ProblemKind.HEAD_MISMATCH
    assert report.problem.seq == seq
    assert re.match(message, report.problem.message)
    assert report.records == 5


def test_head_on_an_empty_log_is_a_mismatch():
    report = verify_chain([], (2, bytes(32)))

    assert report.problem.kind == ProblemKind.HEAD_MISMATCH
    assert report.problem.message == "head names record 2, but the log is empty"


def test_walk_needs_only_json_not_the_record_schema():
    data = b'{"kind":"from_the_future","seq":1,"v":7}'
    stored = hashlib.sha256(GENESIS_HASH + data).digest()

    report = verify_chain([(1, data, stored)], (1, stored))

    assert report.ok


@given(st.data())
def test_any_single_changed_byte_of_a_stored_record_breaks_verification(data):
    entries = _chain(4)
    seq = data.draw(st.integers(min_value=1, max_value=4), label="seq")
    original = entries[seq - 1][1]
    index = data.draw(st.integers(min_value=0, max_value=len(original) - 1))
    replacement = data.draw(
        st.integers(min_value=0, max_value=255).filter(lambda b: b != original[index])
    )
    edited = original[:index] + bytes([replacement]) + original[index + 1 :]

    report = verify_chain(_edit_record(entries, seq, edited), _head(entries))

    assert not report.ok
    assert report.problem.seq == seq
    assert report.problem.kind in (ProblemKind.EDITED, ProblemKind.REORDERED)
