"""The collector's SCIM 2.0 service provider: identity providers provision
users, agents and groups, and each change becomes a directory revision.

Served on the collector's HTTP listener under ``/scim/v2/`` (``/scim/``
without the version works too, RFC 7644 §3.13), with ``scim.enabled``. The
protocol is scim2-server's: each aiohttp request becomes a framework-free
``ScimRequest``, an ``AsyncScimHandler`` answers it (filters, PATCH paths,
ETags, sorting, paging, bulk and discovery are the library's), and its
``ScimResponse`` goes back as is. Nothing here parses a filter or a path.

Resources:

- ``/Users``: core User with the enterprise extension and the Kynara
  principal extension ``urn:kynara:params:scim:schemas:extension:principal:2.0:User``
  (``kind``: "user" or "agent", default user; ``owner``: the team owning an
  agent). An agent is a User with ``kind: agent``: an IdP that provisions
  users provisions agents with the same connector, and groups hold both.
- ``/Groups``: core Group; ``members`` name users by their SCIM id. A
  User's read-only ``groups`` lists the Groups naming it (filled in on
  read, never stored), and deleting a User takes it out of their members.

Principals (what the directory holds, ``principals_of``): one per User,
``id`` its ``userName`` (in NFC; a name the policy engine refuses, see
``policy.names.canonical_name``, is answered 400 ``invalidValue`` naming
``userName``), ``kind`` from the extension, ``active`` as given, ``roles``
the union of ``scim.group_roles`` over the display names of the groups it
is a direct member of, and ``attributes``: ``email`` (the primary email,
else the first), ``display_name``, ``groups`` (sorted display names), the
enterprise extension's ``employee_number``, ``cost_center``,
``organization``, ``division``, ``department`` and ``manager`` (the
manager's principal id), and ``owner``, each only when given. Nested
groups give no roles; a member id that names no User is ignored.

Storage (``ScimStore``): every resource in memory (scim2-server's
``InMemoryStorage``: indexes, filters, uniqueness) and in an LMDB
environment of its own (``scim.path``). A write is committed (and synced)
before it is answered; a failed commit undoes the change in memory and is
answered 500. ``meta`` (ids, created, lastModified, version) is stored, so
ETags survive a restart; versions come from a counter kept in the same
transaction. A User's ETag also covers the groups it shows (``ScimStore``
says how). Passwords are never stored (``changePassword`` is not
supported; a ``password`` sent is dropped, and a PATCH of it alone is
answered 204 with nothing changed). Writes go one at a time; reads wait
for none of them and see the last committed state (``AsyncScimStore``).

Limits: a search filter holds at most ``scim.max_filter_terms`` terms
(counted before it is parsed; more is 400 ``invalidFilter`` naming the
setting), and a body over the listener's ``client_max_size`` is a 413
SCIM Error naming it.

Publishing (``DirectoryPublishing``): after a committed write the newest
directory content is handed to the injected ``publish`` (the collector's
``DirectoryPublisher``) from a background task: the IdP is answered after
the local commit, never after the store; a burst publishes the newest
state, not every step; a failed publish is retried after ``retry_seconds``
with whatever is newest then (logged once while it fails alike, and once
when it succeeds again). The store counts its commits and records how
many a publish covered, so at start the current content is published only
when a commit may not have been (``ScimStore.unpublished``: a crash
between a commit and its publication converges). A store that never
committed, or whose every commit is published, publishes nothing at
start: a directory published by hand (``kynara-collector directory
publish``, a first import or a fix) stays until the next SCIM change,
which publishes the SCIM content over it.

Authentication: ``authorization: Bearer <secret>`` of one of
``scim.credentials``, checked as the admin listener checks its own
(``server.admin.AdminCredentials``: SHA-256 digests, constant time, every
credential compared). A refusal is 401 with ``WWW-Authenticate: Bearer``
and a SCIM Error body, logged at WARNING (never the secret) and counted.
``/ServiceProviderConfig`` needs no credential: it names the scheme a
client must use. ``/Schemas`` and ``/ResourceTypes`` need one, as the
resources do (RFC 7644 §4 allows either).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import json
import logging
import pathlib
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Union, cast

import lmdb
from aiohttp import web
from pydantic import Field
from scim2_models import (
    URN,
    AuthenticationScheme,
    Bulk,
    ChangePassword,
    EnterpriseUser,
    ETag,
    Extension,
    External,
    Filter,
    Group,
    GroupMembership,
    InvalidFilterException,
    InvalidValueException,
    Patch,
    PayloadTooLargeException,
    PreconditionFailedException,
    Reference,
    Resource,
    ResourceType,
    ResponseParameters,
    SCIMException,
    ScimFilter,
    ScimProvider,
    SearchRequest,
    ServiceProviderConfig,
    Sort,
    UnauthorizedException,
    UniquenessException,
    User,
)
from scim2_server.applications.base import VERSION_PREFIX, BaseApplication
from scim2_server.handler import AsyncScimHandler
from scim2_server.memory import InMemoryStorage, _page
from scim2_server.requests import ScimRequest
from scim2_server.responses import ScimResponse
from scim2_server.service import ScimService
from scim2_server.storage import AsyncScimStorage, SearchPage
from scim2_server.utils import parametrize

from kynara_sidecar.errors import IdentityInvalid, KynaraError
from kynara_sidecar.server.admin import AdminCredentials
from kynara_sidecar.sync.directory import DirectoryError, canonical_principal_id

__all__ = [
    "DEFAULT_MAX_FILTER_TERMS",
    "AsyncScimStore",
    "KYNARA_EXTENSION",
    "SCIM_PREFIX",
    "DirectoryPublishing",
    "KynaraPrincipal",
    "ScimEndpoint",
    "ScimStore",
    "ScimStoreError",
    "add_scim_routes",
    "build_provider",
    "principals_of",
]

log = logging.getLogger("kynara.collector")

SCIM_PREFIX = "/scim"
KYNARA_EXTENSION = "urn:kynara:params:scim:schemas:extension:principal:2.0:User"
KINDS = ("user", "agent")
# Bulk limits announced in ServiceProviderConfig (RFC 7644 §3.7.4).
BULK_MAX_OPERATIONS = 100
BULK_MAX_PAYLOAD_BYTES = 1 << 20
# The most comparisons a search filter may hold (scim.max_filter_terms): a
# term costs a match against every candidate resource (measured about 20 µs
# a term and a User), so an unbounded filter in a 1 MiB body held a search
# for most of a minute. IdP connectors send one to a few terms.
DEFAULT_MAX_FILTER_TERMS = 200
# A filter's string literals (whose text may read "and"/"or") and its
# logical operators: a well-formed filter has one term more than operators.
_FILTER_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_FILTER_OPERATOR = re.compile(r"\b(?:and|or)\b", re.IGNORECASE)
# Set while the handler serves a read (GET of a resource, a search): the
# store's operation lock is for writes only (see AsyncScimStore.operation).
_READING: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "scim_reading", default=False
)
_DBS = (b"resources", b"counters")
_VERSION_KEY = b"version"
# Committed writes, counted in each write's own transaction, and how many
# of them the last publish covered (``ScimStore.unpublished``).
_COMMITS_KEY = b"commits"
_PUBLISHED_KEY = b"published"
# A stored resource's key in the in-memory storage: (resource type, id).
_Key = tuple[str | None, str]
# Enterprise extension attributes copied to a principal, by their model
# names (the snake_case of employeeNumber, costCenter...).
_ENTERPRISE_ATTRIBUTES = (
    "employee_number",
    "cost_center",
    "organization",
    "division",
    "department",
)


class ScimStoreError(KynaraError):
    """The SCIM store cannot be opened, read or written."""


class KynaraPrincipal(Extension):
    """What Kynara needs of a User beyond the core schema: whether it is a
    person or an agent, and who owns an agent."""

    __schema__ = URN(KYNARA_EXTENSION)

    kind: str | None = Field(None, examples=list(KINDS))
    """"user" (the default) or "agent"."""

    owner: str | None = None
    """The team owning an agent, e.g. "support-platform"."""


BEARER_SCHEME = AuthenticationScheme(
    type=AuthenticationScheme.Type.oauthbearertoken,
    name="OAuth Bearer Token",
    description="A bearer secret of one of the collector's scim.credentials",
    spec_uri=Reference[External]("https://www.rfc-editor.org/rfc/rfc6750"),
    primary=True,
)


def build_provider(max_results: int) -> ScimProvider:
    """The service the collector describes: Users (enterprise and Kynara
    extensions), Groups, and what it supports."""
    config = ServiceProviderConfig(
        patch=Patch(supported=True),
        bulk=Bulk(
            supported=True,
            max_operations=BULK_MAX_OPERATIONS,
            max_payload_size=BULK_MAX_PAYLOAD_BYTES,
        ),
        filter=Filter(supported=True, max_results=max_results),
        change_password=ChangePassword(supported=False),
        sort=Sort(supported=True),
        etag=ETag(supported=True),
        authentication_schemes=[BEARER_SCHEME],
    )
    return ScimProvider(
        models=[User, EnterpriseUser, KynaraPrincipal, Group],
        resource_types=[
            ResourceType.from_resource(User[EnterpriseUser | KynaraPrincipal]),
            ResourceType.from_resource(Group),
        ],
        config=config,
    )


def _filter_terms(text: str) -> int:
    """The comparisons and presence tests of a search filter, counted on its
    text before it is parsed (parsing 25,000 terms alone takes seconds): the
    logical operators outside string literals, plus one."""
    return len(_FILTER_OPERATOR.findall(_FILTER_STRING.sub('""', text))) + 1


class _Service(ScimService):
    """scim2-server's service, with a search filter's terms capped before
    the filter is parsed (GET ``?filter=`` and POST ``.search`` alike)."""

    def __init__(self, provider: ScimProvider, max_filter_terms: int):
        super().__init__(provider)
        self.max_filter_terms = max_filter_terms

    def read_search(
        self, resource_types: list[ResourceType], payload: Any
    ) -> tuple[SearchRequest[Any], Any]:
        """Refuse a filter of more than ``max_filter_terms`` terms (400
        ``invalidFilter``), then read the search as the library does."""
        filters = (
            [v for k, v in payload.items() if str(k).casefold() == "filter"]
            if isinstance(payload, dict)
            else []
        )
        for text in filters:
            terms = _filter_terms(text) if isinstance(text, str) else 0
            if terms > self.max_filter_terms:
                raise InvalidFilterException(
                    detail=f"filter: expected at most {self.max_filter_terms} "
                    f"terms (scim.max_filter_terms), got {terms}"
                )
        return super().read_search(resource_types, payload)


class _Handler(AsyncScimHandler):
    """scim2-server's handler, marking reads so that they do not wait on
    the store's operation lock (``AsyncScimStore.operation``)."""

    async def query(self, request: ScimRequest) -> ScimResponse:
        token = _READING.set(True)
        try:
            return await super().query(request)
        finally:
            _READING.reset(token)

    async def search(self, request: ScimRequest) -> ScimResponse:
        token = _READING.set(True)
        try:
            return await super().search(request)
        finally:
            _READING.reset(token)

    async def search_with_body(self, request: ScimRequest) -> ScimResponse:
        token = _READING.set(True)
        try:
            return await super().search_with_body(request)
        finally:
            _READING.reset(token)


