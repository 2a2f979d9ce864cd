"""``kynara-collector directory sync``: pull users and groups from an
identity provider's SCIM 2.0 endpoint into the collector's own.

Some identity providers do not push (SCIM provisioning); for them this
command reads their Users and Groups as a SCIM client and writes them to
the collector's SCIM endpoint (``collector.scim``), as a SCIM client too.
The collector's SCIM service stays the one owner of the directory: every
change it takes becomes a signed directory revision for the fleet, and
this command needs none of the collector's files, only a bearer token of
its SCIM endpoint (``directory.pull.target_token_file``).

Theory of operation (one run, ``sync_directory``):

1. Read every User and Group of the source and of the target, page by page
   (``startIndex``/``count`` until ``totalResults``), never in one page.
2. Match: a target resource belongs to a source resource when its
   ``externalId`` is the source resource's ``id``. A target resource without
   an ``externalId`` is adopted by the source resource of the same
   ``userName`` (Users, compared case-insensitively as SCIM does) or
   ``displayName`` (Groups): it could not be created beside it anyway.
3. Plan (``plan_resources``, pure): create what the target lacks, replace
   what differs (``If-Match`` with the version the target gave), delete a
   target resource whose ``externalId`` no source resource has any more: a
   user removed at the source is deleted in the target, not deactivated,
   so the published directory drops the principal (a deactivated one at the
   source stays, inactive). Target resources without an ``externalId``
   that no source resource adopts are left alone: someone else pushes them.
4. Apply, users first, then groups, each in an order that takes access
   away first: delete, replace, create, then replace what refers to a
   resource created in the run (a group member, an enterprise manager),
   now that it has a target id. Group member ids and managers are
   translated from source ids to target ids.

Each write is one SCIM request, complete or not at all, and a run plans
from what it reads, never from what an earlier run did: a run that fails
half way (the error names the endpoint, the request and the SCIM error)
leaves a target the next run finishes. Scheduled (``--every``,
``directory.pull.interval_seconds``) a failed run is logged and retried at
the next tick; SIGTERM or SIGINT stops the loop (a run in progress is
cancelled: a write cut short is applied by the target or not, and the
next run finishes either way).

TODO(#12): a scheduled sync counts nothing in metrics (runs, failures,
changes): it is a process of its own without an HTTP listener; its JSON
log lines are what an operator alerts on until it gains one (or runs
inside ``kynara-collector run``).

NOTE: ``externalId`` is the source's id verbatim, so a target resource
carrying an ``externalId`` that the source does not know is taken as
removed at the source. A provisioning client that pushes to the same
collector and sets ``externalId`` would see its resources deleted by the
next pull: feed one collector from one of the two.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import pathlib
import signal
import ssl
import sys
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, TypeVar

import httpx2
import pydantic
from scim2_client import SCIMClientException
from scim2_client.engines.httpx2 import AsyncSCIMClient
from scim2_models import Context, SCIMException, SearchRequest

from kynara_sidecar.collector.config import (
    MAX_PULL_INTERVAL_SECONDS,
    MIN_PULL_INTERVAL_SECONDS,
    CollectorConfig,
    HttpConfig,
    endpoint_url_problem,
)
from kynara_sidecar.errors import ConfigError, ServiceError

__all__ = [
    "DirectorySyncError",
    "Endpoint",
    "Plan",
    "SyncSummary",
    "check_interval",
    "config_endpoints",
    "default_target_url",
    "member_ids",
    "plan_resources",
    "read_token",
    "run_schedule",
    "sync_command",
    "sync_directory",
]

log = logging.getLogger("kynara.collector")

# Where the collector serves SCIM on its HTTP listener (collector.scim).
SCIM_PATH = "/scim/v2"
USER = "User"
GROUP = "Group"
ENTERPRISE_USER = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
# Attributes a target keeps for itself: never copied from the source, never
# compared. ``groups`` is read-only on Users (membership is set on Groups).
_NOT_COPIED = frozenset({"id", "meta", "externalId", "schemas", "groups", "password"})
# Error text taken from a response is cut to this.
_MAX_SHOWN = 300

T = TypeVar("T")


class DirectorySyncError(ServiceError):
    """A sync run failed; the message names the endpoint (source or target,
    and its URL), the request and the SCIM error. What was applied before
    stays applied; the next run finishes the rest."""


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """One SCIM endpoint the command talks to."""

    # "source" or "target": named in every error.
    role: str
    # The SCIM base URL, e.g. "https://idp.example.com/scim/v2".
    url: str
    # The bearer token sent to it (kept out of repr: reprs reach logs).
    token: str = dataclasses.field(repr=False)
    # PEM file of the certificates to trust for https, "" for the system's.
    ca_file: str = ""

    def __str__(self) -> str:
        return f"{self.role} {self.url}"


@dataclasses.dataclass
class SyncSummary:
    """What one run changed in the target."""

    users_created: int = 0
    users_updated: int = 0
    users_deleted: int = 0
    groups_created: int = 0
    groups_updated: int = 0
    groups_deleted: int = 0
    # Group members the source names but does not serve (left out).
    members_unknown: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counts by name, for the summary line and the log."""
        return dataclasses.asdict(self)

    @property
    def changed(self) -> int:
        """How many writes the run made."""
        return sum(self.as_dict().values()) - self.members_unknown


