"""``cycles-mcp proxy``: a gating MCP proxy.

The client sees the upstream server's tools, resources, prompts, name and instructions unchanged,
the upstream's change notifications (tools/prompts/resources list changed, resource updated, log
messages) are relayed to the clients of its session, its progress on a request to that request's
client, and what it asks of the client (sampling, elicitation, roots) to the client, which must
have declared it (``cycles_mcp.relay``).
Every ``tools/call`` goes through the ``Gate`` first: a refused call never reaches the upstream and
comes back as a tool result with ``isError: true`` that says which budget refused it, what remains
and what to do; an allowed call is forwarded, then committed (released when the upstream reported
an error or failed). Each MCP session is one run with its own session budgets.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import warnings
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import mcp_types as types
from mcp import Client, MCPDeprecationWarning, StdioServerParameters
from mcp.client.session import ClientSession
from mcp.server import InitializationOptions, NotificationOptions, Server, ServerRequestContext
from mcp.server.context import CallNext, HandlerResult
from mcp.shared.dispatcher import ProgressFnT
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import BaseModel

from cycles import AsyncCycles, AsyncRun
from cycles_mcp.gate import Admission, Gate
from cycles_mcp.kinds import annotated_kind
from cycles_mcp.policy import Policy
from cycles_mcp.relay import Downstream, SessionUpstreams, mirrored_capabilities

__all__ = ["NotificationRelay", "ProxyServer", "connect_upstream", "open_proxy", "refusal_result"]

log = logging.getLogger("cycles.mcp")
R = TypeVar("R", bound=BaseModel)
_RUN_KEY = "cycles_mcp.run"
_DOWNSTREAM_KEY = "cycles_mcp.downstream"
_RESERVED_META = "io.modelcontextprotocol/"


def refusal_result(admission: Admission) -> types.CallToolResult:
    return types.CallToolResult(
        content=[types.TextContent(text=admission.refusal or "refused by Cycles")],
        is_error=True,
    )


_RELAYED = frozenset(
    {
        "notifications/tools/list_changed",
        "notifications/prompts/list_changed",
        "notifications/resources/list_changed",
        "notifications/resources/updated",
        "notifications/message",
    }
)


class NotificationRelay:
    """An upstream session's notifications, re-sent to each of its downstream connections still open."""

    def __init__(self) -> None:
        self.connections: weakref.WeakSet[Any] = weakref.WeakSet()
        #: tool name -> the ``x-cycles-action-kind`` its definition carries in this upstream session,
        #: from the listings seen (forgotten when the session's tool list changes)
        self.tool_kinds: dict[str, str | None] = {}

    async def __call__(self, message: types.ServerNotification | Exception) -> None:
        if isinstance(message, Exception):
            log.warning("upstream transport error: %s", message)
            return
        data = message.model_dump(by_alias=True, mode="json", exclude_none=True)
        method = data.get("method")
        if method == "notifications/tools/list_changed":
            self.tool_kinds.clear()
        if method not in _RELAYED:
            return  # progress and cancellation belong to the upstream hop
        for connection in list(self.connections):
            await connection.notify(method, data.get("params"))  # best effort: never raises


class _Server(Server[Any]):
    """The low-level server, advertising the upstream's list-changed notifications on every transport."""

    notification_options: NotificationOptions | None = None

    def create_initialization_options(
        self,
        notification_options: NotificationOptions | None = None,
        experimental_capabilities: dict[str, dict[str, Any]] | None = None,
        extensions: dict[str, dict[str, Any]] | None = None,
    ) -> InitializationOptions:
        return super().create_initialization_options(
            notification_options or self.notification_options, experimental_capabilities, extensions
        )


@dataclass
class _AdvertisingClient(Client):
    """A ``Client`` that tells the server exactly ``advertise`` as its capabilities. The SDK
    derives its ad from which callbacks are set, with every sub-capability of elicitation (form and
    URL) and roots (list changed): more than a client that declared less could honour."""

    advertise: types.ClientCapabilities | None = None

    async def _build_session(self, exit_stack: contextlib.AsyncExitStack) -> ClientSession:
        session = await super()._build_session(exit_stack)
        advertise = self.advertise
        if advertise is not None:
            vars(session)["_build_capabilities"] = lambda version: advertise  # the SDK's one seam for the ad
        return session