def _principal_id(resource: Resource[Any]) -> str:
    """The principal id of a User: its userName in NFC.

    Raises:
        InvalidValueException: a userName the policy engine refuses.
    """
    user_name = getattr(resource, "user_name", None)
    try:
        # canonical_name and the length cap requests put on principal ids.
        return canonical_principal_id(user_name or "")
    except ValueError as err:
        raise InvalidValueException(
            detail=f"userName {str(user_name)[:80]!r} is not a valid principal id: "
            f"{err}"
        ) from None


def _extension(resource: Resource[Any], model: type[Extension]) -> Any:
    try:
        return resource[model]
    except (KeyError, TypeError):
        return None


def _kind(resource: Resource[Any]) -> str:
    """The principal kind of a User.

    Raises:
        InvalidValueException: a kind other than user or agent.
    """
    extension = _extension(resource, KynaraPrincipal)
    kind = getattr(extension, "kind", None) or "user"
    if kind not in KINDS:
        raise InvalidValueException(
            detail=f"{KYNARA_EXTENSION}:kind: expected one of {', '.join(KINDS)}, "
            f"got {str(kind)[:80]!r}"
        )
    return kind


def _email(user: Any) -> str | None:
    emails = [e for e in (user.emails or []) if e.value]
    primary = [e for e in emails if e.primary]
    chosen = (primary or emails)[:1]
    return str(chosen[0].value) if chosen else None


