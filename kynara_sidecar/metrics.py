"""Every metric the daemon exports, with one prefix and a description each.

Labels are bounded: a decision's ``action`` label is the action itself only
when the active policies name it exactly (the first
``compiler.MAX_ACTION_LABELS`` such names of the set), and ``other``
otherwise, so neither an agent improvising action names nor a huge policy
set can grow the series without limit.
Telemetry never fails a decision: callers record, and nothing here raises
into the request path.

On the request path, a labelled series is looked up once and its child
kept (``Metrics.count_decision``): prometheus-client's ``labels()`` takes a
lock and builds a key on every call, a few microseconds a decision. The
distributions observed once per decision or per audit caller beyond the
decision duration (evaluation, append latency) are each a
``Distribution``: one thread writes it, with no lock, and a scrape reads it.

Every name and label set here is part of the product: README's "Metrics"
section lists them all (``Metrics.catalog``), and a test holds the two
together. Other bounded labels: a condition error's ``rule`` is
``policy/rule`` of a rule with a condition in the active policies, else
``other``; the gRPC server's ``grpc_service`` and ``grpc_method`` are those
of a registered method (``server.grpc_metrics``), else ``other``; the
gateway's ``outcome`` is one of ``GATEWAY_OUTCOMES``.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

__all__ = [
    "GATEWAY_OUTCOMES",
    "OTHER",
    "OTHER_ACTION",
    "Distribution",
    "MetricInfo",
    "Metrics",
]

PREFIX = "kynara"
# prometheus-client adds a `<name>_created` sample (when the series began)
# to every counter and histogram; in the text format /metrics serves, each
# is a series of its own that README's list does not name, one more per
# labelled child. Off: the switch is the library's, for the whole process,
# and no registry of Kynara's wants them.
disable_created_metrics()
# The label value of whatever is not in a label's bounded set.
OTHER = "other"
OTHER_ACTION = OTHER
# Decisions take ~0.1 ms to a few ms here; buckets resolve that range and a
# slow disk's tail.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# An evaluation takes a few to a few hundred microseconds (conditions at
# ~3-4 µs each); the upper buckets catch a pathological policy set.
EVALUATION_BUCKETS = (
    0.000005, 0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001,
    0.0025, 0.01, 0.1,
)  # fmt: skip
# gRPC calls: ~0.5 ms for Decide, seconds to minutes for WaitApproval and
# segment pulls.
GRPC_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0, 10.0,
    60.0, 600.0,
)  # fmt: skip
# What became of an MCP gateway tools/call: forwarded (the upstream
# answered, with a result or its own error), upstream_failed (the upstream
# gave neither, or its server is not connected), denied, approval_required,
# refused (the call was malformed or its caller unknown), unavailable (no
# decision could be given), cancelled.
GATEWAY_OUTCOMES = frozenset(
    (
        "forwarded", "upstream_failed", "denied", "approval_required",
        "refused", "unavailable", "cancelled",
    )
)  # fmt: skip


class MetricInfo(NamedTuple):
    """One metric as Prometheus sees it: its name (a counter's with
    ``_total``), type, label names and help text."""

    name: str
    type: str
    labels: tuple[str, ...]
    help: str


class Distribution(Collector):
    """A histogram that one thread observes into without a lock.

    prometheus-client's ``Histogram.observe`` takes two locks (the sum and
    the bucket); this one adds to a plain list. NOTE: only one thread may
    call ``observe`` (the event loop, or the audit writer); a scrape from
    another thread reads a copy, at worst one observation behind in its
    sum, never a bucket count above the total.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ):
        self.name = name
        self.documentation = documentation
        self._bounds = tuple(buckets)
        self._counts = [0] * (len(self._bounds) + 1)
        self._sum = 0.0
        registry.register(self)

    def observe(self, value: float) -> None:
        # bisect_left: the first bound >= value, the "le" bucket.
        self._counts[bisect_left(self._bounds, value)] += 1
        self._sum += value

    def collect(self) -> Iterator[Metric]:
        counts = list(self._counts)
        buckets = []
        total = 0
        for bound, count in zip((*self._bounds, float("inf")), counts, strict=True):
            total += count
            buckets.append((floatToGoString(bound), total))
        yield HistogramMetricFamily(
            self.name, self.documentation, buckets=buckets, sum_value=self._sum
        )

    def describe(self) -> Iterator[Metric]:
        yield HistogramMetricFamily(self.name, self.documentation, labels=())


