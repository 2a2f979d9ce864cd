"""What an approval costs on the decision path, beside a plain allow.

One daemon (``python -m kynara_sidecar.cli run`` on the shipped config,
durable audit unless ``--set`` says otherwise, the approval rate limits
raised out of the way, an admin credential with the reviewer role on a
Unix socket) and this process, the client, with one request in flight
over the agent's Unix socket. Four kinds of ``Decide`` call are timed,
interleaved round-robin so that whatever else the machine does slows all
alike (each round in another of the 24 orders of the four, so each kind
follows each other kind equally often):

    allow   a small refund the shipped policies allow: one decision record.
    open    a large refund with a new refund id each time: require_approval
            that opens an approval (the decision record, the
            ``approval_requested`` record and the approval's LMDB state in
            one commit).
    reuse   the same large refund again and again: require_approval citing
            the approval already pending for it (a decision record only).
    use     a large refund sent with the id of an approved approval: allow
            ``approval_granted`` (the decision record and the approval's
            change to ``used`` in one commit).

Before the loop, untimed, the approvals the ``use`` calls consume are
opened; then each is approved through ``ApprovalService.Approve`` on the
admin socket, one at a time, and those calls are timed as the fifth kind,
``review`` (a review record and the state change in one commit). Every
answer is checked (decision, reason, which approval it cites); one that is
not what its kind expects counts as an error.

Per kind: p50 and p99 latency (send to answer), each as a ratio to the
allow of the same run (the machine may be shared and noisy: read ratios,
not absolutes); the p50 over the first and the last quarter of the rounds,
since every ``open`` leaves one more approval pending (and every ``use`` one
more used); and the p50 of the calls sent right after an ``open``, which
pay for what the daemon does in the background once it opened one. After the
daemon stops, the approvals database's pages are read from LMDB: its
growth per approval.

Examples:
    python benchmarks/approval_bench.py
    python benchmarks/approval_bench.py --rounds 3000 --json
    python benchmarks/approval_bench.py --set audit.durability=deferred
    python benchmarks/approval_bench.py --smoke     # a few seconds; CI check
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import pathlib
import secrets
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence

import grpc
import lmdb
import uvloop
from kynara.v1 import approval_pb2 as apb
from kynara.v1 import decision_pb2 as pb

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from decide_bench import (  # noqa: E402 (the sibling script)
    CALL_TIMEOUT_SECONDS,
    CHANNEL_OPTIONS,
    DECIDE_METHOD,
    START_TIMEOUT_SECONDS,
    BenchError,
    Server,
    add_daemon_arguments,
    daemon_settings,
    doc_parser,
    exit_status,
    machine_info,
    machine_line,
    percentile,
    ratio_text,
    rounds_type,
    start_daemon,
    stop_server,
    table_row,
    wait_answering,
)

from kynara_sidecar.approvals.book import APPROVALS_DB  # noqa: E402

__all__ = [
    "DECIDE_KINDS",
    "DEFAULT_ROUNDS",
    "DEFAULT_WARMUP_ROUNDS",
    "KindStats",
    "LmdbGrowth",
    "format_table",
    "main",
    "ratios",
    "summarize",
]

DECIDE_KINDS = ("allow", "open", "reuse", "use")
# A fixed rotation would have one kind nearly always follow another, and
# charge it with whatever the daemon does in the background after that one.
ORDERS = tuple(itertools.permutations(DECIDE_KINDS))
REVIEW_KIND = "review"
APPROVE_METHOD = "/kynara.v1.ApprovalService/Approve"
LIST_METHOD = "/kynara.v1.ApprovalService/ListApprovals"
# 1,000 rounds give 1,000 samples per kind, so p99 is the 10th slowest; at
# a few ms a synced commit the run takes about half a minute.
DEFAULT_ROUNDS = 1000
# Enough for the connections, grpc's pollers and the LMDB map to settle.
DEFAULT_WARMUP_ROUNDS = 50
# --smoke: only proves that every kind still answers as expected.
SMOKE_ROUNDS = 8
SMOKE_WARMUP_ROUNDS = 2
# Each round opens two approvals (one in the setup, one timed), all left
# open or used within the run; the daemon's ceilings are 100,000 (the
# most config.py accepts), so this keeps the bench below them.
MAX_ROUNDS = 40_000
RATE_LIMIT_OVERRIDES = (
    "approvals.max_new_per_agent_per_minute=100000",
    "approvals.max_pending_per_agent=100000",
)
REVIEWER = "bench-reviewer"
# Over the shipped 500.00 limit (refund-large: require_approval); the small
# one is under it (refund-small: allow). Amounts are cents.
LARGE_AMOUNT = 120_000
SMALL_AMOUNT = 1_200
# The databases the audit store may open; more than it uses is harmless.
LMDB_MAX_DBS = 32


# --- the requests ----------------------------------------------------------


def refund(refund_id: str, amount: int, approval_id: str = "") -> pb.DecideRequest:
    """alice's refund ``refund_id`` of ``amount`` cents, maybe with a grant."""
    return pb.DecideRequest(
        asserted_chain=["alice"],
        action="payments.refund.issue",
        resource=pb.Resource(
            kind="payments.refund",
            id=refund_id,
            attributes={"amount": pb.Value(int_value=amount)},
        ),
        context={"region": pb.Value(string_value="DE")},
        approval_id=approval_id,
    )


