"""``kynara-collector directory sync`` end to end: an independent SCIM
server as the identity provider (scim2-server's in-memory ASGI application
under uvicorn on 127.0.0.1, seeded over HTTP), a running collector whose
SCIM endpoint is the target, and the signed directory it publishes to its
dir:// store read back and verified."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import pathlib
import signal
import ssl
import subprocess
import sys
import threading
import time
import unicodedata
from collections.abc import Callable
from typing import Any

import httpx2
import pytest
import uvicorn
import yaml
from prometheus_client.parser import text_string_to_metric_families
from scim2_models import ScimProvider, UnauthorizedException
from scim2_server.applications.asgi import ASGIApplication
from scim2_server.memory import AsyncInMemoryStorage, InMemoryStorage
from scim2_server.requests import ScimRequest
from scim2_server.utils import load_default_provider
from support import free_port
from tls_support import Authority, write_pair

from kynara_sidecar.audit.keys import generate_key, save_signing_key
from kynara_sidecar.collector.config import (
    HttpConfig,
    load_collector_config,
)
from kynara_sidecar.collector.dirsync import (
    EXIT_PARTIAL,
    DirectorySyncError,
    Endpoint,
    ResourceRefused,
    config_endpoints,
    default_target_url,
    keep_member_types,
    member_ids,
    order_renames,
    plan_resources,
    refusal_remedy,
    run_schedule,
    sync_command,
    sync_directory,
)
from kynara_sidecar.collector.metrics import DirectorySyncMetrics
from kynara_sidecar.collector.scim import KYNARA_EXTENSION, build_provider
from kynara_sidecar.config import TlsConfig
from kynara_sidecar.errors import ConfigError
from kynara_sidecar.sync import open_store
from kynara_sidecar.sync.directory import verify_directory_update

# Bounded waits on a condition, never a blind sleep.
WAIT_SECONDS = 10.0
SOURCE_TOKEN = "idp-source-token-0123456789"
TARGET_TOKEN = "collector-scim-pull-0123456789"
CORE_USER = "urn:ietf:params:scim:schemas:core:2.0:User"
ENTERPRISE_USER = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
CORE_GROUP = "urn:ietf:params:scim:schemas:core:2.0:Group"
GROUP_ROLES = {"Support Engineers": ["support_agent"], "Finance": ["finance_viewer"]}


class _IdentityProvider(ASGIApplication):
    """scim2-server's ASGI application behind a bearer token, noting the
    query of each list request (to see the pages asked for); ``paging``
    alters the list answers of one path, as a source that pages wrongly."""

    def __init__(self, token: str, provider: ScimProvider):
        super().__init__(AsyncInMemoryStorage(InMemoryStorage()), provider)
        self.token = token
        self.list_queries: list[dict[str, str]] = []
        self.paging: Paging | None = None

    def check_auth(self, request: ScimRequest) -> None:
        if request.header("Authorization") != f"Bearer {self.token}":
            raise UnauthorizedException

    async def dispatch_request(self, request: ScimRequest):
        listing = request.method == "GET" and request.path in ("/Users", "/Groups")
        if listing:
            self.list_queries.append({"path": request.path, **request.query})
        paging = self.paging if listing else None
        if paging is None or paging.path != request.path:
            return await super().dispatch_request(request)
        asked = dict(request.query)
        query = paging.query(dict(asked))
        response = await super().dispatch_request(
            dataclasses.replace(request, query=query)
        )
        response.body = paging.body(asked, dict(response.body or {}))
        return response


@dataclasses.dataclass
class Paging:
    """How a source pages wrongly: the query it serves instead of the one
    asked, and its answer altered (given the query asked)."""

    path: str = "/Users"
    query: Callable[[dict[str, str]], dict[str, str]] = lambda query: query
    body: Callable[[dict[str, str], dict[str, Any]], dict[str, Any]] = (
        lambda _asked, body: body
    )


class Source:
    """The identity provider on 127.0.0.1 (uvicorn on a thread of its own),
    seeded and changed over HTTP; stop() is idempotent."""

    def __init__(self, provider: ScimProvider, token: str = SOURCE_TOKEN):
        self.app = _IdentityProvider(token, provider)
        self._server = uvicorn.Server(
            uvicorn.Config(
                self.app,
                host="127.0.0.1",
                port=0,
                log_level="warning",
                lifespan="off",
            )
        )
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + WAIT_SECONDS
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise AssertionError("the SCIM source never started")
            time.sleep(0.01)
        port = self._server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/v2"
        self.http = httpx2.Client(
            base_url=self.url + "/",
            headers={"Authorization": f"Bearer {token}"},
            timeout=WAIT_SECONDS,
        )

    def _send(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        reply = self.http.request(method, path, json=body)
        assert reply.status_code < 300, (method, path, reply.status_code, reply.text)
        return reply.json() if reply.content else {}

    def add_user(self, user_name: str, **attributes: Any) -> str:
        body = {"schemas": [CORE_USER], "userName": user_name, "active": True}
        return self._send("POST", "Users", {**body, **attributes})["id"]

    def add_group(self, name: str, members: list[str]) -> str:
        body = {
            "schemas": [CORE_GROUP],
            "displayName": name,
            "members": [{"value": m} for m in members],
        }
        return self._send("POST", "Groups", body)["id"]

    def change(self, kind: str, resource_id: str, **attributes: Any) -> None:
        current = self._send("GET", f"{kind}/{resource_id}")
        current.pop("meta", None)
        self._send("PUT", f"{kind}/{resource_id}", {**current, **attributes})

    def delete(self, kind: str, resource_id: str) -> None:
        self._send("DELETE", f"{kind}/{resource_id}")

    def stop(self) -> None:
        self.http.close()
        self._server.should_exit = True
        self._thread.join(WAIT_SECONDS)


@pytest.fixture
def source(request):
    """The identity provider: RFC 7643's schemas, or with ``kynara`` (an
    indirect parameter) the collector's own (the Kynara extension too)."""
    kynara = getattr(request, "param", "") == "kynara"
    started = Source(build_provider(200) if kynara else load_default_provider())
    yield started
    started.stop()


