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
its own ``max_usage_count``: only calls that run count against it, and
once it is used up a call is refused as the tool refuses it, without
asking the daemon.

Checkpoints: a guarded tool is part of CrewAI's checkpoints (its
``model_dump``) with the tool it guards and the guard's settings, and
``Crew.from_checkpoint`` restores it guarded: the guard is built again on
the restored tool's first call. The tool it guards is kept as CrewAI keeps
tools (a ``BaseTool`` subclass by its fields and class), or, for a
``@tool`` function, by where it is defined (it must be a module's
attribute). A client given to ``guard_tool`` is kept by its target,
transport (the one it settled on, once a call reached the daemon) and
timeout; the restored one reads its credential from
``$KYNARA_AGENT_SECRET_FILE``; no client, the shared default again.
``on_wait`` and ``on_decision`` are kept as dotted paths when they are
module-level functions, and come back as CrewAI restores callbacks: only
with ``CREWAI_DESERIALIZE_CALLBACKS=1``. A restored tool whose guard cannot
be built again in full (a lambda or a bound method as a callback, a
``@tool`` made inside a function, a callback not allowed back) fails
closed: every call is refused with ``guard_not_restored``, naming what was
missing, and the body does not run; guard the tool again then. A
checkpoint is trusted data: who can edit it can change the guard, as they
could swap the tool itself.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import sys
import threading
from collections.abc import Callable
from typing import Any, Literal, Unpack

from kynara_sdk.client import AsyncClient, Client
from kynara_sdk.errors import APPROVAL_REQUIRED, KynaraError
from kynara_sdk.guard import NO_ANSWER_CODES, GuardOptions, ToolGuard, Verdict

try:
    from crewai.events.base_events import BaseEvent
    from crewai.events.event_bus import crewai_event_bus
    from crewai.tools import BaseTool
    from crewai.tools.base_tool import Tool
    from crewai.tools.tool_failure import ToolFailure, ToolFailureReason
    from crewai.types.callback import string_to_callable
    from pydantic import Field, PrivateAttr, TypeAdapter, field_serializer
except ImportError as err:  # pragma: no cover - depends on the install
    raise ImportError(
        "kynara_sdk.integrations.crewai needs crewai, which is not installed"
        f" ({err}): pip install 'kynara-sdk[crewai]'"
    ) from err

__all__ = [
    "GUARD_NOT_RESTORED",
    "METADATA_KEY",
    "GuardedTool",
    "KynaraDecisionEvent",
    "guard_tool",
]

# The key of the verdict's metadata in a refusal's ToolFailure.details.
METADATA_KEY = "kynara"

# The error code of a call refused because the tool came back from a
# checkpoint without all of its guard.
GUARD_NOT_RESTORED = "guard_not_restored"

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
    on_decision: OnDecision | None = None,
    **options: Unpack[GuardOptions],
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
    guard = ToolGuard(action, resource_kind=resource_kind, **options)
    guard.check_arguments(tool.name, set(tool.args_schema.model_fields))
    settings = {name: getattr(tool, name) for name in _COPIED_FIELDS}
    kept = {
        **guard.settings(),
        "client": _client_settings(options.get("client")),
        "async_client": _client_settings(options.get("async_client")),
        "on_wait": _callable_path(options.get("on_wait")),
        "on_decision": _callable_path(on_decision),
    }
    guarded = GuardedTool(
        **settings, cache_function=_never_cache, kynara_tool=tool, kynara_guard=kept
    )
    guarded._tool = tool
    guarded._guard = guard
    guarded._on_decision = on_decision
    return guarded


