"""Budgets on the spec's paths: createBudget, listBudgets, lookupBudget, updateBudget,
freezeBudget, unfreezeBudget, fundBudget.

The ledger keeps the money (allocated, spent, reserved, debt, overdraft limit, status); a
``budget`` document beside it keeps what the ledger does not (``created_at``, ``updated_at``,
``metadata``, ``commit_overage_policy``, the spec's status as last set here, alert thresholds).

Funding (CREDIT, DEBIT, RESET, RESET_SPENT, REPAY_DEBT) is one atomic ledger operation,
``Ledger.fund`` (``cycles.ledger.funding`` says what each does and refuses): no lease and no
read-then-write here, so a funding never races a reservation. The ledger keeps the idempotency
record; a replay answers the first result again and emits no second event.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, StringConstraints
from starlette.requests import Request

from cycles.errors import (
    BudgetNotFound,
    DuplicateResource,
    Forbidden,
    InsufficientPermissions,
    InvalidRequest,
    NotFound,
    TenantClosed,
    UnitMismatch,
)
from cycles.ledger.funding import FundingResult
from cycles.ledger.records import iso_ms
from cycles.models import Amount, Balance, CommitOveragePolicy, Unit
from cycles.scopes import parse_scope, scope_tenant
from cycles.server._http import parse_body, read_body
from cycles.server.auth import Principal
from cycles.server.governance.authz import scope_allowed
from cycles.server.governance.context import (
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
from cycles.server.governance.tenants import ledger_id_of

if TYPE_CHECKING:
    from cycles.server.app import CyclesServer

__all__ = ["create", "freeze", "fund", "list_budgets", "lookup", "unfreeze", "update"]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BudgetCreateRequest(_Body):
    tenant_id: str | None = None
    scope: Annotated[str, StringConstraints(min_length=1, max_length=1024)]
    unit: Unit
    allocated: Amount
    overdraft_limit: Amount | None = None
    commit_overage_policy: CommitOveragePolicy | None = None
    rollover_policy: Literal["NONE", "CARRY_FORWARD", "CAP_AT_ALLOCATED"] | None = None
    period_start: str | None = None
    period_end: str | None = None
    metadata: dict[str, Any] | None = None


class BudgetUpdateRequest(_Body):
    overdraft_limit: Amount | None = None
    commit_overage_policy: CommitOveragePolicy | None = None
    metadata: dict[str, Any] | None = None


class BudgetStatusTransitionRequest(_Body):
    reason: Annotated[str, StringConstraints(max_length=512)] | None = None
    metadata: dict[str, Any] | None = None


class BudgetFundingRequest(_Body):
    operation: Literal["CREDIT", "DEBIT", "RESET", "REPAY_DEBT", "RESET_SPENT"]
    amount: Amount
    spent: Amount | None = None
    reason: Annotated[str, StringConstraints(max_length=512)] | None = None
    idempotency_key: Annotated[str, StringConstraints(min_length=1, max_length=256)] | None = None
    metadata: dict[str, Any] | None = None


def _dumps(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def _now() -> str:
    from cycles.ledger.records import _now_ms

    return iso_ms(_now_ms())


def _amount(a: Amount | None, unit: Unit) -> dict[str, Any]:
    return {"unit": unit.value, "amount": a.amount if a is not None else 0}


def ledger_view(b: Balance, doc: dict[str, Any] | None) -> dict[str, Any]:
    """A ledger Balance plus its document as the spec's BudgetLedger."""
    unit = b.allocated.unit if b.allocated else b.remaining.unit
    doc = doc or {}
    out: dict[str, Any] = {
        "ledger_id": ledger_id_of(b.scope, unit.value),
        "scope": b.scope,
        "scope_path": b.scope_path,
        "unit": unit.value,
        "allocated": _amount(b.allocated, unit),
        "remaining": {"unit": unit.value, "amount": b.remaining.amount},
        "reserved": _amount(b.reserved, unit),
        "spent": _amount(b.spent, unit),
        "debt": _amount(b.debt, unit),
        "overdraft_limit": _amount(b.overdraft_limit, unit),
        "is_over_limit": bool(b.is_over_limit),
        "status": doc.get("status", "ACTIVE"),
        "created_at": doc.get("created_at", "1970-01-01T00:00:00.000Z"),
    }
    tenant = scope_tenant(b.scope)
    if tenant is not None:
        out["tenant_id"] = tenant
    for name in ("commit_overage_policy", "rollover_policy", "period_start", "period_end", "updated_at"):
        if doc.get(name) is not None:
            out[name] = doc[name]
    return out


