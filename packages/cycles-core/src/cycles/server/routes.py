"""The runtime plane of protocol v0: every operation of ``cycles-protocol-v0.yaml``.

Each handler parses and checks the request, calls the ledger with the caller's effective tenant,
and returns ``(status, JSON bytes)``. Errors are raised as ``CyclesError`` and rendered by the
dispatcher (``app.py``), so a handler reads as the spec's description of the operation.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, TypeVar

from starlette.datastructures import QueryParams
from starlette.requests import Request

from cycles.errors import Denied, Forbidden, InvalidRequest, NotFound
from cycles.ledger.quotas import EXTENSIONS_VERSION
from cycles.ledger.rules import SORT_KEYS, BalanceQuery, ReservationQuery
from cycles.models import (
    CommitRequest,
    DecisionRequest,
    DecisionResponse,
    EventCreateRequest,
    ReleaseRequest,
    ReservationCreateRequest,
    ReservationCreateResponse,
    ReservationExtendRequest,
    ReservationStatus,
    Subject,
)
from cycles.server._http import model_json, parse_body, parse_ms, read_body
from cycles.server.access_log import AUDIT_LOGGER
from cycles.server.auth import Principal, require_tenant_param
from cycles.server.governance.authz import scope_allowed, subject_allowed

if TYPE_CHECKING:
    from cycles.server.app import CyclesServer

__all__ = [
    "balances",
    "commit",
    "decide",
    "event",
    "evidence",
    "evidence_jwks",
    "extend",
    "get_reservation",
    "list_reservations",
    "release",
    "reserve",
]

Reply = tuple[int, bytes]

_LEVELS = ("tenant", "workspace", "app", "workflow", "agent", "toolset")
_EVIDENCE_ID = re.compile(r"[0-9a-f]{64}")
_KNOWN_REASONS = frozenset(
    {
        "BUDGET_EXCEEDED",
        "BUDGET_FROZEN",
        "BUDGET_CLOSED",
        "BUDGET_NOT_FOUND",
        "OVERDRAFT_LIMIT_EXCEEDED",
        "DEBT_OUTSTANDING",
        "TENANT_CLOSED",
        "NOT_FOUND",
    }
)


# ---- shared checks --------------------------------------------------------------------------


def _check_idempotency_header(request: Request, body_key: str) -> None:
    """IDEMPOTENCY (NORMATIVE): header and body keys, when both are present, MUST match."""
    header = request.headers.get("x-idempotency-key")
    if header is not None and header != body_key:
        raise InvalidRequest(
            "X-Idempotency-Key header does not match the body's idempotency_key",
            details={"header": header[:256], "body": body_key},
        )


def _own_subject(subject: Subject, principal: Principal) -> None:
    """AUTH & TENANCY: subject.tenant MUST be the effective tenant (403 otherwise). A subject that
    names no tenant is the effective tenant's, as an omitted tenant filter is elsewhere in the
    spec: its scopes are derived under ``tenant:<effective>``, never in another tenant's space."""
    tenant = principal.tenant
    if tenant is None:
        return
    if subject.tenant is None:
        subject.tenant = tenant
    elif subject.tenant != tenant:
        raise Forbidden(f"subject.tenant {subject.tenant!r} is not the tenant of this API key")
    if principal.scope_filter and not subject_allowed(principal.scope_filter, subject):
        raise Forbidden("the subject is outside this API key's scope_filter")


def _reservation_id(request: Request) -> str:
    value: str = request.path_params["reservation_id"]
    if not 1 <= len(value) <= 128:
        raise InvalidRequest("reservation_id must be 1-128 characters")
    return value


def _reason_label(reason: str | None) -> str:
    if not reason:
        return "none"
    return reason if reason in _KNOWN_REASONS else "other"


# ---- operations -----------------------------------------------------------------------------


async def reserve(s: CyclesServer, request: Request, p: Principal) -> Reply:
    req = parse_body(ReservationCreateRequest, await read_body(request, s.max_body_bytes))
    _check_idempotency_header(request, req.idempotency_key)
    _own_subject(req.subject, p)
    op = "dry_run" if req.dry_run else "reserve"
    try:
        res = await s.timed(op, s.ledger.reserve(req, tenant=p.tenant))
    except Denied as exc:
        s.metrics.decisions.inc(op, "DENY", _reason_label(exc.code))
        raise
    except NotFound:
        s.metrics.decisions.inc(op, "DENY", "BUDGET_NOT_FOUND")
        raise
    s.metrics.decisions.inc(op, res.decision.value, _reason_label(res.reason_code))
    return 200, model_json(_for_client(res, request))