@dataclasses.dataclass
class Plan:
    """The writes that bring one resource type of the target to the source.

    ``create`` holds payloads (``externalId`` set, no ``id``); ``replace``
    pairs a payload (with the target's ``id``) with the target's version
    (``""`` when it gave none); ``delete`` pairs a target id with its
    version. ``matched`` maps source ids to target ids of resources that
    exist on both sides.
    """

    create: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    replace: list[tuple[dict[str, Any], str]] = dataclasses.field(default_factory=list)
    delete: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    matched: dict[str, str] = dataclasses.field(default_factory=dict)


# -- the pure core: matching and planning ---------------------------------


def _key(kind: str, resource: Mapping[str, Any]) -> str:
    """The name a resource without ``externalId`` is adopted by."""
    name = resource.get("userName" if kind == USER else "displayName") or ""
    return name.casefold() if kind == USER else name


def plan_resources(
    kind: str,
    source: Iterable[Mapping[str, Any]],
    target: Iterable[Mapping[str, Any]],
    desired: Callable[[Mapping[str, Any]], dict[str, Any]],
    comparable: Callable[[Mapping[str, Any]], Any],
) -> Plan:
    """Plan the writes that make ``target`` match ``source``.

    Args:
        kind: ``"User"`` or ``"Group"`` (which name adopts a resource).
        source: the source's resources, as JSON objects.
        target: the target's resources, as JSON objects.
        desired: source resource -> the target payload it asks for
            (``externalId`` set to the source id, no ``id``).
        comparable: a payload or a target resource -> a value equal for
            both exactly when no replace is needed.

    Returns:
        The plan; the inputs are not changed.
    """
    plan = Plan()
    by_external: dict[str, Mapping[str, Any]] = {}
    by_name: dict[str, Mapping[str, Any]] = {}
    unowned = []
    for resource in target:
        external = resource.get("externalId") or ""
        if external and external not in by_external:
            by_external[external] = resource
        elif external:
            unowned.append(resource)  # a second copy: removed below
        else:
            by_name.setdefault(_key(kind, resource), resource)
    claimed: set[str] = set()
    for resource in source:
        payload = desired(resource)
        found = by_external.get(resource["id"]) or by_name.pop(
            _key(kind, resource), None
        )
        if found is None:
            plan.create.append(payload)
            continue
        claimed.add(found["id"])
        plan.matched[resource["id"]] = found["id"]
        if comparable(payload) != comparable(found):
            plan.replace.append(({**payload, "id": found["id"]}, _version(found)))
    for resource in [*by_external.values(), *unowned]:
        if resource["id"] not in claimed:
            plan.delete.append((resource["id"], _version(resource)))
    return plan


def _version(resource: Mapping[str, Any]) -> str:
    return (resource.get("meta") or {}).get("version") or ""


def member_ids(
    members: Iterable[Mapping[str, Any]],
    users: Mapping[str, str],
    groups: Mapping[str, str],
) -> tuple[list[dict[str, str]], int]:
    """Source group members -> target members, sorted by id, and the number
    of members neither map knows (the source names what it does not serve,
    or a group not created yet)."""
    out: dict[str, str] = {}
    unknown = 0
    for member in members:
        value = member.get("value") or ""
        if member.get("type") != GROUP and value in users:
            out[users[value]] = USER
        elif member.get("type") != USER and value in groups:
            out[groups[value]] = GROUP
        else:
            unknown += 1
    return [{"value": v, "type": out[v]} for v in sorted(out)], unknown


def group_comparable(resource: Mapping[str, Any]) -> tuple[Any, ...]:
    """What a group replace would change: its name, owner and member ids."""
    members = sorted(m.get("value") or "" for m in resource.get("members") or ())
    return (resource.get("displayName"), resource.get("externalId"), members)