class Target:
    """A running collector serving SCIM, and what it publishes."""

    def __init__(
        self,
        running,
        config_path: pathlib.Path,
        key,
        store_url: str,
        ca_file: pathlib.Path | None = None,
    ):
        self.running = running
        self.config_path = config_path
        self.key = key
        self.store_url = store_url
        scheme = "https" if ca_file else "http"
        port = running.collector.http_port
        self.url = f"{scheme}://127.0.0.1:{port}/scim/v2"
        self.http = httpx2.Client(
            base_url=self.url + "/",
            headers={"Authorization": f"Bearer {TARGET_TOKEN}"},
            timeout=WAIT_SECONDS,
            verify=ssl.create_default_context(cafile=ca_file) if ca_file else True,
        )

    def resources(self, kind: str) -> list[dict[str, Any]]:
        reply = self.http.get(kind, params={"count": 200})
        assert reply.status_code == 200, reply.text
        return reply.json().get("Resources", [])

    def published(self) -> dict[str, dict[str, Any]]:
        """The principals of the current signed directory, by id."""

        async def read() -> bytes | None:
            store = open_store(self.store_url)
            await store.connect()
            try:
                entry = await store.current_directory()
            finally:
                await store.close()
            return entry.data if entry is not None else None

        data = asyncio.run(read())
        if data is None:
            return {}
        verified = verify_directory_update(data, {self.key.key_id: self.key.public()})
        principals = json.loads(verified.content)["principals"]
        return {p["id"]: p for p in principals}

    def wait_published(self, expected: dict[str, tuple[bool, list[str]]]) -> dict:
        """Wait (bounded) until the directory holds exactly ``expected``:
        principal id -> (active, roles)."""
        deadline = time.monotonic() + WAIT_SECONDS
        while True:
            found = self.published()
            seen = {k: (p["active"], p["roles"]) for k, p in found.items()}
            if seen == expected:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"published {seen}, expected {expected}")
            time.sleep(0.05)


@pytest.fixture
def target(tmp_path, start_collector, source):
    """A collector with SCIM on a free loopback port, its directory.pull
    naming ``source`` (the target derived from http.host and http.port)."""
    made = _start_target(tmp_path, start_collector, source)
    yield made
    made.http.close()


def _start_target(
    tmp_path: pathlib.Path,
    start_collector,
    source: Source,
    authority: Authority | None = None,
) -> Target:
    """The ``target`` fixture's collector; with ``authority``, http.tls on a
    certificate it issued (its CA in tmp_path/ca.pem)."""
    http: dict[str, Any] = {"port": free_port()}
    ca_file = None
    if authority is not None:
        http["tls"] = write_pair(tmp_path, authority.issue()).settings()
        ca_file = tmp_path / "ca.pem"
        ca_file.write_bytes(authority.pem)
    key = generate_key()
    save_signing_key(key, tmp_path / "directory.pem")
    (tmp_path / "source.token").write_text(SOURCE_TOKEN + "\n")
    (tmp_path / "target.token").write_text(TARGET_TOKEN + "\n")
    (tmp_path / "store").mkdir()
    store_url = f"dir://{tmp_path / 'store'}"
    config = {
        "store": {"url": store_url, "poll_seconds": 0.05},
        "archive": {"url": f"dir://{tmp_path / 'archive'}"},
        "state": {"path": str(tmp_path / "state"), "map_size": 1 << 24},
        "http": http,
        "scim": {
            "enabled": True,
            "path": str(tmp_path / "scim"),
            "map_size": 1 << 24,
            "credentials": {"pull": {"secret_file": str(tmp_path / "target.token")}},
            "group_roles": GROUP_ROLES,
        },
        "directory": {
            "signing_key": str(tmp_path / "directory.pem"),
            "pull": {
                "url": source.url,
                "token_file": str(tmp_path / "source.token"),
                "target_token_file": str(tmp_path / "target.token"),
                "page_size": 50,
            },
        },
    }
    path = tmp_path / "collector.yaml"
    path.write_text(yaml.safe_dump(config))
    return Target(start_collector(path), path, key, store_url, ca_file)


def _sync(target: Target, *overrides: str) -> dict[str, int]:
    """One run as the command makes it; the summary it printed."""
    config = load_collector_config(target.config_path, list(overrides))
    source, goal = config_endpoints(config)
    pull = config.directory.pull
    summary = asyncio.run(
        sync_directory(
            source, goal, page_size=pull.page_size, timeout=pull.timeout_seconds
        )
    )
    return summary.as_dict()


