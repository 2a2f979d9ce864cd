"""A running collector against someone who can write to the central store
(a dir:// store in tmp_path, a real nats-server) but holds no daemon key:
whatever they put there, the registered daemon's segments are still
collected, and the refusal is logged and counted. Plus the HTTP query's
input checks."""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.parse

import nats
import pytest

from kynara_sidecar.collector.config import load_collector_config
from kynara_sidecar.collector.service import Collector
from kynara_sidecar.sync import daemon_token, open_store, segment_message_id

from ._logs import ORIGIN, messages_of, write_log
from .test_collector import (
    RunningCollector,
    _metric,
    _wait,
    dir_store,
    ship,
    write_config,
)

FAILURE = "kynara_collector_failures_total"
UNREGISTERED = (
    'kynara_collector_alerts_total{daemon="unregistered",kind="unknown_daemon"}'
)


def _doors_alive(collector) -> bool:
    return all(not task.done() for task in collector.collector._tasks)


def _publish(url: str, subject: str, data: bytes) -> None:
    async def run() -> None:
        store = open_store(url)  # creates the stream, as a daemon would
        await store.connect()
        await store.close()
        client = await nats.connect(url)
        try:
            await client.jetstream().publish(subject, data)
        finally:
            await client.close()

    asyncio.run(run())


def test_undecodable_daemon_directory_does_not_stop_collection(
    tmp_path, start_collector
):
    log = write_log(tmp_path / "log", 8)
    url = dir_store(tmp_path)
    config = write_config(tmp_path, log, store={"url": url, "poll_seconds": 0.05})
    collector = start_collector(config)
    segments = tmp_path / "store" / "segments"
    _wait(segments.is_dir, "the store's layout")
    (segments / "_w").mkdir()  # base64url of b"\xff": no UTF-8 daemon id
    (segments / "_w" / f"{1:020d}.msg").write_bytes(b"x\njunk")
    # A plain file where a daemon's directory would be.
    (segments / daemon_token("d0")).write_bytes(b"not a directory")

    ship(url, log.path)
    found = collector.wait_for(lambda d: d["tree_size"] == 8, "tree size 8")

    assert (found["alerts"], found["refused"]) == ([], "")
    assert _doors_alive(collector)
    _wait(lambda: _metric(collector, UNREGISTERED) >= 1, "the junk counted")
    assert _metric(collector, f'{FAILURE}{{what="store"}}') == 0


def test_malformed_message_file_of_a_daemon_is_refused_and_the_next_taken(
    tmp_path, start_collector
):
    log = write_log(tmp_path / "log", 8)
    url = dir_store(tmp_path)
    config = write_config(tmp_path, log, store={"url": url, "poll_seconds": 0.05})
    first, rest = messages_of(log.path)[:1], messages_of(log.path)[1:]
    directory = tmp_path / "store" / "segments" / daemon_token(ORIGIN)

    async def ship_messages(messages) -> None:
        store = open_store(url)
        await store.connect()
        try:
            for message in messages:
                data = message.SerializeToString()
                await store.ship_segment(ORIGIN, segment_message_id(message), data)
        finally:
            await store.close()

    asyncio.run(ship_messages(first))
    (directory / f"{2:020d}.msg").write_bytes(b"junk-without-newline")
    (directory / f"{3:020d}.msg").mkdir()
    asyncio.run(ship_messages(rest))
    collector = start_collector(config)

    found = collector.wait_for(lambda d: d["tree_size"] == 8, "tree size 8")

    assert [a["kind"] for a in found["alerts"]] == ["malformed", "malformed"]
    assert found["refused"] == ""
    assert _doors_alive(collector)


@pytest.mark.parametrize(
    "poison",
    ["bad-token", "short-token", "long-id-junk", "long-id-segment", "negative-size"],
)
def test_poison_on_nats_does_not_stop_collection(
    tmp_path, start_collector, nats_server, poison
):
    log = write_log(tmp_path / "log", 8)
    config = write_config(tmp_path, log, store={"url": nats_server.url})
    collector = start_collector(config)
    segment = messages_of(log.path)[0]
    long_id = "kynara.segments." + daemon_token("x" * 400)
    if poison == "bad-token":
        _publish(nats_server.url, "kynara.segments._w", b"junk")
    elif poison == "short-token":
        _publish(nats_server.url, "kynara.segments.A", b"junk")
    elif poison == "long-id-junk":
        _publish(nats_server.url, long_id, b"\xff\xff not protobuf")
    elif poison == "long-id-segment":
        _publish(nats_server.url, long_id, segment.SerializeToString())
    else:
        cp = json.loads(segment.checkpoint.json)
        cp["tree_size"] = -1
        poisoned = type(segment)()
        poisoned.CopyFrom(segment)
        poisoned.checkpoint.json = json.dumps(cp).encode()
        _publish(
            nats_server.url,
            "kynara.segments." + daemon_token(ORIGIN),
            poisoned.SerializeToString(),
        )

    ship(nats_server.url, log.path)
    found = collector.wait_for(lambda d: d["tree_size"] == 8, "tree size 8")

    assert found["refused"] == ""
    assert _doors_alive(collector)
    assert _metric(collector, f'{FAILURE}{{what="archive_or_state"}}') == 0
    assert _metric(collector, f'{FAILURE}{{what="message"}}') == 0
    _, body = collector.get("/daemons")
    assert [d["daemon_id"] for d in json.loads(body)["daemons"]] == [ORIGIN]


