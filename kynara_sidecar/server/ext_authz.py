"""Envoy's ext_authz front door: ``envoy.service.auth.v3.Authorization/Check``.

Envoy (or Istio) asks before it forwards an HTTP request; this door turns
the request's attributes into the pipeline's ``IncomingRequest`` and the
``Answer`` back into a ``CheckResponse``. Like every door it translates
only: the pipeline decides, records and counts. It is served on a listener
of its own (``ext_authz.socket``, ``ext_authz.port``), never the agent's:
a CheckRequest states the peer, which policies trust as the daemon's own
knowledge, so an agent must not be able to send one.

Mapping (``ext_authz.routes``, first match wins). A route matches on the
method (any when it names none), the host (``:authority`` lower-cased and
without the scheme's default port) and the path template: ``{name}``
matches one non-empty segment, a last ``{name...}`` the rest (possibly
empty); segments are percent-decoded before they are compared, so an
encoded literal matches as its plain form does; the query string is no
part of the match. A path that could mean another one to the upstream is
refused (400) before any route is tried: a ``.`` or ``..`` segment, or a
segment decoding to ``/``, ``\\``, NUL or another control character
(Envoy's ``normalize_path`` and ``path_with_escaped_slashes_action``
keep these from arriving at all). The route gives the action, the
resource kind and the resource id (a template over the path's names), and
the path's names become the resource's attributes, as strings. A request
no route matches is decided as action ``http.request`` on kind
``http.route``, id ``<host><path>``: denied unless a policy allows it.

Every request carries ``context.http``: ``method``, ``path`` (decoded, no
query), ``host``, ``query`` (name -> value; a repeated name's values are
joined with ``,`` as Envoy joins repeated headers) and ``headers`` (only
those named by ``ext_authz.context_headers``). The peer is the source's
mTLS principal when there is one, else its address and port.

Identity comes from headers: the delegation token (verified mode) or the
asserted chain (development mode, comma separated, user first), and in
multi-agent mode the agent's ``Bearer`` secret. The approval header names
an approved approval: the retry after require_approval. On allow the
daemon tells Envoy to remove all four before it forwards the request: the
upstream must not get a token or secret it could replay to the daemon. Each of these
headers must come once: repeated (or, in the headers map, spelled in two
cases) it is a bad request, since which one counted would depend on order.

MCP over HTTP (a route naming ``mcp_server``): the body (Envoy's
``with_request_body``) is ONE JSON-RPC message. ``tools/call`` is decided
exactly as the MCP gateway decides it (``gateway.names.tool_name``, kind
``mcp.tool``, the arguments as typed attributes, their digest in the
record); another method ``m`` is action ``mcp.<server>.<m with / as .>``
on kind ``mcp.method``, id ``<server>.<m with / as .>`` (names escaped as
``gateway.names`` escapes them). The body is strict UTF-8 without a byte
order mark, as the MCP SDK reads it. A JSON-RPC response the client sends
back (to the server's elicitation or sampling request) has no method and
is decided as method ``response``. A batch, a body that is not one JSON
object, or an object with a repeated key (which parsers read differently)
is a bad request.

Answers, as every HTTP door gives them (DESIGN.md "HTTP doors answer
alike"): allow is OK with the decision id and revisions in headers to the
upstream, the decision id in a header to the client, and the decision in
dynamic metadata; deny and require_approval are 403 with the JSON body
``{decision, reason, reason_code, decision_id}`` and, when the answer
concerns an approval, ``approval: {id, url, expires_at}``, and the headers
``kynara-decision``, ``kynara-decision-id`` and (an approval with a URL)
``kynara-approval-url``; a request that gets no decision is 400, 401,
413, 503 or 500 with ``{error: {code, message, field}}``, never OK.

On an MCP route the status and headers are the same, but the body is a
JSON-RPC error response to the request's ``id`` (null when it has none),
since an MCP client shows only that at a non-2xx status:
``{jsonrpc, id, error: {code, message, data}}``. A decision (deny or
require_approval) has code ``DENIED_CODE``, a message naming the tool (or
method) and the reason, for an approval the review URL and how to retry,
and data the plain body's fields; an error has ``REQUEST_ERROR_CODE`` or
``UNAVAILABLE_CODE``, its message, and data ``{code, field}``: the MCP
gateway's codes (``gateway.proxy``). A request refused before its route is
known (a path the upstream could misread, a CheckRequest larger than
``ext_authz.max_message_bytes`` or undecodable) gets the plain body.
"""

