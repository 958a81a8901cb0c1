"""What every governance handler shares: the record store, audit entries, events, query parsing.

``Governance`` hangs off the server (``server.gov``). Every mutating operator call goes through
``audited``: it writes one ``AuditLogEntry`` whatever the outcome (status and error code
included), with the request's ``request_id``/``trace_id`` and the ``before``/``after`` the handler
noted in ``AuditNote``. A 401/403 refusal is written by ``authfail.AuthFailures`` instead, which
bounds how many of them one source can make the store keep.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from starlette.datastructures import QueryParams
from starlette.requests import Request

from cycles.errors import CyclesError, Forbidden, InvalidRequest, Unauthorized
from cycles.ledger.records import (
    AUDIT,
    EVENTS,
    MemoryRecordStore,
    RecordStore,
    new_audit,
    new_event,
)
from cycles.server._http import error_status
from cycles.server.auth import Principal

if TYPE_CHECKING:
    from cycles.server.app import CyclesServer

__all__ = ["ADMIN_TENANT", "AuditNote", "Governance", "Handler", "Reply", "audited", "ids_of", "note_of"]

Reply = tuple[int, bytes]
Handler = Callable[["CyclesServer", Request, Principal], Awaitable[Reply]]
T = TypeVar("T")

#: AuditLogEntry.tenant_id for calls made with the admin key (the spec's sentinel).
ADMIN_TENANT = "__admin__"
_TENANT_CACHE_TTL_S = 2.0


@dataclass
class AuditNote:
    """What a handler tells its audit entry: the resource, its state around the change."""

    resource_id: str | None = None
    tenant: str | None = None
    before: Any = None
    after: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


def ids_of(request: Request) -> tuple[str | None, str | None]:
    """The request's (request_id, trace_id), set by the dispatcher."""
    ids = request.scope.get("cycles.ids")
    return ids if ids else (None, None)


def note_of(request: Request) -> AuditNote:
    note = request.scope.get("cycles.audit")
    if note is None:
        note = request.scope["cycles.audit"] = AuditNote()
    return note


def actor_of(p: Principal) -> dict[str, Any]:
    if p.admin:
        return {"type": "admin"}
    if p.key_id:
        return {"type": "api_key", "key_id": p.key_id}
    return {"type": "system"}


