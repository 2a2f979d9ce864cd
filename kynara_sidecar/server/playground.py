"""The playground: try a request against the policies, or an edited copy.

Theory of operation. The playground is a page and a few JSON endpoints
under ``/playground`` on the daemon's one HTTP stack (``server.http``). It
is not a front door: nothing here goes through the decision pipeline. A
what-if run parses a request in the shape ``kynara-sidecar explain`` reads
(``policy_tests``), and calls ``engine.evaluate`` with ``explain=True``
against either the active policies (read from the pipeline, never changed)
or a set compiled from files the browser sent. Nothing is appended to the
audit log, no approval is opened, no metric of decisions moves, and a live
``Decide`` running at the same moment keeps deciding with the active set.

Isolation. A what-if run (parse, compile, decide, explain) runs in a
process of its own, at most ``MAX_RUNS`` at a time: an edited condition can
build a value of gigabytes in one CEL call (``replace`` on a replaced
string), which no iteration budget stops, and in the daemon that would hold
the interpreter's lock for seconds and take its memory. The process is
forked from a fork server started once with the engine's modules loaded
(the daemon itself, which runs gRPC's threads, is never forked); it gets
the request, the edited files and the active set's stored files as
msgspec bytes, limits its own address space (``playground.memory_mib``)
and CPU time (``playground.cpu_seconds``), and answers msgspec bytes on a
pipe. A worker thread waits for that answer; past
``playground.deadline_seconds`` it kills the process by its PID. A run
past any limit is a 422 naming the limit and its setting, and the event
loop only awaits. A replay of a recorded decision runs alike: the daemon
reads the record and the stored files of the set it cites, the run's
process compiles them and decides again. Each run's process lowers its
priority (``NICENESS``) so runs yield the cores to live decisions. Reading
the active files stays in a worker thread: it compiles nothing.

Endpoints (all JSON but the page):

    GET  /playground                  the page (signed in), else to sign-in
    GET  /playground/api/policies     the active set's source files (a copy)
    GET  /playground/api/tour         the guided tour's steps
    POST /playground/api/evaluate     {request, files?} -> the decision
    POST /playground/api/replay       {decision_id} -> recorded vs replayed

``request`` is the text of a request file (YAML or JSON) as ``explain``
reads it (``policy_tests.parse_request``), decided in the env a live
``Decide`` gets: the daemon's ``env`` section (environment, region, labels)
and its ``identity.daemon_id``, ``env.agent_id`` the chain's last
principal. ``request.now`` may be left out, and the run then uses the
daemon's clock, read once. A field the request's own ``env`` writes wins
over the daemon's (``labels`` as a whole, and ``peer``, which has no
connection to come from here): a what-if may ask "and in staging?", and a
replayed decision's request carries the env it was recorded with. The
answer names the env it was decided in. ``files`` (``[{name, content}]``)
replaces the whole set for this run; a file that does not load is a 400
naming the file and the location inside it, as the loader names them. A
name the loader would never read as a policy (below a ``tests/``
directory, a part starting with ``.``, a backslash) is a 400 naming it.

A daemon following the collector's signed directory (``directory.store``)
decides with that directory, compiled against its policies keeping roles
they do not define (``unknown_roles="keep"``), and reads no directory file
of its own. A what-if there decides alike: the active signed directory with
the active or the edited policies; an edited set needs no directory file,
and one it carries is ignored, which the answer says
(``directory_ignored``, shown beside "Policies" on the page). The copy
``/api/policies`` hands out there is the policies alone (``files``), the
signed directory's file beside it, read-only (``signed_directory``), so an
edited copy sent back as it is leaves nothing aside. The daemon
says it follows one (``PlaygroundSources.signed_directory``); until its
first signed directory arrives there is none (``NO_DIRECTORY``).

Who may use it. A reviewer or an operator: in a browser, by signing in at
``/playground/login`` with a reviewer's token (an admin secret with the
reviewer role or a reviewer JWT, checked by the review page's
``Authenticator``) or an admin secret with the operator role; from a script,
with ``authorization: Bearer <secret>`` of an operator credential. The
sign-in uses the review page's machinery (``review_page.SessionStore``,
the same cookie flags, a per-session CSRF token, the same origin rules),
in a store of its own: a playground session, which an operator may hold,
never reviews an approval, and a review session is not a playground one.
A POST with a session must come from this origin and carry the session's
CSRF token in the ``x-kynara-csrf`` header; a bearer call needs neither
(no browser adds a bearer header on its own). Anything else is 401 (no or
an unknown credential) or 403 (a known one without the role, or a forged
post), logged and counted.

Every response under ``/playground`` carries a strict Content-Security-Policy
(its one script and one style by hash, fetches to this origin only, no
framing) and ``nosniff``, ``no-referrer``, ``no-store``.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import hmac
import logging
import multiprocessing
import os
import pathlib
import resource
import secrets
import signal
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import msgspec
import yaml
from aiohttp import web

from kynara_sidecar.approvals.model import Reviewer
from kynara_sidecar.audit.chain import decode_record
from kynara_sidecar.audit.record import (
    AuditRecordV1,
    RecordKind,
    decode_value,
    request_from_record,
)
from kynara_sidecar.audit.store import AuditStore, PolicySource
from kynara_sidecar.config import AdminRole, EnvConfig, PlaygroundConfig
from kynara_sidecar.decision import (
    Decision,
    DecisionRequest,
    Duration,
    Env,
    Timestamp,
    UInt64,
)
from kynara_sidecar.errors import IdentityInvalid, PolicyError, RoleMissing
from kynara_sidecar.policy.compiler import compile_directory
from kynara_sidecar.policy.loader import (
    SUFFIXES,
    TEST_DIRECTORY,
    LoadedPolicies,
    SourceDocument,
    compile_documents,
    decode_document,
)
from kynara_sidecar.policy.model import PolicyDocument

# The request file's own reader, so a pasted request means here what it
# means to `kynara-sidecar explain`.
from kynara_sidecar.policy_tests import (
    LimitsSeen,
    PolicyRequest,
    format_explanation,
    format_limits,
    look_limits,
)
from kynara_sidecar.policy_tests import decide as decide_request
from kynara_sidecar.policy_tests import parse_request as parse_request_text
from kynara_sidecar.replay import (
    load_stored_policies,
    record_limit_values,
    replay_record,
    unrecorded_limits,
)
from kynara_sidecar.server import _playground_html as pages
from kynara_sidecar.server.admin import AdminCredentials
from kynara_sidecar.server.review_page import (
    LOGIN_FORM_SECONDS,
    MAX_TOKEN_CHARS,
    TOKEN_BYTES,
    TOKEN_EXPIRED,
    Authenticator,
    SessionStore,
    add_security_headers,
    expired,
    origin_of,
    same_origin,
    seconds_left,
    set_strict_cookie,
)
from kynara_sidecar.server.reviewers import token_expiry_ns

__all__ = [
    "CONTENT_SECURITY_POLICY",
    "CSRF_HEADER",
    "MAX_BODY_BYTES",
    "MAX_FILES",
    "MAX_REQUEST_CHARS",
    "MAX_RUNS",
    "PLAYGROUND_COOKIE",
    "PLAYGROUND_PATH",
    "TOUR",
    "PlaygroundSources",
    "TourStep",
    "add_playground_routes",
    "parse_request",
]

log = logging.getLogger("kynara.server")

PLAYGROUND_PATH = "/playground"
PLAYGROUND_COOKIE = "kynara_playground"
LOGIN_COOKIE = "kynara_playground_login"
CSRF_HEADER = "x-kynara-csrf"
# A whole edited policy set travels in one body: the shipped examples are
# a few KB, a large company's set a few MB. Past this it is refused (413)
# before it is read.
MAX_BODY_BYTES = 4 * 1024 * 1024
# A request file is a handful of lines; this bounds what YAML parses.
MAX_REQUEST_CHARS = 64 * 1024
# Files of one edited set; a policy root with more is no what-if.
MAX_FILES = 1000
MAX_FILE_NAME_CHARS = 256
# What-if runs at once: each compiles and explains in a process of its
# own; more would take the cores the live decisions need. One past it is 429.
MAX_RUNS = 2
# A run's process's niceness (the most, lowest priority): it yields the
# cores to the daemon's live decisions.
NICENESS = 19
# Decision ids are UUIDs; this bounds a pasted one.
MAX_DECISION_ID_CHARS = 128
# The body of a call that failed on other than a refusal; the daemon's log
# holds what failed and where.
INTERNAL_ERROR = "internal error; see the daemon's log"
# The realm a bearer 401's WWW-Authenticate names.
REALM = "kynara playground"

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; "
    f"style-src '{pages.STYLE_HASH}'; "
    f"script-src '{pages.SCRIPT_HASH}'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; "
    "base-uri 'none'"
)


@dataclass(frozen=True)
class PlaygroundSources:
    """What the playground reads, each asked for at the moment of a run.

    Attributes:
        policies: the active policy set and directory (the pipeline's), or
            None before one is active.
        store: the audit log, for the active set's files and recorded
            decisions; None when it is not open.
        authenticate: a reviewer's token -> Reviewer (the review page's
            ``Authenticator``).
        operators: the admin credentials; those with the operator role may
            use the playground.
        env: the daemon's ``env`` section, which a live ``Decide`` is
            decided in.
        daemon_id: the daemon's ``identity.daemon_id`` (``env.daemon_id``).
        limits: the ``playground`` section: each what-if run's memory, CPU
            time and wall-clock deadline.
        signed_directory: the daemon decides with the collector's signed
            directory (``directory.store``): edited sets are decided with the
            active directory, their own directory file left aside.
    """

    policies: Callable[[], LoadedPolicies | None]
    store: Callable[[], AuditStore | None]
    authenticate: Authenticator
    operators: AdminCredentials | None = None
    env: EnvConfig = field(default_factory=EnvConfig)
    daemon_id: str = ""
    limits: PlaygroundConfig = field(default_factory=PlaygroundConfig)
    signed_directory: bool = False

    def env_at(self, now: Timestamp) -> Env:
        """The env a live ``Decide`` at ``now`` gets, as the pipeline builds
        it; the agent and the peer come with each request."""
        return Env(
            now=now,
            daemon_id=self.daemon_id,
            environment=self.env.environment,
            region=self.env.region,
            labels=dict(self.env.labels),
        )


@dataclass(frozen=True)
class TourStep:
    """One step of the guided tour: a request over the shipped example
    policies (config/policies), what it shows, and what it decides there."""

    id: str
    title: str
    text: str
    request: str
    effect: str
    reason_code: str


def _tour_request(body: str) -> str:
    return "request:\n" + "".join(f"  {line}\n" for line in body.strip().splitlines())


# Said with the tour on a daemon following the collector's signed directory
# (directory.store), whose principals are not the shipped example's.
TOUR_SIGNED_DIRECTORY_NOTE = (
    "These steps were written for the shipped example directory "
    "(config/policies/directory.yaml). This daemon decides with the "
    "collector's signed directory (directory.store), so a step's answer "
    "differs where that directory lacks, deactivates or gives other roles "
    "to the principals the step names."
)

# A Monday, 10:00 in Berlin: inside the CRM rule's business hours.
_MONDAY = 'now: "2026-12-07T10:00:00+01:00"'
TOUR: tuple[TourStep, ...] = (
    TourStep(
        "allow",
        "An allow",
        "alice (support) asks support-bot to refund 12.00. Both alice and the "
        "agent hold a role that payments/refund-small allows, and the amount "
        "is within its limit, so every principal of the chain is allowed.",
        _tour_request(f"""
{_MONDAY}
chain: [alice, support-bot]
action: payments.refund.issue
resource: {{kind: payments.refund, id: rf-1, attributes: {{amount: 1200}}}}
"""),
        "allow",
        "rule_allowed",
    ),
    TourStep(
        "deny-by-rule",
        "A deny by rule",
        "The same refund from a blocked region: region-block/blocked-region "
        "matches every action for every role, and an explicit deny beats "
        "any allow.",
        _tour_request(f"""
{_MONDAY}
chain: [alice, support-bot]
action: payments.refund.issue
resource: {{kind: payments.refund, id: rf-1, attributes: {{amount: 1200}}}}
context: {{region: KP}}
"""),
        "deny",
        "rule_denied",
    ),
    TourStep(
        "no-rule-allows",
        "No rule allows",
        "erin is an employee, a role that grants nothing by itself: no rule "
        "for refunds applies to her, so she is denied with no_rule_allows "
        "even though the agent could refund.",
        _tour_request(f"""
{_MONDAY}
chain: [erin, support-bot]
action: payments.refund.issue
resource: {{kind: payments.refund, id: rf-1, attributes: {{amount: 1200}}}}
"""),
        "deny",
        "no_rule_allows",
    ),
    TourStep(
        "agent-lacks-permission",
        "A chain whose agent lacks permission",
        "alice may refund, but readonly-bot only reads CRM contacts. Every "
        "principal of the chain must be allowed on its own, so an agent "
        "never gains what its user may do.",
        _tour_request(f"""
{_MONDAY}
chain: [alice, readonly-bot]
action: payments.refund.issue
resource: {{kind: payments.refund, id: rf-1, attributes: {{amount: 1200}}}}
"""),
        "deny",
        "no_rule_allows",
    ),
    TourStep(
        "inactive-principal",
        "An inactive principal",
        "dave is in the directory but inactive: the chain is refused before "
        "any rule runs, whatever his roles would allow.",
        _tour_request(f"""
{_MONDAY}
chain: [dave, support-bot]
action: payments.refund.issue
resource: {{kind: payments.refund, id: rf-1, attributes: {{amount: 1200}}}}
"""),
        "deny",
        "inactive_principal",
    ),
    TourStep(
        "require-approval",
        "A refund that needs approval",
        "500.01 is over refund-small's limit and payments/refund-large asks "
        "a reviewer to approve it (config/requests/refund-over-limit.yaml).",
        _tour_request(f"""
{_MONDAY}
chain: [alice, support-bot]
action: payments.refund.issue
resource: {{kind: payments.refund, id: rf-1, attributes: {{amount: 50001}}}}
context: {{region: DE}}
"""),
        "require_approval",
        "approval_required",
    ),
    TourStep(
        "business-hours",
        "A time-dependent rule, inside its hours",
        "crm/read-contacts-business-hours allows reading a contact Monday to "
        "Friday, 09:00 to 16:59 in Berlin. At 10:00 on a Monday it holds.",
        _tour_request(f"""
{_MONDAY}
chain: [bob, readonly-bot]
action: crm.contact.read
resource: {{kind: crm.contact, id: c-42}}
"""),
        "allow",
        "rule_allowed",
    ),
    TourStep(
        "after-hours",
        "The same rule, after hours",
        "The same read at 18:30 Berlin time: the condition is false, no "
        "other rule allows it, so it is denied. Change now to try other "
        "instants; the zone follows daylight saving.",
        _tour_request("""
