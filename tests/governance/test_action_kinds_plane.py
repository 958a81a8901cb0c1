"""The action-kinds spec's endpoints on ``cycles serve`` (memory, SQLite and Redis behind a real
server): the public registry, the quota counters and their reset, who may call what, and the
audit/event trail of a reset. Every response goes through ``Api``, which holds it to the action-kinds
spec (status declared, body valid against its schema, correlation headers)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from cycles.action_kinds import etag
from cycles.server.governance.action_kinds import PUBLIC_PER_MINUTE

from .conftest import Api
from .spec import schema_validator

USD = "USD_MICROCENTS"
COUNTERS = "/v1/admin/action-quota-counters"


def _quota(api: Api, scope: str, **quota: Any) -> None:
    r = api.a("POST", "/admin/policies", json={"scope": scope, "set_quota": quota})
    assert r.status_code == 200, r.text


def _email(api: Api, key: str, run_id: str, tenant: str = "acme") -> httpx.Response:
    subject = {"tenant": tenant, "dimensions": {"run_id": run_id}}
    return api.reserve(key, subject, 1, {"kind": "message.email.send", "name": "smtp"})


@pytest.fixture
def acme(api: Api) -> dict[str, str]:
    """Tenants acme and acme-corp (a name acme's is a prefix of), each with counters."""
    keys = {}
    for tenant in ("acme", "acme-corp"):
        api.tenant(tenant)
        api.budget(f"tenant:{tenant}", 10**9)
        _quota(api, f"tenant:{tenant}", action_kind="message.email.send", max_calls=3, window="per_run")
        _quota(api, f"tenant:{tenant}", risk_class="external_side_effect", max_calls=100, window="per_hour_tumbling")
        keys[tenant] = api.key(tenant)
    for run_id, n in (("run-1", 2), ("run-2", 1)):
        for _ in range(n):
            assert _email(api, keys["acme"], run_id).status_code == 200
    assert _email(api, keys["acme-corp"], "run-1", tenant="acme-corp").status_code == 200
    return keys


def _counters(r: httpx.Response) -> list[tuple[str, str, str, int, int]]:
    assert r.status_code == 200, r.text
    return [
        (c["action_kind"], c.get("risk_class", ""), c.get("window_key", ""), c["used"], c["limit"])
        for c in r.json()["counters"]
    ]


# ---- the registry ---------------------------------------------------------------------------


def test_the_registry_is_public_paged_filtered_and_cacheable(api: Api) -> None:
    first = api.http.get("/v1/action-kinds")
    assert first.status_code == 200 and first.json()["version"] == "0.1.26"
    assert first.headers["etag"] == etag()
    kinds = [k["kind"] for k in first.json()["kinds"]]
    cursor = first.json().get("next_cursor")
    while cursor:
        page = api.http.get("/v1/action-kinds", params={"cursor": cursor})
        kinds += [k["kind"] for k in page.json()["kinds"]]
        cursor = page.json().get("next_cursor")
    assert len(kinds) == len(set(kinds)) == 62 and kinds[-1] == "unknown.call"
    high = api.http.get("/v1/action-kinds", params={"risk_class": "high_risk", "limit": 100}).json()
    assert {k["kind"] for k in high["kinds"]} >= {"code.exec", "payment.charge"}
    assert all(k["risk_class"] == "high_risk" for k in high["kinds"]) and not high["has_more"]
    one = api.http.get("/v1/action-kinds/message.email.send").json()
    assert one["risk_class"] == "external_side_effect" and one["policy_key_spec"]["recipient_domain"] is True
    assert api.http.get("/v1/action-kinds/message.email").status_code == 404  # exact match only
    assert api.http.get("/v1/action-kinds", params={"risk_class": "scary"}).status_code == 400
    assert api.http.get("/v1/action-kinds", params={"limit": 101}).status_code == 400
    assert api.http.get("/v1/action-kinds", params={"cursor": "garbage"}).status_code == 400
    # 304 is not a status the spec declares for the operation, so it is checked here, not by Api
    with httpx.Client(base_url=str(api.http.base_url)) as raw:
        same = raw.get("/v1/action-kinds", headers={"If-None-Match": etag()})
    assert same.status_code == 304 and same.content == b"" and same.headers["etag"] == etag()


def test_the_public_registry_is_rate_limited_per_source_with_retry_after(api: Api) -> None:
    statuses = [api.http.get("/v1/action-kinds/llm.completion").status_code for _ in range(PUBLIC_PER_MINUTE + 5)]
    assert statuses[:PUBLIC_PER_MINUTE] == [200] * PUBLIC_PER_MINUTE
    limited = api.http.get("/v1/action-kinds")
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
    with httpx.Client(base_url=str(api.http.base_url)) as raw:  # cheap validation is never refused
        assert raw.get("/v1/action-kinds", headers={"If-None-Match": etag()}).status_code == 304


# ---- counters: who sees what ----------------------------------------------------------------


def test_the_admin_reads_one_named_tenant_and_must_name_it(api: Api, acme: dict[str, str]) -> None:
    missing = api.a("GET", COUNTERS)
    assert missing.status_code == 400 and missing.json()["details"]["missing_required_field"] == "tenant_id"
    assert _counters(api.a("GET", COUNTERS, params={"tenant_id": "acme"})) == [
        ("__risk__", "external_side_effect", _hour(api, "acme"), 3, 100),
        ("message.email.send", "", "run-1", 2, 3),
        ("message.email.send", "", "run-2", 1, 3),
    ]
    assert [c[2:4] for c in _counters(api.a("GET", COUNTERS, params={"tenant_id": "acme-corp"}))] == [
        (_hour(api, "acme-corp"), 1),
        ("run-1", 1),
    ]
    assert _counters(api.a("GET", COUNTERS, params={"tenant_id": "acm"})) == []  # not a prefix match


def _hour(api: Api, tenant: str) -> str:
    rows = api.a("GET", COUNTERS, params={"tenant_id": tenant, "action_kind": "__risk__"}).json()["counters"]
    return str(rows[0]["window_key"])


def test_filters_and_paging(api: Api, acme: dict[str, str]) -> None:
    def keys(**params: Any) -> list[str]:
        return [c[2] for c in _counters(api.a("GET", COUNTERS, params={"tenant_id": "acme", **params}))]

    assert keys(run_id="run-2") == ["run-2"]
    assert keys(window="per_run") == ["run-1", "run-2"]
    assert keys(action_kind="message.email.send", scope="tenant:acme") == ["run-1", "run-2"]
    assert keys(scope="tenant:acme/workspace:none") == []
    seen, cursor = [], None
    while True:
        page = api.a(
            "GET", COUNTERS, params={"tenant_id": "acme", "limit": 1, **({"cursor": cursor} if cursor else {})}
        )
        seen += [c[2] for c in _counters(page)]
        cursor = page.json().get("next_cursor")
        if not page.json()["has_more"]:
            break
    assert len(seen) == 3 and seen == keys()
    first = api.a("GET", COUNTERS, params={"tenant_id": "acme", "limit": 1}).json()["next_cursor"]
    other = api.a("GET", COUNTERS, params={"tenant_id": "acme", "window": "per_run", "cursor": first})
    assert other.status_code == 400  # a cursor is bound to its filters


def test_a_tenant_key_reads_only_its_own_tenant_with_action_quotas_read(api: Api, acme: dict[str, str]) -> None:
    reader = api.key("acme", permissions=["action_quotas:read"])
    own = api.k(reader, "GET", COUNTERS, params={"tenant_id": "acme-corp"})  # tenant_id is ignored for a key
    assert own.headers["x-cycles-tenant"] == "acme" and "x-cycles-permission-deprecated" not in own.headers
    assert [c[2] for c in _counters(own)] == [_hour(api, "acme"), "run-1", "run-2"]
    legacy = api.k(api.key("acme", permissions=["balances:read"]), "GET", COUNTERS)
    assert legacy.status_code == 200 and legacy.headers["x-cycles-permission-deprecated"] == "balances:read"
    wildcard = api.k(api.key("acme", permissions=["admin:read"]), "GET", COUNTERS)
    assert wildcard.status_code == 200 and "x-cycles-permission-deprecated" not in wildcard.headers
    for perms in (["budgets:read"], ["reservations:create"], ["policies:read"]):
        assert api.k(api.key("acme", permissions=perms), "GET", COUNTERS).status_code == 403, perms
    assert api.http.get(COUNTERS, params={"tenant_id": "acme"}).status_code == 401


def test_a_scope_filtered_key_sees_only_counters_inside_its_filter(api: Api, acme: dict[str, str]) -> None:
    _quota(api, "tenant:acme/workspace:ops", action_kind="http.post", max_calls=5, window="per_day_tumbling")
    r = api.reserve(acme["acme"], {"tenant": "acme", "workspace": "ops"}, 1, {"kind": "http.post", "name": "hook"})
    assert r.status_code == 200, r.text
    ops = api.key("acme", permissions=["action_quotas:read"], scope_filter=["workspace:ops"])
    rows = api.k(ops, "GET", COUNTERS).json()["counters"]
    assert [(c["scope"], c["action_kind"], c["used"]) for c in rows] == [("tenant:acme/workspace:ops", "http.post", 1)]


# ---- reset -----------------------------------------------------------------------------------


def test_reset_zeroes_one_counter_frees_the_quota_and_is_audited_and_announced(api: Api, acme: dict[str, str]) -> None:
    assert _email(api, acme["acme"], "run-1").status_code == 200  # 3 of 3
    assert _email(api, acme["acme"], "run-1").status_code == 409  # ACTION_QUOTA_EXCEEDED
    body = {
        "tenant_id": "acme",
        "scope": "tenant:acme",
        "action_kind": "message.email.send",
        "window": "per_run",
        "window_key": "run-1",
        "reason": "double-counted after incident 7",
    }
    r = api.a("POST", f"{COUNTERS}/reset", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["previous_used"] == 3
    assert (r.json()["counter"]["used"], r.json()["counter"]["remaining"]) == (0, 3)
    assert _email(api, acme["acme"], "run-1").status_code == 200  # headroom is back
    assert [c[2:4] for c in _counters(api.a("GET", COUNTERS, params={"tenant_id": "acme", "run_id": "run-1"}))] == [
        ("run-1", 1)
    ]
    events = api.a("GET", "/v1/admin/events", params={"tenant_id": "acme", "event_type": "quota.counter_reset"})
    (event,) = events.json()["events"]
    errors = list(
        schema_validator("cycles-protocol-extensions-v0.1.26.yaml", "EventDataQuotaCounterReset").iter_errors(
            event["data"]
        )
    )
    assert not errors, errors
    assert event["data"]["previous_used"] == 3 and event["data"]["reason"] == body["reason"]
    assert event["scope"] == "tenant:acme" and len(event["correlation_id"]) == 32
    logs = api.a("GET", "/v1/admin/audit/logs", params={"operation": "resetActionQuotaCounter"}).json()["logs"]
    assert [(x["status"], x["metadata"]["target_tenant_id"]) for x in logs] == [(200, "acme")]
    assert logs[0]["metadata"]["before"] == {"used": 3} and logs[0]["metadata"]["reason"] == body["reason"]


def test_reset_refusals(api: Api, acme: dict[str, str]) -> None:
    good = {"tenant_id": "acme", "scope": "tenant:acme", "action_kind": "message.email.send", "window": "per_run",
            "window_key": "run-2"}  # fmt: skip
    assert api.k(acme["acme"], "POST", f"{COUNTERS}/reset", json=good).status_code == 401  # admin key only
    no_tenant = api.a("POST", f"{COUNTERS}/reset", json={k: v for k, v in good.items() if k != "tenant_id"})
    assert no_tenant.status_code == 400 and no_tenant.json()["details"]["missing_required_field"] == "tenant_id"
    assert api.a("POST", f"{COUNTERS}/reset", json={**good, "window_key": "run-9"}).status_code == 404
    assert api.a("POST", f"{COUNTERS}/reset", json={**good, "tenant_id": "acme-corp"}).status_code == 400
    assert api.a("POST", f"{COUNTERS}/reset", json={**good, "window": "per_hour_tumbling"}).status_code == 400
    risk = {**good, "action_kind": "__risk__", "window": "per_hour_tumbling", "window_key": _hour(api, "acme")}
    assert api.a("POST", f"{COUNTERS}/reset", json=risk).status_code == 400  # risk_class missing
    done = api.a("POST", f"{COUNTERS}/reset", json={**risk, "risk_class": "external_side_effect"})
    assert done.status_code == 200 and done.json()["previous_used"] == 3
    assert done.json()["counter"]["expires_at"].endswith(":00:00.000Z")  # a tumbling window keeps its end
    # nothing of acme-corp moved
    assert [c[3] for c in _counters(api.a("GET", COUNTERS, params={"tenant_id": "acme-corp"}))] == [1, 1]
    logs = api.a("GET", "/v1/admin/audit/logs?operation=resetActionQuotaCounter").json()["logs"]
    assert sorted(x["status"] for x in logs) == [200, 400, 400, 400, 400, 401, 404]  # refusals audited too


def test_a_quota_threshold_is_announced_once_and_correlates_with_a_reset(api: Api, acme: dict[str, str]) -> None:
    assert _email(api, acme["acme"], "run-1").status_code == 200  # 3 of 3: 80% is reached at the 3rd call
    assert _email(api, acme["acme"], "run-2").status_code == 200
    assert _email(api, acme["acme"], "run-2").status_code == 200  # run-2 reaches it too
    params = {"tenant_id": "acme", "event_type": "quota.threshold_approaching"}
    events = api.a("GET", "/v1/admin/events", params=params).json()["events"]
    validator = schema_validator("cycles-protocol-extensions-v0.1.26.yaml", "EventDataQuotaThresholdApproaching")
    for event in events:
        assert not list(validator.iter_errors(event["data"])), event["data"]
    assert sorted((e["data"]["window_key"], e["data"]["used"], e["data"]["limit"]) for e in events) == [
        ("run-1", 3, 3),
        ("run-2", 3, 3),
    ]
    body = {"tenant_id": "acme", "scope": "tenant:acme", "action_kind": "message.email.send", "window": "per_run",
            "window_key": "run-1"}  # fmt: skip
    assert api.a("POST", f"{COUNTERS}/reset", json=body).status_code == 200
    (reset,) = api.a("GET", "/v1/admin/events", params={**params, "event_type": "quota.counter_reset"}).json()["events"]
    crossing = next(e for e in events if e["data"]["window_key"] == "run-1")
    assert reset["correlation_id"] == crossing["correlation_id"]
    assert (
        api.a(
            "GET", "/v1/admin/events", params={"tenant_id": "acme-corp", **{"event_type": params["event_type"]}}
        ).json()["events"]
        == []
    )  # acme-corp's single call reached nothing
