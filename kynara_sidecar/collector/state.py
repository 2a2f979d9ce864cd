"""The collector's own state in LMDB: per daemon, the frontier, the accepted
history and the alerts.

Databases (keys start with the daemon's ``daemon_token``, which never holds
``/``, so one daemon's keys sort together)::

    daemons      token                                -> Frontier (JSON)
    checkpoints  token/log_id/<tree size, 8 bytes BE> -> checkpoint JSON
    nodes        token/log_id/<level, 1 byte><index, 8 bytes BE> -> hash
    alerts       token/<number, 8 bytes BE>           -> Alert (JSON)
                 token/total                          -> alerts raised (8 bytes BE)
    held         token                                -> HeldSegment (JSON)

Only registered daemons have keys here (the intake keeps nothing of
anyone else; of a member of a ``daemons`` family only once a checkpoint
signed by its entry's key arrived for it), and a registered daemon id is
at most 128 characters (``collector.config``, ``collector.registry``), so
every key stays far below LMDB's 511 bytes.
Alerts are bounded per daemon: the first ``MAX_ALERTS_KEPT`` are kept,
each with at most ``MAX_EVIDENCE_BYTES`` of evidence, and ``total`` counts
every one raised, so a store writer sending junk under a daemon's name
cannot grow the state without bound.

``held`` keeps the messages of a segment still arriving: a message is
acknowledged once it is held here, so the store's flow control (one
message in flight per consumer) never waits on a segment the collector
cannot finish, and a crash loses nothing acknowledged. The segment's last
message is acknowledged only after the segment is archived and committed;
the commit clears ``held``.

One write transaction commits everything a segment changes: the new
frontier, its checkpoint and the Merkle nodes its records completed (or
the refusal and its alert), so the state is always of a whole segment. The
collector commits only after the segment is archived, and acknowledges it
only after the commit: a crash in between re-delivers a segment the
verifier then accepts again (it still extends the old frontier), and the
archive's write of it is idempotent.

Readers (``kynara-collector query`` beside a running collector) open the
environment read-only; LMDB serves them a snapshot without blocking the
writer.

The state is not exclusive to one process: LMDB serialises write
transactions across processes through its lock file, and the collector
reads a daemon's frontier afresh for every message and every poll, keeping
none of it in memory. So ``kynara-collector daemons clear`` writes beside a
running collector (``clear_refusal``): it changes only a refused frontier
or one whose take-on waits, in one write transaction. The collector judges
a segment against the frontier it read, then commits in another
transaction; a clear may come in between (re-pointing a waiting take-on,
say), and writing the judged outcome's frontier then would undo it. So
``commit``, inside its write transaction, writes a frontier only while the
stored one is still the one the outcome was judged against
(``Outcome.judged``); otherwise it writes nothing and raises
``FrontierChanged``, a ``StateError``: the intake does not acknowledge the
message, which comes again and is judged against the new frontier (an
accepted segment's archive put is then repeated or left behind; the put
replaces the object whole). An alert that changes no frontier is committed
whatever the frontier is now. ``daemons clear --take-on-new-log`` is such
a clear too: it also ends the accepted log and names the log the daemon is
taken on from next (``verifier``, "Taking on a daemon's log"), and the
commit that takes it on logs it at info with the reason.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re

import lmdb
import msgspec

from kynara_sidecar.audit.checkpoint import LOG_ID_HEX_DIGITS
from kynara_sidecar.collector.verifier import (
    NOT_STICKY,
    Frontier,
    Outcome,
    TakeOn,
    Verdict,
)
from kynara_sidecar.errors import KynaraError
from kynara_sidecar.sync import daemon_id_from_token, daemon_token

__all__ = [
    "MAX_ALERTS_KEPT",
    "MAX_EVIDENCE_BYTES",
    "Alert",
    "ClearedRefusal",
    "CollectorState",
    "FrontierChanged",
    "HeldSegment",
    "NotRefused",
    "StateError",
]

_DBS = (b"daemons", b"checkpoints", b"nodes", b"alerts", b"held")
_MAX_DBS = 8
# Enough to investigate (the first refusal is the one that matters, and a
# sticky one raises no more); past it alerts are only counted.
MAX_ALERTS_KEPT = 100
# A checkpoint is some 400 bytes; anything longer is not one, and only its
# start is kept as evidence.
MAX_EVIDENCE_BYTES = 4096
MAX_ALERT_MESSAGE_CHARS = 1024
_NUMBER_BYTES = 8
_TOTAL = b"total"
_LOG_ID = re.compile(rf"[0-9a-f]{{{LOG_ID_HEX_DIGITS}}}")

log = logging.getLogger("kynara.collector")


class StateError(KynaraError):
    """The collector's state cannot be opened, read or written."""


