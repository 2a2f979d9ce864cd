"""Every tamper kind, done to a real LMDB log with the lmdb module while the
store is closed, is caught by verify with the right kind and reason."""

from __future__ import annotations

import re

import pytest

from kynara_sidecar.audit import merkle
from kynara_sidecar.audit.chain import ProblemKind
from kynara_sidecar.audit.checkpoint import CheckpointKind, encode_checkpoint
from kynara_sidecar.audit.keys import encode_base64url, generate_key
from kynara_sidecar.audit.rotation import rotation_record
from kynara_sidecar.audit.store import AuditStore
from kynara_sidecar.audit.verify import (
    NO_WITNESS_NOTE,
    WitnessError,
    format_report,
    verify_log,
    verify_store,
)

from ._evidence import (
    ORIGIN,
    RawEvidence,
    activation,
    node_key,
    sign,
    start_marker,
    write_sealed_log,
)
from ._support import make_record, seq_key

COUNT = 23


@pytest.fixture
def sealed(tmp_path):
    """23 records, checkpoints at 6, 12, 18, 23 (batches of 2, segments of
    at least 5), a head at 23, all witnessed."""
    return write_sealed_log(tmp_path / "log", COUNT, witness_root=tmp_path / "w")


def _verify(log, trusted=None, witness=True):
    return verify_log(
        log.path,
        log.trusted if trusted is None else trusted,
        log.witness_root if witness else None,
    )


def _tamper(log, action) -> None:
    raw = RawEvidence(log.path)
    try:
        action(raw)
    finally:
        raw.close()


def _problem(report):
    assert not report.ok, format_report(report)
    return report.problem


def test_a_sealed_witnessed_log_verifies_with_every_checkpoint(sealed):
    report = _verify(sealed)

    assert report.ok, format_report(report)
    assert sealed.checkpoints == [6, 12, 18, 23]
    assert (report.records, report.checkpoints, report.notes) == (COUNT, 4, ())
    assert format_report(report).startswith(
        f"ok: {COUNT} records, head {COUNT} {report.head_hash.hex()}, 4 checkpoints"
    )


def test_one_changed_byte_in_a_record_is_edited(sealed):
    def flip(raw):
        data = bytearray(raw.get(b"records", seq_key(9)))
        data[data.index(b"allowed")] ^= 0x01
        raw.put(b"records", seq_key(9), bytes(data))

    _tamper(sealed, flip)
    problem = _problem(_verify(sealed))

    assert (problem.subject, problem.seq, problem.kind) == (
        "record",
        9,
        ProblemKind.EDITED,
    )
    assert problem.message.startswith("chain hash mismatch: stored ")


def test_a_deleted_middle_record_is_missing(sealed):
    def delete(raw):
        raw.delete(b"records", seq_key(10))
        raw.delete(b"chain", seq_key(10))

    _tamper(sealed, delete)
    problem = _problem(_verify(sealed))

    assert (problem.seq, problem.kind) == (10, ProblemKind.MISSING)
    assert problem.message == "record 10 missing: after record 9 comes 11"


def test_two_swapped_records_are_reordered(sealed):
    def swap(raw):
        a, b = raw.get(b"records", seq_key(4)), raw.get(b"records", seq_key(15))
        raw.put(b"records", seq_key(4), b)
        raw.put(b"records", seq_key(15), a)

    _tamper(sealed, swap)
    problem = _problem(_verify(sealed))

    assert (problem.seq, problem.kind) == (4, ProblemKind.REORDERED)
    assert problem.message == "record stored at 4 says it is record 15"


def _cut_tail(raw, keep: int, key) -> None:
    """Drop records after ``keep`` with everything that names them, and
    re-sign the head with the daemon's own key: the LMDB file is then
    consistent in itself."""
    for seq in range(keep + 1, COUNT + 1):
        raw.delete(b"records", seq_key(seq))
        raw.delete(b"chain", seq_key(seq))
        raw.delete(b"decisions", f"dec-{seq}".encode())
    for size_key in raw.keys(b"checkpoints"):
        if int.from_bytes(size_key, "big") > keep:
            raw.delete(b"checkpoints", size_key)
    chain = raw.get(b"chain", seq_key(keep))
    raw.put(b"meta", b"head", seq_key(keep) + chain)
    root = merkle.root([merkle.leaf_hash(data) for data in raw.record_bytes()])
    head = sign(key, keep, root, chain, CheckpointKind.HEAD, log_id=raw.log_id)
    raw.put(b"meta", b"head_checkpoint", encode_checkpoint(head))


