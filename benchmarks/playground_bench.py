"""What a playground what-if run costs in a process of its own, beside the
same run in a worker thread of the daemon.

The playground runs each what-if (parse, compile, decide, explain) in a
process forked from a fork server (``server.playground._run_isolated``);
before, it ran in a worker thread of the daemon's process. This script
times both on the same runs, taking turns round by round so noise hits
both alike: ``edited`` sends the shipped policies (config/policies) as an
edited set, which is compiled and decided beside the active set;
``active`` decides under the active set alone (the process compiles it
again from its stored files). Each run is awaited from an asyncio loop as
the daemon's handler awaits it; a ticker on that loop (every 1 ms) records
how late it woke, which is how long the run held the loop and the
interpreter's lock. The first runs of each kind (which start the fork
server) are left out as warm-up.

``--replaces N`` adds a file whose condition builds a string of 100 x
100**N characters (the breaker's repro): with 3 the thread path holds the
interpreter for about a second per run; do not use 4 without isolation
(tens of GB). The exit status is 1 when the two ways answer differently.

Examples:
    python benchmarks/playground_bench.py                   # ~20 s
    python benchmarks/playground_bench.py --rounds 200
    python benchmarks/playground_bench.py --replaces 3 --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import msgspec

from kynara_sidecar.audit.store import PolicySource
from kynara_sidecar.config import PlaygroundConfig
from kynara_sidecar.decision import Timestamp
from kynara_sidecar.policy.loader import load_policies, read_documents
from kynara_sidecar.policy.model import DirectoryDocument
from kynara_sidecar.server import playground

BENCH_DIR = pathlib.Path(__file__).resolve().parent
# Each run's process runs this script again as its main module (so does the
# daemon's, with its console script): the sibling script, which imports gRPC
# and more, is imported in ``main`` only, so that this stays as cheap as
# the daemon's.

__all__ = ["main"]

POLICIES = BENCH_DIR.parent / "config" / "policies"
REQUEST = """\
request:
  now: "2026-12-07T10:00:00+01:00"
  chain: [alice, support-bot]
  action: payments.refund.issue
  resource: {kind: payments.refund, id: rf_1, attributes: {amount: 1200}}
