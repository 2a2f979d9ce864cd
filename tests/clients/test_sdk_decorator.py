"""@permission_required: the body runs only on allow, and arguments map in."""

from __future__ import annotations

import asyncio
import datetime
import inspect
import threading
import uuid

import grpc
import kynara_sdk
import pytest
from google.protobuf import timestamp_pb2
from kynara.v1 import decision_pb2
from kynara_sdk import (
    ApprovalRequired,
    AsyncClient,
    Client,
    KynaraError,
    KynaraUnavailable,
    PermissionDenied,
    acting_for,
    permission_required,
)
from sdk_scripted import Abort, answer

APPROVAL = answer(
    "require_approval",
    "dec-appr",
    reason_code="approval_required",
    approval=decision_pb2.Approval(
        id="apr-1",
        url="http://127.0.0.1:8080/approvals/apr-1",
        expires_at=timestamp_pb2.Timestamp(seconds=1782889200),
    ),
)
DENY = answer("deny", "dec-deny", reason_code="rule_denied", reason="region kp")


class Tools:
    """Tools wrapped against one client, counting how often their bodies ran."""

    def __init__(self, sync_client: Client, async_client: AsyncClient) -> None:
        self.ran: list[str] = []

        @permission_required(
            "payments.refund.issue",
            resource_kind="payments.refund",
            resource_arg="refund_id",
            attrs=["amount"],
            context=["region"],
            client=sync_client,
        )
        def issue_refund(refund_id: str, amount: int, region: str = "DE") -> str:
            """Issue a refund."""
            self.ran.append("issue_refund")
            return f"refunded {amount}"

        @permission_required(
            "payments.refund.issue",
            resource_kind="payments.refund",
            resource_arg="refund_id",
            attrs=["amount"],
            context=["region"],
            client=async_client,
        )
        async def issue_refund_async(
            refund_id: str, amount: int, region: str = "DE"
        ) -> str:
            """Issue a refund, asynchronously."""
            self.ran.append("issue_refund_async")
            return f"refunded {amount}"

        self.issue_refund = issue_refund
        self.issue_refund_async = issue_refund_async


@pytest.fixture
def tools(daemon, client):
    async_client = AsyncClient(daemon.target)
    return Tools(client, async_client)


def call(tools: Tools, flavour: str, *args, **kwargs):
    if flavour == "sync":
        return tools.issue_refund(*args, **kwargs)
    return asyncio.run(tools.issue_refund_async(*args, **kwargs))


FLAVOURS = pytest.mark.parametrize("flavour", ["sync", "async"])


@FLAVOURS
def test_allow_runs_the_body_and_returns_its_result(daemon, tools, flavour):
    daemon.then(answer("allow"))

    with acting_for(user="alice"):
        result = call(tools, flavour, "rf_1", 1200)

    assert result == "refunded 1200"
    assert len(tools.ran) == 1
    assert list(daemon.requests[0].asserted_chain) == ["alice"]


@FLAVOURS
def test_deny_raises_permission_denied_before_the_body_runs(daemon, tools, flavour):
    daemon.then(DENY)

    with pytest.raises(PermissionDenied) as caught:
        call(tools, flavour, "rf_1", 1200, region="kp")

    assert tools.ran == []
    assert caught.value.code == kynara_sdk.PERMISSION_DENIED
    assert caught.value.reason_code == "rule_denied"
    assert caught.value.decision_id == "dec-deny"
    assert caught.value.decision.reason == "region kp"


@FLAVOURS
def test_require_approval_raises_approval_required_with_its_ids(daemon, tools, flavour):
    daemon.then(APPROVAL)

    with pytest.raises(ApprovalRequired) as caught:
        call(tools, flavour, "rf_2", 250_000)

    assert tools.ran == []
    error = caught.value
    assert error.code == kynara_sdk.APPROVAL_REQUIRED
    assert error.decision_id == "dec-appr"
    assert error.approval_id == "apr-1"
    assert error.approval_url == "http://127.0.0.1:8080/approvals/apr-1"
    assert error.expires_at == datetime.datetime(2026, 7, 1, 7, tzinfo=datetime.UTC)


@FLAVOURS
def test_approval_without_approval_details_still_raises(daemon, tools, flavour):
    daemon.then(answer("require_approval", "dec-bare"))

    with pytest.raises(ApprovalRequired) as caught:
        call(tools, flavour, "rf_2", 250_000)

    assert tools.ran == []
    assert caught.value.decision_id == "dec-bare"
    assert (caught.value.approval_id, caught.value.expires_at) == ("", None)