now: "2026-12-07T18:30:00+01:00"
chain: [bob, readonly-bot]
action: crm.contact.read
resource: {kind: crm.contact, id: c-42}
"""),
        "deny",
        "no_rule_allows",
    ),
)


# ------------------------------------------------------------ pure helpers


def parse_request(
    text: str, now: Timestamp | Env, *, name: str = "request"
) -> PolicyRequest:
    """Read a pasted request's text (YAML or JSON) as ``explain`` reads the
    file (``policy_tests.parse_request``), in the daemon's env.

    Args:
        text: the request file's text, at most ``MAX_REQUEST_CHARS``.
        now: the daemon's env (``PlaygroundSources.env_at``), or just the
            instant for a request that gives none.
        name: how errors cite the text.

    Raises:
        PolicyError: naming ``name`` and the location inside it: too long,
            malformed YAML, a key given twice, a missing or wrong field.
    """
    if len(text) > MAX_REQUEST_CHARS:
        raise PolicyError(
            f"expected a request of at most {MAX_REQUEST_CHARS} characters, "
            f"got {len(text)}",
            path=name,
        )
    defaults = now if isinstance(now, Env) else Env(now)
    return parse_request_text(text, name=name, defaults=defaults)


def _datetime_of(now: Timestamp) -> datetime.datetime:
    moment = datetime.datetime.fromtimestamp(now.seconds, datetime.UTC)
    return moment + datetime.timedelta(microseconds=now.nanos // 1000)


def _rfc3339(now: Timestamp) -> str:
    return _datetime_of(now).isoformat().replace("+00:00", "Z")


class _File(msgspec.Struct, frozen=True):
    """One file of an edited set, as the browser sent it."""

    name: str
    content: str


def _edited_files(files: object) -> list[_File]:
    """Check the files a browser sent (``[{name, content}]``): the list's
    shape and every name, before any process is started for them.

    Raises:
        PolicyError: a bad list, item or name (see ``_check_file_name``), or
            a name given twice.
    """
    if not isinstance(files, list) or not files:
        raise PolicyError(
            "expected files as a non-empty list of {name, content}", path="files"
        )
    if len(files) > MAX_FILES:
        raise PolicyError(
            f"expected at most {MAX_FILES} files, got {len(files)}", path="files"
        )
    checked, seen = [], set()
    for i, item in enumerate(files):
        where = f"files[{i}]"
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise PolicyError("expected {name, content} strings", path=where)
        name, content = item["name"], item.get("content")
        _check_file_name(name, where)
        if not isinstance(content, str):
            raise PolicyError("expected content as a string", path=name)
        if name in seen:
            raise PolicyError(
                f"expected each file once, got {name!r} again", path=where
            )
        seen.add(name)
        checked.append(_File(name, content))
    return checked


def _edited_set(
    files: list[_File], signed: SourceDocument | None = None, *, follows: bool = False
) -> tuple[LoadedPolicies, list[str]]:
    """Compile checked files (``_edited_files``) as one set.

    Args:
        files: the edited set.
        signed: the active signed directory's file, when the daemon follows
            one (``directory.store``); None with none yet.
        follows: the daemon follows a signed directory: the set's own
            directory files are left aside, as the daemon leaves its own,
            and ``signed`` (kept unknown roles) is the set's directory.

    Returns:
        The compiled set, and the names of the directory files left aside.

    Raises:
        PolicyError: a file that does not load (naming it as the loader
            does), or a set that does not compile.
    """
    documents = [
        decode_document(file.name, file.content.encode(), name=file.name)
        for file in files
    ]
    if not follows:
        return compile_documents(documents, root="edited copy"), []
    ignored = sorted(
        item.name for item in documents if not isinstance(item.document, PolicyDocument)
    )
    loaded = compile_documents(documents, root="edited copy", directory="ignored")
    if signed is None:
        return loaded, ignored
    directory = compile_directory(signed, loaded.policy_set, unknown_roles="keep")
    return LoadedPolicies(loaded.policy_set, directory), ignored


def _check_file_name(name: str, where: str) -> None:
    """Refuse a name the policy loader would not read as a policy file.

    Raises:
        PolicyError: at ``where``, naming the file and why.
    """
    path = pathlib.PurePosixPath(name)
    if (
        not name
        or len(name) > MAX_FILE_NAME_CHARS
        or path.is_absolute()
        or any(part in ("", ".", "..") for part in name.split("/"))
        or path.suffix not in SUFFIXES
    ):
        raise PolicyError(
            f"expected a relative file name ending {', '.join(sorted(SUFFIXES))} "
            f"of at most {MAX_FILE_NAME_CHARS} characters, without . or .. parts; "
            f"got {name[:80]!r}",
            path=where,
        )
    # The loader's own rules (``read_documents``): the daemon would never
    # load such a file, so a what-if with it would answer for a set that
    # cannot be deployed as sent.
    if "\\" in name:
        raise PolicyError(
            f"expected '/' between the parts of a file name, got a backslash "
            f"in {name[:80]!r}",
            path=where,
        )
    if any(part.startswith(".") for part in path.parts):
        raise PolicyError(
            f"{name[:80]!r} has a part starting with '.': the daemon skips "
            "such files (editor and ConfigMap leftovers) and never loads them",
            path=where,
        )
    if TEST_DIRECTORY in path.parts[:-1]:
        raise PolicyError(
            f"{name[:80]!r} is below a {TEST_DIRECTORY}/ directory: such files "
            "are policy tests (kynara-sidecar test), never loaded as policies",
            path=where,
        )


def _decided(decision: Decision, limits: LimitsSeen | None = None) -> dict[str, Any]:
    out = msgspec.to_builtins(decision)
    out["explained"] = format_explanation(decision, limits)
    # One line per limit the decision read or counted, as explain prints it.
    out["limits"] = (
        format_limits(limits.entries, limits.values, limits.notes) if limits else []
    )
    return out


def _decide(policies: LoadedPolicies, request: PolicyRequest) -> dict[str, Any]:
    """The request decided and explained, with the limit values it gives.

    Raises:
        PolicyError: a limit the request gives is refused (``look_limits``).
    """
    limits = look_limits(policies, request)
    decision = decide_request(policies, request, explain=True, limits=limits)
    return _decided(decision, limits)


class _RequestDumper(yaml.SafeDumper):
    """Writes a recorded request back as a request file, typed values as
    the file's ``!uint`` and ``!timestamp`` tags."""


