"""The decision engine: a request, a policy set and a directory in; a decision out.

Theory of operation
-------------------

1. Resolve the delegation chain. Each principal id is looked up in the
   directory. A missing principal denies with ``unknown_principal`` and an
   inactive one with ``inactive_principal`` (the first in chain order
   decides), before any rule is evaluated. An empty chain is denied as
   ``unknown_principal`` too: with nobody to ask, nobody allowed it. A chain
   that is not a user followed by agents is denied with ``invalid_chain``.

2. Evaluate each principal on its own (non-escalation). A principal's
   candidate rules are those whose resource-kind and action patterns match
   the request (read from the policy set's index) and whose roles meet the
   principal's own effective roles (or are ``*``). Each candidate's
   condition is evaluated once, giving HELD, NOT_HELD or ERRORED (a rule
   without a condition holds). The principal's outcome is the first row of
   ``_COMBINING`` that some enforced candidate satisfies:

   ================  =======  ================  ===================
   rule effect        verdict  outcome           reason code
   ================  =======  ================  ===================
   deny               held     deny              rule_denied
   deny               errored  deny              condition_error
   require_approval   held     require_approval  approval_required
   require_approval   errored  require_approval  approval_required
   allow              held     allow             rule_allowed
   allow              errored  deny              condition_error
   ================  =======  ================  ===================

   and deny with ``no_rule_allows`` when no row applies. So an explicit deny
   beats require_approval, which beats allow, and a condition that errors
   fails closed: it never satisfies an allow, and it does trigger a deny or
   a require_approval.

3. Combine the chain as an intersection: any principal denied denies; else
   any principal needing approval requires approval; else allow. The first
   principal (in chain order) with the strictest outcome gives the reason.

4. Shadow-mode rules are evaluated alongside and reported in
   ``matched_rules`` with ``shadow=True``, but only enforced rules decide.
   Steps 2 and 3 are run a second time with shadow rules enforced, giving
   ``shadow_effect``; it is None when no shadow rule was a candidate.

5. Only when asked (``explain=True``), trace every rule for every principal
   (see ``Explanation``): the candidates whose roles did not match and the
   rules whose roles matched but a pattern did not are listed as near
   misses. Tracing walks the whole set, so the normal path never does it;
   the trace reads what steps 2 and 3 computed and cannot change them.

Caching
-------
What does not depend on the request is worked out once per policy set and
directory, in an ``EvaluationCache`` the caller keeps while that pair is
active (the pipeline makes a new one on each activation, so a policy or
directory change takes effect on the very next decision): each principal
as the directory resolves it (effective roles and its CEL map), each
chain's refusal check, each (resource kind, action)'s candidate rules,
which of them apply to a set of roles, and the CEL values of the env parts
that stay the same from one request to the next. The caches are bounded:
a table that reaches its size limit is cleared and refills.

Two more savings make a decision cheaper without changing it. The
variables are handed to CEL once per principal as a prepared activation
rather than once per condition. And a condition that never names
``principal`` sees the same variables for every principal of the chain,
so it is evaluated once per decision and its verdict reused for the next
principal whose roles make it a candidate.

Per (chain, resource kind, action) the cache keeps a plan: each
principal's applying rules with their HELD and NOT_HELD evaluations made
once, and the decision each combination of verdicts gave. Beyond the
verdicts (an error by its message) a decision reads nothing of the
request but its kind and action, so a combination seen before is answered
with the same (frozen) Decision object; an explained decision is always
built anew.

Limits
------
The engine reads limits, never counts them. The caller (the pipeline)
asks ``EvaluationCache.limits_for(kind, action)`` which limits the
candidate rules' conditions read and which limits count such a decision,
works out their values (``policy.limits``, ``kynara_sidecar.limits``) and
passes them to ``evaluate(..., limits=...)``, bound as the variable
``limits`` for conditions that read it. Those values differ per request,
but they reach a decision only through the conditions' verdicts, which are
computed per request; the plan's decisions are keyed by verdicts, so a
cached decision is never reused across different limit values.

``matched_rules`` lists, per principal and in rule order, every deny and
require_approval rule that held or errored and every allow rule that held;
``condition_errors`` lists every condition that errored. The engine reads
no clock and does no I/O: ``env.now`` is the instant of the request.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import msgspec

from kynara_sidecar.decision import (
    ConditionError,
    Decision,
    DecisionRequest,
    Effect,
    Env,
    Explanation,
    MatchedRule,
    PrincipalExplanation,
    PrincipalRef,
    RuleTrace,
    Verdict,
)
from kynara_sidecar.errors import ReasonCode
from kynara_sidecar.policy.compiler import CompiledRule, Directory, PolicySet
from kynara_sidecar.policy.conditions import (
    LIMITS_VARIABLE,
    ConditionFailure,
    prepare_activation,
    to_cel_value,
)
from kynara_sidecar.policy.limits import CompiledLimit
from kynara_sidecar.policy.names import pattern_matches

__all__ = [
    "DEFAULT_CACHE_ENTRIES",
    "EvaluationCache",
    "LimitsFor",
    "could_allow",
    "evaluate",
]

# Entries per cache table: far more principals, chains and (kind, action)
# pairs than a daemon's directory and agent produce, while a caller sending
# made-up ids or names can only make the table clear and refill.
DEFAULT_CACHE_ENTRIES = 4096

# (rule effect, verdict) -> (outcome, reason code), strongest row first.
_COMBINING: tuple[tuple[Effect, Verdict, Effect, ReasonCode], ...] = (
    (Effect.DENY, Verdict.HELD, Effect.DENY, ReasonCode.RULE_DENIED),
    (Effect.DENY, Verdict.ERRORED, Effect.DENY, ReasonCode.CONDITION_ERROR),
    (
        Effect.REQUIRE_APPROVAL,
        Verdict.HELD,
        Effect.REQUIRE_APPROVAL,
        ReasonCode.APPROVAL_REQUIRED,
    ),
    (
        Effect.REQUIRE_APPROVAL,
        Verdict.ERRORED,
        Effect.REQUIRE_APPROVAL,
        ReasonCode.APPROVAL_REQUIRED,
    ),
    (Effect.ALLOW, Verdict.HELD, Effect.ALLOW, ReasonCode.RULE_ALLOWED),
    (Effect.ALLOW, Verdict.ERRORED, Effect.DENY, ReasonCode.CONDITION_ERROR),
)

# What a deciding rule does, for the reason sentence; an allow rule decides
# alone only when its condition failed, so it "cannot allow".
_VERBS = {
    Effect.DENY: "denies",
    Effect.REQUIRE_APPROVAL: "requires approval of",
    Effect.ALLOW: "cannot allow",
}

_USER, _AGENT = "user", "agent"

# How strict each outcome is when the chain is combined.
_STRICTNESS = {Effect.ALLOW: 0, Effect.REQUIRE_APPROVAL: 1, Effect.DENY: 2}


class _Evaluated(msgspec.Struct, frozen=True):
    rule: CompiledRule
    verdict: Verdict
    error: str = ""


class _Outcome(msgspec.Struct, frozen=True):
    """One principal's answer; ``evaluated`` is None when no rule decided."""

    principal: str
    effect: Effect
    reason_code: ReasonCode
    evaluated: _Evaluated | None = None


