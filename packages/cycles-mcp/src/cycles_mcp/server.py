"""``cycles-mcp serve``: the cooperative server, a drop-in for the reference Cycles MCP server.

Nine tools with the reference's names and camelCase inputs (``idempotencyKey``, ``reservationId``,
``ttlMs``, ...), answering with the protocol's JSON; two resource templates
(``cycles://balances/{tenant}``, ``cycles://reservations/{reservation_id}``). A subject the agent
leaves out (or leaves partial) is filled from ``CYCLES_DEFAULT_TENANT`` ... ``CYCLES_DEFAULT_TOOLSET``.
Errors come back as tool errors whose text is ``{"error": CODE, "message": ..., "details": ...}``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import Annotated, Any, Literal, TypeVar

from mcp.server import MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ResourceNotFoundError
from mcp_types import CallToolResult, TextContent
from pydantic import BaseModel, ConfigDict, Field

from cycles import Action, Amount, AsyncCycles, CyclesError, InvalidRequest, NotFound, Subject
from cycles.ledger.base import BalanceQuery
from cycles.models import ReservationStatus, StandardMetrics

__all__ = ["TOOL_NAMES", "create_server", "default_subject", "run_server"]

TOOL_NAMES = (
    "cycles_reserve",
    "cycles_commit",
    "cycles_release",
    "cycles_extend",
    "cycles_decide",
    "cycles_check_balance",
    "cycles_list_reservations",
    "cycles_get_reservation",
    "cycles_create_event",
)
_LEVELS = ("tenant", "workspace", "app", "workflow", "agent", "toolset")
T = TypeVar("T")

UnitName = Literal["USD_MICROCENTS", "TOKENS", "CREDITS", "RISK_POINTS"]
OveragePolicy = Literal["REJECT", "ALLOW_IF_AVAILABLE", "ALLOW_WITH_OVERDRAFT"]
Key = Annotated[str, Field(min_length=1, max_length=256, description="Idempotency key; reuse it when retrying")]
ReservationId = Annotated[str, Field(min_length=1, max_length=128)]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SubjectIn(_In):
    tenant: str | None = None
    workspace: str | None = None
    app: str | None = None
    workflow: str | None = None
    agent: str | None = None
    toolset: str | None = None
    dimensions: dict[str, str] | None = None


class ActionIn(_In):
    kind: str = Field(max_length=64, description="e.g. llm.completion, tool.search")
    name: str = Field(max_length=256, description="e.g. openai:gpt-4o, web.search")
    tags: list[str] | None = None


class AmountIn(_In):
    unit: UnitName
    amount: int = Field(ge=0, description="integer amount in the unit (USD_MICROCENTS: 1 USD = 100,000,000)")


class MetricsIn(_In):
    tokensInput: int | None = Field(default=None, ge=0)
    tokensOutput: int | None = Field(default=None, ge=0)
    latencyMs: int | None = Field(default=None, ge=0)
    modelVersion: str | None = Field(default=None, max_length=128)
    custom: dict[str, Any] | None = None


def default_subject(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The levels set by ``CYCLES_DEFAULT_TENANT`` ... ``CYCLES_DEFAULT_TOOLSET``."""
    env = os.environ if environ is None else environ
    return {level: value for level in _LEVELS if (value := env.get(f"CYCLES_DEFAULT_{level.upper()}"))}


def _subject(given: SubjectIn | None, defaults: Mapping[str, str]) -> Subject:
    data: dict[str, Any] = dict(defaults)
    if given is not None:
        data.update(given.model_dump(exclude_none=True))
    if not any(data.get(level) for level in _LEVELS):
        raise InvalidRequest(
            "subject needs at least one of tenant, workspace, app, workflow, agent, toolset "
            "(or set CYCLES_DEFAULT_TENANT for the server)"
        )
    return Subject.model_validate(data)


def _action(a: ActionIn) -> Action:
    return Action(a.kind, a.name, tags=a.tags)


def _amount(a: AmountIn) -> Amount:
    return Amount.model_validate(a.model_dump())


