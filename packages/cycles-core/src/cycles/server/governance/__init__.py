"""The governance plane of ``cycles serve``: the operator endpoints of
``cycles-governance-admin-v0.1.25.yaml`` beside protocol v0's runtime plane.

``install(server, endpoints)`` is the one hook into the app: it opens the record store beside the
ledger (``server.gov``), adds the governance endpoints, puts a permission / scope-filter /
tenant-status guard in front of every runtime endpoint, and an audit entry behind every mutating
operator endpoint (the legacy ``/admin`` ones included).

    tenants     POST/GET /v1/admin/tenants, GET/PATCH /v1/admin/tenants/{tenant_id},
                POST /v1/admin/tenants/bulk-action
    api keys    POST/GET /v1/admin/api-keys, PATCH/DELETE /v1/admin/api-keys/{key_id}
    auth        POST /v1/auth/validate, GET /v1/auth/introspect
    records     GET /v1/admin/events, GET /v1/admin/events/{event_id}, GET /v1/events (tenant),
                GET /v1/admin/audit/logs
    budgets     POST/GET/PATCH /v1/admin/budgets, POST .../freeze, .../unfreeze, .../fund,
                GET .../lookup
    webhooks    /v1/admin/webhooks[/{id}[/test|/deliveries|/replay]], tenant /v1/webhooks[...]
    action kinds  GET /v1/action-kinds[/{kind}] (public), GET /v1/admin/action-quota-counters,
                POST /v1/admin/action-quota-counters/reset (action_kinds.py)
    policies    POST/GET /v1/admin/policies, GET/PATCH /v1/admin/policies/{policy_id} (named policies,
                kept and enforced by the ledger: cycles.ledger.policies)

The server's ledger is wrapped in ``alerts.ObservedLedger`` (threshold crossings, exhaustion,
denials, anomalies become events), and each server process runs ``webhooks.Dispatcher`` (one
delivers per deployment, by lease).
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, Any

from starlette.requests import Request

from cycles.errors import Forbidden, InvalidRequest, NotFound, TenantClosed
from cycles.ledger.records import MemoryRecordStore, RecordStore, records_of
from cycles.server.auth import Principal
from cycles.server.governance import action_kinds, apikeys, budgets, overview, policies, streams, tenants, webhooks
from cycles.server.governance.alerts import ObservedLedger, current_request
from cycles.server.governance.authz import RUNTIME_PERMISSIONS, subject_allowed
from cycles.server.governance.context import Governance, Handler, Reply, audited

if TYPE_CHECKING:
    from cycles.server.app import CyclesServer, Endpoint

__all__ = ["Governance", "install", "open_records"]

logger = logging.getLogger("cycles.server")

#: Legacy /admin routes: (audit operation, resource type).
_LEGACY_AUDIT = {
    "POST /admin/budgets": ("setBudget", "budget"),
    "POST /admin/budgets/fund": ("fundBudget", "budget"),
    "POST /admin/budgets/status": ("setBudgetStatus", "budget"),
    "POST /admin/keys": ("createApiKey", "api_key"),
    "DELETE /admin/keys/{key_id}": ("revokeApiKey", "api_key"),
    "POST /admin/sweep": ("sweep", None),
}
#: Runtime routes that start something new (refused for a SUSPENDED tenant).
_STARTS = frozenset({"POST /v1/reservations", "POST /v1/decide", "POST /v1/events"})
_BY_ID = frozenset(
    {
        "POST /v1/reservations/{reservation_id}/commit",
        "POST /v1/reservations/{reservation_id}/release",
        "POST /v1/reservations/{reservation_id}/extend",
        "GET /v1/reservations/{reservation_id}",
    }
)


def open_records(ledger: Any) -> RecordStore:
    """The record store beside the server's ledger; a process-local one for an http(s) ledger."""
    try:
        return records_of(ledger)
    except InvalidRequest:
        logger.warning("the ledger keeps no records (http?): events and audit stay in this process")
        return MemoryRecordStore()


