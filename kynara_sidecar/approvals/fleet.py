"""The daemon's side of the fleet inbox: approvals up, signed reviews down.

With a central store, reviewers may resolve a daemon's approvals in the
collector's fleet inbox instead of on the daemon's own page. This module
is the daemon's end of that:

- **publish**: every approval the book changes (a subscription), and at
  start every approval the book still holds in memory (whatever its state:
  a final state reached while the store was down is published too), is put
  in the store (``Store.put_approval``; the latest state wins), so the
  inbox lists it and sees it resolved. Changes are collected per approval
  id and put by one task; an approval changed twice while the store is
  away is put once, in its latest state, when it is back. Each approval is
  put as a ``SignedApprovalV1``: the canonical JSON of the whole approval
  (state and reviews included), signed with this daemon's audit key, whose
  public half the collector registers under ``daemons``; the collector
  lists only approvals whose signature verifies, so a store writer can
  neither show fake approvers nor hide a resolution. The envelope also
  names the reviews from the inbox this daemon took for the approval
  (``taken``: recorded or refused), so the inbox stops counting a review it
  sent once the daemon has dealt with it.
- **take reviews**: one task watches the store for this daemon's reviews
  (``Store.watch_reviews``, a batch per read). A batch is applied in the
  order its reviews were signed (their ``at``), so a rejection made before
  an approval is applied first whatever order the store listed them in.
  Each is checked (``signed_review``: the inbox's signature under
  ``approvals.inbox_keys``, this daemon, the approval and its request,
  within its life, the view the reviewer was shown) and, when it passes,
  recorded by the book exactly as a review made on the daemon's own page,
  with ``via`` the inbox's name; the book re-checks the reviewer's
  eligibility. Then the review is dropped from the store. A review refused
  (by the signature checks or by the book) is logged at WARN with the
  reason and counted: nothing is recorded for it, and the approval's
  current state is put again, naming the review as taken, so the inbox
  stops counting it and showing a stale state. The review stays in the
  store until a put naming it succeeded, and is dropped then: a daemon
  that stops before that takes it again after the restart (the book
  refuses it again) and names it then. A review no inbox counts for this
  daemon's approval is dropped at once, neither held nor named nor put
  again: bytes no inbox key signed, one signed for another daemon
  (``wrong_daemon``), and one filed under another approval or review id
  than it was signed for (``wrong_key``: a copy a store writer re-filed,
  maybe under many ids; the inbox counts only the id it sent). So is a
  review of an approval this daemon does not hold (or one too large to
  publish). A signed rejection that
  arrives after an approval resolved the approval, though it was made
  before that (its ``at`` is earlier than the approval's ``resolved_at``),
  is logged at ERROR and counted as ``conflict``: a store writer (or a
  slow store) held it back, and the approval stands; it is named and
  dropped as a refused one. A review the log could not record
  (``AuditUnavailable``) is left in the store and taken again after a
  pause. A watch that starts again (after a store failure) gives every
  review still in the store again: one this run already took (refused and
  waiting for its put, or done with and waiting for its drop) is neither
  checked, counted nor logged again, only dropped when it may be.

What a store writer can still do: drop or delay reviews and approvals
(availability), replay an older signed state of an approval to the inbox
(the inbox keeps the furthest state it saw), never approve or reject
anything, nor show an approval this daemon did not sign.

``taken`` itself is kept in memory only: after a restart it names the
reviews taken since, which is enough, because a refused review is still
in the store until a put named it, and a recorded one is named by the
approval's reviews. It names at most ``MAX_TAKEN_PER_APPROVAL`` ids, the
latest taken: the inbox needs an id only until it has read one state
naming it (every put names it until then), and a recorded review not at
all (its reviewer is in the approval's reviews), so the bound only matters
when one approval draws more signed refusals than that between two states
the inbox reads; a refused review pushed out before a put named it is
dropped from the store unnamed, and an inbox that never read it named
counts it as sent until the approval is final (availability only). What
the signature checks refuse in one batch from the store is put once, after
the batch (nothing waits in between); a refusal by the book may be put on
its own. The bound keeps each put's size and signing cost small whatever a
store writer files.

A store that is down is retried after ``sync.retry_delay`` (doubling from
``sync.retry_min_seconds`` to ``sync.retry_max_seconds``); decisions never
wait on it: the subscription only marks an approval to put and returns.
Every store failure is logged once per outage and counted
(``kynara_approval_fleet_failures``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol

import msgspec

from kynara_sidecar.approvals.model import (
    FINAL_STATES,
    Approval,
    ApprovalState,
    InboxQuery,
    Reviewer,
    Verdict,
)
from kynara_sidecar.approvals.signed_review import (
    ReviewRefused,
    SignedReviewV1,
    check_signed_review,
    decode_signed_review,
)
from kynara_sidecar.audit.keys import (
    PublicKey,
    SigningKey,
    decode_base64url,
    encode_base64url,
)
from kynara_sidecar.audit.record import parse_timestamp
from kynara_sidecar.errors import KynaraError, RequestError
from kynara_sidecar.metrics import Metrics
from kynara_sidecar.sync import (
    MAX_APPROVAL_BYTES,
    PublishedReview,
    Store,
    StoreUnavailable,
    retry_delay,
)
from kynara_sidecar.sync._session import StoreSession

__all__ = [
    "MAX_TAKEN_PER_APPROVAL",
    "SIGNED_APPROVAL_VERSION",
    "ApprovalUnverified",
    "FleetBook",
    "FleetLink",
    "PublishedState",
    "SignedApprovalV1",
    "approval_bytes",
    "decode_approval",
    "encode_approval",
]

log = logging.getLogger("kynara.sync")

SIGNED_APPROVAL_VERSION = 1
# Approvals listed per page when publishing at start.
_START_PAGE = 500
# Log lines name at most this much of a store entry's ids.
_MAX_LOGGED = 80
# Review ids a published approval names as taken, the latest kept: about
# 2 KiB of the envelope (MAX_APPROVAL_BYTES is 1 MiB); see the module doc.
MAX_TAKEN_PER_APPROVAL = 64


class FleetBook(Protocol):
    """What the link needs of the daemon's approval book."""

    def get(self, approval_id: str) -> Approval | None: ...

    def list(self, query: InboxQuery) -> Sequence[Approval]: ...

    def subscribe(self, callback: Callable[[Approval], None]) -> object:
        """Call ``callback`` with each approval after a change commits."""
        ...

    async def review(
        self,
        approval_id: str,
        reviewer: Reviewer,
        verdict: Verdict,
        comment: str,
        *,
        via: str = "daemon",
    ) -> Approval: ...