from __future__ import annotations

import json
import logging
import unicodedata
import urllib.parse
from collections.abc import Collection, Sequence
from typing import Any, NamedTuple

import grpc
import msgspec
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2 as authz
from envoy.type.v3 import http_status_pb2
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, status_pb2

from kynara_sidecar.audit.record import GatewayEntry
from kynara_sidecar.config import (
    TEMPLATE_PLACEHOLDER,
    ExtAuthzConfig,
    ExtAuthzRoute,
    GatewayConfig,
)
from kynara_sidecar.decision import Effect, Resource
from kynara_sidecar.errors import (
    ErrorCode,
    IdentityInvalid,
    InvalidRequest,
    KynaraError,
    RequestError,
    RequestTooLarge,
    ServiceError,
)
from kynara_sidecar.gateway.arguments import arguments_digest, to_attributes
from kynara_sidecar.gateway.names import RESOURCE_KIND as TOOL_KIND
from kynara_sidecar.gateway.names import escape, tool_name
from kynara_sidecar.gateway.proxy import (
    DENIED_CODE,
    REQUEST_ERROR_CODE,
    UNAVAILABLE_CODE,
)
from kynara_sidecar.identity import split_asserted_chain
from kynara_sidecar.pipeline import (
    MAX_REQUEST_ID_LENGTH,
    Answer,
    IncomingRequest,
    Pipeline,
)
from kynara_sidecar.server.status import status_for

__all__ = [
    "DEFAULT_ACTION",
    "DEFAULT_KIND",
    "ExtAuthzService",
    "HttpAttributes",
    "JsonRpcReply",
    "METHOD_KIND",
    "Route",
    "answer_response",
    "compile_routes",
    "error_response",
    "http_attributes",
    "jsonrpc_reply",
    "match_route",
    "translate",
]

SERVICE_NAME = authz.DESCRIPTOR.services_by_name["Authorization"].full_name

# What a request no route matches is decided as.
DEFAULT_ACTION = "http.request"
DEFAULT_KIND = "http.route"
# MCP over HTTP: a JSON-RPC method other than tools/call.
METHOD_KIND = "mcp.method"
# A JSON-RPC response (to a server's elicitation or sampling request) has no
# method; it is decided as this one.
RESPONSE_METHOD = "response"

# Headers the daemon sets; the upstream's are overwritten, so a client
# cannot pass off its own.
DECISION_HEADER = "kynara-decision"
DECISION_ID_HEADER = "kynara-decision-id"
POLICY_REVISION_HEADER = "kynara-policy-revision"
DIRECTORY_REVISION_HEADER = "kynara-directory-revision"
APPROVAL_URL_HEADER = "kynara-approval-url"
# Envoy sets it when it sent only the first max_request_bytes of the body.
PARTIAL_BODY_HEADER = "x-envoy-auth-partial-body"

# A query string of more names than this is refused rather than copied
# whole into the context (and the audit record).
MAX_QUERY_FIELDS = 256

# The HTTP status of a request that got an error instead of a decision.
HTTP_STATUS_OF_ERROR = {
    ErrorCode.INVALID_REQUEST: http_status_pb2.BadRequest,
    ErrorCode.IDENTITY_INVALID: http_status_pb2.Unauthorized,
    ErrorCode.REQUEST_TOO_LARGE: http_status_pb2.PayloadTooLarge,
    ErrorCode.POLICY_NOT_READY: http_status_pb2.ServiceUnavailable,
    ErrorCode.AUDIT_UNAVAILABLE: http_status_pb2.ServiceUnavailable,
    ErrorCode.SHUTTING_DOWN: http_status_pb2.ServiceUnavailable,
}

# How the pipeline names the agent's credential (gRPC metadata); the door
# names its own header instead.
_CREDENTIAL_WORDING = "'authorization: Bearer <secret>' metadata"

# A UTF-8 byte order mark: JSON (RFC 8259) forbids it, the MCP SDK refuses it.
_UTF8_BOM = b"\xef\xbb\xbf"

