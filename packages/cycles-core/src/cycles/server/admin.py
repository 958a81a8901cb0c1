"""The operator plane, under ``/admin`` and the ``X-Admin-API-Key`` header.

Protocol v0 leaves budget administration out of scope ("Implementations MAY provide these via an
operator/admin plane"), so this plane is ours and the v0 runtime shapes stay untouched. It is
enough to provision a fresh deployment over HTTP without touching the store:

    POST   /admin/budgets              {scope, amount, overdraft_limit?, caps?, period?, timezone?,
                                        rollover_policy?}                          create / set allocation
    POST   /admin/budgets/fund         {scope, amount}                           add funds (repays debt first)
    POST   /admin/budgets/status       {scope, status, unit?}                    ACTIVE / FROZEN / CLOSED
    GET    /admin/budgets?tenant=      list                 GET /admin/budgets/{scope}?unit=   one
    POST   /admin/keys                 {tenant, name?}      -> the new key, shown once
    GET    /admin/keys?tenant=         list (never the keys themselves)
    GET    /admin/keys/{key_id}        DELETE /admin/keys/{key_id}   revoke
    POST   /admin/policies             {scope, set_quota? | delete_quota? | allowed_action_kinds? |
                                        denied_action_kinds?}  -> the scope's policy (action quotas)
    GET    /admin/policies?tenant=     list

Errors use the protocol's ErrorResponse shape.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BaseModel, ConfigDict, StringConstraints
from starlette.requests import Request

from cycles.errors import InvalidRequest, NotFound
from cycles.identifiers import IDENTIFIER_MAX, IDENTIFIER_PATTERN, check_identifier
from cycles.ledger import periods
from cycles.ledger.quotas import PolicyEdit
from cycles.models import Amount, Caps, Unit
from cycles.server._http import model_json, parse_body, read_body
from cycles.server.auth import Principal

if TYPE_CHECKING:
    from cycles.server.app import CyclesServer

__all__ = [
    "create_key",
    "delete_budget",
    "fund_budget",
    "get_budget",
    "get_key",
    "list_budgets",
    "list_keys",
    "list_policies",
    "update_policy",
    "parse_unit",
    "revoke_key",
    "sweep",
    "set_budget",
    "set_budget_status",
]

Reply = tuple[int, bytes]
Scope = Annotated[str, StringConstraints(min_length=1, max_length=1024)]
TenantName = Annotated[str, StringConstraints(min_length=1, max_length=IDENTIFIER_MAX, pattern=IDENTIFIER_PATTERN)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BudgetSetRequest(_Body):
    scope: Scope
    amount: Amount
    overdraft_limit: Amount | None = None
    caps: Caps | None = None
    # recurring budgets (cycles.ledger.periods): "day" / "month" / ... or "12h"; "none" removes the period
    period: Annotated[str, StringConstraints(max_length=32)] | None = None
    timezone: Annotated[str, StringConstraints(max_length=64)] | None = None
    rollover_policy: Literal["NONE", "CARRY_FORWARD", "CAP_AT_ALLOCATED"] | None = None


class BudgetFundRequest(_Body):
    scope: Scope
    amount: Amount


class BudgetStatusRequest(_Body):
    scope: Scope
    status: Literal["ACTIVE", "FROZEN", "CLOSED"]
    unit: Unit | None = None


class PolicyUpdateRequest(PolicyEdit):
    scope: Scope


class KeyCreateRequest(_Body):
    tenant: TenantName
    name: Annotated[str, StringConstraints(max_length=128)] | None = None


def _json_list(name: str, items: list[bytes]) -> bytes:
    return b'{"' + name.encode() + b'":[' + b",".join(items) + b"]}"


def parse_unit(raw: str) -> Unit | None:
    """A unit name from a query or a form (``""``: none given)."""
    raw = raw.strip()
    if not raw:
        return None
    try:
        return Unit(raw)
    except ValueError:
        raise InvalidRequest(f"unit must be one of {', '.join(u.value for u in Unit)}") from None


def _unit_param(request: Request) -> Unit | None:
    return parse_unit(request.query_params.get("unit") or "")


def _tenant_param(request: Request) -> str | None:
    tenant = request.query_params.get("tenant") or None  # checked whole: "acme\n" is not "acme"
    return None if tenant is None else check_identifier(tenant, "tenant")


async def set_budget(s: CyclesServer, request: Request, p: Principal) -> Reply:
    req = parse_body(BudgetSetRequest, await read_body(request, s.max_body_bytes))
    try:
        await s.ledger.get_budget(req.scope, unit=req.amount.unit)
        created = False
    except NotFound:
        created = True
    balance = await s.timed(
        "set_budget",
        s.ledger.set_budget(
            req.scope,
            req.amount,
            overdraft_limit=req.overdraft_limit,
            caps=req.caps,
            period=periods.spec(req.period, req.timezone, req.rollover_policy),
        ),
    )
    return (201 if created else 200), model_json(balance)


async def fund_budget(s: CyclesServer, request: Request, p: Principal) -> Reply:
    req = parse_body(BudgetFundRequest, await read_body(request, s.max_body_bytes))
    balance = await s.timed("fund_budget", s.ledger.fund_budget(req.scope, req.amount))
    return 200, model_json(balance)


async def set_budget_status(s: CyclesServer, request: Request, p: Principal) -> Reply:
    req = parse_body(BudgetStatusRequest, await read_body(request, s.max_body_bytes))
    rows = await s.timed("set_budget_status", s.ledger.set_budget_status(req.scope, req.status, unit=req.unit))
    return 200, _json_list("budgets", [model_json(b) for b in rows])


async def delete_budget(s: CyclesServer, request: Request, p: Principal) -> Reply:
    """``DELETE /admin/budgets/{scope}?unit=&force=``: the deleted rows as they were last."""
    scope: str = request.path_params["scope"]
    force = request.query_params.get("force", "false")
    if force not in ("true", "false"):
        raise InvalidRequest("force must be true or false")
    unit = _unit_param(request)
    rows = await s.timed("delete_budget", s.ledger.delete_budget(scope, unit=unit, force=force == "true"))
    return 200, _json_list("budgets", [model_json(b) for b in rows])


async def get_budget(s: CyclesServer, request: Request, p: Principal) -> Reply:
    scope: str = request.path_params["scope"]
    balance = await s.timed("get_budget", s.ledger.get_budget(scope, unit=_unit_param(request)))
    return 200, model_json(balance)


async def list_budgets(s: CyclesServer, request: Request, p: Principal) -> Reply:
    rows = await s.timed("list_budgets", s.ledger.list_budgets(tenant=_tenant_param(request)))
    return 200, _json_list("budgets", [model_json(b) for b in rows])


async def sweep(s: CyclesServer, request: Request, p: Principal) -> Reply:
    """Expire reservations past their deadline now (the server also does it every few seconds)."""
    raw = (request.query_params.get("limit") or "1000").strip()
    # ASCII digits only: str.isdigit() and int() also take "١٢" and "²", which are not a limit.
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 6 or not 1 <= int(raw) <= 100_000:
        raise InvalidRequest("limit must be a whole number from 1 to 100000")
    expired = await s.timed("sweep", s.ledger.sweep(int(raw)))
    return 200, s.dumps({"expired": expired})


async def update_policy(s: CyclesServer, request: Request, p: Principal) -> Reply:
    req = parse_body(PolicyUpdateRequest, await read_body(request, s.max_body_bytes))
    edit = PolicyEdit.model_validate(req.model_dump(exclude={"scope"}, exclude_none=True))
    policy = await s.timed("update_policy", s.ledger.update_policy(req.scope, edit))
    return 200, model_json(policy)


async def list_policies(s: CyclesServer, request: Request, p: Principal) -> Reply:
    rows = await s.timed("list_policies", s.ledger.list_policies(tenant=_tenant_param(request)))
    return 200, _json_list("policies", [model_json(x) for x in rows])


async def create_key(s: CyclesServer, request: Request, p: Principal) -> Reply:
    req = parse_body(KeyCreateRequest, await read_body(request, s.max_body_bytes))
    new = await s.keys.create(req.tenant, name=req.name)
    return 201, s.dumps(new.to_wire())


async def list_keys(s: CyclesServer, request: Request, p: Principal) -> Reply:
    keys = await s.keys.list(tenant=_tenant_param(request))
    return 200, s.dumps({"keys": [k.to_wire() for k in keys]})


async def get_key(s: CyclesServer, request: Request, p: Principal) -> Reply:
    info = await s.keys.get(request.path_params["key_id"])
    return 200, s.dumps(info.to_wire())


async def revoke_key(s: CyclesServer, request: Request, p: Principal) -> Reply:
    info = await s.keys.revoke(request.path_params["key_id"])
    s.auth.forget(info.key_id)
    return 200, s.dumps(info.to_wire())
