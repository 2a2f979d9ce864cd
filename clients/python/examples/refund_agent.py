#!/usr/bin/env python3
"""A scripted refund agent that asks its Kynara daemon before every tool call.

Start the daemon first, from the repository root::

    scripts/run        # or: kynara-sidecar run --config config/kynara.yaml

then run the agent::

    python clients/python/examples/refund_agent.py
    python clients/python/examples/refund_agent.py --target 127.0.0.1:50151

It acts for user ``alice`` and prints one line per tool call: the call, the
decision, the reason code and the decision id. It exits 0 when every call got
an answer (a deny is an answer too), 1 when the daemon refused to answer a
call (the error code is printed), and 2 when the daemon is unreachable.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from kynara_sdk import (
    TARGET_ENV,
    ApprovalRequired,
    Decision,
    KynaraError,
    KynaraUnavailable,
    PermissionDenied,
    acting_for,
    current_decision,
    permission_required,
)

__all__ = ["issue_refund", "main", "read_contact"]

REPO_ROOT = Path(__file__).resolve().parents[3]
# The agent socket of the shipped config (config/kynara.yaml, agent.socket),
# relative to the repository root that scripts/run starts the daemon in.
SHIPPED_SOCKET = REPO_ROOT / "var" / "run" / "agent.sock"
EXIT_ANSWERED = 0
EXIT_NO_ANSWER = 1
EXIT_UNREACHABLE = 2
START_HINT = (
    "start it from the repository root with `scripts/run`"
    " (or `kynara-sidecar run --config config/kynara.yaml`)"
)


class Receipt(NamedTuple):
    """What a tool did, and the allow it did it under (for its own logs)."""

    text: str
    decision: Decision


@permission_required(
    "payments.refund.issue",
    resource_kind="payments.refund",
    resource_arg="refund_id",
    attrs=["amount"],
    context=["region"],
)
def issue_refund(refund_id: str, amount: int, region: str = "DE") -> Receipt:
    """Issue a refund of ``amount`` cents; runs only when the daemon allows."""
    return Receipt(f"refund {refund_id} of {amount} issued", current_decision())


@permission_required(
    "crm.contact.read",
    resource_kind="crm.contact",
    resource_arg="contact_id",
    context=["region"],
)
def read_contact(contact_id: str, region: str = "DE") -> Receipt:
    """Read a CRM contact; runs only when the daemon allows."""
    return Receipt(f"contact {contact_id} read", current_decision())


# Each step: a label for the output line, and the tool call to make.
SESSION: list[tuple[str, Callable[[], Receipt]]] = [
    ("issue_refund(rf_1001, 1200)", lambda: issue_refund("rf_1001", 1200)),
    ("issue_refund(rf_1002, 250000)", lambda: issue_refund("rf_1002", 250_000)),
    (
        "issue_refund(rf_1003, 1200, region=kp)",
        lambda: issue_refund("rf_1003", 1200, region="kp"),
    ),
    ("read_contact(ct_77)", lambda: read_contact("ct_77")),
]


def run_step(label: str, step: Callable[[], Receipt]) -> str:
    """Make one tool call and describe the daemon's answer in one line.

    Raises:
        KynaraError: the daemon gave no answer (including unreachable).
    """
    try:
        receipt = step()
    except PermissionDenied as denied:
        return _line(label, "deny", denied.reason_code, denied.decision_id)
    except ApprovalRequired as pending:
        # TODO(#7): wait for the reviewer's verdict instead of stopping here.
        extra = f"  approval={pending.approval_url}" if pending.approval_url else ""
        code = pending.decision.reason_code
        return _line(label, "require_approval", code, pending.decision_id) + extra
    allowed = receipt.decision
    return _line(label, "allow", allowed.reason_code, allowed.decision_id)


def _line(label: str, decision: str, reason_code: str, decision_id: str) -> str:
    return f"{label:<40} {decision:<17} {reason_code or '-':<18} {decision_id}"


def main(argv: list[str] | None = None) -> int:
    """Run the scripted session for alice; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--target",
        default=os.environ.get(TARGET_ENV) or f"unix://{SHIPPED_SOCKET}",
        help=f"daemon address (default: ${TARGET_ENV}, else unix://{SHIPPED_SOCKET})",
    )
    args = parser.parse_args(argv)
    # The tools use the SDK's shared client, which dials $KYNARA_TARGET.
    os.environ[TARGET_ENV] = args.target

    status = EXIT_ANSWERED
    with acting_for(user="alice"):
        for label, step in SESSION:
            try:
                print(run_step(label, step), flush=True)
            except KynaraUnavailable:
                print(
                    f"refund_agent: no Kynara daemon answering at {args.target};"
                    f" {START_HINT}",
                    file=sys.stderr,
                )
                return EXIT_UNREACHABLE
            except KynaraError as err:
                print(f"{label:<40} error             {err.code:<18} {err.message}")
                status = EXIT_NO_ANSWER
    return status


if __name__ == "__main__":
    sys.exit(main())