log = logging.getLogger("kynara.server")


class Route(NamedTuple):
    """A configured route, its path template parsed."""

    config: ExtAuthzRoute
    methods: frozenset[str]
    host: str
    # Literal segments as strings, names as (name,) tuples.
    segments: tuple[str | tuple[str], ...]
    # The name of a last `{name...}`, else "".
    rest: str
    # MCP routes: tool -> action.
    actions: dict[str, str]


class JsonRpcReply(NamedTuple):
    """What a refusal on an MCP route answers: a JSON-RPC error to the
    request, as an MCP client can show it."""

    # The request's id; None (JSON null) when it has none or a malformed one.
    id: int | str | None
    # The JSON-RPC method and, for tools/call, the tool; "" when not known.
    method: str = ""
    tool: str = ""
    # The header that names an approved approval, for the retry.
    approval_header: str = ""


class HttpAttributes(msgspec.Struct, frozen=True):
    """What the door reads of one HTTP request, as Envoy described it."""

    method: str
    host: str
    # The decoded path segments, and the query string undecoded.
    segments: tuple[str, ...]
    query: str = ""
    # Lower-case names; repeated headers joined with ",".
    headers: dict[str, str] = {}
    body: bytes = b""
    peer: str = ""
    request_id: str = ""

    @property
    def path(self) -> str:
        return "/" + "/".join(self.segments)


# --- routes ------------------------------------------------------------------


def _normal_host(host: str, scheme: str = "") -> str:
    """Lower-case, without the scheme's default port (any default when the
    scheme is not known)."""
    host = host.strip().lower()
    defaults = {"http": (":80",), "https": (":443",)}.get(scheme, (":80", ":443"))
    for suffix in defaults:
        name = host.removesuffix(suffix)
        if name != host and (name.endswith("]") or ":" not in name):
            return name
    return host


def _route(route: ExtAuthzRoute, where: str, gateway: GatewayConfig) -> Route:
    # Validated at load already; again here for a config built in code.
    route.validate(where)
    segments, rest = route.template(where)
    upstream = gateway.servers.get(route.mcp_server)
    actions = {**(upstream.actions if upstream else {}), **route.actions}
    return Route(
        config=route,
        methods=frozenset(m.upper() for m in route.methods),
        host=_normal_host(route.host) if route.host else "",
        segments=segments,
        rest=rest,
        actions=actions,
    )


def compile_routes(
    config: ExtAuthzConfig, gateway: GatewayConfig | None = None
) -> tuple[Route, ...]:
    """Parse every route's path and resource id templates (the parsing is
    ``config.parse_path_template``, so that loading the config checks them).

    Raises:
        ConfigError: naming the route (``ext_authz.routes[i]``) and what
            was wrong.
    """
    gateway = gateway or GatewayConfig()
    return tuple(
        _route(route, f"ext_authz.routes[{i}]", gateway)
        for i, route in enumerate(config.routes)
    )


def match_route(
    routes: Sequence[Route], method: str, host: str, segments: Sequence[str]
) -> tuple[Route, dict[str, str]] | None:
    """The first route matching, and the path's names; None when none does.

    ``host`` is normalized (``_normal_host``) and ``segments`` decoded.
    """
    for route in routes:
        if route.methods and method.upper() not in route.methods:
            continue
        if route.host and route.host != host:
            continue
        names = _match_path(route, segments)
        if names is not None:
            return route, names
    return None


def _match_path(route: Route, segments: Sequence[str]) -> dict[str, str] | None:
    fixed = len(route.segments)
    if len(segments) < fixed + bool(route.rest) or (
        not route.rest and len(segments) != fixed
    ):
        return None
    names: dict[str, str] = {}
    for template, segment in zip(route.segments, segments, strict=False):
        if isinstance(template, tuple):
            if not segment:
                return None
            names[template[0]] = segment
        elif template != segment:
            return None
    if route.rest:
        names[route.rest] = "/".join(segments[fixed:])
    return names


# --- translation -------------------------------------------------------------


