"""The collector's SCIM 2.0 service provider, over its real HTTP listener on
127.0.0.1, a real LMDB store and a dir:// central store: authentication,
CRUD, filters, PATCH, paging, ETags, durability across a restart, and the
signed directory each change publishes."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import logging
import pathlib
import subprocess
import sys
import threading
import time
import urllib.parse
from typing import Any

import pytest
import yaml

from kynara_sidecar.audit.keys import generate_key, load_signing_key, save_signing_key
from kynara_sidecar.collector.config import load_collector_config
from kynara_sidecar.collector.scim import (
    KYNARA_EXTENSION,
    DirectoryPublishing,
    ScimStore,
    build_provider,
)
from kynara_sidecar.errors import ConfigError
from kynara_sidecar.policy.loader import decode_document
from kynara_sidecar.sync import StoreUnavailable, open_store
from kynara_sidecar.sync.directory import (
    DIRECTORY_FILE,
    DirectoryError,
    DirectoryProblem,
    VerifiedDirectory,
    verify_directory_update,
)

from .test_collector import RunningCollector

SECRET = "scim-okta-secret-0123456789abcdef"
OTHER_SECRET = "scim-entra-secret-0123456789abcdef"
USER_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:User"
GROUP_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:Group"
PATCH_SCHEMA = "urn:ietf:params:scim:api:messages:2.0:PatchOp"
ERROR_SCHEMA = "urn:ietf:params:scim:api:messages:2.0:Error"
SEARCH_SCHEMA = "urn:ietf:params:scim:api:messages:2.0:SearchRequest"
ENTERPRISE = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
GROUP_ROLES = {"Support": ["support_agent"], "Finance": ["finance_viewer", "auditor"]}
WAIT_SECONDS = 10.0
CALL_TIMEOUT = 10.0


class Scim:
    """A SCIM collector and what its tests need: calls, the store, the key."""

    def __init__(self, tmp_path: pathlib.Path, **scim: Any):
        self.tmp_path = tmp_path
        self.store_root = tmp_path / "store"
        key_file = tmp_path / "directory.pem"
        if key_file.exists():
            # A second Scim over the same directory: the collector's key.
            self.key = load_signing_key(key_file)
        else:
            self.key = generate_key()
            save_signing_key(self.key, key_file)
        secret_file = tmp_path / "okta.secret"
        secret_file.write_text(SECRET + "\n")
        other_file = tmp_path / "entra.secret"
        other_file.write_text(OTHER_SECRET + "\n")
        config = {
            "archive": {"url": f"dir://{tmp_path / 'archive'}"},
            "state": {"path": str(tmp_path / "state"), "map_size": 1 << 26},
            "http": {"port": 0},
            "store": {
                "url": f"dir://{self.store_root}",
                "poll_seconds": 0.05,
                "retry_seconds": 0.05,
            },
            "directory": {"signing_key": str(key_file)},
            "scim": {
                "enabled": True,
                "path": str(tmp_path / "scim"),
                "map_size": 1 << 26,
                "credentials": {
                    "okta": {"secret_file": str(secret_file)},
                    "entra": {"secret_file": str(other_file)},
                },
                "group_roles": GROUP_ROLES,
                **scim,
            },
        }
        self.config_path = tmp_path / "collector.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.running: RunningCollector | None = None

    def start(self) -> Scim:
        self.running = RunningCollector(self.config_path)
        return self

    def stop(self) -> None:
        if self.running is not None:
            self.running.stop()

    @property
    def port(self) -> int:
        assert self.running is not None
        return self.running.collector.http_port

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = SECRET,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], Any]:
        """One request under /scim/v2; the JSON body decoded (None if empty)."""
        connection = http.client.HTTPConnection(
            "127.0.0.1", self.port, timeout=CALL_TIMEOUT
        )
        sent = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            sent["Content-Type"] = "application/scim+json"
        try:
            connection.request(method, "/scim/v2" + path, body=data, headers=sent)
            reply = connection.getresponse()
            raw = reply.read()
            return (
                reply.status,
                {k.lower(): v for k, v in reply.getheaders()},
                json.loads(raw) if raw else None,
            )
        finally:
            connection.close()

    def create_user(self, user_name: str, **fields: Any) -> dict:
        schemas = [USER_SCHEMA] + [key for key in fields if key.startswith("urn:")]
        status, _, body = self.call(
            "POST", "/Users", {"schemas": schemas, "userName": user_name, **fields}
        )
        assert status == 201, body
        return body

    def create_group(self, name: str, members: list[str]) -> dict:
        status, _, body = self.call(
            "POST",
            "/Groups",
            {
                "schemas": [GROUP_SCHEMA],
                "displayName": name,
                "members": [{"value": member} for member in members],
            },
        )
        assert status == 201, body
        return body

    def patch(self, path: str, *operations: dict, **headers: str) -> tuple:
        return self.call(
            "PATCH",
            path,
            {"schemas": [PATCH_SCHEMA], "Operations": list(operations)},
            headers=headers,
        )

    def published(self) -> dict[str, dict] | None:
        """The principals of the directory in the store, by id, once
        verified with the collector's key; None before any."""
        verified = self.verified()
        if verified is None:
            return None
        document = decode_document(DIRECTORY_FILE, verified.content)
        return {p.id: _principal(p) for p in document.document.principals}

    def verified(self) -> VerifiedDirectory | None:
        """The store's current directory, verified with the collector's key;
        None before any."""

        async def read() -> bytes | None:
            store = open_store(f"dir://{self.store_root}")
            await store.connect()
            try:
                entry = await store.current_directory()
            finally:
                await store.close()
            return None if entry is None else entry.data

        if not self.store_root.is_dir():
            return None
        data = asyncio.run(read())
        if data is None:
            return None
        public = self.key.public()
        return verify_directory_update(data, {public.key_id: public})

    def wait_published(self, condition, what: str) -> dict[str, dict]:
        found = None
        deadline = time.monotonic() + WAIT_SECONDS
        while time.monotonic() < deadline:
            try:
                found = self.published()
            except StoreUnavailable:
                # Read while publishes replaced the update it named, as a
                # daemon's follower may; it reads again, and so does this.
                time.sleep(0.05)
                continue
            if found is not None and condition(found):
                return found
            time.sleep(0.05)
        raise AssertionError(f"the store never held {what}: {found}")

    def metric(self, name: str) -> float:
        status, body = self.running.get("/metrics")
        assert status == 200
        for line in body.decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return 0.0


