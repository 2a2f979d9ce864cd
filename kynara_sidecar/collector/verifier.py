"""Verification of one audit segment against what the collector accepted.

Theory of operation
-------------------
A daemon's log is a hash chain and one RFC 9162 Merkle tree over its
records, and each sealed segment ends in a checkpoint the daemon signed:
origin, log id, tree size ``m``, Merkle root, chain hash of record ``m``.
A segment carries records ``p+1..m`` (``p`` = ``previous_tree_size``).

For each daemon the collector keeps a **frontier**: the log id, tree size
``N``, chain hash, root and Merkle right edge (``merkle.CompactRange``) of
the last segment it accepted, plus every checkpoint it accepted and the
Merkle nodes of every accepted record (the **history**). Verifying a
segment is then, in order:

1. **Who.** The checkpoint decodes, its origin is the daemon the segment
   came for, and that daemon is registered (``unknown_daemon``).
2. **Signed.** Each record is the next one (its ``seq``); a
   ``key_rotation`` record extends the trusted keys only when signed by a
   key already trusted (``rotation.trusted_after``, as ``audit.verify``
   does); the checkpoint verifies under the registered keys and those
   rotations (``bad_signature``). Trust starts with the registered keys,
   never keys found in the log.
3. **Where it starts.** The same log: ``p == N`` extends the frontier;
   ``p > N`` skips records (``gap``); ``p < N`` goes back into accepted
   history, where ``p`` must be a checkpoint the collector accepted (a
   daemon's checkpoints are kept for ever, and acceptance is contiguous,
   so any checkpoint of the same log at or below ``N`` was accepted) or it
   is a ``fork``. Another log id is a new chain only when it starts at 0
   and its first record is a ``chain_break`` naming the accepted log;
   otherwise two daemons share one daemon id (``duplicate_daemon``), unless
   it is the log an operator named to take the daemon on from (below). A
   segment of a log in ``previous_logs`` (ended by a chain break or by an
   operator's take-on) is a ``duplicate_daemon`` that is alerted but does
   not stick: it cannot touch the current log's history. For a
   daemon of which nothing was accepted yet, any log that starts at 0 is
   taken on (one that starts later is a ``gap``); when its first record is
   a ``chain_break``, the log it names joins ``previous_logs`` as if
   accepted and ended, so a segment of that log sent later is a
   ``duplicate_daemon`` (not sticky).
4. **Linked.** The chain hash walked from the accepted chain hash at ``p``
   over the records equals the checkpoint's (``bad_chain``).
5. **Included and consistent.** The Merkle right edge at ``p`` (the
   frontier's, or rebuilt from history nodes) with the segment's leaves
   appended gives the checkpoint's root (``bad_root``). This one
   comparison proves two things at once: every record of the segment is
   included in the signed tree (the root is computed from exactly these
   leaves at exactly these positions, so each record's inclusion proof
   against that root holds), and the new tree only appended to the tree
   the collector accepted (its first ``p`` leaves are, hash for hash, the
   accepted tree's, since the right edge at ``p`` determines the root at
   ``p``): the consistency proof of RFC 9162 without anyone sending it.
   Where only checkpoints are at hand (a pull resuming at a daemon's
   head, ``verify_head``), the consistency proof the daemon's
   ``GetConsistencyProof`` returns is checked instead.
6. **Judged.** A segment that extends the frontier is ``accepted``. One at
   or below it must agree with history: a checkpoint identical to an
   accepted one is a ``duplicate`` (acknowledged, not archived again);
   records whose root differs from the accepted root at that size, a
   different checkpoint at a size already accepted, or a segment across
   ``N`` without a checkpoint at ``N`` are a ``fork``; a new checkpoint
   below ``N`` over the accepted records is a ``rollback`` (the log was
   wound back and sealed again).

A refusal of what the daemon signed is sticky: the frontier records its
kind, and every later segment of that daemon is refused with it, so a
forker cannot "heal" a fork by sending the accepted history afterwards.
Only an identical duplicate of an accepted checkpoint is still
acknowledged as one. (Which refusals are not sticky, and why: the NOTE
below.) Once an operator has investigated, ``kynara-collector daemons
clear`` lifts it (``CollectorState.clear_refusal``): the frontier keeps
everything accepted before, so the daemon's next segment is judged afresh
against it.

Taking on a daemon's log that names a log the collector never accepted
(``daemons clear --take-on-new-log LOG_ID``): trust on first use takes a
first-seen daemon on from whatever log from 0 verifies under its key, so
whoever holds an old signed segment of the daemon (a store writer) can
send it first and have that old log taken on. The daemon's current log
then begins with a ``chain_break`` naming a later log the collector never
saw, and is a ``duplicate_daemon``, sticky, however often it is cleared.
On first sight the collector cannot tell: the later log is not known yet
(a log id says nothing of order, and a checkpoint's time is the daemon's
clock), so no rule here refuses the old log; the operator, having
investigated, names the log to take the daemon on from. The clear ends
the accepted log (it joins ``previous_logs``) and records the log id and
reason in the frontier (``take_on_log``, ``take_on_reason``, and the
ended log in ``ended_by_take_on`` too, so an alert says how it ended);
from then on a segment of the ended log is a ``duplicate_daemon`` (step 3),
alerted each time and never sticky, so whoever replays old signed segments
cannot lock the daemon out again after its take-on, and a
segment of the named log is taken on as a new chain when it starts at 0
with a ``chain_break`` (the log it names joins ``previous_logs`` too). A
segment of the named log that starts later is a ``gap`` that does not
stick (nothing of that log was accepted, as for a first-seen daemon), so
segments that arrive out of order do not stop the take-on; a log is never
taken on from its middle. The accepted outcome carries ``taken_on``, which
the state logs at info with the reason and the log ids.

Taking on a daemon whose records were pruned before the collector first
saw it (it ran without a store, or the store lost its data): its first
segment starts after 0, and the collector never takes a log on from an
unwitnessed middle, so that segment is refused as a ``gap`` whose message
names the procedure. On the daemon, stopped, ``kynara-sidecar new-chain
--force`` moves the pruned log aside and starts a new one at 0 whose first
record is a ``chain_break`` naming it; the collector takes the daemon on
from that log (step 3), with no ``daemons clear`` (the gap did not stick:
the NOTE below), and refuses the pruned log's segments from then on. Until
then each segment of the pruned log is a ``gap`` of its own, alerted; the
alerts stay. The records pruned before the new chain are witnessed by
nobody, and the ``chain_break`` says so in the log itself.

No per-daemon opt-in guards this: a first-seen daemon's log id is taken on
its first use, as for every new daemon. The trust anchor is the daemon's
registered key; a log from 0 signed by it is what the collector takes on
for any daemon it has not seen, and the new chain is no more than that. A
registered starting checkpoint per daemon, the alternative, would make the
collector's witness start in the middle of a log nobody witnessed up to
there, and add a step at the collector to every such take-on.

NOTE: a refusal is sticky only when it rests on what the daemon signed
(``fork``, ``rollback``, ``gap``, ``duplicate_daemon``) and something of
the daemon was accepted before, save a ``gap`` of the log an operator named
to take the daemon on from and a ``duplicate_daemon`` of a log the daemon
ended (both above): ``duplicate_daemon`` sticks only where it means two
writers of the current log (another log that is no new chain after it).
Until something is accepted there is no accepted history for a later
segment to heal, and a refused first segment leaves the
frontier empty: the daemon is still taken on from a log that starts at 0
(its new chain, or the same log sent from its start). Whoever can write
to the central store can send anything under a daemon's name without its
key: junk, a checkpoint that does not verify, or a signed checkpoint with
records that are not the daemon's. Those are refused and alerted
(``bad_signature``, ``bad_chain``, ``bad_root``, ``malformed``,
``tampered_duplicate``, ``unknown_daemon``) but leave the frontier alone,
so they cannot make the collector refuse the daemon's own segments after
them.

Each message is screened (``screen_message``) before anything of it is
kept or looked up: its checkpoint decodes, its fields are in range, it
names the daemon, its signature verifies under the trusted keys (or its
key is not known yet: a rotation later in the segment may introduce it),
and its ``previous_tree_size``, ``first_seq`` and records fit inside the
checkpoint's tree size. A message of a segment already accepted (its
checkpoint is the accepted one at that tree size) is a duplicate when each
of its records' leaf hashes is the accepted one (``check_duplicate``), and
a ``tampered_duplicate`` otherwise.

This module is pure: values in, values out; the history is read through
the ``History`` lookups the caller provides.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import msgspec

from kynara_sidecar.audit import merkle
from kynara_sidecar.audit.chain import GENESIS_HASH, chain_hash
from kynara_sidecar.audit.checkpoint import (
    LOG_ID_HEX_DIGITS,
    CheckpointError,
    CheckpointProblem,
    CheckpointV1,
    decode_checkpoint,
    verify_checkpoint,
)
from kynara_sidecar.audit.keys import PublicKey, decode_base64url
from kynara_sidecar.audit.record import KeyRotationEntry, RecordKind
from kynara_sidecar.audit.rotation import trusted_after

__all__ = [
    "MAX_TREE_SIZE",
    "NOT_STICKY",
    "AlertKind",
    "Frontier",
    "HeadStep",
    "HeadVerdict",
    "History",
    "HistoryError",
    "Outcome",
    "Screened",
    "SegmentData",
    "TakeOn",
    "Verdict",
    "check_duplicate",
    "refusal",
    "screen_message",
    "still_refused",
    "trusted_keys",
    "verify_head",
    "verify_segment",
]


class Verdict(enum.StrEnum):
    """What became of a segment."""

    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    REFUSED = "refused"


class AlertKind(enum.StrEnum):
    """Why a segment (or a daemon's head) was refused."""

    # Another checkpoint or other records at a tree size already accepted.
    FORK = "fork"
    # A new checkpoint below the accepted tree size over the same records.
    ROLLBACK = "rollback"
    # The segment starts after the accepted tree size: records are missing.
    GAP = "gap"
    # The checkpoint (or a key rotation) is not signed by a trusted key.
    BAD_SIGNATURE = "bad_signature"
    # The records do not link: numbering, or chain hash vs the checkpoint's.
    BAD_CHAIN = "bad_chain"
    # The records do not give the checkpoint's Merkle root.
    BAD_ROOT = "bad_root"
    # The daemon is not registered, or the checkpoint names another one.
    UNKNOWN_DAEMON = "unknown_daemon"
    # A second log under one daemon id that is no new chain after a break.
    DUPLICATE_DAEMON = "duplicate_daemon"
    # Not a segment message: no protobuf, too large, or its sizes and
    # sequence numbers do not fit its checkpoint.
    MALFORMED = "malformed"
    # An accepted checkpoint sent again with records that are not the
    # accepted ones.
    TAMPERED_DUPLICATE = "tampered_duplicate"


# Refusals that rest on nothing the daemon signed: anyone who can write to
# the store can cause them, so they alert but never stop the daemon.
NOT_STICKY = frozenset(
    {
        AlertKind.UNKNOWN_DAEMON,
        AlertKind.BAD_SIGNATURE,
        AlertKind.BAD_CHAIN,
        AlertKind.BAD_ROOT,
        AlertKind.MALFORMED,
        AlertKind.TAMPERED_DUPLICATE,
    }
)
# The largest tree size a checkpoint may state: the state keys it in 8
# bytes, and no log reaches it.
MAX_TREE_SIZE = (1 << 63) - 1
# A log id as a checkpoint states it.
_LOG_ID = re.compile(rf"[0-9a-f]{{{LOG_ID_HEX_DIGITS}}}")


class SegmentData(NamedTuple):
    """A whole segment: records ``previous_tree_size+1..tree_size``."""

    # The checkpoint's stored JSON bytes (what is signed, never the parsed
    # convenience fields of the message).
    checkpoint_json: bytes
    previous_tree_size: int
    first_seq: int
    records: Sequence[bytes]


class Frontier(msgspec.Struct, frozen=True, kw_only=True):
    """What the collector accepted last from one daemon."""

    daemon_id: str
    # The log accepted last ("" before the first segment).
    log_id: str = ""
    tree_size: int = 0
    # Chain hash, Merkle root and right edge at tree_size, lowercase hex.
    chain_hash: str = GENESIS_HASH.hex()
    root: str = merkle.EMPTY_ROOT.hex()
    compact: list[str] = []
    # The accepted checkpoint at tree_size, its exact JSON text.
    checkpoint: str = ""
    # Keys trusted through verified key_rotation records: id -> raw key in
    # unpadded base64url.
    rotated_keys: dict[str, str] = {}
    # Logs this daemon ended, oldest first: by a chain break, or by an
    # operator's take-on (those also in ended_by_take_on).
    previous_logs: list[str] = []
    # Those of previous_logs that ``daemons clear --take-on-new-log`` ended.
    ended_by_take_on: list[str] = []
    # The alert kind that stopped acceptance; "" while in good standing.
    refused: str = ""
    refused_reason: str = ""
    # While an operator's ``daemons clear --take-on-new-log`` waits for the
    # daemon's next log: that log's id, and the reason given ("" otherwise).
    take_on_log: str = ""
    take_on_reason: str = ""


class History(Protocol):
    """Read access to the accepted history of one daemon."""

    def checkpoint(self, log_id: str, tree_size: int) -> bytes | None:
        """The accepted checkpoint JSON at that size, or None."""
        ...

    def node(self, log_id: str, level: int, index: int) -> bytes | None:
        """The Merkle node of accepted records, or None (RFC 9162 layout:
        ``merkle.NodeLookup``)."""
        ...


class HistoryError(Exception):
    """The collector's own history lacks a node it accepted: its state is
    damaged. Never the daemon's fault; nothing is refused."""


class TakeOn(NamedTuple):
    """A log taken on as an operator directed (``take_on_log``)."""

    log_id: str
    # The log its chain_break names ("" when it names none readable).
    names: str
    # The logs ended before it, oldest first (``previous_logs``).
    previous_logs: tuple[str, ...]
    reason: str


class Outcome(NamedTuple):
    """The verdict on one segment, and the state to commit for it."""

    verdict: Verdict
    # The frontier after this segment (unchanged for a duplicate).
    frontier: Frontier
    kind: AlertKind | None = None
    message: str = ""
    # The decoded checkpoint, when it decoded.
    checkpoint: CheckpointV1 | None = None
    # Merkle nodes the accepted records completed: (level, index, hash).
    nodes: tuple[tuple[int, int, bytes], ...] = ()
    # True when refused only because an earlier refusal stands.
    sticky: bool = False
    # Set when an accepted segment took the daemon on from the log an
    # operator named (``Frontier.take_on_log``).
    taken_on: TakeOn | None = None
    # The frontier the segment was judged against. The state writes
    # ``frontier`` only while this is still the stored one: a ``daemons
    # clear`` in between changed what the verdict rests on
    # (``CollectorState.commit``).
    judged: Frontier | None = None


def trusted_keys(
    registered: Mapping[str, PublicKey], frontier: Frontier
) -> dict[str, PublicKey]:
    """The registered keys and those the daemon's verified rotations added."""
    trusted = dict(registered)
    for key_id, raw in frontier.rotated_keys.items():
        trusted.setdefault(key_id, PublicKey.from_raw(decode_base64url(raw)))
    return trusted


class _Refusal(Exception):
    def __init__(self, kind: AlertKind, message: str, *, sticky: bool = True):
        super().__init__(message)
        self.kind = kind
        self.message = message
        # False for a refusal that must not stop the daemon even though
        # something of it was accepted (a take-on's log from its middle, a
        # segment of a log the daemon ended).
        self.sticky = sticky


def verify_segment(
    frontier: Frontier,
    segment: SegmentData,
    registered: Mapping[str, PublicKey] | None,
    history: History,
) -> Outcome:
    """Verify a whole segment of ``frontier.daemon_id`` (steps 1 to 6).

    Args:
        frontier: what was accepted last from this daemon.
        segment: the assembled segment.
        registered: the daemon's registered public keys by key id; ``None``
            when the daemon is not registered.
        history: the accepted checkpoints and Merkle nodes of this daemon.

    Returns:
        The outcome; for a refusal, the frontier carries the refusal.

    Raises:
        HistoryError: the history lacks a node of accepted records.
    """
    try:
        cp = _decode(frontier, segment, registered)
    except _Refusal as refusal:
        return _refuse(frontier, refusal, None)
    if history.checkpoint(cp.log_id, cp.tree_size) == bytes(segment.checkpoint_json):
        return check_duplicate(frontier, cp, segment, history)
    if frontier.refused:
        return _sticky(frontier, cp)
    assert registered is not None  # _decode refuses an unregistered daemon
    try:
        trusted = _walk_signatures(frontier, cp, segment, registered)
        return _verify_signed(frontier, cp, segment, registered, trusted, history)
    except _Refusal as refusal:
        return _refuse(frontier, refusal, cp)


def _decode(
    frontier: Frontier,
    segment: SegmentData,
    registered: Mapping[str, PublicKey] | None,
) -> CheckpointV1:
    daemon = frontier.daemon_id
    if registered is None:
        raise _Refusal(
            AlertKind.UNKNOWN_DAEMON,
            f"daemon {daemon!r} is not registered (collector daemons.{daemon})",
        )
    try:
        cp = decode_checkpoint(bytes(segment.checkpoint_json))
    except CheckpointError as err:
        raise _Refusal(
            AlertKind.BAD_SIGNATURE, f"checkpoint does not decode: {err}"
        ) from None
    _check_fields(cp)
    if cp.origin != daemon:
        raise _Refusal(
            AlertKind.UNKNOWN_DAEMON,
            f"checkpoint origin {cp.origin!r} arrived as daemon {daemon!r}'s",
        )
    return cp


def _check_fields(cp: CheckpointV1) -> None:
    # Before any lookup keyed by its log id and tree size.
    try:
        verify_checkpoint(cp, {})
    except CheckpointError as err:
        if err.kind != CheckpointProblem.UNKNOWN_KEY:
            raise _Refusal(AlertKind.BAD_SIGNATURE, f"checkpoint: {err}") from None
    if cp.tree_size > MAX_TREE_SIZE:
        raise _Refusal(
            AlertKind.MALFORMED,
            f"checkpoint tree size {cp.tree_size}: expected at most {MAX_TREE_SIZE}",
        )


def _walk_signatures(
    frontier: Frontier,
    cp: CheckpointV1,
    segment: SegmentData,
    registered: Mapping[str, PublicKey],
) -> dict[str, PublicKey]:
    """Numbering and key rotations, then the checkpoint's signature; returns
    the keys trusted after the segment."""
    p, m = segment.previous_tree_size, cp.tree_size
    count = len(segment.records)
    if segment.first_seq != p + 1 or p + count != m or count == 0:
        raise _Refusal(
            AlertKind.BAD_CHAIN,
            f"segment must carry records {p + 1}..{m} for the checkpoint at tree "
            f"size {m}, got {count} records from seq {segment.first_seq}",
        )
    trusted = trusted_keys(registered, frontier)
    for seq, data in enumerate(segment.records, start=p + 1):
        record = _parse(bytes(data))
        if record is None or record.get("seq") != seq:
            raise _Refusal(
                AlertKind.BAD_CHAIN,
                f"record {seq} is not a JSON record with seq {seq}",
            )
        if record.get("kind") == RecordKind.KEY_ROTATION:
            trusted = _rotate(trusted, record, seq, cp)
    try:
        verify_checkpoint(cp, trusted)
    except CheckpointError as err:
        raise _Refusal(
            AlertKind.BAD_SIGNATURE, f"checkpoint at tree size {m}: {err}"
        ) from None
    return trusted


def _rotate(
    trusted: dict[str, PublicKey], record: dict[str, Any], seq: int, cp: CheckpointV1
) -> dict[str, PublicKey]:
    try:
        entry = msgspec.convert(record.get("key_rotation"), KeyRotationEntry)
    except msgspec.ValidationError as err:
        raise _Refusal(
            AlertKind.BAD_SIGNATURE, f"record {seq}: malformed key_rotation: {err}"
        ) from None
    after, problem = trusted_after(
        entry, trusted, origin=str(record.get("daemon_id", "")), log_id=cp.log_id
    )
    if problem is not None:
        raise _Refusal(AlertKind.BAD_SIGNATURE, f"record {seq}: {problem}")
    return after


class _Start(NamedTuple):
    prev_hash: bytes
    tree: merkle.CompactRange
    # The accepted tree size when it lies inside the segment, else None.
    across: int | None
    new_chain: bool
    # The new chain is the log an operator named (``take_on_log``).
    taken_on: bool = False


def _verify_signed(
    frontier: Frontier,
    cp: CheckpointV1,
    segment: SegmentData,
    registered: Mapping[str, PublicKey],
    trusted: dict[str, PublicKey],
    history: History,
) -> Outcome:
    start = _start(frontier, cp, segment, history)
    tree, nodes, last_hash, root_across = start.tree, [], start.prev_hash, None
    for data in segment.records:
        data = bytes(data)
        last_hash = chain_hash(last_hash, data)
        size = tree.size + 1
        completed = tree.append(merkle.leaf_hash(data))
        nodes.extend(
            (level, index, node)
            for (level, index), node in zip(
                merkle.node_positions(size), completed, strict=True
            )
        )
        if size == start.across:
            root_across = tree.root()
    if last_hash.hex() != cp.chain_hash:
        raise _Refusal(
            AlertKind.BAD_CHAIN,
            f"records {segment.previous_tree_size + 1}..{cp.tree_size} chained "
            f"from the accepted chain hash give {last_hash.hex()}, but the "
            f"checkpoint says {cp.chain_hash}",
        )
    if tree.root().hex() != cp.root:
        raise _Refusal(
            AlertKind.BAD_ROOT,
            f"records 1..{cp.tree_size} give Merkle root {tree.root().hex()}, but "
            f"the checkpoint says {cp.root}",
        )
    if cp.log_id == frontier.log_id and segment.previous_tree_size < frontier.tree_size:
        _judge_history(frontier, cp, segment, history, root_across)
    return _accept(frontier, cp, segment, registered, trusted, tree, nodes, start)


def _start(
    frontier: Frontier, cp: CheckpointV1, segment: SegmentData, history: History
) -> _Start:
    p, n = segment.previous_tree_size, frontier.tree_size
    genesis = _Start(GENESIS_HASH, merkle.CompactRange(), None, False)
    if not frontier.log_id:
        if p != 0:
            raise _Refusal(
                AlertKind.GAP,
                f"first segment of log {cp.log_id} starts after tree size {p}; "
                "expected one from 0 (nothing of this daemon was accepted yet): "
                f"records 1..{p} never reached the collector. If the daemon "
                "pruned them (it ran without a store), stop it and run "
                "`kynara-sidecar new-chain --force` there: the collector takes "
                "the daemon on from the new log, which starts at 0 with a "
                f"chain_break naming log {cp.log_id}",
            )
        return genesis
    if cp.log_id in frontier.previous_logs:
        # Alerted, never sticky: an ended log cannot touch the current
        # log's history, and whoever holds its old signed segments (a store
        # writer) could otherwise stop the daemon at will.
        raise _Refusal(
            AlertKind.DUPLICATE_DAEMON, _ended_message(frontier, cp), sticky=False
        )
    if cp.log_id == frontier.take_on_log:
        if p != 0:
            raise _Refusal(
                AlertKind.GAP,
                f"segment of log {cp.log_id} starts after tree size {p}; the "
                "operator named that log to take the daemon on from, and it is "
                f"taken on only from 0: records 1..{p} never reached the collector",
                sticky=False,
            )
        if _broken_log(segment) is not None:
            return genesis._replace(new_chain=True, taken_on=True)
    if cp.log_id != frontier.log_id:
        _check_new_chain(frontier, cp, segment)
        return genesis._replace(new_chain=True)
    if p > n:
        raise _Refusal(
            AlertKind.GAP,
            f"segment starts after tree size {p}, but the collector accepted log "
            f"{cp.log_id} up to {n}: records {n + 1}..{p} never arrived",
        )
    if p == n:
        tree = merkle.CompactRange.from_state(n, map(bytes.fromhex, frontier.compact))
        return _Start(bytes.fromhex(frontier.chain_hash), tree, None, False)
    if p == 0:
        return genesis._replace(across=n)
    accepted = history.checkpoint(cp.log_id, p)
    if accepted is None:
        raise _Refusal(
            AlertKind.FORK,
            f"segment starts at a checkpoint at tree size {p} that the accepted "
            f"history (up to {n}) does not have",
        )
    previous = decode_checkpoint(accepted)
    return _Start(
        bytes.fromhex(previous.chain_hash), _range_at(history, cp.log_id, p), n, False
    )


def _ended_message(frontier: Frontier, cp: CheckpointV1) -> str:
    # A state from before ended_by_take_on was kept still tells the accepted
    # log ended by a waiting take-on: nothing else ends the current log.
    by_take_on = cp.log_id in frontier.ended_by_take_on or cp.log_id == frontier.log_id
    how = "an operator's take-on" if by_take_on else "a chain break"
    if frontier.take_on_log:
        now = (
            "while the daemon waits to be taken on from log "
            f"{frontier.take_on_log} ("
            f"{frontier.take_on_reason or 'daemons clear --take-on-new-log'})"
        )
    else:
        now = f"while log {frontier.log_id} is current"
    return (
        f"a segment of log {cp.log_id}, ended by {how}, {now}: a replay of an "
        "old log's segments, or two daemons write under one daemon id "
        "(alerted; the daemon's current log is still accepted)"
    )


def _check_new_chain(frontier: Frontier, cp: CheckpointV1, segment: SegmentData):
    old = frontier.log_id
    if segment.previous_tree_size != 0 or _broken_log(segment) != old:
        raise _Refusal(
            AlertKind.DUPLICATE_DAEMON,
            f"log {cp.log_id} (tree size {cp.tree_size}) while log {old} is "
            f"current, and it does not begin with a chain_break naming {old}: "
            "two daemons write under one daemon id",
        )


def _broken_log(segment: SegmentData) -> str | None:
    """The log the segment's first record names, when that record is a
    ``chain_break``; else None."""
    first = _parse(bytes(segment.records[0])) if segment.records else None
    if first is None or first.get("kind") != RecordKind.CHAIN_BREAK:
        return None
    entry = first.get("chain_break")
    named = entry.get("previous_log_id") if isinstance(entry, dict) else None
    return named if isinstance(named, str) else None


def _range_at(history: History, log_id: str, size: int) -> merkle.CompactRange:
    def node(level: int, index: int) -> bytes:
        value = history.node(log_id, level, index)
        if value is None:
            raise HistoryError(
                f"accepted history of log {log_id} lacks Merkle node (level "
                f"{level}, index {index}): the collector's state is damaged"
            )
        return value

    if size == 0:
        return merkle.CompactRange()
    return merkle.compact_range_from_nodes(node, size)


def _judge_history(
    frontier: Frontier,
    cp: CheckpointV1,
    segment: SegmentData,
    history: History,
    root_across: bytes | None,
) -> None:
    """A valid segment reaching back into accepted history: never accepted."""
    n, m = frontier.tree_size, cp.tree_size
    if m > n:
        assert root_across is not None
        diverge = root_across.hex() != frontier.root
        raise _Refusal(
            AlertKind.FORK,
            f"segment {segment.previous_tree_size + 1}..{m} spans the accepted "
            f"tree size {n}: "
            + (
                f"its records 1..{n} differ from the accepted ones"
                if diverge
                else f"the daemon's log has no checkpoint at {n}, which it signed"
            ),
        )
    accepted_root = _range_at(history, cp.log_id, m).root().hex()
    if accepted_root != cp.root:
        raise _Refusal(
            AlertKind.FORK,
            f"records 1..{m} give root {cp.root}, but the accepted history has "
            f"{accepted_root} at that tree size: the records diverge",
        )
    if m == n or history.checkpoint(cp.log_id, m) is not None:
        raise _Refusal(
            AlertKind.FORK,
            f"a different checkpoint at tree size {m}, already accepted (same "
            "records, another signed statement)",
        )
    raise _Refusal(
        AlertKind.ROLLBACK,
        f"a new checkpoint at tree size {m}, below the accepted {n}: the log was "
        "wound back and sealed again",
    )


def _accept(
    frontier: Frontier,
    cp: CheckpointV1,
    segment: SegmentData,
    registered: Mapping[str, PublicKey],
    trusted: dict[str, PublicKey],
    tree: merkle.CompactRange,
    nodes: list[tuple[int, int, bytes]],
    start: _Start,
) -> Outcome:
    previous = list(frontier.previous_logs)
    taken_on = None
    if start.new_chain and frontier.log_id not in previous:
        previous.append(frontier.log_id)
    if start.taken_on:
        # The log the chain break names was ended too, accepted or not.
        named = _broken_log(segment) or ""
        if named != cp.log_id and _LOG_ID.fullmatch(named) and named not in previous:
            previous.append(named)
        taken_on = TakeOn(cp.log_id, named, tuple(previous), frontier.take_on_reason)
    elif not frontier.log_id:
        # The first log taken on: a chain break in it names a log the
        # collector never accepted, ended all the same (a log id, or
        # nothing: "" when the daemon's log was unreadable).
        named = _broken_log(segment)
        if named and named != cp.log_id and _LOG_ID.fullmatch(named):
            previous.append(named)
    _, edge = tree.state()
    accepted = msgspec.structs.replace(
        frontier,
        log_id=cp.log_id,
        tree_size=cp.tree_size,
        chain_hash=cp.chain_hash,
        root=cp.root,
        compact=[h.hex() for h in edge],
        checkpoint=bytes(segment.checkpoint_json).decode(),
        rotated_keys={
            key_id: key.to_base64url()
            for key_id, key in trusted.items()
            if key_id not in registered
        },
        previous_logs=previous,
        take_on_log="" if taken_on else frontier.take_on_log,
        take_on_reason="" if taken_on else frontier.take_on_reason,
    )
    return Outcome(
        Verdict.ACCEPTED,
        accepted,
        checkpoint=cp,
        nodes=tuple(nodes),
        taken_on=taken_on,
        judged=frontier,
    )


def _refuse(frontier: Frontier, refusal: _Refusal, cp: CheckpointV1 | None) -> Outcome:
    refused = frontier
    # Sticky once something was accepted (the NOTE in the module docstring).
    if refusal.kind not in NOT_STICKY and refusal.sticky and frontier.log_id:
        refused = msgspec.structs.replace(
            frontier, refused=str(refusal.kind), refused_reason=refusal.message
        )
    return Outcome(
        Verdict.REFUSED,
        refused,
        refusal.kind,
        refusal.message,
        checkpoint=cp,
        judged=frontier,
    )


def refusal(
    frontier: Frontier,
    kind: AlertKind,
    message: str,
    checkpoint: CheckpointV1 | None = None,
) -> Outcome:
    """A refusal found outside the verifier (a message that is no segment),
    with the frontier it leaves (sticky unless ``kind`` is in
    ``NOT_STICKY``)."""
    if frontier.refused and kind not in NOT_STICKY:
        return _sticky(frontier, checkpoint)
    return _refuse(frontier, _Refusal(kind, message), checkpoint)


def still_refused(frontier: Frontier, checkpoint: CheckpointV1 | None) -> Outcome:
    """The sticky refusal of a signed message of a daemon already refused."""
    return _sticky(frontier, checkpoint)


class Screened(NamedTuple):
    """A message that passed ``screen_message``."""

    checkpoint: CheckpointV1
    # False when its key is not trusted yet: a key_rotation record later
    # in its segment may introduce it; the whole segment is verified then.
    verified: bool


def screen_message(
    frontier: Frontier,
    message: SegmentData,
    registered: Mapping[str, PublicKey],
    earlier: Sequence[bytes] = (),
) -> Screened | Outcome:
    """Check one message of a registered daemon before anything of it is
    kept or looked up.

    Args:
        frontier: what was accepted last from this daemon.
        message: the message's checkpoint, sizes and records (possibly
            part of a segment).
        registered: the daemon's registered keys.
        earlier: the records of its segment received before it, whose key
            rotations count.

    Returns:
        ``Screened``, or a refusal ``Outcome`` that leaves the frontier
        unchanged (``NOT_STICKY``).
    """
    try:
        cp = _screen(frontier, message, registered, earlier)
    except _Refusal as refusal:
        return _refuse(frontier, refusal, None)
    return cp


def _screen(
    frontier: Frontier,
    message: SegmentData,
    registered: Mapping[str, PublicKey],
    earlier: Sequence[bytes],
) -> Screened:
    try:
        cp = decode_checkpoint(bytes(message.checkpoint_json))
    except CheckpointError as err:
        raise _Refusal(
            AlertKind.BAD_SIGNATURE, f"checkpoint does not decode: {err}"
        ) from None
    trusted = trusted_keys(registered, frontier)
    for data in (*earlier, *message.records):
        if b"key_rotation" in data:
            trusted = _screen_rotation(trusted, bytes(data), cp)
    verified = True
    try:
        verify_checkpoint(cp, trusted)
    except CheckpointError as err:
        if err.kind != CheckpointProblem.UNKNOWN_KEY:
            raise _Refusal(AlertKind.BAD_SIGNATURE, f"checkpoint: {err}") from None
        verified = False
    if cp.origin != frontier.daemon_id:
        raise _Refusal(
            AlertKind.UNKNOWN_DAEMON,
            f"checkpoint origin {cp.origin!r} arrived as daemon "
            f"{frontier.daemon_id!r}'s",
        )
    _check_sizes(cp, message)
    return Screened(cp, verified)


def _screen_rotation(
    trusted: dict[str, PublicKey], data: bytes, cp: CheckpointV1
) -> dict[str, PublicKey]:
    # A rotation that does not apply is left to the whole segment's
    # verification, which refuses it with its reason.
    record = _parse(data)
    if record is None or record.get("kind") != RecordKind.KEY_ROTATION:
        return trusted
    try:
        entry = msgspec.convert(record.get("key_rotation"), KeyRotationEntry)
    except msgspec.ValidationError:
        return trusted
    after, _ = trusted_after(
        entry, trusted, origin=str(record.get("daemon_id", "")), log_id=cp.log_id
    )
    return after


def _check_sizes(cp: CheckpointV1, message: SegmentData) -> None:
    p, m, first = message.previous_tree_size, cp.tree_size, message.first_seq
    last = first + len(message.records) - 1
    if not (0 <= p < m <= MAX_TREE_SIZE and p < first <= last <= m):
        raise _Refusal(
            AlertKind.MALFORMED,
            f"a message of the segment {p + 1}..{m} (checkpoint tree size at "
            f"most {MAX_TREE_SIZE}) with {len(message.records)} records from seq "
            f"{first}: expected 1 or more records inside the segment",
        )


def check_duplicate(
    frontier: Frontier, cp: CheckpointV1, message: SegmentData, history: History
) -> Outcome:
    """Judge a screened message whose checkpoint the collector accepted:
    ``duplicate`` when each record's leaf hash is the accepted one at its
    seq, else ``tampered_duplicate`` (not sticky)."""
    last = message.first_seq + len(message.records) - 1
    for seq, data in enumerate(message.records, start=message.first_seq):
        accepted = None
        if 0 < seq and last <= cp.tree_size:
            accepted = history.node(cp.log_id, 0, seq - 1)
        if accepted != merkle.leaf_hash(bytes(data)):
            refusal = _Refusal(
                AlertKind.TAMPERED_DUPLICATE,
                f"the accepted checkpoint at tree size {cp.tree_size} came "
                f"again with record {seq} other than the accepted one",
            )
            return _refuse(frontier, refusal, cp)
    return Outcome(Verdict.DUPLICATE, frontier, checkpoint=cp, judged=frontier)


def _sticky(frontier: Frontier, cp: CheckpointV1 | None) -> Outcome:
    kind = AlertKind(frontier.refused)
    return Outcome(
        Verdict.REFUSED,
        frontier,
        kind,
        f"daemon refused since an earlier {kind}: {frontier.refused_reason}",
        checkpoint=cp,
        sticky=True,
        judged=frontier,
    )


def _parse(data: bytes) -> dict[str, Any] | None:
    # A generic parse, as audit.chain does: a later record version still
    # verifies byte for byte.
    try:
        obj = msgspec.json.decode(data)
    except msgspec.DecodeError:
        return None
    return obj if isinstance(obj, dict) else None


# ----------------------------------------------------------------- heads


class HeadStep(enum.StrEnum):
    """What a pull does after checking the daemon's head."""

    # Nothing past the accepted tree size.
    CURRENT = "current"
    # Stream the segments after ``after_tree_size``.
    PULL = "pull"
    REFUSED = "refused"


class HeadVerdict(NamedTuple):
    step: HeadStep
    after_tree_size: int = 0
    outcome: Outcome | None = None


def verify_head(
    frontier: Frontier,
    checkpoint_json: bytes,
    registered: Mapping[str, PublicKey] | None,
    history: History,
    proof: tuple[bytes, Sequence[bytes]] | None = None,
) -> HeadVerdict:
    """Check a daemon's latest checkpoint against accepted history, before
    pulling its segments.

    Args:
        frontier: what was accepted last from this daemon.
        checkpoint_json: the daemon's latest checkpoint (GetHead).
        registered: the daemon's registered keys; None when unregistered.
        history: the accepted history.
        proof: for a head past the accepted tree size of the same log, the
            daemon's ``GetConsistencyProof(accepted, head)``: the old
            checkpoint's JSON and the proof hashes.

    Returns:
        ``CURRENT``; ``PULL`` from ``after_tree_size`` (0 for another log,
        whose first segment is then judged as a new chain); or ``REFUSED``
        with the outcome to record: a head below the accepted tree size is a
        ``rollback`` when it agrees with history, else a ``fork``, and so is
        a head whose consistency proof fails.

    Raises:
        HistoryError: the history lacks a node of accepted records.
    """
    segment = SegmentData(checkpoint_json, 0, 1, ())
    try:
        cp = _decode(frontier, segment, registered)
    except _Refusal as refusal:
        return HeadVerdict(HeadStep.REFUSED, outcome=_refuse(frontier, refusal, None))
    if frontier.refused:
        return HeadVerdict(HeadStep.REFUSED, outcome=_sticky(frontier, cp))
    assert registered is not None
    n = frontier.tree_size
    if cp.log_id != frontier.log_id:
        return HeadVerdict(HeadStep.PULL, 0)
    try:
        verify_checkpoint(cp, trusted_keys(registered, frontier))
    except CheckpointError as err:
        if err.kind == CheckpointProblem.UNKNOWN_KEY:
            # A rotation in segments not pulled yet may introduce the key:
            # the segments themselves are verified in full.
            return HeadVerdict(HeadStep.PULL, n)
        refusal = _Refusal(AlertKind.BAD_SIGNATURE, f"daemon head: {err}")
        return HeadVerdict(HeadStep.REFUSED, outcome=_refuse(frontier, refusal, cp))
    try:
        return _judge_head(frontier, cp, bytes(checkpoint_json), history, proof)
    except _Refusal as refusal:
        return HeadVerdict(HeadStep.REFUSED, outcome=_refuse(frontier, refusal, cp))


def _judge_head(
    frontier: Frontier,
    cp: CheckpointV1,
    data: bytes,
    history: History,
    proof: tuple[bytes, Sequence[bytes]] | None,
) -> HeadVerdict:
    n, h = frontier.tree_size, cp.tree_size
    if h == n:
        if data == frontier.checkpoint.encode():
            return HeadVerdict(HeadStep.CURRENT, n)
        raise _Refusal(
            AlertKind.FORK,
            f"daemon head is a different checkpoint at the accepted tree size {n}",
        )
    if h > n:
        if n and proof is None:
            raise ValueError(f"a consistency proof {n} -> {h} is needed")
        if n:
            _check_proof(frontier, cp, proof)
        return HeadVerdict(HeadStep.PULL, n)
    accepted = history.checkpoint(cp.log_id, h)
    if accepted is not None and accepted != data:
        raise _Refusal(
            AlertKind.FORK,
            f"daemon head is a different checkpoint at tree size {h}, already accepted",
        )
    accepted_root = _range_at(history, cp.log_id, h).root().hex()
    if accepted_root != cp.root:
        raise _Refusal(
            AlertKind.FORK,
            f"daemon head at tree size {h} has root {cp.root}, but the accepted "
            f"history has {accepted_root} there: the records diverge",
        )
    raise _Refusal(
        AlertKind.ROLLBACK,
        f"daemon head is at tree size {h}, below the accepted {n}: its log lost "
        "records the collector holds",
    )


def _check_proof(
    frontier: Frontier,
    cp: CheckpointV1,
    proof: tuple[bytes, Sequence[bytes]] | None,
) -> None:
    assert proof is not None
    old_json, hashes = proof
    n = frontier.tree_size
    if bytes(old_json) != frontier.checkpoint.encode():
        raise _Refusal(
            AlertKind.FORK,
            f"the daemon's checkpoint at tree size {n} differs from the accepted one",
        )
    ok = merkle.verify_consistency(
        n, cp.tree_size, bytes.fromhex(frontier.root), bytes.fromhex(cp.root), hashes
    )
    if not ok:
        raise _Refusal(
            AlertKind.FORK,
            f"the consistency proof from tree size {n} to {cp.tree_size} fails: "
            "the daemon's tree does not extend the accepted one",
        )