class _Resolved(msgspec.Struct, frozen=True):
    ref: PrincipalRef
    cel: dict[str, Any]
    # The effective roles as a set, for matching rules' roles.
    roles: frozenset[str] = frozenset()


class _Chain(msgspec.Struct, frozen=True):
    """A chain as the directory resolves it, and what does not depend on
    the request: why it is refused (None when it is not) and its CEL parts."""

    resolved: tuple[_Resolved, ...]
    refs: tuple[PrincipalRef, ...]
    refusal: tuple[ReasonCode, str] | None
    cel_chain: dict[str, Any]


class LimitsFor(NamedTuple):
    """The limits a decision of one (resource kind, action) involves, each
    in name order: ``read`` by the conditions of its candidate rules (any
    role, shadow rules too), ``counted`` those that count a decision of
    that action on that kind."""

    read: tuple[CompiledLimit, ...]
    counted: tuple[CompiledLimit, ...]


_NO_LIMITS = LimitsFor((), ())


class EvaluationCache:
    """What ``evaluate`` works out alike for every request under one policy
    set and directory (see "Caching" above).

    Make one per activated (policy set, directory) pair and pass it to each
    ``evaluate`` of that pair; ``evaluate`` ignores a cache made for another
    pair. Not thread safe: use it from one thread (the event loop).

    Args:
        policy_set: the compiled policies it caches for.
        directory: the directory it caches for.
        max_entries: the size at which a table is cleared.
    """

    def __init__(
        self,
        policy_set: PolicySet,
        directory: Directory,
        *,
        max_entries: int = DEFAULT_CACHE_ENTRIES,
    ):
        self.policy_set = policy_set
        self.directory = directory
        self._max = max_entries
        self._principals: dict[str, _Resolved] = {}
        self._chains: dict[tuple[str, ...], _Chain] = {}
        self._candidates: dict[tuple[str, str], tuple[CompiledRule, ...]] = {}
        self._applying: dict[
            tuple[str, str, frozenset[str]], tuple[CompiledRule, ...]
        ] = {}
        self._needed: dict[tuple[str, str, frozenset[str]], frozenset[str]] = {}
        self._plans: dict[tuple[tuple[str, ...], str, str], _Plan] = {}
        self._limits: dict[tuple[str, str], LimitsFor] = {}
        # (daemon_id, environment, region, labels) and their CEL values.
        self._env_key: tuple[str, str, str, Mapping[str, str]] | None = None
        self._env_cel: dict[str, Any] = {}

    def principal(self, principal_id: str) -> _Resolved:
        """The principal as the directory resolves it."""
        found = self._principals.get(principal_id)
        if found is None:
            found = _resolve(self.policy_set, self.directory, principal_id)
            _bounded_put(self._principals, principal_id, found, self._max)
        return found

    def chain(self, ids: tuple[str, ...]) -> _Chain:
        """The chain resolved, with its refusal and CEL parts."""
        found = self._chains.get(ids)
        if found is None:
            resolved = tuple(self.principal(pid) for pid in ids)
            refs = tuple(item.ref for item in resolved)
            found = _Chain(
                resolved=resolved,
                refs=refs,
                refusal=_refuse_chain(refs),
                cel_chain={"ids": list(ids), "depth": len(ids)},
            )
            _bounded_put(self._chains, ids, found, self._max)
        return found

    def candidates(self, kind: str, action: str) -> tuple[CompiledRule, ...]:
        """``PolicySet.candidate_rules``, looked up once per pair."""
        key = (kind, action)
        found = self._candidates.get(key)
        if found is None:
            found = self.policy_set.candidate_rules(kind, action)
            _bounded_put(self._candidates, key, found, self._max)
        return found

    def limits_for(self, kind: str, action: str) -> LimitsFor:
        """The limits a decision of ``action`` on ``kind`` reads and those
        that count it (see ``LimitsFor``), looked up once per pair."""
        declared = self.policy_set.limits
        if not declared:
            return _NO_LIMITS
        key = (kind, action)
        found = self._limits.get(key)
        if found is None:
            names = set()
            for rule in self.candidates(kind, action):
                if rule.condition is not None:
                    names |= rule.condition.limits
            found = LimitsFor(
                read=tuple(declared[name] for name in sorted(names)),
                counted=tuple(
                    declared[name]
                    for name in sorted(declared)
                    if declared[name].counts(kind, action)
                ),
            )
            _bounded_put(self._limits, key, found, self._max)
        return found

    def applying(
        self, kind: str, action: str, roles: frozenset[str]
    ) -> tuple[CompiledRule, ...]:
        """The candidates whose roles meet ``roles``, in set order."""
        key = (kind, action, roles)
        found = self._applying.get(key)
        if found is None:
            found = tuple(
                rule for rule in self.candidates(kind, action) if rule.applies_to(roles)
            )
            _bounded_put(self._applying, key, found, self._max)
        return found

    def needed(self, kind: str, action: str, roles: frozenset[str]) -> frozenset[str]:
        """The variables the conditions of ``applying(kind, action, roles)``
        read (``Condition.variables``): all an activation for them needs.

        Converting a variable into the runtime's values costs the same
        whether a condition reads it or not, so the others are left out.
        """
        key = (kind, action, roles)
        found = self._needed.get(key)
        if found is None:
            found = frozenset().union(
                *(
                    rule.condition.variables
                    for rule in self.applying(kind, action, roles)
                    if rule.condition is not None
                )
            )
            _bounded_put(self._needed, key, found, self._max)
        return found

    def plan(
        self, chain: _Chain, ids: tuple[str, ...], kind: str, action: str
    ) -> _Plan:
        """What deciding ``action`` on ``kind`` for the chain ``ids``
        (resolved as ``chain``) needs beyond the request's values: per
        principal its applying rules and the variables they read, and the
        decisions already reached for each combination of verdicts."""
        key = (ids, kind, action)
        found = self._plans.get(key)
        if found is None:
            principals = []
            for item in chain.resolved:
                steps = tuple(
                    (
                        rule,
                        rule.condition,
                        _Evaluated(rule, Verdict.HELD),
                        _Evaluated(rule, Verdict.NOT_HELD),
                        self.shares(rule),
                    )
                    for rule in self.applying(kind, action, item.roles)
                )
                principals.append((item, self.needed(kind, action, item.roles), steps))
            found = _Plan(tuple(principals))
            _bounded_put(self._plans, key, found, self._max)
        return found

    def shares(self, rule: CompiledRule) -> bool:
        """Whether the rule's condition gives every principal one verdict:
        it never names ``principal`` (read from the checked expression at
        load, so no walk over the set here)."""
        condition = rule.condition
        return condition is not None and "principal" not in condition.variables

    def env_values(self, env: Env) -> dict[str, Any]:
        """The CEL values of ``env`` (``to_cel_value``), the parts that do
        not change per request converted once.

        Raises:
            ValueError: a map key holds NUL (as ``to_cel_value``).
        """
        key = (env.daemon_id, env.environment, env.region, env.labels)
        if key != self._env_key:
            self._env_cel = {
                "daemon_id": to_cel_value(env.daemon_id),
                "environment": to_cel_value(env.environment),
                "region": to_cel_value(env.region),
                "labels": to_cel_value(env.labels),
            }
            self._env_key = key
        return {
            "now": to_cel_value(env.now),
            "agent_id": to_cel_value(env.agent_id),
            "peer": to_cel_value(env.peer),
            **self._env_cel,
        }


