"""What the tests of limits share: a policy directory laid out from the
shipped files plus a test's own, the refund policy with a count and a
running total (``refund_limits``), and refund requests over gRPC.

``limits_policies`` and ``REQUEST`` are the small set explain, policy
tests, replay and the playground use: a rule whose outcome flips with the
count given or recorded."""

from __future__ import annotations

import pathlib
import shutil
from collections.abc import Iterable, Mapping
from typing import Any

from kynara.v1 import decision_pb2 as pb
from support import SHIPPED_POLICIES, value_to_proto

# The shipped files that say who is who but hold no rule about refunds: a
# policy set of these and a test's own decides refunds by that alone.
ROLES_AND_DIRECTORY = ("roles.yaml", "directory.yaml")
BERLIN_DAY = "{calendar: day, time_zone: Europe/Berlin}"
# Lets support staff refund, for a set without the shipped payments rules.
ALLOW_REFUNDS = """\
  - id: refund
    effect: allow
    actions: [payments.refund.issue]
    resources: [payments.refund]
    roles: [support, support_agent]
"""


def policy_dir(
    root: pathlib.Path,
    files: Mapping[str, str] | None = None,
    *,
    shipped: Iterable[str] | None = None,
) -> pathlib.Path:
    """Lay out a policy directory at ``root`` and return it: the shipped
    policies (all of them but their ``tests/``, or only the files named in
    ``shipped``), then ``files`` (file name to YAML text) beside them."""
    if shipped is None:
        shutil.copytree(
            SHIPPED_POLICIES,
            root,
            ignore=shutil.ignore_patterns("tests"),
            dirs_exist_ok=True,
        )
    else:
        root.mkdir(parents=True, exist_ok=True)
        for name in shipped:
            shutil.copy(SHIPPED_POLICIES / name, root / name)
    for name, text in (files or {}).items():
        (root / name).write_text(text)
    return root


def deny_rule(rule_id: str, limit: str, *, effect: str = "deny") -> str:
    """A rule of a refund policy's ``rules:`` that takes ``effect`` on a
    support refund once ``limit`` is exceeded."""
    return f"""\
  - id: {rule_id}
    effect: {effect}
    actions: [payments.refund.issue]
    resources: [payments.refund]
    roles: [support, support_agent]
    condition: limits.{limit}.exceeded
"""


def refund_limits(
    *,
    name: str = "refund-limits",
    count: str = "refunds_today",
    window: str = BERLIN_DAY,
    ceiling: int = 5,
    count_rule: str = "refunds-per-day",
    effect: str = "deny",
    total: str = "refund_total_week",
    total_of: str = "resource.attr.amount",
    total_ceiling: int = 10_000,
    allow: bool = False,
    more_limits: str = "",
    more_rules: str = "",
) -> str:
    """A refund policy's YAML: the limit ``count`` (refunds per user in
    ``window``, at most ``ceiling``), whose rule ``count_rule`` takes
    ``effect`` past it, and the limit ``total`` (the sum of ``total_of``
    per agent over a rolling week, at most ``total_ceiling``), whose rule
    ``refund-total`` denies past it.

    ``allow`` puts ``ALLOW_REFUNDS`` first among the rules; ``more_limits``
    and ``more_rules`` (YAML lines at the indent of their section) follow
    the others. The count limit is the first, so a test may edit its lines
    with ``str.replace(..., 1)``."""
    return f"""\
format_version: 1
kind: policy
name: {name}
limits:
  {count}:
    description: refunds per user in the window
    actions: [payments.refund.issue]
    key: [user]
    window: {window}
    ceiling: {ceiling}
  {total}:
    description: refunded amounts per agent over a rolling week
    actions: [payments.refund.issue]
    sum: {total_of}
    key: [agent]
    window: {{rolling: 7d}}
    ceiling: {total_ceiling}
{more_limits}rules:
{ALLOW_REFUNDS if allow else ""}\
{deny_rule(count_rule, count, effect=effect)}\
{deny_rule("refund-total", total)}\
{more_rules}"""


def refund_request(
    rid: str = "rf-1",
    amount: int | None = 1200,
    *,
    user: str = "alice",
    context: Mapping[str, Any] | None = None,
    approval_id: str = "",
    explain: bool = False,
) -> pb.DecideRequest:
    """A refund ``user`` asks support-bot for over gRPC: ``amount`` as the
    resource's attribute (none when None), ``context`` as given."""
    attributes = {} if amount is None else {"amount": value_to_proto(amount)}
    return pb.DecideRequest(
        asserted_chain=[user],
        action="payments.refund.issue",
        resource=pb.Resource(kind="payments.refund", id=rid, attributes=attributes),
        context={k: value_to_proto(v) for k, v in (context or {}).items()},
        approval_id=approval_id,
        explain=explain,
    )


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
    """A policy directory at ``root``: the shipped roles and directory and
    ``refunds.yaml``, which allows refunds and denies past five (or
    ``ceiling``) a Berlin day per user or 10,000 of ``context.amount`` a
    week per agent; returns it."""
    refunds = refund_limits(
        name="refunds",
        ceiling=ceiling,
        count_rule="refunds-cap",
        total_of="context.amount",
        allow=True,
    )
    return policy_dir(root, {"refunds.yaml": refunds}, shipped=ROLES_AND_DIRECTORY)


def request_with(limits: str = "") -> str:
    """``REQUEST`` with a ``limits:`` mapping (YAML flow text) added."""
    return REQUEST + (f"  limits: {limits}\n" if limits else "")
