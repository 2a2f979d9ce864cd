"""Closed-loop load on the daemon's gRPC Decide, side by side with a bare gRPC echo.

Three processes: this one generates the load (``loadgen.py``'s closed loop,
grpc.aio on uvloop), the daemon (``python -m kynara_sidecar.cli run`` on the
shipped config, durable audit unless ``--set`` says otherwise) and
``echo_server.py``, the floor. For each transport (``grpc-unix``: gRPC on
the daemon's Unix socket; ``grpc-tcp``: gRPC on loopback TCP; the fast
path is measured by ``peer_cerbos/peer_bench.py``) and each number of
requests in flight, a fresh daemon on a fresh audit directory is started,
and the same closed loop is run against the echo server and then the
daemon: each of N workers sends the next request of the mix as soon as its
previous answer arrived. After a warm-up, it measures for a fixed time:
latency percentiles, answers per second, and the server's CPU seconds per
1,000 answers read from ``/proc/<pid>/stat`` (all threads, user + system).

The machine may be shared and noisy, so read the daemon only against the
echo floor of the same run: the ``ratio`` rows are daemon / echo.

Examples:
    .venv/bin/python benchmarks/decide_bench.py
    .venv/bin/python benchmarks/decide_bench.py --seconds 10 --in-flight 1 8 64 256
    .venv/bin/python benchmarks/decide_bench.py --set audit.durability=deferred --json
    .venv/bin/python benchmarks/decide_bench.py --transport grpc-unix --pid-file d.pid
    .venv/bin/python benchmarks/decide_bench.py --smoke     # ~0.5 s a point; CI check
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from typing import Any

import grpc
import uvloop
from kynara.v1 import decision_pb2 as pb

__all__ = [
    "DEFAULT_IN_FLIGHT",
    "DEFAULT_SECONDS",
    "DEFAULT_WARMUP_SECONDS",
    "MIX_DECISIONS",
    "TRANSPORT_LABELS",
    "Measurement",
    "add_daemon_arguments",
    "daemon_settings",
    "doc_parser",
    "exit_status",
    "machine_info",
    "machine_line",
    "main",
    "measure",
    "percentile",
    "positive",
    "ratio_text",
    "ratios",
    "request_mix",
    "rounds_type",
    "summarize",
    "table_row",
    "transport_label",
    "wrong_decision",
]

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
ECHO_SCRIPT = pathlib.Path(__file__).resolve().parent / "echo_server.py"
sys.path.insert(0, str(ECHO_SCRIPT.parent))
from echo_server import ECHO_METHOD  # noqa: E402 (the sibling script)
from loadgen import (  # noqa: E402 (the sibling script; re-exported here)
    CHANNEL_OPTIONS,
    GrpcClient,
    Usage,
    WindowRecord,
    closed_loop,
    percentile,
)

DECIDE_METHOD = "/kynara.v1.DecisionService/Decide"
# Server.targets keys: how each server is reached.
TRANSPORTS = ("unix", "tcp")
# What tables and JSON call each transport: both are gRPC, and the daemon's
# fast path is on a Unix socket too, so "unix" alone would be ambiguous.
TRANSPORT_LABELS = {"unix": "grpc-unix", "tcp": "grpc-tcp"}
# 1: one agent asking in turn (pure latency); 8: a busy agent with parallel
# tools; 64: far more than one agent sends, to find the throughput ceiling.
DEFAULT_IN_FLIGHT = (1, 8, 64)
# 5 s gives thousands of answers per point even at 1 in flight, so p99 is
# read from dozens of samples; the 12 points then take about 1.5 minutes.
DEFAULT_SECONDS = 5.0
# Long enough for connections, grpc's pollers and the LMDB map to settle.
DEFAULT_WARMUP_SECONDS = 1.0
# --smoke: only proves that every point still runs and gets answers.
SMOKE_SECONDS = 0.5
SMOKE_WARMUP_SECONDS = 0.1
START_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 30.0
# Far above any answer of a working server; a hung one ends the point.
CALL_TIMEOUT_SECONDS = 30.0
LOG_TAIL_CHARS = 4000


# --- the request mix -------------------------------------------------------


def _refund(refund_id: str, amount: int) -> pb.DecideRequest:
    return pb.DecideRequest(
        asserted_chain=["alice"],
        action="payments.refund.issue",
        resource=pb.Resource(
            kind="payments.refund",
            id=refund_id,
            attributes={"amount": pb.Value(int_value=amount)},
        ),
        context={"region": pb.Value(string_value="DE")},
    )


def request_mix() -> list[tuple[str, bytes]]:
    """The requests each worker cycles through, named and serialized.

    Returns:
        (name, DecideRequest bytes) for: a small refund alice may issue
        (allow), a large one (require_approval) and a CRM contact read (allow
        in Berlin business hours, deny outside them).
    """
    crm_read = pb.DecideRequest(
        asserted_chain=["alice"],
        action="crm.contact.read",
        resource=pb.Resource(kind="crm.contact", id="ct_1"),
        context={"region": pb.Value(string_value="DE")},
    )
    return [
        ("small refund", _refund("rf_small", 1200).SerializeToString()),
        ("large refund", _refund("rf_large", 120000).SerializeToString()),
        ("crm read", crm_read.SerializeToString()),
    ]


# What the shipped policies (config/policies) may decide for each request of
# the mix: anything else means a run measured some other path than it says.
MIX_DECISIONS: dict[str, tuple[str, ...]] = {
    "small refund": ("allow",),
    "large refund": ("require_approval",),
    # Allowed in Berlin business hours, denied outside them.
    "crm read": ("allow", "deny"),
}


def wrong_decision(name: str, decision: str) -> str | None:
    """What is wrong with ``decision`` (``allow``, ...) for the mix's request
    ``name``, or None when the shipped policies decide it so."""
    expected = MIX_DECISIONS[name]
    if decision in expected:
        return None
    return f"{name}: expected {' or '.join(expected)}, got {decision}"


# --- pure statistics and formatting ----------------------------------------


@dataclasses.dataclass(frozen=True)
class Measurement:
    """One server at one (transport, in-flight) point, over the window;
    ``transport`` is its label (``grpc-unix`` or ``grpc-tcp``)."""

    server: str
    transport: str
    in_flight: int
    seconds: float
    answers: int
    errors: dict[str, int]
    p50_ms: float
    p99_ms: float
    answers_per_second: float
    server_cpu_seconds_per_1k: float
    generator_cpu_percent: float
    host_cpu_percent: float


def transport_label(transport: str) -> str:
    """The table's name of a transport (``unix`` -> ``grpc-unix``); a label
    is returned as it is."""
    return TRANSPORT_LABELS.get(transport, transport)


def summarize(
    server: str,
    transport: str,
    in_flight: int,
    window: WindowRecord,
    usage: Usage,
) -> Measurement:
    """Turn a finished window and its CPU usage into one table row.

    Args:
        server: "daemon" or "echo".
        transport: "unix" or "tcp" (or their labels).
        in_flight: requests kept in flight.
        window: latencies (ns) and errors recorded in the window.
        usage: CPU and wall-clock deltas over the same window.

    Returns:
        The measurement; rates are 0 when nothing was answered.
    """
    ordered = sorted(window.latencies)
    answers = len(ordered)
    per_1k = usage.server_cpu / answers * 1000 if answers else 0.0
    return Measurement(
        server=server,
        transport=transport_label(transport),
        in_flight=in_flight,
        seconds=round(usage.wall, 3),
        answers=answers,
        errors=dict(window.errors),
        p50_ms=percentile(ordered, 0.50) / 1e6,
        p99_ms=percentile(ordered, 0.99) / 1e6,
        answers_per_second=answers / usage.wall if usage.wall else 0.0,
        server_cpu_seconds_per_1k=per_1k,
        generator_cpu_percent=100 * usage.generator_cpu / usage.wall,
        host_cpu_percent=usage.host_busy_percent,
    )


RATIO_FIELDS = ("p50_ms", "p99_ms", "answers_per_second", "server_cpu_seconds_per_1k")


def ratios(daemon: Measurement, echo: Measurement) -> dict[str, float | None]:
    """daemon / echo for each compared figure; None where echo is 0."""
    out: dict[str, float | None] = {}
    for name in RATIO_FIELDS:
        floor = getattr(echo, name)
        out[name] = getattr(daemon, name) / floor if floor else None
    return out


COLUMNS = (
    ("transport", 9), ("in-flight", 9), ("server", 6), ("p50 ms", 8),
    ("p99 ms", 8), ("answers/s", 10), ("cpu s/1k", 9), ("gen cpu%", 8),
    ("host cpu%", 9), ("errors", 6),
)  # fmt: skip


def table_row(
    cells: Sequence[str], columns: Sequence[tuple[str, int]], left: int
) -> str:
    """One line of a benchmark's plain-text table: each cell padded to its
    column's width, the first ``left`` cells (the names) flush left and the
    rest (the figures) flush right."""
    return "  ".join(
        cell.ljust(width) if i < left else cell.rjust(width)
        for i, (cell, (_, width)) in enumerate(zip(cells, columns, strict=True))
    ).rstrip()


def ratio_text(ratio: float | None) -> str:
    """A ratio as the tables show it: ``x1.23``, or ``-`` when there is none."""
    return f"x{ratio:.2f}" if ratio is not None else "-"


def _row(cells: Sequence[str]) -> str:
    return table_row(cells, COLUMNS, left=3)


def _measured_cells(m: Measurement) -> list[str]:
    return [
        m.transport, str(m.in_flight), m.server, f"{m.p50_ms:.3f}",
        f"{m.p99_ms:.3f}", f"{m.answers_per_second:.0f}",
        f"{m.server_cpu_seconds_per_1k:.3f}", f"{m.generator_cpu_percent:.0f}",
        f"{m.host_cpu_percent:.0f}", str(sum(m.errors.values())),
    ]  # fmt: skip


def _ratio_cells(daemon: Measurement, ratio: dict[str, float | None]) -> list[str]:
    shown = [f"x{ratio[name]:.2f}" if ratio[name] else "-" for name in RATIO_FIELDS]
    return [daemon.transport, str(daemon.in_flight), "ratio", *shown, "", "", ""]


def format_table(points: Sequence[tuple[Measurement, Measurement]]) -> str:
    """The plain-text table: echo, daemon and ratio rows for each point."""
    lines = [_row([name for name, _ in COLUMNS])]
    for echo, daemon in points:
        lines.append(_row(_measured_cells(echo)))
        lines.append(_row(_measured_cells(daemon)))
        lines.append(_row(_ratio_cells(daemon, ratios(daemon, echo))))
    return "\n".join(lines)


# --- reading the operating system ------------------------------------------
# (percentile and CHANNEL_OPTIONS live in loadgen.py and are re-exported
# here for the benchmarks that import them from this one.)


def filesystem_of(path: pathlib.Path) -> str:
    """The filesystem type holding ``path`` (tmpfs would make syncs free)."""
    best, kind = "", "unknown"
    for line in pathlib.Path("/proc/mounts").read_text().splitlines():
        _, mount, fstype = line.split()[:3]
        inside = str(path) == mount or str(path).startswith(mount.rstrip("/") + "/")
        if inside and len(mount) > len(best):
            best, kind = mount, fstype
    return kind


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def machine_info() -> dict[str, object]:
    """The date, the machine and the versions that matter."""
    now = datetime.datetime.now(datetime.UTC)
    return {
        "date": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        **{name: metadata.version(name) for name in ("grpcio", "protobuf", "uvloop")},
        "kernel": platform.release(),
        "loadavg": [round(v, 2) for v in os.getloadavg()],
    }


def machine_line(info: dict[str, object], bench: str = "decide_bench") -> str:
    """The header line of ``bench``'s table, from ``machine_info()`` (and
    whatever versions the benchmark added to it)."""
    shown = {**info, "loadavg": " ".join(f"{v:.2f}" for v in info["loadavg"])}
    fields = " ".join(f"{k}={v}" for k, v in shown.items() if k != "date")
    return f"# kynara {bench} {info['date']}  {fields}"


# --- servers under test ----------------------------------------------------


@dataclasses.dataclass
class Server:
    """A server process and how to reach it on each transport."""

    name: str
    method: str
    process: subprocess.Popen
    targets: dict[str, str]
    log_path: pathlib.Path

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]


def _spawn(
    name: str, method: str, argv: list[str], workdir: pathlib.Path, port: int
) -> Server:
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"{name}.log"
    with log_path.open("w") as log_file:
        process = subprocess.Popen(argv, cwd=REPO_ROOT, stderr=log_file)
    targets = {"unix": f"unix://{workdir / f'{name}.sock'}", "tcp": f"127.0.0.1:{port}"}
    return Server(name, method, process, targets, log_path)


def start_daemon(
    workdir: pathlib.Path, config: str, overrides: Sequence[str]
) -> Server:
    """Start ``kynara-sidecar run`` with its socket and audit log in workdir."""
    port = free_port()
    argv = [
        sys.executable, "-m", "kynara_sidecar.cli", "run", "--config", config,
        "--set", f"agent.socket={workdir / 'daemon.sock'}",
        "--set", f"agent.fast_socket={workdir / 'daemon.fast.sock'}",
        "--set", "agent.host=127.0.0.1", "--set", f"agent.port={port}",
        "--set", "health.port=0", "--set", "http.port=0",
        "--set", f"audit.path={workdir / 'audit'}",
        # Each run is a fresh log: its key and witness are its own too.
        "--set", f"audit.signing_key={workdir / 'keys' / 'audit.pem'}",
        "--set", f"audit.witness_path={workdir / 'witness'}",
    ]  # fmt: skip
    for override in overrides:
        argv += ["--set", override]
    return _spawn("daemon", DECIDE_METHOD, argv, workdir, port)


def start_echo(workdir: pathlib.Path) -> Server:
    """Start the echo server with its socket in workdir."""
    port = free_port()
    argv = [
        sys.executable, str(ECHO_SCRIPT),
        "--socket", str(workdir / "echo.sock"), "--port", str(port),
    ]  # fmt: skip
    return _spawn("echo", ECHO_METHOD, argv, workdir, port)


def stop_server(server: Server) -> int:
    """SIGTERM, wait, and kill only if it does not stop. Returns the exit code."""
    if server.process.poll() is None:
        server.process.terminate()
        try:
            server.process.wait(STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()
    return server.process.returncode


class BenchError(Exception):
    """A server did not start or did not answer; the message says which."""


async def wait_answering(server: Server, payload: bytes) -> None:
    """Return once ``server`` answers on every transport; raise BenchError."""
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    for target in server.targets.values():
        async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as ch:
            call = ch.unary_unary(server.method)
            while True:
                if server.process.poll() is not None:
                    raise BenchError(f"{server.name} exited:\n{server.log_tail()}")
                if time.monotonic() > deadline:
                    raise BenchError(f"{server.name} not answering on {target}")
                try:
                    await call(payload, timeout=1)
                    break
                except grpc.aio.AioRpcError:
                    await asyncio.sleep(0.1)


async def describe_mix(target: str, mix: Sequence[tuple[str, bytes]]) -> list[str]:
    """Ask the daemon each request of the mix once; name what it decided.

    Raises:
        BenchError: a request was decided otherwise than ``MIX_DECISIONS``
            says.
    """
    async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as ch:
        decide = ch.unary_unary(
            DECIDE_METHOD, response_deserializer=pb.DecideResponse.FromString
        )
        parts = []
        for name, payload in mix:
            answer = await decide(payload, timeout=CALL_TIMEOUT_SECONDS)
            effect = pb.Decision.Name(answer.decision).removeprefix("DECISION_")
            wrong = wrong_decision(name, effect.lower())
            if wrong is not None:
                raise BenchError(f"the daemon at {target} decided {wrong}")
            parts.append(f"{name} -> {effect.lower()} ({answer.reason_code})")
    return parts


# --- the closed loop -------------------------------------------------------


async def measure(
    server: Server,
    transport: str,
    in_flight: int,
    payloads: Sequence[bytes],
    timing: tuple[float, float],
) -> Measurement:
    """Run loadgen's closed loop on one channel; measure after the warm-up.

    Args:
        server: the server under load.
        transport: "unix" or "tcp" (a key of ``server.targets``).
        in_flight: workers, each with one request in flight at a time.
        payloads: serialized requests, cycled through by every worker.
        timing: (warm-up seconds, measured seconds).

    Returns:
        The measurement over the window; answers that arrived after it are
        not counted, and a call that failed is counted under its status.
    """
    client = GrpcClient(server.targets[transport], server.method)
    try:
        record, usage = await closed_loop(
            client, payloads, in_flight, timing, server.process.pid
        )
    finally:
        await client.close()
    return summarize(server.name, transport, in_flight, record, usage)


# --- the run ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Plan:
    """What to run, from the command line."""

    transports: tuple[str, ...]
    in_flight: tuple[int, ...]
    timing: tuple[float, float]
    config: str
    overrides: tuple[str, ...]
    pid_file: pathlib.Path | None = None


@contextlib.contextmanager
def daemon_under_load(daemon: Server, label: str, pid_file: pathlib.Path | None):
    """Announce the daemon's PID while it is under load: on stderr, and in
    ``pid_file`` (when given) for as long as the block runs, so a profiler
    attaches to this run's daemon, and only while it is busy."""
    pid = daemon.process.pid
    print(f"daemon pid {pid} under load: {label}", file=sys.stderr, flush=True)
    if pid_file is not None:
        pid_file.write_text(f"{pid}\n")
    try:
        yield
    finally:
        if pid_file is not None:
            pid_file.unlink(missing_ok=True)