_RequestDumper.add_representer(
    UInt64, lambda dumper, value: dumper.represent_scalar("!uint", str(int(value)))
)
_RequestDumper.add_representer(
    Timestamp,
    lambda dumper, value: dumper.represent_scalar("!timestamp", _rfc3339(value)),
)


def _request_text(record: AuditRecordV1, rebuilt: tuple[DecisionRequest, Env]) -> str:
    """The recorded request (``rebuilt``: ``request_from_record(record)``)
    as a request file, for the editor; "" when a value has no request-file
    form (bytes, a duration)."""
    request, env = rebuilt

    def plain(value: Any) -> bool:
        if isinstance(value, bytes | Duration):
            return False
        if isinstance(value, dict):
            return all(plain(item) for item in value.values())
        if isinstance(value, list):
            return all(plain(item) for item in value)
        return True

    if not plain(request.resource.attributes) or not plain(request.context):
        return ""
    # What its limits held, so the loaded request decides as it was decided.
    limits: dict[str, Any] = {}
    for name, entry in record.limits.items():
        if entry.error:
            continue
        given: dict[str, Any] = {"count": entry.count + entry.remote_count}
        if entry.sum is not None:
            given["sum"] = decode_value(entry.sum) + (
                decode_value(entry.remote_sum) if entry.remote_sum is not None else 0
            )
        limits[name] = given
    body: dict[str, Any] = {
        "now": env.now,
        "chain": list(request.chain),
        "action": request.action,
        "resource": {
            "kind": request.resource.kind,
            "id": request.resource.id,
            "attributes": request.resource.attributes,
        },
        "context": request.context,
        "env": {
            "environment": env.environment,
            "region": env.region,
            "labels": dict(env.labels),
            **({"peer": env.peer} if env.peer else {}),
        },
        **({"limits": limits} if limits else {}),
    }
    return yaml.dump(
        {"request": body}, Dumper=_RequestDumper, sort_keys=False, allow_unicode=True
    )


