"""The governance plane from Python: tenants, API keys, budgets, webhooks, policies, events, audit.

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

``AsyncCycles(...).operator`` (an ``AsyncOperator``) has the same groups and methods, awaited:
``await acy.tenants.create("acme", "Acme Corp")``. In-process it runs the app on the caller's event
loop (the app keeps its blocking record stores in worker threads), so nothing blocks the loop.

Errors are the typed exceptions of ``cycles.errors`` (``TenantNotFound``, ``DuplicateResource``,
``InsufficientPermissions``, ...). Results are the spec's JSON objects as dicts. Webhooks are
delivered by a running server (``cycles serve``), which dispatches every stored event.

Each operation is written once, as a flow (``cycles.flows``): it yields its ``Call`` and returns
the result; ``Operator`` sends flows synchronously, ``AsyncOperator`` with ``await``. A new group
is a ``Group[S]`` subclass whose methods are ``@operation`` flows, made available on both by one
line in ``_OperatorBase.__init__`` (and on the clients by one property in ``client._ClientBase``).
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterable
from typing import Any

from cycles.errors import InvalidRequest
from cycles.flows import (
    AsyncHttpSender,
    AsyncSender,
    Call,
    Flow,
    Group,
    HttpSender,
    Json,
    S,
    SyncSender,
    operation,
    pages,
)
from cycles.models import Amount
from cycles.operator_quotas import ActionKinds, QuotaCounters

__all__ = ["AsyncOperator", "Operator"]

_JsonList = list[Json]


class _OperatorBase(Group[S]):
    """The operation groups and the plane-wide reads, over one sender (sync or async)."""

    def __init__(self, send: S) -> None:
        super().__init__(send)
        # One line per group: each is written once and serves Operator and AsyncOperator alike.
        self.tenants = _Tenants(send)
        self.keys = _Keys(send)
        self.budgets = _Budgets(send)
        self.webhooks = _Webhooks(send)
        self.action_kinds = ActionKinds(send)  # operator_quotas.py: the action-kinds spec's plane
        self.quota_counters = QuotaCounters(send)
        self.policies = _Policies(send)

    @operation
    def call(self, method: str, path: str, *, params: Json | None = None, json: Any = None) -> Flow[Any]:
        """One operation; a non-2xx answer raises its typed error."""
        return (yield Call(method, path, params, json))

    @operation
    def events(self, /, *, limit: int | None = 100, **filters: Any) -> Flow[list[Json]]:
        """``listEvents``, newest first. Filters: tenant_id, event_type, category, scope (prefix),
        correlation_id, trace_id, request_id, from_ / to (date-times), search, sort_dir."""
        return (yield from pages("/v1/admin/events", "events", _params(filters), limit))

    @operation
    def audit(self, /, *, limit: int | None = 100, **filters: Any) -> Flow[list[Json]]:
        """``listAuditLogs``, newest first. Filters: tenant_id, key_id, operation, resource_type,
        resource_id, status, status_min, status_max, error_code, from_ / to, request_id, search."""
        return (yield from pages("/v1/admin/audit/logs", "logs", _params(filters), limit))

    @operation
    def introspect(self) -> Flow[Json]:
        result: Json = yield Call("GET", "/v1/auth/introspect")
        return result


class _Target:
    """Where the operations go: a server (``remote``, with its admin key) or an app built here."""

    def __init__(self, url: str | None, admin_key: str | None, ledger: Any) -> None:
        from cycles.ledger.base import default_ledger_url

        if ledger is not None and url is None:
            url = str(getattr(ledger, "url", ""))
            core = getattr(ledger, "_core", None)
            admin_key = admin_key or getattr(core, "admin_key", None)
        self.url: str = url or default_ledger_url()
        self.remote = self.url.split("://", 1)[0].lower() in ("http", "https")
        if self.remote and not admin_key:
            raise InvalidRequest("the governance API of a server needs its admin key (admin_key=, --admin-key)")
        self.admin_key = admin_key or ""
        self.ledger = ledger
        self.server: Any = None

    def remote_options(self) -> Json:
        return {"base_url": self.url.rstrip("/"), "headers": {"X-Admin-API-Key": self.admin_key}, "timeout": 30}

    def app(self) -> Any:
        """The app ``cycles serve`` runs, over the ledger (or URL), with a one-off admin key."""
        from cycles.ledger.base import ThreadedAsyncLedger
        from cycles.server import create_app

        self.admin_key = secrets.token_hex(16)
        ledger = self.ledger
        wrapped = ThreadedAsyncLedger(ledger) if ledger is not None and not hasattr(ledger, "aclose") else ledger
        app = create_app(
            self.url if wrapped is None else None,
            ledger=wrapped,
            keys_url=self.url,
            admin_key=self.admin_key,
            sweep_interval_s=0,
        )
        self.server = app.server
        return app

    async def release(self) -> None:
        """Close what ``app`` opened (the dispatcher, the key store; the ledger when it was ours). The
        app never ran its lifespan: it must not close a ledger it borrows, nor start a dispatcher."""
        server, self.server = self.server, None
        if server is None:
            return
        await server.gov.dispatcher.aclose()
        await server.keys.aclose()
        if self.ledger is None:  # opened by the app from a URL: ours to close
            await server.ledger.aclose()
            await asyncio.to_thread(server.gov.records.close)


class Operator(_OperatorBase[SyncSender]):
    """See the module docstring. ``url``: a ledger or server URL; or ``ledger=`` a ledger object."""

    def __init__(self, url: str | None = None, *, admin_key: str | None = None, ledger: Any = None) -> None:
        target = self._target = _Target(url, admin_key, ledger)
        self.url = target.url
        self._portal_cm: Any = None
        import httpx

        if target.remote:
            client: Any = httpx.Client(**target.remote_options())
        else:
            import anyio.from_thread
            from starlette.testclient import TestClient

            app = target.app()
            client = TestClient(app, base_url="http://cycles.local", headers={"X-Admin-API-Key": target.admin_key})
            # One event loop for every call (async Redis clients are bound to theirs).
            self._portal_cm = anyio.from_thread.start_blocking_portal(**client.async_backend)
            client.portal = self._portal_cm.__enter__()
        self._client = client
        super().__init__(HttpSender(client))

    def close(self) -> None:
        client = self._client
        if self._portal_cm is not None:
            client.portal.call(self._target.release)
            client.portal = None
            self._portal_cm.__exit__(None, None, None)
            self._portal_cm = None
        client.close()

    def __enter__(self) -> Operator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncOperator(_OperatorBase[AsyncSender]):
    """``Operator`` with every operation awaited. ``ledger=``: an async (or sync) ledger object; in
    process the app runs on the caller's event loop, where an async ledger's clients live."""

    def __init__(self, url: str | None = None, *, admin_key: str | None = None, ledger: Any = None) -> None:
        target = self._target = _Target(url, admin_key, ledger)
        self.url = target.url

        def open_client() -> Any:  # an httpx.AsyncClient
            import httpx

            if target.remote:
                return httpx.AsyncClient(**target.remote_options())
            transport = httpx.ASGITransport(app=target.app())
            headers = {"X-Admin-API-Key": target.admin_key}
            return httpx.AsyncClient(transport=transport, base_url="http://cycles.local", headers=headers)

        self._sender = AsyncHttpSender(open_client)
        super().__init__(self._sender)

    async def aclose(self) -> None:
        client = self._sender.client
        await self._target.release()
        if client is not None:
            await client.aclose()

    async def __aenter__(self) -> AsyncOperator:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _params(filters: dict[str, Any]) -> Json:
    out: Json = {}
    for k, v in filters.items():
        if v is None:
            continue
        name = "from" if k in ("from_", "since") else ("to" if k == "until" else k)
        out[name] = ",".join(v) if isinstance(v, list | tuple) else v
    return out


def _listing(path: str, field: str) -> operation[..., _JsonList]:
    """A group's ``list(*, limit=None, **filters)``: every page of ``path``'s ``field``."""

    def flow(group: Any, /, *, limit: int | None = None, **filters: Any) -> Flow[_JsonList]:
        return (yield from pages(path, field, _params(filters), limit))

    return operation(flow)


def _amount(a: Amount) -> Json:
    return {"unit": a.unit.value, "amount": a.amount}


class _Tenants(Group[S]):
    @operation
    def create(self, /, tenant_id: str, name: str, **fields: Any) -> Flow[Json]:
        result: Json = yield Call("POST", "/v1/admin/tenants", json={"tenant_id": tenant_id, "name": name, **fields})
        return result

    list = _listing("/v1/admin/tenants", "tenants")

    @operation
    def get(self, tenant_id: str) -> Flow[Json]:
        result: Json = yield Call("GET", f"/v1/admin/tenants/{tenant_id}")
        return result

    @operation
    def update(self, /, tenant_id: str, **fields: Any) -> Flow[Json]:
        result: Json = yield Call("PATCH", f"/v1/admin/tenants/{tenant_id}", json=fields)
        return result

    @operation
    def suspend(self, tenant_id: str) -> Flow[Json]:
        return (yield from _Tenants.update.flow(self, tenant_id, status="SUSPENDED"))

    @operation
    def reactivate(self, tenant_id: str) -> Flow[Json]:
        return (yield from _Tenants.update.flow(self, tenant_id, status="ACTIVE"))

    @operation
    def close(self, tenant_id: str) -> Flow[Json]:
        """Irreversible: budgets closed, keys revoked, webhooks disabled (the tenant-close cascade)."""
        return (yield from _Tenants.update.flow(self, tenant_id, status="CLOSED"))


class _Keys(Group[S]):
    @operation
    def create(
        self,
        tenant_id: str,
        name: str,
        *,
        permissions: Iterable[str] | None = None,
        scope_filter: Iterable[str] | None = None,
        expires_at: str | None = None,
        metadata: Json | None = None,
    ) -> Flow[Json]:
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
        result: Json = yield Call("POST", "/v1/admin/api-keys", json=body)
        return result

    list = _listing("/v1/admin/api-keys", "keys")

    @operation
    def update(self, /, key_id: str, **fields: Any) -> Flow[Json]:
        result: Json = yield Call("PATCH", f"/v1/admin/api-keys/{key_id}", json=fields)
        return result

    @operation
    def revoke(self, key_id: str, *, reason: str | None = None) -> Flow[Json]:
        result: Json = yield Call("DELETE", f"/v1/admin/api-keys/{key_id}", params={"reason": reason})
        return result

    @operation
    def validate(self, key_secret: str) -> Flow[Json]:
        result: Json = yield Call("POST", "/v1/auth/validate", json={"key_secret": key_secret})
        return result


class _Budgets(Group[S]):
    @operation
    def create(self, /, scope: str, allocated: Amount, *, tenant_id: str | None = None, **fields: Any) -> Flow[Json]:
        from cycles.scopes import scope_tenant

        body: Json = {
            "tenant_id": tenant_id or scope_tenant(scope),
            "scope": scope,
            "unit": allocated.unit.value,
            "allocated": _amount(allocated),
            **{k: (_amount(v) if isinstance(v, Amount) else v) for k, v in fields.items()},
        }
        result: Json = yield Call("POST", "/v1/admin/budgets", json=body)
        return result

    list = _listing("/v1/admin/budgets", "ledgers")

    @operation
    def lookup(self, scope: str, unit: str) -> Flow[Json]:
        result: Json = yield Call("GET", "/v1/admin/budgets/lookup", params={"scope": scope, "unit": unit})
        return result

    @operation
    def fund(
        self,
        scope: str,
        operation: str,
        amount: Amount,
        *,
        spent: Amount | None = None,
        reason: str | None = None,
        idempotency_key: str | None = None,
    ) -> Flow[Json]:
        """``fundBudget``: CREDIT, DEBIT, RESET, RESET_SPENT (``spent``: the new period's starting
        spend, default 0) or REPAY_DEBT; returns the spec's BudgetFundingResponse. With an
        ``idempotency_key`` the same request again returns the first answer and changes nothing."""
        from cycles.scopes import scope_tenant

        params = {"scope": scope, "unit": amount.unit.value, "tenant_id": scope_tenant(scope)}
        body: Json = {"operation": operation, "amount": _amount(amount)}
        optional = {"spent": _amount(spent) if spent is not None else None, "reason": reason}
        body.update({k: v for k, v in {**optional, "idempotency_key": idempotency_key}.items() if v is not None})
        result: Json = yield Call("POST", "/v1/admin/budgets/fund", params=params, json=body)
        return result

    @operation
    def freeze(self, scope: str, unit: str, *, reason: str | None = None) -> Flow[Json]:
        body = {"reason": reason} if reason else {}
        result: Json = yield Call("POST", "/v1/admin/budgets/freeze", params={"scope": scope, "unit": unit}, json=body)
        return result

    @operation
    def unfreeze(self, scope: str, unit: str, *, reason: str | None = None) -> Flow[Json]:
        body = {"reason": reason} if reason else {}
        params = {"scope": scope, "unit": unit}
        result: Json = yield Call("POST", "/v1/admin/budgets/unfreeze", params=params, json=body)
        return result


class _Webhooks(Group[S]):
    @operation
    def create(
        self, /, url: str, event_types: Iterable[str], *, tenant_id: str | None = None, **fields: Any
    ) -> Flow[Json]:
        """A subscription; ``result["signing_secret"]`` is returned this once only."""
        body = {"url": url, "event_types": list(event_types), **fields}
        result: Json = yield Call("POST", "/v1/admin/webhooks", params={"tenant_id": tenant_id}, json=body)
        return result

    list = _listing("/v1/admin/webhooks", "subscriptions")

    @operation
    def get(self, subscription_id: str) -> Flow[Json]:
        result: Json = yield Call("GET", f"/v1/admin/webhooks/{subscription_id}")
        return result

    @operation
    def update(self, /, subscription_id: str, **fields: Any) -> Flow[Json]:
        result: Json = yield Call("PATCH", f"/v1/admin/webhooks/{subscription_id}", json=fields)
        return result

    @operation
    def delete(self, subscription_id: str) -> Flow[None]:
        yield Call("DELETE", f"/v1/admin/webhooks/{subscription_id}")

    @operation
    def test(self, subscription_id: str) -> Flow[Json]:
        result: Json = yield Call("POST", f"/v1/admin/webhooks/{subscription_id}/test")
        return result

    @operation
    def deliveries(self, /, subscription_id: str, **filters: Any) -> Flow[_JsonList]:
        page: Json = yield Call("GET", f"/v1/admin/webhooks/{subscription_id}/deliveries", params=_params(filters))
        result: _JsonList = page["deliveries"]
        return result

    @operation
    def security(self, /, **config: Any) -> Flow[Json]:
        """The WebhookSecurityConfig; with arguments (``allow_http``, ``blocked_cidr_ranges``,
        ``allowed_url_patterns``) it is changed first."""
        path = "/v1/admin/config/webhook-security"
        result: Json = yield Call("PUT", path, json=config) if config else Call("GET", path)
        return result

    @operation
    def replay(self, /, subscription_id: str, **window: Any) -> Flow[Json]:
        result: Json = yield Call("POST", f"/v1/admin/webhooks/{subscription_id}/replay", json=_params(window))
        return result


class _Policies(Group[S]):
    """Named policies (``cycles.ledger.policies``): caps, overage policy, TTL ceiling, rate limit,
    quotas and action-kind lists for the scopes a pattern matches, applied by the ledger at reserve."""

    @operation
    def create(self, /, tenant_id: str, name: str, scope_pattern: str, **fields: Any) -> Flow[Json]:
        """``createPolicy``: fields as the spec's PolicyCreateRequest (priority, caps, rate_limits, ...)."""
        body = {"tenant_id": tenant_id, "name": name, "scope_pattern": scope_pattern, **fields}
        result: Json = yield Call("POST", "/v1/admin/policies", json=body)
        return result

    list = _listing("/v1/admin/policies", "policies")  # tenant_id= is required with the admin key

    @operation
    def get(self, policy_id: str) -> Flow[Json]:
        result: Json = yield Call("GET", f"/v1/admin/policies/{policy_id}")
        return result

    @operation
    def update(self, /, policy_id: str, **fields: Any) -> Flow[Json]:
        """``updatePolicy``: only the fields given change; a list given replaces the stored one."""
        result: Json = yield Call("PATCH", f"/v1/admin/policies/{policy_id}", json=fields)
        return result

    @operation
    def disable(self, policy_id: str) -> Flow[Json]:
        return (yield from _Policies.update.flow(self, policy_id, status="DISABLED"))

    @operation
    def enable(self, policy_id: str) -> Flow[Json]:
        return (yield from _Policies.update.flow(self, policy_id, status="ACTIVE"))