class _Plan:
    """One (chain, resource kind, action) as ``evaluate`` walks it.

    ``principals`` holds, per principal in chain order, the resolved
    principal, the variables its applying rules read and one step per
    applying rule: the rule, its condition, its HELD and NOT_HELD
    evaluations (made once: they hold nothing of the request) and whether
    its verdict is shared by the chain. ``decisions`` maps the verdicts of
    every step (errors by their message) to the decision they give: the
    decision reads nothing else of the request, so a combination seen
    before is answered with the decision made then.
    """

    __slots__ = ("decisions", "principals")

    def __init__(
        self,
        principals: tuple[
            tuple[
                _Resolved,
                frozenset[str],
                tuple[tuple[CompiledRule, Any, _Evaluated, _Evaluated, bool], ...],
            ],
            ...,
        ],
    ):
        self.principals = principals
        self.decisions: dict[tuple[Any, ...], Decision] = {}


# Verdict combinations kept per plan: far more than the rules of a
# (chain, kind, action) give without errors; error messages that vary per
# request only make the table clear and refill.
_PLAN_DECISIONS = 256


def _bounded_put(table: dict[Any, Any], key: Any, value: Any, limit: int) -> None:
    if len(table) >= limit:
        table.clear()
    table[key] = value


def evaluate(
    policy_set: PolicySet,
    directory: Directory,
    request: DecisionRequest,
    env: Env,
    *,
    explain: bool = False,
    cache: EvaluationCache | None = None,
    limits: Mapping[str, Any] | None = None,
) -> Decision:
    """Decide a request against a policy set and a directory.

    Args:
        policy_set: The compiled policies.
        directory: The principals the chain's ids are resolved in.
        request: A validated request; ``chain`` is user first, agent last.
        env: What the daemon knows, with the request's instant as ``now``.
        explain: Also trace every rule for every principal into
            ``Decision.explanation``; the decision itself is the same.
        cache: What earlier decisions under this same policy set and
            directory worked out; one made for another pair is ignored.
            The decision is the same with or without it.
        limits: The values of the limits this request can form, by name,
            already through ``to_cel_value`` (see ``policy.conditions``);
            bound as ``limits`` for the conditions that read it. A limit
            missing here (or all of them, for None) makes a condition
            reading it fail closed.

    Returns:
        The decision, with the resolved chain, matched rules, condition
        errors and both revisions, and the explanation when asked. Never
        raises for a policy outcome: unknown principals and failing
        conditions are answers.
    """
    if (
        cache is None
        or cache.policy_set is not policy_set
        or cache.directory is not directory
    ):
        cache = EvaluationCache(policy_set, directory)
    resolved_chain = cache.chain(request.chain)
    chain = resolved_chain.refs
    refusal = resolved_chain.refusal
    if refusal:
        reason_code, reason = refusal
        explanation = None
        if explain:
            explanation = Explanation(f"refused before any rule ran: {reason}")
        return Decision(
            Effect.DENY,
            reason_code,
            reason,
            chain,
            policy_revision=policy_set.revision,
            directory_revision=directory.revision,
            explanation=explanation,
        )

    kind, action = request.resource.kind, request.action
    plan = cache.plan(resolved_chain, request.chain, kind, action)
    shared = _shared_activation(request, env, resolved_chain, cache)
    if not isinstance(shared, ConditionFailure):
        # Bound only for the conditions that read it (``_activation``); a
        # caller's dict as it is (built per request, not changed after).
        if not limits:
            shared[LIMITS_VARIABLE] = _NO_LIMIT_VALUES
        else:
            shared[LIMITS_VARIABLE] = (
                limits if isinstance(limits, dict) else dict(limits)
            )
    # Verdicts of conditions that give every principal the same one.
    reused: dict[int, _Evaluated] = {}
    evaluations = []
    # Every step's verdict in order, an error by its message: all the
    # decision depends on besides the plan.
    verdicts: list[Any] = []
    for item, needed, steps in plan.principals:
        activation: Any = None
        evaluated = []
        for rule, condition, held, not_held, shares in steps:
            if condition is None:
                evaluated.append(held)
                verdicts.append(Verdict.HELD)
                continue
            found = reused.get(rule.order)
            if found is None:
                if activation is None:
                    activation = _activation(item, shared, needed, env, cache)
                found = _evaluate_rule(rule, activation, held, not_held)
                if shares:
                    reused[rule.order] = found
            evaluated.append(found)
            verdicts.append((found.error,) if found.error else found.verdict)
        evaluations.append(tuple(evaluated))
    if explain:
        return _decide(policy_set, directory, request, chain, evaluations, explain=True)
    key = tuple(verdicts)
    decision = plan.decisions.get(key)
    if decision is None:
        decision = _decide(
            policy_set, directory, request, chain, evaluations, explain=False
        )
        _bounded_put(plan.decisions, key, decision, _PLAN_DECISIONS)
    return decision


