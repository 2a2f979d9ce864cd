"""Replay: re-decide recorded requests against a candidate policy set.

Every decision record holds what the engine saw: the resolved delegation
chain, action, resource, context and env, ``env.now`` included. Replaying a
record rebuilds that request (``request_from_record``) and evaluates it
against another policy set, so a policy author sees which past decisions a
change would turn around before shipping it. The record's own ``env.now`` is
used, never the clock: a CRM read at 10:00 in Berlin replays as a 10:00
read even when the replay runs at night.

Two baselines to compare the candidate's decision with:

    recorded   the decision the record holds (what the caller was told)
    original   a fresh evaluation under the record's own policy set, loaded
               from the log's ``policy_sets`` database; this separates what
               the policy change does from what a newer engine does. A
               record whose set is not stored (or no longer compiles) is
               compared with its recorded decision instead, and said so.

Limits. A record holds the values of every limit its decision read or
counted (``AuditRecordV1.limits``), and a replay decides with those, never
with the counts the log holds now: a refund that was the fifth of its day
replays as the fifth (``limits.check.recorded_values``; the ceiling is the
replaying set's, so a lowered ceiling shows what it would have denied). A
candidate whose conditions read a limit the record has no value for (a
limit new in the candidate, or one the record's set did not read for this
action) fails closed there, as a live decision without the value would,
and the change says which limit was not recorded.

A record *would change* when the candidate's decision (allow, deny,
require_approval) differs from the baseline's.
NOTE: a reason that changes under the same decision is not counted; the
decision is what the caller acts on.

Everything here is pure apart from reading the audit store (opened
read-only by ``replay_main``, so a running daemon's log can be replayed)
and, in ``replay_main``, the candidate's policy files.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import sys
from collections.abc import Callable, Mapping
from typing import Any, Literal, TextIO

import msgspec

from kynara_sidecar import engine
from kynara_sidecar.audit.chain import decode_record
from kynara_sidecar.audit.record import (
    AuditRecordV1,
    LimitEntry,
    RecordKind,
    decode_value,
    request_from_record,
)
from kynara_sidecar.audit.store import AuditStore
from kynara_sidecar.audit.verify import format_report as format_verify_report
from kynara_sidecar.audit.verify import verify_log
from kynara_sidecar.decision import Decision, DecisionRequest, Env
from kynara_sidecar.errors import PolicyError
from kynara_sidecar.limits.check import recorded_values
from kynara_sidecar.policy.compiler import compile_directory, compile_policy_set
from kynara_sidecar.policy.loader import (
    LoadedPolicies,
    decode_document,
    load_policies,
)

__all__ = [
    "BASELINES",
    "Baseline",
    "ReplayChange",
    "ReplayReport",
    "UnavailableSet",
    "format_change",
    "format_recorded_limit",
    "format_report",
    "load_stored_policies",
    "record_limit_values",
    "replay_log",
    "replay_main",
    "replay_record",
    "unrecorded_limits",
]

Baseline = Literal["recorded", "original"]
BASELINES: tuple[Baseline, ...] = ("recorded", "original")

_Revisions = tuple[str, str]


class ReplayChange(msgspec.Struct, frozen=True):
    """A recorded decision the candidate would decide differently."""

    seq: int
    decision_id: str
    action: str
    old_decision: str
    old_reason_code: str
    new_decision: str
    new_reason_code: str
    # The record's limits the candidate's conditions read, as recorded.
    limits: dict[str, LimitEntry] = {}
    # Limits the candidate's conditions read that the record holds no value
    # for (``record_limit_values``): conditions reading them failed closed.
    unrecorded_limits: tuple[str, ...] = ()


class UnavailableSet(msgspec.Struct, frozen=True):
    """An original policy set that could not be used as the baseline."""

    policy_revision: str
    directory_revision: str
    # "not stored", or why the stored files did not compile.
    problem: str
    records: int


class ReplayReport(msgspec.Struct):
    """What a replay found.

    ``replayed`` counts decision records evaluated against the candidate;
    ``skipped`` lists ``(seq, why)`` for records that could not be rebuilt;
    ``unrecorded`` counts, per limit, replayed records whose candidate
    read it without a recorded value (changed or not).
    """

    replayed: int = 0
    changes: list[ReplayChange] = []
    unavailable: list[UnavailableSet] = []
    skipped: list[tuple[int, str]] = []
    unrecorded: dict[str, int] = {}


def record_limit_values(
    record: AuditRecordV1,
    policies: LoadedPolicies,
    rebuilt: tuple[DecisionRequest, Env] | None = None,
) -> dict[str, Any]:
    """The CEL ``limits`` values the record holds for the limits of
    ``policies`` (``limits.check.recorded_values``): what a replay under
    them decides with. ``rebuilt``: ``request_from_record(record)``, when
    the caller has it already.

    Raises:
        ValueError: the record cannot be rebuilt into a request (see
            ``request_from_record``).
    """
    request, env = rebuilt or request_from_record(record)
    return recorded_values(
        record.limits, policies.policy_set.limits, request, env.now.to_nanos()
    )


def replay_record(
    record: AuditRecordV1,
    policies: LoadedPolicies,
    *,
    explain: bool = False,
    cache: engine.EvaluationCache | None = None,
    values: Mapping[str, Any] | None = None,
    rebuilt: tuple[DecisionRequest, Env] | None = None,
) -> Decision:
    """Decide a recorded request again, with the record's own env and the
    limit values it recorded (``record_limit_values``).

    Args:
        record: a ``decision`` record.
        policies: the policy set and directory to decide with.
        explain: fill ``Decision.explanation``.
        cache: an ``engine.EvaluationCache`` of ``policies``, kept across
            records.
        values: ``record_limit_values(record, policies)``, when the caller
            has it already.
        rebuilt: ``request_from_record(record)``, when the caller has it
            already.

    Returns:
        The engine's decision.

    Raises:
        ValueError: the record cannot be rebuilt into a request (see
            ``request_from_record``).
    """
    request, env = rebuilt = rebuilt or request_from_record(record)
    if values is None:
        values = record_limit_values(record, policies, rebuilt)
    return engine.evaluate(
        policies.policy_set,
        policies.directory,
        request,
        env,
        explain=explain,
        cache=cache,
        limits=values,
    )


def unrecorded_limits(
    record: AuditRecordV1,
    policies: LoadedPolicies,
    cache: engine.EvaluationCache | None = None,
    values: Mapping[str, Any] | None = None,
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Which limits the conditions of ``policies`` may read for the record's
    request: those the record holds a value of (``record_limit_values``,
    or ``values`` when given), and those it holds none for (no entry, an
    entry with an error, or one of a limit defined otherwise: another key,
    sum, window or scope), where a replay fails closed.

    Returns:
        ``(recorded, unrecorded)`` limit names, each in name order.

    Raises:
        ValueError: ``values`` not given, and the record cannot be rebuilt
            into a request.
    """
    if not policies.policy_set.limits or record.resource is None:
        return (), ()
    if cache is None:
        cache = engine.EvaluationCache(policies.policy_set, policies.directory)
    read = cache.limits_for(record.resource.kind, record.action).read
    if values is None:
        values = record_limit_values(record, policies)
    return (
        tuple(limit.name for limit in read if limit.name in values),
        tuple(limit.name for limit in read if limit.name not in values),
    )