class _Refused(Exception):
    """A JSON refusal: status and body."""

    def __init__(self, status: int, error: str, **more: str):
        super().__init__(error)
        self.status = status
        self.body = {"error": error, **{k: v for k, v in more.items() if v}}
        # Response headers, e.g. ``WWW-Authenticate`` on a bearer 401.
        self.headers: dict[str, str] = {}

    @classmethod
    def of(cls, status: int, body: Mapping[str, Any]) -> _Refused:
        """A refusal a what-if run's process answered."""
        refused = cls(status, str(body.get("error", "")))
        refused.body = dict(body)
        return refused


def _replay_job(store: AuditStore, decision_id: str) -> _ReplayJob:
    """The recorded decision ``decision_id`` and the stored files of the
    set its record cites, read from the log in the daemon (a worker
    thread) for a run's process to compile and decide again.

    Raises:
        _Refused: no such decision (404), or the log lacks its files (409).
    """
    seq = store.find_decision(decision_id)
    stored = None if seq is None else store.get(seq)
    if stored is None:
        raise _Refused(404, f"no decision with the id {decision_id!r} in the audit log")
    record = decode_record(stored.record_bytes)
    if record.kind != RecordKind.DECISION:
        raise _Refused(404, f"record {seq} is not a decision")
    # A decision taken before a signed directory arrived (``NO_DIRECTORY``)
    # cites none: it is decided again with the policies alone.
    sources = _read_sources(store, record.policy_revision, record.directory_revision)
    if sources is None:
        raise _Refused(
            409,
            f"the audit log does not hold policy {record.policy_revision} "
            f"and directory {record.directory_revision}, which decision "
            f"{decision_id} cites",
        )
    policy, directory = sources
    return _ReplayJob(
        decision_id=decision_id,
        record=record,
        policy_revision=record.policy_revision,
        directory_revision=record.directory_revision,
        policy=policy,
        directory=directory,
    )


def _replay(job: _ReplayJob) -> dict[str, Any]:
    """A recorded decision and the same request decided again under the
    policies its record cites; in a run's process."""
    record = job.record
    try:
        policies = _compile_stored(job)
        # A record that cannot be rebuilt into a request is refused here.
        rebuilt = request_from_record(record)
        values = record_limit_values(record, policies, rebuilt)
        request_text = _request_text(record, rebuilt)
    except (ValueError, PolicyError) as err:
        raise _Refused(
            422, f"decision {job.decision_id} cannot be replayed: {err}"
        ) from err
    replayed = replay_record(
        record, policies, explain=True, values=values, rebuilt=rebuilt
    )
    _, unrecorded = unrecorded_limits(record, policies, values=values)
    recorded = {
        "effect": record.decision,
        "reason_code": record.reason_code,
        "reason": record.reason,
        "matched_rules": msgspec.to_builtins(record.matched_rules),
        "policy_revision": record.policy_revision,
        "directory_revision": record.directory_revision,
        "time": record.time,
        "seq": record.seq,
        # As the record keeps them (the same set's ceilings): what the
        # decision saw, in the replayed column's form.
        "limits": format_limits(record.limits, values),
    }
    out = _decided(replayed)
    # Replayed with the recorded values, never the log's live counts.
    out["limits"] = format_limits(
        record.limits,
        values,
        {
            name: "not recorded: conditions reading it failed closed"
            for name in unrecorded
        },
    )
    return {
        "decision_id": job.decision_id,
        "recorded": recorded,
        "replayed": out,
        "changed": replayed.effect.value != record.decision,
        "request": request_text,
    }


def _isolated_replay(
    store: AuditStore, decision_id: str, limits: PlaygroundConfig
) -> dict[str, Any]:
    """Read the decision and its set's files, then compile and decide again
    in a process of its own (``_run_isolated``), as a what-if runs: no
    compile in the daemon, the run's limits and priority; in a worker
    thread.

    Raises:
        _Refused: as ``_replay_job``, or the run's own refusal or limit.
    """
    job = _replay_job(store, decision_id)
    status, body = _run_isolated(msgspec.msgpack.encode(job), limits)
    if status != 200:
        raise _Refused.of(status, body)
    return body


def _same_origin(request: web.Request, origins: frozenset[str]) -> bool:
    """The review page's rule (``review_page.same_origin``): the Origin is
    this page's own (or a public origin), else ``Sec-Fetch-Site:
    same-origin``; nothing else passes, a Referer neither."""
    return same_origin(request, origins, referer=False)


# ------------------------------------------------------------ the handlers


