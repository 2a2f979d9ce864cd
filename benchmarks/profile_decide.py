"""Where a durable decision's CPU goes: the real pipeline, in one process.

No gRPC and no second process: the shipped config and policies, the real
``Pipeline``, ``ApprovalBook`` and ``AuditWriter`` on a fresh LMDB log in a
temporary directory (durable unless ``--durability deferred``), driven by
``--in-flight`` tasks that each send the next request of decide_bench's mix
as soon as the previous one was answered, until ``--decisions`` answers.

It prints two tables:

- end to end: wall time, decisions per second, CPU per decision of the
  whole process and of the event loop's thread alone (the rest is the
  audit writer's thread: LMDB commit and sync), records per commit and
  time per commit;
- per stage: each step of a decision timed alone, in a loop over the same
  mix (thread CPU, microseconds per decision): the wire translation both
  ways, validation, identity, the engine (and, inside it, building the
  CEL activation), the record (build with redaction, canonical JSON and
  chain hash), the approval book's bookkeeping and the metrics. What the
  end-to-end loop CPU holds beyond their sum is the asyncio and writer
  handoff.

The stage loop calls a few of the pipeline's and engine's private helpers
on purpose: it measures them, it does not rely on them elsewhere.

Every answer is checked as decide_bench checks the mix: a request refused
with an error, or decided otherwise than the shipped policies decide it,
is counted and makes the run exit 1; the rates count answers only.

Examples:
    .venv/bin/python benchmarks/profile_decide.py
    .venv/bin/python benchmarks/profile_decide.py --decisions 50000 --in-flight 1
    .venv/bin/python benchmarks/profile_decide.py --pyinstrument  # the loop's call tree
    .venv/bin/python benchmarks/profile_decide.py --redact        # hash context.region
    .venv/bin/python benchmarks/profile_decide.py --group 32      # as the fast path
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import pathlib
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence

import uvloop
from kynara.v1 import decision_pb2 as pb

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from decide_bench import (  # noqa: E402 (the sibling script)
    doc_parser,
    exit_status,
    machine_info,
    machine_line,
    positive,
    request_mix,
    wrong_decision,
)

from kynara_sidecar import engine  # noqa: E402
from kynara_sidecar import pipeline as pipeline_module  # noqa: E402
from kynara_sidecar.approvals.book import APPROVALS_DB, ApprovalBook  # noqa: E402
from kynara_sidecar.audit.chain import (  # noqa: E402
    GENESIS_HASH,
    chain_hash,
    encode_record,  # noqa: E402
)
from kynara_sidecar.audit.record import record_from_decision  # noqa: E402
from kynara_sidecar.audit.store import AuditStore  # noqa: E402
from kynara_sidecar.audit.writer import AuditWriter  # noqa: E402
from kynara_sidecar.config import Config, load_config  # noqa: E402
from kynara_sidecar.decision import DecisionRequest, Timestamp  # noqa: E402
from kynara_sidecar.errors import KynaraError  # noqa: E402
from kynara_sidecar.metrics import Metrics  # noqa: E402
from kynara_sidecar.pipeline import (  # noqa: E402
    Answer,
    IncomingRequest,
    Pipeline,
    validate_request,
)
from kynara_sidecar.policy.loader import load_policies  # noqa: E402
from kynara_sidecar.server.wire import answer_to_proto, request_from_proto  # noqa: E402

__all__ = ["main"]

SHIPPED_CONFIG = REPO_ROOT / "config" / "kynara.yaml"
SHIPPED_POLICIES = REPO_ROOT / "config" / "policies"
# 20,000 decisions: about a second of work per pass at the target speed,
# and many thousands of samples at today's.
DEFAULT_DECISIONS = 20_000
# 64 in flight: enough waiting callers that group commit batches, as under
# decide_bench's highest load.
DEFAULT_IN_FLIGHT = 64
# Rounds of the mix per stage in the stage loop.
DEFAULT_STAGE_ROUNDS = 3_000
# A fixed 32-byte key for --redact: the cost of hashing, not a secret.
REDACTION_KEY = b"k" * 32


@dataclasses.dataclass
class Harness:
    """A pipeline wired as the daemon wires it, on a log of its own."""

    config: Config
    store: AuditStore
    writer: AuditWriter
    book: ApprovalBook
    pipeline: Pipeline
    metrics: Metrics
    commits: list[tuple[int, float]]


def build(scratch: pathlib.Path, durability: str, redact: bool) -> Harness:
    """The config, log, writer, book and pipeline, started and activated."""
    overrides = [
        f"agent.socket={scratch / 'agent.sock'}",
        f"policy.source={SHIPPED_POLICIES}",
        f"audit.path={scratch / 'audit'}",
        f"audit.durability={durability}",
        f"audit.signing_key={scratch / 'keys' / 'audit.pem'}",
        f"audit.witness_path={scratch / 'witness'}",
    ]
    if redact:
        key_file = scratch / "redaction.key"
        key_file.write_bytes(REDACTION_KEY)
        overrides += [
            "audit.redact.context.region=hash",
            f"audit.redaction_key={key_file}",
        ]
    config = load_config(SHIPPED_CONFIG, overrides)
    cfg = config.audit
    store = AuditStore.open(
        cfg.path,
        map_size=cfg.map_size,
        durability=str(cfg.durability),
        extra_dbs=(APPROVALS_DB,),
    )
    metrics = Metrics()
    commits: list[tuple[int, float]] = []

    def on_commit(records: int, seconds: float) -> None:
        # As the daemon's hook does, plus a tally for the report.
        metrics.count_commit(records, seconds)
        commits.append((records, seconds))

    writer = AuditWriter(store, max_batch=cfg.max_batch, on_commit=on_commit)
    writer.start()
    book = ApprovalBook(
        store,
        writer,
        config.approvals,
        daemon_id=config.identity.daemon_id,
        clock=time.time_ns,
        metrics=metrics,
    )
    book.load()
    book.start()
    pipeline = Pipeline(config, writer, metrics, book=book)
    pipeline.activate(load_policies(SHIPPED_POLICIES))
    return Harness(config, store, writer, book, pipeline, metrics, commits)


def incoming_mix() -> list[IncomingRequest]:
    """decide_bench's requests, translated as the gRPC door translates them."""
    return [
        request_from_proto(pb.DecideRequest.FromString(raw)) for _, raw in request_mix()
    ]


