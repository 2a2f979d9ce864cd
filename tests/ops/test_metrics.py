"""The metrics module: names, help, bounded labels, and README's list."""

from __future__ import annotations

import asyncio
import re

import grpc
import pytest
from prometheus_client import generate_latest
from prometheus_client.metrics import MetricWrapperBase
from support import REPO_ROOT

from kynara_sidecar.collector.metrics import CollectorMetrics, DirectorySyncMetrics
from kynara_sidecar.decision import ConditionError
from kynara_sidecar.metrics import OTHER, Metrics
from kynara_sidecar.server.grpc_metrics import ServerMetrics, split_method
from kynara_sidecar.sync.nats_store import (
    APPROVALS_BUCKET,
    BUNDLES_BUCKET,
    DIRECTORY_BUCKET,
    LIMITS_BUCKET,
    REVIEWS_BUCKET,
    STATUS_BUCKET,
)

# README's "Metrics" table: | `name` | type | labels | what |
ROW = re.compile(r"^\| `(kynara_[a-z0-9_]+)` \| (\w+) \|([^|]*)\|")


def full_metrics() -> Metrics:
    metrics = Metrics()
    metrics.add_process_collectors()
    return metrics


def readme_metrics() -> dict[str, tuple[str, tuple[str, ...]]]:
    text = (REPO_ROOT / "README.md").read_text()
    section = text.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    found = {}
    for line in section.splitlines():
        match = ROW.match(line)
        if match:
            labels = tuple(x.strip() for x in match[3].split(",") if x.strip())
            found[match[1]] = (match[2], labels)
    return found


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_every_metric_is_prefixed_and_described():
    catalog = full_metrics().catalog()

    assert len(catalog) > 40
    for info in catalog:
        assert info.name.startswith("kynara_"), info.name
        assert info.help.strip(), f"{info.name} has no help text"


def test_catalog_covers_every_family_the_registry_exports():
    metrics = full_metrics()

    exported = {
        family.name + ("_total" if family.type == "counter" else "")
        for family in metrics.registry.collect()
    }

    assert exported == {info.name for info in metrics.catalog()}


def registry_catalog(registry) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Name -> (type, label names) of every family ``registry`` exports, its
    labels as its samples carry them (every series made at start)."""
    found = {}
    for family in registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        labels = dict.fromkeys(k for sample in family.samples for k in sample.labels)
        found[name] = (family.type, tuple(labels))
    return found


def instrument_catalog(metrics) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Name -> (type, label names) of each instrument ``metrics`` holds as
    an attribute: a labelled family with no series yet has its names too."""
    found = {}
    for instrument in vars(metrics).values():
        if isinstance(instrument, MetricWrapperBase):
            suffix = "_total" if instrument._type == "counter" else ""
            labels = tuple(instrument._labelnames)
            found[instrument._name + suffix] = (instrument._type, labels)
    return found


def test_readme_lists_exactly_the_registry_with_its_labels():
    """The tables list the daemon's registry and, apart, what the collector
    serves and what a scheduled ``kynara-collector directory sync`` serves
    (its own /metrics)."""
    listed = readme_metrics()

    catalog = {info.name: (info.type, info.labels) for info in full_metrics().catalog()}
    dirsync = registry_catalog(DirectorySyncMetrics().registry)
    collector_metrics = CollectorMetrics()
    collector = instrument_catalog(collector_metrics)
    assert set(collector) == exported_names(collector_metrics.registry)
    assert set(dirsync).isdisjoint(catalog)
    assert set(collector).isdisjoint(catalog) and set(collector).isdisjoint(dirsync)
    assert len(dirsync) == 4
    catalog.update(dirsync)
    catalog.update(collector)

    assert sorted(set(listed) - set(catalog)) == [], "listed, not exported"
    assert sorted(set(catalog) - set(listed)) == [], "exported, not listed"
    for name, (kind, labels) in catalog.items():
        assert listed[name] == (kind, labels), name