def _decide(
    policy_set: PolicySet,
    directory: Directory,
    request: DecisionRequest,
    chain: tuple[PrincipalRef, ...],
    evaluations: Sequence[tuple[_Evaluated, ...]],
    *,
    explain: bool,
) -> Decision:
    """The decision the chain's evaluations give (steps 3 to 5)."""
    enforced = tuple(
        _combine(ref.id, [e for e in evaluated if not e.rule.shadow])
        for ref, evaluated in zip(chain, evaluations, strict=True)
    )
    decided = _strictest(enforced)
    shadow_effect = _shadow_effect(chain, evaluations)
    explanation = None
    if explain:
        explanation = _explain(
            policy_set, request, chain, evaluations, enforced, shadow_effect
        )
    return Decision(
        effect=decided.effect,
        reason_code=decided.reason_code,
        reason=_reason(decided, enforced, request),
        chain=chain,
        matched_rules=_matched_rules(chain, evaluations),
        condition_errors=_condition_errors(chain, evaluations),
        shadow_effect=shadow_effect,
        policy_revision=policy_set.revision,
        directory_revision=directory.revision,
        explanation=explanation,
    )


def could_allow(
    policy_set: PolicySet,
    directory: Directory,
    chain: Sequence[str],
    kind: str,
    action: str,
) -> bool:
    """Tell whether some request by this chain for ``action`` on ``kind``
    could be allowed (at once or after approval), whatever its resource id,
    attributes and context.

    Used to hide what a caller can never do (the MCP gateway's tools/list),
    never to decide: a call is still decided by ``evaluate``. Per principal,
    in the same candidates ``evaluate`` reads: false when an enforced
    unconditional deny applies to its roles, or when no enforced allow or
    require_approval rule does (conditional rules count: their conditions
    may hold). Non-escalation: every principal of the chain must pass, and
    a chain ``evaluate`` would refuse before any rule (unknown or inactive
    principals, a malformed chain) passes nowhere.
    """
    resolved = tuple(_resolve(policy_set, directory, pid) for pid in chain)
    if _refuse_chain(tuple(item.ref for item in resolved)):
        return False
    candidates = tuple(
        rule for rule in policy_set.candidate_rules(kind, action) if not rule.shadow
    )
    for item in resolved:
        roles = frozenset(item.ref.roles)
        applying = [rule for rule in candidates if rule.applies_to(roles)]
        if any(
            rule.effect is Effect.DENY and rule.condition is None for rule in applying
        ):
            return False
        if not any(rule.effect is not Effect.DENY for rule in applying):
            return False
    return True