def test_a_cut_tail_with_a_rewritten_head_shows_only_against_the_witness(sealed):
    _tamper(sealed, lambda raw: _cut_tail(raw, 12, sealed.key))

    alone = _verify(sealed, witness=False)
    problem = _problem(_verify(sealed))

    assert alone.ok and alone.records == 12
    assert NO_WITNESS_NOTE in alone.notes
    assert (problem.subject, problem.seq, problem.kind) == (
        "witness checkpoint",
        18,
        ProblemKind.TRUNCATED_TAIL,
    )
    assert "for a tree of 18 records, but the log ends at record 12" in (
        problem.message
    )


def test_a_head_naming_a_record_beyond_the_last_is_a_truncated_tail(sealed):
    def cut(raw):
        raw.delete(b"records", seq_key(COUNT))
        raw.delete(b"chain", seq_key(COUNT))

    _tamper(sealed, cut)
    problem = _problem(_verify(sealed, witness=False))

    assert (problem.seq, problem.kind) == (COUNT, ProblemKind.TRUNCATED_TAIL)
    assert problem.message == (
        f"head names record {COUNT}, but the log ends at record {COUNT - 1}"
    )


def test_a_forged_checkpoint_signature_is_a_bad_signature(sealed):
    def forge(raw):
        cp = raw.checkpoint(12)
        other = generate_key().sign(b"something else")
        raw.put_checkpoint(
            cp.__class__(**{**_fields(cp), "signature": encode_base64url(other)})
        )

    _tamper(sealed, forge)
    problem = _problem(_verify(sealed))

    assert (problem.subject, problem.seq, problem.kind) == (
        "checkpoint",
        12,
        ProblemKind.BAD_SIGNATURE,
    )
    assert problem.message.startswith(
        f"signature does not match key {sealed.key.key_id}"
    )


def test_a_forged_witness_statement_is_a_bad_signature(sealed):
    good = sealed.witness().head()
    forged = good.__class__(**{**_fields(good), "tree_size": 40})
    sealed.witness().write(forged)

    problem = _problem(_verify(sealed))

    assert (problem.subject, problem.seq, problem.kind) == (
        "witness head",
        40,
        ProblemKind.BAD_SIGNATURE,
    )


@pytest.mark.parametrize("rewritten", ["f" * 32, None], ids=["other", "deleted"])
def test_a_rewritten_meta_log_id_is_caught_by_the_logs_own_checkpoints(
    sealed, rewritten
):
    def rewrite(raw):
        if rewritten is None:
            raw.delete(b"meta", b"log_id")
        else:
            raw.put(b"meta", b"log_id", rewritten.encode())

    _tamper(sealed, rewrite)
    report = _verify(sealed)
    problem = _problem(report)
    # Caught by the stored checkpoints alone, with no key to check them.
    unsigned = _problem(verify_log(sealed.path, None, None))

    assert sealed.log_id != rewritten
    assert (problem.subject, problem.seq, problem.kind) == (
        "checkpoint",
        6,
        ProblemKind.EDITED,
    )
    assert problem.message == (
        f"signed for log id {sealed.log_id}, but the log's meta log_id is "
        f"{rewritten or '(none)'}: the meta or this statement was replaced"
    )
    # The witness was looked up under the rewritten id: it holds nothing.
    assert any("holds nothing for this log" in note for note in report.notes)
    assert unsigned == problem


def test_a_witness_statement_of_another_log_is_edited(sealed):
    ours = sealed.witness().checkpoints()[1]
    # Same key, root and chain hash: only the log id it was signed for differs.
    sealed.witness().write(
        sign(
            sealed.key,
            ours.tree_size,
            bytes.fromhex(ours.root),
            bytes.fromhex(ours.chain_hash),
            log_id="f" * 32,
        )
    )

    problem = _problem(_verify(sealed))

    assert sealed.log_id != "f" * 32
    assert (problem.subject, problem.seq, problem.kind) == (
        "witness checkpoint",
        12,
        ProblemKind.EDITED,
    )
    assert problem.message.startswith(
        f"signed for log id {'f' * 32}, but the log's meta log_id is {sealed.log_id}"
    )