def _zero(**counts: int) -> dict[str, int]:
    keys = ("users", "groups")
    out = {f"{k}_{what}": 0 for k in keys for what in ("created", "updated", "deleted")}
    return {**out, "members_unknown": 0, "skipped": 0, **counts}


def _seed(source: Source) -> dict[str, str]:
    ids = {
        "alice": source.add_user("alice", displayName="Alice Liddell"),
        "bob": source.add_user("bob"),
        "carol": source.add_user(
            "carol", emails=[{"value": "carol@example.com", "primary": True}]
        ),
    }
    ids["support"] = source.add_group("Support Engineers", [ids["alice"], ids["bob"]])
    ids["finance"] = source.add_group("Finance", [ids["carol"]])
    return ids


def test_first_sync_creates_all_and_a_second_changes_nothing(source, target, capsys):
    _seed(source)

    config = load_collector_config(target.config_path)
    assert sync_command(config, once=True, every=None) == 0
    first = json.loads(capsys.readouterr().out)
    versions = {r["id"]: r["meta"]["version"] for r in target.resources("Users")}
    second = _sync(target)

    assert first == _zero(users_created=3, groups_created=2)
    published = target.wait_published(
        {
            "alice": (True, ["support_agent"]),
            "bob": (True, ["support_agent"]),
            "carol": (True, ["finance_viewer"]),
        }
    )
    assert published["carol"]["attributes"]["email"] == "carol@example.com"
    assert published["alice"]["attributes"]["display_name"] == "Alice Liddell"
    assert second == _zero()
    assert {r["id"]: r["meta"]["version"] for r in target.resources("Users")} == (
        versions
    )


def test_deactivated_removed_and_renamed_users_follow_the_source(source, target):
    ids = _seed(source)
    _sync(target)

    source.change("Users", ids["alice"], active=False)
    source.delete("Users", ids["bob"])
    source.change("Users", ids["carol"], userName="carol.smith")
    summary = _sync(target)

    # scim2-server keeps a deleted user among a group's members: the source
    # names a member it does not serve, which is left out. The target's
    # group loses bob by the sync's replace unless its own delete took him
    # out already.
    assert summary["groups_updated"] in (0, 1)
    assert summary == _zero(
        users_updated=2,
        users_deleted=1,
        members_unknown=1,
        groups_updated=summary["groups_updated"],
    )
    alice = next(r["id"] for r in target.resources("Users") if r["userName"] == "alice")
    support = next(
        r for r in target.resources("Groups") if r["displayName"] == "Support Engineers"
    )
    assert [m["value"] for m in support["members"]] == [alice]
    target.wait_published(
        {
            "alice": (False, ["support_agent"]),
            "carol.smith": (True, ["finance_viewer"]),
        }
    )
    assert _sync(target) == _zero(members_unknown=1)


def test_group_membership_changes_move_roles(source, target):
    ids = _seed(source)
    _sync(target)

    source.change(
        "Groups",
        ids["support"],
        members=[{"value": ids["bob"]}, {"value": ids["carol"]}],
    )
    source.delete("Groups", ids["finance"])
    summary = _sync(target)

    assert summary == _zero(groups_updated=1, groups_deleted=1)
    target.wait_published(
        {
            "alice": (True, []),
            "bob": (True, ["support_agent"]),
            "carol": (True, ["support_agent"]),
        }
    )


@pytest.mark.parametrize("source", ["kynara"], indirect=True)
def test_agents_and_managers_come_across_with_their_extensions(source, target):
    dana = source.add_user("dana")
    source.add_user(
        "refund-bot",
        schemas=[CORE_USER, KYNARA_EXTENSION, ENTERPRISE_USER],
        **{
            KYNARA_EXTENSION: {"kind": "agent", "owner": "payments"},
            ENTERPRISE_USER: {
                "department": "Support",
                "manager": {"value": dana, "$ref": f"{source.url}/Users/{dana}"},
            },
        },
    )

    first = _sync(target)
    second = _sync(target)

    assert first == _zero(users_created=2)
    assert second == _zero()
    bot = target.wait_published({"dana": (True, []), "refund-bot": (True, [])})[
        "refund-bot"
    ]
    assert bot["kind"] == "agent"
    assert bot["attributes"]["manager"] == "dana"
    assert bot["attributes"]["department"] == "Support"
    assert bot["attributes"]["owner"] == "payments"


def test_more_users_than_a_page_are_read_page_by_page(source, target):
    names = [f"user{i:02d}" for i in range(23)]
    ids = [source.add_user(name) for name in names]
    source.add_group("Support Engineers", ids[::2])

    first = _sync(target, "directory.pull.page_size=5")
    second = _sync(target, "directory.pull.page_size=5")

    assert first == _zero(users_created=23, groups_created=1)
    assert second == _zero()
    assert sorted(r["userName"] for r in target.resources("Users")) == names
    pages = [q for q in source.app.list_queries if q["path"] == "/Users"]
    assert {q["count"] for q in pages} == {"5"}
    # 23 users in pages of 5 and the empty page past the end, read twice.
    assert sorted(int(q["startIndex"]) for q in pages) == sorted(
        [1, 6, 11, 16, 21, 24] * 2
    )
    target.wait_published(
        {
            name: (True, ["support_agent"] if i % 2 == 0 else [])
            for i, name in enumerate(names)
        }
    )


