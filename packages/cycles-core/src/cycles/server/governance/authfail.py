"""Refused requests: audited, announced and rate limited per source, across the deployment.

A request refused with 401 (no key; a malformed, unknown, revoked or expired key; a wrong admin
key) or 403 (a permission or scope the key lacks) on any endpoint of ``cycles serve`` passes here
before it is answered. An attacker can send such requests without limit, so what they cost the
store is bounded first:

* **Sources.** Each refusal is counted against its key id (``key:<key_id>``, never the secret)
  when the presented key parses as ``cyc_<key_id>_...``, and a 401 also against its source IP
  (``ip:<addr>``; a 403 comes with a key that verified, one of a tenant's few), in tumbling
  windows of ``window_s`` (default 60 s). The counts live in the record store
  (``RecordStore.tally``), so every server and worker of a deployment adds to the same ones.
* **Rate limit.** Once either source has more than ``limit`` (default 60, ``0``: off) refusals in
  the window, its further refusals are answered ``429 LIMIT_EXCEEDED`` with ``Retry-After`` (the
  rest of the window) instead of 401/403. Only refusals are limited: a valid key keeps working
  from any address, so nobody can lock a tenant out by sending bad requests under its (public)
  key id or from its NAT. Behind a proxy, run uvicorn with ``--proxy-headers`` so the address is
  the client's.
* **Audit.** The first ``audit_per_source`` (default 10) refusals of a source in a window get an
  ``AuditLogEntry`` each: the operation, status and error code answered, ``key_id``,
  ``source_ip``, ``user_agent``, ``request_id``, ``trace_id``, and ``metadata.failure_reason``.
  Beyond that they are coalesced: once the window is over, one summary entry per source
  (operation ``authFailureSummary``, ``metadata.count``, ``window_start``, ``window_seconds``)
  is written by one server of the deployment (a compare-and-set mark).
* **Events.** Each individually audited 401 is also an ``api_key.auth_failed`` event
  (``EventDataApiKey``: ``key_id``, ``failure_reason``, ``source_ip``), and
  ``api_key.auth_failure_rate_spike`` (``EventDataRateSpike``) is announced once per window when
  more than ``auth_failure_rate_threshold`` (default 10%) of the deployment's authentications in
  ``rate_window_seconds`` (default 300 s) failed, over at least 10 of them -- settings from the
  ``__system__`` webhook subscriptions' ``thresholds``, like the other rate spikes.
* **Sign-in forms.** The dashboard's sign-in takes the admin key, which an operator may have
  chosen weakly; there a source address over the limit is refused (``blocked``) *before* the
  key is looked at, so the limit also bounds guessing. Its refusals and those of ``/metrics``
  are counted, audited and limited like the API's (operations ``dashboardSignIn``,
  ``getMetrics``).
* **Tenants.** A 401 is recorded under the spec's ``__unauth__`` sentinel tenant (its event under
  the key's tenant when the key is ours: revoked or expired, the caller holds all of it), a 403
  under the key's tenant. ``__unauth__``'s share of each stream is held to ``max_unauth_records``
  (oldest trimmed first), so a flood from ever-new addresses and invented key ids displaces only
  records of its own kind, never a tenant's.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from starlette.requests import Request

from cycles.errors import CyclesError, InsufficientPermissions, LimitExceeded
from cycles.ledger.records import AUDIT, EVENTS, iso_ms, new_audit, new_event
from cycles.server._http import error_status
from cycles.server.auth import API_KEY_HEADER, AuthFailed, Principal, key_id_prefix
from cycles.server.governance.context import ADMIN_TENANT, Governance, ids_of
from cycles.server.governance.rates import SharedRate

__all__ = ["UNAUTH_TENANT", "AuthFailures"]

logger = logging.getLogger("cycles.server")

#: AuditLogEntry.tenant_id of a request refused before it was tied to a tenant (the spec's sentinel).
UNAUTH_TENANT = "__unauth__"
SYSTEM_TENANT = "__system__"
#: Runtime operations by route (the governance ones carry their name from ``audited``).
_RUNTIME_OPERATIONS = {
    "POST /v1/reservations": "createReservation",
    "POST /v1/decide": "decide",
    "POST /v1/events": "createEvent",
    "POST /v1/reservations/{reservation_id}/commit": "commitReservation",
    "POST /v1/reservations/{reservation_id}/release": "releaseReservation",
    "POST /v1/reservations/{reservation_id}/extend": "extendReservation",
    "GET /v1/reservations": "listReservations",
    "GET /v1/reservations/{reservation_id}": "getReservation",
    "GET /v1/balances": "getBalances",
    # the two sign-ins outside the API: the dashboard's form and the /metrics bearer token
    "POST /dashboard/login": "dashboardSignIn",
    "GET /metrics": "getMetrics",
}
_TRIM_EVERY = 100
#: Seconds after a window's end before its summaries are written (late increments land first).
_SUMMARY_GRACE_S = 2.0


def operation_of(route: str, handler: Any) -> tuple[str, str | None]:
    """(operation, resource_type) for a refusal's audit entry."""
    name = getattr(handler, "operation", None)
    return (str(name) if name else _RUNTIME_OPERATIONS.get(route, route)), getattr(handler, "resource_type", None)


