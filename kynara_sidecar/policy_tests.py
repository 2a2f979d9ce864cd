"""Policy tests and explain requests: files an author writes beside policies.

A policy test file lives below a ``tests`` directory of the policy root (the
loader never reads those as policies) and ends ``.yaml`` or ``.yml``:

.. code-block:: yaml

    format_version: 1
    description: Refunds.                      # optional
    tests:
      - name: a small refund is allowed         # unique within the file
        request:
          now: "2026-12-07T10:00:00+01:00"     # env.now, RFC 3339, any offset
          chain: [alice, support-bot]           # user first, agent last
          action: payments.refund.issue
          resource: {kind: payments.refund, id: rf-1, attributes: {amount: 1200}}
          context: {region: DE}
          env: {environment: prod, region: eu-west-1, labels: {}}  # optional
        expect:
          decision: allow                       # allow | deny | require_approval
          reason_code: rule_allowed             # optional
          matched_rules:                        # optional, compared as a set
            - payments/refund-small             # for any principal
            - payments/refund-small@alice       # for this principal only
          shadow_decision: deny                 # optional

A request may give the values its limits see (``limits`` of the policy
files), by limit name, ``count`` and/or ``sum`` (for a summing limit):

.. code-block:: yaml

          limits:
            refunds_today: {count: 5}           # five counted already today
            refund_total_week: {sum: 9000}

A limit the request reads or counts and does not give is an empty window
(count 0, sum 0), and the explanation says so; the window start and key
are worked out from ``now`` and the request as the daemon would. A name
the policies do not declare, a field other than ``count`` and ``sum``, or a
``sum`` for a limit that counts decisions is refused, naming the file and
the location.

An explain request file holds one ``request`` mapping of the same shape,
at the top level; ``parse_request`` reads its text (the playground's pasted
requests too), ``load_request`` the file. Values keep their YAML types (ints
are int64); ``!uint 5`` is a uint64, and an unquoted YAML timestamp or
``!timestamp "..."`` with an offset is a timestamp. A key given twice in one
mapping is refused, naming the file, the key and both lines, as in policy
files.

Each test is decided by the engine exactly as the daemon would, with
``env.now`` (and ``env``'s environment, region, labels and peer, the
caller's address a daemon takes from the connection) from the test and
``env.agent_id`` the chain's last principal.
Reading files is the only I/O here; ``format_report`` and
``format_explanation`` return text for the CLI to print.
"""

from __future__ import annotations

import datetime
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Annotated, Any, Literal, NamedTuple

import msgspec
import yaml

from kynara_sidecar import engine
from kynara_sidecar._unique_keys import DuplicateKeyError, UniqueKeys
from kynara_sidecar.audit.record import (
    LimitEntry,
    decode_value,
    encode_value,
    format_timestamp,
)
from kynara_sidecar.decision import (
    Decision,
    DecisionRequest,
    Effect,
    Env,
    Explanation,
    Resource,
    RuleTrace,
    Timestamp,
    UInt64,
    Verdict,
)
from kynara_sidecar.errors import PolicyError, ReasonCode
from kynara_sidecar.limits.check import key_attributes, limit_entry, recorded_values
from kynara_sidecar.policy.limits import (
    CompiledLimit,
    LimitProblem,
    amount_of,
    key_of,
    window_start,
)
from kynara_sidecar.policy.loader import (
    TEST_DIRECTORY,
    LoadedPolicies,
    check_expansion,
    convert_document,
    load_policies,
)
from kynara_sidecar.policy.names import canonical_name, check_dotted_name

__all__ = [
    "find_policy_roots",
    "TEST_SUFFIXES",
    "Expectation",
    "GivenLimit",
    "LimitsSeen",
    "Mismatch",
    "NO_LIMITS",
    "PolicyRequest",
    "PolicyTest",
    "PolicyTestReport",
    "PolicyTestResult",
    "decide",
    "find_test_files",
    "format_explanation",
    "format_limit",
    "format_limits",
    "format_report",
    "look_limits",
    "load_request",
    "load_test_file",
    "parse_request",
    "run_policy_tests",
    "run_tests",
]

TEST_SUFFIXES = frozenset((".yaml", ".yml"))
# "policy/rule" or "policy/rule@principal" in expect.matched_rules.
_RULE_SEPARATOR, _PRINCIPAL_SEPARATOR = "/", "@"