Check = Callable[[pb.DecideResponse], str]


def expect(decision: int, reason: str, approval_id: str = "") -> Check:
    """A check of an answer: "" when it is as expected, else what differs.
    An empty ``approval_id`` accepts any approval (or none)."""

    def check(answer: pb.DecideResponse) -> str:
        got = (
            pb.Decision.Name(answer.decision),
            answer.reason_code,
            answer.approval.id if approval_id else "",
        )
        wanted = (pb.Decision.Name(decision), reason, approval_id)
        return "" if got == wanted else f"expected {wanted}, got {got}"

    return check


def expect_new_approval(seen: set[str]) -> Check:
    """require_approval citing a pending approval no earlier answer cited."""
    base = expect(pb.DECISION_REQUIRE_APPROVAL, "approval_required")

    def check(answer: pb.DecideResponse) -> str:
        problem = base(answer)
        if problem:
            return problem
        approval = answer.approval
        if not approval.id or approval.id in seen or approval.state != "pending":
            return f"expected a new pending approval, got {approval.id!r}"
        seen.add(approval.id)
        return ""

    return check


@dataclasses.dataclass(frozen=True)
class Call:
    """One timed Decide: its kind, its request bytes and its check."""

    kind: str
    payload: bytes
    check: Check


def schedule(rounds: int, pending_id: str, grant_ids: Sequence[str]) -> list[Call]:
    """Every Decide of the loop, in order, built before the clock runs.

    Args:
        rounds: rounds, warm-up included; one call of each kind per round.
        pending_id: the approval the ``reuse`` request opened in the setup.
        grant_ids: one approved approval per round, for ``use``.

    Returns:
        The calls; round ``i`` in the ``i % 24``-th order of the four kinds.
    """
    allow = refund("rf_small", SMALL_AMOUNT).SerializeToString()
    reuse = refund("rf_pending", LARGE_AMOUNT).SerializeToString()
    seen: set[str] = {pending_id, *grant_ids}
    calls = []
    for i in range(rounds):
        by_kind = {
            "allow": Call("allow", allow, expect(pb.DECISION_ALLOW, "rule_allowed")),
            "open": Call(
                "open",
                refund(f"rf_open_{i:06d}", LARGE_AMOUNT).SerializeToString(),
                expect_new_approval(seen),
            ),
            "reuse": Call(
                "reuse",
                reuse,
                expect(pb.DECISION_REQUIRE_APPROVAL, "approval_required", pending_id),
            ),
            "use": Call(
                "use",
                refund(grant_refund(i), LARGE_AMOUNT, grant_ids[i]).SerializeToString(),
                expect(pb.DECISION_ALLOW, "approval_granted", grant_ids[i]),
            ),
        }
        order = ORDERS[i % len(ORDERS)]
        calls += [by_kind[kind] for kind in order]
    return calls


def grant_refund(index: int) -> str:
    """The refund id of the ``index``-th grant (its approval binds it)."""
    return f"rf_grant_{index:06d}"


# --- pure statistics and formatting ----------------------------------------


@dataclasses.dataclass(frozen=True)
class KindStats:
    """The measured calls of one kind."""

    kind: str
    answers: int
    errors: dict[str, int]
    p50_ms: float
    p99_ms: float
    first_quarter_p50_ms: float
    last_quarter_p50_ms: float
    # The calls sent right after an ``open`` answered: what the daemon does
    # in the background after opening one lands on them.
    after_open: int
    after_open_p50_ms: float


def _ms(latencies: Sequence[int], fraction: float) -> float:
    return percentile(sorted(latencies), fraction) / 1e6