def runtime_guard(route: str, permission: str, handler: Handler) -> Handler:
    """Permissions, tenant status and scope filter in front of a runtime endpoint. Codes stay
    within protocol v0's ErrorCode (FORBIDDEN, TENANT_CLOSED, NOT_FOUND)."""
    starts = route in _STARTS
    by_id = route in _BY_ID
    mutating = route.startswith("POST ")

    @functools.wraps(handler)
    async def run(s: CyclesServer, request: Request, p: Principal) -> Reply:
        current_request.set((request, p))  # for the events this call may cause
        if not p.admin and p.tenant is not None:
            if not p.may(permission):
                raise Forbidden(f"this API key lacks the {permission} permission")
            tenant = await s.gov.tenant(p.tenant)
            if tenant is not None and mutating:
                if tenant["status"] == "CLOSED":
                    raise TenantClosed(f"tenant {p.tenant!r} is closed", details={"tenant_id": p.tenant})
                if starts and tenant["status"] == "SUSPENDED":
                    raise Forbidden(f"tenant {p.tenant!r} is suspended: no new reservations")
            if by_id and p.scope_filter:
                rid = request.path_params.get("reservation_id", "")
                detail = await s.ledger.get_reservation(rid, tenant=p.tenant)
                if not subject_allowed(p.scope_filter, detail.subject):
                    raise NotFound(f"reservation {rid[:128]!r} not found")
        return await handler(s, request, p)

    return run


