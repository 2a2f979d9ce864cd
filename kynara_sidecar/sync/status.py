"""Status up: what each daemon runs and how far behind its shipping is.

Each daemon puts one JSON document, ``DaemonStatusV1``, in the central store
under its daemon id (``Store.put_status``): every ``sync.status_seconds``,
and soon after anything in it changes (a segment shipped, shipping failing
or recovering, a policy activated or a sync refused). The store keeps only
the latest, so the fleet view is "every daemon, as of its last word".

``kynara-sidecar fleet status --store URL`` reads them all
(``read_fleet``) and prints one row per daemon (``format_fleet``), named by
the ``daemon_id`` its document states. A document stored under another
daemon's key (a daemon misconfigured with another's id, or a forged one)
is flagged as a mismatch; the command exits 1 when a row is unreadable or
mismatched. A status
is **stale** when it is older than ``STALE_INTERVALS`` times the interval
its daemon said it publishes at: that daemon is stopped, cut off from the
store, or its clock is off; either way its row no longer says how it is.

The document is a versioned wire record: fields are only ever added, and
readers ignore fields they do not know. ``StatusPublisher`` is the IO shell
that assembles and puts it; the assembly itself reads the audit log through
LMDB read transactions, which never wait on the writer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import msgspec

from kynara_sidecar.audit.record import format_timestamp, parse_timestamp
from kynara_sidecar.audit.store import AuditStore
from kynara_sidecar.decision import Timestamp
from kynara_sidecar.policy.loader import LoadedPolicies
from kynara_sidecar.sync import Store, StoreUnavailable
from kynara_sidecar.sync._session import StoreSession, error_text
from kynara_sidecar.sync.follower import BundleFollower

__all__ = [
    "STALE_INTERVALS",
    "STATUS_VERSION",
    "AuditStatusV1",
    "CheckpointStatusV1",
    "DaemonStatusV1",
    "DirectoryStatusV1",
    "FleetRow",
    "LastSyncV1",
    "PolicyStatusV1",
    "ShippingStatusV1",
    "StatusPublisher",
    "audit_status",
    "daemon_status",
    "decode_status",
    "directory_status",
    "encode_status",
    "fleet_json",
    "fleet_rows",
    "format_fleet",
    "policy_status",
    "read_fleet",
]

STATUS_VERSION = 1
# Three intervals: one put may fail or be late without the daemon looking
# gone, as with Prometheus's staleness over missed scrapes.
STALE_INTERVALS = 3

log = logging.getLogger("kynara.sync")


class LastSyncV1(msgspec.Struct, kw_only=True):
    """The daemon's last attempt to bring its policy in line with the store."""

    # RFC 3339 UTC, when it ended.
    time: str
    # "activated", "unchanged", "refused" or "unreachable".
    outcome: str
    # Why it was refused or unreachable; "" otherwise.
    error: str = ""
    # The revision it was about (the bundle's), "" when none was read.
    revision: str = ""
    # Why it was refused, for alerts: a BundleProblem kind, "older",
    # "future", "too_large", ... (see sync.follower); "" otherwise.
    kind: str = ""


class PolicyStatusV1(msgspec.Struct, kw_only=True):
    """The active policy and where it came from."""

    # policy.source: a directory, a bundle file or a store URL.
    source: str = ""
    # The active policy set's revision, "" before one is active.
    revision: str = ""
    directory_revision: str = ""
    # The active bundle's digest, "" when policies come from a directory.
    bundle_digest: str = ""
    last_sync: LastSyncV1 | None = None


class DirectoryStatusV1(msgspec.Struct, kw_only=True):
    """The collector's signed directory the daemon follows
    (``directory.store``)."""

    # directory.store.
    source: str = ""
    # The active signed directory's revision, "" before one is active.
    revision: str = ""
    # When the collector created it, RFC 3339 UTC; "" before one is active.
    created: str = ""
    # The digest of its signed update, "" before one is active.
    digest: str = ""
    # The last directory sync (its revision is the directory's).
    last_sync: LastSyncV1 | None = None


class CheckpointStatusV1(msgspec.Struct, kw_only=True):
    tree_size: int
    # The Merkle root, lowercase hex.
    root: str
    # RFC 3339 UTC, when it was signed.
    time: str