class Governance:
    """The server's governance state: records (events, audit, objects) beside its ledger."""

    def __init__(self, records: RecordStore) -> None:
        from cycles.server.governance.alerts import Alerts
        from cycles.server.governance.authfail import AuthFailures
        from cycles.server.governance.webhooks import Dispatcher

        self.records = records
        self._inline = isinstance(records, MemoryRecordStore)
        self._tenants: dict[str, tuple[float, dict[str, Any] | None]] = {}
        self.alerts = Alerts(self)
        self.auth_failures = AuthFailures(self)
        self.dispatcher = Dispatcher(self)

    def alerts_forget(self, tenant: str) -> None:
        """A tenant's webhooks changed: re-read its alert thresholds."""
        self.alerts.forget(tenant)

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call the (blocking) record store off the event loop (inline for memory://)."""
        if self._inline:
            return fn(*args, **kwargs)
        return await asyncio.to_thread(functools.partial(fn, *args, **kwargs))

    async def emit(
        self,
        event_type: str,
        request: Request | None,
        p: Principal | None,
        *,
        tenant_id: str,
        scope: str | None = None,
        data: dict[str, Any] | None = None,
        correlation_id: str | None = None,
        source: str = "cycles-server",
    ) -> dict[str, Any]:
        request_id, trace_id = ids_of(request) if request is not None else (None, None)
        actor = actor_of(p) if p is not None else {"type": "system"}
        if request is not None and request.client is not None and p is not None:
            actor["source_ip"] = request.client.host
        event = new_event(
            event_type,
            tenant_id=tenant_id,
            scope=scope,
            data=data,
            actor=actor,
            source=source,
            correlation_id=correlation_id or request_id,
            request_id=request_id,
            trace_id=trace_id,
        )
        return await self.run(self.records.append, EVENTS, event)

    async def audit(
        self,
        request: Request,
        p: Principal,
        operation: str,
        status: int,
        *,
        resource_type: str | None,
        error_code: str | None = None,
        note: AuditNote | None = None,
    ) -> dict[str, Any]:
        request_id, trace_id = ids_of(request)
        note = note or AuditNote()
        metadata: dict[str, Any] = {"actor_type": "admin" if p.admin else "api_key", **note.extra}
        if note.tenant is not None:
            metadata["target_tenant_id"] = note.tenant
        entry = new_audit(
            operation,
            tenant_id=ADMIN_TENANT if p.admin else (p.tenant or ADMIN_TENANT),
            status=status,
            key_id=p.key_id,
            resource_type=resource_type,
            resource_id=note.resource_id,
            request_id=request_id,
            trace_id=trace_id,
            error_code=error_code,
            source_ip=request.client.host if request.client else None,
            user_agent=(request.headers.get("user-agent") or None),
            before=note.before,
            after=note.after,
            metadata=metadata,
        )
        return await self.run(self.records.append, AUDIT, entry)

    # -- tenants as seen by the guards (cached briefly, like keys) -----------------------------

    async def tenant(self, tenant_id: str, *, fresh: bool = False) -> dict[str, Any] | None:
        now = time.monotonic()
        hit = self._tenants.get(tenant_id)
        if hit is not None and hit[0] > now and not fresh:
            return hit[1]
        doc = await self.run(self.records.doc_get, "tenant", tenant_id)
        if len(self._tenants) > 10_000:
            self._tenants.clear()
        self._tenants[tenant_id] = (now + _TENANT_CACHE_TTL_S, doc)
        return doc

    def forget_tenant(self, tenant_id: str) -> None:
        self._tenants.pop(tenant_id, None)


def audited(operation: str, resource_type: str | None) -> Callable[[Handler], Handler]:
    """Wrap a mutating handler: one audit entry per call, success or failure."""

    def wrap(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def run(s: CyclesServer, request: Request, p: Principal) -> Reply:
            note = note_of(request)
            try:
                status, body = await handler(s, request, p)
            except (Unauthorized, Forbidden):
                raise  # audited (and coalesced, rate limited) with every refusal: authfail.py
            except CyclesError as exc:
                code, status = error_status(exc)
                await s.gov.audit(
                    request, p, operation, status, resource_type=resource_type, error_code=code, note=note
                )
                raise
            await s.gov.audit(request, p, operation, status, resource_type=resource_type, note=note)
            return status, body

        # named in the audit entries of refusals (authfail.py)
        run.operation = operation  # type: ignore[attr-defined]
        run.resource_type = resource_type  # type: ignore[attr-defined]
        return run

    return wrap


# ---- query parameters -----------------------------------------------------------------------


def param(q: QueryParams, name: str, max_len: int = 256) -> str | None:
    value = q.get(name)
    if value is None:
        return None
    value = value.strip()
    if len(value) > max_len:
        raise InvalidRequest(f"{name} is longer than {max_len} characters")
    return value or None


def list_param(q: QueryParams, name: str) -> list[str] | None:
    """``explode=false`` lists: ``a,b`` (repeated form accepted too); at most 25 values."""
    values = [v.strip() for raw in q.getlist(name) for v in raw.split(",") if v.strip()]
    if len(values) > 25:
        raise InvalidRequest(f"{name} takes at most 25 values")
    return values or None


def int_param(q: QueryParams, name: str, lo: int, hi: int) -> int | None:
    raw = param(q, name, 32)
    if raw is None:
        return None
    if not (raw.lstrip("-").isdigit() and raw.isascii()) or not lo <= int(raw) <= hi:
        raise InvalidRequest(f"{name} must be an integer from {lo} to {hi}")
    return int(raw)


def limit_param(q: QueryParams, default: int = 50, hi: int = 100) -> int:
    value = int_param(q, "limit", 1, hi)
    return default if value is None else value


def enum_param(q: QueryParams, name: str, allowed: tuple[str, ...] | frozenset[str]) -> str | None:
    """An enum-typed parameter: absent is unset; blank or unknown is 400."""
    raw = q.get(name)
    if raw is None:
        return None
    if raw.strip() not in allowed:
        shown = ", ".join(sorted(allowed)) if len(allowed) <= 12 else "the spec's values"
        raise InvalidRequest(f"{name} must be one of {shown}")
    return raw.strip()


def time_param(q: QueryParams, name: str) -> str | None:
    """A ``date-time`` parameter: absent is unset; anything else must parse."""
    from cycles.ledger.records import parse_time

    raw = q.get(name)
    if raw is None:
        return None
    if not raw.strip() or len(raw) > 64 or raw.strip().isdigit():
        raise InvalidRequest(f"{name} must be an ISO 8601 date-time")
    parse_time(raw)
    return raw.strip()


def sort_by(q: QueryParams, allowed: tuple[str, ...]) -> str | None:
    """Validate ``sort_by`` against the operation's enum (the listing keeps its own order: the
    cursor is the key it pages by)."""
    return enum_param(q, "sort_by", allowed)


def sort_ascending(q: QueryParams) -> bool:
    return enum_param(q, "sort_dir", ("asc", "desc")) == "asc"


def page_after(items: list[dict[str, Any]], key: str, cursor: str | None, limit: int) -> dict[str, Any]:
    """Cursor paging over a list already in order: items after the one whose ``key`` is ``cursor``."""
    if cursor is not None:
        items = [i for i in items if str(i[key]) > cursor]
    page = items[:limit]
    out: dict[str, Any] = {"has_more": len(items) > limit}
    if out["has_more"]:
        out["next_cursor"] = str(page[-1][key])
    return {"items": page, **out}


def bulk_reply(action: str, matched: int, outcomes: tuple[list[Any], list[Any], list[Any]], key: str) -> Reply:
    """A bulk action's response (Tenant/Budget/WebhookBulkActionResponse share it)."""
    succeeded, failed, skipped = outcomes
    body = {
        "action": action,
        "total_matched": matched,
        "succeeded": succeeded,
        "failed": failed,
        "skipped": skipped,
        "idempotency_key": key,
    }
    return 200, json.dumps(body, separators=(",", ":")).encode()