def test_a_rehashed_forgery_signed_by_another_key_is_an_unknown_key(sealed):
    forger = generate_key()

    def rehash(raw):
        records = raw.record_bytes()
        records[7] = records[7].replace(b"allow", b"deny!")
        raw.rehash(records, forger)

    _tamper(sealed, rehash)
    problem = _problem(_verify(sealed))
    # Trusting the forger's key too, the log verifies in itself; the
    # witness still holds the real roots.
    witnessed = _problem(
        _verify(sealed, {**sealed.trusted, forger.key_id: forger.public()})
    )
    alone = _verify(
        sealed, {**sealed.trusted, forger.key_id: forger.public()}, witness=False
    )

    assert (problem.subject, problem.seq, problem.kind) == (
        "checkpoint",
        6,  # every checkpoint was re-signed: the first fails
        ProblemKind.UNKNOWN_KEY,
    )
    assert f"key_id {forger.key_id} is not among the trusted keys" in problem.message
    assert (witnessed.subject, witnessed.seq, witnessed.kind) == (
        "witness checkpoint",
        12,
        ProblemKind.EDITED,
    )
    assert re.match(
        r"root [0-9a-f]{64} differs from the one recomputed", witnessed.message
    )
    assert alone.ok, format_report(alone)


def test_a_checkpoint_resigned_over_another_root_is_edited(sealed):
    def resign(raw):
        cp = raw.checkpoint(18)
        raw.put_checkpoint(
            sign(
                sealed.key,
                18,
                bytes(32),
                bytes.fromhex(cp.chain_hash),
                log_id=sealed.log_id,
            )
        )

    _tamper(sealed, resign)
    problem = _problem(_verify(sealed, witness=False))

    assert (problem.subject, problem.seq, problem.kind) == (
        "checkpoint",
        18,
        ProblemKind.EDITED,
    )
    assert problem.message.startswith("root " + "0" * 64 + " differs")


@pytest.mark.parametrize(("level", "index", "at"), [(0, 4, 5), (2, 1, 8)])
def test_an_edited_merkle_node_is_edited(sealed, level, index, at):
    _tamper(sealed, lambda raw: raw.put(b"nodes", node_key(level, index), bytes(32)))

    problem = _problem(_verify(sealed))

    assert (problem.seq, problem.kind) == (at, ProblemKind.EDITED)
    assert problem.message.startswith("Merkle ")


def test_a_decisions_index_pointing_elsewhere_is_edited(sealed):
    _tamper(sealed, lambda raw: raw.put(b"decisions", b"dec-7", seq_key(3)))

    problem = _problem(_verify(sealed))

    assert (problem.seq, problem.kind) == (7, ProblemKind.EDITED)
    assert "decisions index maps decision 'dec-7' to record 3" in problem.message


def test_a_pruned_log_verifies_and_keeps_appending(sealed):
    store = AuditStore.open(sealed.path)
    try:
        assert store.prune(12) == 12
    finally:
        store.close()

    pruned = _verify(sealed)
    store = AuditStore.open(sealed.path)
    try:
        sealed.append([make_record(n) for n in (24, 25)], store=store, seal=True)
        sealed.sign_head(store)
    finally:
        store.close()
    grown = _verify(sealed)

    assert pruned.ok, format_report(pruned)
    assert (pruned.records, pruned.seam, pruned.checkpoints) == (COUNT - 12, 12, 4)
    assert grown.ok, format_report(grown)
    assert (grown.records, grown.head_seq, grown.checkpoints) == (13, 25, 5)


def _prune(log, through: int) -> None:
    store = AuditStore.open(log.path)
    try:
        store.prune(through)
    finally:
        store.close()


@pytest.mark.parametrize(
    ("action", "seq", "message"),
    [
        (
            lambda raw: [raw.delete(db, seq_key(13)) for db in (b"records", b"chain")],
            13,
            r"record 13 is gone, and the log records the seam at 12: its first "
            r"record is 14",
        ),
        (
            lambda raw: raw.delete(b"checkpoints", seq_key(12)),
            12,
            r"the seam \(records 1..12 pruned\) at a checkpoint that is not stored",
        ),
        (
            lambda raw: raw.delete(b"nodes", node_key(2, 2)),
            12,
            r"the seam \(records 1..12 pruned\) lacks its Merkle nodes: node "
            r"\(level 2, index 2\) is not stored",
        ),
    ],
    ids=["record-past-seam", "seam-checkpoint", "seam-node"],
)
def test_deleting_past_the_seam_is_a_truncated_front(sealed, action, seq, message):
    _prune(sealed, 12)
    _tamper(sealed, action)

    problem = _problem(_verify(sealed))

    assert (problem.seq, problem.kind) == (seq, ProblemKind.TRUNCATED_FRONT)
    assert re.fullmatch(message, problem.message), problem.message


def test_deleting_the_first_records_without_a_seam_is_a_truncated_front(sealed):
    def cut(raw):
        for seq in (1, 2, 3):
            raw.delete(b"records", seq_key(seq))
            raw.delete(b"chain", seq_key(seq))

    _tamper(sealed, cut)
    problem = _problem(_verify(sealed))

    assert (problem.seq, problem.kind) == (1, ProblemKind.TRUNCATED_FRONT)
    assert problem.message == (
        "records 1..3 are gone, and the log records no seam (nothing pruned): "
        "its first record is 4"
    )


