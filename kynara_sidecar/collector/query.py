"""Records by daemon and sequence range, read back from the archive and
verified against the archived checkpoints.

The archive is not trusted on its own word: each segment read is checked
as it is read. Its checkpoint must be signed by the daemon's registered
key (or one its verified rotations added, as the state recorded), name
this daemon and log and the tree size its key says; its records must be
numbered ``previous_tree_size+1..tree_size``, and chaining them from the
chain hash the previous segment's signed checkpoint states (the genesis
hash for the first) must give its checkpoint's chain hash. The chain hash
commits to every record before it, so the records returned are exactly
those the daemon signed. A segment that fails any check stops the query
with an error naming its key.

A daemon's signature alone is not enough: the collector may have refused
a signed segment (a fork), and whoever can write the archive could put it
in place of the accepted one. So each archived segment's checkpoint must
be, byte for byte, the one the state accepted at its tree size
(``accepted``); an archived segment at a size the state never accepted
(archived just before a crash, before its commit, or put there by someone
else) is not part of the history and is passed over.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from google.protobuf.message import DecodeError
from kynara.v1 import audit_pb2 as pb

from kynara_sidecar.audit.chain import GENESIS_HASH, chain_hash
from kynara_sidecar.audit.checkpoint import (
    CheckpointError,
    CheckpointV1,
    decode_checkpoint,
    verify_checkpoint,
)
from kynara_sidecar.audit.keys import PublicKey
from kynara_sidecar.collector.archive import Archive, log_prefix, tree_size_of
from kynara_sidecar.errors import KynaraError

__all__ = ["MAX_QUERY_RECORDS", "ArchiveUnverified", "QueryError", "query_records"]

# One answer holds at most this many records (some 50 MB of JSON): ask for
# the next range after it.
MAX_QUERY_RECORDS = 100_000


class QueryError(KynaraError):
    """The query is malformed (a bad range, an unknown daemon)."""


class ArchiveUnverified(QueryError):
    """An archived segment does not verify; the message names its key."""


def query_records(
    archive: Archive,
    daemon_id: str,
    log_id: str,
    first: int,
    last: int,
    trusted: Mapping[str, PublicKey],
    accepted: Callable[[int], bytes | None],
) -> Iterator[tuple[int, bytes]]:
    """Yield ``(seq, record bytes)`` for records ``first..last`` of a log,
    as far as the archive holds them, each verified.

    ``accepted(tree_size)`` is the checkpoint JSON the collector accepted
    at that tree size of this log, or None.

    Raises:
        QueryError: a bad range.
        ArchiveUnverified: a segment does not verify (named).
        ArchiveError: the archive cannot be read.
    """
    if not 1 <= first <= last:
        raise QueryError(f"expected 1 <= from <= to, got from {first}, to {last}")
    if last - first + 1 > MAX_QUERY_RECORDS:
        raise QueryError(
            f"expected at most {MAX_QUERY_RECORDS} records a query, got "
            f"{last - first + 1}"
        )
    keys = [
        (size, key, checkpoint)
        for key in archive.list(log_prefix(daemon_id, log_id))
        if (size := tree_size_of(key)) is not None
        and (checkpoint := accepted(size)) is not None
    ]
    start = next((i for i, (size, _, _) in enumerate(keys) if size >= first), None)
    if start is None:
        return
    previous = _previous(archive, keys, start, daemon_id, log_id, trusted)
    for size, key, checkpoint in keys[start:]:
        segment, cp = _load(archive, key, size, daemon_id, log_id, trusted)
        _check_accepted(key, segment, checkpoint)
        prev_size, prev_hash = previous
        for seq, record in _checked_records(key, segment, cp, prev_size, prev_hash):
            if first <= seq <= last:
                yield seq, record
        if size >= last:
            return
        previous = (size, bytes.fromhex(cp.chain_hash))


def _previous(
    archive: Archive,
    keys: list[tuple[int, str, bytes]],
    start: int,
    daemon_id: str,
    log_id: str,
    trusted: Mapping[str, PublicKey],
) -> tuple[int, bytes]:
    if start == 0:
        return 0, GENESIS_HASH
    size, key, checkpoint = keys[start - 1]
    segment, cp = _load(archive, key, size, daemon_id, log_id, trusted)
    _check_accepted(key, segment, checkpoint)
    return size, bytes.fromhex(cp.chain_hash)


def _check_accepted(key: str, segment: pb.Segment, checkpoint: bytes) -> None:
    if segment.checkpoint.json != checkpoint:
        raise ArchiveUnverified(
            f"archived segment {key} does not hold the checkpoint the collector "
            "accepted at its tree size"
        )


def _load(
    archive: Archive,
    key: str,
    size: int,
    daemon_id: str,
    log_id: str,
    trusted: Mapping[str, PublicKey],
) -> tuple[pb.Segment, CheckpointV1]:
    data = archive.get(key)
    if data is None:
        raise ArchiveUnverified(f"archived segment {key} vanished while reading")
    try:
        segment = pb.Segment.FromString(data)
        cp = decode_checkpoint(segment.checkpoint.json)
        verify_checkpoint(cp, trusted)
    except (DecodeError, CheckpointError) as err:
        raise ArchiveUnverified(
            f"archived segment {key} does not verify: {err}"
        ) from None
    if (cp.origin, cp.log_id, cp.tree_size) != (daemon_id, log_id, size):
        raise ArchiveUnverified(
            f"archived segment {key} holds the checkpoint of {cp.origin} log "
            f"{cp.log_id} at tree size {cp.tree_size}"
        )
    return segment, cp


def _checked_records(
    key: str, segment: pb.Segment, cp: CheckpointV1, prev_size: int, prev_hash: bytes
) -> Iterator[tuple[int, bytes]]:
    count = len(segment.records)
    if (segment.previous_tree_size, segment.first_seq, prev_size + count) != (
        prev_size,
        prev_size + 1,
        cp.tree_size,
    ):
        raise ArchiveUnverified(
            f"archived segment {key} does not follow the one at tree size "
            f"{prev_size}: it holds {count} records from {segment.first_seq} "
            f"after tree size {segment.previous_tree_size}"
        )
    last_hash = prev_hash
    for record in segment.records:
        last_hash = chain_hash(last_hash, record)
    if last_hash.hex() != cp.chain_hash:
        raise ArchiveUnverified(
            f"archived segment {key} does not verify: its records do not chain "
            "to its checkpoint's chain hash"
        )
    yield from enumerate(segment.records, start=prev_size + 1)