def _headers_of(
    http: Any, once: Collection[str], *, lenient: bool = False
) -> dict[str, str]:
    """Lower-cased header names -> values.

    Envoy's headers map has lower-case names, a repeated header joined with
    ``,``; a name that comes in two spellings there (``Kynara-X`` and
    ``kynara-x``) is refused, as is a repeated ``once`` header in the raw
    header list: which value counted would depend on order. ``lenient``
    joins them instead (to read a request refused already).

    Raises:
        InvalidRequest: naming the header (``headers.<name>``).
    """
    joined: dict[str, str] = {}
    if http.headers:
        for key, value in http.headers.items():
            name = key.lower()
            if name in joined and lenient:
                joined[name] = f"{joined[name]},{value}"
                continue
            if name in joined:
                raise InvalidRequest(
                    f"expected the header {name!r} once, got it in two "
                    "spellings (which one counts would depend on their order)",
                    field=f"headers.{name}",
                )
            joined[name] = value
        return joined
    # encode_raw_headers: true sends header_map, values as bytes.
    for header in http.header_map.headers:
        value = header.raw_value.decode("utf-8", "replace") or header.value
        name = header.key.lower()
        if name in joined and name in once:
            raise InvalidRequest(
                f"expected the header {name!r} once, got it repeated",
                field=f"headers.{name}",
            )
        joined[name] = f"{joined[name]},{value}" if name in joined else value
    return joined


def _decoded_segments(path: str) -> tuple[str, ...]:
    if not path.startswith("/"):
        raise InvalidRequest(
            f"expected an origin-form path starting with '/', got {path[:80]!r}",
            field="path",
        )
    try:
        segments = tuple(
            urllib.parse.unquote(part, errors="strict") for part in path[1:].split("/")
        )
    except UnicodeDecodeError:
        raise InvalidRequest(
            "expected percent-encoded UTF-8 in the path, got other bytes",
            field="path",
        ) from None
    for i, segment in enumerate(segments):
        if segment in (".", ".."):
            raise InvalidRequest(
                f"expected a path without '.' or '..' segments (Envoy's "
                f"normalize_path resolves them), got {path[:200]!r}",
                field="path",
            )
        if any(c in "/\\" or unicodedata.category(c) == "Cc" for c in segment):
            raise InvalidRequest(
                f"expected path segments that do not decode to '/', '\\' or "
                f"control characters, got segment {i + 1} of {path[:200]!r}",
                field="path",
            )
    return segments


def _peer_of(source: Any) -> str:
    if source.principal:
        return source.principal
    address = source.address
    if address.HasField("socket_address"):
        socket = address.socket_address
        return f"{socket.address}:{socket.port_value}"
    if address.HasField("pipe"):
        return address.pipe.path
    return ""


def http_attributes(
    request: authz.CheckRequest, once: Collection[str] = (), *, lenient: bool = False
) -> HttpAttributes:
    """Read what the door needs of a CheckRequest.

    Args:
        request: as Envoy sent it.
        once: lower-case names of headers that must not be repeated (the
            identity headers).
        lenient: join a header that comes in two spellings rather than
            refuse it (to find the route of a request refused already).

    Raises:
        InvalidRequest: the path is not an origin-form, UTF-8 path, or has
            a segment the upstream could read as another path; a header is
            repeated that must come once.
    """
    attributes = request.attributes
    http = attributes.request.http
    headers = _headers_of(http, once, lenient=lenient)
    raw_path = http.path or headers.get(":path", "")
    path, _, query = raw_path.partition("?")
    path = path.partition("#")[0]
    host = http.host or headers.get(":authority", "")
    body = http.raw_body or http.body.encode("utf-8")
    # Envoy's x-request-id, for correlation; one longer than the pipeline
    # accepts is left out rather than refuse the request.
    request_id = http.id or headers.get("x-request-id", "")
    return HttpAttributes(
        method=(http.method or headers.get(":method", "")).upper(),
        host=_normal_host(host, http.scheme or headers.get(":scheme", "")),
        segments=_decoded_segments(path),
        query=query,
        headers=headers,
        body=body,
        peer=_peer_of(attributes.source),
        request_id=request_id if len(request_id) <= MAX_REQUEST_ID_LENGTH else "",
    )


