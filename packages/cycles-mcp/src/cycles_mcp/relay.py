"""What the upstream asks of the client (sampling, elicitation, roots), relayed to the client.

The upstream may only ask what the client can answer, so the capabilities it is told of are the
client's own: a handshake-era client that declares any of ``sampling``, ``elicitation`` or
``roots`` gets an upstream session of its own (``SessionUpstreams``) that advertises exactly those
(sub-capabilities included) and nothing else, and relays each request to that client (``Downstream``):
on the stream of the client's request that is in flight when one is (streamable HTTP answers it
there), else on the connection's own channel. A client that declares none of them shares the
proxy's first upstream session, which advertises none. The client's error comes back to the
upstream as that MCP error; a client that went away comes back as an error too (and closing the
client's connection closes its upstream session, so nothing waits on it).

A sampling request is an LLM call on the client's model: the proxy gates it as it gates a tool
call, by the policy's ``[sampling]`` cost (``Policy.sampling_match``) as a step of the session's
run, committed with the actual the result reports (``actual_from_usage``), released when the
client answers with an error. 2026-07-28 clients get no server-initiated requests (the protocol
forbids them), so nothing is relayed to them.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from typing import Any, TypeVar

import anyio
import anyio.abc
import mcp_types as types
from mcp import Client
from mcp.client.session import ClientRequestContext
from mcp.server import ServerRequestContext
from mcp.shared.exceptions import MCPError
from mcp.shared.message import ServerMessageMetadata
from pydantic import BaseModel

from cycles import Amount, AsyncRun, Unit, UnpricedModel
from cycles.pricing import price_answer
from cycles_mcp.gate import Admission, Gate
from cycles_mcp.policy import SAMPLING

__all__ = ["DECLINED", "Downstream", "SessionUpstreams", "Unanswered", "actual_from_usage", "mirrored_capabilities"]

log = logging.getLogger("cycles.mcp")
R = TypeVar("R", bound=BaseModel)
_UPSTREAM_KEY = "cycles_mcp.upstream"
_OPENING_KEY = "cycles_mcp.upstream_opening"
#: how long a closing client connection waits for the upstream's requests to it to be answered
#: (with errors, the client being gone) before the upstream session is closed
_ANSWER_GRACE_S = 5.0

#: The error code of a request the client side declined (the MCP spec's "user rejected" code),
#: used when Cycles refuses a sampling request: it was not sent to the client.
DECLINED = -1

Sampled = types.CreateMessageResult | types.CreateMessageResultWithTools | types.ErrorData
Connect = Callable[..., AbstractAsyncContextManager[Client]]


def mirrored_capabilities(declared: types.ClientCapabilities | None) -> types.ClientCapabilities | None:
    """The client's capabilities that the upstream may use through the proxy, as declared (None
    when the client declared none of them)."""
    if declared is None or (declared.sampling is None and declared.elicitation is None and declared.roots is None):
        return None
    return types.ClientCapabilities(sampling=declared.sampling, elicitation=declared.elicitation, roots=declared.roots)


def actual_from_usage(result: Any, estimate: Amount) -> Amount | None:
    """A sampling step's actual cost, when the client's result reports its token usage in
    ``_meta.usage`` (``inputTokens``/``outputTokens``, or snake_case): tokens as counted, USD priced
    by the model that answered. None (commit the estimate) when it does not, or the model has no price."""
    meta = getattr(result, "meta", None)
    usage = meta.get("usage") if isinstance(meta, dict) else None
    if not isinstance(usage, dict):
        return None
    input_tokens = _count(usage.get("inputTokens", usage.get("input_tokens")))
    output_tokens = _count(usage.get("outputTokens", usage.get("output_tokens")))
    if input_tokens is None or output_tokens is None:
        return None
    if estimate.unit is Unit.TOKENS:
        return Amount(unit=Unit.TOKENS, amount=input_tokens + output_tokens)
    if estimate.unit is Unit.USD_MICROCENTS:
        model = getattr(result, "model", "")
        try:
            return price_answer(model, requested=model, input_tokens=input_tokens, output_tokens=output_tokens)
        except UnpricedModel as exc:  # a model the price data does not know: the estimate stands
            log.info("sampling answered by %r: no price (%s), committing the estimate", model, exc)
    return None


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


class Unanswered(types.ErrorData):
    """The error the upstream gets when the client went away with its request: it may have been
    acted on (a model called), so a gated step is not released for it (committed, as the core
    commits a step interrupted after it began)."""


class Downstream:
    """One client connection, as the upstream's requests reach it."""

    def __init__(self, connection: Any) -> None:
        self.connection = connection  #: the SDK's per-connection state
        self.inflight: list[ServerRequestContext[Any]] = []  #: the client's requests being forwarded
        self.tool_kinds: dict[str, str | None] = {}  #: its upstream session's annotated tool kinds
        self.answering = 0  #: the upstream's requests to it still being answered
        self._answered = anyio.Event()

    @contextlib.contextmanager
    def serving(self, ctx: ServerRequestContext[Any]) -> Iterator[None]:
        """While the proxy forwards ``ctx``, the upstream's requests ride that request's stream."""
        self.inflight.append(ctx)
        try:
            yield
        finally:
            self.inflight.remove(ctx)

    @contextlib.asynccontextmanager
    async def answer(self) -> AsyncIterator[None]:
        """While one of the upstream's requests to this client is being answered."""
        self.answering += 1
        try:
            yield
        finally:
            self.answering -= 1
            if not self.answering:
                self._answered.set()
                self._answered = anyio.Event()

    async def answered(self, within_s: float) -> None:
        """Wait (at most ``within_s``) until the upstream's requests in flight are answered: when
        the client has gone they fail at once, and their errors should reach the upstream before
        its session is closed."""
        with anyio.move_on_after(within_s):
            while self.answering:
                await self._answered.wait()

    async def ask(self, request: types.ServerRequest, result_type: type[R]) -> R | types.ErrorData:
        """Send ``request`` to the client; its answer, or the error to hand back to the upstream."""
        gone = f"the MCP client went away before answering {request.method}"
        try:
            if self.inflight:
                ctx = self.inflight[-1]
                related = ServerMessageMetadata(related_request_id=ctx.request_id)
                return await ctx.session.send_request(request, result_type, metadata=related)
            answer: R = await self.connection.send_request(request, result_type=result_type)
            return answer
        except MCPError as exc:  # the client's own error (or: no channel to it)
            if exc.error.code == types.CONNECTION_CLOSED:
                return Unanswered(code=exc.error.code, message=f"{gone} ({exc.error.message})")
            return exc.error
        except (anyio.ClosedResourceError, anyio.BrokenResourceError, anyio.EndOfStream) as exc:
            return Unanswered(code=types.CONNECTION_CLOSED, message=f"{gone} ({type(exc).__name__})")