def _rotated_log(tmp_path, signer, *, before_rotation=None):
    """Records 1..6 sealed by ``old``; a rotation to ``new`` signed by
    ``signer``; records 8..13 sealed by ``new``."""
    log = write_sealed_log(tmp_path / "log", 6, witness_root=tmp_path / "w", head=False)
    old, new = log.key, generate_key()
    store = AuditStore.open(log.path)
    try:
        rotation = rotation_record(
            signer(old), new.public(), origin=ORIGIN, log_id=store.log_id,
            time="2026-12-04T10:00:00Z",
        )  # fmt: skip
        log.append([rotation], store=store, seal=False, key=before_rotation)
        log.append(
            [make_record(n) for n in range(8, 14)], store=store, seal=True, key=new
        )
        log.sign_head(store, key=new)
    finally:
        store.close()
    return log, old, new


def test_a_valid_rotation_makes_the_new_keys_checkpoints_verify(tmp_path):
    log, old, new = _rotated_log(tmp_path, lambda old: old)

    report = _verify(log, {old.key_id: old.public()})

    assert report.ok, format_report(report)
    assert report.checkpoints == 2


def test_the_new_key_is_trusted_only_from_the_rotation_on(tmp_path):
    log, old, new = _rotated_log(tmp_path, lambda old: old)

    def resign(raw):
        cp = raw.checkpoint(6)
        raw.put_checkpoint(
            sign(
                new,
                6,
                bytes.fromhex(cp.root),
                bytes.fromhex(cp.chain_hash),
                log_id=log.log_id,
            )
        )

    _tamper(log, resign)
    problem = _problem(_verify(log, {old.key_id: old.public()}, witness=False))

    assert (problem.subject, problem.seq, problem.kind) == (
        "checkpoint",
        6,
        ProblemKind.UNKNOWN_KEY,
    )


def test_a_rotation_signed_by_an_untrusted_key_is_an_unknown_key(tmp_path):
    stranger = generate_key()
    log, old, new = _rotated_log(tmp_path, lambda old: stranger)

    problem = _problem(_verify(log, {old.key_id: old.public()}))

    assert (problem.seq, problem.kind) == (7, ProblemKind.UNKNOWN_KEY)
    assert problem.message == (f"rotation signed by untrusted key {stranger.key_id}")


def test_a_rotation_with_a_bad_signature_is_a_bad_signature(tmp_path):
    log, old, new = _rotated_log(tmp_path, lambda old: old)
    # The same record re-chained under another log id: its signature binds
    # the log id, so it no longer verifies.
    store = AuditStore.open(log.path, readonly=True)
    try:
        data = store.get(7).record_bytes
        log_id = store.log_id
    finally:
        store.close()
    other = rotation_record(
        old, new.public(), origin=ORIGIN, log_id="f" * 32, time="2026-12-04T10:00:00Z"
    ).key_rotation.signature

    def swap_signature(raw):
        records = raw.record_bytes()
        ours = data.split(b'"signature":"')[1].split(b'"')[0]
        records[6] = records[6].replace(ours, other.encode())
        raw.rehash(records, old)

    _tamper(log, swap_signature)
    problem = _problem(_verify(log, {old.key_id: old.public()}, witness=False))

    assert log_id != "f" * 32
    assert (problem.seq, problem.kind) == (7, ProblemKind.BAD_SIGNATURE)
    assert problem.message == f"rotation signature does not verify under {old.key_id}"


def test_the_tail_check_starts_at_the_checkpoint_it_is_given(sealed):
    def flip_early(raw):
        data = bytearray(raw.get(b"records", seq_key(3)))
        data[data.index(b"allowed")] ^= 0x01
        raw.put(b"records", seq_key(3), bytes(data))

    _tamper(sealed, flip_early)
    store = AuditStore.open(sealed.path, readonly=True)
    try:
        tail = verify_store(store, sealed.trusted, sealed.witness(), from_tree_size=18)
        whole = verify_store(store, sealed.trusted, sealed.witness())
    finally:
        store.close()

    assert tail.ok, format_report(tail)
    assert (tail.records, tail.seam) == (COUNT - 18, 18)
    assert (whole.problem.seq, whole.problem.kind) == (3, ProblemKind.EDITED)


def test_the_tail_check_catches_a_cut_tail_against_the_witness(sealed):
    _tamper(sealed, lambda raw: _cut_tail(raw, 18, sealed.key))
    store = AuditStore.open(sealed.path, readonly=True)
    try:
        report = verify_store(
            store, sealed.trusted, sealed.witness(), from_tree_size=18
        )
    finally:
        store.close()

    assert (report.problem.seq, report.problem.kind) == (
        COUNT,
        ProblemKind.TRUNCATED_TAIL,
    )