@FLAVOURS
def test_daemon_error_fails_closed(daemon, tools, flavour):
    daemon.then(Abort(grpc.StatusCode.UNAVAILABLE, "disk full", "audit_unavailable"))

    with pytest.raises(KynaraError) as caught:
        call(tools, flavour, "rf_1", 1)

    assert tools.ran == []
    assert caught.value.code == "audit_unavailable"


@FLAVOURS
def test_unreachable_daemon_fails_closed(absent_target, flavour):
    ran = []

    @permission_required(
        "crm.contact.read", resource_kind="crm.contact", client=Client(absent_target)
    )
    def read_contact(contact_id):
        ran.append(contact_id)

    @permission_required(
        "crm.contact.read",
        resource_kind="crm.contact",
        client=AsyncClient(absent_target),
    )
    async def read_contact_async(contact_id):
        ran.append(contact_id)

    with pytest.raises(KynaraUnavailable) as caught:
        if flavour == "sync":
            read_contact("c-1")
        else:
            asyncio.run(read_contact_async("c-1"))

    assert ran == []
    assert caught.value.code == kynara_sdk.DAEMON_UNREACHABLE


@FLAVOURS
def test_unconvertible_argument_fails_closed_and_sends_nothing(daemon, tools, flavour):
    with pytest.raises(
        TypeError, match=r"^resource\.attributes\.amount: expected bool, .* got set$"
    ):
        call(tools, flavour, "rf_1", {1})

    assert tools.ran == []
    assert daemon.requests == []


@pytest.mark.parametrize(
    ("args", "kwargs", "resource_id", "amount", "region"),
    [
        (("rf_1", 1200), {}, "rf_1", 1200, "DE"),
        (("rf_1",), {"amount": 2**53 + 1}, "rf_1", 2**53 + 1, "DE"),
        ((), {"region": "FR", "amount": 5, "refund_id": "rf_9"}, "rf_9", 5, "FR"),
        (("rf_3", 7, "kp"), {}, "rf_3", 7, "kp"),
    ],
    ids=["positional-with-default", "keyword", "all-keyword", "all-positional"],
)
@FLAVOURS
def test_arguments_map_to_resource_id_attributes_and_context(
    daemon, tools, flavour, args, kwargs, resource_id, amount, region
):
    call(tools, flavour, *args, **kwargs)

    [sent] = daemon.requests
    assert sent.action == "payments.refund.issue"
    assert sent.resource.kind == "payments.refund"
    assert sent.resource.id == resource_id
    assert dict(sent.resource.attributes) == {
        "amount": decision_pb2.Value(int_value=amount)
    }
    assert dict(sent.context) == {"region": decision_pb2.Value(string_value=region)}


def test_dict_mapping_renames_arguments_to_attributes(daemon, client):
    @permission_required(
        "deploy.run",
        resource_kind="deploy.service",
        resource_arg="service",
        attrs={"env": "environment", "replicas": "count"},
        context={"ticket": "change_ticket"},
        client=client,
    )
    def deploy(service: uuid.UUID, environment: str, count: int = 2, **options):
        return options

    service = uuid.UUID(int=7)
    result = deploy(service, "prod", change_ticket="CH-1")

    [sent] = daemon.requests
    assert sent.resource.id == str(service)
    assert sent.resource.attributes["env"].string_value == "prod"
    assert sent.resource.attributes["replicas"].int_value == 2
    assert sent.context["ticket"].string_value == "CH-1"
    assert result == {"change_ticket": "CH-1"}


def test_name_missing_from_kwargs_is_left_out(daemon, client):
    @permission_required("a.b", resource_kind="k", context=["ticket"], client=client)
    def act(**options):
        return "done"

    assert act() == "done"
    assert dict(daemon.requests[0].context) == {}


def test_wrapped_function_keeps_its_name_doc_and_signature(tools):
    assert tools.issue_refund.__name__ == "issue_refund"
    assert tools.issue_refund.__doc__ == "Issue a refund."
    parameters = inspect.signature(tools.issue_refund).parameters
    assert list(parameters) == ["refund_id", "amount", "region"]
    assert parameters["region"].default == "DE"
    assert inspect.iscoroutinefunction(tools.issue_refund_async)
    assert not inspect.iscoroutinefunction(tools.issue_refund)


