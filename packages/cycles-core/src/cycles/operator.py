"""The governance plane from Python: tenants, API keys, budgets, webhooks, events, audit.

One implementation: every call is the governance spec's HTTP operation. Against a server
(``http(s)://``) it goes over the network with the admin key; against a local ledger (memory,
SQLite, Redis) it is served in-process by the same app ``cycles serve`` runs (no socket), so the
audit trail, events and checks are the same either way::

    from cycles import Cycles, usd
    cy = Cycles("sqlite:///ledger.db")
    op = cy.operator                                   # or cycles.operator.Operator(url, admin_key=...)
    op.tenants.create("acme", "Acme Corp")
    key = op.keys.create("acme", "support-bot", permissions=["reservations:create", "balances:read"],
                         scope_filter=["workspace:support"])   # key["key_secret"]: shown once
    op.budgets.create("tenant:acme/workspace:support", usd(100), period_start="2026-12-01T00:00:00Z")
    hook = op.webhooks.create("https://oncall.example/cycles", ["budget.threshold_crossed"],
                              tenant_id="acme", thresholds={"budget_utilization": [0.8]})
    op.events(tenant_id="acme", event_type="budget.threshold_crossed")
    op.audit(operation="createApiKey")

Errors are the typed exceptions of ``cycles.errors`` (``TenantNotFound``, ``DuplicateResource``,
``InsufficientPermissions``, ...). Results are the spec's JSON objects as dicts. Webhooks are
delivered by a running server (``cycles serve``), which dispatches every stored event.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from typing import Any

from cycles.errors import CyclesError, InvalidRequest, error_for
from cycles.models import Amount

__all__ = ["Operator"]

Json = dict[str, Any]
_JsonList = list[Json]


class Operator:
    """See the module docstring. ``url``: a ledger or server URL; or ``ledger=`` a ledger object."""

    def __init__(self, url: str | None = None, *, admin_key: str | None = None, ledger: Any = None) -> None:
        import httpx

        if ledger is not None and url is None:
            url = str(getattr(ledger, "url", ""))
            core = getattr(ledger, "_core", None)
            admin_key = admin_key or getattr(core, "admin_key", None)
        from cycles.ledger.base import default_ledger_url

        url = url or default_ledger_url()
        self.url = url
        if url.split("://", 1)[0].lower() in ("http", "https"):
            if not admin_key:
                raise InvalidRequest("the governance API of a server needs its admin key (admin_key=, --admin-key)")
            self._client: Any = httpx.Client(
                base_url=url.rstrip("/"), headers={"X-Admin-API-Key": admin_key}, timeout=30
            )
        else:
            from starlette.testclient import TestClient

            from cycles.ledger.base import ThreadedAsyncLedger
            from cycles.server import create_app

            key = secrets.token_hex(16)
            wrapped = ThreadedAsyncLedger(ledger) if ledger is not None and not hasattr(ledger, "aclose") else ledger
            app = create_app(
                url if wrapped is None else None, ledger=wrapped, keys_url=url, admin_key=key, sweep_interval_s=0
            )
            self._client = TestClient(app, base_url="http://cycles.local", headers={"X-Admin-API-Key": key})
            # One event loop for every call (async Redis clients are bound to theirs), and no
            # lifespan: the app must not close the ledger it borrows, nor start a dispatcher.
            import anyio.from_thread

            self._portal_cm: Any = anyio.from_thread.start_blocking_portal(**self._client.async_backend)
            self._client.portal = self._portal_cm.__enter__()
            self._server: Any = app.server
            self._owns_ledger = ledger is None
        self.tenants = _Tenants(self)
        self.keys = _Keys(self)
        self.budgets = _Budgets(self)
        self.webhooks = _Webhooks(self)

    def call(self, method: str, path: str, *, params: Json | None = None, json: Any = None) -> Any:
        """One operation; a non-2xx answer raises its typed error."""
        clean = {k: v for k, v in (params or {}).items() if v is not None}
        response = self._client.request(method, path, params=clean, json=json)
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = {}
            err: CyclesError = error_for(
                str(body.get("error") or "INTERNAL_ERROR"),
                str(body.get("message") or f"HTTP {response.status_code}"),
                details=body.get("details"),
                request_id=body.get("request_id"),
                trace_id=body.get("trace_id"),
            )
            raise err
        return response.json() if response.content else None

    def pages(self, path: str, field: str, params: Json, limit: int | None) -> list[Json]:
        out: list[Json] = []
        cursor = None
        while True:
            page = self.call("GET", path, params={**params, "cursor": cursor, "limit": 100})
            out.extend(page[field])
            cursor = page.get("next_cursor")
            if not page.get("has_more") or not cursor or (limit is not None and len(out) >= limit):
                return out[:limit] if limit is not None else out

    def events(self, *, limit: int | None = 100, **filters: Any) -> list[Json]:
        """``listEvents``, newest first. Filters: tenant_id, event_type, category, scope (prefix),
        correlation_id, trace_id, request_id, from_ / to (date-times), search, sort_dir."""
        return self.pages("/v1/admin/events", "events", _params(filters), limit)

    def audit(self, *, limit: int | None = 100, **filters: Any) -> list[Json]:
        """``listAuditLogs``, newest first. Filters: tenant_id, key_id, operation, resource_type,
        resource_id, status, status_min, status_max, error_code, from_ / to, request_id, search."""
        return self.pages("/v1/admin/audit/logs", "logs", _params(filters), limit)

    def introspect(self) -> Json:
        result: Json = self.call("GET", "/v1/auth/introspect")
        return result

    def close(self) -> None:
        portal = getattr(self, "_portal_cm", None)
        if portal is not None:
            server = self._server

            async def release() -> None:
                await server.gov.dispatcher.aclose()
                await server.keys.aclose()
                if self._owns_ledger:  # opened by the app from a URL: ours to close
                    await server.ledger.aclose()
                    server.gov.records.close()

            self._client.portal.call(release)
            self._client.portal = None
            portal.__exit__(None, None, None)
            self._portal_cm = None
        self._client.close()

    def __enter__(self) -> Operator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _params(filters: dict[str, Any]) -> Json:
    out: Json = {}
    for k, v in filters.items():
        if v is None:
            continue
        name = "from" if k in ("from_", "since") else ("to" if k == "until" else k)
        out[name] = ",".join(v) if isinstance(v, list | tuple) else v
    return out


def _amount(a: Amount) -> Json:
    return {"unit": a.unit.value, "amount": a.amount}


class _Tenants:
    def __init__(self, op: Operator) -> None:
        self._op = op

    def create(self, tenant_id: str, name: str, **fields: Any) -> Json:
        result: Json = self._op.call("POST", "/v1/admin/tenants", json={"tenant_id": tenant_id, "name": name, **fields})
        return result

    def list(self, *, limit: int | None = None, **filters: Any) -> list[Json]:
        return self._op.pages("/v1/admin/tenants", "tenants", _params(filters), limit)

    def get(self, tenant_id: str) -> Json:
        result: Json = self._op.call("GET", f"/v1/admin/tenants/{tenant_id}")
        return result

    def update(self, tenant_id: str, **fields: Any) -> Json:
        result: Json = self._op.call("PATCH", f"/v1/admin/tenants/{tenant_id}", json=fields)
        return result

    def suspend(self, tenant_id: str) -> Json:
        return self.update(tenant_id, status="SUSPENDED")

    def reactivate(self, tenant_id: str) -> Json:
        return self.update(tenant_id, status="ACTIVE")

    def close(self, tenant_id: str) -> Json:
        """Irreversible: budgets closed, keys revoked, webhooks disabled (the tenant-close cascade)."""
        return self.update(tenant_id, status="CLOSED")


class _Keys:
    def __init__(self, op: Operator) -> None:
        self._op = op

    def create(
        self,
        tenant_id: str,
        name: str,
        *,
        permissions: Iterable[str] | None = None,
        scope_filter: Iterable[str] | None = None,
        expires_at: str | None = None,
        metadata: Json | None = None,
    ) -> Json:
        """A new key; ``result["key_secret"]`` is the key, returned this once only."""
        body: Json = {"tenant_id": tenant_id, "name": name}
        if permissions is not None:
            body["permissions"] = list(permissions)
        if scope_filter is not None:
            body["scope_filter"] = list(scope_filter)
        if expires_at is not None:
            body["expires_at"] = expires_at
        if metadata is not None:
            body["metadata"] = metadata
        result: Json = self._op.call("POST", "/v1/admin/api-keys", json=body)
        return result

    def list(self, *, limit: int | None = None, **filters: Any) -> list[Json]:
        return self._op.pages("/v1/admin/api-keys", "keys", _params(filters), limit)

    def update(self, key_id: str, **fields: Any) -> Json:
        result: Json = self._op.call("PATCH", f"/v1/admin/api-keys/{key_id}", json=fields)
        return result

    def revoke(self, key_id: str, *, reason: str | None = None) -> Json:
        result: Json = self._op.call("DELETE", f"/v1/admin/api-keys/{key_id}", params={"reason": reason})
        return result

    def validate(self, key_secret: str) -> Json:
        result: Json = self._op.call("POST", "/v1/auth/validate", json={"key_secret": key_secret})
        return result


class _Budgets:
    def __init__(self, op: Operator) -> None:
        self._op = op

    def create(self, scope: str, allocated: Amount, *, tenant_id: str | None = None, **fields: Any) -> Json:
        from cycles.scopes import scope_tenant

        body: Json = {
            "tenant_id": tenant_id or scope_tenant(scope),
            "scope": scope,
            "unit": allocated.unit.value,
            "allocated": _amount(allocated),
            **{k: (_amount(v) if isinstance(v, Amount) else v) for k, v in fields.items()},
        }
        result: Json = self._op.call("POST", "/v1/admin/budgets", json=body)
        return result

    def list(self, *, limit: int | None = None, **filters: Any) -> list[Json]:
        return self._op.pages("/v1/admin/budgets", "ledgers", _params(filters), limit)

    def lookup(self, scope: str, unit: str) -> Json:
        result: Json = self._op.call("GET", "/v1/admin/budgets/lookup", params={"scope": scope, "unit": unit})
        return result

    def fund(self, scope: str, operation: str, amount: Amount, *, reason: str | None = None) -> Json:
        """CREDIT, DEBIT or RESET."""
        from cycles.scopes import scope_tenant

        params = {"scope": scope, "unit": amount.unit.value, "tenant_id": scope_tenant(scope)}
        body: Json = {"operation": operation, "amount": _amount(amount)}
        if reason is not None:
            body["reason"] = reason
        result: Json = self._op.call("POST", "/v1/admin/budgets/fund", params=params, json=body)
        return result

    def freeze(self, scope: str, unit: str, *, reason: str | None = None) -> Json:
        body = {"reason": reason} if reason else {}
        result: Json = self._op.call(
            "POST", "/v1/admin/budgets/freeze", params={"scope": scope, "unit": unit}, json=body
        )
        return result

    def unfreeze(self, scope: str, unit: str, *, reason: str | None = None) -> Json:
        body = {"reason": reason} if reason else {}
        params = {"scope": scope, "unit": unit}
        result: Json = self._op.call("POST", "/v1/admin/budgets/unfreeze", params=params, json=body)
        return result


class _Webhooks:
    def __init__(self, op: Operator) -> None:
        self._op = op

    def create(self, url: str, event_types: Iterable[str], *, tenant_id: str | None = None, **fields: Any) -> Json:
        """A subscription; ``result["signing_secret"]`` is returned this once only."""
        body = {"url": url, "event_types": list(event_types), **fields}
        result: Json = self._op.call("POST", "/v1/admin/webhooks", params={"tenant_id": tenant_id}, json=body)
        return result

    def list(self, *, limit: int | None = None, **filters: Any) -> list[Json]:
        return self._op.pages("/v1/admin/webhooks", "subscriptions", _params(filters), limit)

    def get(self, subscription_id: str) -> Json:
        result: Json = self._op.call("GET", f"/v1/admin/webhooks/{subscription_id}")
        return result

    def update(self, subscription_id: str, **fields: Any) -> Json:
        result: Json = self._op.call("PATCH", f"/v1/admin/webhooks/{subscription_id}", json=fields)
        return result

    def delete(self, subscription_id: str) -> None:
        self._op.call("DELETE", f"/v1/admin/webhooks/{subscription_id}")

    def test(self, subscription_id: str) -> Json:
        result: Json = self._op.call("POST", f"/v1/admin/webhooks/{subscription_id}/test")
        return result

    def deliveries(self, subscription_id: str, **filters: Any) -> _JsonList:
        result: _JsonList = self._op.call(
            "GET", f"/v1/admin/webhooks/{subscription_id}/deliveries", params=_params(filters)
        )["deliveries"]
        return result

    def security(self, **config: Any) -> Json:
        """The WebhookSecurityConfig; with arguments (``allow_http``, ``blocked_cidr_ranges``,
        ``allowed_url_patterns``) it is changed first."""
        path = "/v1/admin/config/webhook-security"
        result: Json = self._op.call("PUT", path, json=config) if config else self._op.call("GET", path)
        return result

    def replay(self, subscription_id: str, **window: Any) -> Json:
        result: Json = self._op.call("POST", f"/v1/admin/webhooks/{subscription_id}/replay", json=_params(window))
        return result
