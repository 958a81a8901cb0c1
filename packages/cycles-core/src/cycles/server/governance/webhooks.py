"""Webhook subscriptions and their delivery.

Subscriptions are documents in the record store (kind ``webhook``); the signing secret is stored
with them (it must be, to sign) and never returned after creation. Endpoints: the operator's
``/v1/admin/webhooks...`` and the tenant self-service ``/v1/webhooks...`` (``webhooks:read`` /
``webhooks:write``, tenant-accessible event types only: budget.*, reservation.*, tenant.*).

Delivery (``Dispatcher``). Every server process runs a dispatcher task; exactly one per
deployment delivers at a time: it holds a lease in the record store (``cas`` on
``webhook:leader`` with a 10 s TTL, renewed every second or so), so several workers or servers
over one SQLite file or one Redis share the work safely, and a crashed holder is replaced within
the TTL. The holder walks the event stream from a cursor kept in the store, creates one delivery
per (event, matching subscription) -- its id derived from both, so re-reading events never
delivers twice -- and POSTs the event with the protocol's headers: ``X-Cycles-Signature:
sha256=<hex HMAC-SHA256 of the raw body with the signing secret>``, ``X-Cycles-Event-Id``,
``X-Cycles-Event-Type``, ``X-Cycles-Trace-Id``, ``traceparent`` and the subscription's own headers.
Non-2xx or no answer: retried with exponential backoff (``retry_policy``: 1 s, 2 s, 4 s, ... up to
60 s, 5 retries); then the delivery is FAILED and ``system.webhook_delivery_failed`` is emitted.
``disable_after_failures`` consecutive failed attempts (default 10) disable the subscription and
emit ``webhook.disabled``; a success resets the count. Delivery records are kept 14 days.

URLs are checked against the deployment's ``WebhookSecurityConfig`` (``GET/PUT
/v1/admin/config/webhook-security``) at creation, update and every delivery: ``https://`` only
unless ``allow_http``; only ``allowed_url_patterns`` if any are set; and never a host that resolves
into ``blocked_cidr_ranges`` (default: RFC 1918, loopback, link-local, IPv6 private -- no SSRF).
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import hashlib
import hmac
import ipaddress
import json
import logging
import re
import secrets
import time
from typing import TYPE_CHECKING, Annotated, Any, Literal
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel, ConfigDict, StringConstraints
from starlette.requests import Request

from cycles.errors import (
    Forbidden,
    InsufficientPermissions,
    InvalidRequest,
    TenantClosed,
    WebhookNotFound,
    WebhookUrlInvalid,
)
from cycles.ledger.records import EVENTS, EventFilter, iso_ms, new_event, parse_time
from cycles.server._http import parse_body, read_body
from cycles.server.auth import Principal
from cycles.server.governance.context import (
    Governance,
    Reply,
    bulk_reply,
    enum_param,
    limit_param,
    note_of,
    page_after,
    param,
    sort_ascending,
    sort_by,
    time_param,
)

if TYPE_CHECKING:
    from cycles.server.app import CyclesServer

__all__ = ["Dispatcher", "sign"]

logger = logging.getLogger("cycles.server")

SYSTEM = "__system__"
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}$")
_TENANT_CATEGORIES = frozenset({"budget", "reservation", "tenant"})
_ALL_CATEGORIES = frozenset({"budget", "tenant", "api_key", "policy", "reservation", "system", "webhook"})
DELIVERY_RETENTION_MS = 14 * 24 * 3600 * 1000
_LEASE_MS = 10_000
_LAG_MS = 5_000  # events younger than this are re-read next tick (other servers may still append older ids)


def sign(secret: str, body: bytes) -> str:
    """The ``X-Cycles-Signature`` value: ``sha256=`` + hex HMAC-SHA256 of the raw body."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Thresholds(_Body):
    budget_utilization: list[float] | None = None
    burn_rate_multiplier: float | None = None
    burn_rate_window_seconds: int | None = None
    denial_rate_threshold: float | None = None
    expiry_rate_threshold: float | None = None
    auth_failure_rate_threshold: float | None = None
    rate_window_seconds: int | None = None


class RetryPolicy(_Body):
    max_retries: int = 5
    initial_delay_ms: int = 1000
    backoff_multiplier: float = 2.0
    max_delay_ms: int = 60_000


class WebhookCreateRequest(_Body):
    name: Annotated[str, StringConstraints(max_length=256)] | None = None
    description: Annotated[str, StringConstraints(max_length=1024)] | None = None
    url: Annotated[str, StringConstraints(min_length=1, max_length=2048)]
    event_types: list[str]
    event_categories: list[str] | None = None
    scope_filter: Annotated[str, StringConstraints(max_length=1024)] | None = None
    thresholds: Thresholds | None = None
    signing_secret: Annotated[str, StringConstraints(min_length=1, max_length=512)] | None = None
    headers: dict[str, str] | None = None
    retry_policy: RetryPolicy | None = None
    disable_after_failures: int | None = None
    metadata: dict[str, Any] | None = None