def summarize(
    kind: str, latencies: Sequence[int], after_open: Sequence[int], errors: Counter
) -> KindStats:
    """One table row from the latencies (ns, in call order) of one kind and
    those of its calls that came right after an ``open``."""
    quarter = max(1, len(latencies) // 4)
    return KindStats(
        kind=kind,
        answers=len(latencies),
        errors=dict(errors),
        p50_ms=_ms(latencies, 0.50),
        p99_ms=_ms(latencies, 0.99),
        first_quarter_p50_ms=_ms(latencies[:quarter], 0.50),
        last_quarter_p50_ms=_ms(latencies[-quarter:], 0.50),
        after_open=len(after_open),
        after_open_p50_ms=_ms(after_open, 0.50),
    )


def ratios(stats: KindStats, allow: KindStats) -> dict[str, float | None]:
    """p50 and p99 of ``stats`` over the allow's; None where the allow is 0."""
    return {
        name: getattr(stats, name) / getattr(allow, name)
        if getattr(allow, name)
        else None
        for name in ("p50_ms", "p99_ms")
    }


COLUMNS = (
    ("kind", 6), ("answers", 7), ("p50 ms", 8), ("p99 ms", 8),
    ("p50/allow", 9), ("p99/allow", 9), ("p50 1st q", 9), ("p50 4th q", 9),
    ("after open", 10), ("p50", 6), ("errors", 6),
)  # fmt: skip


def _row(cells: Sequence[str]) -> str:
    return table_row(cells, COLUMNS, left=1)


def _cells(stats: KindStats, ratio: dict[str, float | None]) -> list[str]:
    return [
        stats.kind, str(stats.answers), f"{stats.p50_ms:.3f}",
        f"{stats.p99_ms:.3f}", ratio_text(ratio["p50_ms"]),
        ratio_text(ratio["p99_ms"]),
        f"{stats.first_quarter_p50_ms:.3f}", f"{stats.last_quarter_p50_ms:.3f}",
        str(stats.after_open),
        f"{stats.after_open_p50_ms:.3f}" if stats.after_open else "-",
        str(sum(stats.errors.values())),
    ]  # fmt: skip


def format_table(rows: Sequence[KindStats]) -> str:
    """The plain-text table; the first row must be the allow."""
    lines = [_row([name for name, _ in COLUMNS])]
    lines += [_row(_cells(stats, ratios(stats, rows[0]))) for stats in rows]
    return "\n".join(lines)


# --- the approvals database ------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LmdbGrowth:
    """The approvals database after the run."""

    approvals: int
    page_bytes: int
    value_bytes: int

    def per_approval(self) -> tuple[float, float]:
        """(page bytes, value bytes) per approval; 0 for none."""
        if not self.approvals:
            return 0.0, 0.0
        return self.page_bytes / self.approvals, self.value_bytes / self.approvals


def read_growth(audit: pathlib.Path) -> LmdbGrowth:
    """Page and value bytes of the approvals database of a stopped daemon.

    The database starts empty with the log, so its size is the run's growth.
    """
    env = lmdb.open(
        str(audit), readonly=True, lock=True, max_dbs=LMDB_MAX_DBS, subdir=True
    )
    try:
        db = env.open_db(APPROVALS_DB, create=False)
        with env.begin(db=db) as txn:
            stat = txn.stat(db)
            value_bytes = sum(len(value) for _, value in txn.cursor())
    finally:
        env.close()
    pages = stat["branch_pages"] + stat["leaf_pages"] + stat["overflow_pages"]
    return LmdbGrowth(stat["entries"], pages * stat["psize"], value_bytes)


# --- talking to the daemon -------------------------------------------------


@dataclasses.dataclass
class _Samples:
    latencies: dict[str, list[int]] = dataclasses.field(
        default_factory=lambda: {k: [] for k in (*DECIDE_KINDS, REVIEW_KIND)}
    )
    after_open: dict[str, list[int]] = dataclasses.field(
        default_factory=lambda: {k: [] for k in (*DECIDE_KINDS, REVIEW_KIND)}
    )
    errors: dict[str, Counter] = dataclasses.field(
        default_factory=lambda: {k: Counter() for k in (*DECIDE_KINDS, REVIEW_KIND)}
    )


async def _timed(call, payload, metadata=None) -> tuple[object, int]:
    started = time.perf_counter_ns()
    answer = await call(payload, timeout=CALL_TIMEOUT_SECONDS, metadata=metadata)
    return answer, time.perf_counter_ns() - started


async def _wait_admin(list_call, metadata, server: Server) -> None:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while True:
        try:
            await list_call(apb.ListApprovalsRequest(page_size=1), metadata=metadata)
            return
        except grpc.aio.AioRpcError as err:
            if server.process.poll() is not None or time.monotonic() > deadline:
                raise BenchError(
                    f"admin socket not answering: {err.code().name} "
                    f"{err.details()}\n{server.log_tail()}"
                ) from err
            await asyncio.sleep(0.1)


async def _open(decide, refund_id: str) -> str:
    answer = await decide(
        refund(refund_id, LARGE_AMOUNT).SerializeToString(),
        timeout=CALL_TIMEOUT_SECONDS,
    )
    problem = expect(pb.DECISION_REQUIRE_APPROVAL, "approval_required")(answer)
    if problem or not answer.approval.id:
        raise BenchError(f"setup: opening an approval for {refund_id}: {problem}")
    return answer.approval.id


async def _review(approve, metadata, ids: Sequence[str], warmup: int, samples):
    """Approve each approval; time all but the first ``warmup``."""
    for i, approval_id in enumerate(ids):
        request = apb.ReviewRequest(approval_id=approval_id, comment="bench")
        try:
            detail, took = await _timed(approve, request, metadata)
        except grpc.aio.AioRpcError as err:
            raise BenchError(
                f"setup: approving {approval_id}: {err.code().name} {err.details()}"
            ) from err
        if detail.state != "approved":
            raise BenchError(f"setup: {approval_id} is {detail.state!r} once approved")
        if i >= warmup:
            samples.latencies[REVIEW_KIND].append(took)


async def _loop(decide, calls: Sequence[Call], warmup_calls: int, samples) -> None:
    for i, call in enumerate(calls):
        recording = i >= warmup_calls
        after_open = i > 0 and calls[i - 1].kind == "open"
        try:
            answer, took = await _timed(decide, call.payload)
        except grpc.aio.AioRpcError as err:
            if recording:
                samples.errors[call.kind][err.code().name] += 1
            continue
        problem = call.check(answer)
        if problem and recording:
            samples.errors[call.kind][problem] += 1
        elif recording:
            samples.latencies[call.kind].append(took)
            if after_open:
                samples.after_open[call.kind].append(took)


async def measure(server: Server, admin_target: str, secret: str, plan: Plan):
    """Set up the approvals, approve them (timed), then run the timed loop.

    Returns:
        The samples of every kind.

    Raises:
        BenchError: the setup failed (an approval not opened or approved).
    """
    samples = _Samples()
    metadata = (("authorization", f"Bearer {secret}"),)
    total = plan.warmup_rounds + plan.rounds
    agent = grpc.aio.insecure_channel(server.targets["unix"], options=CHANNEL_OPTIONS)
    admin = grpc.aio.insecure_channel(admin_target, options=CHANNEL_OPTIONS)
    async with agent, admin:
        decide = agent.unary_unary(
            DECIDE_METHOD, response_deserializer=pb.DecideResponse.FromString
        )
        approve = admin.unary_unary(
            APPROVE_METHOD,
            request_serializer=apb.ReviewRequest.SerializeToString,
            response_deserializer=apb.ApprovalDetail.FromString,
        )
        list_call = admin.unary_unary(
            LIST_METHOD,
            request_serializer=apb.ListApprovalsRequest.SerializeToString,
            response_deserializer=apb.ListApprovalsResponse.FromString,
        )
        await _wait_admin(list_call, metadata, server)
        pending_id = await _open(decide, "rf_pending")
        grant_ids = [await _open(decide, grant_refund(i)) for i in range(total)]
        await _review(approve, metadata, grant_ids, plan.warmup_rounds, samples)
        calls = schedule(total, pending_id, grant_ids)
        warmup_calls = plan.warmup_rounds * len(DECIDE_KINDS)
        await _loop(decide, calls, warmup_calls, samples)
    return samples


# --- the run ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Plan:
    """What to run, from the command line."""

    rounds: int
    warmup_rounds: int
    config: str
    overrides: tuple[str, ...]


def _admin_overrides(workdir: pathlib.Path, secret: str) -> list[str]:
    secret_file = workdir / "reviewer.secret"
    secret_file.write_text(secret)
    secret_file.chmod(0o600)
    credential = {"secret_file": str(secret_file), "roles": ["reviewer"]}
    return [
        f"admin.socket={workdir / 'admin.sock'}",
        f"admin.credentials={json.dumps({REVIEWER: credential})}",
    ]


async def run(plan: Plan, workdir: pathlib.Path) -> tuple[list[KindStats], LmdbGrowth]:
    """Start the daemon, measure, stop it, read its approvals database.

    Raises:
        BenchError: the daemon did not start, answer or stop cleanly.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_hex(16)
    overrides = [
        *RATE_LIMIT_OVERRIDES,
        *_admin_overrides(workdir, secret),
        *plan.overrides,
    ]
    daemon = start_daemon(workdir, plan.config, overrides)
    try:
        allow = refund("rf_small", SMALL_AMOUNT).SerializeToString()
        await wait_answering(daemon, allow)
        target = f"unix://{workdir / 'admin.sock'}"
        samples = await measure(daemon, target, secret, plan)
    finally:
        code = stop_server(daemon)
    if code != 0:
        raise BenchError(f"daemon exited with {code}:\n{daemon.log_tail()}")
    rows = [
        summarize(
            kind,
            samples.latencies[kind],
            samples.after_open[kind],
            samples.errors[kind],
        )
        for kind in (*DECIDE_KINDS, REVIEW_KIND)
    ]
    return rows, read_growth(workdir / "audit")


def _header(report: dict[str, object]) -> str:
    settings = report["settings"]
    overrides = " ".join(settings["overrides"]) or "none"
    return (
        f"{machine_line(report['machine'], 'approval_bench')}\n"
        f"# daemon: {settings['config']} (approval rate limits raised; extra"
        f" --set: {overrides}), audit on {settings['audit_filesystem']}"
        f" ({settings['scratch_parent']}); 1 in flight on the Unix socket;"
        f" {settings['rounds']} rounds of allow, open, reuse, use round-robin"
        f" after {settings['warmup_rounds']} warm-up rounds; review ="
        " ApprovalService.Approve on the admin socket, timed before the loop;"
        " q = quarter of the run; after open = the calls sent right after an"
        " open answered, and their p50"
    )


def _growth_line(growth: LmdbGrowth) -> str:
    pages, values = growth.per_approval()
    return (
        f"# approvals LMDB db: {growth.approvals} approvals in"
        f" {growth.page_bytes} page bytes ({pages:.0f} per approval;"
        f" msgpack values {values:.0f} bytes each on average)"
    )


def _print_report(report: dict[str, object], rows, growth, as_json: bool) -> None:
    if as_json:
        allow = rows[0]
        report["kinds"] = [
            {**dataclasses.asdict(r), "ratio_to_allow": ratios(r, allow)} for r in rows
        ]
        report["approvals_db"] = dataclasses.asdict(growth)
        print(json.dumps(report, indent=2))
        return
    print(f"{_header(report)}\n{_growth_line(growth)}\n\n{format_table(rows)}")


def _failed(rows: Sequence[KindStats]) -> list[str]:
    return [
        f"{r.kind}: {r.answers} answers as expected, errors {r.errors}"
        for r in rows
        if r.errors or not r.answers
    ]


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = doc_parser(__doc__)
    parser.add_argument(
        "--rounds", type=rounds_type(MAX_ROUNDS), default=DEFAULT_ROUNDS,
        help=f"measured rounds, one call of each kind (default {DEFAULT_ROUNDS})",
    )  # fmt: skip
    parser.add_argument(
        "--warmup", type=rounds_type(MAX_ROUNDS), default=DEFAULT_WARMUP_ROUNDS,
        help=f"warm-up rounds, not measured (default {DEFAULT_WARMUP_ROUNDS})",
    )  # fmt: skip
    add_daemon_arguments(parser)
    parser.add_argument(
        "--smoke", action="store_true", help="a few rounds: check it still runs"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns 0, or 1 when a kind got an error or no answer."""
    args = _parse_args(argv)
    rounds, warmup = args.rounds, args.warmup
    if args.smoke:
        rounds, warmup = SMOKE_ROUNDS, SMOKE_WARMUP_ROUNDS
    if rounds + warmup > MAX_ROUNDS:
        print(
            f"approval_bench: --rounds + --warmup: expected at most {MAX_ROUNDS}, "
            f"got {rounds + warmup}",
            file=sys.stderr,
        )
        return 2
    plan = Plan(rounds, warmup, args.config, tuple(args.overrides))
    report: dict[str, object] = {"machine": machine_info()}
    with tempfile.TemporaryDirectory(prefix="kynara-bench-", dir=args.tmp_dir) as d:
        scratch = pathlib.Path(d)
        report["settings"] = {
            **daemon_settings(plan.config, plan.overrides, scratch),
            "rounds": rounds,
            "warmup_rounds": warmup,
        }
        try:
            rows, growth = uvloop.run(run(plan, scratch / "daemon"))
        except BenchError as err:
            print(f"approval_bench: {err}", file=sys.stderr)
            return 1
    _print_report(report, rows, growth, args.json)
    return exit_status("approval_bench", _failed(rows))


if __name__ == "__main__":
    raise SystemExit(main())