def _fields(cp):
    import msgspec

    return msgspec.structs.asdict(cp)


def test_a_real_daemons_log_verifies_and_its_cut_tail_shows(tmp_path):
    from support import RunningDaemon, SettableClock, daemon_config, small_refund

    from kynara_sidecar.audit.keys import load_signing_key

    config = daemon_config(tmp_path, "audit.segment_records=3")
    running = RunningDaemon(config, SettableClock())
    try:
        stub = running.stub()
        for _ in range(8):
            stub.Decide(small_refund(), timeout=10)
    finally:
        running.stop()
    key = load_signing_key(config.audit.signing_key)
    trusted, witness = {key.key_id: key.public()}, config.audit.witness_path

    report = verify_log(config.audit.path, trusted, witness)
    size = report.head_seq

    def cut(raw):
        for seq in (size - 1, size):
            raw.delete(b"records", seq_key(seq))
            raw.delete(b"chain", seq_key(seq))
        for size_key in raw.keys(b"checkpoints"):
            if int.from_bytes(size_key, "big") > size - 2:
                raw.delete(b"checkpoints", size_key)
        raw.delete(b"meta", b"head_checkpoint")
        raw.put(
            b"meta", b"head", seq_key(size - 2) + raw.get(b"chain", seq_key(size - 2))
        )

    assert report.ok, format_report(report)
    assert report.checkpoints >= 3 and report.notes == ()
    raw = RawEvidence(config.audit.path)
    try:
        cut(raw)
    finally:
        raw.close()
    problem = _problem(verify_log(config.audit.path, trusted, witness))
    assert problem.kind == ProblemKind.TRUNCATED_TAIL
    assert problem.subject.startswith("witness")
    assert problem.message.endswith(f"but the log ends at record {size - 2}")


def test_no_keys_checks_no_signature_but_an_empty_trust_refuses_all(sealed):
    unchecked = verify_log(sealed.path, None, sealed.witness_root)
    refused = _problem(verify_log(sealed.path, {}, sealed.witness_root))

    assert unchecked.ok
    assert "no trusted keys given: no signature was checked" in unchecked.notes
    assert (refused.seq, refused.kind) == (6, ProblemKind.UNKNOWN_KEY)


# ------------------------------------------- evidence deleted from the log


def test_a_deleted_middle_checkpoint_is_missing_against_the_witness(sealed):
    _tamper(sealed, lambda raw: raw.delete(b"checkpoints", seq_key(12)))

    problem = _problem(_verify(sealed))

    assert (problem.subject, problem.seq, problem.kind) == (
        "checkpoint",
        12,
        ProblemKind.MISSING,
    )
    assert problem.message == (
        f"the witness holds a checkpoint at tree size 12, signed by "
        f"{sealed.key.key_id}, but the log stores no checkpoint there: it was "
        "deleted"
    )


def _delete_all_checkpoints(raw):
    for size_key in raw.keys(b"checkpoints"):
        raw.delete(b"checkpoints", size_key)


@pytest.mark.parametrize(
    "action",
    [_delete_all_checkpoints, lambda raw: raw.drop(b"checkpoints")],
    ids=["rows", "database"],
)
def test_deleted_checkpoints_are_missing_against_the_witness(sealed, action):
    _tamper(sealed, action)

    problem = _problem(_verify(sealed))

    assert (problem.subject, problem.seq, problem.kind) == (
        "checkpoint",
        6,
        ProblemKind.MISSING,
    )


def test_deleted_checkpoints_are_missing_against_the_signed_head(sealed):
    _tamper(sealed, _delete_all_checkpoints)

    problem = _problem(_verify(sealed, witness=False))

    assert (problem.subject, problem.seq, problem.kind) == (
        "checkpoint",
        COUNT,
        ProblemKind.MISSING,
    )
    assert problem.message.startswith(
        f"the head checkpoint (a clean stop) names a segment sealed at tree size "
        f"{COUNT}"
    )


def test_a_deleted_head_checkpoint_is_missing_against_the_witness(sealed):
    _tamper(sealed, lambda raw: raw.delete(b"meta", b"head_checkpoint"))

    problem = _problem(_verify(sealed))

    assert (problem.subject, problem.seq, problem.kind) == (
        "head checkpoint",
        COUNT,
        ProblemKind.MISSING,
    )