def _query_map(query: str) -> dict[str, str]:
    try:
        pairs = urllib.parse.parse_qsl(
            query, keep_blank_values=True, max_num_fields=MAX_QUERY_FIELDS
        )
    except ValueError:
        raise InvalidRequest(
            f"expected at most {MAX_QUERY_FIELDS} query parameters",
            field="query",
        ) from None
    joined: dict[str, str] = {}
    for key, value in pairs:
        joined[key] = f"{joined[key]},{value}" if key in joined else value
    return joined


def _http_context(request: HttpAttributes, config: ExtAuthzConfig) -> dict[str, Any]:
    wanted = [name.lower() for name in config.context_headers]
    return {
        "http": {
            "method": request.method,
            "path": request.path,
            "host": request.host,
            "query": _query_map(request.query),
            "headers": {n: request.headers[n] for n in wanted if n in request.headers},
        }
    }


def _identity(request: HttpAttributes, config: ExtAuthzConfig) -> dict[str, Any]:
    headers = request.headers
    try:
        chain = split_asserted_chain(
            headers.get(config.asserted_chain_header.lower(), "")
        )
    except ValueError as err:
        raise InvalidRequest(str(err), field="asserted_chain") from None
    return {
        "asserted_chain": chain,
        "delegation_token": headers.get(config.token_header.lower(), "").strip(),
        "authorization": headers.get(config.credential_header.lower(), ""),
        "approval_id": headers.get(config.approval_header.lower(), "").strip(),
    }


def _no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found = dict(pairs)
    if len(found) != len(pairs):
        seen: set[str] = set()
        repeated = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise InvalidRequest(
            f"expected each key once in a JSON object, got {repeated[:80]!r} "
            "twice (parsers disagree on which one counts)",
            field="body",
        )
    return found


def _no_constant(name: str) -> Any:
    raise InvalidRequest(
        f"expected standard JSON, got the non-standard number {name}", field="body"
    )


def _json_rpc(request: HttpAttributes) -> dict[str, Any]:
    if request.headers.get(PARTIAL_BODY_HEADER) == "true":
        raise InvalidRequest(
            "expected the whole body, got only its start: raise Envoy's "
            "with_request_body.max_request_bytes",
            field="body",
        )
    if not request.body:
        raise InvalidRequest(
            "expected a JSON-RPC message in the body, got none: set Envoy's "
            "with_request_body for this route, and route only POST here",
            field="body",
        )
    # Strict UTF-8, as the MCP SDK reads the body: json.loads(bytes) would
    # also take UTF-16 and a byte order mark.
    if request.body.startswith(_UTF8_BOM):
        raise InvalidRequest(
            "expected a UTF-8 body without a byte order mark, got one", field="body"
        )
    try:
        text = request.body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InvalidRequest(
            f"expected a UTF-8 body, got a byte that is not UTF-8 at offset "
            f"{err.start}",
            field="body",
        ) from None
    try:
        message = json.loads(
            text, object_pairs_hook=_no_repeats, parse_constant=_no_constant
        )
    except (ValueError, RecursionError) as err:
        raise InvalidRequest(
            f"expected one JSON-RPC message in the body, could not parse it: "
            f"{str(err)[:200]}",
            field="body",
        ) from None
    if isinstance(message, list):
        raise InvalidRequest(
            "expected one JSON-RPC message, got a batch array (not accepted)",
            field="body",
        )
    if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
        raise InvalidRequest(
            'expected a JSON-RPC 2.0 object ({"jsonrpc": "2.0", ...}) in the body',
            field="body",
        )
    return message


def _method_action(server: str, method: str) -> tuple[str, str]:
    parts = method.split("/")
    if not all(parts):
        raise InvalidRequest(
            f"expected a method of non-empty '/'-separated names, got {method[:80]!r}",
            field="body.method",
        )
    dotted = ".".join(escape(part) for part in parts)
    return f"mcp.{escape(server)}.{dotted}", f"{escape(server)}.{dotted}"