def _ratio(q: Any, name: str) -> float | None:
    raw = q.get(name)
    if raw is None:
        return None
    try:
        value: float = float(raw)
    except ValueError:
        raise InvalidRequest(f"{name} must be a number from 0 to 1") from None
    if not 0.0 <= value <= 1.0:
        raise InvalidRequest(f"{name} must be a number from 0 to 1")
    return value


def _utilization(view: dict[str, Any]) -> float | None:
    allocated = int(view["allocated"]["amount"])
    if allocated <= 0:
        return None
    return int(view["spent"]["amount"] + view["reserved"]["amount"]) / allocated


def _unit_q(request: Request) -> Unit:
    raw = param(request.query_params, "unit", 32)
    if raw is None:
        raise InvalidRequest("unit is required")
    try:
        return Unit(raw)
    except ValueError:
        raise InvalidRequest(f"unit must be one of {', '.join(u.value for u in Unit)}") from None


def _scope_q(request: Request) -> str:
    scope = param(request.query_params, "scope", 1024)
    if scope is None:
        raise InvalidRequest("scope is required")
    parse_scope(scope)
    return scope


def _own(p: Principal, scope: str) -> None:
    """A tenant key acts only on its tenant's budgets, inside its scope filter."""
    if p.admin:
        return
    if scope_tenant(scope) != p.tenant or not scope_allowed(p.scope_filter, scope):
        raise Forbidden("the budget is outside this API key's tenant or scope_filter")


async def _guard_tenant(s: CyclesServer, scope: str) -> None:
    tenant = scope_tenant(scope)
    if tenant is not None:
        doc = await s.gov.tenant(tenant, fresh=True)
        if doc is not None and doc["status"] == "CLOSED":
            raise TenantClosed(f"tenant {tenant!r} is closed", details={"tenant_id": tenant})


async def _balance(s: CyclesServer, scope: str, unit: Unit) -> Balance:
    try:
        return await s.ledger.get_budget(scope, unit=unit)
    except NotFound:
        raise BudgetNotFound(f"no {unit.value} budget at {scope}") from None


async def _doc(s: CyclesServer, scope: str, unit: Unit) -> dict[str, Any] | None:
    return await s.gov.run(s.gov.records.doc_get, "budget", ledger_id_of(scope, unit.value))


async def _save_doc(s: CyclesServer, scope: str, unit: Unit, **changes: Any) -> dict[str, Any]:
    lid = ledger_id_of(scope, unit.value)
    now = _now()

    def change(current: dict[str, Any] | None) -> dict[str, Any]:
        base = current or {"ledger_id": lid, "scope": scope, "unit": unit.value, "status": "ACTIVE", "created_at": now}
        base.setdefault("tenant_id", scope_tenant(scope) or "")
        return {**base, **changes, "updated_at": now}

    doc = await s.gov.run(s.gov.records.doc_update, "budget", lid, change)
    assert doc is not None
    return doc


def _state(b: Balance) -> dict[str, int]:
    return {
        "allocated": b.allocated.amount if b.allocated else 0,
        "remaining": b.remaining.amount,
        "spent": b.spent.amount if b.spent else 0,
        "reserved": b.reserved.amount if b.reserved else 0,
        "debt": b.debt.amount if b.debt else 0,
    }