@contextlib.asynccontextmanager
async def connect_upstream(
    command: Sequence[str] | None = None,
    url: str | None = None,
    *,
    env: dict[str, str] | None = None,
    message_handler: NotificationRelay | None = None,
    advertise: types.ClientCapabilities | None = None,
    **callbacks: Any,
) -> AsyncIterator[Client]:
    """A client session to the upstream server: a command over stdio, or a streamable-HTTP URL.
    ``callbacks`` (``sampling_callback``, ...) answer what the upstream asks; ``advertise`` is then
    the capability ad (default: none)."""
    if (command is None) == (url is None):
        raise ValueError("give the upstream as a command or as a URL, not both")
    target: StdioServerParameters | str
    if command is not None:
        if not command:
            raise ValueError("the upstream command is empty")
        # The upstream inherits the proxy's whole environment: the MCP config's "env" for this entry
        # (API tokens and the like) was written for the upstream.
        environ = dict(os.environ) if env is None else env
        target = StdioServerParameters(command=command[0], args=list(command[1:]), env=environ)
    else:
        assert url is not None
        target = url
    # The handshake era: every upstream written before 2026 speaks it, and so do newer ones.
    client = _AdvertisingClient(
        target, mode="legacy", message_handler=message_handler, advertise=advertise, **callbacks
    )
    async with client:
        yield client


