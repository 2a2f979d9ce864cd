"""Sync: how a fleet of daemons converges on one policy revision, and how
their evidence reaches the centre.

What moves between a daemon and the centre:

- **bundles in** (``bundle``): a policy directory signed offline by the
  policy publisher; a daemon verifies, compiles and swaps one in whole, or
  keeps the revision it has (``follower``);
- **the directory in** (``directory``): the principals, signed online by
  the collector's directory key (not the bundle key) and published on each
  change, for daemons that follow it apart from the policies;
- **segments out** (``shipper``): each sealed audit segment with its signed
  checkpoint, in order, marked shipped only once the store acknowledged it;
- **status up** (``status``): what each daemon runs and how far behind its
  shipping is;
- **approvals up, reviews down** (``approvals.fleet``): each approval a
  daemon opens, published (latest state wins) so that the collector's
  fleet inbox lists every daemon's; and each review made in that inbox,
  signed by the inbox's key, put for the daemon that asked, which verifies
  and records it, then drops it from the store;
- **limit tallies across** (``limits.fleet``): each daemon's counted
  decisions of fleet-scope limits still in their windows, one document per
  daemon (latest wins), which every other daemon watches and adds to its
  own counts.

All of these go through one ``Store``, the contract below, with two
implementations: ``dir://PATH`` (``dir_store``: a directory on one machine
or a shared volume, written with atomic renames) and ``nats://HOST:PORT``
(``nats_store``: NATS JetStream, key-value buckets for bundles, status,
approvals, reviews and limit tallies, a stream for segments).
``open_store`` picks one by URL.

Approvals and reviews are addressed by ``daemon_token(daemon_id)``, the
approval id and (for a review) a review id; ids are store keys
(``check_store_key``: 1 to 64 letters, digits, ``_`` or ``-``), so one
name works as a NATS key token and as a file name. A store holds what any
writer put: a reader treats every approval and review as a claim. The
collector lists an approval only when its daemon's audit key signed it
(``approvals.fleet``); the daemon applies a review only when the inbox's
signature verifies (``approvals.signed_review``), so a writer without
those keys can approve nothing and show nothing of its own; it can drop
or delay entries (availability).

The segment messages a daemon ships are ``kynara.v1.Segment`` protobuf
messages (``audit.proto``), the same ones the admin ``AuditService`` streams,
so the collector reads both doors alike. A segment larger than
``MAX_SEGMENT_MESSAGE_BYTES`` of records goes as several messages, each with
the segment's checkpoint; ``segment_message_id`` names each message by what
it carries, so a resent one is recognised as a duplicate and a rewritten
one is not.
"""

from __future__ import annotations

import base64
import dataclasses
import re
import ssl
from collections.abc import AsyncIterator
from typing import Protocol

import msgspec
from kynara.v1.audit_pb2 import Segment

from kynara_sidecar.errors import ConfigError, KynaraError

__all__ = [
    "ACK_WAIT_SECONDS",
    "MAX_BUNDLE_BYTES",
    "MAX_DIRECTORY_BYTES",
    "MAX_SEGMENT_MESSAGE_BYTES",
    "STORE_SCHEMES",
    "BundleEntry",
    "BundleTooLarge",
    "Delivery",
    "MAX_APPROVAL_BYTES",
    "MAX_LIMIT_TALLIES_BYTES",
    "NatsConnection",
    "MAX_REVIEW_BYTES",
    "PublishedApproval",
    "PublishedReview",
    "Store",
    "StoreUnavailable",
    "check_consumer_name",
    "canonical_daemon_id",
    "check_store_key",
    "daemon_id_from_token",
    "daemon_token",
    "is_store_url",
    "open_store",
    "retry_delay",
    "segment_message_id",
]

STORE_SCHEMES = ("dir", "nats")

# A policy set is kilobytes to a few megabytes; a bundle far past that is
# refused before it is read whole, from a file or a store.
MAX_BUNDLE_BYTES = 64 * 1024 * 1024
# A signed directory update (``directory``): 100,000 principals with a few
# attributes each take about 21 MB.
MAX_DIRECTORY_BYTES = 64 * 1024 * 1024

