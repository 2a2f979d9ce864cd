"""Run by tests/clients/test_integration_crewai.py with .venvs/crewai's
Python: CrewAI tools guarded by kynara_sdk.integrations.crewai, used by a
CrewAI agent whose model is a scripted fake, against a real daemon; prints
what the agent and the trace saw as JSON.

Usage:
    python crewai_scenario.py agent TARGET TRANSPORT
    python crewai_scenario.py approval TARGET TRANSPORT REFUND_ID
    python crewai_scenario.py unreachable TARGET
    python crewai_scenario.py checkpoint TARGET TRANSPORT DIRECTORY
    python crewai_scenario.py restore DIRECTORY
    python crewai_scenario.py readme EXAMPLE_FILE

Imports only the standard library, kynara_sdk and crewai, as an agent
would. No model and no network: telemetry and tracing are switched off
before crewai is imported, every connection other than a Unix socket is
refused and recorded (the JSON's "network", which must stay empty), and
crewai's files go to a temporary HOME.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import io
import json
import logging
import os
import pathlib
import socket
import sys
import tempfile

_home = tempfile.mkdtemp(prefix="crewai-home-")
os.environ.update(
    HOME=_home,
    CREWAI_STORAGE_DIR=_home,
    CREWAI_DISABLE_TELEMETRY="true",
    CREWAI_DISABLE_TRACKING="true",
    CREWAI_TRACING_ENABLED="false",
    CREWAI_DISABLE_VERSION_CHECK="true",
    OTEL_SDK_DISABLED="true",
)

# Every attempt to reach the network, refused.
network: list[str] = []


def _no_network(event: str, args: tuple) -> None:
    if event == "socket.connect" and args[0].family != socket.AF_UNIX:
        network.append(f"connect {args[1]!r}")
        raise OSError(f"crewai_scenario: no network ({args[1]!r})")
    if event == "socket.getaddrinfo":
        network.append(f"getaddrinfo {args[0]!r}")
        raise OSError(f"crewai_scenario: no network ({args[0]!r})")


sys.addaudithook(_no_network)
# The guard itself is checked once: a lookup is refused before it is made.
try:
    socket.getaddrinfo("localhost", 9)
    raise SystemExit("crewai_scenario: the network guard let a lookup through")
except OSError as refused:
    assert "no network" in str(refused), refused
network.clear()

import kynara_sdk  # noqa: E402
from crewai import Agent, BaseLLM, Crew, Task  # noqa: E402
from crewai.events.event_bus import crewai_event_bus  # noqa: E402
from crewai.events.types.tool_usage_events import (  # noqa: E402
    ToolFailureDetectedEvent,
)
from crewai.state.checkpoint_config import CheckpointConfig  # noqa: E402
from crewai.tools import BaseTool, ToolFailure, tool  # noqa: E402
from crewai.tools.tool_failure import ToolExecutionFailedError  # noqa: E402
from kynara_sdk.integrations.crewai import (  # noqa: E402
    GuardedTool,
    KynaraDecisionEvent,
    guard_tool,
)
from pydantic import BaseModel  # noqa: E402

# How often each tool's body ran, by tool name.
bodies: collections.Counter[str] = collections.Counter()
# The trace as the event bus delivered it.
decision_events: list[dict] = []
failure_events: list[dict] = []


@crewai_event_bus.on(KynaraDecisionEvent)
def _on_decision(source: object, event: KynaraDecisionEvent) -> None:
    decision_events.append(_event_record(event))


@crewai_event_bus.on(ToolFailureDetectedEvent)
def _on_failure(source: object, event: ToolFailureDetectedEvent) -> None:
    failure_events.append(
        {
            "tool": event.tool_name,
            "code": event.failure.code,
            "kynara": event.failure.details.get("kynara"),
        }
    )


def _event_record(event: KynaraDecisionEvent) -> dict:
    return {
        "tool": event.tool_name,
        "action": event.action,
        "allowed": event.allowed,
        "decision": event.decision,
        "decision_id": event.decision_id,
        "reason_code": event.reason_code,
        "error": event.error,
        "failed_open": event.failed_open,
    }


@tool("issue_refund")
def issue_refund(refund_id: str, amount: int) -> str:
    """Refund a payment; amount in minor units."""
    bodies["issue_refund"] += 1
    return f"refunded {amount} on {refund_id}"


class ContactArgs(BaseModel):
    contact_id: str
    region: str


class ReadContact(BaseTool):
    """A tool class of its own, with a sync and an async body."""

    name: str = "read_contact"
    description: str = "Read a CRM contact as seen from a region."
    args_schema: type[BaseModel] = ContactArgs

    def _run(self, contact_id: str, region: str) -> str:
        bodies["read_contact"] += 1
        return f"contact {contact_id}"

    async def _arun(self, contact_id: str, region: str) -> str:
        bodies["aread_contact"] += 1
        return f"contact {contact_id}"


class ScriptedLLM(BaseLLM):
    """A model that answers with the next scripted step and keeps the tool
    results it was shown. ReAct text steps (``action``) get them back as
    "Observation:" lines; with ``native``, tool calls (``tool_call``) as
    messages of role "tool", the way models with function calling do."""

    def __init__(self, replies: list, native: bool = False) -> None:
        super().__init__(model="scripted")
        self._replies = list(replies)
        self._native = native
        self._observations: list[str] = []

    @property
    def observations(self) -> list[str]:
        return self._observations

    def call(self, messages, *args, **kwargs) -> object:
        if not self._replies:
            raise RuntimeError("ScriptedLLM: asked for more replies than scripted")
        messages = messages if isinstance(messages, list) else []
        results = []
        for message in reversed(messages):
            if message.get("role") != "tool":
                break
            results.insert(0, str(message.get("content", "")))
        self._observations += results
        for message in messages[-2:]:
            content = str(message.get("content", ""))
            if message.get("role") == "assistant" and "\nObservation:" in content:
                seen = content.split("\nObservation:", 1)[1].strip()
                self._observations.append(seen)
        return self._replies.pop(0)

    def supports_function_calling(self) -> bool:
        return self._native


def action(tool_name: str, **arguments: object) -> str:
    return (
        f"Thought: I use {tool_name}\nAction: {tool_name}\n"
        f"Action Input: {json.dumps(arguments)}"
    )


def tool_call(tool_name: str, **arguments: object) -> list[dict]:
    call_id = f"call_{tool_name}_{len(json.dumps(arguments))}"
    function = {"name": tool_name, "arguments": json.dumps(arguments)}
    return [{"id": call_id, "type": "function", "function": function}]


FINAL = "Thought: I am done\nFinal Answer: done"


def guarded(client, async_client=None, **options) -> tuple[BaseTool, BaseTool]:
    events: list = options.pop("events", None)
    extra = {"on_decision": events.append} if events is not None else {}
    refund = guard_tool(
        issue_refund,
        "payments.refund.issue",
        resource_kind="payments.refund",
        resource_arg="refund_id",
        attrs=["amount"],
        client=client,
        async_client=async_client,
        **extra,
        **options,
    )
    contact = guard_tool(
        ReadContact(),
        "crm.contact.read",
        resource_kind="crm.contact",
        resource_arg="contact_id",
        context=["region"],
        client=client,
        async_client=async_client,
        **extra,
        **options,
    )
    return refund, contact


def kickoff(
    tools: list[BaseTool], replies: list, native: bool = False, **task_options
) -> dict:
    """One agent, one task, the model scripted; what it saw and the task's
    recorded tool failures."""
    llm = ScriptedLLM([*replies, "done" if native else FINAL], native)
    agent = Agent(
        role="support agent",
        goal="resolve the ticket",
        backstory="works the support queue",
        llm=llm,
        tools=tools,
        max_iter=len(replies) + 2,
        verbose=False,
    )
    task = Task(
        description="resolve the ticket",
        expected_output="done",
        agent=agent,
        **task_options,
    )
    with kynara_sdk.acting_for(user="alice"):
        output = Crew(agents=[agent], tasks=[task], verbose=False).kickoff()
    failures = output.tasks_output[0].tool_failures
    return {
        "answer": output.raw,
        "observations": llm.observations,
        "tool_failures": [
            {"tool": f.tool_name, "code": f.failure.code, **f.failure.details}
            for f in failures
        ],
    }


def agent(target: str, transport: str) -> dict:
    client = kynara_sdk.Client(target, transport=transport)
    on_decision: list[KynaraDecisionEvent] = []
    refund, contact = guarded(client, events=on_decision)
    run = kickoff(
        [refund, contact],
        [
            action("issue_refund", refund_id="rf_1", amount=1200),
            action("read_contact", contact_id="ct_7", region="kp"),
        ],
    )
    loop_bodies = dict(bodies)
    # The same with native tool calls, the way function-calling models call.
    native = kickoff(
        [refund, contact],
        [
            tool_call("issue_refund", refund_id="rf_5", amount=700),
            tool_call("read_contact", contact_id="ct_10", region="kp"),
        ],
        native=True,
    )
    native_bodies = dict(bodies - collections.Counter(loop_bodies))

    # The same refusal under tool_failure_policy="raise": CrewAI's exception.
    try:
        kickoff(
            [contact],
            [action("read_contact", contact_id="ct_8", region="kp")],
            tool_failure_policy="raise",
        )
        raised = None
    except ToolExecutionFailedError as err:
        raised = {
            "type": type(err).__name__,
            "message": str(err),
            "code": err.record.failure.code,
            "kynara": err.record.failure.details.get("kynara"),
        }

    # Called directly, awaited: the async client and the async body.
    async def direct() -> dict:
        async with kynara_sdk.AsyncClient(target, transport=transport) as aclient:
            arefund, acontact = guarded(client, aclient)
            with kynara_sdk.acting_for(user="alice"):
                allowed = await arefund.arun(refund_id="rf_2", amount=300)
                refused = await acontact.arun(contact_id="ct_9", region="kp")
                ran = await acontact.arun(contact_id="ct_9", region="DE")
        return {
            "allowed": allowed,
            "refused": refused.message if isinstance(refused, ToolFailure) else None,
            "refused_kynara": refused.details.get("kynara"),
            "ran": ran,
        }

    awaited = asyncio.run(direct())
    client.close()
    crewai_event_bus.flush()
    return {
        "transport": client.transport,
        "run": run,
        "loop_bodies": loop_bodies,
        "native": native,
        "native_bodies": native_bodies,
        "bodies": dict(bodies),
        "on_decision": [_event_record(e) for e in on_decision],
        "events": decision_events,
        "failure_events": failure_events,
        "raised": raised,
        "awaited": awaited,
        "network": network,
    }


def approval(target: str, transport: str, refund_id: str) -> dict:
    """The large refund: asked once per run, so the test approves between
    two runs and the second runs the body with the grant."""
    with kynara_sdk.Client(target, transport=transport) as client:
        refund, _ = guarded(client)
        run = kickoff(
            [refund], [action("issue_refund", refund_id=refund_id, amount=60000)]
        )
    crewai_event_bus.flush()
    return {
        "run": run,
        "bodies": dict(bodies),
        "events": decision_events,
        "network": network,
    }


def usage(target: str) -> dict:
    """A refund tool that may run once: its second call is refused as the
    tool refuses it, without asking the daemon."""

    @tool("issue_refund")
    def once(refund_id: str, amount: int) -> str:
        """Refund a payment; amount in minor units."""
        bodies["once"] += 1
        return f"refunded {amount} on {refund_id}"

    once.max_usage_count = 1
    with kynara_sdk.Client(target) as client:
        refund = guard_tool(
            once,
            "payments.refund.issue",
            resource_kind="payments.refund",
            resource_arg="refund_id",
            attrs=["amount"],
            client=client,
        )
        with kynara_sdk.acting_for(user="alice"):
            first = refund.run(refund_id="rf_u1", amount=100)
            second = refund.run(refund_id="rf_u2", amount=100)
    crewai_event_bus.flush()
    return {
        "first": str(first),
        "second": {"reason": second.reason.value, "message": second.message},
        "bodies": dict(bodies),
        "events": decision_events,
    }


def unreachable(target: str) -> dict:
    """No daemon at ``target``: closed by default, open when spelled out."""
    warnings: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            warnings.append(f"{record.levelname} {record.getMessage()}")

    logging.getLogger("kynara_sdk.guard").addHandler(Keep(logging.WARNING))
    with kynara_sdk.Client(target, timeout=2.0) as client:
        refund, _ = guarded(client)
        closed = kickoff(
            [refund], [action("issue_refund", refund_id="rf_3", amount=10)]
        )
        closed_bodies = dict(bodies)
        refund_open, _ = guarded(client, fail_open=True)
        opened = kickoff(
            [refund_open], [action("issue_refund", refund_id="rf_4", amount=20)]
        )
    crewai_event_bus.flush()
    mistakes = {}
    for name, wrong in {
        "not_a_tool": lambda: guard_tool(len, "a.b", resource_kind="a.b"),
        "unknown_argument": lambda: guard_tool(
            issue_refund, "a.b", resource_kind="a.b", attrs=["amout"]
        ),
    }.items():
        try:
            wrong()
        except (TypeError, ValueError) as err:
            mistakes[name] = f"{type(err).__name__}: {err}"
    return {
        "mistakes": mistakes,
        "closed": closed,
        "closed_bodies": closed_bodies,
        "open": opened,
        "bodies": dict(bodies),
        "warnings": warnings,
        "events": decision_events,
        "network": network,
    }


# What the module-level on_decision below saw (a checkpoint keeps it).
noted: list[dict] = []


def note_decision(event: KynaraDecisionEvent) -> None:
    noted.append(_event_record(event))


def checkpointed_tools(client) -> list[BaseTool]:
    """The refund (a module's @tool, with a module-level on_decision), the
    CRM read (a tool class) and a CRM lookup made by @tool inside this
    function, which no checkpoint can keep."""
    refund, contact = guarded(client, on_decision=note_decision)

    @tool("lookup_contact")
    def lookup_contact(contact_id: str, region: str) -> str:
        """Look a CRM contact up."""
        bodies["lookup_contact"] += 1
        return f"contact {contact_id}"

    lookup = guard_tool(
        lookup_contact,
        "crm.contact.read",
        resource_kind="crm.contact",
        resource_arg="contact_id",
        context=["region"],
        client=client,
    )
    return [refund, contact, lookup]


def checkpoint(target: str, transport: str, directory: str) -> dict:
    """A crew of two tasks: the first runs the refund; the model then fails
    in the second, as a crash would, and the crew is checkpointed."""
    with kynara_sdk.Client(target, transport=transport) as client:
        tools = checkpointed_tools(client)
        agent = Agent(
            role="support agent",
            goal="resolve the ticket",
            backstory="works the support queue",
            llm=ScriptedLLM(
                [action("issue_refund", refund_id="rf_c1", amount=1200), FINAL]
            ),
            tools=tools,
            max_iter=4,
            verbose=False,
        )
        tasks = [
            Task(description=f"{step} ticket", expected_output="done", agent=agent)
            for step in ("refund the", "look up the")
        ]
        crew = Crew(
            agents=[agent],
            tasks=tasks,
            # Written when the crew fails, once nothing else runs: CrewAI
            # serializes its event record on a thread of its own, and one
            # written on task_completed races the next task's events
            # ("dictionary changed size during iteration", no checkpoint).
            checkpoint=CheckpointConfig(
                location=directory, on_events=["crew_kickoff_failed"]
            ),
            verbose=False,
        )
        try:
            with kynara_sdk.acting_for(user="alice"):
                crew.kickoff()
            crashed = None
        except RuntimeError as err:
            crashed = str(err)
    crewai_event_bus.flush()
    return {
        "crashed": crashed,
        "bodies": dict(bodies),
        "noted": noted,
        "events": decision_events,
        "checkpoints": len(sorted(pathlib.Path(directory).rglob("*.json"))),
        "network": network,
    }


def restore(directory: str) -> dict:
    """In a new process, the crew from its last checkpoint: first without
    CrewAI's consent to restore callbacks (the refund's on_decision), then
    with it, resuming the second task."""
    [*_, last] = sorted(pathlib.Path(directory).rglob("*.json"))
    config = CheckpointConfig(restore_from=str(last))
    os.environ.pop("CREWAI_DESERIALIZE_CALLBACKS", None)
    restored = Crew.from_checkpoint(config)
    tools = {t.name: t for t in restored.agents[0].tools}
    with kynara_sdk.acting_for(user="alice"):
        without = tools["issue_refund"].run(refund_id="rf_c2", amount=100)
        awaited = asyncio.run(
            tools["lookup_contact"].arun(contact_id="ct_c3", region="DE")
        )
    try:
        unwrapped = repr(tools["lookup_contact"].wrapped)
    except RuntimeError as err:
        unwrapped = str(err)
    os.environ["CREWAI_DESERIALIZE_CALLBACKS"] = "1"
    crew = Crew.from_checkpoint(config)
    agent = crew.agents[0]
    llm = ScriptedLLM(
        [
            action("read_contact", contact_id="ct_c1", region="kp"),
            action("issue_refund", refund_id="rf_c3", amount=700),
            action("lookup_contact", contact_id="ct_c2", region="DE"),
            FINAL,
        ]
    )
    agent.llm = llm
    with kynara_sdk.acting_for(user="alice"):
        output = crew.kickoff()
    crewai_event_bus.flush()
    return {
        "types": sorted(f"{name} {type(t).__name__}" for name, t in tools.items()),
        "without_consent": {"message": without.message, "code": without.code},
        "awaited_code": awaited.code,
        "unwrapped": unwrapped,
        "tasks": [t.raw for t in output.tasks_output],
        "observations": llm.observations,
        "tool_failures": [
            {"tool": f.tool_name, "code": f.failure.code, **f.failure.details}
            for f in output.tasks_output[-1].tool_failures
        ],
        "guarded": all(
            isinstance(t, GuardedTool) for t in [*agent.tools, *crew.tasks[1].tools]
        ),
        "bodies": dict(bodies),
        "noted": noted,
        "events": decision_events,
        "network": network,
    }


def readme(example: str) -> dict:
    """Run the README's example; return what it printed."""
    out = io.StringIO()
    code = pathlib.Path(example).read_text()
    with contextlib.redirect_stdout(out):
        exec(compile(code, example, "exec"), {"__name__": "__main__"})
    crewai_event_bus.flush()
    return {"printed": out.getvalue().splitlines(), "network": network}


def main() -> None:
    command, *args = sys.argv[1:]
    runs = {
        "agent": agent,
        "approval": approval,
        "unreachable": unreachable,
        "usage": usage,
        "checkpoint": checkpoint,
        "restore": restore,
        "readme": readme,
    }
    # Whatever crewai prints goes to stderr: stdout is the JSON alone.
    with contextlib.redirect_stdout(sys.stderr):
        result = runs[command](*args)
    print(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