def _principal(document) -> dict:
    return {
        "kind": str(document.kind),
        "roles": sorted(document.roles),
        "attributes": dict(document.attributes),
        "active": document.active,
    }


@pytest.fixture
def scim(tmp_path):
    """A running SCIM collector, its store root present; stopped at teardown."""
    (tmp_path / "store").mkdir()
    started = Scim(tmp_path).start()
    yield started
    started.stop()


# --- authentication ------------------------------------------------------


def test_requests_without_a_known_bearer_token_are_refused(scim, caplog):
    caplog.set_level(logging.WARNING, logger="kynara.collector")
    for token, challenge in (
        (None, 'Bearer realm="kynara-scim"'),
        ("not-a-secret-of-anyone-at-all", 'Bearer realm="kynara-scim", error='),
    ):
        status, headers, body = scim.call("GET", "/Users", token=token)
        assert status == 401, body
        assert headers["www-authenticate"].startswith(challenge)
        assert body["schemas"] == [ERROR_SCHEMA]
        assert body["status"] == "401"
    status, headers, body = scim.call(
        "GET", "/Users", token=None, headers={"Authorization": f"Basic {SECRET}"}
    )
    assert status == 401, body
    assert scim.metric("kynara_collector_scim_refusals_total") == 3
    refusals = [r for r in caplog.records if r.getMessage() == "scim request refused"]
    assert len(refusals) == 3
    assert SECRET not in caplog.text
    # Either credential is served; the discovery of what is supported needs none.
    assert scim.call("GET", "/Users", token=OTHER_SECRET)[0] == 200
    status, _, config = scim.call("GET", "/ServiceProviderConfig", token=None)
    assert status == 200
    assert [s["type"] for s in config["authenticationSchemes"]] == ["oauthbearertoken"]
    assert config["patch"]["supported"] and config["sort"]["supported"]
    assert config["etag"]["supported"] and config["filter"]["maxResults"] == 200
    assert not config["changePassword"]["supported"]
    assert config["bulk"]["supported"] and config["bulk"]["maxOperations"] == 100


def test_secrets_shared_with_http_credentials_are_refused(tmp_path):
    setup = Scim(tmp_path)
    config = yaml.safe_load(setup.config_path.read_text())
    config["http"]["credentials"] = {
        "ops": {"secret_file": str(tmp_path / "okta.secret"), "roles": ["operator"]}
    }
    setup.config_path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match="scim.credentials.okta.*http.credentials"):
        setup.start()


def test_scim_without_a_directory_key_is_a_config_error(tmp_path):
    setup = Scim(tmp_path)
    config = yaml.safe_load(setup.config_path.read_text())
    config["directory"]["signing_key"] = ""
    setup.config_path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match="scim.enabled.*directory.signing_key"):
        load_collector_config(setup.config_path)


# --- resources -------------------------------------------------------------


def test_users_and_groups_are_created_read_and_filtered(scim):
    alice = scim.create_user(
        "alice",
        emails=[{"value": "alice@example.com", "primary": True}],
        **{ENTERPRISE: {"department": "Support"}},
    )
    bot = scim.create_user(
        "triage-bot", **{KYNARA_EXTENSION: {"kind": "agent", "owner": "support"}}
    )
    carol = scim.create_user("carol", active=False)
    group = scim.create_group("Support", [alice["id"], bot["id"]])

    status, headers, got = scim.call("GET", f"/Users/{bot['id']}")
    assert status == 200
    assert got["userName"] == "triage-bot"
    assert got[KYNARA_EXTENSION] == {"kind": "agent", "owner": "support"}
    assert headers["etag"] == got["meta"]["version"]
    assert got["meta"]["location"].endswith(f"/scim/v2/Users/{bot['id']}")

    def found(path: str) -> list[str]:
        status, _, body = scim.call("GET", path)
        assert status == 200, body
        return sorted(
            r.get("userName") or r.get("displayName") for r in body["Resources"]
        )

    assert found("/Users?filter=userName%20eq%20%22alice%22") == ["alice"]
    assert found("/Users?filter=active%20eq%20false") == ["carol"]
    members_of_bot = f"/Groups?filter=members%5Bvalue%20eq%20%22{bot['id']}%22%5D"
    assert found(members_of_bot) == ["Support"]
    members_of_carol = f"/Groups?filter=members%5Bvalue%20eq%20%22{carol['id']}%22%5D"
    assert found(members_of_carol) == []
    status, _, got = scim.call("GET", f"/Groups/{group['id']}")
    assert sorted(m["value"] for m in got["members"]) == sorted(
        [alice["id"], bot["id"]]
    )
    # The unique userName: a second alice is a conflict.
    status, _, body = scim.call(
        "POST", "/Users", {"schemas": [USER_SCHEMA], "userName": "alice"}
    )
    assert status == 409, body
    assert body["scimType"] == "uniqueness"


