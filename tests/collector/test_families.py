"""A family of daemons under one ``daemons`` entry (``id_prefix``), as a
Kubernetes Deployment's pods: real signed logs shipped through a real
``dir://`` store to a running collector, and the configuration's checks."""

from __future__ import annotations

import asyncio
import json
import pathlib
import urllib.parse

import pytest
import yaml

from kynara_sidecar.audit.keys import generate_key, save_public_key
from kynara_sidecar.collector.config import load_collector_config
from kynara_sidecar.collector.registry import DaemonRegistry
from kynara_sidecar.errors import ConfigError
from kynara_sidecar.sync import open_store, segment_message_id

from ._logs import messages_of, write_log_of
from .test_collector import CHUNK_BYTES, _metric, _wait, dir_store

POD_A = "kynara-agent-abc/uid1"
POD_B = "kynara-agent-def/uid2"
FAMILY = {"id_prefix": "kynara-agent-"}


def ship_as(url: str, daemon_id: str, messages) -> int:
    """Put segment messages into the store under ``daemon_id``, as that
    daemon's shipper would; returns how many it stored anew."""

    async def run() -> int:
        store = open_store(url)
        await store.connect()
        try:
            stored = 0
            for message in messages:
                data = message if isinstance(message, bytes) else None
                msg_id = (
                    segment_message_id(message) if data is None else "junk-" + daemon_id
                )
                data = data if data is not None else message.SerializeToString()
                stored += await store.ship_segment(daemon_id, msg_id, data)
            return stored
        finally:
            await store.close()

    return asyncio.run(run())


def family_config(tmp_path: pathlib.Path, key, **sections) -> pathlib.Path:
    key_file = tmp_path / "kynara-agent.pub"
    save_public_key(key.public(), key_file)
    config = {
        "daemons": {"kynara-agent": {**FAMILY, "public_keys": [str(key_file)]}},
        "archive": {"url": f"dir://{tmp_path / 'archive'}"},
        "state": {"path": str(tmp_path / "state"), "map_size": 1 << 26},
        "http": {"port": 0},
        **sections,
    }
    path = tmp_path / "collector.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def daemons_of(collector) -> dict[str, dict]:
    _, body = collector.get("/daemons")
    return {d["daemon_id"]: d for d in json.loads(body)["daemons"]}


def records_of(collector, daemon_id: str, first: int, last: int) -> list[dict]:
    query = urllib.parse.urlencode({"daemon": daemon_id, "from": first, "to": last})
    status, body = collector.get(f"/records?{query}")
    assert status == 200, body
    return [json.loads(line) for line in body.splitlines()]


def test_two_pods_of_one_family_are_taken_on_and_archived_separately(
    tmp_path, start_collector
):
    key = generate_key()  # the Deployment's one audit key, shared by its pods
    log_a = write_log_of(tmp_path / "a", POD_A, 8, key)
    log_b = write_log_of(tmp_path / "b", POD_B, 4, key)
    store_url = dir_store(tmp_path)
    ship_as(store_url, POD_A, messages_of(log_a.path, 0, CHUNK_BYTES))
    ship_as(store_url, POD_B, messages_of(log_b.path, 0, CHUNK_BYTES))
    collector = start_collector(
        family_config(tmp_path, key, store={"url": store_url, "poll_seconds": 0.05})
    )

    _wait(
        lambda: (
            {d: f["tree_size"] for d, f in daemons_of(collector).items()}
            == {POD_A: 8, POD_B: 4}
        ),
        "both pods accepted",
    )
    daemons = daemons_of(collector)
    for daemon_id, log in ((POD_A, log_a), (POD_B, log_b)):
        assert daemons[daemon_id]["entry"] == "kynara-agent"
        assert daemons[daemon_id]["registered"] is True
        assert daemons[daemon_id]["log_id"] == log.log_id
        assert daemons[daemon_id]["alerts"] == []
    assert [r["seq"] for r in records_of(collector, POD_A, 1, 8)] == list(range(1, 9))
    assert [r["seq"] for r in records_of(collector, POD_B, 1, 4)] == [1, 2, 3, 4]
    # Each pod's segments under its own archive keys, not one family's.
    archived = sorted(p.name for p in (tmp_path / "archive").rglob("*") if p.is_file())
    assert len(archived) == 3  # two segments of A, one of B
    # Bounded labels: the entry's name, never a pod's id.
    _, metrics = collector.get("/metrics")
    assert b"kynara-agent-abc" not in metrics and b"kynara-agent-def" not in metrics
    label = '{daemon="kynara-agent"}'
    assert _metric(collector, f"kynara_collector_records_archived_total{label}") == 12
    assert (
        _metric(
            collector,
            'kynara_collector_segments_total{daemon="kynara-agent",outcome="accepted"}',
        )
        == 3
    )


