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

1. Read every User and Group of the source, and the target's Users, page
   by page (``startIndex``/``count``), never in one page; the target's
   Groups are read once its Users are written. What is read is taken as
   the whole list (what it lacks is deleted), so a read that does not add
   up fails the run before anything is written (``_Session.read_all``): a
   ``totalResults`` missing, negative or above ``max_resources``, a page
   larger than asked, a page that brings no resource not seen before while
   fewer than ``totalResults`` were seen (``startIndex`` ignored, a page
   empty too early), or more distinct resources than ``totalResults``. The
   walk ends with a page that brings nothing new (the one past the end),
   so a ``totalResults`` that says too few is caught too.
2. Match: a target resource belongs to a source resource when its
   ``externalId`` is the source resource's ``id``. A target resource without
   an ``externalId`` is adopted by the source resource of the same
   ``userName`` (Users, compared in NFC and case-folded, as the collector
   compares them) or ``displayName`` (Groups): it could not be created
   beside it anyway.
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
   translated from source ids to target ids; a member already in the
   target group keeps the ``type`` the target stored, or none
   (``keep_member_types``: ``type`` is immutable, and many IdPs push
   members without one). Users whose new ``userName``
   another renamed user still holds (a swap, ``a1`` <-> ``b1``) are renamed
   in an order that frees each name before it is taken, a cycle broken by
   a temporary name (``<name>~<digits>``) taken for one write.
5. A resource the target refuses (a SCIM 400, 404, 409, 412 or 413: a
   ``userName`` it does not take, a name another holds) or that does not
   fit the target's schema is skipped: logged (WARNING, the SCIM status,
   scimType and detail in fields, and where to fix it: ``refusal_remedy``),
   counted (``skipped``), and the run goes on with the others and
   with the groups (a group gets the members that exist). Its target copy,
   if any, stays as it is, except that a user the source made inactive is
   deactivated there (only ``active`` written): a refused change must not
   keep access open. The command then exits ``EXIT_PARTIAL`` (3), apart
   from a failed run (1).

Each write is one SCIM request, complete or not at all, and a run plans
from what it reads, never from what an earlier run did: a run that fails
half way (the error names the endpoint, the request and the SCIM error)
leaves a target the next run finishes. Scheduled (``--every``,
``directory.pull.interval_seconds``) a failed run is logged and retried at
the next tick; SIGTERM or SIGINT stops the loop (a run in progress is
cancelled: a write cut short is applied by the target or not, and the
next run finishes either way).

Scheduled, with ``directory.pull.metrics_port`` set, the command serves
``/metrics`` on ``directory.pull.metrics_host`` (loopback only: no TLS, no
credentials): runs by outcome, resources written by kind and action, when
the last run that did not fail ended and how long the last run took
(``DirectorySyncMetrics``). Resources are counted per run, when it ends:
a failed run counts as failed and its writes are not counted by action;
the next run plans from what the target then holds and counts what it
still had to write.

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
import secrets
import signal
import ssl
import sys
import time
import unicodedata
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from typing import Any, TypeVar

import httpx2
import pydantic
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
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
from kynara_sidecar.collector.metrics import DirectorySyncMetrics
from kynara_sidecar.errors import ConfigError, ServiceError
from kynara_sidecar.policy.names import canonical_name

