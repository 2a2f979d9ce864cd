"""Run by tests/clients/test_integration_autogen.py with .venvs/autogen's
Python: AutoGen tools guarded by kynara_sdk.integrations.autogen, driven by
an AssistantAgent on a scripted model (autogen_ext's
ReplayChatCompletionClient: no network, no real model), against a real
daemon. Prints what it saw as JSON.

Usage: python autogen_scenario.py TARGET TRANSPORT PART TAG
  PART: loop, exception, approval (the first ask), retry (the same call
  again, after the test approved), unreachable (TARGET has no daemon),
  stream (a guarded stream tool, alone and in an agent), saved (an agent
  holding guarded tools dumped as a component and loaded back).
  TAG: makes the refund ids of one run its own.
Imports only the standard library, kynara_sdk and AutoGen, as an agent would.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import warnings
from collections.abc import AsyncGenerator

from autogen_agentchat.agents import AssistantAgent
from autogen_agentchat.messages import TextMessage, ToolCallExecutionEvent
from autogen_core import (
    EVENT_LOGGER_NAME,
    CancellationToken,
    Component,
    FunctionCall,
)
from autogen_core.code_executor import ImportFromModule
from autogen_core.models import CreateResult, ModelFamily, RequestUsage
from autogen_core.tools import (
    BaseStreamTool,
    FunctionTool,
    StaticStreamWorkbench,
    StaticWorkbench,
    StreamTool,
)
from autogen_ext.models.replay import ReplayChatCompletionClient
from kynara_sdk import AsyncClient, acting_for
from kynara_sdk.decorator import default_async_client
from kynara_sdk.integrations.autogen import (
    DecisionEvent,
    GuardedTool,
    ToolRefused,
    guard_tool,
)
from pydantic import BaseModel, ValidationError

MODEL_INFO = {
    "vision": False,
    "function_calling": True,
    "json_output": False,
    "family": ModelFamily.UNKNOWN,
    "structured_output": False,
}


class Recorder(logging.Handler):
    """Keeps the records of one logger, as a trace exporter would."""

    def __init__(self, name: str) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.logger = logging.getLogger(name)
        self.logger.addHandler(self)
        self.logger.setLevel(logging.INFO)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def decision_events(self) -> list[dict]:
        # Through the JSON the logger writes: what a log reader would get.
        return [
            json.loads(str(r.msg))
            for r in self.records
            if isinstance(r.msg, DecisionEvent)
        ]


class Tools:
    """A sync refund tool and an async CRM tool, each counting its runs."""

    def __init__(self, client: AsyncClient, **guard_options) -> None:
        self.runs = {"issue_refund": 0, "read_contact": 0}
        self.callback: list[dict] = []

        def issue_refund(refund_id: str, amount: int) -> str:
            """Refund a payment."""
            self.runs["issue_refund"] += 1
            return f"refunded {amount} on {refund_id}"

        async def read_contact(contact_id: str, region: str = "DE") -> str:
            """Read a customer contact."""
            self.runs["read_contact"] += 1
            return f"contact {contact_id}: Ada, +49 30 1234"

        def told(event: DecisionEvent) -> None:
            self.callback.append(event.kwargs)

        common = {"async_client": client, "on_decision": told, **guard_options}
        self.refund = guard_tool(
            FunctionTool(issue_refund, description="Refund a payment."),
            "payments.refund.issue",
            resource_kind="payments.refund",
            resource_arg="refund_id",
            attrs=["amount"],
            **common,
        )
        self.crm = guard_tool(
            FunctionTool(read_contact, description="Read a customer contact."),
            "crm.contact.read",
            resource_kind="crm.contact",
            resource_arg="contact_id",
            context=["region"],
            **common,
        )


# What the tools below did, in order; module-level so that a tool loaded
# from a saved component (its code run anew) still reports here.
RUNS = {"issue_refund": 0, "read_contact": 0, "refund_in_steps": 0}
LOG: list[str] = []


def issue_refund(refund_id: str, amount: int) -> str:
    """Refund a payment."""
    RUNS["issue_refund"] += 1
    return f"refunded {amount} on {refund_id}"


async def read_contact(contact_id: str, region: str = "DE") -> str:
    """Read a customer contact."""
    RUNS["read_contact"] += 1
    return f"contact {contact_id}: Ada, +49 30 1234"


class RefundArgs(BaseModel):
    refund_id: str
    amount: int


class RefundStepsConfig(BaseModel):
    pass


class RefundSteps(
    BaseStreamTool[RefundArgs, TextMessage, str], Component[RefundStepsConfig]
):
    """A refund that reports each step as it goes (a stream tool)."""

    component_type = "tool"
    component_config_schema = RefundStepsConfig

    def __init__(self) -> None:
        super().__init__(RefundArgs, str, "refund_in_steps", "Refund, step by step.")

    async def run(self, args: RefundArgs, cancellation_token: CancellationToken) -> str:
        return [item async for item in self.run_stream(args, cancellation_token)][-1]

    async def run_stream(
        self, args: RefundArgs, cancellation_token: CancellationToken
    ) -> AsyncGenerator[TextMessage | str, None]:
        RUNS["refund_in_steps"] += 1
        for step in ("reserved", "sent"):
            LOG.append(f"made {step} {args.refund_id}")
            yield TextMessage(source=self.name, content=f"{step} {args.refund_id}")
        LOG.append(f"made final {args.refund_id}")
        yield f"refunded {args.amount} on {args.refund_id} in steps"

    def _to_config(self) -> RefundStepsConfig:
        return RefundStepsConfig()

    @classmethod
    def _from_config(cls, config: RefundStepsConfig) -> RefundSteps:
        return cls()


def plain_tools(**options) -> list[GuardedTool]:
    """Guarded module-level tools (savable: FunctionTool saves its code,
    which reads RUNS from this module again when loaded)."""
    shared = [ImportFromModule("__main__", ("RUNS",))]
    refund_options = {"resource_kind": "payments.refund", "resource_arg": "refund_id"}
    return [
        guard_tool(
            FunctionTool(issue_refund, "Refund a payment.", global_imports=shared),
            "payments.refund.issue",
            attrs=["amount"],
            on_approval="wait",
            approval_timeout=5.0,
            **refund_options,
            **options,
        ),
        guard_tool(
            FunctionTool(
                read_contact, "Read a customer contact.", global_imports=shared
            ),
            "crm.contact.read",
            resource_kind="crm.contact",
            resource_arg="contact_id",
            context={"region": "region"},
            fail_open=True,
            **options,
        ),
        guard_tool(
            RefundSteps(),
            "payments.refund.issue",
            attrs={"amount": "amount"},
            **refund_options,
            **options,
        ),
    ]


def scripted_model(calls: list[tuple[str, dict]]) -> ReplayChatCompletionClient:
    """A model that asks for ``calls`` at once, then says "Done."."""
    asked = [
        FunctionCall(id=f"call_{i}", name=name, arguments=json.dumps(arguments))
        for i, (name, arguments) in enumerate(calls)
    ]
    return ReplayChatCompletionClient(
        [
            CreateResult(
                finish_reason="function_calls",
                content=asked,
                usage=RequestUsage(prompt_tokens=0, completion_tokens=0),
                cached=False,
            ),
            "Done.",
        ],
        model_info=MODEL_INFO,
    )


async def streamed_turn(agent: AssistantAgent) -> dict:
    """Run ``agent`` streaming: what it streamed, in order (the tools'
    progress messages and the execution event), and the results."""
    order: list[str] = []
    results: dict = {}
    async for item in agent.run_stream(task="Handle the customer's refund request."):
        if isinstance(item, TextMessage) and item.source != "user":
            order.append(f"{item.source}: {item.content}")
        elif isinstance(item, ToolCallExecutionEvent):
            order.append("executed")
            results = {
                r.call_id: {
                    "name": r.name,
                    "content": r.content,
                    "is_error": r.is_error,
                }
                for r in item.content
            }
    return {"order": order, "model_saw": results}


async def agent_turn(tools: Tools, calls: list[tuple[str, dict]]) -> dict:
    """One agent run: the scripted model asks for ``calls``, the agent runs
    them, and the model is called again with the results."""
    model = scripted_model(calls)
    agent = AssistantAgent(
        "support",
        model_client=model,
        tools=[tools.refund, tools.crm],
        reflect_on_tool_use=True,
    )
    result = await agent.run(task="Handle the customer's refund request.")
    # The second model call's last message holds the tool results it read.
    seen = model.create_calls[1]["messages"][-1]
    return {
        "final": result.messages[-1].content,
        "model_saw": {
            r.call_id: {"name": r.name, "content": r.content, "is_error": r.is_error}
            for r in seen.content
        },
    }


async def stream_part(client: AsyncClient, tag: str) -> dict:
    """A guarded stream tool alone (the order of checks, steps and items
    shows it streams after the check) and in an agent."""
    steps = guard_tool(
        RefundSteps(),
        "payments.refund.issue",
        resource_kind="payments.refund",
        resource_arg="refund_id",
        attrs=["amount"],
        async_client=client,
        on_decision=lambda event: LOG.append(f"decision {event.kwargs['decision']}"),
    )
    out: dict = {
        "kind": type(steps).__name__,
        "streams": isinstance(steps, StreamTool),
        "plain_streams": isinstance(plain_tools()[0], StreamTool),
    }
    args = {"refund_id": f"rf_{tag}_s1", "amount": 1200}
    async for item in steps.run_json_stream(args, CancellationToken(), call_id="s1"):
        LOG.append(f"got {getattr(item, 'content', item)}")
    big = {"refund_id": f"rf_{tag}_s2", "amount": 60000}
    try:
        async for item in steps.run_json_stream(big, CancellationToken(), call_id="s2"):
            LOG.append(f"got {getattr(item, 'content', item)}")
        out["refused"] = None
    except ToolRefused as refused:
        out["refused"] = {"code": refused.code, "decision_id": refused.decision_id}
    out["log"] = list(LOG)
    bench = StaticStreamWorkbench([steps])
    out["bench"] = [
        getattr(item, "content", None)
        if isinstance(item, TextMessage)
        else item.to_text()
        for item in [x async for x in bench.call_tool_stream("refund_in_steps", big)]
    ]
    agent = AssistantAgent(
        "support",
        model_client=scripted_model(
            [
                ("refund_in_steps", {"refund_id": f"rf_{tag}_s3", "amount": 1300}),
                ("refund_in_steps", {"refund_id": f"rf_{tag}_s4", "amount": 70000}),
            ]
        ),
        tools=[steps],
        reflect_on_tool_use=True,
    )
    out["turn"] = await streamed_turn(agent)
    return out


async def saved_part(
    client: AsyncClient, target: str, transport: str, tag: str
) -> dict:
    """Dump an agent holding guarded tools (with a client and a callback),
    load it where ``$KYNARA_TARGET`` names the daemon, and run the loaded
    agent: its tools must still be guarded, the stream one still stream."""
    told: list[dict] = []
    tools = plain_tools(
        async_client=client, on_decision=lambda e: told.append(e.kwargs)
    )
    calls = [
        ("issue_refund", {"refund_id": f"rf_{tag}_saved", "amount": 1200}),
        ("read_contact", {"contact_id": "ct_7", "region": "kp"}),
        ("refund_in_steps", {"refund_id": f"rf_{tag}_steps", "amount": 1300}),
    ]
    agent = AssistantAgent(
        "support",
        model_client=scripted_model(calls),
        tools=tools,
        reflect_on_tool_use=True,
    )
    saved = agent.dump_component().model_dump_json()
    os.environ["KYNARA_TARGET"] = target
    os.environ["KYNARA_TRANSPORT"] = transport
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        loaded = AssistantAgent.load_component(json.loads(saved))
    out: dict = {
        "saved_tools": [
            {
                **tool["config"],
                "tool": tool["config"]["tool"]["provider"],
                "provider": tool["provider"],
            }
            for tool in json.loads(saved)["config"]["workbench"][0]["config"]["tools"]
        ],
        # FunctionTool warns that loading runs saved code; nothing else may.
        "load_warnings": [
            str(w.message) for w in warned if "SECURITY" not in str(w.message)
        ],
    }
    out["turn"] = await streamed_turn(loaded)
    out["told"] = told  # the callback is not saved: the loaded tools tell no one
    out["loaded_transport"] = default_async_client().transport
    return out


async def run_part(target: str, transport: str, part: str, tag: str) -> dict:
    events = Recorder(EVENT_LOGGER_NAME)
    warnings = Recorder("kynara_sdk.guard")
    client = AsyncClient(target, transport=transport, timeout=2.0)
    tools = Tools(client)
    refund = ("issue_refund", {"refund_id": f"rf_{tag}", "amount": 1200})
    crm = ("read_contact", {"contact_id": "ct_7", "region": "kp"})
    big = ("issue_refund", {"refund_id": f"rf_{tag}_big", "amount": 60000})
    out: dict = {}
    with acting_for(user="alice"):
        if part == "loop":
            out["turn"] = await agent_turn(tools, [refund, crm])
        elif part in ("approval", "retry"):
            out["turn"] = await agent_turn(tools, [big])
        elif part == "exception":
            out["same_face"] = all(
                (g.name, g.description, g.schema)
                == (g.tool.name, g.tool.description, g.tool.schema)
                for g in (tools.refund, tools.crm)
            )
            try:
                bad = {"refund_id": "rf_bad", "amount": "lots"}
                await tools.refund.run_json(bad, CancellationToken())
                out["bad_arguments"] = None
            except ValidationError as err:
                out["bad_arguments"] = err.errors()[0]["loc"][0]
            out["wrong_settings"] = []
            for wrong in ({"client": object()}, {"attrs": ["amout"]}):
                try:
                    guard_tool(
                        tools.refund.tool,
                        "payments.refund.issue",
                        resource_kind="payments.refund",
                        **wrong,
                    )
                except (TypeError, ValueError) as err:
                    out["wrong_settings"].append(str(err))
            try:
                await tools.crm.run_json(crm[1], CancellationToken(), call_id="c1")
                out["raised"] = None
            except ToolRefused as refused:
                out["raised"] = {
                    "code": refused.code,
                    "decision_id": refused.decision_id,
                    "text": str(refused),
                    "cause": type(refused.__cause__).__name__,
                }
        elif part == "stream":
            out.update(await stream_part(client, tag))
        elif part == "saved":
            out.update(await saved_part(client, target, transport, tag))
        elif part == "unreachable":
            bench = StaticWorkbench([tools.refund])
            closed = await bench.call_tool(refund[0], refund[1], call_id="c1")
            open_tools = Tools(client, fail_open=True)
            opened = await StaticWorkbench([open_tools.refund]).call_tool(
                refund[0], refund[1], call_id="c2"
            )
            out["closed"] = {"text": closed.to_text(), "is_error": closed.is_error}
            out["opened"] = {"text": opened.to_text(), "is_error": opened.is_error}
            out["open_runs"] = open_tools.runs
            out["open_callback"] = open_tools.callback
            out["warnings"] = [
                {"level": r.levelname, "text": r.getMessage()} for r in warnings.records
            ]
        else:
            raise SystemExit(f"autogen_scenario.py: unknown part {part!r}")
    out["runs"] = tools.runs
    out["module_runs"] = RUNS
    out["callback"] = tools.callback
    out["events"] = events.decision_events()
    out["transport"] = client.transport
    await client.aclose()
    return out


def main() -> None:
    target, transport, part, tag = sys.argv[1:5]
    print(json.dumps(asyncio.run(run_part(target, transport, part, tag))))


if __name__ == "__main__":
    main()