def principals_of(
    resources: Iterable[Resource[Any]], group_roles: Mapping[str, Iterable[str]]
) -> list[dict[str, Any]]:
    """The directory principals the stored Users and Groups stand for (the
    module docstring gives the mapping), sorted by id."""
    users = [r for r in resources if isinstance(r, User)]
    groups = [r for r in resources if isinstance(r, Group)]
    by_scim_id = {user.id: user for user in users}
    member_of: dict[str, set[str]] = {}
    for group in groups:
        for member in group.members or []:
            if member.value in by_scim_id and group.display_name:
                member_of.setdefault(member.value, set()).add(group.display_name)
    principals = []
    for user in users:
        try:
            principal_id = _principal_id(user)
            kind = _kind(user)
        except InvalidValueException:
            # Refused at write; one read from an older store is left out.
            continue
        names = sorted(member_of.get(cast(str, user.id), ()))
        roles = sorted({role for name in names for role in group_roles.get(name, ())})
        attributes: dict[str, Any] = {}
        email = _email(user)
        if email:
            attributes["email"] = email
        if user.display_name:
            attributes["display_name"] = user.display_name
        if names:
            attributes["groups"] = names
        enterprise = _extension(user, EnterpriseUser)
        if enterprise is not None:
            for name in _ENTERPRISE_ATTRIBUTES:
                value = getattr(enterprise, name, None)
                if value:
                    attributes[name] = value
            manager = by_scim_id.get(getattr(enterprise.manager, "value", None))
            if manager is not None and manager.user_name:
                with contextlib.suppress(InvalidValueException):
                    attributes["manager"] = _principal_id(manager)
        owner = getattr(_extension(user, KynaraPrincipal), "owner", None)
        if owner:
            attributes["owner"] = owner
        principals.append(
            {
                "id": principal_id,
                "kind": kind,
                "roles": roles,
                "attributes": attributes,
                "active": user.active is not False,
            }
        )
    principals.sort(key=lambda p: p["id"])
    return principals


