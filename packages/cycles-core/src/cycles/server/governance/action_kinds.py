"""The action-kinds spec's plane (``cycles-action-kinds-v0.1.26.yaml``) on ``cycles serve``.

    GET  /v1/action-kinds                       public: the registry (risk_class, deprecated, paging),
                                                ETag / If-None-Match, 429 + Retry-After per source
    GET  /v1/action-kinds/{kind}                public: one kind, exact match, else 404
    GET  /v1/admin/action-quota-counters        admin key (tenant_id required) or a tenant key with
                                                action_quotas:read (balances:read accepted, flagged
                                                deprecated), own tenant only, inside its scope filter
    POST /v1/admin/action-quota-counters/reset  admin key only; audited (resetActionQuotaCounter) and
                                                announced as a quota.counter_reset event

The counters are the ledger's (``ledger/counters.py``): every backend reads and resets them the same
way, so these handlers only check who asks and shape the answer.
"""

from __future__ import annotations

import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

from starlette.requests import Request

from cycles import action_kinds
from cycles.errors import Forbidden, InvalidRequest, LimitExceeded, NotFound
from cycles.ledger import counters
from cycles.ledger.counters import CounterQuery, CounterResetRequest
from cycles.ledger.quotas import RISK_CLASSES, WINDOWS
from cycles.server._http import model_json, parse_body, read_body
from cycles.server.auth import Principal
from cycles.server.governance.authz import scope_allowed
from cycles.server.governance.context import Reply, enum_param, limit_param, note_of, param

if TYPE_CHECKING:
    from cycles.server.app import CyclesServer

__all__ = ["PUBLIC_PER_MINUTE", "get_kind", "list_counters", "list_kinds", "reset_counter"]

#: The spec's recommended baseline for the unauthenticated registry: requests a minute per source
#: address (a burst of as many, refilled evenly). Per server process, like the other rate limits.
PUBLIC_PER_MINUTE = 60
_CACHE = b"public, max-age=3600"


class _PerSource:
    """Token buckets per client address, bounded in memory (forgetting one only refills it)."""

    def __init__(self, per_minute: int, max_sources: int = 100_000) -> None:
        self.burst = float(per_minute)
        self.rate = per_minute / 60.0
        self._max = max_sources
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, source: str) -> None:
        now = time.monotonic()
        with self._lock:
            tokens, at = self._buckets.get(source, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.rate)
            if tokens < 1.0:
                self._buckets[source] = (tokens, now)
                raise LimitExceeded(
                    f"more than {self.burst:g} registry requests a minute from this address",
                    details={"limit": "action_kinds_per_minute", "max": self.burst},
                    retry_after_s=(1.0 - tokens) / self.rate,
                )
            if len(self._buckets) >= self._max and source not in self._buckets:
                self._buckets.clear()
            self._buckets[source] = (tokens - 1.0, now)


_limiters: weakref.WeakKeyDictionary[Any, _PerSource] = weakref.WeakKeyDictionary()


def _limit(s: CyclesServer, request: Request) -> None:
    limiter = _limiters.get(s.gov)
    if limiter is None:
        limiter = _limiters[s.gov] = _PerSource(PUBLIC_PER_MINUTE)
    limiter.take(request.client.host if request.client is not None else "")


def _headers(request: Request, *pairs: tuple[bytes, bytes]) -> None:
    """Response headers beyond the standard ones (the dispatcher adds them)."""
    request.scope.setdefault("cycles.headers", []).extend(pairs)


def _bool(request: Request, name: str) -> bool:
    return enum_param(request.query_params, name, ("true", "false")) == "true"


def _dumps(body: Any) -> bytes:
    import json

    return json.dumps(body, separators=(",", ":")).encode()


# ---- the registry (public) --------------------------------------------------------------------


async def list_kinds(s: CyclesServer, request: Request, p: Principal) -> Reply:
    etag = action_kinds.etag().encode()
    _headers(request, (b"etag", etag), (b"cache-control", _CACHE))
    if request.headers.get("if-none-match", "").encode() == etag:
        return 304, b""  # cheap validation: not counted against the rate limit
    _limit(s, request)
    q = request.query_params
    page = action_kinds.page(
        risk_class=enum_param(q, "risk_class", RISK_CLASSES),
        deprecated=_bool(request, "deprecated"),
        cursor=param(q, "cursor", 4096),
        limit=limit_param(q, 50, 100),
    )
    return 200, _dumps(page)


async def get_kind(s: CyclesServer, request: Request, p: Principal) -> Reply:
    _limit(s, request)
    name = request.path_params["kind"]
    kind = action_kinds.get(name) if len(name) <= 64 else None
    if kind is None:
        raise NotFound(f"action kind {name[:64]!r} is not in the registry")
    return 200, _dumps(action_kinds.wire(kind))


# ---- quota counters (operator) ----------------------------------------------------------------


async def list_counters(s: CyclesServer, request: Request, p: Principal) -> Reply:
    q = request.query_params
    tenant = param(q, "tenant_id", 128)
    if p.admin:
        if tenant is None:
            raise InvalidRequest(
                "tenant_id is required with the admin key", details={"missing_required_field": "tenant_id"}
            )
    else:  # a tenant key: its own tenant, whatever tenant_id says (the spec: ignored)
        tenant = p.tenant
        if not p.may("action_quotas:read"):
            if not p.may("balances:read"):
                raise Forbidden("this API key lacks the action_quotas:read permission")
            _headers(request, (b"x-cycles-permission-deprecated", b"balances:read"))
    query = CounterQuery(
        tenant=tenant,
        scope=param(q, "scope", 1024),
        action_kind=param(q, "action_kind", 64),
        window=enum_param(q, "window", WINDOWS),  # type: ignore[arg-type]
        run_id=param(q, "run_id", 256),
        include_zero=_bool(request, "include_zero"),
        cursor=param(q, "cursor", 4096),
        limit=limit_param(q, 50, 200),
    )
    page = await s.ledger.list_quota_counters(query, tenant=None if p.admin else p.tenant)
    if p.scope_filter:  # a key limited to some scopes sees only their counters
        page = page.model_copy(
            update={"counters": [c for c in page.counters if scope_allowed(p.scope_filter, c.scope)]}
        )
    return 200, model_json(page)


async def reset_counter(s: CyclesServer, request: Request, p: Principal) -> Reply:
    req = parse_body(CounterResetRequest, await read_body(request, s.max_body_bytes))
    if not req.tenant_id:  # the admin caller has no implicit tenant: the spec's exact refusal
        raise InvalidRequest("missing_required_field: tenant_id", details={"missing_required_field": "tenant_id"})
    note = note_of(request)
    note.tenant = req.tenant_id
    note.resource_id = f"{req.scope}|{req.action_kind}|{req.risk_class or ''}|{req.window}|{req.window_key}"[:512]
    result = await s.ledger.reset_quota_counter(req)
    note.before = {"used": result.previous_used}
    note.after = result.counter.model_dump(mode="json", exclude_none=True)
    if req.reason:
        note.extra["reason"] = req.reason
    actor = p.key_id or "admin"
    await s.gov.emit(
        "quota.counter_reset",
        request,
        p,
        tenant_id=req.tenant_id,
        scope=req.scope,
        data=counters.detail(req, result, actor),
        correlation_id=counters.correlation_id(req.tenant_id, result.counter),
    )
    return 200, model_json(result)
