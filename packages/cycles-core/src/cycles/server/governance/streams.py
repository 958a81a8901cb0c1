"""Reading the record streams: listEvents, getEvent, listTenantEvents, listAuditLogs."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from starlette.datastructures import QueryParams
from starlette.requests import Request

from cycles.errors import EventNotFound, InsufficientPermissions, InvalidRequest
from cycles.ledger.records import AUDIT, EVENTS, AuditFilter, EventFilter
from cycles.server.auth import Principal
from cycles.server.governance.authz import EVENT_TYPES, scope_allowed
from cycles.server.governance.context import (
    Reply,
    enum_param,
    int_param,
    limit_param,
    list_param,
    param,
    sort_ascending,
    sort_by,
    time_param,
)

if TYPE_CHECKING:
    from cycles.server.app import CyclesServer

__all__ = ["get_event", "list_audit", "list_events", "list_tenant_events"]

#: What listTenantEvents may show a tenant: budget.*, reservation.*, tenant.* (spec).
_TENANT_CATEGORIES = frozenset({"budget", "reservation", "tenant"})
_CATEGORIES = ("budget", "tenant", "api_key", "policy", "reservation", "system", "webhook")
_SORT_BY_EVENTS = ("event_type", "category", "scope", "tenant_id", "timestamp")


def _dumps(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def _trace(q: QueryParams) -> str | None:
    raw = q.get("trace_id")
    value = raw.strip() if raw is not None else None
    if value is not None and (len(value) != 32 or any(c not in "0123456789abcdef" for c in value)):
        raise InvalidRequest("trace_id must be 32 lowercase hex characters")
    return value


def _event_filter(q: QueryParams, tenant: str | None) -> EventFilter:
    sort_by(q, _SORT_BY_EVENTS)
    return EventFilter(
        tenant_id=tenant,
        event_type=enum_param(q, "event_type", EVENT_TYPES),
        category=enum_param(q, "category", _CATEGORIES),
        scope=param(q, "scope", 1024),
        correlation_id=param(q, "correlation_id", 256),
        trace_id=_trace(q),
        request_id=param(q, "request_id", 256),
        since=time_param(q, "from"),
        until=time_param(q, "to"),
        search=param(q, "search", 128),
    )


async def _page(s: CyclesServer, kind: Any, q: QueryParams, tenant: str | None, match: Any, name: str) -> Reply:
    limit = limit_param(q)
    cursor = param(q, "cursor", 64)
    items, next_cursor = await s.gov.run(
        s.gov.records.page, kind, tenant=tenant, match=match, cursor=cursor, limit=limit, ascending=sort_ascending(q)
    )
    body: dict[str, Any] = {name: items, "has_more": next_cursor is not None}
    if next_cursor is not None:
        body["next_cursor"] = next_cursor
    return 200, _dumps(body)


async def list_events(s: CyclesServer, request: Request, p: Principal) -> Reply:
    q = request.query_params
    tenant = param(q, "tenant_id", 128)
    return await _page(s, EVENTS, q, tenant, _event_filter(q, tenant), "events")


async def list_tenant_events(s: CyclesServer, request: Request, p: Principal) -> Reply:
    """``GET /v1/events`` for a tenant key with ``events:read``: its tenant's events, inside its
    scope filter (events without a scope are tenant-wide and hidden from a filtered key)."""
    if not p.may("events:read"):
        raise InsufficientPermissions("this API key lacks the events:read permission")
    q = request.query_params
    base = _event_filter(q, p.tenant)
    flt = p.scope_filter

    def match(r: dict[str, Any]) -> bool:
        if r.get("category") not in _TENANT_CATEGORIES or not base(r):
            return False
        return not flt or (bool(r.get("scope")) and scope_allowed(flt, r["scope"]))

    return await _page(s, EVENTS, q, p.tenant, match, "events")


async def get_event(s: CyclesServer, request: Request, p: Principal) -> Reply:
    event_id: str = request.path_params["event_id"]
    found = await s.gov.run(s.gov.records.get, EVENTS, event_id)
    if found is None:
        raise EventNotFound(f"event {event_id[:64]!r} not found")
    return 200, _dumps(found)


async def list_audit(s: CyclesServer, request: Request, p: Principal) -> Reply:
    q = request.query_params
    tenant = param(q, "tenant_id", 128)
    sort_by(q, ("timestamp", "operation", "resource_type", "tenant_id", "key_id", "status"))
    match = AuditFilter(
        tenant_id=tenant,
        key_id=param(q, "key_id", 128),
        operation=list_param(q, "operation"),
        resource_type=list_param(q, "resource_type"),
        resource_id=param(q, "resource_id", 1024),
        request_id=param(q, "request_id", 256),
        trace_id=_trace(q),
        error_code=list_param(q, "error_code"),
        error_code_exclude=list_param(q, "error_code_exclude"),
        status=int_param(q, "status", 100, 599),
        status_min=int_param(q, "status_min", 100, 599),
        status_max=int_param(q, "status_max", 100, 599),
        since=time_param(q, "from"),
        until=time_param(q, "to"),
        search=param(q, "search", 128),
    )
    return await _page(s, AUDIT, q, tenant, match, "logs")