@pytest.mark.parametrize(
    ("user_name", "shown"),
    [("al ice", "space"), ("p\u0430ypal", "Cyrillic"), ("zero\u200bwidth", "U+200B")],
)
def test_a_user_name_that_is_no_principal_id_is_refused(scim, user_name, shown):
    status, _, body = scim.call(
        "POST", "/Users", {"schemas": [USER_SCHEMA], "userName": user_name}
    )
    assert status == 400, body
    assert body["scimType"] == "invalidValue"
    assert "userName" in body["detail"] and shown in body["detail"]
    assert scim.call("GET", "/Users")[2]["totalResults"] == 0


def test_a_kind_other_than_user_or_agent_is_refused(scim):
    status, _, body = scim.call(
        "POST",
        "/Users",
        {
            "schemas": [USER_SCHEMA, KYNARA_EXTENSION],
            "userName": "robot",
            KYNARA_EXTENSION: {"kind": "robot"},
        },
    )
    assert status == 400, body
    assert body["scimType"] == "invalidValue"
    assert KYNARA_EXTENSION + ":kind" in body["detail"]


def test_a_user_name_equal_in_nfc_to_another_is_a_conflict(scim):
    scim.create_user("zo\u00eb")
    status, _, body = scim.call(
        "POST", "/Users", {"schemas": [USER_SCHEMA], "userName": "zoe\u0308"}
    )
    assert status == 409, body


def test_patch_adds_and_removes_members_and_deactivates(scim):
    alice = scim.create_user("alice")
    bob = scim.create_user("bob")
    group = scim.create_group("Support", [alice["id"]])
    path = f"/Groups/{group['id']}"

    status, _, body = scim.patch(
        path, {"op": "add", "path": "members", "value": [{"value": bob["id"]}]}
    )
    assert status in (200, 204), body
    members = sorted(m["value"] for m in scim.call("GET", path)[2]["members"])
    assert members == sorted([alice["id"], bob["id"]])

    status, _, body = scim.patch(
        path, {"op": "remove", "path": f'members[value eq "{alice["id"]}"]'}
    )
    assert status in (200, 204), body
    assert [m["value"] for m in scim.call("GET", path)[2]["members"]] == [bob["id"]]

    status, _, body = scim.patch(
        f"/Users/{bob['id']}", {"op": "replace", "path": "active", "value": False}
    )
    assert status in (200, 204), body
    assert scim.call("GET", f"/Users/{bob['id']}")[2]["active"] is False


def test_searches_are_paged(scim):
    for name in ("erin", "alice", "dave", "bob", "carol"):
        scim.create_user(name)
    status, _, page = scim.call("GET", "/Users?sortBy=userName&startIndex=2&count=2")
    assert status == 200, page
    assert page["totalResults"] == 5
    assert page["startIndex"] == 2 and page["itemsPerPage"] == 2
    assert [r["userName"] for r in page["Resources"]] == ["bob", "carol"]
    last = scim.call("GET", "/Users?sortBy=userName&startIndex=5&count=2")[2]
    assert [r["userName"] for r in last["Resources"]] == ["erin"]


def test_a_write_with_a_stale_etag_is_refused(scim):
    alice = scim.create_user("alice")
    path = f"/Users/{alice['id']}"
    etag = scim.call("GET", path)[1]["etag"]
    change = {"op": "replace", "path": "displayName", "value": "Alice"}

    status, _, body = scim.patch(path, change, **{"If-Match": 'W/"999999"'})
    assert status == 412, body
    assert scim.call("GET", path)[2].get("displayName") is None

    status, headers, _ = scim.patch(path, change, **{"If-Match": etag})
    assert status in (200, 204)
    assert headers["etag"] != etag
    status, _, _ = scim.call("DELETE", path, headers={"If-Match": etag})
    assert status == 412
    assert scim.call("GET", path, headers={"If-None-Match": headers["etag"]})[0] == 304


def test_resources_and_their_etags_survive_a_restart(tmp_path):
    (tmp_path / "store").mkdir()
    scim = Scim(tmp_path).start()
    try:
        alice = scim.create_user("alice", password="never-kept-anywhere-1")
        group = scim.create_group("Support", [alice["id"]])
        before = scim.call("GET", f"/Users/{alice['id']}")
    finally:
        scim.stop()
    assert b"never-kept-anywhere-1" not in b"".join(
        path.read_bytes() for path in (tmp_path / "scim").iterdir()
    )

    # A new Scim over the same files: it reads the collector's key back.
    scim = Scim(tmp_path).start()
    try:
        after = scim.call("GET", f"/Users/{alice['id']}")
        assert after[0] == 200
        # A new port: the same resource at another location.
        for _, _, body in (before, after):
            body["meta"].pop("location")
            for membership in body["groups"]:
                assert membership.pop("$ref").endswith(f"/Groups/{group['id']}")
        assert after[2] == before[2]
        assert after[1]["etag"] == before[1]["etag"]
        assert (
            scim.call("GET", f"/Groups/{group['id']}")[2]["members"][0]["value"]
            == alice["id"]
        )
        # Versions go on from where they were: no ETag is handed out twice.
        status, headers, _ = scim.patch(
            f"/Users/{alice['id']}",
            {"op": "replace", "path": "displayName", "value": "Alice"},
        )
        assert status in (200, 204)
        versions = {before[1]["etag"], group["meta"]["version"], headers["etag"]}
        assert len(versions) == 3
        # What the first run left unpublished goes out now, with the group.
        scim.wait_published(
            lambda p: p.get("alice", {}).get("roles") == ["support_agent"],
            "alice with the group's role",
        )
    finally:
        scim.stop()


# --- the published directory ---------------------------------------------


