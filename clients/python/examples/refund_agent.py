#!/usr/bin/env python3
"""A scripted refund agent that asks its Kynara daemon before every tool call.

Start the daemon first, from the repository root::

    scripts/run        # or: kynara-sidecar run --config config/kynara.yaml

then run the agent::

    python clients/python/examples/refund_agent.py
    python clients/python/examples/refund_agent.py --target 127.0.0.1:50151

It acts for user ``alice`` and prints one line per tool call: the call, the
decision, the reason code and the decision id; under each call a tool ran
for, what it did (``refund rf_1001 of 1200 issued``). The refund over the
limit (``--large-refund``, 250000 cents by default; the shipped policy asks
for approval above 50000) is answered require_approval, and the line carries
the approval's URL.

To see the approval through, let the agent wait for a reviewer::

    python clients/python/examples/refund_agent.py --wait-for-approval 600

It then prints the approval's URL and id once and waits (up to 600 s) until
a reviewer resolves it: open the URL, sign in with the secret of an admin
credential that has the ``reviewer`` role (the README's quickstart makes
one), and approve. The agent retries with the grant, the daemon allows that
refund once (``approval_granted``) and the refund is issued. A wait that
ends first leaves the approval pending (``approval_timeout``: a reviewer
may still approve it); a rejection or expiry is printed with its code.

Ctrl-C during the wait stops the agent with one line naming the approval,
which stays pending (a reviewer may still approve it; the grant then works
for the same refund, asked again).

Once a reviewer approved (after an earlier wait timed out, or while the
agent was not waiting), asking again for the same refund uses the grant at
once, waiting or not: the daemon hands it back and the decorator retries
with it, so the refund is issued once (``approval_granted``).

Exit status: 0 when every call got an answer (a deny, a pending approval and
a rejected one are answers too), 1 when the daemon refused to answer a call
(the error code is printed), 2 when the daemon is unreachable, 130 when
interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from kynara_sdk import (
    APPROVAL_TIMEOUT,
    TARGET_ENV,
    ApprovalError,
    ApprovalRequired,
    Decision,
    KynaraError,
    KynaraUnavailable,
    PermissionDenied,
    acting_for,
    current_decision,
    permission_required,
)

__all__ = ["Announcer", "issue_refund", "main", "read_contact"]

REPO_ROOT = Path(__file__).resolve().parents[3]
# The agent socket of the shipped config (config/kynara.yaml, agent.socket),
# relative to the repository root that scripts/run starts the daemon in.
SHIPPED_SOCKET = REPO_ROOT / "var" / "run" / "agent.sock"
EXIT_ANSWERED = 0
EXIT_NO_ANSWER = 1
EXIT_UNREACHABLE = 2
# 128 + SIGINT, as a shell reports a program ended by Ctrl-C.
EXIT_INTERRUPTED = 130
START_HINT = (
    "start it from the repository root with `scripts/run`"
    " (or `kynara-sidecar run --config config/kynara.yaml`)"
)
# Well over the shipped policy's 50000-cent limit (refund-large).
DEFAULT_LARGE_REFUND = 250_000
REFUND_ACTION = "payments.refund.issue"
# How issue_refund's arguments reach the daemon; shared by its waiting twin.
REFUND_REQUEST: dict[str, Any] = {
    "resource_kind": "payments.refund",
    "resource_arg": "refund_id",
    "attrs": ["amount"],
    "context": ["region"],
}


class Receipt(NamedTuple):
    """What a tool did, and the allow it did it under (for its own logs)."""

    text: str
    decision: Decision


@permission_required(REFUND_ACTION, **REFUND_REQUEST)
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


class Announcer:
    """Prints a require_approval answer (with the approval's URL) once, as a
    tool starts waiting on it, so the person running the agent can pass the
    link to a reviewer: the decorator's ``on_wait``.

    ``label`` is the tool call being made, set before each call;
    ``waiting`` the id of the approval waited on now ("" between waits).
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.label = ""
        self.waiting = ""

    def __call__(self, asked: Decision) -> None:
        """Print the answer that asked for approval and what is waited on."""
        approval_id = asked.approval.id if asked.approval is not None else ""
        self.waiting = approval_id
        print(_pending_line(self.label, asked), flush=True)
        print(
            f"  waiting up to {self.seconds:g} s for a reviewer of {approval_id}",
            flush=True,
        )


def waiting_refund(announcer: Announcer) -> Callable[..., Receipt]:
    """``issue_refund`` that waits for a reviewer instead of raising
    ``ApprovalRequired``, then runs once on the grant's allow."""
    waits = permission_required(
        REFUND_ACTION,
        **REFUND_REQUEST,
        on_approval="wait",
        approval_timeout=announcer.seconds,
        on_wait=announcer,
    )
    return waits(issue_refund.__wrapped__)


Step = tuple[str, Callable[[], Receipt]]


def session(refund: Callable[..., Receipt], large: int) -> list[Step]:
    """The scripted tool calls: a label for the output line, and the call."""
    return [
        ("issue_refund(rf_1001, 1200)", lambda: refund("rf_1001", 1200)),
        (f"issue_refund(rf_1002, {large})", lambda: refund("rf_1002", large)),
        (
            "issue_refund(rf_1003, 1200, region=kp)",
            lambda: refund("rf_1003", 1200, region="kp"),
        ),
        ("read_contact(ct_77)", lambda: read_contact("ct_77")),
    ]


def run_step(label: str, step: Callable[[], Receipt]) -> str:
    """Make one tool call and describe the daemon's answer.

    Returns:
        One line for the answer; for an allow, a second line saying what
        the tool did.

    Raises:
        KynaraError: the daemon gave no answer (including unreachable).
    """
    try:
        receipt = step()
    except PermissionDenied as denied:
        return _line(label, "deny", denied.reason_code, denied.decision_id)
    except ApprovalRequired as pending:
        return _pending_line(label, pending.decision)
    except ApprovalError as ended:
        # A wait that ended without a grant: the answer stays require_approval,
        # and the code says how the wait ended (timeout leaves it pending).
        extra = f"  approval={ended.approval_id}"
        if ended.code == APPROVAL_TIMEOUT:
            extra += " (still pending)"
        return _line(label, "require_approval", ended.code, ended.decision_id) + extra
    allowed = receipt.decision
    line = _line(label, "allow", allowed.reason_code, allowed.decision_id)
    return f"{line}\n  {receipt.text}"


def _pending_line(label: str, decision: Decision) -> str:
    approval = decision.approval
    url = approval.url if approval is not None else ""
    extra = f"  approval={url}" if url else ""
    line = _line(label, "require_approval", decision.reason_code, decision.decision_id)
    return line + extra


def _line(label: str, decision: str, reason_code: str, decision_id: str) -> str:
    return f"{label:<40} {decision:<17} {reason_code or '-':<18} {decision_id}"


def _positive_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"expected seconds > 0, got {text!r}")
    return seconds