# --- the chain -----------------------------------------------------------------


def _resolve(
    policy_set: PolicySet, directory: Directory, principal_id: str
) -> _Resolved:
    principal = directory.lookup(principal_id)
    if principal is None:
        return _Resolved(PrincipalRef(principal_id, known=False, active=False), {})
    effective = policy_set.effective_roles(principal.roles)
    roles = tuple(sorted(effective))
    ref = PrincipalRef(principal.id, principal.kind, roles, active=principal.active)
    cel = {
        "id": principal.id,
        "kind": principal.kind,
        "roles": list(roles),
        "attr": principal.cel_attributes,
    }
    return _Resolved(ref, cel, frozenset(effective))


def _refuse_chain(chain: Sequence[PrincipalRef]) -> tuple[ReasonCode, str] | None:
    if not chain:
        return (
            ReasonCode.UNKNOWN_PRINCIPAL,
            "expected at least one principal in the delegation chain, got none",
        )
    for ref in chain:
        if not ref.known:
            return (
                ReasonCode.UNKNOWN_PRINCIPAL,
                f"principal {ref.id!r} is not in the directory",
            )
        if not ref.active:
            return ReasonCode.INACTIVE_PRINCIPAL, f"principal {ref.id!r} is inactive"
    for position, ref in enumerate(chain):
        expected = _USER if position == 0 else _AGENT
        if ref.kind != expected:
            return (
                ReasonCode.INVALID_CHAIN,
                f"principal {ref.id!r} is a {ref.kind} where the chain expects "
                f"a {expected} (a user first, then agents)",
            )
    return None