async def create(s: CyclesServer, request: Request, p: Principal) -> Reply:
    req = parse_body(BudgetCreateRequest, await read_body(request, s.max_body_bytes))
    parse_scope(req.scope)
    tenant = scope_tenant(req.scope)
    if p.admin:
        if req.tenant_id is None:
            raise InvalidRequest("tenant_id is required with the admin key")
        if tenant != req.tenant_id:
            raise InvalidRequest(f"scope {req.scope!r} is not under tenant {req.tenant_id!r}")
    elif req.tenant_id is not None:
        raise InvalidRequest("tenant_id must not be set with a tenant API key (it is the key's tenant)")
    _own(p, req.scope)
    if not p.may("budgets:write"):
        raise InsufficientPermissions("this API key lacks the budgets:write permission")
    for name in ("allocated", "overdraft_limit"):
        a = getattr(req, name)
        if a is not None and a.unit != req.unit:
            raise UnitMismatch(f"{name} must be in the budget's unit {req.unit.value}")
    await _guard_tenant(s, req.scope)
    note = note_of(request)
    note.resource_id, note.tenant = ledger_id_of(req.scope, req.unit.value), tenant
    try:
        await s.ledger.get_budget(req.scope, unit=req.unit)
        raise DuplicateResource(f"a {req.unit.value} budget already exists at {req.scope}")
    except NotFound:
        pass
    balance = await s.ledger.set_budget(req.scope, req.allocated, overdraft_limit=req.overdraft_limit)
    extra = req.model_dump(
        exclude_none=True,
        include={"commit_overage_policy", "rollover_policy", "period_start", "period_end", "metadata"},
        mode="json",
    )
    doc = await _save_doc(s, req.scope, req.unit, status="ACTIVE", created_at=_now(), **extra)
    view = ledger_view(balance, doc)
    note.after = view
    await _budget_event(s, request, p, "budget.created", view, "CREATE", None)
    return 201, _dumps(view)


