"""The one decision pipeline every front door calls.

validate the request -> establish the delegation chain -> evaluate with the
active policy set -> append the audit record -> count -> answer.

A front door (gRPC today; the fast path, the MCP gateway and Envoy
ext_authz later) translates its wire format into ``IncomingRequest`` and the
``Answer`` back. It never decides, logs or counts on its own, so every door
gets the same answer, record and decision id.

Fail closed: a decision whose audit record cannot be committed is not given;
the caller gets ``AuditUnavailable`` instead.

Privacy: the engine decides on the request as sent; the entries named by
``audit.redact`` are hashed or dropped in the record only
(``kynara_sidecar.audit.redact``), and the record lists them.

Approvals (with an ``ApprovalBook``): a require_approval decision reuses
the pending approval of the same agent and binding digest, or cites its
approved, unused one that would grant now (state ``approved``: the retry
with its id is allowed), or opens one (rate limits permitting: else deny
``approval_rate_limited``). A request
naming ``approval_id`` is decided again under the current policies; only
when the engine says require_approval is the approval looked at: a grant
that binds this very request and satisfies every rule asking now (their
reviewer roles, self approval and expiry, as well as the approver count)
turns it into an allow (``approval_granted``), committed in one transaction with
the approval's ``used`` state; anything else is a deny naming why
(``book.ApprovalBook.use``). An approval never lifts a deny, and an allow
leaves it untouched. The decision record carries the approval and its
risk; the records and state changes of every request of a batch commit in
one transaction.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import msgspec

from kynara_sidecar import engine
from kynara_sidecar.approvals.binding import binding_digest, encoded_binding_digest
from kynara_sidecar.approvals.book import (
    ApprovalBook,
    Step,
    StepKind,
    new_approval_id,
    requirement_for,
)
from kynara_sidecar.approvals.model import (
    Approval,
    ApprovalState,
    AskingRule,
    ChainPrincipal,
    Requirement,
)
from kynara_sidecar.approvals.records import with_approval
from kynara_sidecar.approvals.risk import score_risk
from kynara_sidecar.audit import AuditSink
from kynara_sidecar.audit.counters import LIMITS_DB, rows_of
from kynara_sidecar.audit.record import (
    RECORD_VERSION,
    AuditRecordV1,
    GatewayEntry,
    LimitEntry,
    RecordKind,
    format_timestamp,
    record_from_decision,
)
from kynara_sidecar.audit.store import Appended, StateChange
from kynara_sidecar.config import Config, IdentityMode
from kynara_sidecar.decision import (
    NANOS_PER_SECOND,
    DecisionRequest,
    Effect,
    Env,
    MatchedRule,
    Resource,
    Timestamp,
    Value,
)
from kynara_sidecar.errors import (
    AuditUnavailable,
    IdentityInvalid,
    InvalidRequest,
    KynaraError,
    PolicyNotReady,
    ReasonCode,
    ServiceError,
    ShuttingDown,
)
from kynara_sidecar.identity import (
    AgentCredentials,
    PeerCertificate,
    TokenVerifier,
    place_agent,
)
from kynara_sidecar.limits import check as limit_check
from kynara_sidecar.limits.book import Counted, LimitBook
from kynara_sidecar.metrics import Metrics
from kynara_sidecar.policy.compiler import CompiledRule
from kynara_sidecar.policy.loader import LoadedPolicies
from kynara_sidecar.policy.names import (
    MAX_NAME_LENGTH,
    canonical_name,
    check_dotted_name,
)

__all__ = ["Answer", "IncomingRequest", "Pipeline", "new_decision_id"]

MAX_RESOURCE_ID_LENGTH = 1024
MAX_REQUEST_ID_LENGTH = 128
# user -> orchestrator -> sub-agents: real chains are a handful of hops.
MAX_CHAIN_DEPTH = 16
# Approval ids are "apr_" and 26 base32 characters; anything much longer is
# no approval id.
MAX_APPROVAL_ID_LENGTH = 64
# Names (actions, resource kinds, principal ids) that passed validation
# recently, so the same few names are not checked again on every request;
# a caller sending ever new names only makes the set clear and refill.
MAX_VALID_NAMES = 4096
_valid_names: set[str] = set()
_valid_principals: set[str] = set()


class IncomingRequest(msgspec.Struct, frozen=True):
    """A request as a front door received it, before identity is established."""

    action: str
    resource: Resource
    context: dict[str, Value] = {}
    asserted_chain: tuple[str, ...] = ()
    delegation_token: str = ""
    request_id: str = ""
    peer: str = ""
    # The caller's `authorization` metadata: multi-agent mode's bearer
    # secret, so never log a request whole.
    authorization: str = ""
    # The client certificate the connection's TLS handshake verified (the
    # agent listener's TLS port); in multi-agent mode it names the agent.
    certificate: PeerCertificate | None = None
    # Ask the engine for an explanation; it rides back on the answer only
    # and is never stored in the audit record.
    explain: bool = False
    # Use this approved approval (a retry after require_approval).
    approval_id: str = ""
    # The front door's own part of the record (the MCP gateway's server,
    # tool and argument digest).
    gateway: GatewayEntry | None = None


class Answer(msgspec.Struct, frozen=True):
    """A decision together with where its audit record sits in the log."""

    decision: engine.Decision
    decision_id: str
    audit_sequence: int
    record_hash: str
    request_id: str = ""
    # The approval asked for (require_approval), used (an allow with
    # approval_granted) or refused (a deny with an approval_* reason), as
    # it is after this answer; None when no approval of this agent is
    # concerned.
    approval: Approval | None = None
    # What each limit read or counted was for this decision (its record's).
    limits: dict[str, LimitEntry] = {}


# Random bytes drawn from the OS at once, 16 per decision id: one system
# call (which also gives up the GIL, and under load waits to get it back
# from the audit writer) per this many ids instead of one each.
_RANDOM_IDS = 256
_random = bytearray()
# A forked child must not hand out its parent's ids.
os.register_at_fork(after_in_child=_random.clear)


def new_decision_id() -> str:
    """A random (version 4) UUID in its usual text form, as ``uuid.uuid4``
    makes it, for a fraction of the time: a decision's id.

    The bytes come from ``os.urandom`` as uuid4's do, drawn for many ids
    at a time; each is used once.
    """
    if not _random:
        _random.extend(os.urandom(16 * _RANDOM_IDS))
    digits = _random[-16:].hex()
    del _random[-16:]
    # Version 4 in the 13th digit; the variant's two bits (10) in the 17th.
    variant = "89ab"[int(digits[16], 16) & 3]
    return (
        f"{digits[:8]}-{digits[8:12]}-4{digits[13:16]}-"
        f"{variant}{digits[17:20]}-{digits[20:]}"
    )


def _remember(valid: set[str], value: str) -> None:
    if len(valid) >= MAX_VALID_NAMES:
        valid.clear()
    valid.add(value)


def _check_name(value: str, field: str) -> None:
    if value in _valid_names:
        return
    try:
        check_dotted_name(value)
    except ValueError as err:
        raise InvalidRequest(str(err), field=field) from None
    _remember(_valid_names, value)


def validate_request(request: IncomingRequest) -> None:
    """Raise ``InvalidRequest`` naming the first malformed field.

    Actions and resource kinds must be dotted ASCII names; principal ids
    must pass ``names.canonical_name`` (no control, zero-width or
    mixed-script characters), the rule directory ids passed at load.
    """
    _check_name(request.action, "action")
    _check_name(request.resource.kind, "resource.kind")
    if len(request.resource.id) > MAX_RESOURCE_ID_LENGTH:
        raise InvalidRequest(
            f"expected at most {MAX_RESOURCE_ID_LENGTH} characters, "
            f"got {len(request.resource.id)}",
            field="resource.id",
        )
    if len(request.request_id) > MAX_REQUEST_ID_LENGTH:
        raise InvalidRequest(
            f"expected at most {MAX_REQUEST_ID_LENGTH} characters, "
            f"got {len(request.request_id)}",
            field="request_id",
        )
    if len(request.approval_id) > MAX_APPROVAL_ID_LENGTH:
        raise InvalidRequest(
            f"expected at most {MAX_APPROVAL_ID_LENGTH} characters, "
            f"got {len(request.approval_id)}",
            field="approval_id",
        )
    validate_chain(request.asserted_chain)


def validate_chain(asserted_chain: Sequence[str]) -> None:
    """Raise ``InvalidRequest`` naming the first malformed principal of an
    asserted chain (``validate_request``'s rule, for ``Pipeline.chain_of``)."""
    if len(asserted_chain) >= MAX_CHAIN_DEPTH:
        raise InvalidRequest(
            f"expected fewer than {MAX_CHAIN_DEPTH} principals, "
            f"got {len(asserted_chain)}",
            field="asserted_chain",
        )
    for i, principal in enumerate(asserted_chain):
        if principal in _valid_principals:
            continue
        if not principal or len(principal) > MAX_NAME_LENGTH:
            raise InvalidRequest(
                f"expected a principal id of 1..{MAX_NAME_LENGTH} characters",
                field=f"asserted_chain[{i}]",
            )
        # The same rule the directory's ids passed at load (see names).
        try:
            canonical_name(principal)
        except ValueError as err:
            raise InvalidRequest(str(err), field=f"asserted_chain[{i}]") from None
        _remember(_valid_principals, principal)


class Pipeline:
    """Decides requests against the active policies and logs every answer.

    Args:
        config: the daemon configuration (identity, env).
        writer: the started audit writer.
        metrics: where decisions and errors are counted.
        clock: nanoseconds since the epoch; read once per request.
        book: the daemon's approvals; without one (the audit log is down,
            so nothing is answered anyway) a require_approval decision
            carries no approval.
        limits: the counted decisions of the declared limits; without one
            (tests, no audit log) the pipeline keeps its own in memory
            (``LimitBook(None)``), which count until the daemon stops.
        fleet: the other daemons' part of fleet-scope limits (the central
            store); without it a fleet limit has no value and fails closed.
        on_counted: called on the loop with what the limits counted, once
            the records carrying it committed (the fleet's share of it).
    """

    def __init__(
        self,
        config: Config,
        writer: AuditSink,
        metrics: Metrics,
        clock: Callable[[], int] = time.time_ns,
        *,
        book: ApprovalBook | None = None,
        limits: LimitBook | None = None,
        fleet: limit_check.RemoteTally | None = None,
        on_counted: Callable[[Sequence[Counted]], None] | None = None,
    ):
        self._identity = config.identity
        self._env = config.env
        self._daemon_id = config.identity.daemon_id
        # Applied to the record only: the engine decides on the real values.
        self._redactor = config.audit.load_redactor()
        self._writer = writer
        self._metrics = metrics
        self._clock = clock
        self._approvals_config = config.approvals
        self._book = book
        self._limit_book = limits if limits is not None else LimitBook(None)
        self._fleet = fleet
        self._on_counted = on_counted
        self._verifier: TokenVerifier | None = None
        self._credentials: AgentCredentials | None = None
        if config.identity.mode is IdentityMode.VERIFIED:
            self._verifier = TokenVerifier(
                config.identity.load_issuers(),
                config.identity.max_clock_skew_seconds,
            )
        if config.identity.agents:
            self._credentials = AgentCredentials(
                config.identity.load_agent_secrets(),
                config.identity.agent_certificates(),
            )
        self._policies: LoadedPolicies | None = None
        # What the engine works out alike for every request under the
        # active policies; a new one per activation (engine.EvaluationCache).
        self._cache: engine.EvaluationCache | None = None
        # The active policies and, per decision object, what asked for
        # approval in it (``_asking_rules``).
        self._asking_memo: tuple[LoadedPolicies | None, dict[int, Any]] = (None, {})
        self._policy_watchers: list[Callable[[LoadedPolicies], None]] = []
        # Why no policy set can be active, when it is not just "not yet".
        self._unready: ServiceError | None = None
        self._closing = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def policies(self) -> LoadedPolicies | None:
        return self._policies

    @property
    def limits(self) -> LimitBook:
        """The counted decisions of the declared limits."""
        return self._limit_book

    @property
    def approvals(self) -> ApprovalBook:
        """The daemon's approvals (WaitApproval reads them).

        Raises:
            AuditUnavailable: there is none: the audit log is down.
        """
        if self._book is None:
            raise self._unready or AuditUnavailable(
                "approvals are unavailable: the audit log is not open"
            )
        return self._book

    def agent_of(
        self, authorization: str, certificate: PeerCertificate | None = None
    ) -> str:
        """The calling agent: the one its credential (the connection's
        client certificate, else the bearer secret in ``authorization``)
        names in multi-agent mode, else ``identity.agent_id``.

        Raises:
            IdentityInvalid: no credential, or an unknown one (multi-agent).
        """
        if self._credentials is not None:
            return self._credentials.authenticate(authorization, certificate)
        return self._identity.agent_id

    def activate(self, policies: LoadedPolicies) -> None:
        """Swap in a new policy set whole; in-flight requests keep the old one.

        The engine's cache starts afresh with it, so the very next decision
        sees the new policies and directory.
        """
        # The book first: should it fail, neither the cache nor the
        # policies change, so the cache is always the active set's.
        self._limit_book.activate(policies.policy_set.limits, self._clock())
        self._cache = engine.EvaluationCache(policies.policy_set, policies.directory)
        self._policies = policies
        self._metrics.set_policy(
            policies.policy_set.revision,
            policies.directory.revision,
            policies.policy_set.action_names,
            (
                f"{rule.policy}/{rule.id}"
                for rule in policies.policy_set.rules
                if rule.condition is not None
            ),
        )
        for watcher in list(self._policy_watchers):
            watcher(policies)

    def watch_policies(
        self, watcher: Callable[[LoadedPolicies], None]
    ) -> Callable[[], None]:
        """Call ``watcher`` with each policy set activated from now on (on
        the event loop, right after the swap); returns the unsubscribe."""
        self._policy_watchers.append(watcher)
        return lambda: self._policy_watchers.remove(watcher)

    def refuse_while_unready(self, error: ServiceError) -> None:
        """Answer ``error`` rather than ``PolicyNotReady`` while no set is
        active: the reason none can be (the audit log is down, say)."""
        self._unready = error

    def close(self) -> None:
        """Refuse new requests with ``ShuttingDown``; in-flight ones finish."""
        self._closing = True

    async def drain(self, timeout: float) -> int:
        """Wait up to ``timeout`` seconds for in-flight requests to finish.

        Returns:
            How many were still in flight when the wait ended.
        """
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            pass
        return self._in_flight

    def _establish_chain(
        self, request: IncomingRequest, now: Timestamp
    ) -> tuple[str, ...]:
        if self._verifier is not None:
            if request.asserted_chain:
                raise IdentityInvalid(
                    "expected a delegation token in identity.mode=verified, got "
                    "an asserted chain; asserted chains are for development mode",
                    field="asserted_chain",
                )
            # The caller's credential first: a token proves nothing about
            # which agent presents it.
            agent = self._identity.agent_id
            if self._credentials is not None:
                agent = self._credentials.authenticate(
                    request.authorization, request.certificate
                )
            chain = self._verifier.verify(
                request.delegation_token, now.seconds + now.nanos / 1_000_000_000
            )
            for i, principal in enumerate(chain):
                try:
                    canonical_name(principal)
                except ValueError as err:
                    raise IdentityInvalid(
                        f"chain: principal {i} of the token: {err}",
                        field="delegation_token",
                    ) from None
            return place_agent(chain, agent, must_be_last=self._credentials is not None)
        if request.delegation_token:
            raise IdentityInvalid(
                "delegation tokens are not accepted in identity.mode=development; "
                "send asserted_chain",
                field="delegation_token",
            )
        if not request.asserted_chain:
            raise InvalidRequest(
                "expected the user (and any intermediate agents) acting before "
                "this daemon's agent, got an empty chain",
                field="asserted_chain",
            )
        return (*request.asserted_chain, self._identity.agent_id)

    def _env_for(
        self, request: IncomingRequest, now: Timestamp, chain: tuple[str, ...]
    ) -> Env:
        return Env(
            now=now,
            daemon_id=self._daemon_id,
            # The calling agent: the configured one, or in multi-agent mode
            # the one its credential named, which is the chain's last.
            agent_id=chain[-1],
            environment=self._env.environment,
            region=self._env.region,
            labels=self._env.labels,
            peer=request.peer,
        )

    def chain_of(self, request: IncomingRequest) -> tuple[str, ...]:
        """Establish who is asking, exactly as ``decide`` would, without
        deciding: the delegation chain, user first and the calling agent last.

        Only the identity fields of ``request`` are read (the token or the
        asserted chain, and the credential in ``authorization``).

        Raises:
            IdentityInvalid, InvalidRequest: as ``decide`` raises them.
        """
        validate_chain(request.asserted_chain)
        now = Timestamp.from_nanos(self._clock())
        return self._establish_chain(request, now)

    def could_allow(
        self, chain: Sequence[str], targets: Sequence[tuple[str, str]]
    ) -> list[bool]:
        """Per (resource kind, action), whether some request by ``chain``
        could be allowed under the active policies (``engine.could_allow``):
        what a front door may show, never a decision.

        Raises:
            PolicyNotReady, AuditUnavailable: no policy set is active.
        """
        policies = self._policies
        if policies is None:
            raise self._unready or PolicyNotReady("no policy set is active yet")
        return [
            engine.could_allow(
                policies.policy_set, policies.directory, chain, kind, action
            )
            for kind, action in targets
        ]

    async def record_outcome(
        self,
        answer: Answer,
        outcome: str,
        *,
        gateway: GatewayEntry | None = None,
    ) -> None:
        """Append what became of an answered decision (``outcome``, e.g.
        "cancelled") as its own record naming the decision id.

        Raises:
            AuditUnavailable: the record could not be committed.
        """
        now = Timestamp.from_nanos(self._clock())
        record = AuditRecordV1(
            v=RECORD_VERSION,
            kind=RecordKind.OUTCOME,
            time=format_timestamp(now),
            daemon_id=self._daemon_id,
            decision_id=answer.decision_id,
            request_id=answer.request_id,
            gateway=gateway,
            outcome=outcome,
        )
        await self._writer.append(record)

    def refuse(self, error: KynaraError) -> None:
        """Count a request that got an error instead of a decision.

        ``decide`` counts its own; a front door calls this for a request it
        could not translate (undecodable, too large), so every door's
        refusals are counted alike.
        """
        self._metrics.request_errors.labels(str(error.code)).inc()
        if isinstance(error, AuditUnavailable):
            self._metrics.audit_failures.inc()

    def count_gateway_call(self, outcome: str) -> None:
        """Count what became of an MCP gateway tool call (``outcome``, one
        of ``metrics.GATEWAY_OUTCOMES``), as ``refuse`` counts refusals."""
        self._metrics.count_gateway_call(outcome)

    async def decide(self, request: IncomingRequest) -> Answer:
        """Answer one request, its audit record committed first.

        Raises:
            InvalidRequest, IdentityInvalid: the caller sent something bad.
            PolicyNotReady, AuditUnavailable, ShuttingDown: no answer can be
                given now; nothing was logged as answered.
        """
        (outcome,) = await self.decide_all([request])
        if isinstance(outcome, KynaraError):
            raise outcome
        return outcome

    async def decide_all(
        self, requests: Sequence[IncomingRequest]
    ) -> list[Answer | KynaraError]:
        """Answer several requests; their records commit together or not at all.

        Each request is decided or refused on its own (a bad item does not
        spoil the others), but the records of all the decided ones are
        committed in one transaction: if it fails, every one of them gets
        the ``AuditUnavailable`` instead of its answer.

        Returns:
            Per request, in order, its answer or the error that replaced it.
        """
        started = time.perf_counter()
        self._in_flight += 1
        self._idle.clear()
        try:
            outcomes = await self._decide_all(requests)
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()
        seconds = time.perf_counter() - started
        for request, outcome in zip(requests, outcomes, strict=True):
            if isinstance(outcome, KynaraError):
                self.refuse(outcome)
            else:
                self._count(request, outcome.decision, seconds)
        return outcomes

    def decide_soon(
        self,
        requests: Sequence[IncomingRequest],
        done: Callable[[list[Answer | Exception]], None],
    ) -> None:
        """``decide_all`` without a coroutine, for a front door that holds
        many independent requests at once (the fast path's pipelined
        frames): each is decided now, their records go to the writer in one
        call, and ``done`` gets, per request in order, its answer or the
        error that replaced it, on the loop once the records committed.

        The records commit in one transaction, as the writer's group commit
        would put them anyway: if it fails, every decided request gets the
        ``AuditUnavailable``. Counted as ``decide_all`` counts. ``done`` may
        be called before this returns (nothing to commit, or the writer
        refused at once). An error that is no ``KynaraError`` (a bug)
        replaces only the answer of the request that raised it, or, raised
        by the writer, every decided one.
        """
        started = time.perf_counter()
        # Counted per request: each is a caller of its own.
        count = len(requests)
        self._in_flight += count
        self._idle.clear()
        outcomes: list[_Prepared | Exception] = []
        for request in requests:
            try:
                outcomes.append(self._prepare(request))
            except Exception as err:
                outcomes.append(err)
        prepared = [o for o in outcomes if isinstance(o, _Prepared)]

        def landed(appended: list[Appended] | None, error: Exception | None) -> None:
            self._settle(prepared, committed=error is None)
            self._in_flight -= count
            if not self._in_flight:
                self._idle.set()
            answers = _answers(outcomes, appended, error)
            seconds = time.perf_counter() - started
            # Answered first: the counting is no part of the caller's wait.
            try:
                done(answers)
            finally:
                for request, outcome in zip(requests, answers, strict=True):
                    if isinstance(outcome, KynaraError):
                        self.refuse(outcome)
                    elif isinstance(outcome, Answer):
                        self._count(request, outcome.decision, seconds)

        if not prepared:
            landed([], None)
            return
        self._commit(prepared, landed)

    def _commit(
        self,
        prepared: Sequence[_Prepared],
        landed: Callable[[list[Appended] | None, Exception | None], None],
    ) -> None:
        """Queue the records (and state changes) of ``prepared`` as one
        transaction; ``landed(appended, None)`` or ``landed(None, error)`` is
        called exactly once, on the loop, when it returned (or at once, when
        it could not be queued). Whoever waits for it may be cancelled: what
        ``landed`` settles follows the commit, not the caller."""
        try:
            records, changes = _writes(prepared)
            submit = getattr(self._writer, "submit", None)
            if submit is not None:
                submit(records, changes, landed)
                return
            # A sink without ``submit`` (the backlog gate, the refusing
            # sink): one task for all of them.
            task = asyncio.get_running_loop().create_task(
                self._writer.append_all(records, changes)
            )
        except Exception as err:
            landed(None, err)
            return

        def ended(task: asyncio.Task[list[Appended]]) -> None:
            if task.cancelled():
                landed(None, ShuttingDown("the daemon stopped before the commit"))
            elif (error := task.exception()) is not None:
                landed(None, error)  # type: ignore[arg-type]
            else:
                landed(task.result(), None)

        task.add_done_callback(ended)

    def _count(
        self, request: IncomingRequest, decision: engine.Decision, seconds: float
    ) -> None:
        self._metrics.count_decision(str(decision.effect), request.action, seconds)
        if decision.shadow_effect not in (None, decision.effect):
            self._metrics.shadow_decisions.labels(
                str(decision.effect), str(decision.shadow_effect)
            ).inc()

    async def _decide_all(
        self, requests: Sequence[IncomingRequest]
    ) -> list[Answer | KynaraError]:
        outcomes: list[_Prepared | KynaraError] = []
        for request in requests:
            try:
                outcomes.append(self._prepare(request))
            except KynaraError as err:
                outcomes.append(err)
            except BaseException:
                # A bug: what the earlier items counted is taken back.
                self._settle(
                    [o for o in outcomes if isinstance(o, _Prepared)], committed=False
                )
                raise
        prepared = [o for o in outcomes if isinstance(o, _Prepared)]
        if not prepared:
            return _answers(outcomes, [], None)  # type: ignore[return-value]
        result: asyncio.Future[tuple[Any, Exception | None]]
        result = asyncio.get_running_loop().create_future()

        def landed(appended: list[Appended] | None, error: Exception | None) -> None:
            # Settled with the commit, whether or not the caller still
            # waits: a caller cancelled mid-commit leaves its record in the
            # log, so its counts (and approval steps) must stay too.
            self._settle(prepared, committed=error is None)
            if not result.done():
                result.set_result((appended, error))

        self._commit(prepared, landed)
        appended, error = await result
        if error is None:
            return _answers(outcomes, appended, None)  # type: ignore[return-value]
        if isinstance(error, AuditUnavailable):
            return _answers(outcomes, None, error)  # type: ignore[return-value]
        raise error

    def _settle(self, prepared: Sequence[_Prepared], *, committed: bool) -> None:
        counted = [c for p in prepared for c in p.counted]
        if counted:
            if committed:
                self._limit_book.committed(counted)
                if self._on_counted is not None:
                    self._on_counted(counted)
            else:
                self._limit_book.aborted(counted)
        if self._book is None:
            return
        for p in prepared:
            if p.step is not None:
                if committed:
                    self._book.committed(p.step)
                else:
                    self._book.aborted(p.step)

    def _prepare(self, request: IncomingRequest) -> _Prepared:
        if self._closing:
            raise ShuttingDown("the daemon is shutting down; retry on another replica")
        validate_request(request)
        # One instant per request: token expiry and every condition see it.
        now = Timestamp.from_nanos(self._clock())
        chain = self._establish_chain(request, now)
        policies = self._policies
        if policies is None:
            raise self._unready or PolicyNotReady("no policy set is active yet")
        env = self._env_for(request, now, chain)
        subject = DecisionRequest(
            chain=chain,
            action=request.action,
            resource=request.resource,
            context=request.context,
            request_id=request.request_id,
        )
        looked = self._look_limits(policies, subject, now)
        evaluating = time.perf_counter()
        decision = engine.evaluate(
            policies.policy_set,
            policies.directory,
            subject,
            env,
            explain=request.explain,
            cache=self._cache,
            limits=looked.values,
        )
        self._metrics.count_evaluation(decision, time.perf_counter() - evaluating)
        if looked.entries and decision.reason_code is ReasonCode.CONDITION_ERROR:
            decision = _with_limit_problems(decision, looked)
        decision_id = new_decision_id()
        record = record_from_decision(
            request=subject,
            env=env,
            decision=decision,
            decision_id=decision_id,
            daemon_id=self._daemon_id,
            identity_mode=str(self._identity.mode),
            redactor=self._redactor,
        )
        if request.gateway is not None:
            record = msgspec.structs.replace(
                record, gateway=self._sealed(request.gateway, record)
            )
        book = self._book
        step = None
        if book is not None:
            if decision.effect is Effect.REQUIRE_APPROVAL:
                step = self._approval_step(
                    request, subject, env, decision, decision_id, record, policies
                )
            # After scoring: a decision does not make its own action usual.
            book.note_action(env.agent_id, request.action)
        if step is not None and step.reason_code is not None:
            # A grant allows; every other reason an approval gives denies.
            effect = Effect.ALLOW if step.kind is StepKind.USED else Effect.DENY
            decision = msgspec.structs.replace(
                decision,
                effect=effect,
                reason_code=step.reason_code,
                reason=step.reason,
            )
            record = msgspec.structs.replace(
                record,
                decision=str(effect),
                reason_code=str(step.reason_code),
                reason=step.reason,
            )
        if step is not None and step.approval is not None:
            record = with_approval(record, step.approval)
        # The approval's records are built before counting: counting is the
        # last step that could fail, so what the book counts is settled with
        # the records it goes out in.
        opened = (
            book.opened_records(step, record)
            if step is not None and book is not None
            else ()
        )
        counted: tuple[Counted, ...] = ()
        if looked.entries:
            entries, counted = limit_check.count(
                looked,
                decision.effect,
                decision_id,
                now.to_nanos(),
                self._limit_book,
                approved=step is not None and step.kind is StepKind.USED,
            )
            record = msgspec.structs.replace(record, limits=entries)
        return _Prepared(
            decision,
            decision_id,
            request.request_id,
            (record, *opened),
            step,
            counted,
        )

    def _look_limits(
        self, policies: LoadedPolicies, subject: DecisionRequest, now: Timestamp
    ) -> limit_check.Looked:
        """The limits the request's candidate rules read and its action
        counts, as the request finds them now."""
        cache = self._cache
        # ``activate`` sets the cache with the policies, and nothing is
        # awaited between reading them and this.
        assert cache is not None and cache.policy_set is policies.policy_set
        read, counted = cache.limits_for(subject.resource.kind, subject.action)
        if not read and not counted:
            return limit_check.NOTHING
        return limit_check.look(
            read,
            counted,
            subject,
            limit_check.key_attributes(policies.directory, subject.chain),
            now.to_nanos(),
            self._limit_book,
            redactor=self._redactor,
            remote=self._fleet,
        )

    def _sealed(self, entry: GatewayEntry, record: AuditRecordV1) -> GatewayEntry:
        """The door's entry as the record keeps it: when any resource
        attribute (a tool argument) was redacted, its argument digest is
        keyed with the redaction key (``Redactor.seal_digest``), so the
        record cannot confirm a guess at what was redacted."""
        redacted = any(path.startswith("$.resource") for path in record.redactions)
        if not redacted or not entry.args_digest:
            return entry
        return msgspec.structs.replace(
            entry, args_digest=self._redactor.seal_digest(entry.args_digest)
        )

    def _approval_step(
        self,
        request: IncomingRequest,
        subject: DecisionRequest,
        env: Env,
        decision: engine.Decision,
        decision_id: str,
        record: AuditRecordV1,
        policies: LoadedPolicies,
    ) -> Step:
        """What the book makes of a require_approval decision."""
        assert self._book is not None
        book, cfg = self._book, self._approvals_config
        matched, rules, requirement, asking = self._asking_rules(
            subject, decision, policies
        )
        if record.redactions or record.resource is None:
            digest = binding_digest(
                subject.chain,
                subject.action,
                subject.resource,
                subject.context,
                cfg.volatile_context,
            )
        else:
            # The record holds the request's values in the digest's form.
            digest = encoded_binding_digest(
                subject.chain,
                subject.action,
                record.resource.kind,
                record.resource.id,
                record.resource.attributes,
                record.context,
                cfg.volatile_context,
            )
        now = env.now.to_nanos()
        agent = env.agent_id
        if request.approval_id:
            return book.use(
                request.approval_id,
                agent_id=agent,
                digest=digest,
                asking=asking,
                requirement=requirement,
                now=now,
                decision_id=decision_id,
            )

        def make() -> Approval:
            return self._new_approval(
                subject,
                env,
                decision,
                decision_id,
                record,
                digest,
                matched,
                rules,
                requirement,
            )

        return book.request(
            agent_id=agent,
            digest=digest,
            now=now,
            make=make,
            asking=asking,
            requirement=requirement,
        )

    def _asking_rules(
        self,
        subject: DecisionRequest,
        decision: engine.Decision,
        policies: LoadedPolicies,
    ) -> tuple[
        tuple[MatchedRule, ...],
        tuple[CompiledRule, ...],
        Requirement,
        tuple[tuple[str, str, str], ...],
    ]:
        """The enforced require_approval rules that asked in ``decision``:
        as matched and as compiled (each once), their combined requirement
        and ``(policy, rule, principal)`` per match. Worked out once per
        decision object (the engine answers repeated verdicts with the same
        one) under the active policies."""
        memo = self._asking_memo
        if memo[0] is not policies:
            memo = self._asking_memo = (policies, {})
        found = memo[1].get(id(decision))
        # The entry holds the decision, so its id is not reused while kept.
        if found is not None and found[0] is decision:
            return found[1]
        candidates = (
            self._cache.candidates(subject.resource.kind, subject.action)
            if self._cache is not None and self._cache.policy_set is policies.policy_set
            else policies.policy_set.candidate_rules(
                subject.resource.kind, subject.action
            )
        )
        compiled = {(rule.policy, rule.id): rule for rule in candidates}
        matched = tuple(
            m
            for m in decision.matched_rules
            if m.effect is Effect.REQUIRE_APPROVAL and not m.shadow
        )
        rules = tuple(
            {(m.policy, m.rule): compiled[(m.policy, m.rule)] for m in matched}.values()
        )
        requirement = requirement_for(rules, self._approvals_config)
        asking = tuple((m.policy, m.rule, m.principal) for m in matched)
        parts = (matched, rules, requirement, asking)
        if len(memo[1]) >= _ASKING_MEMO_ENTRIES:
            memo[1].clear()
        memo[1][id(decision)] = (decision, parts)
        return parts

    def _new_approval(
        self,
        subject: DecisionRequest,
        env: Env,
        decision: engine.Decision,
        decision_id: str,
        record: AuditRecordV1,
        digest: str,
        matched: Sequence[MatchedRule],
        rules: Sequence[CompiledRule],
        requirement: Requirement,
    ) -> Approval:
        """A pending approval of this decision: what it binds and shows
        (the record's redacted values), its requirement and risk."""
        assert self._book is not None
        book, cfg = self._book, self._approvals_config
        risk = score_risk(
            cfg.risk,
            rules=rules,
            resource=subject.resource,
            context=subject.context,
            chain=subject.chain,
            now=env.now,
            action_seen=book.action_seen(env.agent_id, subject.action),
        )
        expires = env.now.to_nanos() + requirement.expires_in_seconds * NANOS_PER_SECOND
        by_id = {(rule.policy, rule.id): rule for rule in rules}
        approval_id = new_approval_id()
        return Approval(
            id=approval_id,
            state=ApprovalState.PENDING,
            daemon_id=self._daemon_id,
            agent_id=env.agent_id,
            digest=digest,
            decision_id=decision_id,
            chain=tuple(ChainPrincipal(p.id, p.kind, p.roles) for p in decision.chain),
            action=subject.action,
            resource_kind=subject.resource.kind,
            resource_id=subject.resource.id,
            attributes=dict(record.resource.attributes) if record.resource else {},
            context=dict(record.context),
            request_id=subject.request_id,
            rules=tuple(_asking_rule(m, by_id[(m.policy, m.rule)]) for m in matched),
            requirement=requirement,
            risk=risk,
            policy_revision=decision.policy_revision,
            directory_revision=decision.directory_revision,
            created_at=format_timestamp(env.now),
            expires_at=format_timestamp(Timestamp.from_nanos(expires)),
            volatile_context=tuple(sorted(set(cfg.volatile_context))),
            url=book.url_for(approval_id),
        )


# Decisions whose asking rules _asking_rules keeps; a table that fills up
# is cleared and refills.
_ASKING_MEMO_ENTRIES = 1024


def _with_limit_problems(
    decision: engine.Decision, looked: limit_check.Looked
) -> engine.Decision:
    """A condition that failed on a limit the request formed no value for
    says only that the key is missing; the reason says why it is, for the
    limits a condition reads (one only counted errs in no condition)."""
    problems = [
        f"limit {name} has no value: {entry.error}"
        for name, entry in looked.entries.items()
        if entry.error and name in looked.read
    ]
    if not problems:
        return decision
    return msgspec.structs.replace(
        decision, reason=f"{decision.reason} ({'; '.join(problems)})"
    )


def _writes(
    prepared: Sequence[_Prepared],
) -> tuple[list[AuditRecordV1], list[StateChange]]:
    """The records of prepared requests, in order, and the state they
    change: what one transaction commits for them."""
    records = [record for p in prepared for record in p.records]
    changes = [change for p in prepared if p.step for change in p.step.changes]
    for p in prepared:
        if p.counted:
            # The limits' rows come from the decision record itself, in its
            # transaction: the log and the counters cannot disagree.
            changes.extend(
                (LIMITS_DB, key, value) for key, value in rows_of(p.records[0])
            )
    return records, changes


def _answers(
    outcomes: Sequence[_Prepared | Exception],
    appended: list[Appended] | None,
    error: Exception | None,
) -> list[Answer | Exception]:
    """Per request, its answer once its records landed at ``appended`` (in
    order), or what replaced it: its own error, or the writer's."""
    if error is not None:
        return [
            error if isinstance(o, _Prepared) else o  # type: ignore[misc]
            for o in outcomes
        ]
    assert appended is not None
    answers: list[Answer | Exception] = []
    at = 0
    for o in outcomes:
        if isinstance(o, _Prepared):
            # The decision record, then any approval record of its own.
            answers.append(o.answer(appended[at]))
            at += len(o.records)
        else:
            answers.append(o)
    return answers


def _asking_rule(match: MatchedRule, rule: CompiledRule) -> AskingRule:
    return AskingRule(
        policy=match.policy,
        rule=match.rule,
        principal=match.principal,
        description=rule.description,
        condition=_condition_source(rule),
    )


def _condition_source(rule: CompiledRule) -> str:
    return rule.condition.source if rule.condition is not None else ""


class _Prepared(NamedTuple):
    """A decision made, its records built but not yet committed: the
    decision record first, then any approval record."""

    decision: engine.Decision
    decision_id: str
    request_id: str
    records: tuple[AuditRecordV1, ...]
    step: Step | None = None
    # What the limit book counted for it, settled with its records.
    counted: tuple[Counted, ...] = ()

    def answer(self, appended: Appended) -> Answer:
        return Answer(
            decision=self.decision,
            decision_id=self.decision_id,
            audit_sequence=appended.seq,
            record_hash=appended.chain_hash.hex(),
            request_id=self.request_id,
            approval=self.step.approval if self.step else None,
            limits=self.records[0].limits,
        )