async def _run_point(
    plan: Plan, echo: Server, workdir: pathlib.Path, point: tuple[str, int], mix
) -> tuple[Measurement, Measurement, list[str]]:
    transport, in_flight = point
    payloads = [payload for _, payload in mix]
    daemon = start_daemon(workdir, plan.config, plan.overrides)
    label = f"{transport_label(transport)} x{in_flight}"
    try:
        await wait_answering(daemon, payloads[0])
        described = await describe_mix(daemon.targets["unix"], mix)
        floor = await measure(echo, transport, in_flight, payloads, plan.timing)
        with daemon_under_load(daemon, label, plan.pid_file):
            result = await measure(daemon, transport, in_flight, payloads, plan.timing)
    finally:
        code = stop_server(daemon)
    if code != 0:
        raise BenchError(f"daemon exited with {code}:\n{daemon.log_tail()}")
    return floor, result, described


async def run(plan: Plan, scratch: pathlib.Path) -> tuple[list, list[str]]:
    """Run every point; return [(echo, daemon)] and what the mix decided.

    Raises:
        BenchError: a server did not start, answer or stop cleanly.
    """
    mix = request_mix()
    echo = start_echo(scratch / "echo")
    points, described = [], []
    try:
        await wait_answering(echo, mix[0][1])
        for transport in plan.transports:
            for in_flight in plan.in_flight:
                workdir = scratch / f"{transport}-{in_flight}"
                point = (transport, in_flight)
                floor, result, described = await _run_point(
                    plan, echo, workdir, point, mix
                )
                label = transport_label(transport)
                print(f"done: {label} x{in_flight}", file=sys.stderr)
                points.append((floor, result))
    finally:
        stop_server(echo)
    return points, described