class AuthFailures:
    """Counts, audits, announces and limits refused requests (see the module docstring)."""

    def __init__(
        self,
        gov: Governance,
        *,
        limit: int = 60,
        window_s: float = 60.0,
        audit_per_source: int = 10,
        max_unauth_records: int = 10_000,
    ) -> None:
        self.gov = gov
        self.limit = limit
        self.window_s = window_s
        self.audit_per_source = audit_per_source
        self.max_unauth_records = max_unauth_records
        #: seconds since the epoch (tests move it)
        self.clock = time.time
        self.attempts = SharedRate(gov, "auth_failure_rate", lambda: self.clock())
        # (source, window) -> what its summary says; sources this process saw coalesced
        self._coalesced: dict[tuple[str, int], dict[str, Any]] = {}
        self._unauth_appends = 0

    async def _rate_settings(self) -> tuple[float, float]:
        _, rates = await self.gov.alerts.settings(SYSTEM_TENANT)
        return float(rates.get("rate_window_seconds", 300)), float(rates.get("auth_failure_rate_threshold", 0.1))

    async def accepted(self) -> None:
        """A request authenticated: counted (in this process, written in batches) for the rate."""
        window, _ = await self._rate_settings()
        await self.attempts.note("all", False, window)

    async def refused(self, request: Request, p: Principal, route: str, handler: Any, exc: CyclesError) -> CyclesError:
        """Count, audit and announce one refusal; returns the error to answer with (``exc``, or
        ``LimitExceeded`` once a source of it is over the limit)."""
        operation, resource_type = operation_of(route, handler)
        now = self.clock()
        window = int(now // self.window_s)
        ip = request.client.host if request.client else "unknown"
        failed = isinstance(exc, AuthFailed)
        key_id = exc.key_id if isinstance(exc, AuthFailed) else p.key_id
        if key_id is None:
            key_id = key_id_prefix(request.headers.get(API_KEY_HEADER))
        # A 403 comes with a key that verified: one of a tenant's few keys, counted as itself. A 401
        # may come with anything, so its address counts too (key ids are free to invent).
        sources = [*([f"ip:{ip}"] if failed or key_id is None else []), *([f"key:{key_id}"] if key_id else [])]
        counts = []
        for source in sources:
            buckets = await self.gov.run(
                self.gov.records.tally,
                f"authfail:{self.window_s:g}:{source}",
                window,
                {"n": 1},
                keep=2,
                ttl_ms=int(3 * self.window_s * 1000),
            )
            counts.append(buckets.get(window, {}).get("n", 1))
        answer: CyclesError = exc
        if self.limit and max(counts) > self.limit:
            answer = self._limited(now, window)
        code, status = error_status(answer)
        reason = exc.reason if isinstance(exc, AuthFailed) else _forbidden_reason(exc)
        tenant = UNAUTH_TENANT if failed else (ADMIN_TENANT if p.admin else (p.tenant or UNAUTH_TENANT))
        owner = exc.tenant if isinstance(exc, AuthFailed) else p.tenant
        if all(c <= self.audit_per_source for c in counts):
            await self._audit(request, p, (operation, resource_type), status, code, reason, (tenant, owner), key_id, ip)
            if failed:
                await self._auth_failed_event(request, owner or UNAUTH_TENANT, key_id, reason, ip)
        else:
            for source, count in zip(sources, counts, strict=True):
                # bounded: past 10,000 sources a summary is dropped (the count stays in the store)
                if count > self.audit_per_source and len(self._coalesced) < 10_000:
                    self._coalesced.setdefault(
                        (source, window),
                        {"tenant": tenant, "status": status, "error_code": code, "operation": operation,
                         "first_request_id": request.scope.get("cycles.ids", (None,))[0]},
                    )  # fmt: skip
        if failed:
            await self._rate(request)
        return answer

    async def blocked(self, request: Request) -> LimitExceeded | None:
        """``LimitExceeded`` when the request's address is over the limit of refusals in this
        window (read, not counted): for a sign-in form, asked before the key is checked."""
        if not self.limit:
            return None
        now = self.clock()
        window = int(now // self.window_s)
        ip = request.client.host if request.client else "unknown"
        buckets = await self.gov.run(
            self.gov.records.tally, f"authfail:{self.window_s:g}:ip:{ip}", window, {}, keep=2, ttl_ms=0
        )
        return self._limited(now, window) if buckets.get(window, {}).get("n", 0) > self.limit else None

    def _limited(self, now: float, window: int) -> LimitExceeded:
        return LimitExceeded(
            "too many refused requests from this address or key; retry later",
            details={"limit": "auth_failures", "window_seconds": int(self.window_s)},
            retry_after_s=(window + 1) * self.window_s - now,
        )

    async def _audit(
        self,
        request: Request,
        p: Principal,
        what: tuple[str, str | None],
        status: int,
        code: str,
        reason: str,
        tenants: tuple[str, str | None],
        key_id: str | None,
        ip: str,
    ) -> None:
        (operation, resource_type), (tenant, owner) = what, tenants
        request_id, trace_id = ids_of(request)
        note = request.scope.get("cycles.audit")  # what an audited handler noted before refusing
        actor = "admin" if p.admin else ("api_key" if p.key_id else "unauthenticated")
        metadata: dict[str, Any] = {"actor_type": actor, "failure_reason": reason}
        if owner is not None:
            metadata["target_tenant_id"] = owner
        entry = new_audit(
            operation,
            tenant_id=tenant,
            status=status,
            key_id=key_id,
            resource_type=resource_type,
            resource_id=getattr(note, "resource_id", None),
            request_id=request_id,
            trace_id=trace_id,
            error_code=code,
            source_ip=ip,
            user_agent=(request.headers.get("user-agent") or "")[:256] or None,
            metadata=metadata,
        )
        await self._append(AUDIT, entry)

    async def _append(self, kind: Any, record: dict[str, Any]) -> None:
        await self.gov.run(self.gov.records.append, kind, record)
        if record.get("tenant_id") != UNAUTH_TENANT:
            return
        self._unauth_appends += 1
        if self._unauth_appends % _TRIM_EVERY == 0:
            for stream in (AUDIT, EVENTS):
                await self.gov.run(self.gov.records.trim_tenant, stream, UNAUTH_TENANT, self.max_unauth_records)

    async def _auth_failed_event(self, request: Request, tenant: str, key_id: str | None, reason: str, ip: str) -> None:
        request_id, trace_id = ids_of(request)
        data: dict[str, Any] = {"failure_reason": reason, "source_ip": ip}
        if key_id is not None:
            data["key_id"] = key_id
        actor: dict[str, Any] = {"type": "api_key", "source_ip": ip}
        if key_id is not None:
            actor["key_id"] = key_id
        event = new_event(
            "api_key.auth_failed",
            tenant_id=tenant,
            data=data,
            actor=actor,
            correlation_id=request_id,
            request_id=request_id,
            trace_id=trace_id,
        )
        await self._append(EVENTS, event)

    async def _rate(self, request: Request) -> None:
        window, threshold = await self._rate_settings()
        data = await self.attempts.spike("all", True, window, threshold)
        if data is None:
            return
        await self.gov.emit("api_key.auth_failure_rate_spike", request, None, tenant_id=SYSTEM_TENANT, data=data)

    async def flush(self) -> None:
        """Write the summaries of windows that are over, once per deployment; and the rate counts
        this process still holds. The server calls it every second."""
        await self.attempts.flush()
        now = self.clock()
        for source, window in list(self._coalesced):
            if now < (window + 1) * self.window_s + _SUMMARY_GRACE_S:
                continue
            summary = self._coalesced.pop((source, window), None)
            if summary is None:  # taken by a flush running beside this one
                continue
            mark = f"authfail-sum:{self.window_s:g}:{source}:{window}"
            if not await self.gov.run(self.gov.records.cas, mark, None, "1", ttl_ms=int(3 * self.window_s * 1000)):
                continue  # another server wrote it
            buckets = await self.gov.run(
                self.gov.records.tally, f"authfail:{self.window_s:g}:{source}", window, {}, keep=2, ttl_ms=0
            )
            count = buckets.get(window, {}).get("n", 0)
            kind, _, value = source.partition(":")
            entry = new_audit(
                "authFailureSummary",
                tenant_id=summary["tenant"],
                status=summary["status"],
                key_id=value if kind == "key" else None,
                source_ip=value if kind == "ip" else None,
                error_code=summary["error_code"],
                metadata={
                    "coalesced": True,
                    "count": count,
                    "individually_recorded": self.audit_per_source,
                    "window_start": iso_ms(int(window * self.window_s * 1000)),
                    "window_seconds": int(self.window_s),
                    "operation": summary["operation"],
                    "first_request_id": summary["first_request_id"],
                },
            )
            await self._append(AUDIT, entry)


def _forbidden_reason(exc: CyclesError) -> str:
    if isinstance(exc, InsufficientPermissions) or "lacks the" in exc.message:
        return "insufficient_permissions"
    return "forbidden"