# The ``limits`` of a request that forms none (never changed).
_NO_LIMIT_VALUES: dict[str, Any] = {}


def _shared_activation(
    request: DecisionRequest,
    env: Env,
    chain: _Chain,
    cache: EvaluationCache,
) -> dict[str, Any] | ConditionFailure:
    """The variables every principal shares; a failure when the request's
    values cannot be handed to CEL, so that every condition fails closed."""
    # The gRPC front door refuses map keys holding NUL as invalid_request;
    # a door that lets one through still fails closed here.
    try:
        return _variables(request, env, chain, cache)
    except ValueError as err:
        return ConditionFailure(f"could not pass the request to CEL: {err}")


def _variables(
    request: DecisionRequest, env: Env, chain: _Chain, cache: EvaluationCache
) -> dict[str, Any]:
    # Every variable but ``env`` (whose values never fail to convert; built
    # by _activation when a condition reads it) and ``principal``.
    resolved = chain.resolved
    return {
        "user": resolved[0].cel,
        "agent": resolved[-1].cel,
        "chain": chain.cel_chain,
        "action": request.action,
        "resource": {
            "kind": request.resource.kind,
            "id": to_cel_value(request.resource.id),
            "attr": _cel_map(request.resource.attributes),
        },
        "context": _cel_map(request.context),
    }