def test_a_door_that_dies_is_logged_and_counted_and_stop_says_so(tmp_path, caplog):
    log = write_log(tmp_path / "log", 1)
    config = write_config(tmp_path, log, http={"port": -1})
    collector = Collector(load_collector_config(config))

    async def broken_door() -> None:
        raise RuntimeError("the door broke")

    async def scenario() -> None:
        await collector.start()
        collector._start_task(broken_door(), "store")
        await asyncio.wait(collector._tasks)
        await asyncio.sleep(0)  # the done callback runs
        await collector.stop()

    with caplog.at_level(logging.INFO, logger="kynara.collector"):
        asyncio.run(scenario())

    messages = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert ("ERROR", "door stopped taking segments") in messages
    assert ("ERROR", "stopping: door had died") in messages
    sample = collector.metrics.registry.get_sample_value(
        "kynara_collector_failures_total", {"what": "door"}
    )
    assert sample == 1


# ---------------------------------------------------------------- HTTP


@pytest.fixture
def served(tmp_path, start_collector):
    log = write_log(tmp_path / "log", 12)
    url = dir_store(tmp_path)
    config = write_config(tmp_path, log, store={"url": url, "poll_seconds": 0.05})
    ship(url, log.path)
    collector = start_collector(config)
    collector.wait_for(lambda d: d["tree_size"] == 12, "tree size 12")
    return collector


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"from": "²", "to": "3"}, "query parameter from: expected an integer"),
        ({"from": "١", "to": "٣"}, "query parameter from: expected an integer"),
        ({"from": "1", "to": "9" * 30}, "query parameter to: expected an integer"),
        ({"from": "1", "to": "3", "log": ".."}, "log: expected 32 lowercase hex"),
        ({"from": "1", "to": "3", "log": "a\x00b"}, "log: expected 32 lowercase hex"),
        ({"from": "1", "to": "3", "log": "x/../.."}, "log: expected 32 lowercase"),
        ({"from": "1", "to": "3", "log": "A" * 32}, "log: expected 32 lowercase"),
    ],
    ids=["superscript", "arabic", "too-long", "dotdot", "nul", "path", "upper"],
)
def test_bad_query_parameters_answer_400_naming_them(
    served, tmp_path, params, expected
):
    query = urllib.parse.urlencode({"daemon": ORIGIN, **params})

    status, body = served.get(f"/records?{query}")

    assert status == 400
    assert expected in json.loads(body)["error"]
    assert str(tmp_path) not in body.decode()


def test_unreadable_archive_answers_503_without_naming_a_path(served, tmp_path, caplog):
    archive = tmp_path / "archive"
    archive.rename(tmp_path / "archive-away")
    archive.write_bytes(b"a file where the archive directory was")

    with caplog.at_level(logging.ERROR, logger="kynara.collector"):
        status, body = served.get(f"/records?daemon={ORIGIN}&from=1&to=3")

    assert status == 503
    assert str(tmp_path) not in body.decode()
    assert "see the collector's log" in json.loads(body)["error"]
    assert any("archive unavailable" in r.getMessage() for r in caplog.records)


def test_stop_right_after_start_ends_the_nats_door(tmp_path, nats_server, caplog):
    # The NATS client can swallow a cancellation while connecting; the door
    # must still end instead of being left behind (or hanging the stop).
    log = write_log(tmp_path / "log", 1)
    config = write_config(tmp_path, log, store={"url": nats_server.url})
    doors = []

    with caplog.at_level(logging.ERROR, logger="kynara.collector"):
        for _ in range(3):
            running = RunningCollector(config)
            doors.extend(running.collector._tasks)
            running.stop()

    assert len(doors) == 3
    assert all(door.done() for door in doors)
    assert "left behind" not in caplog.text