# A metric name as prose names it: `kynara_x_total{label}` gives kynara_x_total.
DOC_NAME = re.compile(r"\bkynara_[a-z0-9_]*[a-z0-9]")
# kynara_* words in the docs that are not metrics: the NATS store's buckets
# and the Python packages.
NOT_METRICS = {
    APPROVALS_BUCKET, BUNDLES_BUCKET, DIRECTORY_BUCKET, LIMITS_BUCKET,
    REVIEWS_BUCKET, STATUS_BUCKET,
    "kynara_sidecar", "kynara_sdk",
}  # fmt: skip
DOCS = ["README.md", "config/kubernetes/README.md"]


def exported_names(registry) -> set[str]:
    """The family names a registry exports, counters with their _total."""
    return {
        family.name + ("_total" if family.type == "counter" else "")
        for family in registry.collect()
    }


def sample_names(registry) -> set[str]:
    """The names of the samples /metrics serves for ``registry``."""
    text = generate_latest(registry).decode()
    return {
        re.split(r"[{ ]", line, maxsplit=1)[0]
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


@pytest.mark.parametrize("doc", DOCS)
def test_every_metric_the_docs_name_is_exported(doc):
    daemon = {info.name for info in full_metrics().catalog()}
    collector = exported_names(CollectorMetrics().registry)
    collector |= exported_names(DirectorySyncMetrics().registry)
    text = (REPO_ROOT / doc).read_text()

    named = set(DOC_NAME.findall(text)) - NOT_METRICS

    assert named, f"{doc} names no metric: is the pattern still right?"
    assert sorted(named - daemon - collector) == [], f"named in {doc}, not exported"


def test_no_created_series_is_exported():
    """Every sample /metrics serves is a listed family's (prometheus-client
    would add a ``_created`` series to each counter and histogram)."""
    metrics = full_metrics()
    metrics.set_policy("p1", "d1", ["refund.create"])
    metrics.count_decision("allow", "refund.create", 0.001)
    metrics.request_errors.labels("audit_unavailable").inc()
    collector = CollectorMetrics()
    collector.segments.labels("d-1", "accepted").inc()
    dirsync = DirectorySyncMetrics()
    dirsync.count_run("ok", 0.5, 1_700_000_000.0, {("user", "created"): 2})
    listed = set(readme_metrics())

    def family(sample_name: str) -> str:
        for suffix in ("_bucket", "_count", "_sum"):
            if sample_name.removesuffix(suffix) in listed:
                return sample_name.removesuffix(suffix)
        return sample_name

    names = sample_names(metrics.registry)
    collector_names = sample_names(collector.registry)
    dirsync_names = sample_names(dirsync.registry)

    assert {"kynara_decisions_total", "kynara_request_errors_total"} <= names
    assert "kynara_collector_segments_total" in collector_names
    assert "kynara_collector_directory_sync_runs_total" in dirsync_names
    every = names | collector_names | dirsync_names
    assert [name for name in every if name.endswith("_created")] == []
    assert sorted({family(name) for name in names | dirsync_names} - listed) == []


def test_unknown_action_is_counted_as_other():
    metrics = Metrics()
    metrics.set_policy("p1", "d1", ["refund.create"])

    metrics.count_decision("allow", "refund.create", 0.001)
    metrics.count_decision("allow", "made.up.action", 0.001)
    metrics.count_decision("allow", "another.one", 0.001)

    decisions = "kynara_decisions_total"
    assert sample(metrics, decisions, decision="allow", action="refund.create") == 1
    assert sample(metrics, decisions, decision="allow", action=OTHER) == 2
    assert sample(metrics, decisions, decision="allow", action="made.up.action") is None


class _Decided:
    """What count_evaluation reads of an engine decision."""

    def __init__(self, *errors: tuple[str, str]):
        self.condition_errors = tuple(
            ConditionError(policy, rule, "alice", "no such key")
            for policy, rule in errors
        )


def test_condition_errors_count_known_rules_and_other():
    metrics = Metrics()
    metrics.set_policy("p1", "d1", [], rules=["payments/refund-limit"])

    metrics.count_evaluation(_Decided(("payments", "refund-limit")), 0.00002)
    metrics.count_evaluation(_Decided(("payments", "gone"), ("x", "y")), 0.00003)
    metrics.count_evaluation(_Decided(), 0.5)

    errors = "kynara_condition_errors_total"
    assert sample(metrics, errors, rule="payments/refund-limit") == 1
    assert sample(metrics, errors, rule=OTHER) == 2
    count = "kynara_evaluation_duration_seconds_count"
    assert sample(metrics, count) == 3
    assert sample(metrics, "kynara_evaluation_duration_seconds_sum") == pytest.approx(
        0.50005
    )
    bucket = "kynara_evaluation_duration_seconds_bucket"
    assert sample(metrics, bucket, le="1e-05") == 0
    assert sample(metrics, bucket, le="2.5e-05") == 1
    assert sample(metrics, bucket, le="5e-05") == 2
    assert sample(metrics, bucket, le="0.1") == 2
    assert sample(metrics, bucket, le="+Inf") == 3


def test_distribution_exports_as_a_prometheus_histogram():
    metrics = Metrics()

    metrics.observe_append_latency([0.0003, 0.0003, 2.0])

    text = generate_latest(metrics.registry).decode()
    assert "# TYPE kynara_audit_append_duration_seconds histogram" in text
    assert 'kynara_audit_append_duration_seconds_bucket{le="0.0005"} 2.0' in text
    assert 'kynara_audit_append_duration_seconds_bucket{le="+Inf"} 3.0' in text
    assert "kynara_audit_append_duration_seconds_count 3.0" in text


def test_gateway_outcomes_are_bounded():
    metrics = Metrics()

    metrics.count_gateway_call("denied")
    metrics.count_gateway_call("something new")

    calls = "kynara_gateway_calls_total"
    assert sample(metrics, calls, outcome="denied") == 1
    assert sample(metrics, calls, outcome=OTHER) == 1


def test_gauges_read_at_scrape_time():
    metrics = Metrics()
    head = [7]

    metrics.watch_chain_head(lambda: head[0])
    metrics.watch_pending_approvals(lambda: 2)
    head[0] = 9

    assert sample(metrics, "kynara_audit_chain_head") == 9
    assert sample(metrics, "kynara_approvals_pending") == 2


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/kynara.v1.DecisionService/Decide", ("kynara.v1.DecisionService", "Decide")),
        ("/grpc.health.v1.Health/Check", ("grpc.health.v1.Health", "Check")),
        ("no-slash", (OTHER, OTHER)),
        ("/service-only", (OTHER, OTHER)),
        ("//Method", (OTHER, OTHER)),
    ],
)
def test_split_method(path, expected):
    assert split_method(path) == expected


