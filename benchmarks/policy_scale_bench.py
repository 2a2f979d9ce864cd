"""How compile time, memory and decision latency grow with the policy set.

Generates policy sets of 10, 1,000, 10,000 and 100,000 rules as JSON files
(``generate_policy_set``): a baseline policy of two rules that apply to
everything (a region block and an admin grant), a probe policy of eight
rules on the domain ``d0``, then domains ``d1``, ``d2``, ... of three
policies each, every policy a few rules over the domain's kinds and actions,
with the domain's roles, some ``name.*`` patterns, some shadow rules, and
conditions drawn from a small pool of distinct expressions plus a few
unique ones. Every set holds the same baseline and probe policies, so the
probe requests have the same candidate rules at every size.

For each size, a fresh process loads and compiles the set
(``load_policies``): the wall time and the process's resident memory
(after imports, and its peak), then a second fresh process does it again
under ``tracemalloc`` for the peak of Python allocations. Then this process
loads every set and times ``engine.evaluate`` for two requests whose
(kind, action) has few candidate rules: ``exact`` (an action rules name
exactly, six candidates) and ``wildcard`` (an action only ``d0.k1.*`` and
the two ``*`` rules match, three candidates), for a chain of a user and an
agent. The sizes take turns, batch by batch, so noise hits all alike; the
ratio columns divide each size's figure by the 10-rule set's of this run.
With ``--daemon`` it then starts the real daemon (``kynara-sidecar run`` on
the shipped config, durable audit) once on each set: the time from spawning
it to its first answered ``Decide``, its memory, and the size of its audit
log, which keeps the policy files it loaded. The exit status is 1 when a
probe's candidate rules are not the expected ones or a process failed.

Examples:
    python benchmarks/policy_scale_bench.py                 # ~2 minutes
    python benchmarks/policy_scale_bench.py --sizes 10 100000 --rounds 100
    python benchmarks/policy_scale_bench.py --write /tmp/set100k --sizes 100000
    python benchmarks/policy_scale_bench.py --json
    python benchmarks/policy_scale_bench.py --daemon        # + daemon start, RSS
    python benchmarks/policy_scale_bench.py --smoke         # 10 and 1,000 rules
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import msgspec

BENCH_DIR = pathlib.Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))
from decide_bench import (  # noqa: E402 (the sibling script)
    BenchError,
    doc_parser,
    machine_info,
    machine_line,
    percentile,
    ratio_text,
    start_daemon,
    stop_server,
    table_row,
    wait_answering,
)

__all__ = [
    "CONDITION_POOL",
    "DEFAULT_SIZES",
    "PROBES",
    "SMOKE_SIZES",
    "Probe",
    "generate_policy_set",
    "main",
    "probe_request",
    "write_policy_set",
]

DEFAULT_SIZES = (10, 1_000, 10_000, 100_000)
SMOKE_SIZES = (10, 1_000)
# The generated sets are the same for a seed, so runs compare.
DEFAULT_SEED = 9
# Rounds x batch evaluations per (size, probe): 40 x 250 = 10,000 samples,
# enough for a p99 read from 100 of them; a round visits every size.
DEFAULT_ROUNDS = 40
DEFAULT_BATCH = 250
SMOKE_ROUNDS = 4
SMOKE_BATCH = 50
# Calls per (size, probe) before the first round, so caches are warm.
WARMUP_CALLS = 200
# Rules per generated policy: "a few", as policies written by hand hold.
MIN_POLICY_RULES, MAX_POLICY_RULES = 2, 8
POLICIES_PER_DOMAIN = 3
KINDS_PER_DOMAIN, ACTIONS_PER_KIND = 3, 6
# Principals besides the two probes: one per 100 rules, at most 1,000.
MAX_PRINCIPALS = 1_000
CHILD_TIMEOUT_SECONDS = 600
MIB = 1 << 20

# Conditions a generated rule draws from, as real policy sets repeat a few
# checks (amount limits, regions, business hours) across many rules.
BUSINESS_HOURS = (
    'env.now.getDayOfWeek("Europe/Berlin") >= 1 && '
    'env.now.getDayOfWeek("Europe/Berlin") <= 5 && '
    'env.now.getHours("Europe/Berlin") >= 9 && env.now.getHours("Europe/Berlin") < 17'
)
CONDITION_POOL = (
    "resource.attr.amount <= 50000",
    "resource.attr.amount > 50000",
    "resource.attr.amount < 0",
    'context.region in ["DE", "FR", "NL", "AT"]',
    BUSINESS_HOURS,
    "principal.attr.team == resource.attr.team",
    '"admin" in principal.roles',
    "resource.attr.owner == user.id",
    "chain.depth <= 3",
    'env.environment == "production"',
    'has(context.ticket) && context.ticket.startsWith("T-")',
    'resource.attr.tags.exists(t, t == "public")',
    'context.reason.lowerAscii().contains("customer")',
    'env.now < timestamp("2030-01-01T00:00:00Z")',
    'agent.attr.owner == user.id && agent.kind == "agent"',
    "size(resource.id) > 0",
)
BLOCKED_REGION = 'has(context.region) && context.region in ["KP", "IR", "SY"]'
# Of a generated rule's conditions: none, from the pool, unique to it.
NO_CONDITION, UNIQUE_CONDITION = 0.35, 0.05


@dataclasses.dataclass(frozen=True)
class Probe:
    """A request timed at every size; ``candidates`` rules can apply."""

    name: str
    kind: str
    action: str
    candidates: int


PROBES = (
    Probe("exact", "d0.k0", "d0.k0.a0", 6),
    Probe("wildcard", "d0.k1", "d0.k1.a7", 3),
)


# --- the generated policy sets ---------------------------------------------


def _rule(rule_id: str, effect: str, actions, resources, roles, **extra) -> dict:
    return {
        "id": rule_id,
        "effect": effect,
        "actions": list(actions),
        "resources": list(resources),
        "roles": list(roles),
        **{key: value for key, value in extra.items() if value},
    }


def _policy(name: str, rules: list[dict], roles: dict | None = None, **extra) -> dict:
    document = {"format_version": 1, "kind": "policy", "name": name, **extra}
    if roles:
        document["roles"] = roles
    document["rules"] = rules
    return document


def _domain_roles(domain: int) -> dict[str, dict]:
    reader, writer = f"d{domain}.reader", f"d{domain}.writer"
    return {
        reader: {"inherits": ["employee"]},
        writer: {"inherits": [reader], "description": f"Writes domain d{domain}."},
    }


def _baseline() -> dict:
    rules = [
        _rule("blocked-region", "deny", ["*"], ["*"], ["*"], condition=BLOCKED_REGION),
        _rule("admin-everything", "allow", ["*"], ["*"], ["admin"]),
    ]
    roles = {"employee": {}, "admin": {"inherits": ["employee"]}}
    return _policy("baseline", rules, roles, description="Applies to every request.")


def _probe_policy() -> dict:
    # The probes' candidates: ``exact`` meets rules 1-3 and 8 (plus the two
    # baseline rules), ``wildcard`` meets rule 5 (plus the two).
    reader, writer = "d0.reader", "d0.writer"
    rules = [
        _rule("no-negative", "deny", ["d0.k0.a0"], ["d0.k0"], [reader],
              condition="resource.attr.amount < 0"),
        _rule("small", "allow", ["d0.k0.a0"], ["d0.k0"], [reader],
              condition="resource.attr.amount <= 50000"),
        _rule("large", "require_approval", ["d0.k0.a0"], ["d0.k0"], [writer],
              condition="resource.attr.amount > 50000",
              approval={"risk": 40, "expires_in_seconds": 3600}),
        _rule("hours", "allow", ["d0.k0.a1"], ["d0.k0"], [reader],
              condition=BUSINESS_HOURS),
        _rule("team", "allow", ["d0.k1.*"], ["d0.k1"], [writer],
              condition="principal.attr.team == resource.attr.team"),
        _rule("staff", "allow", ["d0.k0.a2", "d0.k0.a3"], ["d0.k0"], ["employee"]),
        _rule("k2", "deny", ["d0.k2.a0"], ["d0.k2"], ["*"],
              condition='env.environment == "production"'),
        _rule("trial", "allow", ["d0.k0.a0"], ["d0.*"], [writer],
              condition="resource.attr.owner == user.id", mode="shadow"),
    ]  # fmt: skip
    return _policy("d0-p0", rules, _domain_roles(0))


def _condition(rng: random.Random, unique: str) -> str:
    draw = rng.random()
    if draw < NO_CONDITION:
        return ""
    if draw < NO_CONDITION + UNIQUE_CONDITION:
        return unique
    return rng.choice(CONDITION_POOL)


def _domain_rule(rng: random.Random, domain: int, rule_id: str, serial: int) -> dict:
    prefix = f"d{domain}"
    kind = rng.randrange(KINDS_PER_DOMAIN)
    resources = [f"{prefix}.k{kind}"]
    if rng.random() < 0.1:
        resources = [f"{prefix}.*"]
    actions = [f"{prefix}.k{kind}.a{rng.randrange(ACTIONS_PER_KIND)}"]
    draw = rng.random()
    if draw < 0.15:
        actions.append(f"{prefix}.k{kind}.a{rng.randrange(ACTIONS_PER_KIND)}")
    elif draw < 0.25:
        actions = [f"{prefix}.k{kind}.*"]
    roles = rng.choice(
        [[f"{prefix}.reader"]] * 3 + [[f"{prefix}.writer"]] * 3
        + [[f"{prefix}.reader", "admin"]] * 2 + [["employee"], ["*"]]
    )  # fmt: skip
    effect = rng.choices(["allow", "deny", "require_approval"], [70, 15, 15])[0]
    approval = None
    if effect == "require_approval" and rng.random() < 0.5:
        approval = {"risk": rng.randrange(101), "expires_in_seconds": 3600}
    unique = f"resource.attr.amount <= {serial}"
    return _rule(
        rule_id, effect, sorted(set(actions)), resources, roles,
        condition=_condition(rng, unique),
        mode="shadow" if rng.random() < 0.03 else None,
        description=f"Generated rule {serial} of domain {prefix}.",
        approval=approval,
    )  # fmt: skip


def _principals(rng: random.Random, count: int, domains: int) -> list[dict]:
    principals = [
        {"id": "probe-user", "kind": "user", "roles": ["d0.writer"],
         "attributes": {"team": "d0", "email": "probe@example.com"}},
        {"id": "probe-agent", "kind": "agent", "roles": ["d0.writer"],
         "attributes": {"team": "d0", "owner": "probe-user"}},
    ]  # fmt: skip
    for index in range(count):
        kind = "user" if index % 2 == 0 else "agent"
        roles = sorted(
            {f"d{rng.randrange(domains)}.{rng.choice(['reader', 'writer'])}"}
            | ({"admin"} if rng.random() < 0.01 else set())
        )
        principals.append(
            {"id": f"{kind}-{index}", "kind": kind, "roles": roles,
             "attributes": {"team": f"d{rng.randrange(domains)}"}}
        )  # fmt: skip
    return principals


def generate_policy_set(rules: int, *, seed: int = DEFAULT_SEED) -> dict[str, bytes]:
    """A policy set of exactly ``rules`` rules (at least 10), as JSON files.

    Args:
        rules: How many rules in all; the last policy is cut to fit.
        seed: Picks the rules; equal seeds and sizes give equal files.

    Returns:
        File name (below the policy root) to JSON bytes: the baseline and
        probe policies, one file per generated policy (``d<N>/p<M>.json``)
        and ``directory.json``.

    Raises:
        ValueError: ``rules`` is below 10 (the baseline and probe rules).
    """
    documents = {"baseline.json": _baseline(), "d0/p0.json": _probe_policy()}
    count = sum(len(doc["rules"]) for doc in documents.values())
    if rules < count:
        raise ValueError(f"expected at least {count} rules, got {rules}")
    rng = random.Random(seed)
    domain, serial = 0, count
    while count < rules:
        domain += 1
        for number in range(POLICIES_PER_DOMAIN):
            size = min(rng.randint(MIN_POLICY_RULES, MAX_POLICY_RULES), rules - count)
            if size <= 0:
                break
            body = []
            for position in range(size):
                body.append(_domain_rule(rng, domain, f"r{position}", serial))
                serial += 1
            name = f"d{domain}-p{number}"
            documents[f"d{domain}/p{number}.json"] = _policy(
                name, body, _domain_roles(domain)
            )
            count += size
    principals = _principals(rng, min(MAX_PRINCIPALS, rules // 100), max(domain, 1) + 1)
    files = {name: msgspec.json.encode(doc) for name, doc in documents.items()}
    files["directory.json"] = msgspec.json.encode(
        {"format_version": 1, "kind": "directory", "principals": principals}
    )
    return files


def write_policy_set(root: pathlib.Path, rules: int, *, seed: int = DEFAULT_SEED):
    """Write ``generate_policy_set(rules, seed=seed)`` below ``root``."""
    for name, content in generate_policy_set(rules, seed=seed).items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)


def probe_request(probe: Probe) -> Any:
    """The ``DecisionRequest`` a probe times: probe-user, then probe-agent."""
    from kynara_sidecar.decision import DecisionRequest, Resource

    attributes = {"amount": 1200, "team": "d0", "owner": "probe-user"}
    return DecisionRequest(
        ("probe-user", "probe-agent"),
        probe.action,
        Resource(probe.kind, "rec-1", attributes),
        {"region": "DE", "reason": "customer call"},
    )


# --- compiling, in a fresh process ------------------------------------------


def _status_mib(field: str) -> float:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def _child(mode: str, root: pathlib.Path) -> dict[str, Any]:
    """Load and compile ``root`` once in this (fresh) process; what it cost."""
    import tracemalloc

    from kynara_sidecar.policy import load_policies

    rss_before = _status_mib("VmRSS")
    if mode == "tracemalloc":
        tracemalloc.start()
    start = time.perf_counter()
    loaded = load_policies(root)
    seconds = time.perf_counter() - start
    rules = loaded.policy_set.rules
    conditions = [rule.condition for rule in rules if rule.condition is not None]
    result = {
        "seconds": seconds,
        "rss_before_mib": rss_before,
        "rss_peak_mib": _status_mib("VmHWM"),
        "rss_after_mib": _status_mib("VmRSS"),
        "rules": len(rules),
        "policies": len({rule.policy for rule in rules}),
        "distinct_conditions": len({condition.source for condition in conditions}),
        "compiled_conditions": len({id(condition) for condition in conditions}),
    }
    if mode == "tracemalloc":
        result["tracemalloc_peak_mib"] = tracemalloc.get_traced_memory()[1] / MIB
    return result


def _run_child(mode: str, root: pathlib.Path) -> dict[str, Any]:
    argv = [sys.executable, __file__, "--child", mode, str(root)]
    done = subprocess.run(
        argv, cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=CHILD_TIMEOUT_SECONDS, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(
            f"policy_scale_bench: compiling {root} failed:\n{done.stderr[-4000:]}"
        )
    return json.loads(done.stdout)


# --- deciding, side by side --------------------------------------------------


def _paths(loaded) -> dict[str, dict[str, Any]]:
    """How ``evaluate`` is called: alone, and (when the engine has one) with
    the ``EvaluationCache`` a daemon keeps per activated set, made once."""
    from kynara_sidecar import engine

    paths: dict[str, dict[str, Any]] = {"evaluate": {}}
    cache_type = getattr(engine, "EvaluationCache", None)
    if cache_type is not None:
        paths["cached"] = {"cache": cache_type(loaded.policy_set, loaded.directory)}
    return paths


def _time_decisions(loaded, request, env, options, calls: int, into: list[int]):
    from kynara_sidecar.engine import evaluate

    policy_set, directory = loaded.policy_set, loaded.directory
    clock = time.perf_counter_ns
    decision = None
    for _ in range(calls):
        start = clock()
        decision = evaluate(policy_set, directory, request, env, **options)
        into.append(clock() - start)
    return decision


def _measure_decisions(
    sets: dict[int, Any], rounds: int, batch: int
) -> dict[int, dict[str, dict[str, dict[str, Any]]]]:
    """size -> path -> probe -> p50/p99 (µs), samples and the decision."""
    from kynara_sidecar.decision import Env, Timestamp

    # A Monday, 10:00 in Berlin: the business-hours rules hold.
    env = Env(Timestamp(1796634000), environment="staging")
    requests = {probe.name: probe_request(probe) for probe in PROBES}
    paths = {size: _paths(loaded) for size, loaded in sets.items()}
    points = [
        (size, path, name) for size in sets for path in paths[size] for name in requests
    ]
    samples: dict[tuple, list[int]] = {point: [] for point in points}
    decided: dict[tuple, str] = {}
    for point in points:
        size, path, name = point
        decision = _time_decisions(
            sets[size], requests[name], env, paths[size][path], WARMUP_CALLS, []
        )
        decided[point] = f"{decision.effect} ({decision.reason_code})"
    for _ in range(rounds):
        for point in points:
            size, path, name = point
            _time_decisions(
                sets[size], requests[name], env, paths[size][path], batch,
                samples[point],
            )  # fmt: skip
    out: dict[int, dict[str, dict[str, dict[str, Any]]]] = {}
    for point in points:
        size, path, name = point
        latencies = sorted(samples[point])
        out.setdefault(size, {}).setdefault(path, {})[name] = {
            "p50_us": percentile(latencies, 0.5) / 1000,
            "p99_us": percentile(latencies, 0.99) / 1000,
            "samples": len(latencies),
            "decision": decided[point],
        }
    return out


# --- the report --------------------------------------------------------------

COLUMNS = (
    ("size", 4), ("path", 8), ("rules", 6), ("policies", 8), ("conditions", 10),
    ("compile s", 9), ("rss MiB", 7), ("peak MiB", 8),
    *((f"{probe.name[:5]} {figure}", 13) for probe in PROBES
      for figure in ("p50 µs", "p99 µs", "p50 x10")),
)  # fmt: skip


def _size_text(size: int) -> str:
    return f"{size // 1000}k" if size >= 1000 and size % 1000 == 0 else str(size)


def _compile_cells(size: int, row: dict[str, Any]) -> list[str]:
    compiled = row["compile"]
    return [
        _size_text(size), str(compiled["rules"]), str(compiled["policies"]),
        str(compiled["distinct_conditions"]), f"{compiled['seconds']:.2f}",
        f"{compiled['rss_peak_mib']:.0f}", f"{row['tracemalloc_peak_mib']:.0f}",
    ]  # fmt: skip


def _decide_cells(figures: dict[str, Any], base: dict[str, Any]) -> list[str]:
    cells = []
    for probe in PROBES:
        mine, smallest = figures[probe.name], base[probe.name]
        ratio = mine["p50_us"] / smallest["p50_us"] if smallest["p50_us"] else None
        cells += [f"{mine['p50_us']:.1f}", f"{mine['p99_us']:.1f}", ratio_text(ratio)]
    return cells


def format_table(rows: dict[int, dict[str, Any]]) -> str:
    """A line per size and path; x10 divides by the smallest size's p50 on
    the same path."""
    smallest = rows[min(rows)]["decide"]
    lines = [table_row([name for name, _ in COLUMNS], COLUMNS, left=2)]
    for size, row in rows.items():
        compiled = _compile_cells(size, row)
        for path, figures in row["decide"].items():
            cells = [
                compiled[0], path, *compiled[1:],
                *_decide_cells(figures, smallest[path]),
            ]  # fmt: skip
            lines.append(table_row(cells, COLUMNS, left=2))
            compiled = [""] * len(compiled)
    return "\n".join(lines)


def _header(report: dict[str, Any]) -> list[str]:
    decided = report["rows"][min(report["rows"])]["decide"]["evaluate"]
    probes = "; ".join(
        f"{p.name}: {p.action} on {p.kind}, {p.candidates} candidates -> "
        f"{decided[p.name]['decision']}"
        for p in PROBES
    )
    return [
        machine_line(report["machine"], "policy_scale_bench"),
        "# compile: load_policies in a fresh process (rss: its peak RSS; peak: "
        "tracemalloc's peak, in another)",
        f"# decide: engine.evaluate alone and with an EvaluationCache made once "
        f"per set (cached), {report['samples']} calls per point, sizes in turn",
        f"# chain probe-user -> probe-agent; {probes}",
    ]


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = doc_parser(__doc__)
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES), metavar="N",
        help="rules per generated set (default 10 1000 10000 100000; at least 10)",
    )  # fmt: skip
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS)
    parser.add_argument("--batch", type=int, default=DEFAULT_BATCH)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument(
        "--write", metavar="DIR",
        help="only write the sets (DIR/<size>/...) and exit, for other tools",
    )  # fmt: skip
    parser.add_argument("--tmp-dir", help="parent of the scratch directory")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    parser.add_argument(
        "--daemon", action="store_true",
        help="also start the real daemon once on each set: start time, memory",
    )  # fmt: skip
    parser.add_argument(
        "--smoke", action="store_true", help="sizes 10 and 1,000, few rounds"
    )
    parser.add_argument(
        "--child", nargs=2, metavar=("MODE", "DIR"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.sizes, args.rounds, args.batch = (
            list(SMOKE_SIZES),
            SMOKE_ROUNDS,
            SMOKE_BATCH,
        )
    if min(args.sizes) < 10 or args.rounds < 1 or args.batch < 1:
        parser.error(
            "expected --sizes of at least 10, --rounds and --batch of 1 or more"
        )
    return args


def _check_probes(size: int, loaded) -> None:
    for probe in PROBES:
        found = loaded.policy_set.candidate_rules(probe.kind, probe.action)
        if len(found) != probe.candidates:
            raise SystemExit(
                f"policy_scale_bench: probe {probe.name} has {len(found)} candidate "
                f"rules at {size} rules, expected {probe.candidates}"
            )


# --- the daemon, once per size -------------------------------------------------


def _probe_payload() -> bytes:
    from kynara.v1 import decision_pb2 as pb

    probe = PROBES[0]
    return pb.DecideRequest(
        asserted_chain=["probe-user", "probe-agent"],
        action=probe.action,
        resource=pb.Resource(
            kind=probe.kind, id="rec-1",
            attributes={"amount": pb.Value(int_value=1200)},
        ),
        context={"region": pb.Value(string_value="DE")},
    ).SerializeToString()  # fmt: skip


def _process_mib(pid: int, field: str) -> float:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


async def _start_once(root: pathlib.Path, workdir: pathlib.Path) -> dict[str, Any]:
    """Start the daemon (shipped config, durable audit) on the set at root;
    the time to its first answer, its memory and its audit log's size."""
    overrides = [
        f"policy.source={root}", "identity.agent_id=probe-agent",
        f"agent.fast_socket={workdir / 'fast.sock'}",
        f"admin.socket={workdir / 'admin.sock'}",
    ]  # fmt: skip
    start = time.monotonic()
    server = start_daemon(workdir, "config/kynara.yaml", overrides)
    try:
        await wait_answering(server, _probe_payload())
        seconds = time.monotonic() - start
        pid = server.process.pid
        rss, peak = _process_mib(pid, "VmRSS"), _process_mib(pid, "VmHWM")
    finally:
        code = stop_server(server)
    if code != 0:
        raise BenchError(f"daemon exited {code}:\n{server.log_tail()}")
    audit = sum(
        path.stat().st_size for path in (workdir / "audit").rglob("*") if path.is_file()
    )
    return {
        "start_seconds": seconds, "rss_mib": rss, "rss_peak_mib": peak,
        "audit_mib": audit / MIB,
    }  # fmt: skip


