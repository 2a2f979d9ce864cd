"""Every metric the daemon exports, with one prefix and a description each.

Labels are bounded: a decision's ``action`` label is the action itself only
when the active policies name it exactly, and ``other`` otherwise, so an
agent improvising action names cannot grow the series without limit.
Telemetry never fails a decision: callers record, and nothing here raises
into the request path.

On the request path, a labelled series is looked up once and its child
kept (``Metrics.count_decision``): prometheus-client's ``labels()`` takes a
lock and builds a key on every call, a few microseconds a decision.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["OTHER_ACTION", "Metrics"]

PREFIX = "kynara"
OTHER_ACTION = "other"
# Decisions take ~0.1 ms to a few ms here; buckets resolve that range and a
# slow disk's tail.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


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
        self.admin_refusals = Counter(
            f"{PREFIX}_admin_refusals",
            "Admin listener calls refused for their credential, by code.",
            ["code"], registry=r,
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
        self.policy_sync = Counter(
            f"{PREFIX}_policy_sync",
            "Bundle syncs, by outcome (activated, unchanged, refused, "
            "unreachable); a refusal leaves the previous revision active.",
            ["outcome"], registry=r,
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

    def set_policy(
        self, policy_revision: str, directory_revision: str, actions: Iterable[str]
    ) -> None:
        """Publish the active revisions and the action names labels may use."""
        self.policy_info.clear()
        self.policy_info.labels(policy_revision, directory_revision).set(1)
        self._known_actions = frozenset(actions)
        # Children of actions no longer named would never be used again.
        self._decision_children = {}

    def set_bundle_revision(self, revision: str) -> None:
        """Publish the revision of the active signed bundle."""
        self.policy_bundle_revision_info.clear()
        self.policy_bundle_revision_info.labels(revision).set(1)

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
