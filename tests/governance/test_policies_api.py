"""/v1/admin/policies over HTTP on memory, SQLite and Redis: both auths as the spec says, its error
codes, cursor paging and filters, audit entries with before/after, policy.* events, and the
policies enforced on the runtime plane. Every response is checked against the admin spec (the
extensions' Policy fields folded in); getPolicy, which only the extensions name, against Policy."""

from __future__ import annotations

import uuid
from typing import Any

import httpx

from .conftest import Api
from .spec import admin_validator

USD = "USD_MICROCENTS"


def _create(api: Api, **body: Any) -> dict[str, Any]:
    r = api.a("POST", "/v1/admin/policies", json={"tenant_id": "acme", **body})
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def _audit(api: Api, request_id: str) -> dict[str, Any]:
    logs = api.a("GET", f"/v1/admin/audit/logs?request_id={request_id}").json()["logs"]
    assert len(logs) == 1, logs
    return logs[0]  # type: ignore[no-any-return]


def test_admin_creates_on_behalf_of_a_tenant_and_the_tenant_key_for_itself(api: Api) -> None:
    api.tenant("acme")
    body = {
        "name": "eng",
        "scope_pattern": "tenant:acme/workspace:eng/*",
        "priority": 10,
        "caps": {"max_tokens": 4096},
        "rate_limits": {"max_reservations_per_minute": 100},
    }
    assert api.a("POST", "/v1/admin/policies", json=body).status_code == 400  # tenant_id required (admin)
    r = api.a("POST", "/v1/admin/policies", json={"tenant_id": "acme", **body})
    assert r.status_code == 201
    created = r.json()
    assert created["policy_id"].startswith("pol_") and created["status"] == "ACTIVE"
    assert created["action_quotas"] == [] and created["denied_action_kinds"] == []  # always present
    entry = _audit(api, r.headers["x-request-id"])
    assert entry["operation"] == "createPolicy" and entry["resource_id"] == created["policy_id"]
    assert entry["metadata"]["after"] == created and entry["metadata"]["target_tenant_id"] == "acme"

    key = api.key("acme", permissions=["policies:read", "policies:write"])
    assert api.k(key, "POST", "/v1/admin/policies", json={"tenant_id": "acme", **body}).status_code == 400
    r = api.k(key, "POST", "/v1/admin/policies", json={**body, "name": "mine"})
    assert r.status_code == 201
    assert api.k(key, "POST", "/v1/admin/policies", json={**body, "name": "mine"}).json()["error"] == (
        "DUPLICATE_RESOURCE"
    )


def test_bad_bodies_are_400_and_write_nothing(api: Api) -> None:
    api.tenant("acme")
    bad = [
        {"name": "x", "scope_pattern": "tenant:other/*"},  # another tenant
        {"name": "x", "scope_pattern": "planet:*"},  # no such level
        {"name": "x", "scope_pattern": "tenant:acme/**"},
        {"name": "x"},  # scope_pattern required
        {"name": "x", "scope_pattern": "*", "priority": -1},
        {"name": "x", "scope_pattern": "*", "allowed_action_kinds": ["a"], "denied_action_kinds": ["b"]},
        {"name": "x", "scope_pattern": "*", "action_quotas": [{"action_kind": "http.post", "max_calls": 1}]},
        {
            "name": "x",
            "scope_pattern": "*",
            "risk_class_quotas": [{"risk_class": "nope", "max_calls": 1, "window": "per_run"}],
        },
        {"name": "x", "scope_pattern": "*", "reservation_ttl_override": {"max_ttl_ms": 10}},
        {
            "name": "x",
            "scope_pattern": "*",
            "effective_from": "2026-02-01T00:00:00Z",
            "effective_until": "2026-01-01T00:00:00Z",
        },
        {"name": "x", "scope_pattern": "*", "status": "ACTIVE"},  # not a create field
        {"name": "x", "scope_pattern": "*", "surprise": 1},
    ]
    for body in bad:
        r = api.a("POST", "/v1/admin/policies", json={"tenant_id": "acme", **body})
        assert (r.status_code, r.json()["error"]) == (400, "INVALID_REQUEST"), (body, r.text)
    assert api.a("GET", "/v1/admin/policies?tenant_id=acme").json()["policies"] == []


def test_list_filters_and_cursor_pages_within_one_tenant(api: Api) -> None:
    api.tenant("acme")
    api.tenant("rival")
    made = [_create(api, name=f"p{i}", scope_pattern="*", priority=i) for i in range(5)]
    _create(
        api,
        name="quota",
        scope_pattern="agent:*",
        action_quotas=[{"action_kind": "payment.charge", "max_calls": 1, "window": "per_day_tumbling"}],
    )
    disabled = _create(api, name="off", scope_pattern="tenant:acme")
    api.a("PATCH", f"/v1/admin/policies/{disabled['policy_id']}", json={"status": "DISABLED"})
    r = api.a("POST", "/v1/admin/policies", json={"tenant_id": "rival", "name": "r", "scope_pattern": "*"})
    assert r.status_code == 201
    assert api.a("GET", "/v1/admin/policies").status_code == 400  # tenant_id required with the admin key
    seen, cursor = [], None
    while True:
        page = api.a("GET", "/v1/admin/policies", params={"tenant_id": "acme", "limit": 3, "cursor": cursor}).json()
        seen += [p["name"] for p in page["policies"]]
        if not page["has_more"]:
            break
        cursor = page["next_cursor"]
    assert sorted(seen) == sorted([p["name"] for p in made] + ["quota", "off"]) and len(seen) == 7

    def q(**f: str) -> list[str]:
        page = api.a("GET", "/v1/admin/policies", params={"tenant_id": "acme", **f}).json()
        return sorted(p["name"] for p in page["policies"])

    assert q(status="DISABLED") == ["off"]
    assert q(has_action_quotas="true") == ["quota"]
    assert q(references_action_kind="payment.charge") == ["quota"]
    assert q(scope_pattern="agent:*") == ["quota"]
    assert api.a("GET", "/v1/admin/policies?tenant_id=acme&status=MAYBE").status_code == 400
    key = api.key("rival", permissions=["policies:read"])
    mine = api.k(key, "GET", "/v1/admin/policies?tenant_id=acme").json()["policies"]  # tenant_id ignored
    assert [p["name"] for p in mine] == ["r"]