class AuditStatusV1(msgspec.Struct, kw_only=True):
    # Records in the log.
    head: int = 0
    latest_checkpoint: CheckpointStatusV1 | None = None


class ShippingStatusV1(msgspec.Struct, kw_only=True):
    """How far the central store is behind this daemon's audit log."""

    # The store acknowledged every segment through this tree size.
    shipped_tree_size: int = 0
    # Sealed segments not yet acknowledged.
    backlog_segments: int = 0
    # Records not yet acknowledged, sealed or not.
    backlog_records: int = 0
    # Age of the oldest of them; 0 when there is none.
    oldest_unshipped_seconds: float = 0.0
    # Why the last attempt failed; "" once one succeeded.
    last_error: str = ""
    # backlog_records is past sync.backlog_max_records.
    over_ceiling: bool = False


class DaemonStatusV1(msgspec.Struct, kw_only=True):
    """One daemon's status document, as put in the central store."""

    v: int = STATUS_VERSION
    daemon_id: str
    # The audit log's id (32 hex digits).
    log_id: str = ""
    # RFC 3339 UTC, when the document was made.
    time: str
    # How often the daemon puts it (sync.status_seconds): readers call a
    # status stale past STALE_INTERVALS of these.
    status_seconds: float
    policy: PolicyStatusV1 = msgspec.field(default_factory=PolicyStatusV1)
    # None when the directory comes with the policies (no directory.store).
    directory: DirectoryStatusV1 | None = None
    audit: AuditStatusV1 = msgspec.field(default_factory=AuditStatusV1)
    # None when this daemon does not ship segments (sync.ship_segments off).
    shipping: ShippingStatusV1 | None = None


_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder(DaemonStatusV1)


def encode_status(status: DaemonStatusV1) -> bytes:
    """The document's JSON bytes."""
    return _ENCODER.encode(status)


def decode_status(data: bytes) -> DaemonStatusV1:
    """Read a status document.

    Raises:
        msgspec.DecodeError, msgspec.ValidationError: it is not one; the
            message names the field.
    """
    return _DECODER.decode(data)


def audit_status(store: AuditStore) -> AuditStatusV1:
    """The log's head and latest checkpoint, from one read snapshot."""
    with store.reading():
        head = store.head().seq
        latest = store.latest_checkpoint()
    checkpoint = None
    if latest is not None:
        checkpoint = CheckpointStatusV1(
            tree_size=latest.tree_size, root=latest.root, time=latest.time
        )
    return AuditStatusV1(head=head, latest_checkpoint=checkpoint)


def policy_status(
    source: str,
    policies: LoadedPolicies | None,
    follower: BundleFollower | None,
) -> PolicyStatusV1:
    """The policy part of the status: the active revisions, and with signed
    bundles the active bundle and the follower's last sync."""
    active = follower.active if follower is not None else None
    return PolicyStatusV1(
        source=source,
        revision=policies.policy_set.revision if policies else "",
        directory_revision=policies.directory.revision if policies else "",
        bundle_digest=active.digest if active is not None else "",
        last_sync=_last_sync(follower),
    )


def directory_status(
    source: str, follower: BundleFollower | None
) -> DirectoryStatusV1 | None:
    """The signed directory part of the status: the follower's active
    directory and last sync; None without ``directory.store``."""
    if follower is None:
        return None
    active = follower.active
    return DirectoryStatusV1(
        source=source,
        revision=active.revision if active is not None else "",
        created=active.created if active is not None else "",
        digest=active.digest if active is not None else "",
        last_sync=_last_sync(follower),
    )


def _last_sync(follower: BundleFollower | None) -> LastSyncV1 | None:
    last = follower.last_sync if follower is not None else None
    if last is None:
        return None
    return LastSyncV1(
        time=last.time,
        outcome=str(last.outcome),
        error=last.error,
        revision=last.revision,
        kind=last.kind,
    )


