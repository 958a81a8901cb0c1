"""Every tenant permission against every operation a tenant key can reach: each permission allows
exactly its operations (and the admin:read / admin:write wildcards exactly theirs, the spec's
NORMATIVE wildcard semantics), on memory, SQLite and Redis, every response checked against the spec."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import httpx
import pytest

from .conftest import Api
from .test_alerts_webhooks import allow_loopback

USD = "USD_MICROCENTS"
HOOK_URL = "http://127.0.0.1:9/hook"  # never delivered to: no event it subscribes to happens
Call = Callable[[Api, str, dict[str, str]], httpx.Response]


def _body(**extra: object) -> dict[str, object]:
    return {"idempotency_key": uuid.uuid4().hex, "subject": {"tenant": "acme"}, "action": {"kind": "llm", "name": "m"},
            **extra}  # fmt: skip


def _held(api: Api, ctx: dict[str, str]) -> str:
    """A fresh ACTIVE reservation (made with a full key) for the by-id operations."""
    r = api.reserve(ctx["full"], {"tenant": "acme"}, 1)
    assert r.status_code == 200, r.text
    return str(r.json()["reservation_id"])


#: operation -> (the permission it needs, its success status, the call)
OPERATIONS: dict[str, tuple[str, int, Call]] = {
    "createReservation": ("reservations:create", 200, lambda api, key, ctx: api.reserve(key, {"tenant": "acme"}, 1)),
    "decide": ("reservations:create", 200, lambda api, key, ctx: api.k(
        key, "POST", "/v1/decide", json=_body(estimate={"unit": USD, "amount": 1}))),
    "createEvent": ("reservations:create", 201, lambda api, key, ctx: api.k(
        key, "POST", "/v1/events", json=_body(actual={"unit": USD, "amount": 1}))),
    "commitReservation": ("reservations:commit", 200, lambda api, key, ctx: api.k(
        key, "POST", f"/v1/reservations/{_held(api, ctx)}/commit",
        json={"idempotency_key": uuid.uuid4().hex, "actual": {"unit": USD, "amount": 1}})),
    "releaseReservation": ("reservations:release", 200, lambda api, key, ctx: api.k(
        key, "POST", f"/v1/reservations/{_held(api, ctx)}/release", json={"idempotency_key": uuid.uuid4().hex})),
    "extendReservation": ("reservations:extend", 200, lambda api, key, ctx: api.k(
        key, "POST", f"/v1/reservations/{_held(api, ctx)}/extend",
        json={"idempotency_key": uuid.uuid4().hex, "extend_by_ms": 1000})),
    "listReservations": ("reservations:list", 200, lambda api, key, ctx: api.k(key, "GET", "/v1/reservations")),
    "getReservation": ("reservations:list", 200, lambda api, key, ctx: api.k(
        key, "GET", f"/v1/reservations/{ctx['reservation']}")),
    "getBalances": ("balances:read", 200, lambda api, key, ctx: api.k(key, "GET", "/v1/balances?tenant=acme")),
    "listBudgets": ("budgets:read", 200, lambda api, key, ctx: api.k(key, "GET", "/v1/admin/budgets")),
    "lookupBudget": ("budgets:read", 200, lambda api, key, ctx: api.k(
        key, "GET", f"/v1/admin/budgets/lookup?scope=tenant:acme&unit={USD}")),
    "createBudget": ("budgets:write", 201, lambda api, key, ctx: api.k(
        key, "POST", "/v1/admin/budgets",
        json={"scope": f"tenant:acme/workspace:w{uuid.uuid4().hex[:8]}", "unit": USD,
              "allocated": {"unit": USD, "amount": 10}})),
    "fundBudget": ("budgets:write", 200, lambda api, key, ctx: api.k(
        key, "POST", f"/v1/admin/budgets/fund?scope=tenant:acme&unit={USD}",
        json={"operation": "CREDIT", "amount": {"unit": USD, "amount": 1}})),
    "listTenantWebhooks": ("webhooks:read", 200, lambda api, key, ctx: api.k(key, "GET", "/v1/webhooks")),
    "getTenantWebhook": ("webhooks:read", 200, lambda api, key, ctx: api.k(key, "GET", f"/v1/webhooks/{ctx['hook']}")),
    "createTenantWebhook": ("webhooks:write", 201, lambda api, key, ctx: api.k(
        key, "POST", "/v1/webhooks", json={"url": HOOK_URL, "event_types": ["budget.exhausted"]})),
    "updateTenantWebhook": ("webhooks:write", 200, lambda api, key, ctx: api.k(
        key, "PATCH", f"/v1/webhooks/{ctx['hook']}", json={"description": uuid.uuid4().hex})),
    "listTenantEvents": ("events:read", 200, lambda api, key, ctx: api.k(key, "GET", "/v1/events")),
    "listActionQuotaCounters": ("action_quotas:read", 200, lambda api, key, ctx: api.k(
        key, "GET", "/v1/admin/action-quota-counters")),
    "listPolicies": ("policies:read", 200, lambda api, key, ctx: api.k(key, "GET", "/v1/admin/policies")),
    "getPolicy": ("policies:read", 200, lambda api, key, ctx: api.k(key, "GET", f"/v1/admin/policies/{ctx['policy']}")),
    "createPolicy": ("policies:write", 201, lambda api, key, ctx: api.k(
        key, "POST", "/v1/admin/policies", json={"name": uuid.uuid4().hex, "scope_pattern": "tenant:acme/*"})),
    "updatePolicy": ("policies:write", 200, lambda api, key, ctx: api.k(
        key, "PATCH", f"/v1/admin/policies/{ctx['policy']}", json={"description": uuid.uuid4().hex})),
}  # fmt: skip
#: The action-kinds spec's deprecated fallback (v0.1.26 only): balances:read also reads quota counters.
FALLBACKS = {"balances:read": {"listActionQuotaCounters"}}

READS = {"getBalances", "listBudgets", "lookupBudget", "listTenantWebhooks", "getTenantWebhook", "listTenantEvents",
         "listReservations", "getReservation", "listActionQuotaCounters", "listPolicies", "getPolicy"}  # fmt: skip
WRITES = {"createReservation", "decide", "createEvent", "commitReservation", "releaseReservation",
          "extendReservation", "createBudget", "fundBudget", "createTenantWebhook", "updateTenantWebhook",
          "createPolicy", "updatePolicy"}  # fmt: skip


@pytest.fixture
def ctx(api: Api) -> dict[str, str]:
    api.tenant("acme")
    api.budget("tenant:acme", 10**9)
    allow_loopback(api)
    full = api.key("acme", permissions=sorted({perm for perm, _, _ in OPERATIONS.values()}))
    hook = api.k(full, "POST", "/v1/webhooks", json={"url": HOOK_URL, "event_types": ["budget.exhausted"]})
    assert hook.status_code == 201, hook.text
    policy = api.a("POST", "/v1/admin/policies", json={"tenant_id": "acme", "name": "p", "scope_pattern": "agent:*"})
    assert policy.status_code == 201, policy.text
    out = {"full": full, "hook": hook.json()["subscription"]["subscription_id"], "policy": policy.json()["policy_id"]}
    out["reservation"] = _held(api, out)
    return out


def _allowed(api: Api, ctx: dict[str, str], permissions: list[str]) -> set[str]:
    key = api.key("acme", permissions=permissions)
    allowed = set()
    for name, (_, ok, call) in OPERATIONS.items():
        r = call(api, key, ctx)
        assert r.status_code in (ok, 403), (permissions, name, r.status_code, r.text)
        if r.status_code == ok:
            allowed.add(name)
    return allowed


def test_each_permission_allows_exactly_its_operations(api: Api, ctx: dict[str, str]) -> None:
    for permission in sorted({perm for perm, _, _ in OPERATIONS.values()}):
        expected = {name for name, (perm, _, _) in OPERATIONS.items() if perm == permission}
        expected |= FALLBACKS.get(permission, set())
        assert _allowed(api, ctx, [permission]) == expected, permission


def test_admin_wildcards_allow_reads_or_writes(api: Api, ctx: dict[str, str]) -> None:
    assert _allowed(api, ctx, ["admin:read"]) == READS
    assert _allowed(api, ctx, ["admin:write"]) == WRITES
    assert _allowed(api, ctx, ["admin:budgets:read"]) == {"listBudgets", "lookupBudget"}
    assert _allowed(api, ctx, ["admin:policies:read"]) == {"listPolicies", "getPolicy"}
    assert _allowed(api, ctx, ["admin:policies:write"]) == {"createPolicy", "updatePolicy"}


def test_workspace_key_sees_nothing_outside_its_workspace_on_the_operator_paths(api: Api) -> None:
    api.tenant("acme")
    api.budget("tenant:acme", 10**10)
    for scope in ("tenant:acme/workspace:prod", "tenant:acme/workspace:dev"):
        api.budget(scope, 10**9)
    full = api.key("acme")
    for workspace in ("prod", "dev"):  # 90% of each workspace: threshold events in both
        assert api.reserve(full, {"tenant": "acme", "workspace": workspace}, 9 * 10**8).status_code == 200
    perms = ["budgets:read", "budgets:write", "events:read", "balances:read"]
    prod = api.key("acme", permissions=perms, scope_filter=["workspace:prod"])
    ledgers = api.k(prod, "GET", "/v1/admin/budgets").json()["ledgers"]
    assert [x["scope"] for x in ledgers] == ["tenant:acme/workspace:prod"]
    cases = (("tenant:acme/workspace:dev", 403), ("tenant:acme", 403), ("tenant:acme/workspace:prod", 200))
    for scope, status in cases:
        assert api.k(prod, "GET", f"/v1/admin/budgets/lookup?scope={scope}&unit={USD}").status_code == status
        fund = api.k(prod, "POST", f"/v1/admin/budgets/fund?scope={scope}&unit={USD}",
                     json={"operation": "CREDIT", "amount": {"unit": USD, "amount": 1}})  # fmt: skip
        assert fund.status_code == status
    scopes = {e.get("scope") for e in api.k(prod, "GET", "/v1/events?limit=100").json()["events"]}
    assert scopes and all(str(s).startswith("tenant:acme/workspace:prod") for s in scopes)
    everything = {e.get("scope") for e in api.a("GET", "/v1/admin/events?tenant_id=acme&limit=100").json()["events"]}
    assert "tenant:acme/workspace:dev" in everything  # there was something to hide