def _mcp_request(
    route: Route, request: HttpAttributes
) -> tuple[str, Resource, GatewayEntry | None]:
    """The action, resource and gateway entry of an MCP-over-HTTP body."""
    server = route.config.mcp_server
    message = _json_rpc(request)
    method = message.get("method")
    if method is None and ("result" in message or "error" in message):
        method = RESPONSE_METHOD
    if not isinstance(method, str) or not method:
        raise InvalidRequest(
            "expected a JSON-RPC request with a method, got none",
            field="body.method",
        )
    if method != "tools/call":
        action, resource_id = _method_action(server, method)
        return action, Resource(kind=METHOD_KIND, id=resource_id), None
    params = message.get("params")
    tool = params.get("name") if isinstance(params, dict) else None
    if not isinstance(tool, str) or not tool:
        raise InvalidRequest(
            "expected tools/call params with a tool name", field="body.params.name"
        )
    args = params.get("arguments")
    try:
        attributes = to_attributes(args)
    except InvalidRequest as err:
        raise InvalidRequest(str(err), field=f"body.params.{err.field}") from None
    name = tool_name(server, tool, route.actions)
    resource = Resource(kind=TOOL_KIND, id=name.resource_id, attributes=attributes)
    entry = GatewayEntry(server=server, tool=tool, args_digest=arguments_digest(args))
    return name.action, resource, entry


def translate(
    request: HttpAttributes, routes: Sequence[Route], config: ExtAuthzConfig
) -> IncomingRequest:
    """The pipeline's request for one HTTP request.

    Raises:
        InvalidRequest: the query, an MCP body or the asserted chain is
            not acceptable.
    """
    matched = match_route(routes, request.method, request.host, request.segments)
    gateway = None
    if matched is None:
        action, resource = (
            DEFAULT_ACTION,
            Resource(kind=DEFAULT_KIND, id=f"{request.host}{request.path}"),
        )
    elif matched[0].config.mcp_server:
        action, resource, gateway = _mcp_request(matched[0], request)
    else:
        route, names = matched
        resource_id = TEMPLATE_PLACEHOLDER.sub(
            lambda m: names[m.group(1)], route.config.resource_id
        )
        action = route.config.action
        resource = Resource(
            kind=route.config.resource_kind, id=resource_id, attributes=dict(names)
        )
    return IncomingRequest(
        action=action,
        resource=resource,
        context=_http_context(request, config),
        request_id=request.request_id,
        peer=request.peer,
        gateway=gateway,
        **_identity(request, config),
    )


def jsonrpc_reply(
    request: HttpAttributes, routes: Sequence[Route], approval_header: str = ""
) -> JsonRpcReply | None:
    """How to answer a refusal of ``request``: as a JSON-RPC error when it
    matched an MCP route, else None (the plain JSON body).

    Reads the body leniently (it may be the very thing refused): the id
    only when it is one JSON-RPC allows (a string or an integer), the
    method and tool only when they are strings.
    """
    matched = match_route(routes, request.method, request.host, request.segments)
    if matched is None or not matched[0].config.mcp_server:
        return None
    try:
        message = json.loads(request.body)
    except (ValueError, RecursionError):
        message = None
    if not isinstance(message, dict):
        return JsonRpcReply(id=None, approval_header=approval_header)
    request_id = message.get("id")
    if isinstance(request_id, bool) or not isinstance(request_id, int | str):
        request_id = None
    method = message.get("method")
    method = method if isinstance(method, str) else ""
    params = message.get("params")
    tool = params.get("name") if isinstance(params, dict) else None
    return JsonRpcReply(
        id=request_id,
        method=method,
        tool=tool if method == "tools/call" and isinstance(tool, str) else "",
        approval_header=approval_header,
    )


# --- answers -----------------------------------------------------------------


def _header(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, value=value),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


def _metadata(answer: Answer) -> dict[str, str]:
    decision = answer.decision
    return {
        "decision": str(decision.effect),
        "decision_id": answer.decision_id,
        "policy_revision": decision.policy_revision,
        "directory_revision": decision.directory_revision,
        "reason_code": str(decision.reason_code),
    }


def _jsonrpc_body(reply: JsonRpcReply, code: int, message: str, data: Any) -> str:
    return json.dumps(
        {
            "jsonrpc": "2.0",
            "id": reply.id,
            "error": {"code": code, "message": message, "data": data},
        },
        separators=(",", ":"),
    )