# Records carried by one segment message, at most (NATS's default
# max_payload is 1 MiB; this leaves room for the checkpoint and framing).
MAX_SEGMENT_MESSAGE_BYTES = 512 * 1024


# An approval holds the request as recorded (after redaction): a request is
# at most a few hundred KiB; NATS's default max_payload is 1 MiB.
MAX_APPROVAL_BYTES = 1024 * 1024
# A signed review is a reviewer, a verdict, a comment of at most 2,000
# characters and a signature.
MAX_REVIEW_BYTES = 64 * 1024
# One daemon's limit tallies document (``limits.fleet``): about 29 bytes per
# counted decision still in its window (measured with ten to a key; nearer
# 48 with one to a key), some 36,000 in 1 MiB; NATS's default max_payload is
# 1 MiB, and a key-value value must fit in one message.
MAX_LIMIT_TALLIES_BYTES = 1024 * 1024
# How long a nats:// server waits for the segment consumer's acknowledgement
# before delivering a message again, unless the collector sets it
# (store.ack_wait_seconds): longer than verifying and archiving one segment
# message (at most MAX_SEGMENT_MESSAGE_BYTES) takes.
ACK_WAIT_SECONDS = 30.0


class StoreUnavailable(KynaraError):
    """The central store could not be reached or did not acknowledge in
    time. The daemon keeps deciding on what it has and tries again."""


@dataclasses.dataclass(frozen=True, repr=False)
class NatsConnection:
    """How a client reaches a ``nats://`` store beyond its URL: TLS and
    credentials, already read from their files (``sync.nats`` on a daemon,
    ``store.nats`` on the collector). The repr names which are set, never
    a secret.

    Attributes:
        tls: the context to verify the server (and present a client
            certificate) with; None for plaintext.
        tls_first: start TLS before the server speaks, so no plaintext
            line from a machine in the middle can talk the client out of
            TLS (the server's ``tls`` block needs ``handshake_first: true``).
        server_name: the name to check the server's certificate for; ""
            for the URL's host.
        user, password: a user's name and password; "" for none.
        token: an authorization token; "" for none.
        inbox_prefix: subject prefix of this client's replies, e.g.
            ``_INBOX.daemon-a``; "" for the client's default ``_INBOX``.
            A user of its own with its own prefix lets the server allow it
            to read its own replies only.
    """

    tls: ssl.SSLContext | None = None
    tls_first: bool = True
    server_name: str = ""
    user: str = ""
    password: str = ""
    token: str = ""
    inbox_prefix: str = ""

    def __repr__(self) -> str:
        shown = [f"tls={self.tls is not None}"]
        if self.user:
            shown.append(f"user={self.user!r}, password=***")
        if self.token:
            shown.append("token=***")
        if self.inbox_prefix:
            shown.append(f"inbox_prefix={self.inbox_prefix!r}")
        return f"NatsConnection({', '.join(shown)})"


class BundleTooLarge(KynaraError, ValueError):
    """A bundle larger than ``MAX_BUNDLE_BYTES`` or than the store accepts
    in one message (a NATS server's ``max_payload``). Not an outage, so not
    ``StoreUnavailable``: retrying cannot help; shrink the bundle or raise
    the server's limit."""


class BundleEntry(msgspec.Struct, frozen=True):
    """The bundle a store holds as current: its bytes and their digest
    (``sha256:`` and 64 hex digits of SHA-256 over ``data``)."""

    digest: str
    data: bytes


class PublishedApproval(msgspec.Struct, frozen=True):
    """One approval as a store holds it: the daemon that asked, the
    approval's id and its latest state as the daemon signed it
    (``approvals.fleet.encode_approval``), exactly as put. ``deleted``:
    the entry was removed from the store (``data`` is then empty); only a
    watch says so."""

    daemon_id: str
    approval_id: str
    data: bytes
    deleted: bool = False


class PublishedReview(msgspec.Struct, frozen=True):
    """One review waiting for the daemon that asked: the signed review's
    JSON (``approvals.signed_review``), exactly as put."""

    daemon_id: str
    approval_id: str
    review_id: str
    data: bytes


