"""What the evidence log costs per commit, beside a bare synced LMDB commit.

For each batch size (1, 4, 16, 64, 256 records by default) the benchmark
commits the same batches two ways, alternating one commit of each (a, b, a,
b, ...) so that whatever else the machine does slows both alike:

    audit  ``AuditStore.append_batch`` in durable mode (synced), the way the
           daemon's writer calls it: each record encoded and chained, its
           Merkle leaf and completed nodes written, the decision index and
           head updated, and at every ``--segment-records`` records a
           checkpoint signed with Ed25519 inside the transaction and then
           written to a witness directory (temporary file, fsync, rename,
           directory fsync).
    raw    one synced LMDB write transaction putting the same number of
           values, each the exact bytes of the audit record committed just
           before, under 8-byte big-endian keys in a second environment.

Records are real decision records: the shipped policies decide three
requests (a small refund, a large refund, a CRM read) through the engine,
``record_from_decision`` builds the records the pipeline would, and each
appended copy gets its own decision id and time. Building them is not timed.
One audit log and one raw environment serve the whole run, so segments seal
where the cumulative record count crosses a multiple of
``--segment-records``, as in a daemon, and the count of seals per batch size
is printed.

For each side and batch size: median and p99 commit latency (from the call
to its return, sync included) and records per second (records over the sum
of the commit latencies); then audit / raw for each. Read the ratios: both
sides ran on the same disk in the same minutes. The header names the scratch
directory's filesystem (tmpfs would make syncs free).

Examples:
    python benchmarks/audit_bench.py
    python benchmarks/audit_bench.py --commits 1000 --batch-sizes 1 256
    python benchmarks/audit_bench.py --tmp-dir /var/lib/kynara --json
    python benchmarks/audit_bench.py --smoke     # a few commits each; CI check
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from importlib import metadata

import lmdb
import msgspec

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from decide_bench import (  # noqa: E402 (the sibling script)
    doc_parser,
    filesystem_of,
    percentile,
)

from kynara_sidecar import engine  # noqa: E402
from kynara_sidecar.audit.checkpoint import (  # noqa: E402
    CheckpointKind,
    CheckpointV1,
    sign_checkpoint,
)
from kynara_sidecar.audit.keys import SigningKey, generate_key  # noqa: E402
from kynara_sidecar.audit.record import (  # noqa: E402
    AuditRecordV1,
    format_timestamp,
    record_from_decision,
)
from kynara_sidecar.audit.store import AuditStore  # noqa: E402
from kynara_sidecar.audit.witness import Witness  # noqa: E402
from kynara_sidecar.config import DEFAULT_SEGMENT_RECORDS  # noqa: E402
from kynara_sidecar.decision import (  # noqa: E402
    DecisionRequest,
    Env,
    Resource,
    Timestamp,
)
from kynara_sidecar.policy.loader import load_policies  # noqa: E402

__all__ = [
    "DEFAULT_BATCH_SIZES",
    "DEFAULT_COMMITS",
    "DEFAULT_WARMUP_COMMITS",
    "Point",
    "Sealer",
    "Side",
    "decision_records",
    "main",
    "measure_batch_size",
    "ratios",
    "summarize",
]

# 1: a lone agent's decisions, one sync each; 256: the writer's max_batch,
# the most one transaction carries under load.
DEFAULT_BATCH_SIZES = (1, 4, 16, 64, 256)
# 300 commits a side put p99 at the third-worst commit, and the 256-record
# point still ends in seconds on a disk that syncs in about a millisecond.
DEFAULT_COMMITS = 300
# Enough to fault in the maps' first pages and the Ed25519 code paths.
DEFAULT_WARMUP_COMMITS = 20
# --smoke: only proves that every point still runs.
SMOKE_COMMITS = 5
SMOKE_WARMUP_COMMITS = 1
# Sparse: the run writes at most a few hundred MiB to each environment.
MAP_SIZE = 8 << 30
ORIGIN = "audit-bench"
SHIPPED_POLICIES = REPO_ROOT / "config" / "policies"
# A Monday, 10:00 in Berlin: the CRM read is allowed, as in business hours.
DECISION_NOW = Timestamp(1_796_634_000)


# --- the records -----------------------------------------------------------


def _requests() -> list[DecisionRequest]:
    def refund(refund_id: str, amount: int) -> DecisionRequest:
        return DecisionRequest(
            chain=("alice", "support-bot"),
            action="payments.refund.issue",
            resource=Resource(
                kind="payments.refund", id=refund_id, attributes={"amount": amount}
            ),
            context={"region": "DE", "ticket": "T-48213"},
            request_id="req-0001",
        )

    crm_read = DecisionRequest(
        chain=("alice", "support-bot"),
        action="crm.contact.read",
        resource=Resource(kind="crm.contact", id="ct_1"),
        context={"region": "DE"},
    )
    return [refund("rf_small", 1200), refund("rf_large", 120_000), crm_read]


def decision_records() -> list[AuditRecordV1]:
    """One decision record per request of the mix, as the pipeline builds it.

    Returns:
        Records decided by the shipped policies through the engine.
    """
    loaded = load_policies(SHIPPED_POLICIES)
    env = Env(
        now=DECISION_NOW,
        daemon_id=ORIGIN,
        agent_id="support-bot",
        environment="production",
        region="eu-central-1",
        labels={"team": "support"},
        peer="unix:/run/kynara/agent.sock",
    )
    out = []
    for request in _requests():
        decision = engine.evaluate(loaded.policy_set, loaded.directory, request, env)
        out.append(
            record_from_decision(
                request=request,
                env=env,
                decision=decision,
                decision_id=str(uuid.uuid4()),
                identity_mode="verified",
            )
        )
    return out


def batch_of(templates: Sequence[AuditRecordV1], size: int) -> list[AuditRecordV1]:
    """``size`` copies of the templates in turn, each with its own id and time."""
    now = format_timestamp(Timestamp.from_nanos(time.time_ns()))
    return [
        msgspec.structs.replace(
            templates[i % len(templates)], decision_id=str(uuid.uuid4()), time=now
        )
        for i in range(size)
    ]


# --- the two sides ---------------------------------------------------------


class Sealer:
    """The seal hook: signs a checkpoint once a segment is full.

    Sealing happens at a batch boundary, once ``every`` records have been
    appended since the last checkpoint, as the daemon seals by count.
    """

    def __init__(self, key: SigningKey, every: int, log_id: str):
        self._key = key
        self._every = every
        self._log_id = log_id
        self.sealed = 0
        self.pending: CheckpointV1 | None = None

    def __call__(
        self, tree_size: int, root: bytes, chain: bytes
    ) -> CheckpointV1 | None:
        if tree_size - self.sealed < self._every:
            return None
        self.pending = sign_checkpoint(
            kind=CheckpointKind.CHECKPOINT,
            origin=ORIGIN,
            log_id=self._log_id,
            tree_size=tree_size,
            root=root,
            chain_hash=chain,
            time=Timestamp.from_nanos(time.time_ns()),
            key=self._key,
        )
        return self.pending


@dataclasses.dataclass
class _Audit:
    store: AuditStore
    sealer: Sealer
    witness: Witness

    def commit(self, records: list[AuditRecordV1]) -> tuple[int, list[bytes], bool]:
        """Append one batch; return (ns, the stored bytes, whether it sealed)."""
        self.sealer.pending = None
        started = time.perf_counter_ns()
        appended = self.store.append_batch(records, seal=self.sealer)
        sealed = self.sealer.pending
        if sealed is not None:
            self.witness.write(sealed)
            self.sealer.sealed = sealed.tree_size
        elapsed = time.perf_counter_ns() - started
        return elapsed, [item.record_bytes for item in appended], sealed is not None


@dataclasses.dataclass
class _Raw:
    env: lmdb.Environment
    db: lmdb._Database
    seq: int = 0

    def commit(self, values: list[bytes]) -> int:
        """Put the values in one synced write transaction; return ns."""
        started = time.perf_counter_ns()
        with self.env.begin(write=True, db=self.db) as txn:
            for value in values:
                self.seq += 1
                txn.put(self.seq.to_bytes(8, "big"), value, append=True)
        return time.perf_counter_ns() - started


def open_sides(scratch: pathlib.Path, segment_records: int) -> tuple[_Audit, _Raw]:
    """The durable audit log (with witness) and the raw environment."""
    store = AuditStore.open(scratch / "audit", map_size=MAP_SIZE, durability="durable")
    audit = _Audit(
        store,
        Sealer(generate_key(), segment_records, store.log_id),
        Witness(scratch / "witness", ORIGIN, store.log_id),
    )
    # The flags AuditStore uses in durable mode: synced commits, a lock file.
    env = lmdb.open(
        str(scratch / "raw"), map_size=MAP_SIZE, max_dbs=1, sync=True, lock=True
    )
    return audit, _Raw(env, env.open_db(b"records"))


# --- measuring -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Side:
    """One side's commits at one batch size."""

    p50_ms: float
    p99_ms: float
    records_per_second: float