"""
HUNDRED = "a" * 100
COLUMNS = (
    ("run", 8),
    ("way", 8),
    ("p50 ms", 9),
    ("p90 ms", 9),
    ("max ms", 9),
    ("loop lag max ms", 16),
    ("p50 vs thread", 14),
)


def _huge_file(replaces: int) -> playground._File:
    built = f'"{HUNDRED}"' + f'.replace("a", "{HUNDRED}")' * replaces
    return playground._File(
        "huge.yaml",
        "format_version: 1\nkind: policy\nname: huge\nrules:\n"
        "  - id: huge\n    effect: allow\n    actions: [payments.refund.issue]\n"
        "    resources: [payments.refund]\n    roles: [support, support_agent]\n"
        f"    condition: 'size({built}) > 0'\n",
    )


def _setup(replaces: int) -> dict[str, Any]:
    """The shipped set as the daemon holds it (compiled, and its stored
    files) and as an edited copy."""
    documents = read_documents(POLICIES)
    active = load_policies(POLICIES)
    policy = {d.name: d.content for d in documents if not _is_directory(d)}
    directory = {d.name: d.content for d in documents if _is_directory(d)}
    files = [playground._File(d.name, d.content.decode()) for d in documents]
    if replaces:
        files.append(_huge_file(replaces))
    env = playground.PlaygroundSources(
        policies=lambda: active, store=lambda: None, authenticate=lambda _: None
    ).env_at(Timestamp.from_nanos(time.time_ns()))
    stored = {
        "policy_revision": active.policy_set.revision,
        "directory_revision": active.directory.revision,
        "policy": PolicySource(policy),
        "directory": PolicySource(directory),
    }
    return {"active": active, "files": files, "env": env, "stored": stored}


def _is_directory(document: Any) -> bool:
    return isinstance(document.document, DirectoryDocument)


def _runs(setup: dict[str, Any]) -> dict[tuple[str, str], Callable[[], Any]]:
    """Each (run, way) as a blocking call, as the handler hands it over."""
    active, env, limits = setup["active"], setup["env"], PlaygroundConfig()
    runs: dict[tuple[str, str], Callable[[], Any]] = {}
    for run, files in (("edited", setup["files"]), ("active", None)):
        job = msgspec.msgpack.encode(
            playground._WhatIfJob(REQUEST, env, files, **setup["stored"])
        )
        runs[(run, "thread")] = lambda f=files: _thread_answer(f, active, env)
        runs[(run, "process")] = lambda j=job: playground._run_isolated(j, limits)
    return runs


def _thread_answer(files: Any, active: Any, env: Any) -> tuple[int, dict[str, Any]]:
    try:
        return 200, playground._what_if(REQUEST, files, active, env)
    except playground._Refused as refused:
        return refused.status, refused.body
    except MemoryError:
        return 422, {"error": "MemoryError"}


async def _timed(call: Callable[[], Any]) -> tuple[float, float, Any]:
    """Wall time of one run awaited from the loop, and the loop's worst
    lateness meanwhile."""
    lag, done = [0.0], asyncio.Event()

    async def tick() -> None:
        while not done.is_set():
            planned = time.perf_counter() + 0.001
            await asyncio.sleep(0.001)
            lag[0] = max(lag[0], time.perf_counter() - planned)

    ticker = asyncio.create_task(tick())
    started = time.perf_counter()
    answer = await asyncio.to_thread(call)
    took = time.perf_counter() - started
    done.set()
    await ticker
    return took, lag[0], answer


async def _measure(runs: dict, rounds: int, warmup: int) -> dict:
    results: dict[tuple[str, str], dict[str, list]] = {
        key: {"took": [], "lag": [], "answers": []} for key in runs
    }
    for i in range(warmup + rounds):
        for key, call in runs.items():
            took, lag, answer = await _timed(call)
            if i >= warmup:
                results[key]["took"].append(took)
                results[key]["lag"].append(lag)
                results[key]["answers"].append(answer)
    return results


def _effects(answers: list) -> set[str]:
    return {
        f"{status} {body.get('decision', {}).get('effect', body.get('error', ''))}"[:80]
        for status, body in answers
    }


def _table(results: dict, bench: Any) -> tuple[str, list[str]]:
    machine_line, percentile = bench.machine_line, bench.percentile
    ratio_text, table_row = bench.ratio_text, bench.table_row
    lines = [machine_line(bench.machine_info(), "playground_bench"), ""]
    lines.append(table_row([name for name, _ in COLUMNS], COLUMNS, 2))
    problems = []
    for run in ("edited", "active"):
        thread = statistics.median(results[(run, "thread")]["took"])
        for way in ("thread", "process"):
            got = results[(run, way)]
            took = sorted(got["took"])
            cells = [
                run,
                way,
                f"{statistics.median(took) * 1e3:.1f}",
                f"{percentile(took, 0.9) * 1e3:.1f}",
                f"{took[-1] * 1e3:.1f}",
                f"{max(got['lag']) * 1e3:.1f}",
                ratio_text(statistics.median(took) / thread),
            ]
            lines.append(table_row(cells, COLUMNS, 2))
        ours = _effects(results[(run, "thread")]["answers"])
        theirs = _effects(results[(run, "process")]["answers"])
        if ours != theirs:
            problems.append(f"{run}: thread answered {ours}, process {theirs}")
    return "\n".join(lines), problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50, help="runs of each kind")
    parser.add_argument("--warmup", type=int, default=3, help="runs left out first")
    parser.add_argument(
        "--replaces", type=int, default=0, choices=range(4), help="see above"
    )
    args = parser.parse_args(argv)
    runs = _runs(_setup(args.replaces))
    results = asyncio.run(_measure(runs, args.rounds, args.warmup))
    sys.path.insert(0, str(BENCH_DIR))
    import decide_bench  # the sibling script: table_row, machine_line, ...

    text, problems = _table(results, decide_bench)
    print(text)
    for problem in problems:
        print(f"DIFFERENT ANSWERS: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