class ScimStore(InMemoryStorage):
    """scim2-server's in-memory storage, each write committed to LMDB first.

    Deleting a resource also removes its id from the ``members`` of every
    Group naming it, in the same transaction (each such Group gets a new
    version), as RFC 7644 §3.6 lets a provider do: no Group lists an id that
    names nothing, and the change is one directory revision.

    A User's read-only ``groups`` (RFC 7643 §4.1.2) is never stored: every
    read (``get``, ``search`` and the answer to a write) fills it from the
    Groups holding the User as a direct member, so it cannot go stale. A
    client's ``groups`` is dropped on create and replace, and a PATCH of it
    is refused by the library (400 ``mutability``).

    A User's served version (``meta.version``, its ETag) is its stored
    version and, when it is in groups, a digest of the groups it shows
    (``W/"17.3f9c0a1b2d4e"``): it moves when a Group naming the User is
    created, renamed, deleted or changes its members, without rewriting the
    User. ``If-Match`` on a write compares against the served version.

    Reads (``get``, ``search``) take ``lock`` only to take their candidates
    and memberships; a search's filter is matched, sorted and paged after
    the lock is let go. A write holds ``lock`` from its change in memory to
    its commit (or its undo), and stored resources are never changed in
    place (a write stores a new object), so what a read took under the lock
    is one committed state, and a slow filter never holds up a write.

    NOTE: every resource is held in memory and read back whole at start:
    memory and start time grow with the Users and Groups stored (fine for
    tens of thousands of Users); a directory of millions would need a
    store that searches LMDB itself.

    Args:
        path: the LMDB environment's directory (created if missing).
        provider: the service's description, to read stored resources back.
        map_size: LMDB map size in bytes.

    Raises:
        ScimStoreError: the environment cannot be opened or read.
    """

    def __init__(self, path: str | pathlib.Path, provider: ScimProvider, map_size: int):
        super().__init__()
        self._provider = provider
        # Principal id -> the SCIM id of the User holding it.
        self._principal_ids: dict[str, str] = {}
        # Member id -> the keys of the Groups listing it in their members.
        self._member_of: dict[str, set[_Key]] = {}
        try:
            pathlib.Path(path).mkdir(parents=True, exist_ok=True)
            self._env = lmdb.open(
                str(path), map_size=map_size, max_dbs=len(_DBS), subdir=True
            )
        except (OSError, lmdb.Error) as err:
            raise ScimStoreError(f"scim.path {str(path)!r}: {err}") from None
        try:
            self._dbs = {name: self._env.open_db(name) for name in _DBS}
            stored, last_version = self._load()
            self._commits, self._published = self._load_commits(last_version)
        except (lmdb.Error, ValueError) as err:
            self._env.close()
            raise ScimStoreError(f"scim.path {str(path)!r}: {err}") from None
        self._version = last_version
        self.resources = stored

    def _load_commits(self, last_version: int) -> tuple[int, int]:
        """The commit counter and how many commits the last publish covered.
        A store written before commits were counted has no counter: its
        version counter stands in (above 0 once anything was committed), and
        none of it counts as published, so it is published once."""
        counters = self._dbs[b"counters"]
        with self._env.begin() as txn:
            commits = txn.get(_COMMITS_KEY, db=counters)
            published = txn.get(_PUBLISHED_KEY, db=counters)
        return (
            int(commits) if commits else last_version,
            int(published) if published else 0,
        )

    def _load(self) -> tuple[list[Resource[Any]], int]:
        found: list[Resource[Any]] = []
        with self._env.begin() as txn:
            raw = txn.get(_VERSION_KEY, db=self._dbs[b"counters"])
            last_version = int(raw) if raw else 0
            for key, value in txn.cursor(db=self._dbs[b"resources"]):
                type_name = bytes(key).decode().partition("/")[0]
                model = self._provider.model_for(type_name)
                if model is None:
                    raise ScimStoreError(
                        f"stored resource {bytes(key).decode()!r}: unknown "
                        f"resource type {type_name!r}"
                    )
                with self._provider:
                    found.append(model.model_validate(json.loads(bytes(value))))
        return found, last_version

    def close(self) -> None:
        """Close the environment, once a write in progress on another thread
        (a commit, ``mark_published``) is done: each holds ``lock``."""
        with self.lock:
            self._env.close()

    # -- what was published: a start publishes only what was not

    @property
    def commits(self) -> int:
        """How many writes were ever committed (kept in the store): read it
        before building the content whose publication ``mark_published``
        then records (a write's commit and its count are one transaction,
        and content is built under ``lock``, so the content holds them)."""
        return self._commits

    @property
    def unpublished(self) -> bool:
        """Whether a committed write may not be in any published directory
        (a crash or a store down between its commit and its publication).
        False for a store that never committed a write: a SCIM collector
        starting empty publishes nothing over a directory published by hand
        (``kynara-collector directory publish``), and its first change
        publishes over it."""
        return self._commits > self._published

    def mark_published(self, commits: int) -> None:
        """Record (synced) that the first ``commits`` writes are published.

        Raises:
            ScimStoreError: the store cannot be written.
        """
        with self.lock:
            if commits <= self._published:
                return
            try:
                with self._env.begin(write=True) as txn:
                    txn.put(
                        _PUBLISHED_KEY,
                        str(commits).encode(),
                        db=self._dbs[b"counters"],
                    )
            except lmdb.Error as err:
                raise ScimStoreError(f"scim store: {err}") from None
            self._published = commits

    def next_version(self) -> str:
        self._version += 1
        return f'W/"{self._version}"'

    # -- writes: the change in memory, then its commit; undone if the commit fails

    def create(self, resource_type: ResourceType, resource: Resource[Any]):
        with self.lock:
            self._check_principal(resource)
            version = self._version
            created = super().create(resource_type, self._as_stored(resource))
            key = (created.meta.resource_type, created.id)
            try:
                self._commit([created])
            except BaseException:
                self._remove(key)
                self._version = version
                raise
            return self._with_groups(created)

    def update(
        self,
        resource_type: ResourceType,
        resource: Resource[Any],
        *,
        expected_version: str | None = None,
    ):
        with self.lock:
            before = self._stored(resource_type, resource.id)
            self._check_principal(resource)
            version = self._version
            updated = super().update(
                resource_type,
                self._as_stored(resource),
                expected_version=expected_version,
            )
            try:
                self._commit([updated])
            except BaseException:
                self._store(before, self._values_of(before))
                self._version = version
                raise
            return self._with_groups(updated)

    def delete(
        self,
        resource_type: ResourceType,
        resource_id: str,
        *,
        expected_version: str | None = None,
    ) -> None:
        with self.lock:
            before = self._stored(resource_type, resource_id)
            holders = [
                self._resources[key[0]][key[1]]
                for key in sorted(
                    self._member_of.get(resource_id, ()), key=lambda k: k[1]
                )
                if key != (resource_type.name, resource_id)
            ]
            version = self._version
            super().delete(
                resource_type, resource_id, expected_version=expected_version
            )
            left = [self._without_member(group, resource_id) for group in holders]
            try:
                self._commit(left, deleted=before)
            except BaseException:
                for group in holders:
                    self._store(group, self._values_of(group))
                self._store(before, self._values_of(before))
                self._version = version
                raise

    def _without_member(self, group: Resource[Any], member_id: str) -> Resource[Any]:
        """Store a new version of ``group`` without ``member_id`` in its
        members (in memory; the caller commits it)."""
        assert group.meta is not None
        left = group.model_copy(deep=True)
        members = [m for m in group.members or [] if m.value != member_id]
        left.members = members or None  # type: ignore[attr-defined]
        left.meta = group.meta.model_copy(
            update={"last_modified": self.clock(), "version": self.next_version()}
        )
        self._store(left, self._values_of(left))
        return left

    def _commit(
        self, resources: Iterable[Resource[Any]], deleted: Resource[Any] | None = None
    ) -> None:
        """Write resources, remove ``deleted`` and write the version counter,
        in one synced transaction."""
        bodies = [
            (_key(r), json.dumps(r.model_dump(mode="json")).encode()) for r in resources
        ]
        commits = self._commits + 1
        with self._env.begin(write=True) as txn:
            if deleted is not None:
                txn.delete(_key(deleted), db=self._dbs[b"resources"])
            for key, body in bodies:
                txn.put(key, body, db=self._dbs[b"resources"])
            txn.put(
                _VERSION_KEY, str(self._version).encode(), db=self._dbs[b"counters"]
            )
            txn.put(_COMMITS_KEY, str(commits).encode(), db=self._dbs[b"counters"])
        self._commits = commits

    @staticmethod
    def _as_stored(resource: Resource[Any]) -> Resource[Any]:
        """A resource without what is never stored: a User's password and
        its read-only groups (filled in on each read)."""
        if (
            getattr(resource, "password", None) is None
            and getattr(resource, "groups", None) is None
        ):
            return resource
        copy = resource.model_copy(deep=True)
        for name in ("password", "groups"):
            if getattr(copy, name, None) is not None:
                setattr(copy, name, None)
        return copy

    # -- reads: a User's groups filled in from the Groups listing it

    def get(
        self,
        resource_type: ResourceType,
        resource_id: str,
        *,
        response_parameters: ResponseParameters[Any] | None = None,
    ) -> Resource[Any]:
        with self.lock:
            return self._with_groups(
                super().get(
                    resource_type, resource_id, response_parameters=response_parameters
                )
            )

    def search(
        self,
        resource_types: list[ResourceType],
        search_request: SearchRequest[Any],
        *,
        position: Any = None,
    ) -> SearchPage:
        """The library's search (same candidates, matching and paging), with
        the lock held only while the candidates and their memberships are
        taken (the class docstring says why that is one committed state)."""
        names = list(dict.fromkeys(rt.name for rt in resource_types))
        scim_filter = search_request.filter
        with self.lock:
            candidates = self._candidates(names, scim_filter)
            groups_of = {
                cast(str, r.id): self._groups_of(cast(str, r.id))
                for r in candidates
                if isinstance(r, User)
            }
        filled = scim_filter is not None and "groups" in str(scim_filter).lower()
        if filled:
            # A filter on groups (e.g. groups[display eq "Support"]) matches
            # what a read shows: copies with groups filled in (once: a second
            # fill would add the groups' digest to the version again).
            candidates = [
                _filled(r.model_copy(), groups_of.get(cast(str, r.id), []))
                for r in candidates
            ]
        if scim_filter is not None and not scim_filter.models and candidates:
            models = tuple(dict.fromkeys(type(r) for r in candidates))
            scim_filter = parametrize(ScimFilter, Union[models])(str(scim_filter))  # noqa: UP007
        found = [r for r in candidates if scim_filter is None or scim_filter.match(r)]
        page = _page(search_request, position, found)
        page.resources = [
            r.model_copy(deep=True)
            if filled
            else _filled(r.model_copy(deep=True), groups_of.get(cast(str, r.id), []))
            for r in page.resources
        ]
        return page

    def _groups_of(self, user_id: str) -> list[Resource[Any]]:
        """The Groups naming ``user_id`` in their members, sorted by display
        name (direct memberships only: only they give roles). Under lock."""
        groups = [
            self._resources[key[0]][key[1]] for key in self._member_of.get(user_id, ())
        ]
        groups.sort(key=lambda g: (g.display_name or "", cast(str, g.id)))
        return groups

    def _with_groups(self, resource: Resource[Any]) -> Resource[Any]:
        """Fill a User (a copy) with its current groups and served version."""
        if not isinstance(resource, User):
            return resource
        return _filled(resource, self._groups_of(cast(str, resource.id)))

    def _check_version(
        self, resource: Resource[Any], expected_version: str | None
    ) -> None:
        """Refuse a write whose ``If-Match`` is not the served version (a
        User's covers its groups)."""
        if expected_version is None:
            return
        served = self._with_groups(resource.model_copy())
        assert served.meta is not None
        if served.meta.version != expected_version:
            raise PreconditionFailedException(
                detail=f"{served.meta.resource_type} {served.id!r} is at version "
                f"{served.meta.version}, not {expected_version}"
            )

    def _check_principal(self, resource: Resource[Any]) -> None:
        """Refuse a User that would not make a principal: a bad userName or
        kind, or a userName equal in NFC to another User's."""
        if not isinstance(resource, User):
            return
        principal_id = _principal_id(resource)
        _kind(resource)
        holder = self._principal_ids.get(principal_id)
        if holder is not None and holder != resource.id:
            raise UniquenessException(
                detail=f"userName {str(resource.user_name)[:80]!r} is taken: "
                "another User's userName is the same principal id"
            )

    def _store(self, resource: Resource[Any], values: dict[str, Any]) -> None:
        super()._store(resource, values)
        principal_id = _principal_id_or_none(resource)
        if principal_id is not None:
            self._principal_ids[principal_id] = cast(str, resource.id)
        for member_id in _member_ids(resource):
            self._member_of.setdefault(member_id, set()).add(_memory_key(resource))

    def _remove(self, key: _Key) -> None:
        stored = self._resources.get(key[0], {}).get(key[1])
        principal_id = None if stored is None else _principal_id_or_none(stored)
        if principal_id is not None and self._principal_ids.get(principal_id) == key[1]:
            del self._principal_ids[principal_id]
        for member_id in _member_ids(stored):
            holders = self._member_of.get(member_id, set())
            holders.discard(key)
            if not holders:
                self._member_of.pop(member_id, None)
        super()._remove(key)

    def principals(self, group_roles: Mapping[str, Iterable[str]]) -> list[dict]:
        """The directory principals of what is stored now."""
        with self.lock:
            return principals_of(self.resources, group_roles)