def _refused_message(reply: JsonRpcReply, answer: Answer) -> str:
    """What an MCP client shows for a deny or require_approval."""
    decision = answer.decision
    if reply.tool:
        what = f"tool {reply.tool!r}"
    elif reply.method:
        what = f"method {reply.method!r}"
    else:
        what = "the request"
    if decision.effect is not Effect.REQUIRE_APPROVAL:
        return f"{what} is not permitted: {decision.reason}"
    text = f"{what} needs approval: {decision.reason}"
    approval = answer.approval
    if approval is not None:
        text += (
            f"; review at {approval.url or '(no review URL)'} (approval "
            f"{approval.id}, expires {approval.expires_at}), then send the "
            f"request again with the header '{reply.approval_header}: "
            f"{approval.id}'"
        )
    return text


def answer_response(
    answer: Answer,
    remove_headers: Sequence[str] = (),
    jsonrpc: JsonRpcReply | None = None,
) -> authz.CheckResponse:
    """OK for allow; 403 with the JSON body for deny and require_approval.

    Args:
        answer: the pipeline's answer.
        remove_headers: request headers the upstream must not see (the
            identity and approval headers), on allow.
        jsonrpc: for an MCP route's request, answer deny and
            require_approval with a JSON-RPC error to it carrying the
            plain body's fields as data.
    """
    decision = answer.decision
    if decision.effect is Effect.ALLOW:
        response = authz.CheckResponse(
            status=status_pb2.Status(code=code_pb2.OK),
            ok_response=authz.OkHttpResponse(
                headers=[
                    _header(DECISION_ID_HEADER, answer.decision_id),
                    _header(POLICY_REVISION_HEADER, decision.policy_revision),
                    _header(DIRECTORY_REVISION_HEADER, decision.directory_revision),
                ],
                headers_to_remove=list(remove_headers),
                response_headers_to_add=[
                    _header(DECISION_ID_HEADER, answer.decision_id)
                ],
            ),
        )
        response.dynamic_metadata.update(_metadata(answer))
        return response
    body: dict[str, Any] = {
        "decision": str(decision.effect),
        "reason": decision.reason,
        "reason_code": str(decision.reason_code),
        "decision_id": answer.decision_id,
    }
    headers = [
        _header("content-type", "application/json"),
        _header(DECISION_HEADER, str(decision.effect)),
        _header(DECISION_ID_HEADER, answer.decision_id),
    ]
    approval = answer.approval
    if approval is not None:
        body["approval"] = {
            "id": approval.id,
            "url": approval.url,
            "expires_at": approval.expires_at,
        }
        if approval.url:
            headers.append(_header(APPROVAL_URL_HEADER, approval.url))
    if jsonrpc is None:
        text = json.dumps(body, separators=(",", ":"))
    else:
        text = _jsonrpc_body(
            jsonrpc, DENIED_CODE, _refused_message(jsonrpc, answer), body
        )
    response = authz.CheckResponse(
        status=status_pb2.Status(code=code_pb2.PERMISSION_DENIED),
        denied_response=authz.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=http_status_pb2.Forbidden),
            headers=headers,
            body=text,
        ),
    )
    response.dynamic_metadata.update(_metadata(answer))
    return response


def error_response(
    error: KynaraError, field: str = "", jsonrpc: JsonRpcReply | None = None
) -> authz.CheckResponse:
    """A denied response carrying the error, never OK.

    Args:
        error: why no decision was given.
        field: the field to name instead of the error's own (a header).
        jsonrpc: for an MCP route's request, the body is a JSON-RPC error
            to it, coded as the MCP gateway codes the same error.
    """
    status, code, own_field = status_for(error)
    field = field or own_field
    if jsonrpc is None:
        text = json.dumps(
            {"error": {"code": code, "message": str(error), "field": field}},
            separators=(",", ":"),
        )
    else:
        data = {"code": code, "field": field} if field else {"code": code}
        rpc_code = (
            REQUEST_ERROR_CODE if isinstance(error, RequestError) else UNAVAILABLE_CODE
        )
        text = _jsonrpc_body(jsonrpc, rpc_code, str(error), data)
    return authz.CheckResponse(
        status=status_pb2.Status(code=status.value[0], message=code),
        denied_response=authz.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(
                code=HTTP_STATUS_OF_ERROR.get(
                    ErrorCode(code), http_status_pb2.InternalServerError
                )
            ),
            headers=[_header("content-type", "application/json")],
            body=text,
        ),
    )


# --- the service -------------------------------------------------------------