async def decide(s: CyclesServer, request: Request, p: Principal) -> Reply:
    req = parse_body(DecisionRequest, await read_body(request, s.max_body_bytes))
    _check_idempotency_header(request, req.idempotency_key)
    _own_subject(req.subject, p)
    res = await s.timed("decide", s.ledger.decide(req, tenant=p.tenant))
    s.metrics.decisions.inc("decide", res.decision.value, _reason_label(res.reason_code))
    return 200, model_json(_for_client(res, request))


R = TypeVar("R", ReservationCreateResponse, DecisionResponse)


def _for_client(res: R, request: Request) -> R:
    """``deny_detail`` goes into a 200 DENY body only for clients that announce the v0.1.26
    extensions (``X-Cycles-Extensions``): v0 clients may forbid unknown fields."""
    if res.deny_detail is not None and EXTENSIONS_VERSION not in request.headers.get("x-cycles-extensions", ""):
        return res.model_copy(update={"deny_detail": None})
    return res


async def commit(s: CyclesServer, request: Request, p: Principal) -> Reply:
    reservation_id = _reservation_id(request)
    req = parse_body(CommitRequest, await read_body(request, s.max_body_bytes))
    _check_idempotency_header(request, req.idempotency_key)
    res = await s.timed("commit", s.ledger.commit(reservation_id, req, tenant=p.tenant))
    s.note_over_limit(res.balances)
    return 200, model_json(res)


async def release(s: CyclesServer, request: Request, p: Principal) -> Reply:
    reservation_id = _reservation_id(request)
    req = parse_body(ReleaseRequest, await read_body(request, s.max_body_bytes))
    _check_idempotency_header(request, req.idempotency_key)
    res = await s.timed("release", s.ledger.release(reservation_id, req, tenant=p.tenant))
    if p.admin:  # AUDIT (NORMATIVE, AdminKeyAuth path): record the operator acting for the tenant
        AUDIT_LOGGER.warning(
            "admin released a reservation",
            extra={
                "cycles": {
                    "actor_type": "admin_on_behalf_of",
                    "operation": "releaseReservation",
                    "reservation_id": reservation_id,
                    "reason": req.reason,
                }
            },
        )
    return 200, model_json(res)


async def extend(s: CyclesServer, request: Request, p: Principal) -> Reply:
    reservation_id = _reservation_id(request)
    req = parse_body(ReservationExtendRequest, await read_body(request, s.max_body_bytes))
    _check_idempotency_header(request, req.idempotency_key)
    res = await s.timed("extend", s.ledger.extend(reservation_id, req, tenant=p.tenant))
    return 200, model_json(res)


async def event(s: CyclesServer, request: Request, p: Principal) -> Reply:
    req = parse_body(EventCreateRequest, await read_body(request, s.max_body_bytes))
    _check_idempotency_header(request, req.idempotency_key)
    _own_subject(req.subject, p)
    res = await s.timed("event", s.ledger.event(req, tenant=p.tenant))
    s.note_over_limit(res.balances)
    return 201, model_json(res)


async def get_reservation(s: CyclesServer, request: Request, p: Principal) -> Reply:
    reservation_id = _reservation_id(request)
    res = await s.timed("get_reservation", s.ledger.get_reservation(reservation_id, tenant=p.tenant))
    return 200, model_json(res)


# ---- queries --------------------------------------------------------------------------------


def _param(q: QueryParams, name: str) -> str | None:
    """A query parameter; blank means unset."""
    value = q.get(name)
    if value is None:
        return None
    value = value.strip()
    return value or None


def _typed_param(q: QueryParams, name: str) -> str | None:
    """A parameter with a type or an enum: absent is unset, but present-and-blank is a bad value
    (only the window bounds, the subject filters and ``include`` treat blank as unset)."""
    value = q.get(name)
    if value is None:
        return None
    value = value.strip()
    if not value:
        raise InvalidRequest(f"{name} is empty: give a value or leave the parameter out")
    return value


def _limit(q: QueryParams) -> int:
    raw = _typed_param(q, "limit")
    if raw is None:
        return 50
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= 200:
        raise InvalidRequest("limit must be an integer from 1 to 200")
    return int(raw)


def _cursor(q: QueryParams) -> str | None:
    cursor = _param(q, "cursor")
    if cursor is not None and len(cursor) > 1024:
        raise InvalidRequest("cursor is not one this server issued")
    return cursor


