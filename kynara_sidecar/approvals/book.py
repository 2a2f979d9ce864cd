"""The daemon's approvals: kept in LMDB beside the log, resolved through it.

Theory of operation
-------------------
The book holds every approval of this daemon in the extra LMDB database
``approvals`` (key: the approval id, value: msgpack of ``Approval``) and a
copy in memory. Each state change is one audit record committed, through
the writer, in the same transaction as the approval's new LMDB value; the
memory copy changes only after that commit returned, so a failed commit
changes nothing. Listeners (``subscribe``) and watchers (``watch``) then
hear of it.

The book runs on the event loop, and its checks are synchronous. Two paths
change approvals:

- **The pipeline** (a decision): ``request`` reuses the pending approval of
  the same agent and binding digest, or answers with its approved one (so
  an agent whose wait timed out, and which lost the id, gets its grant
  back instead of a new approval), or opens a new one (rate limits
  permitting); ``use`` checks an approval named by a retry against the
  rules asking now (``eligibility.check_grant``) and, when it is a grant,
  reserves it. Each returns a ``Step`` whose ``changes`` the
  pipeline commits with its decision record, then calls ``committed`` or
  ``aborted``. A grant's check and its reservation happen with no await in
  between, so of two concurrent retries only one can pass; the other is
  told ``approval_used``. The allow record and the ``used`` state commit
  in one transaction, so a crash after it cannot let the grant be used
  again, and a crash before it leaves it approved and unused. A new
  approval is visible (provisionally) from ``request`` on, so a second
  identical request before the first commits reuses it. NOTE: should the
  opening commit fail while the reusing one (a later transaction) succeeds,
  the reuser was told of an approval that was never recorded; its retry
  with that id is told ``approval_not_found`` and asks again. Only a log
  that refuses one transaction and takes the next (a full map freed in
  between) can do that; a fatal log error refuses both.
- **Reviews and the clock** (``review``, the expiry task): serialized by
  one lock; each re-checks the approval after taking it. The expiry task
  records ``expired`` at ``expires_at`` (and at start for those already
  past) and skips an approval reserved by a retry in flight (that retry was
  decided before the expiry; if its commit fails, the next run expires it).
  A retry that comes while the expiry is being committed is told
  ``approval_expired``, as the clock says anyway.

Memory: every approval not in a final state, and final ones resolved within
``approvals.max_expiry_seconds``; older final ones are dropped from memory
(they stay in LMDB, where ``get`` and ``use`` still find them; ``list`` no
longer shows them).

A new approval names the agent's earlier approvals of the same digest that
ended rejected or expired (``Approval.previous``, the latest
``MAX_PREVIOUS``), so that a reviewer sees a request asked again after a
"no". They come from memory: a rejection older than
``approvals.max_expiry_seconds`` is no longer named.

The book also keeps, per agent, the actions of its latest decisions
(``note_action``), seeded at start from the log's last records, for the
``unusual_action`` risk factor.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import heapq
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import NamedTuple

import msgspec

from kynara_sidecar.approvals.eligibility import (
    check_current,
    check_grant,
    check_review,
    outcome,
)
from kynara_sidecar.approvals.model import (
    FINAL_STATES,
    MAX_PREVIOUS,
    Approval,
    ApprovalState,
    InboxQuery,
    Requirement,
    Review,
    Reviewer,
    Verdict,
    nanos_of,
    random_id,
)
from kynara_sidecar.approvals.records import (
    requested_record,
    resolved_record,
    reviewed_record,
)
from kynara_sidecar.audit import AuditSink
from kynara_sidecar.audit.chain import decode_record
from kynara_sidecar.audit.record import (
    AuditRecordV1,
    RecordKind,
    format_timestamp,
)
from kynara_sidecar.audit.store import AuditStore, StateChange
from kynara_sidecar.config import ApprovalsConfig
from kynara_sidecar.decision import NANOS_PER_SECOND, Timestamp
from kynara_sidecar.errors import (
    AuditUnavailable,
    NotFound,
    ReasonCode,
)
from kynara_sidecar.metrics import Metrics
from kynara_sidecar.policy.compiler import CompiledRule

__all__ = [
    "APPROVALS_DB",
    "ApprovalBook",
    "Step",
    "StepKind",
    "new_approval_id",
    "requirement_for",
]

APPROVALS_DB = b"approvals"
APPROVAL_ID_PREFIX = "apr_"
# 16 random bytes: ids cannot be guessed, and 26 base32 characters are
# safe in URLs and as LMDB keys.
APPROVAL_ID_BYTES = 16
RATE_WINDOW_NANOS = 60 * NANOS_PER_SECOND
# The expiry task wakes at the next expiry, and at least this often, so a
# clock that jumps (NTP, a suspended VM) is caught up within a minute.
MAX_EXPIRY_SLEEP_SECONDS = 60.0
# How often final approvals past keeping are looked for in memory.
DROP_OLD_EVERY_NANOS = 60 * NANOS_PER_SECOND
# After a failed expiry commit (the log full, say), try again this soon.
EXPIRY_RETRY_SECONDS = 5.0
# How many of the log's last records seed the agents' recent actions, per
# record of approvals.risk.unusual_window: several agents may share a log.
SEED_RECORDS_PER_WINDOW = 4

_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(Approval)

log = logging.getLogger("kynara.approvals")


def _fields(**fields: object) -> dict[str, dict[str, object]]:
    return {"fields": {"component": "approvals", **fields}}


def new_approval_id() -> str:
    """``apr_`` and 26 lowercase base32 characters of 16 random bytes."""
    return random_id(APPROVAL_ID_PREFIX, APPROVAL_ID_BYTES)


def requirement_for(
    rules: Sequence[CompiledRule], config: ApprovalsConfig
) -> Requirement:
    """Combine the asking rules' ``approval`` blocks (``Requirement``): the
    most approvers, the roles of each rule naming some, self approval only
    if every rule allows it, and the earliest expiry, capped at
    ``approvals.max_expiry_seconds``."""
    approvers, roles, allow_self = 1, [], bool(rules)
    expiry = config.max_expiry_seconds
    for rule in rules:
        block = rule.approval
        approvers = max(approvers, block.approvers if block else 1)
        if block and block.reviewer_roles and block.reviewer_roles not in roles:
            roles.append(tuple(block.reviewer_roles))
        allow_self = allow_self and bool(block and block.allow_self_approval)
        seconds = (block.expires_in_seconds if block else 0) or (
            config.default_expiry_seconds
        )
        expiry = min(expiry, seconds)
    return Requirement(
        approvers=approvers,
        reviewer_roles=tuple(roles),
        allow_self_approval=allow_self,
        expires_in_seconds=expiry,
    )


def _rfc3339(nanos: int) -> str:
    return format_timestamp(Timestamp.from_nanos(nanos))


class StepKind(enum.StrEnum):
    """What a decision does with an approval."""

    # A new approval opened: require_approval citing it.
    OPENED = "opened"
    # The pending approval of the same request: require_approval citing it.
    REUSED = "reused"
    # A grant used: allow (approval_granted).
    USED = "used"
    # The approval cannot be used: deny with ``reason_code``.
    REFUSED = "refused"


class Step(NamedTuple):
    """One decision's part in an approval's life, before the commit.

    ``approval`` is as it will be after the commit (None for a refusal that
    names no approval of this agent); ``reason_code`` and ``reason`` replace
    the engine's when set; ``changes`` commit with the decision record, and
    ``records`` after it.
    """

    kind: StepKind
    approval: Approval | None
    reason_code: ReasonCode | None = None
    reason: str = ""
    changes: tuple[StateChange, ...] = ()
    records: tuple[AuditRecordV1, ...] = ()


def _change(approval: Approval) -> StateChange:
    return (APPROVALS_DB, approval.id.encode("ascii"), _ENCODER.encode(approval))


class ApprovalBook:
    """This daemon's approvals: the ``Inbox`` reviewers use, and what the
    pipeline needs to open, reuse and use them.

    Args:
        store: the audit store, opened with ``extra_dbs=(b"approvals",)``.
        writer: where review and expiry records are committed (the audit
            writer, not a backlog gate: a review must be recordable).
        config: the ``approvals`` section.
        daemon_id: this daemon's log origin, for the approvals' records.
        clock: nanoseconds since the epoch (the pipeline's clock).
        url_for: the review URL of an approval id; asked when one is
            opened (the HTTP listener starts after the book).
        metrics: where state changes and expiry failures are counted.
    """

    def __init__(
        self,
        store: AuditStore,
        writer: AuditSink,
        config: ApprovalsConfig,
        *,
        daemon_id: str,
        clock: Callable[[], int],
        url_for: Callable[[str], str] = lambda approval_id: "",
        metrics: Metrics | None = None,
    ):
        if APPROVALS_DB not in store.extra_dbs:
            raise ValueError(
                f"audit store {store.path} was opened without the "
                f"{APPROVALS_DB.decode()} database"
            )
        self._store = store
        self._writer = writer
        self.config = config
        self.daemon_id = daemon_id
        self._clock = clock
        self.url_for = url_for
        self._metrics = metrics
        self._approvals: dict[str, Approval] = {}
        self._created: dict[str, int] = {}
        self._expires: dict[str, int] = {}
        # Opened by a decision whose commit has not returned yet.
        self._provisional: set[str] = set()
        # Approved grants a retry in flight is using.
        self._reserved: set[str] = set()
        # Being expired by the expiry task right now.
        self._expiring: set[str] = set()
        self._pending: dict[tuple[str, str], str] = {}
        # (agent, digest) -> the latest approved, unused approval of it.
        self._approved: dict[tuple[str, str], str] = {}
        # (agent, digest) -> its approvals held that ended rejected or expired.
        self._closed: dict[tuple[str, str], set[str]] = {}
        self._pending_count: collections.Counter[str] = collections.Counter()
        self._opened_at: dict[str, collections.deque[int]] = {}
        window = config.risk.unusual_window
        self._recent: dict[str, collections.deque[str]] = collections.defaultdict(
            lambda: collections.deque(maxlen=window)
        )
        self._recent_count: dict[str, collections.Counter[str]] = (
            collections.defaultdict(collections.Counter)
        )
        # (expires_at nanos, id) of open approvals, a heap; entries whose
        # approval has since closed or moved are skipped when they surface,
        # so the expiry task's look is O(log n), not a scan of every one.
        self._deadlines: list[tuple[int, str]] = []
        # When final approvals past keeping were last dropped from memory.
        self._dropped_at: int | None = None
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._watchers: dict[str, set[asyncio.Queue[Approval]]] = {}
        self._listeners: list[Callable[[Approval], None]] = []
        if metrics is not None:
            metrics.watch_pending_approvals(self._pending_committed)

    def _pending_committed(self) -> int:
        # Opened approvals whose commit has not returned are not counted.
        return sum(self._pending_count.values()) - len(self._provisional)

    # ----------------------------------------------------------- lifecycle

    def load(self) -> int:
        """Read every approval from LMDB and seed the agents' recent actions.

        Returns:
            How many approvals are held in memory.
        """
        now = self._clock()
        keep_final = self.config.max_expiry_seconds * NANOS_PER_SECOND
        for _, raw in self._store.iter_state(APPROVALS_DB):
            approval = _DECODER.decode(raw)
            if approval.state in FINAL_STATES and approval.resolved_at:
                if now - nanos_of(approval.resolved_at) > keep_final:
                    continue
            self._remember(approval)
        self._seed_recent()
        log.info(
            "approvals loaded",
            extra=_fields(
                approvals=len(self._approvals),
                pending=sum(self._pending_count.values()),
            ),
        )
        return len(self._approvals)

    def _seed_recent(self) -> None:
        head = self._store.head().seq
        count = self.config.risk.unusual_window * SEED_RECORDS_PER_WINDOW
        start = max(head - count + 1, self._store.seam() + 1, 1)
        for stored in self._store.iter_records(start):
            try:
                record = decode_record(stored.record_bytes)
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue
            if record.kind == RecordKind.DECISION and record.chain and record.action:
                self.note_action(record.chain[-1].id, record.action)

    def start(self) -> None:
        """Start the expiry task (it expires what is already past first)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run_expiry(), name="kynara-approvals-expiry"
            )

    async def close(self) -> None:
        """Stop the expiry task and end every watch. Idempotent."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        for queues in self._watchers.values():
            for queue in queues:
                queue.put_nowait(None)  # type: ignore[arg-type]
        self._watchers.clear()

    # ------------------------------------------------------------ listeners

    def subscribe(self, callback: Callable[[Approval], None]) -> Callable[[], None]:
        """Call ``callback(approval)`` after each committed change (opened,
        reviewed, resolved, used). It runs on the loop and must not block;
        what it raises is logged and ignored. Returns the unsubscribe."""
        self._listeners.append(callback)
        return lambda: self._listeners.remove(callback)

    async def watch(self, approval_id: str) -> AsyncIterator[Approval]:
        """The approval's state now, then each change, ending after a state
        other than pending (approved, rejected, expired, used): what an
        agent waits for. Ends early when the book closes.

        Raises:
            NotFound: no approval has that id.
        """
        approval = self.get(approval_id)
        if approval is None:
            raise NotFound(f"no approval {approval_id!r}", field="approval_id")
        queue: asyncio.Queue[Approval] = asyncio.Queue()
        self._watchers.setdefault(approval_id, set()).add(queue)
        try:
            yield approval
            while approval.state is ApprovalState.PENDING:
                changed = await queue.get()
                if changed is None:
                    return
                approval = changed
                yield approval
        finally:
            queues = self._watchers.get(approval_id)
            if queues is not None:
                queues.discard(queue)
                if not queues:
                    del self._watchers[approval_id]

    def _publish(self, approval: Approval) -> None:
        if self._metrics is not None:
            self._metrics.approval_changes.labels(str(approval.state)).inc()
        for queue in self._watchers.get(approval.id, ()):
            queue.put_nowait(approval)
        for listener in list(self._listeners):
            try:
                listener(approval)
            except Exception as err:
                log.warning(
                    "approval listener failed",
                    extra=_fields(
                        approval_id=approval.id,
                        decision_id=approval.decision_id,
                        error=str(err),
                    ),
                )

    # ---------------------------------------------------------------- inbox

    def get(self, approval_id: str) -> Approval | None:
        """One approval (from memory, else LMDB), or None."""
        if approval_id in self._provisional:
            return None
        found = self._approvals.get(approval_id)
        if found is not None:
            return found
        if not approval_id.startswith(APPROVAL_ID_PREFIX) or not approval_id.isascii():
            return None
        raw = self._store.get_state(APPROVALS_DB, approval_id.encode("ascii"))
        return None if raw is None else _DECODER.decode(raw)

    def list(self, query: InboxQuery) -> list[Approval]:
        """Approvals held in memory matching ``query``, newest first.

        Raises:
            InvalidRequest: ``query.after`` names no approval.
        """
        # TODO(#9): a sorted index instead of a sort per call, if inboxes
        # with many thousands of open approvals turn up.
        return query.page(
            (a for a in self._approvals.values() if a.id not in self._provisional),
            self.get,
            lambda a: self._created[a.id],
        )

    async def review(
        self,
        approval_id: str,
        reviewer: Reviewer,
        verdict: Verdict,
        comment: str,
        *,
        via: str = "daemon",
        view: str = "",
    ) -> Approval:
        """Approve or reject as ``reviewer`` (see ``model.Inbox.review``);
        ``via`` names where the review came from: "daemon", or a fleet
        inbox; ``view``, when given, the view digest of what the reviewer was
        shown (refused when the approval differs).

        Raises:
            NotFound, ApprovalClosed, SelfApproval, RoleMissing,
            InvalidRequest, AuditUnavailable: as ``Inbox.review``; nothing
                changed.
        """
        async with self._lock:
            approval = check_current(approval_id, self.get(approval_id), view)
            now = self._clock()
            check_review(approval, reviewer, comment, now=now)
            state = outcome(approval, verdict)
            review = Review(
                reviewer=reviewer.id,
                roles=tuple(sorted(reviewer.roles)),
                verdict=verdict,
                at=_rfc3339(now),
                comment=comment,
                via=via,
            )
            after = msgspec.structs.replace(
                approval,
                state=state,
                reviews=(*approval.reviews, review),
                resolved_at=review.at if state is not ApprovalState.PENDING else "",
            )
            if state is ApprovalState.PENDING:
                record = reviewed_record(after, review)
            else:
                record = resolved_record(after, review)
            await self._writer.append(record, [_change(after)])
            self._remember(after)
            log.info(
                "approval reviewed",
                extra=_fields(
                    approval_id=approval_id,
                    decision_id=approval.decision_id,
                    reviewer=reviewer.id,
                    verdict=str(verdict),
                    state=str(state),
                    via=via,
                ),
            )
        self._publish(after)
        return after

    # ------------------------------------------------------------- pipeline

    def action_seen(self, agent_id: str, action: str) -> bool:
        """Whether the agent did ``action`` in its latest decisions."""
        counts = self._recent_count.get(agent_id)
        return bool(counts and counts[action])

    def note_action(self, agent_id: str, action: str) -> None:
        """Count one decision of ``agent_id`` (the pipeline calls this for
        every decision, after scoring it)."""
        recent, counts = self._recent[agent_id], self._recent_count[agent_id]
        if len(recent) == recent.maxlen:
            dropped = recent[0]
            counts[dropped] -= 1
            if not counts[dropped]:
                del counts[dropped]
        recent.append(action)
        counts[action] += 1

    def request(
        self,
        *,
        agent_id: str,
        digest: str,
        now: int,
        make: Callable[[], Approval],
        asking: Iterable[tuple[str, str, str]] = (),
        requirement: Requirement | None = None,
    ) -> Step:
        """A require_approval decision without an approval id: reuse the
        pending approval of this agent and digest; else cite its approved,
        unused one that would grant now (``check_grant`` with ``asking``
        and ``requirement``, the rules asking now), so that the retry with
        its id is allowed; else open one from ``make()`` (checked against
        the rate limits)."""
        existing = self._pending.get((agent_id, digest))
        if existing is not None:
            approval = self._approvals[existing]
            if not self._due(approval, now) and existing not in self._expiring:
                return Step(StepKind.REUSED, approval)
        granted = self._approved.get((agent_id, digest))
        if granted is not None and requirement is not None:
            approval = self._approvals[granted]
            usable = (
                not self._due(approval, now)
                and granted not in self._expiring
                and granted not in self._reserved
                and check_grant(approval, requirement, asking, now=now) is None
            )
            if usable:
                return Step(StepKind.REUSED, approval)
        refusal = self._rate_limited(agent_id, now)
        if refusal:
            return Step(
                StepKind.REFUSED, None, ReasonCode.APPROVAL_RATE_LIMITED, refusal
            )
        approval = make()
        previous = self._previous(agent_id, digest)
        if previous:
            approval = msgspec.structs.replace(approval, previous=previous)
        self._provisional.add(approval.id)
        self._remember(approval)
        self._opened_at.setdefault(agent_id, collections.deque()).append(now)
        return Step(StepKind.OPENED, approval, changes=(_change(approval),))

    def _previous(self, agent_id: str, digest: str) -> tuple[str, ...]:
        closed = [self._approvals[i] for i in self._closed.get((agent_id, digest), ())]
        closed.sort(key=_resolved_key, reverse=True)
        return tuple(a.id for a in closed[:MAX_PREVIOUS])

    def opened_records(
        self, step: Step, decision: AuditRecordV1
    ) -> tuple[AuditRecordV1, ...]:
        """The records a step adds after its decision record."""
        if step.kind is StepKind.OPENED and step.approval is not None:
            return (requested_record(step.approval, decision),)
        return ()

    def use(
        self,
        approval_id: str,
        *,
        agent_id: str,
        digest: str,
        asking: Iterable[tuple[str, str, str]],
        requirement: Requirement,
        now: int,
        decision_id: str,
    ) -> Step:
        """A require_approval decision of a retry naming ``approval_id``:
        the grant reserved and used (``USED``), the pending approval cited
        again (``REUSED``), or why not (``REFUSED``). ``asking`` holds the
        (policy, rule, principal) of each rule asking now, ``requirement``
        their combined requirement: an approved approval grants only if it
        satisfies both now (``eligibility.check_grant``)."""
        approval = self._approvals.get(approval_id)
        if approval is None and approval_id not in self._provisional:
            approval = self.get(approval_id)
        if approval is None or approval.agent_id != agent_id:
            return self._refuse(
                None,
                ReasonCode.APPROVAL_NOT_FOUND,
                f"no approval {approval_id!r} of agent {agent_id!r}",
            )
        if approval.digest != digest:
            return self._refuse(
                approval,
                ReasonCode.APPROVAL_MISMATCH,
                f"approval {approval_id} was given for another request (the "
                "user, agents, action, resource or context differ)",
            )
        state = approval.state
        if state in (ApprovalState.PENDING, ApprovalState.APPROVED) and (
            self._due(approval, now) or approval_id in self._expiring
        ):
            state = ApprovalState.EXPIRED
        if state is ApprovalState.APPROVED and approval_id in self._reserved:
            state = ApprovalState.USED
        refusal = _REFUSALS.get(state)
        if refusal is not None:
            code, what = refusal
            return self._refuse(approval, code, f"approval {approval_id} {what}")
        if state is ApprovalState.PENDING:
            return Step(StepKind.REUSED, approval)
        # The policies may have been reloaded since the reviews: the grant
        # must satisfy the rules asking now, not those that asked then.
        shortfall = check_grant(approval, requirement, asking, now=now)
        if shortfall is not None:
            return self._refuse(approval, shortfall.code, shortfall.reason)
        self._reserved.add(approval_id)
        after = msgspec.structs.replace(
            approval, state=ApprovalState.USED, used_by=decision_id
        )
        reviewers = ", ".join(after.approvers)
        return Step(
            StepKind.USED,
            after,
            ReasonCode.APPROVAL_GRANTED,
            f"allowed once by approval {approval_id}, approved by {reviewers}",
            changes=(_change(after),),
        )

    def _refuse(self, approval: Approval | None, code: ReasonCode, reason: str) -> Step:
        return Step(StepKind.REFUSED, approval, code, reason)

    def committed(self, step: Step) -> None:
        """The step's changes are committed: make them visible."""
        approval = step.approval
        if approval is None or step.kind not in (StepKind.OPENED, StepKind.USED):
            return
        self._provisional.discard(approval.id)
        self._reserved.discard(approval.id)
        self._remember(approval)
        if step.kind is StepKind.OPENED:
            self._wake.set()
            log.info(
                "approval opened",
                extra=_fields(
                    approval_id=approval.id,
                    decision_id=approval.decision_id,
                    agent_id=approval.agent_id,
                    action=approval.action,
                    risk=approval.risk.score,
                ),
            )
        self._publish(approval)

    def aborted(self, step: Step) -> None:
        """The step's commit failed: undo its reservation."""
        approval = step.approval
        if approval is None:
            return
        if step.kind is StepKind.USED:
            self._reserved.discard(approval.id)
            self._wake.set()
        elif step.kind is StepKind.OPENED and approval.id in self._provisional:
            self._provisional.discard(approval.id)
            self._forget(approval.id)
            opened = self._opened_at.get(approval.agent_id)
            if opened:
                opened.pop()

    def _rate_limited(self, agent_id: str, now: int) -> str:
        cfg = self.config
        if self._pending_count[agent_id] >= cfg.max_pending_per_agent:
            return (
                f"agent {agent_id!r} has {self._pending_count[agent_id]} approvals "
                f"pending, the most approvals.max_pending_per_agent allows"
            )
        opened = self._opened_at.get(agent_id)
        while opened and now - opened[0] >= RATE_WINDOW_NANOS:
            opened.popleft()
        if opened and len(opened) >= cfg.max_new_per_agent_per_minute:
            return (
                f"agent {agent_id!r} opened {len(opened)} approvals in the last "
                "minute, the most approvals.max_new_per_agent_per_minute allows"
            )
        return ""

    # ---------------------------------------------------------------- expiry

    def _due(self, approval: Approval, now: int) -> bool:
        expires = self._expires.get(approval.id)
        if expires is None:
            expires = nanos_of(approval.expires_at)
        return now >= expires

    async def expire_due(self) -> int:
        """Record ``expired`` for every open approval past ``expires_at``
        (one transaction), and drop old final ones from memory.

        Returns:
            How many expired.

        Raises:
            AuditUnavailable: the records could not be committed; nothing
                changed.
        """
        async with self._lock:
            now = self._clock()
            due = self._take_due(now)
            after: list[Approval] = []
            if due:
                after = [
                    msgspec.structs.replace(
                        a, state=ApprovalState.EXPIRED, resolved_at=_rfc3339(now)
                    )
                    for a in due
                ]
                self._expiring.update(a.id for a in due)
                try:
                    await self._writer.append_all(
                        [resolved_record(a) for a in after], [_change(a) for a in after]
                    )
                except BaseException:
                    # Not expired after all: due again at the next look.
                    for approval in due:
                        self._push_deadline(approval)
                    raise
                finally:
                    self._expiring.difference_update(a.id for a in due)
                for approval in after:
                    self._remember(approval)
                    log.info(
                        "approval expired",
                        extra=_fields(
                            approval_id=approval.id,
                            decision_id=approval.decision_id,
                            agent_id=approval.agent_id,
                        ),
                    )
            self._drop_old(now)
        for approval in after:
            self._publish(approval)
        return len(due)

    def _open_deadline(self, entry: tuple[int, str]) -> bool:
        """Whether a heap entry still stands for an open approval's expiry."""
        expires, approval_id = entry
        approval = self._approvals.get(approval_id)
        return (
            approval is not None
            and approval.state in (ApprovalState.PENDING, ApprovalState.APPROVED)
            and self._expires.get(approval_id) == expires
        )

    def _push_deadline(self, approval: Approval) -> None:
        heapq.heappush(self._deadlines, (self._expires[approval.id], approval.id))

    def _take_due(self, now: int) -> list[Approval]:
        """Pop the open approvals past their expiry. A reserved or
        provisional one is not expired now: it goes back on the heap, and
        its retry or opening wakes the task when settled."""
        due: dict[str, Approval] = {}
        held: list[tuple[int, str]] = []
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            entry = heapq.heappop(heap)
            # An approval pushed again (pending, then approved) surfaces twice.
            if not self._open_deadline(entry) or entry[1] in due:
                continue
            approval_id = entry[1]
            if approval_id in self._reserved or approval_id in self._provisional:
                held.append(entry)
            else:
                due[approval_id] = self._approvals[approval_id]
        for entry in held:
            heapq.heappush(heap, entry)
        return list(due.values())

    def _next_due(self) -> int | None:
        # Stale entries are dropped on the way; a reserved or provisional
        # one is looked past (its settling wakes the task).
        heap = self._deadlines
        held: list[tuple[int, str]] = []
        found: int | None = None
        while heap:
            entry = heap[0]
            if not self._open_deadline(entry):
                heapq.heappop(heap)
                continue
            if entry[1] in self._reserved or entry[1] in self._provisional:
                held.append(heapq.heappop(heap))
                continue
            found = entry[0]
            break
        for entry in held:
            heapq.heappush(heap, entry)
        return found

    async def _run_expiry(self) -> None:
        while True:
            delay = MAX_EXPIRY_SLEEP_SECONDS
            try:
                await self.expire_due()
            except AuditUnavailable as err:
                if self._metrics is not None:
                    self._metrics.approval_expiry_failures.inc()
                log.error(
                    "approvals not expired: the audit log refused the records",
                    extra=_fields(error=str(err), retry_seconds=EXPIRY_RETRY_SECONDS),
                )
                delay = EXPIRY_RETRY_SECONDS
            due = self._next_due()
            if due is not None:
                left = (due - self._clock()) / NANOS_PER_SECOND
                delay = min(delay, max(left, 0.0))
            self._wake.clear()
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can
            # swallow the cancellation of close() when the wake-up lands
            # at the same moment, and the task would run on.
            try:
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            except TimeoutError:
                pass

    def wake(self) -> None:
        """Have the expiry task look again now (a test moved the clock).
        Call it on the book's loop (``loop.call_soon_threadsafe``)."""
        self._wake.set()

    def _drop_old(self, now: int) -> None:
        # A scan of every approval held: at most once a minute, not at every
        # look of the expiry task (which each opened approval wakes).
        if (
            self._dropped_at is not None
            and now - self._dropped_at < DROP_OLD_EVERY_NANOS
        ):
            return
        self._dropped_at = now
        keep = self.config.max_expiry_seconds * NANOS_PER_SECOND
        old = [
            a.id
            for a in self._approvals.values()
            if a.state in FINAL_STATES
            and a.resolved_at
            and now - nanos_of(a.resolved_at) > keep
            and a.id not in self._watchers
        ]
        for approval_id in old:
            self._forget(approval_id)

    # --------------------------------------------------------------- memory

    def _remember(self, approval: Approval) -> None:
        self._forget(approval.id)
        self._approvals[approval.id] = approval
        self._created[approval.id] = nanos_of(approval.created_at)
        self._expires[approval.id] = nanos_of(approval.expires_at)
        if approval.state in (ApprovalState.PENDING, ApprovalState.APPROVED):
            self._push_deadline(approval)
        if approval.state is ApprovalState.PENDING:
            self._pending[(approval.agent_id, approval.digest)] = approval.id
            self._pending_count[approval.agent_id] += 1
        elif approval.state is ApprovalState.APPROVED:
            self._approved[(approval.agent_id, approval.digest)] = approval.id
        elif approval.state in _ASKED_BEFORE:
            key = (approval.agent_id, approval.digest)
            self._closed.setdefault(key, set()).add(approval.id)

    def _forget(self, approval_id: str) -> None:
        old = self._approvals.pop(approval_id, None)
        self._created.pop(approval_id, None)
        self._expires.pop(approval_id, None)
        if old is not None and old.state is ApprovalState.PENDING:
            key = (old.agent_id, old.digest)
            if self._pending.get(key) == approval_id:
                del self._pending[key]
            self._pending_count[old.agent_id] -= 1
            if not self._pending_count[old.agent_id]:
                del self._pending_count[old.agent_id]
        elif old is not None and old.state is ApprovalState.APPROVED:
            key = (old.agent_id, old.digest)
            if self._approved.get(key) == approval_id:
                del self._approved[key]
        elif old is not None and old.state in _ASKED_BEFORE:
            key = (old.agent_id, old.digest)
            closed = self._closed.get(key)
            if closed is not None:
                closed.discard(approval_id)
                if not closed:
                    del self._closed[key]


def _resolved_key(approval: Approval) -> tuple[int, str]:
    return (nanos_of(approval.resolved_at) if approval.resolved_at else 0, approval.id)


# The ends a new approval of the same request names (``Approval.previous``).
_ASKED_BEFORE = frozenset({ApprovalState.REJECTED, ApprovalState.EXPIRED})


# Approvals in these states cannot be used: the reason code and why.
_REFUSALS = {
    ApprovalState.REJECTED: (ReasonCode.APPROVAL_REJECTED, "was rejected"),
    ApprovalState.EXPIRED: (ReasonCode.APPROVAL_EXPIRED, "expired before it was used"),
    ApprovalState.USED: (ReasonCode.APPROVAL_USED, "was used already: it allows once"),
}