def load_stored_policies(
    store: AuditStore, policy_revision: str, directory_revision: str
) -> LoadedPolicies | None:
    """Compile the policy set the log kept for these revisions.

    Args:
        store: the audit log.
        policy_revision: the record's ``policy_revision``.
        directory_revision: the record's ``directory_revision``.

    Returns:
        The compiled set, or ``None`` when either part is not stored.

    Raises:
        PolicyError: the stored files do not compile with this version, or
            compile to other revisions than the ones they are stored under.
    """
    policy = store.get_policy_source("policy", policy_revision)
    directory = store.get_policy_source("directory", directory_revision)
    if policy is None or directory is None:
        return None
    where = f"{store.path} policy_sets"
    documents = [
        decode_document(f"{where}/{name}", content, name=name)
        for name, content in policy.files.items()
    ]
    directories = [
        decode_document(f"{where}/{name}", content, name=name)
        for name, content in directory.files.items()
    ]
    if len(directories) != 1:
        names = ", ".join(sorted(directory.files)) or "none"
        raise PolicyError(
            f"expected exactly one directory file in stored directory "
            f"{directory_revision}, got {len(directories)}: {names}",
            path=where,
        )
    policy_set = compile_policy_set(documents)
    # A signed directory (directory.store) may name roles the set does not
    # define, and was activated keeping them; a bundle's or the files'
    # directory names none, so it compiles alike either way.
    loaded = LoadedPolicies(
        policy_set,
        compile_directory(directories[0], policy_set, unknown_roles="keep"),
    )
    got = (loaded.policy_set.revision, loaded.directory.revision)
    if got != (policy_revision, directory_revision):
        raise PolicyError(
            f"expected stored files to compile to policy {policy_revision}, "
            f"directory {directory_revision}; got policy {got[0]}, directory "
            f"{got[1]}",
            path=where,
        )
    return loaded