# -- the shell: SCIM clients and the run ----------------------------------


class _Session:
    """One endpoint's SCIM client, its errors turned into DirectorySyncError."""

    def __init__(self, endpoint: Endpoint, timeout: float):
        self.endpoint = endpoint
        verify: ssl.SSLContext | bool = True
        if endpoint.ca_file:
            try:
                verify = ssl.create_default_context(cafile=endpoint.ca_file)
            except (OSError, ssl.SSLError) as err:
                raise ConfigError(
                    f"{endpoint}: cannot load the CA file {endpoint.ca_file}: {err}"
                ) from None
        self.http = httpx2.AsyncClient(
            base_url=endpoint.url,
            headers={"Authorization": f"Bearer {endpoint.token}"},
            verify=verify,
            timeout=timeout,
        )
        self.scim = AsyncSCIMClient(self.http)

    async def __aenter__(self) -> _Session:
        try:
            await self.call("discover the service", self.scim.discover())
            for kind in (USER, GROUP):
                if self.scim.get_resource_model(kind) is None:
                    raise DirectorySyncError(
                        f"{self.endpoint}: expected a {kind} resource type in "
                        "/ResourceTypes, got none"
                    )
        except BaseException:  # cancelled too: the connections are closed
            await self.http.aclose()
            raise
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.http.aclose()

    def model(self, kind: str) -> Any:
        return self.scim.get_resource_model(kind)

    def extensions(self, kind: str) -> set[str]:
        """The extension schemas the endpoint's ``kind`` resource type takes."""
        for resource_type in self.scim.provider.resource_types:
            if resource_type.id == kind or resource_type.name == kind:
                return {str(e.schema_) for e in resource_type.schema_extensions or ()}
        return set()

    async def call(self, what: str, request: Awaitable[T]) -> T:
        """Await ``request``; a failure becomes a DirectorySyncError naming
        the endpoint, ``what`` and the SCIM error."""
        try:
            return await request
        except SCIMException as err:
            error = err.to_error()
            scim_type = f" ({error.scim_type})" if error.scim_type else ""
            detail = error.detail or str(err)
            problem = f"SCIM error {error.status}{scim_type}: {detail}"
        except SCIMClientException as err:
            notes = "; ".join(getattr(err, "__notes__", ()))
            problem = f"{err}{': ' + notes if notes else ''}"
        except (httpx2.HTTPError, pydantic.ValidationError, ValueError) as err:
            problem = f"{type(err).__name__}: {err}"
        raise DirectorySyncError(
            f"{self.endpoint}: {what} failed: {problem[:_MAX_SHOWN]}"
        ) from None

    async def read_all(self, kind: str, page_size: int) -> list[dict[str, Any]]:
        """Every resource of ``kind``, as JSON objects, page by page."""
        model = self.model(kind)
        found: list[dict[str, Any]] = []
        # A resource that moves between pages while they are read is seen
        # twice (or missed: the next run picks it up); keep the first.
        seen: set[str | None] = set()
        start = 1
        while True:
            page = await self.call(
                f"GET /{kind}s?startIndex={start}&count={page_size}",
                self.scim.query(
                    model,
                    query_parameters=SearchRequest(start_index=start, count=page_size),
                ),
            )
            resources = page.resources or []
            found.extend(
                r.model_dump(scim_ctx=Context.RESOURCE_QUERY_RESPONSE)
                for r in resources
                if r.id not in seen
            )
            seen.update(r.id for r in resources)
            start += len(resources)
            total = page.total_results or 0
            # A page without resources ends the walk even if the total
            # promised more (it changed under us): the next run reads again.
            if not resources or start > total:
                return found

    async def create(self, kind: str, payload: dict[str, Any]) -> tuple[str, str]:
        """POST ``payload``; the new resource's id and version."""
        what = f"POST /{kind}s ({_name(kind, payload)})"
        created = await self.call(what, self.scim.create(self.model(kind), payload))
        return created.id, (created.meta.version if created.meta else None) or ""

    async def replace(self, kind: str, payload: dict[str, Any], version: str) -> str:
        """PUT ``payload`` (If-Match ``version`` when given); the new version."""
        what = f"PUT /{kind}s/{payload['id']} ({_name(kind, payload)})"
        headers = {"If-Match": version} if version else {}
        replaced = await self.call(
            what, self.scim.replace(self.model(kind), payload, headers=headers)
        )
        return (replaced.meta.version if replaced.meta else None) or ""

    async def delete(self, kind: str, resource_id: str, version: str) -> None:
        headers = {"If-Match": version} if version else {}
        await self.call(
            f"DELETE /{kind}s/{resource_id}",
            self.scim.delete(self.model(kind), resource_id, headers=headers),
        )


