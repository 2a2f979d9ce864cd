"""The load generator's bookkeeping: percentiles, rates, the open-loop
schedule, and the fast path client's pipelining over a real Unix socket."""

from __future__ import annotations

import asyncio
import os
import pathlib
import struct
import sys

import msgspec
import pytest
import uvloop

BENCHMARKS = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import loadgen  # noqa: E402

MS = 1_000_000


def _result(**changes) -> loadgen.PointResult:
    record = loadgen.WindowRecord(latencies=[MS], answers=950)
    usage = loadgen.Usage(
        wall=1.0, server_cpu=0.1, generator_cpu=0.1, host_busy_percent=50.0
    )
    result = loadgen.summarize(("s", "open 1000/s"), (1000.0, None, 1), record, usage)
    return result.__class__(**{**result.__dict__, **changes})


def test_summarize_reads_percentiles_rates_and_cpu_per_thousand():
    record = loadgen.WindowRecord(
        latencies=[i * MS for i in range(1000, 0, -1)], answers=1000
    )
    usage = loadgen.Usage(
        wall=2.0, server_cpu=0.5, generator_cpu=1.0, host_busy_percent=75.0
    )

    single = loadgen.summarize(("cerbos", "closed x8"), (None, 8, 1), record, usage)
    batch = loadgen.summarize(("fast", "batch10 x8"), (None, 8, 10), record, usage)

    assert (single.p50_ms, single.p99_ms, single.p999_ms) == (500.0, 990.0, 999.0)
    assert single.achieved_per_second == 500.0
    assert single.server_cpu_seconds_per_1k == 0.5
    assert single.generator_cpu_percent == 50.0
    assert single.send_lag_p99_ms is None
    assert batch.achieved_per_second == 5000.0
    assert batch.server_cpu_seconds_per_1k == 0.05


def test_open_schedule_puts_rate_times_seconds_requests_in_the_window():
    schedule = loadgen.OpenSchedule.starting(2000.0, 0, (1.0, 2.0))

    in_window = [
        i
        for i in range(schedule.due_by(10**10))
        if schedule.in_window(schedule.due_at(i))
    ]

    assert schedule.due_by(-1) == 0
    assert schedule.due_by(0) == 1
    assert schedule.due_by(10**10) == 6000  # nothing is due after the window
    assert len(in_window) == 4000
    assert schedule.due_at(in_window[0]) == 1_000_000_000


def test_sustained_needs_the_rate_no_skips_no_errors_and_a_bounded_p99():
    assert _result().sustained(0.95, 50.0)
    assert not _result(achieved_per_second=940.0).sustained(0.95, 50.0)
    assert not _result(skipped=1).sustained(0.95, 50.0)
    assert not _result(errors={"UNAVAILABLE": 1}).sustained(0.95, 50.0)
    assert not _result(p99_ms=51.0).sustained(0.95, 50.0)


class _InstantClient:
    def __init__(self):
        self.calls = 0

    async def request(self, payload: bytes) -> bytes:
        self.calls += 1
        if self.calls % 3 == 0:
            raise loadgen.CallFailed("UNAVAILABLE")
        return payload

    async def close(self) -> None:
        pass


def test_open_loop_accounts_for_every_request_due_in_the_window():
    client = _InstantClient()

    record, usage = uvloop.run(
        loadgen.open_loop(client, [b"a", b"b"], 2000.0, (0.05, 0.25), os.getpid())
    )

    assert len(record.latencies) + sum(record.errors.values()) == 500
    assert record.errors["UNAVAILABLE"] > 0
    assert len(record.send_lags) == 500
    assert record.skipped == 0
    assert usage.wall > 0


def _frame(stream: int, payload: dict) -> bytes:
    body = msgspec.msgpack.encode(payload)
    return struct.pack(">II", len(body), stream) + body


async def _serve_out_of_order(reader, writer) -> None:
    # Answers the hello, then each pair of requests in reverse order; a
    # request whose op is "fail" gets an error.
    header = await reader.readexactly(8)
    length, stream = struct.unpack(">II", header)
    hello = msgspec.msgpack.decode(await reader.readexactly(length))
    assert hello["versions"] == [1]
    writer.write(_frame(0, {"ok": {"version": 1, "max_message_bytes": 65536}}))
    held = []
    while True:
        try:
            length, stream = struct.unpack(">II", await reader.readexactly(8))
        except asyncio.IncompleteReadError:
            break
        held.append((stream, msgspec.msgpack.decode(await reader.readexactly(length))))
        if len(held) == 2:
            for stream, request in reversed(held):
                if request["op"] == "fail":
                    answer = {"error": {"code": "invalid_request", "message": "no"}}
                else:
                    answer = {"ok": {"echo": request["n"]}}
                writer.write(_frame(stream, answer))
            held.clear()
    writer.close()


async def _pipeline(path: str) -> tuple[list, str, int]:
    server = await asyncio.start_unix_server(_serve_out_of_order, path)
    client = await loadgen.FastPathClient.connect(path)
    encode = msgspec.msgpack.encode
    answers = await asyncio.gather(
        *(client.request(encode({"op": "decide", "n": n})) for n in range(6))
    )
    failing = asyncio.gather(
        client.request(encode({"op": "fail"})),
        client.request(encode({"op": "decide", "n": 9})),
        return_exceptions=True,
    )
    failed, last = await failing
    await client.close()
    server.close()
    await server.wait_closed()
    decoded = [msgspec.msgpack.decode(answer)["echo"] for answer in answers]
    return (
        decoded + [msgspec.msgpack.decode(last)["echo"]],
        failed.code,
        client.max_message_bytes,
    )


def test_fast_path_client_matches_pipelined_answers_by_stream(tmp_path):
    # A bound on the whole exchange, so a lost answer fails instead of hanging.
    exchange = asyncio.wait_for(_pipeline(str(tmp_path / "f.sock")), 30)

    echoed, failed_code, max_bytes = uvloop.run(exchange)

    assert echoed == [0, 1, 2, 3, 4, 5, 9]
    assert failed_code == "invalid_request"
    assert max_bytes == 65536


def test_fast_request_carries_typed_values():
    from kynara.v1 import decision_pb2 as pb

    decide = pb.DecideRequest(
        asserted_chain=["alice"],
        action="payments.refund.issue",
        resource=pb.Resource(
            kind="payments.refund",
            id="rf_1",
            attributes={
                "amount": pb.Value(int_value=1200),
                "big": pb.Value(uint_value=2**63),
            },
        ),
        context={"region": pb.Value(string_value="DE")},
    )

    mapped = loadgen.fast_request(decide)

    assert mapped["asserted_chain"] == ["alice"]
    assert mapped["resource"]["attributes"]["amount"] == 1200
    big = mapped["resource"]["attributes"]["big"]
    assert (big.code, big.data) == (1, struct.pack(">Q", 2**63))
    assert mapped["context"] == {"region": "DE"}
    assert "request_id" not in mapped


@pytest.mark.parametrize("code", ["UNAVAILABLE", "deadline_exceeded"])
def test_call_failed_keeps_its_code(code):
    assert loadgen.CallFailed(code, "why").code == code