@dataclasses.dataclass(frozen=True)
class Point:
    """Both sides at one batch size, and how many audit commits sealed."""

    batch_size: int
    commits: int
    seals: int
    record_bytes: int
    audit: Side
    raw: Side


def summarize(batch_size: int, latencies_ns: Sequence[int]) -> Side:
    """Median, p99 (ms) and records per second over the commits' time."""
    ordered = sorted(latencies_ns)
    total = sum(ordered)
    return Side(
        p50_ms=percentile(ordered, 0.50) / 1e6,
        p99_ms=percentile(ordered, 0.99) / 1e6,
        records_per_second=batch_size * len(ordered) / (total / 1e9) if total else 0,
    )


RATIO_FIELDS = ("p50_ms", "p99_ms", "records_per_second")


def ratios(point: Point) -> dict[str, float | None]:
    """audit / raw for each figure; None where raw is 0."""
    return {
        name: getattr(point.audit, name) / getattr(point.raw, name)
        if getattr(point.raw, name)
        else None
        for name in RATIO_FIELDS
    }


def measure_batch_size(
    audit: _Audit,
    raw: _Raw,
    templates: Sequence[AuditRecordV1],
    batch_size: int,
    counts: tuple[int, int],
) -> Point:
    """Alternate audit and raw commits of ``batch_size`` records.

    Args:
        audit: the audit side.
        raw: the raw side.
        templates: decision records to copy.
        batch_size: records per commit.
        counts: (warm-up commits, measured commits) per side.

    Returns:
        The point; warm-up commits are not counted.
    """
    warmup, commits = counts
    audit_ns: list[int] = []
    raw_ns: list[int] = []
    seals = sizes = 0
    for round_ in range(warmup + commits):
        records = batch_of(templates, batch_size)
        took, stored, sealed = audit.commit(records)
        raw_took = raw.commit(stored)
        if round_ < warmup:
            continue
        audit_ns.append(took)
        raw_ns.append(raw_took)
        seals += sealed
        sizes += sum(map(len, stored))
    return Point(
        batch_size=batch_size,
        commits=commits,
        seals=seals,
        record_bytes=round(sizes / (commits * batch_size)),
        audit=summarize(batch_size, audit_ns),
        raw=summarize(batch_size, raw_ns),
    )