def _name(kind: str, payload: Mapping[str, Any]) -> str:
    return str(payload.get("userName" if kind == USER else "displayName") or "")


def _user_payload(
    source: Mapping[str, Any],
    core: str,
    extensions: set[str],
    users: Mapping[str, str],
    users_url: str,
) -> dict[str, Any]:
    """The target payload of a source user: its attributes and the
    extensions the target takes, ``externalId`` the source id, an enterprise
    manager's id translated and its ``$ref`` under ``users_url`` (the
    manager left out while it has no target id)."""
    payload = {
        key: value
        for key, value in source.items()
        if key not in _NOT_COPIED and (not key.startswith("urn:") or key in extensions)
    }
    enterprise = payload.get(ENTERPRISE_USER)
    if isinstance(enterprise, dict) and isinstance(enterprise.get("manager"), dict):
        enterprise = dict(enterprise)
        manager = enterprise.pop("manager")
        if manager.get("value") in users:
            manager_id = users[manager["value"]]
            enterprise["manager"] = {
                "value": manager_id,
                "$ref": f"{users_url}/{manager_id}",
            }
        payload[ENTERPRISE_USER] = enterprise
    payload["schemas"] = [core, *sorted(k for k in payload if k.startswith("urn:"))]
    payload["externalId"] = source["id"]
    return payload


def _user_comparable(model: Any) -> Callable[[Mapping[str, Any]], Any]:
    """A target user or payload -> what a replace would send, so that values
    the target normalizes compare equal."""

    def comparable(resource: Mapping[str, Any]) -> Any:
        kept = {k: v for k, v in resource.items() if k not in ("id", "meta", "groups")}
        try:
            dumped = model.model_validate(kept).model_dump(
                scim_ctx=Context.RESOURCE_REPLACEMENT_REQUEST
            )
        except pydantic.ValidationError as err:
            raise DirectorySyncError(
                f"user {resource.get('userName')!r} (externalId "
                f"{resource.get('externalId')!r}) does not fit the target's User "
                f"schema: {str(err)[:_MAX_SHOWN]}"
            ) from None
        dumped.pop("schemas", None)
        dumped.pop("id", None)
        manager = (dumped.get(ENTERPRISE_USER) or {}).get("manager")
        if isinstance(manager, dict):  # only the id is ours to compare
            dumped[ENTERPRISE_USER]["manager"] = manager.get("value")
        return dumped

    return comparable


async def sync_directory(
    source: Endpoint, target: Endpoint, *, page_size: int, timeout: float
) -> SyncSummary:
    """Bring the target's Users and Groups to the source's (one run).

    Returns:
        What changed in the target.

    Raises:
        DirectorySyncError: a request failed; names the endpoint, the request
            and the SCIM error. The writes made before it stay (each is
            whole); the next run finishes the rest.
        ConfigError: a CA file cannot be loaded.
    """
    async with _Session(source, timeout) as ours, _Session(target, timeout) as theirs:
        summary = SyncSummary()
        users = await _sync_users(ours, theirs, page_size, summary)
        await _sync_groups(ours, theirs, page_size, users, summary)
        return summary


async def _sync_users(
    source: _Session, target: _Session, page_size: int, summary: SyncSummary
) -> dict[str, str]:
    """Reconcile the users; return source user id -> target user id."""
    model = target.model(USER)
    core = str(model.__schema__)
    extensions = target.extensions(USER)
    users_url = target.endpoint.url.rstrip("/") + "/Users"
    users: dict[str, str] = {}
    (
        summary.users_created,
        summary.users_updated,
        summary.users_deleted,
    ) = await _reconcile(
        USER,
        target,
        await source.read_all(USER, page_size),
        await target.read_all(USER, page_size),
        lambda user: _user_payload(user, core, extensions, users, users_url),
        _user_comparable(model),
        users,
    )
    return users