def _metrics(m: MetricsIn | None) -> StandardMetrics | None:
    if m is None:
        return None
    return StandardMetrics(
        tokens_input=m.tokensInput,
        tokens_output=m.tokensOutput,
        latency_ms=m.latencyMs,
        model_version=m.modelVersion,
        custom=m.custom,
    )


def _json(value: Any) -> str:
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json", exclude_none=True)
    elif isinstance(value, list):
        value = [v.model_dump(mode="json", exclude_none=True) if isinstance(v, BaseModel) else v for v in value]
    return json.dumps(value, indent=2)


def _text(text: str, *, error: bool = False) -> CallToolResult:
    return CallToolResult(content=[TextContent(text=text)], is_error=error)


async def _answer(call: Awaitable[T]) -> CallToolResult:
    """The protocol's JSON answer; a Cycles error becomes a tool error whose text is its JSON."""
    try:
        return _text(_json(await call))
    except CyclesError as exc:
        return _text(json.dumps({"error": exc.code, "message": exc.message, "details": exc.details}), error=True)


async def _resource(call: Awaitable[Any]) -> str:
    try:
        return _json(await call)
    except NotFound as exc:
        raise ResourceNotFoundError(str(exc)) from None
    except CyclesError as exc:
        raise ResourceError(str(exc)) from None


