"""The collector's metrics, in a registry of its own (``/metrics``).

The ``daemon`` label is a registered daemon id, or ``unregistered`` for
anything else, so whoever can write to the store cannot grow the series.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

__all__ = ["UNREGISTERED", "CollectorMetrics"]

PREFIX = "kynara_collector"
UNREGISTERED = "unregistered"


class CollectorMetrics:
    """The collector's instruments."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.segments = Counter(
            f"{PREFIX}_segments",
            "Whole segments verified, by daemon and outcome "
            "(accepted, duplicate, refused).",
            ["daemon", "outcome"], registry=r,
        )  # fmt: skip
        self.records = Counter(
            f"{PREFIX}_records_archived", "Records archived, by daemon.",
            ["daemon"], registry=r,
        )  # fmt: skip
        self.tree_size = Gauge(
            f"{PREFIX}_accepted_tree_size",
            "Tree size of the last accepted checkpoint, by daemon.",
            ["daemon"], registry=r,
        )  # fmt: skip
        self.alerts = Counter(
            f"{PREFIX}_alerts",
            "Refusals raised, by daemon and kind (fork, rollback, gap, "
            "bad_signature, bad_chain, bad_root, unknown_daemon, duplicate_daemon).",
            ["daemon", "kind"], registry=r,
        )  # fmt: skip
        self.failures = Counter(
            f"{PREFIX}_failures",
            "Store, pull, archive or state operations that failed and will be "
            "retried, by what failed.",
            ["what"], registry=r,
        )  # fmt: skip