def mix_names() -> list[str]:
    """The names of decide_bench's requests, in ``incoming_mix``'s order."""
    return [name for name, _ in request_mix()]


# --- end to end ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EndToEnd:
    """One pass; ``answers`` counts the requests decided as expected, and
    the rate and CPU figures are per such answer."""

    answers: int
    # Requests refused, by the error's class name; decisions other than the
    # mix expects, by what was wrong.
    errors: dict[str, int]
    wrong: dict[str, int]
    in_flight: int
    wall_seconds: float
    process_cpu_us: float
    loop_cpu_us: float
    writer_cpu_us: float
    commits: int
    records_per_commit: float
    commit_us: float


async def drive(
    harness: Harness,
    mix: Sequence[IncomingRequest],
    decisions: int,
    in_flight: int,
    group: int = 0,
) -> EndToEnd:
    """Send ``decisions`` requests with ``in_flight`` closed-loop tasks,
    or, with ``group``, in groups of that many handed to
    ``Pipeline.decide_soon`` (as the fast path hands the frames of one
    read), ``in_flight // group`` groups outstanding; each outcome is
    checked against what the mix expects."""
    left = decisions
    harness.commits.clear()
    tally = _Tally(mix_names())

    async def worker(start: int) -> None:
        nonlocal left
        position = start
        while left > 0:
            left -= 1
            index = position % len(mix)
            try:
                outcome: object = await harness.pipeline.decide(mix[index])
            except KynaraError as err:
                outcome = err
            tally.add(index, outcome)
            position += 1

    wall, process, loop = time.perf_counter(), time.process_time(), time.thread_time()
    if group:
        await _grouped(harness.pipeline, mix, decisions, in_flight, group, tally)
    else:
        await asyncio.gather(*(worker(i) for i in range(in_flight)))
    loop = time.thread_time() - loop
    process = time.process_time() - process
    wall = time.perf_counter() - wall
    records = sum(n for n, _ in harness.commits)
    commits = len(harness.commits)
    per_answer = 1e6 / tally.answers if tally.answers else 0.0
    return EndToEnd(
        answers=tally.answers,
        errors=dict(tally.errors),
        wrong=dict(tally.wrong),
        in_flight=in_flight,
        wall_seconds=wall,
        process_cpu_us=process * per_answer,
        loop_cpu_us=loop * per_answer,
        writer_cpu_us=(process - loop) * per_answer,
        commits=commits,
        records_per_commit=records / commits if commits else 0.0,
        commit_us=sum(s for _, s in harness.commits) / commits * 1e6 if commits else 0,
    )