class GuardedTool(BaseTool):
    """A CrewAI tool whose calls the daemon decides before they run.

    Made by ``guard_tool``; see the module's docstring for where the
    decision goes.
    """

    # What a checkpoint keeps (see the module's docstring): the tool guarded
    # and the guard's settings, from which a restored tool builds its guard.
    kynara_tool: Any = Field(default=None, repr=False)
    kynara_guard: dict[str, Any] = Field(default_factory=dict, repr=False)

    _tool: BaseTool | None = PrivateAttr(default=None)
    _guard: ToolGuard | None = PrivateAttr(default=None)
    _on_decision: OnDecision | None = PrivateAttr(default=None)
    _restoring: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    def model_post_init(self, context: Any) -> None:
        super().model_post_init(context)
        # Never cached, even where a checkpoint's cache function is dropped.
        self.cache_function = _never_cache

    @field_serializer("kynara_tool", when_used="json")
    def _keep_tool(self, tool: Any) -> Any:
        if isinstance(tool, Tool):
            return {"ref": _tool_path(tool)}
        if isinstance(tool, BaseTool):
            return tool.model_dump(mode="json")
        return tool  # as restored, not yet used

    @property
    def wrapped(self) -> BaseTool:
        """The tool guarded.

        Raises:
            RuntimeError: restored from a checkpoint without it.
        """
        self._raise_unrestored()
        return self._tool  # type: ignore[return-value]

    @property
    def guard(self) -> ToolGuard:
        """The check each call makes first.

        Raises:
            RuntimeError: restored from a checkpoint without it.
        """
        self._raise_unrestored()
        return self._guard  # type: ignore[return-value]

    def _run(self, *args: Any, **kwargs: Any) -> Any:
        arguments = self._arguments(args, kwargs)
        if (spent := self._spent()) is not None:
            return spent
        verdict = self._unrestored() or self._guard.check(self.name, arguments)
        self._note(verdict, arguments)
        if not verdict.allowed:
            return _refusal(verdict)
        return self._tool.run(**arguments)

    async def _arun(self, *args: Any, **kwargs: Any) -> Any:
        arguments = self._arguments(args, kwargs)
        if (spent := self._spent()) is not None:
            return spent
        verdict = self._unrestored() or await self._guard.acheck(self.name, arguments)
        self._note(verdict, arguments)
        if not verdict.allowed:
            return _refusal(verdict)
        if _has_async_body(self._tool):
            return await self._tool.arun(**arguments)
        # A sync body must not block the event loop.
        return await asyncio.to_thread(self._tool.run, **arguments)

    def _spent(self) -> ToolFailure | None:
        """The wrapped tool's usage-limit failure when its
        ``max_usage_count`` is used up, so that a call that cannot run is
        not asked about (no allow audited, no approval grant spent)."""
        tool = self._tool
        if tool is None or tool.max_usage_count is None:
            return None
        if tool.current_usage_count < tool.max_usage_count:
            return None
        return ToolFailure(
            message=(
                f"Tool {tool.name!r} has reached its usage limit of"
                f" {tool.max_usage_count} times and cannot be used anymore."
            ),
            reason=ToolFailureReason.USAGE_LIMIT,
        )

    def _unrestored(self) -> Verdict | None:
        """None when the guard is there (built again from the kept settings
        on a restored tool's first call); else the refusal that says why it
        cannot be. Asked again on each call, as a callback may be allowed
        back in the meantime."""
        if self._guard is not None:
            return None
        with self._restoring:
            if self._guard is not None:
                return None
            try:
                self._restore()
            except Exception as err:  # any failure must keep the tool closed
                action = str(self.kynara_guard.get("action", ""))
                why = (
                    f"tool {self.name!r} came back from a checkpoint without its"
                    f" guard ({type(err).__name__}: {err}); guard the tool again"
                )
                return Verdict(
                    self.name, action, None, KynaraError(GUARD_NOT_RESTORED, why)
                )
        return None

    def _raise_unrestored(self) -> None:
        refused = self._unrestored()
        if refused is not None:
            raise RuntimeError(refused.error.message)  # type: ignore[union-attr]

    def _restore(self) -> None:
        kept = self.kynara_guard
        if not kept:
            raise ValueError("no guard settings (not made by guard_tool)")
        tool = _restore_tool(self.kynara_tool)
        if tool.name != self.name:
            raise ValueError(f"the tool kept is {tool.name!r}, not {self.name!r}")
        guard = ToolGuard(
            kept["action"],
            resource_kind=kept["resource_kind"],
            resource_arg=kept["resource_arg"],
            attrs=kept["attrs"],
            context=kept["context"],
            client=_restore_client(Client, kept["client"]),
            async_client=_restore_client(AsyncClient, kept["async_client"]),
            on_approval=kept["on_approval"],
            approval_timeout=kept["approval_timeout"],
            on_wait=_restore_callable(kept["on_wait"], "on_wait"),
            fail_open=kept["fail_open"],
        )
        guard.check_arguments(tool.name, set(tool.args_schema.model_fields))
        self._on_decision = _restore_callable(kept["on_decision"], "on_decision")
        self._tool = tool
        self.kynara_tool = tool
        self._guard = guard  # last: its presence says the rest is there

    def format_output_for_agent(self, raw_result: Any) -> str:
        """The text the agent sees, as the wrapped tool renders it."""
        if self._tool is None:
            return super().format_output_for_agent(raw_result)
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