class WebhookUpdateRequest(_Body):
    name: Annotated[str, StringConstraints(max_length=256)] | None = None
    description: Annotated[str, StringConstraints(max_length=1024)] | None = None
    url: Annotated[str, StringConstraints(min_length=1, max_length=2048)] | None = None
    event_types: list[str] | None = None
    event_categories: list[str] | None = None
    scope_filter: Annotated[str, StringConstraints(max_length=1024)] | None = None
    thresholds: Thresholds | None = None
    signing_secret: Annotated[str, StringConstraints(min_length=1, max_length=512)] | None = None
    headers: dict[str, str] | None = None
    retry_policy: RetryPolicy | None = None
    disable_after_failures: int | None = None
    status: Literal["ACTIVE", "PAUSED"] | None = None
    metadata: dict[str, Any] | None = None


def _dumps(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _event_types() -> frozenset[str]:
    from cycles.server.governance.authz import EVENT_TYPES

    return EVENT_TYPES


DEFAULT_BLOCKED = (
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "::1/128",
    "fc00::/7",
)


class WebhookSecurityConfig(_Body):
    blocked_cidr_ranges: list[str] | None = None
    allowed_url_patterns: list[str] | None = None
    allow_http: bool | None = None


async def security_config(s: CyclesServer) -> dict[str, Any]:
    """The deployment's WebhookSecurityConfig (the spec's defaults until an operator sets one)."""
    return await _config(s.gov)


async def _config(gov: Governance) -> dict[str, Any]:
    doc = await gov.run(gov.records.doc_get, "config", "webhook-security")
    return {
        "blocked_cidr_ranges": list(DEFAULT_BLOCKED),
        "allowed_url_patterns": [],
        "allow_http": False,
        **{k: v for k, v in (doc or {}).items() if k != "tenant_id"},
    }


async def get_security(s: CyclesServer, request: Request, p: Principal) -> Reply:
    return 200, _dumps(await security_config(s))


async def put_security(s: CyclesServer, request: Request, p: Principal) -> Reply:
    req = parse_body(WebhookSecurityConfig, await read_body(request, s.max_body_bytes))
    for cidr in req.blocked_cidr_ranges or ():
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise InvalidRequest(f"blocked_cidr_ranges: {cidr[:64]!r} is not a CIDR range") from None
    before = await security_config(s)
    after = {**before, **req.model_dump(exclude_none=True)}

    def change(current: dict[str, Any] | None) -> dict[str, Any]:
        return {**after, "tenant_id": ""}

    await s.gov.run(s.gov.records.doc_update, "config", "webhook-security", change)
    note = note_of(request)
    note.resource_id, note.before, note.after = "webhook-security", before, after
    return 200, _dumps(after)


async def _addresses(host: str, port: int) -> list[str]:
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port)
    except OSError:
        return []
    return sorted({str(info[4][0]) for info in infos})


