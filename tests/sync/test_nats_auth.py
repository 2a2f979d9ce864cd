"""The central store over TLS with credentials, and per-daemon permissions,
against a real nats-server on loopback (certificates from a test CA)."""

from __future__ import annotations

import asyncio
import json
import pathlib
import re
import subprocess
import sys
import time

import pytest
import yaml
from nats_support import NatsServer
from server.test_admin_tls import Authority
from support import REPO_ROOT, SHIPPED_CONFIG, SHIPPED_POLICIES

from kynara_sidecar.audit.keys import generate_key
from kynara_sidecar.collector.config import load_collector_config
from kynara_sidecar.config import NatsConnectionConfig, load_config
from kynara_sidecar.decision import Timestamp
from kynara_sidecar.errors import ConfigError
from kynara_sidecar.sync import StoreUnavailable, daemon_token, open_store
from kynara_sidecar.sync.bundle import build_bundle, write_bundle
from kynara_sidecar.sync.nats_store import (
    REVIEWS_BUCKET,
    collector_permissions,
    daemon_permissions,
    publisher_permissions,
)

REPO = pathlib.Path(__file__).resolve().parents[2]
DAEMON_A, DAEMON_B = "support-bot-a", "support-bot-b"
# Refusals and bad credentials fail a call when its timeout runs out.
TIMEOUT = 1.0


def _secret(directory: pathlib.Path, name: str) -> str:
    path = directory / name
    path.write_text(f"{name}-0123456789abcdef\n")
    return str(path)


class Site:
    """A CA, the server's certificate, a client certificate and secret
    files, all in ``tmp_path``."""

    def __init__(self, tmp_path: pathlib.Path):
        self.dir = tmp_path / "site"
        self.dir.mkdir()
        self.ca = Authority("kynara-nats-ca")
        self.ca_file = self._write("ca.crt", self.ca.pem)
        cert, key, _ = self.ca.issue()
        self.server_cert = self._write("server.crt", cert)
        self.server_key = self._write("server.key", key)
        cert, key, _ = self.ca.issue()
        self.client_cert = self._write("client.crt", cert)
        self.client_key = self._write("client.key", key)
        self.passwords = {
            user: _secret(self.dir, user)
            for user in ("publisher", "collector", "a", "b")
        }

    def _write(self, name: str, data: bytes) -> str:
        path = self.dir / name
        path.write_bytes(data)
        return str(path)

    def password(self, user: str) -> str:
        return pathlib.Path(self.passwords[user]).read_text().strip()

    def tls_block(self, *, verify: bool = False) -> str:
        return (
            f"tls {{cert_file: {json.dumps(self.server_cert)}, "
            f"key_file: {json.dumps(self.server_key)}, "
            f"ca_file: {json.dumps(self.ca_file)}, "
            f"verify: {str(verify).lower()}, handshake_first: true}}\n"
        )

    def connection(self, user: str = "", **keys) -> NatsConnectionConfig:
        if user:
            keys.setdefault("password_file", self.passwords[user])
            keys["user"] = user
            keys.setdefault("inbox_prefix", f"_INBOX.{user}")
        return NatsConnectionConfig(ca_file=self.ca_file, **keys)


def _user(name: str, password: str, permissions: dict | None = None) -> str:
    entry = {"user": name, "password": password}
    if permissions is not None:
        entry["permissions"] = {
            "publish": {
                "allow": permissions["publish"],
                "deny": permissions.get("deny", []),
            },
            "subscribe": {"allow": permissions["subscribe"]},
        }
    return json.dumps(entry)


@pytest.fixture
def site(tmp_path):
    return Site(tmp_path)