def daemon_settings(
    config: str, overrides: Sequence[str], scratch: pathlib.Path
) -> dict[str, object]:
    """The settings every benchmark that starts a daemon reports: its config,
    the extra --set overrides, and where (on what filesystem) its audit log
    was written, since the disk pays the syncs."""
    return {
        "config": config,
        "overrides": list(overrides),
        "audit_filesystem": filesystem_of(scratch),
        "scratch_parent": str(scratch.parent),
    }


def settings_of(plan: Plan, scratch: pathlib.Path) -> dict[str, object]:
    """What this run measured, for the header and the JSON."""
    warmup, seconds = plan.timing
    return {
        **daemon_settings(plan.config, plan.overrides, scratch),
        "warmup_seconds": warmup,
        "seconds_per_point": seconds,
    }


def _settings_line(settings: dict[str, object]) -> str:
    overrides = " ".join(settings["overrides"]) or "none"
    return (
        f"# daemon: {settings['config']} (extra --set: {overrides}), fresh audit"
        f" dir per point on {settings['audit_filesystem']}"
        f" ({settings['scratch_parent']}); {settings['seconds_per_point']:g} s"
        f" measured per point after {settings['warmup_seconds']:g} s warm-up;"
        " ratio = daemon / echo; grpc-unix/grpc-tcp = gRPC on the Unix"
        " socket/loopback TCP"
    )


