"""Following signed policy bundles: fetch, verify, compile, swap whole.

A daemon whose ``policy.source`` is a bundle file or a central store keeps
one ``BundleFollower``. Every bundle it is offered (by the store's watch,
by the poll that double-checks the watch, by ``sync_now`` or by SIGHUP for
a file) goes through one path, under one lock, so two offers never race:

1. the same digest as the active bundle is ``unchanged`` (nothing is
   verified again);
2. the bytes must hash to the digest the store named; then
   ``verify_bundle`` checks the signature against the trusted keys, every
   file's hash, the canonical packing, and compiles the policies (on a
   thread: a large set takes a while, and decisions go on meanwhile);
3. a bundle created before the active one is refused ("older than the
   active revision"), unless the operator forces it: a store replaying an
   old bundle must not roll the fleet back silently. A bundle created more
   than ``sync.max_clock_skew_seconds`` ahead of the daemon's clock is
   refused too ("created in the future"), forced or not: a publisher with a
   wrong clock would otherwise make every later bundle look older;
4. the daemon's ``activate`` callback commits the bundle with its
   ``policy_activated`` marker and swaps the compiled set in. Only a bundle
   that got this far is active; any earlier failure leaves the previous
   revision serving.

The same machinery follows the collector's signed directory
(``directory.store``): a ``BundleFollower`` made with ``DIRECTORY_UPDATES``
over a ``DirectorySource`` verifies each directory update with
``directory.trusted_keys``, checks its ``created`` in the same way, and
hands it to the daemon's callback, which compiles it against the active
policy set. Only the names differ: its outcomes count in
``kynara_directory_sync_total``, its refusals in
``kynara_directory_refusals_total``, and its log lines say "directory".
``Followers`` runs both for ``sync now``; SIGHUP syncs each in turn.

Each offer ends in one ``SyncOutcome``: activated, unchanged, refused (the
reason: the message naming the file and the rule, and a ``kind`` an alert
can key on: the ``BundleProblem`` kind, ``older``, ``future``,
``too_large``, ``unusable`` when the daemon cannot serve it, say its
directory lacks the configured agent, or ``not_activated`` when the audit
log could not take it) or unreachable (the source could not be read). Each
is counted (``kynara_policy_sync_total{outcome}``), logged (a refusal at
ERROR, once while it stays the same, with ``kind`` as a field) and kept as
``last_sync`` for the status document and ``sync now``.

The background loop (stores only; a bundle file is read at start, on
SIGHUP and on ``sync now``) connects, watches, and polls
``current_bundle()`` every ``sync.poll_seconds`` as a safety net for a
missed watch event. When the store is lost it backs off from
``sync.retry_min_seconds`` doubling to ``sync.retry_max_seconds`` (with
jitter, so a fleet does not reconnect in step), and the daemon keeps
deciding on what it has. A digest the loop refused once is remembered and
not verified again (a bad bundle left in the store would otherwise be
re-verified and re-logged at every poll); ``sync_now`` always evaluates
afresh and reports the true outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import hashlib
import logging
import os
import pathlib
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping
from typing import Any, Protocol

import msgspec

from kynara_sidecar.audit.keys import PublicKey
from kynara_sidecar.audit.record import format_timestamp, parse_timestamp
from kynara_sidecar.decision import Timestamp
from kynara_sidecar.errors import ConfigError, KynaraError, PolicyError
from kynara_sidecar.metrics import Metrics
from kynara_sidecar.sync import (
    MAX_BUNDLE_BYTES,
    BundleEntry,
    BundleTooLarge,
    StoreUnavailable,
    retry_delay,
)
from kynara_sidecar.sync.bundle import (
    BundleError,
    BundleProblem,
    seconds_ahead,
    verify_bundle,
)

__all__ = [
    "BUNDLES",
    "MAX_BUNDLE_FILE_BYTES",
    "ActiveBundle",
    "Activate",
    "BundleFile",
    "BundleFollower",
    "BundleSource",
    "DirectorySource",
    "Followed",
    "Followers",
    "LastSync",
    "SyncOutcome",
    "SyncedNow",
    "bundle_digest",
    "directory_updates",
]

log = logging.getLogger("kynara.sync")

MAX_BUNDLE_FILE_BYTES = MAX_BUNDLE_BYTES
# Python 3.11's asyncio.wait_for can swallow a cancellation that arrives as
# its inner call completes (gh-86296), and store calls use it: a task being
# stopped is cancelled again at this interval until it is done.
_CANCEL_RETRY_SECONDS = 0.1


class SyncOutcome(enum.StrEnum):
    """How one sync ended."""

    # A new bundle verified, compiled and is now active.
    ACTIVATED = "activated"
    # The source holds the active bundle (or none at all).
    UNCHANGED = "unchanged"
    # The bundle was not activated; the previous revision stays active.
    REFUSED = "refused"
    # The source could not be read.
    UNREACHABLE = "unreachable"


class LastSync(msgspec.Struct, frozen=True):
    """What the last sync did, for status and ``sync now``."""

    # When it ended, RFC 3339 UTC.
    time: str
    outcome: SyncOutcome
    # Why it was refused or unreachable ("" when it was not).
    error: str = ""
    # The revision active after the sync ("" when none is).
    revision: str = ""
    # The revision active before it ("" when none was).
    previous_revision: str = ""
    # The digest of the bundle it looked at ("" when it read none).
    digest: str = ""
    # Why it was refused, for alerts: a BundleProblem kind, "older",
    # "future", "too_large", "unusable" or "not_activated" ("" otherwise).
    kind: str = ""


class ActiveBundle(msgspec.Struct, frozen=True):
    """The bundle the daemon serves."""

    digest: str
    revision: str
    directory_revision: str
    created: str


class BundleSource(Protocol):
    """Where bundles come from: the part of ``Store`` the follower uses."""

    url: str

    async def connect(self) -> None: ...

    async def close(self) -> None: ...

    async def current_bundle(self) -> BundleEntry | None: ...

    def watch_bundles(self) -> AsyncIterator[BundleEntry]: ...


# Commits the bundle (or directory update) with its policy_activated marker
# and swaps it in. Raises PolicyError or the kind's verify error when the
# daemon refuses it itself (say a bundle's directory lacks the configured
# agent), any other KynaraError when it could not activate it now (the
# audit log is down).
Activate = Callable[[Any, BundleEntry], Awaitable[None]]


@dataclasses.dataclass(frozen=True)
class Followed:
    """What a follower follows: signed bundles, or signed directory updates.

    Everything a ``BundleFollower`` does is the same for both but these:
    how an entry is verified, what its errors are, the setting that lists
    its trusted keys, the metrics it moves, and the word its log lines and
    messages use.
    """

    # The word for one entry in logs and messages: "bundle", "directory".
    noun: str
    # The log field naming the revision a sync left active:
    # "policy_revision" for bundles, "directory_revision" for directories.
    revision_field: str
    # The INFO line when the watch is back after the source was lost.
    watching_again: str
    # (data, trusted keys) -> a verified value with ``revision`` and
    # ``created``; raises ``error`` (whose ``kind`` names the problem).
    verify: Callable[[bytes, Mapping[str, PublicKey]], Any]
    error: type[KynaraError]
    # The setting listing the publishers' public keys, for the hint on an
    # unknown key.
    trusted_setting: str
    # The directory revision an active entry serves.
    directory_revision: Callable[[Any], str]
    count_sync: Callable[[Metrics, str], None]
    count_refusal: Callable[[Metrics, str], None]
    # (metrics, revision, created as Unix seconds or None).
    set_active: Callable[[Metrics, str, float | None], None]


BUNDLES = Followed(
    noun="bundle",
    revision_field="policy_revision",
    watching_again="watching bundles again",
    verify=verify_bundle,
    error=BundleError,
    trusted_setting="policy.trusted_keys",
    directory_revision=lambda verified: verified.directory_revision,
    count_sync=lambda metrics, outcome: metrics.policy_sync.labels(outcome).inc(),
    count_refusal=Metrics.count_bundle_refusal,
    set_active=Metrics.set_bundle_revision,
)


def directory_updates() -> Followed:
    """What a follower of ``directory.store`` follows: the collector's
    signed directory updates (``sync.directory``)."""
    # Imported here: sync.directory names its digests with bundle_digest,
    # so importing it at the top would make the two modules a cycle.
    from kynara_sidecar.sync.directory import DirectoryError, verify_directory_update

    return Followed(
        noun="directory",
        revision_field="directory_revision",
        watching_again="watching directory updates again",
        verify=verify_directory_update,
        error=DirectoryError,
        trusted_setting="directory.trusted_keys",
        directory_revision=lambda verified: verified.revision,
        count_sync=Metrics.count_directory_sync,
        count_refusal=Metrics.count_directory_refusal,
        set_active=Metrics.set_directory_revision,
    )


class DirectorySource:
    """A store's signed directory as a ``BundleSource``: what a follower
    made with ``directory_updates()`` reads (``current_directory``,
    ``watch_directory``)."""

    def __init__(self, store: Any):
        self._store = store
        self.url: str = store.url

    async def connect(self) -> None:
        await self._store.connect()

    async def close(self) -> None:
        await self._store.close()

    async def current_bundle(self) -> BundleEntry | None:
        return await self._store.current_directory()

    def watch_bundles(self) -> AsyncIterator[BundleEntry]:
        return self._store.watch_directory()


def bundle_digest(data: bytes) -> str:
    """``sha256:`` and the 64 hex digits of SHA-256 over ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