def test_each_change_publishes_the_directory(scim):
    alice = scim.create_user(
        "alice",
        displayName="Alice Liddell",
        emails=[
            {"value": "a@home.example", "type": "home"},
            {"value": "alice@example.com", "primary": True},
        ],
        **{ENTERPRISE: {"department": "Support", "costCenter": "cc-7"}},
    )
    bot = scim.create_user(
        "triage-bot",
        **{KYNARA_EXTENSION: {"kind": "agent", "owner": "support-platform"}},
    )
    bob = scim.create_user("bob", emails=[{"value": "bob@example.com"}])
    scim.create_group("Support", [alice["id"], bot["id"]])
    scim.create_group("Finance", [alice["id"]])
    scim.create_group("Unmapped", [bob["id"]])

    principals = scim.wait_published(
        lambda p: len(p) == 3 and p["bob"]["attributes"].get("groups"),
        "three principals and their groups",
    )
    assert principals["alice"] == {
        "kind": "user",
        "roles": ["auditor", "finance_viewer", "support_agent"],
        "attributes": {
            "email": "alice@example.com",
            "display_name": "Alice Liddell",
            "department": "Support",
            "cost_center": "cc-7",
            "groups": ["Finance", "Support"],
        },
        "active": True,
    }
    assert principals["triage-bot"] == {
        "kind": "agent",
        "roles": ["support_agent"],
        "attributes": {"groups": ["Support"], "owner": "support-platform"},
        "active": True,
    }
    assert principals["bob"]["roles"] == []
    assert principals["bob"]["attributes"] == {
        "email": "bob@example.com",
        "groups": ["Unmapped"],
    }

    scim.patch(
        f"/Users/{alice['id']}", {"op": "replace", "path": "active", "value": False}
    )
    principals = scim.wait_published(
        lambda p: not p["alice"]["active"], "alice inactive"
    )
    assert principals["alice"]["roles"] == [
        "auditor",
        "finance_viewer",
        "support_agent",
    ]

    assert scim.call("DELETE", f"/Users/{bob['id']}")[0] == 204
    principals = scim.wait_published(lambda p: "bob" not in p, "bob gone")
    assert sorted(principals) == ["alice", "triage-bot"]
    assert scim.metric("kynara_collector_directory_revisions_published_total") >= 3
    assert scim.metric("kynara_collector_directory_publish_failures_total") == 0


def test_a_burst_of_changes_makes_few_revisions(tmp_path):
    """The first change goes out at once; changes inside
    scim.publish_interval_seconds after it wait for its end and go out as
    one revision (here the stop comes first and publishes them: one
    revision for eleven users, in the store once stop() returns)."""
    (tmp_path / "store").mkdir()
    scim = Scim(tmp_path, publish_interval_seconds=30).start()
    try:
        scim.create_user("first")
        scim.wait_published(lambda p: "first" in p, "the first user at once")
        for index in range(11):
            scim.create_user(f"burst-{index}")
        # Nothing of the burst yet: the interval after the first is running.
        assert scim.metric("kynara_collector_directory_revisions_published_total") == 1
        assert "burst-0" not in (scim.published() or {})
    finally:
        scim.stop()
    # A clean stop ends the wait by publishing the burst at once.
    principals = scim.published() or {}
    assert sorted(principals) == sorted(["first"] + [f"burst-{i}" for i in range(11)])
    # Published and recorded: a restart has nothing to publish.
    scim = Scim(tmp_path, publish_interval_seconds=0).start()
    try:
        assert scim.metric("kynara_collector_directory_revisions_published_total") == 0
        assert len(scim.published() or {}) == 12
    finally:
        scim.stop()


def test_changes_made_while_the_store_is_down_are_published_once_it_is_back(
    tmp_path,
):
    scim = Scim(tmp_path).start()  # the store's root is missing: it is down
    try:
        alice = scim.create_user("alice")
        scim.create_group("Support", [alice["id"]])
        scim.patch(
            f"/Users/{alice['id']}",
            {"op": "replace", "path": "active", "value": False},
        )
        deadline = time.monotonic() + WAIT_SECONDS
        while scim.metric("kynara_collector_directory_publish_failures_total") < 1:
            assert time.monotonic() < deadline, "no publish was tried"
            time.sleep(0.05)
        assert scim.published() is None
        scim.store_root.mkdir()
        principals = scim.wait_published(
            lambda p: "alice" in p and not p["alice"]["active"], "inactive alice"
        )
        assert principals["alice"]["roles"] == ["support_agent"]
    finally:
        scim.stop()


def test_bulk_creates_a_user_and_a_group_naming_it(scim):
    status, _, body = scim.call(
        "POST",
        "/Bulk",
        {
            "schemas": ["urn:ietf:params:scim:api:messages:2.0:BulkRequest"],
            "Operations": [
                {
                    "method": "POST",
                    "path": "/Users",
                    "bulkId": "u1",
                    "data": {"schemas": [USER_SCHEMA], "userName": "dana"},
                },
                {
                    "method": "POST",
                    "path": "/Groups",
                    "bulkId": "g1",
                    "data": {
                        "schemas": [GROUP_SCHEMA],
                        "displayName": "Support",
                        "members": [{"value": "bulkId:u1"}],
                    },
                },
                {
                    "method": "POST",
                    "path": "/Users",
                    "bulkId": "u2",
                    "data": {"schemas": [USER_SCHEMA], "userName": "not valid"},
                },
            ],
        },
    )
    assert status == 200, body
    assert [op["status"] for op in body["Operations"]] == ["201", "201", "400"]
    scim.wait_published(
        lambda p: p.get("dana", {}).get("roles") == ["support_agent"],
        "dana with the group's role",
    )


def test_group_roles_must_be_role_names(tmp_path):
    setup = Scim(tmp_path, group_roles={"Support": ["support agent"]})
    with pytest.raises(ConfigError, match="scim.group_roles.Support: role"):
        load_collector_config(setup.config_path)


