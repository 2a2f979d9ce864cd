"""Start a new chain after a break, so the gap stays visible.

A log that fails verification is never appended to: new, valid records
would bury the break. An operator who has kept the evidence can instead
start a new log (``kynara-sidecar new-chain``). It:

1. takes the log's writer lock, so no daemon is appending;
2. verifies the whole log and refuses when it verifies (nothing to break).
   A log that is gone, empty or unreadable is described by the newest log
   the witness holds for this daemon (a deleted log is a break too); with
   no log and no witnessed one there is nothing to record;
3. moves the old environment (``data.mdb``, ``lock.mdb``) into
   ``<audit.path>/broken-<time>-<log id>/``, untouched, for investigation;
4. creates a new log (a new log id, so its witness files never mix with the
   old ones) whose first record is a ``chain_break`` naming the old log,
   its last record that verified and the problem, and seals it with a
   signed checkpoint that also goes to the witness.

Verifiers of the new log see the break at record 1; the old log and its
witness files stay where an auditor can compare them.
"""

from __future__ import annotations

import os
import pathlib
from typing import NamedTuple

import msgspec

from kynara_sidecar.audit.chain import ChainProblem
from kynara_sidecar.audit.checkpoint import CheckpointKind, CheckpointV1
from kynara_sidecar.audit.record import (
    RECORD_VERSION,
    AuditRecordV1,
    ChainBreakEntry,
    RecordKind,
    format_timestamp,
)
from kynara_sidecar.audit.startup import AuditKeys
from kynara_sidecar.audit.store import AuditStore, lock_directory
from kynara_sidecar.audit.verify import format_report, verify_store
from kynara_sidecar.audit.witness import Witness, witnessed_logs
from kynara_sidecar.audit.writer import make_seal
from kynara_sidecar.decision import Timestamp
from kynara_sidecar.errors import AuditUnavailable

__all__ = ["NewChain", "start_new_chain"]

_ENV_FILES = ("data.mdb", "lock.mdb")


class NewChain(NamedTuple):
    """What ``start_new_chain`` did."""

    old_log_id: str
    new_log_id: str
    # Where the old environment was moved; None when there was none.
    kept_at: pathlib.Path | None
    problem: str


def start_new_chain(
    path: str | os.PathLike[str],
    keys: AuditKeys,
    *,
    origin: str,
    witness_root: str = "",
    now_nanos: int,
    force: bool = False,
) -> NewChain:
    """Move a broken log aside and start a new one that names the break.

    Args:
        path: ``audit.path``.
        keys: the audit keys (the signing key seals the new log).
        origin: the daemon id.
        witness_root: ``audit.witness_path``, or "" for none.
        now_nanos: the time of the chain_break record.
        force: start a new chain even when the old log verifies.

    Raises:
        AuditUnavailable: a daemon holds the log, there is no log, it
            verifies (without ``force``), or a file cannot be moved.
    """
    path = os.fspath(path)
    if not (pathlib.Path(path) / "data.mdb").exists():
        # Nothing to move aside: only a log the witness remembers is a loss.
        _from_witness(keys, witness_root, origin, f"no audit log at {path}")
    lock_fd = lock_directory(path)
    try:
        break_entry, problem = _examine(path, keys, witness_root, origin, force)
        time = format_timestamp(Timestamp.from_nanos(now_nanos))
        kept_at = pathlib.Path(path) / (
            f"broken-{time.replace(':', '')}-{break_entry.previous_log_id[:8]}"
        )
        if not _move_environment(pathlib.Path(path), kept_at):
            kept_at = None
    finally:
        # AuditStore.open takes the lock again on its own descriptor.
        os.close(lock_fd)
    kept = str(kept_at) if kept_at else ""
    break_entry = msgspec.structs.replace(break_entry, kept_at=kept)
    new_log_id = _write_break(
        path, keys, origin, witness_root, now_nanos, time, problem, break_entry
    )
    return NewChain(break_entry.previous_log_id, new_log_id, kept_at, problem)


