"""``cycles-mcp proxy``: a gating MCP proxy.

The client sees the upstream server's tools, resources, prompts, name and instructions unchanged,
the upstream's change notifications (tools/prompts/resources list changed, resource updated, log
messages) are relayed to every connected client, and its progress on a request to that request's
client.
Every ``tools/call`` goes through the ``Gate`` first: a refused call never reaches the upstream and
comes back as a tool result with ``isError: true`` that says which budget refused it, what remains
and what to do; an allowed call is forwarded, then committed (released when the upstream reported
an error or failed). Each MCP session is one run with its own session budgets.
"""

from __future__ import annotations

import contextlib
import logging
import os
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import mcp_types as types
from mcp import Client, StdioServerParameters
from mcp.server import InitializationOptions, NotificationOptions, Server, ServerRequestContext
from mcp.server.context import CallNext, HandlerResult
from mcp.shared.dispatcher import ProgressFnT
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import BaseModel

from cycles import AsyncCycles, AsyncRun
from cycles_mcp.gate import Admission, Gate
from cycles_mcp.policy import Policy

__all__ = ["NotificationRelay", "ProxyServer", "connect_upstream", "open_proxy", "refusal_result"]

log = logging.getLogger("cycles.mcp")
R = TypeVar("R", bound=BaseModel)
_RUN_KEY = "cycles_mcp.run"
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
    """Upstream notifications, re-sent to every downstream connection that is still open."""

    def __init__(self) -> None:
        self.connections: weakref.WeakSet[Any] = weakref.WeakSet()

    async def __call__(self, message: types.ServerNotification | Exception) -> None:
        if isinstance(message, Exception):
            log.warning("upstream transport error: %s", message)
            return
        data = message.model_dump(by_alias=True, mode="json", exclude_none=True)
        method = data.get("method")
        if method not in _RELAYED:
            return  # progress and cancellation belong to the upstream hop
        for connection in list(self.connections):
            await connection.notify(method, data.get("params"))  # best effort: never raises

    async def middleware(self, ctx: ServerRequestContext[Any], call_next: CallNext) -> HandlerResult:
        """Every inbound message (``initialize`` first) makes its connection known to the relay."""
        connection = getattr(ctx.session, "_connection", None)  # the SDK's per-connection state
        if connection is not None and ctx.protocol_version not in MODERN_PROTOCOL_VERSIONS:
            self.connections.add(connection)
        return await call_next(ctx)


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


@contextlib.asynccontextmanager
async def connect_upstream(
    command: Sequence[str] | None = None,
    url: str | None = None,
    *,
    env: dict[str, str] | None = None,
    message_handler: NotificationRelay | None = None,
) -> AsyncIterator[Client]:
    """A client session to the upstream server: a command over stdio, or a streamable-HTTP URL."""
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
    async with Client(target, mode="legacy", message_handler=message_handler) as client:
        yield client


class ProxyServer:
    """A low-level MCP ``Server`` mirroring ``upstream`` with every tool call gated."""

    def __init__(self, upstream: Client, gate: Gate, relay: NotificationRelay | None = None) -> None:
        self.upstream = upstream
        self.gate = gate
        self.relay = relay
        #: the run of clients without a session (2026-07-28 sessionless requests): the proxy's lifetime
        self.shared_run: AsyncRun | None = None
        caps = upstream.server_capabilities
        info = upstream.server_info
        handlers: dict[str, Any] = {}
        if caps.tools is not None:
            handlers["on_list_tools"] = self._forward(types.ListToolsRequest, types.ListToolsResult)
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
        self.server = _Server(
            info.name if info is not None else "cycles-mcp-proxy",
            version=(info.version if info is not None else "") or "",
            title=info.title if info is not None else None,
            instructions=upstream.instructions,
            **handlers,
        )
        if relay is not None:
            self.server.middleware.append(relay.middleware)
            self.server.notification_options = NotificationOptions(
                prompts_changed=bool(caps.prompts and caps.prompts.list_changed),
                resources_changed=bool(caps.resources and caps.resources.list_changed),
                tools_changed=bool(caps.tools and caps.tools.list_changed),
            )

    def _forward(
        self, request_type: type[Any], result_type: type[R]
    ) -> Callable[[ServerRequestContext[Any], Any], Awaitable[R]]:
        async def forward(ctx: ServerRequestContext[Any], params: Any) -> R:
            request = request_type(params=_for_upstream(params))
            result: R = await self.upstream.session.send_request(
                request, result_type, progress_callback=_progress_to(ctx)
            )
            return result

        return forward

    async def _call_tool(self, ctx: ServerRequestContext[Any], params: types.CallToolRequestParams) -> Any:
        run = self.run_for(ctx)

        async def forward() -> types.CallToolResult:
            request = types.CallToolRequest(params=_for_upstream(params))
            return await self.upstream.session.send_request(
                request, types.CallToolResult, progress_callback=_progress_to(ctx)
            )

        result = await self.gate.call(
            run, params.name, forward, failed=lambda r: bool(r.is_error), arguments=params.arguments
        )
        if isinstance(result, Admission):
            return refusal_result(result)
        return result

    def run_for(self, ctx: ServerRequestContext[Any]) -> AsyncRun:
        """The session's run: one per handshake connection (ended when it closes); sessionless
        (2026-07-28) requests share the proxy-lifetime run."""
        connection = getattr(ctx.session, "_connection", None)  # the SDK's per-connection state
        if connection is None or ctx.protocol_version in MODERN_PROTOCOL_VERSIONS:
            if self.shared_run is None:
                self.shared_run = self.gate.new_run()
            return self.shared_run
        run: AsyncRun | None = connection.state.get(_RUN_KEY)
        if run is None:
            run = self.gate.new_run()
            connection.state[_RUN_KEY] = run
            connection.exit_stack.push_async_callback(self.gate.end_run, run)
        return run

    async def aclose(self) -> None:
        if self.shared_run is not None:
            await self.gate.end_run(self.shared_run)


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
    ):
        proxy = ProxyServer(upstream, Gate(policy, cycles, shadow=shadow, fail_open=fail_open), relay)
        try:
            yield proxy
        finally:
            await proxy.aclose()