@pytest.mark.parametrize("role", ["ingenieria:x", "ingeniería", "a..b"])
def test_group_roles_take_only_names_the_signed_directory_takes(tmp_path, role):
    # Each passes canonical_name but not the directory's role rule: taken,
    # it would fail every directory build while IdPs still get 2xx.
    setup = Scim(tmp_path, group_roles={"Eng": [role]})
    with pytest.raises(
        ConfigError, match=r"scim.group_roles.Eng: role .*\[A-Za-z0-9_-\]"
    ):
        load_collector_config(setup.config_path)


# --- memberships: a User's groups, and a deleted User leaving its groups ---


def test_a_users_groups_are_filled_in_on_every_read_and_never_stored(tmp_path):
    (tmp_path / "store").mkdir()
    scim = Scim(tmp_path).start()
    try:
        alice = scim.create_user("alice")
        bob = scim.create_user("bob")
        support = scim.create_group("Support", [alice["id"]])
        finance = scim.create_group("Finance", [alice["id"], bob["id"]])
        path = f"/Users/{alice['id']}"

        def groups(body: dict) -> list[tuple[str, str, str, str]]:
            return [
                (g["value"], g["display"], g["$ref"], g["type"])
                for g in body.get("groups", [])
            ]

        base = f"http://127.0.0.1:{scim.port}/scim/v2/Groups/"
        expected = [
            (finance["id"], "Finance", base + finance["id"], "direct"),
            (support["id"], "Support", base + support["id"], "direct"),
        ]
        status, _, got = scim.call("GET", path)
        assert status == 200, got
        assert groups(got) == expected
        by_name = scim.call("GET", "/Users?filter=userName%20eq%20%22alice%22")[2]
        assert groups(by_name["Resources"][0]) == expected
        in_support = scim.call(
            "GET", "/Users?filter=groups%5Bdisplay%20eq%20%22Support%22%5D"
        )[2]
        assert [r["userName"] for r in in_support["Resources"]] == ["alice"]
        # The same served version (ETag) as a read by id.
        assert in_support["Resources"][0]["meta"] == got["meta"]
        status, _, carol = scim.call(
            "POST",
            "/Users",
            {
                "schemas": [USER_SCHEMA],
                "userName": "carol",
                "groups": [{"value": support["id"], "display": "Support"}],
            },
        )
        assert status == 201, carol
        assert "groups" not in carol  # read-only: what the client sent is ignored

        # A PATCH of groups is refused; a PUT's groups are ignored.
        status, _, body = scim.patch(
            f"/Users/{bob['id']}",
            {"op": "add", "path": "groups", "value": [{"value": support["id"]}]},
        )
        assert status == 400, body
        assert body["scimType"] == "mutability"
        status, _, body = scim.call(
            "PUT",
            f"/Users/{bob['id']}",
            {"schemas": [USER_SCHEMA], "userName": "bob", "groups": []},
        )
        assert status == 200, body
        assert [g["display"] for g in body["groups"]] == ["Finance"]

        # Memberships change on the Groups; the User's groups follow.
        scim.patch(
            f"/Groups/{support['id']}",
            {"op": "replace", "path": "displayName", "value": "Helpdesk"},
        )
        scim.patch(
            f"/Groups/{finance['id']}",
            {"op": "remove", "path": f'members[value eq "{alice["id"]}"]'},
        )
        got = scim.call("GET", path)[2]
        assert [(g["value"], g["display"]) for g in got["groups"]] == [
            (support["id"], "Helpdesk")
        ]
        assert "groups" not in scim.call("GET", f"/Users/{carol['id']}")[2]
    finally:
        scim.stop()

    store = ScimStore(tmp_path / "scim", build_provider(200), 1 << 26)
    try:
        users = [r for r in store.resources if r.meta.resource_type == "User"]
        assert sorted(u.user_name for u in users) == ["alice", "bob", "carol"]
        assert all(u.groups is None for u in users)
    finally:
        store.close()


GROUPS_OF_BOB = ["Other", "Support"]


def said(caplog, message: str) -> list[logging.LogRecord]:
    """The records with ``message`` of the SCIM service's directory
    publishing, and for "directory published" the publisher's INFO line
    (the one line a revision gets at INFO, with its size and key)."""
    if message == "directory published":
        return [
            r
            for r in caplog.records
            if r.getMessage() == message and r.levelno == logging.INFO
        ]
    return [
        r
        for r in caplog.records
        if r.getMessage() == message
        and getattr(r, "fields", {}).get("door") == "scim directory"
    ]


def wait_said(caplog, message: str, revision: str) -> list[logging.LogRecord]:
    """``said`` once a record of ``revision`` is among them: the store holds
    a revision a moment before its publishing logs it."""
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        found = said(caplog, message)
        if any(r.fields["revision"] == revision for r in found):
            return found
        assert time.monotonic() < deadline, f"{message} {revision}: never logged"
        time.sleep(0.05)