class SessionUpstreams:
    """Upstream sessions of the clients that declared something the upstream may ask of them,
    one each, opened at the client's first forwarded request and closed with its connection."""

    def __init__(self, connect: Connect, gate: Gate, tasks: anyio.abc.TaskGroup) -> None:
        self.connect = connect  #: ``connect_upstream`` bound to the upstream command or URL
        self.gate = gate
        self.tasks = tasks
        #: connection -> its session's run (the proxy's ``run_of``, set when the proxy takes this in)
        self.run_for: Callable[[Any], AsyncRun] = _no_run

    @staticmethod
    def opened(connection: Any) -> Client | None:
        """The connection's own upstream session, if it has one open."""
        client: Client | None = connection.state.get(_UPSTREAM_KEY)
        return client

    async def for_connection(self, downstream: Downstream, capabilities: types.ClientCapabilities) -> Client:
        state = downstream.connection.state
        opening: anyio.Lock = state.setdefault(_OPENING_KEY, anyio.Lock())
        async with opening:  # two first requests of one connection open one session
            client: Client | None = state.get(_UPSTREAM_KEY)
            if client is None:
                closed, done = anyio.Event(), anyio.Event()
                client = await self.tasks.start(self._hold, downstream, capabilities, closed, done)
                state[_UPSTREAM_KEY] = client

                async def close() -> None:
                    await downstream.answered(_ANSWER_GRACE_S)
                    closed.set()
                    await done.wait()

                downstream.connection.exit_stack.push_async_callback(close)
        return client

    async def _hold(
        self,
        downstream: Downstream,
        capabilities: types.ClientCapabilities,
        closed: anyio.Event,
        done: anyio.Event,
        *,
        task_status: anyio.abc.TaskStatus[Client],
    ) -> None:
        """Own one upstream session (entered and left in this task, as anyio requires) until the
        client's connection closes; a failure after it opened is logged, never raised into the proxy."""
        from cycles_mcp.proxy import NotificationRelay  # the relay, aimed at this one connection

        relay = NotificationRelay()
        relay.connections.add(downstream.connection)
        relay.tool_kinds = downstream.tool_kinds
        callbacks: dict[str, Any] = {}
        if capabilities.sampling is not None:
            callbacks["sampling_callback"] = self._sampling(downstream)
            callbacks["sampling_capabilities"] = capabilities.sampling
        if capabilities.elicitation is not None:
            callbacks["elicitation_callback"] = self._elicitation(downstream)
        if capabilities.roots is not None:
            callbacks["list_roots_callback"] = self._roots(downstream)
        opened = False
        try:
            async with self.connect(message_handler=relay, advertise=capabilities, **callbacks) as client:
                opened = True
                task_status.started(client)
                await closed.wait()
        except Exception as exc:
            if not opened:
                raise
            log.warning("the upstream session of a client connection failed: %s", exc)
        finally:
            done.set()

    def _sampling(self, downstream: Downstream) -> Any:
        async def sampling(context: ClientRequestContext, params: types.CreateMessageRequestParams) -> Sampled:
            async with downstream.answer():
                return await self._gated_sampling(downstream, params)

        return sampling

    async def _gated_sampling(self, downstream: Downstream, params: types.CreateMessageRequestParams) -> Sampled:
        """The sampling request as a step of the session's run, by the policy's ``[sampling]``."""
        result_type: type[types.CreateMessageResult | types.CreateMessageResultWithTools] = (
            types.CreateMessageResultWithTools if params.tools else types.CreateMessageResult
        )

        async def forward() -> Sampled:
            return await downstream.ask(types.CreateMessageRequest(params=params), result_type)

        match = self.gate.policy.sampling_match()
        run = self.run_for(downstream.connection)
        arguments = params.model_dump(mode="json", by_alias=True, exclude_none=True)
        result: Sampled | Admission = await self.gate.call(
            run,
            SAMPLING,
            forward,
            failed=lambda r: isinstance(r, types.ErrorData) and not isinstance(r, Unanswered),
            arguments=arguments,
            match=match,
            actual=actual_from_usage,
        )
        if isinstance(result, Admission):
            return types.ErrorData(code=DECLINED, message=result.refusal or "refused by Cycles")
        return result

    @staticmethod
    def _elicitation(downstream: Downstream) -> Any:
        async def elicitation(
            context: ClientRequestContext, params: types.ElicitRequestParams
        ) -> types.ElicitResult | types.ErrorData:
            async with downstream.answer():
                return await downstream.ask(types.ElicitRequest(params=params), types.ElicitResult)

        return elicitation

    @staticmethod
    def _roots(downstream: Downstream) -> Any:
        async def roots(context: ClientRequestContext) -> types.ListRootsResult | types.ErrorData:
            async with downstream.answer():
                return await downstream.ask(types.ListRootsRequest(), types.ListRootsResult)

        return roots


def _no_run(connection: Any) -> AsyncRun:
    raise RuntimeError("SessionUpstreams.run_for is set by the ProxyServer that uses it")