class _Playground:
    def __init__(
        self,
        sources: PlaygroundSources,
        *,
        title: str,
        sessions: SessionStore,
        secure_cookie: bool,
        origins: frozenset[str],
        clock: Callable[[], int],
        on_refused: Callable[[str], None],
    ):
        self.sources = sources
        self.title = title
        self.sessions = sessions
        self.secure_cookie = secure_cookie
        self.origins = origins
        self.clock = clock
        self.on_refused = on_refused
        self.running = 0

    # -- who is asking

    def _refuse(self, status: int, why: str, message: str) -> _Refused:
        log.warning(
            "refused playground call",
            extra={"fields": {"component": "server", "why": why, "error": message}},
        )
        self.on_refused(why)
        return _Refused(status, message)

    def _caller(self, request: web.Request, *, posting: bool) -> str:
        """Who is calling (for the log line), or raise the refusal."""
        authorization = request.headers.get("authorization", "")
        if authorization.strip():
            return self._operator(authorization)
        session = self.sessions.get(request.cookies.get(PLAYGROUND_COOKIE, ""))
        if session is None:
            refused = self._refuse(
                401,
                "identity_invalid",
                "expected a playground sign-in (/playground/login) or "
                "'authorization: Bearer <secret>' of an operator credential",
            )
            # RFC 6750 3.1: no credential was sent, so no error code.
            refused.headers["WWW-Authenticate"] = f'Bearer realm="{REALM}"'
            raise refused
        if posting:
            if not _same_origin(request, self.origins):
                raise self._refuse(
                    403, "origin", "this call was not sent from this page's origin"
                )
            sent = request.headers.get(CSRF_HEADER, "")
            if not hmac.compare_digest(sent.encode(), session.csrf.encode()):
                raise self._refuse(
                    403,
                    "csrf",
                    f"expected the session's CSRF token in {CSRF_HEADER}; reload "
                    "the page",
                )
        return session.reviewer.id

    def _operator(self, authorization: str) -> str:
        operators = self.sources.operators
        try:
            if operators is None:
                raise IdentityInvalid(
                    "expected an operator credential, but none is configured "
                    "(admin.credentials)",
                    field="authorization",
                )
            caller = operators.authenticate(authorization)
            if AdminRole.OPERATOR not in caller.roles:
                raise RoleMissing(
                    f"expected a credential with the operator role for the "
                    f"playground, got {caller.name!r} with roles "
                    f"[{', '.join(sorted(caller.roles))}]",
                    field="authorization",
                )
        except IdentityInvalid as err:
            refused = self._refuse(401, err.code.value, str(err))
            # RFC 6750: a bearer credential that does not pass says which
            # scheme is expected.
            refused.headers["WWW-Authenticate"] = (
                f'Bearer realm="{REALM}", error="invalid_token"'
            )
            raise refused from None
        except RoleMissing as err:
            raise self._refuse(403, err.code.value, str(err)) from None
        return f"operator {caller.name}"

    def _sign_in(self, token: str) -> Reviewer:
        """A reviewer, or an operator as a playground-only reviewer.

        Raises:
            IdentityInvalid, RoleMissing: neither may use the playground.
        """
        try:
            return self.sources.authenticate(token)
        except (IdentityInvalid, RoleMissing) as refused:
            operators = self.sources.operators
            if operators is None:
                raise
            try:
                caller = operators.authenticate(f"Bearer {token}")
            except IdentityInvalid:
                raise refused from None
            if AdminRole.OPERATOR not in caller.roles:
                raise
            return Reviewer(
                id=caller.name,
                roles=frozenset({AdminRole.OPERATOR.value}),
                credential=caller.name,
            )

    # -- sign in and out

    def _html(self, text: str, status: int = 200) -> web.Response:
        return web.Response(text=text, status=status, content_type="text/html")

    def _login_page(self, error: str = "", status: int = 200) -> web.Response:
        csrf = secrets.token_urlsafe(TOKEN_BYTES)
        response = self._html(pages.render_login(self.title, csrf, error), status)
        set_strict_cookie(
            response,
            LOGIN_COOKIE,
            csrf,
            max_age=LOGIN_FORM_SECONDS,
            path=f"{PLAYGROUND_PATH}/login",
            secure=self.secure_cookie,
        )
        return response

    async def login_form(self, request: web.Request) -> web.Response:
        return self._login_page()

    async def login(self, request: web.Request) -> web.Response:
        form = await request.post()
        sent, token = form.get("csrf", ""), form.get("token", "")
        expected = request.cookies.get(LOGIN_COOKIE, "")
        if not isinstance(sent, str) or not isinstance(token, str):
            sent, token = "", ""
        if not _same_origin(request, self.origins) or not (
            expected and hmac.compare_digest(sent.encode(), expected.encode())
        ):
            self.on_refused("csrf")
            return self._login_page(
                "The form was not sent from this page or its token is stale; "
                "send it again.",
                403,
            )
        token = token.strip()
        try:
            if not token or len(token) > MAX_TOKEN_CHARS:
                raise IdentityInvalid(
                    f"expected a token of 1..{MAX_TOKEN_CHARS} characters",
                    field="token",
                )
            reviewer = self._sign_in(token)
        except IdentityInvalid as err:
            self.on_refused(err.code.value)
            return self._login_page("That token is not a known credential.", 401)
        except RoleMissing as err:
            self.on_refused(err.code.value)
            return self._login_page(
                "That credential is valid but may not use the playground: it "
                "needs the reviewer or the operator role.",
                403,
            )
        not_after_ns = token_expiry_ns(token)
        if expired(not_after_ns, self.clock()):
            # Accepted within the clock skew but past its exp: a session
            # opened with it would be over before the page loads.
            self.on_refused(IdentityInvalid.code.value)
            return self._login_page(TOKEN_EXPIRED, 401)
        self.sessions.close(request.cookies.get(PLAYGROUND_COOKIE, ""))
        session_id, session = self.sessions.open(reviewer, not_after_ns=not_after_ns)
        log.info(
            "signed in to playground",
            extra={"fields": {"who": reviewer.id, "credential": reviewer.credential}},
        )
        response = web.HTTPSeeOther(PLAYGROUND_PATH)
        set_strict_cookie(
            response,
            PLAYGROUND_COOKIE,
            session_id,
            max_age=seconds_left(session, self.clock()),
            path=PLAYGROUND_PATH,
            secure=self.secure_cookie,
        )
        response.del_cookie(LOGIN_COOKIE, path=f"{PLAYGROUND_PATH}/login")
        raise response

    async def logout(self, request: web.Request) -> web.Response:
        form = await request.post()
        session_id = request.cookies.get(PLAYGROUND_COOKIE, "")
        session = self.sessions.get(session_id)
        sent = form.get("csrf", "")
        if (
            session is None
            or not isinstance(sent, str)
            or not _same_origin(request, self.origins)
            or not hmac.compare_digest(sent.encode(), session.csrf.encode())
        ):
            self.on_refused("csrf")
            return self._login_page("Sign-out refused: send it from the page.", 403)
        self.sessions.close(session_id)
        response = web.HTTPSeeOther(f"{PLAYGROUND_PATH}/login")
        response.del_cookie(PLAYGROUND_COOKIE, path=PLAYGROUND_PATH)
        raise response

    # -- the page

    async def page(self, request: web.Request) -> web.Response:
        session = self.sessions.get(request.cookies.get(PLAYGROUND_COOKIE, ""))
        if session is None:
            raise web.HTTPSeeOther(f"{PLAYGROUND_PATH}/login")
        return self._html(
            pages.render_page(self.title, who=session.reviewer.id, csrf=session.csrf)
        )

    # -- JSON

    async def _json_call(
        self, request: web.Request, run: Callable[..., Any], *, posting: bool
    ) -> web.Response:
        try:
            who = self._caller(request, posting=posting)
            body = await self._body(request) if posting else None
            result = await run(body)
        except _Refused as refused:
            return web.json_response(
                refused.body, status=refused.status, headers=refused.headers
            )
        except Exception as err:  # noqa: BLE001 - answered as JSON, logged in full
            # A store that fails to read (LMDB), a record that does not
            # decode, a run's process that does not start: the browser
            # gets JSON it can show, the log gets what went wrong.
            log.error(
                "playground call failed",
                exc_info=True,
                extra={
                    "fields": {
                        "component": "server",
                        "path": request.path,
                        "error": f"{type(err).__name__}: {err}",
                    }
                },
            )
            return web.json_response(
                {"error": INTERNAL_ERROR},
                status=500,
            )
        log.debug(
            "playground call",
            extra={"fields": {"component": "server", "who": who, "path": request.path}},
        )
        return web.json_response(result)

    async def _body(self, request: web.Request) -> Any:
        length = request.content_length
        if length is not None and length > MAX_BODY_BYTES:
            raise _Refused(
                413, f"expected a body of at most {MAX_BODY_BYTES} bytes, got {length}"
            )
        # The whole body, as it arrives in chunks: one read returns only
        # what has arrived so far.
        data = bytearray()
        async for chunk in request.content.iter_any():
            data += chunk
            if len(data) > MAX_BODY_BYTES:
                raise _Refused(
                    413, f"expected a body of at most {MAX_BODY_BYTES} bytes"
                )
        try:
            body = msgspec.json.decode(data)
        except msgspec.DecodeError as err:
            raise _Refused(400, f"expected a JSON object, got: {err}") from None
        if not isinstance(body, dict):
            raise _Refused(400, "expected a JSON object")
        return body

    async def _in_worker(self, work: Callable[[], Any]) -> Any:
        if self.running >= MAX_RUNS:
            raise _Refused(
                429, f"{MAX_RUNS} playground runs are in progress; try again"
            )
        self.running += 1
        try:
            return await asyncio.to_thread(work)
        finally:
            self.running -= 1

    async def policies(self, request: web.Request) -> web.Response:
        async def run(_body: object) -> dict[str, Any]:
            active, store = self.sources.policies(), self.sources.store()
            if active is None:
                raise _Refused(503, "no policy set is active yet")
            if store is None:
                raise _Refused(503, "the audit log, which keeps the files, is not open")
            follows = self.sources.signed_directory
            return await self._in_worker(
                lambda: _active_files(store, active, follows=follows)
            )

        return await self._json_call(request, run, posting=False)

    async def tour(self, request: web.Request) -> web.Response:
        async def run(_body: object) -> dict[str, Any]:
            answer: dict[str, Any] = {
                "steps": [msgspec.to_builtins(step) for step in TOUR]
            }
            if self.sources.signed_directory:
                # The steps' texts and effects name the shipped directory's
                # principals; a signed directory may lack or deactivate them.
                answer["note"] = TOUR_SIGNED_DIRECTORY_NOTE
            return answer

        return await self._json_call(request, run, posting=False)

    async def evaluate(self, request: web.Request) -> web.Response:
        async def run(body: Mapping[str, Any]) -> dict[str, Any]:
            text, files = body.get("request"), body.get("files")
            if not isinstance(text, str):
                raise _Refused(400, "expected request as the text of a request file")
            try:
                edited = None if files is None else _edited_files(files)
            except PolicyError as err:
                raise _Refused(
                    400, str(err), file=err.path, location=err.location
                ) from None
            active = self.sources.policies()
            if active is None and edited is None:
                raise _Refused(503, "no policy set is active yet")
            env = self.sources.env_at(Timestamp.from_nanos(self.clock()))
            job = _WhatIfJob(text, env, edited)
            store, limits = self.sources.store(), self.sources.limits
            signed = self.sources.signed_directory
            return await self._in_worker(
                lambda: _isolated_what_if(job, active, store, limits, signed)
            )

        return await self._json_call(request, run, posting=True)

    async def replay(self, request: web.Request) -> web.Response:
        async def run(body: Mapping[str, Any]) -> dict[str, Any]:
            decision_id = body.get("decision_id")
            if (
                not isinstance(decision_id, str)
                or not decision_id.strip()
                or len(decision_id) > MAX_DECISION_ID_CHARS
            ):
                raise _Refused(
                    400,
                    f"expected decision_id as 1..{MAX_DECISION_ID_CHARS} characters",
                )
            store, limits = self.sources.store(), self.sources.limits
            if store is None:
                raise _Refused(503, "the audit log is not open")
            return await self._in_worker(
                lambda: _isolated_replay(store, decision_id.strip(), limits)
            )

        return await self._json_call(request, run, posting=True)