def test_wrong_arguments_raise_the_usual_type_error_before_asking(daemon, tools):
    with pytest.raises(TypeError, match="missing a required argument: 'amount'"):
        tools.issue_refund("rf_1")

    assert daemon.requests == []


def test_acting_for_reaches_an_async_tool_per_task(daemon, tools):
    async def as_user(user, refund_id):
        with acting_for(user=user):
            await asyncio.sleep(0)
            return await tools.issue_refund_async(refund_id, 1)

    async def both():
        await asyncio.gather(as_user("alice", "rf_a"), as_user("bob", "rf_b"))

    asyncio.run(both())

    seen = {sent.resource.id: list(sent.asserted_chain) for sent in daemon.requests}
    assert seen == {"rf_a": ["alice"], "rf_b": ["bob"]}


def test_acting_for_reaches_a_sync_tool_per_thread(daemon, tools):
    barrier = threading.Barrier(2, timeout=10)

    def as_user(user, refund_id):
        with acting_for(user=user):
            barrier.wait()  # both blocks are open before either asks
            tools.issue_refund(refund_id, 1)

    threads = [
        threading.Thread(target=as_user, args=args)
        for args in (("alice", "rf_a"), ("bob", "rf_b"))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)

    seen = {sent.resource.id: list(sent.asserted_chain) for sent in daemon.requests}
    assert seen == {"rf_a": ["alice"], "rf_b": ["bob"]}
    assert len(tools.ran) == 2


def test_body_sees_the_decision_that_allowed_it(daemon, client):
    daemon.then(answer("allow", "d-body", reason_code="rule_allowed"))

    @permission_required("a.b", resource_kind="k", client=client)
    def act():
        return kynara_sdk.current_decision()

    seen = act()

    assert (seen.decision_id, seen.reason_code) == ("d-body", "rule_allowed")
    assert kynara_sdk.current_decision() is None


@FLAVOURS
def test_default_client_comes_from_kynara_target(daemon, monkeypatch, flavour):
    monkeypatch.setenv("KYNARA_TARGET", daemon.target)
    daemon.then(answer("allow", "d-env"))
    ran = []

    @permission_required("crm.contact.read", resource_kind="crm.contact")
    def read(contact_id):
        ran.append(contact_id)

    @permission_required("crm.contact.read", resource_kind="crm.contact")
    async def read_async(contact_id):
        ran.append(contact_id)

    if flavour == "sync":
        read("c-1")
    else:
        asyncio.run(read_async("c-1"))

    assert ran == ["c-1"]
    assert len(daemon.requests) == 1


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"resource_arg": "refund"},
            ValueError,
            r"^permission_required on .*refund: expected 'refund' to be a parameter,"
            r" got parameters \['refund_id', 'amount'\]$",
        ),
        (
            {"attrs": ["amount", "currency"]},
            ValueError,
            r"expected 'currency' to be a parameter",
        ),
        (
            {"context": {"region": "where"}},
            ValueError,
            r"expected 'where' to be a parameter",
        ),
        (
            {"attrs": "amount"},
            TypeError,
            r"^attrs: expected a list of argument names or a dict of attribute name"
            r" to argument name, got str$",
        ),
        (
            {"client": AsyncClient("127.0.0.1:1")},
            TypeError,
            r"^permission_required on .*refund: a sync function needs client=Client,"
            r" got AsyncClient$",
        ),
    ],
    ids=[
        "unknown-resource-arg",
        "unknown-attr",
        "unknown-context",
        "str-attrs",
        "async-client-for-sync",
    ],
)
def test_misconfigured_decorator_fails_at_decoration_time(kwargs, error, message):
    with pytest.raises(error, match=message):

        @permission_required("a.b", resource_kind="k", **kwargs)
        def refund(refund_id, amount):
            return None


def test_sync_client_for_an_async_function_is_refused():
    with pytest.raises(TypeError, match=r"an async function needs client=AsyncClient"):

        @permission_required("a.b", resource_kind="k", client=Client("127.0.0.1:1"))
        async def refund(refund_id):
            return None


def test_resource_id_of_an_unsupported_type_is_refused(daemon, client):
    @permission_required("a.b", resource_kind="k", resource_arg="rid", client=client)
    def act(rid):
        return rid

    with pytest.raises(
        TypeError,
        match=r"^argument 'rid' \(the resource id\): expected str, int or UUID,"
        r" got float$",
    ):
        act(1.5)

    assert daemon.requests == []
