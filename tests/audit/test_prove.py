"""Proofs from a real LMDB log: audit.prove and `kynara-sidecar prove`.

Logs are built with AuditStore.append_batch and a seal that signs a real
checkpoint, so these tests need neither the writer nor a daemon.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import msgspec
import pytest

from kynara_sidecar.audit import merkle, prove
from kynara_sidecar.audit.checkpoint import (
    CheckpointKind,
    encode_checkpoint,
    sign_checkpoint,
    verify_checkpoint,
)
from kynara_sidecar.audit.keys import generate_key
from kynara_sidecar.decision import Timestamp
from kynara_sidecar.errors import (
    InvalidRequest,
    NotCheckpointed,
    NotFound,
    Pruned,
    ServiceError,
)

from ._support import RawLog, make_record, seq_key

KEY = generate_key()
TRUSTED = {KEY.key_id: KEY.public()}
ORIGIN = "daemon-a"
# Batches chosen so checkpoints fall at 1, 4, 8 and 11 (sizes with one,
# two and three set bits) and records 12..13 stay unsealed.
SEALED_BATCHES = (1, 3, 4, 3)
UNSEALED = 2
CHECKPOINTS = (1, 4, 8, 11)
CLI = [sys.executable, "-m", "kynara_sidecar.cli"]


def sealer(log_id: str):
    """The seal hook for the log ``log_id``."""

    def seal(tree_size: int, root: bytes, chain_hash: bytes):
        return sign_checkpoint(
            kind=CheckpointKind.CHECKPOINT,
            origin=ORIGIN,
            log_id=log_id,
            tree_size=tree_size,
            root=root,
            chain_hash=chain_hash,
            time=Timestamp(1_796_374_800 + tree_size, 0),
            key=KEY,
        )

    return seal


def fill(store, batches=SEALED_BATCHES, unsealed=UNSEALED):
    n = itertools.count(1)
    seal = sealer(store.log_id)
    for size in batches:
        store.append_batch([make_record(next(n)) for _ in range(size)], seal=seal)
    if unsealed:
        store.append_batch([make_record(next(n)) for _ in range(unsealed)])
    return store


@pytest.fixture
def log(open_store):
    return fill(open_store())


def check_inclusion(proof: prove.RecordProof) -> bool:
    cp = proof.checkpoint
    return merkle.verify_inclusion(
        merkle.leaf_hash(proof.record),
        proof.leaf_index,
        cp.tree_size,
        proof.inclusion_proof,
        bytes.fromhex(cp.root),
    )


# --- head --------------------------------------------------------------------


def test_head_names_the_latest_checkpoint_and_the_unsealed_tail(log):
    view = prove.prove_head(log)

    assert view.tree_size == sum(SEALED_BATCHES) + UNSEALED
    assert view.checkpoint.tree_size == CHECKPOINTS[-1]
    assert view.seam == 0
    assert view.log_id == log.log_id and len(view.log_id) == 32
    verify_checkpoint(view.checkpoint, TRUSTED)


def test_head_of_a_log_without_a_checkpoint_has_none(open_store):
    store = fill(open_store(), batches=(), unsealed=3)

    view = prove.prove_head(store)

    assert view.checkpoint is None
    assert view.tree_size == 3


# --- records -----------------------------------------------------------------


def test_every_record_proves_against_every_checkpoint_covering_it(log):
    proved = 0
    for tree_size in CHECKPOINTS:
        for seq in range(1, tree_size + 1):
            proof = prove.prove_record(log, seq=seq, tree_size=tree_size)

            assert proof.checkpoint.tree_size == tree_size
            assert proof.record == log.get(seq).record_bytes
            assert check_inclusion(proof)
            proved += 1
    assert proved == sum(CHECKPOINTS)


def test_record_defaults_to_the_latest_checkpoint(log):
    proof = prove.prove_record(log, seq=2)

    assert proof.checkpoint.tree_size == CHECKPOINTS[-1]
    assert proof.leaf_index == 1
    assert check_inclusion(proof)


def test_record_by_decision_id_is_the_record_by_seq(log):
    by_id = prove.prove_record(log, decision_id="dec-7")
    by_seq = prove.prove_record(log, seq=7)

    assert by_id == by_seq
    assert msgspec.json.decode(by_id.record)["decision_id"] == "dec-7"


def test_proof_for_a_changed_record_does_not_hold(log):
    proof = prove.prove_record(log, seq=5)
    changed = proof.record.replace(b"rule 5 allowed", b"rule 5 allowee")

    assert changed != proof.record
    assert not merkle.verify_inclusion(
        merkle.leaf_hash(changed),
        proof.leaf_index,
        proof.checkpoint.tree_size,
        proof.inclusion_proof,
        bytes.fromhex(proof.checkpoint.root),
    )


def test_a_record_changed_on_disk_is_refused_not_proved(tmp_path, open_store):
    store = fill(open_store())
    original = store.get(5).record_bytes
    store.close()
    raw = RawLog(tmp_path / "log")
    raw.put(b"records", seq_key(5), original.replace(b"rule 5", b"rule 6"))
    raw.close()
    store = open_store(readonly=True)

    with pytest.raises(ServiceError, match=r"record 5 does not prove .* verify"):
        prove.prove_record(store, seq=5)


@pytest.mark.parametrize(
    ("ask", "error", "message"),
    [
        ({"seq": 12}, NotCheckpointed, r"record 12 is after the latest checkpoint"),
        ({"seq": 99}, NotFound, r"no record 99: the log holds records 1\.\.13"),
        ({"seq": 0}, InvalidRequest, r"expected a record by seq .* got seq 0"),
        ({"decision_id": "dec-x"}, NotFound, r"no decision record has id 'dec-x'"),
        ({"seq": 5, "tree_size": 4}, InvalidRequest, r"at least the record's seq 5"),
        ({"seq": 2, "tree_size": 6}, NotFound, r"got 6; the next is at 8"),
        ({"seq": 2, "tree_size": 12}, NotCheckpointed, r"no checkpoint at tree size"),
    ],
    ids=[
        "unsealed",
        "beyond-head",
        "no-seq",
        "unknown-decision",
        "tree-below-record",
        "not-a-checkpoint",
        "past-latest-checkpoint",
    ],
)
def test_record_refusals_name_the_problem(log, ask, error, message):
    with pytest.raises(error, match=message):
        prove.prove_record(log, **ask)


def test_unsealed_record_without_any_checkpoint_says_none_yet(open_store):
    store = fill(open_store(), batches=(), unsealed=2)

    with pytest.raises(NotCheckpointed, match="none yet"):
        prove.prove_record(store, seq=1)


# --- consistency -------------------------------------------------------------


def test_every_pair_of_checkpoints_proves_consistent(log):
    pairs = list(itertools.combinations_with_replacement(CHECKPOINTS, 2))
    for old_size, new_size in pairs:
        proof = prove.prove_consistency(log, old_size, new_size)

        old, new = proof.old_checkpoint, proof.new_checkpoint
        assert (old.tree_size, new.tree_size) == (old_size, new_size)
        assert merkle.verify_consistency(
            old_size,
            new_size,
            bytes.fromhex(old.root),
            bytes.fromhex(new.root),
            proof.proof,
        )
    assert len(pairs) == 10


@pytest.mark.parametrize(
    ("old", "new", "error", "message"),
    [
        (8, 4, InvalidRequest, r"old_size <= new_size, got 8 > 4"),
        (0, 4, InvalidRequest, r"expected a checkpoint's tree size \(from 1\), got 0"),
        (3, 8, NotFound, r"expected the tree size of a checkpoint, got 3"),
        (4, 13, NotCheckpointed, r"no checkpoint at tree size 13 yet"),
    ],
    ids=["reversed", "zero", "not-a-checkpoint", "unsealed"],
)
def test_consistency_refusals_name_the_problem(log, old, new, error, message):
    with pytest.raises(error, match=message) as info:
        prove.prove_consistency(log, old, new)

    assert info.value.field in ("old_size", "new_size")


# --- segments ----------------------------------------------------------------


def test_segments_after_a_cursor_hold_each_record_once_in_order(log):
    for after in (0, *CHECKPOINTS):
        spans = prove.sealed_segments(log, after)

        seqs = []
        for span in spans:
            first = span.previous_tree_size + 1
            records = prove.read_records(log, first, span.checkpoint.tree_size, 1 << 20)
            seqs.extend(range(first, first + len(records)))
            assert records == [log.get(s).record_bytes for s in seqs[-len(records) :]]
        assert seqs == list(range(after + 1, CHECKPOINTS[-1] + 1))
        assert [s.checkpoint.tree_size for s in spans] == [
            c for c in CHECKPOINTS if c > after
        ]


def test_read_records_stops_at_the_byte_budget_but_always_moves(log):
    one = len(log.get(5).record_bytes)

    assert len(prove.read_records(log, 5, 8, 1)) == 1
    assert len(prove.read_records(log, 5, 8, 2 * one)) == 2
    assert len(prove.read_records(log, 5, 8, 1 << 20)) == 4


def test_segment_cursor_must_be_a_checkpoint(log):
    with pytest.raises(NotFound, match="got 5; the next is at 8"):
        prove.sealed_segments(log, 5)


# --- pruning -----------------------------------------------------------------


def test_pruned_records_answer_pruned_while_proofs_reach_across_the_seam(
    open_store,
):
    store = fill(open_store())
    store.prune(4)

    with pytest.raises(Pruned, match=r"record 2 was pruned: records 1\.\.4"):
        prove.prove_record(store, seq=2)
    with pytest.raises(Pruned, match=r"resume with after_tree_size 4 or later"):
        prove.sealed_segments(store, 1)
    with pytest.raises(NotFound, match=r"pruned with their ids"):
        prove.prove_record(store, decision_id="dec-3")
    assert check_inclusion(prove.prove_record(store, seq=5))
    assert prove.prove_consistency(store, 1, 11).proof
    assert [s.previous_tree_size for s in prove.sealed_segments(store, 4)] == [4, 8]
    assert prove.prove_head(store).seam == 4


# --- the CLI -----------------------------------------------------------------


def run_prove(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, "prove", *args], capture_output=True, text=True, timeout=60
    )


def test_cli_prove_record_beside_a_writer_prints_a_checkable_proof(tmp_path, log):
    # `log` is open for writing in this process, as a daemon holds it.
    done = run_prove("record", str(tmp_path / "log"), "--decision-id", "dec-6")

    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    cp = out["checkpoint"]
    assert out["seq"] == 6 and out["leaf_index"] == 5
    assert out["record"].encode() == log.get(6).record_bytes
    assert merkle.verify_inclusion(
        merkle.leaf_hash(out["record"].encode()),
        out["leaf_index"],
        cp["tree_size"],
        [bytes.fromhex(h) for h in out["inclusion_proof"]],
        bytes.fromhex(cp["root"]),
    )
    stored = encode_checkpoint(log.checkpoint(cp["tree_size"]))
    assert json.dumps(cp, sort_keys=True, separators=(",", ":")).encode() == stored


def test_cli_prove_gives_what_the_service_code_gives(tmp_path, log):
    path = str(tmp_path / "log")

    head = json.loads(run_prove("head", path).stdout)
    record = json.loads(
        run_prove("record", path, "--seq", "3", "--tree-size", "4").stdout
    )
    consistency = json.loads(run_prove("consistency", path, "4", "11").stdout)

    assert head == prove.head_json(prove.prove_head(log))
    assert record == prove.record_json(prove.prove_record(log, seq=3, tree_size=4))
    assert consistency == prove.consistency_json(prove.prove_consistency(log, 4, 11))
    assert merkle.verify_consistency(
        4,
        11,
        bytes.fromhex(consistency["old_checkpoint"]["root"]),
        bytes.fromhex(consistency["new_checkpoint"]["root"]),
        [bytes.fromhex(h) for h in consistency["consistency_proof"]],
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("record", "{log}", "--seq", "12"),
            "record 12 is after the latest checkpoint",
        ),
        (("consistency", "{log}", "4", "5"), "expected the tree size of a checkpoint"),
        (("head", "{missing}"), "no audit log at"),
    ],
    ids=["unsealed", "not-a-checkpoint", "no-log"],
)
def test_cli_prove_refusals_exit_1_and_say_why(tmp_path, log, args, message):
    paths = {"log": str(tmp_path / "log"), "missing": str(tmp_path / "none")}

    done = run_prove(*(a.format(**paths) for a in args))

    assert done.returncode == 1
    assert done.stdout == ""
    assert message in done.stderr and "kynara-sidecar prove:" in done.stderr