def create_server(cycles: AsyncCycles, *, environ: Mapping[str, str] | None = None) -> MCPServer[Any]:
    defaults = default_subject(environ)
    app: MCPServer[Any] = MCPServer(
        "cycles",
        version="0.1.0",
        instructions=(
            "Budget authority for this agent. Before an expensive or risky action call cycles_reserve "
            "(or cycles_decide to only ask); run the action only if the decision is ALLOW or ALLOW_WITH_CAPS; "
            "then cycles_commit the actual cost, or cycles_release if the action did not happen. "
            "Reuse the same idempotencyKey when retrying a call."
        ),
    )

    def tool(
        description: str,
    ) -> Callable[[Callable[..., Awaitable[CallToolResult]]], Callable[..., Awaitable[CallToolResult]]]:
        return app.tool(description=description, structured_output=False)

    @tool("Reserve budget before an action. Returns the decision (ALLOW, ALLOW_WITH_CAPS) and a reservationId.")
    async def cycles_reserve(
        idempotencyKey: Key,
        action: ActionIn,
        estimate: AmountIn,
        subject: SubjectIn | None = None,
        ttlMs: Annotated[int, Field(ge=1000, le=86_400_000)] | None = None,
        gracePeriodMs: Annotated[int, Field(ge=0, le=60_000)] | None = None,
        overagePolicy: OveragePolicy | None = None,
        dryRun: bool = False,
        metadata: dict[str, Any] | None = None,
    ) -> CallToolResult:
        return await _answer(
            cycles.reserve(
                _subject(subject, defaults),
                _action(action),
                _amount(estimate),
                ttl_ms=ttlMs,
                grace_period_ms=gracePeriodMs,
                overage_policy=overagePolicy,
                dry_run=dryRun,
                idempotency_key=idempotencyKey,
                metadata=metadata,
            )
        )

    @tool("Commit the actual cost of a reserved action; any unused part of the reservation returns to the budget.")
    async def cycles_commit(
        reservationId: ReservationId,
        idempotencyKey: Key,
        actual: AmountIn,
        metrics: MetricsIn | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> CallToolResult:
        return await _answer(
            cycles.commit(
                reservationId,
                _amount(actual),
                idempotency_key=idempotencyKey,
                metrics=_metrics(metrics),
                metadata=metadata,
            )
        )

    @tool("Release a reservation whose action did not happen; the whole amount returns to the budget.")
    async def cycles_release(
        reservationId: ReservationId,
        idempotencyKey: Key,
        reason: Annotated[str, Field(max_length=256)] | None = None,
    ) -> CallToolResult:
        return await _answer(cycles.release(reservationId, reason=reason, idempotency_key=idempotencyKey))

    @tool("Extend a reservation's lease while a long action is still running.")
    async def cycles_extend(
        reservationId: ReservationId,
        idempotencyKey: Key,
        extendByMs: Annotated[int, Field(ge=1, le=86_400_000)],
        metadata: dict[str, Any] | None = None,
    ) -> CallToolResult:
        del metadata  # accepted for compatibility; extensions carry no metadata here
        return await _answer(cycles.extend(reservationId, extendByMs, idempotency_key=idempotencyKey))

    @tool("Ask whether an action would be allowed, without reserving anything.")
    async def cycles_decide(
        idempotencyKey: Key,
        action: ActionIn,
        estimate: AmountIn,
        subject: SubjectIn | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> CallToolResult:
        del metadata
        return await _answer(
            cycles.decide(
                _subject(subject, defaults), _action(action), _amount(estimate), idempotency_key=idempotencyKey
            )
        )

    @tool("Budget balances (allocated, spent, reserved, remaining, debt) for a subject filter.")
    async def cycles_check_balance(
        tenant: str | None = None,
        workspace: str | None = None,
        app: str | None = None,
        workflow: str | None = None,
        agent: str | None = None,
        toolset: str | None = None,
        includeChildren: bool = False,
        limit: Annotated[int, Field(ge=1, le=200)] = 50,
        cursor: str | None = None,
    ) -> CallToolResult:
        levels = _given(tenant, workspace, app, workflow, agent, toolset) or dict(defaults)
        query = BalanceQuery(**levels, include_children=includeChildren, limit=limit, cursor=cursor)
        return await _answer(cycles.ledger.balances(query))

    @tool("List reservations, newest first, filtered by status and subject.")
    async def cycles_list_reservations(
        status: Literal["ACTIVE", "COMMITTED", "RELEASED", "EXPIRED"] | None = None,
        idempotencyKey: str | None = None,
        tenant: str | None = None,
        workspace: str | None = None,
        app: str | None = None,
        workflow: str | None = None,
        agent: str | None = None,
        toolset: str | None = None,
        limit: Annotated[int, Field(ge=1, le=200)] = 50,
        cursor: str | None = None,
    ) -> CallToolResult:
        levels = _given(tenant, workspace, app, workflow, agent, toolset) or dict(defaults)
        return await _answer(
            cycles.list_reservations(
                status=ReservationStatus(status) if status else None,
                idempotency_key=idempotencyKey,
                limit=limit,
                cursor=cursor,
                **levels,
            )
        )

    @tool("One reservation's details by reservationId.")
    async def cycles_get_reservation(reservationId: ReservationId) -> CallToolResult:
        return await _answer(cycles.get_reservation(reservationId))

    @tool("Record spend that happened without a reservation (an event), charged to the subject's budgets.")
    async def cycles_create_event(
        idempotencyKey: Key,
        action: ActionIn,
        actual: AmountIn,
        subject: SubjectIn | None = None,
        overagePolicy: OveragePolicy | None = None,
        metrics: MetricsIn | None = None,
        clientTimeMs: Annotated[int, Field(ge=0)] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> CallToolResult:
        del clientTimeMs  # the ledger stamps its own time
        return await _answer(
            cycles.event(
                _subject(subject, defaults),
                _action(action),
                _amount(actual),
                overage_policy=overagePolicy,
                idempotency_key=idempotencyKey,
                metrics=_metrics(metrics),
                metadata=metadata,
            )
        )

    @app.resource("cycles://balances/{tenant}", description="Budget balances of a tenant", mime_type="application/json")
    async def balances(tenant: str) -> str:
        return await _resource(cycles.balances(tenant=tenant))

    @app.resource(
        "cycles://reservations/{reservation_id}", description="A reservation by id", mime_type="application/json"
    )
    async def reservation(reservation_id: str) -> str:
        return await _resource(cycles.get_reservation(reservation_id))

    return app


def _given(*values: str | None) -> dict[str, str]:
    """The filter levels given; the server's defaults apply only when none is."""
    return {level: v for level, v in zip(_LEVELS, values, strict=True) if v}


async def run_server(
    ledger: str | None = None, *, transport: str = "stdio", host: str = "127.0.0.1", port: int = 8765, token: str | None
) -> None:
    from cycles_mcp.transport import serve_http, serve_stdio

    async with AsyncCycles(ledger) as cycles:
        app = create_server(cycles)
        if transport == "http":
            await serve_http(app, host=host, port=port, token=token)
        else:
            await serve_stdio(app)