def _cents(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected whole cents, got {text!r}"
        ) from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--target",
        default=os.environ.get(TARGET_ENV) or f"unix://{SHIPPED_SOCKET}",
        help=f"daemon address (default: ${TARGET_ENV}, else unix://{SHIPPED_SOCKET})",
    )
    parser.add_argument(
        "--wait-for-approval",
        type=_positive_seconds,
        metavar="SECONDS",
        help="on require_approval, print the approval's URL and wait up to"
        " SECONDS for a reviewer, then retry with the grant (default: print"
        " the URL and go on)",
    )
    parser.add_argument(
        "--large-refund",
        type=_cents,
        default=DEFAULT_LARGE_REFUND,
        metavar="CENTS",
        help=f"the amount of the refund over the limit (default"
        f" {DEFAULT_LARGE_REFUND})",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the scripted session for alice; return the exit status."""
    args = parse_args(argv)
    # The tools use the SDK's shared client, which dials $KYNARA_TARGET.
    os.environ[TARGET_ENV] = args.target
    announcer = None
    refund: Callable[..., Receipt] = issue_refund
    if args.wait_for_approval is not None:
        announcer = Announcer(args.wait_for_approval)
        refund = waiting_refund(announcer)
    previous = signal.signal(signal.SIGINT, functools.partial(_on_interrupt, announcer))
    try:
        return run_session(session(refund, args.large_refund), args.target, announcer)
    finally:
        signal.signal(signal.SIGINT, previous)


def run_session(
    steps: list[Step], target: str, announcer: Announcer | None = None
) -> int:
    """Make each call for alice, printing its answer; return the exit status."""
    status = EXIT_ANSWERED
    with acting_for(user="alice"):
        for label, step in steps:
            if announcer is not None:
                announcer.label, announcer.waiting = label, ""
            try:
                line = run_step(label, step)
                if announcer is not None:
                    announcer.waiting = ""
                print(line, flush=True)
            except KynaraUnavailable:
                print(
                    f"refund_agent: no Kynara daemon answering at {target};"
                    f" {START_HINT}",
                    file=sys.stderr,
                )
                return EXIT_UNREACHABLE
            except KynaraError as err:
                print(f"{label:<40} error             {err.code:<18} {err.message}")
                status = EXIT_NO_ANSWER
    return status


def _on_interrupt(announcer: Announcer | None, signum: int, frame: object) -> None:
    # NOTE: a KeyboardInterrupt raised wherever the main thread happens to
    # be (inside grpc, holding one of its locks) can leave the channel
    # unable to close, and the agent hung at exit. Nothing of the agent's
    # needs cleaning up (the daemon sees the wait's stream end when the
    # socket closes), so it says where things stand and exits at once.
    with contextlib.suppress(RuntimeError):  # stdout mid-write: reentrant
        sys.stdout.flush()
    os.write(sys.stderr.fileno(), (_interrupted(announcer) + "\n").encode())
    os._exit(EXIT_INTERRUPTED)


def _interrupted(announcer: Announcer | None) -> str:
    waiting = announcer.waiting if announcer is not None else ""
    if not waiting:
        return "refund_agent: interrupted"
    return (
        f"refund_agent: interrupted; approval {waiting} stays pending (a reviewer"
        " may still approve it, and asking again for the same refund uses it)"
    )


if __name__ == "__main__":
    sys.exit(main())
