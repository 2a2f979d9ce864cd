"""The load generator every side-by-side benchmark drives its servers with.

One Python process on uvloop, one connection per server and point, and the
same two loops for every server, so the only thing that differs between two
rows of a table is the server and its transport:

- **Closed loop** (``closed_loop``): N workers, each sending its next
  request as soon as its previous answer arrived. It finds how many answers
  a server gives at most, and its latency with N requests in flight.
- **Open loop** (``open_loop``): requests are sent at a fixed offered rate
  whatever the server does, on a schedule fixed in advance (request i is
  due at ``start + i / rate``). A request's latency runs from the moment it
  was *due*, not from when it left, so a stall of the server, or of the
  generator, shows in the figures instead of silently delaying the next
  sends. A pacing thread wakes the event loop at each due time (the event
  loop's own timers have a resolution of one millisecond), and how late each
  request actually left is kept as the send lag: it is the generator's share
  of the latency.

Both loops warm up, then measure for a fixed window: latency percentiles of
the requests of the window, answers per second, the server's CPU seconds per
1,000 checks from ``/proc/<pid>/stat`` (all threads) and the generator's own
CPU, so a generator that is the bottleneck shows as one.

Clients: ``GrpcClient`` sends pre-serialized request bytes on any unary gRPC
method; ``FastPathClient`` speaks Kynara's fast path (``protos/fastpath.md``:
length-prefixed MessagePack frames on a Unix socket, pipelined).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import os
import pathlib
import struct
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

import grpc
import msgspec

__all__ = [
    "CHANNEL_OPTIONS",
    "CallFailed",
    "Client",
    "FastPathClient",
    "GrpcClient",
    "MAX_OUTSTANDING",
    "OpenSchedule",
    "PointResult",
    "Usage",
    "WindowRecord",
    "closed_loop",
    "fast_request",
    "host_cpu_ticks",
    "open_loop",
    "percentile",
    "process_cpu_seconds",
    "run_point",
    "summarize",
]

# Far above any answer of a working server; a hung one ends the point.
CALL_TIMEOUT_SECONDS = 30.0
# After an open-loop window, how long the requests still out may take.
DRAIN_TIMEOUT_SECONDS = 30.0
# An open loop keeps at most this many requests in flight: past that the
# server is far behind, and further requests are counted as skipped instead
# of queueing without end. It also stays under what one gRPC connection
# takes: with a few thousand calls outstanding on one channel, grpc fails
# the excess with CANCELLED (seen with grpcio 1.85, on the echo server too).
MAX_OUTSTANDING = 1000
# The pacing thread sleeps at least this long between wake-ups, so that at
# high rates it wakes the loop for a few requests at a time rather than
# spending a thread switch on each.
MIN_PACING_NS = 100_000
# While an open loop runs, a thread waiting for the GIL gets it after this
# long at most (Python's default is 5 ms, ten times a request's budget).
PACING_SWITCH_INTERVAL_SECONDS = 0.0005
# A generator above this share of one CPU is the bottleneck of its point.
GENERATOR_BOUND_PERCENT = 90.0

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# http_proxy in the environment must never send loopback traffic elsewhere.
CHANNEL_OPTIONS = [("grpc.enable_http_proxy", 0)]

FASTPATH_VERSION = 1
_HEADER = struct.Struct(">II")
_HANDSHAKE_STREAM = 0
_MAX_STREAM = 2**32 - 1


class CallFailed(Exception):
    """A request got no answer; ``code`` names why (a gRPC status or a fast
    path error code)."""

    def __init__(self, code: str, message: str = ""):
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code


class Client(Protocol):
    """What the loops drive: one request in, its answer's bytes out."""

    async def request(self, payload: bytes) -> bytes:
        """Send ``payload`` and return the answer; raise CallFailed."""
        ...

    async def close(self) -> None:
        """Close the connection."""
        ...


# --- clients ---------------------------------------------------------------