@pytest.fixture
def fleet_server(tmp_path, site):
    """TLS and one user per daemon, limited to its own subjects; the
    collector's and the publisher's limited to what they need."""
    users = [
        _user(
            "publisher",
            site.password("publisher"),
            publisher_permissions("_INBOX.publisher"),
        ),
        _user(
            "collector",
            site.password("collector"),
            collector_permissions("_INBOX.collector"),
        ),
        _user("a", site.password("a"), daemon_permissions(DAEMON_A, "_INBOX.a")),
        _user("b", site.password("b"), daemon_permissions(DAEMON_B, "_INBOX.b")),
    ]
    config = (
        "jetstream {}\n"
        + site.tls_block()
        + f"authorization {{users: [{', '.join(users)}]}}\n"
    )
    server = NatsServer(tmp_path, config=config)
    yield server
    server.stop()


def _store(server: NatsServer, connection: NatsConnectionConfig):
    return open_store(server.url, timeout=TIMEOUT, nats=connection.load("sync.nats"))


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 60))


async def _connect_and_close(store) -> None:
    try:
        await store.connect()
    finally:
        await store.close()


async def _first(iterator):
    async for item in iterator:
        return item
    raise AssertionError("the iterator ended")


def test_a_daemon_ships_its_own_and_is_refused_under_another_daemons_name(
    fleet_server, site, caplog
):
    async def scenario():
        collector = _store(fleet_server, site.connection("collector"))
        await collector.connect()  # creates the stream and buckets
        publisher = _store(fleet_server, site.connection("publisher"))
        digest = await publisher.publish_bundle(b"bundle bytes")
        await publisher.close()
        with pytest.raises(StoreUnavailable, match="refused by the server"):
            await collector.publish_bundle(b"the collector's own bundle")
        await collector.put_review(DAEMON_A, "ap1", "rv1", b"review for a")
        daemon = _store(fleet_server, site.connection("a"))
        try:
            assert await daemon.ship_segment(DAEMON_A, "m1", b"segment") is True
            await daemon.put_status(DAEMON_A, b"{}")
            await daemon.put_approval(DAEMON_A, "ap1", b"approval")
            assert (await daemon.current_bundle()).digest == digest
            assert (await _first(daemon.watch_bundles())).digest == digest
            (review,) = await _first(daemon.watch_reviews(DAEMON_A))
            assert review.data == b"review for a"
            await daemon.drop_review(DAEMON_A, "ap1", "rv1")

            with pytest.raises(StoreUnavailable, match="refused by the server"):
                await daemon.ship_segment(DAEMON_B, "m2", b"forged")
            with pytest.raises(StoreUnavailable, match="refused by the server"):
                await daemon.put_status(DAEMON_B, b"{}")
            with pytest.raises(StoreUnavailable, match="refused by the server"):
                await daemon.put_approval(DAEMON_B, "ap1", b"forged")
            with pytest.raises(StoreUnavailable, match="refused by the server"):
                await daemon.publish_bundle(b"a bundle of its own")
            with pytest.raises(StoreUnavailable, match="refused by the server"):
                await daemon.approvals()
            # The collector still reads what the daemon shipped, and only that.
            delivery = await _first(collector.segments("kynara-collector"))
            assert (delivery.daemon_id, delivery.data) == (DAEMON_A, b"segment")
            assert set(await collector.statuses()) == {DAEMON_A}
            assert (await collector.current_bundle()).digest == digest
        finally:
            await daemon.close()
            await collector.close()

    run(scenario())

    token_b = daemon_token(DAEMON_B).lower()
    refused = [
        r for r in caplog.records if r.getMessage() == "store refused an operation"
    ]
    assert any(token_b in r.fields["error"] for r in refused)
    assert site.password("a") not in caplog.text


REFUSED = {
    "wrong-password": (
        lambda site: site.connection("a", password_file=_secret(site.dir, "wrong")),
        "authorization violation",
    ),
    "no-credentials": (lambda site: site.connection(), "authorization violation"),
    # The system's CAs do not know the test CA.
    "untrusted-server": (lambda site: NatsConnectionConfig(tls=True), ""),
    # The server speaks TLS first: a client waiting for its plaintext
    # INFO line, or speaking plaintext, hears nothing.
    "plaintext-info": (lambda site: site.connection("a", tls_first=False), ""),
    "plaintext": (lambda site: NatsConnectionConfig(), ""),
}