class Delivery(Protocol):
    """One segment message handed to a consumer (the collector).

    Delivered at least once, in the order shipped for each daemon; a
    delivery not acknowledged comes again.
    """

    # The daemon whose log the message belongs to (the shipping origin).
    daemon_id: str
    # ``segment_message_id`` of the message, as shipped.
    msg_id: str
    # The ``kynara.v1.Segment`` protobuf bytes.
    data: bytes

    async def ack(self) -> None:
        """Done with it: never deliver it to this consumer again."""
        ...

    async def nak(self) -> None:
        """Not done: deliver it again, after a pause."""
        ...


class Store(Protocol):
    """A central store: bundles, audit segments and daemon status.

    Every method raises ``StoreUnavailable`` (naming the store's URL and
    what failed) when the store cannot be reached or does not answer within
    its timeout; none waits forever.
    """

    url: str

    async def connect(self) -> None:
        """Reach the store and create what is missing (buckets, stream,
        directories); idempotent."""
        ...

    async def close(self) -> None: ...

    async def publish_bundle(self, data: bytes) -> str:
        """Make ``data`` the current bundle; returns its digest. A reader
        sees the old bundle or the new one, never part of one."""
        ...

    async def current_bundle(self) -> BundleEntry | None:
        """The current bundle, or None when none was ever published."""
        ...

    def watch_bundles(self) -> AsyncIterator[BundleEntry]:
        """The current bundle (if any), then each newly published one, as
        soon as the store tells (``nats``) or within ``poll_seconds``
        (``dir``). Ends by raising ``StoreUnavailable`` when the store is
        lost; the caller reconnects and watches again."""
        ...

    async def publish_directory(self, digest: str, data: bytes) -> None:
        """Make ``data``, a signed directory update (``directory``) whose
        ``follower.bundle_digest`` is ``digest``, the current directory. A
        reader sees the old update or the new one, never part of one.

        Raises:
            ValueError: ``digest`` is not ``data``'s.
            BundleTooLarge: ``data`` exceeds ``MAX_DIRECTORY_BYTES``.
        """
        ...

    async def current_directory(self) -> BundleEntry | None:
        """The current signed directory update, or None when none was ever
        published."""
        ...

    def watch_directory(self) -> AsyncIterator[BundleEntry]:
        """The current directory update (if any), then each newly published
        one, as ``watch_bundles`` does for bundles. Ends by raising
        ``StoreUnavailable`` when the store is lost (``nats``: also while no
        directory was ever published); the caller watches again."""
        ...

    async def ship_segment(self, daemon_id: str, msg_id: str, data: bytes) -> bool:
        """Append one segment message to the daemon's segment stream and
        return once the store acknowledged it: True when stored, False when
        the store already held ``msg_id`` (a resend)."""
        ...

    def segments(self, consumer: str) -> AsyncIterator[Delivery]:
        """Every daemon's segment messages, for a durable consumer named
        ``consumer``: it resumes after the last message it acknowledged,
        across restarts of either side."""
        ...

    async def put_status(self, daemon_id: str, data: bytes) -> None:
        """Replace the daemon's status document (JSON bytes)."""
        ...

    async def statuses(self) -> dict[str, bytes]:
        """Every daemon's latest status document, by daemon id."""
        ...

    async def put_approval(self, daemon_id: str, approval_id: str, data: bytes) -> None:
        """Replace the published state of one of the daemon's approvals
        (JSON bytes, at most ``MAX_APPROVAL_BYTES``): the latest put wins.

        Raises:
            ValueError: an id that is no store key, or ``data`` too large.
        """
        ...

    async def approvals(self) -> list[PublishedApproval]:
        """Every published approval of every daemon, in no set order. An
        entry whose name is no daemon token and approval id is skipped
        (logged); one larger than ``MAX_APPROVAL_BYTES`` too."""
        ...

    def watch_approvals(self) -> AsyncIterator[PublishedApproval]:
        """Every published approval, then each one put or removed since, as
        soon as the store tells (``nats``: a delete marker) or within
        ``poll_seconds`` (``dir``: gone at the next scan); a removed one
        comes with ``deleted`` set. An approval put twice between two looks
        comes once, in its latest state. Ends by raising
        ``StoreUnavailable`` when the store is lost."""
        ...

    async def put_review(
        self, daemon_id: str, approval_id: str, review_id: str, data: bytes
    ) -> None:
        """Put a review (a signed review's JSON, at most ``MAX_REVIEW_BYTES``)
        for the daemon ``daemon_id`` to take.

        Raises:
            ValueError: an id that is no store key, or ``data`` too large.
        """
        ...

    async def reviews(self, daemon_id: str) -> list[PublishedReview]:
        """The daemon's reviews not yet dropped, in no set order."""
        ...

    def watch_reviews(self, daemon_id: str) -> AsyncIterator[list[PublishedReview]]:
        """The daemon's reviews not yet dropped, then each new one, as soon
        as the store tells (``nats``) or within ``poll_seconds`` (``dir``);
        each once per watch, in batches: what one read found (``dir``: one
        scan; ``nats``: every review present at the start, then each new
        one), so the daemon can order a batch by when it was signed. An
        entry in the daemon's namespace that can be no review (a name that
        is no pair of store keys, more than ``MAX_REVIEW_BYTES``) is logged
        once and removed. Ends by raising ``StoreUnavailable`` when the
        store is lost."""
        ...

    async def drop_review(
        self, daemon_id: str, approval_id: str, review_id: str
    ) -> None:
        """Remove a review the daemon took (recorded or refused); dropping
        one that is gone is no error."""
        ...

    async def put_limit_tallies(self, daemon_id: str, data: bytes) -> None:
        """Replace the daemon's limit tallies document (JSON bytes,
        ``limits.fleet``): the latest put wins. Only the daemon itself
        writes it (``nats``: its user may put its own key only).

        Raises:
            ValueError: ``data`` is larger than ``MAX_LIMIT_TALLIES_BYTES``
                (or, ``nats``, the server's ``max_payload``): not an
                outage, retrying the same document cannot help.
        """
        ...

    async def limit_tallies(self) -> dict[str, bytes]:
        """Every daemon's latest limit tallies document, by daemon id. An
        entry whose name is no daemon token, or larger than
        ``MAX_LIMIT_TALLIES_BYTES``, is skipped (logged)."""
        ...

    def watch_limit_tallies(self) -> AsyncIterator[tuple[str, bytes]]:
        """(daemon id, document) for every daemon's document, then for each
        one put since, as soon as the store tells (``nats``) or within
        ``poll_seconds`` (``dir``); a document removed from the store comes
        as (daemon id, ``b""``). A document put twice between two looks
        comes once, in its latest state. Ends by raising
        ``StoreUnavailable`` when the store is lost."""
        ...