class GrpcClient:
    """Raw bytes on one unary gRPC method over one channel (one HTTP/2
    connection): requests are serialized once, answers are not decoded."""

    def __init__(self, target: str, method: str):
        self._channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        self._call = self._channel.unary_unary(method)

    async def request(self, payload: bytes) -> bytes:
        try:
            return await self._call(payload, timeout=CALL_TIMEOUT_SECONDS)
        except grpc.aio.AioRpcError as err:
            raise CallFailed(err.code().name, err.details() or "") from None

    async def close(self) -> None:
        await self._channel.close()


class _Answer(msgspec.Struct):
    # An answer frame's payload; ``ok`` is kept undecoded, as the gRPC
    # client keeps its answers' bytes (msgspec.Raw takes part in no union:
    # empty stands for absent, since an ``ok`` is never zero bytes).
    ok: msgspec.Raw = msgspec.Raw(b"")
    error: dict[str, Any] | None = None


_decode_answer = msgspec.msgpack.Decoder(_Answer).decode


class _FrameProtocol(asyncio.Protocol):
    """Splits the byte stream into frames and hands each to ``on_frame``."""

    def __init__(
        self,
        on_frame: Callable[[int, bytes], None],
        on_lost: Callable[[], None],
    ):
        self._on_frame = on_frame
        self._on_lost = on_lost
        self._buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.closed = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        offset, size = 0, len(buffer)
        while size - offset >= _HEADER.size:
            length, stream = _HEADER.unpack_from(buffer, offset)
            end = offset + _HEADER.size + length
            if end > size:
                break
            self._on_frame(stream, bytes(buffer[offset + _HEADER.size : end]))
            offset = end
        del buffer[:offset]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed is not None and not self.closed.done():
            self.closed.set_result(exc)
        self._on_lost()


class FastPathClient:
    """A lean pipelining client of Kynara's fast path, version 1.

    One Unix socket connection; every request gets a stream id of its own
    and any number may be in flight; answers are matched to their requests
    by stream id, in whatever order they come. ``request`` takes the
    MessagePack bytes of one request map (``{"op": ..., "request": ...}``,
    see ``fast_request``) and returns the undecoded ``ok`` of its answer.
    """

    def __init__(self, protocol: _FrameProtocol, pending: dict[int, asyncio.Future]):
        self._protocol = protocol
        self._pending = pending
        self._next_stream = 1
        self.max_message_bytes = 0

    @classmethod
    async def connect(cls, path: str, authorization: str = "") -> FastPathClient:
        """Connect to the fast path socket at ``path`` and do the handshake.

        Raises:
            CallFailed: the daemon refused the hello (its error code), or
                closed the connection.
        """
        pending: dict[int, asyncio.Future] = {}

        def on_frame(stream: int, payload: bytes) -> None:
            future = pending.pop(stream, None)
            if future is not None and not future.done():
                future.set_result(payload)

        def on_lost() -> None:
            for future in pending.values():
                _fail(future)
            pending.clear()

        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_unix_connection(
            lambda: _FrameProtocol(on_frame, on_lost), path
        )
        client = cls(protocol, pending)
        hello: dict[str, Any] = {"op": "hello", "versions": [FASTPATH_VERSION]}
        if authorization:
            hello["authorization"] = authorization
        answer = msgspec.msgpack.decode(
            await client._exchange(_HANDSHAKE_STREAM, msgspec.msgpack.encode(hello))
        )
        if "ok" not in answer:
            error = answer.get("error") or {}
            raise CallFailed(error.get("code", "invalid_answer"), str(answer))
        client.max_message_bytes = answer["ok"].get("max_message_bytes", 0)
        return client

    def _exchange(self, stream: int, payload: bytes) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        if self._protocol.closed.done():
            _fail(future)
            return future
        self._pending[stream] = future
        self._protocol.transport.write(_HEADER.pack(len(payload), stream) + payload)
        return future

    def _stream_id(self) -> int:
        stream = self._next_stream
        while stream in self._pending:
            stream = stream % _MAX_STREAM + 1
        self._next_stream = stream % _MAX_STREAM + 1
        return stream

    async def request(self, payload: bytes) -> bytes:
        answer = _decode_answer(await self._exchange(self._stream_id(), payload))
        if len(answer.ok):
            return bytes(answer.ok)
        error = answer.error or {}
        raise CallFailed(error.get("code", "invalid_answer"), error.get("message", ""))

    async def close(self) -> None:
        transport = self._protocol.transport
        if transport is not None and not transport.is_closing():
            transport.close()
        await self._protocol.closed