# --- the report ------------------------------------------------------------


def machine_info() -> dict[str, object]:
    """The date, the machine and the versions that matter here."""
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        **{name: metadata.version(name) for name in ("lmdb", "cryptography")},
        "kernel": platform.release(),
        "loadavg": [round(v, 2) for v in os.getloadavg()],
    }


COLUMNS = (
    ("batch", 5), ("side", 5), ("p50 ms", 8), ("p99 ms", 8),
    ("records/s", 10), ("seals", 5),
)  # fmt: skip


def _row(cells: Sequence[str]) -> str:
    return "  ".join(
        cell.ljust(width) if i < 2 else cell.rjust(width)
        for i, (cell, (_, width)) in enumerate(zip(cells, COLUMNS, strict=True))
    ).rstrip()


def _side_cells(batch_size: int, name: str, side: Side, seals: str) -> list[str]:
    return [
        str(batch_size), name, f"{side.p50_ms:.3f}", f"{side.p99_ms:.3f}",
        f"{side.records_per_second:.0f}", seals,
    ]  # fmt: skip


def format_table(points: Sequence[Point]) -> str:
    """audit, raw and ratio rows for each batch size."""
    lines = [_row([name for name, _ in COLUMNS])]
    for point in points:
        size = point.batch_size
        lines.append(_row(_side_cells(size, "audit", point.audit, str(point.seals))))
        lines.append(_row(_side_cells(size, "raw", point.raw, "")))
        shown = [f"x{r:.2f}" if r else "-" for r in ratios(point).values()]
        lines.append(_row([str(size), "ratio", *shown, ""]))
    return "\n".join(lines)