def test_resources_without_external_id_are_adopted_by_name_or_left_alone(
    source, target
):
    source.add_user("alice")
    pushed = {"schemas": [CORE_USER], "userName": "pushed-by-hand", "active": True}
    twin = {"schemas": [CORE_USER], "userName": "ALICE", "active": True}
    for body in (pushed, twin):
        assert target.http.post("Users", json=body).status_code == 201

    summary = _sync(target)

    assert summary == _zero(users_updated=1)
    by_name = {r["userName"]: r for r in target.resources("Users")}
    assert set(by_name) == {"alice", "pushed-by-hand"}
    assert "externalId" not in by_name["pushed-by-hand"]
    assert by_name["alice"]["externalId"]


def test_a_tls_target_is_trusted_through_target_ca_file(
    tmp_path, start_collector, source
):
    made = _start_target(tmp_path, start_collector, source, Authority("http-ca"))
    source.add_user("alice")

    with pytest.raises(DirectorySyncError) as refused:
        _sync(made)
    trusted = _sync(made, f"directory.pull.target_ca_file={tmp_path / 'ca.pem'}")
    made.http.close()

    assert str(refused.value).startswith(
        f"target {made.url}: discover the service failed: "
    )
    assert "CERTIFICATE_VERIFY_FAILED" in str(refused.value)
    assert trusted == _zero(users_created=1)


