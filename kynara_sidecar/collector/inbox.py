"""The fleet inbox: every daemon's approvals, reviewed in one place.

Daemons publish their approvals to the central store (``approvals.fleet``:
the latest state of each, as JSON). ``FleetInbox`` keeps a copy of them,
fed by a watch of the store (``Store.watch_approvals``), and serves the
``Inbox`` protocol from it, so the collector mounts the very review page a
daemon serves (``server.review_page``).

A review here is not recorded here. ``review`` checks the reviewer against
the approval exactly as the daemon will (``approvals.eligibility``: the
same pure check the daemon's book runs), signs it with the inbox's key
(``inbox.signing_key``; ``approvals.signed_review``) and puts it in the
store for the daemon that asked, which verifies, records and drops it, and
publishes the approval's new state, which comes back here through the
watch. Until then the copy still shows the approval as it was; ``review``
returns it as it will be once recorded (the page says the review was sent
to that daemon). Reviews this inbox sent and the daemon has not yet
recorded count for the eligibility check, so one reviewer cannot send two
reviews of one approval.

What the store holds is what any writer put there. An entry that does not
decode as an approval, or whose content disagrees with the key it is
filed under (another daemon or id), is skipped and logged. An approval
past its ``expires_at`` is refused for review even while the copy still
says pending (its daemon records the expiry and publishes it).

Approvals are published unsigned, so a store writer can change what a
reviewer is shown; it cannot make that view approve anything: each signed
review carries the digest of the view it was made on
(``signed_review.view_digest``) and the daemon refuses a review whose view
differs from its own approval. TODO(#12): sign published approvals with
the daemon's audit key, checked against ``daemons`` here, so an altered
view is flagged on the page before a reviewer spends time on it.

TODO(#13): the copy holds every approval published, final ones included,
for as long as the collector runs; bound it, and prune final approvals
from the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence

import grpc
import msgspec

from kynara_sidecar.approvals.eligibility import check_review, outcome
from kynara_sidecar.approvals.fleet import decode_approval
from kynara_sidecar.approvals.model import (
    Approval,
    ApprovalState,
    InboxQuery,
    Review,
    Reviewer,
    Verdict,
)
from kynara_sidecar.approvals.signed_review import (
    encode_signed_review,
    sign_review,
)
from kynara_sidecar.audit.keys import SigningKey
from kynara_sidecar.audit.record import format_timestamp, parse_timestamp
from kynara_sidecar.decision import Timestamp
from kynara_sidecar.errors import (
    ApprovalClosed,
    ErrorCode,
    InvalidRequest,
    NotFound,
    ServiceError,
)
from kynara_sidecar.sync import PublishedApproval, Store, StoreUnavailable
from kynara_sidecar.sync._session import StoreSession

__all__ = ["FleetInbox", "ReviewNotSent"]

log = logging.getLogger("kynara.collector")

_NANOS = 1_000_000_000
# Ids and keys from the store are cut to this in log lines.
_MAX_LOGGED = 80


class ReviewNotSent(ServiceError):
    """The review could not be put in the central store; nothing was sent,
    and the reviewer may try again."""

    code = ErrorCode.INTERNAL
    status = grpc.StatusCode.UNAVAILABLE


class FleetInbox:
    """The ``Inbox`` over the store's published approvals; see the module doc.

    Args:
        store: the central store (a connection of its own).
        name: the inbox's name, recorded as each review's ``via``.
        signing_key: the inbox's review key (``inbox.signing_key``).
        timeout: seconds one store call may take.
        retry_seconds: the pause before watching again after a failure.
        clock: nanoseconds since the epoch.
    """

    def __init__(
        self,
        store: Store,
        *,
        name: str,
        signing_key: SigningKey,
        timeout: float,
        retry_seconds: float,
        clock: Callable[[], int] = time.time_ns,
    ):
        self._session = StoreSession(store, timeout)
        self.name = name
        self._key = signing_key
        self._retry_seconds = retry_seconds
        self._clock = clock
        self._approvals: dict[str, Approval] = {}
        # Reviews sent and not yet seen in the published state.
        self._sent: dict[str, tuple[Review, ...]] = {}
        self._ready = asyncio.Event()

    # -- the copy

    async def run(self, stop: asyncio.Event) -> None:
        """Keep the copy up to date until ``stop`` is set: watch the
        store's approvals, and after a failure watch again (logged)."""
        try:
            await self._watch(stop)
        finally:
            # Cancelled at the collector's stop, too: the connection closes.
            await self._session.close()

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

    def take(self, published: PublishedApproval) -> Approval | None:
        """Take one published approval into the copy; the approval, or None
        when it was skipped (logged)."""
        try:
            approval = decode_approval(published.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as err:
            self._skip(published, f"not an approval: {err}")
            return None
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
            _nanos(approval.created_at)
            _nanos(approval.expires_at)
        except ValueError as err:
            self._skip(published, f"a time that is no RFC 3339 UTC: {err}")
            return None
        known = self._approvals.get(approval.id)
        if known is not None and known.daemon_id != approval.daemon_id:
            self._skip(published, "an approval id another daemon published first")
            return None
        self._approvals[approval.id] = approval
        sent = self._sent.get(approval.id)
        if sent is not None:
            recorded = {review.reviewer for review in approval.reviews}
            left = tuple(r for r in sent if r.reviewer not in recorded)
            if left and approval.state is ApprovalState.PENDING:
                self._sent[approval.id] = left
            else:
                del self._sent[approval.id]
        return approval

    def _skip(self, published: PublishedApproval, why: str) -> None:
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
        items = sorted(
            (a for a in self._approvals.values() if _matches(a, query)),
            key=_newest_first,
            reverse=True,
        )
        if query.after:
            anchor = self._approvals.get(query.after)
            if anchor is None:
                raise InvalidRequest(
                    f"no approval {query.after!r} to page after", field="after"
                )
            items = [a for a in items if _newest_first(a) < _newest_first(anchor)]
        return items[: max(query.limit, 0)]

    def get(self, approval_id: str) -> Approval | None:
        return self._approvals.get(approval_id)

    async def review(
        self, approval_id: str, reviewer: Reviewer, verdict: Verdict, comment: str
    ) -> Approval:
        """Check, sign and send a review to the daemon that asked.

        Returns:
            The approval as it will be once its daemon records the review.

        Raises:
            NotFound, ApprovalClosed, SelfApproval, RoleMissing,
            InvalidRequest: as ``Inbox.review``; nothing was sent.
            ReviewNotSent: the store did not take it; nothing was sent.
        """
        approval = self._approvals.get(approval_id)
        if approval is None:
            raise NotFound(f"no approval {approval_id!r}", field="approval_id")
        now = self._clock()
        view = msgspec.structs.replace(
            approval, reviews=(*approval.reviews, *self._sent.get(approval_id, ()))
        )
        if view.state is ApprovalState.PENDING and now >= _nanos(approval.expires_at):
            raise ApprovalClosed(
                f"approval {approval_id} expired at {approval.expires_at}",
                field="approval_id",
            )
        check_review(view, reviewer, comment)
        state = outcome(view, verdict)
        at = format_timestamp(Timestamp(now // _NANOS, now % _NANOS))
        signed = sign_review(
            self._key,
            inbox=self.name,
            approval=approval,
            reviewer=reviewer,
            verdict=verdict,
            comment=comment,
            at=at,
        )
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
            log.error(
                "fleet inbox: review not sent",
                extra=_fields(approval_id=approval_id, error=str(err)),
            )
            raise ReviewNotSent(
                f"the review of approval {approval_id} could not be sent to "
                f"daemon {approval.daemon_id!r}: the central store did not take "
                "it; nothing was recorded, try again"
            ) from err
        review = Review(
            reviewer=reviewer.id,
            roles=tuple(sorted(reviewer.roles)),
            verdict=verdict,
            at=at,
            comment=comment,
            via=self.name,
        )
        self._sent[approval_id] = (*self._sent.get(approval_id, ()), review)
        log.info(
            "fleet inbox: review sent",
            extra=_fields(
                approval_id=approval_id,
                daemon_id=approval.daemon_id,
                review_id=signed.review_id,
                reviewer=reviewer.id,
                verdict=str(verdict),
            ),
        )
        return msgspec.structs.replace(
            view,
            state=state,
            reviews=(*view.reviews, review),
            resolved_at=at if state is not ApprovalState.PENDING else "",
        )


def _nanos(rfc3339: str) -> int:
    moment = parse_timestamp(rfc3339)
    return moment.seconds * _NANOS + moment.nanos


def _newest_first(approval: Approval) -> tuple[int, str]:
    return _nanos(approval.created_at), approval.id


def _matches(approval: Approval, query: InboxQuery) -> bool:
    return (
        (query.state is None or approval.state is query.state)
        and (not query.agent_id or approval.agent_id == query.agent_id)
        and (not query.action or approval.action == query.action)
        and approval.risk.score >= query.min_risk
    )


def _fields(**fields: object) -> dict[str, dict[str, object]]:
    return {"fields": {"component": "collector", **fields}}