__all__ = [
    "DEFAULT_MAX_DELETE_FRACTION",
    "DEFAULT_MAX_RESOURCES",
    "MAX_DELETES_UNCHECKED",
    "EXIT_PARTIAL",
    "DirectorySyncError",
    "Endpoint",
    "Plan",
    "ResourceRefused",
    "SyncSummary",
    "check_interval",
    "config_endpoints",
    "default_target_url",
    "keep_member_types",
    "member_ids",
    "name_key",
    "order_renames",
    "plan_resources",
    "read_token",
    "refusal_remedy",
    "run_schedule",
    "serve_metrics",
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
# Resources of one type one read takes at most (``directory.pull.
# max_resources``): a source whose totalResults says more fails the run
# rather than being read for hours. Each page must bring a resource not
# seen before, so this bounds the pages too.
DEFAULT_MAX_RESOURCES = 100_000
# The largest share of the target's owned users one run may delete
# (``directory.pull.max_delete_fraction``): a source answering with far
# too few users (a wrong tenant's token) fails the run before any write.
# A run deleting at most MAX_DELETES_UNCHECKED users is never held back.
DEFAULT_MAX_DELETE_FRACTION = 0.5
MAX_DELETES_UNCHECKED = 5
# Exit status of a run that applied all but the resources the target
# refused (``SyncSummary.skipped``); a failed run exits 1.
EXIT_PARTIAL = 3
# SCIM statuses that refuse one resource, not the run: the resource is
# skipped and the run goes on. Others (401, 403, 429, 5xx) fail the run.
_REFUSED_STATUSES = frozenset({400, 404, 409, 412, 413})

T = TypeVar("T")


class DirectorySyncError(ServiceError):
    """A sync run failed; the message names the endpoint (source or target,
    and its URL), the request and the SCIM error. What was applied before
    stays applied; the next run finishes the rest."""


class ResourceRefused(DirectorySyncError):
    """The endpoint refused one resource (a status of ``_REFUSED_STATUSES``):
    a write skips it; a read still fails the run.

    ``status``, ``scim_type`` and ``detail`` are the SCIM error's (0 and ""
    for a payload that does not fit the target's schema, refused before it
    is sent): a skipped resource's log line names them and what to fix
    (``refusal_remedy``)."""

    def __init__(
        self, message: str, *, status: int = 0, scim_type: str = "", detail: str = ""
    ):
        super().__init__(message)
        self.status = status
        self.scim_type = scim_type
        self.detail = detail


def refusal_remedy(err: ResourceRefused) -> str:
    """Where a refused write is to be fixed, from the SCIM error: a refusal
    about what the target already holds (an immutable value, a name another
    resource holds, a copy changed or gone meanwhile) is not the source's
    to fix."""
    if err.scim_type == "mutability":
        return (
            "the target's copy holds a value this write may not change (an "
            "immutable attribute, see detail): correct or delete that copy in "
            "the target; the next run writes or creates it again"
        )
    if err.scim_type == "uniqueness" or err.status == 409:
        return (
            "another resource in the target holds this name: rename or delete "
            "it there, or set its externalId to this source id so the run owns it"
        )
    if err.status in (404, 412):
        return "the target's copy changed during the run: the next run retries"
    return "the target does not take the source's value: fix it at the source"


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
    # Added to the message of a 401 from this endpoint: where its token is
    # to be accepted ("" for none).
    unauthorized_hint: str = ""

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
    # Resources the target refused or that do not fit its schema: left as
    # they are in the target, each logged with its error; the run is partial.
    skipped: int = 0
    # ``skipped`` by resource type ("User", "Group"), for the metrics; left
    # out of ``as_dict``.
    skipped_by_kind: dict[str, int] = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict[str, int]:
        """The counts by name, for the summary line and the log."""
        counts = dataclasses.asdict(self)
        del counts["skipped_by_kind"]
        return counts

    def written(self) -> dict[tuple[str, str], int]:
        """The counts by (kind, action), as DirectorySyncMetrics labels them."""
        out = {}
        for kind, prefix in (("user", "users"), ("group", "groups")):
            for action in ("created", "updated", "deleted"):
                out[kind, action] = getattr(self, f"{prefix}_{action}")
        out["user", "skipped"] = self.skipped_by_kind.get(USER, 0)
        out["group", "skipped"] = self.skipped_by_kind.get(GROUP, 0)
        return out

    @property
    def changed(self) -> int:
        """How many writes the run made."""
        return sum(self.as_dict().values()) - self.members_unknown - self.skipped


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


def name_key(user_name: str) -> str:
    """A ``userName`` as the collector compares it: its NFC form (the
    principal id, ``policy.names``) case-folded, as SCIM compares userNames;
    two users with equal keys cannot both exist in the target."""
    try:
        name = canonical_name(user_name)
    except ValueError:  # the target refuses it; still a key to compare
        name = unicodedata.normalize("NFC", user_name)
    return unicodedata.normalize("NFC", name.casefold())


def _key(kind: str, resource: Mapping[str, Any]) -> str:
    """The name a resource without ``externalId`` is adopted by."""
    name = resource.get("userName" if kind == USER else "displayName") or ""
    return name_key(name) if kind == USER else name


def plan_resources(
    kind: str,
    source: Iterable[Mapping[str, Any]],
    target: Iterable[Mapping[str, Any]],
    desired: Callable[[Mapping[str, Any]], dict[str, Any]],
    comparable: Callable[[Mapping[str, Any]], Any],
    skip: Collection[str] = (),
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
        skip: source ids that get no write: their target copy (if any) is
            matched and kept as it is, never created, replaced or deleted.

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
        found = by_external.get(resource["id"]) or by_name.pop(
            _key(kind, resource), None
        )
        if found is not None:
            claimed.add(found["id"])
            plan.matched[resource["id"]] = found["id"]
        if resource["id"] in skip:
            continue
        payload = desired(resource)
        if found is None:
            plan.create.append(payload)
        elif comparable(payload) != comparable(found):
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


def keep_member_types(
    payload: Mapping[str, Any], stored: Mapping[str, Any]
) -> dict[str, Any]:
    """A group replace ``payload`` whose members already in the ``stored``
    target group carry its ``type`` as stored, or none.

    ``members[].type`` is immutable (RFC 7643 §4.2): a target that stored a
    member without one (many IdPs push only ``value``) refuses a replace
    setting it (400 ``mutability``), and an omitted one keeps what is
    stored. Members new to the group keep the type the payload gives."""
    stored_types: dict[str, set[Any]] = {}
    for member in stored.get("members") or ():
        stored_types.setdefault(member.get("value") or "", set()).add(
            member.get("type")
        )
    members = []
    for member in payload.get("members") or ():
        types = stored_types.get(member.get("value") or "")
        if types is not None and types != {member.get("type")}:
            member = {k: v for k, v in member.items() if k != "type"}
        members.append(member)
    return {**payload, "members": members}


def group_comparable(resource: Mapping[str, Any]) -> tuple[Any, ...]:
    """What a group replace would change: its name, owner and member ids."""
    members = sorted(m.get("value") or "" for m in resource.get("members") or ())
    return (resource.get("displayName"), resource.get("externalId"), members)


def order_renames(
    replace: Iterable[dict[str, Any]],
    names: Mapping[str, str],
    temporary: Callable[[str], str],
) -> list[tuple[dict[str, Any], bool]]:
    """User replaces in an order where no write takes a ``userName`` that
    another user still holds (the target would refuse it as taken).

    A replace whose new name (``name_key``) another user holds waits until
    that user's own replace frees it. When every one left waits (a swap,
    ``a1`` <-> ``b1``, or a longer cycle), one whose current name another
    waiting replace wants is first written under ``temporary(its current
    name)``, which frees that name; its own replace comes later. A replace
    waiting on a user that no write renames is left for the end (the target
    refuses it: skipped).

    Args:
        replace: payloads (with the target ``id``), in their planned order.
        names: target id -> current ``userName`` of every target user
            (after the run's deletes).
        temporary: a current userName -> a name no user holds.

    Returns:
        ``(payload, is_temporary)`` in write order: each planned payload
        once, after a temporary copy of it (its ``userName`` replaced) when
        one is needed.
    """
    current = dict(names)
    holder = {name_key(name): rid for rid, name in current.items()}
    pending = list(replace)
    steps: list[tuple[dict[str, Any], bool]] = []

    def take(payload: dict[str, Any], user_name: str) -> None:
        rid = payload["id"]
        old = name_key(current.get(rid, ""))
        if holder.get(old) == rid:
            del holder[old]
        holder[name_key(user_name)] = rid
        current[rid] = user_name

    while pending:
        waiting = []
        for payload in pending:
            held_by = holder.get(name_key(payload.get("userName") or ""))
            if held_by is None or held_by == payload["id"]:
                steps.append((payload, False))
                take(payload, payload.get("userName") or "")
            else:
                waiting.append(payload)
        if len(waiting) == len(pending):
            wanted = {name_key(p.get("userName") or "") for p in waiting}
            breaker = next(
                (p for p in waiting if name_key(current.get(p["id"], "")) in wanted),
                None,
            )
            if breaker is None:  # held by users no write renames
                steps.extend((payload, False) for payload in waiting)
                return steps
            name = temporary(current.get(breaker["id"], ""))
            steps.append(({**breaker, "userName": name}, True))
            take(breaker, name)
        pending = waiting
    return steps


def _temporary_name(user_name: str) -> str:
    """A name for one write of a rename cycle: digits only are added, so a
    name of one script stays a valid principal id."""
    return f"{user_name}~{secrets.randbelow(10**12):012d}"


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
        # Added to a 401's message (``Endpoint.unauthorized_hint``).
        self.unauthorized_hint = endpoint.unauthorized_hint

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
        the endpoint, ``what`` and the SCIM error (ResourceRefused when the
        status refuses the one resource)."""
        refusal: dict[str, Any] | None = None
        status = 0
        try:
            return await request
        except SCIMException as err:
            error = err.to_error()
            scim_type = f" ({error.scim_type})" if error.scim_type else ""
            detail = error.detail or str(err)
            problem = f"SCIM error {error.status}{scim_type}: {detail}"
            status = int(error.status or 0)
            if status in _REFUSED_STATUSES:
                refusal = {
                    "status": status,
                    "scim_type": str(error.scim_type or ""),
                    "detail": detail[:_MAX_SHOWN],
                }
        except SCIMClientException as err:
            notes = "; ".join(getattr(err, "__notes__", ()))
            problem = f"{err}{': ' + notes if notes else ''}"
        except (httpx2.HTTPError, pydantic.ValidationError, ValueError) as err:
            problem = f"{type(err).__name__}: {err}"
        message = f"{self.endpoint}: {what} failed: {problem[:_MAX_SHOWN]}"
        if refusal is not None:
            raise ResourceRefused(message, **refusal) from None
        if status == 401 and self.unauthorized_hint:
            message += f"; {self.unauthorized_hint}"
        raise DirectorySyncError(message) from None

    async def read_all(
        self, kind: str, page_size: int, max_resources: int
    ) -> list[dict[str, Any]]:
        """Every resource of ``kind``, as JSON objects, page by page.

        The list is reconciled as the whole (what it lacks is deleted), so
        pages that do not add up fail the read rather than return part of
        it; the module docstring lists the checks. The walk ends with a
        page bringing no resource not seen before once ``totalResults``
        (the largest any page gave) are seen: the page past the end, which
        also catches a ``totalResults`` saying too few.

        Raises:
            DirectorySyncError: a request failed or the pages do not add up
                (names the request and what was wrong).
        """
        model = self.model(kind)
        found: list[dict[str, Any]] = []
        seen: set[str] = set()
        # The largest totalResults a page gave: a resource removed while the
        # pages are read shifts the rest back, so one may be skipped over;
        # the count then falls short and the run fails (the next reads again).
        expected = 0
        start = 1
        while True:
            what = f"GET /{kind}s?startIndex={start}&count={page_size}"
            page = await self.call(
                what,
                self.scim.query(
                    model,
                    query_parameters=SearchRequest(start_index=start, count=page_size),
                ),
            )
            resources = page.resources or []
            total = page.total_results
            # Resources not seen before (a repeat within the page counts once).
            fresh = list({r.id: r for r in resources if r.id not in seen}.values())
            problem = ""
            if total is None or total < 0:
                problem = f"expected totalResults (a count), got {total!r}"
            elif total > max_resources:
                problem = (
                    f"totalResults {total} is above directory.pull.max_resources "
                    f"({max_resources})"
                )
            elif len(resources) > page_size:
                problem = (
                    f"expected at most {page_size} resources (count), got "
                    f"{len(resources)}"
                )
            elif any(not r.id for r in fresh):
                problem = "expected every resource to have an id, got one without"
            else:
                expected = max(expected, total)
                seen.update(r.id for r in fresh)
                found.extend(
                    r.model_dump(scim_ctx=Context.RESOURCE_QUERY_RESPONSE)
                    for r in fresh
                )
                if len(seen) > expected:
                    problem = (
                        f"got {len(seen)} distinct {kind}s, more than totalResults "
                        f"({expected})"
                    )
                elif not fresh and len(seen) >= expected:
                    return found
                elif not fresh:
                    problem = (
                        f"got no {kind} not seen before ({len(resources)} on the "
                        f"page) with {len(seen)} of totalResults {expected} read: "
                        "the pages do not add up (startIndex not followed, or the "
                        "list changed while it was read)"
                    )
            if problem:
                raise DirectorySyncError(
                    f"{self.endpoint}: {what} failed: {problem}; the list cannot "
                    "be taken as complete"
                )
            start += len(resources)

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
            raise ResourceRefused(
                f"user {resource.get('userName')!r} (externalId "
                f"{resource.get('externalId')!r}) does not fit the target's User "
                f"schema: {str(err)[:_MAX_SHOWN]}",
                detail=str(err)[:_MAX_SHOWN],
            ) from None
        dumped.pop("schemas", None)
        dumped.pop("id", None)
        manager = (dumped.get(ENTERPRISE_USER) or {}).get("manager")
        if isinstance(manager, dict):  # only the id is ours to compare
            dumped[ENTERPRISE_USER]["manager"] = manager.get("value")
        return dumped

    return comparable


async def sync_directory(
    source: Endpoint,
    target: Endpoint,
    *,
    page_size: int,
    timeout: float,
    max_resources: int = DEFAULT_MAX_RESOURCES,
    max_delete_fraction: float = DEFAULT_MAX_DELETE_FRACTION,
    force: bool = False,
) -> SyncSummary:
    """Bring the target's Users and Groups to the source's (one run).

    The source's Users and Groups and the target's Users are read before
    anything is written, so a source whose pages do not add up fails the
    run with the target untouched; so does one whose users would delete
    more than ``max_delete_fraction`` of the target's owned users (and more
    than ``MAX_DELETES_UNCHECKED``), unless ``force``. The target's Groups
    are read after its Users are written (deleting a user changes the
    groups holding it).

    Returns:
        What changed in the target, and how many resources it refused
        (``skipped``: a partial run).

    Raises:
        DirectorySyncError: a request failed other than by refusing one
            resource, or a list did not add up; names the endpoint, the
            request and the SCIM error. The writes made before it stay (each
            is whole); the next run finishes the rest.
        ConfigError: a CA file cannot be loaded.
    """
    async with _Session(source, timeout) as ours, _Session(target, timeout) as theirs:
        source_users = await ours.read_all(USER, page_size, max_resources)
        source_groups = await ours.read_all(GROUP, page_size, max_resources)
        target_users = await theirs.read_all(USER, page_size, max_resources)
        if not force:
            _check_deletes(source_users, target_users, max_delete_fraction, target)
        writer = _Writer(theirs, SyncSummary())
        users = await _sync_users(writer, source_users, target_users)
        target_groups = await theirs.read_all(GROUP, page_size, max_resources)
        await _sync_groups(writer, source_groups, target_groups, users)
        return writer.summary


def _check_deletes(
    sources: list[dict[str, Any]],
    targets: list[dict[str, Any]],
    max_fraction: float,
    target: Endpoint,
) -> None:
    """Fail the run when it would delete more than ``max_fraction`` of the
    target's owned users (and more than ``MAX_DELETES_UNCHECKED``).

    Raises:
        DirectorySyncError: names the counts, the setting and ``--force``.
    """
    owned = sum(1 for user in targets if user.get("externalId"))
    plan = plan_resources(USER, sources, targets, lambda _: {}, lambda _: None)
    deletes = len(plan.delete)
    if deletes <= MAX_DELETES_UNCHECKED or deletes <= max_fraction * owned:
        return
    raise DirectorySyncError(
        f"target {target.url}: the run would delete {deletes} of its {owned} "
        f"synced users, more than directory.pull.max_delete_fraction "
        f"({max_fraction:g}) allows, with the source listing {len(sources)} "
        "users; nothing was written. Check the source's token and tenant "
        "(directory.pull.token_file), or run `kynara-collector directory sync "
        "--once --force` if the deletes are meant"
    )


class _Writer:
    """The target's writes of one run: a resource the target refuses is
    skipped (logged, counted) instead of failing the run."""

    def __init__(self, target: _Session, summary: SyncSummary):
        self.target = target
        self.summary = summary
        # Source ids per kind that were refused: no further write this run.
        self.refused: dict[str, set[str]] = {USER: set(), GROUP: set()}

    async def write(
        self,
        kind: str,
        resource: Mapping[str, Any],
        request: Callable[[], Awaitable[T]],
    ) -> tuple[bool, T | None]:
        """Await ``request()``; ``(False, None)`` when the target refused
        ``resource`` (a payload or a target resource), which is skipped."""
        try:
            return True, await request()
        except ResourceRefused as err:
            self.skip(kind, resource, err)
            return False, None

    def skip(
        self, kind: str, resource: Mapping[str, Any], err: ResourceRefused
    ) -> None:
        """Leave ``resource`` out of this run: log it with what the target
        refused (the SCIM status, scimType and detail) and where to fix it
        (``refusal_remedy``), count it."""
        external = resource.get("externalId") or ""
        if external:
            self.refused[kind].add(external)
        self.summary.skipped += 1
        by_kind = self.summary.skipped_by_kind
        by_kind[kind] = by_kind.get(kind, 0) + 1
        log.warning(
            "directory sync skipped a resource",
            extra={
                "fields": {
                    "component": "collector",
                    "resource_type": kind,
                    "name": _name(kind, resource),
                    "external_id": external,
                    "target_id": resource.get("id") or "",
                    "status": err.status,
                    "scim_type": err.scim_type,
                    "detail": err.detail,
                    "fix": refusal_remedy(err),
                    "error": str(err),
                }
            },
        )


async def _sync_users(
    writer: _Writer, sources: list[dict[str, Any]], targets: list[dict[str, Any]]
) -> dict[str, str]:
    """Reconcile the users; return source user id -> target user id."""
    target = writer.target
    model = target.model(USER)
    core = str(model.__schema__)
    extensions = target.extensions(USER)
    users_url = target.endpoint.url.rstrip("/") + "/Users"
    users: dict[str, str] = {}
    (
        writer.summary.users_created,
        writer.summary.users_updated,
        writer.summary.users_deleted,
    ) = await _reconcile(
        USER,
        writer,
        sources,
        targets,
        lambda user: _user_payload(user, core, extensions, users, users_url),
        _user_comparable(model),
        users,
    )
    return users


async def _sync_groups(
    writer: _Writer,
    sources: list[dict[str, Any]],
    targets: list[dict[str, Any]],
    users: Mapping[str, str],
) -> None:
    """Reconcile the groups, member ids translated to the target's (a member
    the target has no user for, refused or unknown, is left out)."""
    core = str(writer.target.model(GROUP).__schema__)
    groups: dict[str, str] = {}

    def desired(group: Mapping[str, Any]) -> dict[str, Any]:
        members, _ = member_ids(group.get("members") or (), users, groups)
        return {
            "schemas": [core],
            "displayName": group.get("displayName"),
            "externalId": group["id"],
            "members": members,
        }

    summary = writer.summary
    (
        summary.groups_created,
        summary.groups_updated,
        summary.groups_deleted,
    ) = await _reconcile(
        GROUP, writer, sources, targets, desired, group_comparable, groups
    )
    # Refused resources are served by the source: not unknown members.
    known_users = {**dict.fromkeys(writer.refused[USER], ""), **users}
    known_groups = {**dict.fromkeys(writer.refused[GROUP], ""), **groups}
    for group in sources:
        _, unknown = member_ids(group.get("members") or (), known_users, known_groups)
        summary.members_unknown += unknown


async def _reconcile(
    kind: str,
    writer: _Writer,
    sources: list[dict[str, Any]],
    targets: list[dict[str, Any]],
    desired: Callable[[Mapping[str, Any]], dict[str, Any]],
    comparable: Callable[[Mapping[str, Any]], Any],
    ids: dict[str, str],
) -> tuple[int, int, int]:
    """Delete, replace (user renames in an order that frees each name
    first), then create; then replace what refers to a resource created in
    this run (a group member, a manager), now that it has an id.

    ``ids`` (source id -> target id, which ``desired`` reads to translate
    references) is filled as resources are matched and created. A resource
    the target refuses, or whose payload does not fit its schema, is
    skipped (``writer.skip``). Returns how many were created, updated and
    deleted.
    """
    target = writer.target
    skip = writer.refused[kind]
    for resource in sources:
        try:
            comparable(desired(resource))
        except ResourceRefused as err:
            writer.skip(kind, {**resource, "externalId": resource["id"]}, err)
    # Matched first: ``desired`` translates references through ``ids``.
    # Matching needs no payloads, so this pass skips every source (none is
    # built or compared twice).
    every = {resource["id"] for resource in sources}
    ids.update(
        plan_resources(kind, sources, targets, desired, comparable, every).matched
    )
    plan = plan_resources(kind, sources, targets, desired, comparable, skip)
    current = {resource["id"]: resource for resource in targets}
    deleted = 0
    for resource_id, version in plan.delete:
        gone = current[resource_id]
        done, _ = await writer.write(
            kind,
            gone,
            lambda rid=resource_id, v=version: target.delete(kind, rid, v),
        )
        if done:
            deleted += 1
            del current[resource_id]
    versions = {payload["id"]: version for payload, version in plan.replace}
    updated: set[str] = set()
    payloads = [payload for payload, _ in plan.replace]
    if kind == USER:
        names = {rid: r.get("userName") or "" for rid, r in current.items()}
        steps = order_renames(payloads, names, _temporary_name)
    else:
        steps = [(payload, False) for payload in payloads]
    for payload, temporary in steps:
        if payload["externalId"] in skip:  # its temporary write was refused
            continue
        resource_id = payload["id"]
        if kind == GROUP:
            payload = keep_member_types(payload, current[resource_id])
        done, version = await writer.write(
            kind,
            payload,
            lambda p=payload: target.replace(kind, p, versions[p["id"]]),
        )
        if done:
            versions[resource_id] = version or ""
            current[resource_id] = payload
            if not temporary:
                updated.add(resource_id)
    if kind == USER:
        updated |= await _deactivate_refused(writer, sources, current, ids, versions)
    by_id = {resource["id"]: resource for resource in sources}
    created: set[str] = set()
    for planned in plan.create:
        # Built again: resources created earlier in this loop have ids now.
        payload = desired(by_id[planned["externalId"]])
        done, made = await writer.write(
            kind, payload, lambda p=payload: target.create(kind, p)
        )
        if done and made is not None:
            resource_id, versions[resource_id] = made
            ids[payload["externalId"]] = resource_id
            current[resource_id] = {**payload, "id": resource_id}
            created.add(resource_id)
    if created:
        again = plan_resources(
            kind, sources, list(current.values()), desired, comparable, skip
        )
        for payload, _ in again.replace:
            resource_id = payload["id"]
            if kind == GROUP:
                payload = keep_member_types(payload, current[resource_id])
            done, version = await writer.write(
                kind,
                payload,
                lambda p=payload: target.replace(kind, p, versions.get(p["id"], "")),
            )
            if done:
                versions[resource_id] = version or ""
                current[resource_id] = payload
                if resource_id not in created:
                    updated.add(resource_id)
    return len(created), len(updated), deleted


async def _deactivate_refused(
    writer: _Writer,
    sources: Iterable[Mapping[str, Any]],
    current: dict[str, dict[str, Any]],
    ids: Mapping[str, str],
    versions: dict[str, str],
) -> set[str]:
    """Deactivate the target copy of each skipped user the source made
    inactive: the change the target refused (a new userName it does not
    take, say) must not keep access open. Only ``active`` is written, the
    copy as the target has it otherwise. Returns the target ids written.
    """
    target = writer.target
    written: set[str] = set()
    for user in sources:
        resource_id = ids.get(user["id"], "")
        found = current.get(resource_id)
        if (
            user["id"] not in writer.refused[USER]
            or user.get("active") is not False
            or found is None
            or found.get("active") is False
        ):
            continue
        payload = {k: v for k, v in found.items() if k not in ("meta", "groups")}
        payload["active"] = False
        try:
            version = await target.replace(USER, payload, versions.get(resource_id, ""))
        except ResourceRefused as err:
            log.error(
                "directory sync could not deactivate a user",
                extra={
                    "fields": {
                        "component": "collector",
                        "name": _name(USER, found),
                        "external_id": user["id"],
                        "error": str(err),
                    }
                },
            )
            continue
        versions[resource_id] = version
        current[resource_id] = payload
        written.add(resource_id)
        log.warning(
            "directory sync deactivated a skipped user",
            extra={
                "fields": {
                    "component": "collector",
                    "name": _name(USER, found),
                    "external_id": user["id"],
                }
            },
        )
    return written


# -- the schedule ----------------------------------------------------------


def _log_run(summary: SyncSummary, source: Endpoint, target: Endpoint) -> None:
    """The run's summary; WARNING when it skipped resources (partial)."""
    log.log(
        logging.WARNING if summary.skipped else logging.INFO,
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
    max_resources: int = DEFAULT_MAX_RESOURCES,
    metrics: DirectorySyncMetrics | None = None,
    max_delete_fraction: float = DEFAULT_MAX_DELETE_FRACTION,
) -> int:
    """Run a sync every ``interval`` seconds until SIGTERM or SIGINT (or
    ``stop`` is set, for a caller that embeds the schedule).

    ``endpoints`` is called before each run, so a rotated token file is
    read afresh. A failed run is logged (ERROR, the error in a field) and
    retried at the next tick; a partial one (resources skipped) is logged
    as a WARNING and counts as run. Each run that ends is counted in
    ``metrics`` when given. Returns the number of runs that failed.
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
            if not await _scheduled_run(
                endpoints,
                stop,
                page_size,
                timeout,
                max_resources,
                metrics,
                max_delete_fraction,
            ):
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
    max_resources: int,
    metrics: DirectorySyncMetrics | None = None,
    max_delete_fraction: float = DEFAULT_MAX_DELETE_FRACTION,
) -> bool:
    """One run of the schedule, cancelled if ``stop`` is set meanwhile;
    whether it did not fail. A run that ends (not cancelled) is counted in
    ``metrics``."""
    started = time.monotonic()

    def count(outcome: str, summary: SyncSummary | None = None) -> None:
        if metrics is not None:
            written = summary.written() if summary is not None else None
            seconds = time.monotonic() - started
            metrics.count_run(outcome, seconds, time.time(), written)

    try:
        source, target = endpoints()
        run = asyncio.create_task(
            sync_directory(
                source,
                target,
                page_size=page_size,
                timeout=timeout,
                max_resources=max_resources,
                max_delete_fraction=max_delete_fraction,
            )
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
        summary = run.result()
        _log_run(summary, source, target)
        count("partial" if summary.skipped else "ok", summary)
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
    count("failed")
    return False


async def serve_metrics(
    metrics: DirectorySyncMetrics, host: str, port: int
) -> web.AppRunner:
    """Serve ``GET /metrics`` (Prometheus text) of ``metrics`` on
    ``host``:``port``, a loopback address (``directory.pull.metrics_host``
    is checked to be one: the listener has no TLS and no credentials).
    The caller cleans the returned runner up.

    Raises:
        ConfigError: the address cannot be bound (names the setting).
    """

    async def scrape(_request: web.Request) -> web.Response:
        body = generate_latest(metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", scrape)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as err:
        await runner.cleanup()
        raise ConfigError(
            f"{SECTION}.metrics_port: cannot listen on {host} port {port}: {err}"
        ) from None
    log.info(
        "directory sync metrics listening",
        extra={"fields": {"component": "collector", "host": host, "port": port}},
    )
    return runner


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


# Why the collector's own endpoint answers 401 to a token of this command.
OWN_TARGET_HINT = (
    f"the collector takes only the secrets of scim.credentials: add {SECTION}."
    "target_token_file's secret to scim.credentials (as a secret_file of its "
    "own) and restart the collector: secrets are read at start"
)


def _is_own_endpoint(config: CollectorConfig, target_url: str) -> bool:
    """Whether ``target_url`` is the collector's own SCIM endpoint (the one
    ``default_target_url`` derives from ``http``)."""
    if not config.directory.pull.target_url:
        return True
    try:
        own = default_target_url(config.http)
    except ConfigError:
        return False
    return target_url.rstrip("/") == own


def _scim_secrets(config: CollectorConfig) -> set[bytes] | None:
    """The secrets of ``scim.credentials``, or None when they cannot be read
    (the collector then does not start either; its own error says why)."""
    try:
        loaded = config.scim.load_credentials()
    except ConfigError:
        return None
    return {secret for secret, _roles in loaded.values()}


def config_endpoints(config: CollectorConfig) -> tuple[Endpoint, Endpoint]:
    """The source and the target of ``directory.pull``, tokens read now.

    When the target is the collector's own endpoint (this command reads
    the collector's config), a target token that is none of
    ``scim.credentials``' secrets is logged at WARNING before any call (the
    collector will answer 401), and a 401 from the target then names the
    fix (``OWN_TARGET_HINT``).

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
        unauthorized_hint=f"the source does not take {SECTION}.token_file's token",
    )
    target_token = read_token(pull.target_token_file, f"{SECTION}.target_token_file")
    hint = f"the target does not take {SECTION}.target_token_file's token"
    if _is_own_endpoint(config, target_url):
        hint = OWN_TARGET_HINT
        known = _scim_secrets(config)
        if known is not None and target_token.encode() not in known:
            log.warning(
                "directory sync target token is not a scim.credentials secret",
                extra={
                    "fields": {
                        "component": "collector",
                        "setting": f"{SECTION}.target_token_file",
                        "target": target_url,
                        "hint": OWN_TARGET_HINT,
                    }
                },
            )
    target = Endpoint(
        "target",
        target_url,
        target_token,
        pull.target_ca_file,
        unauthorized_hint=hint,
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


def sync_command(
    config: CollectorConfig, *, once: bool, every: float | None, force: bool = False
) -> int:
    """``kynara-collector directory sync``: one run (``--once``, or no
    interval anywhere) printing its summary as a JSON line, or a schedule
    (``--every``, else ``directory.pull.interval_seconds``) until SIGTERM,
    serving ``/metrics`` when ``directory.pull.metrics_port`` is set.
    ``force`` lets the one run delete more than
    ``directory.pull.max_delete_fraction`` allows; a schedule refuses it
    (it would hold the guard off for every run).

    Returns:
        0, or ``EXIT_PARTIAL`` when the one run skipped resources the target
        refused; a schedule's failed and partial runs are logged, not
        returned.

    Raises:
        DirectorySyncError: the one run failed (names endpoint and error).
        ConfigError: a setting is missing or wrong (names it).
    """
    import uvloop

    pull = config.directory.pull
    max_resources = pull.max_resources
    interval = 0.0
    if every is not None:
        interval = check_interval(every, "--every")
    elif not once and pull.interval_seconds:
        interval = pull.interval_seconds
    if interval and force:
        raise ConfigError(
            "--force: expected a single run (--once), not a schedule: it would "
            "let every run delete past directory.pull.max_delete_fraction"
        )
    if interval:
        config_endpoints(config)  # a wrong setting fails the command at start

        async def schedule() -> None:
            metrics = DirectorySyncMetrics() if pull.metrics_port else None
            runner = None
            if metrics is not None:
                runner = await serve_metrics(
                    metrics, pull.metrics_host, pull.metrics_port
                )
            try:
                await run_schedule(
                    lambda: config_endpoints(config),
                    interval=interval,
                    page_size=pull.page_size,
                    timeout=pull.timeout_seconds,
                    max_resources=max_resources,
                    metrics=metrics,
                    max_delete_fraction=pull.max_delete_fraction,
                )
            finally:
                if runner is not None:
                    await runner.cleanup()

        uvloop.run(schedule())
        return 0
    source, target = config_endpoints(config)
    summary = uvloop.run(
        sync_directory(
            source,
            target,
            page_size=pull.page_size,
            timeout=pull.timeout_seconds,
            max_resources=max_resources,
            max_delete_fraction=pull.max_delete_fraction,
            force=force,
        )
    )
    _log_run(summary, source, target)
    sys.stdout.write(json.dumps(summary.as_dict(), sort_keys=True) + "\n")
    sys.stdout.flush()
    return EXIT_PARTIAL if summary.skipped else 0