def test_deleting_a_user_removes_it_from_its_groups_in_one_change(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="kynara.collector")
    (tmp_path / "store").mkdir()
    scim = Scim(tmp_path).start()
    try:
        alice = scim.create_user("alice")
        bob = scim.create_user("bob")
        support = scim.create_group("Support", [alice["id"], bob["id"]])
        finance = scim.create_group("Finance", [alice["id"]])
        other = scim.create_group("Other", [bob["id"]])
        scim.wait_published(
            lambda p: (
                "bob" in p and p["bob"]["attributes"].get("groups") == GROUPS_OF_BOB
            ),
            "every change before the delete",
        )
        before = wait_said(caplog, "directory published", scim.verified().revision)

        assert scim.call("DELETE", f"/Users/{alice['id']}")[0] == 204

        _, headers, got = scim.call("GET", f"/Groups/{support['id']}")
        assert [m["value"] for m in got["members"]] == [bob["id"]]
        assert headers["etag"] != support["meta"]["version"]
        assert got["meta"]["lastModified"] >= support["meta"]["lastModified"]
        _, headers, got = scim.call("GET", f"/Groups/{finance['id']}")
        assert "members" not in got
        assert headers["etag"] != finance["meta"]["version"]
        _, headers, _ = scim.call("GET", f"/Groups/{other['id']}")
        assert headers["etag"] == other["meta"]["version"]  # not a holder
        found = scim.call(
            "GET", f"/Groups?filter=members%5Bvalue%20eq%20%22{alice['id']}%22%5D"
        )[2]
        assert found["totalResults"] == 0
        principals = scim.wait_published(lambda p: "alice" not in p, "alice gone")
        assert principals["bob"]["roles"] == ["support_agent"]
        # The User and its memberships went in one change: one revision,
        # logged once at INFO, with its size and the signing key.
        revision = scim.verified().revision
        after = wait_said(caplog, "directory published", revision)
        assert [r.fields["revision"] for r in after[len(before) :]] == [revision]
        assert after[-1].fields["key_id"] == scim.key.key_id
        assert after[-1].fields["bytes"] > 0
        revisions = [r.fields["revision"] for r in after]
        assert len(revisions) == len(set(revisions))
        support_version = scim.call("GET", f"/Groups/{support['id']}")[1]["etag"]
    finally:
        scim.stop()

    # Durable: the groups read back without alice, at their new versions.
    scim = Scim(tmp_path).start()
    try:
        _, headers, got = scim.call("GET", f"/Groups/{support['id']}")
        assert [m["value"] for m in got["members"]] == [bob["id"]]
        assert headers["etag"] == support_version
        assert "members" not in scim.call("GET", f"/Groups/{finance['id']}")[2]
    finally:
        scim.stop()


# --- publishing while the store is down --------------------------------------


def test_a_store_that_stays_down_is_logged_once_and_its_return_once(tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="kynara.collector")
    scim = Scim(tmp_path).start()  # the store's root is missing: it is down
    try:
        scim.create_user("alice")
        deadline = time.monotonic() + WAIT_SECONDS
        while scim.metric("kynara_collector_directory_publish_failures_total") < 5:
            assert time.monotonic() < deadline, "publishing was not retried"
            time.sleep(0.05)

        assert [
            r.levelno for r in said(caplog, "directory not published; retrying")
        ] == [logging.WARNING]
        assert len(said(caplog, "directory still not published")) >= 3
        assert all(
            r.levelno == logging.DEBUG
            for r in said(caplog, "directory still not published")
        )
        scim.store_root.mkdir()
        scim.wait_published(lambda p: "alice" in p, "alice")
        again = wait_said(caplog, "directory published again", scim.verified().revision)
        assert len(again) == 1 and again[0].levelno == logging.INFO
        assert again[0].fields["failures"] >= 5
        failures = scim.metric("kynara_collector_directory_publish_failures_total")
        assert failures == again[0].fields["failures"]

        scim.create_user("bob")
        scim.wait_published(lambda p: "bob" in p, "bob")
        assert len(said(caplog, "directory published again")) == 1
        assert len(said(caplog, "directory not published; retrying")) == 1
    finally:
        scim.stop()


def test_a_different_publish_error_is_logged_again(caplog):
    caplog.set_level(logging.DEBUG, logger="kynara.collector")
    errors = [OSError("disk full")] * 3 + [TimeoutError("no reply")] * 2
    failures: list[None] = []
    published: list[str] = []

    async def publish(content: bytes) -> str:
        if errors:
            raise errors.pop(0)
        return "rev-1"

    async def run() -> None:
        stop = asyncio.Event()
        publishing = DirectoryPublishing(
            lambda: b"{}",
            publish,
            retry_seconds=0,
            on_published=lambda revision: (published.append(revision), stop.set()),
            on_failure=lambda: failures.append(None),
        )
        await asyncio.wait_for(publishing.run(stop), WAIT_SECONDS)

    asyncio.run(run())

    warned = [
        r.fields["error"]
        for r in caplog.records
        if r.getMessage() == "directory not published; retrying"
    ]
    assert warned == ["OSError: disk full", "TimeoutError: no reply"]
    assert len(failures) == 5 and published == ["rev-1"]
    again = [r for r in caplog.records if r.getMessage() == "directory published again"]
    assert [r.fields["failures"] for r in again] == [5]


async def stopped_mid_publish(
    publishing: DirectoryPublishing, started: list[bytes]
) -> None:
    """Run ``publishing`` until its first publish has started (``publish``
    appends to ``started``), then stop it as the collector's stop does:
    set the stop event and cancel the task."""
    stop = asyncio.Event()
    task = asyncio.create_task(publishing.run(stop))
    while not started:
        await asyncio.sleep(0.005)
    stop.set()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def test_the_stops_flush_waits_for_the_publish_it_interrupted():
    # The stop cancels the publishing task, not its store call; a flush
    # publishing beside that call would be two writers on one store, and
    # the older content could land last.
    contents = [b"old", b"new"]
    started: list[bytes] = []
    finished: list[bytes] = []

    async def run() -> None:
        release = asyncio.Event()

        async def publish(content: bytes) -> str:
            started.append(content)
            if content == b"old":
                await release.wait()
            finished.append(content)
            return content.decode()

        publishing = DirectoryPublishing(
            lambda: contents.pop(0), publish, retry_seconds=0
        )
        await stopped_mid_publish(publishing, started)
        flushing = asyncio.create_task(publishing.flush())
        await asyncio.sleep(0.2)
        # The flush waits: nothing new has started while "old" is held.
        assert started == [b"old"] and not flushing.done()
        release.set()
        await asyncio.wait_for(flushing, WAIT_SECONDS)
        assert publishing.revision == "new"

    asyncio.run(run())

    assert finished == [b"old", b"new"]