async def check_url(s: CyclesServer | None, url: str, config: dict[str, Any] | None = None) -> str | None:
    """Why ``url`` may not receive webhooks under the security config, or ``None``. A host that
    does not resolve now is let through here and checked again at each delivery."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "webhook url must be an absolute http(s) URL"
    if config is None:
        assert s is not None
        config = await security_config(s)
    if parts.scheme == "http" and not config.get("allow_http"):
        return "webhook url must be https:// (allow_http is off in the webhook security config)"
    patterns = config.get("allowed_url_patterns") or []
    if patterns and not any(fnmatch.fnmatchcase(url, pat) for pat in patterns):
        return "webhook url matches none of the allowed_url_patterns"
    blocked = [ipaddress.ip_network(c, strict=False) for c in config.get("blocked_cidr_ranges") or ()]
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return "webhook url has an invalid port"
    for addr in await _addresses(parts.hostname, port):
        ip = ipaddress.ip_address(addr.split("%", 1)[0])
        if any(ip.version == net.version and ip in net for net in blocked):
            return f"webhook url resolves to {addr}, inside a blocked range (webhook security config)"
    return None


async def _check_url(s: CyclesServer, url: str) -> None:
    problem = await check_url(s, url)
    if problem is not None:
        raise WebhookUrlInvalid(problem)


def _check_selectors(types: list[str], categories: list[str], owner: str) -> None:
    known = _event_types()
    for t in types:
        if t not in known and not t.startswith("custom."):
            raise InvalidRequest(f"unknown event type {t[:64]!r}")
    for c in categories:
        if c not in _ALL_CATEGORIES:
            raise InvalidRequest(f"unknown event category {c[:64]!r}")
    if not types and not categories:
        raise InvalidRequest("a subscription needs at least one event type or category")
    if owner != SYSTEM:  # TENANT-ACCESSIBLE BOUNDARY (both planes, for tenant-owned rows)
        bad = [t for t in types if t.split(".", 1)[0] not in _TENANT_CATEGORIES]
        bad += [c for c in categories if c not in _TENANT_CATEGORIES]
        if bad:
            raise InvalidRequest(
                f"a tenant's subscription may only select budget, reservation, tenant events: {bad[0]!r}"
            )


def _check_numbers(req: WebhookCreateRequest | WebhookUpdateRequest) -> None:
    if req.disable_after_failures is not None and req.disable_after_failures < 1:
        raise InvalidRequest("disable_after_failures must be 1 or more")
    r = req.retry_policy
    if r is not None and not (
        0 <= r.max_retries <= 10
        and 100 <= r.initial_delay_ms <= 60_000
        and 1.0 <= r.backoff_multiplier <= 10.0
        and 1000 <= r.max_delay_ms <= 3_600_000
    ):
        raise InvalidRequest("retry_policy out of range (max_retries 0-10, initial_delay_ms 100-60000, ...)")
    t = req.thresholds
    if t is not None and any(not 0.0 <= x <= 1.0 for x in t.budget_utilization or ()):
        raise InvalidRequest("thresholds.budget_utilization values must be from 0 to 1")
    if req.headers is not None:
        if len(req.headers) > 32:
            raise InvalidRequest("at most 32 custom headers")
        for name, value in req.headers.items():
            if not _HEADER_NAME.match(name) or not value.isprintable() or not value.isascii() or len(value) > 4096:
                raise InvalidRequest(f"custom header {name[:64]!r}: a token name and a printable ASCII value")


def public(doc: dict[str, Any]) -> dict[str, Any]:
    """The spec's WebhookSubscription: no secret, header values masked."""
    out = {k: v for k, v in doc.items() if k not in ("signing_secret", "disabled_reason")}
    if "headers" in out:
        out["headers"] = dict.fromkeys(out["headers"], "***")
    return out


# ---- endpoints -------------------------------------------------------------------------------


def _tenant_side(p: Principal, write: bool) -> None:
    if p.admin:
        return
    need = "webhooks:write" if write else "webhooks:read"
    if not p.may(need):
        raise InsufficientPermissions(f"this API key lacks the {need} permission")


async def _owner_open(s: CyclesServer, owner: str) -> None:
    if owner == SYSTEM:
        return
    doc = await s.gov.tenant(owner, fresh=True)
    if doc is not None and doc["status"] == "CLOSED":
        raise TenantClosed(f"tenant {owner!r} is closed", details={"tenant_id": owner})


async def _create(s: CyclesServer, request: Request, p: Principal, owner: str) -> Reply:
    req = parse_body(WebhookCreateRequest, await read_body(request, s.max_body_bytes))
    if not req.event_types:
        raise InvalidRequest("event_types must name at least one event type")
    await _check_url(s, req.url)
    _check_selectors(req.event_types, req.event_categories or [], owner)
    _check_numbers(req)
    await _owner_open(s, owner)
    secret = req.signing_secret or "whsec_" + secrets.token_hex(32)
    now = iso_ms(_now_ms())
    sid = "whsub_" + secrets.token_hex(12)
    doc: dict[str, Any] = {
        "subscription_id": sid,
        "tenant_id": owner,
        "url": req.url,
        "event_types": list(dict.fromkeys(req.event_types)),
        "status": "ACTIVE",
        "disable_after_failures": req.disable_after_failures or 10,
        "consecutive_failures": 0,
        "created_at": now,
        "signing_secret": secret,
        **req.model_dump(
            exclude_none=True,
            mode="json",
            include={"name", "description", "event_categories", "scope_filter", "thresholds", "headers",
                     "retry_policy", "metadata"},
        ),
    }  # fmt: skip
    doc["retry_policy"] = (req.retry_policy or RetryPolicy()).model_dump()
    await s.gov.run(s.gov.records.doc_swap, "webhook", sid, None, doc)
    s.gov.alerts_forget(owner)
    note = note_of(request)
    note.resource_id, note.tenant, note.after = sid, owner, public(doc)
    await s.gov.emit(
        "webhook.created", request, p, tenant_id=owner, data={"subscription_id": sid, "new_status": "ACTIVE"}
    )
    return 201, _dumps({"subscription": public(doc), "signing_secret": secret})


async def create_admin(s: CyclesServer, request: Request, p: Principal) -> Reply:
    owner = param(request.query_params, "tenant_id", 128) or SYSTEM
    if owner != SYSTEM and await s.gov.tenant(owner, fresh=True) is None:
        from cycles.errors import TenantNotFound

        raise TenantNotFound(f"tenant {owner!r} not found")
    return await _create(s, request, p, owner)