class ProxyServer:
    """A low-level MCP ``Server`` mirroring ``upstream`` with every tool call gated.

    ``upstream`` is the proxy's own upstream session (it advertises no client capabilities): the
    clients that declare none share it. With ``sessions``, a client that declares sampling,
    elicitation or roots gets an upstream session of its own that relays them to it."""

    def __init__(
        self,
        upstream: Client,
        gate: Gate,
        relay: NotificationRelay | None = None,
        sessions: SessionUpstreams | None = None,
    ) -> None:
        self.upstream = upstream
        self.gate = gate
        self.relay = relay
        self.sessions = sessions
        self.relay_kinds = relay.tool_kinds if relay is not None else {}
        if sessions is not None:
            sessions.run_for = self.run_of
        #: the run of clients without a session (2026-07-28 sessionless requests): the proxy's lifetime
        self.shared_run: AsyncRun | None = None
        caps = upstream.server_capabilities
        info = upstream.server_info
        handlers: dict[str, Any] = {}
        if caps.tools is not None:
            handlers["on_list_tools"] = self._list_tools
            handlers["on_call_tool"] = self._call_tool
        if caps.resources is not None:
            handlers["on_list_resources"] = self._forward(types.ListResourcesRequest, types.ListResourcesResult)
            handlers["on_list_resource_templates"] = self._forward(
                types.ListResourceTemplatesRequest, types.ListResourceTemplatesResult
            )
            handlers["on_read_resource"] = self._forward(types.ReadResourceRequest, types.ReadResourceResult)
        if caps.prompts is not None:
            handlers["on_list_prompts"] = self._forward(types.ListPromptsRequest, types.ListPromptsResult)
            handlers["on_get_prompt"] = self._forward(types.GetPromptRequest, types.GetPromptResult)
        if caps.completions is not None:
            handlers["on_completion"] = self._forward(types.CompleteRequest, types.CompleteResult)
        if sessions is not None:
            handlers["on_roots_list_changed"] = self._roots_list_changed
        with warnings.catch_warnings():
            # Roots are deprecated from 2026-07-28 on; the handshake-era clients the proxy serves still use them.
            warnings.simplefilter("ignore", MCPDeprecationWarning)
            self.server = _Server(
                info.name if info is not None else "cycles-mcp-proxy",
                version=(info.version if info is not None else "") or "",
                title=info.title if info is not None else None,
                instructions=upstream.instructions,
                **handlers,
            )
        self.server.middleware.append(self._attach)
        if relay is not None:
            self.server.notification_options = NotificationOptions(
                prompts_changed=bool(caps.prompts and caps.prompts.list_changed),
                resources_changed=bool(caps.resources and caps.resources.list_changed),
                tools_changed=bool(caps.tools and caps.tools.list_changed),
            )

    async def _attach(self, ctx: ServerRequestContext[Any], call_next: CallNext) -> HandlerResult:
        """Every inbound message (``initialize`` first): a handshake connection that shares the
        proxy's upstream session gets that session's notifications."""
        result = await call_next(ctx)
        connection = _connection(ctx)
        if self.relay is not None and connection is not None and self._own_upstream(connection) is None:
            self.relay.connections.add(connection)
        return result

    def _own_upstream(self, connection: Any) -> types.ClientCapabilities | None:
        """What a connection's own upstream session advertises; None: it shares the proxy's."""
        if self.sessions is None or connection.protocol_version in MODERN_PROTOCOL_VERSIONS:
            return None
        return mirrored_capabilities(connection.client_capabilities)

    @contextlib.asynccontextmanager
    async def upstream_for(self, ctx: ServerRequestContext[Any]) -> AsyncIterator[Client]:
        """The upstream session that serves ``ctx``'s client, for as long as the request is forwarded
        (what the upstream asks of the client meanwhile rides this request's stream)."""
        connection = _connection(ctx)
        capabilities = None if connection is None else self._own_upstream(connection)
        if connection is None or capabilities is None or self.sessions is None:
            yield self.upstream
            return
        downstream: Downstream = connection.state.setdefault(_DOWNSTREAM_KEY, Downstream(connection))
        client = await self.sessions.for_connection(downstream, capabilities)  # opened at its first request
        with downstream.serving(ctx):
            yield client

    def _forward(
        self, request_type: type[Any], result_type: type[R]
    ) -> Callable[[ServerRequestContext[Any], Any], Awaitable[R]]:
        async def forward(ctx: ServerRequestContext[Any], params: Any) -> R:
            request = request_type(params=_for_upstream(params))
            async with self.upstream_for(ctx) as upstream:
                result: R = await upstream.session.send_request(
                    request, result_type, progress_callback=_progress_to(ctx)
                )
            return result

        return forward

    async def _list_tools(self, ctx: ServerRequestContext[Any], params: Any) -> types.ListToolsResult:
        result = await self._forward(types.ListToolsRequest, types.ListToolsResult)(ctx, params)
        self._tool_kinds(ctx).update((tool.name, annotated_kind(tool)) for tool in result.tools)
        return result

    def _tool_kinds(self, ctx: ServerRequestContext[Any]) -> dict[str, str | None]:
        """The annotated kinds of the tools of the upstream session that serves ``ctx``."""
        connection = _connection(ctx)
        if connection is not None and self._own_upstream(connection) is not None:
            downstream: Downstream = connection.state.setdefault(_DOWNSTREAM_KEY, Downstream(connection))
            return downstream.tool_kinds
        return self.relay_kinds

    async def kind_annotation(self, ctx: ServerRequestContext[Any], upstream: Client, tool: str) -> str | None:
        """The tool's ``x-cycles-action-kind``, from the listings seen, else from a listing fetched
        now (a client may call a tool it never listed; a changed tool list is listed afresh)."""
        known = self._tool_kinds(ctx)
        if tool not in known:
            cursor: str | None = None
            while True:
                page = await upstream.session.send_request(
                    types.ListToolsRequest(params=types.PaginatedRequestParams(cursor=cursor) if cursor else None),
                    types.ListToolsResult,
                )
                known.update((t.name, annotated_kind(t)) for t in page.tools)
                cursor = page.next_cursor
                if not cursor or tool in known:
                    break
        return known.get(tool)

    async def _call_tool(self, ctx: ServerRequestContext[Any], params: types.CallToolRequestParams) -> Any:
        run = self.run_for(ctx)
        async with self.upstream_for(ctx) as upstream:

            async def forward() -> types.CallToolResult:
                request = types.CallToolRequest(params=_for_upstream(params))
                return await upstream.session.send_request(
                    request, types.CallToolResult, progress_callback=_progress_to(ctx)
                )

            match = self.gate.policy.match(params.name, await self.kind_annotation(ctx, upstream, params.name))
            result = await self.gate.call(
                run,
                params.name,
                forward,
                failed=lambda r: bool(r.is_error),
                arguments=params.arguments,
                match=match,
            )
        if isinstance(result, Admission):
            return refusal_result(result)
        return result

    async def _roots_list_changed(self, ctx: ServerRequestContext[Any], params: Any) -> None:
        """The client's roots changed: tell its upstream session (the one that asks it for roots)."""
        connection = _connection(ctx)
        client = None if connection is None or self.sessions is None else self.sessions.opened(connection)
        if client is not None:
            await client.session.send_notification(types.RootsListChangedNotification())

    def run_for(self, ctx: ServerRequestContext[Any]) -> AsyncRun:
        """The session's run: one per handshake connection (ended when it closes); sessionless
        (2026-07-28) requests share the proxy-lifetime run."""
        connection = _connection(ctx)
        if connection is None or ctx.protocol_version in MODERN_PROTOCOL_VERSIONS:
            if self.shared_run is None:
                self.shared_run = self.gate.new_run()
            return self.shared_run
        return self.run_of(connection)

    def run_of(self, connection: Any) -> AsyncRun:
        """A handshake connection's run (made at its first use, ended when the connection closes)."""
        run: AsyncRun | None = connection.state.get(_RUN_KEY)
        if run is None:
            run = self.gate.new_run()
            connection.state[_RUN_KEY] = run
            connection.exit_stack.push_async_callback(self.gate.end_run, run)
        return run

    async def aclose(self) -> None:
        if self.shared_run is not None:
            await self.gate.end_run(self.shared_run)


