"""Lineage: which log of an origin is the current one.

The witness keeps every log an origin (a daemon id) ever signed, each under
its log id. Only one is current; every other was ended by a break, and the
log that followed it begins with a ``chain_break`` record naming it
(``newchain``). A current log that does not name the newest of the others
continues nothing: the log it should continue was deleted or replaced, and
whatever the current one holds, it must not be trusted or appended to.
This check needs the witness: a log alone cannot show what replaced it.
"""

from __future__ import annotations

from collections.abc import Mapping

import msgspec

from kynara_sidecar.audit.chain import decode_record
from kynara_sidecar.audit.keys import PublicKey
from kynara_sidecar.audit.record import RecordKind
from kynara_sidecar.audit.store import AuditStore
from kynara_sidecar.audit.witness import Witness, witnessed_logs

__all__ = ["lineage_problem"]


def lineage_problem(
    store: AuditStore,
    witness: Witness,
    trusted: Mapping[str, PublicKey] | None = None,
) -> str | None:
    """Why this log is not the successor the witness expects, or ``None``.

    When the witness holds other logs of this origin, this log must begin
    with a ``chain_break`` naming the newest of them: otherwise the log it
    continues was deleted or replaced, whatever this one holds. A pruned
    log's first record is gone; its seam is checked by verification.

    With ``trusted``, only logs signed by those keys count (see
    ``witnessed_logs``).

    Raises:
        WitnessError: the witness cannot be read.
    """
    logs = witnessed_logs(witness.root, witness.origin, trusted)
    logs.pop(store.log_id, None)
    if not logs:
        return None
    newest, latest = max(logs.items(), key=lambda item: item[1].time)
    if store.seam():
        return None
    first = store.get(1)
    if first is not None:
        try:
            record = decode_record(first.record_bytes)
        except (msgspec.DecodeError, msgspec.ValidationError):
            record = None  # not a record at all: certainly no chain_break
        entry = record.chain_break if record is not None else None
        if entry is not None and record.kind == RecordKind.CHAIN_BREAK:
            if entry.previous_log_id == newest:
                return None
    return (
        f"the witness {witness.root} holds this daemon's log {newest} (up to "
        f"tree size {latest.tree_size}), but the log at {store.path} does not "
        "begin with a chain_break naming it: that log was deleted or replaced"
    )