Text = Annotated[str, msgspec.Meta(min_length=1)]


# --- what the files say --------------------------------------------------------


class GivenLimit(msgspec.Struct, frozen=True):
    """What a request file says one limit's window holds before it; None
    leaves that part at 0 (an empty window)."""

    count: int | None = None
    sum: int | float | None = None


class PolicyRequest(msgspec.Struct, frozen=True):
    """A request to decide, with the env (and its ``now``) it is decided in.

    ``limits`` are the values the file gives its limits (``GivenLimit``);
    ``path`` and ``location`` say where the request was written, for errors
    about them found once the policies are known.
    """

    env: Env
    request: DecisionRequest
    limits: dict[str, GivenLimit] = {}
    path: str = ""
    location: str = ""

    @property
    def now(self) -> Timestamp:
        return self.env.now


class Expectation(msgspec.Struct, frozen=True):
    """What a test expects; None leaves that part of the answer unchecked."""

    decision: Effect
    reason_code: ReasonCode | None = None
    matched_rules: tuple[str, ...] | None = None
    shadow_decision: Effect | None = None


class PolicyTest(msgspec.Struct, frozen=True):
    """One named test; ``file`` is its file's path below the policy root."""

    file: str
    name: str
    request: PolicyRequest
    expect: Expectation


class Mismatch(msgspec.Struct, frozen=True):
    """One part of the answer that differs from the expectation."""

    field: str
    expected: str
    got: str


class PolicyTestResult(msgspec.Struct, frozen=True):
    test: PolicyTest
    decision: Decision
    mismatches: tuple[Mismatch, ...] = ()

    @property
    def passed(self) -> bool:
        return not self.mismatches


class PolicyTestReport(msgspec.Struct, frozen=True):
    policy_revision: str
    results: tuple[PolicyTestResult, ...]

    @property
    def passed(self) -> bool:
        """True when every test passed."""
        return all(result.passed for result in self.results)