async def create_tenant(s: CyclesServer, request: Request, p: Principal) -> Reply:
    _tenant_side(p, write=True)
    assert p.tenant is not None
    return await _create(s, request, p, p.tenant)


async def _load(s: CyclesServer, request: Request, p: Principal) -> dict[str, Any]:
    sid: str = request.path_params["subscription_id"]
    doc = await s.gov.run(s.gov.records.doc_get, "webhook", sid[:64])
    if doc is None or (not p.admin and doc["tenant_id"] != p.tenant):
        raise WebhookNotFound(f"webhook subscription {sid[:64]!r} not found")
    return doc


async def get(s: CyclesServer, request: Request, p: Principal) -> Reply:
    _tenant_side(p, write=False)
    return 200, _dumps(public(await _load(s, request, p)))


async def list_hooks(s: CyclesServer, request: Request, p: Principal) -> Reply:
    _tenant_side(p, write=False)
    q = request.query_params
    owner = param(q, "tenant_id", 128) or param(q, "tenant", 128)
    if not p.admin:
        if owner is not None and owner != p.tenant:
            raise Forbidden("webhooks can only be listed within the tenant of this API key")
        owner = p.tenant
    status = enum_param(q, "status", ("ACTIVE", "PAUSED", "DISABLED"))
    sort_by(q, ("url", "tenant_id", "status", "consecutive_failures"))
    sort_ascending(q)
    event_type = enum_param(q, "event_type", _event_types())
    search = (param(q, "search", 128) or "").lower()
    docs = [
        public(d)
        for d in await s.gov.run(s.gov.records.doc_list, "webhook", tenant=owner)
        if (status is None or d["status"] == status)
        and (event_type is None or event_type in d["event_types"])
        and (not search or search in (d.get("name") or "").lower() or search in d["url"].lower())
    ]
    page = page_after(docs, "subscription_id", param(q, "cursor", 128), limit_param(q))
    return 200, _dumps({"subscriptions": page.pop("items"), **page})


async def update(s: CyclesServer, request: Request, p: Principal) -> Reply:
    _tenant_side(p, write=True)
    before = await _load(s, request, p)
    req = parse_body(WebhookUpdateRequest, await read_body(request, s.max_body_bytes))
    _check_numbers(req)
    owner = before["tenant_id"]
    await _owner_open(s, owner)
    note = note_of(request)
    note.resource_id, note.tenant = before["subscription_id"], owner
    if req.url is not None:
        await _check_url(s, req.url)
    changes = req.model_dump(exclude_none=True, mode="json")
    types = changes.get("event_types", before["event_types"])
    cats = changes.get("event_categories", before.get("event_categories") or [])
    _check_selectors(types, cats, owner)
    now = iso_ms(_now_ms())

    def change(current: dict[str, Any] | None) -> dict[str, Any]:
        if current is None:
            raise WebhookNotFound(f"webhook subscription {before['subscription_id']!r} not found")
        new = {**current, **changes, "updated_at": now}
        if req.status == "ACTIVE" and current["status"] != "ACTIVE":
            new["consecutive_failures"] = 0  # re-enabling resets the failure counter
            new.pop("disabled_reason", None)
        return new

    after = await s.gov.run(s.gov.records.doc_update, "webhook", before["subscription_id"], change)
    assert after is not None
    s.gov.alerts_forget(owner)
    note.before, note.after = public(before), public(after)
    sid = before["subscription_id"]
    if before["status"] != after["status"]:
        event = "webhook.paused" if after["status"] == "PAUSED" else "webhook.resumed"
        data = {"subscription_id": sid, "previous_status": before["status"], "new_status": after["status"]}
        await s.gov.emit(event, request, p, tenant_id=owner, data=data)
    if set(changes) - {"status"}:
        data = {"subscription_id": sid, "changed_fields": sorted(set(changes) - {"status"})}
        await s.gov.emit("webhook.updated", request, p, tenant_id=owner, data=data)
    return 200, _dumps(public(after))


async def delete(s: CyclesServer, request: Request, p: Principal) -> Reply:
    _tenant_side(p, write=True)
    doc = await _load(s, request, p)
    await _owner_open(s, doc["tenant_id"])
    note = note_of(request)
    note.resource_id, note.tenant, note.before = doc["subscription_id"], doc["tenant_id"], public(doc)
    await s.gov.run(s.gov.records.doc_swap, "webhook", doc["subscription_id"], doc, None)
    s.gov.alerts_forget(doc["tenant_id"])
    data = {"subscription_id": doc["subscription_id"], "previous_status": doc["status"]}
    await s.gov.emit("webhook.deleted", request, p, tenant_id=doc["tenant_id"], data=data)
    return 204, b""


