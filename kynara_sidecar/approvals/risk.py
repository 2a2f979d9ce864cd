"""The risk score of an approval: named factors with configured weights.

Pure: a request's facts and ``approvals.risk`` in, a ``Risk`` out; no clock,
no I/O. Each factor gives a fraction in 0..1 of what it saw, and is worth
``weight * fraction`` points; the score is the points summed, rounded half
up and capped at 100:

==================  ======================================================
factor              fraction
==================  ======================================================
rule                the asking rules' highest ``approval.risk`` / 100
amount              the fraction of the highest threshold the amount is
                    strictly past (resource attribute, else context entry)
sensitivity         the configured fraction of the level named (resource
                    attribute, else context entry); an unnamed level 0
off_hours           1 when ``env.now`` in the configured zone is outside
                    ``[start_hour, end_hour)`` or not on a working weekday
delegation_depth    ``(len(chain) - 2) / (full_delegation_depth - 2)``,
                    clamped to 0..1: a user and one agent score 0
unusual_action      1 when the agent did not do this action in its last
                    ``unusual_window`` decisions (``action_seen`` false)
==================  ======================================================

Every factor is listed, in this order, even one whose weight is 0 or not
configured (it then scores 0 points), so a reviewer sees the whole sheet;
``detail`` says what was seen.
"""

from __future__ import annotations

import datetime
import math
import zoneinfo
from collections.abc import Mapping, Sequence
from typing import Any

from kynara_sidecar.approvals.model import Risk, RiskFactor
from kynara_sidecar.config import RISK_FACTORS, RiskConfig
from kynara_sidecar.decision import Resource, Timestamp, UInt64
from kynara_sidecar.policy.compiler import CompiledRule

__all__ = ["MAX_SCORE", "score_risk"]

MAX_SCORE = 100
# A rule's approval.risk is on the same 0..100 scale as the score.
RULE_RISK_SCALE = 100


def score_risk(
    config: RiskConfig,
    *,
    rules: Sequence[CompiledRule],
    resource: Resource,
    context: Mapping[str, Any],
    chain: Sequence[str],
    now: Timestamp,
    action_seen: bool,
) -> Risk:
    """Score a request that asks for approval.

    Args:
        config: ``approvals.risk``.
        rules: the require_approval rules that asked.
        resource: the request's resource (unredacted).
        context: the caller's context (unredacted).
        chain: the chain's principal ids, user first.
        now: the decision instant (``env.now``).
        action_seen: whether the agent did this action in its last
            ``config.unusual_window`` decisions.

    Returns:
        The score and every factor, in ``RISK_FACTORS`` order.
    """
    seen = {
        "rule": _rule(rules),
        "amount": _amount(config, resource, context),
        "sensitivity": _sensitivity(config, resource, context),
        "off_hours": _off_hours(config, now),
        "delegation_depth": _depth(config, chain),
        "unusual_action": _unusual(action_seen),
    }
    factors = []
    for name in RISK_FACTORS:
        fraction, detail = seen[name]
        weight = float(config.weights.get(name, 0.0))
        factors.append(
            RiskFactor(
                name=name,
                weight=weight,
                fraction=fraction,
                points=weight * fraction,
                detail=detail,
            )
        )
    total = sum(factor.points for factor in factors)
    score = min(MAX_SCORE, math.floor(total + 0.5))
    return Risk(score=score, factors=tuple(factors))


def _lookup(
    attribute: str, resource: Resource, context: Mapping[str, Any]
) -> tuple[Any, str]:
    if attribute in resource.attributes:
        return resource.attributes[attribute], f"resource.attr.{attribute}"
    if attribute in context:
        return context[attribute], f"context.{attribute}"
    return None, ""


def _rule_risk(rule: CompiledRule) -> int:
    return rule.approval.risk if rule.approval else 0


def _rule(rules: Sequence[CompiledRule]) -> tuple[float, str]:
    if not rules:
        return 0.0, "no asking rule"
    best = max(rules, key=_rule_risk)  # the first of the highest
    risk = _rule_risk(best)
    return risk / RULE_RISK_SCALE, f"{best.policy}/{best.id} sets risk {risk}"


def _is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int | UInt64):
        return True
    return isinstance(value, float) and math.isfinite(value)


def _amount(
    config: RiskConfig, resource: Resource, context: Mapping[str, Any]
) -> tuple[float, str]:
    attribute = config.amount.attribute
    value, where = _lookup(attribute, resource, context)
    if value is None:
        return 0.0, f"no {attribute} in the resource or context"
    if not _is_number(value):
        return 0.0, f"{where} is not a number"
    fraction, passed = 0.0, None
    for threshold, share in config.amount.thresholds:
        # Thresholds are ascending (validated): the last one passed wins.
        if value > threshold:
            fraction, passed = share, threshold
    if passed is None:
        return 0.0, f"{where} {value} is past no threshold"
    return fraction, f"{where} {value} is past {_number(passed)}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _sensitivity(
    config: RiskConfig, resource: Resource, context: Mapping[str, Any]
) -> tuple[float, str]:
    attribute = config.sensitivity.attribute
    value, where = _lookup(attribute, resource, context)
    if value is None:
        return 0.0, f"no {attribute} in the resource or context"
    if not isinstance(value, str):
        return 0.0, f"{where} is not a level name"
    fraction = config.sensitivity.levels.get(value)
    if fraction is None:
        return 0.0, f"{where} {value!r} is not a configured level"
    return float(fraction), f"{where} {value!r}"


def _off_hours(config: RiskConfig, now: Timestamp) -> tuple[float, str]:
    hours = config.off_hours
    zone = zoneinfo.ZoneInfo(hours.time_zone)
    moment = datetime.datetime.fromtimestamp(now.seconds, tz=zone)
    local = f"{moment:%a %H:%M} {hours.time_zone}"
    if moment.isoweekday() not in hours.weekdays:
        return 1.0, f"{local}: not a working day"
    if not hours.start_hour <= moment.hour < hours.end_hour:
        return 1.0, (
            f"{local}: outside working hours "
            f"{hours.start_hour:02d}:00-{hours.end_hour:02d}:00"
        )
    return 0.0, f"{local}: within working hours"


def _depth(config: RiskConfig, chain: Sequence[str]) -> tuple[float, str]:
    full = config.full_delegation_depth
    fraction = min(1.0, max(0.0, (len(chain) - 2) / (full - 2)))
    return fraction, f"chain of {len(chain)} principals (full at {full})"


def _unusual(action_seen: bool) -> tuple[float, str]:
    if action_seen:
        return 0.0, "the agent did this action recently"
    return 1.0, "the agent did not do this action in its recent decisions"
