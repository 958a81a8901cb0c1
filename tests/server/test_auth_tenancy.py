"""AUTH & TENANCY: one API key, one tenant; other tenants' subjects, reservations and balances are
403; the admin key reaches what the spec's AdminKeyAuth allows, and nothing else."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import httpx
import pytest

from cycles.server.app import CyclesServer

from .conftest import ADMIN_KEY
from .helpers import commit_body, decide_body, event_body, extend_body, release_body, reserve_body

pytestmark = pytest.mark.usefixtures("funded")


async def test_missing_bad_and_revoked_keys_are_401(
    client: httpx.AsyncClient, server: CyclesServer, auth: dict[str, str], admin: dict[str, str]
) -> None:
    for headers in ({}, {"X-Cycles-API-Key": "nope"}, {"X-Cycles-API-Key": "cyc_0123456789abcdef_" + "a" * 64}):
        r = await client.post("/v1/reservations", json=reserve_body(), headers=headers)
        assert r.status_code == 401
        assert r.json()["error"] == "UNAUTHORIZED"
    assert (await client.post("/v1/reservations", json=reserve_body(), headers=auth)).status_code == 200
    key_id = auth["X-Cycles-API-Key"].split("_")[1]
    r = await client.delete(f"/admin/keys/{key_id}", headers=admin)
    assert r.status_code == 200
    assert r.json()["status"] == "REVOKED"
    r = await client.post("/v1/reservations", json=reserve_body(), headers=auth)
    assert r.status_code == 401  # at once on the server that revoked it (its cache is dropped)


async def test_subject_of_another_tenant_is_403(client: httpx.AsyncClient, auth: dict[str, str]) -> None:
    for path, body in (
        ("/v1/reservations", reserve_body(tenant="globex")),
        ("/v1/reservations", reserve_body(tenant="globex", dry_run=True)),
        ("/v1/decide", decide_body(tenant="globex")),
        ("/v1/events", event_body(tenant="globex")),
    ):
        r = await client.post(path, json=body, headers=auth)
        assert r.status_code == 403, path
        assert r.json()["error"] == "FORBIDDEN"


async def test_subject_without_tenant_is_the_keys_tenant(client: httpx.AsyncClient, auth: dict[str, str]) -> None:
    r = await client.post("/v1/reservations", json=reserve_body(tenant=None), headers=auth)
    assert r.status_code == 200
    assert r.json()["affected_scopes"][0] == "tenant:acme"


async def test_reservation_of_another_tenant_is_403(
    client: httpx.AsyncClient, auth: dict[str, str], other_key: str
) -> None:
    rid = (await client.post("/v1/reservations", json=reserve_body(), headers=auth)).json()["reservation_id"]
    other = {"X-Cycles-API-Key": other_key}
    assert (await client.get(f"/v1/reservations/{rid}", headers=other)).status_code == 403
    for action, body in (("commit", commit_body()), ("release", release_body()), ("extend", extend_body())):
        r = await client.post(f"/v1/reservations/{rid}/{action}", json=body, headers=other)
        assert r.status_code == 403, action
    r = await client.get("/v1/reservations", headers=other)
    assert r.json()["reservations"] == []  # globex sees none of acme's
    r = await client.get(f"/v1/reservations/{rid}", headers=auth)
    assert r.json()["status"] == "ACTIVE"  # untouched


async def test_queries_for_another_tenant_are_403(client: httpx.AsyncClient, auth: dict[str, str]) -> None:
    assert (await client.get("/v1/balances", params={"tenant": "globex"}, headers=auth)).status_code == 403
    assert (await client.get("/v1/reservations", params={"tenant": "globex"}, headers=auth)).status_code == 403
    r = await client.get("/v1/balances", params={"workspace": "anything"}, headers=auth)
    assert r.status_code == 200
    assert r.json()["balances"] == []


async def test_a_tenant_without_budget_gets_404(client: httpx.AsyncClient, server: CyclesServer) -> None:
    key = (await server.keys.create("initech")).api_key
    r = await client.post("/v1/reservations", json=reserve_body(tenant="initech"), headers={"X-Cycles-API-Key": key})
    assert r.status_code == 404
    assert r.json()["error"] == "NOT_FOUND"
    assert "Budget not found" in r.json()["message"]
    r = await client.post("/v1/decide", json=decide_body(tenant="initech"), headers={"X-Cycles-API-Key": key})
    assert r.status_code == 200
    assert r.json()["reason_code"] == "BUDGET_NOT_FOUND"


async def test_admin_key_on_list_get_and_release(
    client: httpx.AsyncClient, auth: dict[str, str], admin: dict[str, str]
) -> None:
    rid = (await client.post("/v1/reservations", json=reserve_body(), headers=auth)).json()["reservation_id"]
    r = await client.get("/v1/reservations", headers=admin)
    assert r.status_code == 400
    assert r.json()["message"] == "tenant query parameter is required when using admin key authentication"
    r = await client.get("/v1/reservations", params={"tenant": "acme"}, headers=admin)
    assert [x["reservation_id"] for x in r.json()["reservations"]] == [rid]
    r = await client.get("/v1/reservations", params={"tenant": "globex"}, headers=admin)
    assert r.json()["reservations"] == []
    assert (await client.get(f"/v1/reservations/{rid}", headers=admin)).status_code == 200
    r = await client.post(
        f"/v1/reservations/{rid}/release", json=release_body(reason="[INCIDENT_FORCE_RELEASE]"), headers=admin
    )
    assert r.status_code == 200
    assert "x-cycles-tenant" not in r.headers
    # AdminKeyAuth is not accepted where the spec does not list it.
    for path, body in (
        ("/v1/reservations", reserve_body()),
        ("/v1/decide", decide_body()),
        ("/v1/events", event_body()),
    ):
        assert (await client.post(path, json=body, headers=admin)).status_code == 401
    assert (await client.get("/v1/balances", params={"tenant": "acme"}, headers=admin)).status_code == 401
    wrong = {"X-Admin-API-Key": "wrong"}
    assert (await client.get("/v1/reservations", params={"tenant": "acme"}, headers=wrong)).status_code == 401


async def test_admin_plane_disabled_without_admin_key(spec: object, tmp_path: Path) -> None:
    from cycles.server import create_app

    from .conftest import validating_hooks

    app = create_app("memory://", sweep_interval_s=0)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t", event_hooks=validating_hooks(spec)) as c:  # type: ignore[arg-type]
        r = await c.post("/admin/keys", json={"tenant": "acme"}, headers={"X-Admin-API-Key": ""})
        assert r.status_code == 401
        assert "disabled" in r.json()["message"]
    await app.server.aclose()


async def test_keys_are_stored_hashed(tmp_path: Path, client: httpx.AsyncClient, admin: dict[str, str]) -> None:
    from cycles.server import create_app

    url = f"sqlite:///{tmp_path}/keys.db"
    app = create_app(url, admin_key=ADMIN_KEY, sweep_interval_s=0)
    try:
        new = await app.server.keys.create("acme")
        assert new.api_key.startswith("cyc_")
        dump = "\n".join(sqlite3.connect(tmp_path / "keys.db").iterdump())
        assert new.api_key not in dump
        assert new.info.key_id in dump
        assert new.api_key.split("_", 2)[2] not in dump
    finally:
        await app.server.aclose()


async def test_access_log_has_no_keys(
    client: httpx.AsyncClient, auth: dict[str, str], admin: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="cycles.server"):
        await client.post("/v1/reservations", json=reserve_body(), headers=auth)
        await client.get("/v1/reservations?tenant=acme&idempotency_key=" + auth["X-Cycles-API-Key"], headers=admin)
        await client.post("/admin/keys", json={"tenant": "acme"}, headers=admin)
        await client.post("/v1/reservations", json=reserve_body(), headers={"X-Cycles-API-Key": "cyc_bogus_secret"})
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert caplog.records, "no access log lines"
    assert auth["X-Cycles-API-Key"] not in text
    assert ADMIN_KEY not in text
    assert "cyc_bogus_secret" not in text
    assert auth["X-Cycles-API-Key"].split("_")[1] in text  # the key_id is logged, for audit
    assert '"actor":"admin"' in text