def _isolated_what_if(
    job: _WhatIfJob,
    active: LoadedPolicies | None,
    store: AuditStore | None,
    limits: PlaygroundConfig,
    follows: bool,
) -> dict[str, Any]:
    """Add the active set's stored files to ``job`` and run it in a process
    of its own (``_run_isolated``); in a worker thread. ``follows``: the
    daemon decides with a signed directory (``directory.store``).

    Raises:
        _Refused: the active set's files are not at hand (503), or the run
            was refused or went past a limit (its status and body).
    """
    if active is not None:
        if store is None:
            raise _Refused(
                503, "the audit log, which keeps the active set's files, is not open"
            )
        policy, directory = _stored_sources(store, active)
        job = msgspec.structs.replace(
            job,
            policy_revision=active.policy_set.revision,
            directory_revision=active.directory.revision,
            policy=policy,
            directory=directory,
            signed_directory=follows,
        )
    status, body = _run_isolated(msgspec.msgpack.encode(job), limits)
    if status != 200:
        raise _Refused.of(status, body)
    return body


def _stored_sources(
    store: AuditStore, active: LoadedPolicies
) -> tuple[PolicySource, PolicySource | None]:
    """The active set's stored files: its policies' and its directory's, the
    latter None while a daemon following a signed directory has none yet
    (``NO_DIRECTORY``).

    Raises:
        _Refused: 503, the audit log does not hold them.
    """
    policy_revision = active.policy_set.revision
    directory_revision = active.directory.revision
    sources = _read_sources(store, policy_revision, directory_revision)
    if sources is None:
        raise _Refused(
            503,
            f"the audit log does not hold the files of policy {policy_revision} "
            f"and directory {directory_revision}",
        )
    return sources


def _read_sources(
    store: AuditStore, policy_revision: str, directory_revision: str
) -> tuple[PolicySource, PolicySource | None] | None:
    """The stored files of a policy revision and a directory revision (None
    for no directory, ``NO_DIRECTORY``), or None when the log lacks one."""
    policy = store.get_policy_source("policy", policy_revision)
    directory = (
        store.get_policy_source("directory", directory_revision)
        if directory_revision
        else None
    )
    if policy is None or (directory is None and directory_revision):
        return None
    return policy, directory


def _file_entries(files: Mapping[str, bytes]) -> list[dict[str, str]]:
    return [
        {"name": name, "content": content.decode("utf-8", "replace")}
        for name, content in sorted(files.items())
    ]


def _active_files(
    store: AuditStore, active: LoadedPolicies, *, follows: bool = False
) -> dict[str, Any]:
    """The active set's files, the answer of ``GET /playground/api/policies``.

    ``files`` is the editable copy. A daemon that follows a signed
    directory (``follows``) decides every edited set with that directory
    and leaves aside any directory file in it, so the signed directory's
    files are answered apart, read-only (``signed_directory.files``), never
    in ``files``.

    Raises:
        _Refused: 503, the log lacks the files, or two of them share a name.
    """
    policy, directory = _stored_sources(store, active)
    out: dict[str, Any] = {
        "policy_revision": active.policy_set.revision,
        "directory_revision": active.directory.revision,
    }
    if follows:
        out["files"] = _file_entries(policy.files)
        if directory is not None:
            out["signed_directory"] = {
                "files": _file_entries(directory.files),
                "read_only": True,
            }
        return out
    clash = sorted(set(policy.files) & set(directory.files if directory else ()))
    if clash:
        raise _Refused(
            503,
            f"the stored files of policy {active.policy_set.revision} and "
            f"directory {active.directory.revision} both hold {clash}; the "
            "copy would lose one of each",
        )
    files = {**policy.files, **(directory.files if directory else {})}
    out["files"] = _file_entries(files)
    return out