async def test(s: CyclesServer, request: Request, p: Principal) -> Reply:
    _tenant_side(p, write=True)
    doc = await _load(s, request, p)
    await _owner_open(s, doc["tenant_id"])
    note_of(request).resource_id = doc["subscription_id"]
    event = new_event(
        "system.webhook_test",
        tenant_id=doc["tenant_id"],
        source="cycles-server",
        data={"subscription_id": doc["subscription_id"], "message": "test delivery"},
        actor={"type": "admin"} if p.admin else {"type": "api_key", "key_id": p.key_id or ""},
    )
    result = await s.gov.dispatcher.post(doc, event)
    out: dict[str, Any] = {"success": result.ok, "event_id": event["event_id"], "response_time_ms": result.ms}
    if result.status is not None:
        out["response_status"] = result.status
    if result.error:
        out["error_message"] = result.error
    return 200, _dumps(out)


async def deliveries(s: CyclesServer, request: Request, p: Principal) -> Reply:
    _tenant_side(p, write=False)
    doc = await _load(s, request, p)
    q = request.query_params
    status = enum_param(q, "status", ("PENDING", "SUCCESS", "FAILED", "RETRYING"))
    lo, hi = parse_time(time_param(q, "from")), parse_time(time_param(q, "to"))
    rows = [
        _delivery_public(d)
        for d in await s.gov.run(s.gov.records.doc_list, "delivery", tenant=doc["subscription_id"])
        if (status is None or d["status"] == status)
        and (lo is None or d["_at_ms"] >= lo)
        and (hi is None or d["_at_ms"] <= hi)
    ]
    rows.sort(key=lambda d: d["delivery_id"], reverse=True)  # newest first
    cursor = param(q, "cursor", 200)
    if cursor is not None:
        rows = [r for r in rows if r["delivery_id"] < cursor]
    limit = limit_param(q)
    page = rows[:limit]
    body: dict[str, Any] = {"deliveries": page, "has_more": len(rows) > limit}
    if body["has_more"]:
        body["next_cursor"] = page[-1]["delivery_id"]
    return 200, _dumps(body)


def _delivery_public(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if not k.startswith("_")}


async def replay(s: CyclesServer, request: Request, p: Principal) -> Reply:
    doc = await _load(s, request, p)
    await _owner_open(s, doc["tenant_id"])
    raw = await read_body(request, s.max_body_bytes)
    try:
        data = json.loads(raw) if raw.strip() else {}
    except ValueError:
        raise InvalidRequest("request body is not JSON") from None
    if not isinstance(data, dict) or set(data) - {"from", "to", "event_types", "max_events"}:
        raise InvalidRequest("replay takes from, to, event_types, max_events")
    max_events = data.get("max_events", 100)
    if not isinstance(max_events, int) or isinstance(max_events, bool) or not 1 <= max_events <= 1000:
        raise InvalidRequest("max_events must be an integer from 1 to 1000")
    types = data.get("event_types")
    if types is not None and (not isinstance(types, list) or not all(isinstance(t, str) for t in types)):
        raise InvalidRequest("event_types must be a list of event types")
    note_of(request).resource_id = doc["subscription_id"]
    flt = EventFilter(since=data.get("from"), until=data.get("to"), event_type=types)
    owner = None if doc["tenant_id"] == SYSTEM else doc["tenant_id"]
    replay_id = "rpl_" + secrets.token_hex(8)
    queued = 0
    for event in s.gov.records.iter(EVENTS, tenant=owner, match=flt, ascending=True):
        if queued >= max_events:
            break
        if matches(doc, event, ignore_status=True) and await s.gov.dispatcher.enqueue(doc, event, suffix=replay_id):
            queued += 1
    s.gov.dispatcher.wake()
    return 202, _dumps({"replay_id": replay_id, "events_queued": queued, "estimated_completion_seconds": 1})


# ---- matching and delivery -----------------------------------------------------------------


def matches(sub: dict[str, Any], event: dict[str, Any], *, ignore_status: bool = False) -> bool:
    if not ignore_status and sub["status"] != "ACTIVE":
        return False
    if sub["tenant_id"] != SYSTEM and event.get("tenant_id") != sub["tenant_id"]:
        return False
    etype = event.get("event_type", "")
    if etype not in sub["event_types"] and event.get("category") not in (sub.get("event_categories") or ()):
        return False
    pattern = sub.get("scope_filter")
    if pattern and not fnmatch.fnmatchcase(str(event.get("scope") or ""), pattern):
        return False
    if etype == "budget.threshold_crossed":
        from cycles.server.governance.alerts import DEFAULT_THRESHOLDS

        wanted = (sub.get("thresholds") or {}).get("budget_utilization") or DEFAULT_THRESHOLDS
        threshold = (event.get("data") or {}).get("threshold")
        if threshold is None or not any(abs(float(threshold) - float(w)) < 1e-9 for w in wanted):
            return False
    return True