def _command(config: pathlib.Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kynara_sidecar.collector.cli",
            "directory",
            "sync",
            "--config",
            str(config),
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("case", ["source", "target", "target-not-restarted"])
def test_a_bad_token_fails_naming_the_endpoint_and_the_scim_error(
    source, target, tmp_path, case
):
    """A 401 names the endpoint and the SCIM error; from the collector's own
    endpoint, the fix too, and a token in none of scim.credentials' files
    is pointed out before any call ("target"). In "target-not-restarted"
    the credential's file holds the token but the running collector read
    an older secret at start."""
    side = case.partition("-")[0]
    args = ["--once"]
    if case == "target":
        (tmp_path / "other.token").write_text("not-the-token-0123456789")
        args += ["--set", f"directory.pull.target_token_file={tmp_path}/other.token"]
    else:
        (tmp_path / f"{side}.token").write_text("not-the-token-0123456789")

    process = _command(target.config_path, *args)
    stdout, stderr = process.communicate(timeout=60)

    url = source.url if side == "source" else target.url
    assert process.returncode == 1, stderr
    assert stdout == ""
    assert f"kynara-collector directory: {side} {url}: " in stderr
    assert "failed: SCIM error 401" in stderr
    assert target.resources("Users") == []
    warned = "directory sync target token is not a scim.credentials secret"
    fix = "add directory.pull.target_token_file's secret to scim.credentials"
    error_line = stderr.splitlines()[-1]
    if case == "target":
        assert stderr.index(warned) < stderr.index("SCIM error 401")
    else:
        assert warned not in stderr
    if side == "target":
        assert fix in error_line and "restart the collector" in error_line
    else:
        assert fix not in stderr
        assert "the source does not take directory.pull.token_file's" in error_line


def test_every_runs_until_sigterm_then_stops_cleanly(source, target):
    _seed(source)
    process = _command(target.config_path, "--every", "1")
    synced = []
    try:
        for line in process.stderr:
            entry = json.loads(line)
            if entry["msg"] == "directory synced":
                synced.append(entry)
            if len(synced) == 2:
                break
        process.send_signal(signal.SIGTERM)
        _, rest = process.communicate(timeout=WAIT_SECONDS * 3)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(WAIT_SECONDS)

    assert process.returncode == 0, rest
    assert [e["users_created"] for e in synced] == [3, 0]
    assert synced[0]["source"] == source.url
    assert json.loads(rest.splitlines()[-1])["msg"] == "directory sync stopped"


def test_a_failed_scheduled_run_is_logged_and_retried(source, target, caplog):
    _seed(source)
    good = config_endpoints(load_collector_config(target.config_path))
    bad = (Endpoint("source", source.url, "wrong-token-0123456789"), good[1])
    stop = asyncio.Event()
    calls = []

    def endpoints():
        calls.append(len(calls))
        if len(calls) == 3:
            stop.set()
        return bad if len(calls) == 1 else good

    metrics = DirectorySyncMetrics()

    with caplog.at_level(logging.INFO, logger="kynara.collector"):
        failed = asyncio.run(
            run_schedule(
                endpoints,
                interval=0.01,
                page_size=10,
                timeout=10,
                stop=stop,
                metrics=metrics,
            )
        )

    assert failed == 1
    # The third run starts as the stop is set: cancelled, not counted.
    assert _runs(metrics) == {"ok": 1, "partial": 0, "failed": 1}
    assert _sample(metrics, "resources_total", kind="user", action="created") == 3
    # The collector runs in this process too: its lines are left out.
    records = [r for r in caplog.records if r.module == "dirsync"]
    messages = [r.getMessage() for r in records]
    assert messages[:3] == [
        "directory sync started",
        "directory sync failed",
        "directory synced",
    ]
    assert messages[-1] == "directory sync stopped"
    error = records[1].fields["error"]
    assert error.startswith(f"source {source.url}: discover the service failed")
    assert len(target.resources("Users")) == 3


def _sample(metrics: DirectorySyncMetrics, name: str, **labels: str) -> float | None:
    full = f"kynara_collector_directory_sync_{name}"
    return metrics.registry.get_sample_value(full, labels)


def _runs(metrics: DirectorySyncMetrics) -> dict[str, float | None]:
    return {
        outcome: _sample(metrics, "runs_total", outcome=outcome)
        for outcome in ("ok", "partial", "failed")
    }


def test_a_partial_scheduled_run_counts_what_it_skipped_by_kind(source, target):
    source.add_user("alice")
    source.add_user("John Smith")  # a space: no principal id
    good = config_endpoints(load_collector_config(target.config_path))
    stop = asyncio.Event()
    calls = []

    def endpoints():
        calls.append(len(calls))
        if len(calls) == 2:
            stop.set()
        return good

    metrics = DirectorySyncMetrics()

    asyncio.run(
        run_schedule(
            endpoints, interval=0.01, page_size=10, timeout=10, stop=stop,
            metrics=metrics,
        )
    )  # fmt: skip

    # The stop is set as the second run starts: it is cancelled, not counted.
    assert _runs(metrics) == {"ok": 0, "partial": 1, "failed": 0}
    written = {
        (kind, action): _sample(metrics, "resources_total", kind=kind, action=action)
        for kind in ("user", "group")
        for action in ("created", "updated", "deleted", "skipped")
    }
    assert written == {
        **dict.fromkeys(written, 0.0),
        ("user", "created"): 1.0,
        ("user", "skipped"): 1.0,
    }
    assert _sample(metrics, "last_success_timestamp_seconds") > 0
    assert _sample(metrics, "last_duration_seconds") > 0


def _scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The samples of a /metrics page, by name and sorted labels."""
    reply = httpx2.get(url, timeout=WAIT_SECONDS)
    assert reply.status_code == 200, reply.text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(reply.text)
        for sample in family.samples
    }


def test_every_serves_metrics_of_its_runs_on_loopback(source, target, tmp_path):
    ids = _seed(source)
    port = free_port()
    config = tmp_path / "collector.yaml"
    settings = yaml.safe_load(config.read_text())
    settings["directory"]["pull"]["metrics_port"] = port
    config.write_text(yaml.safe_dump(settings))
    url = f"http://127.0.0.1:{port}/metrics"
    prefix = "kynara_collector_directory_sync"

    def runs(samples, outcome: str) -> float:
        return samples.get((f"{prefix}_runs_total", (("outcome", outcome),)), 0.0)

    def written(samples, kind: str, action: str) -> float | None:
        labels = (("action", action), ("kind", kind))
        return samples.get((f"{prefix}_resources_total", labels))

    def wait(condition: Callable[[dict], bool]) -> dict:
        """Scrape until ``condition`` holds (bounded); the last scrape."""
        deadline = time.monotonic() + WAIT_SECONDS * 3
        while True:
            try:
                samples = _scrape(url)
            except httpx2.TransportError:  # not listening yet
                samples = {}
            if samples and condition(samples):
                return samples
            if time.monotonic() > deadline or process.poll() is not None:
                raise AssertionError(f"never held; last scrape {samples}")
            time.sleep(0.05)

    process = _command(config, "--every", "1")
    try:
        first = wait(lambda s: runs(s, "ok") >= 1)
        source.change("Users", ids["alice"], active=False)
        second = wait(lambda s: written(s, "user", "updated") == 1)
        process.send_signal(signal.SIGTERM)
        _, rest = process.communicate(timeout=WAIT_SECONDS * 3)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(WAIT_SECONDS)

    assert process.returncode == 0, rest
    assert written(first, "user", "created") == 3
    assert written(first, "group", "created") == 2
    assert runs(second, "ok") >= 2
    assert runs(second, "partial") == runs(second, "failed") == 0
    assert {
        (kind, action): written(second, kind, action)
        for kind in ("user", "group")
        for action in ("created", "updated", "deleted", "skipped")
    } == {
        ("user", "created"): 3,
        ("user", "updated"): 1,
        ("user", "deleted"): 0,
        ("user", "skipped"): 0,
        ("group", "created"): 2,
        ("group", "updated"): 0,
        ("group", "deleted"): 0,
        ("group", "skipped"): 0,
    }
    ended = second[(f"{prefix}_last_success_timestamp_seconds", ())]
    assert first[(f"{prefix}_last_success_timestamp_seconds", ())] < ended
    assert ended <= time.time()
    assert second[(f"{prefix}_last_duration_seconds", ())] > 0
    assert not any(name.endswith("_created") for name, _ in second)
    target.wait_published(
        {
            "alice": (False, ["support_agent"]),
            "bob": (True, ["support_agent"]),
            "carol": (True, ["finance_viewer"]),
        }
    )


# -- a source that pages wrongly, a target that refuses ------------------


def _with(body: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {**body, **changes}


def _without_total(_asked, body):
    body.pop("totalResults", None)
    return body


def _later_pages_empty(asked, body):
    return body if asked.get("startIndex") == "1" else _with(body, Resources=[])


WRONG_PAGING = {
    "total_too_small": Paging(body=lambda _a, body: _with(body, totalResults=2)),
    "start_index_ignored": Paging(query=lambda q: {**q, "startIndex": "1"}),
    "second_page_empty": Paging(body=_later_pages_empty),
    "total_missing": Paging(body=_without_total),
    "total_negative": Paging(body=lambda _a, body: _with(body, totalResults=-1)),
    "page_larger_than_asked": Paging(query=lambda q: {**q, "count": "4"}),
    "groups_second_page_empty": Paging(path="/Groups", body=_later_pages_empty),
}


@pytest.mark.parametrize("paging", sorted(WRONG_PAGING))
def test_a_source_that_pages_wrongly_fails_the_run_before_any_write(
    source, target, paging
):
    names = [f"u{i}" for i in range(1, 6)]
    ids = [source.add_user(name) for name in names]
    for name in ("g1", "g2", "g3"):
        source.add_group(name, ids[:2])
    assert _sync(target, "directory.pull.page_size=2") == _zero(
        users_created=5, groups_created=3
    )
    source.change("Users", ids[0], userName="u1-renamed")
    source.app.paging = WRONG_PAGING[paging]
    kind = source.app.paging.path

    with pytest.raises(DirectorySyncError) as failed:
        _sync(target, "directory.pull.page_size=2")

    message = str(failed.value)
    assert message.startswith(f"source {source.url}: GET {kind}?startIndex="), message
    assert sorted(r["userName"] for r in target.resources("Users")) == names
    assert len(target.resources("Groups")) == 3


def test_a_source_ignoring_start_index_is_not_read_to_its_total(source, target):
    for name in ("u1", "u2", "u3"):
        source.add_user(name)
    source.app.paging = Paging(
        query=lambda q: {**q, "startIndex": "1"},
        body=lambda _a, body: _with(body, totalResults=50_000),
    )

    with pytest.raises(DirectorySyncError) as failed:
        _sync(target, "directory.pull.page_size=2")

    assert "got no User not seen before" in str(failed.value)
    assert [q["startIndex"] for q in source.app.list_queries] == ["1", "3"]
    assert target.resources("Users") == []


def test_a_source_listing_more_than_max_resources_fails_at_the_first_page(
    source, target
):
    for name in ("u1", "u2", "u3"):
        source.add_user(name)
    config = load_collector_config(
        target.config_path,
        ["directory.pull.max_resources=2", "directory.pull.page_size=2"],
    )

    with pytest.raises(DirectorySyncError) as failed:
        sync_command(config, once=True, every=None)

    assert str(failed.value).startswith(
        f"source {source.url}: GET /Users?startIndex=1&count=2 failed: "
        "totalResults 3 is above directory.pull.max_resources (2)"
    )
    assert len(source.app.list_queries) == 1
    assert target.resources("Users") == []


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("max_resources=0", r"max_resources: expected 1\.\.10000000, got 0"),
        ("max_resources=10000001", r"max_resources: expected 1\.\.10000000"),
        ("metrics_port=70000", r"metrics_port: expected 0\.\.65535"),
        ("max_delete_fraction=1.5", r"max_delete_fraction: expected 0\.\.1, got"),
        ("metrics_host=0.0.0.0", r"metrics_host: expected a loopback address"),
    ],
)
def test_pull_settings_out_of_range_are_refused(tmp_path, setting, expected):
    path = tmp_path / "collector.yaml"
    path.write_text("{}")

    with pytest.raises(ConfigError, match=rf"directory\.pull\.{expected}"):
        load_collector_config(path, [f"directory.pull.{setting}"])


def test_a_source_that_lost_most_users_fails_before_any_write_unless_forced(
    source, target, capsys
):
    # Eight users synced, then the source answers with one (a wrong tenant's
    # token, say): seven deletes are over half the owned users.
    ids = [source.add_user(f"user{i}") for i in range(8)]
    config = load_collector_config(target.config_path)
    assert sync_command(config, once=True, every=None) == 0
    capsys.readouterr()
    for user_id in ids[1:]:
        source.delete("Users", user_id)

    with pytest.raises(DirectorySyncError) as refused:
        sync_command(config, once=True, every=None)
    kept = sorted(r["userName"] for r in target.resources("Users"))
    with pytest.raises(ConfigError, match="--force: expected a single run"):
        sync_command(config, once=False, every=60, force=True)
    assert sync_command(config, once=True, every=None, force=True) == 0
    forced = json.loads(capsys.readouterr().out)

    message = str(refused.value)
    assert "directory.pull.max_delete_fraction (0.5)" in message
    assert "delete 7 of its 8 synced users" in message and "--force" in message
    assert kept == [f"user{i}" for i in range(8)]
    assert forced["users_deleted"] == 7
    assert [r["userName"] for r in target.resources("Users")] == ["user0"]


def test_a_run_deleting_a_handful_or_within_the_fraction_is_not_held_back(
    source, target
):
    ids = [source.add_user(f"user{i}") for i in range(4)]
    _sync(target)
    for user_id in ids[1:]:
        source.delete("Users", user_id)  # three of four: a handful
    handful = _sync(target)
    more = [source.add_user(f"more{i}") for i in range(11)]
    _sync(target)
    for user_id in more[:6]:
        source.delete("Users", user_id)  # six of twelve: the fraction, not over

    half = _sync(target)

    assert handful["users_deleted"] == 3
    assert half["users_deleted"] == 6
    assert len(target.resources("Users")) == 6


def test_a_user_the_target_refuses_is_skipped_and_groups_still_apply(
    source, target, capsys, caplog
):
    alice = source.add_user("alice")
    john = source.add_user("John Smith")  # a space: no principal id
    bob = source.add_user("bob")
    support = source.add_group("Support Engineers", [alice, john, bob])
    config = load_collector_config(target.config_path)

    with caplog.at_level(logging.INFO, logger="kynara.collector"):
        first_exit = sync_command(config, once=True, every=None)
        first = json.loads(capsys.readouterr().out)
        target.wait_published(
            {"alice": (True, ["support_agent"]), "bob": (True, ["support_agent"])}
        )
        source.change("Groups", support, members=[{"value": alice}, {"value": john}])
        second_exit = sync_command(config, once=True, every=None)
        second = json.loads(capsys.readouterr().out)

    assert first_exit == second_exit == EXIT_PARTIAL != 1
    assert first == _zero(users_created=2, groups_created=1, skipped=1)
    assert second == _zero(groups_updated=1, skipped=1)
    target.wait_published({"alice": (True, ["support_agent"]), "bob": (True, [])})
    skipped = [
        r
        for r in caplog.records
        if r.getMessage() == "directory sync skipped a resource"
    ]
    assert [r.levelname for r in skipped] == ["WARNING", "WARNING"]
    for record in skipped:
        assert record.fields["name"] == "John Smith"
        assert record.fields["external_id"] == john
        assert "SCIM error 400 (invalidValue)" in record.fields["error"]
        assert (record.fields["status"], record.fields["scim_type"]) == (
            400,
            "invalidValue",
        )
        assert "userName" in record.fields["detail"]
        assert record.fields["fix"].endswith("fix it at the source")


def test_a_refused_change_still_deactivates_a_user_the_source_made_inactive(
    source, target
):
    carol = source.add_user("carol")
    source.add_group("Finance", [carol])
    _sync(target)

    source.change("Users", carol, userName="Carol Smith", active=False)
    summary = _sync(target)

    assert summary == _zero(users_updated=1, skipped=1)
    (user,) = target.resources("Users")
    assert (user["userName"], user["active"]) == ("carol", False)
    target.wait_published({"carol": (False, ["finance_viewer"])})


def test_user_names_swapped_at_the_source_are_swapped_in_the_target(source, target):
    first = source.add_user("a1")
    second = source.add_user("b1")
    source.add_group("Support Engineers", [first])
    source.add_group("Finance", [second])
    _sync(target)

    source.change("Users", first, userName="tmp")
    source.change("Users", second, userName="a1")
    source.change("Users", first, userName="b1")
    summary = _sync(target)

    assert summary == _zero(users_updated=2)
    by_external = {r["externalId"]: r["userName"] for r in target.resources("Users")}
    assert by_external == {first: "b1", second: "a1"}
    target.wait_published(
        {"a1": (True, ["finance_viewer"]), "b1": (True, ["support_agent"])}
    )
    assert _sync(target) == _zero()


def test_a_decomposed_source_name_adopts_the_composed_target_user(source, target):
    composed = "zo\u00eb"
    decomposed = unicodedata.normalize("NFD", composed)
    assert decomposed != composed
    source.add_user(decomposed)
    pushed = {"schemas": [CORE_USER], "userName": composed, "active": True}
    assert target.http.post("Users", json=pushed).status_code == 201

    summary = _sync(target)

    assert summary == _zero(users_updated=1)
    (user,) = target.resources("Users")
    assert user["externalId"]
    target.wait_published({composed: (True, [])})


# -- planning and settings, no server ------------------------------------


def test_plan_leaves_target_resources_without_external_id_alone():
    def desired(user):
        return {"userName": user["userName"], "externalId": user["id"]}

    def same(resource):
        return (resource["userName"], resource.get("externalId"))

    target = [
        {"id": "t1", "userName": "alice", "externalId": "s1"},
        {"id": "t2", "userName": "gone", "externalId": "s9", "meta": {"version": "v2"}},
        {"id": "t3", "userName": "pushed"},
        {"id": "t4", "userName": "Bob"},
    ]
    source = [{"id": "s1", "userName": "alice"}, {"id": "s2", "userName": "bob"}]

    plan = plan_resources("User", source, target, desired, same)

    assert plan.create == []
    assert plan.delete == [("t2", "v2")]
    assert plan.replace == [({"userName": "bob", "externalId": "s2", "id": "t4"}, "")]
    assert plan.matched == {"s1": "t1", "s2": "t4"}


def test_members_are_translated_to_target_ids_and_unknown_ones_counted():
    users = {"su1": "tu1", "su2": "tu2"}
    groups = {"sg1": "tg1"}
    members = [
        {"value": "su2"},
        {"value": "sg1", "type": "Group"},
        {"value": "su1", "type": "User"},
        {"value": "su1", "type": "Group"},  # a user named as a group
        {"value": "gone"},
    ]

    translated, unknown = member_ids(members, users, groups)

    assert translated == [
        {"value": "tg1", "type": "Group"},
        {"value": "tu1", "type": "User"},
        {"value": "tu2", "type": "User"},
    ]
    assert unknown == 2


def _renames(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"id": rid, "userName": name} for rid, name in pairs]


def _temporary(name: str) -> str:
    return f"{name}~tmp"


def test_renames_are_ordered_to_free_each_name_before_it_is_taken():
    names = {"t1": "a1", "t2": "b1", "t3": "c1", "t4": "d1", "t5": "x"}
    # t1 -> t2 -> t3 -> t1 is a cycle; t4 takes a name t5 frees.
    replace = _renames(("t1", "B1"), ("t2", "c1"), ("t3", "a1"), ("t4", "x"))
    replace.append({"id": "t5", "userName": "y"})

    steps = order_renames(replace, names, _temporary)

    assert [(p["id"], p["userName"], temp) for p, temp in steps] == [
        ("t5", "y", False),
        ("t4", "x", False),
        ("t1", "a1~tmp", True),
        ("t3", "a1", False),
        ("t2", "c1", False),
        ("t1", "B1", False),
    ]


def test_a_case_only_rename_waits_for_no_one_and_a_taken_name_is_left_to_the_end():
    names = {"t1": "alice", "t2": "bob", "t3": "carol"}
    replace = _renames(("t2", "CAROL"), ("t1", "Alice"))

    steps = order_renames(replace, names, _temporary)

    # carol (t3) is not renamed: t2's write is the target's to refuse.
    assert [(p["id"], p["userName"], temp) for p, temp in steps] == [
        ("t1", "Alice", False),
        ("t2", "CAROL", False),
    ]


@pytest.mark.parametrize(
    ("key", "url"),
    [
        ("url", "http://idp.example.com/scim/v2"),
        ("target_url", "http://10.0.0.7:9465/scim/v2"),
        ("url", "ftp://127.0.0.1/scim"),
    ],
)
def test_plaintext_off_loopback_and_other_schemes_are_refused(tmp_path, key, url):
    path = tmp_path / "collector.yaml"
    pull = {"url": "https://idp.example.com/scim/v2", "token_file": "t"}
    path.write_text(yaml.safe_dump({"directory": {"pull": {**pull, key: url}}}))

    with pytest.raises(ConfigError, match=rf"directory\.pull\.{key}: expected"):
        load_collector_config(path, ["directory.pull.target_token_file=t"])


def test_the_target_defaults_to_the_collectors_own_endpoint():
    tls = TlsConfig(cert_file="c.pem", key_file="k.pem")

    assert default_target_url(HttpConfig(port=9465)) == (
        "http://127.0.0.1:9465/scim/v2"
    )
    assert default_target_url(HttpConfig(host="::", port=443, tls=tls)) == (
        "https://[::1]:443/scim/v2"
    )
    with pytest.raises(ConfigError, match=r"directory\.pull\.target_url: .*port is 0"):
        default_target_url(HttpConfig(port=0))


def test_every_outside_its_bounds_is_refused(tmp_path):
    path = tmp_path / "collector.yaml"
    path.write_text("{}")

    with pytest.raises(ConfigError, match=r"--every: expected 1\.\.86400 seconds"):
        sync_command(load_collector_config(path), once=False, every=0.5)


def test_a_pushed_group_without_member_types_is_adopted_and_loses_a_member(
    source, target, caplog
):
    """Many IdPs push members without ``type``, which the target keeps as
    stored (immutable): the sync's replace must not set it, or every run
    is refused and a role revocation never happens."""
    pushed = {}
    for name in ("alice", "carol"):
        body = {"schemas": [CORE_USER], "userName": name, "active": True}
        reply = target.http.post("Users", json=body)
        assert reply.status_code == 201, reply.text
        pushed[name] = reply.json()["id"]
    group = {
        "schemas": [CORE_GROUP],
        "displayName": "Finance",
        "members": [{"value": pushed["alice"]}, {"value": pushed["carol"]}],
    }
    assert target.http.post("Groups", json=group).status_code == 201
    target.wait_published(
        {"alice": (True, ["finance_viewer"]), "carol": (True, ["finance_viewer"])}
    )
    alice = source.add_user("alice")
    source.add_group("Finance", [alice])

    with caplog.at_level(logging.WARNING, logger="kynara.collector"):
        first = _sync(target)
    second = _sync(target)

    assert first == _zero(users_updated=1, groups_updated=1)
    assert second == _zero()
    assert [r.getMessage() for r in caplog.records] == []
    (finance,) = target.resources("Groups")
    assert [m["value"] for m in finance["members"]] == [pushed["alice"]]
    target.wait_published({"alice": (True, ["finance_viewer"]), "carol": (True, [])})


def test_member_types_the_target_stored_are_kept_and_new_members_typed():
    stored = {
        "members": [
            {"value": "t-alice"},
            {"value": "t-bob", "type": "User"},
            {"value": "t-gone", "type": "User"},
        ]
    }
    payload = {
        "displayName": "Finance",
        "members": [
            {"value": "t-alice", "type": "User"},
            {"value": "t-bob", "type": "User"},
            {"value": "t-new", "type": "User"},
        ],
    }

    kept = keep_member_types(payload, stored)

    assert kept["members"] == [
        {"value": "t-alice"},
        {"value": "t-bob", "type": "User"},
        {"value": "t-new", "type": "User"},
    ]
    assert payload["members"][0] == {"value": "t-alice", "type": "User"}


@pytest.mark.parametrize(
    ("status", "scim_type", "expected"),
    [
        (400, "mutability", "correct or delete that copy in the target"),
        (409, "uniqueness", "another resource in the target holds this name"),
        (412, "", "the next run retries"),
        (400, "invalidValue", "fix it at the source"),
        (0, "", "fix it at the source"),
    ],
)
def test_a_refusal_says_where_to_fix_it(status, scim_type, expected):
    refused = ResourceRefused("x", status=status, scim_type=scim_type, detail="d")

    assert expected in refusal_remedy(refused)
