"""The agent-facing MCP server of the gateway: every tool, per agent.

One ``Gateway`` serves every transport (``http`` and ``stdio`` build their
SDK ``Server`` with ``Gateway.server``). A transport says who is asking with
a ``Caller`` per request; the gateway turns it into the delegation chain
exactly as a decision would (``Pipeline.chain_of``), so a caller without a
token (or, in development mode, a chain) gets a JSON-RPC error naming what
is missing and where it goes, and no tools.

``tools/list`` shows the catalog's tools that some request by this chain
could be allowed to use (``Pipeline.could_allow``), paged by the gateway's
own opaque cursor over that filtered list, so hidden tools never leak, not
even as a gap between pages.

``tools/call`` decides every call in the one pipeline (action
``names.tool_name``'s, resource kind ``mcp.tool``, the arguments as typed
attributes, the record's ``gateway`` entry with the argument digest) and:

- allow: forwards the call upstream; the upstream's result, or its own
  JSON-RPC error, comes back unchanged. When the upstream gives neither
  (unreachable, timed out, closed: ``upstream_unavailable``; a result that
  is not a valid tool result: ``upstream_invalid``), JSON-RPC error
  ``UPSTREAM_CODE`` naming server and tool, data ``{code, server,
  decision_id}``, and a log line;
- deny: JSON-RPC error ``DENIED_CODE`` "tool ... is not permitted: <why>",
  data ``{decision, reason_code, reason, decision_id}``; nothing forwarded;
- require_approval: a tool error (``isError``) with the reason and the
  approval URL, structured content ``{decision, reason, decision_id,
  approval: {id, url, expires_at}}``. A retry after the review (the answer
  cites an approved approval) is decided again with that approval and
  forwarded when allowed. With ``gateway.approval_wait: elicit`` and a
  client that declared URL elicitation on a session that can carry
  server requests, the client is asked to show the URL, and the call waits
  for the review (``approval_wait_seconds``) before it is decided again.

A name the catalog lacks is named as its tool would be (``_absent_name``).
When no request by this chain could be allowed that action, the call is
decided (an audited deny) and answered exactly as a hidden tool's, so an
agent cannot tell the tools hidden from it from those that do not exist.
Otherwise (such a tool would be listed) a tool of a configured server that
is not connected now is decided like any call: deny and require_approval
are answered as above; allow (or a cited grant, left unused for the retry
once the server is back) gets an ``outcome`` record
"upstream_unavailable" and ``UPSTREAM_CODE`` with data ``{code, server,
decision_id}``. Any other such name is refused with ``-32602`` "unknown
tool" and counted as a refusal. A caller without a token or chain
is counted as a refusal too. Errors the pipeline raises become
``REQUEST_ERROR_CODE`` (the caller sent something bad: ``identity_invalid``,
``invalid_request`` with its field) or ``UNAVAILABLE_CODE``
(``policy_not_ready``, ``audit_unavailable``, ``shutting_down``), the stable
code in ``data.code``.

Cancellation: a call the agent cancels while its decision is being made
lets the decision finish and commit; a call cancelled while upstream is
cancelled there too (the catalog sends ``notifications/cancelled``); a
call cancelled while it waits for an elicited review stops waiting. Each
way an ``outcome`` record "cancelled" names the decision.

Changes: when the catalog or the policies change, every open session's
visible set is computed again with its last caller, and a session whose
set changed is sent ``notifications/tools/list_changed`` (on its standalone
channel for handshake-era sessions; on its ``subscriptions/listen`` streams
on the 2026-07-28 protocol, which has no sessions).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import logging
import secrets
import weakref
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import anyio
import mcp_types as types
import msgspec
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel.server import NotificationOptions, Server
from mcp.server.models import InitializationOptions
from mcp.server.subscriptions import (
    InMemorySubscriptionBus,
    ListenHandler,
    ToolsListChanged,
)
from mcp.shared.exceptions import MCPError

from kynara_sidecar import __version__
from kynara_sidecar.approvals.model import Approval, ApprovalState
from kynara_sidecar.audit.record import GatewayEntry
from kynara_sidecar.config import ApprovalWait, GatewayConfig
from kynara_sidecar.decision import Effect, Resource
from kynara_sidecar.errors import (
    IdentityInvalid,
    InvalidRequest,
    KynaraError,
    RequestError,
)
from kynara_sidecar.gateway.arguments import arguments_digest, to_attributes
from kynara_sidecar.gateway.catalog import (
    UPSTREAM_UNAVAILABLE,
    Catalog,
    CatalogTool,
    UpstreamError,
)
from kynara_sidecar.gateway.names import (
    RESOURCE_KIND,
    SEPARATOR,
    ToolName,
    escape,
    tool_name,
)
from kynara_sidecar.pipeline import (
    MAX_REQUEST_ID_LENGTH,
    MAX_RESOURCE_ID_LENGTH,
    Answer,
    IncomingRequest,
    Pipeline,
)
from kynara_sidecar.policy.names import MAX_NAME_LENGTH, is_valid_name

__all__ = [
    "DENIED_CODE",
    "REQUEST_ERROR_CODE",
    "UNAVAILABLE_CODE",
    "UPSTREAM_CODE",
    "Caller",
    "Gateway",
    "kynara_error",
]

log = logging.getLogger("kynara.gateway")

# JSON-RPC error codes of the gateway (the -32000..-32099 range JSON-RPC
# leaves to servers). Every one carries the stable code in data.code.
# The policies do not permit this call.
DENIED_CODE = -32001
# The caller sent something the daemon cannot decide on: identity_invalid,
# invalid_request (data.field names the field), request_too_large.
REQUEST_ERROR_CODE = -32002
# The daemon cannot decide now: policy_not_ready, audit_unavailable,
# shutting_down; the same call may succeed later.
UNAVAILABLE_CODE = -32003
# The upstream server could not give the tool's result: unreachable, timed
# out, closed (data.code upstream_unavailable) or its result is malformed
# (upstream_invalid); data.server names it. An upstream's own JSON-RPC error
# is passed on unchanged instead.
UPSTREAM_CODE = -32004


class Caller(msgspec.Struct, frozen=True):
    """Who sends a request, as the transport saw it.

    ``token_from`` and ``chain_from`` say where the transport reads the
    delegation token and the asserted chain from (a header, an environment
    variable or a file), for the error that says they are missing.
    """

    authorization: str = ""
    delegation_token: str = ""
    asserted_chain: tuple[str, ...] = ()
    peer: str = ""
    token_from: str = ""
    chain_from: str = ""


CallerOf = Callable[[ServerRequestContext[Any, Any]], Caller]


def kynara_error(err: KynaraError) -> MCPError:
    """The JSON-RPC error for a pipeline error: its message, the stable code
    (and for a request error, the field) in data."""
    data: dict[str, Any] = {"code": str(getattr(err, "code", "internal"))}
    field = getattr(err, "field", "")
    if field:
        data["field"] = field
    code = REQUEST_ERROR_CODE if isinstance(err, RequestError) else UNAVAILABLE_CODE
    return MCPError(code, str(err), data)


def _text_result(text: str, structured: dict[str, Any]) -> types.CallToolResult:
    return types.CallToolResult(
        content=[types.TextContent(type="text", text=text)],
        structured_content=structured,
        is_error=True,
    )


class _Cursors:
    """Opaque page cursors: the exposed name a page ended with, signed with
    a key of this gateway so a forged or foreign cursor is refused rather
    than read. A cursor names a position, not an index, so a list that
    changes between pages neither repeats nor skips a visible tool."""

    def __init__(self) -> None:
        self._key = secrets.token_bytes(32)

    def _tag(self, name: bytes) -> str:
        digest = hmac.new(self._key, name, hashlib.sha256).digest()[:16]
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")

    def make(self, after: str) -> str:
        raw = after.encode()
        body = base64.urlsafe_b64encode(raw).decode().rstrip("=")
        return f"{body}.{self._tag(raw)}"

    def read(self, cursor: str) -> str:
        """The name the page ended with.

        Raises:
            MCPError: -32602, the cursor is not one this gateway gave out.
        """
        body, _, tag = cursor.partition(".")
        try:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        except ValueError:
            raw = None
        if raw is None or not hmac.compare_digest(tag, self._tag(raw)):
            raise MCPError(
                types.INVALID_PARAMS,
                "invalid cursor: expected a nextCursor from this gateway's "
                "tools/list, got one it did not give out",
                {"code": "invalid_request", "field": "cursor"},
            )
        return raw.decode()


class _GatewayServer(Server):
    """The SDK's server, advertising ``tools.listChanged`` on handshake-era
    sessions whoever asks for its initialization options (the Streamable
    HTTP session manager asks with none: the SDK's default is false)."""

    def create_initialization_options(
        self,
        notification_options: NotificationOptions | None = None,
        experimental_capabilities: dict[str, dict[str, Any]] | None = None,
        extensions: dict[str, dict[str, Any]] | None = None,
    ) -> InitializationOptions:
        return super().create_initialization_options(
            notification_options or NotificationOptions(tools_changed=True),
            experimental_capabilities,
            extensions,
        )


class _Watched:
    """One open session (or listen stream) and what it was last shown."""

    def __init__(
        self,
        caller: Caller,
        visible: frozenset[str],
        notify: Callable[[], Any],
    ):
        self.caller = caller
        self.visible = visible
        self.notify = notify


class Gateway:
    """The MCP gateway's agent-facing side.

    Args:
        config: the ``gateway`` section.
        pipeline: the daemon's decision pipeline.
        catalog: the upstream tools (started by the daemon).
        development: identity.mode is development (callers assert a chain
            instead of presenting a token).
    """

    def __init__(
        self,
        config: GatewayConfig,
        pipeline: Pipeline,
        catalog: Catalog,
        *,
        development: bool = False,
    ):
        self._config = config
        self._pipeline = pipeline
        self._catalog = catalog
        self._development = development
        self._cursors = _Cursors()
        # Handshake-era connections and listen streams, each by a key of
        # its own, dropped when it closes.
        self._sessions: dict[object, _Watched] = {}
        self._by_connection: weakref.WeakKeyDictionary[object, object] = (
            weakref.WeakKeyDictionary()
        )
        self._refresh_task: asyncio.Task[None] | None = None
        self._refresh_again = False
        self._unwatch = pipeline.watch_policies(lambda _: self.changed())
        self._closed = False

    # ------------------------------------------------------------ server

    def server(self, caller_of: CallerOf, name: str = "kynara-gateway") -> Server:
        """An SDK ``Server`` for one transport; ``caller_of`` says who sent
        each request."""

        async def list_tools(
            ctx: ServerRequestContext[Any, Any],
            params: types.PaginatedRequestParams | None,
        ) -> types.ListToolsResult:
            return self._list_tools(ctx, caller_of(ctx), params)

        async def call_tool(
            ctx: ServerRequestContext[Any, Any],
            params: types.CallToolRequestParams,
        ) -> types.CallToolResult:
            try:
                result = await self._call_tool(ctx, caller_of(ctx), params)
            except BaseException as err:
                self._pipeline.count_gateway_call(_failed_outcome(err))
                raise
            self._pipeline.count_gateway_call(_result_outcome(result))
            return result

        async def listen(
            ctx: ServerRequestContext[Any, Any],
            params: types.SubscriptionsListenRequestParams,
        ) -> types.SubscriptionsListenResult:
            return await self._listen(ctx, caller_of(ctx), params)

        def input_schema(exposed: str) -> dict[str, Any] | None:
            tool = self._catalog.get(exposed)
            return tool.definition.input_schema if tool is not None else None

        return _GatewayServer(
            name,
            version=__version__,
            instructions="Tools of the upstream MCP servers this agent may use.",
            # Mcp-Param-* header checks read the catalog, not a tools/list
            # per call (which would also be the caller's filtered view).
            get_tool_input_schema=input_schema,
            on_list_tools=list_tools,
            on_call_tool=call_tool,
            on_subscriptions_listen=listen,
        )

    # ------------------------------------------------------------ identity

    def _chain(self, caller: Caller) -> tuple[str, ...]:
        """The caller's chain, or the JSON-RPC error saying why there is none."""
        self._require_identity(caller)
        try:
            return self._pipeline.chain_of(self._incoming(caller))
        except KynaraError as err:
            self._pipeline.refuse(err)
            raise kynara_error(err) from None

    def _require_identity(self, caller: Caller) -> None:
        """The JSON-RPC error (counted) when the caller sent no token, or in
        development mode no chain, naming where it goes; checking it is
        left to ``Pipeline.chain_of`` or ``decide``."""
        missing: RequestError | None = None
        if self._development and not caller.asserted_chain:
            missing = InvalidRequest(
                "no asserted chain: identity.mode development expects the user "
                "(and any agents before this one), comma-separated, user "
                f"first, in {caller.chain_from or 'the asserted chain'}",
                field="asserted_chain",
            )
        elif not self._development and not caller.delegation_token:
            missing = IdentityInvalid(
                "no delegation token: the user's token is expected in "
                f"{caller.token_from or 'the delegation token'}; no tools "
                "without it",
                field="delegation_token",
            )
        if missing is not None:
            self._pipeline.refuse(missing)
            raise kynara_error(missing)

    @staticmethod
    def _incoming(
        caller: Caller,
        *,
        action: str = "mcp.tools.list",
        resource: Resource | None = None,
        request_id: str = "",
        gateway: GatewayEntry | None = None,
        approval_id: str = "",
    ) -> IncomingRequest:
        return IncomingRequest(
            action=action,
            resource=resource or Resource(RESOURCE_KIND),
            asserted_chain=caller.asserted_chain,
            delegation_token=caller.delegation_token,
            authorization=caller.authorization,
            peer=caller.peer,
            request_id=request_id,
            gateway=gateway,
            approval_id=approval_id,
        )

    def _visible(self, chain: Sequence[str]) -> list[CatalogTool]:
        """The catalog's tools some request by ``chain`` could be allowed.

        Raises:
            PolicyNotReady, AuditUnavailable: no policy set is active.
        """
        tools = self._catalog.tools()
        shown = self._pipeline.could_allow(
            chain, [(RESOURCE_KIND, tool.name.action) for tool in tools]
        )
        return [tool for tool, ok in zip(tools, shown, strict=True) if ok]

    def _could_allow(self, chain: Sequence[str], action: str) -> bool:
        """Whether some request by ``chain`` for ``action`` could be allowed;
        a pipeline error becomes its counted JSON-RPC error."""
        try:
            (ok,) = self._pipeline.could_allow(chain, [(RESOURCE_KIND, action)])
        except KynaraError as err:
            self._pipeline.refuse(err)
            raise kynara_error(err) from None
        return ok

    def _absent_name(self, exposed: str) -> ToolName:
        """How a tool called ``exposed`` would be named, were it in the catalog.

        The part before the first ``__`` is a server when it is a configured
        server's escaped name and a tool part follows (that server's
        ``actions`` apply); otherwise the whole name is the tool of a server
        part no configured server has (``_``, or more ``_`` than any
        configured server's escaped name). When that gives an action longer
        than a request may carry (``MAX_NAME_LENGTH``), a resource id longer
        than ``MAX_RESOURCE_ID_LENGTH``, or an empty tool part (the name
        ``""``), the tool part is instead ``h`` and the first 32 hex digits
        of the name's SHA-256, under the no-server part. So every name the
        catalog lacks is decided, as its tool would be, and audited; none is
        refused as malformed.
        """
        servers = {escape(server): server for server in self._config.servers}
        head, separator, rest = exposed.partition(SEPARATOR)
        server = servers.get(head) if separator and rest else None
        if server is not None:
            name = tool_name(server, rest, self._config.servers[server].actions)
            if _decidable(name):
                return name
        nobody = "_"
        while nobody in servers:
            nobody += "_"
        plain = f"{nobody}.{escape(exposed)}"
        name = ToolName(
            server="",
            tool=exposed,
            exposed=exposed,
            action=f"mcp.{plain}",
            resource_id=plain,
        )
        if _decidable(name):
            return name
        digest = hashlib.sha256(exposed.encode("utf-8", "surrogatepass")).hexdigest()
        plain = f"{nobody}.h{digest[:32]}"
        return ToolName(
            server="",
            tool=exposed,
            exposed=exposed,
            action=f"mcp.{plain}",
            resource_id=plain,
        )

    # ------------------------------------------------------------ tools/list

    def _list_tools(
        self,
        ctx: ServerRequestContext[Any, Any],
        caller: Caller,
        params: types.PaginatedRequestParams | None,
    ) -> types.ListToolsResult:
        chain = self._chain(caller)
        try:
            visible = self._visible(chain)
        except KynaraError as err:
            self._pipeline.refuse(err)
            raise kynara_error(err) from None
        self._watch_session(ctx, caller, visible)
        start = 0
        if params is not None and params.cursor is not None:
            after = self._cursors.read(params.cursor)
            start = next(
                (i for i, tool in enumerate(visible) if tool.name.exposed > after),
                len(visible),
            )
        page = visible[start : start + self._config.page_size]
        more = start + len(page) < len(visible)
        return types.ListToolsResult(
            tools=[tool.definition for tool in page],
            next_cursor=self._cursors.make(page[-1].name.exposed) if more else None,
        )

    # ------------------------------------------------------------ tools/call

    async def _call_tool(
        self,
        ctx: ServerRequestContext[Any, Any],
        caller: Caller,
        params: types.CallToolRequestParams,
    ) -> types.CallToolResult:
        tool = self._catalog.get(params.name)
        name = tool.name if tool is not None else self._absent_name(params.name)
        # A catalogued tool's call establishes the chain once, in decide.
        self._require_identity(caller)
        # A tool this chain could be allowed, of a configured server that is
        # not connected now: decided like any call, never forwarded.
        down = False
        if tool is None and self._could_allow(self._chain(caller), name.action):
            # Such a tool would be listed: saying it does not exist (or that
            # its server is down) tells nothing the list does not.
            down = bool(name.server) and not self._catalog.present(name.server)
            if not down:
                self._refuse_unknown(params.name)
        arguments = params.arguments
        try:
            attributes = to_attributes(arguments)
        except KynaraError as err:
            self._pipeline.refuse(err)
            raise kynara_error(err) from None
        entry = GatewayEntry(
            server=name.server,
            tool=name.tool,
            args_digest=arguments_digest(arguments),
        )
        request_id = "" if ctx.request_id is None else str(ctx.request_id)
        request = self._incoming(
            caller,
            action=name.action,
            resource=Resource(RESOURCE_KIND, name.resource_id, attributes),
            request_id=request_id if len(request_id) <= MAX_REQUEST_ID_LENGTH else "",
            gateway=entry,
        )
        answer = await self._decide(request)
        if down:
            return await self._unavailable(params.name, name, answer, entry)
        if tool is None:
            # No request by this chain could be allowed such a tool, so the
            # policies deny it (engine.could_allow is sound against
            # evaluate) and no approval was opened: the agent is answered
            # exactly as for a tool that exists but is hidden from it.
            raise _denied(params.name, answer)
        if _approved(answer):
            # A retry after the review: the grant is used by this very call.
            answer = await self._decide(
                msgspec.structs.replace(request, approval_id=answer.approval.id)
            )
        elif answer.decision.effect is Effect.REQUIRE_APPROVAL:
            answer = await self._wait_for_review(ctx, request, answer)
        effect = answer.decision.effect
        if effect is Effect.DENY:
            raise _denied(params.name, answer)
        if effect is Effect.REQUIRE_APPROVAL:
            return _approval_result(params.name, answer)
        return await self._forward(tool, arguments, answer, entry)

    def _refuse_unknown(self, exposed: str) -> NoReturn:
        """Refuse (and count) a call of ``exposed``, a tool the catalog lacks
        that this chain could be allowed: a stale list."""
        self._pipeline.refuse(InvalidRequest(f"unknown tool {exposed!r}", field="name"))
        raise MCPError(
            types.INVALID_PARAMS,
            f"unknown tool {exposed!r}: not a tool of this gateway "
            "(tools/list shows the ones this agent may use)",
            {"code": "invalid_request", "field": "name"},
        )

    async def _unavailable(
        self, exposed: str, name: ToolName, answer: Answer, entry: GatewayEntry
    ) -> types.CallToolResult:
        """Answer the decided call of a tool whose server is not connected.

        A deny or a pending approval is answered as for any tool (an
        approval opened now binds the request, so the retry once the server
        is back goes through). An allow, or an approved grant (left unused:
        the retry uses it), is recorded as outcome "upstream_unavailable"
        and answered with ``UPSTREAM_CODE``.
        """
        effect = answer.decision.effect
        if effect is Effect.DENY:
            raise _denied(exposed, answer)
        if effect is Effect.REQUIRE_APPROVAL and not _approved(answer):
            return _approval_result(exposed, answer)
        await self._record_outcome(answer, UPSTREAM_UNAVAILABLE, entry)
        raise MCPError(
            UPSTREAM_CODE,
            f"tool {exposed!r} is unavailable: upstream server "
            f"{name.server!r} is not connected; its tools come back when it "
            "reconnects",
            {
                "code": UPSTREAM_UNAVAILABLE,
                "server": name.server,
                "decision_id": answer.decision_id,
            },
        )

    async def _decide(self, request: IncomingRequest) -> Answer:
        """Decide ``request``; a cancel meanwhile lets the decision commit,
        records it as cancelled, and then cancels the call."""
        task = asyncio.ensure_future(self._pipeline.decide(request))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            with anyio.CancelScope(shield=True):
                try:
                    answer = await task
                except KynaraError:
                    raise asyncio.CancelledError() from None
                await self._record_cancelled(answer, request.gateway)
            raise
        except KynaraError as err:
            raise kynara_error(err) from None

    async def _forward(
        self,
        tool: CatalogTool,
        arguments: dict[str, Any] | None,
        answer: Answer,
        entry: GatewayEntry,
    ) -> types.CallToolResult:
        try:
            return await self._catalog.call(tool, arguments)
        except UpstreamError as err:
            log.warning(
                "upstream call failed",
                extra={
                    "fields": {
                        "component": "gateway",
                        "server": tool.name.server,
                        "tool": tool.name.tool,
                        "decision_id": answer.decision_id,
                        "code": err.reason,
                        "error": str(err),
                    }
                },
            )
            if err.error is not None:
                # The upstream's own answer to an allowed call: the gateway
                # is transparent for it.
                raise MCPError.from_error_data(err.error) from None
            raise MCPError(
                UPSTREAM_CODE,
                f"upstream server {tool.name.server!r} failed on tool "
                f"{tool.name.tool!r}: {err.detail}",
                {
                    "code": err.reason,
                    "server": tool.name.server,
                    "decision_id": answer.decision_id,
                },
            ) from None
        except asyncio.CancelledError:
            with anyio.CancelScope(shield=True):
                await self._record_cancelled(answer, entry)
            raise

    async def _record_cancelled(
        self, answer: Answer, entry: GatewayEntry | None
    ) -> None:
        await self._record_outcome(answer, "cancelled", entry)

    async def _record_outcome(
        self, answer: Answer, outcome: str, entry: GatewayEntry | None
    ) -> None:
        """Record what became of ``answer``; a failure is logged, not raised:
        the decision itself is committed, and the agent's answer stands."""
        try:
            await self._pipeline.record_outcome(answer, outcome, gateway=entry)
        except KynaraError as err:
            log.error(
                "outcome not recorded",
                extra={
                    "fields": {
                        "component": "gateway",
                        "decision_id": answer.decision_id,
                        "outcome": outcome,
                        "error": str(err),
                    }
                },
            )

    async def _wait_for_review(
        self,
        ctx: ServerRequestContext[Any, Any],
        request: IncomingRequest,
        answer: Answer,
    ) -> Answer:
        """With ``approval_wait: elicit`` and a client that can show a URL:
        show it the approval URL, wait for the review, decide again.
        Otherwise, or when the wait ends without a grant, ``answer``."""
        approval = answer.approval
        # NOTE: the 2026-07-28 protocol has no server requests; its
        # clients would be asked through an InputRequiredResult instead.
        # They get the tool error with the URL for now.
        if (
            self._config.approval_wait is not ApprovalWait.ELICIT
            or approval is None
            or not approval.url
            or not _can_elicit_url(ctx)
        ):
            return answer
        try:
            final = await self._show_and_wait(ctx, answer, approval)
        except asyncio.CancelledError:
            # The agent gave up waiting: the require_approval answer it
            # was waiting on is recorded as cancelled, as a forwarded
            # call's would be.
            with anyio.CancelScope(shield=True):
                await self._record_cancelled(answer, request.gateway)
            raise
        if final is None or final.state is not ApprovalState.APPROVED:
            return answer
        with contextlib.suppress(MCPError):
            await ctx.session.send_elicit_complete(approval.id, ctx.request_id)
        return await self._decide(
            msgspec.structs.replace(request, approval_id=approval.id)
        )

    async def _show_and_wait(
        self,
        ctx: ServerRequestContext[Any, Any],
        answer: Answer,
        approval: Approval,
    ) -> Approval | None:
        """Ask the client to show the approval URL; once it accepted, the
        approval when the review ended, else None."""
        try:
            shown = await ctx.session.elicit_url(
                message=f"Approval needed: {answer.decision.reason}",
                url=approval.url,
                elicitation_id=approval.id,
                related_request_id=ctx.request_id,
            )
        except MCPError as err:
            # Dropped, and the call goes on: it answers with the URL instead.
            log.warning(
                "approval URL not shown",
                extra={
                    "fields": {
                        "component": "gateway",
                        "decision_id": answer.decision_id,
                        "approval_id": approval.id,
                        "error": str(err),
                    }
                },
            )
            return None
        if shown.action != "accept":
            return None
        return await self._review_outcome(approval)

    async def _review_outcome(self, approval: Approval) -> Approval | None:
        """The approval once it is no longer pending, or None when the wait
        (``approval_wait_seconds``) ran out first."""
        last: Approval | None = None
        with anyio.move_on_after(self._config.approval_wait_seconds):
            try:
                async for state in self._pipeline.approvals.watch(approval.id):
                    last = state
                    if state.state is not ApprovalState.PENDING:
                        return state
            except KynaraError:
                return None
        return None if last is None or last.state is ApprovalState.PENDING else last

    # ------------------------------------------------------------ changes

    def _watch_session(
        self,
        ctx: ServerRequestContext[Any, Any],
        caller: Caller,
        visible: Sequence[CatalogTool],
    ) -> None:
        """Remember a handshake-era session's caller and what it was shown.

        The 2026-07-28 protocol has no session to send to: its clients
        listen (``subscriptions/listen``) instead.
        """
        if ctx.session.protocol_version in _MODERN_VERSIONS:
            return
        # NOTE: the SDK gives a lowlevel handler no public handle on its
        # connection; the session's own is the one that outlives the request.
        connection = getattr(ctx.session, "_connection", None)
        if connection is None:
            return
        names = frozenset(tool.name.exposed for tool in visible)
        watched = self._sessions.get(self._by_connection.get(connection))
        if watched is not None:
            watched.caller, watched.visible = caller, names
            return
        key = object()
        self._sessions[key] = _Watched(
            caller, names, ctx.session.send_tool_list_changed
        )
        self._by_connection[connection] = key
        connection.exit_stack.callback(self._forget, connection)

    def _forget(self, connection: object) -> None:
        key = self._by_connection.pop(connection, None)
        self._sessions.pop(key, None)

    async def _listen(
        self,
        ctx: ServerRequestContext[Any, Any],
        caller: Caller,
        params: types.SubscriptionsListenRequestParams,
    ) -> types.SubscriptionsListenResult:
        """One ``subscriptions/listen`` stream: told of changes to what this
        caller may see, and of nothing else."""
        chain = self._chain(caller)
        try:
            names = frozenset(tool.name.exposed for tool in self._visible(chain))
        except KynaraError as err:
            self._pipeline.refuse(err)
            raise kynara_error(err) from None
        bus = InMemorySubscriptionBus()
        token = object()
        self._sessions[token] = _Watched(
            caller, names, lambda: bus.publish(ToolsListChanged())
        )
        try:
            return await ListenHandler(bus, max_subscriptions=1)(ctx, params)
        finally:
            self._sessions.pop(token, None)

    def changed(self, server: str = "") -> None:
        """The catalog (``server``'s tools) or the policies changed: tell
        every open session whose visible tools changed. Also the catalog's
        ``on_change``."""
        if self._closed:
            return
        if self._refresh_task is not None and not self._refresh_task.done():
            self._refresh_again = True
            return
        self._refresh_task = asyncio.get_running_loop().create_task(self._refresh())

    async def _refresh(self) -> None:
        while True:
            self._refresh_again = False
            watched = list(self._sessions.values())
            for entry in watched:
                await self._refresh_one(entry)
            if not self._refresh_again:
                return

    async def _refresh_one(self, entry: _Watched) -> None:
        try:
            chain = self._pipeline.chain_of(self._incoming(entry.caller))
            names = frozenset(tool.name.exposed for tool in self._visible(chain))
        except (KynaraError, MCPError):
            # The caller's token expired, say: it sees nothing now.
            names = frozenset()
        if names == entry.visible:
            return
        entry.visible = names
        try:
            await entry.notify()
        except Exception as err:  # a closed stream, a gone client
            log.debug(
                "list_changed not delivered",
                extra={"fields": {"component": "gateway", "error": repr(err)}},
            )

    async def close(self) -> None:
        """Stop following changes; open listen streams end."""
        self._closed = True
        self._unwatch()
        task, self._refresh_task = self._refresh_task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


_MODERN_VERSIONS = frozenset(types.version.MODERN_PROTOCOL_VERSIONS)


# The gateway's own JSON-RPC errors (each with data.code) -> the outcome
# counted (kynara_gateway_calls_total).
_ERROR_OUTCOMES = {
    DENIED_CODE: "denied",
    REQUEST_ERROR_CODE: "refused",
    types.INVALID_PARAMS: "refused",
    UNAVAILABLE_CODE: "unavailable",
    UPSTREAM_CODE: "upstream_failed",
}


def _failed_outcome(err: BaseException) -> str:
    """What a tools/call that raised ``err`` is counted as. NOTE: an
    upstream's own error passed on with one of the gateway's codes and a
    data.code is counted as the gateway's."""
    if isinstance(err, asyncio.CancelledError):
        return "cancelled"
    if isinstance(err, MCPError):
        ours = isinstance(err.data, dict) and "code" in err.data
        if ours and err.code in _ERROR_OUTCOMES:
            return _ERROR_OUTCOMES[err.code]
        return "forwarded"
    return "unavailable"


def _result_outcome(result: types.CallToolResult) -> str:
    """What a tools/call answered with ``result`` is counted as: the
    gateway's own approval result, else the upstream's."""
    content = result.structured_content
    if (
        result.is_error
        and isinstance(content, dict)
        and content.get("decision") == "require_approval"
        and "decision_id" in content
    ):
        return "approval_required"
    return "forwarded"


def _decidable(name: ToolName) -> bool:
    """Whether a request may carry ``name``'s action and resource id."""
    return (
        len(name.action) <= MAX_NAME_LENGTH
        and is_valid_name(name.action)
        and len(name.resource_id) <= MAX_RESOURCE_ID_LENGTH
    )


def _approved(answer: Answer) -> bool:
    """Whether the answer cites a grant this very request may use."""
    approval = answer.approval
    return (
        answer.decision.effect is Effect.REQUIRE_APPROVAL
        and approval is not None
        and approval.state is ApprovalState.APPROVED
    )


def _can_elicit_url(ctx: ServerRequestContext[Any, Any]) -> bool:
    session = ctx.session
    if not session.can_send_request:
        return False
    capabilities = session.client_capabilities
    elicitation = capabilities.elicitation if capabilities is not None else None
    return elicitation is not None and elicitation.url is not None


def _denied(exposed: str, answer: Answer) -> MCPError:
    """The error for a denied call of the tool agents call ``exposed``."""
    decision = answer.decision
    return MCPError(
        DENIED_CODE,
        f"tool {exposed!r} is not permitted: {decision.reason}",
        {
            "decision": str(decision.effect),
            "reason_code": str(decision.reason_code),
            "reason": decision.reason,
            "decision_id": answer.decision_id,
        },
    )


def _approval_result(exposed: str, answer: Answer) -> types.CallToolResult:
    """The tool error for a call of ``exposed`` that needs approval."""
    decision = answer.decision
    approval = answer.approval
    structured: dict[str, Any] = {
        "decision": str(decision.effect),
        "reason": decision.reason,
        "decision_id": answer.decision_id,
    }
    text = f"tool {exposed!r} needs approval: {decision.reason}"
    if approval is not None:
        structured["approval"] = {
            "id": approval.id,
            "url": approval.url,
            "expires_at": approval.expires_at,
        }
        text += (
            f". A reviewer can approve it at {approval.url or '(no review URL)'} "
            f"(approval {approval.id}, expires {approval.expires_at}); call the "
            "tool again with the same arguments once it is approved."
        )
    return _text_result(text, structured)