def _fail(future: asyncio.Future) -> None:
    if not future.done():
        future.set_exception(CallFailed("unavailable", "connection closed"))


# --- fast path request maps ------------------------------------------------

# The fast path's MessagePack extension types (protos/fastpath.md, Values).
_EXT_UINT64 = 1
_EXT_DURATION = 2


def _fast_value(value: Any) -> Any:
    """One ``kynara.v1.Value`` message as the fast path carries it."""
    kind = value.WhichOneof("kind")
    if kind == "uint_value":
        return msgspec.msgpack.Ext(_EXT_UINT64, struct.pack(">Q", value.uint_value))
    if kind == "timestamp_value":
        ts = value.timestamp_value
        return datetime.datetime.fromtimestamp(ts.seconds, datetime.UTC).replace(
            microsecond=ts.nanos // 1000
        )
    if kind == "duration_value":
        d = value.duration_value
        return msgspec.msgpack.Ext(
            _EXT_DURATION, struct.pack(">qi", d.seconds, d.nanos)
        )
    if kind == "list_value":
        return [_fast_value(item) for item in value.list_value.values]
    if kind == "map_value":
        return _fast_values(value.map_value.fields)
    if kind is None:
        raise ValueError("a kynara.v1.Value without a kind has no fast path form")
    return getattr(value, kind)


def _fast_values(values: Mapping[str, Any]) -> dict[str, Any]:
    return {key: _fast_value(value) for key, value in values.items()}


def fast_request(decide: Any) -> dict[str, Any]:
    """The fast path's map form of a ``kynara.v1.DecideRequest`` message.

    Only the fields that are set are carried (absent fields take protobuf's
    defaults on the fast path too).
    """
    out: dict[str, Any] = {}
    for name in ("request_id", "delegation_token", "action", "approval_id"):
        if getattr(decide, name):
            out[name] = getattr(decide, name)
    if decide.asserted_chain:
        out["asserted_chain"] = list(decide.asserted_chain)
    if decide.HasField("resource"):
        resource = {"kind": decide.resource.kind, "id": decide.resource.id}
        if decide.resource.attributes:
            resource["attributes"] = _fast_values(decide.resource.attributes)
        out["resource"] = resource
    if decide.context:
        out["context"] = _fast_values(decide.context)
    if decide.explain:
        out["explain"] = True
    return out


# --- measuring -------------------------------------------------------------