class _Originals:
    """Original policy sets by revisions, compiled once each."""

    def __init__(self, store: AuditStore):
        self._store = store
        self._sets: dict[_Revisions, LoadedPolicies | str] = {}
        self._misses: dict[_Revisions, int] = {}
        self._caches: dict[_Revisions, engine.EvaluationCache] = {}

    def cache(
        self, revisions: _Revisions, policies: LoadedPolicies
    ) -> engine.EvaluationCache:
        found = self._caches.get(revisions)
        if found is None:
            found = engine.EvaluationCache(policies.policy_set, policies.directory)
            self._caches[revisions] = found
        return found

    def get(self, revisions: _Revisions) -> LoadedPolicies | None:
        found = self._sets.get(revisions)
        if found is None:
            try:
                found = load_stored_policies(self._store, *revisions) or "not stored"
            except PolicyError as err:
                found = f"stored but does not compile: {err}"
            self._sets[revisions] = found
        if isinstance(found, str):
            self._misses[revisions] = self._misses.get(revisions, 0) + 1
            return None
        return found

    def unavailable(self) -> list[UnavailableSet]:
        return [
            UnavailableSet(*revisions, self._sets[revisions], count)
            for revisions, count in self._misses.items()
        ]


def replay_log(
    store: AuditStore,
    candidate: LoadedPolicies,
    *,
    baseline: Baseline = "recorded",
    on_change: Callable[[ReplayChange], None] | None = None,
) -> ReplayReport:
    """Replay every decision record of a log against a candidate set.

    Args:
        store: the audit log (read-only or the daemon's own).
        candidate: the policy set and directory to try.
        baseline: compare with the "recorded" decision or with the record's
            "original" policy set evaluated again (see the module doc).
        on_change: called with each change as it is found (to print it).

    Returns:
        The report; records of other kinds are passed over.

    Raises:
        ValueError: ``baseline`` is not one of ``BASELINES``.
        AuditUnavailable: a stored policy set is not readable.
    """
    if baseline not in BASELINES:
        raise ValueError(f"expected baseline one of {BASELINES}, got {baseline!r}")
    originals = _Originals(store) if baseline == "original" else None
    cache = engine.EvaluationCache(candidate.policy_set, candidate.directory)
    report = ReplayReport()
    with contextlib.closing(store.iter_records()) as records:
        for stored in records:
            change = _replay_one(
                stored.seq, stored.record_bytes, candidate, originals, cache
            )
            if change is None:
                continue
            if isinstance(change, str):
                report.skipped.append((stored.seq, change))
                continue
            report.replayed += 1
            unrecorded = (
                change if isinstance(change, tuple) else change.unrecorded_limits
            )
            for name in unrecorded:
                report.unrecorded[name] = report.unrecorded.get(name, 0) + 1
            if isinstance(change, ReplayChange):
                report.changes.append(change)
                if on_change is not None:
                    on_change(change)
    if originals is not None:
        report.unavailable = originals.unavailable()
    return report


def _replay_one(
    seq: int,
    data: bytes,
    candidate: LoadedPolicies,
    originals: _Originals | None,
    cache: engine.EvaluationCache | None = None,
) -> ReplayChange | tuple[str, ...] | str | None:
    # None: not a decision; str: why it was skipped; a tuple: unchanged, and
    # the limits it read unrecorded; a change whose decisions are equal
    # never comes back.
    try:
        record = decode_record(data)
    except msgspec.MsgspecError as err:
        return f"not a readable record: {err}"
    if record.kind != RecordKind.DECISION:
        return None
    try:
        rebuilt = request_from_record(record)
        values = record_limit_values(record, candidate, rebuilt)
        new = replay_record(
            record, candidate, cache=cache, values=values, rebuilt=rebuilt
        )
    except ValueError as err:
        return str(err)
    recorded, unrecorded = unrecorded_limits(record, candidate, cache, values)
    old_decision, old_reason = record.decision, record.reason_code
    if originals is not None:
        revisions = (record.policy_revision, record.directory_revision)
        original = originals.get(revisions)
        if original is not None:
            old = replay_record(
                record,
                original,
                cache=originals.cache(revisions, original),
                rebuilt=rebuilt,
            )
            old_decision, old_reason = str(old.effect), str(old.reason_code)
    if str(new.effect) == old_decision:
        return unrecorded
    return ReplayChange(
        seq=record.seq or seq,
        decision_id=record.decision_id,
        action=record.action,
        old_decision=old_decision,
        old_reason_code=old_reason,
        new_decision=str(new.effect),
        new_reason_code=str(new.reason_code),
        limits={name: record.limits[name] for name in recorded},
        unrecorded_limits=unrecorded,
    )