async def _sync_groups(
    source: _Session,
    target: _Session,
    page_size: int,
    users: Mapping[str, str],
    summary: SyncSummary,
) -> None:
    """Reconcile the groups, member ids translated to the target's."""
    core = str(target.model(GROUP).__schema__)
    groups: dict[str, str] = {}

    def desired(group: Mapping[str, Any]) -> dict[str, Any]:
        members, _ = member_ids(group.get("members") or (), users, groups)
        return {
            "schemas": [core],
            "displayName": group.get("displayName"),
            "externalId": group["id"],
            "members": members,
        }

    source_groups = await source.read_all(GROUP, page_size)
    (
        summary.groups_created,
        summary.groups_updated,
        summary.groups_deleted,
    ) = await _reconcile(
        GROUP,
        target,
        source_groups,
        await target.read_all(GROUP, page_size),
        desired,
        group_comparable,
        groups,
    )
    for group in source_groups:
        _, unknown = member_ids(group.get("members") or (), users, groups)
        summary.members_unknown += unknown


async def _reconcile(
    kind: str,
    target: _Session,
    sources: list[dict[str, Any]],
    targets: list[dict[str, Any]],
    desired: Callable[[Mapping[str, Any]], dict[str, Any]],
    comparable: Callable[[Mapping[str, Any]], Any],
    ids: dict[str, str],
) -> tuple[int, int, int]:
    """Delete, replace, then create; then replace what refers to a resource
    created in this run (a group member, a manager), now that it has an id.

    ``ids`` (source id -> target id, which ``desired`` reads to translate
    references) is filled as resources are matched and created. Returns
    how many were created, updated and deleted.
    """
    ids.update(plan_resources(kind, sources, targets, desired, comparable).matched)
    plan = plan_resources(kind, sources, targets, desired, comparable)
    for resource_id, version in plan.delete:
        await target.delete(kind, resource_id, version)
    versions: dict[str, str] = {}
    for payload, version in plan.replace:
        versions[payload["id"]] = await target.replace(kind, payload, version)
    by_id = {resource["id"]: resource for resource in sources}
    created: dict[str, dict[str, Any]] = {}
    for planned in plan.create:
        # Built again: resources created earlier in this loop have ids now.
        payload = desired(by_id[planned["externalId"]])
        resource_id, versions[resource_id] = await target.create(kind, payload)
        ids[payload["externalId"]] = resource_id
        created[resource_id] = payload
    updated = {payload["id"] for payload, _ in plan.replace}
    if created:
        now = [*targets, *({**p, "id": i} for i, p in created.items())]
        for payload, version in plan_resources(
            kind, sources, now, desired, comparable
        ).replace:
            resource_id = payload["id"]
            version = versions.get(resource_id, version)
            versions[resource_id] = await target.replace(kind, payload, version)
            if resource_id not in created:
                updated.add(resource_id)
    return len(created), len(updated), len(plan.delete)


# -- the schedule ----------------------------------------------------------


def _log_run(summary: SyncSummary, source: Endpoint, target: Endpoint) -> None:
    log.info(
        "directory synced",
        extra={
            "fields": {
                "component": "collector",
                "source": source.url,
                "target": target.url,
                **summary.as_dict(),
            }
        },
    )


async def run_schedule(
    endpoints: Callable[[], tuple[Endpoint, Endpoint]],
    *,
    interval: float,
    page_size: int,
    timeout: float,
    stop: asyncio.Event | None = None,
) -> int:
    """Run a sync every ``interval`` seconds until SIGTERM or SIGINT (or
    ``stop`` is set, for a caller that embeds the schedule).

    ``endpoints`` is called before each run, so a rotated token file is
    read afresh. A failed run is logged (ERROR, the error in a field) and
    retried at the next tick. Returns the number of runs that failed.
    """
    stop = stop if stop is not None else asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    log.info(
        "directory sync started",
        extra={"fields": {"component": "collector", "interval_seconds": interval}},
    )
    failed = 0
    try:
        while not stop.is_set():
            if not await _scheduled_run(endpoints, stop, page_size, timeout):
                failed += 1
            try:
                await asyncio.wait_for(stop.wait(), interval)
            except TimeoutError:
                pass
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    log.info(
        "directory sync stopped",
        extra={"fields": {"component": "collector", "failed_runs": failed}},
    )
    return failed


