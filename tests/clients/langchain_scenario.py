"""Run by tests/clients/test_integration_langchain.py with .venvs/langchain's
Python: LangChain tools guarded by kynara_sdk.integrations.langchain, driven
by langchain-core's scripted fake chat model against a real daemon; prints
what the agent saw as JSON.

Usage:
    python langchain_scenario.py agent TARGET TRANSPORT
    python langchain_scenario.py approval TARGET TRANSPORT
    python langchain_scenario.py unreachable TARGET
    python langchain_scenario.py readme EXAMPLE_FILE

Imports only the standard library, kynara_sdk and langchain-core, as an
agent would. No model, no network: the fake model replays scripted tool
calls.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import io
import json
import logging
import sys

import kynara_sdk
from kynara_sdk.integrations.langchain import KynaraCallbackHandler, guard_tool
from langchain_core.callbacks import CallbackManagerForToolRun
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import BaseTool, Tool, tool
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import BaseModel

# How often each tool's body ran, by tool name.
bodies: collections.Counter[str] = collections.Counter()


@tool
def issue_refund(refund_id: str, amount: int) -> str:
    """Refund a payment; amount in minor units."""
    bodies["issue_refund"] += 1
    return f"refunded {amount} on {refund_id}"


@tool
def read_contact(contact_id: str, region: str) -> str:
    """Read a CRM contact as seen from a region."""
    bodies["read_contact"] += 1
    return f"contact {contact_id}"


@tool
async def aissue_refund(refund_id: str, amount: int) -> str:
    """Refund a payment, async; amount in minor units."""
    bodies["aissue_refund"] += 1
    return f"refunded {amount} on {refund_id}"


@tool
async def aread_contact(contact_id: str, region: str) -> str:
    """Read a CRM contact, async."""
    bodies["aread_contact"] += 1
    return f"contact {contact_id}"


class RefundArgs(BaseModel):
    refund_id: str
    amount: int = 100


class RefundTool(BaseTool):
    """A tool written as a class, returning content and an artifact, and
    taking its run manager."""

    name: str = "refund_by_class"
    description: str = "Refund a payment; amount in minor units."
    args_schema: type[BaseModel] = RefundArgs
    response_format: str = "content_and_artifact"

    def _run(
        self,
        refund_id: str,
        amount: int = 100,
        run_manager: CallbackManagerForToolRun | None = None,
    ) -> tuple[str, dict]:
        bodies[self.name] += 1
        return f"refunded {amount}", {"amount": amount, "run": run_manager is not None}


def lookup(contact_id: str) -> str:
    bodies["lookup_contact"] += 1
    return f"contact {contact_id}"


def shapes(client: kynara_sdk.Client) -> dict:
    """Other kinds of tool: a class with content and artifact, a plain
    single-input ``Tool``; and the schema a model is shown, unchanged."""
    by_class = RefundTool()
    refund = guard_tool(
        by_class,
        "payments.refund.issue",
        resource_kind="payments.refund",
        resource_arg="refund_id",
        attrs=["amount"],
        client=client,
    )
    single = Tool(name="lookup_contact", func=lookup, description="Read a contact.")
    contact = guard_tool(
        single,
        "crm.contact.read",
        resource_kind="crm.contact",
        resource_arg="tool_input",
        client=client,
    )
    message = refund.invoke(call(refund.name, "s1", refund_id="rf_3"))
    return {
        "same_schema": [
            convert_to_openai_tool(wrapped) == convert_to_openai_tool(plain)
            for wrapped, plain in ((refund, by_class),)
        ]
        + [
            convert_to_openai_tool(t) == convert_to_openai_tool(p)
            for t, p in zip(
                guarded(issue_refund, read_contact).values(),
                (issue_refund, read_contact),
                strict=True,
            )
        ],
        "single_input": [
            convert_to_openai_tool(tool)["function"]["parameters"]
            for tool in (contact, single)
        ],
        "message": seen(message),
        "artifact": message.artifact,
        "lookup": contact.invoke("ct_5"),
    }


def guarded(
    refund: BaseTool, contact: BaseTool, **options: object
) -> dict[str, BaseTool]:
    refund_tool = guard_tool(
        refund,
        "payments.refund.issue",
        resource_kind="payments.refund",
        resource_arg="refund_id",
        attrs=["amount"],
        **options,
    )
    contact_tool = guard_tool(
        contact,
        "crm.contact.read",
        resource_kind="crm.contact",
        resource_arg="contact_id",
        context=["region"],
        **options,
    )
    return {refund_tool.name: refund_tool, contact_tool.name: contact_tool}


def call(name: str, call_id: str, **args: object) -> dict:
    return {"type": "tool_call", "id": call_id, "name": name, "args": args}


def script(refund: str, contact: str) -> GenericFakeChatModel:
    """The model: a refund that is allowed, a CRM read from a blocked
    region, then a closing answer."""
    replies = [
        AIMessage("", tool_calls=[call(refund, "c1", refund_id="rf_1", amount=1200)]),
        AIMessage("", tool_calls=[call(contact, "c2", contact_id="ct_7", region="kp")]),
        AIMessage("done"),
    ]
    return GenericFakeChatModel(messages=iter(replies))


def seen(message: ToolMessage) -> dict:
    return {
        "name": message.name,
        "tool_call_id": message.tool_call_id,
        "status": message.status,
        "content": message.content,
        "kynara": message.response_metadata.get("kynara"),
    }


def run_loop(model, tools, handler) -> dict:
    config = {"callbacks": [handler]}
    messages = [HumanMessage("refund rf_1 and look up ct_7")]
    while True:
        reply = model.invoke(messages, config=config)
        messages.append(reply)
        if not reply.tool_calls:
            break
        for tool_call in reply.tool_calls:
            messages.append(tools[tool_call["name"]].invoke(tool_call, config=config))
    return outcome(messages, handler)


async def arun_loop(model, tools, handler) -> dict:
    config = {"callbacks": [handler]}
    messages = [HumanMessage("refund rf_1 and look up ct_7")]
    while True:
        reply = await model.ainvoke(messages, config=config)
        messages.append(reply)
        if not reply.tool_calls:
            break
        for tool_call in reply.tool_calls:
            answer = await tools[tool_call["name"]].ainvoke(tool_call, config=config)
            messages.append(answer)
    return outcome(messages, handler)


def outcome(messages, handler) -> dict:
    return {
        "tool_messages": [seen(m) for m in messages if isinstance(m, ToolMessage)],
        "records": handler.records,
        "final": messages[-1].content,
    }


def refused(error: kynara_sdk.KynaraError) -> dict:
    return {
        "type": type(error).__name__,
        "code": error.code,
        "decision_id": getattr(error, "decision_id", ""),
    }


async def async_agent(target: str, transport: str) -> dict:
    async with kynara_sdk.AsyncClient(target, transport=transport) as aclient:
        tools = guarded(aissue_refund, aread_contact, async_client=aclient)
        model = script("aissue_refund", "aread_contact")
        return await arun_loop(model, tools, KynaraCallbackHandler())


def agent(target: str, transport: str) -> dict:
    with (
        kynara_sdk.Client(target, transport=transport) as client,
        kynara_sdk.acting_for(user="alice"),
    ):
        sync_tools = guarded(issue_refund, read_contact, client=client)
        out = {
            "sync": run_loop(
                script("issue_refund", "read_contact"),
                sync_tools,
                KynaraCallbackHandler(),
            ),
            "async": asyncio.run(async_agent(target, transport)),
        }
        # Called without a tool call, a refusal is an exception.
        handler = KynaraCallbackHandler()
        try:
            sync_tools["read_contact"].invoke(
                {"contact_id": "ct_8", "region": "kp"}, config={"callbacks": [handler]}
            )
            out["direct"] = None
        except kynara_sdk.KynaraError as err:
            out["direct"] = {**refused(err), "records": handler.records}
        out["shapes"] = shapes(client)
        out["transport"] = client.transport
    out["bodies"] = dict(bodies)
    return out


def approval(target: str, transport: str) -> dict:
    """One call of a refund above the limit (the test runs it twice, and
    approves in between)."""
    with (
        kynara_sdk.Client(target, transport=transport) as client,
        kynara_sdk.acting_for(user="alice"),
    ):
        tools = guarded(issue_refund, read_contact, client=client)
        handler = KynaraCallbackHandler()
        message = tools["issue_refund"].invoke(
            call("issue_refund", "c9", refund_id="rf_9", amount=60000),
            config={"callbacks": [handler]},
        )
        return {
            "message": seen(message),
            "records": handler.records,
            "bodies": dict(bodies),
        }


class Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(
            {
                "logger": record.name,
                "level": record.levelname,
                "message": record.getMessage(),
            }
        )


async def async_unreachable(
    target: str, fail_open: bool, tool_call: dict, config: dict
) -> ToolMessage:
    async with kynara_sdk.AsyncClient(target, timeout=1.0) as aclient:
        tools = guarded(
            aissue_refund, aread_contact, async_client=aclient, fail_open=fail_open
        )
        return await tools["aissue_refund"].ainvoke(tool_call, config=config)


def unreachable(target: str) -> dict:
    """A daemon that is not there: closed by default, open when asked."""
    captured = Captured()
    logging.getLogger("kynara_sdk.guard").addHandler(captured)
    out: dict = {}
    refund = call("issue_refund", "c1", refund_id="rf_1", amount=1200)
    with (
        kynara_sdk.Client(target, timeout=1.0) as client,
        kynara_sdk.acting_for(user="alice"),
    ):
        for mode, fail_open in (("closed", False), ("open", True)):
            tools = guarded(
                issue_refund, read_contact, client=client, fail_open=fail_open
            )
            handler = KynaraCallbackHandler()
            config = {"callbacks": [handler]}
            message = tools["issue_refund"].invoke(refund, config=config)
            amessage = asyncio.run(
                async_unreachable(
                    target, fail_open, {**refund, "name": "aissue_refund"}, config
                )
            )
            out[mode] = {
                "message": seen(message),
                "async_message": seen(amessage),
                "records": handler.records,
                "bodies": dict(bodies),
                "log": list(captured.lines),
            }
            captured.lines.clear()
    return out


def readme(example: str) -> dict:
    """Run the README's example as it stands and return what it printed."""
    with open(example, encoding="utf-8") as source:
        code = compile(source.read(), example, "exec")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(code, {"__name__": "__main__"})
    return {"stdout": printed.getvalue()}


def main() -> None:
    command, args = sys.argv[1], sys.argv[2:]
    commands = {
        "agent": agent,
        "approval": approval,
        "unreachable": unreachable,
        "readme": readme,
    }
    print(json.dumps(commands[command](*args)))


if __name__ == "__main__":
    main()
