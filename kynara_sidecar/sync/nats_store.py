"""``nats://HOST:PORT``: a central store on NATS JetStream, for a fleet.

What lives where (``connect`` creates what is missing, but for the
directory and limits buckets, made on first use; creating is idempotent,
so daemons racing to create the same thing all succeed):

- key-value bucket ``kynara_bundles``, key ``current``: the current bundle's
  bytes. ``watch_bundles`` is a key-value watch, so a publish reaches every
  watcher as soon as the server forwards it, not at the next poll. A
  bundle must fit in one message: one larger than the server's
  ``max_payload`` (1 MiB by default) is refused with ``BundleTooLarge``.
- key-value bucket ``kynara_status``, key ``daemon_token(daemon_id)``: each
  daemon's status document.
- key-value bucket ``kynara_directory``: the collector's signed directory
  update (``sync.directory``), which can be tens of megabytes, so it goes
  in chunks of at most the server's ``max_payload`` (less a margin) under
  keys ``chunk.<slot>.<n>``, then key ``current`` names it: canonical JSON
  ``{"v": 1, "digest", "size", "slot", "chunks"}``. The two slots, ``a``
  and ``b``, alternate: a publish writes the slot ``current`` does not
  name, so a reader of the current update is disturbed only by a second
  publish while it reads, which it notices by the digest and reads
  ``current`` again. The bucket holds at most two updates (and the
  leftover chunks of a longer one). It is made by the first
  ``publish_directory`` (the collector's), not by ``connect``, so users
  that never read a directory (the bundle publisher, a daemon without
  ``directory.store``) need no permission for it; until then a daemon
  reads no directory, and its watch ends with ``StoreUnavailable`` and is
  started again by the caller. ``watch_directory`` is a watch of
  ``current``.
- key-value bucket ``kynara_approvals``, key ``<daemon_token>.<approval
  id>``: each approval's latest published state; ``watch_approvals`` is a
  watch over the bucket.
- key-value bucket ``kynara_reviews``, key ``<daemon_token>.<approval
  id>.<review id>``: signed reviews waiting for their daemon;
  ``watch_reviews`` watches ``<daemon_token>.>`` (a consumer filtered to
  it), so a review reaches its daemon as soon as the server forwards
  it. ``drop_review`` deletes the key (a delete marker, which readers
  skip).
- key-value bucket ``kynara_limits``, key ``daemon_token(daemon_id)``: each
  daemon's limit tallies document (``limits.fleet``), values at most
  ``MAX_LIMIT_TALLIES_BYTES`` (the bucket's ``max_value_size``, so the
  server refuses a larger one from any writer); ``watch_limit_tallies`` is
  a watch over the bucket, so a put reaches every other daemon as soon as
  the server forwards it. It is looked up (and made when missing) by the
  first ``put_limit_tallies``, ``limit_tallies`` or
  ``watch_limit_tallies``, not by ``connect``: a user that shares no
  fleet-scope limit (the bundle publisher, a daemon whose policies declare
  none, one of a deployment set up before fleet-scope limits) needs no
  permission for it. The collector's store (``declares_limits``) makes it
  at ``connect``, as it makes the others, since a daemon's user may look
  it up but not create it.
- stream ``KYNARA_SEGMENTS``, subjects ``kynara.segments.<daemon_token>``,
  file storage: segment messages, each published with the ``Nats-Msg-Id``
  header so the server drops a resend within its duplicate window (an
  hour) and says so in its acknowledgement.
- a durable pull consumer per consumer name (``segments``), explicit acks.

Failure model. The client connects without automatic reconnection: a lost
connection closes it, and the next call connects again, within the same
``timeout`` as the call itself. So while the server is down every call fails
with ``StoreUnavailable`` within ``timeout``, nothing loops in the
background hiding the outage, and calls work again once the server is
back. A watch or a consumer iterator notices a closed connection within
``_LIVENESS_SECONDS`` and raises ``StoreUnavailable``; the client's pings
notice a silent network cut (``_MAX_OUTSTANDING_PINGS`` pings unanswered).
A call in flight when the connection drops fails when its timeout runs out.

Delivery is at least once. A server that crashes (rather than stops) may
lose a consumer's last acknowledgements, which it writes lazily: those
messages come again once the ack wait has passed (``ACK_WAIT_SECONDS``,
or the collector's ``store.ack_wait_seconds``), and since one message at a
time is in flight, the consumer waits that long; so does a consumer whose
connection was cut while a message was on its way to it. The
collector recognises them by message id and checkpoint as already taken.
Shipped messages survive a crash of the server process (written to its
file store before the acknowledgement), and so does duplicate detection;
the server syncs to disk every ``sync_interval`` (its setting), so a crash
of the machine can lose the last acknowledged ones.

Permissions. A server with a user per daemon (``config/nats-server.conf``)
limits each daemon to its own names: ``daemon_permissions`` lists the
subjects one needs, derived from the calls below (JetStream's API is
request subjects ``$JS.API.<call>.<stream>``; a key-value put is a publish
to ``$KV.<bucket>.<key>``). Every key-value watch and read of several keys
creates its consumer with ``$JS.API.CONSUMER.CREATE.<stream>.<name>.<filter>``
(``_KeyWatch``), which the server refuses unless the consumer's filter is
the one the subject names: so a daemon may watch only its own reviews,
the current bundle and the current directory. What a daemon's user can
still learn of others: the keys of the status and approvals buckets
(daemon tokens and approval ids, never their values), through the
``STREAM.INFO`` lookups ``connect`` makes, whose request may ask for the
stream's subjects. A daemon reads and watches every daemon's limit
tallies (that is what they are for) but puts only its own key.
``publisher_permissions`` and ``collector_permissions`` list the other two
users'. A refused publish or
subscription gets no answer, only a notice on the connection: the call
fails with ``StoreUnavailable`` naming the refused subject as the client
reports it (lowercased) and, for a put or publish, the subject as sent
(``_bounded``); the notice is logged at ERROR. The streams and
buckets must exist before a daemon or the publisher so limited connects
(they may look them up, not create them): the collector, whose user may,
creates them when it starts.

Without such permissions, whoever can publish to the server can publish
under any subject: a message whose subject token is not a canonical
``daemon_token`` is logged
at ERROR (``kynara.sync``) and delivered with ``daemon_id`` ``""`` (never
a registered daemon), so the consumer refuses it and acknowledges past it
rather than stopping on it; a status key that is no token is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import secrets
import typing
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import nats
import nats.aio.client
import nats.aio.subscription
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from kynara_sidecar.errors import ConfigError
from kynara_sidecar.sync import (
    ACK_WAIT_SECONDS,
    MAX_APPROVAL_BYTES,
    MAX_DIRECTORY_BYTES,
    MAX_LIMIT_TALLIES_BYTES,
    MAX_REVIEW_BYTES,
    BundleEntry,
    BundleTooLarge,
    NatsConnection,
    PublishedApproval,
    PublishedReview,
    StoreUnavailable,
    canonical_daemon_id,
    check_consumer_name,
    check_store_key,
    daemon_token,
)
from kynara_sidecar.sync._session import error_text

__all__ = [
    "ACK_WAIT_SECONDS",
    "APPROVALS_BUCKET",
    "REVIEWS_BUCKET",
    "BUNDLES_BUCKET",
    "DIRECTORY_BUCKET",
    "CURRENT_KEY",
    "DUPLICATE_WINDOW_SECONDS",
    "LIMITS_BUCKET",
    "MAX_ACK_PENDING",
    "NAK_DELAY_SECONDS",
    "SEGMENT_SUBJECT_PREFIX",
    "SEGMENTS_STREAM",
    "STATUS_BUCKET",
    "NatsStore",
    "collector_permissions",
    "daemon_permissions",
    "publisher_permissions",
]

BUNDLES_BUCKET = "kynara_bundles"
DIRECTORY_BUCKET = "kynara_directory"
DIRECTORY_SLOTS = ("a", "b")
# Room left in a message for the key-value put's framing.
_CHUNK_MARGIN = 4096
# Reads of the current directory update before giving up when publishes
# keep replacing it.
_DIRECTORY_READS = 3
STATUS_BUCKET = "kynara_status"
APPROVALS_BUCKET = "kynara_approvals"
REVIEWS_BUCKET = "kynara_reviews"
LIMITS_BUCKET = "kynara_limits"
CURRENT_KEY = "current"
SEGMENTS_STREAM = "KYNARA_SEGMENTS"
SEGMENT_SUBJECT_PREFIX = "kynara.segments."
# A daemon retries an unacknowledged segment for as long as the centre is
# away; an hour covers the outages it rides out without a restart.
DUPLICATE_WINDOW_SECONDS = 3600.0
# NOTE: one message in flight per consumer keeps each daemon's messages in
# ship order even across nak'd and redelivered messages and consumer
# restarts; JetStream redelivers a pending message only after its ack wait,
# so with more in flight a newer message could overtake it.
# Should one consumer not keep up with a fleet, one consumer per daemon
# subject keeps that order and lets daemons proceed in parallel.
MAX_ACK_PENDING = 1
# A nak'd message comes again after this pause, not in a hot loop.
NAK_DELAY_SECONDS = 1.0
# How often a watch or a consumer checks that its connection is alive.
_LIVENESS_SECONDS = 0.25
_MAX_OUTSTANDING_PINGS = 2
# A watch's consumer sends a heartbeat when it has had nothing to send for
# this long; a watch that hears nothing for _WATCH_SILENT_SECONDS (two
# heartbeats missed) has lost its consumer and ends.
_WATCH_HEARTBEAT_SECONDS = 5.0
_WATCH_SILENT_SECONDS = 2 * _WATCH_HEARTBEAT_SECONDS + 1.0
# The server deletes a watch's consumer this long after its watch stopped
# (or its connection went away).
_WATCH_INACTIVE_SECONDS = 60.0
# Headers of the messages a watch's consumer sends.
_STATUS_HEADER = "Status"
_DESCRIPTION_HEADER = "Description"
_STATUS_CONTROL = "100"  # a heartbeat or a flow control request
_STALLED_HEADER = "Nats-Consumer-Stalled"
_LAST_CONSUMER_HEADER = "Nats-Last-Consumer"
_KV_OPERATION_HEADER = "KV-Operation"
# A marker the server places when it removes a key itself (a TTL).
_MARKER_REASON_HEADER = "Nats-Marker-Reason"
_MSG_ID_HEADER = "Nats-Msg-Id"
# How the server words a refused publish or subscription.
_PERMISSIONS_VIOLATION = "permissions violation"
_DIGEST_PREFIX = "sha256:"
# Attacker-chosen names are cut to this in log lines.
_MAX_LOGGED_NAME = 128

_T = TypeVar("_T")
_log = logging.getLogger("kynara.sync")

# What the client raises when the server is away, slow or refuses a call.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    nats.errors.Error,
    OSError,
    TimeoutError,
)


def _digest(data: bytes) -> str:
    return _DIGEST_PREFIX + hashlib.sha256(data).hexdigest()


def _raise_if_cancelled() -> None:
    # The client's own wait_for (Python 3.11, gh-86296) can swallow a
    # cancellation; the task still counts it, so a loop that never ends on
    # its own honours it here instead of running on after a stop.
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _malformed(what: str, name: str) -> None:
    _log.error(
        "malformed store entry",
        extra={"fields": {"entry": name[:_MAX_LOGGED_NAME], "error": what}},
    )


class NatsStore:
    """A central store on the NATS server ``url`` names; see the module doc.

    Args:
        url: ``nats://host:port``.
        timeout: seconds one call may take, connecting included, before it
            raises ``StoreUnavailable``.
        connection: TLS and credentials; None for plaintext without.
        timeout_key: the setting ``timeout`` came from, named when a call
            runs out of it (the collector's is ``store.timeout_seconds``).
        poll_seconds: how often ``watch_directory`` asks again for a
            directory bucket the collector has not created yet.
        declares_limits: ``connect`` also looks up the limits bucket and
            makes it when missing (the collector's store, whose user may);
            otherwise the first call on limit tallies does.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 5.0,
        connection: NatsConnection | None = None,
        timeout_key: str = "sync.timeout_seconds",
        poll_seconds: float = 1.0,
        declares_limits: bool = False,
        ack_wait_seconds: float = ACK_WAIT_SECONDS,
    ):
        scheme, sep, rest = url.partition("://")
        if scheme != "nats" or not sep or not rest:
            raise ConfigError(f"{url!r}: expected nats://HOST:PORT")
        self.url = url
        self.timeout = timeout
        self.timeout_key = timeout_key
        self.poll_seconds = poll_seconds
        self.declares_limits = declares_limits
        self.ack_wait_seconds = ack_wait_seconds
        self.connection = connection or NatsConnection()
        # The server's last "Permissions Violation" on this connection: a
        # refused publish or subscription gets no answer, only this notice,
        # so a call that then times out names it as its cause.
        self._refused = ""
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._bundles: KeyValue | None = None
        self._status: KeyValue | None = None
        self._approvals: KeyValue | None = None
        self._reviews: KeyValue | None = None
        self._limits: KeyValue | None = None
        self._directory: KeyValue | None = None
        self._lock: asyncio.Lock | None = None

    # -- connection

    async def _bounded(self, what: str, call: Awaitable[_T], subject: str = "") -> _T:
        """``call`` within ``timeout``; an outage as StoreUnavailable.

        ``subject`` is what the call publishes to, as the code spells it:
        a refusal names it beside the server's notice, whose subject the
        NATS client has lowercased (subjects are case-sensitive, and a
        daemon token is mixed-case)."""
        try:
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a
            # cancellation (gh-86296) and hang the daemon's stop.
            async with asyncio.timeout(self.timeout):
                return await call
        except _UNAVAILABLE as err:
            reason = error_text(err)
            if isinstance(err, TimeoutError):
                reason = f"no answer within {self.timeout} s ({self.timeout_key})"
            if self._refused:
                reason = (
                    f"refused by the server: {self._refused} (the NATS client "
                    "reports the subject lowercased"
                    + (f"; this call publishes to {subject})" if subject else ")")
                )
                self._refused = ""
            raise StoreUnavailable(f"{self.url}: {what}: {reason}") from err

    async def connect(self) -> None:
        """Connect (again, when the connection was lost) and create the
        buckets and the stream when missing (the limits bucket only with
        ``declares_limits``; the directory bucket never).

        Raises:
            StoreUnavailable: the server did not answer within ``timeout``
                or refused to create them.
        """
        await self._bounded("connect", self._ensure())

    async def _ensure(self) -> JetStreamContext:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._nc is not None and self._nc.is_connected and self._js:
                return self._js
            await self._drop()
            # The client is made first so that a connect cut short (a
            # timeout, a stop) closes its socket rather than leaking it.
            nc = nats.aio.client.Client()
            self._refused = ""
            try:
                await nc.connect(
                    servers=[self.url],
                    name="kynara",
                    allow_reconnect=False,
                    connect_timeout=self.timeout,
                    ping_interval=max(1.0, self.timeout),
                    max_outstanding_pings=_MAX_OUTSTANDING_PINGS,
                    error_cb=self._on_error,
                    **self._credentials(),
                )
                js = nc.jetstream(timeout=self.timeout)
                await self._declare(js)
            except BaseException:
                with contextlib.suppress(Exception):
                    await nc.close()
                raise
            self._nc, self._js = nc, js
            return js

    async def _declare(self, js: JetStreamContext) -> None:
        stream = StreamConfig(
            name=SEGMENTS_STREAM,
            subjects=[SEGMENT_SUBJECT_PREFIX + "*"],
            storage=StorageType.FILE,
            duplicate_window=DUPLICATE_WINDOW_SECONDS,
        )
        try:
            await js.stream_info(SEGMENTS_STREAM)
        except nats.js.errors.NotFoundError:
            await self._create(
                js.add_stream(stream), lambda: js.stream_info(SEGMENTS_STREAM)
            )
        self._bundles = await self._bucket(js, BUNDLES_BUCKET)
        self._status = await self._bucket(js, STATUS_BUCKET)
        self._approvals = await self._bucket(js, APPROVALS_BUCKET)
        self._reviews = await self._bucket(js, REVIEWS_BUCKET)
        if self.declares_limits:
            self._limits = await self._limits_of(js)

    async def _limits_of(self, js: JetStreamContext) -> KeyValue:
        return await self._bucket(
            js, LIMITS_BUCKET, max_value_size=MAX_LIMIT_TALLIES_BYTES
        )

    async def _bucket(
        self, js: JetStreamContext, name: str, *, max_value_size: int | None = None
    ) -> KeyValue:
        try:
            return await js.key_value(name)
        except nats.js.errors.BucketNotFoundError:
            create = js.create_key_value(
                bucket=name,
                history=1,
                storage=StorageType.FILE,
                max_value_size=max_value_size,
            )
            await self._create(create, lambda: js.key_value(name))
            return await js.key_value(name)

    @staticmethod
    async def _create(
        create: Awaitable[object], lookup: Callable[[], Awaitable[object]]
    ) -> None:
        """Run ``create``; when another daemon won the race with a different
        configuration (say, an older version's), take what exists."""
        try:
            await create
        except nats.js.errors.BadRequestError:
            await lookup()

    async def _drop(self) -> None:
        nc, self._nc, self._js = self._nc, None, None
        self._directory = None
        self._limits = None
        if nc is not None and not nc.is_closed:
            with contextlib.suppress(*_UNAVAILABLE):
                await nc.close()

    def _credentials(self) -> dict[str, object]:
        """The client's TLS and authentication options from ``connection``."""
        c = self.connection
        options: dict[str, object] = {}
        if c.tls is not None:
            options.update(tls=c.tls, tls_handshake_first=c.tls_first)
            if c.server_name:
                options["tls_hostname"] = c.server_name
        if c.user:
            options.update(user=c.user, password=c.password)
        if c.token:
            options["token"] = c.token
        if c.inbox_prefix:
            options["inbox_prefix"] = c.inbox_prefix
        return options

    async def _on_error(self, err: Exception) -> None:
        # The failing call raises StoreUnavailable; this is the client's
        # background view of the same trouble.
        text = str(err) or repr(err)
        if _PERMISSIONS_VIOLATION in text.lower():
            # A refusal is no outage: retrying cannot help until the
            # server's permissions for this user change.
            self._refused = text.removeprefix("nats: ")[: _MAX_LOGGED_NAME * 2]
            _log.error(
                "store refused an operation",
                extra={
                    "fields": {
                        "store": self.url,
                        "error": self._refused,
                        "hint": "grant the permission to this client's user in "
                        "the NATS server's authorization (config/nats-server.conf); "
                        "the NATS client reports the subject lowercased, the "
                        "failing call's error names it as sent",
                    }
                },
            )
            return
        _log.debug(
            "store connection error",
            extra={"fields": {"store": self.url, "error": text}},
        )

    def _alive(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    async def close(self) -> None:
        """Close the connection; a later call connects again."""
        await self._drop()

    # -- bundles

    async def publish_bundle(self, data: bytes) -> str:
        """Make ``data`` the current bundle; returns its digest.

        Raises:
            BundleTooLarge: ``data`` exceeds the server's max_payload.
            StoreUnavailable: the server is away or did not acknowledge.
        """

        async def publish() -> None:
            await self._ensure()
            assert self._nc is not None and self._bundles is not None
            if len(data) > self._nc.max_payload:
                raise BundleTooLarge(
                    f"{self.url}: a bundle of {len(data)} bytes exceeds the "
                    f"server's max_payload of {self._nc.max_payload} bytes "
                    f"(shrink the bundle or raise max_payload in the NATS "
                    f"server's configuration)"
                )
            await self._bundles.put(CURRENT_KEY, data)

        await self._bounded(
            "publish bundle", publish(), f"$KV.{BUNDLES_BUCKET}.{CURRENT_KEY}"
        )
        return _digest(data)

    async def current_bundle(self) -> BundleEntry | None:
        async def read() -> BundleEntry | None:
            await self._ensure()
            assert self._bundles is not None
            try:
                entry = await self._bundles.get(CURRENT_KEY)
            except nats.js.errors.KeyNotFoundError:
                return None
            data = entry.value or b""
            return BundleEntry(digest=_digest(data), data=data)

        return await self._bounded("read current bundle", read())

    async def watch_bundles(self) -> AsyncIterator[BundleEntry]:
        """The current bundle, then each new one as the server sends it.

        Raises:
            StoreUnavailable: could not start the watch, or the connection
                was lost (noticed within a fraction of a second).
        """

        async for update in self._watch("bundles", BUNDLES_BUCKET, CURRENT_KEY):
            # None marks the end of the values present at the start.
            if update is not None:
                data = update[1]
                yield BundleEntry(digest=_digest(data), data=data)

    # -- signed directory

    async def _directory_bucket(self, *, create: bool) -> KeyValue | None:
        """The directory bucket; None when it does not exist yet and
        ``create`` is false (a daemon's user may not create it)."""
        js = await self._ensure()
        if self._directory is not None:
            return self._directory
        try:
            self._directory = await js.key_value(DIRECTORY_BUCKET)
        except nats.js.errors.BucketNotFoundError:
            if not create:
                return None
            self._directory = await self._bucket(js, DIRECTORY_BUCKET)
        return self._directory

    async def publish_directory(self, digest: str, data: bytes) -> None:
        """Make ``data`` (a signed directory update whose ``bundle_digest``
        is ``digest``) the current directory: its chunks into the slot not
        in use, then ``current``.

        Raises:
            ValueError: ``digest`` is not ``data``'s digest.
            BundleTooLarge: ``data`` is larger than ``MAX_DIRECTORY_BYTES``.
            StoreUnavailable: the server is away or did not acknowledge.
        """
        if _digest(data) != digest:
            raise ValueError(
                f"expected digest {_digest(data)} of the data, got {digest[:80]!r}"
            )
        if len(data) > MAX_DIRECTORY_BYTES:
            raise BundleTooLarge(
                f"{self.url}: a directory update of {len(data)} bytes exceeds "
                f"MAX_DIRECTORY_BYTES ({MAX_DIRECTORY_BYTES})"
            )

        async def publish() -> None:
            bucket = await self._directory_bucket(create=True)
            assert bucket is not None and self._nc is not None
            pointer = await self._directory_pointer(bucket)
            used = pointer["slot"] if pointer else DIRECTORY_SLOTS[1]
            slot = DIRECTORY_SLOTS[1 - DIRECTORY_SLOTS.index(used)]
            size = max(1, self._nc.max_payload - _CHUNK_MARGIN)
            chunks = [data[start : start + size] for start in range(0, len(data), size)]
            for index, chunk in enumerate(chunks or [b""]):
                await bucket.put(f"chunk.{slot}.{index}", chunk)
            await bucket.put(
                CURRENT_KEY,
                json.dumps(
                    {
                        "v": 1,
                        "digest": digest,
                        "size": len(data),
                        "slot": slot,
                        "chunks": max(1, len(chunks)),
                    },
                    sort_keys=True,
                    separators=(",", ":"),
                ).encode(),
            )

        await self._bounded(
            "publish directory", publish(), f"$KV.{DIRECTORY_BUCKET}.{CURRENT_KEY}"
        )

    async def _directory_pointer(self, bucket: KeyValue) -> dict | None:
        try:
            entry = await bucket.get(CURRENT_KEY)
        except nats.js.errors.KeyNotFoundError:
            return None
        return self._parse_pointer(entry.value or b"")

    def _parse_pointer(self, raw: bytes) -> dict:
        where = f"{self.url}: {DIRECTORY_BUCKET}.{CURRENT_KEY}"
        try:
            pointer = json.loads(raw)
        except ValueError as err:
            raise StoreUnavailable(f"{where}: expected JSON, got: {err}") from None
        fields = {"v", "digest", "size", "slot", "chunks"}
        if (
            not isinstance(pointer, dict)
            or set(pointer) != fields
            or pointer["v"] != 1
            or pointer["slot"] not in DIRECTORY_SLOTS
            or not isinstance(pointer["digest"], str)
            or not isinstance(pointer["size"], int)
            or not isinstance(pointer["chunks"], int)
            or not 0 <= pointer["size"] <= MAX_DIRECTORY_BYTES
            or not 1 <= pointer["chunks"] <= max(1, pointer["size"])
        ):
            raise StoreUnavailable(
                f"{where}: expected {{v: 1, digest, size (at most "
                f"{MAX_DIRECTORY_BYTES}), slot (a or b), chunks}}, got "
                f"{raw[:200]!r}"
            )
        return pointer

    async def _read_directory(
        self, bucket: KeyValue, pointer: dict | None
    ) -> BundleEntry | None:
        """The update ``pointer`` (else ``current``) names, read again from
        ``current`` while a publish replaces the slot being read."""
        for _ in range(_DIRECTORY_READS):
            if pointer is None:
                pointer = await self._directory_pointer(bucket)
                if pointer is None:
                    return None
            parts = []
            for index in range(pointer["chunks"]):
                try:
                    entry = await bucket.get(f"chunk.{pointer['slot']}.{index}")
                except nats.js.errors.KeyNotFoundError:
                    break
                parts.append(entry.value or b"")
                if sum(map(len, parts)) > pointer["size"]:
                    break
            data = b"".join(parts)
            if len(data) == pointer["size"] and _digest(data) == pointer["digest"]:
                return BundleEntry(digest=pointer["digest"], data=data)
            pointer = None
        raise StoreUnavailable(
            f"{self.url}: {DIRECTORY_BUCKET}: the directory update changed or was "
            f"incomplete on each of {_DIRECTORY_READS} reads"
        )

    async def current_directory(self) -> BundleEntry | None:
        """The current signed directory update, or None when none was
        published (the bucket may not exist yet)."""

        async def read() -> BundleEntry | None:
            bucket = await self._directory_bucket(create=False)
            if bucket is None:
                return None
            return await self._read_directory(bucket, None)

        return await self._bounded("read current directory", read())

    async def watch_directory(self) -> AsyncIterator[BundleEntry]:
        """The current signed directory update, then each new one as the
        server sends its ``current`` key.

        Until the collector creates the bucket (its first publish) this
        waits, asking again every ``poll_seconds``: no directory yet is not
        an outage (``current_directory`` says None meanwhile).

        Raises:
            StoreUnavailable: the watch could not start, or the connection
                was lost.
        """
        while True:
            bucket = await self._bounded(
                "watch directory", self._directory_bucket(create=False)
            )
            if bucket is not None:
                break
            await asyncio.sleep(self.poll_seconds)
        seen = ""
        async for update in self._watch("directory", DIRECTORY_BUCKET, CURRENT_KEY):
            if update is None:
                continue
            pointer = self._parse_pointer(update[1])
            if pointer["digest"] == seen:
                continue
            entry = await self._bounded(
                "read current directory", self._read_directory(bucket, pointer)
            )
            if entry is not None:
                seen = entry.digest
                yield entry

    # -- segments

    async def ship_segment(self, daemon_id: str, msg_id: str, data: bytes) -> bool:
        """Publish one segment message; False when the server already held
        ``msg_id`` (within the duplicate window)."""

        async def ship() -> bool:
            js = await self._ensure()
            ack = await js.publish(
                SEGMENT_SUBJECT_PREFIX + daemon_token(daemon_id),
                data,
                timeout=self.timeout,
                headers={_MSG_ID_HEADER: msg_id},
            )
            return not ack.duplicate

        return await self._bounded(
            f"ship segment message {msg_id}",
            ship(),
            SEGMENT_SUBJECT_PREFIX + daemon_token(daemon_id),
        )

    async def segments(self, consumer: str) -> AsyncIterator[_NatsDelivery]:
        """Every daemon's segment messages for the durable consumer
        ``consumer`` (created when missing), each daemon's in order.

        Raises:
            ConfigError: ``consumer`` is not a valid consumer name.
            StoreUnavailable: the consumer could not be opened, or the
                connection was lost.
        """
        name = check_consumer_name(consumer)

        async def subscribe() -> JetStreamContext.PullSubscription:
            js = await self._ensure()
            config = ConsumerConfig(
                name=name,
                durable_name=name,
                filter_subject=SEGMENT_SUBJECT_PREFIX + "*",
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=self.ack_wait_seconds,
                deliver_policy=DeliverPolicy.ALL,
                max_ack_pending=MAX_ACK_PENDING,
            )
            # Creates the consumer, or updates one that exists: the ack
            # wait is a setting, and the server keeps what it was made with.
            # The consumer is the collector's: what an operator changed on
            # it by hand (max_deliver, a description) is reset here.
            await js.add_consumer(SEGMENTS_STREAM, config)
            # Bound to it as it is: no second lookup of what was just made.
            return await js.pull_subscribe_bind(durable=name, stream=SEGMENTS_STREAM)

        subscription = await self._bounded(f"open consumer {name}", subscribe())
        wait = min(self.timeout, 2.0)
        try:
            while True:
                try:
                    messages = await subscription.fetch(1, timeout=wait)
                except nats.errors.TimeoutError:
                    messages = []
                except _UNAVAILABLE as err:
                    raise StoreUnavailable(
                        f"{self.url}: fetch segments for {name}: {err}"
                    ) from err
                if not messages and not self._alive():
                    raise StoreUnavailable(
                        f"{self.url}: fetch segments for {name}: connection lost"
                    )
                _raise_if_cancelled()
                for message in messages:
                    yield self._delivery(message)
        finally:
            if self._alive():
                with contextlib.suppress(*_UNAVAILABLE):
                    async with asyncio.timeout(self.timeout):
                        await subscription.unsubscribe()

    def _delivery(self, message: Msg) -> _NatsDelivery:
        token = message.subject.removeprefix(SEGMENT_SUBJECT_PREFIX)
        daemon_id = canonical_daemon_id(token)
        if daemon_id is None:
            _malformed("a segment subject not named by a daemon token", token)
        return _NatsDelivery(
            daemon_id=daemon_id or "",
            msg_id=(message.headers or {}).get(_MSG_ID_HEADER, ""),
            data=message.data,
            _message=message,
            _store=self,
        )

    # -- status

    async def put_status(self, daemon_id: str, data: bytes) -> None:
        async def put() -> None:
            await self._ensure()
            assert self._status is not None
            await self._status.put(daemon_token(daemon_id), data)

        await self._bounded(
            f"write status of {daemon_id}",
            put(),
            f"$KV.{STATUS_BUCKET}.{daemon_token(daemon_id)}",
        )

    async def statuses(self) -> dict[str, bytes]:
        async def read() -> dict[str, bytes]:
            found = {}
            for key, value in sorted(await self._read_all(STATUS_BUCKET, ">")):
                daemon_id = canonical_daemon_id(key)
                if daemon_id is None:
                    _malformed("a status key that is no daemon token", key)
                    continue
                found[daemon_id] = value
            return found

        return await self._bounded("read statuses", read())

    # -- approvals and reviews

    async def put_approval(self, daemon_id: str, approval_id: str, data: bytes) -> None:
        key = f"{daemon_token(daemon_id)}.{check_store_key(approval_id, 'approval id')}"
        _check_size(data, MAX_APPROVAL_BYTES, "approval")

        async def put() -> None:
            await self._ensure()
            assert self._approvals is not None
            await self._approvals.put(key, data)

        await self._bounded(
            f"put approval {approval_id}", put(), f"$KV.{APPROVALS_BUCKET}.{key}"
        )

    async def approvals(self) -> list[PublishedApproval]:
        async def read() -> list[PublishedApproval]:
            found = []
            for key, value in await self._read_all(APPROVALS_BUCKET, ">"):
                entry = _approval_of(key, value)
                if entry is not None:
                    found.append(entry)
            return found

        return await self._bounded("read approvals", read())

    async def watch_approvals(self) -> AsyncIterator[PublishedApproval]:
        """Every approval, then each one put since, as the server sends it.

        Raises:
            StoreUnavailable: could not start the watch, or the connection
                was lost.
        """
        async for update in self._watch(
            "approvals", APPROVALS_BUCKET, ">", deletes=True
        ):
            if update is None:
                continue
            key, value, deleted = update
            if deleted:
                names = _split_key(key, 2)
                daemon_id = canonical_daemon_id(names[0]) if names else None
                if names is not None and daemon_id is not None:
                    yield PublishedApproval(daemon_id, names[1], b"", deleted=True)
                continue
            entry = _approval_of(key, value)
            if entry is not None:
                yield entry

    async def put_review(
        self, daemon_id: str, approval_id: str, review_id: str, data: bytes
    ) -> None:
        key = _review_key(daemon_id, approval_id, review_id)
        _check_size(data, MAX_REVIEW_BYTES, "review")

        async def put() -> None:
            await self._ensure()
            assert self._reviews is not None
            await self._reviews.put(key, data)

        await self._bounded(
            f"put review {review_id}", put(), f"$KV.{REVIEWS_BUCKET}.{key}"
        )

    async def reviews(self, daemon_id: str) -> list[PublishedReview]:
        prefix = daemon_token(daemon_id)

        async def read() -> list[PublishedReview]:
            found = []
            for key, value in await self._read_all(REVIEWS_BUCKET, f"{prefix}.>"):
                entry = _review_of(daemon_id, key, value)
                if entry is not None:
                    found.append(entry)
            return found

        return await self._bounded(f"read reviews of {daemon_id}", read())

    async def watch_reviews(
        self, daemon_id: str
    ) -> AsyncIterator[list[PublishedReview]]:
        """The daemon's reviews, then each new one, as the server sends it:
        every review present at the start as one batch, then one batch per
        new review.

        Raises:
            StoreUnavailable: could not start the watch, or the connection
                was lost.
        """
        prefix = daemon_token(daemon_id)
        batch: list[PublishedReview] = []
        initial = True
        async for update in self._watch(
            f"reviews of {daemon_id}", REVIEWS_BUCKET, f"{prefix}.>"
        ):
            if update is None:
                # The end of the reviews present at the start.
                initial = False
            else:
                key, value, _ = update
                entry = _review_of(daemon_id, key, value)
                if entry is None:
                    # Logged by _review_of; it can be no review, and it is
                    # in this daemon's own namespace: gone, not logged again.
                    await self._drop_key(key)
                else:
                    batch.append(entry)
            if batch and not initial:
                yield batch
                batch = []

    async def _drop_key(self, key: str) -> None:
        async def drop() -> None:
            await self._ensure()
            assert self._reviews is not None
            # Not validated: a key the client would refuse can still have
            # been put by another writer, and it goes too.
            await self._reviews.delete(key, validate_keys=False)

        await self._bounded(f"drop review entry {key[:80]!r}", drop())

    async def drop_review(
        self, daemon_id: str, approval_id: str, review_id: str
    ) -> None:
        key = _review_key(daemon_id, approval_id, review_id)

        async def drop() -> None:
            await self._ensure()
            assert self._reviews is not None
            await self._reviews.delete(key)

        await self._bounded(f"drop review {review_id}", drop())

    # -- limit tallies

    async def _limits_bucket(self) -> KeyValue:
        """The limits bucket, looked up on first use after a connect and
        made when missing: a daemon whose user may not create it (the
        shipped ``nats-server.conf``) finds it made by the collector, or
        gets the server's refusal as StoreUnavailable."""
        js = await self._ensure()
        if self._limits is None:
            self._limits = await self._limits_of(js)
        return self._limits

    async def put_limit_tallies(self, daemon_id: str, data: bytes) -> None:
        """Replace the daemon's limit tallies document.

        Raises:
            ValueError: ``data`` is larger than ``MAX_LIMIT_TALLIES_BYTES``
                or the server's ``max_payload``.
            StoreUnavailable: the server is away, refused or did not
                acknowledge.
        """
        _check_size(data, MAX_LIMIT_TALLIES_BYTES, "limit tallies document")
        key = daemon_token(daemon_id)

        async def put() -> None:
            bucket = await self._limits_bucket()
            assert self._nc is not None
            if len(data) > self._nc.max_payload:
                raise ValueError(
                    f"{self.url}: a limit tallies document of {len(data)} bytes "
                    f"exceeds the server's max_payload of {self._nc.max_payload} "
                    "bytes"
                )
            await bucket.put(key, data)

        await self._bounded(
            f"write limit tallies of {daemon_id}",
            put(),
            f"$KV.{LIMITS_BUCKET}.{key}",
        )

    async def limit_tallies(self) -> dict[str, bytes]:
        async def read() -> dict[str, bytes]:
            await self._limits_bucket()
            found = {}
            for key, value in sorted(await self._read_all(LIMITS_BUCKET, ">")):
                daemon_id = _limit_tallies_owner(key, value)
                if daemon_id is not None:
                    found[daemon_id] = value
            return found

        return await self._bounded("read limit tallies", read())

    async def watch_limit_tallies(self) -> AsyncIterator[tuple[str, bytes]]:
        """Every daemon's document, then each one put or removed since, as
        the server sends it (a removed one as ``b""``).

        Raises:
            StoreUnavailable: could not start the watch, or the connection
                was lost.
        """
        await self._bounded("watch limit tallies", self._limits_bucket())
        async for update in self._watch(
            "limit tallies", LIMITS_BUCKET, ">", deletes=True
        ):
            if update is None:
                continue
            key, value, deleted = update
            document = b"" if deleted else value
            daemon_id = _limit_tallies_owner(key, document)
            if daemon_id is not None:
                yield daemon_id, document

    async def _read_all(self, bucket: str, keys: str) -> list[tuple[str, bytes]]:
        """(key, value) of every live key of ``bucket`` matching ``keys``,
        read with one watch (the client's ``keys(filters=...)`` matches
        substrings, and a get per key is a round trip each)."""
        watch = await self._open_watch(bucket, keys)
        found = []
        try:
            async with contextlib.aclosing(watch.updates()) as updates:
                async for update in updates:
                    # None marks the end of the values present at the start.
                    if update is None:
                        break
                    key, value, deleted = update
                    if not deleted:
                        found.append((key, value))
        finally:
            await watch.stop()
        return found

    async def _open_watch(self, bucket: str, keys: str) -> _KeyWatch:
        js = await self._ensure()
        assert self._nc is not None
        watch = _KeyWatch(self, self._nc, bucket, keys)
        await watch.start(js)
        return watch

    async def _watch(
        self,
        what: str,
        bucket: str,
        keys: str,
        *,
        deletes: bool = False,
    ) -> AsyncIterator[tuple[str, bytes, bool] | None]:
        """(key, value, deleted) of every live key of ``bucket`` matching
        ``keys``, None once those present at the start are through, then
        each put (and, with ``deletes``, each delete or purge). Raises
        StoreUnavailable when the connection is lost."""
        watch = await self._bounded(f"watch {what}", self._open_watch(bucket, keys))
        try:
            async with contextlib.aclosing(watch.updates()) as updates:
                async for update in updates:
                    if update is not None and update[2] and not deletes:
                        continue
                    yield update
        finally:
            await watch.stop()


class _KeyWatch:
    """A watch over the keys of one bucket matching ``keys``: every live
    one first (the last value of each, deletes included), None once those
    are through, then each put, delete or purge as the server sends it.

    The client's own key-value watch creates its consumer with
    ``$JS.API.CONSUMER.CREATE.<stream>``, which does not name the filter,
    so a server cannot tell a daemon's watch of its own reviews from one
    of every daemon's. This one creates a named consumer with
    ``$JS.API.CONSUMER.CREATE.<stream>.<name>.<filter>``: the server
    refuses a request whose configured filter differs from the one its
    subject names, so a permission on that subject limits what a user may
    watch (``daemon_permissions``).

    The consumer is a push consumer delivering to a new inbox of this
    connection, ephemeral (the server deletes it ``_WATCH_INACTIVE_SECONDS``
    after the watch stops), with a random name: the name is no secret that
    guards anything, but no other client picks it by chance. Its messages
    come in order; a gap in the consumer's sequence (a message the client
    dropped), a heartbeat missing for ``_WATCH_SILENT_SECONDS`` or a status
    the server sends instead of messages ends the watch with
    ``StoreUnavailable``, and the caller's next watch starts over with
    every live key (as a watch that starts again after an outage does).
    """

    def __init__(self, store: NatsStore, nc: Client, bucket: str, keys: str):
        self._store = store
        self._nc = nc
        self._stream = f"KV_{bucket}"
        self._prefix = f"$KV.{bucket}."
        self._filter = self._prefix + keys
        self._what = f"watch {self._filter[:_MAX_LOGGED_NAME]}"
        self._sub: nats.aio.subscription.Subscription | None = None
        self._pending = 0

    async def start(self, js: JetStreamContext) -> None:
        """Subscribe to a new inbox, then create the consumer delivering
        there (subscribed first, so no early message is missed)."""
        deliver = self._nc.new_inbox()
        self._sub = await self._nc.subscribe(deliver)
        config = ConsumerConfig(
            name=f"kynara_watch_{secrets.token_hex(12)}",
            filter_subject=self._filter,
            deliver_subject=deliver,
            deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
            ack_policy=AckPolicy.NONE,
            max_deliver=1,
            flow_control=True,
            idle_heartbeat=_WATCH_HEARTBEAT_SECONDS,
            inactive_threshold=_WATCH_INACTIVE_SECONDS,
            mem_storage=True,
            num_replicas=1,
        )
        try:
            info = await js.add_consumer(self._stream, config=config)
        except BaseException:
            await self.stop()
            raise
        self._pending = info.num_pending or 0

    async def stop(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None and self._store._alive():
            with contextlib.suppress(*_UNAVAILABLE):
                async with asyncio.timeout(self._store.timeout):
                    await sub.unsubscribe()

    async def updates(self) -> AsyncIterator[tuple[str, bytes, bool] | None]:
        """(key, value, deleted) as the server sends them, None once the
        keys present at the start are through."""
        assert self._sub is not None, "start() first"
        sub = self._sub
        loop = asyncio.get_running_loop()
        initial = True
        if self._pending == 0:
            initial = False
            yield None
        delivered = 0
        heard = loop.time()
        while True:
            try:
                message = await sub.next_msg(timeout=_LIVENESS_SECONDS)
            except nats.errors.TimeoutError:
                if not self._store._alive():
                    self._lost("connection lost")
                if loop.time() - heard > _WATCH_SILENT_SECONDS:
                    self._lost(f"no message or heartbeat for {_WATCH_SILENT_SECONDS} s")
                _raise_if_cancelled()
                continue
            except _UNAVAILABLE as err:
                self._lost(error_text(err))
            heard = loop.time()
            headers = message.headers or {}
            status = headers.get(_STATUS_HEADER)
            if status is not None:
                await self._control(message, status, delivered)
                continue
            sequence = message.metadata.sequence
            if sequence.consumer != delivered + 1:
                self._lost(
                    f"message {sequence.consumer} after {delivered}: "
                    "the client dropped some"
                )
            delivered = sequence.consumer
            deleted = (
                headers.get(_KV_OPERATION_HEADER) in (KV_DEL, KV_PURGE)
                or _MARKER_REASON_HEADER in headers
            )
            yield message.subject.removeprefix(self._prefix), message.data, deleted
            if initial and message.metadata.num_pending == 0:
                initial = False
                yield None

    async def _control(self, message: Msg, status: str, delivered: int) -> None:
        """Answer a heartbeat or a flow control request; any other status
        (the consumer was deleted, say) ends the watch."""
        headers = message.headers or {}
        if status != _STATUS_CONTROL:
            description = headers.get(_DESCRIPTION_HEADER, "")
            self._lost(f"the server sent status {status} {description}".strip())
        # A flow control request, or a heartbeat of a stalled consumer,
        # names where to answer; every message before it was taken.
        for reply in (message.reply, headers.get(_STALLED_HEADER)):
            if reply:
                await self._nc.publish(reply)
        last = headers.get(_LAST_CONSUMER_HEADER)
        if last is not None and int(last) != delivered:
            self._lost(f"heartbeat after message {last}, last taken {delivered}")

    def _lost(self, why: str) -> typing.NoReturn:
        raise StoreUnavailable(f"{self._store.url}: {self._what}: {why}")


def _watch_subjects(bucket: str, keys: str) -> list[str]:
    """What a user needs to watch ``keys`` of ``bucket`` (``_KeyWatch``):
    creating a consumer filtered to them, under any name, and answering
    its flow control."""
    stream = f"KV_{bucket}"
    return [
        f"$JS.API.CONSUMER.CREATE.{stream}.*.$KV.{bucket}.{keys}",
        f"$JS.FC.{stream}.>",
    ]


def _lookups() -> list[str]:
    """Looking up the stream and the buckets, as ``connect`` does (the
    directory and limits buckets are looked up on first use)."""
    streams = (SEGMENTS_STREAM,) + tuple(
        f"KV_{bucket}"
        for bucket in (
            BUNDLES_BUCKET,
            STATUS_BUCKET,
            APPROVALS_BUCKET,
            REVIEWS_BUCKET,
        )
    )
    return [f"$JS.API.STREAM.INFO.{stream}" for stream in streams]


def _directory_reads() -> list[str]:
    """Reading and watching the signed directory (``watch_directory``)."""
    stream = f"KV_{DIRECTORY_BUCKET}"
    return [
        f"$JS.API.STREAM.INFO.{stream}",
        f"$JS.API.STREAM.MSG.GET.{stream}",
        *_watch_subjects(DIRECTORY_BUCKET, CURRENT_KEY),
    ]


def _limit_tallies(token: str) -> list[str]:
    """Sharing fleet-scope limits (``limits.fleet``): looking the limits
    bucket up, putting the daemon's own tallies, reading and watching
    every daemon's. Only a daemon whose policies declare a fleet-scope
    limit uses them; ``connect`` needs none of them."""
    return [
        f"$JS.API.STREAM.INFO.KV_{LIMITS_BUCKET}",
        f"$KV.{LIMITS_BUCKET}.{token}",
        *_watch_subjects(LIMITS_BUCKET, ">"),
    ]


def daemon_permissions(daemon_id: str, inbox_prefix: str) -> dict[str, list[str]]:
    """The subjects a daemon's NATS user needs, for the server's
    ``permissions`` block: ``{"publish": [...], "subscribe": [...]}``.

    It may ship segments, write its status, put its approvals and limit
    tallies and drop its reviews under its own ``daemon_token`` only; look
    up the streams and buckets; read and watch the current bundle and the
    current signed directory (never publish one); watch its own reviews
    (a consumer filtered to its token: ``_KeyWatch``); read and watch every
    daemon's limit tallies (fleet-scope limits add them up); and receive
    replies under ``inbox_prefix`` (its ``sync.nats.inbox_prefix``) only.
    It may not publish a bundle, create or delete a stream, write another
    daemon's limit tallies, or read other daemons' approvals, reviews or
    status. The limit tallies subjects (``_limit_tallies``) are used only
    by a daemon whose policies declare a fleet-scope limit: without them a
    daemon still connects, ships and takes reviews.
    """
    token = daemon_token(daemon_id)
    publish = [
        f"{SEGMENT_SUBJECT_PREFIX}{token}",
        f"$KV.{STATUS_BUCKET}.{token}",
        f"$KV.{APPROVALS_BUCKET}.{token}.*",
        f"$KV.{REVIEWS_BUCKET}.{token}.*.*",
        *_lookups(),
        f"$JS.API.STREAM.MSG.GET.KV_{BUNDLES_BUCKET}",
        *_watch_subjects(BUNDLES_BUCKET, CURRENT_KEY),
        *_watch_subjects(REVIEWS_BUCKET, f"{token}.>"),
        *_directory_reads(),
        *_limit_tallies(token),
    ]
    return {"publish": publish, "subscribe": [f"{inbox_prefix}.>"]}


def publisher_permissions(inbox_prefix: str) -> dict[str, list[str]]:
    """The subjects the bundle publisher's NATS user needs: look up the
    stream and buckets, read and put the current bundle
    (``kynara-sidecar bundle publish``), and read the daemons' status
    (``kynara-sidecar fleet status``). It writes nothing else: no segment,
    status, approval or review, and it creates no stream (the collector
    does)."""
    return {
        "publish": [
            f"$KV.{BUNDLES_BUCKET}.{CURRENT_KEY}",
            *_lookups(),
            f"$JS.API.STREAM.MSG.GET.KV_{BUNDLES_BUCKET}",
            *_watch_subjects(STATUS_BUCKET, ">"),
        ],
        "subscribe": [f"{inbox_prefix}.>"],
    }


def collector_permissions(inbox_prefix: str) -> dict[str, list[str]]:
    """The subjects the collector's NATS user needs: JetStream's API (it
    creates the stream, the buckets and its durable consumer, reads
    statuses and watches approvals), acknowledging segment messages,
    putting and dropping reviews, publishing the signed directory (it
    creates its bucket), and its own replies. It publishes no bundle,
    segment, status or approval.

    ``deny`` (publish) keeps it from the calls that would remove or change
    segment messages before it reads them: deleting, purging or updating
    the stream and deleting a message. It still acknowledges them, as
    their reader."""
    stream = SEGMENTS_STREAM
    return {
        "publish": [
            "$JS.API.>",
            f"$JS.ACK.{stream}.>",
            "$JS.FC.>",
            f"$KV.{REVIEWS_BUCKET}.>",
            f"$KV.{DIRECTORY_BUCKET}.>",
        ],
        "deny": [
            f"$JS.API.STREAM.DELETE.{stream}",
            f"$JS.API.STREAM.PURGE.{stream}",
            f"$JS.API.STREAM.UPDATE.{stream}",
            f"$JS.API.STREAM.MSG.DELETE.{stream}",
        ],
        "subscribe": [f"{inbox_prefix}.>"],
    }


def _check_size(data: bytes, limit: int, what: str) -> None:
    if len(data) > limit:
        raise ValueError(f"a {what} of {len(data)} bytes: expected at most {limit}")


def _review_key(daemon_id: str, approval_id: str, review_id: str) -> str:
    check_store_key(approval_id, "approval id")
    check_store_key(review_id, "review id")
    return f"{daemon_token(daemon_id)}.{approval_id}.{review_id}"


def _split_key(key: str, parts: int) -> list[str] | None:
    names = key.split(".")
    if len(names) != parts:
        return None
    try:
        for name in names[1:]:
            check_store_key(name, "id")
    except ValueError:
        return None
    return names


def _approval_of(key: str, value: bytes) -> PublishedApproval | None:
    names = _split_key(key, 2)
    daemon_id = canonical_daemon_id(names[0]) if names else None
    if names is None or daemon_id is None:
        _malformed("an approval key that is no daemon token and id", key)
        return None
    if len(value) > MAX_APPROVAL_BYTES:
        _malformed(f"an approval over {MAX_APPROVAL_BYTES} bytes", key)
        return None
    return PublishedApproval(daemon_id, names[1], value)


def _limit_tallies_owner(key: str, value: bytes) -> str | None:
    """The daemon whose limit tallies ``key`` holds, else None (logged):
    a key that is no daemon token, or a value too large."""
    daemon_id = canonical_daemon_id(key)
    if daemon_id is None:
        _malformed("a limit tallies key that is no daemon token", key)
        return None
    if len(value) > MAX_LIMIT_TALLIES_BYTES:
        _malformed(f"limit tallies over {MAX_LIMIT_TALLIES_BYTES} bytes", key)
        return None
    return daemon_id


def _review_of(daemon_id: str, key: str, value: bytes) -> PublishedReview | None:
    names = _split_key(key, 3)
    if names is None or names[0] != daemon_token(daemon_id):
        _malformed("a review key that is no daemon token and two ids", key)
        return None
    if len(value) > MAX_REVIEW_BYTES:
        _malformed(f"a review over {MAX_REVIEW_BYTES} bytes", key)
        return None
    return PublishedReview(daemon_id, names[1], names[2], value)


@dataclasses.dataclass
class _NatsDelivery:
    """One segment message delivered to a durable consumer."""

    daemon_id: str
    msg_id: str
    data: bytes
    _message: Msg
    _store: NatsStore

    async def ack(self) -> None:
        """Acknowledge and wait for the server to record it.

        Raises:
            StoreUnavailable: the server did not confirm within timeout (the
                message may come again).
        """
        await self._store._bounded(
            f"acknowledge {self.msg_id}",
            self._message.ack_sync(timeout=self._store.timeout),
        )

    async def nak(self) -> None:
        await self._store._bounded(
            f"nak {self.msg_id}", self._message.nak(delay=NAK_DELAY_SECONDS)
        )