async def _scheduled_run(
    endpoints: Callable[[], tuple[Endpoint, Endpoint]],
    stop: asyncio.Event,
    page_size: int,
    timeout: float,
) -> bool:
    """One run of the schedule, cancelled if ``stop`` is set meanwhile;
    whether it did not fail."""
    try:
        source, target = endpoints()
        run = asyncio.create_task(
            sync_directory(source, target, page_size=page_size, timeout=timeout)
        )
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({run, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not run.done():
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)
            log.info(
                "directory sync cancelled",
                extra={"fields": {"component": "collector"}},
            )
            return True
        _log_run(run.result(), source, target)
        return True
    except (DirectorySyncError, ConfigError) as err:
        log.error(
            "directory sync failed",
            extra={"fields": {"component": "collector", "error": str(err)}},
        )
    except Exception:  # noqa: BLE001 - a bug must not end the schedule
        log.exception(
            "directory sync failed", extra={"fields": {"component": "collector"}}
        )
    return False


def read_token(path: str, where: str) -> str:
    """A bearer token from ``path``, whitespace removed.

    Raises:
        ConfigError: unreadable or empty; names ``where``.
    """
    try:
        token = pathlib.Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{where}: cannot read the token: {err}") from None
    if not token:
        raise ConfigError(f"{where}: expected a bearer token in {path}, got none")
    return token


# -- the command -------------------------------------------------------------

SECTION = "directory.pull"


def default_target_url(http: HttpConfig) -> str:
    """The collector's own SCIM endpoint, from its ``http`` section: https
    when ``http.tls`` is set, an unspecified bind address reached on
    loopback.

    Raises:
        ConfigError: HTTP is off or on a port picked at start (0).
    """
    if http.port <= 0:
        raise ConfigError(
            f"{SECTION}.target_url: expected a URL: http.port is {http.port}, so "
            "the collector's SCIM endpoint cannot be derived from it"
        )
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(
        http.host, http.host
    )
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if http.tls.enabled else "http"
    return f"{scheme}://{host}:{http.port}{SCIM_PATH}"


def config_endpoints(config: CollectorConfig) -> tuple[Endpoint, Endpoint]:
    """The source and the target of ``directory.pull``, tokens read now.

    Raises:
        ConfigError: no source URL, a token file unreadable or empty, or a
            target URL that cannot be derived or is plaintext off loopback.
    """
    pull = config.directory.pull
    if not pull.url:
        raise ConfigError(
            f"{SECTION}.url: expected the identity provider's SCIM endpoint, "
            "e.g. https://idp.example.com/scim/v2, got none"
        )
    target_url = pull.target_url or default_target_url(config.http)
    problem = endpoint_url_problem(target_url)
    if problem is not None:
        raise ConfigError(f"{SECTION}.target_url: {problem}")
    source = Endpoint(
        "source",
        pull.url,
        read_token(pull.token_file, f"{SECTION}.token_file"),
        pull.ca_file,
    )
    target = Endpoint(
        "target",
        target_url,
        read_token(pull.target_token_file, f"{SECTION}.target_token_file"),
        pull.target_ca_file,
    )
    return source, target


def check_interval(seconds: float, where: str) -> float:
    """``seconds`` if it is a usable interval, else ConfigError naming
    ``where``."""
    if not MIN_PULL_INTERVAL_SECONDS <= seconds <= MAX_PULL_INTERVAL_SECONDS:
        raise ConfigError(
            f"{where}: expected {MIN_PULL_INTERVAL_SECONDS:g}.."
            f"{MAX_PULL_INTERVAL_SECONDS:g} seconds, got {seconds:g}"
        )
    return seconds


def sync_command(config: CollectorConfig, *, once: bool, every: float | None) -> int:
    """``kynara-collector directory sync``: one run (``--once``, or no
    interval anywhere) printing its summary as a JSON line, or a schedule
    (``--every``, else ``directory.pull.interval_seconds``) until SIGTERM.

    Returns:
        0; a schedule's failed runs are logged, not returned.

    Raises:
        DirectorySyncError: the one run failed (names endpoint and error).
        ConfigError: a setting is missing or wrong (names it).
    """
    import uvloop

    pull = config.directory.pull
    interval = 0.0
    if every is not None:
        interval = check_interval(every, "--every")
    elif not once and pull.interval_seconds:
        interval = pull.interval_seconds
    if interval:
        config_endpoints(config)  # a wrong setting fails the command at start
        uvloop.run(
            run_schedule(
                lambda: config_endpoints(config),
                interval=interval,
                page_size=pull.page_size,
                timeout=pull.timeout_seconds,
            )
        )
        return 0
    source, target = config_endpoints(config)
    summary = uvloop.run(
        sync_directory(
            source, target, page_size=pull.page_size, timeout=pull.timeout_seconds
        )
    )
    _log_run(summary, source, target)
    sys.stdout.write(json.dumps(summary.as_dict(), sort_keys=True) + "\n")
    sys.stdout.flush()
    return 0