def test_an_id_outside_every_prefix_is_an_unknown_daemon(tmp_path, start_collector):
    key = generate_key()
    outsider = "other-agent-abc/uid3"
    log = write_log_of(tmp_path / "o", outsider, 4, key)
    store_url = dir_store(tmp_path)
    ship_as(store_url, outsider, messages_of(log.path, 0, CHUNK_BYTES))
    collector = start_collector(
        family_config(tmp_path, key, store={"url": store_url, "poll_seconds": 0.05})
    )

    _wait(
        lambda: (
            _metric(
                collector,
                'kynara_collector_alerts_total{daemon="unregistered",'
                'kind="unknown_daemon"}',
            )
            >= 1
        ),
        "an unknown_daemon alert",
    )
    assert daemons_of(collector) == {}
    assert not (tmp_path / "archive").exists() or not any(
        p.is_file() for p in (tmp_path / "archive").rglob("*")
    )


def test_a_member_is_kept_only_once_its_entry_key_signed_for_it(
    tmp_path, start_collector
):
    key = generate_key()
    stranger = "kynara-agent-zzz/uid9"
    # Under the family's prefix but signed with a key not the entry's, and
    # junk: anyone who can write to the store can name any member id.
    forged = write_log_of(tmp_path / "f", stranger, 4, generate_key())
    genuine = write_log_of(tmp_path / "a", POD_A, 4, key)
    store_url = dir_store(tmp_path)
    ship_as(store_url, stranger, messages_of(forged.path, 0, CHUNK_BYTES))
    ship_as(store_url, "kynara-agent-junk/uid8", [b"\x00not a segment"])
    ship_as(store_url, POD_A, messages_of(genuine.path, 0, CHUNK_BYTES))
    collector = start_collector(
        family_config(tmp_path, key, store={"url": store_url, "poll_seconds": 0.05})
    )

    _wait(
        lambda: daemons_of(collector).get(POD_A, {}).get("tree_size") == 4,
        "the genuine pod accepted",
    )
    # Nothing kept of the strangers: no state, no alert in it; counted
    # under the entry's name.
    assert set(daemons_of(collector)) == {POD_A}
    state = collector.collector.state
    for daemon_id in (stranger, "kynara-agent-junk/uid8"):
        assert state.held(daemon_id) is None
        assert state.alert_total(daemon_id) == 0
    assert (
        _metric(
            collector,
            'kynara_collector_alerts_total{daemon="kynara-agent",kind="bad_signature"}',
        )
        >= 1
    )
    assert (
        _metric(
            collector,
            'kynara_collector_alerts_total{daemon="kynara-agent",kind="malformed"}',
        )
        == 1
    )


# ------------------------------------------------------------ configuration


def _load(tmp_path: pathlib.Path, daemons: dict, **sections):
    key_file = tmp_path / "k.pub"
    save_public_key(generate_key().public(), key_file)
    for entry in daemons.values():
        entry.setdefault("public_keys", [str(key_file)])
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"daemons": daemons, **sections}))
    return load_collector_config(path)


def test_a_family_and_exact_ids_resolve_to_their_entries(tmp_path):
    config = _load(
        tmp_path,
        {
            "kynara-agent": dict(FAMILY),
            "kynara/kynara-agent-0": {},  # a StatefulSet's pod: an exact id
        },
    )
    registry: DaemonRegistry = config.registry()

    assert registry.label_for(POD_A) == "kynara-agent"
    assert registry.label_for("kynara/kynara-agent-0") == "kynara/kynara-agent-0"
    assert registry.label_for("kynara-agent-") == "unregistered"  # the prefix alone
    assert registry.label_for("kynara-agent-x\n") == "unregistered"  # no daemon id
    assert registry.label_for("support-bot") == "unregistered"
    assert registry.is_family_member(POD_A)
    assert not registry.is_family_member("kynara/kynara-agent-0")
    assert registry.exact_ids == ["kynara/kynara-agent-0"]
    assert "kynara-agent" not in config.registered_keys()


@pytest.mark.parametrize(
    ("daemons", "error"),
    [
        ({"a": {"id_prefix": ""}}, r"daemons\.a\.id_prefix: expected 1 to"),
        ({"a": {"id_prefix": 'x"'}}, r"daemons\.a\.id_prefix"),
        (
            {"a": {"id_prefix": "kynara-"}, "b": {"id_prefix": "kynara-agent-"}},
            r"daemons\.b\.id_prefix: 'kynara-agent-' overlaps daemons\.a",
        ),
        (
            {"a": {"id_prefix": "kynara-agent-"}, "kynara-agent-0": {}},
            r"daemons\.kynara-agent-0: the id is also matched by daemons\.a",
        ),
        ({"unregistered": {"id_prefix": "x-"}}, r"'unregistered' is the metrics"),
    ],
)
def test_ambiguous_or_empty_prefixes_are_refused(tmp_path, daemons, error):
    with pytest.raises(ConfigError, match=error):
        _load(tmp_path, daemons)


@pytest.mark.parametrize(
    ("daemon_id", "error"),
    [
        ("kynara-agent", r"is a family of daemons"),
        (POD_A, r"is not registered \(daemons\.kynara-agent\.id_prefix matches it"),
    ],
)
def test_a_pull_names_an_exact_id(tmp_path, daemon_id, error):
    secret = tmp_path / "secret"
    secret.write_text("s" * 32)
    pull = {
        "daemon_id": daemon_id,
        "target": f"unix://{tmp_path / 'admin.sock'}",
        "credential_file": str(secret),
    }
    with pytest.raises(ConfigError, match=error):
        _load(tmp_path, {"kynara-agent": dict(FAMILY)}, pull=[pull])