class FrontierChanged(StateError):
    """``commit`` found the daemon's frontier changed since its outcome was
    judged (a ``daemons clear`` in between): nothing was written."""


class NotRefused(StateError):
    """``clear_refusal`` on a daemon in good standing: nothing to clear."""


class ClearedRefusal(msgspec.Struct, frozen=True, kw_only=True):
    """What ``clear_refusal`` cleared, for the operator and the log."""

    daemon_id: str
    # The alert kind that had stopped acceptance, and why.
    refused: str
    refused_reason: str
    # The frontier acceptance resumes from.
    log_id: str
    tree_size: int
    # Whether a partly received segment was dropped with the refusal.
    dropped_held: bool
    # The log the daemon is taken on from next (--take-on-new-log), and the
    # accepted log that ended with the clear; "" for a plain clear.
    take_on_log: str = ""
    ended_log: str = ""


class Alert(msgspec.Struct, frozen=True, kw_only=True):
    """One refusal, as kept for ``GET /daemons`` and investigation."""

    daemon_id: str
    kind: str
    message: str
    # When the collector refused, RFC 3339 UTC.
    time: str
    log_id: str = ""
    tree_size: int = 0
    # The refused checkpoint's JSON: signed evidence when it verified.
    checkpoint: str = ""


class HeldSegment(msgspec.Struct, kw_only=True):
    """The messages of one segment received so far."""

    checkpoint_json: bytes
    previous_tree_size: int
    first_seq: int
    tree_size: int
    records: list[bytes] = []
    # False while its checkpoint's key is not trusted yet (a rotation in a
    # later message may introduce it): any verified message replaces it.
    verified: bool = True


class _History:
    """``verifier.History`` over one daemon's keys."""

    def __init__(self, state: CollectorState, daemon_id: str):
        self._state = state
        self._token = daemon_token(daemon_id).encode()

    def checkpoint(self, log_id: str, tree_size: int) -> bytes | None:
        return self._state._get(b"checkpoints", _cp_key(self._token, log_id, tree_size))

    def node(self, log_id: str, level: int, index: int) -> bytes | None:
        return self._state._get(b"nodes", _node_key(self._token, log_id, level, index))


def _cp_key(token: bytes, log_id: str, tree_size: int) -> bytes:
    return token + b"/" + log_id.encode() + b"/" + tree_size.to_bytes(8, "big")


def _node_key(token: bytes, log_id: str, level: int, index: int) -> bytes:
    return (
        token
        + b"/"
        + log_id.encode()
        + b"/"
        + bytes((level,))
        + index.to_bytes(8, "big")
    )