def _what_if(
    text: str,
    files: list[_File] | None,
    active: LoadedPolicies | None,
    env: Env,
    signed: SourceDocument | None = None,
    *,
    follows: bool = False,
) -> dict[str, Any]:
    """Decide the pasted request under the edited files (checked by
    ``_edited_files``) or the active set, and under the active set beside
    the edited one; the answer of ``POST /playground/api/evaluate``.

    With ``follows`` (the daemon follows a signed directory, ``signed`` its
    active file) an edited set is decided with that directory, as the
    daemon would, and its own directory files are named as ignored.
    """
    try:
        request = parse_request(text, env)
        edited, ignored = (
            (None, []) if files is None else _edited_set(files, signed, follows=follows)
        )
    except PolicyError as err:
        raise _Refused(400, str(err), file=err.path, location=err.location) from None
    decided_in = msgspec.to_builtins(request.env)
    decided_in.pop("now")
    out: dict[str, Any] = {
        "now": _rfc3339(request.now),
        "env": decided_in,
        "policies": "active" if edited is None else "edited",
    }
    if follows:
        out["directory"] = "signed"
    if ignored:
        out["directory_ignored"] = {
            "files": ignored,
            "why": "this daemon follows the collector's signed directory "
            "(directory.store) and reads no directory file of its own: the "
            "edited set was decided with the active signed directory, "
            + (active.directory.revision if active is not None else "none")
            + ", as the daemon would decide it",
        }
    chosen = edited if edited is not None else active
    assert chosen is not None
    try:
        out["decision"] = _decide(chosen, request)
    except PolicyError as err:
        raise _Refused(400, str(err), file=err.path, location=err.location) from None
    if edited is not None and active is not None:
        try:
            out["active_decision"] = _decide(active, request)
        except PolicyError as err:
            # A limit the edited set declares and the active one does not.
            out["active_error"] = str(err)
    return out


# ------------------------------------------------------------ isolated runs

# Imported once by the fork server, so each run's process starts with the
# engine, the loader and CEL loaded. ``kynara_sidecar.entry`` is what the
# console script's main module imports, which each process runs again.
_PRELOAD = [__name__, "kynara_sidecar.entry"]
_RUN_SETTING = "playground"


class _WhatIfJob(msgspec.Struct, frozen=True, tag="what_if"):
    """One what-if run, as its process receives it.

    ``policy`` and ``directory`` are the active set's stored files (under
    the revisions named), compiled again in the run's process; None before
    a set is active (``directory`` also while a daemon that follows a
    signed directory has none yet). ``signed_directory``: the daemon
    follows the collector's signed directory (``directory.store``).
    """

    request: str
    env: Env
    files: list[_File] | None = None
    policy_revision: str = ""
    directory_revision: str = ""
    policy: PolicySource | None = None
    directory: PolicySource | None = None
    signed_directory: bool = False


class _ReplayJob(msgspec.Struct, frozen=True, tag="replay"):
    """One replay, as its process receives it: the decision's record, as
    the daemon read it, and the stored files of the set it cites
    (``directory`` None for a decision taken with no directory,
    ``NO_DIRECTORY``)."""

    decision_id: str
    record: AuditRecordV1
    policy_revision: str
    directory_revision: str
    policy: PolicySource
    directory: PolicySource | None = None


class _WhatIfAnswer(msgspec.Struct, frozen=True):
    """A run's answer: the HTTP status and the JSON body."""

    status: int
    body: dict[str, Any]


class _StoredSources:
    """The two stored sources of the active set, read in the daemon, as
    ``replay.load_stored_policies`` reads a store."""

    path = "active set"

    def __init__(self, job: _WhatIfJob | _ReplayJob):
        self.job = job

    def get_policy_source(self, part: str, revision: str) -> PolicySource | None:
        if part == "policy" and revision == self.job.policy_revision:
            return self.job.policy
        if part == "directory" and revision == self.job.directory_revision:
            return self.job.directory
        return None


def _what_if_job(job: _WhatIfJob) -> dict[str, Any]:
    """Compile the active set from its stored files and run ``_what_if``.

    The stored directory is compiled keeping roles the policies do not
    define (``load_stored_policies``), as the daemon compiles a signed one;
    a daemon following a signed directory with none yet has no directory.
    """
    active, signed = None, None
    if job.policy is not None:
        try:
            active = _compile_stored(job)
            if job.signed_directory and job.directory is not None:
                signed = _directory_document(job.directory)
        except PolicyError as err:
            raise _Refused(
                503, f"the active set's stored files do not compile here: {err}"
            ) from None
    return _what_if(
        job.request, job.files, active, job.env, signed, follows=job.signed_directory
    )


def _compile_stored(job: _WhatIfJob | _ReplayJob) -> LoadedPolicies:
    """Compile the set a job's stored files hold, as ``load_stored_policies``
    compiles a store's, or its policies alone when it has no directory.

    Raises:
        PolicyError: they do not compile, or not to their stored revisions.
    """
    assert job.policy is not None  # callers send no job without policies
    if job.directory is None:
        return _without_directory(job.policy, job.policy_revision)
    policies = load_stored_policies(
        _StoredSources(job),  # type: ignore[arg-type]
        job.policy_revision,
        job.directory_revision,
    )
    assert policies is not None  # both sources are in the job
    return policies


def _without_directory(policy: PolicySource, revision: str) -> LoadedPolicies:
    """Stored policies alone (``NO_DIRECTORY``): the active set's while a
    daemon following a signed directory has none yet, or a replayed
    decision's taken then.

    Raises:
        PolicyError: they do not compile, or not to their stored revision.
    """
    where = f"{_StoredSources.path} policy_sets"
    documents = [
        decode_document(f"{where}/{name}", content, name=name)
        for name, content in policy.files.items()
    ]
    loaded = compile_documents(documents, root=where, directory="ignored")
    if loaded.policy_set.revision != revision:
        raise PolicyError(
            f"expected stored files to compile to policy {revision}, "
            f"got {loaded.policy_set.revision}",
            path=where,
        )
    return loaded


def _directory_document(source: PolicySource) -> SourceDocument:
    """The one file of a stored signed directory, decoded.

    Raises:
        PolicyError: it holds other than one file, or that does not load.
    """
    if len(source.files) != 1:
        raise PolicyError(
            f"expected the signed directory as one file, got {sorted(source.files)}",
            path=f"{_StoredSources.path} directory",
        )
    ((name, content),) = source.files.items()
    where = f"{_StoredSources.path} policy_sets/{name}"
    return decode_document(where, content, name=name)


