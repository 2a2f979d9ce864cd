"""Guard LangChain tools: the daemon decides before a tool's body runs.

``guard_tool(tool, action, resource_kind=..., ...)`` turns any LangChain
tool (a ``BaseTool`` subclass, a ``StructuredTool``, an ``@tool`` function)
into a ``GuardedTool`` with the same name, description and argument schema.
Each call is parsed and validated by the tool's own schema first; the parsed
arguments, the schema's defaults included (langchain-core 1.2.5 and later,
the extra's lower bound), then go to ``kynara_sdk.guard.ToolGuard`` (mapped
by ``resource_arg``, ``attrs`` and ``context`` as ``@permission_required``
maps a function's), and the tool's body runs only on allow. Sync calls
(``invoke``, ``run``) ask with the sync client, async ones (``ainvoke``,
``arun``) with the async client.

Where the decision goes:

- The model: a call made with a tool call (``tool.invoke(tool_call)``, as
  agent loops do) and refused gets a ``ToolMessage`` with ``status="error"``
  whose content is ``Verdict.message()`` (the reason, the review URL of a
  require_approval, or the error code of a call that got no answer).
- The tool result's metadata: the ``ToolMessage`` of every guarded tool call,
  allowed or refused, carries ``Verdict.metadata()`` (decision, decision_id,
  reason_code, approval, error, failed_open) under
  ``response_metadata["kynara"]``; it is not sent to a model. The
  ``artifact`` stays the tool's own. A call made without a tool call
  returns the tool's bare output, which has no room for it.
- The exception: a refused call made without a tool call (``tool.invoke(
  {...})``) raises the verdict's error, ``PermissionDenied``,
  ``ApprovalRequired`` or another ``KynaraError``, each with its
  ``decision_id`` where the daemon answered; callbacks see it in
  ``on_tool_error``.
- The trace: each guarded run dispatches the custom event
  ``"kynara_decision"`` (data: ``Verdict.metadata()`` and ``tool_call_id``)
  on its own run id, before the body starts; ``KynaraCallbackHandler``
  joins it to the run's ``on_tool_start`` record, and ``astream_events``
  and tracers see it as an ``on_custom_event``.

A refused call shows in callbacks as ``on_tool_error`` with the Kynara error
even when the model gets an error ``ToolMessage``: the tool did not run.
"""

from __future__ import annotations

import contextvars
import dataclasses
import inspect
import threading
from collections.abc import Callable, Mapping
from typing import Any, Unpack

from kynara_sdk.errors import KynaraError
from kynara_sdk.guard import GuardOptions, ToolGuard, Verdict

try:
    from langchain_core.callbacks import (
        AsyncCallbackManagerForToolRun,
        BaseCallbackHandler,
        CallbackManagerForToolRun,
        adispatch_custom_event,
        dispatch_custom_event,
    )
    from langchain_core.messages import ToolMessage
    from langchain_core.runnables import RunnableConfig
    from langchain_core.tools import BaseTool, StructuredTool, Tool
except ImportError as err:  # pragma: no cover - depends on the install
    raise ImportError(
        "kynara_sdk.integrations.langchain needs langchain-core, which is not"
        f" installed ({err}): pip install 'kynara-sdk[langchain]'"
    ) from err

__all__ = [
    "DECISION_EVENT",
    "METADATA_KEY",
    "GuardedTool",
    "KynaraCallbackHandler",
    "guard_tool",
]

# The custom event a guarded run dispatches with its verdict's metadata.
DECISION_EVENT = "kynara_decision"
# The key of the verdict's metadata in a ToolMessage's response_metadata.
METADATA_KEY = "kynara"

# How LangChain presents a single-input Tool without a schema to a model.
_SINGLE_INPUT_SCHEMA = {
    "type": "object",
    "properties": {"__arg1": {"title": "__arg1", "type": "string"}},
    "required": ["__arg1"],
}