class BundleFile:
    """A bundle file as a source: read whole on each ``current_bundle``.

    Raises ``ConfigError`` (naming the path) when the file cannot be read,
    ``BundleTooLarge`` when it is larger than ``MAX_BUNDLE_FILE_BYTES``.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = pathlib.Path(path)
        self.url = str(self.path)

    async def connect(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def current_bundle(self) -> BundleEntry | None:
        data = await asyncio.to_thread(self._read)
        return BundleEntry(digest=bundle_digest(data), data=data)

    def watch_bundles(self) -> AsyncIterator[BundleEntry]:
        raise NotImplementedError(
            "a bundle file is not watched: send SIGHUP or run "
            "`kynara-sidecar sync now` after replacing it"
        )

    def _read(self) -> bytes:
        try:
            with self.path.open("rb") as file:
                data = file.read(MAX_BUNDLE_FILE_BYTES + 1)
        except OSError as err:
            raise ConfigError(
                f"policy.source: cannot read bundle file {self.path}: {err}"
            ) from err
        if len(data) > MAX_BUNDLE_FILE_BYTES:
            raise BundleTooLarge(
                f"policy.source: bundle file {self.path} is larger than the "
                f"{MAX_BUNDLE_FILE_BYTES}-byte cap on a bundle (MAX_BUNDLE_BYTES)"
            )
        return data


class _Refused(Exception):
    def __init__(self, message: str, kind: str, *, remember: bool = True):
        super().__init__(message)
        self.kind = kind
        self.remember = remember


_TOO_LARGE = str(BundleProblem.TOO_LARGE)


def _hint(followed: Followed, kind: str) -> str:
    """What the daemon adds to a verify error so an operator knows what to
    change."""
    if kind == str(BundleProblem.UNKNOWN_KEY):
        return f"; add its public key to {followed.trusted_setting}"
    return ""


def _sameness(sync: LastSync) -> tuple[object, ...]:
    """What makes two outcomes the same for logging and status: a refusal
    of the same bundle for the same kind of reason is the same refusal,
    though its message may name a different instant."""
    if sync.outcome is SyncOutcome.REFUSED:
        return (sync.outcome, sync.kind, sync.digest, sync.revision)
    return (sync.outcome, sync.error, sync.revision)


def _fields(**fields: object) -> dict[str, dict[str, object]]:
    return {"fields": {"component": "sync", **fields}}


class BundleFollower:
    """Keeps the daemon on the newest good bundle of one source.

    Args:
        source: a store (``open_store``) or a ``BundleFile``; the follower
            connects and closes it.
        trusted: key id -> public key of the bundle publishers
            (``policy.trusted_keys``).
        activate: the daemon's callback (see ``Activate``).
        metrics: where outcomes and the active revision are published.
        clock: nanoseconds since the epoch, for ``last_sync.time``.
        poll_seconds: how often the loop re-reads the current bundle.
        retry_min_seconds, retry_max_seconds: the loop's backoff bounds.
        on_outcome: called with ``last_sync`` when its outcome or error
            changes (not for each poll that finds the same bundle), e.g. to
            publish the daemon's status at once.
        max_clock_skew_seconds: how far a bundle's ``created`` may be ahead
            of ``clock`` (``sync.max_clock_skew_seconds``).
        followed: what it follows: ``BUNDLES``, or ``directory_updates()``
            over a ``DirectorySource`` (``trusted`` then holds the
            directory keys).
    """

    def __init__(
        self,
        source: BundleSource,
        trusted: Mapping[str, PublicKey],
        activate: Activate,
        metrics: Metrics,
        *,
        clock: Callable[[], int] = time.time_ns,
        poll_seconds: float = 1.0,
        retry_min_seconds: float = 0.2,
        retry_max_seconds: float = 30.0,
        on_outcome: Callable[[LastSync], None] | None = None,
        max_clock_skew_seconds: float = 300.0,
        followed: Followed = BUNDLES,
    ):
        self.source = source
        self.followed = followed
        self._max_skew = max_clock_skew_seconds
        self._on_outcome = on_outcome
        self._trusted = dict(trusted)
        self._activate = activate
        self._metrics = metrics
        self._clock = clock
        self._poll_seconds = poll_seconds
        self._retry_min = retry_min_seconds
        self._retry_max = retry_max_seconds
        # Failures in a row: the pause before the next try grows with them.
        self._failures = 0
        # The watch was lost to an outage: its next update is logged as
        # "watching bundles again", as status and shipping log recovery.
        self._lost = False
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._refused: set[str] = set()
        self.active: ActiveBundle | None = None
        self.last_sync: LastSync | None = None

    # ----------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Follow the source in the background until ``close``."""
        if self._task is None:
            self._task = asyncio.create_task(
                self._run(), name=f"kynara-{self.followed.noun}-follower"
            )

    async def close(self, timeout: float | None = None) -> bool:
        """Stop following and close the source. Idempotent.

        Args:
            timeout: seconds to wait for the background loop to end and the
                source to close; None waits as long as that takes.

        Returns:
            Whether both ended in time. A loop stuck in a store call that
            ignores cancellation (a thread blocked on a hung mount cannot
            be interrupted) is left behind, cancelled, so the daemon can
            go on stopping.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        task, self._task = self._task, None
        stopped = True
        if task is not None:
            stopped = await _settle([task], deadline)
        left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        try:
            async with asyncio.timeout(left):
                await self.source.close()
        except TimeoutError:
            stopped = False
        except (KynaraError, OSError):
            pass
        return stopped

    async def restore(self, entry: BundleEntry) -> bool:
        """Activate a bundle the daemon kept from an earlier run, verified
        again with today's trusted keys; no ordering check, no sync counted.

        Returns:
            Whether it is now active; a refusal is logged at ERROR.

        Raises:
            KynaraError: the ``activate`` callback could not activate it
                (the audit log is down); nothing changed.
        """
        async with self._lock:
            try:
                verified = await self._verify(
                    entry, "kept in the audit log (audit.path) from an earlier run"
                )
            except _Refused as err:
                log.error(
                    f"stored {self.followed.noun} refused; waiting for one from "
                    "the source",
                    extra=_fields(
                        error=str(err), kind=err.kind, source=self.source.url
                    ),
                )
                return False
            await self._activate(verified, entry)
            self._set_active(verified, entry)
        return True

    def forget(self) -> None:
        """Drop the active entry: the daemon could not use the one restored
        (a kept signed directory that no longer compiles), so the source's
        next entry, even the same one, is offered again."""
        self.active = None

    # ---------------------------------------------------------------- syncs

    async def sync_now(self, *, force: bool = False) -> LastSync:
        """Fetch the source's current bundle once and offer it.

        Args:
            force: take a bundle older than the active one.

        Returns:
            The outcome, also kept as ``last_sync``.
        """
        try:
            await self.source.connect()
            entry = await self.source.current_bundle()
        except BundleTooLarge as err:
            return self._record(
                SyncOutcome.REFUSED, self.active, str(err), kind=_TOO_LARGE
            )
        except (StoreUnavailable, ConfigError) as err:
            return self._record(SyncOutcome.UNREACHABLE, self.active, str(err))
        result = await self._offer(entry, force=force, from_loop=False)
        assert result is not None  # only the loop skips
        if result.outcome is not SyncOutcome.UNREACHABLE:
            self._wake.set()
        return result

    async def _offer(
        self, entry: BundleEntry | None, *, force: bool, from_loop: bool
    ) -> LastSync | None:
        async with self._lock:
            previous = self.active
            if entry is None:
                return self._record(
                    SyncOutcome.UNCHANGED,
                    previous,
                    f"{self.source.url} holds no {self.followed.noun} yet; publish one",
                )
            if previous is not None and entry.digest == previous.digest:
                return self._record(
                    SyncOutcome.UNCHANGED, previous, digest=entry.digest
                )
            if from_loop and entry.digest in self._refused:
                return None
            try:
                verified = await self._verify(entry, f"from {self.source.url}")
                self._check_created(verified)
                self._check_order(verified, previous, force)
                await self._call_activate(verified, entry)
            except _Refused as err:
                if err.remember:
                    self._refused.add(entry.digest)
                return self._record(
                    SyncOutcome.REFUSED,
                    previous,
                    str(err),
                    digest=entry.digest,
                    kind=err.kind,
                )
            self._refused.discard(entry.digest)
            self._set_active(verified, entry)
            return self._record(SyncOutcome.ACTIVATED, previous, digest=entry.digest)

    async def _verify(self, entry: BundleEntry, origin: str) -> Any:
        followed = self.followed
        where = f"{followed.noun} {entry.digest} {origin}"
        if bundle_digest(entry.data) != entry.digest:
            raise _Refused(
                f"{where}: malformed: its bytes hash to {bundle_digest(entry.data)}, "
                "not to the digest the source named",
                str(BundleProblem.MALFORMED),
            )
        try:
            return await asyncio.to_thread(followed.verify, entry.data, self._trusted)
        except followed.error as err:
            kind = str(getattr(err, "kind", ""))
            hint = _hint(followed, kind)
            raise _Refused(f"{where}: {err}{hint}", kind) from err

    def _check_created(self, verified: Any) -> None:
        now = Timestamp.from_nanos(self._clock())
        try:
            ahead = seconds_ahead(verified.created, now)
        except ValueError as err:
            raise _Refused(
                f"{self.followed.noun} of revision {verified.revision}: "
                f"malformed: its manifest's created: {err}",
                str(BundleProblem.MALFORMED),
            ) from None
        if ahead > self._max_skew:
            raise _Refused(
                f"{self.followed.noun} of revision {verified.revision} was "
                f"created in the future: created {verified.created}, "
                f"{ahead:.0f}s ahead of this daemon's clock "
                f"({format_timestamp(now)}), more than "
                f"sync.max_clock_skew_seconds ({self._max_skew:g}); fix the "
                "publisher's clock (or this machine's) and publish it again",
                "future",
                # The clock may be the one that is wrong: try it again later.
                remember=False,
            )

    def _check_order(
        self, verified: Any, previous: ActiveBundle | None, force: bool
    ) -> None:
        if previous is None or force:
            return
        try:
            older = _instant(verified.created) < _instant(previous.created)
        except ValueError as err:
            raise _Refused(
                f"{self.followed.noun} of revision {verified.revision}: "
                f"malformed: its manifest's created: {err}",
                str(BundleProblem.MALFORMED),
            ) from None
        if older:
            raise _Refused(
                f"{self.followed.noun} of revision {verified.revision} (created "
                f"{verified.created}) is older than the active revision "
                f"{previous.revision} (created {previous.created}); run "
                "`kynara-sidecar sync now --force` to take it anyway",
                "older",
            )

    async def _call_activate(self, verified: Any, entry: BundleEntry) -> None:
        where = f"{self.followed.noun} {entry.digest} (revision {verified.revision})"
        try:
            await self._activate(verified, entry)
        except (BundleError, self.followed.error) as err:
            kind = str(getattr(err, "kind", "unusable"))
            raise _Refused(f"{where}: {err}", kind) from err
        except PolicyError as err:
            raise _Refused(f"{where}: {err}", "unusable") from err
        except KynaraError as err:
            # Not the bundle's fault: try it again at the next poll.
            raise _Refused(
                f"{where}: not activated: {err}", "not_activated", remember=False
            ) from err

    def _set_active(self, verified: Any, entry: BundleEntry) -> None:
        self.active = ActiveBundle(
            digest=entry.digest,
            revision=verified.revision,
            directory_revision=self.followed.directory_revision(verified),
            created=verified.created,
        )
        self.followed.set_active(
            self._metrics, verified.revision, _epoch(verified.created)
        )

    def _record(
        self,
        outcome: SyncOutcome,
        previous: ActiveBundle | None,
        error: str = "",
        *,
        digest: str = "",
        kind: str = "",
    ) -> LastSync:
        result = LastSync(
            time=format_timestamp(Timestamp.from_nanos(self._clock())),
            outcome=outcome,
            error=error,
            revision=self.active.revision if self.active else "",
            previous_revision=previous.revision if previous else "",
            digest=digest,
            kind=kind,
        )
        before, self.last_sync = self.last_sync, result
        noun = self.followed.noun
        self.followed.count_sync(self._metrics, str(outcome))
        if outcome is SyncOutcome.REFUSED:
            self.followed.count_refusal(self._metrics, kind)
        changed = before is None or _sameness(before) != _sameness(result)
        if changed and self._on_outcome is not None:
            self._on_outcome(result)
        # By field, not identity: the daemon follows a copy of BUNDLES
        # (dataclasses.replace with its own verify).
        fields = _fields(
            outcome=str(outcome),
            source=self.source.url,
            digest=digest,
            **{self.followed.revision_field: result.revision},
        )
        if outcome is SyncOutcome.REFUSED and changed:
            log.error(
                f"{noun} refused; previous revision stays active",
                extra={"fields": {**fields["fields"], "kind": kind, "error": error}},
            )
        elif outcome is SyncOutcome.REFUSED:
            # The same refusal again (a too-large bundle the loop retries):
            # logged once at ERROR while it lasts.
            log.debug(f"{noun} still refused", extra=fields)
        elif outcome is SyncOutcome.UNREACHABLE:
            log.warning(
                f"{noun} source unreachable; serving what is active",
                extra={"fields": {**fields["fields"], "error": error}},
            )
        elif outcome is SyncOutcome.ACTIVATED:
            log.info(f"{noun} activated", extra=fields)
        else:
            log.debug(f"{noun} unchanged", extra=fields)
        return result

    # ----------------------------------------------------------------- loop

    async def _run(self) -> None:
        while True:
            try:
                await self._follow()
            except StoreUnavailable as err:
                self._lost = True
                self._record(SyncOutcome.UNREACHABLE, self.active, str(err))
            except BundleTooLarge as err:
                self._record(
                    SyncOutcome.REFUSED, self.active, str(err), kind=_TOO_LARGE
                )
            except Exception as err:
                # A bug must not end following for good: count it, retry.
                log.exception(f"{self.followed.noun} follower failed", extra=_fields())
                self._lost = True
                self._record(SyncOutcome.UNREACHABLE, self.active, repr(err))
            await self._pause()

    async def _pause(self) -> None:
        self._failures += 1
        delay = retry_delay(
            self._failures, self._retry_min, self._retry_max, random.random()
        )
        self._wake.clear()
        # asyncio.timeout, not wait_for: it never swallows a cancellation.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._wake.wait()

    async def _follow(self) -> None:
        """Watch and poll until the source is lost; raises StoreUnavailable."""
        await self.source.connect()
        tasks = {
            asyncio.create_task(self._watch()),
            asyncio.create_task(self._poll()),
        }
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
            raise StoreUnavailable(
                f"{self.source.url}: the {self.followed.noun} watch ended"
            )
        finally:
            await _settle(tasks)

    async def _watch(self) -> None:
        async for entry in self.source.watch_bundles():
            self._failures = 0
            if self._lost:
                self._lost = False
                log.info(
                    self.followed.watching_again, extra=_fields(source=self.source.url)
                )
            await self._offer(entry, force=False, from_loop=True)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._poll_seconds)
            entry = await self.source.current_bundle()
            self._failures = 0
            await self._offer(entry, force=False, from_loop=True)


class SyncedNow(msgspec.Struct, frozen=True):
    """What ``Followers.sync_now`` did: each follower's outcome on its own,
    None for the one the daemon does not run."""

    # The bundle's sync (policy.source).
    bundle: LastSync | None
    # The signed directory's sync (directory.store).
    directory: LastSync | None


class Followers:
    """The daemon's followers as one, for ``sync now``.

    Args:
        bundles: the follower of ``policy.source`` (None when the policies
            are files).
        directory: the follower of ``directory.store`` (None when the
            directory comes with the policies).

    Raises:
        ValueError: both are None.
    """

    def __init__(
        self, bundles: BundleFollower | None, directory: BundleFollower | None
    ):
        if bundles is None and directory is None:
            raise ValueError(
                "Followers needs at least one follower: bundles and directory "
                "are both None"
            )
        self.bundles = bundles
        self.directory = directory

    async def sync_now(self, *, force: bool = False) -> SyncedNow:
        """Sync the directory, then the bundle, once each.

        The directory goes first so that a bundle activated by the same
        call compiles against the directory just taken. A refused or
        unreachable directory does not stop the bundle's sync: each is
        reported on its own.

        Args:
            force: take a bundle or directory older than the active one.
        """
        directory = bundles = None
        if self.directory is not None:
            directory = await self.directory.sync_now(force=force)
        if self.bundles is not None:
            bundles = await self.bundles.sync_now(force=force)
        return SyncedNow(bundle=bundles, directory=directory)


async def _settle(
    tasks: Collection[asyncio.Task[None]], deadline: float | None = None
) -> bool:
    """Cancel the tasks until every one is done (see _CANCEL_RETRY_SECONDS)
    or ``deadline`` (``time.monotonic``) passes; returns whether all are
    done. A cancellation of the caller meanwhile is raised once they are."""
    cancelled = False
    while pending := [task for task in tasks if not task.done()]:
        if deadline is not None and time.monotonic() >= deadline:
            if cancelled:
                raise asyncio.CancelledError
            return False
        for task in pending:
            task.cancel()
        wait = _CANCEL_RETRY_SECONDS
        if deadline is not None:
            wait = min(wait, max(deadline - time.monotonic(), 0.0))
        try:
            await asyncio.wait(pending, timeout=wait)
        except asyncio.CancelledError:
            cancelled = True
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            log.debug("follower task ended", exc_info=task.exception())
    if cancelled:
        raise asyncio.CancelledError
    return True


def _epoch(text: str) -> float | None:
    """``created`` as Unix seconds, for the bundle age gauge; None when it
    does not parse (a bundle that got this far was checked already)."""
    try:
        seconds, nanos = _instant(text)
    except ValueError:
        return None
    return seconds + nanos / 1e9


def _instant(text: str) -> tuple[int, int]:
    moment = parse_timestamp(text)
    return moment.seconds, moment.nanos