def install(server: CyclesServer, endpoints: list[Endpoint]) -> list[Endpoint]:
    """Attach the governance plane to ``server``; returns the full endpoint list."""
    from cycles.server.app import Endpoint

    if getattr(server, "gov", None) is None:
        server.gov = Governance(open_records(server.ledger))
        server.ledger = ObservedLedger(server.ledger, server.gov.alerts)
    for e in endpoints:
        permission = RUNTIME_PERMISSIONS.get(e.route)
        if permission is not None:
            e.handler = runtime_guard(e.route, permission, e.handler)
        legacy = _LEGACY_AUDIT.get(e.route)
        if legacy is not None:
            e.handler = audited(*legacy)(e.handler)
    t, k, r, b, w = tenants, apikeys, streams, budgets, webhooks

    def ep(path: str, method: str, handler: Handler, auth: Any) -> Endpoint:
        return Endpoint(server, path, method, handler, auth)

    return [
        *endpoints,
        ep("/v1/admin/tenants", "POST", audited("createTenant", "tenant")(t.create), "admin"),
        ep("/v1/admin/tenants", "GET", t.list_tenants, "admin"),
        ep("/v1/admin/tenants/bulk-action", "POST", audited("bulkActionTenants", "tenant")(t.bulk_action), "admin"),
        ep("/v1/admin/tenants/{tenant_id}", "GET", t.get, "admin"),
        ep("/v1/admin/tenants/{tenant_id}", "PATCH", audited("updateTenant", "tenant")(t.update), "admin"),
        ep("/v1/admin/api-keys", "POST", audited("createApiKey", "api_key")(k.create), "admin"),
        ep("/v1/admin/api-keys", "GET", k.list_keys, "admin"),
        ep("/v1/admin/api-keys/{key_id}", "PATCH", audited("updateApiKey", "api_key")(k.update), "admin"),
        ep("/v1/admin/api-keys/{key_id}", "DELETE", audited("revokeApiKey", "api_key")(k.revoke), "admin"),
        ep("/v1/auth/validate", "POST", k.validate, "admin"),
        ep("/v1/auth/introspect", "GET", k.introspect, "dual"),
        ep("/v1/admin/audit/logs", "GET", r.list_audit, "admin"),
        ep("/v1/admin/overview", "GET", overview.overview, "admin"),
        ep("/v1/admin/events", "GET", r.list_events, "admin"),
        ep("/v1/admin/events/{event_id}", "GET", r.get_event, "admin"),
        ep("/v1/events", "GET", r.list_tenant_events, "api"),
        ep("/v1/admin/budgets", "POST", audited("createBudget", "budget")(b.create), "dual"),
        ep("/v1/admin/budgets", "GET", b.list_budgets, "dual"),
        ep("/v1/admin/budgets", "PATCH", audited("updateBudget", "budget")(b.update), "admin"),
        ep("/v1/admin/budgets/freeze", "POST", audited("freezeBudget", "budget")(b.freeze), "admin"),
        ep("/v1/admin/budgets/unfreeze", "POST", audited("unfreezeBudget", "budget")(b.unfreeze), "admin"),
        ep("/v1/admin/budgets/fund", "POST", audited("fundBudget", "budget")(b.fund), "dual"),
        ep("/v1/admin/budgets/lookup", "GET", b.lookup, "dual"),
        ep("/v1/admin/budgets/bulk-action", "POST", audited("bulkActionBudgets", "budget")(b.bulk_action), "admin"),
        ep("/v1/admin/policies", "POST", audited("createPolicy", "policy")(policies.create), "dual"),
        ep("/v1/admin/policies", "GET", policies.list_policies, "dual"),
        ep("/v1/admin/policies/{policy_id}", "GET", policies.get, "dual"),
        ep("/v1/admin/policies/{policy_id}", "PATCH", audited("updatePolicy", "policy")(policies.update), "dual"),
        ep("/v1/admin/config/webhook-security", "GET", w.get_security, "admin"),
        ep(
            "/v1/admin/config/webhook-security",
            "PUT",
            audited("updateWebhookSecurityConfig", "config")(w.put_security),
            "admin",
        ),
        ep("/v1/admin/webhooks/bulk-action", "POST", audited("bulkActionWebhooks", "webhook")(w.bulk_action), "admin"),
        ep("/v1/admin/webhooks", "POST", audited("createWebhookSubscription", "webhook")(w.create_admin), "admin"),
        ep("/v1/admin/webhooks", "GET", w.list_hooks, "admin"),
        ep("/v1/admin/webhooks/{subscription_id}", "GET", w.get, "admin"),
        ep(
            "/v1/admin/webhooks/{subscription_id}",
            "PATCH",
            audited("updateWebhookSubscription", "webhook")(w.update),
            "admin",
        ),
        ep(
            "/v1/admin/webhooks/{subscription_id}",
            "DELETE",
            audited("deleteWebhookSubscription", "webhook")(w.delete),
            "admin",
        ),
        ep(
            "/v1/admin/webhooks/{subscription_id}/test",
            "POST",
            audited("testWebhookSubscription", "webhook")(w.test),
            "admin",
        ),
        ep("/v1/admin/webhooks/{subscription_id}/deliveries", "GET", w.deliveries, "admin"),
        ep(
            "/v1/admin/webhooks/{subscription_id}/replay", "POST", audited("replayEvents", "webhook")(w.replay), "admin"
        ),
        ep("/v1/webhooks", "POST", audited("createTenantWebhook", "webhook")(w.create_tenant), "api"),
        ep("/v1/webhooks", "GET", w.list_hooks, "dual"),
        ep("/v1/webhooks/{subscription_id}", "GET", w.get, "dual"),
        ep("/v1/webhooks/{subscription_id}", "PATCH", audited("updateTenantWebhook", "webhook")(w.update), "dual"),
        ep("/v1/webhooks/{subscription_id}", "DELETE", audited("deleteTenantWebhook", "webhook")(w.delete), "dual"),
        ep("/v1/webhooks/{subscription_id}/test", "POST", audited("testTenantWebhook", "webhook")(w.test), "dual"),
        ep("/v1/webhooks/{subscription_id}/deliveries", "GET", w.deliveries, "dual"),
        *_action_kind_endpoints(ep),
    ]


def _action_kind_endpoints(ep: Any) -> list[Endpoint]:
    ak = action_kinds
    reset = audited("resetActionQuotaCounter", "action_quota_counter")(ak.reset_counter)
    return [
        ep("/v1/action-kinds", "GET", ak.list_kinds, "none"),
        ep("/v1/action-kinds/{kind}", "GET", ak.get_kind, "none"),
        ep("/v1/admin/action-quota-counters", "GET", ak.list_counters, "dual"),
        ep("/v1/admin/action-quota-counters/reset", "POST", reset, "admin"),
    ]
