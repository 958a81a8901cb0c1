"""Tenants, API keys with permissions / scope filters / expiry, auth validate and introspect, the
audit trail and the events of those operations, on memory, SQLite and Redis, over real HTTP."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from .conftest import Api

RUNTIME = {
    "reservations:create": ("POST", "/v1/reservations"),
    "balances:read": ("GET", "/v1/balances?tenant=acme"),
    "reservations:list": ("GET", "/v1/reservations"),
}


def test_tenant_crud_idempotency_and_errors(api: Api) -> None:
    t = api.tenant("acme")
    assert t["status"] == "ACTIVE" and t["tenant_id"] == "acme"
    again = api.a("POST", "/v1/admin/tenants", json={"tenant_id": "acme", "name": "Acme"})
    assert again.status_code == 200 and again.json() == t  # a retried create returns the tenant
    clash = api.a("POST", "/v1/admin/tenants", json={"tenant_id": "acme", "name": "Other"})
    assert clash.status_code == 409 and clash.json()["error"] == "DUPLICATE_RESOURCE"
    assert api.a("POST", "/v1/admin/tenants", json={"tenant_id": "Bad_Id", "name": "x"}).status_code == 400
    missing = api.a("GET", "/v1/admin/tenants/nope")
    assert missing.status_code == 404 and missing.json()["error"] == "TENANT_NOT_FOUND"
    for name in ("bbb", "ccc", "ddd"):
        api.tenant(name)
    first = api.a("GET", "/v1/admin/tenants?limit=2").json()
    assert [x["tenant_id"] for x in first["tenants"]] == ["acme", "bbb"] and first["has_more"]
    rest = api.a("GET", f"/v1/admin/tenants?limit=2&cursor={first['next_cursor']}").json()
    assert [x["tenant_id"] for x in rest["tenants"]] == ["ccc", "ddd"] and not rest["has_more"]
    patched = api.a("PATCH", "/v1/admin/tenants/bbb", json={"name": "B Corp", "default_reservation_ttl_ms": 5000})
    assert patched.status_code == 200 and patched.json()["name"] == "B Corp"
    assert api.a("GET", "/v1/admin/tenants?search=b%20corp").json()["tenants"][0]["tenant_id"] == "bbb"


def test_suspend_blocks_new_reservations_and_close_cascades(api: Api) -> None:
    api.tenant("acme")
    api.budget("tenant:acme", 1_000_000)
    key = api.key("acme")
    held = api.reserve(key, {"tenant": "acme"}, 100)
    assert held.status_code == 200 and held.json()["decision"] == "ALLOW"
    rid = held.json()["reservation_id"]

    assert api.a("PATCH", "/v1/admin/tenants/acme", json={"status": "SUSPENDED"}).json()["status"] == "SUSPENDED"
    assert api.reserve(key, {"tenant": "acme"}, 100).status_code == 403
    commit = api.k(key, "POST", f"/v1/reservations/{rid}/commit",
                   json={"idempotency_key": "c1", "actual": {"unit": "USD_MICROCENTS", "amount": 50}})  # fmt: skip
    assert commit.status_code == 200  # existing reservations may still settle
    api.a("PATCH", "/v1/admin/tenants/acme", json={"status": "ACTIVE"})
    assert api.reserve(key, {"tenant": "acme"}, 100).status_code == 200

    open_one = api.reserve(key, {"tenant": "acme"}, 300)
    assert open_one.status_code == 200
    closed = api.a("PATCH", "/v1/admin/tenants/acme", json={"status": "CLOSED"})
    assert closed.status_code == 200 and closed.json()["status"] == "CLOSED" and "closed_at" in closed.json()
    # keys revoked by the cascade: the runtime refuses the key
    assert api.reserve(key, {"tenant": "acme"}, 1).status_code == 401
    # no mutation on a closed tenant's objects (Rule 2)
    reopen = api.a("PATCH", "/v1/admin/tenants/acme", json={"status": "ACTIVE"})
    assert reopen.status_code == 400  # closing is irreversible (updateTenant declares no 409)
    new_key = api.a("POST", "/v1/admin/api-keys", json={"tenant_id": "acme", "name": "late"})
    assert new_key.status_code == 409 and new_key.json()["error"] == "TENANT_CLOSED"
    # one audit entry and one event per cascaded object, under the close's correlation id
    logs = api.a(
        "GET", "/v1/admin/audit/logs?operation=budget.closed_via_tenant_cascade,api_key.revoked_via_tenant_cascade"
    )
    kinds = sorted(x["operation"] for x in logs.json()["logs"])
    assert kinds == ["api_key.revoked_via_tenant_cascade", "budget.closed_via_tenant_cascade"]
    events = api.a("GET", "/v1/admin/events?correlation_id=tenant_close:acme").json()["events"]
    assert {e["event_type"] for e in events} == {
        "budget.closed_via_tenant_cascade",
        "api_key.revoked_via_tenant_cascade",
        "reservation.released_via_tenant_cascade",
    }
    # re-closing completes nothing new and writes no duplicates
    assert api.a("PATCH", "/v1/admin/tenants/acme", json={"status": "CLOSED"}).status_code == 200
    again = api.a("GET", "/v1/admin/events?correlation_id=tenant_close:acme").json()["events"]
    assert len(again) == len(events)
    budget = api.a("GET", "/admin/budgets/tenant:acme").json()
    assert budget["scope"] == "tenant:acme" and budget["reserved"]["amount"] == 0  # the drain released it
    listed = api.a("GET", "/v1/reservations?tenant=acme&status=ACTIVE").json()["reservations"]
    assert listed == []


def test_keys_secret_once_hashed_validate_revoke_expire(api: Api) -> None:
    api.tenant("acme")
    created = api.a(
        "POST",
        "/v1/admin/api-keys",
        json={"tenant_id": "acme", "name": "ci", "permissions": ["balances:read"], "scope_filter": ["workspace:prod"]},
    )
    assert created.status_code == 201
    body = created.json()
    secret, key_id = body["key_secret"], body["key_id"]
    assert body["permissions"] == ["balances:read"] and secret.startswith(body["key_prefix"])
    listed = api.a("GET", "/v1/admin/api-keys?tenant_id=acme").json()["keys"]
    assert [k["key_id"] for k in listed] == [key_id] and secret not in str(listed)
    assert listed[0]["scope_filter"] == ["workspace:prod"] and listed[0]["status"] == "ACTIVE"

    valid = api.a("POST", "/v1/auth/validate", json={"key_secret": secret}).json()
    assert valid["valid"] and valid["tenant_id"] == "acme" and valid["scope_filter"] == ["workspace:prod"]
    bogus = api.a("POST", "/v1/auth/validate", json={"key_secret": "cyc_" + "0" * 16 + "_" + "0" * 64}).json()
    assert bogus["valid"] is False

    revoked = api.a("DELETE", f"/v1/admin/api-keys/{key_id}?reason=rotated")
    assert revoked.status_code == 200 and revoked.json()["status"] == "REVOKED"
    assert revoked.json()["revoked_reason"] == "rotated"
    assert api.a("POST", "/v1/auth/validate", json={"key_secret": secret}).json()["reason"] == "REVOKED"
    assert api.k(secret, "GET", "/v1/balances?tenant=acme").status_code == 401

    soon = (datetime.now(UTC) + timedelta(seconds=1)).isoformat()
    short = api.key("acme", expires_at=soon)
    assert api.k(short, "GET", "/v1/balances?tenant=acme").status_code == 200
    time.sleep(1.1)
    assert api.k(short, "GET", "/v1/balances?tenant=acme").status_code == 401
    assert api.a("POST", "/v1/auth/validate", json={"key_secret": short}).json()["reason"] == "EXPIRED"
    past = (datetime.now(UTC) - timedelta(seconds=5)).isoformat()
    assert (
        api.a("POST", "/v1/admin/api-keys", json={"tenant_id": "acme", "name": "x", "expires_at": past}).status_code
        == 400
    )
    assert api.a("POST", "/v1/admin/api-keys", json={"tenant_id": "ghost", "name": "x"}).status_code == 400


def test_permission_matrix(api: Api) -> None:
    """Each permission allows exactly its operations."""
    api.tenant("acme")
    api.budget("tenant:acme", 10**9)
    for perm in RUNTIME:
        key = api.key("acme", permissions=[perm])
        for other, (method, path) in RUNTIME.items():
            if method == "POST":
                r = api.reserve(key, {"tenant": "acme"}, 1)
            else:
                r = api.k(key, method, path)
            if other == perm:
                assert r.status_code == 200, (perm, other, r.text)
            else:
                assert r.status_code == 403, (perm, other, r.text)
    # events:read is opt-in: the default set does not include it
    default = api.key("acme")
    denied = api.k(default, "GET", "/v1/events")
    assert denied.status_code == 403 and denied.json()["error"] == "INSUFFICIENT_PERMISSIONS"
    reader = api.key("acme", permissions=["events:read"])
    assert api.k(reader, "GET", "/v1/events").status_code == 200


def test_scope_filtered_key_sees_only_its_workspace(api: Api) -> None:
    api.tenant("acme")
    for scope in ("tenant:acme", "tenant:acme/workspace:prod", "tenant:acme/workspace:dev"):
        api.budget(scope, 10**9)
    full = api.key("acme")
    prod = api.key("acme", scope_filter=["workspace:prod"])
    assert api.reserve(prod, {"tenant": "acme", "workspace": "dev"}, 1).status_code == 403
    assert api.reserve(prod, {"tenant": "acme"}, 1).status_code == 403
    mine = api.reserve(prod, {"tenant": "acme", "workspace": "prod"}, 1)
    assert mine.status_code == 200
    theirs = api.reserve(full, {"tenant": "acme", "workspace": "dev"}, 1).json()["reservation_id"]
    scopes = [
        b["scope"] for b in api.k(prod, "GET", "/v1/balances?tenant=acme&include_children=true").json()["balances"]
    ]
    assert scopes == ["tenant:acme/workspace:prod"]
    listed = api.k(prod, "GET", "/v1/reservations").json()["reservations"]
    assert [r["reservation_id"] for r in listed] == [mine.json()["reservation_id"]]
    assert api.k(prod, "GET", f"/v1/reservations/{theirs}").status_code == 404
    release = api.k(prod, "POST", f"/v1/reservations/{theirs}/release", json={"idempotency_key": "r1"})
    assert release.status_code == 404
    bad = api.a("POST", "/v1/admin/api-keys", json={"tenant_id": "acme", "name": "x", "scope_filter": ["team:x"]})
    assert bad.status_code == 400


def test_introspect_admin_and_tenant(api: Api) -> None:
    api.tenant("acme")
    admin = api.a("GET", "/v1/auth/introspect").json()
    assert admin["auth_type"] == "admin" and admin["permissions"] == ["*"] and all(admin["capabilities"].values())
    key = api.key("acme", permissions=["balances:read", "events:read", "admin:read"], scope_filter=["workspace:w"])
    me = api.k(key, "GET", "/v1/auth/introspect").json()
    assert me["auth_type"] == "tenant" and me["tenant_id"] == "acme" and me["scope_filter"] == ["workspace:w"]
    caps = me["capabilities"]
    assert caps["view_events"] and caps["view_budgets"] and not caps["manage_budgets"]
    assert not caps["view_audit"] and not caps["view_tenants"]  # admin-plane capabilities never for tenant keys


def test_every_mutating_call_is_audited_with_request_id(api: Api) -> None:
    calls = [
        api.a("POST", "/v1/admin/tenants", json={"tenant_id": "acme", "name": "Acme"}),
        api.a("PATCH", "/v1/admin/tenants/acme", json={"name": "Acme Inc"}),
        api.a("POST", "/v1/admin/api-keys", json={"tenant_id": "acme", "name": "k"}),
        api.a("POST", "/admin/budgets", json={"scope": "tenant:acme", "amount": {"unit": "TOKENS", "amount": 5}}),
        api.a("POST", "/admin/budgets/fund", json={"scope": "tenant:acme", "amount": {"unit": "TOKENS", "amount": 5}}),
        api.a("PATCH", "/v1/admin/tenants/nope", json={"name": "x"}),  # a failure is audited too
    ]
    key_id = calls[2].json()["key_id"]
    calls.append(api.a("DELETE", f"/v1/admin/api-keys/{key_id}"))
    logs = api.a("GET", "/v1/admin/audit/logs?limit=100").json()["logs"]
    by_request = {x["request_id"]: x for x in logs}
    for response in calls:
        entry = by_request[response.headers["x-request-id"]]
        assert entry["status"] == response.status_code
        assert entry["tenant_id"] == "__admin__" and entry["trace_id"] == response.headers["x-cycles-trace-id"]
    updated = by_request[calls[1].headers["x-request-id"]]
    assert updated["operation"] == "updateTenant" and updated["resource_id"] == "acme"
    assert updated["metadata"]["before"]["name"] == "Acme" and updated["metadata"]["after"]["name"] == "Acme Inc"
    failed = by_request[calls[5].headers["x-request-id"]]
    assert failed["status"] == 404 and failed["error_code"] == "TENANT_NOT_FOUND"
    assert [x["operation"] for x in api.a("GET", "/v1/admin/audit/logs?status_min=400").json()["logs"]] == [
        "updateTenant"
    ]
    revoke = api.a("GET", f"/v1/admin/audit/logs?resource_id={key_id}&operation=revokeApiKey").json()["logs"]
    assert revoke[0]["metadata"]["after"]["status"] == "REVOKED"


def test_lifecycle_events_listed_filtered_and_paged(api: Api) -> None:
    api.tenant("acme")
    api.tenant("globex")
    api.key("acme")
    api.a("PATCH", "/v1/admin/tenants/globex", json={"status": "SUSPENDED"})
    events = api.a("GET", "/v1/admin/events").json()["events"]
    types = [e["event_type"] for e in events]
    assert types == ["tenant.suspended", "api_key.created", "tenant.created", "tenant.created"]
    acme = api.a("GET", "/v1/admin/events?tenant_id=acme&category=tenant").json()["events"]
    assert [e["event_type"] for e in acme] == ["tenant.created"]
    page = api.a("GET", "/v1/admin/events?limit=3&sort_dir=asc").json()
    assert page["has_more"] and len(page["events"]) == 3
    tail = api.a("GET", f"/v1/admin/events?limit=3&sort_dir=asc&cursor={page['next_cursor']}").json()
    assert [e["event_type"] for e in tail["events"]] == ["tenant.suspended"]
    one = api.a("GET", f"/v1/admin/events/{events[0]['event_id']}")
    assert one.json() == events[0]
    assert api.a("GET", "/v1/admin/events/evt_missing").json()["error"] == "EVENT_NOT_FOUND"
    reader = api.key("acme", permissions=["events:read"])
    mine = api.k(reader, "GET", "/v1/events").json()["events"]
    assert {e["tenant_id"] for e in mine} == {"acme"} and "api_key.created" not in {e["event_type"] for e in mine}


def test_tenant_bulk_action(api: Api) -> None:
    for t in ("aaa", "bbb", "ccc"):
        api.tenant(t)
    api.a("PATCH", "/v1/admin/tenants/ccc", json={"status": "SUSPENDED"})
    body = {"filter": {"status": "ACTIVE"}, "action": "SUSPEND", "idempotency_key": "b1"}
    mismatch = api.a("POST", "/v1/admin/tenants/bulk-action", json={**body, "expected_count": 3})
    assert mismatch.status_code == 409 and mismatch.json()["error"] == "COUNT_MISMATCH"
    done = api.a("POST", "/v1/admin/tenants/bulk-action", json={**body, "expected_count": 2}).json()
    assert done["total_matched"] == 2 and sorted(r["id"] for r in done["succeeded"]) == ["aaa", "bbb"]
    statuses = {t["tenant_id"]: t["status"] for t in api.a("GET", "/v1/admin/tenants").json()["tenants"]}
    assert statuses == {"aaa": "SUSPENDED", "bbb": "SUSPENDED", "ccc": "SUSPENDED"}
    again = api.a("POST", "/v1/admin/tenants/bulk-action", json={"filter": {"search": "a"}, "action": "SUSPEND",
                                                                 "idempotency_key": "b2"}).json()  # fmt: skip
    assert again["skipped"] == [{"id": "aaa", "reason": "already SUSPENDED"}]
    assert len(api.a("GET", "/v1/admin/events?event_type=tenant.suspended").json()["events"]) == 3