def test_get_and_patch_pin_the_owner_audit_before_after_and_emit_changed_fields(api: Api) -> None:
    api.tenant("acme")
    api.tenant("rival")
    pid = _create(api, name="base", scope_pattern="tenant:acme/*", caps={"max_tokens": 10})["policy_id"]
    got = api.a("GET", f"/v1/admin/policies/{pid}")
    assert got.status_code == 200 and not list(admin_validator("Policy").iter_errors(got.json()))
    r = api.a(
        "PATCH", f"/v1/admin/policies/{pid}", json={"priority": 7, "denied_action_kinds": ["code.exec"], "name": "base"}
    )
    assert r.status_code == 200 and r.json()["priority"] == 7
    entry = _audit(api, r.headers["x-request-id"])
    assert entry["operation"] == "updatePolicy"
    assert entry["metadata"]["before"]["priority"] == 0 and entry["metadata"]["after"]["priority"] == 7
    events = api.a("GET", "/v1/admin/events?event_type=policy.updated&tenant_id=acme").json()["events"]
    assert events[0]["data"]["changed_fields"] == ["priority", "denied_action_kinds"]
    assert api.a("PATCH", f"/v1/admin/policies/{pid}", json={"scope_pattern": "*"}).status_code == 400  # immutable
    assert api.a("PATCH", "/v1/admin/policies/pol_nope", json={"priority": 1}).status_code == 404
    rival = api.key("rival", permissions=["policies:read", "policies:write"])
    assert api.k(rival, "GET", f"/v1/admin/policies/{pid}").status_code == 404  # another tenant's: not there
    assert api.k(rival, "PATCH", f"/v1/admin/policies/{pid}", json={"priority": 1}).status_code == 404
    reader = api.key("acme", permissions=["policies:read"])
    assert api.k(reader, "PATCH", f"/v1/admin/policies/{pid}", json={"priority": 1}).status_code == 403
    assert api.a("PATCH", "/v1/admin/tenants/acme", json={"status": "CLOSED"}).status_code == 200
    closed = api.a("PATCH", f"/v1/admin/policies/{pid}", json={"priority": 1})
    assert (closed.status_code, closed.json()["error"]) == (409, "TENANT_CLOSED")
    assert api.a("GET", f"/v1/admin/policies/{pid}").json()["priority"] == 7


def test_a_scope_filtered_key_writes_only_literal_patterns_inside_its_filter(api: Api) -> None:
    api.tenant("acme")
    key = api.key("acme", permissions=["policies:read", "policies:write"], scope_filter=["workspace:eng"])
    for pattern, status in (
        ("agent:*", 403),
        ("*", 403),
        ("tenant:acme/workspace:ops/*", 403),
        ("tenant:acme/workspace:eng/*", 201),
        ("tenant:acme/workspace:eng", 201),
    ):
        r = api.k(key, "POST", "/v1/admin/policies", json={"name": pattern, "scope_pattern": pattern})
        assert r.status_code == status, (pattern, r.text)
    _create(api, name="wide", scope_pattern="*")
    names = sorted(p["name"] for p in api.k(key, "GET", "/v1/admin/policies").json()["policies"])
    assert names == ["tenant:acme/workspace:eng", "tenant:acme/workspace:eng/*"]


def test_the_runtime_plane_enforces_what_the_operator_set(api: Api) -> None:
    api.tenant("acme")
    api.budget("tenant:acme", 10**9)
    key = api.key("acme")
    pid = _create(
        api,
        name="guard",
        scope_pattern="agent:*",
        denied_action_kinds=["llm"],
        rate_limits={"max_reservations_per_minute": 1},
    )["policy_id"]
    r = api.reserve(key, {"tenant": "acme", "agent": "a"}, 1)
    assert (r.status_code, r.json()["error"]) == (409, "ACTION_KIND_DENIED")
    api.a("PATCH", f"/v1/admin/policies/{pid}", json={"denied_action_kinds": []})
    assert api.reserve(key, {"tenant": "acme", "agent": "a"}, 1).status_code == 200
    body = {
        "idempotency_key": uuid.uuid4().hex,
        "subject": {"tenant": "acme", "agent": "a"},
        "action": {"kind": "llm", "name": "m"},
        "estimate": {"unit": USD, "amount": 1},
    }
    # 429 is the protocol's throttling answer (ERROR SEMANTICS), which createReservation does not
    # list among its responses: checked here, not by the spec validator.
    url = str(api.http.base_url).rstrip("/") + "/v1/reservations"
    limited = httpx.post(url, json=body, headers={"X-Cycles-API-Key": key})
    assert (limited.status_code, limited.json()["error"]) == (429, "LIMIT_EXCEEDED")
    assert int(limited.headers["retry-after"]) >= 1 and limited.headers["x-ratelimit-reset"]
    assert api.reserve(key, {"tenant": "acme"}, 1).status_code == 200  # outside the pattern