def test_grpc_methods_are_bounded_by_the_registered_ones():
    metrics = Metrics()

    async def ok(request, context):
        return b"ok"

    async def refuse(request, context):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad")

    async def run():
        server = grpc.aio.server(interceptors=[ServerMetrics(metrics)])
        handlers = {
            "Ok": grpc.unary_unary_rpc_method_handler(ok),
            "Refuse": grpc.unary_unary_rpc_method_handler(refuse),
        }
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("t.S", handlers),)
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                await channel.unary_unary("/t.S/Ok")(b"")
                await channel.unary_unary("/t.S/Ok")(b"")
                for path in ("/t.S/Refuse", "/t.S/Nope", "/made/up"):
                    with pytest.raises(grpc.aio.AioRpcError):
                        await channel.unary_unary(path)(b"")
        finally:
            await server.stop(None)

    asyncio.run(run())

    handled = "kynara_grpc_server_handled_total"
    labels = {"grpc_service": "t.S"}
    assert sample(metrics, handled, **labels, grpc_method="Ok", grpc_code="OK") == 2
    refused = {**labels, "grpc_method": "Refuse", "grpc_code": "INVALID_ARGUMENT"}
    assert sample(metrics, handled, **refused) == 1
    other = {"grpc_service": OTHER, "grpc_method": OTHER}
    assert sample(metrics, handled, **other, grpc_code="UNIMPLEMENTED") == 2
    started = "kynara_grpc_server_started_total"
    assert sample(metrics, started, grpc_service="t.S", grpc_method="Ok") == 2
    assert sample(metrics, started, **other) == 2
    nope = {**labels, "grpc_method": "Nope"}
    assert sample(metrics, started, **nope) is None