class _Tally:
    """The outcomes of a pass: answers as the mix expects, errors, and
    decisions the mix does not expect."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = names
        self.answers = 0
        self.errors: Counter[str] = Counter()
        self.wrong: Counter[str] = Counter()

    def add(self, index: int, outcome: object) -> None:
        if not isinstance(outcome, Answer):
            self.errors[type(outcome).__name__] += 1
            return
        wrong = wrong_decision(self.names[index], str(outcome.decision.effect))
        if wrong is None:
            self.answers += 1
        else:
            self.wrong[wrong] += 1


async def _grouped(
    pipeline: Pipeline,
    mix: Sequence[IncomingRequest],
    decisions: int,
    in_flight: int,
    group: int,
    tally: _Tally,
) -> None:
    finished = asyncio.get_running_loop().create_future()
    left, position, open_groups = decisions, 0, 0

    def submit() -> None:
        nonlocal left, position, open_groups
        size = min(group, left)
        if size <= 0:
            if not open_groups and not finished.done():
                finished.set_result(None)
            return
        left -= size
        open_groups += 1
        indexes = [(position + i) % len(mix) for i in range(size)]
        position += size
        pipeline.decide_soon(
            [mix[i] for i in indexes], lambda outcomes: landed(indexes, outcomes)
        )

    def landed(indexes: list[int], outcomes: list[object]) -> None:
        nonlocal open_groups
        open_groups -= 1
        for index, outcome in zip(indexes, outcomes, strict=True):
            tally.add(index, outcome)
        submit()

    for _ in range(max(1, in_flight // group)):
        submit()
    await finished


# --- per stage -----------------------------------------------------------------


def _per_decision_us(fn: Callable[[], object], rounds: int, per_round: int) -> float:
    started = time.thread_time()
    for _ in range(rounds):
        fn()
    return (time.thread_time() - started) / (rounds * per_round) * 1e6


def stages(
    harness: Harness, mix: Sequence[IncomingRequest], rounds: int
) -> dict[str, float]:
    """Microseconds of thread CPU per decision, stage by stage, over the mix."""
    pipeline, config = harness.pipeline, harness.config
    policies = pipeline.policies
    assert policies is not None
    raw = [payload for _, payload in request_mix()]
    now = Timestamp.from_nanos(time.time_ns())
    chains = [pipeline._establish_chain(request, now) for request in mix]
    envs = [pipeline._env_for(r, now, c) for r, c in zip(mix, chains, strict=True)]
    subjects = [
        DecisionRequest(
            chain=chain,
            action=r.action,
            resource=r.resource,
            context=r.context,
            request_id=r.request_id,
        )
        for r, chain in zip(mix, chains, strict=True)
    ]
    decisions = [
        engine.evaluate(policies.policy_set, policies.directory, s, e)
        for s, e in zip(subjects, envs, strict=True)
    ]
    redactor = config.audit.load_redactor()
    mode = str(config.identity.mode)

    def records():
        return [
            record_from_decision(
                request=s,
                env=e,
                decision=d,
                decision_id="0" * 36,
                daemon_id=config.identity.daemon_id,
                identity_mode=mode,
                redactor=redactor,
            )
            for s, e, d in zip(subjects, envs, decisions, strict=True)
        ]

    built = records()
    answers = [Answer(d, "0" * 36, 1, "00" * 32) for d in decisions]
    cache = getattr(pipeline, "_cache", None)
    n = len(mix)

    def each(fn):
        return lambda: [fn(i) for i in range(n)]

    table = {
        "wire: decode + translate request": each(
            lambda i: request_from_proto(pb.DecideRequest.FromString(raw[i]))
        ),
        "validate": each(lambda i: validate_request(mix[i])),
        "identity (chain)": each(lambda i: pipeline._establish_chain(mix[i], now)),
        "engine.evaluate (whole)": each(
            lambda i: engine.evaluate(
                policies.policy_set,
                policies.directory,
                subjects[i],
                envs[i],
                **({"cache": cache} if cache is not None else {}),
            )
        ),
        "  of which: CEL activation": each(
            lambda i: _activation(cache, policies, subjects[i], envs[i])
        ),
        "record build (+ redaction)": records,
        "canonical JSON + chain hash": each(
            lambda i: chain_hash(GENESIS_HASH, encode_record(built[i]))
        ),
        "approvals: note_action": each(
            lambda i: harness.book.note_action(envs[i].agent_id, mix[i].action)
        ),
        "metrics: count decision": each(
            lambda i: harness.metrics.count_decision(
                str(decisions[i].effect), mix[i].action, 0.0005
            )
        ),
        "wire: translate + encode answer": each(
            lambda i: answer_to_proto(answers[i]).SerializeToString()
        ),
        "decision id": each(lambda i: _decision_id()),
    }
    return {name: _per_decision_us(fn, rounds, n) for name, fn in table.items()}


def _activation(cache, policies, subject: DecisionRequest, env) -> object:
    # The variables for CEL and, as the engine hands them over, the prepared
    # activation of the first principal (the engine of before the
    # EvaluationCache handed the dict over with every condition instead).
    if cache is None:
        resolved = tuple(
            engine._resolve(policies.policy_set, policies.directory, pid)
            for pid in subject.chain
        )
        return engine._shared_activation(subject, env, resolved)
    chain = cache.chain(subject.chain)
    shared = engine._shared_activation(subject, env, chain, cache)
    first = chain.resolved[0]
    if "needed" not in dir(cache):  # before activations held only what is read
        return engine._activation(first, shared)
    needed = cache.needed(subject.resource.kind, subject.action, first.roles)
    return engine._activation(first, shared, needed, env, cache)


def _decision_id() -> str:
    maker = getattr(pipeline_module, "new_decision_id", None)
    return maker() if maker is not None else str(uuid.uuid4())


# --- the report ----------------------------------------------------------------


def _report(e2e: EndToEnd, split: dict[str, float]) -> str:
    lines = [
        f"end to end: {e2e.answers} answers as expected, {e2e.in_flight} in flight, "
        f"{e2e.wall_seconds:.2f} s wall = {e2e.answers / e2e.wall_seconds:,.0f}/s",
        f"  CPU per decision: {e2e.process_cpu_us:.1f} us "
        f"(event loop thread {e2e.loop_cpu_us:.1f} us, "
        f"writer thread {e2e.writer_cpu_us:.1f} us)",
        f"  commits: {e2e.commits}, {e2e.records_per_commit:.1f} records each, "
        f"{e2e.commit_us:.0f} us each (write + sync)",
        "per stage, thread CPU per decision (us), each timed alone:",
    ]
    width = max(len(name) for name in split)
    lines += [f"  {name:<{width}}  {us:8.2f}" for name, us in split.items()]
    counted = sum(us for name, us in split.items() if not name.startswith(" "))
    lines.append(
        f"  {'sum of stages':<{width}}  {counted:8.2f}   "
        f"(loop thread end to end {e2e.loop_cpu_us:.2f}; the rest is asyncio "
        "and the writer handoff)"
    )
    return "\n".join(lines)


def _failed(e2e: EndToEnd) -> list[str]:
    failures = [f"{n} requests refused with {kind}" for kind, n in e2e.errors.items()]
    failures += [f"{n} decisions wrong: {what}" for what, n in e2e.wrong.items()]
    if not e2e.answers:
        failures.append("no answer as expected")
    return failures


def _group_size(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 (off) or more, got {text}")
    return value


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = doc_parser(__doc__)
    parser.add_argument(
        "--decisions", type=positive(int), default=DEFAULT_DECISIONS,
        help=f"requests sent in the measured pass (default {DEFAULT_DECISIONS})",
    )  # fmt: skip
    parser.add_argument(
        "--in-flight", type=positive(int), default=DEFAULT_IN_FLIGHT,
        help=f"requests outstanding at once (default {DEFAULT_IN_FLIGHT})",
    )  # fmt: skip
    parser.add_argument(
        "--rounds", type=positive(int), default=DEFAULT_STAGE_ROUNDS,
        help=f"rounds of the mix per stage (default {DEFAULT_STAGE_ROUNDS})",
    )  # fmt: skip
    parser.add_argument(
        "--group",
        type=_group_size,
        default=0,
        help="hand requests to Pipeline.decide_soon in groups of this many "
        "(as the fast path does with the frames of one read; default 0: off)",
    )
    parser.add_argument(
        "--durability", choices=("durable", "deferred"), default="durable"
    )
    parser.add_argument(
        "--redact", action="store_true", help="hash context.region in records"
    )
    parser.add_argument(
        "--pyinstrument",
        action="store_true",
        help="profile the end-to-end pass with pyinstrument and print it",
    )
    parser.add_argument("--json", action="store_true", help="print JSON only")
    return parser.parse_args(argv)


async def _run(args: argparse.Namespace, scratch: pathlib.Path) -> tuple[str, EndToEnd]:
    harness = build(scratch, args.durability, args.redact)
    mix = incoming_mix()
    try:
        # Warm-up: the first approval opened, caches and the LMDB map settled.
        await drive(
            harness, mix, min(2_000, args.decisions), args.in_flight, args.group
        )
        profiler = None
        if args.pyinstrument:
            from pyinstrument import Profiler

            profiler = Profiler(interval=0.0002, async_mode="disabled")
            profiler.start()
        e2e = await drive(harness, mix, args.decisions, args.in_flight, args.group)
        if profiler is not None:
            profiler.stop()
        split = stages(harness, mix, args.rounds)
    finally:
        await harness.book.close()
        await harness.writer.close()
        harness.store.close()
    if args.json:
        report = {
            "machine": machine_info(),
            "end_to_end": dataclasses.asdict(e2e),
            "stages_us": split,
        }
        return json.dumps(report, indent=2), e2e
    text = machine_line(machine_info(), "profile_decide") + "\n" + _report(e2e, split)
    if profiler is not None:
        text += "\n\n" + profiler.output_text(unicode=False, color=False)
    return text, e2e


def main(argv: list[str] | None = None) -> int:
    """Run the profile; returns 0, or 1 when a request was refused or
    decided otherwise than the mix expects."""
    args = _parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kynara-profile-") as scratch:
        text, e2e = uvloop.run(_run(args, pathlib.Path(scratch)))
    print(text)
    return exit_status("profile_decide", _failed(e2e))


if __name__ == "__main__":
    sys.exit(main())