async def _budget_event(
    s: CyclesServer,
    request: Request,
    p: Principal,
    event_type: str,
    view: dict[str, Any],
    operation: str,
    before: dict[str, Any] | None,
    reason: str | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    data: dict[str, Any] = {
        "ledger_id": view["ledger_id"],
        "scope": view["scope"],
        "unit": view["unit"],
        "operation": operation,
        "new_state": {k: view[k]["amount"] for k in ("allocated", "remaining", "spent", "reserved", "debt")}
        | {"status": view["status"]},
    }
    if before is not None:
        data["previous_state"] = {
            k: before[k]["amount"] for k in ("allocated", "remaining", "spent", "reserved", "debt")
        } | {"status": before["status"]}
    if reason:
        data["reason"] = reason
    data.update(extra or {})
    await s.gov.emit(
        event_type, request, p, tenant_id=view.get("tenant_id", "__system__"), scope=view["scope"], data=data
    )


async def list_budgets(s: CyclesServer, request: Request, p: Principal) -> Reply:
    q = request.query_params
    tenant = param(q, "tenant_id", 128)
    if not p.admin:
        if tenant is not None and tenant != p.tenant:
            raise Forbidden("budgets can only be listed within the tenant of this API key")
        tenant = p.tenant
        if not p.may("budgets:read"):
            raise InsufficientPermissions("this API key lacks the budgets:read permission")
    prefix = param(q, "scope_prefix", 1024)
    unit = enum_param(q, "unit", tuple(u.value for u in Unit))
    status = enum_param(q, "status", ("ACTIVE", "FROZEN", "CLOSED"))
    over = enum_param(q, "over_limit", ("true", "false"))
    has_debt = enum_param(q, "has_debt", ("true", "false"))
    util_lo, util_hi = _ratio(q, "utilization_min"), _ratio(q, "utilization_max")
    search = (param(q, "search", 128) or "").lower()
    sort_by(q, ("tenant_id", "scope", "unit", "status", "commit_overage_policy", "utilization", "debt"))
    sort_ascending(q)
    limit = limit_param(q)
    docs = {d["ledger_id"]: d for d in await s.gov.run(s.gov.records.doc_list, "budget", tenant=tenant)}
    views = []
    for b in await s.ledger.list_budgets(tenant=tenant):
        if not p.admin and not scope_allowed(p.scope_filter, b.scope):
            continue
        unit_of = (b.allocated.unit if b.allocated else b.remaining.unit).value
        view = ledger_view(b, docs.get(ledger_id_of(b.scope, unit_of)))
        if prefix is not None and not view["scope"].startswith(prefix):
            continue
        if search and search not in view["scope"].lower():
            continue
        if unit is not None and view["unit"] != unit:
            continue
        if status is not None and view["status"] != status:
            continue
        if over is not None and view["is_over_limit"] != (over == "true"):
            continue
        if has_debt is not None and (view["debt"]["amount"] > 0) != (has_debt == "true"):
            continue
        if util_lo is not None or util_hi is not None:
            util = _utilization(view)
            if util is None or (util_lo is not None and util < util_lo) or (util_hi is not None and util > util_hi):
                continue
        views.append(view)
    page = page_after(views, "ledger_id", param(q, "cursor", 1100), limit)
    return 200, _dumps({"ledgers": page.pop("items"), **page})


async def lookup(s: CyclesServer, request: Request, p: Principal) -> Reply:
    scope, unit = _scope_q(request), _unit_q(request)
    _own(p, scope)
    if not p.may("budgets:read"):
        raise InsufficientPermissions("this API key lacks the budgets:read permission")
    b = await _balance(s, scope, unit)
    return 200, _dumps(ledger_view(b, await _doc(s, scope, unit)))


async def update(s: CyclesServer, request: Request, p: Principal) -> Reply:
    scope, unit = _scope_q(request), _unit_q(request)
    req = parse_body(BudgetUpdateRequest, await read_body(request, s.max_body_bytes))
    if req.overdraft_limit is not None and req.overdraft_limit.unit != unit:
        raise UnitMismatch(f"overdraft_limit must be in the budget's unit {unit.value}")
    await _guard_tenant(s, scope)
    note = note_of(request)
    note.resource_id, note.tenant = ledger_id_of(scope, unit.value), scope_tenant(scope)
    b = await _balance(s, scope, unit)
    before = ledger_view(b, await _doc(s, scope, unit))
    if req.overdraft_limit is not None:  # the limit alone, in one ledger step: a funding beside it stays
        b = await s.ledger.set_overdraft_limit(scope, req.overdraft_limit)
    changes = req.model_dump(exclude_none=True, include={"commit_overage_policy", "metadata"}, mode="json")
    view = ledger_view(b, await _save_doc(s, scope, unit, **changes))
    note.before, note.after = before, view
    await _budget_event(s, request, p, "budget.updated", view, "UPDATE", before)
    return 200, _dumps(view)


async def _transition(s: CyclesServer, request: Request, p: Principal, target: str) -> Reply:
    scope, unit = _scope_q(request), _unit_q(request)
    raw = await read_body(request, s.max_body_bytes)
    req = parse_body(BudgetStatusTransitionRequest, raw) if raw.strip() else BudgetStatusTransitionRequest()
    await _guard_tenant(s, scope)
    note = note_of(request)
    note.resource_id, note.tenant = ledger_id_of(scope, unit.value), scope_tenant(scope)
    b = await _balance(s, scope, unit)
    before = ledger_view(b, await _doc(s, scope, unit))
    if before["status"] == target:
        raise DuplicateResource(f"budget {scope} ({unit.value}) is already {target}")
    if before["status"] == "CLOSED":
        raise DuplicateResource(f"budget {scope} ({unit.value}) is closed for good")
    rows = await s.ledger.set_budget_status(scope, target, unit=unit)
    view = ledger_view(rows[0], await _save_doc(s, scope, unit, status=target))
    note.before, note.after = before, view
    if req.reason:
        note.extra["reason"] = req.reason
    event = "budget.frozen" if target == "FROZEN" else "budget.unfrozen"
    await _budget_event(s, request, p, event, view, "STATUS_CHANGE", before, req.reason)
    return 200, _dumps(view)


async def freeze(s: CyclesServer, request: Request, p: Principal) -> Reply:
    return await _transition(s, request, p, "FROZEN")


async def unfreeze(s: CyclesServer, request: Request, p: Principal) -> Reply:
    return await _transition(s, request, p, "ACTIVE")


_FUND_EVENTS = {
    "CREDIT": "budget.funded",
    "DEBIT": "budget.debited",
    "RESET": "budget.reset",
    "RESET_SPENT": "budget.reset_spent",
    "REPAY_DEBT": "budget.debt_repaid",
}


async def fund(s: CyclesServer, request: Request, p: Principal) -> Reply:
    scope, unit = _scope_q(request), _unit_q(request)
    tenant = param(request.query_params, "tenant_id", 128)
    if p.admin and tenant is None:
        raise InvalidRequest("tenant_id is required with the admin key")
    if tenant is not None and scope_tenant(scope) != tenant:
        raise InvalidRequest(f"scope {scope!r} is not under tenant {tenant!r}")
    _own(p, scope)
    if not p.may("budgets:write"):
        raise InsufficientPermissions("this API key lacks the budgets:write permission")
    req = parse_body(BudgetFundingRequest, await read_body(request, s.max_body_bytes))
    note = note_of(request)
    note.resource_id, note.tenant = ledger_id_of(scope, unit.value), scope_tenant(scope)
    result, before, view = await _fund_one(
        s, request, p, scope, unit, req.operation, req.amount, req.reason, req.spent, req.idempotency_key
    )
    note.before, note.after = before, view
    if req.reason:
        note.extra["reason"] = req.reason
    if result.replayed:
        note.extra["replayed"] = True
    return 200, _dumps(result.to_wire())


async def _fund_one(
    s: CyclesServer,
    request: Request,
    p: Principal,
    scope: str,
    unit: Unit,
    operation: str,
    amount: Amount,
    reason: str | None,
    spent: Amount | None = None,
    idempotency_key: str | None = None,
) -> tuple[FundingResult, dict[str, Any], dict[str, Any]]:
    """One funding operation, atomic in the ledger (``Ledger.fund``: no read-then-write here);
    returns the result and the (before, after) views. The event is emitted only when the ledger
    applied it (an idempotent replay changed nothing)."""
    await _guard_tenant(s, scope)
    if operation != "RESET_SPENT":
        spent = None  # the spec: "only honoured for RESET_SPENT; ignored for other operations"
    try:
        result = await s.ledger.fund(scope, unit, operation, amount, spent=spent, idempotency_key=idempotency_key)
    except NotFound:
        raise BudgetNotFound(f"no {unit.value} budget at {scope}") from None
    doc = await _doc(s, scope, unit)
    before, view = ledger_view(result.before, doc), ledger_view(result.after, doc)
    if not result.replayed:
        extra = {"spent_override_provided": spent is not None} if operation == "RESET_SPENT" else None
        await _budget_event(s, request, p, _FUND_EVENTS[operation], view, operation, before, reason, extra)
    return result, before, view


class BudgetBulkFilter(_Body):
    tenant_id: str
    scope_prefix: str | None = None
    unit: Unit | None = None
    status: Literal["ACTIVE", "FROZEN", "CLOSED"] | None = None
    over_limit: bool | None = None
    has_debt: bool | None = None
    utilization_min: float | None = None
    utilization_max: float | None = None
    search: Annotated[str, StringConstraints(max_length=128)] | None = None


class BudgetBulkActionRequest(_Body):
    filter: BudgetBulkFilter
    action: Literal["CREDIT", "DEBIT", "RESET", "REPAY_DEBT", "RESET_SPENT"]
    amount: Amount | None = None
    spent: Amount | None = None
    reason: Annotated[str, StringConstraints(max_length=512)] | None = None
    expected_count: int | None = None
    idempotency_key: Annotated[str, StringConstraints(min_length=1, max_length=128)]


async def bulk_action(s: CyclesServer, request: Request, p: Principal) -> Reply:
    """bulkActionBudgets: one funding operation on every budget the filter matches (at most 500;
    ``expected_count`` must match when given). Each row succeeds or fails on its own."""
    from cycles.errors import CountMismatch

    req = parse_body(BudgetBulkActionRequest, await read_body(request, s.max_body_bytes))
    f = req.filter
    if req.amount is None:
        raise InvalidRequest(f"{req.action} needs an amount")
    if req.expected_count is not None and req.expected_count < 0:
        raise InvalidRequest("expected_count must be 0 or more")
    for bound in (f.utilization_min, f.utilization_max):
        if bound is not None and not 0.0 <= bound <= 1.0:
            raise InvalidRequest("utilization bounds must be from 0 to 1")
    docs = {d["ledger_id"]: d for d in await s.gov.run(s.gov.records.doc_list, "budget", tenant=f.tenant_id)}
    rows = []
    for b in await s.ledger.list_budgets(tenant=f.tenant_id):
        unit_of = (b.allocated.unit if b.allocated else b.remaining.unit).value
        v = ledger_view(b, docs.get(ledger_id_of(b.scope, unit_of)))
        util = _utilization(v)
        if (
            (f.scope_prefix is None or v["scope"].startswith(f.scope_prefix))
            and (f.unit is None or v["unit"] == f.unit.value)
            and (f.status is None or v["status"] == f.status)
            and (f.over_limit is None or v["is_over_limit"] == f.over_limit)
            and (f.has_debt is None or (v["debt"]["amount"] > 0) == f.has_debt)
            and (f.utilization_min is None or (util is not None and util >= f.utilization_min))
            and (f.utilization_max is None or (util is not None and util <= f.utilization_max))
            and (not f.search or f.search.lower() in v["scope"].lower())
        ):
            rows.append(v)
    if len(rows) > 500:
        raise InvalidRequest("the filter matches more than 500 budgets: narrow it")
    if req.expected_count is not None and req.expected_count != len(rows):
        raise CountMismatch(f"the filter matches {len(rows)} budgets, not {req.expected_count}")
    succeeded, failed, skipped = [], [], []
    for v in rows:
        if v["unit"] != req.amount.unit.value:
            skipped.append({"id": v["ledger_id"], "reason": f"unit is {v['unit']}"})
            continue
        try:
            # one key per row, derived from the bulk's: a resubmitted bulk replays, never re-applies
            row_key = hashlib.sha256(f"{req.idempotency_key}\n{v['ledger_id']}".encode()).hexdigest()
            await _fund_one(
                s, request, p, v["scope"], Unit(v["unit"]), req.action, req.amount, req.reason, req.spent, row_key
            )
            succeeded.append({"id": v["ledger_id"]})
        except Exception as exc:  # noqa: BLE001 - reported per row
            code = str(getattr(exc, "code", "INTERNAL_ERROR"))
            failed.append(
                {"id": v["ledger_id"], "error_code": code, "message": str(getattr(exc, "message", exc))[:200]}
            )
    note = note_of(request)
    note.tenant, note.resource_id = f.tenant_id, f"bulk:{req.idempotency_key}"
    note.extra["matched"] = len(rows)
    return bulk_reply(req.action, len(rows), (succeeded, failed, skipped), req.idempotency_key)