def _module_path(obj: Any, module: str, qualname: str) -> str | None:
    """``module.qualname`` when that names ``obj`` itself, else None."""
    found: Any = sys.modules.get(module)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    return f"{module}.{qualname}" if found is obj else None


def _tool_path(tool: Tool) -> str | None:
    # A @tool function is the module's attribute of its function's name.
    func = tool.func
    module = getattr(func, "__module__", None)
    qualname = getattr(func, "__qualname__", None)
    if not module or not qualname:
        return None
    return _module_path(tool, module, qualname)


def _callable_path(fn: Callable | None) -> dict[str, str | None] | None:
    """How a checkpoint keeps a callback: a module-level function by its
    dotted path, anything else as not restorable (path None)."""
    if fn is None:
        return None
    path = None
    if inspect.isfunction(fn):
        path = _module_path(fn, fn.__module__, fn.__qualname__)
    what = f"{type(fn).__name__} {getattr(fn, '__qualname__', '')}".strip()
    return {"path": path, "what": what}


def _restore_callable(kept: dict[str, Any] | None, name: str) -> Callable | None:
    if kept is None:
        return None
    if kept["path"] is None:
        raise ValueError(
            f"{name} ({kept['what']}) is not a module-level function, so a"
            " checkpoint does not keep it"
        )
    # CrewAI's own rule for callbacks in checkpoints (opt-in by env var).
    return string_to_callable(kept["path"])


_TOOLS = TypeAdapter(list[BaseTool])


def _restore_tool(kept: Any) -> BaseTool:
    if isinstance(kept, BaseTool):
        return kept
    if isinstance(kept, dict) and "tool_type" in kept:
        # As CrewAI restores an agent's tools (a list of BaseTool: its
        # validator finds the class by tool_type).
        [tool] = _TOOLS.validate_python([kept])
        return tool
    if isinstance(kept, dict) and "ref" in kept:
        path = kept["ref"]
        if path is None:
            raise ValueError(
                "the tool guarded is a @tool function that is not a module's"
                " attribute, so a checkpoint does not keep it"
            )
        module, _, name = path.rpartition(".")
        found = getattr(importlib.import_module(module), name, None)
        if not isinstance(found, BaseTool):
            raise ValueError(f"{path} is not a CrewAI tool")
        return found
    raise ValueError(f"no tool guarded kept (got {type(kept).__name__})")


def _client_settings(client: Client | AsyncClient | None) -> dict[str, Any] | None:
    if client is None:
        return None
    return {
        "target": client.target,
        "transport": client.transport,
        "timeout": client.timeout,
    }


# Clients made for restored tools, one per kind and settings, shared.
_restored_clients: dict[tuple, Client | AsyncClient] = {}
_restored_lock = threading.Lock()


def _restore_client(
    kind: type[Client] | type[AsyncClient], kept: dict[str, Any] | None
) -> Any:
    if kept is None:
        return None
    key = (kind, kept["target"], kept["transport"], kept["timeout"])
    with _restored_lock:
        if key not in _restored_clients:
            _restored_clients[key] = kind(
                kept["target"], transport=kept["transport"], timeout=kept["timeout"]
            )
        return _restored_clients[key]


def _never_cache(_arguments: Any = None, _result: Any = None) -> bool:
    return False


def _has_async_body(tool: BaseTool) -> bool:
    # As CrewAI tells: a Tool's function is a coroutine function, or a tool
    # class overrides _arun. Another Tool's _arun would call a sync function
    # and then fail, so it is run with run() in a thread instead.
    if isinstance(tool, Tool):
        return inspect.iscoroutinefunction(tool.func)
    return type(tool)._arun is not BaseTool._arun
