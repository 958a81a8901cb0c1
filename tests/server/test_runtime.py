"""Every runtime operation of protocol v0 through the app, with the spec's shapes and statuses.

Each response is also validated against the spec by the client fixture's hook (conftest)."""

from __future__ import annotations

import httpx
import pytest

from .helpers import amount, commit_body, decide_body, event_body, extend_body, key, release_body, reserve_body

pytestmark = pytest.mark.usefixtures("funded")


async def remaining(client: httpx.AsyncClient, auth: dict[str, str]) -> int:
    r = await client.get("/v1/balances", params={"tenant": "acme"}, headers=auth)
    assert r.status_code == 200
    (tenant_balance,) = [b for b in r.json()["balances"] if b["scope"] == "tenant:acme"]
    return int(tenant_balance["remaining"]["amount"])


async def test_reserve_commit_lifecycle(client: httpx.AsyncClient, auth: dict[str, str]) -> None:
    r = await client.post("/v1/reservations", json=reserve_body(estimate=5000), headers=auth)
    assert r.status_code == 200
    res = r.json()
    assert res["decision"] == "ALLOW"
    assert res["affected_scopes"] == [
        "tenant:acme",
        "tenant:acme/workflow:wf-1",
        "tenant:acme/workflow:wf-1/agent:writer",
    ]
    assert res["scope_path"] == "tenant:acme/workflow:wf-1/agent:writer"
    assert res["reserved"] == amount(5000)
    assert 0 < res["remaining_ttl_ms"] <= 60_000
    assert r.headers["x-cycles-tenant"] == "acme"
    rid = res["reservation_id"]
    assert await remaining(client, auth) == 10**9 - 5000

    r = await client.get(f"/v1/reservations/{rid}", headers=auth)
    assert r.status_code == 200
    assert r.json()["status"] == "ACTIVE"

    r = await client.post(f"/v1/reservations/{rid}/commit", json=commit_body(3000), headers=auth)
    assert r.status_code == 200
    assert r.json()["status"] == "COMMITTED"
    assert r.json()["charged"] == amount(3000)
    assert r.json()["released"] == amount(2000)
    assert await remaining(client, auth) == 10**9 - 3000

    r = await client.get(f"/v1/reservations/{rid}", headers=auth)
    assert r.json()["status"] == "COMMITTED"
    assert r.json()["committed"] == amount(3000)

    r = await client.post(f"/v1/reservations/{rid}/commit", json=commit_body(3000), headers=auth)
    assert r.status_code == 409
    assert r.json()["error"] == "RESERVATION_FINALIZED"


async def test_release_and_extend(client: httpx.AsyncClient, auth: dict[str, str]) -> None:
    rid = (await client.post("/v1/reservations", json=reserve_body(ttl_ms=5000), headers=auth)).json()["reservation_id"]
    r = await client.post(f"/v1/reservations/{rid}/extend", json=extend_body(10_000), headers=auth)
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ACTIVE"
    assert 10_000 < body["remaining_ttl_ms"] <= 15_000
    r = await client.post(f"/v1/reservations/{rid}/release", json=release_body(reason="not needed"), headers=auth)
    assert r.status_code == 200
    assert r.json() == {**r.json(), "status": "RELEASED", "released": amount(1000)}
    assert await remaining(client, auth) == 10**9
    r = await client.post(f"/v1/reservations/{rid}/extend", json=extend_body(), headers=auth)
    assert r.status_code == 409
    assert r.json()["error"] == "RESERVATION_FINALIZED"


async def test_dry_run_reserves_nothing(client: httpx.AsyncClient, auth: dict[str, str]) -> None:
    r = await client.post("/v1/reservations", json=reserve_body(dry_run=True), headers=auth)
    assert r.status_code == 200
    body = r.json()
    assert body["decision"] == "ALLOW"
    assert "reservation_id" not in body and "expires_at_ms" not in body and "remaining_ttl_ms" not in body
    assert body["affected_scopes"][0] == "tenant:acme"
    r = await client.post("/v1/reservations", json=reserve_body(estimate=10**10, dry_run=True), headers=auth)
    assert r.status_code == 200
    assert r.json()["decision"] == "DENY"
    assert r.json()["reason_code"] == "BUDGET_EXCEEDED"
    assert await remaining(client, auth) == 10**9
    r = await client.get("/v1/reservations", headers=auth)
    assert r.json()["reservations"] == []


async def test_budget_exceeded_is_409(client: httpx.AsyncClient, auth: dict[str, str]) -> None:
    r = await client.post("/v1/reservations", json=reserve_body(estimate=10**9 + 1), headers=auth)
    assert r.status_code == 409
    body = r.json()
    assert body["error"] == "BUDGET_EXCEEDED"
    assert body["message"]
    assert body["details"]["scope"] == "tenant:acme"
    assert body["request_id"] == r.headers["x-request-id"]