class SignedApprovalV1(msgspec.Struct, frozen=True, kw_only=True):
    """One approval as a daemon publishes it (a versioned wire record).

    ``approval`` is the canonical JSON of the whole ``Approval``
    (``approval_bytes``), kept as the exact bytes signed; ``signature`` is
    Ed25519 over the canonical JSON of ``{"approval", "taken", "version"}``
    by the daemon's audit key ``key_id``."""

    version: int = SIGNED_APPROVAL_VERSION
    approval: msgspec.Raw
    # Ids of the inbox's reviews of this approval the daemon took (recorded
    # or refused) since it started; a refused one is left in the store
    # until a put naming it succeeded, so a restart misses none.
    taken: tuple[str, ...] = ()
    key_id: str
    signature: str = ""


class PublishedState(msgspec.Struct, frozen=True):
    """A verified published approval and the review ids its daemon took."""

    approval: Approval
    taken: frozenset[str] = frozenset()


class ApprovalUnverified(ValueError):
    """A published approval that is not what its daemon signed; ``reason``
    is ``malformed``, ``unknown_key`` or ``bad_signature``."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def approval_bytes(approval: Approval) -> bytes:
    """The canonical JSON of ``approval`` (sorted keys, no whitespace,
    UTF-8, as the audit chain encodes)."""
    return msgspec.json.encode(approval, order="sorted")


def _signed_part(raw: bytes, taken: tuple[str, ...], version: int) -> bytes:
    # The approval's bytes spliced in as they are: what was signed is
    # exactly what is published, whatever JSON a reader would re-encode.
    head = msgspec.json.encode({"approval": None}, order="sorted")[:-5]
    tail = msgspec.json.encode(
        {"taken": list(taken), "version": version}, order="sorted"
    )
    return head + raw + b"," + tail[1:]


def encode_approval(
    approval: Approval, key: SigningKey, taken: tuple[str, ...] = ()
) -> bytes:
    """An approval as the store holds it: signed with ``key`` (the daemon's
    audit key)."""
    raw = approval_bytes(approval)
    signature = key.sign(_signed_part(raw, taken, SIGNED_APPROVAL_VERSION))
    return msgspec.json.encode(
        SignedApprovalV1(
            approval=msgspec.Raw(raw),
            taken=taken,
            key_id=key.key_id,
            signature=encode_base64url(signature),
        ),
        order="sorted",
    )


_ENVELOPE = msgspec.json.Decoder(SignedApprovalV1)
_APPROVAL = msgspec.json.Decoder(Approval)


def decode_approval(data: bytes, trusted: Mapping[str, PublicKey]) -> PublishedState:
    """The approval in a store entry, when its daemon's key signed it.

    Args:
        trusted: the daemon's keys by key id (the collector's ``daemons``
            entry, and keys its verified rotations added).

    Raises:
        ApprovalUnverified: not a signed approval of this version, a key
            not in ``trusted``, or a signature that does not verify.
    """
    try:
        envelope = _ENVELOPE.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as err:
        raise ApprovalUnverified("malformed", f"not a signed approval: {err}") from None
    if envelope.version != SIGNED_APPROVAL_VERSION:
        raise ApprovalUnverified(
            "malformed",
            f"version: expected {SIGNED_APPROVAL_VERSION}, got {envelope.version}",
        )
    key = trusted.get(envelope.key_id)
    if key is None:
        raise ApprovalUnverified(
            "unknown_key",
            f"signed by {envelope.key_id[:40]!r}, not a key of this daemon "
            f"({', '.join(sorted(trusted)) or 'none'}; collector daemons)",
        )
    try:
        signature = decode_base64url(envelope.signature)
    except ValueError:
        signature = b""
    raw = bytes(envelope.approval)
    signed = _signed_part(raw, envelope.taken, envelope.version)
    if not key.verify(signed, signature):
        raise ApprovalUnverified(
            "bad_signature", f"the signature does not verify under {key.key_id}"
        )
    try:
        approval = _APPROVAL.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as err:
        raise ApprovalUnverified("malformed", f"not an approval: {err}") from None
    return PublishedState(approval, frozenset(envelope.taken))


class FleetLink:
    """Publishes the book's approvals and applies signed reviews from the
    store; see the module doc.

    Args:
        book: the daemon's approval book.
        store: the central store (its own connection: a slow watch here
            never holds up shipping).
        daemon_id: this daemon's id (the log's origin).
        signing_key: this daemon's audit key: it signs what is published.
        trusted: the inbox keys by key id (``approvals.inbox_keys``).
        timeout: seconds one store call may take (``sync.timeout_seconds``).
        retry_min_seconds, retry_max_seconds: the pause after a failure,
            doubling between them (``sync.retry_*``).
        metrics: counters for reviews and failures, when given.
    """

    def __init__(
        self,
        book: FleetBook,
        store: Store,
        *,
        daemon_id: str,
        signing_key: SigningKey,
        trusted: dict[str, PublicKey],
        timeout: float,
        retry_min_seconds: float,
        retry_max_seconds: float,
        metrics: Metrics | None = None,
    ):
        self._book = book
        self._session = StoreSession(store, timeout)
        self._daemon_id = daemon_id
        self._key = signing_key
        self._trusted = trusted
        # Approval id -> ids of the inbox's reviews of it taken (signed by
        # an inbox key, then recorded or refused), the latest
        # MAX_TAKEN_PER_APPROVAL; forgotten once the approval's final state
        # is published.
        self._taken: dict[str, list[str]] = {}
        # Approval id -> ids of refused reviews of it left in the store until
        # a put of the approval naming them succeeds.
        self._held: dict[str, set[str]] = {}
        # (approval id, review id) of reviews done with (recorded, or named
        # by a put) whose drop from the store has not succeeded yet.
        self._undropped: set[tuple[str, str]] = set()
        self._retry = (retry_min_seconds, retry_max_seconds)
        self._metrics = metrics
        self._dirty: dict[str, Approval] = {}
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._failing: set[str] = set()
        self._stopping = False
        # How many approval states reached the store, and reviews recorded
        # or refused: for tests and the operator's eye.
        self.published = 0
        self.taken = 0

    @property
    def url(self) -> str:
        return self._session.url

    async def start(self) -> None:
        """Subscribe to the book, mark every approval it holds in memory to
        put (any state: one that became final while the store was away is
        published too; the book keeps final ones for max_expiry_seconds),
        and start the two tasks. Waits for nothing in the store."""
        self._loop = asyncio.get_running_loop()
        self._book.subscribe(self._changed)
        after = ""
        while True:
            page = self._book.list(
                InboxQuery(state=None, limit=_START_PAGE, after=after)
            )
            for approval in page:
                self._dirty.setdefault(approval.id, approval)
            if len(page) < _START_PAGE:
                break
            after = page[-1].id
        self._wake.set()
        self._tasks = [
            self._loop.create_task(self._publish_loop(), name="fleet publish"),
            self._loop.create_task(self._review_loop(), name="fleet reviews"),
        ]
        log.info(
            "fleet inbox link started",
            extra=_fields(backend=self.url, pending_to_publish=len(self._dirty)),
        )

    def _changed(self, approval: Approval) -> None:
        # Called by the book, maybe from its writer thread: hand over to
        # the loop and return at once.
        loop = self._loop
        if loop is None or self._stopping:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed
            loop.call_soon_threadsafe(self._mark, approval)

    def _mark(self, approval: Approval) -> None:
        self._dirty[approval.id] = approval
        self._wake.set()

    # -- publish

    async def _publish_loop(self) -> None:
        failures = 0
        while not self._stopping:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._publish_dirty()
            except StoreUnavailable as err:
                failures += 1
                self._failed("publish", err)
                await asyncio.sleep(self._delay(failures))
                self._wake.set()
                continue
            failures = 0
            self._recovered("publish")

    async def _publish_dirty(self) -> None:
        for approval_id, approval in list(self._dirty.items()):
            taken = tuple(self._taken.get(approval_id, ()))
            data = encode_approval(approval, self._key, taken)
            if len(data) > MAX_APPROVAL_BYTES:
                # NOTE: no bound at the request door makes every approval
                # fit, as an approval's size is not a simple function of the
                # request's: its resource and context are the record's typed
                # JSON form (each value tagged with its type, bytes as
                # base64, control characters escaped to six bytes each),
                # beside up to MAX_TAKEN_PER_APPROVAL review ids and reviews
                # of MAX_COMMENT_CHARS each; and each door has its own limit
                # (agent.max_message_bytes, 64 KiB by default, also the fast
                # path's; gateway.max_message_bytes, 1 MiB;
                # ext_authz.max_message_bytes, 1 MiB + 64 KiB).
                # An approval past MAX_APPROVAL_BYTES (1 MiB) stays off the
                # fleet inbox, logged; the daemon's own page still has it.
                log.warning(
                    "approval too large for the central store; not published",
                    extra=_fields(
                        approval_id=approval_id,
                        decision_id=approval.decision_id,
                        bytes=len(data),
                    ),
                )
                self._dirty.pop(approval_id, None)
                # No put will name its refused reviews: drop them now.
                self._release(approval_id, self._held.get(approval_id, ()))
                continue
            await self._session.call(
                lambda a=approval, d=data: self._session.store.put_approval(
                    a.daemon_id, a.id, d
                ),
                f"put approval {approval_id}",
            )
            self._release(approval_id, taken)
            # A change that came in meanwhile (a new state, or a review
            # taken) stays marked for the next put.
            if self._dirty.get(approval_id) is approval and taken == tuple(
                self._taken.get(approval_id, ())
            ):
                del self._dirty[approval_id]
                if approval.state in FINAL_STATES:
                    # The inbox counts no sent review once the state is final.
                    self._taken.pop(approval_id, None)
            self.published += 1
        for approval_id, review_id in sorted(self._undropped):
            await self._drop(approval_id, review_id)

    def _release(self, approval_id: str, named: Iterable[str]) -> None:
        """Let the refused reviews of ``approval_id`` in ``named`` (a put
        named them, or none will) be dropped from the store."""
        held = self._held.get(approval_id)
        if not held:
            return
        for review_id in tuple(named):
            if review_id in held:
                held.discard(review_id)
                self._undropped.add((approval_id, review_id))
        if not held:
            del self._held[approval_id]

    async def _drop(self, approval_id: str, review_id: str) -> None:
        """Drop a review done with from the store.

        Raises:
            StoreUnavailable: it stays to drop (the next publish round, or
                when a watch gives it again).
        """
        await self._session.call(
            lambda: self._session.store.drop_review(
                self._daemon_id, approval_id, review_id
            ),
            f"drop review {review_id}",
        )
        self._undropped.discard((approval_id, review_id))

    # -- reviews

    async def _review_loop(self) -> None:
        failures = 0
        while not self._stopping:
            try:
                await self._session.call(self._session.store.connect, "connect")
                watch = self._session.store.watch_reviews(self._daemon_id)
                # aclosing: a watch left on an exception stops at once
                # rather than when the collector gets to it.
                async with contextlib.aclosing(watch):
                    async for batch in watch:
                        failures = 0
                        self._recovered("reviews")
                        for published, review in _in_signed_order(batch):
                            await self._take(published, review)
            except StoreUnavailable as err:
                failures += 1
                self._failed("reviews", err)
            except _TakeAgain:
                failures += 1
            await asyncio.sleep(self._delay(failures))

    async def _take(
        self,
        published: PublishedReview,
        decoded: SignedReviewV1 | ReviewRefused,
    ) -> None:
        """Check and record one review, and drop it from the store: at once
        when recorded (or refused as no inbox's, or of no approval here), after
        a put of the approval naming it when refused (``decoded``: it, or
        why it does not decode). One this run already took is only dropped
        (when done with) or left to its put.

        Raises:
            StoreUnavailable: the drop failed (the review comes again, and
                is dropped then).
            _TakeAgain: the log could not record it; it stays in the store.
        """
        approval_id, review_id = published.approval_id, published.review_id
        key = (approval_id, review_id)
        if key in self._undropped or review_id in self._held.get(approval_id, ()):
            # A new watch gives it again: counted and logged when taken.
            known = self._book.get(approval_id)
            log.debug(
                "review from the store given again; taken already",
                extra=_fields(
                    approval_id=approval_id[:_MAX_LOGGED],
                    decision_id=known.decision_id if known else "",
                    review_id=review_id[:_MAX_LOGGED],
                ),
            )
            if key in self._undropped:
                await self._drop(approval_id, review_id)
            return
        approval = self._book.get(approval_id)
        outcome = "recorded"
        held = False
        try:
            if isinstance(decoded, ReviewRefused):
                raise decoded
            review = decoded
            reviewer = check_signed_review(
                review,
                trusted=self._trusted,
                daemon_id=self._daemon_id,
                approval_id=approval_id,
                review_id=review_id,
                approval=approval,
            )
            reviewed = await self._book.review(
                approval_id, reviewer, review.verdict, review.comment, via=review.inbox
            )
        except ReviewRefused as err:
            outcome = f"refused_{err.reason}"
            self._refused(published, err.reason, str(err))
            # Signed by an inbox key for this daemon and filed as signed
            # (whatever else is wrong): that inbox counts it as sent until
            # told it was taken. No inbox counts any other: dropped below.
            if err.reason not in _NOT_COUNTED:
                held = self._republish(approval_id, approval, review_id)
        except RequestError as err:
            current = self._book.get(approval_id) or approval
            if isinstance(decoded, SignedReviewV1) and _conflict(decoded, current):
                outcome = "conflict"
                self._conflict(published, decoded, current)
            else:
                outcome = f"refused_{err.code}"
                self._refused(published, str(err.code), str(err))
            # The inbox showed it reviewable; show it as it is.
            held = self._republish(approval_id, current, review_id)
        except KynaraError as err:
            self._count(_review_outcome("retried"))
            log.error(
                "review from the fleet inbox not recorded; taken again later",
                extra=_fields(
                    approval_id=approval_id,
                    decision_id=approval.decision_id if approval else "",
                    review_id=review_id,
                    error=str(err),
                ),
            )
            raise _TakeAgain from err
        else:
            # Published with the book's change, which comes after this mark.
            self._note_taken(approval_id, review_id)
            log.info(
                "review from the fleet inbox recorded",
                extra=_fields(
                    approval_id=approval_id,
                    decision_id=reviewed.decision_id,
                    review_id=review_id,
                    reviewer=reviewer.id,
                    verdict=str(review.verdict),
                    via=review.inbox,
                ),
            )
        self._count(_review_outcome(outcome))
        self.taken += 1
        if held:
            # Dropped once a put names it (_publish_dirty).
            return
        self._undropped.add(key)
        await self._drop(approval_id, review_id)

    def _note_taken(self, approval_id: str, review_id: str) -> None:
        """Name ``review_id`` in the approval's next states, keeping the
        latest ``MAX_TAKEN_PER_APPROVAL`` ids; a refused one pushed out
        before a put named it is let go to be dropped unnamed."""
        taken = self._taken.setdefault(approval_id, [])
        if review_id in taken:
            return
        taken.append(review_id)
        if len(taken) > MAX_TAKEN_PER_APPROVAL:
            pushed_out = taken[: len(taken) - MAX_TAKEN_PER_APPROVAL]
            del taken[: len(pushed_out)]
            self._release(approval_id, pushed_out)

    def _republish(
        self, approval_id: str, approval: Approval | None, review_id: str
    ) -> bool:
        """Put the approval's current state again after a refusal, naming
        the refused review as taken, so the inbox's copy catches up.
        Whether the review is held: left in the store until that put
        succeeded (not when there is no approval to put, or no review the
        inbox counts)."""
        if approval is None:
            return False
        if review_id:
            self._note_taken(approval_id, review_id)
            self._held.setdefault(approval_id, set()).add(review_id)
        self._mark(self._book.get(approval_id) or approval)
        return bool(review_id)

    def _conflict(
        self, published: PublishedReview, review: SignedReviewV1, current: Approval
    ) -> None:
        log.error(
            "rejection from the fleet inbox made before the approval was "
            "resolved, but taken after: the approval stands; the store held "
            "the rejection back",
            extra=_fields(
                approval_id=published.approval_id,
                decision_id=current.decision_id,
                review_id=published.review_id,
                reviewer=review.reviewer[:_MAX_LOGGED],
                rejected_at=review.at[:_MAX_LOGGED],
                resolved_at=current.resolved_at,
                state=str(current.state),
            ),
        )

    def _refused(self, published: PublishedReview, reason: str, message: str) -> None:
        # Empty when the review names an approval this daemon does not have.
        approval = self._book.get(published.approval_id)
        log.warning(
            "review from the store refused; nothing recorded",
            extra=_fields(
                approval_id=published.approval_id[:_MAX_LOGGED],
                decision_id=approval.decision_id if approval else "",
                review_id=published.review_id[:_MAX_LOGGED],
                reason=reason,
                error=message,
                setting="approvals.inbox_keys",
            ),
        )

    # -- shared

    def _delay(self, failures: int) -> float:
        low, high = self._retry
        return retry_delay(max(failures, 1), low, high, random.random())

    def _count(self, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.approval_fleet_reviews.labels(outcome).inc()

    def _failed(self, what: str, err: Exception) -> None:
        if self._metrics is not None:
            self._metrics.approval_fleet_failures.labels(what).inc()
        if what in self._failing:
            return
        self._failing.add(what)
        log.warning(
            "fleet inbox link: store unavailable; retrying",
            extra=_fields(backend=self.url, what=what, error=str(err)),
        )

    def _recovered(self, what: str) -> None:
        if what in self._failing:
            self._failing.discard(what)
            log.info(
                "fleet inbox link: store reachable again",
                extra=_fields(backend=self.url, what=what),
            )

    async def stop(self, seconds: float) -> bool:
        """Stop both tasks and close the store, within ``seconds``; whether
        everything stopped in time. Approvals not yet put are let go: the
        next start puts every open one again."""
        self._stopping = True
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        stopped = True
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=seconds)
            stopped = not pending
        await self._session.close(max(seconds / 2, 0.1))
        log.info("fleet inbox link stopped", extra=_fields(backend=self.url))
        return stopped


class _TakeAgain(Exception):
    """A review the log could not record: leave it, watch again later."""


# Refusals of reviews no inbox counts for this daemon's approval: bytes no
# inbox key signed, and a signed review for another daemon or filed under
# ids it was not signed for. No inbox waits on them: dropped at once.
_NOT_COUNTED = frozenset(
    {"malformed", "unknown_key", "bad_signature", "wrong_daemon", "wrong_key"}
)


def _in_signed_order(
    batch: Sequence[PublishedReview],
) -> list[tuple[PublishedReview, SignedReviewV1 | ReviewRefused]]:
    """The batch decoded, in the order its reviews were signed (``at``,
    then review id); what does not decode comes first, to be refused."""
    decoded: list[
        tuple[tuple[int, int, str], PublishedReview, SignedReviewV1 | ReviewRefused]
    ] = []
    for published in batch:
        try:
            review: SignedReviewV1 | ReviewRefused = decode_signed_review(
                published.data
            )
            moment = parse_timestamp(review.at)
            order = (1, moment.seconds * 1_000_000_000 + moment.nanos, review.review_id)
        except ReviewRefused as err:
            review, order = err, (0, 0, published.review_id)
        except ValueError:
            # A bad time: check_signed_review refuses it, in its turn.
            order = (0, 0, published.review_id)
        decoded.append((order, published, review))
    decoded.sort(key=lambda item: item[0])
    return [(published, review) for _, published, review in decoded]


def _conflict(review: SignedReviewV1, current: Approval | None) -> bool:
    """Whether ``review`` is a rejection made before an approval resolved
    ``current``, which stands (the rejection came too late)."""
    if current is None or review.verdict is not Verdict.REJECT:
        return False
    if current.state not in (ApprovalState.APPROVED, ApprovalState.USED):
        return False
    if not current.resolved_at:
        return False
    try:
        made = parse_timestamp(review.at)
        resolved = parse_timestamp(current.resolved_at)
    except ValueError:
        return False
    return (made.seconds, made.nanos) < (resolved.seconds, resolved.nanos)


def _review_outcome(outcome: str) -> str:
    # The label set stays bounded: reasons and codes are fixed vocabularies.
    return outcome[:_MAX_LOGGED]


def _fields(**fields: object) -> dict[str, dict[str, object]]:
    return {"fields": {"component": "sync", **fields}}