# Values CEL takes as they are (``to_cel_value`` returns them unchanged);
# bool, int and str exactly, not their subclasses such as UInt64.
_PLAIN = frozenset({bool, int, float})


def _cel_map(values: Mapping[str, Any]) -> Any:
    """``to_cel_value`` of a request's map; the map itself when every key
    and value is already what CEL takes (the usual flat context), which
    saves copying it."""
    if type(values) is not dict:
        return to_cel_value(values)
    for key, item in values.items():
        kind = type(item)
        if type(key) is not str or "\x00" in key:
            return to_cel_value(values)
        if kind is str:
            if "\x00" in item:
                return to_cel_value(values)
        elif kind not in _PLAIN:
            return to_cel_value(values)
    return values


# --- one principal -------------------------------------------------------------


def _activation(
    resolved: _Resolved,
    shared: dict[str, Any] | ConditionFailure,
    needed: frozenset[str],
    env: Env,
    cache: EvaluationCache,
) -> Any:
    # Only the variables some condition here reads go to the runtime.
    if isinstance(shared, ConditionFailure):
        return shared
    if "env" in needed and "env" not in shared:
        try:
            shared["env"] = cache.env_values(env)  # once per request
        except ValueError as err:
            return ConditionFailure(f"could not pass the request to CEL: {err}")
    data = {name: shared[name] for name in needed if name in shared}
    if "principal" in needed:
        data["principal"] = resolved.cel
    return prepare_activation(data)


def _evaluate_rule(
    rule: CompiledRule, activation: Any, held: _Evaluated, not_held: _Evaluated
) -> _Evaluated:
    """The rule's evaluation: ``held`` or ``not_held`` (the rule's own,
    made once), or a new ERRORED one carrying the failure."""
    assert rule.condition is not None
    result = activation
    if not isinstance(activation, ConditionFailure):
        result = rule.condition.evaluate_prepared(activation)
    if result is True:
        return held
    if result is False:
        return not_held
    return _Evaluated(rule, Verdict.ERRORED, result.message)


def _combine(principal: str, evaluated: Sequence[_Evaluated]) -> _Outcome:
    for rule_effect, verdict, effect, reason_code in _COMBINING:
        for item in evaluated:
            if item.rule.effect is rule_effect and item.verdict is verdict:
                return _Outcome(principal, effect, reason_code, item)
    return _Outcome(principal, Effect.DENY, ReasonCode.NO_RULE_ALLOWS)


def _strictest(outcomes: Sequence[_Outcome]) -> _Outcome:
    # max() keeps the first of equals, so the earliest principal explains.
    return max(outcomes, key=lambda outcome: _STRICTNESS[outcome.effect])


def _shadow_effect(
    chain: Sequence[PrincipalRef], evaluations: Sequence[Sequence[_Evaluated]]
) -> Effect | None:
    if not any(item.rule.shadow for evaluated in evaluations for item in evaluated):
        return None
    outcomes = [
        _combine(ref.id, evaluated)
        for ref, evaluated in zip(chain, evaluations, strict=True)
    ]
    return _strictest(outcomes).effect


# --- what the answer reports ---------------------------------------------------


def _matched_rules(
    chain: Sequence[PrincipalRef], evaluations: Sequence[Sequence[_Evaluated]]
) -> tuple[MatchedRule, ...]:
    return tuple(
        MatchedRule(
            item.rule.policy, item.rule.id, item.rule.effect, ref.id, item.rule.shadow
        )
        for ref, evaluated in zip(chain, evaluations, strict=True)
        for item in evaluated
        if item.verdict is Verdict.HELD
        or (item.verdict is Verdict.ERRORED and item.rule.effect is not Effect.ALLOW)
    )


