"""What declared limits cost: Decide with 0, 1 and 4 limits side by side,
and how long the limit book takes to load its rows at start.

Decide: for each number of requests in flight, three fresh daemons are run
in turn (``python -m kynara_sidecar.cli run`` on the shipped config, durable
audit unless ``--set`` says otherwise), each on the shipped policies plus a
``refund-limits.yaml``: with no limits (the shipped set alone), with one
(refunds per user per Berlin calendar day, a count) and with four (that
one, a per-agent sum over the Berlin day, a per-user count over a rolling
hour and a per-agent sum over a rolling week). Each limit has a rule that
denies when it is exceeded, so every refund reads all of them, and every
allowed refund counts in all of them; the ceilings are far out of reach,
so the decisions do not change. The same closed loop (``decide_bench``'s
``measure``, one channel, the ``decide_bench`` mix) drives each daemon; the
``ratio`` rows are daemon with limits / daemon without, of the same point.
After each daemon stops, its log's limits rows are counted: a limits
variant that counted nothing measured some other path, and fails the run.

Book load: a scratch log gets N rows (``--rows``, default 10,000 and
100,000) in the open windows of the four limits, spread over 1,000 users
and 10 agents, and ``LimitBook.activate`` (what the daemon does at start)
is timed in this process, best of three fresh books.

The machine may be shared and noisy: compare the rows of one run only.

Examples:
    .venv/bin/python benchmarks/limits_bench.py                 # ~1 minute
    .venv/bin/python benchmarks/limits_bench.py --seconds 10 --in-flight 1 8 64
    .venv/bin/python benchmarks/limits_bench.py --rows 100000 1000000
    .venv/bin/python benchmarks/limits_bench.py --smoke         # ~10 s; CI check
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence

import uvloop

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from decide_bench import (  # noqa: E402 (the sibling script)
    REPO_ROOT,
    BenchError,
    Measurement,
    add_daemon_arguments,
    daemon_settings,
    describe_mix,
    doc_parser,
    exit_status,
    machine_info,
    machine_line,
    measure,
    positive,
    ratio_text,
    request_mix,
    start_daemon,
    stop_server,
    table_row,
    wait_answering,
)

from kynara_sidecar.audit.counters import LIMITS_DB, row_key, row_value  # noqa: E402
from kynara_sidecar.audit.store import AuditStore  # noqa: E402
from kynara_sidecar.limits.book import LimitBook  # noqa: E402
from kynara_sidecar.policy.limits import window_start  # noqa: E402
from kynara_sidecar.policy.loader import load_policies  # noqa: E402

BENCH = "limits_bench"
SHIPPED_POLICIES = REPO_ROOT / "config" / "policies"
# Far out of reach: the limits are read and counted, never decisive.
CEILING = 1_000_000_000_000
LIMITS = {
    "refunds_today": (
        "key: [user]\n    window: {calendar: day, time_zone: Europe/Berlin}"
    ),
    "refund_total_today": (
        "sum: resource.attr.amount\n    key: [agent]\n"
        "    window: {calendar: day, time_zone: Europe/Berlin}"
    ),
    "refunds_hour": "key: [user]\n    window: {rolling: 1h}",
    "refund_total_week": (
        "sum: resource.attr.amount\n    key: [agent]\n    window: {rolling: 7d}"
    ),
}
# The variants measured side by side: how many of LIMITS each declares.
VARIANTS = (0, 1, 4)
DEFAULT_IN_FLIGHT = (1, 8)
DEFAULT_SECONDS = 5.0
DEFAULT_WARMUP_SECONDS = 1.0
SMOKE_SECONDS = 0.5
SMOKE_WARMUP_SECONDS = 0.1
DEFAULT_ROWS = (10_000, 100_000)
SMOKE_ROWS = (1_000,)
# Rows written per transaction while filling the scratch log.
FILL_BATCH = 10_000
USERS, AGENTS = 1_000, 10
LOAD_TRIES = 3

COLUMNS = (
    ("limits", 6), ("in-flight", 9), ("p50 ms", 8), ("p99 ms", 8),
    ("answers/s", 10), ("cpu s/1k", 9), ("host cpu%", 9), ("errors", 6),
    ("rows", 8),
)  # fmt: skip
LOAD_COLUMNS = (
    ("rows", 8), ("keys", 6), ("load ms", 9), ("us/row", 7), ("ratio", 7),
)  # fmt: skip


def limits_file(count: int) -> str:
    """``refund-limits.yaml`` with the first ``count`` (at least 1) of
    LIMITS, each with a rule that denies past its ceiling."""
    names = list(LIMITS)[:count]
    lines = ["format_version: 1", "kind: policy", "name: refund-limits", "limits:"]
    for name in names:
        lines += [
            f"  {name}:",
            "    actions: [payments.refund.issue]",
            f"    {LIMITS[name]}",
            f"    ceiling: {CEILING}",
        ]
    lines.append("rules:")
    for name in names:
        lines += [
            f"  - id: {name.replace('_', '-')}-cap",
            "    effect: deny",
            "    actions: [payments.refund.issue]",
            "    resources: [payments.refund]",
            "    roles: [support, support_agent]",
            f"    condition: limits.{name}.exceeded",
        ]
    return "\n".join(lines) + "\n"


def policies(root: pathlib.Path, count: int) -> pathlib.Path:
    """The shipped policy files, and ``refund-limits.yaml`` when ``count``."""
    root.mkdir(parents=True, exist_ok=True)
    for path in SHIPPED_POLICIES.glob("*.yaml"):
        shutil.copy(path, root / path.name)
    if count:
        (root / "refund-limits.yaml").write_text(limits_file(count))
    return root


@dataclasses.dataclass(frozen=True)
class Point:
    """One daemon at one in-flight point, and the rows its log held after."""

    limits: int
    measurement: Measurement
    rows: int


def limits_rows(audit: pathlib.Path) -> int:
    store = AuditStore.open(audit, readonly=True, extra_dbs=(LIMITS_DB,))
    try:
        return len(store.iter_state(LIMITS_DB))
    finally:
        store.close()


async def run_decide(
    scratch: pathlib.Path,
    in_flight: Sequence[int],
    timing: tuple[float, float],
    config: str,
    overrides: Sequence[str],
) -> list[Point]:
    """Every (in-flight, variant) point, the variants of one point in turn.

    Raises:
        BenchError: a daemon did not start, answer, decide the mix as the
            shipped policies do, or stop cleanly.
    """
    mix = request_mix()
    payloads = [payload for _, payload in mix]
    points = []
    for flight in in_flight:
        for count in VARIANTS:
            workdir = scratch / f"x{flight}-limits{count}"
            source = policies(workdir / "policies", count)
            daemon = start_daemon(
                workdir, config, [f"policy.source={source}", *overrides]
            )
            try:
                await wait_answering(daemon, payloads[0])
                await describe_mix(daemon.targets["unix"], mix)
                result = await measure(daemon, "unix", flight, payloads, timing)
            finally:
                code = stop_server(daemon)
            if code != 0:
                raise BenchError(f"daemon exited with {code}:\n{daemon.log_tail()}")
            rows = limits_rows(workdir / "audit")
            points.append(Point(count, result, rows))
            print(f"done: {count} limits x{flight}", file=sys.stderr)
    return points


def fill(store: AuditStore, limits, rows: int, now: int) -> int:
    """Write ``rows`` rows into the open windows of ``limits``, spread
    evenly over them and over their keys; returns how many keys."""
    names = sorted(limits)
    keys: set[tuple[str, str]] = set()
    changes = []
    for i in range(rows):
        limit = limits[names[i % len(names)]]
        start = window_start(limit.window, now)
        # Spread over the window's first part (at least a second wide).
        at = start + (i * 7919) % max(now - start, 1_000_000_000)
        # As LIMITS key them: sums by agent, counts by user.
        who = f"bot{i % AGENTS}" if limit.sums else f"user{i % USERS}"
        key = json.dumps([who])
        keys.add((limit.name, key))
        amount = (i % 90) + 1 if limit.sums else 1
        changes.append(
            (
                LIMITS_DB,
                row_key(limit.name, at, key, f"dec_{i:08d}"),
                row_value(key, amount, limit.definition),
            )
        )
        if len(changes) == FILL_BATCH:
            store.append_batch([], changes)
            changes = []
    if changes:
        store.append_batch([], changes)
    return len(keys)


def book_load(scratch: pathlib.Path, rows: int) -> tuple[int, float]:
    """(keys, best seconds) for ``LimitBook.activate`` over ``rows`` rows."""
    limits = load_policies(policies(scratch / "load-policies", 4)).policy_set.limits
    now = time.time_ns()
    path = scratch / f"load-{rows}"
    store = AuditStore.open(path, extra_dbs=(LIMITS_DB,), map_size=1 << 32)
    try:
        keys = fill(store, limits, rows, now)
        best = float("inf")
        for _ in range(LOAD_TRIES):
            book = LimitBook(store)
            began = time.perf_counter()
            book.activate(limits, now)
            best = min(best, time.perf_counter() - began)
            held = book.size()
            if held != (keys, rows):
                raise BenchError(
                    f"the book holds (keys, events) {held} after loading {rows} "
                    f"rows of {keys} keys"
                )
    finally:
        store.close()
    return keys, best


def decide_table(points: list[Point]) -> str:
    row = lambda cells: table_row(cells, COLUMNS, left=2)  # noqa: E731
    lines = [row([name for name, _ in COLUMNS])]
    base: dict[int, Measurement] = {}
    for point in points:
        m = point.measurement
        lines.append(
            row([
                str(point.limits), str(m.in_flight), f"{m.p50_ms:.3f}",
                f"{m.p99_ms:.3f}", f"{m.answers_per_second:.0f}",
                f"{m.server_cpu_seconds_per_1k:.3f}", f"{m.host_cpu_percent:.0f}",
                str(sum(m.errors.values())), str(point.rows),
            ])
        )  # fmt: skip
        if point.limits == 0:
            base[m.in_flight] = m
            continue
        floor = base[m.in_flight]
        ratio = [
            (getattr(m, f) / getattr(floor, f)) if getattr(floor, f) else None
            for f in ("p50_ms", "p99_ms", "answers_per_second",
                      "server_cpu_seconds_per_1k")
        ]  # fmt: skip
        lines.append(
            row([
                f"{point.limits}/0", str(m.in_flight),
                *(ratio_text(r) for r in ratio), "", "", "",
            ])
        )  # fmt: skip
    return "\n".join(lines)


def load_table(loads: list[tuple[int, int, float]]) -> str:
    row = lambda cells: table_row(cells, LOAD_COLUMNS, left=0)  # noqa: E731
    lines = [row([name for name, _ in LOAD_COLUMNS])]
    first = loads[0][2] if loads else 0.0
    for rows, keys, seconds in loads:
        lines.append(
            row([
                str(rows), str(keys), f"{seconds * 1000:.1f}",
                f"{seconds * 1e6 / rows:.2f}",
                ratio_text(seconds / first if first else None),
            ])
        )  # fmt: skip
    return "\n".join(lines)


def failures(points: list[Point]) -> list[str]:
    out = []
    for point in points:
        m = point.measurement
        if m.errors or not m.answers:
            out.append(f"{point.limits} limits x{m.in_flight}: errors {m.errors}")
        if point.limits and not point.rows:
            out.append(f"{point.limits} limits x{m.in_flight}: nothing was counted")
        if not point.limits and point.rows:
            out.append(f"no limits x{m.in_flight}: {point.rows} rows counted")
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns 0, or 1 when a point failed."""
    parser = doc_parser(__doc__)
    parser.add_argument(
        "--seconds", type=positive(float), default=DEFAULT_SECONDS,
        help=f"measured seconds per point (default {DEFAULT_SECONDS:g})",
    )  # fmt: skip
    parser.add_argument(
        "--warmup", type=positive(float), default=DEFAULT_WARMUP_SECONDS,
        help=f"warm-up seconds per point (default {DEFAULT_WARMUP_SECONDS:g})",
    )  # fmt: skip
    parser.add_argument(
        "--in-flight", type=positive(int), nargs="+", metavar="N",
        default=list(DEFAULT_IN_FLIGHT), help="requests in flight (default 1 8)",
    )  # fmt: skip
    parser.add_argument(
        "--rows", type=positive(int), nargs="+", metavar="N",
        default=list(DEFAULT_ROWS),
        help="rows for the book load (default 10000 100000)",
    )  # fmt: skip
    add_daemon_arguments(parser)
    parser.add_argument(
        "--smoke", action="store_true", help="short points, 1,000 rows: CI check"
    )
    args = parser.parse_args(argv)
    timing = (args.warmup, args.seconds)
    in_flight, rows = tuple(args.in_flight), tuple(args.rows)
    if args.smoke:
        timing = (SMOKE_WARMUP_SECONDS, SMOKE_SECONDS)
        in_flight, rows = (1,), SMOKE_ROWS
    report: dict[str, object] = {"machine": machine_info()}
    with tempfile.TemporaryDirectory(prefix="kynara-bench-", dir=args.tmp_dir) as d:
        scratch = pathlib.Path(d)
        report["settings"] = {
            **daemon_settings(args.config, args.overrides, scratch),
            "warmup_seconds": timing[0],
            "seconds_per_point": timing[1],
        }
        try:
            points = uvloop.run(
                run_decide(scratch, in_flight, timing, args.config, args.overrides)
            )
            loads = []
            for n in rows:
                keys, seconds = book_load(scratch, n)
                loads.append((n, keys, seconds))
        except BenchError as err:
            print(f"{BENCH}: {err}", file=sys.stderr)
            return 1
    if args.json:
        report["decide"] = [
            {"limits": p.limits, "rows": p.rows, **dataclasses.asdict(p.measurement)}
            for p in points
        ]
        report["book_load"] = [
            {"rows": n, "keys": k, "seconds": s} for n, k, s in loads
        ]
        print(json.dumps(report, indent=2))
    else:
        settings = report["settings"]
        print(machine_line(report["machine"], BENCH))
        print(
            f"# daemon: {settings['config']} (extra --set: "
            f"{' '.join(settings['overrides']) or 'none'}), fresh audit dir per "
            f"point on {settings['audit_filesystem']}; {timing[1]:g} s measured "
            f"after {timing[0]:g} s warm-up; grpc-unix, one channel; mix: "
            "small refund (allow, counted), large refund (require_approval, "
            "reads the limits), crm read; ratio = with limits / without"
        )
        print()
        print(decide_table(points))
        print()
        print(
            "# book load: LimitBook.activate over the rows of 4 limits "
            f"(best of {LOAD_TRIES}); ratio = / the first row"
        )
        print(load_table(loads))
    return exit_status(BENCH, failures(points))


if __name__ == "__main__":
    raise SystemExit(main())
