"""Run by tests/clients/test_integration_autogen.py with .venvs/autogen's
Python: AutoGen tools guarded by kynara_sdk.integrations.autogen, driven by
an AssistantAgent on a scripted model (autogen_ext's
ReplayChatCompletionClient: no network, no real model), against a real
daemon. Prints what it saw as JSON.

Usage: python autogen_scenario.py TARGET TRANSPORT PART TAG
  PART: loop, exception, approval (the first ask), retry (the same call
  again, after the test approved), unreachable (TARGET has no daemon).
  TAG: makes the refund ids of one run its own.
Imports only the standard library, kynara_sdk and AutoGen, as an agent would.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys

from autogen_agentchat.agents import AssistantAgent
from autogen_core import EVENT_LOGGER_NAME, CancellationToken, FunctionCall
from autogen_core.models import CreateResult, ModelFamily, RequestUsage
from autogen_core.tools import FunctionTool, StaticWorkbench
from autogen_ext.models.replay import ReplayChatCompletionClient
from kynara_sdk import AsyncClient, acting_for
from kynara_sdk.integrations.autogen import DecisionEvent, ToolRefused, guard_tool
from pydantic import ValidationError

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


async def agent_turn(tools: Tools, calls: list[tuple[str, dict]]) -> dict:
    """One agent run: the scripted model asks for ``calls``, the agent runs
    them, and the model is called again with the results."""
    asked = [
        FunctionCall(id=f"call_{i}", name=name, arguments=json.dumps(arguments))
        for i, (name, arguments) in enumerate(calls)
    ]
    model = ReplayChatCompletionClient(
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