class _ResourceDocument(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    kind: Text
    id: str = ""
    attributes: dict[str, Any] = {}


class _EnvDocument(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # UNSET: the file does not write it, so a caller's defaults may fill it.
    environment: str | msgspec.UnsetType = msgspec.UNSET
    region: str | msgspec.UnsetType = msgspec.UNSET
    labels: dict[str, str] | msgspec.UnsetType = msgspec.UNSET
    peer: str | msgspec.UnsetType = msgspec.UNSET


_Amount = Annotated[int, msgspec.Meta(ge=0)] | Annotated[float, msgspec.Meta(ge=0)]


class _GivenLimitDocument(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    count: Annotated[int, msgspec.Meta(ge=0)] | None = None
    sum: _Amount | None = None


class _RequestDocument(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    now: Any
    chain: Annotated[tuple[Text, ...], msgspec.Meta(min_length=1)]
    action: Text
    resource: _ResourceDocument
    context: dict[str, Any] = {}
    request_id: str = ""
    env: _EnvDocument = _EnvDocument()
    # name -> _GivenLimitDocument, converted one by one so that an error
    # names the limit.
    limits: dict[str, Any] = {}


class _TestDocument(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: Text
    request: Any
    expect: Expectation
    description: str = ""


class _TestFileDocument(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    format_version: Literal[1]
    tests: Annotated[tuple[_TestDocument, ...], msgspec.Meta(min_length=1)]
    description: str = ""


class _RequestFileDocument(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    request: Any
    description: str = ""


class _Loader(UniqueKeys, yaml.SafeLoader):
    """YAML with ``!uint`` and ``!timestamp`` tags for typed values, refusing
    a key given twice in one mapping as the policy loader does."""


_Loader.add_constructor(
    "!uint", lambda loader, node: UInt64(int(loader.construct_scalar(node)))
)
_Loader.add_constructor(
    "!timestamp",
    lambda loader, node: datetime.datetime.fromisoformat(loader.construct_scalar(node)),
)


# --- reading -------------------------------------------------------------------


def find_test_files(root: pathlib.Path) -> list[pathlib.Path]:
    """The policy test files below ``root``, sorted.

    Args:
        root: A policy directory.

    Returns:
        Every ``.yaml``/``.yml`` file below a ``tests`` directory under
        root, skipping hidden paths as the loader does.
    """
    return sorted(
        path
        for path in root.rglob("*")
        if path.suffix in TEST_SUFFIXES
        and path.is_file()
        and TEST_DIRECTORY in path.relative_to(root).parts[:-1]
        and not any(part.startswith(".") for part in path.relative_to(root).parts)
    )


def find_policy_roots(directory: pathlib.Path) -> list[pathlib.Path]:
    """The policy directories under ``directory`` that ship tests.

    A policy directory is one that holds a ``tests`` directory of test
    files, so ``config/`` finds ``config/policies``, and a policy directory
    finds itself.
    """
    roots = set()
    for path in find_test_files(directory):
        parts = path.relative_to(directory).parts[:-1]
        last = len(parts) - 1 - parts[::-1].index(TEST_DIRECTORY)
        roots.add(directory.joinpath(*parts[:last]))
    return sorted(roots)


def load_test_file(path: pathlib.Path, *, name: str = "") -> tuple[PolicyTest, ...]:
    """Read and validate one policy test file.

    Args:
        path: The file.
        name: How reports cite it (defaults to ``path``).

    Returns:
        Its tests, in file order.

    Raises:
        PolicyError: Unreadable or malformed YAML, a key given twice in one
            mapping, a missing or mistyped field (with its location), a
            duplicate test name, a ``now`` without an offset, or a malformed
            ``matched_rules`` entry.
    """
    document = _convert(_read_yaml(path), _TestFileDocument, str(path))
    tests: list[PolicyTest] = []
    seen: set[str] = set()
    for index, item in enumerate(document.tests):
        where = f"$.tests[{index}]"
        if item.name in seen:
            raise PolicyError(
                f"expected test names unique within the file, got {item.name!r} again",
                path=str(path),
                location=f"{where}.name",
            )
        seen.add(item.name)
        _check_rule_citations(item.expect.matched_rules, str(path), where)
        request = _decode_request(item.request, str(path), f"{where}.request")
        tests.append(PolicyTest(name or str(path), item.name, request, item.expect))
    return tuple(tests)


def load_request(path: pathlib.Path) -> PolicyRequest:
    """Read an explain request file: one ``request`` as a test writes it.

    Raises:
        PolicyError: Unreadable or malformed YAML, a key given twice in one
            mapping, or a bad field (with its location).
    """
    return parse_request(_read_text(path), name=str(path))


def parse_request(
    text: str, *, name: str = "request", defaults: Env | None = None
) -> PolicyRequest:
    """Read the text of an explain request file (YAML or JSON).

    Without ``defaults`` the text is read exactly as ``explain`` reads the
    file: ``now`` is required and ``env`` is what the text writes (empty
    fields otherwise). With ``defaults`` (a daemon's own env), a request
    without ``now`` is decided at ``defaults.now``, each ``env`` field the
    text leaves out (environment, region, labels, peer) is the default's,
    and ``daemon_id`` is always the default's; a field the text writes wins,
    ``labels`` as a whole. ``env.agent_id`` is the chain's last principal
    either way.

    Args:
        text: the file's content.
        name: how errors cite it (a path, or "request").
        defaults: the env to fill from; None for the file alone.

    Returns:
        The request and the env it is decided in.

    Raises:
        PolicyError: naming ``name`` and the location inside it: malformed
            YAML, a key given twice in one mapping, a missing or bad field.
    """
    raw = _parse_yaml(text, name)
    if defaults is not None and isinstance(raw, dict):
        inner = raw.get("request")
        if isinstance(inner, dict) and "now" not in inner:
            inner["now"] = _datetime_of(defaults.now)
    document = _convert(raw, _RequestFileDocument, name)
    return _decode_request(document.request, name, "$.request", defaults)


def _read_yaml(path: pathlib.Path) -> Any:
    return _parse_yaml(_read_text(path), str(path))


def _read_text(path: pathlib.Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise PolicyError(
            f"expected a readable file, got {err}", path=str(path)
        ) from err


def _parse_yaml(text: str, name: str) -> Any:
    try:
        raw = yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader)
    except DuplicateKeyError as err:
        raise PolicyError(str(err), path=name) from err
    except (yaml.YAMLError, ValueError) as err:
        raise PolicyError(f"expected valid YAML, got: {err}", path=name) from err
    except RecursionError:
        raise PolicyError(
            "expected YAML nested less deeply than the parser's recursion limit",
            path=name,
        ) from None
    check_expansion(raw, name)
    return raw


def _datetime_of(now: Timestamp) -> datetime.datetime:
    moment = datetime.datetime.fromtimestamp(now.seconds, datetime.UTC)
    return moment + datetime.timedelta(microseconds=now.nanos // 1000)


# Allowed values named when a test file's enum field is wrong.
_CHOICES: dict[str, tuple[str, ...]] = {
    "decision": tuple(Effect),
    "shadow_decision": tuple(Effect),
    "reason_code": tuple(ReasonCode),
    "format_version": ("1",),
}


def _convert(raw: Any, target: type, path: str, *, prefix: str = "$") -> Any:
    return convert_document(raw, target, path, prefix=prefix, choices=_CHOICES)


def _decode_request(
    raw: Any, path: str, where: str, defaults: Env | None = None
) -> PolicyRequest:
    document = _convert(raw, _RequestDocument, path, prefix=where)
    _check_names(document, path, where)
    now = _instant(document.now, path, f"{where}.now")
    resource = document.resource
    request = DecisionRequest(
        chain=document.chain,
        action=document.action,
        resource=Resource(
            kind=resource.kind,
            id=resource.id,
            attributes=_typed(
                resource.attributes, path, f"{where}.resource.attributes"
            ),
        ),
        context=_typed(document.context, path, f"{where}.context"),
        request_id=document.request_id,
    )
    base = defaults or Env(now)
    written = document.env

    def pick(field: str) -> Any:
        value = getattr(written, field)
        return getattr(base, field) if value is msgspec.UNSET else value

    env = Env(
        now=now,
        daemon_id=base.daemon_id,
        agent_id=document.chain[-1],
        environment=pick("environment"),
        region=pick("region"),
        labels=pick("labels"),
        peer=pick("peer"),
    )
    given = {}
    for name, item in document.limits.items():
        found = _convert(
            item, _GivenLimitDocument, path, prefix=f"{where}.limits.{name}"
        )
        given[name] = GivenLimit(found.count, found.sum)
    return PolicyRequest(env, request, given, path, where)


def _check_names(document: Any, path: str, where: str) -> None:
    # The daemon refuses these as invalid_request; a policy test must not
    # pass on a request the daemon would never let through.
    for field, name in (
        ("action", document.action),
        ("resource.kind", document.resource.kind),
    ):
        try:
            check_dotted_name(name)
        except ValueError as err:
            raise PolicyError(
                str(err), path=path, location=f"{where}.{field}"
            ) from None
    for i, principal in enumerate(document.chain):
        try:
            canonical_name(principal)
        except ValueError as err:
            raise PolicyError(
                str(err), path=path, location=f"{where}.chain[{i}]"
            ) from None


def _instant(value: Any, path: str, where: str) -> Timestamp:
    moment = value
    if isinstance(value, str):
        try:
            moment = datetime.datetime.fromisoformat(value)
        except ValueError:
            moment = None
    if not isinstance(moment, datetime.datetime) or moment.tzinfo is None:
        raise PolicyError(
            f"expected an RFC 3339 instant with an offset, got {value!r}",
            path=path,
            location=where,
        )
    return Timestamp.from_datetime(moment)


def _typed(value: Any, path: str, where: str) -> Any:
    if isinstance(value, datetime.datetime):
        return _instant(value, path, where)
    if isinstance(value, datetime.date):
        raise PolicyError(
            f"expected a timestamp with time and offset, got the date {value}",
            path=path,
            location=where,
        )
    if isinstance(value, dict):
        return {
            key: _typed(item, path, f"{where}.{key}") for key, item in value.items()
        }
    if isinstance(value, list):
        return [
            _typed(item, path, f"{where}[{index}]") for index, item in enumerate(value)
        ]
    if value is None:
        raise PolicyError("expected a value, got null", path=path, location=where)
    return value


def _check_rule_citations(
    citations: Sequence[str] | None, path: str, where: str
) -> None:
    for index, citation in enumerate(citations or ()):
        rule, _, principal = citation.partition(_PRINCIPAL_SEPARATOR)
        policy, _, rule_id = rule.partition(_RULE_SEPARATOR)
        if not (policy and rule_id) or (
            _PRINCIPAL_SEPARATOR in citation and not principal
        ):
            raise PolicyError(
                f"expected 'policy/rule' or 'policy/rule@principal', got {citation!r}",
                path=path,
                location=f"{where}.expect.matched_rules[{index}]",
            )


# --- running -------------------------------------------------------------------


class LimitsSeen(NamedTuple):
    """The limits a request read or counted, as it was decided with them."""

    # Each limit read or counted, as a decision record keeps it (an entry
    # with ``error`` had no value); given counts and sums in ``count``/``sum``.
    entries: dict[str, LimitEntry]
    # The CEL ``limits`` values the conditions saw.
    values: dict[str, Any]
    # Name -> where the values came from ("given", "not given: ...").
    notes: dict[str, str]


NO_LIMITS = LimitsSeen({}, {}, {})
_NOT_GIVEN = "not given: as an empty window, count 0"
_UNUSED = "given, but this request neither reads nor counts it"


def look_limits(policies: LoadedPolicies, request: PolicyRequest) -> LimitsSeen:
    """The limits ``request`` reads (by a candidate rule's condition) or
    counts, with the values it gives them; the window start and key as the
    daemon would work them out at the request's ``now``.

    Raises:
        PolicyError: naming the request's file and ``...limits.<name>``: a
            limit the policies do not declare, a ``sum`` for a limit that
            counts decisions, or a double ``sum`` where the ceiling is an int.
    """
    declared = policies.policy_set.limits
    _check_given(request, declared)
    subject = request.request
    read, counted = engine.EvaluationCache(
        policies.policy_set, policies.directory
    ).limits_for(subject.resource.kind, subject.action)
    involved = {limit.name: limit for limit in (*read, *counted)}
    if not involved and not request.limits:
        return NO_LIMITS
    counting = {limit.name for limit in counted}
    attributes = key_attributes(policies.directory, subject.chain)
    now = request.env.now.to_nanos()
    entries: dict[str, LimitEntry] = {}
    notes = {name: _UNUSED for name in request.limits if name not in involved}
    for name in sorted(involved):
        limit = involved[name]
        given = request.limits.get(name)
        entry, note = _given_entry(
            limit, subject, attributes, now, given, counting=name in counting
        )
        entries[name] = entry
        notes[name] = note
    return LimitsSeen(entries, recorded_values(entries, declared, subject), notes)


def _check_given(request: PolicyRequest, declared: Mapping[str, CompiledLimit]) -> None:
    for name, given in request.limits.items():
        where = f"{request.location}.limits.{name}"
        limit = declared.get(name)
        if limit is None:
            raise PolicyError(
                f"expected a limit the policies declare "
                f"({', '.join(declared) or 'none declared'}), got {name!r}",
                path=request.path,
                location=where,
            )
        if given.sum is None:
            continue
        if not limit.sums:
            raise PolicyError(
                f"limit {name!r} counts decisions and has no sum: expected count only",
                path=request.path,
                location=f"{where}.sum",
            )
        if isinstance(given.sum, float) and isinstance(limit.ceiling, int):
            raise PolicyError(
                f"limit {name!r} sums ints (its ceiling is an int): expected an "
                f"int sum, got {given.sum!r}",
                path=request.path,
                location=f"{where}.sum",
            )


def _given_entry(
    limit: CompiledLimit,
    subject: DecisionRequest,
    attributes: Mapping[str, Mapping[str, Any]],
    now_nanos: int,
    given: GivenLimit | None,
    *,
    counting: bool,
) -> tuple[LimitEntry, str]:
    """A limit's entry as a record would keep it, holding the given values."""
    opened = format_timestamp(
        Timestamp.from_nanos(window_start(limit.window, now_nanos))
    )
    key = key_of(limit, subject, attributes)
    amount = amount_of(limit, subject) if counting else None
    problem = next((p for p in (key, amount) if isinstance(p, LimitProblem)), None)
    if problem is not None:
        note = "given values unused: the request forms no value" if given else ""
        return limit_entry(
            limit,
            opened,
            key if isinstance(key, str) else "",
            error=problem.message,
        ), note
    total = given.sum if given and given.sum is not None else 0
    if isinstance(limit.ceiling, float):
        total = float(total)
    return limit_entry(
        limit,
        opened,
        key,  # type: ignore[arg-type]
        count=given.count if given and given.count is not None else 0,
        sum=encode_value(total) if limit.sums else None,
    ), ("given" if given else _NOT_GIVEN)


def decide(
    policies: LoadedPolicies,
    request: PolicyRequest,
    *,
    explain: bool = False,
    limits: LimitsSeen | None = None,
) -> Decision:
    """Decide a file's request as the daemon would, at the request's ``now``.

    Args:
        policies: The compiled policies and directory.
        request: The request and its instant.
        explain: Fill ``Decision.explanation``.
        limits: The request's limits (``look_limits``), when worked out
            already; else they are.

    Returns:
        The engine's decision.

    Raises:
        PolicyError: a given limit is refused (see ``look_limits``).
    """
    if limits is None:
        limits = look_limits(policies, request)
    return engine.evaluate(
        policies.policy_set,
        policies.directory,
        request.request,
        request.env,
        explain=explain,
        limits=limits.values,
    )


def run_tests(
    policies: LoadedPolicies, tests: Iterable[PolicyTest]
) -> PolicyTestReport:
    """Decide every test and compare the answer with its expectation.

    Returns:
        One result per test, in order; never raises for a failing test.
    """
    results = []
    for test in tests:
        decision = decide(policies, test.request)
        results.append(
            PolicyTestResult(test, decision, _compare(test.expect, decision))
        )
    return PolicyTestReport(policies.policy_set.revision, tuple(results))


def run_policy_tests(root: pathlib.Path) -> PolicyTestReport:
    """Load the policies under ``root`` and run every test file found there.

    Raises:
        PolicyError: The policies do not load, a test file is malformed, or
            there are no test files below a ``tests`` directory under root.
    """
    policies = load_policies(root)
    files = find_test_files(root)
    if not files:
        raise PolicyError(
            f"expected policy test files (.yaml) below a {TEST_DIRECTORY!r} "
            "directory, got none",
            path=str(root),
        )
    tests = [
        test
        for path in files
        for test in load_test_file(path, name=path.relative_to(root).as_posix())
    ]
    return run_tests(policies, tests)


def _compare(expect: Expectation, decision: Decision) -> tuple[Mismatch, ...]:
    mismatches = []
    if decision.effect is not expect.decision:
        mismatches.append(Mismatch("decision", expect.decision, decision.effect))
    if expect.reason_code is not None and decision.reason_code != expect.reason_code:
        mismatches.append(
            Mismatch("reason_code", expect.reason_code, decision.reason_code)
        )
    if expect.shadow_decision is not None and (
        decision.shadow_effect is not expect.shadow_decision
    ):
        got = decision.shadow_effect or "none (no shadow rule applied)"
        mismatches.append(Mismatch("shadow_decision", expect.shadow_decision, got))
    if expect.matched_rules is not None:
        mismatches.extend(_compare_rules(expect.matched_rules, decision))
    return tuple(mismatches)


def _compare_rules(expected: Sequence[str], decision: Decision) -> list[Mismatch]:
    got = [
        (f"{rule.policy}/{rule.rule}", f"{rule.policy}/{rule.rule}@{rule.principal}")
        for rule in decision.matched_rules
    ]
    wanted = set(expected)
    missing = [
        citation for citation in expected if not any(citation in pair for pair in got)
    ]
    unexpected = sorted(
        {full for short, full in got if short not in wanted and full not in wanted}
    )
    if not (missing or unexpected):
        return []
    return [
        Mismatch(
            "matched_rules",
            ", ".join(expected) or "none",
            "; ".join(
                part
                for part in (
                    f"missing {', '.join(missing)}" if missing else "",
                    f"unexpected {', '.join(unexpected)}" if unexpected else "",
                )
                if part
            ),
        )
    ]


# --- reporting -----------------------------------------------------------------


def format_report(report: PolicyTestReport) -> str:
    """One line per test (``ok`` or ``FAIL``), a diff per failure, a total."""
    lines = []
    for result in report.results:
        test = result.test
        lines.append(f"{'ok  ' if result.passed else 'FAIL'} {test.file}: {test.name}")
        for mismatch in result.mismatches:
            lines.append(
                f"       {mismatch.field}: expected {mismatch.expected}, "
                f"got {mismatch.got}"
            )
        if not result.passed:
            lines.append(f"       reason: {result.decision.reason}")
    failed = sum(not result.passed for result in report.results)
    lines.append(
        f"{len(report.results) - failed} passed, {failed} failed "
        f"(policy {report.policy_revision})"
    )
    return "\n".join(lines)


_VERDICT_TEXT = {
    Verdict.HELD: "condition true",
    Verdict.NOT_HELD: "condition false",
    Verdict.ERRORED: "condition error",
    Verdict.NOT_EVALUATED: "not evaluated",
}


def format_explanation(decision: Decision, limits: LimitsSeen | None = None) -> str:
    """The decision, the limits it saw and, per principal, every traced
    rule, as text.

    Args:
        decision: A decision made with ``explain=True``.
        limits: The limits it was decided with (``look_limits``).

    Returns:
        Readable lines; a rule marked ``near miss`` matched on patterns or
        on roles but not both.
    """
    lines = [
        f"decision: {decision.effect} ({decision.reason_code})",
        f"reason: {decision.reason}",
    ]
    if decision.shadow_effect is not None:
        lines.append(f"shadow decision: {decision.shadow_effect}")
    if limits is not None and (limits.entries or limits.notes):
        lines.append("limits:")
        lines.extend(
            f"  {line}"
            for line in format_limits(limits.entries, limits.values, limits.notes)
        )
    explanation = decision.explanation or Explanation("no explanation was asked for")
    for principal in explanation.principals:
        decided = f" by {principal.decided_by}" if principal.decided_by else ""
        lines.append(
            f"principal {principal.principal} "
            f"(roles: {', '.join(principal.roles) or 'none'}): "
            f"{principal.effect} ({principal.reason_code}){decided}"
        )
        lines.extend(f"  {_format_trace(trace)}" for trace in principal.rules)
    lines.append(f"combined: {explanation.summary}")
    return "\n".join(lines)


def _format_trace(trace: RuleTrace) -> str:
    misses = [
        what
        for what, matched in (
            ("action", trace.action_matched),
            ("resource kind", trace.resource_matched),
            ("roles", trace.roles_matched),
        )
        if not matched
    ]
    mode = " shadow" if trace.shadow else ""
    head = f"{trace.policy}/{trace.rule} [{trace.effect}{mode}]"
    if misses:
        return f"{head}: near miss, {' and '.join(misses)} did not match"
    verdict = _VERDICT_TEXT[trace.verdict]
    if not trace.condition:
        verdict = "no condition, holds"
    elif trace.verdict is Verdict.ERRORED:
        verdict += f": {trace.error}"
    condition = f"\n      when {trace.condition}" if trace.condition else ""
    return f"{head}: patterns and roles match, {verdict}{condition}"


def format_limits(
    entries: Mapping[str, LimitEntry],
    values: Mapping[str, Any],
    notes: Mapping[str, str] | None = None,
) -> list[str]:
    """One line per limit (``format_limit``), in name order; a note for a
    name with no entry (given but not involved) is its own line."""
    notes = notes or {}
    names = sorted({*entries, *notes})
    return [
        format_limit(name, entries[name], values.get(name), notes.get(name, ""))
        if name in entries
        else f"{name}: {notes[name]}"
        for name in names
    ]


def format_limit(
    name: str, entry: LimitEntry, value: Mapping[str, Any] | None, note: str = ""
) -> str:
    """A limit as a decision saw it: count, sum, ceiling, remaining,
    exceeded, window start and key; or why it had no value (conditions
    reading it failed closed). ``value`` is its CEL value, None when it
    had none."""
    tail = f" ({note})" if note else ""
    if entry.error or value is None:
        why = entry.error or "not recorded for this limit as declared now"
        return f"{name}: no value, conditions reading it fail closed: {why}{tail}"
    parts = [f"count {value['count']}"]
    if entry.remote_count:
        parts[0] += f" ({entry.count} here, {entry.remote_count} elsewhere)"
    if "sum" in value:
        parts.append(f"sum {value['sum']}")
    parts += [
        f"ceiling {value['ceiling']}",
        f"remaining {value['remaining']}",
        f"exceeded {str(value['exceeded']).lower()}",
    ]
    if entry.counted and entry.amount is not None:
        parts.append(f"counted +{decode_value(entry.amount)}")
    return (
        f"{name}: {', '.join(parts)}; window start {entry.window_start}, "
        f"key {entry.key}, scope {entry.scope}{tail}"
    )