def run_daemons(sizes: Sequence[int], scratch: pathlib.Path) -> dict[int, dict]:
    """``_start_once`` for each size's set (already written below scratch)."""
    import asyncio

    return {
        size: asyncio.run(_start_once(scratch / str(size), scratch / f"daemon-{size}"))
        for size in sorted(set(sizes))
    }


def format_daemon_table(started: dict[int, dict[str, Any]]) -> str:
    """A line per size: the daemon's start, memory and audit log."""
    columns = (
        ("size", 4), ("start s", 7), ("rss MiB", 7), ("peak MiB", 8),
        ("audit MiB", 9),
    )  # fmt: skip
    lines = [table_row([name for name, _ in columns], columns, left=1)]
    for size, figures in started.items():
        cells = [
            _size_text(size), f"{figures['start_seconds']:.2f}",
            f"{figures['rss_mib']:.0f}", f"{figures['rss_peak_mib']:.0f}",
            f"{figures['audit_mib']:.1f}",
        ]  # fmt: skip
        lines.append(table_row(cells, columns, left=1))
    return "\n".join(lines)


def run(
    sizes: Sequence[int], rounds: int, batch: int, seed: int, scratch: pathlib.Path
):
    """Generate, compile (in fresh processes) and time every size."""
    from kynara_sidecar.policy import load_policies

    rows: dict[int, dict[str, Any]] = {}
    sets = {}
    for size in sorted(set(sizes)):
        root = scratch / str(size)
        write_policy_set(root, size, seed=seed)
        compiled = _run_child("time", root)
        traced = _run_child("tracemalloc", root)
        rows[size] = {
            "compile": compiled,
            "tracemalloc_peak_mib": traced["tracemalloc_peak_mib"],
        }
        sets[size] = load_policies(root)
        _check_probes(size, sets[size])
    decided = _measure_decisions(sets, rounds, batch)
    for size, row in rows.items():
        row["decide"] = decided[size]
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or one of its parts); returns the exit status."""
    args = _parse_args(argv)
    if args.child:
        mode, root = args.child
        print(json.dumps(_child(mode, pathlib.Path(root))))
        return 0
    if args.write:
        for size in args.sizes:
            write_policy_set(pathlib.Path(args.write) / str(size), size, seed=args.seed)
        return 0
    report: dict[str, Any] = {"machine": machine_info(), "seed": args.seed}
    started: dict[int, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="kynara-scale-", dir=args.tmp_dir) as d:
        rows = run(args.sizes, args.rounds, args.batch, args.seed, pathlib.Path(d))
        if args.daemon:
            try:
                started = run_daemons(args.sizes, pathlib.Path(d))
            except BenchError as err:
                print(f"policy_scale_bench: {err}", file=sys.stderr)
                return 1
    report["samples"] = args.rounds * args.batch
    report["rows"] = rows
    if args.json:
        rows_out = {str(k): v for k, v in rows.items()}
        print(json.dumps({**report, "rows": rows_out, "daemon": started}))
        return 0
    print("\n".join([*_header(report), "", format_table(rows)]))
    if started:
        print(
            "\n# daemon: `run` on config/kynara.yaml (durable audit) and each set; "
            "start s = spawn to first Decide answered; audit = its log after that\n"
        )
        print(format_daemon_table(started))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