async def test_no_budget_is_404_and_wrong_unit_is_400(client: httpx.AsyncClient, auth: dict[str, str]) -> None:
    body = reserve_body()
    body["estimate"] = amount(10, "TOKENS")
    r = await client.post("/v1/reservations", json=body, headers=auth)
    assert r.status_code == 400
    assert r.json()["error"] == "UNIT_MISMATCH"
    assert r.json()["details"]["expected_units"] == ["USD_MICROCENTS"]


async def test_decide(client: httpx.AsyncClient, auth: dict[str, str]) -> None:
    r = await client.post("/v1/decide", json=decide_body(), headers=auth)
    assert r.status_code == 200
    assert r.json()["decision"] == "ALLOW"
    r = await client.post("/v1/decide", json=decide_body(estimate=10**10), headers=auth)
    assert r.status_code == 200
    assert r.json() == {**r.json(), "decision": "DENY", "reason_code": "BUDGET_EXCEEDED"}
    assert await remaining(client, auth) == 10**9


async def test_events_are_201_and_charge(client: httpx.AsyncClient, auth: dict[str, str]) -> None:
    r = await client.post("/v1/events", json=event_body(actual=700), headers=auth)
    assert r.status_code == 201
    assert r.json()["status"] == "APPLIED"
    assert r.json()["event_id"]
    assert await remaining(client, auth) == 10**9 - 700
    r = await client.post("/v1/events", json=event_body(actual=10**10, overage_policy="REJECT"), headers=auth)
    assert r.status_code == 409
    assert r.json()["error"] == "BUDGET_EXCEEDED"


async def test_idempotent_replay_returns_the_original(client: httpx.AsyncClient, auth: dict[str, str]) -> None:
    body = reserve_body()
    first = await client.post("/v1/reservations", json=body, headers=auth)
    again = await client.post(
        "/v1/reservations", json=body, headers={**auth, "X-Idempotency-Key": body["idempotency_key"]}
    )
    assert again.status_code == 200
    assert again.json()["reservation_id"] == first.json()["reservation_id"]
    assert await remaining(client, auth) == 10**9 - 1000
    body["estimate"] = amount(2000)
    r = await client.post("/v1/reservations", json=body, headers=auth)
    assert r.status_code == 409
    assert r.json()["error"] == "IDEMPOTENCY_MISMATCH"


async def test_idempotency_header_must_match_the_body(client: httpx.AsyncClient, auth: dict[str, str]) -> None:
    r = await client.post("/v1/reservations", json=reserve_body(), headers={**auth, "X-Idempotency-Key": "other"})
    assert r.status_code == 400
    assert r.json()["error"] == "INVALID_REQUEST"
    assert "X-Idempotency-Key" in r.json()["message"]
    assert await remaining(client, auth) == 10**9


async def test_unknown_and_expired_reservations(client: httpx.AsyncClient, auth: dict[str, str]) -> None:
    r = await client.get("/v1/reservations/rsv_nope", headers=auth)
    assert r.status_code == 404
    assert r.json()["error"] == "NOT_FOUND"
    r = await client.post("/v1/reservations/rsv_nope/commit", json=commit_body(), headers=auth)
    assert r.status_code == 404
    r = await client.get("/v1/reservations/" + "x" * 129, headers=auth)
    assert r.status_code == 400


async def test_list_reservations_filters_and_pages(client: httpx.AsyncClient, auth: dict[str, str]) -> None:
    ids = []
    for _ in range(5):
        r = await client.post("/v1/reservations", json=reserve_body(metadata={"run": "x"}), headers=auth)
        ids.append(r.json()["reservation_id"])
    await client.post(f"/v1/reservations/{ids[0]}/release", json=release_body(), headers=auth)

    r = await client.get("/v1/reservations", params={"status": "ACTIVE"}, headers=auth)
    assert {x["reservation_id"] for x in r.json()["reservations"]} == set(ids[1:])
    assert all("metadata" not in x for x in r.json()["reservations"])

    r = await client.get("/v1/reservations", params={"include": "metadata, ,evidence,bogus"}, headers=auth)
    assert all(x["metadata"] == {"run": "x"} for x in r.json()["reservations"])

    seen: list[str] = []
    params: dict[str, str] = {"limit": "2", "sort_by": "created_at_ms", "sort_dir": "asc"}
    while True:
        r = await client.get("/v1/reservations", params=params, headers=auth)
        assert r.status_code == 200
        page = r.json()
        seen += [x["reservation_id"] for x in page["reservations"]]
        if not page.get("next_cursor"):
            break
        assert page["has_more"] is True
        params = {**params, "cursor": page["next_cursor"], "include": "metadata"}  # include may change
    assert sorted(seen) == sorted(ids)

    r = await client.get("/v1/reservations", params={"limit": "2"}, headers=auth)
    cursor = r.json()["next_cursor"]
    r = await client.get("/v1/reservations", params={"limit": "2", "cursor": cursor, "status": "ACTIVE"}, headers=auth)
    assert r.status_code == 400  # a cursor is bound to its filters

    r = await client.get("/v1/reservations", params={"idempotency_key": "nope"}, headers=auth)
    assert r.json()["reservations"] == []


