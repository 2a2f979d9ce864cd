"""The fleet inbox: every daemon's approvals, reviewed in one place.

Daemons publish their approvals to the central store (``approvals.fleet``:
the latest state of each, signed with the daemon's audit key).
``FleetInbox`` keeps a copy of them, fed by a watch of the store
(``Store.watch_approvals``), and serves the ``Inbox`` protocol from it, so
the collector mounts the very review page a daemon serves
(``server.review_page``).

The copy holds only what a registered daemon signed: an approval is listed
when its signature verifies under that daemon's keys (``keys_of``: the
``daemons`` entry's public keys and those its verified key rotations
added), so a store writer can neither show fake approvers, nor a false
state, nor an approval of its own. An approval of a daemon not in
``daemons`` is not listed (logged once per daemon); one whose signature
does not verify, that does not decode, or whose content disagrees with the
key it is filed under (another daemon or id) is skipped and logged. A
signed state older than the one held (fewer reviews, an earlier state: a
replay) is skipped too; a final state never changes. An entry removed from
the store leaves the copy at the next watch event.

A review here is not recorded here. ``review`` checks the reviewer against
the approval exactly as the daemon will (``approvals.eligibility``: the
same pure check the daemon's book runs), signs it with the inbox's key
(``inbox.signing_key``; ``approvals.signed_review``), binding the view the
page showed (``view``: a view that differs from the copy's is refused,
"changed since you read it; reload"), and puts it in the store for the
daemon that asked, which verifies, records and drops it, and publishes
the approval's new state, which comes back here through the watch.
Until the daemon has taken a review this inbox sent (recorded it, or
refused it: the published state names it in ``taken``), the copy applies
its outcome: a sent rejection closes the approval here, sent approvals
count toward the approvers, and one reviewer cannot send two reviews of
one approval. ``review`` returns the approval as it will be once recorded;
the page says the review was sent to that daemon (``sends_reviews``).

An approval past its ``expires_at`` is refused for review even while the
copy still says pending (its daemon records the expiry and publishes it).

An approval signed with a daemon key the collector does not know yet (a
key rotation in a segment it has not taken in) is not listed but kept,
logged: the latest state of each such approval id, at most
``MAX_KEPT_PER_DAEMON`` approvals and ``MAX_KEPT_BYTES_PER_DAEMON`` bytes
per daemon (past either, the one kept longest is dropped, logged). When
the intake accepts a segment that adds keys of that daemon
(``keys_added``), its kept approvals are taken again as if just
published: listed once they verify, kept again while their key is still
unknown (a kept state older than the one listed by then is skipped as a
replay). The entry's removal from the store drops the kept one. Only
daemons for which ``may_keep`` says so have approvals kept: a member of a
``daemons`` family (any number of ids can be named under its prefix) only
once the collector accepted a segment of it; before that such an
approval is skipped, and listed once its daemon publishes it again after
the segment with its key came in. The kept
approvals live in memory only: after a restart the watch reads every
entry again, against the keys the collector's state holds by then.

Retention (``inbox.retention_seconds``, a week by default): an approval
has ended at its ``expires_at``, or at its ``resolved_at`` when that is
later; once it ended longer ago than the retention, it leaves the copy
(with the reviews sent for it), checked every ``PRUNE_SECONDS``, so it
overstays by at most that. Every state is judged by its own end when it
comes: one that ended longer ago than the retention is verified and then
not taken. A replay of an earlier state of a pruned approval ended no
later than the state pruned (same expiry, no later resolution), so it
never brings the approval back; nor do old entries come back when a
restarted collector reads the whole store again.
Pending approvals before their expiry always stay; one still pending a
retention past its expiry (its daemon never published the expiry) goes
like any other. NOTE: the entries stay in the store, whose API has no
delete of an approval (``Store``: ``put_approval`` only); each daemon's
entries grow by one per approval it opened, and a collector reads them
all at start, taking in only those within the retention.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence

import grpc
import msgspec

from kynara_sidecar.approvals.eligibility import (
    check_current,
    check_review,
    outcome,
)
from kynara_sidecar.approvals.fleet import ApprovalUnverified, decode_approval
from kynara_sidecar.approvals.model import (
    FINAL_STATES,
    Approval,
    ApprovalState,
    InboxQuery,
    Review,
    Reviewer,
    Verdict,
    nanos_of,
)
from kynara_sidecar.approvals.signed_review import (
    encode_signed_review,
    sign_review,
)
from kynara_sidecar.audit.keys import PublicKey, SigningKey
from kynara_sidecar.audit.record import format_timestamp
from kynara_sidecar.collector.config import (
    DEFAULT_INBOX_RETENTION_SECONDS,
    INBOX_PRUNE_SECONDS,
)
from kynara_sidecar.decision import Timestamp
from kynara_sidecar.errors import (
    ErrorCode,
    ServiceError,
)
from kynara_sidecar.sync import PublishedApproval, Store, StoreUnavailable
from kynara_sidecar.sync._session import StoreSession

__all__ = [
    "MAX_KEPT_BYTES_PER_DAEMON",
    "MAX_KEPT_PER_DAEMON",
    "PRUNE_SECONDS",
    "FleetInbox",
    "ReviewNotSent",
]

log = logging.getLogger("kynara.collector")

# Ids and keys from the store are cut to this in log lines.
_MAX_LOGGED = 80
# Unregistered daemon ids logged once each, up to this many (a writer may
# invent any number).
_MAX_UNREGISTERED_LOGGED = 1000
# Approvals signed with a key not known yet, kept per daemon until a key
# rotation is taken in: far more than a daemon publishes between sealing a
# rotation and its segment reaching the collector, and room for one entry
# of the store's largest (sync.MAX_APPROVAL_BYTES) besides small ones.
# Registered daemons only (a family's members once a segment of theirs was
# accepted: ``may_keep``), so the whole is bounded by what was signed.
MAX_KEPT_PER_DAEMON = 256
MAX_KEPT_BYTES_PER_DAEMON = 2 << 20
# How often approvals past the retention leave the copy (why an hour:
# INBOX_PRUNE_SECONDS, which also bounds the retention from below).
PRUNE_SECONDS = float(INBOX_PRUNE_SECONDS)
# How far along its life a state is: a published state behind the held one
# is a replay.
_PROGRESS = {
    ApprovalState.PENDING: 0,
    ApprovalState.APPROVED: 1,
    ApprovalState.REJECTED: 2,
    ApprovalState.EXPIRED: 2,
    ApprovalState.USED: 2,
}


class ReviewNotSent(ServiceError):
    """The review could not be put in the central store; nothing was sent,
    and the reviewer may try again."""

    code = ErrorCode.INTERNAL
    status = grpc.StatusCode.UNAVAILABLE


class _Sent(msgspec.Struct, frozen=True):
    review_id: str
    review: Review


class FleetInbox:
    """The ``Inbox`` over the store's published approvals; see the module doc.

    Args:
        store: the central store (a connection of its own).
        name: the inbox's name, recorded as each review's ``via``.
        signing_key: the inbox's review key (``inbox.signing_key``).
        keys_of: a daemon's public keys by key id, or None when the daemon
            is not registered (``daemons``).
        may_keep: whether approvals of a daemon signed with a key not known
            yet may be kept (see the module doc); by default every
            registered daemon's.
        timeout: seconds one store call may take.
        retry_seconds: the pause before watching again after a failure.
        clock: nanoseconds since the epoch.
        on_entry: told of each store entry not listed as it came, by
            outcome (``skipped``, ``kept``, ``dropped``, ``unregistered``,
            ``past_retention``), to count it beside its log line (of
            ``past_retention``, the next prune's).
        retention_seconds: how long an approval stays listed after it
            ended (``inbox.retention_seconds``; see the module doc).
    """

    def __init__(
        self,
        store: Store,
        *,
        name: str,
        signing_key: SigningKey,
        keys_of: Callable[[str], Mapping[str, PublicKey] | None],
        may_keep: Callable[[str], bool] = lambda _daemon_id: True,
        timeout: float,
        retry_seconds: float,
        clock: Callable[[], int] = time.time_ns,
        on_entry: Callable[[str], None] = lambda _outcome: None,
        retention_seconds: float = DEFAULT_INBOX_RETENTION_SECONDS,
    ):
        self._session = StoreSession(store, timeout)
        self.name = name
        self._key = signing_key
        self._keys_of = keys_of
        self._may_keep = may_keep
        self._unregistered: set[str] = set()
        self._retry_seconds = retry_seconds
        self._clock = clock
        self._on_entry = on_entry
        # The verified published state of each approval.
        self._approvals: dict[str, Approval] = {}
        # When each approval of the copy ended (nanoseconds): its expiry,
        # or its resolution when later.
        self._ends: dict[str, int] = {}
        self._retention_nanos = int(retention_seconds * 1e9)
        # Verified entries not taken since the last prune: past retention.
        self._aged = 0
        # Reviews sent that its daemon has not taken yet, in sending order.
        self._sent: dict[str, tuple[_Sent, ...]] = {}
        # Per daemon: approvals signed with a key not known yet, the latest
        # state of each id, the one kept longest first.
        self._kept: dict[str, dict[str, PublishedApproval]] = {}
        self._ready = asyncio.Event()

    # -- the copy

    async def run(self, stop: asyncio.Event) -> None:
        """Keep the copy up to date until ``stop`` is set: watch the
        store's approvals, and after a failure watch again (logged); prune
        it every ``PRUNE_SECONDS``."""
        pruner = asyncio.get_running_loop().create_task(
            self._prune_loop(stop), name="fleet inbox prune"
        )
        try:
            await self._watch(stop)
        finally:
            # Cancelled at the collector's stop, too: the connection closes.
            pruner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pruner
            await self._session.close()

    async def _prune_loop(self, stop: asyncio.Event) -> None:
        # asyncio.timeout, not wait_for: 3.11's wait_for can swallow the
        # cancellation ``run`` sends at stop (gh-86296), and ``run`` then
        # waits on this loop for ever.
        while not stop.is_set():
            try:
                async with asyncio.timeout(PRUNE_SECONDS):
                    await stop.wait()
            except TimeoutError:
                self.prune()

    def prune(self) -> int:
        """Drop from the copy every approval that ended longer ago than
        the retention, with the reviews sent for it; the number dropped."""
        cutoff = self._clock() - self._retention_nanos
        old = [approval_id for approval_id, end in self._ends.items() if end < cutoff]
        for approval_id in old:
            self._forget(approval_id)
        aged, self._aged = self._aged, 0
        if old or aged:
            log.info(
                "fleet inbox: approvals past retention dropped",
                extra=_fields(
                    dropped=len(old),
                    not_taken=aged,
                    retention_seconds=self._retention_nanos / 1e9,
                ),
            )
        return len(old)

    def _forget(self, approval_id: str) -> None:
        self._approvals.pop(approval_id, None)
        self._ends.pop(approval_id, None)
        self._sent.pop(approval_id, None)

    async def _watch(self, stop: asyncio.Event) -> None:
        failing = False
        while not stop.is_set():
            try:
                await self._session.call(self._session.store.connect, "connect")
                watch = self._session.store.watch_approvals()
                async with contextlib.aclosing(watch):
                    async for published in watch:
                        if failing:
                            failing = False
                            log.info("fleet inbox: store reachable again")
                        self.take(published)
            except StoreUnavailable as err:
                if not failing:
                    failing = True
                    log.warning(
                        "fleet inbox: store unavailable; watching again",
                        extra=_fields(error=str(err)),
                    )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._retry_seconds)

    # The page says "sent to <daemon>", not "recorded", after a review here.
    sends_reviews = True

    def take(self, published: PublishedApproval) -> Approval | None:
        """Take one published approval into the copy; the approval, or None
        when it was skipped (logged), removed, or ended longer ago than the
        retention."""
        known = self._approvals.get(published.approval_id)
        if published.deleted:
            self._unkeep(published)
            if known is not None and known.daemon_id == published.daemon_id:
                self._forget(published.approval_id)
            return None
        keys = self._keys_of(published.daemon_id)
        if keys is None:
            self._not_registered(published)
            return None
        try:
            state = decode_approval(published.data, keys)
        except ApprovalUnverified as err:
            if err.reason == "unknown_key" and self._may_keep(published.daemon_id):
                self._keep(published, str(err))
            else:
                self._skip(published, f"{err.reason}: {err}")
            return None
        approval = state.approval
        if (approval.daemon_id, approval.id) != (
            published.daemon_id,
            published.approval_id,
        ):
            self._skip(
                published,
                f"holds approval {approval.id[:_MAX_LOGGED]!r} of daemon "
                f"{approval.daemon_id[:_MAX_LOGGED]!r}",
            )
            return None
        try:
            nanos_of(approval.created_at)
            end = nanos_of(approval.expires_at)
            if approval.resolved_at:
                end = max(end, nanos_of(approval.resolved_at))
        except ValueError as err:
            self._skip(published, f"a time that is no RFC 3339 UTC: {err}")
            return None
        if known is not None and known.daemon_id != approval.daemon_id:
            self._skip(published, "an approval id another daemon published first")
            return None
        if known is not None and _behind(approval, known):
            self._skip(
                published,
                f"an older state ({approval.state}, {len(approval.reviews)} "
                f"reviews) than the one held ({known.state}, "
                f"{len(known.reviews)} reviews): a replay; kept the later one",
            )
            return None
        if end < self._clock() - self._retention_nanos:
            # Ended before the retention: pruned, or never taken (counted,
            # logged with the next prune).
            if known is not None:
                self._forget(approval.id)
            self._aged += 1
            self._on_entry("past_retention")
            return None
        self._approvals[approval.id] = approval
        self._ends[approval.id] = end
        sent = self._sent.get(approval.id)
        if sent is not None:
            recorded = {review.reviewer for review in approval.reviews}
            left = tuple(
                s
                for s in sent
                if s.review_id not in state.taken and s.review.reviewer not in recorded
            )
            if left and approval.state is ApprovalState.PENDING:
                self._sent[approval.id] = left
            else:
                del self._sent[approval.id]
        return approval

    def keys_added(self, daemon_id: str) -> None:
        """Take again the kept approvals of ``daemon_id``, whose keys just
        grew (the intake accepted a segment with a key rotation): each is
        listed once it verifies, kept again while its key is unknown."""
        kept = self._kept.pop(daemon_id, None)
        if not kept:
            return
        listed = sum(self.take(published) is not None for published in kept.values())
        log.info(
            "fleet inbox: kept approvals verified again with the daemon's new keys",
            extra=_fields(
                daemon_id=daemon_id[:_MAX_LOGGED],
                kept=len(kept),
                listed=listed,
            ),
        )

    def _keep(self, published: PublishedApproval, why: str) -> None:
        """Keep ``published`` (its key not known yet) until its daemon's
        keys grow, in place of an earlier state of its id; past the
        per-daemon bounds the one kept longest goes."""
        kept = self._kept.setdefault(published.daemon_id, {})
        kept.pop(published.approval_id, None)
        kept[published.approval_id] = published
        self._on_entry("kept")
        log.warning(
            "fleet inbox: approval signed with a key not known yet; not listed, "
            "kept until a key rotation of its daemon is taken in",
            extra=_fields(
                daemon_id=published.daemon_id[:_MAX_LOGGED],
                approval_id=published.approval_id[:_MAX_LOGGED],
                error=why,
            ),
        )
        size = sum(len(p.data) for p in kept.values())
        while len(kept) > MAX_KEPT_PER_DAEMON or size > MAX_KEPT_BYTES_PER_DAEMON:
            dropped = kept.pop(next(iter(kept)))
            size -= len(dropped.data)
            self._on_entry("dropped")
            log.warning(
                "fleet inbox: approval with a key not known yet dropped; listed "
                "only once its daemon publishes it again",
                extra=_fields(
                    daemon_id=dropped.daemon_id[:_MAX_LOGGED],
                    approval_id=dropped.approval_id[:_MAX_LOGGED],
                    error=f"more than {MAX_KEPT_PER_DAEMON} approvals or "
                    f"{MAX_KEPT_BYTES_PER_DAEMON} bytes kept for this daemon",
                ),
            )

    def _unkeep(self, published: PublishedApproval) -> None:
        kept = self._kept.get(published.daemon_id)
        if kept is not None and kept.pop(published.approval_id, None) is not None:
            if not kept:
                del self._kept[published.daemon_id]

    def _not_registered(self, published: PublishedApproval) -> None:
        self._on_entry("unregistered")
        daemon_id = published.daemon_id[:_MAX_LOGGED]
        if daemon_id in self._unregistered:
            return
        if len(self._unregistered) < _MAX_UNREGISTERED_LOGGED:
            self._unregistered.add(daemon_id)
        log.warning(
            "fleet inbox: approval of a daemon that is not registered; not "
            "listed (logged once per daemon)",
            extra=_fields(
                daemon_id=daemon_id,
                approval_id=published.approval_id[:_MAX_LOGGED],
                setting="daemons",
            ),
        )

    def _shown(self, approval: Approval) -> Approval:
        """``approval`` with the reviews sent and not yet taken applied."""
        shown = approval
        for sent in self._sent.get(approval.id, ()):
            if shown.state is not ApprovalState.PENDING:
                break
            state = outcome(shown, sent.review.verdict)
            shown = msgspec.structs.replace(
                shown,
                state=state,
                reviews=(*shown.reviews, sent.review),
                resolved_at=sent.review.at
                if state is not ApprovalState.PENDING
                else "",
            )
        return shown

    def _skip(self, published: PublishedApproval, why: str) -> None:
        self._on_entry("skipped")
        log.error(
            "fleet inbox: store entry skipped",
            extra=_fields(
                daemon_id=published.daemon_id[:_MAX_LOGGED],
                approval_id=published.approval_id[:_MAX_LOGGED],
                error=why,
            ),
        )

    # -- Inbox

    def list(self, query: InboxQuery) -> Sequence[Approval]:
        """Approvals matching ``query``, newest first.

        Raises:
            InvalidRequest: ``query.after`` names no approval.
        """
        # TODO(#9): a sorted index instead of a sort per call, if a fleet
        # keeps many thousands of approvals open.
        shown = (self._shown(a) for a in self._approvals.values())
        return query.page(shown, self._approvals.get)

    def get(self, approval_id: str) -> Approval | None:
        approval = self._approvals.get(approval_id)
        return None if approval is None else self._shown(approval)

    async def review(
        self,
        approval_id: str,
        reviewer: Reviewer,
        verdict: Verdict,
        comment: str,
        *,
        view: str = "",
    ) -> Approval:
        """Check, sign and send a review to the daemon that asked.

        Args:
            view: ``view_digest`` of the approval as the page showed it; the
                review is signed with exactly that (empty: the copy's).

        Returns:
            The approval as it will be once its daemon records the review.

        Raises:
            NotFound, ApprovalClosed, SelfApproval, RoleMissing,
            InvalidRequest: as ``Inbox.review``; nothing was sent.
            ReviewNotSent: the store did not take it; nothing was sent.
        """
        approval = check_current(approval_id, self._approvals.get(approval_id), view)
        now = self._clock()
        shown = self._shown(approval)
        check_review(shown, reviewer, comment, now=now)
        at = format_timestamp(Timestamp.from_nanos(now))
        signed = sign_review(
            self._key,
            inbox=self.name,
            approval=approval,
            reviewer=reviewer,
            verdict=verdict,
            comment=comment,
            at=at,
            view=view,
        )
        review = Review(
            reviewer=reviewer.id,
            roles=tuple(sorted(reviewer.roles)),
            verdict=verdict,
            at=at,
            comment=comment,
            via=self.name,
        )
        # Counted before the put, with no await since the check: a second
        # review racing this one (the same reviewer, or an approval after a
        # rejection) is checked against it.
        sent = _Sent(signed.review_id, review)
        self._sent[approval_id] = (*self._sent.get(approval_id, ()), sent)
        try:
            await self._session.call(
                lambda: self._session.store.put_review(
                    approval.daemon_id,
                    approval.id,
                    signed.review_id,
                    encode_signed_review(signed),
                ),
                f"put review {signed.review_id}",
            )
        except StoreUnavailable as err:
            left = tuple(s for s in self._sent.get(approval_id, ()) if s is not sent)
            if left:
                self._sent[approval_id] = left
            else:
                self._sent.pop(approval_id, None)
            log.error(
                "fleet inbox: review not sent",
                extra=_fields(
                    approval_id=approval_id,
                    decision_id=approval.decision_id,
                    daemon_id=approval.daemon_id,
                    error=str(err),
                ),
            )
            raise ReviewNotSent(
                f"the review of approval {approval_id} could not be sent to "
                f"daemon {approval.daemon_id!r}: the central store did not take "
                "it; nothing was recorded, try again"
            ) from err
        log.info(
            "fleet inbox: review sent to its daemon; recorded once the daemon takes it",
            extra=_fields(
                approval_id=approval_id,
                decision_id=approval.decision_id,
                daemon_id=approval.daemon_id,
                review_id=signed.review_id,
                reviewer=reviewer.id,
                verdict=str(verdict),
            ),
        )
        return self._shown(approval)


def _behind(approval: Approval, known: Approval) -> bool:
    """Whether the published ``approval`` is an older state than ``known``."""
    if known.state in FINAL_STATES:
        return approval.state is not known.state or len(approval.reviews) < len(
            known.reviews
        )
    progress, held = _PROGRESS[approval.state], _PROGRESS[known.state]
    return progress < held or (
        progress == held and len(approval.reviews) < len(known.reviews)
    )


def _fields(**fields: object) -> dict[str, dict[str, object]]:
    return {"fields": {"component": "collector", **fields}}
