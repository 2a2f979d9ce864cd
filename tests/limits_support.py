"""A small policy set with two limits, for explain, policy tests, replay
and the playground: a rule whose outcome flips with the count given or
recorded."""

from __future__ import annotations

import pathlib
import shutil

from support import SHIPPED_POLICIES

REFUNDS = """\
format_version: 1
kind: policy
name: refunds
limits:
  refunds_today:
    description: five refunds per user per Berlin day
    actions: [payments.refund.issue]
    key: [user]
    window: {calendar: day, time_zone: Europe/Berlin}
    ceiling: %(ceiling)s
  refund_total_week:
    actions: [payments.refund.issue]
    sum: context.amount
    key: [agent]
    window: {rolling: 7d}
    ceiling: 10000
rules:
  - id: refund
    effect: allow
    actions: [payments.refund.issue]
    resources: [payments.refund]
    roles: [support, support_agent]
  - id: refunds-cap
    effect: deny
    actions: [payments.refund.issue]
    resources: [payments.refund]
    roles: [support, support_agent]
    condition: limits.refunds_today.exceeded
  - id: refund-total
    effect: deny
    actions: [payments.refund.issue]
    resources: [payments.refund]
    roles: [support, support_agent]
    condition: limits.refund_total_week.exceeded
"""

# A request file: one refund of 500 by alice through support-bot.
REQUEST = """\
request:
  now: "2026-12-07T10:00:00+01:00"
  chain: [alice, support-bot]
  action: payments.refund.issue
  resource: {kind: payments.refund, id: rf-1}
  context: {amount: 500}
"""


def limits_policies(root: pathlib.Path, *, ceiling: int = 5) -> pathlib.Path:
    """A policy directory (shipped roles and directory, ``REFUNDS``) at
    ``root``; returns it."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("roles.yaml", "directory.yaml"):
        shutil.copy(SHIPPED_POLICIES / name, root / name)
    (root / "refunds.yaml").write_text(REFUNDS % {"ceiling": ceiling})
    return root


def request_with(limits: str = "") -> str:
    """``REQUEST`` with a ``limits:`` mapping (YAML flow text) added."""
    return REQUEST + (f"  limits: {limits}\n" if limits else "")