# The BaseTool settings a guarded tool takes over from the tool it guards,
# so that it parses, reports and handles errors as that tool would.
_COPIED_FIELDS = (
    "name",
    "description",
    "args_schema",
    "return_direct",
    "verbose",
    "callbacks",
    "tags",
    "metadata",
    "handle_tool_error",
    "handle_validation_error",
    "response_format",
    "extras",
)


@dataclasses.dataclass(slots=True)
class _Call:
    """The guarded run in progress, shared between ``run`` and ``_run``
    through the context LangChain copies for ``_run``: its tool call id (for
    the decision event) and its verdict (so ``run`` can tell a refusal from
    an error of the tool's own)."""

    tool_call_id: str | None
    verdicts: list[Verdict] = dataclasses.field(default_factory=list)


_call: contextvars.ContextVar[_Call | None] = contextvars.ContextVar(
    "kynara_langchain_call", default=None
)


def guard_tool(
    tool: BaseTool,
    action: str,
    *,
    resource_kind: str,
    **options: Unpack[GuardOptions],
) -> GuardedTool:
    """Wrap ``tool`` so that the daemon decides each call before it runs.

    Args:
        tool: any LangChain ``BaseTool`` (``@tool`` functions are
            ``StructuredTool``s).
        action: dotted action name, e.g. ``payments.refund.issue``.
        resource_kind, resource_arg, attrs, context, client, async_client,
        on_approval, approval_timeout, on_wait, fail_open: as
            ``kynara_sdk.guard.ToolGuard``; the names in ``resource_arg``,
            ``attrs`` and ``context`` are the tool's argument names.

    Returns:
        A ``GuardedTool`` with the tool's name, description and schema.

    Raises:
        TypeError: ``tool`` is not a ``BaseTool``, or a ``ToolGuard``
            setting is of the wrong type.
        ValueError: a mapped argument is not one of the tool's arguments,
            or a ``ToolGuard`` setting is out of range.
    """
    if not isinstance(tool, BaseTool):
        raise TypeError(
            f"guard_tool: expected a LangChain BaseTool, got {type(tool).__name__}"
            " (wrap a function with langchain_core.tools.tool first)"
        )
    guard = ToolGuard(action, resource_kind=resource_kind, **options)
    guard.check_arguments(tool.name, set(tool.args))
    settings = {
        name: getattr(tool, name) for name in _COPIED_FIELDS if hasattr(tool, name)
    }
    return GuardedTool(tool=tool, guard=guard, **settings)