class CollectorState:
    """The state environment at ``path`` (``state.path``)."""

    def __init__(self, env: lmdb.Environment, path: str, readonly: bool):
        self._env = env
        self._path = path
        self._readonly = readonly
        self._dbs = {name: env.open_db(name, create=not readonly) for name in _DBS}

    @classmethod
    def open(
        cls, path: str | os.PathLike[str], *, map_size: int, readonly: bool = False
    ) -> CollectorState:
        """Open (or create) the state.

        Raises:
            StateError: it cannot be opened (read-only and missing, say);
                names ``state.path``.
        """
        path = os.fspath(path)
        try:
            if not readonly:
                os.makedirs(path, mode=0o700, exist_ok=True)
            env = lmdb.open(
                path, map_size=map_size, max_dbs=_MAX_DBS, readonly=readonly
            )
            return cls(env, path, readonly)
        except (OSError, lmdb.Error) as err:
            raise StateError(
                f"collector state {path} cannot be opened ({err}); check state.path"
            ) from err

    @property
    def path(self) -> str:
        return self._path

    def close(self) -> None:
        self._env.close()

    def _get(self, db: bytes, key: bytes) -> bytes | None:
        try:
            with self._env.begin(db=self._dbs[db]) as txn:
                value = txn.get(key)
        except lmdb.Error as err:
            raise StateError(
                f"collector state {self._path} cannot be read ({err}); check state.path"
            ) from err
        return None if value is None else bytes(value)

    def history(self, daemon_id: str) -> _History:
        """The accepted history of one daemon, for the verifier."""
        return _History(self, daemon_id)

    def frontier(self, daemon_id: str) -> Frontier:
        """What was accepted last from the daemon (empty when nothing)."""
        raw = self._get(b"daemons", daemon_token(daemon_id).encode())
        if raw is None:
            return Frontier(daemon_id=daemon_id)
        return msgspec.json.decode(raw, type=Frontier)

    def frontiers(self) -> dict[str, Frontier]:
        """Every daemon's frontier, by daemon id."""
        with self._env.begin(db=self._dbs[b"daemons"]) as txn:
            found = [
                msgspec.json.decode(bytes(v), type=Frontier) for _, v in txn.cursor()
            ]
        return {f.daemon_id: f for f in found}

    def held(self, daemon_id: str) -> HeldSegment | None:
        """The daemon's segment still arriving, or None."""
        raw = self._get(b"held", daemon_token(daemon_id).encode())
        return None if raw is None else msgspec.json.decode(raw, type=HeldSegment)

    def hold(self, daemon_id: str, held: HeldSegment) -> None:
        """Keep a segment still arriving (replacing the one kept).

        Raises:
            StateError: LMDB failed.
        """
        try:
            with self._env.begin(write=True, db=self._dbs[b"held"]) as txn:
                txn.put(daemon_token(daemon_id).encode(), msgspec.json.encode(held))
        except lmdb.Error as err:
            raise StateError(
                f"collector state {self._path} cannot be written ({err}); check "
                "state.path and state.map_size"
            ) from err

    def clear_refusal(
        self, daemon_id: str, *, take_on_log: str = "", reason: str = ""
    ) -> ClearedRefusal:
        """Lift the daemon's sticky refusal, once an operator investigated it.

        In one write transaction: the frontier's ``refused`` and
        ``refused_reason`` are emptied (everything accepted before stays:
        the next segment must still extend it, and is judged afresh) and a
        segment kept in assembly is dropped, so nothing received before the
        clear is completed after it. The alerts stay, for the record.

        With ``take_on_log`` (``--take-on-new-log``), the accepted log also
        ends (it joins ``previous_logs`` and ``ended_by_take_on``, so its
        segments are refused from now on: alerted, never sticky) and the
        daemon is taken on from that log when a segment of
        it arrives from 0 beginning with a ``chain_break`` (naming any log):
        the way back for a daemon whose old log was taken on first (a
        replay) or whose new chain names a log the collector never saw.
        ``reason`` is kept with it and logged when the log is taken on. A
        take-on still waiting may be given another log (a mistyped id)
        without a refusal; it cannot be undone, since the old log ended.

        Raises:
            NotRefused: the daemon has no refusal and no take-on waiting (or
                no state at all); names it.
            StateError: ``take_on_log`` is no log id, or one the daemon
                already used; the state is read-only or LMDB failed.
                Nothing was written.
        """
        if not daemon_id:
            raise NotRefused(
                f"expected a daemon id, got an empty one; nothing cleared in the "
                f"collector state {self._path}"
            )
        if take_on_log and not _LOG_ID.fullmatch(take_on_log):
            raise StateError(
                f"--take-on-new-log {take_on_log!r}: expected a log id of "
                f"{LOG_ID_HEX_DIGITS} lowercase hex digits (the log_id of the "
                "daemon's refused checkpoint in its alerts, or the id "
                "`kynara-sidecar new-chain` printed); nothing cleared"
            )
        token = daemon_token(daemon_id).encode()
        try:
            with self._env.begin(write=True) as txn:
                raw = txn.get(token, db=self._dbs[b"daemons"])
                frontier = (
                    None
                    if raw is None
                    else msgspec.json.decode(bytes(raw), type=Frontier)
                )
                waiting = frontier is not None and bool(frontier.take_on_log)
                if frontier is None or not (
                    frontier.refused or (take_on_log and waiting)
                ):
                    raise NotRefused(
                        f"daemon {daemon_id!r} is not refused in the collector "
                        f"state {self._path}: nothing to clear"
                    )
                cleared = msgspec.structs.replace(
                    frontier, refused="", refused_reason=""
                )
                if take_on_log:
                    cleared = _end_log(cleared, take_on_log, reason)
                txn.put(token, msgspec.json.encode(cleared), db=self._dbs[b"daemons"])
                dropped = txn.delete(token, db=self._dbs[b"held"])
        except lmdb.Error as err:
            raise StateError(
                f"collector state {self._path} cannot be written ({err}); check "
                "state.path"
            ) from err
        return ClearedRefusal(
            daemon_id=daemon_id,
            refused=frontier.refused,
            refused_reason=frontier.refused_reason,
            log_id=frontier.log_id,
            tree_size=frontier.tree_size,
            dropped_held=bool(dropped),
            take_on_log=take_on_log,
            ended_log=frontier.log_id if take_on_log else "",
        )

    def alerted_daemons(self) -> list[str]:
        """Daemon ids with alerts (registered or not)."""
        found: set[str] = set()
        with self._env.begin(db=self._dbs[b"alerts"]) as txn:
            for key in txn.cursor().iternext(values=False):
                token = bytes(key).split(b"/", 1)[0]
                # A state from before ids were screened may hold any token.
                with contextlib.suppress(ValueError):
                    found.add(daemon_id_from_token(token.decode()))
        return sorted(found)

    def alerts(self, daemon_id: str) -> list[Alert]:
        """The daemon's alerts, oldest first."""
        prefix = daemon_token(daemon_id).encode() + b"/"
        out = []
        with self._env.begin(db=self._dbs[b"alerts"]) as txn:
            cursor = txn.cursor()
            if cursor.set_range(prefix):
                for key, value in cursor:
                    if not bytes(key).startswith(prefix):
                        break
                    if len(key) - len(prefix) == _NUMBER_BYTES:
                        out.append(msgspec.json.decode(bytes(value), type=Alert))
        return out

    def alert_total(self, daemon_id: str) -> int:
        """How many alerts the daemon raised, kept or not."""
        prefix = daemon_token(daemon_id).encode() + b"/"
        with self._env.begin(db=self._dbs[b"alerts"]) as txn:
            return self._alert_total(txn, prefix)

    def _alert_total(self, txn: lmdb.Transaction, prefix: bytes) -> int:
        alerts = self._dbs[b"alerts"]
        raw = txn.get(prefix + _TOTAL, db=alerts)
        if raw is not None:
            return int.from_bytes(bytes(raw), "big")
        # A state written before totals were kept: count what is there.
        cursor = txn.cursor(db=alerts)
        count = 0
        if cursor.set_range(prefix):
            for key in cursor.iternext(values=False):
                if not bytes(key).startswith(prefix):
                    break
                count += len(key) - len(prefix) == _NUMBER_BYTES
        return count

    def commit(
        self,
        daemon_id: str,
        outcome: Outcome,
        *,
        time: str,
        evidence: bytes = b"",
        keep_held: bool = False,
    ) -> None:
        """Write what a segment changed, in one transaction.

        The daemon's held messages are dropped with it, unless
        ``keep_held`` (a message refused or recognised on its own, while
        another segment is being assembled). An accepted segment stores
        its frontier, checkpoint and nodes; a refusal stores the refused
        frontier (when it changed) and an alert (unless sticky) holding
        the start of ``evidence``, the refused checkpoint's JSON as
        received; a duplicate changes nothing.

        A frontier is written only while the stored one is still
        ``outcome.judged``, the one the outcome was judged against (checked
        in the same write transaction): a ``daemons clear`` since then
        changed what the verdict rests on, and writing it would undo the
        clear.

        Raises:
            FrontierChanged: the stored frontier is no longer the one the
                outcome was judged against; nothing was written (judge the
                segment again).
            StateError: LMDB failed; nothing was written.
        """
        if outcome.verdict == Verdict.DUPLICATE or (
            outcome.verdict == Verdict.REFUSED and outcome.sticky
        ):
            if not keep_held:
                self._drop_held(daemon_id)
            return
        token = daemon_token(daemon_id).encode()
        try:
            with self._env.begin(write=True) as txn:
                if _writes_frontier(outcome):
                    self._check_judged(txn, token, daemon_id, outcome)
                if not keep_held:
                    txn.delete(token, db=self._dbs[b"held"])
                if outcome.verdict == Verdict.ACCEPTED:
                    self._put_accepted(txn, token, outcome)
                else:
                    self._put_refused(txn, token, daemon_id, outcome, time, evidence)
        except lmdb.Error as err:
            raise StateError(
                f"collector state {self._path} cannot be written ({err}); check "
                "state.path and state.map_size"
            ) from err
        if outcome.taken_on is not None:
            _log_taken_on(daemon_id, outcome.taken_on, outcome.frontier.tree_size)

    def _check_judged(
        self, txn: lmdb.Transaction, token: bytes, daemon_id: str, outcome: Outcome
    ) -> None:
        """Raise ``FrontierChanged`` unless the stored frontier is the one
        ``outcome`` was judged against (None: not judged by the verifier,
        nothing to compare)."""
        if outcome.judged is None:
            return
        raw = txn.get(token, db=self._dbs[b"daemons"])
        stored = (
            Frontier(daemon_id=daemon_id)
            if raw is None
            else msgspec.json.decode(bytes(raw), type=Frontier)
        )
        if stored != outcome.judged:
            raise FrontierChanged(
                f"daemon {daemon_id!r}: its frontier in the collector state "
                f"{self._path} changed since the segment was judged (a "
                "`daemons clear` in between); nothing committed, the segment "
                "is judged again against the new frontier"
            )

    def _drop_held(self, daemon_id: str) -> None:
        try:
            with self._env.begin(write=True, db=self._dbs[b"held"]) as txn:
                txn.delete(daemon_token(daemon_id).encode())
        except lmdb.Error as err:
            raise StateError(
                f"collector state {self._path} cannot be written ({err})"
            ) from err

    def _put_accepted(self, txn: lmdb.Transaction, token: bytes, outcome: Outcome):
        frontier = outcome.frontier
        log_id = frontier.log_id
        txn.put(token, msgspec.json.encode(frontier), db=self._dbs[b"daemons"])
        txn.put(
            _cp_key(token, log_id, frontier.tree_size),
            frontier.checkpoint.encode(),
            db=self._dbs[b"checkpoints"],
        )
        nodes = self._dbs[b"nodes"]
        for level, index, value in outcome.nodes:
            txn.put(_node_key(token, log_id, level, index), value, db=nodes)

    def _put_refused(
        self,
        txn: lmdb.Transaction,
        token: bytes,
        daemon_id: str,
        outcome: Outcome,
        time: str,
        evidence: bytes,
    ) -> None:
        # Only a new sticky refusal changes the frontier (checked against
        # the stored one first: ``_check_judged``). Any other leaves the one
        # it was judged on, and writing that back could undo a
        # ``clear_refusal`` made since it was read.
        if _writes_frontier(outcome):
            txn.put(
                token, msgspec.json.encode(outcome.frontier), db=self._dbs[b"daemons"]
            )
        cp = outcome.checkpoint
        alert = Alert(
            daemon_id=daemon_id,
            kind=str(outcome.kind),
            message=outcome.message[:MAX_ALERT_MESSAGE_CHARS],
            time=time,
            log_id=cp.log_id if cp else "",
            tree_size=cp.tree_size if cp else 0,
            checkpoint=evidence[:MAX_EVIDENCE_BYTES].decode("utf-8", "replace"),
        )
        alerts = self._dbs[b"alerts"]
        prefix = token + b"/"
        number = self._alert_total(txn, prefix)
        txn.put(prefix + _TOTAL, (number + 1).to_bytes(8, "big"), db=alerts)
        if number < MAX_ALERTS_KEPT:
            txn.put(
                prefix + number.to_bytes(_NUMBER_BYTES, "big"),
                msgspec.json.encode(alert),
                db=alerts,
            )