class _Result:
    __slots__ = ("error", "ms", "ok", "status")

    def __init__(self, ok: bool, status: int | None, ms: int, error: str | None) -> None:
        self.ok, self.status, self.ms, self.error = ok, status, ms, error


class Dispatcher:
    """Delivers events to subscriptions; one active per deployment (see the module docstring)."""

    def __init__(self, gov: Governance, *, tick_s: float = 0.5, timeout_s: float = 10.0) -> None:
        self.gov = gov
        self.tick_s = tick_s
        self.timeout_s = timeout_s
        self.me = secrets.token_hex(8)
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: httpx.AsyncClient | None = None
        self._leader_until = 0.0
        self._seen: dict[str, None] = {}

    def wake(self) -> None:
        loop, event = self._loop, self._wake
        if loop is not None and event is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(event.set)

    def _client_(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.timeout_s, follow_redirects=False)
        return self._client

    async def run_forever(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self.gov.records.listeners.append(lambda kind, record: self.wake() if kind == EVENTS else None)
        try:
            while True:
                try:
                    await self.tick()
                except Exception:
                    logger.warning("webhook dispatch tick failed", exc_info=True)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.tick_s)
                self._wake.clear()
        finally:
            await self.release()
            await self.aclose()

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def release(self) -> None:
        with contextlib.suppress(Exception):
            await self.gov.run(self.gov.records.cas, "webhook:leader", self.me, None)

    async def _lead(self) -> bool:
        records = self.gov.records
        now = time.monotonic()
        if now < self._leader_until - _LEASE_MS / 2000:
            return True
        ok = await self.gov.run(records.cas, "webhook:leader", self.me, self.me, ttl_ms=_LEASE_MS)
        if not ok:
            ok = await self.gov.run(records.cas, "webhook:leader", None, self.me, ttl_ms=_LEASE_MS)
        self._leader_until = now + _LEASE_MS / 1000 if ok else 0.0
        return ok

    async def tick(self) -> None:
        if not await self._lead():
            return
        await self._scan()
        await self._deliver_due()

    async def _scan(self) -> None:
        records = self.gov.records
        cursor = await self.gov.run(records.read, "webhook:cursor")
        subs = [d for d in await self.gov.run(records.doc_list, "webhook") if d["status"] == "ACTIVE"]
        horizon = f"evt_{max(_now_ms() - _LAG_MS, 0):012x}"
        if not subs:  # nobody to tell: move past what is there (events are not queued for later)
            if cursor is None or cursor < horizon:
                await self.gov.run(records.cas, "webhook:cursor", cursor, horizon)
            return
        new_cursor = cursor
        while True:
            page, nxt = await self.gov.run(records.page, EVENTS, cursor=new_cursor or None, limit=500, ascending=True)
            if not page:
                break
            for event in page:
                for sub in subs:
                    if matches(sub, event):
                        await self.enqueue(sub, event)
                if event["event_id"] < horizon:
                    new_cursor = event["event_id"]
            if nxt is None or page[-1]["event_id"] >= horizon:
                break
        if new_cursor != cursor:
            await self.gov.run(records.cas, "webhook:cursor", cursor, new_cursor)

    async def enqueue(self, sub: dict[str, Any], event: dict[str, Any], *, suffix: str = "") -> bool:
        """A PENDING delivery of ``event`` to ``sub`` (once per pair, or per replay)."""
        now = _now_ms()
        key = f"{sub['subscription_id']}|{event['event_id']}|{suffix}"
        if key in self._seen:  # enqueued by this process already (the lag window is re-read)
            return False
        if len(self._seen) > 100_000:
            self._seen.clear()
        self._seen[key] = None
        pair = hashlib.sha256((sub["subscription_id"] + event["event_id"] + suffix).encode()).hexdigest()[:20]
        did = f"dlv_{now:012x}_{pair}"
        if not await self.gov.run(self.gov.records.cas, f"dlv:{key}", None, did, ttl_ms=DELIVERY_RETENTION_MS):
            return False
        delivery = {
            "delivery_id": did,
            "subscription_id": sub["subscription_id"],
            "event_id": event["event_id"],
            "event_type": event["event_type"],
            "status": "PENDING",
            "attempted_at": iso_ms(now),
            "attempts": 0,
            "_at_ms": now,
            "_due_ms": now,
            "_event": event,
        }
        if event.get("trace_id"):
            delivery["trace_id"] = event["trace_id"]
        await self.gov.run(self.gov.records.doc_swap, "delivery", did, None, delivery, index=sub["subscription_id"])
        await self.gov.run(self.gov.records.doc_swap, "pending", did, None, {"did": did}, index="")
        return True

    async def _deliver_due(self) -> None:
        records = self.gov.records
        now = _now_ms()
        jobs = []
        for p in await self.gov.run(records.doc_list, "pending"):
            d = await self.gov.run(records.doc_get, "delivery", p["did"])
            if d is None:
                await self.gov.run(records.doc_swap, "pending", p["did"], p, None, index="")
            elif d["_due_ms"] <= now:
                jobs.append(d)
        if jobs:
            await asyncio.gather(*(self._attempt(d) for d in jobs[:50]))
        if now % 60_000 < self.tick_s * 1000:  # about once a minute: forget old delivery records
            await self._prune()

    async def _prune(self) -> None:
        cutoff = _now_ms() - DELIVERY_RETENTION_MS
        for d in await self.gov.run(self.gov.records.doc_list, "delivery"):
            if d["_at_ms"] < cutoff and d["status"] in ("SUCCESS", "FAILED"):
                await self.gov.run(
                    self.gov.records.doc_swap, "delivery", d["delivery_id"], d, None, index=d["subscription_id"]
                )

    async def post(self, sub: dict[str, Any], event: dict[str, Any]) -> _Result:
        body = json.dumps(event, separators=(",", ":")).encode()
        trace = event.get("trace_id") or secrets.token_hex(16)
        headers = {
            **(sub.get("headers") or {}),
            "Content-Type": "application/json",
            "User-Agent": "cycles-server/0.1",
            "X-Cycles-Event-Id": event["event_id"],
            "X-Cycles-Event-Type": event["event_type"],
            "X-Cycles-Signature": sign(sub["signing_secret"], body),
            "X-Cycles-Trace-Id": trace,
            "traceparent": f"00-{trace}-{secrets.token_hex(8)}-01",
        }
        start = time.perf_counter()
        problem = await check_url(None, sub["url"], await _config(self.gov))
        if problem is not None:  # re-checked at delivery: DNS may have changed since creation
            return _Result(False, None, 0, problem)
        try:
            response = await self._client_().post(sub["url"], content=body, headers=headers)
        except (httpx.HTTPError, ValueError) as exc:  # no answer, or headers the transport refused
            return _Result(False, None, int((time.perf_counter() - start) * 1000), f"{type(exc).__name__}: {exc}"[:500])
        ms = int((time.perf_counter() - start) * 1000)
        ok = 200 <= response.status_code < 300
        return _Result(ok, response.status_code, ms, None if ok else f"HTTP {response.status_code}")

    async def _attempt(self, d: dict[str, Any]) -> None:
        records = self.gov.records
        sub = await self.gov.run(records.doc_get, "webhook", d["subscription_id"])
        if sub is None or sub["status"] != "ACTIVE":
            await self._finish(d, "FAILED", "subscription is not active")
            return
        result = await self.post(sub, d["_event"])
        attempts = d["attempts"] + 1
        d = {**d, "attempts": attempts, "attempted_at": iso_ms(_now_ms()), "response_time_ms": result.ms}
        if result.status is not None:
            d["response_status"] = result.status
        await self._count(sub["subscription_id"], result.ok)
        if result.ok:
            await self._finish(d, "SUCCESS", None)
            return
        policy = {**RetryPolicy().model_dump(), **(sub.get("retry_policy") or {})}
        if attempts > policy["max_retries"]:
            await self._finish(d, "FAILED", result.error)
            await self.gov.emit(
                "system.webhook_delivery_failed",
                None,
                None,
                tenant_id=sub["tenant_id"],
                data={"subscription_id": sub["subscription_id"], "event_id": d["event_id"], "attempts": attempts,
                      "error": result.error or ""},
            )  # fmt: skip
            return
        delay = min(policy["initial_delay_ms"] * policy["backoff_multiplier"] ** (attempts - 1), policy["max_delay_ms"])
        due = _now_ms() + int(delay)
        d.update(status="RETRYING", _due_ms=due, next_retry_at=iso_ms(due))
        if result.error:
            d["error_message"] = result.error
        await self._save(d)

    async def _count(self, sid: str, ok: bool) -> None:
        now = iso_ms(_now_ms())
        disabled: list[dict[str, Any]] = []

        def change(current: dict[str, Any] | None) -> dict[str, Any] | None:
            if current is None:
                return None
            new = {**current, "last_triggered_at": now}
            if ok:
                new.update(consecutive_failures=0, last_success_at=now)
            else:
                new.update(consecutive_failures=current.get("consecutive_failures", 0) + 1, last_failure_at=now)
                if (
                    new["consecutive_failures"] >= new.get("disable_after_failures", 10)
                    and current["status"] == "ACTIVE"
                ):
                    new.update(status="DISABLED", disabled_reason="consecutive_failures_exceeded_threshold")
                    disabled[:] = [current]
            return new

        await self.gov.run(self.gov.records.doc_update, "webhook", sid, change)
        if disabled:
            before = disabled[0]
            await self.gov.emit(
                "webhook.disabled",
                None,
                None,
                tenant_id=before["tenant_id"],
                correlation_id=f"webhook_auto_disable:{sid}:{secrets.token_hex(4)}",
                data={"subscription_id": sid, "previous_status": before["status"], "new_status": "DISABLED",
                      "disable_reason": "consecutive_failures_exceeded_threshold"},
            )  # fmt: skip

    async def _finish(self, d: dict[str, Any], status: str, error: str | None) -> None:
        d = {**d, "status": status, "completed_at": iso_ms(_now_ms())}
        d.pop("next_retry_at", None)
        if error:
            d["error_message"] = error
        await self._save(d)
        pending = await self.gov.run(self.gov.records.doc_get, "pending", d["delivery_id"])
        if pending is not None:
            await self.gov.run(self.gov.records.doc_swap, "pending", d["delivery_id"], pending, None, index="")

    async def _save(self, d: dict[str, Any]) -> None:
        records = self.gov.records
        current = await self.gov.run(records.doc_get, "delivery", d["delivery_id"])
        await self.gov.run(records.doc_swap, "delivery", d["delivery_id"], current, d, index=d["subscription_id"])


