"""The operator plane (/admin), and health, readiness and metrics."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from cycles.ledger.base import ThreadedAsyncLedger
from cycles.ledger.memory import MemoryLedger
from cycles.server import create_app
from cycles.server.app import CyclesServer
from cycles.server.keys import MemoryKeyStore

from .helpers import amount, commit_body, decide_body, reserve_body


async def test_provision_a_fresh_deployment_over_http(client: httpx.AsyncClient, admin: dict[str, str]) -> None:
    r = await client.post("/admin/budgets", json={"scope": "tenant:acme", "amount": amount(5000)}, headers=admin)
    assert r.status_code == 201
    assert r.json()["remaining"] == amount(5000)
    r = await client.post(
        "/admin/budgets",
        json={
            "scope": "tenant:acme/workflow:wf-1",
            "amount": amount(2000),
            "overdraft_limit": amount(100),
            "caps": {"max_tokens": 256},
        },
        headers=admin,
    )
    assert r.status_code == 201
    r = await client.post("/admin/keys", json={"tenant": "acme", "name": "ci"}, headers=admin)
    assert r.status_code == 201
    created = r.json()
    assert created["api_key"].startswith("cyc_") and created["tenant"] == "acme" and created["name"] == "ci"
    auth = {"X-Cycles-API-Key": created["api_key"]}

    r = await client.post("/v1/reservations", json=reserve_body(estimate=1500), headers=auth)
    assert r.status_code == 200
    assert r.json()["decision"] == "ALLOW_WITH_CAPS"
    assert r.json()["caps"]["max_tokens"] == 256
    r = await client.post("/v1/reservations", json=reserve_body(estimate=1000), headers=auth)
    assert r.status_code == 409  # the workflow budget has 500 left

    r = await client.post(
        "/admin/budgets/fund", json={"scope": "tenant:acme/workflow:wf-1", "amount": amount(1000)}, headers=admin
    )
    assert r.status_code == 200
    assert r.json()["allocated"] == amount(3000)
    r = await client.post("/admin/budgets", json={"scope": "tenant:acme", "amount": amount(9000)}, headers=admin)
    assert r.status_code == 200  # an update, not a creation
    r = await client.get("/admin/budgets/tenant:acme/workflow:wf-1", headers=admin)
    assert r.status_code == 200
    assert r.json()["reserved"] == amount(1500)
    r = await client.get("/admin/budgets", params={"tenant": "acme"}, headers=admin)
    assert [b["scope"] for b in r.json()["budgets"]] == ["tenant:acme", "tenant:acme/workflow:wf-1"]
    r = await client.get("/admin/budgets/tenant:nobody", headers=admin)
    assert r.status_code == 404

    r = await client.post("/admin/budgets/status", json={"scope": "tenant:acme", "status": "FROZEN"}, headers=admin)
    assert r.status_code == 200
    r = await client.post("/v1/reservations", json=reserve_body(estimate=1), headers=auth)
    assert r.status_code == 409
    assert r.json()["error"] == "BUDGET_FROZEN"

    r = await client.get("/admin/keys", params={"tenant": "acme"}, headers=admin)
    (listed,) = r.json()["keys"]
    assert "api_key" not in listed and listed["status"] == "ACTIVE"
    r = await client.get(f"/admin/keys/{listed['key_id']}", headers=admin)
    assert r.json()["key_id"] == listed["key_id"]
    r = await client.delete(f"/admin/keys/{listed['key_id']}", headers=admin)
    assert r.json()["status"] == "REVOKED" and r.json()["revoked_at_ms"] > 0
    assert (await client.post("/v1/decide", json=decide_body(), headers=auth)).status_code == 401


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/admin/budgets", {"scope": "tenant:acme", "amount": {"unit": "USD_MICROCENTS", "amount": -1}}),
        ("POST", "/admin/budgets", {"scope": "not a scope", "amount": amount(1)}),
        ("POST", "/admin/budgets", {"scope": "tenant:acme", "amount": amount(1), "extra": True}),
        ("POST", "/admin/budgets/fund", {"scope": "tenant:acme"}),
        ("POST", "/admin/budgets/status", {"scope": "tenant:acme", "status": "MELTED"}),
        ("POST", "/admin/keys", {"tenant": "bad tenant/"}),
        ("POST", "/admin/keys", {"tenant": "a" * 10_000}),
        ("GET", "/admin/budgets/tenant:acme?unit=EUR", None),
        ("DELETE", "/admin/budgets/tenant:acme?force=yes", None),
        ("DELETE", "/admin/budgets/tenant:acme?unit=EUR", None),
        ("DELETE", "/admin/budgets/not-a-scope", None),
    ],
)
async def test_admin_rejects_bad_input(
    client: httpx.AsyncClient, admin: dict[str, str], method: str, path: str, body: Any
) -> None:
    r = await client.request(method, path, json=body, headers=admin)
    assert r.status_code == 400
    assert r.json()["error"] == "INVALID_REQUEST"


async def test_admin_needs_the_admin_key(client: httpx.AsyncClient, auth: dict[str, str]) -> None:
    for headers in ({}, auth, {"X-Admin-API-Key": "wrong"}):
        r = await client.post("/admin/keys", json={"tenant": "acme"}, headers=headers)
        assert r.status_code == 401
    assert (await client.delete("/admin/keys/0123456789abcdef", headers={"X-Admin-API-Key": "x"})).status_code == 401
    assert (await client.delete("/admin/budgets/tenant:acme", headers=auth)).status_code == 401


async def test_revoking_an_unknown_key_is_404(client: httpx.AsyncClient, admin: dict[str, str]) -> None:
    assert (await client.delete("/admin/keys/0123456789abcdef", headers=admin)).status_code == 404
    assert (await client.delete("/admin/keys/not-a-key-id", headers=admin)).status_code == 404


async def test_health_and_readiness(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    r = await client.get("/readyz")
    assert r.status_code == 200


async def test_not_ready_when_the_ledger_is_down() -> None:
    class Down(ThreadedAsyncLedger):
        async def get_budget(self, scope: str, *, unit: Any = None) -> Any:
            raise ConnectionError("down")

    app = create_app(ledger=Down(MemoryLedger()), keys=MemoryKeyStore(), sweep_interval_s=0)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        assert (await c.get("/healthz")).status_code == 200
        assert (await c.get("/readyz")).status_code == 503


@pytest.mark.usefixtures("funded")
async def test_metrics(client: httpx.AsyncClient, auth: dict[str, str], server: CyclesServer) -> None:
    rid = (await client.post("/v1/reservations", json=reserve_body(), headers=auth)).json()["reservation_id"]
    await client.post("/v1/reservations", json=reserve_body(), headers=auth)
    await client.post("/v1/reservations", json=reserve_body(estimate=10**12), headers=auth)
    await client.post("/v1/reservations", json=reserve_body(estimate=10**12, dry_run=True), headers=auth)
    await client.post("/v1/decide", json=decide_body(), headers=auth)
    await client.post(f"/v1/reservations/{rid}/commit", json=commit_body(), headers=auth)
    await client.post("/v1/reservations", json=reserve_body(), headers={"X-Cycles-API-Key": "bad"})
    r = await client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert 'cycles_decisions_total{operation="reserve",decision="ALLOW",reason="none"} 2' in text
    assert 'cycles_decisions_total{operation="reserve",decision="DENY",reason="BUDGET_EXCEEDED"} 1' in text
    assert 'cycles_decisions_total{operation="dry_run",decision="DENY",reason="BUDGET_EXCEEDED"} 1' in text
    assert 'cycles_decisions_total{operation="decide",decision="ALLOW",reason="none"} 1' in text
    assert 'cycles_http_requests_total{route="POST /v1/reservations",method="POST",status="409"} 1' in text
    assert (
        'cycles_http_request_duration_seconds_bucket{route="POST /v1/reservations/{reservation_id}/commit",le="+Inf"} 1'
        in text
    )
    assert 'cycles_ledger_operation_duration_seconds_count{operation="commit"} 1' in text
    assert "cycles_active_reservations 1" in text  # one reserved, one committed
    assert 'cycles_auth_failures_total{header="api_key"} 1' in text
    for line in text.splitlines():  # every sample line is "name{labels} number"
        if line and not line.startswith("#"):
            float(line.rsplit(" ", 1)[1])