class _Prefixed(Collector):
    """Another collector's metrics under ``kynara_`` (PlatformCollector
    takes no namespace)."""

    def __init__(self, inner: Collector, registry: CollectorRegistry):
        self._inner = inner
        registry.register(self)

    def collect(self) -> Iterator[Metric]:
        prefix = f"{PREFIX}_"
        for metric in self._inner.collect():
            if not metric.name.startswith(prefix):
                metric.name = prefix + metric.name
            # The exposition writes each sample's own name, not the
            # family's: both get the prefix.
            metric.samples = [
                sample
                if sample.name.startswith(prefix)
                else sample._replace(name=prefix + sample.name)
                for sample in metric.samples
            ]
            yield metric


class Metrics:
    """The daemon's instruments, registered in their own registry.

    A registry per daemon keeps several daemons in one process (tests) apart.
    """

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self._known_actions: frozenset[str] = frozenset()
        # (decision, action label) -> its child of ``decisions``; bounded
        # by the label rule above (three decisions, known actions + other).
        self._decision_children: dict[tuple[str, str], Any] = {}
        r = self.registry
        self.decisions = Counter(
            f"{PREFIX}_decisions", "Decisions answered, by decision and action.",
            ["decision", "action"], registry=r,
        )  # fmt: skip
        self.shadow_decisions = Counter(
            f"{PREFIX}_shadow_decisions",
            "Decisions whose shadow-mode rules would have decided otherwise.",
            ["decision", "shadow_decision"], registry=r,
        )  # fmt: skip
        self.request_errors = Counter(
            f"{PREFIX}_request_errors",
            "Requests answered with an error instead of a decision, by code.",
            ["code"], registry=r,
        )  # fmt: skip
        self.decision_seconds = Histogram(
            f"{PREFIX}_decision_duration_seconds",
            "Time from request to answer, audit commit included.",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.audit_records = Counter(
            f"{PREFIX}_audit_records", "Audit records committed.", registry=r
        )
        self.audit_failures = Counter(
            f"{PREFIX}_audit_failures",
            "Audit appends that failed; each failed a decision closed.",
            registry=r,
        )
        self.audit_checkpoints = Counter(
            f"{PREFIX}_audit_checkpoints",
            "Signed statements of the log: sealed segments and heads at stop.",
            ["kind"],
            registry=r,
        )
        self.audit_witness_failures = Counter(
            f"{PREFIX}_audit_witness_failures",
            "Checkpoints not yet written to audit.witness_path; retried.",
            registry=r,
        )
        self.audit_pruned_records = Counter(
            f"{PREFIX}_audit_pruned_records",
            "Records dropped by retention (their checkpoints and nodes stay).",
            registry=r,
        )
        self.audit_commit_seconds = Histogram(
            f"{PREFIX}_audit_commit_duration_seconds",
            "Time to write and sync one audit transaction.",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.audit_batch_records = Histogram(
            f"{PREFIX}_audit_batch_records",
            "Records per audit transaction (group commit).",
            buckets=BATCH_BUCKETS, registry=r,
        )  # fmt: skip
        self.audit_map_used = Gauge(
            f"{PREFIX}_audit_map_used_bytes",
            "Bytes of the LMDB map in use; raise audit.map_size before it fills.",
            registry=r,
        )
        self.audit_map_size = Gauge(
            f"{PREFIX}_audit_map_size_bytes", "Configured LMDB map size.", registry=r
        )
        self.policy_info = Gauge(
            f"{PREFIX}_policy_info",
            "The active policy and directory revisions (value is always 1).",
            ["policy_revision", "directory_revision"], registry=r,
        )  # fmt: skip
        self.limit_info = Gauge(
            f"{PREFIX}_limit_info",
            "Each declared limit of the active policies and its scope "
            "(daemon: exact here; fleet: shared through the central store).",
            ["limit", "scope"], registry=r,
        )  # fmt: skip
        self.limit_keys = Gauge(
            f"{PREFIX}_limit_keys",
            "Keys (users, agents, ...) with counted decisions in an open "
            "window, held in memory.",
            registry=r,
        )
        self.limit_events = Gauge(
            f"{PREFIX}_limit_events",
            "Counted decisions in open windows, held in memory.",
            registry=r,
        )
        self.limit_fleet_stale = Gauge(
            f"{PREFIX}_limit_fleet_stale",
            "1 while fleet-scope limits have no value because the central "
            "store has not been heard from (their conditions fail closed).",
            registry=r,
        )
        self.admin_refusals = Counter(
            f"{PREFIX}_admin_refusals",
            "Admin listener calls and credentialed /metrics scrapes refused "
            "for their credential, by code.",
            ["code"], registry=r,
        )  # fmt: skip
        self.review_page_refusals = Counter(
            f"{PREFIX}_review_page_refusals",
            "Review page posts and sign-ins refused, by why: origin, csrf, "
            "or the sign-in's error code (identity_invalid, role_missing).",
            ["why"], registry=r,
        )  # fmt: skip
        self.playground_refusals = Counter(
            f"{PREFIX}_playground_refusals",
            "Playground calls and sign-ins refused, by why: origin, csrf, "
            "or the credential's error code (identity_invalid, role_missing).",
            ["why"], registry=r,
        )  # fmt: skip
        self.approval_webhook_deliveries = Counter(
            f"{PREFIX}_approval_webhook_deliveries",
            "New-approval summaries for approvals.webhook.url, by outcome "
            "(delivered, failed after approvals.webhook.attempts, dropped).",
            ["outcome"], registry=r,
        )  # fmt: skip
        self.approval_webhook_failed_attempts = Counter(
            f"{PREFIX}_approval_webhook_failed_attempts",
            "Posts to approvals.webhook.url that failed; retried with backoff "
            "up to approvals.webhook.attempts.",
            registry=r,
        )
        self.approval_fleet_reviews = Counter(
            f"{PREFIX}_approval_fleet_reviews",
            "Reviews taken from the central store (the fleet inbox), by "
            "outcome: recorded, refused (by the reason a signed review or "
            "the review failed), or retried (the log could not record it).",
            ["outcome"], registry=r,
        )  # fmt: skip
        self.approval_fleet_failures = Counter(
            f"{PREFIX}_approval_fleet_failures",
            "Central store calls of the fleet inbox link that failed, by what "
            "(publish, reviews); retried after sync.retry_min_seconds and up.",
            ["what"], registry=r,
        )  # fmt: skip
        self.approval_changes = Counter(
            f"{PREFIX}_approval_changes",
            "Approval state changes recorded, by the state entered (pending: "
            "opened; approved, rejected, expired, used).",
            ["state"], registry=r,
        )  # fmt: skip
        self.approval_expiry_failures = Counter(
            f"{PREFIX}_approval_expiry_failures",
            "Expiry runs whose records the audit log refused; retried after "
            "a few seconds (see the audit log's own errors).",
            registry=r,
        )
        self.policy_reloads = Counter(
            f"{PREFIX}_policy_reloads",
            "Policy loads, by result (ok or error).",
            ["result"], registry=r,
        )  # fmt: skip
        self.config_reloads = Counter(
            f"{PREFIX}_config_reloads",
            "Config file reloads on SIGHUP, by result (ok, or error: the "
            "file was refused and the previous config stays).",
            ["result"], registry=r,
        )  # fmt: skip
        self.policy_sync = Counter(
            f"{PREFIX}_policy_sync",
            "Bundle syncs, by outcome (activated, unchanged, refused, "
            "unreachable); a refusal leaves the previous revision active.",
            ["outcome"], registry=r,
        )  # fmt: skip
        self.directory_sync = Counter(
            f"{PREFIX}_directory_sync",
            "Signed directory syncs (directory.store), by outcome (activated, "
            "unchanged, refused, unreachable); a refusal leaves the previous "
            "directory active.",
            ["outcome"], registry=r,
        )  # fmt: skip
        self.directory_revision_info = Gauge(
            f"{PREFIX}_directory_revision_info",
            "The revision of the active signed directory (value is always 1).",
            ["revision"], registry=r,
        )  # fmt: skip
        self.policy_bundle_revision_info = Gauge(
            f"{PREFIX}_policy_bundle_revision_info",
            "The revision of the active signed bundle (value is always 1).",
            ["revision"], registry=r,
        )  # fmt: skip
        self.audit_shipping_backlog_segments = Gauge(
            f"{PREFIX}_audit_shipping_backlog_segments",
            "Sealed audit segments the central store has not acknowledged.",
            registry=r,
        )
        self.audit_shipping_backlog_records = Gauge(
            f"{PREFIX}_audit_shipping_backlog_records",
            "Audit records the central store has not acknowledged; past "
            "sync.backlog_max_records, sync.backlog_policy applies.",
            registry=r,
        )
        self.audit_oldest_unshipped_seconds = Gauge(
            f"{PREFIX}_audit_shipping_oldest_unshipped_seconds",
            "Age of the oldest audit record the central store has not "
            "acknowledged (0 when none).",
            registry=r,
        )
        self.audit_shipped_segments = Counter(
            f"{PREFIX}_audit_shipped_segments",
            "Audit segments the central store acknowledged.",
            registry=r,
        )
        self.audit_shipping_failures = Counter(
            f"{PREFIX}_audit_shipping_failures",
            "Attempts to ship an audit segment that failed or timed out "
            "(sync.timeout_seconds); retried with backoff.",
            registry=r,
        )
        self._add_operations(r)

    def _add_operations(self, r: CollectorRegistry) -> None:
        """What an operator watches beside the decisions: evaluation, the
        log's head and append latency, bundles, approvals, the gateway and
        the gRPC server."""
        self._known_rules: frozenset[str] = frozenset()
        self.evaluation_seconds = Distribution(
            f"{PREFIX}_evaluation_duration_seconds",
            "Time the engine took to evaluate a request (no audit commit).",
            EVALUATION_BUCKETS, r,
        )  # fmt: skip
        self.condition_errors = Counter(
            f"{PREFIX}_condition_errors",
            "Conditions that failed to evaluate (each fails closed), by rule "
            "(policy/rule of the active policies, else other).",
            ["rule"], registry=r,
        )  # fmt: skip
        self.audit_append_seconds = Distribution(
            f"{PREFIX}_audit_append_duration_seconds",
            "Time from handing records to the audit writer to the return of "
            "the commit carrying them (queueing included).",
            LATENCY_BUCKETS, r,
        )  # fmt: skip
        self.audit_chain_head = Gauge(
            f"{PREFIX}_audit_chain_head",
            "Records in the audit log's chain (its tree size): the newest "
            "record's sequence number.",
            registry=r,
        )
        self.policy_activated_time = Gauge(
            f"{PREFIX}_policy_activated_timestamp_seconds",
            "When the active policy set was activated (Unix seconds).",
            registry=r,
        )
        self.policy_bundle_created_time = Gauge(
            f"{PREFIX}_policy_bundle_created_timestamp_seconds",
            "When the active signed bundle was created (its manifest's "
            "created, Unix seconds); time() minus it is the bundle's age.",
            registry=r,
        )
        self.policy_bundle_refusals = Counter(
            f"{PREFIX}_policy_bundle_refusals",
            "Bundles not activated, by kind (a bundle problem, older, future, "
            "too_large, unusable, not_activated); the previous revision "
            "stays active.",
            ["kind"], registry=r,
        )  # fmt: skip
        self.directory_created_time = Gauge(
            f"{PREFIX}_directory_created_timestamp_seconds",
            "When the active signed directory was created by the collector "
            "(its manifest's created, Unix seconds); time() minus it is how "
            "far this daemon's directory is behind.",
            registry=r,
        )
        self.directory_activated_time = Gauge(
            f"{PREFIX}_directory_activated_timestamp_seconds",
            "When the active signed directory was activated (Unix seconds).",
            registry=r,
        )
        self.directory_refusals = Counter(
            f"{PREFIX}_directory_refusals",
            "Signed directories not activated, by kind (a directory problem, "
            "older, future, too_large, not_activated); the previous one "
            "stays active.",
            ["kind"], registry=r,
        )  # fmt: skip
        self.approvals_pending = Gauge(
            f"{PREFIX}_approvals_pending",
            "Approvals waiting for a reviewer (committed, not yet resolved).",
            registry=r,
        )
        self.gateway_calls = Counter(
            f"{PREFIX}_gateway_calls",
            "MCP gateway tools/call requests, by outcome (forwarded, "
            "upstream_failed, denied, approval_required, refused, "
            "unavailable, cancelled).",
            ["outcome"], registry=r,
        )  # fmt: skip
        grpc_labels = ["grpc_service", "grpc_method"]
        self.grpc_started = Counter(
            f"{PREFIX}_grpc_server_started",
            "gRPC calls started, by service and method (other when not "
            "registered).",
            grpc_labels, registry=r,
        )  # fmt: skip
        self.grpc_handled = Counter(
            f"{PREFIX}_grpc_server_handled",
            "gRPC calls finished, by service, method and status code.",
            [*grpc_labels, "grpc_code"], registry=r,
        )  # fmt: skip
        self.grpc_handling_seconds = Histogram(
            f"{PREFIX}_grpc_server_handling_seconds",
            "Time from a gRPC call's start to its status, by service, "
            "method and status code.",
            [*grpc_labels, "grpc_code"], buckets=GRPC_BUCKETS, registry=r,
        )  # fmt: skip
        # (service, method, code) -> (handled child, seconds child).
        self._grpc_children: dict[tuple[str, str, str], tuple[Any, Any]] = {}
        self._process = False

    def add_process_collectors(self) -> None:
        """Export this process's CPU, memory and file descriptors
        (``kynara_process_*``) and the Python version (``kynara_python_info``);
        for the daemon's registry, once."""
        if self._process:
            return
        self._process = True
        ProcessCollector(namespace=PREFIX, registry=self.registry)
        _Prefixed(PlatformCollector(registry=None), self.registry)

    def catalog(self) -> list[MetricInfo]:
        """Every metric of the registry, sorted by name: what README's
        "Metrics" section lists."""
        found: dict[str, MetricInfo] = {}
        wrappers = [v for v in vars(self).values() if isinstance(v, MetricWrapperBase)]
        for wrapper in wrappers:
            info = _info(wrapper._name, wrapper._type, wrapper._documentation)
            found[info.name] = info._replace(labels=tuple(wrapper._labelnames))
        for family in self.registry.collect():
            info = _info(family.name, family.type, family.documentation)
            if info.name not in found:
                names = {k for sample in family.samples for k in sample.labels}
                labels = names - {"le", "quantile"}
                found[info.name] = info._replace(labels=tuple(sorted(labels)))
        return sorted(found.values())

    def set_policy(
        self,
        policy_revision: str,
        directory_revision: str,
        actions: Iterable[str],
        rules: Iterable[str] = (),
    ) -> None:
        """Publish the active revisions, and the action names and rules
        (``policy/rule``) labels may use."""
        self.policy_info.clear()
        self.policy_info.labels(policy_revision, directory_revision).set(1)
        self.policy_activated_time.set(time.time())
        self._known_actions = frozenset(actions)
        self._known_rules = frozenset(rules)
        # Children of actions no longer named would never be used again.
        self._decision_children = {}

    def set_bundle_revision(self, revision: str, created: float | None = None) -> None:
        """Publish the revision of the active signed bundle, and when it was
        created (Unix seconds), when known."""
        self.policy_bundle_revision_info.clear()
        self.policy_bundle_revision_info.labels(revision).set(1)
        if created is not None:
            self.policy_bundle_created_time.set(created)

    def count_bundle_refusal(self, kind: str) -> None:
        self.policy_bundle_refusals.labels(kind or OTHER).inc()

    def count_directory_sync(self, outcome: str) -> None:
        self.directory_sync.labels(outcome).inc()

    def set_directory_revision(
        self, revision: str, created: float | None = None
    ) -> None:
        """Publish the revision of the active signed directory, when it was
        created (Unix seconds, when known) and that it was activated now."""
        self.directory_revision_info.clear()
        self.directory_revision_info.labels(revision).set(1)
        self.directory_created_time.set(float("nan") if created is None else created)
        self.directory_activated_time.set(time.time())

    def count_directory_refusal(self, kind: str) -> None:
        self.directory_refusals.labels(kind or OTHER).inc()

    def action_label(self, action: str) -> str:
        return action if action in self._known_actions else OTHER_ACTION

    def count_decision(self, decision: str, action: str, seconds: float) -> None:
        key = (decision, self.action_label(action))
        child = self._decision_children.get(key)
        if child is None:
            child = self._decision_children[key] = self.decisions.labels(*key)
        child.inc()
        self.decision_seconds.observe(seconds)

    def count_commit(self, records: int, seconds: float) -> None:
        self.audit_records.inc(records)
        self.audit_batch_records.observe(records)
        self.audit_commit_seconds.observe(seconds)

    def count_evaluation(self, decision: Any, seconds: float) -> None:
        """Observe one engine evaluation (on the event loop), and count the
        conditions of ``decision`` (an ``engine.Decision``) that errored."""
        self.evaluation_seconds.observe(seconds)
        if decision.condition_errors:
            known = self._known_rules
            for error in decision.condition_errors:
                rule = f"{error.policy}/{error.rule}"
                self.condition_errors.labels(rule if rule in known else OTHER).inc()

    def observe_append_latency(self, seconds: Sequence[float]) -> None:
        """Per caller of one committed transaction, its wait; on the audit
        writer's thread (the only one observing it)."""
        for each in seconds:
            self.audit_append_seconds.observe(each)

    def watch_chain_head(self, size: Callable[[], int]) -> None:
        """Read the log's tree size at each scrape, not at each commit."""
        self.audit_chain_head.set_function(size)

    def set_limits(self, scopes: Iterable[tuple[str, str]]) -> None:
        """Publish the active limits, ``(name, scope)`` each."""
        self.limit_info.clear()
        for name, scope in scopes:
            self.limit_info.labels(name, scope).set(1)

    def watch_limits(self, size: Callable[[], tuple[int, int]]) -> None:
        """Read the limit book's ``(keys, events)`` at each scrape."""
        self.limit_keys.set_function(lambda: size()[0])
        self.limit_events.set_function(lambda: size()[1])

    def watch_fleet_limits(self, stale: Callable[[], bool]) -> None:
        """Read at each scrape whether fleet-scope limits are stale."""
        self.limit_fleet_stale.set_function(lambda: float(stale()))

    def watch_pending_approvals(self, pending: Callable[[], int]) -> None:
        """Read how many approvals are pending at each scrape."""
        self.approvals_pending.set_function(pending)

    def count_gateway_call(self, outcome: str) -> None:
        self.gateway_calls.labels(
            outcome if outcome in GATEWAY_OUTCOMES else OTHER
        ).inc()

    def grpc_started_child(self, service: str, method: str) -> Any:
        """The ``grpc_server_started`` child of a method, to keep and
        ``inc()`` per call (the interceptor looks it up once per method)."""
        return self.grpc_started.labels(service, method)

    def count_grpc_handled(
        self, service: str, method: str, code: str, seconds: float
    ) -> None:
        """Count a finished gRPC call; its children are looked up once."""
        key = (service, method, code)
        children = self._grpc_children.get(key)
        if children is None:
            children = self._grpc_children[key] = (
                self.grpc_handled.labels(*key),
                self.grpc_handling_seconds.labels(*key),
            )
        children[0].inc()
        children[1].observe(seconds)


def _info(name: str, kind: str, documentation: str) -> MetricInfo:
    return MetricInfo(
        f"{name}_total" if kind == "counter" else name, kind, (), documentation
    )