class WebhookBulkFilter(_Body):
    tenant_id: str | None = None
    status: Literal["ACTIVE", "PAUSED", "DISABLED"] | None = None
    event_type: str | None = None
    search: Annotated[str, StringConstraints(max_length=128)] | None = None


class WebhookBulkActionRequest(_Body):
    filter: WebhookBulkFilter
    action: Literal["PAUSE", "RESUME", "DELETE"]
    expected_count: int | None = None
    idempotency_key: Annotated[str, StringConstraints(min_length=1, max_length=128)]


async def bulk_action(s: CyclesServer, request: Request, p: Principal) -> Reply:
    """bulkActionWebhooks: PAUSE, RESUME or DELETE every subscription the filter matches."""
    from cycles.errors import CountMismatch

    req = parse_body(WebhookBulkActionRequest, await read_body(request, s.max_body_bytes))
    f = req.filter
    if not f.model_fields_set:
        raise InvalidRequest("filter must name at least one of tenant_id, status, event_type, search")
    if f.event_type is not None and f.event_type not in _event_types():
        raise InvalidRequest(f"unknown event type {f.event_type[:64]!r}")
    if req.expected_count is not None and req.expected_count < 0:
        raise InvalidRequest("expected_count must be 0 or more")
    search = (f.search or "").lower()
    rows = [
        d
        for d in await s.gov.run(s.gov.records.doc_list, "webhook", tenant=f.tenant_id)
        if (f.status is None or d["status"] == f.status)
        and (f.event_type is None or f.event_type in d["event_types"])
        and (not search or search in (d.get("name") or "").lower() or search in d["url"].lower())
    ]
    if len(rows) > 500:
        raise InvalidRequest("the filter matches more than 500 subscriptions: narrow it")
    if req.expected_count is not None and req.expected_count != len(rows):
        raise CountMismatch(f"the filter matches {len(rows)} subscriptions, not {req.expected_count}")
    target = {"PAUSE": "PAUSED", "RESUME": "ACTIVE", "DELETE": None}[req.action]
    succeeded, failed, skipped = [], [], []
    for d in rows:
        sid = d["subscription_id"]
        if target is not None and d["status"] == target:
            skipped.append({"id": sid, "reason": f"already {target}"})
            continue
        owner = await s.gov.tenant(d["tenant_id"], fresh=True) if d["tenant_id"] != SYSTEM else None
        if owner is not None and owner["status"] == "CLOSED":
            failed.append({"id": sid, "error_code": "TENANT_CLOSED", "message": "the owning tenant is closed"})
            continue
        if target is None:
            ok = await s.gov.run(s.gov.records.doc_swap, "webhook", sid, d, None)
            event, data = "webhook.deleted", {"subscription_id": sid, "previous_status": d["status"]}
        else:
            new = {**d, "status": target, "updated_at": iso_ms(_now_ms())}
            if target == "ACTIVE":
                new["consecutive_failures"] = 0
            ok = await s.gov.run(s.gov.records.doc_swap, "webhook", sid, d, new)
            event = "webhook.paused" if target == "PAUSED" else "webhook.resumed"
            data = {"subscription_id": sid, "previous_status": d["status"], "new_status": target}
        if not ok:
            failed.append({"id": sid, "error_code": "INTERNAL_ERROR", "message": "changed concurrently: retry"})
            continue
        s.gov.alerts_forget(d["tenant_id"])
        await s.gov.emit(event, request, p, tenant_id=d["tenant_id"], data=data)
        succeeded.append({"id": sid})
    note_of(request).resource_id = f"bulk:{req.idempotency_key}"
    return bulk_reply(req.action, len(rows), (succeeded, failed, skipped), req.idempotency_key)