@pytest.mark.parametrize("case", REFUSED)
def test_a_client_without_the_right_credentials_or_tls_is_refused(
    fleet_server, site, case
):
    make, match = REFUSED[case]
    connection = make(site)

    async def scenario():
        store = _store(fleet_server, connection)
        try:
            await store.connect()
        finally:
            await store.close()

    with pytest.raises(StoreUnavailable, match=re.compile(match, re.I)):
        run(scenario())


def test_a_server_that_verifies_clients_takes_a_client_certificate(tmp_path, site):
    config = (
        "jetstream {}\n"
        + site.tls_block(verify=True)
        + f"authorization {{token: {json.dumps(site.password('collector'))}}}\n"
    )
    server = NatsServer(tmp_path, config=config)
    certificate = {"cert_file": site.client_cert, "key_file": site.client_key}
    token = {"token_file": site.passwords["collector"]}

    async def connect(connection: NatsConnectionConfig) -> bytes | None:
        store = _store(server, connection)
        try:
            await store.publish_bundle(b"by token over mutual TLS")
            return (await store.current_bundle()).data
        finally:
            await store.close()

    try:
        assert run(connect(site.connection(**certificate, **token))) == (
            b"by token over mutual TLS"
        )
        with pytest.raises(StoreUnavailable):
            run(connect(site.connection(**token)))
        with pytest.raises(StoreUnavailable, match="(?i)authorization violation"):
            run(connect(site.connection(**certificate)))
    finally:
        server.stop()


# ------------------------------------------------------------------ the config


def _daemon_config(tmp_path, *overrides: str):
    return load_config(
        SHIPPED_CONFIG, ["audit.path=" + str(tmp_path / "log"), *overrides]
    )


def test_an_off_loopback_store_without_tls_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"sync\.nats\.tls: expected TLS"):
        _daemon_config(tmp_path, "sync.store=nats://nats.example:4222")
    with pytest.raises(ConfigError, match=r"store\.nats\.tls: expected TLS"):
        load_collector_config(None, ["store.url=nats://10.0.0.7:4222"])


def test_the_daemon_and_the_collector_read_the_same_settings(tmp_path, site):
    keys = [
        f"nats.ca_file={site.ca_file}",
        "nats.user=a",
        f"nats.password_file={site.passwords['a']}",
        "nats.inbox_prefix=_INBOX.a",
    ]
    daemon = _daemon_config(
        tmp_path,
        "policy.source=nats://nats.example:4222",
        f"policy.trusted_keys=[{site.ca_file}]",
        *("sync." + key for key in keys),
    )
    collector = load_collector_config(
        None, ["store.url=nats://nats.example:4222", *("store." + k for k in keys)]
    )

    assert daemon.sync.nats == collector.store.nats
    loaded = daemon.sync.nats.load("sync.nats")
    assert (loaded.user, loaded.password) == ("a", site.password("a"))
    assert loaded.tls is not None and loaded.inbox_prefix == "_INBOX.a"
    assert site.password("a") not in repr(loaded)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["sync.nats.user=a"], r"sync\.nats\.password_file: expected a value"),
        (["sync.nats.password_file=/nonexistent"], r"sync\.nats\.user: expected"),
        (
            ["sync.nats.user=a", "sync.nats.password_file=/nonexistent/pw"],
            r"sync\.nats\.password_file: cannot read the secret",
        ),
        (["sync.nats.cert_file=/c.crt"], r"sync\.nats\.key_file: expected a path"),
        (["sync.nats.ca_file=/nonexistent/ca"], r"sync\.nats\.ca_file: cannot load"),
        (["sync.nats.inbox_prefix=_INBOX.*"], r"sync\.nats\.inbox_prefix: expected"),
        (
            [
                "sync.nats.token_file=/t",
                "sync.nats.user=a",
                "sync.nats.password_file=/p",
            ],
            r"sync\.nats\.token_file: expected a token or a user",
        ),
    ],
)
def test_bad_connection_settings_name_the_key(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        _daemon_config(tmp_path, "sync.store=nats://127.0.0.1:4222", *overrides)


def test_connection_settings_without_a_nats_store_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"sync\.nats: expected a nats:// store"):
        _daemon_config(tmp_path, "sync.store=dir:///tmp/store", "sync.nats.tls=true")