def _condition_errors(
    chain: Sequence[PrincipalRef], evaluations: Sequence[Sequence[_Evaluated]]
) -> tuple[ConditionError, ...]:
    return tuple(
        ConditionError(item.rule.policy, item.rule.id, ref.id, item.error)
        for ref, evaluated in zip(chain, evaluations, strict=True)
        for item in evaluated
        if item.verdict is Verdict.ERRORED
    )


def _cite(item: _Evaluated) -> str:
    return f"{item.rule.policy}/{item.rule.id}"


def _reason(
    decided: _Outcome, outcomes: Sequence[_Outcome], request: DecisionRequest
) -> str:
    what = f"{request.action} on {request.resource.kind}"
    item, who = decided.evaluated, repr(decided.principal)
    if item is None:
        return f"no rule allows {what} for {who}"
    if decided.effect is Effect.ALLOW:
        grants = ", ".join(
            f"{outcome.principal!r} by {_cite(outcome.evaluated)}"
            for outcome in outcomes
        )
        return f"{what} allowed for every principal: {grants}"
    verb = _VERBS[item.rule.effect]
    if item.verdict is Verdict.ERRORED:
        return (
            f"condition of rule {_cite(item)} failed for {who}, so it "
            f"{verb} {what}: {item.error}"
        )
    return f"rule {_cite(item)} {verb} {what} for {who}"


# --- the explanation -----------------------------------------------------------


def _explain(
    policy_set: PolicySet,
    request: DecisionRequest,
    chain: Sequence[PrincipalRef],
    evaluations: Sequence[Sequence[_Evaluated]],
    enforced: Sequence[_Outcome],
    shadow_effect: Effect | None,
) -> Explanation:
    principals = tuple(
        PrincipalExplanation(
            principal=ref.id,
            roles=ref.roles,
            effect=outcome.effect,
            reason_code=outcome.reason_code,
            decided_by=_cite(outcome.evaluated) if outcome.evaluated else "",
            rules=_trace_rules(policy_set, request, ref, evaluated),
        )
        for ref, evaluated, outcome in zip(chain, evaluations, enforced, strict=True)
    )
    return Explanation(_summary(enforced, shadow_effect), principals)


def _trace_rules(
    policy_set: PolicySet,
    request: DecisionRequest,
    ref: PrincipalRef,
    evaluated: Sequence[_Evaluated],
) -> tuple[RuleTrace, ...]:
    # The verdicts come from the evaluation that decided, so the trace
    # cannot disagree with the answer; a rule not evaluated was no candidate.
    verdicts = {item.rule.order: item for item in evaluated}
    roles = frozenset(ref.roles)
    traces = []
    for rule in policy_set.rules:
        action = any(pattern_matches(p, request.action) for p in rule.actions)
        resource = any(
            pattern_matches(p, request.resource.kind) for p in rule.resources
        )
        roles_matched = rule.applies_to(roles)
        if not (roles_matched or (action and resource)):
            continue
        item = verdicts.get(rule.order)
        traces.append(
            RuleTrace(
                policy=rule.policy,
                rule=rule.id,
                effect=rule.effect,
                action_matched=action,
                resource_matched=resource,
                roles_matched=roles_matched,
                verdict=item.verdict if item else Verdict.NOT_EVALUATED,
                shadow=rule.shadow,
                condition=rule.condition.source if rule.condition else "",
                error=item.error if item else "",
            )
        )
    return tuple(traces)


def _summary(outcomes: Sequence[_Outcome], shadow_effect: Effect | None) -> str:
    each = "; ".join(
        f"{outcome.principal!r} {outcome.effect} ({outcome.reason_code}"
        + (f" by {_cite(outcome.evaluated)})" if outcome.evaluated else ")")
        for outcome in outcomes
    )
    decided = _strictest(outcomes)
    summary = (
        f"each principal is decided alone, deny beating require_approval beating "
        f"allow: {each}; the chain takes the strictest, {decided.effect} from "
        f"{decided.principal!r}"
    )
    if shadow_effect is not None:
        summary += f"; with shadow rules enforced it would be {shadow_effect}"
    return summary