def _as_json(report: dict[str, object], points: list) -> str:
    pairs = [
        {
            "echo": dataclasses.asdict(echo),
            "daemon": dataclasses.asdict(daemon),
            "ratio": ratios(daemon, echo),
        }
        for echo, daemon in points
    ]
    return json.dumps({**report, "points": pairs}, indent=2)


def _print_report(report: dict[str, object], points: list, as_json: bool) -> None:
    if as_json:
        print(_as_json(report, points))
        return
    header = [
        machine_line(report["machine"]),
        _settings_line(report["settings"]),
        "# mix, round-robin per worker: " + ", ".join(report["mix"]),
    ]
    print("\n".join(header) + "\n\n" + format_table(points))


def _failed(points: list) -> list[str]:
    return [
        f"{m.server} {m.transport} x{m.in_flight}: {m.answers} answers, "
        f"errors {m.errors}"
        for pair in points
        for m in pair
        if m.errors or not m.answers
    ]


def positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type: ``kind`` (int, float) of the text, refused unless
    it is more than 0."""

    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected more than 0, got {text}")
        return value

    return parse


def _transport(text: str) -> str:
    # The labels and the old short names are both accepted.
    for key, label in TRANSPORT_LABELS.items():
        if text in (key, label):
            return key
    choices = ", ".join(f"{label} ({key})" for key, label in TRANSPORT_LABELS.items())
    raise argparse.ArgumentTypeError(f"unknown transport {text!r}; one of {choices}")


def rounds_type(maximum: int) -> Callable[[str], int]:
    """An argparse type for a count of rounds from 1 to ``maximum``."""

    def parse(text: str) -> int:
        value = int(text)
        if not 1 <= value <= maximum:
            raise argparse.ArgumentTypeError(f"expected 1..{maximum}, got {text}")
        return value

    return parse


def add_daemon_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every benchmark that starts a daemon takes: --config,
    --set, --tmp-dir and --json."""
    parser.add_argument(
        "--config", default="config/kynara.yaml",
        help="daemon config, relative to the repository root",
    )  # fmt: skip
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[],
        metavar="SECTION.KEY=VALUE", help="extra daemon config override",
    )  # fmt: skip
    parser.add_argument(
        "--tmp-dir", help="parent of the scratch dir (its disk pays the syncs)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON only")