def _writes_frontier(outcome: Outcome) -> bool:
    """Whether committing ``outcome`` writes the daemon's frontier: an
    accepted segment, or a new sticky refusal."""
    if outcome.verdict == Verdict.ACCEPTED:
        return True
    return (
        outcome.verdict == Verdict.REFUSED
        and not outcome.sticky
        and bool(outcome.frontier.refused)
        and outcome.kind not in NOT_STICKY
    )


def _end_log(frontier: Frontier, take_on_log: str, reason: str) -> Frontier:
    """The cleared frontier with its accepted log ended and ``take_on_log``
    next (``clear_refusal``)."""
    if take_on_log == frontier.log_id or take_on_log in frontier.previous_logs:
        raise StateError(
            f"--take-on-new-log {take_on_log}: daemon {frontier.daemon_id!r} "
            "already used that log (it is "
            + ("ended" if take_on_log in frontier.previous_logs else "its accepted log")
            + "); name the log it writes now; nothing cleared"
        )
    previous = list(frontier.previous_logs)
    by_take_on = list(frontier.ended_by_take_on)
    if frontier.log_id not in previous:
        previous.append(frontier.log_id)
        by_take_on.append(frontier.log_id)
    return msgspec.structs.replace(
        frontier,
        previous_logs=previous,
        ended_by_take_on=by_take_on,
        take_on_log=take_on_log,
        take_on_reason=reason,
    )


def _log_taken_on(daemon_id: str, taken_on: TakeOn, tree_size: int) -> None:
    log.info(
        "daemon taken on from the log an operator named",
        extra={
            "fields": {
                "component": "collector",
                "daemon_id": daemon_id,
                "log_id": taken_on.log_id,
                "chain_break_names": taken_on.names,
                "previous_logs": list(taken_on.previous_logs),
                "tree_size": tree_size,
                "reason": taken_on.reason,
            }
        },
    )
