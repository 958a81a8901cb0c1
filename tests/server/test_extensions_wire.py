"""The v0.1.26 extensions on the wire: quota and access denials as 409s with details.deny_detail,
deny_detail on DENY bodies for clients that announce the extensions (and only for them), observe
mode, recurring budgets and policies on the admin plane. Every response is validated against the
protocol spec with the extensions folded in (conftest's hook); deny_detail against DenyDetail."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from .helpers import amount, decide_body, key, reserve_body

pytestmark = pytest.mark.usefixtures("funded")

EXT = {"X-Cycles-Extensions": "0.1.26"}


def email_body(**extra: Any) -> dict[str, Any]:
    body = reserve_body(estimate=10, **extra)
    body["action"] = {"kind": "message.email.send", "name": "smtp"}
    body["subject"]["dimensions"] = {"run_id": "run-1"}
    return body


async def test_quota_denials_are_409_with_a_deny_detail(
    client: httpx.AsyncClient, auth: dict[str, str], admin: dict[str, str]
) -> None:
    quota = {"action_kind": "message.email.send", "max_calls": 2, "window": "per_run"}
    r = await client.post("/admin/policies", json={"scope": "tenant:acme", "set_quota": quota}, headers=admin)
    assert r.status_code == 200 and r.json()["quotas"] == [{**quota, "scope": "tenant:acme"}]
    for _ in range(2):
        assert (await client.post("/v1/reservations", json=email_body(), headers=auth)).status_code == 200
    r = await client.post("/v1/reservations", json=email_body(), headers=auth)
    assert r.status_code == 409
    body = r.json()
    assert body["error"] == "ACTION_QUOTA_EXCEEDED"
    detail = body["details"]["deny_detail"]
    assert detail["quota_violation"] == {
        "action_kind": "message.email.send",
        "window": "per_run",
        "window_key": "run-1",
        "used": 2,
        "limit": 2,
        "scope": "tenant:acme",
    }
    no_run = email_body()
    del no_run["subject"]["dimensions"]
    r = await client.post("/v1/reservations", json=no_run, headers=auth)
    assert r.status_code == 400 and r.json()["error"] == "INVALID_REQUEST"
    r = await client.get("/admin/policies", params={"tenant": "acme"}, headers=admin)
    assert r.status_code == 200 and [p["scope"] for p in r.json()["policies"]] == ["tenant:acme"]


async def test_deny_detail_in_200_bodies_only_for_clients_that_announce_the_extensions(
    client: httpx.AsyncClient, auth: dict[str, str], admin: dict[str, str]
) -> None:
    edit = {"scope": "tenant:acme", "denied_action_kinds": ["message.email.send"]}
    assert (await client.post("/admin/policies", json=edit, headers=admin)).status_code == 200
    dry = email_body(dry_run=True)
    plain = (await client.post("/v1/reservations", json=dry, headers=auth)).json()
    assert plain["decision"] == "DENY" and plain["reason_code"] == "ACTION_KIND_DENIED" and "deny_detail" not in plain
    dry["idempotency_key"] = key()
    rich = (await client.post("/v1/reservations", json=dry, headers={**auth, **EXT})).json()
    assert rich["deny_detail"]["reason_code"] == "ACTION_KIND_DENIED"
    decide = decide_body(estimate=10**12)
    decided = (await client.post("/v1/decide", json=decide, headers={**auth, **EXT})).json()
    assert decided["decision"] == "DENY" and decided["deny_detail"]["budget_remaining"] == 10**9
    r = await client.post("/v1/reservations", json=reserve_body(estimate=10**12), headers=auth)
    assert r.status_code == 409 and r.json()["details"]["deny_detail"]["reason_code"] == "BUDGET_EXCEEDED"


async def test_observe_mode_on_the_wire(client: httpx.AsyncClient, auth: dict[str, str]) -> None:
    body = reserve_body(estimate=10**12, observe_mode="OBSERVE")
    r = await client.post("/v1/reservations", json=body, headers={**auth, **EXT})
    assert r.status_code == 200
    res = r.json()
    assert res["decision"] == "DENY" and "reservation_id" not in res and res["deny_detail"]["reason_code"]
    r = await client.post("/v1/reservations", json=reserve_body(observe_mode="SOMETIMES"), headers=auth)
    assert r.status_code == 400


async def test_recurring_budgets_on_the_admin_plane(client: httpx.AsyncClient, admin: dict[str, str]) -> None:
    body = {"scope": "tenant:acme/workflow:daily", "amount": amount(500), "period": "day", "timezone": "Asia/Tokyo"}
    r = await client.post("/admin/budgets", json=body, headers=admin)
    assert r.status_code == 201
    b = r.json()
    assert b["period_start"].endswith("T15:00:00Z") and b["period_end"].endswith("T15:00:00Z")
    bad = {**body, "timezone": "Nowhere/Atlantis"}
    r = await client.post("/admin/budgets", json=bad, headers=admin)
    assert r.status_code == 400 and "Atlantis" in r.json()["message"]
