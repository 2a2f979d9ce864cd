"""What both transports share: the subject of a request, batch items, and
the errors that end a wait on an approval.

Nothing here imports protobuf or grpc: the fast path needs neither.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from kynara_sdk.decision import ApprovalUpdate, DecisionRequest
from kynara_sdk.errors import (
    APPROVAL_USED,
    INTERNAL,
    ApprovalError,
    ApprovalExpired,
    ApprovalRejected,
    ApprovalTimeout,
    KynaraError,
    KynaraUnavailable,
)
from kynara_sdk.subject import Subject, current_subject, resolve_subject

__all__ = [
    "WAIT_END_STATES",
    "ApprovalWait",
    "approval_error",
    "approval_timeout",
    "batch_items",
    "batch_requests",
    "batch_size_error",
    "request_subject",
    "wait_ended_early",
]

_Built = TypeVar("_Built")

# A wait ends on these; "pending" is the only state that keeps it going.
WAIT_END_STATES = frozenset({"approved", "rejected", "expired", "used"})


def request_subject(item: DecisionRequest) -> Subject | None:
    """The subject ``item`` acts for: its own ``user``, ``chain`` or
    ``token``, else the ``acting_for`` block current now.

    Raises:
        TypeError, ValueError: the subject is malformed.
    """
    subject = resolve_subject(user=item.user, chain=item.chain, token=item.token)
    return subject if subject is not None else current_subject()


def batch_items(
    requests: Iterable[DecisionRequest | Mapping[str, Any]],
) -> list[DecisionRequest]:
    """The batch's items as ``DecisionRequest``, dicts of ``decide``'s keyword
    arguments converted.

    Raises:
        TypeError: an item is neither, or a dict has an unknown key; the
            message names the item's index.
    """
    items = []
    for index, item in enumerate(requests):
        if isinstance(item, Mapping):
            try:
                item = DecisionRequest(**item)
            except TypeError as err:
                raise TypeError(f"requests[{index}]: {err}") from None
        elif not isinstance(item, DecisionRequest):
            raise TypeError(
                f"requests[{index}]: expected a DecisionRequest or a dict,"
                f" got {type(item).__name__}"
            )
        items.append(item)
    return items


def batch_requests(
    items: list[DecisionRequest], build: Callable[[DecisionRequest], _Built]
) -> list[_Built]:
    """Each item in a transport's wire form, made by ``build``.

    Raises:
        TypeError, ValueError: an item has no wire form; the message names
            the item's index (``requests[2]: ...``).
    """
    built = []
    for index, item in enumerate(items):
        try:
            built.append(build(item))
        except (TypeError, ValueError) as err:
            raise type(err)(f"requests[{index}]: {err}") from err
    return built


def batch_size_error(sent: int, answered: int) -> KynaraError:
    """The error for a batch answer whose item count is not the request's."""
    return KynaraError(
        INTERNAL,
        f"expected one answer per request ({sent}), got {answered}",
        "items",
    )


def approval_error(update: ApprovalUpdate, decision_id: str = "") -> KynaraError | None:
    """The error a wait that ended at ``update`` raises; None when approved."""
    approval_id, state = update.approval_id, update.state
    if state == "approved":
        return None
    if state == "rejected":
        why = f": {update.comment}" if update.comment else ""
        return ApprovalRejected(
            approval_id, f"rejected by a reviewer{why}", decision_id, update
        )
    if state == "expired":
        return ApprovalExpired(
            approval_id, "expired before it was approved", decision_id, update
        )
    if state == "used":
        return ApprovalError(
            APPROVAL_USED,
            approval_id,
            "used already by another request; a grant allows one request once",
            decision_id,
            update,
        )
    return KynaraError(
        INTERNAL,
        f"approval {approval_id}: expected a state, got {state!r}",
        "state",
    )


def approval_timeout(
    approval_id: str, timeout: float, decision_id: str, last: ApprovalUpdate | None
) -> ApprovalTimeout:
    """The error of a wait whose time ran out: the approval stays pending."""
    return ApprovalTimeout(
        approval_id,
        f"no reviewer resolved it within {timeout:g} s; it stays pending "
        "and may still be approved",
        decision_id,
        last,
    )


def wait_ended_early(target: str, approval_id: str) -> KynaraUnavailable:
    """The error of a wait the daemon ended before a final state: it is
    stopping."""
    return KynaraUnavailable(
        f"the Kynara daemon at {target} ended the wait on approval "
        f"{approval_id} before it was resolved; wait again"
    )


class ApprovalWait:
    """One ``wait_approval`` call, whatever the transport: what it waits on,
    the last update seen, and how it ends."""

    __slots__ = ("approval_id", "decision_id", "last", "target", "timeout")

    def __init__(
        self, target: str, approval_id: str, timeout: float, decision_id: str
    ) -> None:
        self.target = target
        self.approval_id = approval_id
        self.timeout = timeout
        self.decision_id = decision_id
        self.last: ApprovalUpdate | None = None

    def take(self, update: ApprovalUpdate) -> ApprovalUpdate | None:
        """The approved update that ends the wait, None while it goes on.

        Raises:
            ApprovalError, KynaraError: as ``approval_error`` for an end
                other than approved.
        """
        self.last = update
        if update.state not in WAIT_END_STATES:
            return None
        error = approval_error(update, self.decision_id)
        if error is not None:
            raise error
        return update

    def timed_out(self) -> ApprovalTimeout:
        return approval_timeout(
            self.approval_id, self.timeout, self.decision_id, self.last
        )

    def refused(self, error: KynaraError) -> ApprovalError:
        """The daemon's refusal of the wait (``not_found``, ...), carrying
        what the wait knows."""
        return ApprovalError(
            error.code,
            self.approval_id,
            error.message,
            self.decision_id,
            self.last,
            field=error.field,
        )

    def ended_early(self) -> KynaraUnavailable:
        return wait_ended_early(self.target, self.approval_id)
