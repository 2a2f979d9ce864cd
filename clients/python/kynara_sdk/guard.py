"""``ToolGuard``: the check an agent framework's tool makes before it runs.

The framework adapters (``kynara_sdk.integrations.langchain``, ``.autogen``,
``.crewai``) wrap a tool so that every call is first decided by the daemon
on the tool's own name and parsed arguments, mapped to the request as
``@permission_required`` maps a function's. A guard never raises on its
own: ``check`` returns a ``Verdict`` the adapter turns into what its
framework expects (an exception, an error tool message), and that carries
the decision id for the trace, the callback record and the tool result.

Fail closed: the tool runs only on allow. Deny, require_approval, an error
answer, a timeout or an unreachable daemon each keep it from running, with
the reason. ``fail_open=True`` lets a call through when the daemon could
not answer (unreachable, too slow, shutting down, no policy or audit log
yet), never on deny, approval, a request the daemon refused as bad, an
internal error (which an input could provoke) or a fast-path peer that is
not a Kynara daemon; each time it does, it logs a warning on the
``kynara_sdk.guard`` logger naming the tool, the action and the error.
Over gRPC, a peer that is not a daemon mostly reads as unreachable (grpc
does not tell a protocol error from a connection that failed), so a
``fail_open`` guard pointed at a wrong gRPC target opens, logged.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection, Mapping
from typing import Any, TypedDict

from kynara_sdk.client import AsyncClient, Client
from kynara_sdk.decision import Decision
from kynara_sdk.decorator import (
    DEFAULT_APPROVAL_TIMEOUT,
    ArgumentMap,
    OnApproval,
    OnWait,
    Waiting,
    argument_map,
    decide_async,
    decide_sync,
    default_async_client,
    default_client,
    enforce,
    tool_request,
)
from kynara_sdk.errors import (
    AUDIT_UNAVAILABLE,
    DAEMON_UNREACHABLE,
    INVALID_REQUEST,
    POLICY_NOT_READY,
    SHUTTING_DOWN,
    ApprovalError,
    ApprovalRequired,
    KynaraError,
    PermissionDenied,
)

__all__ = ["NO_ANSWER_CODES", "GuardOptions", "ToolGuard", "Verdict"]

log = logging.getLogger("kynara_sdk.guard")

# The codes under which the daemon could not decide for reasons of its own;
# only these may fail open. A bad request (invalid_request, identity_invalid,
# request_too_large) is the caller's and always fails closed; so is
# internal: it is also what a status from something other than the daemon
# maps to (a wrong socket), and an input that makes the daemon fail must not
# open the door.
NO_ANSWER_CODES = frozenset(
    {DAEMON_UNREACHABLE, SHUTTING_DOWN, POLICY_NOT_READY, AUDIT_UNAVAILABLE}
)


class GuardOptions(TypedDict, total=False):
    """``ToolGuard``'s settings besides the action and the resource kind;
    each framework adapter's ``guard_tool`` takes them as keywords, with
    the meanings ``ToolGuard`` gives them."""

    resource_arg: str | None
    attrs: ArgumentMap
    context: ArgumentMap
    client: Client | None
    async_client: AsyncClient | None
    on_approval: OnApproval
    approval_timeout: float
    on_wait: OnWait | None
    fail_open: bool


@dataclasses.dataclass(frozen=True, slots=True)
class Verdict:
    """What a guard's check came to for one tool call.

    Attributes:
        tool: the tool's name.
        action: the action asked about.
        decision: the daemon's last answer (after a retry with a grant), or
            None when none came.
        error: why the tool may not run (``PermissionDenied``,
            ``ApprovalRequired``, an ``ApprovalError`` or the
            ``KynaraError`` of a call that got no answer), or None on allow.
        failed_open: no answer came and ``fail_open`` let the call through.
    """

    tool: str
    action: str
    decision: Decision | None
    error: KynaraError | None = None
    failed_open: bool = False

    @property
    def allowed(self) -> bool:
        """True when the tool may run."""
        return self.error is None or self.failed_open

    @property
    def decision_id(self) -> str:
        """The id of the audit record of the last answer, or "" without one."""
        if self.decision is not None:
            return self.decision.decision_id
        return getattr(self.error, "decision_id", "")

    def raise_if_refused(self) -> None:
        """Raise ``error`` unless the tool may run."""
        if not self.allowed:
            raise self.error  # type: ignore[misc]

    def metadata(self) -> dict[str, Any]:
        """The verdict as plain data for a trace or a tool result: decision,
        decision_id, reason_code, reason, approval (id, url, state) or None,
        error code (or ""), failed_open."""
        decision = self.decision
        approval = decision.approval if decision is not None else None
        return {
            "tool": self.tool,
            "action": self.action,
            "decision": decision.decision if decision is not None else "",
            "decision_id": self.decision_id,
            "reason_code": decision.reason_code if decision is not None else "",
            "reason": decision.reason if decision is not None else "",
            "approval": None
            if approval is None
            else {"id": approval.id, "url": approval.url, "state": approval.state},
            "error": self.error.code if self.error is not None else "",
            "failed_open": self.failed_open,
        }

    def message(self) -> str:
        """Why the tool did not run, in words a model can act on; "" when it
        may run."""
        err = self.error
        if self.allowed or err is None:
            return ""
        where = f"{self.tool} ({self.action})"
        if isinstance(err, PermissionDenied):
            denied = err.decision
            return (
                f"Permission denied for {where}: {denied.reason}"
                f" [{denied.reason_code}; decision {denied.decision_id}]."
                " The tool did not run."
            )
        if isinstance(err, ApprovalRequired):
            url = f" at {err.approval_url}" if err.approval_url else ""
            return (
                f"{where} needs a reviewer's approval{url} (approval"
                f" {err.approval_id}; decision {err.decision_id}). The tool did"
                " not run; once approved, call it again with the same"
                " arguments."
            )
        if isinstance(err, ApprovalError):
            return (
                f"{where} was not approved: {err.message} [{err.code}; approval"
                f" {err.approval_id}; decision {err.decision_id}]. The tool did"
                " not run."
            )
        return (
            f"Kynara could not decide on {where}: {err.message} [{err.code}]."
            " The tool did not run."
        )


class ToolGuard:
    """The check before one tool's calls: the action, and how the tool's
    parsed arguments map to the request.

    Args:
        action: dotted action name, e.g. ``payments.refund.issue``.
        resource_kind: dotted resource kind, e.g. ``payments.refund``.
        resource_arg: the argument holding the resource id, or None.
        attrs: arguments sent as resource attributes (a list of names, or a
            dict of attribute name to argument name). An argument that is a
            pydantic model (as frameworks parse nested arguments) is sent
            as the map of its fields.
        context: arguments sent as caller context, in the same forms.
        client: the ``Client`` for ``check``; default the shared one for
            ``$KYNARA_TARGET``.
        async_client: the ``AsyncClient`` for ``acheck``; default likewise.
        on_approval: ``"raise"`` (the default: the tool does not run, and
            the verdict says where to approve) or ``"wait"`` for a reviewer
            up to ``approval_timeout`` seconds, then ask again with the
            grant.
        approval_timeout: seconds ``"wait"`` waits.
        on_wait: with ``"wait"``, told of the require_approval decision
            before the wait starts.
        fail_open: let a call through when the daemon could not answer;
            logged each time. Off unless spelled out.

    Raises:
        ValueError, TypeError: a setting is out of range or of the wrong
            type (as ``permission_required`` checks them).
    """

    def __init__(
        self,
        action: str,
        *,
        resource_kind: str,
        resource_arg: str | None = None,
        attrs: ArgumentMap = None,
        context: ArgumentMap = None,
        client: Client | None = None,
        async_client: AsyncClient | None = None,
        on_approval: OnApproval = "raise",
        approval_timeout: float = DEFAULT_APPROVAL_TIMEOUT,
        on_wait: OnWait | None = None,
        fail_open: bool = False,
    ) -> None:
        for name, value in (("action", action), ("resource_kind", resource_kind)):
            if not isinstance(value, str) or not value:
                raise TypeError(f"{name}: expected a non-empty str, got {value!r}")
        if resource_arg is not None and not isinstance(resource_arg, str):
            raise TypeError(
                f"resource_arg: expected an argument name or None, got {resource_arg!r}"
            )
        if not isinstance(fail_open, bool):
            raise TypeError(f"fail_open: expected True or False, got {fail_open!r}")
        _check_client("client", client, Client)
        _check_client("async_client", async_client, AsyncClient)
        self.action = action
        self.resource_kind = resource_kind
        self.resource_arg = resource_arg
        self.fail_open = fail_open
        self._attrs = argument_map(attrs, "attrs")
        self._context = argument_map(context, "context")
        self._waiting = Waiting.of(on_approval, approval_timeout, on_wait)
        # The argument names the request is made of, in the order given.
        named = [resource_arg] if resource_arg is not None else []
        named += [*self._attrs.values(), *self._context.values()]
        self._mapped = tuple(dict.fromkeys(named))
        self._client = client
        self._async_client = async_client

    def settings(self) -> dict[str, Any]:
        """The guard's settings as plain data, without its clients or
        ``on_wait``: what a framework saves so that ``ToolGuard(**settings)``
        builds the same check again."""
        return {
            "action": self.action,
            "resource_kind": self.resource_kind,
            "resource_arg": self.resource_arg,
            "attrs": dict(self._attrs),
            "context": dict(self._context),
            "on_approval": "wait" if self._waiting.waits else "raise",
            "approval_timeout": self._waiting.timeout,
            "fail_open": self.fail_open,
        }

    def check_arguments(self, tool: str, known: Collection[str]) -> None:
        """Make sure every argument the request maps from is one of the
        tool's ``known`` arguments, so a misspelled name is found when the
        tool is guarded, not sent as a missing id or attribute.

        Raises:
            ValueError: a mapped argument is not among ``known``; the
                message names them all.
        """
        missing = [name for name in self._mapped if name not in known]
        if missing:
            raise ValueError(
                f"guard_tool: {', '.join(map(repr, missing))} not among tool"
                f" {tool!r}'s arguments ({', '.join(sorted(known)) or 'none'})"
            )

    def check(self, tool: str, arguments: Mapping[str, Any]) -> Verdict:
        """Decide one call of ``tool`` with its parsed ``arguments``."""
        try:
            request = self._request(arguments)
            asker = self._client if self._client is not None else default_client()
            decision = decide_sync(asker, self.action, request, self._waiting)
        except KynaraError as err:
            return self._no_decision(tool, err)
        except (TypeError, ValueError) as err:
            return self._no_decision(tool, _bad_value(err))
        return self._verdict(tool, decision)

    async def acheck(self, tool: str, arguments: Mapping[str, Any]) -> Verdict:
        """As ``check``, awaited, with the async client."""
        try:
            request = self._request(arguments)
            asker = self._async_client
            if asker is None:
                asker = default_async_client()
            decision = await decide_async(asker, self.action, request, self._waiting)
        except KynaraError as err:
            return self._no_decision(tool, err)
        except (TypeError, ValueError) as err:
            return self._no_decision(tool, _bad_value(err))
        return self._verdict(tool, decision)

    def _request(self, arguments: Mapping[str, Any]) -> dict[str, Any]:
        # Only the arguments the request reads are converted: an unmapped
        # model is neither dumped nor sent.
        plain = {
            name: _plain(arguments[name]) for name in self._mapped if name in arguments
        }
        return tool_request(
            plain, self.resource_kind, self.resource_arg, self._attrs, self._context
        )

    def _verdict(self, tool: str, decision: Decision) -> Verdict:
        try:
            enforce(decision)
        except KynaraError as err:
            return Verdict(tool, self.action, decision, err)
        return Verdict(tool, self.action, decision)

    def _no_decision(self, tool: str, err: KynaraError) -> Verdict:
        # A wait that ended without a grant still names the decision that
        # asked; any other error got no decision at all.
        decision = getattr(err, "decision", None)
        wrong_target = getattr(err, "not_a_daemon", False)
        if self.fail_open and err.code in NO_ANSWER_CODES and not wrong_target:
            log.warning(
                "failing open: %s (%s) runs without a decision: %s",
                tool,
                self.action,
                err,
                extra={"tool": tool, "action": self.action, "code": err.code},
            )
            return Verdict(tool, self.action, decision, err, failed_open=True)
        return Verdict(tool, self.action, decision, err)


def _plain(value: Any) -> Any:
    # Frameworks parse a tool's arguments with pydantic: a nested model is
    # sent as its fields (a map), as the model would read it in JSON.
    dump = getattr(value, "model_dump", None)
    if callable(dump) and not isinstance(value, type):
        return dump(mode="python")
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


def _bad_value(err: TypeError | ValueError) -> KynaraError:
    # An argument with no wire form (the SDK names it before sending): the
    # call's own fault, so it fails closed like the daemon's invalid_request.
    return KynaraError(INVALID_REQUEST, str(err), "arguments")


def _check_client(name: str, client: object, wanted: type) -> None:
    if client is not None and not isinstance(client, wanted):
        raise TypeError(
            f"{name}: expected a {wanted.__name__}, got {type(client).__name__}"
        )