def format_change(change: ReplayChange) -> str:
    """One line: seq, decision id, action, old -> new decision and reasons;
    then the recorded limit values it was replayed with, and the limits
    it read that the record has no value for."""
    line = (
        f"seq {change.seq} {change.decision_id} {change.action}: "
        f"{change.old_decision} ({change.old_reason_code}) -> "
        f"{change.new_decision} ({change.new_reason_code})"
    )
    seen = [format_recorded_limit(name, entry) for name, entry in change.limits.items()]
    if seen:
        line += f"; recorded limits: {'; '.join(seen)}"
    if change.unrecorded_limits:
        line += (
            f"; not recorded, so failed closed: {', '.join(change.unrecorded_limits)}"
        )
    return line


def format_recorded_limit(name: str, entry: LimitEntry) -> str:
    """A limit as its record keeps it, for a line of ``format_change``:
    count and sum (this daemon's and the fleet's together), the ceiling of
    the set that decided, and the window start. (The playground shows
    limits as ``policy_tests.format_limit`` does, with their CEL values.)"""
    if entry.error:
        return f"{name} had no value ({entry.error})"
    parts = [f"count {entry.count + entry.remote_count}"]
    if entry.sum is not None:
        total = decode_value(entry.sum)
        if entry.remote_sum is not None:
            total += decode_value(entry.remote_sum)
        parts.append(f"sum {total}")
    if entry.ceiling is not None:
        parts.append(f"recorded ceiling {decode_value(entry.ceiling)}")
    return f"{name} {', '.join(parts)} (window start {entry.window_start})"


def format_report(report: ReplayReport) -> list[str]:
    """The report's closing lines: skipped records, unavailable original
    sets, and the summary ``N records replayed, M would change``."""
    lines = [f"seq {seq}: not replayed: {why}" for seq, why in report.skipped]
    lines += [
        f"original policy set {item.problem}: policy {item.policy_revision}, "
        f"directory {item.directory_revision} ({item.records} records compared "
        "with their recorded decision)"
        for item in report.unavailable
    ]
    lines += [
        f"limit {name}: not recorded by {count} replayed records whose candidate "
        "conditions read it; they failed closed"
        for name, count in sorted(report.unrecorded.items())
    ]
    lines.append(
        f"{report.replayed} records replayed, {len(report.changes)} would change"
    )
    return lines


def replay_main(
    policies_dir: str | os.PathLike[str],
    audit_dir: str | os.PathLike[str],
    *,
    baseline: Baseline = "recorded",
    out: TextIO | None = None,
) -> int:
    """``kynara-sidecar replay``: print the decisions a candidate would change.

    Prints a header naming the candidate's revisions, one line per changed
    decision as it is found, then ``format_report``'s lines.

    Args:
        policies_dir: the candidate policy directory (policies and directory).
        audit_dir: the audit log directory; opened read-only, so it may
            belong to a running daemon.
        baseline: "recorded" or "original" (see the module doc).
        out: where to print; standard output by default.

    Returns:
        0 once the replay ran, whatever changed.

    Raises:
        ValueError: ``baseline`` is not one of ``BASELINES``.
        PolicyError: the candidate does not load.
        AuditUnavailable: the log cannot be opened or read.
    """
    if baseline not in BASELINES:
        raise ValueError(f"expected baseline one of {BASELINES}, got {baseline!r}")
    out = sys.stdout if out is None else out
    candidate = load_policies(pathlib.Path(policies_dir))
    # Replay compares with what the log says was decided; say so when the
    # log itself does not check out. (One open at a time: LMDB allows one
    # environment per path in a process.)
    checked = verify_log(audit_dir)
    if not checked.ok:
        print(
            "warning: the log does not verify, so recorded decisions may have "
            f"been altered: {format_verify_report(checked)}",
            file=out,
        )
    store = AuditStore.open(audit_dir, readonly=True)
    try:
        against = {
            "recorded": "the recorded decisions",
            "original": "each record's original policy set",
        }[baseline]
        print(
            f"replaying {store.path} against policy "
            f"{candidate.policy_set.revision}, directory "
            f"{candidate.directory.revision}, compared with {against}",
            file=out,
        )
        report = replay_log(
            store,
            candidate,
            baseline=baseline,
            on_change=lambda change: print(format_change(change), file=out),
        )
    finally:
        store.close()
    for line in format_report(report):
        print(line, file=out)
    return 0