def percentile(ordered: Sequence[int], fraction: float) -> int:
    """Nearest-rank percentile of an ascending sequence; 0 when it is empty."""
    if not ordered:
        return 0
    rank = max(1, -(-len(ordered) * fraction // 1))
    return ordered[int(rank) - 1]


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of every thread of ``pid`` so far."""
    stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    # The command name in parentheses may hold spaces; fields follow it.
    fields = stat.rsplit(")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / CLOCK_TICKS


def host_cpu_ticks() -> tuple[int, int]:
    """(busy, total) ticks of all CPUs since boot, from /proc/stat."""
    values = [int(v) for v in pathlib.Path("/proc/stat").read_text().split()[1:9]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


@dataclasses.dataclass
class WindowRecord:
    """What one point saw in its measured window, in nanoseconds."""

    latencies: list[int] = dataclasses.field(default_factory=list)
    send_lags: list[int] = dataclasses.field(default_factory=list)
    answers: int = 0
    skipped: int = 0
    errors: Counter = dataclasses.field(default_factory=Counter)


@dataclasses.dataclass(frozen=True)
class Usage:
    """CPU and wall clock over one window."""

    wall: float
    server_cpu: float
    generator_cpu: float
    host_busy_percent: float


class _Sample:
    """The counters read at one edge of the window."""

    def __init__(self, pid: int):
        self.wall = time.perf_counter()
        self.server_cpu = process_cpu_seconds(pid)
        self.generator_cpu = time.process_time()
        self.host = host_cpu_ticks()

    def until(self, end: _Sample) -> Usage:
        busy, total = (b - a for a, b in zip(self.host, end.host, strict=True))
        return Usage(
            wall=end.wall - self.wall,
            server_cpu=end.server_cpu - self.server_cpu,
            generator_cpu=end.generator_cpu - self.generator_cpu,
            host_busy_percent=100 * busy / total if total else 0.0,
        )


@dataclasses.dataclass(frozen=True)
class PointResult:
    """One server at one point (an offered rate or a number in flight).

    ``checks_per_answer`` is 1 for single decisions and the batch size for
    batches: rates and CPU per 1,000 count checks, latencies count calls.
    """

    server: str
    point: str
    offered_per_second: float | None
    in_flight: int | None
    checks_per_answer: int
    seconds: float
    answers: int
    skipped: int
    errors: dict[str, int]
    p50_ms: float
    p99_ms: float
    p999_ms: float
    achieved_per_second: float
    server_cpu_seconds_per_1k: float
    generator_cpu_percent: float
    host_cpu_percent: float
    send_lag_p50_ms: float | None
    send_lag_p99_ms: float | None

    @property
    def generator_bound(self) -> bool:
        """The generator was busy enough to be what limited this point."""
        return self.generator_cpu_percent >= GENERATOR_BOUND_PERCENT

    def sustained(self, fraction: float, max_p99_ms: float) -> bool:
        """An open-loop point kept up: answered at least ``fraction`` of the
        offered rate, skipped nothing, failed nothing, and p99 stayed under
        ``max_p99_ms``."""
        if self.offered_per_second is None:
            return True
        kept_up = self.achieved_per_second >= fraction * self.offered_per_second
        clean = not self.skipped and not self.errors
        return kept_up and clean and self.p99_ms <= max_p99_ms


def summarize(
    names: tuple[str, str],
    shape: tuple[float | None, int | None, int],
    record: WindowRecord,
    usage: Usage,
) -> PointResult:
    """Turn a finished window and its CPU usage into one result.

    Args:
        names: (server, point) as the table shows them.
        shape: (offered rate or None, in flight or None, checks per answer).
        record: latencies and send lags (ns), answers, skips and errors.
        usage: CPU and wall-clock deltas over the same window.

    Returns:
        The result; rates and CPU per 1,000 are 0 when nothing was answered.
    """
    server, point = names
    offered, in_flight, checks = shape
    ordered = sorted(record.latencies)
    done = record.answers * checks
    lags = sorted(record.send_lags)
    return PointResult(
        server=server,
        point=point,
        offered_per_second=offered,
        in_flight=in_flight,
        checks_per_answer=checks,
        seconds=round(usage.wall, 3),
        answers=record.answers,
        skipped=record.skipped,
        errors=dict(record.errors),
        p50_ms=percentile(ordered, 0.50) / 1e6,
        p99_ms=percentile(ordered, 0.99) / 1e6,
        p999_ms=percentile(ordered, 0.999) / 1e6,
        achieved_per_second=done / usage.wall if usage.wall else 0.0,
        server_cpu_seconds_per_1k=usage.server_cpu / done * 1000 if done else 0.0,
        generator_cpu_percent=100 * usage.generator_cpu / usage.wall
        if usage.wall
        else 0.0,
        host_cpu_percent=usage.host_busy_percent,
        send_lag_p50_ms=percentile(lags, 0.50) / 1e6 if offered else None,
        send_lag_p99_ms=percentile(lags, 0.99) / 1e6 if offered else None,
    )


# --- the closed loop -------------------------------------------------------

# TODO(#9): the generator is one Python process on the servers' two CPUs, so
# on a small machine it takes CPU the servers would use (its own share is
# the gen cpu% column); a native generator or pinned CPUs would measure each
# server alone.


@dataclasses.dataclass
class _ClosedState:
    recording: bool = False
    stopping: bool = False


async def _closed_worker(
    client: Client,
    payloads: Sequence[bytes],
    start: int,
    state: _ClosedState,
    record: WindowRecord,
) -> None:
    # Each worker starts at another request so every mix entry is in flight.
    index = start
    while not state.stopping:
        payload = payloads[index % len(payloads)]
        index += 1
        started = time.perf_counter_ns()
        try:
            await client.request(payload)
        except CallFailed as err:
            if state.recording:
                record.errors[err.code] += 1
            continue
        if state.recording:
            record.latencies.append(time.perf_counter_ns() - started)
            record.answers += 1


async def closed_loop(
    client: Client,
    payloads: Sequence[bytes],
    in_flight: int,
    timing: tuple[float, float],
    pid: int,
) -> tuple[WindowRecord, Usage]:
    """Keep ``in_flight`` requests outstanding; measure after the warm-up.

    Args:
        client: a connected client.
        payloads: requests, cycled through by every worker.
        in_flight: workers, each with one request in flight at a time.
        timing: (warm-up seconds, measured seconds).
        pid: the server process whose CPU is read.

    Returns:
        The window's record (answers that arrived in it) and its usage.
    """
    warmup, seconds = timing
    state, record = _ClosedState(), WindowRecord()
    workers = [
        asyncio.create_task(_closed_worker(client, payloads, i, state, record))
        for i in range(in_flight)
    ]
    await asyncio.sleep(warmup)
    first, state.recording = _Sample(pid), True
    await asyncio.sleep(seconds)
    state.recording, last = False, _Sample(pid)
    state.stopping = True
    await asyncio.gather(*workers)
    return record, first.until(last)


# --- the open loop ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OpenSchedule:
    """When each request of an open loop is due: request i at
    ``start_ns + i * 1e9 / rate``; the window holds the requests due in
    ``[window_start_ns, window_end_ns)``."""

    rate: float
    start_ns: int
    window_start_ns: int
    window_end_ns: int

    @classmethod
    def starting(cls, rate: float, start_ns: int, timing: tuple[float, float]):
        """A schedule from ``start_ns`` with (warm-up, measured) seconds."""
        warmup, seconds = timing
        window_start = start_ns + int(warmup * 1e9)
        return cls(rate, start_ns, window_start, window_start + int(seconds * 1e9))

    def due_at(self, index: int) -> int:
        """The instant request ``index`` is due."""
        return self.start_ns + int(index * 1e9 / self.rate)

    def due_by(self, now_ns: int) -> int:
        """How many requests are due by ``now_ns`` (and before the end)."""
        last = min(now_ns, self.window_end_ns - 1)
        if last < self.start_ns:
            return 0
        return int((last - self.start_ns) * self.rate / 1e9) + 1

    def in_window(self, instant_ns: int) -> bool:
        """Whether ``instant_ns`` falls in the measured window."""
        return self.window_start_ns <= instant_ns < self.window_end_ns


class _Pacer(threading.Thread):
    """Wakes the event loop at each due time (or every MIN_PACING_NS at high
    rates); the loop works out what is due from the clock itself, so a wake
    that comes late or is merged with the next one loses nothing."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        schedule: OpenSchedule,
        fire: Callable[[], None],
    ):
        super().__init__(name="loadgen-pacer", daemon=True)
        self._loop, self._schedule, self._fire = loop, schedule, fire
        self.waiting = False
        self.stopped = False

    def _wake(self) -> None:
        self.waiting = False
        self._fire()

    def run(self) -> None:
        schedule = self._schedule
        step = max(int(1e9 / schedule.rate), MIN_PACING_NS)
        next_ns = schedule.start_ns
        while not self.stopped and next_ns < schedule.window_end_ns:
            wait = next_ns - time.perf_counter_ns()
            if wait > 0:
                time.sleep(wait / 1e9)
            if not self.waiting:
                self.waiting = True
                self._loop.call_soon_threadsafe(self._wake)
            next_ns = max(next_ns + step, time.perf_counter_ns())


class _OpenLoop:
    """The sending side of one open-loop point."""

    def __init__(
        self,
        client: Client,
        payloads: Sequence[bytes],
        schedule: OpenSchedule,
        record: WindowRecord,
    ):
        self.client, self.payloads = client, payloads
        self.schedule, self.record = schedule, record
        self.sent = 0
        self.outstanding: set[asyncio.Task] = set()
        self.limit = MAX_OUTSTANDING

    def fire(self) -> None:
        now = time.perf_counter_ns()
        schedule, record = self.schedule, self.record
        for index in range(self.sent, schedule.due_by(now)):
            due = schedule.due_at(index)
            counted = schedule.in_window(due)
            if len(self.outstanding) >= self.limit:
                record.skipped += counted
                continue
            if counted:
                record.send_lags.append(now - due)
            payload = self.payloads[index % len(self.payloads)]
            task = asyncio.ensure_future(self._one(payload, due, counted))
            self.outstanding.add(task)
            task.add_done_callback(self.outstanding.discard)
        self.sent = max(self.sent, schedule.due_by(now))

    async def _one(self, payload: bytes, due: int, counted: bool) -> None:
        try:
            await self.client.request(payload)
        except CallFailed as err:
            if counted:
                self.record.errors[err.code] += 1
            return
        done = time.perf_counter_ns()
        if counted:
            self.record.latencies.append(done - due)
        if self.schedule.in_window(done):
            self.record.answers += 1


async def _sleep_until(instant_ns: int) -> None:
    # The event loop's timers may wake up to a millisecond early (uvloop
    # rounds to whole milliseconds); what follows must run at or after
    # the instant, so sleep again until the clock has passed it.
    while (left := instant_ns - time.perf_counter_ns()) > 0:
        await asyncio.sleep(left / 1e9)


async def open_loop(
    client: Client,
    payloads: Sequence[bytes],
    rate: float,
    timing: tuple[float, float],
    pid: int,
) -> tuple[WindowRecord, Usage]:
    """Send at ``rate`` requests per second; measure after the warm-up.

    Latency runs from each request's due time to its answer and counts the
    requests due in the window, however late they are answered (up to
    DRAIN_TIMEOUT_SECONDS after it; later ones count as ``unanswered``).
    Answers per second count the answers that arrived in the window.

    Returns:
        The window's record and its usage.
    """
    record = WindowRecord()
    start = time.perf_counter_ns() + 1_000_000
    schedule = OpenSchedule.starting(rate, start, timing)
    sender = _OpenLoop(client, payloads, schedule, record)
    pacer = _Pacer(asyncio.get_running_loop(), schedule, sender.fire)
    # The pacing thread must get the GIL soon after it wakes, not after the
    # default 5 ms switch interval.
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(PACING_SWITCH_INTERVAL_SECONDS)
    pacer.start()
    try:
        await _sleep_until(schedule.window_start_ns)
        first = _Sample(pid)
        await _sleep_until(schedule.window_end_ns)
        last = _Sample(pid)
        # Whatever fell due after the pacer's last wake-up is sent now, so
        # the window holds every request due in it.
        sender.fire()
    finally:
        pacer.stopped = True
        await asyncio.to_thread(pacer.join)
        sys.setswitchinterval(switch_interval)
    await _drain(sender.outstanding, record)
    return record, first.until(last)


async def _drain(outstanding: set[asyncio.Task], record: WindowRecord) -> None:
    if not outstanding:
        return
    _, late = await asyncio.wait(set(outstanding), timeout=DRAIN_TIMEOUT_SECONDS)
    for task in late:
        task.cancel()
    if late:
        record.errors["unanswered"] += len(late)
        await asyncio.gather(*late, return_exceptions=True)


async def run_point(
    connect: Callable[[], Awaitable[Client]],
    loop: Callable[[Client], Awaitable[tuple[WindowRecord, Usage]]],
) -> tuple[WindowRecord, Usage]:
    """Connect a fresh client, run one loop on it, and close it."""
    client = await connect()
    try:
        return await loop(client)
    finally:
        await client.close()