class GuardedTool(BaseTool):
    """A LangChain tool whose calls the daemon decides before they run.

    Made by ``guard_tool``. It parses its input with the wrapped tool's own
    parser and schema, asks ``guard`` about the parsed arguments, and then
    runs the wrapped tool's body in this same run (one ``on_tool_start`` per
    call, with the wrapped tool's name). See the module's docstring for
    where the decision goes.
    """

    tool: BaseTool
    """The tool guarded."""
    guard: ToolGuard
    """The check each call makes first."""

    # The schema and parsing are the wrapped tool's own, so the model sees
    # the same tool and the body gets what it would get unguarded.

    @property
    def args(self) -> dict[str, Any]:
        """The wrapped tool's arguments."""
        return self.tool.args

    @property
    def is_single_input(self) -> bool:
        """Whether the wrapped tool takes a single input."""
        return self.tool.is_single_input

    @property
    def tool_call_schema(self) -> Any:
        """The wrapped tool's schema for a model's tool calls."""
        if isinstance(self.tool, Tool) and not self.tool.args_schema:
            # LangChain shows a single-input Tool without a schema to models
            # as one string argument, by a rule it keeps for Tool alone:
            # the same, as a JSON schema.
            return dict(_SINGLE_INPUT_SCHEMA)
        return self.tool.tool_call_schema

    def get_input_schema(self, config: RunnableConfig | None = None) -> Any:
        """The wrapped tool's input schema."""
        return self.tool.get_input_schema(config)

    @property
    def _injected_args_keys(self) -> frozenset[str]:
        return self.tool._injected_args_keys

    def _to_args_and_kwargs(
        self, tool_input: str | dict[str, Any], tool_call_id: str | None
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return self.tool._to_args_and_kwargs(tool_input, tool_call_id)

    def run(
        self,
        tool_input: str | dict[str, Any],
        *args: Any,
        tool_call_id: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """As ``BaseTool.run``; a refused tool call returns an error
        ``ToolMessage`` (without a tool call id it raises the refusal)."""
        call = _Call(tool_call_id)
        reset = _call.set(call)
        try:
            output = super().run(tool_input, *args, tool_call_id=tool_call_id, **kwargs)
        except KynaraError as err:
            return self._refused(err, call)
        finally:
            _call.reset(reset)
        return _with_metadata(output, call)

    async def arun(
        self,
        tool_input: str | dict[str, Any],
        *args: Any,
        tool_call_id: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """As ``BaseTool.arun``; refusals as ``run``."""
        call = _Call(tool_call_id)
        reset = _call.set(call)
        try:
            output = await super().arun(
                tool_input, *args, tool_call_id=tool_call_id, **kwargs
            )
        except KynaraError as err:
            return self._refused(err, call)
        finally:
            _call.reset(reset)
        return _with_metadata(output, call)

    def _run(
        self,
        *args: Any,
        config: RunnableConfig,
        run_manager: CallbackManagerForToolRun | None = None,
        **kwargs: Any,
    ) -> Any:
        if isinstance(self.tool, StructuredTool) and self.tool.func is None:
            # Refuse before asking: a decision for a call that cannot run
            # would be an audit record of nothing.
            raise NotImplementedError(
                f"tool {self.name!r} is async only: call it with ainvoke or arun"
            )
        verdict = self.guard.check(self.name, self._arguments(args, kwargs))
        event = _note(verdict)
        if run_manager is not None:
            dispatch_custom_event(
                DECISION_EVENT, event, config={"callbacks": run_manager.get_child()}
            )
        verdict.raise_if_refused()
        body = self.tool._run
        extra = _injected(body, run_manager, config)
        return body(*args, **kwargs, **extra)

    async def _arun(
        self,
        *args: Any,
        config: RunnableConfig,
        run_manager: AsyncCallbackManagerForToolRun | None = None,
        **kwargs: Any,
    ) -> Any:
        verdict = await self.guard.acheck(self.name, self._arguments(args, kwargs))
        event = _note(verdict)
        if run_manager is not None:
            await adispatch_custom_event(
                DECISION_EVENT, event, config={"callbacks": run_manager.get_child()}
            )
        verdict.raise_if_refused()
        body = self.tool._arun
        extra = _injected(body, run_manager, config)
        return await body(*args, **kwargs, **extra)

    def _arguments(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        # A single-input tool called with a string gets it positionally:
        # name it after the tool's (first) argument.
        named = dict(zip(self.tool.args, args, strict=False))
        return {**named, **kwargs}

    def _refused(self, err: KynaraError, call: _Call) -> Any:
        verdict = call.verdicts[-1] if call.verdicts else None
        tool_call_id = call.tool_call_id
        if verdict is None or verdict.error is not err or tool_call_id is None:
            # Not this guard's refusal (the body's own error), or no tool
            # call to answer with a message: the caller gets the exception.
            raise err
        return ToolMessage(
            content=verdict.message(),
            tool_call_id=tool_call_id,
            name=self.name,
            status="error",
            response_metadata={METADATA_KEY: verdict.metadata()},
        )


class KynaraCallbackHandler(BaseCallbackHandler):
    """Records each tool start with the decision that let it run, or not.

    Pass it in a run's config (``config={"callbacks": [handler]}``) or to a
    tool's ``callbacks``. ``records`` holds one dict per ``on_tool_start``
    (any tool, guarded or not), in start order: ``run_id``,
    ``parent_run_id``, ``tool``, ``tool_call_id``, ``inputs``, then, for a
    guarded run, the ``Verdict.metadata()`` keys (``decision``,
    ``decision_id``, ``reason_code``, ``reason``, ``approval``, ``error``,
    ``failed_open``, ``action``) with ``guarded`` True; and ``status``:
    ``"success"`` or ``"error"`` from the tool message, ``"error"`` when the
    run raised, None while it runs. Safe to share between threads and tasks.
    It keeps every record: use one per agent session, not one per process.
    """

    # Cheap and non-blocking: run it in the caller's thread or event loop,
    # so its records are in order.
    run_inline = True

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._runs: dict[str, dict[str, Any]] = {}
        self.records: list[dict[str, Any]] = []

    def on_tool_start(
        self,
        serialized: dict[str, Any],
        input_str: str,
        *,
        run_id: Any,
        parent_run_id: Any = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        inputs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Start a record for the run."""
        record: dict[str, Any] = {
            "run_id": str(run_id),
            "parent_run_id": str(parent_run_id) if parent_run_id else None,
            "tool": (serialized or {}).get("name", ""),
            "tool_call_id": kwargs.get("tool_call_id"),
            "inputs": inputs if inputs is not None else input_str,
            "guarded": False,
            "decision": "",
            "decision_id": "",
            "status": None,
        }
        with self._lock:
            self._runs[record["run_id"]] = record
            self.records.append(record)

    def on_custom_event(
        self,
        name: str,
        data: Any,
        *,
        run_id: Any,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Join a guarded run's verdict to its record."""
        if name != DECISION_EVENT or not isinstance(data, Mapping):
            return
        with self._lock:
            record = self._runs.get(str(run_id))
            if record is not None:
                call_id = record["tool_call_id"] or data.get("tool_call_id")
                record.update(data, guarded=True, tool_call_id=call_id)

    def on_tool_end(self, output: Any, *, run_id: Any, **kwargs: Any) -> None:
        """Note how the run ended."""
        self._end(run_id, getattr(output, "status", None) or "success")

    def on_tool_error(
        self, error: BaseException, *, run_id: Any, **kwargs: Any
    ) -> None:
        """Note that the run raised (a refusal, or the tool's own error)."""
        self._end(run_id, "error")

    def _end(self, run_id: Any, status: str) -> None:
        with self._lock:
            record = self._runs.pop(str(run_id), None)
            if record is not None:
                record["status"] = status


def _note(verdict: Verdict) -> dict[str, Any]:
    # Keep the verdict for ``run``; return the decision event's data: the
    # verdict's metadata and the tool call id (older langchain-core passes
    # callbacks none with on_tool_start).
    call = _call.get()
    if call is None:
        return {**verdict.metadata(), "tool_call_id": None}
    call.verdicts.append(verdict)
    return {**verdict.metadata(), "tool_call_id": call.tool_call_id}


def _with_metadata(output: Any, call: _Call) -> Any:
    # The decision that let the body run, on the tool message it produced.
    if call.verdicts and isinstance(output, ToolMessage):
        output.response_metadata[METADATA_KEY] = call.verdicts[-1].metadata()
    return output


def _injected(
    body: Callable[..., Any], run_manager: Any, config: RunnableConfig
) -> dict[str, Any]:
    # What LangChain hands a tool's _run/_arun besides its arguments: the run
    # manager if it takes one, the config under the parameter typed
    # RunnableConfig. The body runs in this run, so it gets this run's.
    extra: dict[str, Any] = {}
    for name, param in inspect.signature(body).parameters.items():
        if name == "run_manager":
            extra[name] = run_manager
        elif param.annotation in (RunnableConfig, "RunnableConfig"):
            extra[name] = config
    return extra