@pytest.mark.parametrize(
    "params",
    [
        {"status": "BOGUS"},
        {"limit": "0"},
        {"limit": "201"},
        {"limit": "ten"},
        {"sort_by": "colour"},
        {"sort_dir": "sideways"},
        {"from": "2026-02-01T00:00:00Z", "to": "2026-01-01T00:00:00Z"},
        {"expires_from": "2026-02-01T00:00:00Z", "expires_to": "2026-01-01T00:00:00Z"},
        {"finalized_from": "2026-02-01T00:00:00Z", "finalized_to": "2026-01-01T00:00:00Z"},
        {"from": "yesterday"},
        {"cursor": "not-a-cursor"},
    ],
)
async def test_list_reservations_rejects_bad_queries(
    client: httpx.AsyncClient, auth: dict[str, str], params: dict[str, str]
) -> None:
    r = await client.get("/v1/reservations", params=params, headers=auth)
    assert r.status_code == 400
    assert r.json()["error"] == "INVALID_REQUEST"


async def test_list_reservations_time_windows(client: httpx.AsyncClient, auth: dict[str, str]) -> None:
    rid = (await client.post("/v1/reservations", json=reserve_body(), headers=auth)).json()["reservation_id"]
    # Blank bounds are unset (NORMATIVE), never a 400.
    r = await client.get("/v1/reservations?from=&to=&expires_from=&finalized_to=", headers=auth)
    assert r.status_code == 200
    assert [x["reservation_id"] for x in r.json()["reservations"]] == [rid]
    r = await client.get("/v1/reservations", params={"from": "2000-01-01T00:00:00+00:00"}, headers=auth)
    assert [x["reservation_id"] for x in r.json()["reservations"]] == [rid]
    r = await client.get("/v1/reservations", params={"to": "2000-01-01T00:00:00Z"}, headers=auth)
    assert r.json()["reservations"] == []
    r = await client.get("/v1/reservations", params={"finalized_from": "2000-01-01T00:00:00Z"}, headers=auth)
    assert r.json()["reservations"] == []  # ACTIVE rows have no finalized_at_ms
    await client.post(f"/v1/reservations/{rid}/commit", json=commit_body(), headers=auth)
    r = await client.get("/v1/reservations", params={"finalized_from": "2000-01-01T00:00:00Z"}, headers=auth)
    assert [x["reservation_id"] for x in r.json()["reservations"]] == [rid]


async def test_balances_need_a_filter_and_page(client: httpx.AsyncClient, auth: dict[str, str], server: object) -> None:
    r = await client.get("/v1/balances", headers=auth)
    assert r.status_code == 400
    assert r.json()["error"] == "INVALID_REQUEST"
    r = await client.get("/v1/balances", params={"tenant": ""}, headers=auth)
    assert r.status_code == 400
    for wf in ("a", "b", "c"):
        await client.post(
            "/admin/budgets",
            json={"scope": f"tenant:acme/workflow:{wf}", "amount": amount(10)},
            headers={"X-Admin-API-Key": "test-admin-key-0123456789"},
        )
    scopes: list[str] = []
    params = {"tenant": "acme", "limit": "2"}
    while True:
        r = await client.get("/v1/balances", params=params, headers=auth)
        assert r.status_code == 200
        scopes += [b["scope"] for b in r.json()["balances"]]
        if not r.json().get("next_cursor"):
            break
        params["cursor"] = r.json()["next_cursor"]
    assert len(scopes) == 4 and len(set(scopes)) == 4
    r = await client.get("/v1/balances", params={"workflow": "b"}, headers=auth)
    assert [b["scope"] for b in r.json()["balances"]] == ["tenant:acme/workflow:b"]
    r = await client.get("/v1/balances", params={"tenant": "acme", "include_children": "maybe"}, headers=auth)
    assert r.status_code == 400


async def test_extend_until_the_limit(client: httpx.AsyncClient, auth: dict[str, str]) -> None:
    rid = (await client.post("/v1/reservations", json=reserve_body(), headers=auth)).json()["reservation_id"]
    statuses = [
        (await client.post(f"/v1/reservations/{rid}/extend", json=extend_body(1000), headers=auth)).status_code
        for _ in range(11)
    ]
    assert statuses[:10] == [200] * 10
    r = await client.post(f"/v1/reservations/{rid}/extend", json=extend_body(1000), headers=auth)
    assert r.status_code == 409
    assert r.json()["error"] == "MAX_EXTENSIONS_EXCEEDED"


async def test_same_key_on_another_endpoint_is_independent(client: httpx.AsyncClient, auth: dict[str, str]) -> None:
    k = key()
    r1 = await client.post("/v1/reservations", json={**reserve_body(), "idempotency_key": k}, headers=auth)
    r2 = await client.post("/v1/events", json={**event_body(), "idempotency_key": k}, headers=auth)
    assert (r1.status_code, r2.status_code) == (200, 201)
