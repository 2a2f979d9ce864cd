"""Helpers for the evidence tests: sealed logs with a witness, and raw
access to every database of a log, to tamper with it as an attacker would
(an attacker on the daemon's host, holding its signing key)."""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

import msgspec

from kynara_sidecar.audit import merkle
from kynara_sidecar.audit.chain import GENESIS_HASH, chain_hash
from kynara_sidecar.audit.checkpoint import (
    CheckpointKind,
    CheckpointV1,
    decode_checkpoint,
    encode_checkpoint,
    sign_checkpoint,
)
from kynara_sidecar.audit.keys import SigningKey, generate_key
from kynara_sidecar.audit.record import AuditRecordV1, marker_record
from kynara_sidecar.audit.store import AuditStore, policy_set_changes
from kynara_sidecar.audit.witness import Witness
from kynara_sidecar.decision import Timestamp
from kynara_sidecar.policy.model import PolicyDocument

from ._support import RawLog, make_record, seq_key

__all__ = [
    "ORIGIN",
    "POLICY_ROOT",
    "RawEvidence",
    "SealedLog",
    "activation",
    "node_key",
    "sign",
    "start_marker",
    "write_sealed_log",
]

# The shipped example policies: real files the loader reads.
POLICY_ROOT = pathlib.Path(__file__).resolve().parents[2] / "config" / "policies"

ORIGIN = "daemon-a"
_T0 = 1_796_374_800 * 10**9  # 2026-12-04T09:00:00Z


def sign(
    key: SigningKey,
    tree_size: int,
    root: bytes,
    chain: bytes,
    kind: CheckpointKind = CheckpointKind.CHECKPOINT,
    origin: str = ORIGIN,
    *,
    log_id: str,
) -> CheckpointV1:
    return sign_checkpoint(
        kind=kind,
        origin=origin,
        log_id=log_id,
        tree_size=tree_size,
        root=root,
        chain_hash=chain,
        time=Timestamp.from_nanos(_T0 + tree_size),
        key=key,
    )


class SealedLog:
    """A log written with sealed segments, a signed head and a witness."""

    def __init__(self, path: pathlib.Path, key: SigningKey, witness_root):
        self.path = path
        self.key = key
        self.witness_root = witness_root
        self.log_id = ""
        self.checkpoints: list[int] = []

    @property
    def trusted(self):
        return {self.key.key_id: self.key.public()}

    def witness(self) -> Witness:
        return Witness(self.witness_root, ORIGIN, self.log_id)

    def append(
        self,
        records: Sequence[AuditRecordV1],
        *,
        store: AuditStore,
        seal: bool,
        key: SigningKey | None = None,
    ) -> None:
        """Append one batch, sealing it when asked; witness the checkpoint."""
        made: list[CheckpointV1] = []

        def sealer(size: int, root: bytes, chain: bytes) -> CheckpointV1:
            made.append(sign(key or self.key, size, root, chain, log_id=self.log_id))
            return made[-1]

        store.append_batch(records, seal=sealer if seal else None)
        for cp in made:
            self.checkpoints.append(cp.tree_size)
            if self.witness_root is not None:
                self.witness().write(cp)

    def sign_head(self, store: AuditStore, key: SigningKey | None = None) -> None:
        head = store.head()
        cp = sign(
            key or self.key,
            head.seq,
            store.merkle_root(head.seq),
            head.chain_hash,
            CheckpointKind.HEAD,
            log_id=self.log_id,
        )
        store.put_head_checkpoint(cp)
        if self.witness_root is not None:
            self.witness().write(cp)


def write_sealed_log(
    path: pathlib.Path,
    count: int,
    *,
    segment: int = 5,
    batch: int = 2,
    witness_root: pathlib.Path | None = None,
    key: SigningKey | None = None,
    head: bool = True,
    first: int = 1,
) -> SealedLog:
    """Write ``count`` records in batches, sealing a segment once ``segment``
    records are unsealed (at a batch boundary), then seal the rest and sign
    a head, as the writer does at a clean stop."""
    log = SealedLog(path, key or generate_key(), witness_root)
    store = AuditStore.open(path)
    try:
        log.log_id = store.log_id
        sealed = store.head().seq
        records = [make_record(n) for n in range(first, first + count)]
        for start in range(0, count, batch):
            part = records[start : start + batch]
            size = store.head().seq + len(part)
            log.append(part, store=store, seal=size - sealed >= segment)
            if size - sealed >= segment:
                sealed = size
        if store.head().seq > sealed:
            log.append([], store=store, seal=True)
        if head:
            log.sign_head(store)
    finally:
        store.close()
    return log