class ExtAuthzService:
    """Answers Envoy's Check through the pipeline.

    Args:
        pipeline: the decision pipeline.
        config: the ``ext_authz`` section.
        max_message_bytes: larger CheckRequests get ``request_too_large``.
        gateway: the ``gateway`` section, whose servers' tool -> action
            mappings MCP routes share.

    Raises:
        ConfigError: a route's templates are malformed.
    """

    def __init__(
        self,
        pipeline: Pipeline,
        config: ExtAuthzConfig,
        max_message_bytes: int,
        gateway: GatewayConfig | None = None,
    ):
        self._pipeline = pipeline
        self._config = config
        self._max_bytes = max_message_bytes
        self._routes = compile_routes(config, gateway)
        # Pipeline fields -> the header that carried them, for error bodies.
        self._fields = {
            "authorization": config.credential_header.lower(),
            "delegation_token": config.token_header.lower(),
            "asserted_chain": config.asserted_chain_header.lower(),
            "approval_id": config.approval_header.lower(),
        }
        # None of the identity and approval headers reaches the upstream:
        # a token or secret there could be replayed to the daemon.
        self._remove = list(dict.fromkeys(self._fields.values()))
        # Identity headers: each must come once.
        self._once = frozenset(self._fields.values())

    def register(self, server: grpc.aio.Server) -> None:
        """Serve Check on ``server``, reading requests as raw bytes."""
        handlers = {
            "Check": grpc.unary_unary_rpc_method_handler(
                self.Check,
                response_serializer=authz.CheckResponse.SerializeToString,
            ),
        }
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),)
        )
        server.add_registered_method_handlers(SERVICE_NAME, handlers)

    def _field(self, error: KynaraError) -> str:
        field = getattr(error, "field", "")
        head, bracket, index = field.partition("[")
        header = self._fields.get(head)
        if header is None:
            return field
        return f"headers.{header}" + (f"[{index}" if bracket else "")

    def _check_request(self, raw: bytes) -> authz.CheckRequest:
        if len(raw) > self._max_bytes:
            raise RequestTooLarge(
                f"expected at most {self._max_bytes} bytes "
                f"(ext_authz.max_message_bytes: headers plus body), got {len(raw)}"
            )
        try:
            return authz.CheckRequest.FromString(raw)
        except DecodeError as err:
            raise InvalidRequest(
                f"expected a CheckRequest in protobuf encoding, could not "
                f"decode it: {err}"
            ) from None

    def _jsonrpc(self, request: authz.CheckRequest | None) -> JsonRpcReply | None:
        """The JSON-RPC reply of a refused request on an MCP route; None
        for any other, or when its route cannot be known."""
        if request is None:
            return None
        try:
            # Leniently: a repeated header may be what was refused.
            attributes = http_attributes(request, lenient=True)
        except KynaraError:
            return None
        return jsonrpc_reply(attributes, self._routes, self._fields["approval_id"])

    def _error(
        self, err: KynaraError, request: authz.CheckRequest | None
    ) -> authz.CheckResponse:
        field = self._field(err)
        if field == f"headers.{self._fields['authorization']}" and (
            _CREDENTIAL_WORDING in str(err)
        ):
            # The pipeline speaks of gRPC metadata; here it is a header.
            wording = f"a '{self._fields['authorization']}: Bearer <secret>' header"
            err = IdentityInvalid(str(err).replace(_CREDENTIAL_WORDING, wording))
        return error_response(err, field, self._jsonrpc(request))

    async def Check(  # noqa: N802 (gRPC method name)
        self, raw: bytes, context: grpc.aio.ServicerContext
    ) -> authz.CheckResponse:
        request = None
        try:
            request = self._check_request(raw)
            incoming = translate(
                http_attributes(request, self._once), self._routes, self._config
            )
        except KynaraError as err:
            self._pipeline.refuse(err)
            return self._error(err, request)
        try:
            answer = await self._pipeline.decide(incoming)
        except KynaraError as err:
            return self._error(err, request)
        except Exception:
            log.exception("check failed", extra={"fields": {"component": "server"}})
            return self._error(ServiceError("internal error in the daemon"), request)
        if answer.decision.effect is Effect.ALLOW:
            return answer_response(answer, self._remove)
        return answer_response(answer, self._remove, self._jsonrpc(request))