def test_a_deleted_nodes_database_is_missing_not_a_note(sealed):
    _tamper(sealed, lambda raw: raw.drop(b"nodes"))

    problem = _problem(_verify(sealed))
    alone = _problem(_verify(sealed, witness=False))

    assert (problem.subject, problem.seq, problem.kind) == (
        "checkpoint",
        6,
        ProblemKind.MISSING,
    )
    assert problem.message.startswith("the log has no Merkle nodes database")
    assert alone == problem


@pytest.mark.parametrize(
    ("prune", "node", "seq", "kind"),
    [
        # (4, 0) is on the right edge of the whole tree (23 = 16 + 4 + 2 + 1)
        # and of the seam at 18 (16 + 2).
        (0, (4, 0), 16, ProblemKind.EDITED),
        (18, (4, 0), 18, ProblemKind.TRUNCATED_FRONT),
    ],
    ids=["walk", "seam"],
)
def test_a_missing_merkle_node_is_a_problem_kind(sealed, prune, node, seq, kind):
    if prune:
        _prune(sealed, prune)
    _tamper(sealed, lambda raw: raw.delete(b"nodes", node_key(*node)))

    problem = _problem(_verify(sealed))

    assert (problem.seq, problem.kind) == (seq, kind)
    assert "run `kynara-sidecar verify" not in problem.message


# ------------------------------------------------------------- the witness


def test_an_empty_witness_is_a_note_or_when_required_missing(sealed, tmp_path):
    elsewhere = tmp_path / "mistyped"

    noted = verify_log(sealed.path, sealed.trusted, elsewhere)
    required = _problem(
        verify_log(sealed.path, sealed.trusted, elsewhere, require_witness=True)
    )

    assert noted.ok, format_report(noted)
    assert any("holds nothing for this log" in note for note in noted.notes)
    assert (required.subject, required.seq, required.kind) == (
        "witness",
        COUNT,
        ProblemKind.MISSING,
    )
    witness_dir = elsewhere / ORIGIN / sealed.log_id
    assert required.message.startswith(f"the witness at {witness_dir} holds nothing")
    assert required.message.endswith("check audit.witness_path (or --witness)")


def test_a_required_witness_of_an_unsigned_log_is_no_problem(tmp_path):
    store = AuditStore.open(tmp_path / "log")
    try:
        store.append_batch([make_record(1)])
    finally:
        store.close()

    report = verify_log(tmp_path / "log", {}, tmp_path / "w", require_witness=True)

    assert report.ok, format_report(report)


def test_an_unreadable_witness_raises_naming_the_setting(sealed, tmp_path):
    not_a_dir = tmp_path / "witness-file"
    not_a_dir.write_text("not a directory")

    with pytest.raises(WitnessError) as caught:
        verify_log(sealed.path, sealed.trusted, not_a_dir)

    assert str(not_a_dir) in str(caught.value)
    assert "audit.witness_path (or --witness)" in str(caught.value)


def test_a_garbage_witness_file_is_edited_at_its_size(sealed):
    path = sealed.witness().path / f"checkpoint-{12:020d}.json"
    path.write_bytes(b"not json")

    problem = _problem(_verify(sealed))

    assert (problem.subject, problem.seq, problem.kind) == (
        "witness checkpoint",
        12,
        ProblemKind.EDITED,
    )
    assert str(path) in problem.message


# -------------------------------------------------- records after the head


def _append(log, records) -> None:
    # As an attacker with the store (or a daemon) would: chain, nodes and
    # the stored head all consistent; nothing signed.
    store = AuditStore.open(log.path)
    try:
        store.append_batch(records)
    finally:
        store.close()


def test_a_record_forged_after_a_clean_stop_is_edited(sealed):
    _append(sealed, [make_record(COUNT + 1)])

    problem = _problem(_verify(sealed))

    assert (problem.subject, problem.seq, problem.kind) == (
        "record",
        COUNT + 1,
        ProblemKind.EDITED,
    )
    assert problem.message.startswith(
        f"follows the head signed at a clean stop at tree size {COUNT}, but is "
        "'decision'"
    )


def test_a_marker_other_than_start_after_a_clean_stop_is_edited(sealed):
    _append(sealed, [start_marker("stop")])

    problem = _problem(_verify(sealed, witness=False))

    assert (problem.seq, problem.kind) == (COUNT + 1, ProblemKind.EDITED)
    assert "but is a 'stop' marker" in problem.message


