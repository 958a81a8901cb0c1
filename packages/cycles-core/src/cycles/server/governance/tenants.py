"""Tenants as objects: createTenant, listTenants, getTenant, updateTenant, bulkActionTenants.

A tenant is a document in the record store (``doc kind "tenant"``). Budgets and keys of a
tenant that was never created as an object keep working (tenants as objects came later); once a
tenant object exists its status governs the runtime: SUSPENDED refuses new reservations (existing
ones may still commit or release), CLOSED refuses every mutation with 409 TENANT_CLOSED.

Closing cascades (the spec's CASCADE SEMANTICS, Mode B, flip first): the status flips to CLOSED
(from then on every guard refuses), then each owned object is driven to its terminal state --
budgets CLOSED, API keys REVOKED, webhook subscriptions DISABLED -- with one audit entry and one
event per object under the close's correlation id. Re-closing a CLOSED tenant completes whatever
an interrupted cascade left, writing nothing for objects already terminal; the runtime guards make
the bound on convergence immediate for mutations (they refuse at once).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, StringConstraints
from starlette.requests import Request

from cycles.errors import CountMismatch, DuplicateResource, InvalidRequest, TenantNotFound
from cycles.ledger.records import iso_ms
from cycles.models import CommitOveragePolicy
from cycles.server._http import parse_body, read_body
from cycles.server.auth import Principal
from cycles.server.governance.context import (
    AuditNote,
    Reply,
    bulk_reply,
    enum_param,
    limit_param,
    note_of,
    page_after,
    param,
    sort_ascending,
    sort_by,
)

if TYPE_CHECKING:
    from cycles.server.app import CyclesServer

__all__ = ["bulk_action", "close_cascade", "create", "get", "list_tenants", "update"]

TenantId = Annotated[str, StringConstraints(min_length=3, max_length=64, pattern=r"^[a-z0-9-]+$")]
_STATUSES = ("ACTIVE", "SUSPENDED", "CLOSED")


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TenantCreateRequest(_Body):
    tenant_id: TenantId
    name: Annotated[str, StringConstraints(max_length=256)]
    parent_tenant_id: Annotated[str, StringConstraints(max_length=64)] | None = None
    metadata: dict[str, str] | None = None
    default_commit_overage_policy: CommitOveragePolicy | None = None
    default_reservation_ttl_ms: int | None = None
    max_reservation_ttl_ms: int | None = None
    max_reservation_extensions: int | None = None
    reservation_expiry_policy: Literal["AUTO_RELEASE", "MANUAL_CLEANUP", "GRACE_ONLY"] | None = None


class TenantUpdateRequest(_Body):
    name: str | None = None
    status: Literal["ACTIVE", "SUSPENDED", "CLOSED"] | None = None
    metadata: dict[str, Any] | None = None
    default_commit_overage_policy: CommitOveragePolicy | None = None
    default_reservation_ttl_ms: int | None = None
    max_reservation_ttl_ms: int | None = None
    max_reservation_extensions: int | None = None


def _check_settings(req: TenantCreateRequest | TenantUpdateRequest) -> None:
    for name in ("default_reservation_ttl_ms", "max_reservation_ttl_ms"):
        value = getattr(req, name)
        if value is not None and not 1000 <= value <= 86_400_000:
            raise InvalidRequest(f"{name} must be from 1000 to 86400000")
    if req.max_reservation_extensions is not None and req.max_reservation_extensions < 0:
        raise InvalidRequest("max_reservation_extensions must be 0 or more")
    if req.metadata is not None:
        if len(req.metadata) > 32:
            raise InvalidRequest("metadata has more than 32 entries")
        if not all(isinstance(v, str) for v in req.metadata.values()):
            raise InvalidRequest("metadata values must be strings")


def _dumps(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def _now() -> str:
    from cycles.ledger.records import _now_ms

    return iso_ms(_now_ms())


async def _load(s: CyclesServer, tenant_id: str) -> dict[str, Any]:
    if len(tenant_id) > 64:
        raise TenantNotFound(f"tenant {tenant_id[:64]!r} not found")
    doc = await s.gov.run(s.gov.records.doc_get, "tenant", tenant_id)
    if doc is None:
        raise TenantNotFound(f"tenant {tenant_id!r} not found")
    return doc


async def create(s: CyclesServer, request: Request, p: Principal) -> Reply:
    req = parse_body(TenantCreateRequest, await read_body(request, s.max_body_bytes))
    _check_settings(req)
    note = note_of(request)
    note.resource_id = note.tenant = req.tenant_id
    if (
        req.parent_tenant_id is not None
        and await s.gov.run(s.gov.records.doc_get, "tenant", req.parent_tenant_id) is None
    ):
        raise InvalidRequest(f"parent tenant {req.parent_tenant_id[:64]!r} not found")  # createTenant declares no 404
    now = _now()
    doc: dict[str, Any] = {
        "tenant_id": req.tenant_id,
        "name": req.name,
        "status": "ACTIVE",
        "created_at": now,
        **req.model_dump(exclude_none=True, exclude={"tenant_id", "name"}, mode="json"),
    }
    if not await s.gov.run(s.gov.records.doc_swap, "tenant", req.tenant_id, None, doc):
        existing = await _load(s, req.tenant_id)
        if existing.get("name") != req.name or existing.get("parent_tenant_id") != req.parent_tenant_id:
            raise DuplicateResource(f"tenant {req.tenant_id!r} already exists with other attributes")
        return 200, _dumps(existing)  # IDEMPOTENCY: a retried create returns the tenant
    note.after = doc
    s.gov.forget_tenant(req.tenant_id)
    await s.gov.emit(
        "tenant.created",
        request,
        p,
        tenant_id=req.tenant_id,
        scope=f"tenant:{req.tenant_id}",
        data={"tenant_id": req.tenant_id, "name": req.name, "status": "ACTIVE"},
    )
    return 201, _dumps(doc)


async def list_tenants(s: CyclesServer, request: Request, p: Principal) -> Reply:
    q = request.query_params
    status = enum_param(q, "status", _STATUSES)
    parent = param(q, "parent_tenant_id", 64)
    search = (param(q, "search", 128) or "").lower()
    limit = limit_param(q)
    docs = await s.gov.run(s.gov.records.doc_list, "tenant")
    docs = [
        d
        for d in docs
        if (status is None or d["status"] == status)
        and (parent is None or d.get("parent_tenant_id") == parent)
        and (not search or search in d["tenant_id"] or search in d["name"].lower())
    ]
    sort_ascending(q)  # validated; tenants page in tenant_id order (the cursor is the last id)
    sort_by(q, ("tenant_id", "name", "status", "created_at"))
    page = page_after(docs, "tenant_id", param(q, "cursor", 128), limit)
    out: dict[str, Any] = {"tenants": page.pop("items"), **page}
    return 200, _dumps(out)


async def get(s: CyclesServer, request: Request, p: Principal) -> Reply:
    return 200, _dumps(await _load(s, request.path_params["tenant_id"]))


_TRANSITION_EVENTS = {
    ("ACTIVE", "SUSPENDED"): "tenant.suspended",
    ("SUSPENDED", "ACTIVE"): "tenant.reactivated",
}


async def update(s: CyclesServer, request: Request, p: Principal) -> Reply:
    tenant_id: str = request.path_params["tenant_id"]
    req = parse_body(TenantUpdateRequest, await read_body(request, s.max_body_bytes))
    _check_settings(req)
    doc, _ = await _apply_update(s, request, p, tenant_id, req)
    return 200, _dumps(doc)


async def _apply_update(
    s: CyclesServer, request: Request, p: Principal, tenant_id: str, req: TenantUpdateRequest
) -> tuple[dict[str, Any], bool]:
    note = note_of(request)
    note.resource_id = note.tenant = tenant_id
    before = await _load(s, tenant_id)
    if before["status"] == "CLOSED":
        if req.status == "CLOSED" and len(req.model_fields_set) == 1:
            await close_cascade(s, request, p, tenant_id)  # complete an interrupted cascade; no-op otherwise
            return before, False
        raise InvalidRequest(f"tenant {tenant_id!r} is closed, and closing is irreversible")
    changes = req.model_dump(exclude_none=True, mode="json")
    now = _now()

    def change(current: dict[str, Any] | None) -> dict[str, Any]:
        if current is None:
            raise TenantNotFound(f"tenant {tenant_id!r} not found")
        if current["status"] == "CLOSED":
            raise InvalidRequest(f"tenant {tenant_id!r} is closed, and closing is irreversible")
        new = {**current, **changes, "updated_at": now}
        if new["status"] != current["status"]:
            if new["status"] == "SUSPENDED":
                new["suspended_at"] = now
            elif new["status"] == "ACTIVE":
                new.pop("suspended_at", None)
            elif new["status"] == "CLOSED":
                new["closed_at"] = now
        return new

    after = await s.gov.run(s.gov.records.doc_update, "tenant", tenant_id, change)
    assert after is not None
    s.gov.forget_tenant(tenant_id)
    note.before, note.after = before, after
    old_status, new_status = before["status"], after["status"]
    scope = f"tenant:{tenant_id}"
    data = {"tenant_id": tenant_id, "previous_status": old_status, "new_status": new_status}
    if old_status != new_status:
        if new_status == "CLOSED":
            await s.gov.emit("tenant.closed", request, p, tenant_id=tenant_id, scope=scope, data=data)
            await close_cascade(s, request, p, tenant_id)
        else:
            event = _TRANSITION_EVENTS[(old_status, new_status)]
            await s.gov.emit(event, request, p, tenant_id=tenant_id, scope=scope, data=data)
    if set(changes) - {"status"}:
        changed_fields = sorted(k for k in changes if k != "status" and before.get(k) != after.get(k))
        if changed_fields:
            await s.gov.emit(
                "tenant.updated",
                request,
                p,
                tenant_id=tenant_id,
                scope=scope,
                data={"tenant_id": tenant_id, "changed_fields": changed_fields},
            )
    return after, True


async def close_cascade(s: CyclesServer, request: Request, p: Principal, tenant_id: str) -> int:
    """Drive every owned object of a CLOSED tenant to its terminal state. Idempotent: a marker per
    object (``cas`` in the record store) makes sure each one is audited and announced once, even
    when two servers run the cascade at the same time."""
    correlation = f"tenant_close:{tenant_id}"
    records = s.gov.records
    done = 0

    async def first(kind: str, object_id: str) -> bool:
        return await s.gov.run(records.cas, f"cascade:{tenant_id}:{kind}:{object_id}", None, "done")

    balances = await s.ledger.list_budgets(tenant=tenant_id)  # reserved amounts before the drain
    await _drain_reservations(s, tenant_id)
    for balance in balances:
        unit = balance.allocated.unit if balance.allocated else balance.remaining.unit
        await s.ledger.set_budget_status(balance.scope, "CLOSED", unit=unit)
        ledger_id = ledger_id_of(balance.scope, unit.value)
        if not await first("budget", ledger_id):
            continue
        data: dict[str, Any] = {"ledger_id": ledger_id, "scope": balance.scope, "unit": unit.value}
        data["new_status"] = "CLOSED"
        await _cascaded(
            s, request, p, tenant_id, "budget.closed_via_tenant_cascade", "budget", ledger_id, correlation, data
        )
        reserved = balance.reserved.amount if balance.reserved else 0
        if reserved:
            data = {**data, "released_amount": reserved}
            await _cascaded(
                s,
                request,
                p,
                tenant_id,
                "reservation.released_via_tenant_cascade",
                "budget",
                ledger_id,
                correlation,
                data,
            )
        done += 1
    for key in await s.keys.list(tenant=tenant_id):
        if key.revoked_at_ms is None:
            await s.keys.revoke(key.key_id, reason="tenant_closed")
            s.auth.forget(key.key_id)
        if not await first("api_key", key.key_id):
            continue
        data = {"key_id": key.key_id, "prior_status": key.status, "new_status": "REVOKED"}
        await _cascaded(
            s, request, p, tenant_id, "api_key.revoked_via_tenant_cascade", "api_key", key.key_id, correlation, data
        )
        done += 1
    for hook in await s.gov.run(records.doc_list, "webhook", tenant=tenant_id):
        sid = hook["subscription_id"]

        def disable(current: dict[str, Any] | None) -> dict[str, Any] | None:
            if current is None:
                return None
            return {**current, "status": "DISABLED", "disabled_reason": "tenant_closed"}

        await s.gov.run(records.doc_update, "webhook", sid, disable)
        if not await first("webhook", sid):
            continue
        data = {"subscription_id": sid, "prior_status": str(hook.get("status")), "new_status": "DISABLED"}
        await _cascaded(
            s, request, p, tenant_id, "webhook.disabled_via_tenant_cascade", "webhook", sid, correlation, data
        )
        done += 1
    return done


async def _drain_reservations(s: CyclesServer, tenant_id: str) -> int:
    """Release every ACTIVE reservation of the tenant (reason ``tenant_closed``; no overage debt):
    what they held returns to the budgets before those close. Idempotent by request key."""
    from cycles.errors import CyclesError
    from cycles.ledger.rules import ReservationQuery
    from cycles.models import ReleaseRequest, ReservationStatus

    released = 0
    for _ in range(1000):  # bounded: 200 per page
        page = await s.ledger.list_reservations(
            ReservationQuery(tenant=tenant_id, status=ReservationStatus.ACTIVE, limit=200), tenant=tenant_id
        )
        if not page.reservations:
            break
        for r in page.reservations:
            req = ReleaseRequest(idempotency_key=f"tenant-close-{r.reservation_id}"[:256], reason="tenant_closed")
            try:
                await s.ledger.release(r.reservation_id, req, tenant=tenant_id)
                released += 1
            except CyclesError:  # finalized or expired meanwhile: nothing left to drain
                pass
    return released


def ledger_id_of(scope: str, unit: str) -> str:
    """A budget's ``ledger_id``: its (scope, unit) pair, which identifies it."""
    return f"{scope}#{unit}"