def daemon_status(
    *,
    daemon_id: str,
    now_nanos: int,
    status_seconds: float,
    policy: PolicyStatusV1,
    audit: AuditStore,
    shipping: ShippingStatusV1 | None,
    directory: DirectoryStatusV1 | None = None,
) -> DaemonStatusV1:
    """The whole document, as of ``now_nanos``."""
    return DaemonStatusV1(
        daemon_id=daemon_id,
        log_id=audit.log_id,
        time=format_timestamp(Timestamp.from_nanos(now_nanos)),
        status_seconds=status_seconds,
        policy=policy,
        directory=directory,
        audit=audit_status(audit),
        shipping=shipping,
    )


class StatusPublisher:
    """Puts the daemon's status every ``interval`` seconds and on change.

    Args:
        session: the central store.
        daemon_id: the key the status goes under (the log's origin).
        interval: seconds between puts (``sync.status_seconds``).
        build: makes the current document (on the event loop; quick).
    """

    def __init__(
        self,
        session: StoreSession,
        daemon_id: str,
        interval: float,
        build: Callable[[], DaemonStatusV1],
    ):
        self._session = session
        self._daemon_id = daemon_id
        self._interval = interval
        self._build = build
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failing = False
        self._stopping = False
        # Clear while a put is in flight.
        self._idle = asyncio.Event()
        self._idle.set()
        self.puts = 0

    def start(self) -> None:
        """Start putting, the first at once."""
        self._changed.set()
        self._task = asyncio.get_running_loop().create_task(self._run())

    def changed(self) -> None:
        """Put soon: something in the status changed. Call on the loop."""
        self._changed.set()

    async def publish(self) -> None:
        """Put the status now.

        Raises:
            StoreUnavailable: the store could not take it.
        """
        data = encode_status(self._build())
        self._idle.clear()
        try:
            await self._session.call(
                lambda: self._session.store.put_status(self._daemon_id, data),
                "put status",
            )
        finally:
            self._idle.set()
        self.puts += 1

    async def _run(self) -> None:
        while not self._stopping:
            try:
                async with asyncio.timeout(self._interval):
                    await self._changed.wait()
            except TimeoutError:
                pass
            self._changed.clear()
            try:
                await self.publish()
            except Exception as err:
                self._report(err)
                continue
            if self._failing:
                self._failing = False
                log.info(
                    "status published again",
                    extra={"fields": {"component": "sync", "backend": self._url}},
                )

    @property
    def _url(self) -> str:
        return self._session.url

    def _report(self, err: Exception) -> None:
        # A missed status is not a failure anyone acts on at once: the
        # store's own trouble shows in shipping; one line per outage.
        if self._failing:
            return
        self._failing = True
        log.warning(
            "status not published",
            extra={
                "fields": {
                    "component": "sync",
                    "backend": self._url,
                    "error": error_text(err),
                    "error_type": type(err).__name__,
                }
            },
        )

    async def stop(self, final_seconds: float = 0.0) -> None:
        """Stop; with ``final_seconds`` above 0, try one last put for at most
        that long, so the fleet sees the daemon's last head. Idempotent."""
        self._stopping = True
        task, self._task = self._task, None
        if task is None:
            return
        if final_seconds > 0:
            # A put cancelled here would still finish on the store's side
            # (a dir store writes on a thread of its own) and could land
            # after the last one, leaving an older head as the last word:
            # let it land first.
            try:
                async with asyncio.timeout(final_seconds / 2):
                    await self._idle.wait()
            except TimeoutError:
                pass
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        if final_seconds > 0:
            try:
                async with asyncio.timeout(final_seconds):
                    await self.publish()
            except TimeoutError:
                self._report(
                    StoreUnavailable(
                        f"{self._url}: put status: no answer within the "
                        f"{final_seconds:g}s a stop allows"
                    )
                )
            except Exception as err:
                self._report(err)


# ------------------------------------------------------------ fleet status


class FleetRow(msgspec.Struct, kw_only=True):
    """One daemon as ``fleet status`` shows it."""

    # The daemon id the document states; the store key's when unreadable.
    daemon_id: str
    # Seconds since its status was made; None when it did not decode.
    age_seconds: float | None
    stale: bool
    status: DaemonStatusV1 | None = None
    # Why the stored document could not be read, "" when it could.
    error: str = ""
    # The daemon id the store keeps the document under.
    stored_under: str = ""
    # The document names another daemon than the key it is stored under.
    mismatch: bool = False

    @property
    def ok(self) -> bool:
        """Readable and stored under its own daemon's key."""
        return self.status is not None and not self.mismatch