def _examine(
    path: str, keys: AuditKeys, witness_root: str, origin: str, force: bool
) -> tuple[ChainBreakEntry, str]:
    try:
        old = AuditStore.open(path, readonly=True)
    except AuditUnavailable as err:
        # Unreadable (truncated, emptied): its id is lost with it; the
        # witness says which log it was, if any.
        return _from_witness(keys, witness_root, origin, str(err), required=False)
    try:
        if old.head().seq == 0:
            why = f"audit log {path} is empty"
            return _from_witness(keys, witness_root, origin, why)
        if force:
            # No walk: a file damaged badly enough can crash LMDB itself.
            return _forced(old)
        return _describe(old, _verify(old, keys, witness_root, origin), force)
    finally:
        old.close()


def _forced(old: AuditStore) -> tuple[ChainBreakEntry, str]:
    head = old.head()
    entry = ChainBreakEntry(
        previous_log_id=old.log_id,
        last_good_seq=head.seq,
        last_good_chain_hash=head.chain_hash.hex(),
        problem="forced",
    )
    return entry, "an operator's --force (the old log was not verified)"


def _from_witness(
    keys: AuditKeys,
    witness_root: str,
    origin: str,
    why: str,
    *,
    required: bool = True,
) -> tuple[ChainBreakEntry, str]:
    """Describe a log that is gone by the newest log the witness holds
    signed by a trusted key."""
    logs = witnessed_logs(witness_root, origin, keys.trusted) if witness_root else {}
    if not logs:
        if required:
            raise AuditUnavailable(
                f"{why}, and the witness holds no log of {origin}: there is no "
                "break to record"
            )
        return ChainBreakEntry(previous_log_id="", problem="unreadable"), why
    log_id, latest = max(logs.items(), key=lambda item: item[1].time)
    entry = ChainBreakEntry(
        previous_log_id=log_id,
        last_good_seq=latest.tree_size,
        last_good_chain_hash=latest.chain_hash,
        problem="missing",
    )
    return entry, (
        f"{why}; the witness holds log {log_id} up to tree size {latest.tree_size}"
    )


def _verify(old: AuditStore, keys: AuditKeys, witness_root: str, origin: str):
    witness = Witness(witness_root, origin, old.log_id) if witness_root else None
    return verify_store(old, keys.trusted, witness)


def _describe(old: AuditStore, report, force: bool) -> tuple[ChainBreakEntry, str]:
    problem: ChainProblem | None = report.problem
    if problem is None and not force:
        raise AuditUnavailable(
            f"audit log {old.path} verifies ({format_report(report)}): there "
            "is no break to record; pass --force to start a new chain anyway"
        )
    last_good = old.head().seq
    if problem is not None:
        last_good = min(problem.seq - 1, last_good)
    stored = old.get(last_good) if last_good > 0 else None
    entry = ChainBreakEntry(
        previous_log_id=old.log_id,
        last_good_seq=last_good if stored is not None else 0,
        last_good_chain_hash=stored.chain_hash.hex() if stored is not None else "",
        problem=str(problem.kind) if problem is not None else "forced",
        problem_seq=problem.seq if problem is not None else 0,
    )
    return entry, format_report(report)


def _move_environment(path: pathlib.Path, kept_at: pathlib.Path) -> bool:
    present = [name for name in _ENV_FILES if (path / name).exists()]
    if not present:
        return False
    try:
        kept_at.mkdir(mode=0o700)
        for name in present:
            os.replace(path / name, kept_at / name)
    except OSError as err:
        raise AuditUnavailable(
            f"cannot move the broken log into {kept_at}: {err.strerror or err}"
        ) from err
    return True


def _write_break(
    path: str,
    keys: AuditKeys,
    origin: str,
    witness_root: str,
    now_nanos: int,
    time: str,
    problem: str,
    entry: ChainBreakEntry,
) -> str:
    record = AuditRecordV1(
        v=RECORD_VERSION,
        kind=RecordKind.CHAIN_BREAK,
        time=time,
        daemon_id=origin,
        error=problem,
        chain_break=entry,
    )
    store = AuditStore.open(path)
    try:
        made: list[CheckpointV1] = []
        seal = make_seal(
            kind=CheckpointKind.CHECKPOINT,
            origin=origin,
            log_id=store.log_id,
            key=keys.signing,
            clock=lambda: now_nanos,
            made=made,
        )
        store.append_batch([record], seal=seal)
        if witness_root:
            Witness(witness_root, origin, store.log_id).write(made[-1])
        return store.log_id
    finally:
        store.close()