async def _cascaded(
    s: CyclesServer,
    request: Request,
    p: Principal,
    tenant_id: str,
    kind: str,
    resource_type: str,
    resource_id: str,
    correlation: str,
    data: dict[str, Any],
) -> None:
    data = {**data, "cascade_reason": "tenant_closed"}
    await s.gov.audit(
        request,
        p,
        kind,
        200,
        resource_type=resource_type,
        note=AuditNote(resource_id=resource_id, tenant=tenant_id, extra={"correlation_id": correlation}),
    )
    await s.gov.emit(
        kind, request, p, tenant_id=tenant_id, scope=data.get("scope"), data=data, correlation_id=correlation
    )


class TenantBulkFilter(_Body):
    status: Literal["ACTIVE", "SUSPENDED", "CLOSED"] | None = None
    parent_tenant_id: str | None = None
    observe_mode: str | None = None
    search: Annotated[str, StringConstraints(max_length=128)] | None = None


class TenantBulkRequest(_Body):
    filter: TenantBulkFilter
    action: Literal["SUSPEND", "REACTIVATE", "CLOSE"]
    expected_count: Annotated[int, "count"] | None = None
    idempotency_key: Annotated[str, StringConstraints(min_length=1, max_length=128)]


async def bulk_action(s: CyclesServer, request: Request, p: Principal) -> Reply:
    raw = await read_body(request, s.max_body_bytes)
    req = parse_body(TenantBulkRequest, raw)
    f = req.filter
    if not f.model_fields_set:
        raise InvalidRequest("filter must name at least one of status, parent_tenant_id, observe_mode, search")
    if req.expected_count is not None and req.expected_count < 0:
        raise InvalidRequest("expected_count must be 0 or more")
    docs = await s.gov.run(s.gov.records.doc_list, "tenant")
    search = (f.search or "").lower()
    chosen = [
        d
        for d in docs
        if (f.status is None or d["status"] == f.status)
        and (f.parent_tenant_id is None or d.get("parent_tenant_id") == f.parent_tenant_id)
        and (not search or search in d["tenant_id"] or search in d["name"].lower())
    ]
    if len(chosen) > 500:
        raise InvalidRequest("the filter matches more than 500 tenants: narrow it")
    if req.expected_count is not None and req.expected_count != len(chosen):
        raise CountMismatch(
            f"the filter matches {len(chosen)} tenants, not {req.expected_count}",
            details={"matched": len(chosen)},
        )
    target = {"SUSPEND": "SUSPENDED", "REACTIVATE": "ACTIVE", "CLOSE": "CLOSED"}[req.action]
    succeeded: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for d in chosen:
        tid = d["tenant_id"]
        if d["status"] == target:
            skipped.append({"id": tid, "reason": f"already {target}"})
            continue
        try:
            await _apply_update(s, request, p, tid, TenantUpdateRequest(status=target))  # type: ignore[arg-type]
            succeeded.append({"id": tid})
        except Exception as exc:  # noqa: BLE001 - reported per row
            code = getattr(exc, "code", "INTERNAL_ERROR")
            failed.append({"id": tid, "error_code": code, "message": str(getattr(exc, "message", exc))[:200]})
    return bulk_reply(req.action, len(chosen), (succeeded, failed, skipped), req.idempotency_key)