def test_a_refused_directory_is_one_error_and_waits_for_the_next_change(caplog):
    # A DirectoryError (here too_large) fails again for the same content:
    # counted and logged once, never retried as an outage; a change tries
    # anew and publishes.
    caplog.set_level(logging.DEBUG, logger="kynara.collector")
    refusal = DirectoryError(DirectoryProblem.TOO_LARGE, "over the cap")
    calls: list[bytes] = []
    failures: list[None] = []
    contents = [b"big", b"big", b"small"]

    async def publish(content: bytes) -> str:
        calls.append(content)
        if content == b"big":
            raise refusal
        return "rev-small"

    async def run() -> None:
        stop = asyncio.Event()
        publishing = DirectoryPublishing(
            lambda: contents.pop(0),
            publish,
            retry_seconds=0,
            on_published=lambda revision: stop.set(),
            on_failure=lambda: failures.append(None),
        )

        async def tried(count: int) -> None:
            while len(calls) < count:
                await asyncio.sleep(0.01)
            # Time for a retry, were there one (retry_seconds is 0).
            await asyncio.sleep(0.2)

        task = asyncio.create_task(publishing.run(stop))
        await asyncio.wait_for(tried(1), WAIT_SECONDS)
        # Not retried: one try, then waiting for a change.
        assert calls == [b"big"] and not task.done()
        publishing.changed()
        await asyncio.wait_for(tried(2), WAIT_SECONDS)
        assert calls == [b"big", b"big"]
        publishing.changed()
        await asyncio.wait_for(task, WAIT_SECONDS)
        assert publishing.revision == "rev-small"

    asyncio.run(run())

    errors = [
        r
        for r in caplog.records
        if r.getMessage() == "directory refused; not retried until the next change"
    ]
    assert [r.levelno for r in errors] == [logging.ERROR]
    assert "too_large" in errors[0].fields["error"]
    assert len(failures) == 2
    assert not [
        r
        for r in caplog.records
        if r.getMessage() == "directory not published; retrying"
    ]


# --- limits: filter terms, body size; reads beside a held write ----------------


def test_a_filter_of_more_terms_than_the_cap_is_refused(tmp_path):
    (tmp_path / "store").mkdir()
    scim = Scim(tmp_path, max_filter_terms=3).start()
    try:
        scim.create_user("alice")
        scim.create_user("bob")
        three = 'userName eq "alice" or userName co "b" or userName eq "x or y"'
        four = three + ' or userName eq "zed"'

        status, _, body = scim.call(
            "GET", "/Users?" + urllib.parse.urlencode({"filter": three})
        )
        assert status == 200, body
        assert body["totalResults"] == 2
        for method, path, sent in (
            ("GET", "/Users?" + urllib.parse.urlencode({"filter": four}), None),
            ("POST", "/Users/.search", {"schemas": [SEARCH_SCHEMA], "filter": four}),
            ("POST", "/.search", {"schemas": [SEARCH_SCHEMA], "filter": four}),
        ):
            status, _, body = scim.call(method, path, sent)
            assert status == 400, (path, body)
            assert body["scimType"] == "invalidFilter"
            assert "at most 3 terms (scim.max_filter_terms), got 4" in body["detail"]
        status, _, body = scim.call(
            "POST", "/Users/.search", {"schemas": [SEARCH_SCHEMA], "filter": three}
        )
        assert status == 200, body
    finally:
        scim.stop()


def test_max_filter_terms_must_be_in_range(tmp_path):
    with pytest.raises(ConfigError, match=r"scim.max_filter_terms: expected 1\.\."):
        Scim(tmp_path, max_filter_terms=0).start()


def test_a_read_is_answered_while_a_write_holds_the_operation_lock(scim):
    alice = scim.create_user("alice")
    collector = scim.running.collector
    storage = collector._scim.handler.storage
    held = threading.Event()
    release: list[asyncio.Event] = []

    async def hold() -> None:
        release.append(asyncio.Event())
        async with storage.operation():
            held.set()
            await release[0].wait()

    holding = asyncio.run_coroutine_threadsafe(hold(), scim.running.loop)
    assert held.wait(WAIT_SECONDS)
    created: list[tuple] = []
    writer = threading.Thread(
        target=lambda: created.append(
            scim.call("POST", "/Users", {"schemas": [USER_SCHEMA], "userName": "bob"})
        )
    )
    try:
        writer.start()

        status, _, got = scim.call("GET", f"/Users/{alice['id']}")
        assert status == 200
        assert got["userName"] == "alice"
        status, _, found = scim.call(
            "POST",
            "/Users/.search",
            {"schemas": [SEARCH_SCHEMA], "filter": "userName pr"},
        )
        assert status == 200, found
        assert [r["userName"] for r in found["Resources"]] == ["alice"]
        assert not holding.done()
        assert created == []  # the write waits for the operation lock
    finally:
        scim.running.loop.call_soon_threadsafe(release[0].set)
        holding.result(WAIT_SECONDS)
        writer.join(WAIT_SECONDS)
    assert created[0][0] == 201


def post_over_size(scim, authorization: str):
    """POST a User body of 2 MiB (over the 1 MiB bound) with
    ``authorization``; the reply and its JSON body."""
    connection = http.client.HTTPConnection("127.0.0.1", scim.port, timeout=30)
    body = b"{" + b" " * (2 << 20) + b"}"
    try:
        connection.request(
            "POST",
            "/scim/v2/Users",
            body=body,
            headers={
                "Authorization": authorization,
                "Content-Type": "application/scim+json",
            },
        )
        reply = connection.getresponse()
        return reply, json.loads(reply.read())
    finally:
        connection.close()