async def read_fleet(store: Store) -> dict[str, bytes]:
    """Every daemon's latest status bytes, by daemon id.

    Raises:
        StoreUnavailable: the store could not be read.
    """
    await store.connect()
    try:
        return await store.statuses()
    finally:
        await store.close()


def fleet_rows(documents: dict[str, bytes], now_nanos: int) -> list[FleetRow]:
    """Decode the stored documents and judge their age, sorted by daemon."""
    rows = []
    for daemon_id, data in sorted(documents.items()):
        try:
            status = decode_status(data)
            made = parse_timestamp(status.time)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as err:
            rows.append(
                FleetRow(
                    daemon_id=daemon_id,
                    age_seconds=None,
                    stale=True,
                    error=f"unreadable status: {err}",
                    stored_under=daemon_id,
                )
            )
            continue
        age = (now_nanos - made.seconds * 1_000_000_000 - made.nanos) / 1e9
        stale = age > STALE_INTERVALS * status.status_seconds
        rows.append(
            FleetRow(
                daemon_id=status.daemon_id,
                age_seconds=age,
                stale=stale,
                status=status,
                stored_under=daemon_id,
                mismatch=status.daemon_id != daemon_id,
            )
        )
    return sorted(rows, key=lambda row: (row.daemon_id, row.stored_under))


_COLUMNS = (
    "DAEMON",
    "REVISION",
    "LAST SYNC",
    "DIRECTORY",
    "HEAD",
    "CHECKPOINT",
    "BACKLOG",
    "AGE",
)
# A revision is "sha256:" and 64 hex digits; 12 of them tell revisions apart.
_SHORT_REVISION = len("sha256:") + 12


def _sync_cell(policy: PolicyStatusV1) -> str:
    last = policy.last_sync
    if last is None:
        return "-"
    return f"{last.outcome}: {last.error}" if last.error else last.outcome


def _directory_cell(directory: DirectoryStatusV1 | None) -> str:
    """The signed directory's revision and created, and its last sync when
    that one did not go well; "-" without directory.store."""
    if directory is None:
        return "-"
    cell = "none yet"
    if directory.revision:
        cell = f"{directory.revision[:_SHORT_REVISION]} ({directory.created})"
    last = directory.last_sync
    if last is not None and last.error:
        cell += f", {last.outcome}: {last.error}"
    return cell


def _backlog_cell(shipping: ShippingStatusV1 | None) -> str:
    if shipping is None:
        return "not shipping"
    cell = (
        f"{shipping.backlog_segments} seg / {shipping.backlog_records} rec, "
        f"oldest {shipping.oldest_unshipped_seconds:.0f}s"
    )
    if shipping.over_ceiling:
        cell += " OVER CEILING"
    if shipping.last_error:
        cell += f" (error: {shipping.last_error})"
    return cell


def _cells(row: FleetRow) -> tuple[str, ...]:
    status = row.status
    if status is None:
        return (row.daemon_id, "-", row.error, "-", "-", "-", "-", "-")
    checkpoint = status.audit.latest_checkpoint
    age = f"{row.age_seconds:.0f}s" + (" STALE" if row.stale else "")
    name = row.daemon_id
    if row.mismatch:
        name += f" (MISMATCH: stored under {row.stored_under!r})"
    return (
        name,
        status.policy.revision[:_SHORT_REVISION] or "-",
        _sync_cell(status.policy),
        _directory_cell(status.directory),
        str(status.audit.head),
        f"{checkpoint.tree_size} at {checkpoint.time}" if checkpoint else "-",
        _backlog_cell(status.shipping),
        age,
    )


def format_fleet(rows: list[FleetRow]) -> str:
    """The rows as an aligned text table with a header line."""
    table = [_COLUMNS, *(_cells(row) for row in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(_COLUMNS))]
    return "\n".join(
        "  ".join(
            cell.ljust(width) for cell, width in zip(line, widths, strict=True)
        ).rstrip()
        for line in table
    )


def fleet_json(rows: list[FleetRow]) -> bytes:
    """The rows as JSON (each daemon's document in full)."""
    return msgspec.json.encode(rows)