def _subject_filters(q: QueryParams) -> dict[str, str | None]:
    filters: dict[str, str | None] = {}
    for level in _LEVELS:
        value = _param(q, level)
        if value is not None and len(value) > 128:
            raise InvalidRequest(f"{level} filter is longer than 128 characters")
        filters[level] = value
    return filters


def _check_tenant_filter(p: Principal, tenant: str | None, what: str) -> None:
    """Under ApiKeyAuth a tenant filter is validation only: another tenant's name is 403."""
    if p.tenant is not None and tenant is not None and tenant != p.tenant:
        raise Forbidden(f"{what} can only be queried within the tenant of this API key")


async def balances(s: CyclesServer, request: Request, p: Principal) -> Reply:
    q = request.query_params
    filters = _subject_filters(q)
    if not any(filters.values()):
        raise InvalidRequest("at least one of tenant, workspace, app, workflow, agent, toolset is required")
    _check_tenant_filter(p, filters["tenant"], "balances")
    raw_children = (_typed_param(q, "include_children") or "false").lower()
    if raw_children not in ("true", "false", "1", "0"):
        raise InvalidRequest("include_children must be true or false")
    query = BalanceQuery(**filters, include_children=raw_children in ("true", "1"), limit=_limit(q), cursor=_cursor(q))
    res = await s.timed("balances", s.ledger.balances(query, tenant=p.tenant))
    if p.scope_filter:  # a scope-filtered key sees only the budgets inside its filter
        res.balances = [b for b in res.balances if scope_allowed(p.scope_filter, b.scope)]
    return 200, model_json(res)


async def list_reservations(s: CyclesServer, request: Request, p: Principal) -> Reply:
    q = request.query_params
    filters = _subject_filters(q)
    require_tenant_param(p, filters["tenant"])
    _check_tenant_filter(p, filters["tenant"], "reservations")
    raw_status = _typed_param(q, "status")
    status = None
    if raw_status is not None:
        try:
            status = ReservationStatus(raw_status)
        except ValueError:
            raise InvalidRequest("status must be one of ACTIVE, COMMITTED, RELEASED, EXPIRED") from None
    idempotency_key = _typed_param(q, "idempotency_key")
    if idempotency_key is not None and len(idempotency_key) > 256:
        raise InvalidRequest("idempotency_key is longer than 256 characters")
    sort_by = _typed_param(q, "sort_by")
    if sort_by is not None and sort_by not in SORT_KEYS:
        raise InvalidRequest(f"sort_by must be one of {', '.join(SORT_KEYS)}")
    sort_dir = _typed_param(q, "sort_dir") or "desc"
    if sort_dir not in ("asc", "desc"):
        raise InvalidRequest("sort_dir must be asc or desc")
    # `include` is a projection (style form, explode false): tokens may also arrive repeated.
    tokens = tuple(t.strip() for raw in q.getlist("include") for t in raw.split(",") if t.strip())
    query = ReservationQuery(
        **filters,
        status=status,
        idempotency_key=idempotency_key,
        created_from_ms=parse_ms(q.get("from"), "from"),
        created_to_ms=parse_ms(q.get("to"), "to"),
        expires_from_ms=parse_ms(q.get("expires_from"), "expires_from"),
        expires_to_ms=parse_ms(q.get("expires_to"), "expires_to"),
        finalized_from_ms=parse_ms(q.get("finalized_from"), "finalized_from"),
        finalized_to_ms=parse_ms(q.get("finalized_to"), "finalized_to"),
        sort_by=sort_by,
        sort_dir=sort_dir,
        include=tokens,
        limit=_limit(q),
        cursor=_cursor(q),
    )
    res = await s.timed("list_reservations", s.ledger.list_reservations(query, tenant=p.tenant))
    if p.scope_filter:
        res.reservations = [r for r in res.reservations if subject_allowed(p.scope_filter, r.subject)]
    return 200, model_json(res)


# ---- evidence (not published by this server) -------------------------------------------------


async def evidence(s: CyclesServer, request: Request, p: Principal) -> Reply:
    evidence_id: str = request.path_params["evidence_id"]
    if not _EVIDENCE_ID.fullmatch(evidence_id):
        raise InvalidRequest("evidence_id must be 64 lowercase hex characters")
    raise NotFound("evidence emission is not enabled on this server")


async def evidence_jwks(s: CyclesServer, request: Request, p: Principal) -> Reply:
    raise NotFound("this server does not publish a CyclesEvidence JWK Set")