def test_the_example_server_config_grants_what_daemon_permissions_lists():
    text = (REPO / "config" / "nats-server.conf").read_text()
    (daemon_id,) = re.findall(r"daemon id: (\S+)", text)
    entry = text.split(f"daemon id: {daemon_id}", 1)[1]
    (prefix,) = re.findall(r'subscribe: \{allow: \["(\S+)\.>"\]\}', entry)
    publish = entry.split("publish:", 1)[1].split("subscribe:", 1)[0]
    allowed = re.findall(r'"([^"]+)"', publish)

    permissions = daemon_permissions(daemon_id, prefix)
    assert set(permissions["publish"]) == set(allowed)
    assert prefix == f"_INBOX.{daemon_id}"
    collector = collector_permissions("_INBOX.collector")
    for subject in collector["publish"] + collector["deny"]:
        assert f'"{subject}"' in text
    publisher = text.split("{user: publisher", 1)[1].split("subscribe:", 1)[0]
    assert set(re.findall(r'"([^"]+)"', publisher)) - {"REPLACE-publisher"} == set(
        publisher_permissions("_INBOX.publisher")["publish"]
    )


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kynara_sidecar.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
    )


def test_the_cli_publishes_and_reads_the_fleet_with_its_nats_settings(
    tmp_path, site, fleet_server
):
    key = generate_key()
    bundle_file = tmp_path / "b.tar"
    an_hour_ago = Timestamp(time.time_ns() // 1_000_000_000 - 3600)
    write_bundle(bundle_file, build_bundle(SHIPPED_POLICIES, key, an_hour_ago))
    settings = tmp_path / "publisher-nats.yaml"
    settings.write_text(
        yaml.safe_dump(
            {
                "ca_file": site.ca_file,
                "user": "publisher",
                "password_file": site.passwords["publisher"],
                "inbox_prefix": "_INBOX.publisher",
            }
        )
    )
    store = ["--store", fleet_server.url]
    # The collector creates the stream and buckets; the publisher may not.
    unready = _cli("bundle", "publish", bundle_file, *store, "--nats", settings)
    run(_connect_and_close(_store(fleet_server, site.connection("collector"))))

    plain = _cli("bundle", "publish", bundle_file, *store)
    published = _cli("bundle", "publish", bundle_file, *store, "--nats", settings)
    fleet = _cli("fleet", "status", *store, "--nats", settings, "--json")
    settings.write_text(yaml.safe_dump({"ca_file": site.ca_file, "users": "x"}))
    misspelt = _cli("fleet", "status", *store, "--nats", settings)

    assert unready.returncode != 0
    assert "stream.create" in unready.stderr
    assert plain.returncode != 0
    assert published.returncode == 0, published.stderr
    assert "ok: published" in published.stdout
    assert fleet.returncode == 0, fleet.stderr
    assert json.loads(fleet.stdout) == []
    assert misspelt.returncode != 0
    assert str(settings) in misspelt.stderr and "users" in misspelt.stderr


async def _api(store, subject: str, config: dict) -> dict | None:
    """A raw JetStream API request over ``store``'s connection, as a
    client other than Kynara's might send it: the server's answer, or
    None when the server refused the subject (no answer comes)."""
    import nats.errors

    await store.connect()
    request = {"stream_name": f"KV_{REVIEWS_BUCKET}", "config": config}
    try:
        reply = await store._nc.request(subject, json.dumps(request).encode(), 1.0)
    except nats.errors.TimeoutError:
        return None
    return json.loads(reply.data)


def test_a_daemon_watches_only_its_own_reviews(fleet_server, site):
    token_a, token_b = daemon_token(DAEMON_A), daemon_token(DAEMON_B)
    api = "$JS.API.CONSUMER.CREATE.KV_kynara_reviews"
    own = f"$KV.{REVIEWS_BUCKET}.{token_a}.>"
    other = f"$KV.{REVIEWS_BUCKET}.{token_b}.>"
    deliver = {"deliver_subject": "_INBOX.a.stolen", "ack_policy": "none"}

    async def scenario():
        collector = _store(fleet_server, site.connection("collector"))
        a = _store(fleet_server, site.connection("a"))
        b = _store(fleet_server, site.connection("b"))
        try:
            await collector.put_review(DAEMON_A, "ap1", "rv1", b"review for a")
            await collector.put_review(DAEMON_B, "ap2", "rv2", b"review for b")
            # Each daemon's own review flow works.
            assert [r.data for r in await a.reviews(DAEMON_A)] == [b"review for a"]
            (review,) = await _first(b.watch_reviews(DAEMON_B))
            assert review.data == b"review for b"
            # Kynara's own calls for another daemon's reviews are refused.
            with pytest.raises(StoreUnavailable, match="refused by the server"):
                await a.reviews(DAEMON_B)
            with pytest.raises(StoreUnavailable, match="refused by the server"):
                await _first(a.watch_reviews(DAEMON_B))
            # So is any other way to a consumer on B's keys: the unfiltered
            # and the durable create subjects are not allowed ...
            assert await _api(a, api, {"filter_subject": other, **deliver}) is None
            assert (
                await _api(
                    a,
                    f"{api.replace('CREATE', 'DURABLE.CREATE')}.x",
                    {"durable_name": "x", "filter_subject": other, **deliver},
                )
                is None
            )
            # ... and the server refuses a filter other than the one the
            # allowed subject names, single or several.
            for config in (
                {"filter_subject": other},
                {"filter_subjects": [other]},
                {"filter_subjects": [own, other]},
            ):
                answer = await _api(
                    a, f"{api}.x.{own}", {"name": "x", **config, **deliver}
                )
                # 10131: not the subject's filter; 10137: several filters.
                assert answer is not None, config
                assert answer["error"]["err_code"] in (10131, 10137), answer
            # The same request filtered to its own keys is taken.
            answer = await _api(
                a, f"{api}.y.{own}", {"name": "y", "filter_subject": own, **deliver}
            )
            assert answer is not None and "error" not in answer, answer
        finally:
            for store in (a, b, collector):
                await store.close()

    run(scenario())


def test_the_publisher_writes_bundles_only_and_the_collector_keeps_segments(
    fleet_server, site
):
    async def scenario():
        collector = _store(fleet_server, site.connection("collector"))
        publisher = _store(fleet_server, site.connection("publisher"))
        daemon = _store(fleet_server, site.connection("a"))
        try:
            await collector.connect()
            await daemon.ship_segment(DAEMON_A, "m1", b"segment")
            await daemon.put_status(DAEMON_A, b"{}")
            await publisher.publish_bundle(b"bundle bytes")
            assert set(await publisher.statuses()) == {DAEMON_A}
            for write in (
                publisher.ship_segment(DAEMON_A, "m2", b"forged"),
                publisher.put_status(DAEMON_A, b"{}"),
                publisher.put_approval(DAEMON_A, "ap1", b"forged"),
                publisher.put_review(DAEMON_A, "ap1", "rv1", b"forged"),
                publisher.reviews(DAEMON_A),
            ):
                with pytest.raises(StoreUnavailable, match="refused by the server"):
                    await write
            # The collector may not remove segment messages it has not read.
            await collector.connect()
            js = collector._js
            for remove in (
                js.purge_stream("KYNARA_SEGMENTS"),
                js.delete_msg("KYNARA_SEGMENTS", 1),
                js.delete_stream("KYNARA_SEGMENTS"),
            ):
                with pytest.raises(StoreUnavailable, match="refused by the server"):
                    await collector._bounded("remove", remove)
            delivery = await _first(collector.segments("kynara-collector"))
            assert (delivery.daemon_id, delivery.data) == (DAEMON_A, b"segment")
        finally:
            for store in (daemon, publisher, collector):
                await store.close()

    run(scenario())
