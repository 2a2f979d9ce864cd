"""The collector's metrics, in a registry of its own (``/metrics``).

The ``daemon`` label is the name of the ``daemons`` entry that registers
the daemon: its exact id, or a family's name for every member of it
(``collector.registry``); ``unregistered`` for anything else. So whoever
can write to the store, and however many pods come and go, the series
stay bounded by the configuration.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    disable_created_metrics,
)

__all__ = [
    "RESOURCE_ACTIONS",
    "RESOURCE_KINDS",
    "RUN_OUTCOMES",
    "UNREGISTERED",
    "CollectorMetrics",
    "DirectorySyncMetrics",
]

PREFIX = "kynara_collector"
# No `<name>_created` series beside each counter (prometheus-client's
# default; a switch for the whole process), as for the daemon.
disable_created_metrics()
UNREGISTERED = "unregistered"
# The label values of DirectorySyncMetrics, each series made at start so a
# rate over it exists before the first change.
RUN_OUTCOMES = ("ok", "partial", "failed")
RESOURCE_KINDS = ("user", "group")
RESOURCE_ACTIONS = ("created", "updated", "deleted", "skipped")


class CollectorMetrics:
    """The collector's instruments."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.segments = Counter(
            f"{PREFIX}_segments",
            "Segments settled, by daemon and outcome: accepted (a whole "
            "segment verified and archived), duplicate (a message of an "
            "accepted segment sent again, its records the accepted ones), "
            "refused (a segment or a message refused; see alerts).",
            ["daemon", "outcome"], registry=r,
        )  # fmt: skip
        self.records = Counter(
            f"{PREFIX}_records_archived", "Records archived, by daemon.",
            ["daemon"], registry=r,
        )  # fmt: skip
        self.tree_size = Gauge(
            f"{PREFIX}_accepted_tree_size",
            "Tree size of the last accepted checkpoint, by daemon registered "
            "by its exact id (a family's members are in GET /daemons).",
            ["daemon"], registry=r,
        )  # fmt: skip
        self.alerts = Counter(
            f"{PREFIX}_alerts",
            "Refusals raised, by daemon and kind (fork, rollback, gap, "
            "bad_signature, bad_chain, bad_root, unknown_daemon, "
            "duplicate_daemon, malformed, tampered_duplicate); a daemon not "
            "registered counts as unregistered.",
            ["daemon", "kind"], registry=r,
        )  # fmt: skip
        self.failures = Counter(
            f"{PREFIX}_failures",
            "Failures, by what failed: store, pull, archive_or_state (retried); "
            "stray_message and incomplete_segment (messages that cannot "
            "complete a segment, dropped); message (a message that could not "
            "be handled, dropped); door (a door stopped taking segments).",
            ["what"], registry=r,
        )  # fmt: skip
        self.inbox_entries = Counter(
            f"{PREFIX}_inbox_entries",
            "Fleet inbox store entries not listed as they came, by outcome: "
            "skipped (malformed or a bad signature), kept (a key not known "
            "yet), dropped (kept past the per-daemon bound), unregistered, "
            "past_retention (ended longer ago than inbox.retention_seconds).",
            ["outcome"], registry=r,
        )  # fmt: skip
        self.inbox_page_refusals = Counter(
            f"{PREFIX}_inbox_page_refusals",
            "Fleet inbox page posts and sign-ins refused, by why: origin, "
            "csrf, or the sign-in's error code (identity_invalid, role_missing).",
            ["why"], registry=r,
        )  # fmt: skip
        self.directory_revisions = Counter(
            f"{PREFIX}_directory_revisions_published",
            "Directory revisions the SCIM service published to the store (a "
            "burst of changes publishes its newest state once).",
            registry=r,
        )  # fmt: skip
        self.directory_publish_failures = Counter(
            f"{PREFIX}_directory_publish_failures",
            "Directory publishes that failed (retried with the newest content "
            "after store.retry_seconds).",
            registry=r,
        )  # fmt: skip
        self.scim_refusals = Counter(
            f"{PREFIX}_scim_refusals",
            "SCIM requests refused for a missing or unknown bearer token.",
            registry=r,
        )  # fmt: skip


class DirectorySyncMetrics:
    """What a scheduled ``kynara-collector directory sync`` counts, served on
    its own ``/metrics`` (``directory.pull.metrics_port``): the command is a
    process of its own, apart from ``kynara-collector run``."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        name = f"{PREFIX}_directory_sync"
        self.runs = Counter(
            f"{name}_runs",
            "Directory sync runs, by outcome: ok (everything applied), "
            "partial (applied all but resources the target refused), failed "
            "(retried at the next tick). A run cut short by the stop is not "
            "counted.",
            ["outcome"], registry=r,
        )  # fmt: skip
        self.resources = Counter(
            f"{name}_resources",
            "Target resources a directory sync wrote, by kind (user, group) "
            "and action (created, updated, deleted), or skipped (refused by "
            "the target, left as they are).",
            ["kind", "action"], registry=r,
        )  # fmt: skip
        self.last_success = Gauge(
            f"{name}_last_success_timestamp_seconds",
            "When the last run that did not fail (ok or partial) ended, Unix "
            "seconds; 0 before the first: time() - it is how stale the "
            "directory may be.",
            registry=r,
        )  # fmt: skip
        self.last_duration = Gauge(
            f"{name}_last_duration_seconds",
            "How long the last run took, failed ones too.",
            registry=r,
        )  # fmt: skip
        for outcome in RUN_OUTCOMES:
            self.runs.labels(outcome)
        for kind in RESOURCE_KINDS:
            for action in RESOURCE_ACTIONS:
                self.resources.labels(kind, action)

    def count_run(
        self,
        outcome: str,
        seconds: float,
        ended: float,
        written: dict[tuple[str, str], int] | None = None,
    ) -> None:
        """Record one run: its outcome (one of ``RUN_OUTCOMES``), how long
        it took, when it ended (Unix seconds), and the resources it wrote
        by ``(kind, action)`` (label values of ``RESOURCE_KINDS`` and
        ``RESOURCE_ACTIONS``; a failed run's writes are not known)."""
        self.runs.labels(outcome).inc()
        self.last_duration.set(seconds)
        if outcome != "failed":
            self.last_success.set(ended)
        for (kind, action), count in (written or {}).items():
            if count:
                self.resources.labels(kind, action).inc(count)