def _key(resource: Resource[Any]) -> bytes:
    assert resource.meta is not None
    return f"{resource.meta.resource_type}/{resource.id}".encode()


def _memory_key(resource: Resource[Any]) -> _Key:
    assert resource.meta is not None
    return resource.meta.resource_type, cast(str, resource.id)


def _filled(resource: Resource[Any], groups: list[Resource[Any]]) -> Resource[Any]:
    """Set a User's (a copy's) ``groups`` and its served version: the
    stored version, and a digest of the groups it shows when it has any."""
    if not isinstance(resource, User):
        return resource
    resource.groups = [
        GroupMembership(
            value=group.id,
            display=group.display_name,
            ref=f"Groups/{group.id}",
            type="direct",
        )
        for group in groups
    ] or None
    if groups and resource.meta is not None and resource.meta.version:
        shown = json.dumps([[g.id, g.display_name] for g in groups]).encode()
        digest = hashlib.sha256(shown).hexdigest()[:12]
        stored = resource.meta.version.removeprefix('W/"').removesuffix('"')
        resource.meta = resource.meta.model_copy(
            update={"version": f'W/"{stored}.{digest}"'}
        )
    return resource


def _member_ids(resource: Resource[Any] | None) -> set[str]:
    """The ids a Group lists in its members (none for anything else)."""
    if not isinstance(resource, Group):
        return set()
    return {m.value for m in resource.members or [] if m.value}


