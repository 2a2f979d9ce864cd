"""Guard AutoGen tools (``autogen_core.tools``) with the Kynara daemon.

``guard_tool(tool, action, ...)`` returns a ``GuardedTool``: a ``BaseTool``
with the wrapped tool's name, description and argument schema, for
``AssistantAgent(tools=[...])``, a ``StaticWorkbench`` or a direct
``run_json``. Each call first validates the arguments against the tool's
own argument model, then asks the daemon (``ToolGuard.acheck``) on the
tool's name and those parsed arguments (defaults applied); the wrapped tool
runs only on allow. AutoGen runs tools as coroutines (a ``FunctionTool``
over a plain function runs it in a thread), so the check is always the
awaited one and takes an ``AsyncClient``.

Where the decision goes:

- Exception: a refused call raises ``ToolRefused`` (a ``KynaraError``) whose
  text is ``Verdict.message()`` and which carries ``decision_id``, ``code``,
  ``verdict`` and, for require_approval, ``approval_id`` and
  ``approval_url``; its ``__cause__`` is the SDK error behind it. AutoGen's
  workbench turns a tool's exception into an error
  ``FunctionExecutionResult`` whose content is the exception's text, so the
  model reads why the tool did not run (and where to get it approved).
- Trace: every decision is logged at INFO on AutoGen's event logger
  (``autogen_core.EVENT_LOGGER_NAME``) as a ``DecisionEvent``, a JSON line
  in the style of AutoGen's own ``ToolCallEvent`` holding
  ``Verdict.metadata()`` plus the tool call's ``call_id`` and ``agent_id``.
  ``on_decision`` (a function or coroutine function) receives the same event
  before the tool runs; if it raises, the tool does not run.
- Tool result: no room. AutoGen's ``FunctionExecutionResult`` and
  ``ToolResult`` carry only the content text, an error flag and the call's
  name and id, and the agent, not the tool, fills the events' ``metadata``.
  The trace event's ``call_id`` is the result's ``call_id``: that ties a
  result in the conversation to its decision.

Fail closed: the tool runs only on allow, or when ``fail_open=True`` lets a
call through that got no answer (logged on ``kynara_sdk.guard``, and the
event says ``failed_open``).

Streaming: a guarded ``BaseStreamTool`` (any ``StreamTool``) is a
``GuardedTool`` that is itself a stream tool: ``run_json_stream`` checks the
call first (a refusal raises ``ToolRefused`` before the first item, so
``StaticStreamWorkbench`` and ``AssistantAgent`` yield it as the error
result the model reads, and the tool's stream never starts), then passes
each intermediate result through as the wrapped tool yields it.

Saving: a ``GuardedTool`` is an AutoGen component. ``dump_component()``
saves the wrapped tool's own component and the guard's settings (action,
resource_kind, resource_arg, attrs, context, on_approval,
approval_timeout, fail_open), so ``AssistantAgent.dump_component()`` of an
agent holding guarded tools, loaded back with ``load_component``, holds
guarded tools again. Not saved: the client objects and the callbacks
(``client``, ``async_client``, ``on_wait``, ``on_decision``). A loaded
tool asks the shared client for ``$KYNARA_TARGET`` (and
``$KYNARA_TRANSPORT``), so set those where the config is loaded; its
decisions still go to the event logger. A wrapped tool that cannot be
saved makes the dump fail (``TypeError`` for a tool with no
``dump_component``, AutoGen's own error for a ``BaseTool`` without a
config), so an unguarded copy is never written.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from typing import Any, Literal, Unpack

try:
    from autogen_core import (
        EVENT_LOGGER_NAME,
        CancellationToken,
        Component,
        ComponentModel,
        MessageHandlerContext,
    )
    from autogen_core.tools import BaseStreamTool, BaseTool, StreamTool, Tool
    from pydantic import BaseModel
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "kynara_sdk.integrations.autogen needs autogen-core, which is not"
        f" installed ({err}): pip install 'kynara-sdk[autogen]' (from a"
        " checkout: pip install './clients/python[autogen]')"
    ) from err

from kynara_sdk.decorator import (
    DEFAULT_APPROVAL_TIMEOUT,
)
from kynara_sdk.errors import KynaraError
from kynara_sdk.guard import GuardOptions, ToolGuard, Verdict

__all__ = [
    "DecisionEvent",
    "GuardedStreamTool",
    "GuardedTool",
    "GuardedToolConfig",
    "OnDecision",
    "ToolRefused",
    "guard_tool",
]

event_logger = logging.getLogger(EVENT_LOGGER_NAME)


class ToolRefused(KynaraError):
    """A guarded tool did not run; its text is what the model reads.

    Attributes:
        verdict: the guard's ``Verdict``.
        code: the error code (``permission_denied``, ``approval_required``,
            ``daemon_unreachable``, ...).
        decision_id: the audit record's id, or "" when no answer came.
        approval_id, approval_url: the pending approval's, or "".
    """

    def __init__(self, verdict: Verdict) -> None:
        if verdict.error is None or verdict.allowed:
            raise ValueError(f"ToolRefused: {verdict.tool} was allowed to run")
        self.verdict = verdict
        self.decision_id = verdict.decision_id
        approval = verdict.metadata()["approval"] or {}
        self.approval_id = approval.get("id", "")
        self.approval_url = approval.get("url", "")
        super().__init__(verdict.error.code, verdict.message())

    def _render(self) -> str:
        return self.message

    def __reduce__(self):
        return (self.__class__, (self.verdict,))


class DecisionEvent:
    """One guard decision, logged on AutoGen's event logger.

    ``kwargs`` is plain JSON-able data: ``type`` ("KynaraDecision"),
    ``Verdict.metadata()`` (tool, action, decision, decision_id,
    reason_code, reason, approval, error, failed_open), ``call_id`` (the
    model's tool call id, or "") and ``agent_id`` (the AutoGen agent, when
    run inside one's message handler, else None). ``str()`` is its JSON.
    """

    def __init__(self, verdict: Verdict, call_id: str | None) -> None:
        self.verdict = verdict
        self.call_id = call_id or ""
        try:
            agent_id: str | None = str(MessageHandlerContext.agent_id())
        except RuntimeError:  # not inside an agent's message handler
            agent_id = None
        self.kwargs: dict[str, Any] = {
            "type": "KynaraDecision",
            **verdict.metadata(),
            "call_id": self.call_id,
            "agent_id": agent_id,
        }

    def __str__(self) -> str:
        return json.dumps(self.kwargs)


OnDecision = Callable[[DecisionEvent], Any | Awaitable[Any]]


class GuardedToolConfig(BaseModel):
    """What ``GuardedTool.dump_component`` saves: the wrapped tool's own
    component and the guard's settings, as ``guard_tool`` takes them
    (``attrs`` and ``context`` as request name to argument name). No client
    and no callback: a loaded tool uses the shared client for
    ``$KYNARA_TARGET``."""

    tool: ComponentModel
    action: str
    resource_kind: str
    resource_arg: str | None = None
    attrs: dict[str, str] = {}
    context: dict[str, str] = {}
    on_approval: Literal["raise", "wait"] = "raise"
    approval_timeout: float = DEFAULT_APPROVAL_TIMEOUT
    fail_open: bool = False


class GuardedTool(BaseTool[BaseModel, BaseModel], Component[GuardedToolConfig]):
    """``tool`` behind ``guard``: same name, description and schema; runs
    only when the daemon allows the call. A stream tool (``StreamTool``)
    makes a ``GuardedStreamTool``, which streams after the check.

    Args:
        tool: any AutoGen ``Tool`` (``FunctionTool``, a ``BaseTool``
            subclass, ...).
        guard: the ``ToolGuard`` deciding its calls.
        on_decision: told of each ``DecisionEvent`` before the tool runs.

    Raises:
        TypeError: ``tool`` is not an AutoGen tool, or ``guard`` not a
            ``ToolGuard``.
    """

    component_type = "tool"
    component_config_schema = GuardedToolConfig
    # One provider for both classes: loading picks the stream one again
    # when the wrapped tool streams.
    component_provider_override = "kynara_sdk.integrations.autogen.GuardedTool"

    def __new__(cls, tool: Tool, *args: Any, **kwargs: Any) -> GuardedTool:
        if cls is GuardedTool and isinstance(tool, StreamTool):
            cls = GuardedStreamTool
        return super().__new__(cls)

    def __init__(
        self, tool: Tool, guard: ToolGuard, on_decision: OnDecision | None = None
    ) -> None:
        if not isinstance(tool, Tool):
            raise TypeError(
                f"guard_tool: expected an autogen_core.tools Tool, got"
                f" {type(tool).__name__}"
            )
        if not isinstance(guard, ToolGuard):
            raise TypeError(f"guard: expected a ToolGuard, got {type(guard).__name__}")
        if on_decision is not None and not callable(on_decision):
            raise TypeError(f"on_decision: expected a callable, got {on_decision!r}")
        super().__init__(
            tool.args_type(),
            tool.return_type(),
            tool.name,
            tool.description,
            strict=bool(tool.schema.get("strict", False)),
        )
        self.tool = tool
        self.guard = guard
        self._on_decision = on_decision

    @property
    def schema(self):  # the wrapped tool's, unchanged
        return self.tool.schema

    async def run_json(
        self,
        args: Mapping[str, Any],
        cancellation_token: CancellationToken,
        call_id: str | None = None,
    ) -> Any:
        """Check the call, then run the wrapped tool's ``run_json``.

        Raises:
            pydantic.ValidationError: ``args`` do not fit the tool's
                arguments (nothing was asked).
            ToolRefused: the daemon did not allow the call.
        """
        parsed = self._args_type.model_validate(args)
        await self.check(parsed.model_dump(), call_id)
        return await self.tool.run_json(args, cancellation_token, call_id=call_id)

    async def run(self, args: BaseModel, cancellation_token: CancellationToken) -> Any:
        """Check the call, then run the wrapped tool on parsed ``args``."""
        arguments = args.model_dump()
        await self.check(arguments, None)
        if isinstance(self.tool, BaseTool):
            return await self.tool.run(args, cancellation_token)
        return await self.tool.run_json(arguments, cancellation_token)

    async def check(self, arguments: Mapping[str, Any], call_id: str | None) -> Verdict:
        """Ask the daemon about one call with parsed ``arguments``, record
        the decision, and return the verdict on allow.

        Raises:
            ToolRefused: the tool may not run.
        """
        verdict = await self.guard.acheck(self.name, arguments)
        event = DecisionEvent(verdict, call_id)
        event_logger.info(event)
        if self._on_decision is not None:
            told = self._on_decision(event)
            if inspect.isawaitable(told):
                await told
        if not verdict.allowed:
            raise ToolRefused(verdict) from verdict.error
        return verdict

    def return_value_as_string(self, value: Any) -> str:
        return self.tool.return_value_as_string(value)

    def state_type(self) -> type[BaseModel] | None:
        return self.tool.state_type()

    async def save_state_json(self) -> Mapping[str, Any]:
        return await self.tool.save_state_json()

    async def load_state_json(self, state: Mapping[str, Any]) -> None:
        await self.tool.load_state_json(state)

    def _to_config(self) -> GuardedToolConfig:
        """The wrapped tool's component and the guard's settings.

        Raises:
            TypeError: the wrapped tool is not an AutoGen component, so it
                cannot be saved (and the guard is not saved without it).
        """
        dump = getattr(self.tool, "dump_component", None)
        if not callable(dump):
            raise TypeError(
                f"GuardedTool {self.name!r}: the wrapped"
                f" {type(self.tool).__name__} is not an AutoGen component"
                " (no dump_component), so it cannot be saved"
            )
        return GuardedToolConfig(tool=dump(), **self.guard.settings())

    @classmethod
    def _from_config(cls, config: GuardedToolConfig) -> GuardedTool:
        """The saved tool behind a guard with the saved settings and the
        shared client (checked as ``guard_tool`` checks them).

        Raises:
            TypeError, ValueError: a saved setting is wrong, or a mapped
                argument is not among the loaded tool's.
        """
        tool = BaseTool.load_component(config.tool)
        return guard_tool(
            tool,
            config.action,
            resource_kind=config.resource_kind,
            resource_arg=config.resource_arg,
            attrs=config.attrs,
            context=config.context,
            on_approval=config.on_approval,
            approval_timeout=config.approval_timeout,
            fail_open=config.fail_open,
        )


class GuardedStreamTool(GuardedTool, BaseStreamTool[BaseModel, BaseModel, BaseModel]):
    """A guarded stream tool: the check runs before the stream starts, then
    each of the wrapped tool's intermediate results passes through as it
    comes, ending with its final value (as ``BaseStreamTool`` does).
    ``guard_tool`` and ``GuardedTool(...)`` make one for a ``StreamTool``.
    """

    async def run_json_stream(
        self,
        args: Mapping[str, Any],
        cancellation_token: CancellationToken,
        call_id: str | None = None,
    ) -> AsyncGenerator[Any, None]:
        """Check the call, then yield what the wrapped tool's
        ``run_json_stream`` yields.

        Raises:
            pydantic.ValidationError: ``args`` do not fit the tool's
                arguments (nothing was asked).
            ToolRefused: the daemon did not allow the call; raised before
                the first item, and the wrapped stream never starts.
        """
        parsed = self._args_type.model_validate(args)
        await self.check(parsed.model_dump(), call_id)
        stream = self.tool.run_json_stream(args, cancellation_token, call_id=call_id)
        async for item in stream:
            yield item

    async def run_stream(
        self, args: BaseModel, cancellation_token: CancellationToken
    ) -> AsyncGenerator[Any, None]:
        """Check the call, then yield the wrapped tool's stream on parsed
        ``args``."""
        arguments = args.model_dump()
        await self.check(arguments, None)
        if isinstance(self.tool, BaseStreamTool):
            stream = self.tool.run_stream(args, cancellation_token)
        else:
            stream = self.tool.run_json_stream(arguments, cancellation_token)
        async for item in stream:
            yield item


def guard_tool(
    tool: Tool,
    action: str,
    *,
    resource_kind: str,
    on_decision: OnDecision | None = None,
    **options: Unpack[GuardOptions],
) -> GuardedTool:
    """``tool`` guarded by the daemon for ``action``; ``options`` are
    ``ToolGuard``'s and the arguments map to the request as there (and in
    ``@permission_required``). AutoGen runs tools as coroutines, so the
    check is the awaited one: ``async_client`` defaults to the shared one
    for ``$KYNARA_TARGET``, and a sync ``client`` is refused.

    Raises:
        TypeError, ValueError: a setting is wrong (checked here, not at the
            first call).
    """
    if options.get("client") is not None:
        raise TypeError(
            "guard_tool: AutoGen runs tools as coroutines; pass async_client="
            "AsyncClient(...), not client="
        )
    guard = ToolGuard(action, resource_kind=resource_kind, **options)
    guard.check_arguments(tool.name, set(tool.args_type().model_fields))
    return GuardedTool(tool, guard, on_decision)