def doc_parser(doc: str) -> argparse.ArgumentParser:
    """The argument parser of a benchmark script whose help is its docstring
    ``doc``: the first paragraph, and the examples after ``Examples:``."""
    return argparse.ArgumentParser(
        description=doc.split("\n\n")[0],
        epilog="Examples:" + doc.split("Examples:", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def exit_status(bench: str, failures: Sequence[str]) -> int:
    """Print each of ``failures`` on stderr under the script's name
    ``bench``; the script's exit status: 1 when there was one, else 0."""
    for failure in failures:
        print(f"{bench}: {failure}", file=sys.stderr)
    return 1 if failures else 0


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
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
        "--in-flight", type=positive(int), nargs="+",
        default=list(DEFAULT_IN_FLIGHT), metavar="N",
        help="requests kept in flight, one point each (default 1 8 64)",
    )  # fmt: skip
    parser.add_argument(
        "--transport", type=_transport, nargs="+", metavar="TRANSPORT",
        help="grpc-unix (or unix) and/or grpc-tcp (or tcp); default: both",
    )  # fmt: skip
    parser.add_argument(
        "--pid-file", type=pathlib.Path, metavar="FILE",
        help="holds the PID of the daemon under load while it is measured"
        " (for py-spy); removed between points",
    )  # fmt: skip
    add_daemon_arguments(parser)
    parser.add_argument(
        "--smoke", action="store_true", help="~0.5 s a point: check it still runs"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns 0, or 1 when a point got errors or no answer."""
    args = _parse_args(argv)
    timing = (args.warmup, args.seconds)
    if args.smoke:
        timing = (SMOKE_WARMUP_SECONDS, SMOKE_SECONDS)
    chosen = args.transport or TRANSPORTS
    plan = Plan(
        transports=tuple(t for t in TRANSPORTS if t in chosen),
        in_flight=tuple(args.in_flight),
        timing=timing,
        config=args.config,
        overrides=tuple(args.overrides),
        pid_file=args.pid_file,
    )
    report: dict[str, object] = {"machine": machine_info()}
    with tempfile.TemporaryDirectory(prefix="kynara-bench-", dir=args.tmp_dir) as d:
        scratch = pathlib.Path(d)
        report["settings"] = settings_of(plan, scratch)
        try:
            points, report["mix"] = uvloop.run(run(plan, scratch))
        except BenchError as err:
            print(f"decide_bench: {err}", file=sys.stderr)
            return 1
    _print_report(report, points, args.json)
    return exit_status("decide_bench", _failed(points))


if __name__ == "__main__":
    raise SystemExit(main())