def _connection(ctx: ServerRequestContext[Any]) -> Any:
    return getattr(ctx.session, "_connection", None)  # the SDK's per-connection state


def _progress_to(ctx: ServerRequestContext[Any]) -> ProgressFnT | None:
    """Relay the upstream's progress on a request to the client, if the client asked for progress
    (the upstream hop gets a progress token of its own)."""
    meta: dict[str, Any] = dict(ctx.meta or {})
    if meta.get("progressToken", meta.get("progress_token")) is None:  # the SDK hands it over by either name
        return None
    return ctx.session.report_progress


def _for_upstream(params: Any) -> Any:
    """The request's params as the upstream should get them: ``_meta`` without what belongs to the
    client's hop (its progress token, which is not relayed, and the protocol's reserved
    ``io.modelcontextprotocol/`` keys, e.g. a 2026-07-28 client's per-request envelope: the upstream
    connection negotiated its own version)."""
    meta = getattr(params, "meta", None)
    if params is None or meta is None:
        return params
    data = meta.model_dump(by_alias=True, exclude_none=True) if isinstance(meta, BaseModel) else dict(meta)
    hop = ("progressToken", "progress_token")
    kept = {k: v for k, v in data.items() if k not in hop and not k.startswith(_RESERVED_META)}
    return params.model_copy(update={"meta": kept or None})


@contextlib.asynccontextmanager
async def open_proxy(
    policy: Policy,
    *,
    command: Sequence[str] | None = None,
    url: str | None = None,
    ledger: str | None = None,
    shadow: bool = False,
    fail_open: bool = False,
) -> AsyncIterator[ProxyServer]:
    """The ledger, the upstream session and the proxy server, closed in order on exit."""
    relay = NotificationRelay()
    async with (
        AsyncCycles(ledger or policy.ledger) as cycles,
        connect_upstream(command, url, message_handler=relay) as upstream,
        anyio.create_task_group() as tasks,  # holds the upstream sessions of the clients that need their own
    ):
        gate = Gate(policy, cycles, shadow=shadow, fail_open=fail_open)
        sessions = SessionUpstreams(functools.partial(connect_upstream, command, url), gate, tasks)
        proxy = ProxyServer(upstream, gate, relay, sessions)
        try:
            yield proxy
        finally:
            await proxy.aclose()
            tasks.cancel_scope.cancel()