def test_an_over_size_body_is_a_scim_error(scim):
    reply, got = post_over_size(scim, f"Bearer {SECRET}")

    assert reply.status == 413
    assert reply.getheader("Content-Type").startswith("application/scim+json")
    assert got["schemas"] == [ERROR_SCHEMA]
    assert got["status"] == "413"
    assert "larger than 1048576 bytes" in got["detail"]


def test_the_credential_is_checked_before_the_body_is_read(scim):
    # An over-size body without a credential: refused as unauthenticated
    # (the body never read), not as too large.
    reply, got = post_over_size(scim, "Bearer not-a-scim-secret")

    assert reply.status == 401, got
    assert reply.getheader("WWW-Authenticate").startswith('Bearer realm="kynara-scim"')
    assert got["status"] == "401"
    assert scim.metric("kynara_collector_scim_refusals_total") >= 1


# --- ETags of a User follow its groups ---------------------------------------------


def test_a_users_etag_moves_with_its_groups(scim):
    alice = scim.create_user("alice")
    path = f"/Users/{alice['id']}"
    alone = scim.call("GET", path)[1]["etag"]
    assert scim.call("GET", path, headers={"If-None-Match": alone})[0] == 304

    group = scim.create_group("Support", [alice["id"]])

    status, headers, got = scim.call("GET", path, headers={"If-None-Match": alone})
    assert status == 200
    in_support = headers["etag"]
    assert in_support != alone
    assert got["meta"]["version"] == in_support
    assert [g["display"] for g in got["groups"]] == ["Support"]
    found = scim.call("GET", "/Users?filter=userName%20eq%20%22alice%22")[2]
    assert found["Resources"][0]["meta"]["version"] == in_support
    change = {"op": "replace", "path": "displayName", "value": "Alice"}
    assert scim.patch(path, change, **{"If-Match": alone})[0] == 412

    status, _, _ = scim.patch(
        f"/Groups/{group['id']}",
        {"op": "replace", "path": "displayName", "value": "Support Engineers"},
    )
    assert status in (200, 204)
    renamed = scim.call("GET", path)[1]["etag"]
    assert renamed not in (alone, in_support)
    assert scim.patch(path, change, **{"If-Match": in_support})[0] == 412
    status, headers, _ = scim.patch(path, change, **{"If-Match": renamed})
    assert status in (200, 204)
    assert headers["etag"] not in (alone, in_support, renamed)

    assert scim.call("DELETE", f"/Groups/{group['id']}")[0] == 204
    status, headers, got = scim.call("GET", path)
    assert "groups" not in got
    assert headers["etag"] == got["meta"]["version"]
    assert scim.call("DELETE", path, headers={"If-Match": renamed})[0] == 412
    assert scim.call("DELETE", path, headers={"If-Match": headers["etag"]})[0] == 204


# --- a directory published by hand ------------------------------------------------


def _publish_by_hand(scim: Scim, *principals: str) -> str:
    """``kynara-collector directory publish`` of users named ``principals``
    with the SCIM collector's config; the revision it published."""
    directory = scim.tmp_path / "principals.yaml"
    directory.write_text(
        yaml.safe_dump(
            {
                "format_version": 1,
                "kind": "directory",
                "principals": [
                    {"id": name, "kind": "user", "roles": ["support_agent"]}
                    for name in principals
                ],
            }
        )
    )
    command = [
        sys.executable, "-m", "kynara_sidecar.collector.cli", "directory",
        "publish", str(directory), "--config", str(scim.config_path),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    verified = scim.verified()
    assert verified is not None
    assert verified.revision in done.stdout
    return verified.revision


def test_an_empty_scim_store_keeps_a_hand_import_until_its_first_change(tmp_path):
    (tmp_path / "store").mkdir()
    scim = Scim(tmp_path)
    imported = _publish_by_hand(scim, "ann", "bob")
    scim.start()
    try:
        collector = scim.running.collector
        assert collector.scim_store.unpublished is False
        assert collector.directory_publishing.publish_at_start is False
        assert scim.call("GET", "/Users")[0] == 200  # up and serving
        assert scim.verified().revision == imported
        assert sorted(scim.published()) == ["ann", "bob"]

        scim.create_user("alice")

        principals = scim.wait_published(lambda p: "alice" in p, "alice")
        assert sorted(principals) == ["alice"]
        assert scim.metric("kynara_collector_directory_revisions_published_total") == 1
    finally:
        scim.stop()


def test_a_restart_publishes_only_what_was_not_published(tmp_path):
    """A hand fix over a published SCIM directory survives a restart; a
    commit whose publish failed (the store down) is published at the next
    start."""
    scim = Scim(tmp_path).start()  # the store's root is missing: it is down
    try:
        scim.create_user("alice")
        deadline = time.monotonic() + WAIT_SECONDS
        while scim.metric("kynara_collector_directory_publish_failures_total") < 1:
            assert time.monotonic() < deadline, "no publish was tried"
            time.sleep(0.05)
    finally:
        scim.stop()
    scim.store_root.mkdir()
    assert scim.published() is None

    scim = Scim(tmp_path).start()
    try:
        assert scim.running.collector.directory_publishing.publish_at_start is True
        scim.wait_published(lambda p: sorted(p) == ["alice"], "alice at start")
    finally:
        scim.stop()
    fixed = _publish_by_hand(scim, "ann")

    scim = Scim(tmp_path).start()
    try:
        assert scim.running.collector.scim_store.unpublished is False
        assert scim.running.collector.directory_publishing.publish_at_start is False
        assert scim.call("GET", "/Users")[0] == 200
        assert scim.verified().revision == fixed
    finally:
        scim.stop()