def _limit_process(kind: int, wanted: int) -> None:
    """Lower one resource limit of this process to ``wanted`` (soft and
    hard), never above a hard limit the daemon was started with."""
    _soft, hard = resource.getrlimit(kind)
    if hard != resource.RLIM_INFINITY:
        wanted = min(wanted, hard)
    resource.setrlimit(kind, (wanted, wanted))


def _answer_in_process(
    job: bytes, memory_mib: int, cpu_seconds: int, answer: Connection
) -> None:
    """The body of a run's process: limit it, run the job, answer once.

    A condition that needs more memory than ``memory_mib`` fails with
    MemoryError (CEL's ``std::bad_alloc`` too) and is answered as such; one
    past ``cpu_seconds`` gets SIGXCPU, which ends the process (the daemon
    names the limit from the exit).
    """
    # Below live decisions: two runs at their CPU limit must not take the
    # cores from the daemon's threads at equal priority.
    os.nice(NICENESS)
    _limit_process(resource.RLIMIT_CORE, 0)
    # Soft at the limit (SIGXCPU ends the process), hard a second later
    # (SIGKILL) should anything catch SIGXCPU.
    _soft, hard = resource.getrlimit(resource.RLIMIT_CPU)
    cpu_hard = cpu_seconds + 1
    if hard != resource.RLIM_INFINITY:
        cpu_hard = min(cpu_hard, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (min(cpu_seconds, cpu_hard), cpu_hard))
    _limit_process(resource.RLIMIT_AS, memory_mib * 1024 * 1024)
    try:
        decoded = msgspec.msgpack.decode(job, type=_WhatIfJob | _ReplayJob)
        if isinstance(decoded, _ReplayJob):
            status, body = 200, _replay(decoded)
        else:
            status, body = 200, _what_if_job(decoded)
    except _Refused as refused:
        status, body = refused.status, refused.body
    except MemoryError:
        status, body = 422, {"error": _exceeded("memory", memory_mib)}
    except Exception as err:  # noqa: BLE001 - answered, not lost with the process
        failed = f"what-if run failed: {type(err).__name__}: {err}"
        status, body = 500, {"error": failed}
    answer.send_bytes(msgspec.msgpack.encode(_WhatIfAnswer(status, body)))
    answer.close()


_LIMITS = {
    "memory": ("its memory limit of {} MiB", "memory_mib"),
    "cpu": ("its CPU time limit of {} s", "cpu_seconds"),
    "deadline": ("its wall-clock deadline of {:g} s", "deadline_seconds"),
}


def _exceeded(limit: str, value: float) -> str:
    what, key = _LIMITS[limit]
    return (
        f"what-if run exceeded {what.format(value)} ({_RUN_SETTING}.{key}) and "
        "was stopped; a condition that builds huge values (replace, repeated "
        "concatenation) is the usual cause"
    )


@functools.cache
def _process_context() -> Any:
    """The fork-server context: each run's process is forked from a server
    that imported ``_PRELOAD`` once, never from the daemon. Set up on the
    first run, once."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_PRELOAD)
    return context


def _run_isolated(job: bytes, limits: PlaygroundConfig) -> tuple[int, dict[str, Any]]:
    """Run one encoded ``_WhatIfJob`` in a process of its own, within
    ``limits``; blocks a worker thread, never the event loop.

    Returns:
        The HTTP status and JSON body: the run's own, or a 422 naming the
        limit it went past, or a 500 when its process ended unanswered.
    """
    context = _process_context()
    ours, theirs = context.Pipe(duplex=False)
    process = context.Process(
        target=_answer_in_process,
        args=(job, limits.memory_mib, limits.cpu_seconds, theirs),
        name="kynara-playground-run",
        daemon=True,
    )
    try:
        process.start()
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    data, late = None, False
    try:
        if ours.poll(limits.deadline_seconds):
            try:
                data = ours.recv_bytes()
            except (EOFError, OSError):
                pass  # ended without (all of) an answer: the exit code says why
        else:
            late = True
    finally:
        ours.close()
        if late:
            process.kill()
        process.join(limits.deadline_seconds)
        if process.is_alive():
            process.kill()
            process.join()
        exitcode = process.exitcode
        process.close()
    return _answer_of(data, late, exitcode, limits)


def _answer_of(
    data: bytes | None, late: bool, exitcode: int | None, limits: PlaygroundConfig
) -> tuple[int, dict[str, Any]]:
    """A run's status and body from what its process answered and how it
    ended."""
    if data is not None:
        answer = msgspec.msgpack.decode(data, type=_WhatIfAnswer)
        return answer.status, answer.body
    if late:
        return 422, {"error": _exceeded("deadline", limits.deadline_seconds)}
    if exitcode in (-signal.SIGXCPU, -signal.SIGKILL):
        return 422, {"error": _exceeded("cpu", limits.cpu_seconds)}
    return 500, {
        "error": f"what-if run's process ended (exit code {exitcode}) without "
        f"an answer; it may have gone past its memory limit of "
        f"{limits.memory_mib} MiB ({_RUN_SETTING}.memory_mib)"
    }


def add_playground_routes(
    app: web.Application,
    sources: PlaygroundSources,
    *,
    title: str,
    session_seconds: int,
    secure_cookie: bool = True,
    public_urls: Iterable[str] = (),
    clock: Callable[[], int] = time.time_ns,
    on_refused: Callable[[str], None] = lambda _why: None,
) -> SessionStore:
    """Mount the playground under ``/playground`` of ``app``.

    Args:
        app: the HTTP stack's application (not yet started).
        sources: the active policies, the audit log and who may sign in.
        title: the site name in the header.
        session_seconds: how long a sign-in lasts (as the review page's).
        secure_cookie: mark cookies ``Secure`` (see ``add_review_routes``).
        public_urls: base URLs the page is reached by behind a proxy; their
            origins are accepted on POSTs besides the request's own.
        clock: nanoseconds since the epoch: sessions, and the instant of a
            run whose request gives none.
        on_refused: told why each refused call or sign-in was refused, to
            count it beside its log line.

    Returns:
        The playground's session store (its own: see the module docstring).
    """
    sessions = SessionStore(session_seconds, clock=clock)
    # A reload that removes or changes a credential ends its sessions.
    sessions.follow(sources.authenticate)
    playground = _Playground(
        sources,
        title=title,
        sessions=sessions,
        secure_cookie=secure_cookie,
        origins=frozenset(origin_of(url) for url in public_urls if url),
        clock=clock,
        on_refused=on_refused,
    )
    add_security_headers(app, PLAYGROUND_PATH, CONTENT_SECURITY_POLICY)
    app.router.add_get(PLAYGROUND_PATH, playground.page)
    app.router.add_get(f"{PLAYGROUND_PATH}/login", playground.login_form)
    app.router.add_post(f"{PLAYGROUND_PATH}/login", playground.login)
    app.router.add_post(f"{PLAYGROUND_PATH}/logout", playground.logout)
    app.router.add_get(f"{PLAYGROUND_PATH}/api/policies", playground.policies)
    app.router.add_get(f"{PLAYGROUND_PATH}/api/tour", playground.tour)
    app.router.add_post(f"{PLAYGROUND_PATH}/api/evaluate", playground.evaluate)
    app.router.add_post(f"{PLAYGROUND_PATH}/api/replay", playground.replay)
    return sessions