def is_store_url(text: str) -> bool:
    """Whether ``text`` names a central store (``dir://`` or ``nats://``)."""
    scheme, sep, _ = text.partition("://")
    return bool(sep) and scheme in STORE_SCHEMES


def open_store(
    url: str,
    *,
    timeout: float = 5.0,
    poll_seconds: float = 1.0,
    nats: NatsConnection | None = None,
    timeout_key: str = "sync.timeout_seconds",
    setting: str = "",
    declares_limits: bool = False,
    ack_wait_seconds: float = ACK_WAIT_SECONDS,
) -> Store:
    """The store ``url`` names, not yet connected.

    Args:
        url: ``dir:///absolute/path``, ``dir://relative/path`` or
            ``nats://host:port``.
        timeout: seconds a store call may take before it fails.
        poll_seconds: how often a ``dir://`` store is read for a new bundle.
        nats: TLS and credentials for a ``nats://`` store (ignored for
            ``dir://``); None for plaintext without credentials.
        timeout_key: the setting ``timeout`` came from, which a call that
            runs out of it names (``store.timeout_seconds`` in the
            collector, ``--timeout`` in the CLI).
        setting: the setting ``url`` came from (``sync.store``,
            ``policy.source``, ``directory.store``, ``store.url``), which a
            ``dir://`` store whose directory is missing names as the one to
            fix; "" for "the setting that names it".
        declares_limits: a ``nats://`` store's ``connect`` also makes the
            fleet-scope limits bucket (the collector's, whose user may);
            otherwise its first use does.
        ack_wait_seconds: how long a ``nats://`` server waits for the
            segment consumer's acknowledgement before delivering a message
            again (the collector's ``store.ack_wait_seconds``). ``dir://``
            delivers again only to a new consumer iterator, so it has no
            such wait.

    Raises:
        ConfigError: an unknown scheme or a malformed URL.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in STORE_SCHEMES:
        raise ConfigError(
            f"{url!r}: expected a store URL, dir://PATH or nats://HOST:PORT"
        )
    if not rest:
        raise ConfigError(f"{url!r}: the store URL names no {_PART[scheme]}")
    if scheme == "dir":
        from kynara_sidecar.sync.dir_store import DirStore

        return DirStore(
            url,
            timeout=timeout,
            poll_seconds=poll_seconds,
            timeout_key=timeout_key,
            setting=setting,
        )
    from kynara_sidecar.sync.nats_store import NatsStore

    return NatsStore(
        url,
        timeout=timeout,
        connection=nats,
        timeout_key=timeout_key,
        poll_seconds=poll_seconds,
        declares_limits=declares_limits,
        ack_wait_seconds=ack_wait_seconds,
    )


_PART = {"dir": "path", "nats": "host:port"}


def daemon_token(daemon_id: str) -> str:
    """``daemon_id`` as one safe name: a NATS subject token, a key-value key
    and a file name (unpadded base64url of its UTF-8 bytes)."""
    return base64.urlsafe_b64encode(daemon_id.encode()).rstrip(b"=").decode()


def daemon_id_from_token(token: str) -> str:
    """The daemon id ``daemon_token`` made ``token`` from."""
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()


def canonical_daemon_id(token: str) -> str | None:
    """The daemon id a canonical ``daemon_token`` names, else None."""
    try:
        daemon_id = daemon_id_from_token(token)
    except ValueError:
        return None
    return daemon_id if daemon_token(daemon_id) == token else None


# A consumer name is a file name in a dir:// store and a durable consumer
# name in NATS; both accept these characters, so one name works with either.
_CONSUMER_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def check_consumer_name(name: str) -> str:
    """``name`` when it can name a durable consumer (``Store.segments``).

    Raises:
        ConfigError: not 1 to 64 letters, digits, ``_`` or ``-``.
    """
    if not _CONSUMER_NAME.match(name):
        raise ConfigError(
            f"consumer name {name!r}: expected 1 to 64 letters, digits, '_' or '-'"
        )
    return name


# Approval and review ids are NATS key tokens and file names; both accept
# these characters, and no "." that would split a key.
_STORE_KEY = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def check_store_key(value: str, what: str) -> str:
    """``value`` when it can name an approval or a review in a store.

    Raises:
        ValueError: not 1 to 64 letters, digits, ``_`` or ``-`` (``what``
            names the id in the message).
    """
    if not _STORE_KEY.match(value):
        raise ValueError(
            f"{what} {value[:80]!r}: expected 1 to 64 letters, digits, '_' or '-'"
        )
    return value


def segment_message_id(message: Segment) -> str:
    """The id of one segment message: its log, its segment's checkpoint
    (tree size and the first 16 hex digits of its root) and the run of
    records it carries. A resend carries the same id; records rewritten and
    sealed at the same tree size (a log restored from an old copy) do not,
    so the store passes them on and the collector sees the fork."""
    checkpoint = message.checkpoint
    last_seq = message.first_seq + len(message.records) - 1
    return (
        f"{checkpoint.log_id}.{checkpoint.tree_size}.{checkpoint.root.hex()[:16]}"
        f".{message.first_seq}-{last_seq}"
    )


def retry_delay(failures: int, low: float, high: float, draw: float) -> float:
    """The pause after ``failures`` failures in a row (at least 1).

    Doubles from ``low`` up to ``high``; ``draw`` (uniform in [0, 1)) spreads
    it over its upper half ("equal jitter"), never below ``low``.
    """
    ceiling = min(high, low * 2 ** min(failures - 1, 62))
    return max(low, ceiling / 2 + ceiling / 2 * draw)