def _restart(log, *, rotations: int = 0, seal: bool = True, after=()) -> None:
    """What a restarting daemon appends: ``rotations`` key rotations (each
    its own transaction), the start marker sealed alone, then ``after``."""
    store = AuditStore.open(log.path)
    try:
        key = log.key
        for _ in range(rotations):
            new = generate_key()
            rotation = rotation_record(
                key, new.public(), origin=ORIGIN, log_id=store.log_id,
                time="2026-12-04T10:00:00Z",
            )  # fmt: skip
            log.append([rotation], store=store, seal=False)
            key = log.key = new
        log.append([start_marker()], store=store, seal=seal)
        if after:
            log.append(list(after), store=store, seal=False)
    finally:
        store.close()


def test_a_restart_after_a_clean_stop_verifies(sealed):
    _restart(sealed, after=[make_record(COUNT + 2)])

    report = _verify(sealed)

    assert report.ok, format_report(report)
    assert report.records == COUNT + 2
    assert sealed.checkpoints[-1] == COUNT + 1


@pytest.mark.parametrize("rotations", [1, 2])
def test_rotations_then_a_sealed_start_after_a_clean_stop_verify(tmp_path, rotations):
    log = write_sealed_log(tmp_path / "log", 6, witness_root=tmp_path / "w")
    first = log.trusted

    _restart(log, rotations=rotations, after=[make_record(8 + rotations)])
    report = _verify(log, trusted=first)

    assert report.ok, format_report(report)
    assert log.checkpoints[-1] == 7 + rotations


def test_a_rotation_and_start_sealed_together_verify(tmp_path):
    log = write_sealed_log(tmp_path / "log", 6, witness_root=tmp_path / "w")
    new = generate_key()
    store = AuditStore.open(log.path)
    try:
        rotation = rotation_record(
            log.key, new.public(), origin=ORIGIN, log_id=store.log_id,
            time="2026-12-04T10:00:00Z",
        )  # fmt: skip
        log.append([rotation, start_marker()], store=store, seal=True, key=new)
    finally:
        store.close()

    report = _verify(log)

    assert report.ok, format_report(report)


def _forged_start(sealed, *, tail: bool) -> object:
    # The breaker's attack: no key, write access to the LMDB file. A start
    # marker and an allow after the head, chain, nodes, index and stored
    # head all consistent.
    _append(sealed, [start_marker()])
    _append(sealed, [make_record(COUNT + 2)])
    return _tail(sealed, 18) if tail else _verify(sealed)


@pytest.mark.parametrize("tail", [False, True], ids=["whole", "tail"])
def test_a_start_marker_forged_after_a_clean_stop_is_edited(sealed, tail):
    problem = _problem(_forged_start(sealed, tail=tail))

    assert (problem.subject, problem.seq, problem.kind) == (
        "record",
        COUNT + 1,
        ProblemKind.EDITED,
    )
    assert problem.message == (
        f"is the start marker after the head signed at a clean stop at tree "
        f"size {COUNT}, but is not sealed (no checkpoint is stored at tree size "
        f"{COUNT + 1}): not written by the daemon, which seals its start marker "
        "in the transaction that commits it"
    )


def test_a_start_marker_sealed_only_later_is_edited(sealed):
    # A checkpoint after the marker (the next segment's) does not vouch for
    # it: a daemon that sealed the forgery later cannot make it its own.
    _restart(sealed, seal=False, after=[make_record(COUNT + 2)])
    store = AuditStore.open(sealed.path)
    try:
        sealed.append([], store=store, seal=True)
    finally:
        store.close()

    problem = _problem(_verify(sealed))

    assert sealed.checkpoints[-1] == COUNT + 2
    assert (problem.seq, problem.kind) == (COUNT + 1, ProblemKind.EDITED)
    assert "but is not sealed" in problem.message


def test_a_start_marker_forged_after_a_rotation_is_edited(tmp_path):
    log = write_sealed_log(tmp_path / "log", 6, witness_root=tmp_path / "w")
    first = log.trusted

    _restart(log, rotations=1, seal=False, after=[make_record(9)])
    problem = _problem(_verify(log, trusted=first))

    assert (problem.seq, problem.kind) == (8, ProblemKind.EDITED)
    assert problem.message.startswith(
        "is the start marker after the head signed at a clean stop at tree size 6,"
    )


def test_a_decision_forged_after_a_rotation_after_a_clean_stop_is_edited(tmp_path):
    # A rotation a start left behind (or one replayed: its signature names
    # no position), then a forged decision where the start marker is due.
    log = write_sealed_log(tmp_path / "log", 6, witness_root=tmp_path / "w")
    store = AuditStore.open(log.path, readonly=True)
    try:
        rotation = rotation_record(
            log.key, generate_key().public(), origin=ORIGIN,
            log_id=store.log_id, time="2026-12-04T10:00:00Z",
        )  # fmt: skip
    finally:
        store.close()
    _append(log, [rotation])
    _append(log, [make_record(8)])

    problem = _problem(_verify(log))

    assert (problem.seq, problem.kind) == (8, ProblemKind.EDITED)
    assert problem.message.startswith(
        "follows the head signed at a clean stop at tree size 6 and the key "
        "rotations after it, but is 'decision'"
    )


