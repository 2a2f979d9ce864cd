"""Guard CrewAI tools: the daemon decides before a tool's body runs.

``guard_tool(tool, action, resource_kind=..., ...)`` turns any CrewAI tool
(a ``crewai.tools.BaseTool`` subclass, or a function made a tool with
``@tool``) into a ``GuardedTool`` with the same name, description, argument
schema and result schema, for an ``Agent``'s ``tools``. CrewAI parses and
validates a call's arguments with that schema; the parsed arguments then go
to ``kynara_sdk.guard.ToolGuard`` (mapped by ``resource_arg``, ``attrs`` and
``context`` as ``@permission_required`` maps a function's), and the wrapped
tool runs only on allow. Agents call a tool synchronously (a ReAct text
step through ``_run``, a native function call through ``run``), and the
guard asks with the sync client; ``await tool.arun(...)`` asks with the
async client and awaits the wrapped tool's own async body where it has one
(a sync body then runs in a thread).

Where the decision goes:

- The model: a refused call returns a ``crewai.tools.ToolFailure`` instead
  of running, which CrewAI shows the model as the tool's result:
  ``Verdict.message()`` (the reason and decision id, the review URL of a
  require_approval, or the error code of a call that got no answer)
  followed by ``(code: <error code>)``. CrewAI records it as a failed tool
  call, not as an error: it does not retry the call.
- The tool result's metadata: that ``ToolFailure``'s ``details["kynara"]``
  is ``Verdict.metadata()`` (decision, decision_id, reason_code, approval,
  error, failed_open); CrewAI puts it on ``TaskOutput.tool_failures``, on
  ``ToolFailureDetectedEvent`` and on ``ToolUsageFinishedEvent.failure``.
  An allowed call returns the tool's own result, which CrewAI turns into
  text: it has no room for metadata (the trace below has the decision).
- The exception: with ``tool_failure_policy="raise"`` (on the tool, agent,
  task or crew) a refusal ends the run with CrewAI's
  ``ToolExecutionFailedError``, whose ``record.failure.details["kynara"]``
  has the decision id. CrewAI raises nothing of the SDK's own.
- The trace: every guarded call, allowed or not, emits a
  ``KynaraDecisionEvent`` on CrewAI's event bus before the body would
  start (listen with ``crewai_event_bus.on(KynaraDecisionEvent)``; CrewAI
  runs such handlers in its own threads, ``crewai_event_bus.flush()``
  waits for them), and calls ``on_decision`` with the same event in the
  caller's thread.

A guarded tool is never served from CrewAI's tool cache (its
``cache_function`` says no), so every call is decided and audited, and a
refusal is not replayed after a reviewer approved. The wrapped tool keeps
its own ``max_usage_count``: only calls that run count against it.

TODO(#10): the wrapped tool and its guard are not part of CrewAI's
serialized form of a tool (``model_dump``, as its checkpoints use), so a
guarded tool is not restored from one with them: guard the tools again
after a restore. Untested with CrewAI's checkpoints.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import Any, Literal

from kynara_sdk.client import AsyncClient, Client
from kynara_sdk.decorator import (
    DEFAULT_APPROVAL_TIMEOUT,
    ArgumentMap,
    OnApproval,
    OnWait,
)
from kynara_sdk.errors import APPROVAL_REQUIRED
from kynara_sdk.guard import NO_ANSWER_CODES, ToolGuard, Verdict

try:
    from crewai.events.base_events import BaseEvent
    from crewai.events.event_bus import crewai_event_bus
    from crewai.tools import BaseTool
    from crewai.tools.base_tool import Tool
    from crewai.tools.tool_failure import ToolFailure
    from pydantic import PrivateAttr
except ImportError as err:  # pragma: no cover - depends on the install
    raise ImportError(
        "kynara_sdk.integrations.crewai needs crewai, which is not installed"
        f" ({err}): pip install 'kynara-sdk[crewai]'"
    ) from err

__all__ = ["METADATA_KEY", "GuardedTool", "KynaraDecisionEvent", "guard_tool"]

# The key of the verdict's metadata in a refusal's ToolFailure.details.
METADATA_KEY = "kynara"

# The BaseTool settings a guarded tool takes over from the tool it guards,
# so that the model sees the same tool and CrewAI handles it the same way.
_COPIED_FIELDS = (
    "name",
    "description",
    "args_schema",
    "result_schema",
    "env_vars",
    "result_as_answer",
    "tool_failure_policy",
)


class KynaraDecisionEvent(BaseEvent):
    """What the daemon decided on one guarded tool call, for the trace.

    The fields are ``Verdict.metadata()``'s (``tool`` is ``tool_name``),
    with the call's parsed arguments and whether the tool runs.
    """

    type: Literal["kynara_tool_decision"] = "kynara_tool_decision"
    tool_name: str
    tool_args: dict[str, Any]
    action: str
    allowed: bool
    decision: str
    decision_id: str
    reason_code: str
    reason: str
    approval: dict[str, str] | None = None
    error: str
    failed_open: bool


OnDecision = Callable[[KynaraDecisionEvent], None]


def guard_tool(
    tool: BaseTool,
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
    on_decision: OnDecision | None = None,
) -> GuardedTool:
    """Wrap ``tool`` so that the daemon decides each call before it runs.

    Args:
        tool: any CrewAI ``BaseTool`` (``@tool`` functions are ``Tool``s).
        action: dotted action name, e.g. ``payments.refund.issue``.
        resource_kind, resource_arg, attrs, context, client, async_client,
        on_approval, approval_timeout, on_wait, fail_open: as
            ``kynara_sdk.guard.ToolGuard``; the names in ``resource_arg``,
            ``attrs`` and ``context`` are the tool's argument names.
        on_decision: called with each call's ``KynaraDecisionEvent`` before
            the body would start, in the calling thread; if it raises, the
            error propagates and the body does not run.

    Returns:
        A ``GuardedTool`` with the tool's name, description and schemas.

    Raises:
        TypeError: ``tool`` is not a CrewAI ``BaseTool``, ``on_decision`` is
            not callable, or a ``ToolGuard`` setting is of the wrong type.
        ValueError: a mapped argument is not one of the tool's arguments,
            or a ``ToolGuard`` setting is out of range.
    """
    if not isinstance(tool, BaseTool):
        raise TypeError(
            f"guard_tool: expected a CrewAI BaseTool, got {type(tool).__name__}"
            " (make a function a tool with crewai.tools.tool first)"
        )
    if on_decision is not None and not callable(on_decision):
        raise TypeError(f"on_decision: expected a callable, got {on_decision!r}")
    guard = ToolGuard(
        action,
        resource_kind=resource_kind,
        resource_arg=resource_arg,
        attrs=attrs,
        context=context,
        client=client,
        async_client=async_client,
        on_approval=on_approval,
        approval_timeout=approval_timeout,
        on_wait=on_wait,
        fail_open=fail_open,
    )
    guard.check_arguments(tool.name, set(tool.args_schema.model_fields))
    settings = {name: getattr(tool, name) for name in _COPIED_FIELDS}
    guarded = GuardedTool(**settings, cache_function=_never_cache)
    guarded._tool = tool
    guarded._guard = guard
    guarded._on_decision = on_decision
    return guarded


class GuardedTool(BaseTool):
    """A CrewAI tool whose calls the daemon decides before they run.

    Made by ``guard_tool``; see the module's docstring for where the
    decision goes.
    """

    _tool: BaseTool = PrivateAttr()
    _guard: ToolGuard = PrivateAttr()
    _on_decision: OnDecision | None = PrivateAttr(default=None)

    @property
    def wrapped(self) -> BaseTool:
        """The tool guarded."""
        return self._tool

    @property
    def guard(self) -> ToolGuard:
        """The check each call makes first."""
        return self._guard

    def _run(self, *args: Any, **kwargs: Any) -> Any:
        arguments = self._arguments(args, kwargs)
        verdict = self._guard.check(self.name, arguments)
        self._note(verdict, arguments)
        if not verdict.allowed:
            return _refusal(verdict)
        return self._tool.run(**arguments)

    async def _arun(self, *args: Any, **kwargs: Any) -> Any:
        arguments = self._arguments(args, kwargs)
        verdict = await self._guard.acheck(self.name, arguments)
        self._note(verdict, arguments)
        if not verdict.allowed:
            return _refusal(verdict)
        if _has_async_body(self._tool):
            return await self._tool.arun(**arguments)
        # A sync body must not block the event loop.
        return await asyncio.to_thread(self._tool.run, **arguments)

    def format_output_for_agent(self, raw_result: Any) -> str:
        """The text the agent sees, as the wrapped tool renders it."""
        return self._tool.format_output_for_agent(raw_result)

    def _arguments(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        # CrewAI calls with keywords; a direct positional call is matched to
        # the schema's fields in order.
        if not args:
            return dict(kwargs)
        names = list(self.args_schema.model_fields)
        if len(args) > len(names):
            raise TypeError(
                f"tool {self.name!r} takes {len(names)} arguments"
                f" ({', '.join(names) or 'none'}), got {len(args)} positional"
            )
        return {**dict(zip(names, args, strict=False)), **kwargs}

    def _note(self, verdict: Verdict, arguments: dict[str, Any]) -> None:
        metadata = verdict.metadata()
        metadata.pop("tool")
        event = KynaraDecisionEvent(
            tool_name=self.name,
            tool_args=arguments,
            allowed=verdict.allowed,
            **metadata,
        )
        if self._on_decision is not None:
            self._on_decision(event)
        crewai_event_bus.emit(self, event)


def _refusal(verdict: Verdict) -> ToolFailure:
    code = verdict.error.code if verdict.error is not None else ""
    return ToolFailure(
        message=verdict.message(),
        code=code,
        # Asking again can help once a reviewer approved, or once the
        # daemon answers again; a deny stands.
        retryable=code == APPROVAL_REQUIRED or code in NO_ANSWER_CODES,
        details={METADATA_KEY: verdict.metadata()},
    )


def _never_cache(_arguments: Any = None, _result: Any = None) -> bool:
    return False


def _has_async_body(tool: BaseTool) -> bool:
    # As CrewAI tells: a Tool's function is a coroutine function, or a tool
    # class overrides _arun. Another Tool's _arun would call a sync function
    # and then fail, so it is run with run() in a thread instead.
    if isinstance(tool, Tool):
        return inspect.iscoroutinefunction(tool.func)
    return type(tool)._arun is not BaseTool._arun
