"""What the MCP gateway adds to a tool call, beside the same call made directly.

With the MCP SDK's own client and one request in flight, this process times
the same requests sent straight to an upstream MCP server and sent through
the gateway in front of that server, interleaved so that whatever else the
machine does slows both alike (each round sends every kind once, in a fresh
shuffled order from a fixed seed, so no kind always follows another):

    http   tools/call ``read`` and tools/list, over Streamable HTTP, directly
           to the upstream (``tests/gateway/upstream_server.py --http``) and
           to the gateway of a daemon (``python -m kynara_sidecar.cli run`` on
           the shipped config, durable audit unless ``--set`` says otherwise)
           whose upstream is that same server over HTTP;
    stdio  the same two requests over stdio: the client starts the upstream
           (``--stdio``) as its child, and separately starts
           ``python -m kynara_sidecar.cli gateway``, a daemon of its own that
           starts its own stdio upstream child;
    grpc   the daemon's ``Decide`` for the very request the gateway decides
           for each call (on its Unix socket): what the decision alone
           costs, to show how much of the gateway's overhead it is. It
           includes a gRPC round trip the gateway, deciding in process, does
           not pay, so it overstates the decision's share a little.

Identity: development mode, the user in the asserted-chain header (HTTP) or
environment variable (stdio); a policy directory of the run's own allows the
user and the agent every tool of the upstream, so both lists hold the same
five tools and every call is allowed, forwarded and recorded. The gateway
answers tools/list from the tools it keeps, filtered by policy: it does not
ask the upstream. Every answer is checked (the upstream's text, the five
tools, allow); one that is not as expected counts as an error.

Per kind: p50 and p99 latency (send to answer), each gateway kind as a ratio
to its direct peer of the same run and as the milliseconds it adds at p50.
The machine may be shared and noisy: read ratios, not absolutes.

Examples:
    python benchmarks/gateway_bench.py
    python benchmarks/gateway_bench.py --rounds 3000 --json
    python benchmarks/gateway_bench.py --transport http --protocol legacy
    python benchmarks/gateway_bench.py --set audit.durability=deferred
    python benchmarks/gateway_bench.py --smoke     # a few seconds; CI check
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import pathlib
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from importlib import metadata
from typing import Any, TextIO

import grpc
import httpx2
import uvloop
from kynara.v1 import decision_pb2 as pb
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from decide_bench import (  # noqa: E402 (the sibling script)
    CALL_TIMEOUT_SECONDS,
    CHANNEL_OPTIONS,
    DECIDE_METHOD,
    REPO_ROOT,
    START_TIMEOUT_SECONDS,
    BenchError,
    Server,
    add_daemon_arguments,
    daemon_settings,
    doc_parser,
    exit_status,
    free_port,
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

__all__ = [
    "DEFAULT_ROUNDS",
    "DEFAULT_WARMUP_ROUNDS",
    "Kind",
    "KindStats",
    "format_table",
    "kinds_for",
    "main",
    "peer_ratios",
    "summarize",
]

UPSTREAM_SCRIPT = REPO_ROOT / "tests" / "gateway" / "upstream_server.py"
SERVER = "files"
TOOL = "read"
# The upstream's tools, as it lists them; the gateway shows each as
# <server>__<tool> (gateway/names.py).
UPSTREAM_TOOLS = ("read", "write", "deploy", "slow", "add_tool")
USER = "bench-user"
AGENT = "bench-agent"
ARGUMENTS = {"path": "/srv/bench/notes.txt"}
EXPECTED_TEXT = f"contents of {ARGUMENTS['path']}"
CHAIN_HEADER = "kynara-asserted-chain"
CHAIN_ENV = "KYNARA_ASSERTED_CHAIN"
TRANSPORTS = ("http", "stdio")
# 1,000 rounds give 1,000 samples per kind, so p99 is the 10th slowest; at
# a few ms a call and nine kinds a round, about a minute and a half.
DEFAULT_ROUNDS = 1000
# Enough for connections, the SDK's first-use imports and the LMDB map.
DEFAULT_WARMUP_ROUNDS = 50
# --smoke: only proves that every kind still answers as expected.
SMOKE_ROUNDS = 6
SMOKE_WARMUP_ROUNDS = 2
MAX_ROUNDS = 100_000
# The shuffle of each round; fixed so two runs send the same sequence.
ORDER_SEED = 8
ENV_PASSED = ("PATH", "HOME", "LANG", "LC_ALL", "PYTHONPATH", "TMPDIR")


# --- what is measured ------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Kind:
    """One kind of timed request: over what, which request, along which path."""

    transport: str  # "http", "stdio" or "grpc"
    request: str  # "tools/call", "tools/list" or "Decide"
    path: str  # "direct", "gateway" or "daemon"

    @property
    def label(self) -> str:
        return f"{self.transport} {self.request} {self.path}"

    def peer(self) -> Kind | None:
        """The direct kind a gateway kind is compared with."""
        if self.path != "gateway":
            return None
        return Kind(self.transport, self.request, "direct")


DECIDE_KIND = Kind("grpc", "Decide", "daemon")


def kinds_for(transports: Sequence[str]) -> list[Kind]:
    """Every kind measured for these transports, in table order."""
    kinds = [
        Kind(transport, request, path)
        for transport in transports
        for request in ("tools/call", "tools/list")
        for path in ("direct", "gateway")
    ]
    return [*kinds, DECIDE_KIND]


# --- pure statistics and formatting ----------------------------------------


@dataclasses.dataclass(frozen=True)
class KindStats:
    """The measured requests of one kind."""

    transport: str
    request: str
    path: str
    answers: int
    errors: dict[str, int]
    p50_ms: float
    p99_ms: float


def summarize(kind: Kind, latencies: Sequence[int], errors: Counter) -> KindStats:
    """One table row from the latencies (ns) and errors of one kind."""
    ordered = sorted(latencies)
    return KindStats(
        transport=kind.transport,
        request=kind.request,
        path=kind.path,
        answers=len(ordered),
        errors=dict(errors),
        p50_ms=percentile(ordered, 0.50) / 1e6,
        p99_ms=percentile(ordered, 0.99) / 1e6,
    )


def _kind_of(stats: KindStats) -> Kind:
    return Kind(stats.transport, stats.request, stats.path)


def peer_ratios(
    stats: KindStats, rows: Sequence[KindStats]
) -> dict[str, float | None] | None:
    """p50 and p99 over the direct peer's, and the p50 milliseconds added;
    None for a kind without a peer, None values where either side got no
    answer (or the peer's figure is 0)."""
    peer_kind = _kind_of(stats).peer()
    peer = next((r for r in rows if _kind_of(r) == peer_kind), None)
    if peer is None:
        return None
    both = bool(stats.answers and peer.answers)
    out: dict[str, float | None] = {}
    for name in ("p50_ms", "p99_ms"):
        floor = getattr(peer, name)
        out[name] = getattr(stats, name) / floor if both and floor else None
    out["added_p50_ms"] = stats.p50_ms - peer.p50_ms if both else None
    return out


COLUMNS = (
    ("transport", 9), ("request", 10), ("path", 7), ("answers", 7),
    ("p50 ms", 8), ("p99 ms", 8), ("p50/direct", 10), ("p99/direct", 10),
    ("+p50 ms", 8), ("errors", 6),
)  # fmt: skip


def _row(cells: Sequence[str]) -> str:
    return table_row(cells, COLUMNS, left=3)


def _cells(stats: KindStats, ratio: dict[str, float | None] | None) -> list[str]:
    shown = ["", "", ""]
    if ratio is not None:
        added = ratio["added_p50_ms"]
        shown = [
            ratio_text(ratio["p50_ms"]),
            ratio_text(ratio["p99_ms"]),
            f"{added:+.3f}" if added is not None else "-",
        ]
    return [
        stats.transport, stats.request, stats.path, str(stats.answers),
        f"{stats.p50_ms:.3f}", f"{stats.p99_ms:.3f}", *shown,
        str(sum(stats.errors.values())),
    ]  # fmt: skip


def format_table(rows: Sequence[KindStats]) -> str:
    """The plain-text table, gateway rows beside their direct peers."""
    lines = [_row([name for name, _ in COLUMNS])]
    lines += [_row(_cells(stats, peer_ratios(stats, rows))) for stats in rows]
    return "\n".join(lines)


def decision_share(rows: Sequence[KindStats]) -> list[str]:
    """Lines naming the Decide p50 as a part of each call's added p50."""
    decide = next((r for r in rows if _kind_of(r) == DECIDE_KIND), None)
    if decide is None or not decide.answers:
        return []
    lines = []
    for stats in rows:
        ratio = peer_ratios(stats, rows)
        if stats.request != "tools/call" or ratio is None:
            continue
        added = ratio["added_p50_ms"]
        if added is None:
            continue
        share = f"{100 * decide.p50_ms / added:.0f}%" if added > 0 else "-"
        lines.append(
            f"# {stats.transport}: the gateway adds {added:.3f} ms at p50 to a"
            f" tools/call; Decide alone is {decide.p50_ms:.3f} ms ({share} of it)"
        )
    return lines


# --- the run's files and processes -----------------------------------------


def write_policies(directory: pathlib.Path) -> None:
    """A directory and a policy allowing the bench's user and agent every
    tool of the upstream (so both lists show the same tools)."""
    directory.mkdir(parents=True)
    (directory / "directory.yaml").write_text(
        "format_version: 1\nkind: directory\nprincipals:\n"
        f"  - id: {USER}\n    kind: user\n    roles: [tool_user]\n"
        f"  - id: {AGENT}\n    kind: agent\n    roles: [tool_user]\n"
    )
    (directory / "roles.yaml").write_text(
        "format_version: 1\nkind: policy\nname: bench-roles\n"
        "description: The bench's one role.\nroles:\n"
        "  tool_user:\n    description: Uses every tool of the bench upstream.\n"
    )
    (directory / "tools.yaml").write_text(
        "format_version: 1\nkind: policy\nname: bench-tools\n"
        "description: Every tool of the bench upstream.\nrules:\n"
        f"  - id: every-tool\n    effect: allow\n    actions: ['mcp.{SERVER}.*']\n"
        "    resources: [mcp.tool]\n    roles: [tool_user]\n"
        "    description: The bench user and agent use every tool.\n"
    )


def _identity_overrides(policies: pathlib.Path) -> list[str]:
    return [
        "identity.mode=development",
        f"identity.agent_id={AGENT}",
        f"policy.source={policies}",
    ]


def _stdio_upstream_argv() -> list[str]:
    return [sys.executable, str(UPSTREAM_SCRIPT), "--stdio"]


def start_upstream(workdir: pathlib.Path) -> tuple[Server, str]:
    """The upstream over Streamable HTTP on a free loopback port: the
    process and its MCP endpoint."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = workdir / "upstream.log"
    argv = [sys.executable, str(UPSTREAM_SCRIPT), "--http", "--port", str(port)]
    with log_path.open("w") as log_file:
        process = subprocess.Popen(
            argv,
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    return Server("upstream", "", process, {}, log_path), (
        f"http://127.0.0.1:{port}/mcp"
    )


def start_http_gateway(
    workdir: pathlib.Path, config: str, upstream_url: str, overrides: Sequence[str]
) -> tuple[Server, str]:
    """The daemon with the gateway on a free loopback port, in front of the
    HTTP upstream: the process and the gateway's MCP endpoint."""
    port = free_port()
    servers = {SERVER: {"transport": "http", "url": upstream_url}}
    daemon = start_daemon(
        workdir,
        config,
        [
            *_identity_overrides(workdir.parent / "policies"),
            "gateway.host=127.0.0.1",
            f"gateway.port={port}",
            f"gateway.servers={json.dumps(servers)}",
            *overrides,
        ],
    )
    return daemon, f"http://127.0.0.1:{port}/mcp"


def stdio_gateway_params(
    workdir: pathlib.Path, config: str, overrides: Sequence[str]
) -> StdioServerParameters:
    """``kynara-sidecar gateway``: a daemon of its own with its state in
    ``workdir``, starting the upstream as its stdio child."""
    servers = {SERVER: {"transport": "stdio", "command": _stdio_upstream_argv()}}
    sets = [
        f"agent.socket={workdir / 'agent.sock'}",
        f"agent.fast_socket={workdir / 'agent.fast.sock'}",
        "agent.port=-1",
        "health.port=-1",
        "http.port=0",
        f"audit.path={workdir / 'audit'}",
        f"audit.signing_key={workdir / 'keys' / 'audit.pem'}",
        f"audit.witness_path={workdir / 'witness'}",
        *_identity_overrides(workdir.parent / "policies"),
        "gateway.port=-1",
        f"gateway.servers={json.dumps(servers)}",
        *overrides,
    ]
    args = ["-m", "kynara_sidecar.cli", "gateway", "--config", config]
    for item in sets:
        args += ["--set", item]
    env = {key: value for key, value in os.environ.items() if key in ENV_PASSED}
    env[CHAIN_ENV] = USER
    return StdioServerParameters(
        command=sys.executable, args=args, env=env, cwd=str(REPO_ROOT)
    )


async def wait_http(server: Server, url: str) -> None:
    """Return once ``url`` gives any HTTP answer; raise BenchError when the
    process exits or the start timeout passes."""
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    # trust_env off: an http_proxy in the environment must never see
    # loopback traffic.
    async with httpx2.AsyncClient(trust_env=False, timeout=1.0) as http:
        while True:
            if server.process.poll() is not None:
                raise BenchError(f"{server.name} exited:\n{server.log_tail()}")
            if time.monotonic() > deadline:
                raise BenchError(f"{server.name} not answering on {url}")
            with contextlib.suppress(httpx2.HTTPError):
                await http.get(url)
                return
            await asyncio.sleep(0.05)


# --- the requests and their checks -----------------------------------------


def decide_request() -> bytes:
    """The Decide the gateway makes for each timed tools/call."""
    return pb.DecideRequest(
        asserted_chain=[USER],
        action=f"mcp.{SERVER}.{TOOL}",
        resource=pb.Resource(
            kind="mcp.tool",
            id=f"{SERVER}.{TOOL}",
            attributes={"path": pb.Value(string_value=ARGUMENTS["path"])},
        ),
    ).SerializeToString()


def _check_call(result: Any) -> str:
    texts = [getattr(item, "text", None) for item in result.content]
    if result.is_error or texts != [EXPECTED_TEXT]:
        return f"expected the text {EXPECTED_TEXT!r}, got {texts!r}"
    return ""


def _check_list(result: Any, prefix: str) -> str:
    names = sorted(tool.name for tool in result.tools)
    wanted = sorted(prefix + name for name in UPSTREAM_TOOLS)
    if names != wanted or result.next_cursor is not None:
        return f"expected the tools {wanted} on one page, got {names}"
    return ""


def _check_decide(answer: pb.DecideResponse) -> str:
    if answer.decision != pb.DECISION_ALLOW:
        return f"expected allow, got {pb.Decision.Name(answer.decision)}"
    return ""


Timed = Callable[[], Awaitable[str]]


def _mcp_requests(client: Client, prefix: str) -> dict[str, Timed]:
    tool = prefix + TOOL

    async def call() -> str:
        return _check_call(await client.call_tool(tool, ARGUMENTS))

    async def list_tools() -> str:
        return _check_list(await client.list_tools(), prefix)

    return {"tools/call": call, "tools/list": list_tools}


# --- talking to the servers ------------------------------------------------


@dataclasses.dataclass
class _Samples:
    latencies: dict[Kind, list[int]]
    errors: dict[Kind, Counter]


def _http_client(url: str, headers: dict[str, str], protocol: str) -> Client:
    http = httpx2.AsyncClient(
        headers=headers, trust_env=False, timeout=CALL_TIMEOUT_SECONDS
    )
    return Client(
        streamable_http_client(url, http_client=http), mode=protocol, cache=None
    )


def _stdio_client(
    params: StdioServerParameters, errlog: TextIO, protocol: str
) -> Client:
    return Client(stdio_client(params, errlog=errlog), mode=protocol, cache=None)


async def _loop(
    requests: dict[Kind, Timed], rounds: int, warmup: int, samples: _Samples
) -> None:
    order = random.Random(ORDER_SEED)
    kinds = list(requests)
    for index in range(warmup + rounds):
        recording = index >= warmup
        for kind in order.sample(kinds, len(kinds)):
            started = time.perf_counter_ns()
            try:
                problem = await requests[kind]()
            except Exception as err:  # a failed call is a row's error, not the end
                problem = f"{type(err).__name__}: {err}"
            took = time.perf_counter_ns() - started
            if not recording:
                continue
            if problem:
                samples.errors[kind][problem[:200]] += 1
            else:
                samples.latencies[kind].append(took)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What to run, from the command line."""

    transports: tuple[str, ...]
    rounds: int
    warmup_rounds: int
    protocol: str
    config: str
    overrides: tuple[str, ...]


async def measure(
    plan: Plan, scratch: pathlib.Path, urls: dict[str, str], decide_target: str
) -> _Samples:
    """Open every client, run the interleaved loop, close them.

    Args:
        plan: what to run.
        scratch: the run's directory (stdio children's logs and state).
        urls: "upstream" and "gateway" MCP endpoints, when http is measured.
        decide_target: the gRPC target of the daemon timed for Decide.

    Returns:
        The samples of every kind.
    """
    kinds = kinds_for(plan.transports)
    samples = _Samples({k: [] for k in kinds}, {k: Counter() for k in kinds})
    requests: dict[Kind, Timed] = {}
    gateway_prefix = f"{SERVER}__"
    async with contextlib.AsyncExitStack() as stack:
        if "http" in plan.transports:
            chain = {CHAIN_HEADER: USER}
            direct = _http_client(urls["upstream"], {}, plan.protocol)
            gateway = _http_client(urls["gateway"], chain, plan.protocol)
            for path, client, prefix in (
                ("direct", direct, ""),
                ("gateway", gateway, gateway_prefix),
            ):
                await stack.enter_async_context(client)
                for request, timed in _mcp_requests(client, prefix).items():
                    requests[Kind("http", request, path)] = timed
        if "stdio" in plan.transports:
            state = scratch / "stdio-gateway"
            state.mkdir(parents=True, exist_ok=True)
            direct_log = stack.enter_context((scratch / "stdio-upstream.log").open("w"))
            gateway_log = stack.enter_context((state / "gateway.log").open("w"))
            direct_params = StdioServerParameters(
                command=sys.executable, args=_stdio_upstream_argv()[1:], cwd=REPO_ROOT
            )
            gateway_params = stdio_gateway_params(state, plan.config, plan.overrides)
            for path, client, prefix in (
                ("direct", _stdio_client(direct_params, direct_log, plan.protocol), ""),
                (
                    "gateway",
                    _stdio_client(gateway_params, gateway_log, plan.protocol),
                    gateway_prefix,
                ),
            ):
                await stack.enter_async_context(client)
                for request, timed in _mcp_requests(client, prefix).items():
                    requests[Kind("stdio", request, path)] = timed
        channel = grpc.aio.insecure_channel(decide_target, options=CHANNEL_OPTIONS)
        await stack.enter_async_context(channel)
        decide = channel.unary_unary(
            DECIDE_METHOD, response_deserializer=pb.DecideResponse.FromString
        )
        payload = decide_request()

        async def decide_once() -> str:
            answer = await decide(payload, timeout=CALL_TIMEOUT_SECONDS)
            return _check_decide(answer)

        requests[DECIDE_KIND] = decide_once
        await _loop(requests, plan.rounds, plan.warmup_rounds, samples)
    return samples


# --- the run ---------------------------------------------------------------


async def run(plan: Plan, scratch: pathlib.Path) -> list[KindStats]:
    """Start the upstream and the daemons, measure, stop them.

    Raises:
        BenchError: a server did not start, answer or stop cleanly.
    """
    write_policies(scratch / "policies")
    urls: dict[str, str] = {}
    decide_target = f"unix://{scratch / 'stdio-gateway' / 'agent.sock'}"
    started: list[Server] = []
    daemon: Server | None = None
    try:
        if "http" in plan.transports:
            upstream, urls["upstream"] = start_upstream(scratch / "upstream")
            started.append(upstream)
            await wait_http(upstream, urls["upstream"])
            daemon, urls["gateway"] = start_http_gateway(
                scratch / "daemon", plan.config, urls["upstream"], plan.overrides
            )
            started.append(daemon)
            await wait_answering(daemon, decide_request())
            await wait_http(daemon, urls["gateway"])
            decide_target = daemon.targets["unix"]
        samples = await measure(plan, scratch, urls, decide_target)
    finally:
        codes = {server.name: stop_server(server) for server in reversed(started)}
    if daemon is not None and codes["daemon"] != 0:
        raise BenchError(f"daemon exited with {codes['daemon']}:\n{daemon.log_tail()}")
    return [
        summarize(kind, samples.latencies[kind], samples.errors[kind])
        for kind in kinds_for(plan.transports)
    ]


def _header(report: dict[str, Any]) -> str:
    settings = report["settings"]
    overrides = " ".join(settings["overrides"]) or "none"
    return (
        f"{machine_line(report['machine'], 'gateway_bench')}\n"
        f"# daemons: {settings['config']} (development identity; extra --set:"
        f" {overrides}), audit on {settings['audit_filesystem']}"
        f" ({settings['scratch_parent']}); MCP client mode"
        f" {settings['protocol']!r}, 1 in flight; {settings['rounds']} rounds"
        f" of every kind, shuffled, after {settings['warmup_rounds']} warm-up"
        " rounds; gateway rows: ratio to and p50 added over the direct row above;"
        f" Decide = the gateway's decision for {SERVER}.{TOOL}, alone, on the"
        f" {settings['decide_daemon']} gateway daemon's Unix socket"
    )


def _print_report(report: dict[str, Any], rows: list[KindStats], as_json: bool) -> None:
    if as_json:
        report["kinds"] = [
            {**dataclasses.asdict(r), "ratio_to_direct": peer_ratios(r, rows)}
            for r in rows
        ]
        print(json.dumps(report, indent=2))
        return
    share = "\n".join(decision_share(rows))
    print(f"{_header(report)}\n{share}\n\n{format_table(rows)}")


def _failed(rows: Sequence[KindStats]) -> list[str]:
    return [
        f"{r.transport} {r.request} {r.path}: {r.answers} answers as expected, "
        f"errors {r.errors}"
        for r in rows
        if r.errors or not r.answers
    ]


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = doc_parser(__doc__)
    parser.add_argument(
        "--rounds", type=rounds_type(MAX_ROUNDS), default=DEFAULT_ROUNDS,
        help=f"measured rounds, one request of each kind (default {DEFAULT_ROUNDS})",
    )  # fmt: skip
    parser.add_argument(
        "--warmup", type=rounds_type(MAX_ROUNDS), default=DEFAULT_WARMUP_ROUNDS,
        help=f"warm-up rounds, not measured (default {DEFAULT_WARMUP_ROUNDS})",
    )  # fmt: skip
    parser.add_argument(
        "--transport", choices=TRANSPORTS, nargs="+", help="default: both"
    )
    parser.add_argument(
        "--protocol", choices=("auto", "legacy"), default="auto",
        help="the SDK client's mode: auto (2026 protocol when the server has"
        " it) or legacy (the initialize handshake and sessions)",
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
    transports = tuple(t for t in TRANSPORTS if t in (args.transport or TRANSPORTS))
    plan = Plan(
        transports, rounds, warmup, args.protocol, args.config, tuple(args.overrides)
    )
    info = machine_info()
    info["mcp"] = metadata.version("mcp")
    report: dict[str, Any] = {"machine": info}
    with tempfile.TemporaryDirectory(prefix="kynara-bench-", dir=args.tmp_dir) as d:
        scratch = pathlib.Path(d)
        report["settings"] = {
            **daemon_settings(plan.config, plan.overrides, scratch),
            "transports": list(plan.transports),
            "protocol": plan.protocol,
            "rounds": rounds,
            "warmup_rounds": warmup,
            "decide_daemon": "http" if "http" in transports else "stdio",
        }
        try:
            rows = uvloop.run(run(plan, scratch))
        except BenchError as err:
            print(f"gateway_bench: {err}", file=sys.stderr)
            return 1
    _print_report(report, rows, args.json)
    return exit_status("gateway_bench", _failed(rows))


if __name__ == "__main__":
    raise SystemExit(main())