def _header(report: dict[str, object]) -> str:
    info, settings = report["machine"], report["settings"]
    shown = {**info, "loadavg": " ".join(f"{v:.2f}" for v in info["loadavg"])}
    fields = " ".join(f"{k}={v}" for k, v in shown.items() if k != "date")
    return (
        f"# kynara audit_bench {info['date']}  {fields}\n"
        f"# durable, on {settings['filesystem']} ({settings['scratch_parent']}); "
        f"{settings['commits']} commits a side per batch size after "
        f"{settings['warmup_commits']} warm-up; a seal (Ed25519 checkpoint + "
        f"witness file) every {settings['segment_records']} records; "
        f"~{settings['record_bytes']} bytes a record; ratio = audit / raw"
    )


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    def at_least(low: int):
        def parse(text: str) -> int:
            value = int(text)
            if value < low:
                raise argparse.ArgumentTypeError(f"expected {low} or more, got {text}")
            return value

        return parse

    positive = at_least(1)

    parser = doc_parser(__doc__)
    parser.add_argument(
        "--batch-sizes", type=positive, nargs="+", metavar="N",
        default=list(DEFAULT_BATCH_SIZES),
        help="records per commit, one point each (default 1 4 16 64 256)",
    )  # fmt: skip
    parser.add_argument(
        "--commits", type=positive, default=DEFAULT_COMMITS,
        help=f"measured commits a side per point (default {DEFAULT_COMMITS})",
    )  # fmt: skip
    parser.add_argument(
        "--warmup", type=at_least(0), default=DEFAULT_WARMUP_COMMITS,
        help=f"warm-up commits a side per point (default {DEFAULT_WARMUP_COMMITS})",
    )  # fmt: skip
    parser.add_argument(
        "--segment-records", type=positive, default=DEFAULT_SEGMENT_RECORDS,
        help="records per sealed segment, as audit.segment_records "
        f"(default {DEFAULT_SEGMENT_RECORDS})",
    )  # fmt: skip
    parser.add_argument(
        "--tmp-dir", help="parent of the scratch dir (its disk pays the syncs)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON only")
    parser.add_argument(
        "--smoke", action="store_true", help="a few commits a point: does it run?"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table (or JSON); returns 0."""
    args = _parse_args(argv)
    counts = (args.warmup, args.commits)
    if args.smoke:
        counts = (SMOKE_WARMUP_COMMITS, SMOKE_COMMITS)
    templates = decision_records()
    report: dict[str, object] = {"machine": machine_info()}
    with tempfile.TemporaryDirectory(
        prefix="kynara-audit-bench-", dir=args.tmp_dir
    ) as d:
        scratch = pathlib.Path(d)
        audit, raw = open_sides(scratch, args.segment_records)
        try:
            points = []
            for size in args.batch_sizes:
                points.append(measure_batch_size(audit, raw, templates, size, counts))
                print(f"done: batch {size}", file=sys.stderr)
        finally:
            audit.store.close()
            raw.env.close()
        report["settings"] = {
            "filesystem": filesystem_of(scratch),
            "scratch_parent": str(scratch.parent),
            "commits": counts[1],
            "warmup_commits": counts[0],
            "segment_records": args.segment_records,
            "record_bytes": points[0].record_bytes,
        }
    if args.json:
        rows = [
            {**dataclasses.asdict(point), "ratio": ratios(point)} for point in points
        ]
        print(json.dumps({**report, "points": rows}, indent=2))
    else:
        print(_header(report) + "\n\n" + format_table(points))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
