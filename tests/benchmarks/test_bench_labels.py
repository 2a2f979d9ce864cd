"""What the benchmarks' tables claim: peer_bench's third rate is the highest
the pair sustained among the rates it says it tried (the fixed points
included), its rows say when they miss and that batches count checks, and
decide_bench names its transports as gRPC ones."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest
import uvloop

BENCHMARKS = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
sys.path.insert(0, str(BENCHMARKS / "peer_cerbos"))
import decide_bench  # noqa: E402
import loadgen  # noqa: E402
import peer_bench  # noqa: E402

MS = 1_000_000


def _fixed(*pairs: tuple[float, bool]) -> list[peer_bench.RateTry]:
    return [peer_bench.RateTry(rate, ok, 5.0, "fixed") for rate, ok in pairs]


def _search(limit: float, max_tries: int, known, ceiling: float):
    tried: list[float] = []

    async def try_rate(rate: float) -> peer_bench.RateTry:
        tried.append(rate)
        return peer_bench.RateTry(rate, rate <= limit, 2.0, "search")

    tries = uvloop.run(peer_bench.search_rates(known, ceiling, max_tries, try_rate))
    return tries, tried


def test_search_starts_above_the_fixed_rate_both_sustained():
    # The pair sustained 2000/s at the fixed point while the smaller
    # closed-loop maximum was 1600/s: nothing below 2000 is worth a try.
    known = _fixed((500, True), (2000, True))

    tries, tried = _search(limit=2900, max_tries=5, known=known, ceiling=1600)
    third = peer_bench.third_rate(tries)

    assert tried and min(tried) > 2000
    assert third.source == "search"
    assert 2000 < third.rate <= 2900
    assert tries[:2] == known


def test_search_keeps_the_fixed_rate_when_nothing_above_it_holds():
    known = _fixed((500, True), (2000, True))

    tries, tried = _search(limit=1000, max_tries=5, known=known, ceiling=6000)
    third = peer_bench.third_rate(tries)

    assert (third.rate, third.source, third.sustained) == (2000.0, "fixed", True)
    assert all(rate > 2000 for rate in tried)


def test_search_goes_below_the_fixed_rates_when_neither_was_sustained():
    known = _fixed((500, False), (2000, False))

    tries, tried = _search(limit=300, max_tries=5, known=known, ceiling=400)
    third = peer_bench.third_rate(tries)

    assert max(tried) < 500
    assert third.sustained and third.rate <= 300


def test_search_is_bounded_by_its_tries_and_never_repeats_a_rate():
    known = _fixed((500, True), (2000, True))

    _, tried = _search(limit=10**9, max_tries=3, known=known, ceiling=1600)

    assert len(tried) == 3
    assert len(set(tried)) == 3
    assert tried == sorted(tried)


def test_next_rate_stops_once_best_and_missed_are_a_step_apart():
    tries = _fixed((2000, True), (2100, False))

    assert peer_bench.next_rate(tries, 6000) is None


def _result(server: str, point: str, **changes) -> loadgen.PointResult:
    offered = 2500.0 if "/s" in point else None
    checks = 10 if point.startswith("batch") else 1
    record = loadgen.WindowRecord(latencies=[MS] * 10, answers=2500)
    usage = loadgen.Usage(
        wall=1.0, server_cpu=0.5, generator_cpu=0.1, host_busy_percent=50.0
    )
    in_flight = None if offered else 8
    shape = (offered, in_flight, checks)
    result = loadgen.summarize((server, point), shape, record, usage)
    return result.__class__(**{**result.__dict__, **changes})


def _found() -> dict:
    tries = _fixed((500, True), (2000, True)) + [
        peer_bench.RateTry(3000.0, False, 2.0, "search"),
        peer_bench.RateTry(2500.0, True, 2.0, "search"),
    ]
    results = [
        _result("fast", "third 2500/s"),
        _result("cerbos", "third 2500/s", achieved_per_second=2000.0),
        _result("echo", "third 2500/s", achieved_per_second=2000.0),
    ]
    return {
        "pair": ["fast", "cerbos"],
        "rate_tries": [t.__dict__ for t in tries],
        "third": tries[-1].__dict__,
        "results": results,
    }


def test_header_lists_every_rate_tried_and_the_third_points_verdict():
    found = _found()

    text = "\n".join(peer_bench.third_rate_lines(found))

    assert "fixed points (5 s): 500 yes, 2000 yes" in text
    assert "search (2 s): 3000 no, 2500 yes" in text
    assert "third rate 2500/s" in text
    assert "NOT sustained by cerbos" in text


def test_a_pair_row_that_misses_the_third_rate_says_so():
    found = _found()
    fast, cerbos, echo = found["results"]

    table = peer_bench.format_table(found["results"], found["pair"])

    assert peer_bench._note(fast, found["pair"]) == ""
    assert peer_bench._note(cerbos, found["pair"]) == (
        "not sustained, though its search try was"
    )
    assert peer_bench._note(echo, found["pair"]) == "not sustained"
    assert "sustained 2500/s" not in table


def test_batch_rows_say_they_count_checks():
    batch = _result("fast", "batch10 x8")

    note = peer_bench._note(batch, ["fast", "cerbos"])

    assert batch.achieved_per_second == 25000.0
    assert note == "checks/s: 10 a call, 2500 calls/s"


@pytest.mark.parametrize(
    ("given", "key"),
    [("unix", "unix"), ("grpc-unix", "unix"), ("tcp", "tcp"), ("grpc-tcp", "tcp")],
)
def test_decide_bench_takes_old_and_new_transport_names(given, key):
    args = decide_bench._parse_args(["--transport", given])

    assert args.transport == [key]
    assert decide_bench.transport_label(key) == f"grpc-{key}"


def test_decide_bench_rejects_an_unknown_transport():
    script = BENCHMARKS / "decide_bench.py"

    done = subprocess.run(
        [sys.executable, str(script), "--transport", "fast"],
        capture_output=True,
        text=True,
        check=False,
    )

    assert done.returncode == 2
    assert "unknown transport 'fast'" in done.stderr


def test_decide_bench_rows_name_the_grpc_transport():
    record = loadgen.WindowRecord(latencies=[MS, 2 * MS], answers=2)
    usage = loadgen.Usage(
        wall=1.0, server_cpu=0.1, generator_cpu=0.1, host_busy_percent=10.0
    )

    row = decide_bench.summarize("daemon", "unix", 1, record, usage)

    assert row.transport == "grpc-unix"
    assert (
        decide_bench.format_table([(row, row)]).splitlines()[1].startswith("grpc-unix")
    )


class _Process:
    pid = 4242


def test_pid_file_holds_the_daemon_only_while_it_is_under_load(tmp_path, capsys):
    daemon = decide_bench.Server(
        "daemon", decide_bench.DECIDE_METHOD, _Process(), {}, tmp_path / "log"
    )
    pid_file = tmp_path / "daemon.pid"

    with decide_bench.daemon_under_load(daemon, "grpc-unix x64", pid_file):
        during = pid_file.read_text()

    assert during == "4242\n"
    assert not pid_file.exists()
    assert "daemon pid 4242 under load: grpc-unix x64" in capsys.readouterr().err