def start_marker(event: str = "start") -> AuditRecordV1:
    """The marker a daemon appends first when it starts (or ``event``)."""
    return marker_record(event, ORIGIN, "2026-12-04T11:00:00Z", "0.1.0")


def activation() -> tuple[AuditRecordV1, list]:
    """A ``policy_activated`` marker citing the example policies, and the
    state changes that store their files, as the daemon writes them."""
    from kynara_sidecar.policy.loader import compile_documents, read_documents

    documents = read_documents(POLICY_ROOT)
    loaded = compile_documents(documents, root=str(POLICY_ROOT))
    policy_files = {
        d.name: d.content for d in documents if isinstance(d.document, PolicyDocument)
    }
    directory_files = {
        d.name: d.content for d in documents if d.name not in policy_files
    }
    marker = msgspec.structs.replace(
        start_marker("policy_activated"),
        policy_revision=loaded.policy_set.revision,
        directory_revision=loaded.directory.revision,
    )
    changes = policy_set_changes(
        loaded.policy_set.revision,
        policy_files,
        loaded.directory.revision,
        directory_files,
    )
    return marker, changes


def node_key(level: int, index: int) -> bytes:
    return bytes((level,)) + index.to_bytes(8, "big")


class RawEvidence(RawLog):
    """Direct LMDB access to every database of a closed log, and a forger."""

    NAMES = (*RawLog.NAMES, b"policy_sets")

    def drop(self, db: bytes) -> None:
        """Delete a whole database, its name included."""
        with self.env.begin(write=True) as txn:
            txn.drop(self.dbs.pop(db), delete=True)

    @property
    def log_id(self) -> str:
        """The log id in meta, as the store reads it."""
        return (self.get(b"meta", b"log_id") or b"").decode("ascii")

    def keys(self, db: bytes) -> list[bytes]:
        with self.env.begin() as txn:
            return [bytes(key) for key, _ in txn.cursor(db=self.dbs[db])]

    def checkpoint(self, size: int) -> CheckpointV1:
        return decode_checkpoint(self.get(b"checkpoints", seq_key(size)))

    def put_checkpoint(self, cp: CheckpointV1) -> None:
        self.put(b"checkpoints", seq_key(cp.tree_size), encode_checkpoint(cp))

    def record_bytes(self) -> list[bytes]:
        with self.env.begin() as txn:
            return [bytes(v) for _, v in txn.cursor(db=self.dbs[b"records"])]

    def rehash(self, records: list[bytes], key: SigningKey) -> None:
        """Rewrite every record, chain hash, node, checkpoint and the heads
        over ``records`` (records 1..n), re-signed with ``key``."""
        log_id = self.log_id
        with self.env.begin(write=True) as txn:
            for name in (b"records", b"chain", b"nodes"):
                txn.drop(self.dbs[name], delete=False)
            prev, tree = GENESIS_HASH, merkle.CompactRange()
            roots, chains = {}, {}
            for seq, data in enumerate(records, start=1):
                prev = chain_hash(prev, data)
                txn.put(seq_key(seq), data, db=self.dbs[b"records"])
                txn.put(seq_key(seq), prev, db=self.dbs[b"chain"])
                _, edge = tree.state()
                node = merkle.leaf_hash(data)
                for level, index in merkle.node_positions(seq):
                    if level:
                        node = merkle.node_hash(edge[-level], node)
                    txn.put(node_key(level, index), node, db=self.dbs[b"nodes"])
                tree.append(merkle.leaf_hash(data))
                roots[seq], chains[seq] = tree.root(), prev
            for raw_key, raw in list(txn.cursor(db=self.dbs[b"checkpoints"])):
                size = int.from_bytes(raw_key, "big")
                old = decode_checkpoint(bytes(raw))
                new = sign(
                    key, size, roots[size], chains[size], old.kind, log_id=log_id
                )
                txn.put(raw_key, encode_checkpoint(new), db=self.dbs[b"checkpoints"])
            n = len(records)
            txn.put(b"head", seq_key(n) + prev, db=self.dbs[b"meta"])
            head = sign(key, n, roots[n], chains[n], CheckpointKind.HEAD, log_id=log_id)
            txn.put(b"head_checkpoint", encode_checkpoint(head), db=self.dbs[b"meta"])

    def close(self) -> None:
        self.env.close()