def _principal_id_or_none(resource: Resource[Any]) -> str | None:
    if not isinstance(resource, User):
        return None
    try:
        return _principal_id(resource)
    except InvalidValueException:
        return None


class AsyncScimStore(AsyncScimStorage):
    """``ScimStore`` for the async handler: one writing SCIM operation at a
    time (an ``asyncio.Lock`` held for the operation, so a PATCH's or a
    replace's read and write see no other write in between), each call on a
    worker thread (an LMDB commit syncs to disk), and ``changed`` called
    after every write.

    A read (GET of a resource, a search) takes no operation lock: it is one
    call of ``ScimStore``, which sees a committed state by itself (its
    docstring says how), so a slow search never holds up a write and a
    held write never holds up a read."""

    def __init__(self, store: ScimStore, changed: Callable[[], None]):
        self.store = store
        self._changed = changed
        self._lock = asyncio.Lock()

    def operation(self) -> contextlib.AbstractAsyncContextManager[None]:
        if _READING.get():
            return contextlib.nullcontext()
        return cast(contextlib.AbstractAsyncContextManager[None], self._lock)

    async def get(
        self,
        resource_type: ResourceType,
        resource_id: str,
        *,
        response_parameters: ResponseParameters[Any] | None = None,
    ) -> Resource[Any]:
        return await asyncio.to_thread(self.store.get, resource_type, resource_id)

    async def search(
        self,
        resource_types: list[ResourceType],
        search_request: SearchRequest[Any],
        *,
        position: Any = None,
    ) -> SearchPage:
        return await asyncio.to_thread(
            self.store.search, resource_types, search_request, position=position
        )

    async def create(
        self, resource_type: ResourceType, resource: Resource[Any]
    ) -> Resource[Any]:
        created = await self._write(self.store.create, resource_type, resource)
        return created

    async def update(
        self,
        resource_type: ResourceType,
        resource: Resource[Any],
        *,
        expected_version: str | None = None,
    ) -> Resource[Any]:
        return await self._write(
            self.store.update,
            resource_type,
            resource,
            expected_version=expected_version,
        )

    async def delete(
        self,
        resource_type: ResourceType,
        resource_id: str,
        *,
        expected_version: str | None = None,
    ) -> None:
        await self._write(
            self.store.delete,
            resource_type,
            resource_id,
            expected_version=expected_version,
        )

    async def _write(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        # A failed commit raises (undone in memory; answered 500, logged by
        # the endpoint): nothing changed, nothing to publish.
        result = await asyncio.to_thread(call, *args, **kwargs)
        self._changed()
        return result


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class DirectoryPublishing:
    """Hands the newest directory content to ``publish`` in the background.

    Args:
        content: the directory content of what is stored now (blocking; run
            on a worker thread).
        publish: publishes content, returning its revision (the collector's
            ``DirectoryPublisher.publish``).
        retry_seconds: the pause after a failed publish.
        on_published: called with the revision after each content published.
        on_failure: called after each failed publish.
        publish_at_start: publish what is stored once at start, before any
            change (``ScimStore.unpublished``: a commit may not have been
            published before a crash); False waits for the first change,
            so what the store holds (a directory published by hand) stays
            until then.
        commits: the store's commit count (``ScimStore.commits``), read
            before each content is built.
        mark_published: records that the commits counted are published
            (``ScimStore.mark_published``; blocking, run on a worker thread).
        interval_seconds: the least time from one publish to the next
            (``scim.publish_interval_seconds``): a change after a quiet spell
            goes out at once, changes inside the interval together at its
            end.

    A store that stays down is retried every ``retry_seconds`` and each try
    is counted (``on_failure``), but logged at WARNING only when its error
    differs from the previous try's (at DEBUG otherwise), and the first
    publish after failures is logged once as "directory published again".
    A ``DirectoryError`` from ``publish`` (content the signed directory
    refuses, or an update over its size cap) is no outage: the same content
    would fail again, so it is counted, logged at ERROR once per distinct
    error, and not retried; the next change tries anew.
    Each revision's INFO line is the publisher's ("directory published",
    with its revision, size and key id); this one logs it at DEBUG only.
    """

    def __init__(
        self,
        content: Callable[[], bytes],
        publish: Callable[[bytes], Awaitable[str]],
        *,
        retry_seconds: float,
        on_published: Callable[[str], None] = lambda revision: None,
        on_failure: Callable[[], None] = lambda: None,
        publish_at_start: bool = True,
        commits: Callable[[], int] = lambda: 0,
        mark_published: Callable[[int], None] = lambda commits: None,
        interval_seconds: float = 0.0,
    ):
        self._content = content
        self._interval = interval_seconds
        # When the next publish may start (the event loop's clock).
        self._next_at = 0.0
        self._publish = publish
        self._retry_seconds = retry_seconds
        self._on_published = on_published
        self._on_failure = on_failure
        self._commits = commits
        self._mark_published = mark_published
        self.publish_at_start = publish_at_start
        self._dirty = asyncio.Event()
        if publish_at_start:
            # What is stored is published once (a crash may have come between
            # a commit and its publication).
            self._dirty.set()
        self._published: bytes | None = None
        # The error of the failing publish and the failed tries in a row
        # ("" and 0 while publishing works): a store down for an hour is
        # one WARNING, not one per retry.
        self._failing = ""
        self._failures = 0
        # The last DirectoryError logged, so a bad directory is one ERROR.
        self._refused = ""
        # True from a change being taken up until its content is published
        # (or found published, or refused): what ``flush`` still owes.
        self._attempting = False
        # The store call of the latest publish: the stop cancels ``run``,
        # not the call, and ``flush`` waits for it before publishing anew.
        self._inflight: asyncio.Future[str] | None = None
        self.revision = ""

    def changed(self) -> None:
        """A write was committed: publish the newest content soon."""
        self._dirty.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Publish until ``stop`` is set (it also ends on cancellation)."""
        fields = {"component": "collector", "door": "scim directory"}
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            await self._dirty.wait()
            pause = self._next_at - loop.time()
            if pause > 0:
                # Changes in the meantime join this revision.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), pause)
                if stop.is_set():
                    break
            self._dirty.clear()
            self._attempting = True
            # Read before the content is built: the content holds them all.
            commits = self._commits()
            try:
                content = await asyncio.to_thread(self._content)
            except Exception as err:
                # A bug, not the store: retrying the same state would fail
                # again, so the next change tries anew.
                self._attempting = False
                self._on_failure()
                log.error(
                    "directory content not built",
                    exc_info=True,
                    extra={
                        "fields": {**fields, "error": f"{type(err).__name__}: {err}"}
                    },
                )
                continue
            if content == self._published:
                self._attempting = False
                await self._record(commits, fields)
                continue
            self._next_at = loop.time() + self._interval
            try:
                revision = await self._publish_once(content)
            except DirectoryError as err:
                # Permanent for this content: wait for the next change.
                self._attempting = False
                self._directory_refused(err, fields)
                continue
            except Exception as err:
                self._failed(f"{type(err).__name__}: {err}", fields)
                self._dirty.set()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self._retry_seconds)
                continue
            self._attempting = False
            self._done(content, revision, fields)
            await self._record(commits, fields)

    async def _publish_once(self, content: bytes) -> str:
        """Publish ``content``; cancelling the caller leaves the store call
        running, for ``flush`` to wait out (two publishes at once could
        leave the store's current update older than the newest)."""
        self._inflight = asyncio.ensure_future(self._publish(content))
        # Its error is the caller's; once the caller is cancelled nobody
        # reads it, and asyncio would log it as never retrieved.
        self._inflight.add_done_callback(_retrieved)
        return await asyncio.shield(self._inflight)

    def abandon(self) -> None:
        """Cancel the store call in flight: the stop's time for ``flush``
        ran out, and nothing may publish after the collector stopped."""
        if self._inflight is not None:
            self._inflight.cancel()

    async def flush(self) -> None:
        """Publish the newest content once, now, when a change is not yet
        published (one waiting out the interval or a retry, or one whose
        publish was cancelled): the collector's stop calls it after ``run``
        ended and HTTP is shut, so a write answered 2xx is not left
        unpublished until the next start. One try; a failure is logged and
        counted, and the next start publishes it (``ScimStore.unpublished``).
        The caller bounds the time (``store.timeout_seconds``)."""
        fields = {"component": "collector", "door": "scim directory"}
        if not (self._dirty.is_set() or self._attempting):
            return
        self._dirty.clear()
        if self._inflight is not None:
            # Its outcome is moot: the newest content is published below.
            await asyncio.wait([self._inflight])
        commits = self._commits()
        try:
            content = await asyncio.to_thread(self._content)
            if content != self._published:
                revision = await self._publish_once(content)
                self._done(content, revision, fields)
        except DirectoryError as err:
            self._directory_refused(err, fields)
            return
        except Exception as err:
            self._on_failure()
            log.warning(
                "directory not published at stop; the next start publishes it",
                extra={"fields": {**fields, "error": f"{type(err).__name__}: {err}"}},
            )
            return
        finally:
            self._attempting = False
        await self._record(commits, fields)

    def _done(self, content: bytes, revision: str, fields: dict[str, Any]) -> None:
        self._published = content
        self.revision = revision
        self._refused = ""
        self._on_published(revision)
        self._succeeded(revision, fields)

    def _directory_refused(self, err: DirectoryError, fields: dict[str, Any]) -> None:
        self._on_failure()
        error = f"{type(err).__name__}: {err}"
        if error == self._refused:
            log.debug("directory still refused", extra={"fields": fields})
            return
        self._refused = error
        log.error(
            "directory refused; not retried until the next change",
            extra={"fields": {**fields, "error": error}},
        )

    async def _record(self, commits: int, fields: dict[str, Any]) -> None:
        """Record that ``commits`` are published; a failure is logged only
        (the next start then publishes the same content again)."""
        try:
            await asyncio.to_thread(self._mark_published, commits)
        except Exception as err:
            log.warning(
                "directory publication not recorded",
                extra={"fields": {**fields, "error": f"{type(err).__name__}: {err}"}},
            )

    def _failed(self, error: str, fields: dict[str, Any]) -> None:
        self._on_failure()
        self._failures += 1
        extra = {
            "fields": {
                **fields,
                "error": error,
                "failures": self._failures,
                "retry_seconds": self._retry_seconds,
            }
        }
        if error == self._failing:
            log.debug("directory still not published", extra=extra)
        else:
            log.warning("directory not published; retrying", extra=extra)
        self._failing = error

    def _succeeded(self, revision: str, fields: dict[str, Any]) -> None:
        # The publisher logs each revision at INFO (with its size and key):
        # here only the return after failures is news at INFO.
        extra = {"fields": {**fields, "revision": revision}}
        if self._failures:
            extra["fields"]["failures"] = self._failures
            log.info("directory published again", extra=extra)
        else:
            log.debug("directory published", extra=extra)
        self._failing = ""
        self._failures = 0


class ScimEndpoint(BaseApplication):
    """The SCIM protocol over the collector's HTTP: authentication, the
    handler over the store, and the translation to and from aiohttp.

    Args:
        store: where resources live.
        provider: the service's description (``build_provider``).
        credentials: who may call (a name and no roles each).
        base_url: the URL IdPs reach the endpoint by, ending in ``/scim/v2``;
            "" takes the request's scheme and Host.
        on_refused: called after each refused request.
        max_filter_terms: the most terms a search filter may hold
            (``scim.max_filter_terms``); more is a 400 ``invalidFilter``.

    A body larger than the HTTP listener's ``client_max_size`` is answered
    413 with a SCIM Error naming the limit, as every other SCIM error.
    """

    def __init__(
        self,
        store: AsyncScimStore,
        provider: ScimProvider,
        credentials: AdminCredentials,
        *,
        base_url: str = "",
        on_refused: Callable[[], None] = lambda: None,
        max_filter_terms: int = DEFAULT_MAX_FILTER_TERMS,
    ):
        super().__init__(provider, _Service(provider, max_filter_terms))
        self.handler = _Handler(self.service, store)
        self._credentials = credentials
        self._base_url = base_url.rstrip("/")
        self._on_refused = on_refused

    def check_auth(self, request: ScimRequest) -> None:
        """Accept only a bearer secret of a configured credential."""
        authorization = request.header("Authorization") or ""
        try:
            caller = self._credentials.authenticate(authorization)
        except IdentityInvalid:
            given = "an unknown one" if authorization.strip() else "none"
            raise UnauthorizedException(
                detail="expected 'Authorization: Bearer <secret>' of a SCIM "
                f"client (scim.credentials), got {given}"
            ) from None
        request.subject = caller.name

    def get_subject(self, request: ScimRequest) -> Any:
        return request.subject

    def www_challenge(self, authorization: str) -> str:
        challenge = 'Bearer realm="kynara-scim"'
        if authorization.strip():
            challenge += ', error="invalid_token"'
        return challenge

    async def serve(self, request: web.Request) -> web.Response:
        """Answer one aiohttp request under ``/scim``."""
        tail = request.path.removeprefix(SCIM_PREFIX)
        base_url = (
            self._base_url
            or f"{request.scheme}://{request.host}{SCIM_PREFIX}{VERSION_PREFIX}"
        )
        scim_request = ScimRequest(
            method=request.method,
            base_url=base_url,
            path=self.split_path(tail or "/"),
            query=dict(request.query),
            headers=list(request.headers.items()),
            body=b"",
        )
        # The credential before the body: a caller without one gets its 401
        # without the collector reading (up to client_max_size of) its body.
        try:
            if self.needs_auth(scim_request):
                self.check_auth(scim_request)
        except Exception as exception:
            return self._error(request, scim_request, exception)
        try:
            scim_request.body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            too_large = PayloadTooLargeException(
                detail=f"request body larger than {request.client_max_size} "
                "bytes, the most the collector's HTTP listener reads"
            )
            response = self.service.error_response(too_large)
            return _web_response(self.finalize_response(scim_request, response))
        try:
            response = await self.handler.handle(scim_request)
        except Exception as exception:
            return self._error(request, scim_request, exception)
        response = self.finalize_response(scim_request, response)
        return _web_response(response)

    def _error(
        self, request: web.Request, scim_request: ScimRequest, exception: Exception
    ) -> web.Response:
        """The SCIM error answer to ``exception``; a refused credential is
        also challenged, counted and logged."""
        response = self.handle_exception(scim_request, exception)
        if isinstance(exception, UnauthorizedException):
            authorization = scim_request.header("Authorization") or ""
            response.headers["WWW-Authenticate"] = self.www_challenge(authorization)
            self._on_refused()
            log.warning(
                "scim request refused",
                extra={
                    "fields": {
                        "component": "collector",
                        "call": f"{request.method} {request.path}"[:200],
                        "status": 401,
                        "peer": request.remote or "",
                        "error": exception.detail,
                    }
                },
            )
        response = self.finalize_response(scim_request, response)
        return _web_response(response)

    def handle_exception(
        self, request: ScimRequest, exception: Exception
    ) -> ScimResponse:
        if not isinstance(exception, SCIMException):
            log.error(
                "scim request failed",
                exc_info=exception,
                extra={
                    "fields": {
                        "component": "collector",
                        "call": f"{request.method} {request.path}"[:200],
                        "error": f"{type(exception).__name__}: {exception}",
                    }
                },
            )
            return self.service.error_response(exception)
        return super().handle_exception(request, exception)


def _web_response(response: ScimResponse) -> web.Response:
    body = None if response.body is None else json.dumps(response.body).encode()
    return web.Response(
        status=int(response.status), body=body, headers=response.headers
    )


def add_scim_routes(app: web.Application, endpoint: ScimEndpoint) -> None:
    """Mount the SCIM endpoint under ``/scim`` on ``app``."""
    app.router.add_route("*", SCIM_PREFIX, endpoint.serve)
    app.router.add_route("*", SCIM_PREFIX + "/{tail:.*}", endpoint.serve)