# ------------------------------------------------------ the front, the seam


def _tail(log, from_tree_size: int):
    store = AuditStore.open(log.path, readonly=True)
    try:
        return verify_store(
            store, log.trusted, log.witness(), from_tree_size=from_tree_size
        )
    finally:
        store.close()


def test_the_tail_check_still_catches_a_cut_front(sealed):
    def cut(raw):
        for seq in (1, 2, 3):
            raw.delete(b"records", seq_key(seq))
            raw.delete(b"chain", seq_key(seq))

    _tamper(sealed, cut)
    problem = _problem(_tail(sealed, 18))

    assert (problem.seq, problem.kind) == (1, ProblemKind.TRUNCATED_FRONT)


def test_the_tail_check_still_needs_the_seam_checkpoint(sealed):
    _prune(sealed, 6)
    _tamper(sealed, lambda raw: raw.delete(b"checkpoints", seq_key(6)))

    problem = _problem(_tail(sealed, 18))

    assert (problem.subject, problem.seq, problem.kind) == (
        "checkpoint",
        6,
        ProblemKind.TRUNCATED_FRONT,
    )


def test_a_tail_check_from_before_the_seam_starts_at_the_seam(sealed):
    _prune(sealed, 12)

    report = _tail(sealed, 6)

    assert report.ok, format_report(report)
    assert (report.seam, report.records) == (12, COUNT - 12)


@pytest.mark.parametrize("tail", [None, 18], ids=["full", "tail"])
def test_a_seam_moved_over_kept_records_is_edited(sealed, tail):
    _tamper(sealed, lambda raw: raw.put(b"meta", b"seam", seq_key(12)))

    report = _verify(sealed) if tail is None else _tail(sealed, tail)
    problem = _problem(report)

    assert (problem.subject, problem.seq, problem.kind) == (
        "seam",
        12,
        ProblemKind.EDITED,
    )
    assert problem.message == (
        "meta seam says records 1..12 were pruned, but record 1 is stored: the "
        "seam was moved to skip records"
    )


def test_a_garbage_seam_is_named_as_such(sealed):
    _tamper(sealed, lambda raw: raw.put(b"meta", b"seam", b"xx"))

    problem = _problem(_verify(sealed))

    assert (problem.subject, problem.kind) == ("seam", ProblemKind.EDITED)
    assert "the seam value is garbage" in problem.message


def test_a_garbage_checkpoint_is_named_at_its_own_size(sealed):
    _tamper(sealed, lambda raw: raw.put(b"checkpoints", seq_key(12), b"\xff junk"))

    problem = _problem(_verify(sealed))

    assert (problem.subject, problem.seq, problem.kind) == (
        "checkpoint",
        12,
        ProblemKind.EDITED,
    )
    assert problem.message.startswith("does not decode: ")


# ------------------------------------------------------------- policy sets


def _log_with_policies(tmp_path):
    log = write_sealed_log(tmp_path / "log", 4, witness_root=tmp_path / "w")
    marker, changes = activation()
    store = AuditStore.open(log.path)
    try:
        store.append_batch([start_marker()])
        store.append_batch([marker], changes)
        log.append([make_record(7)], store=store, seal=True)
        log.sign_head(store)
    finally:
        store.close()
    return log, marker


def test_stored_policy_sets_that_hash_to_their_revision_verify(tmp_path):
    log, _ = _log_with_policies(tmp_path)

    report = _verify(log)

    assert report.ok, format_report(report)


@pytest.mark.parametrize("part", ["policy", "directory"])
def test_a_flipped_byte_in_a_stored_policy_set_is_edited(tmp_path, part):
    log, marker = _log_with_policies(tmp_path)
    revision = getattr(marker, f"{part}_revision")
    key = f"{part}/{revision}".encode()

    def flip(raw):
        data = bytearray(raw.get(b"policy_sets", key))
        data[len(data) // 2] ^= 0x01
        raw.put(b"policy_sets", key, bytes(data))

    _tamper(log, flip)
    problem = _problem(_verify(log))
    # Only the full check reads policy sets.
    tail = _tail(log, log.checkpoints[-1])

    assert (problem.subject, problem.seq, problem.kind) == (
        "policy set",
        6,
        ProblemKind.EDITED,
    )
    assert problem.message.startswith(
        f"the stored {part} files of revision {revision} (cited first by record 6)"
    )
    assert tail.ok, format_report(tail)
