"""The dashboard and the shadow-event endpoints over plain HTTP: sessions, permissions, exports,
``cycles dashboard``'s one-time sign-in link."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from cycles import Action, Cycles, Subject, usd
from cycles.errors import Forbidden
from cycles.shadow import HttpShadowStore, ShadowEvent

from .conftest import ADMIN_KEY as ADMIN


def _key(base: str, tenant: str) -> str:
    r = httpx.post(base + "/admin/keys", json={"tenant": tenant}, headers={"X-Admin-API-Key": ADMIN})
    return str(r.json()["api_key"])


def test_pages_need_a_session_and_changes_need_the_admin(served: tuple[str, str]) -> None:
    _, base = served
    with httpx.Client(base_url=base) as c:
        assert c.get("/dashboard/budgets").status_code == 303  # to the sign-in page
        assert c.post("/dashboard/login", data={"key": "nope"}).status_code == 401
        forged = "eyJhIjp0cnVlLCJ0IjpudWxsLCJrIjpudWxsLCJlIjo5OTk5OTk5OTk5fQ.AAAA"  # admin, bad MAC
        c.cookies.set("cycles_dashboard", forged)
        assert c.get("/dashboard/budgets").status_code == 303
        c.cookies.clear()
        assert c.post("/dashboard/login", data={"key": ADMIN}).status_code == 303
        # a change without htmx's header (a cross-site form could send one like it) is refused
        r = c.post("/dashboard/budgets/status", data={"scope": "tenant:acme", "status": "FROZEN"})
        assert r.status_code == 403
        r = c.post(
            "/dashboard/budgets/fund",
            data={"scope": "tenant:none", "unit": "USD_MICROCENTS", "amount": "abc"},
            headers={"HX-Request": "true"},
        )
        assert r.status_code == 200 and r.headers["hx-retarget"] == "#flash" and "is not an amount" in r.text
        assert "default-src 'self'" in c.get("/dashboard").headers["content-security-policy"]


def test_a_revoked_key_ends_its_session(served: tuple[str, str]) -> None:
    _, base = served
    key = _key(base, "acme")
    with httpx.Client(base_url=base) as c:
        assert c.post("/dashboard/login", data={"key": key}).status_code == 303
        assert c.get("/dashboard").status_code == 200
        key_id = httpx.get(base + "/admin/keys", headers={"X-Admin-API-Key": ADMIN}).json()["keys"][0]["key_id"]
        httpx.delete(base + f"/admin/keys/{key_id}", headers={"X-Admin-API-Key": ADMIN})
        assert c.get("/dashboard").status_code == 303


def test_shadow_events_stay_within_their_tenant(served: tuple[str, str]) -> None:
    _, base = served
    acme, globex = _key(base, "acme"), _key(base, "globex")
    event = {
        "at_ms": int(time.time() * 1000),
        "tenant": "acme",
        "scope": "tenant:acme",
        "action_kind": "llm.completion",
        "action_name": "m",
        "reason_code": "BUDGET_EXCEEDED",
        "unit": "USD_MICROCENTS",
        "estimate": 5,
        "actual": 5,
        "charged": 0,
    }
    as_acme = HttpShadowStore(base, runtime_headers={"X-Cycles-API-Key": acme}, admin_headers={})
    as_globex = HttpShadowStore(base, runtime_headers={"X-Cycles-API-Key": globex}, admin_headers={})
    as_acme.append([ShadowEvent.from_wire(event)])
    with pytest.raises(Forbidden):
        as_globex.append([ShadowEvent.from_wire(event)])  # globex cannot write acme's history
    assert as_globex.scan() == []
    with pytest.raises(Forbidden):
        as_globex.scan(tenant="acme")
    (seen,) = as_acme.scan()
    assert seen.overspend == 5
    admin = HttpShadowStore(base, runtime_headers={}, admin_headers={"X-Admin-API-Key": ADMIN})
    assert [e.tenant for e in admin.scan()] == ["acme"]
    bad = httpx.post(
        base + "/v1/shadow/events", json={"events": [{**event, "estimate": -1}]}, headers={"X-Cycles-API-Key": acme}
    )
    assert bad.status_code == 400 and bad.json()["error"] == "INVALID_REQUEST"


def test_a_shadow_client_over_http_feeds_the_servers_report(served: tuple[str, str]) -> None:
    ledger_url, base = served
    with Cycles(ledger_url) as local:
        local.budgets.set("tenant:acme", usd(0.10))
    with Cycles(base, api_key=_key(base, "acme"), mode="shadow", heartbeat=False) as remote:
        for _ in range(3):
            with remote.guard(Subject(workflow="wf"), Action("llm.completion", "m"), estimate=usd(0.08)) as g:
                g.commit(usd(0.08))  # no tenant in the subject: the key's
    with Cycles(base, admin_key=ADMIN) as operator:
        report = operator.shadow_report(since="1h")
    assert report.would_deny == 2 and report.tenant is None
    assert {g.scope for g in report.groups} == {"tenant:acme"}


def test_cycles_dashboard_opens_on_localhost_with_a_one_time_link(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/ledger.db"
    with Cycles(url) as cy:
        cy.budgets.set("tenant:acme", usd(5))
    proc = subprocess.Popen(
        [sys.executable, "-m", "cycles.cli", "dashboard", "--ledger", url, "--port", "0", "--no-browser"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        link = ""
        for line in proc.stderr:
            found = re.search(r"(http://127\.0\.0\.1:\d+/dashboard/login\?token=\S+)", line)
            if found:
                link = found.group(1)
                break
        assert link, "no sign-in link printed"
        with httpx.Client() as c:
            for _ in range(100):  # the link is printed just before the server accepts
                try:
                    first = c.get(link)
                    break
                except httpx.ConnectError:
                    time.sleep(0.05)  # readiness probe: the socket is bound, uvicorn not yet accepting
            assert first.status_code == 303 and first.headers["location"] == "/dashboard"
            assert "tenant:acme" in c.get(link.split("/login")[0] + "/budgets").text
        with httpx.Client() as other:  # the link works once
            assert other.get(link).status_code == 200 and "Sign in" in other.get(link).text
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=20)
        if proc.stderr is not None:
            proc.stderr.close()
    assert proc.returncode in (0, 130)  # 130: stopped with Ctrl-C


def test_cycles_dashboard_on_a_server_points_at_the_servers_own(capsys: pytest.CaptureFixture[str]) -> None:
    from cycles.cli import main

    assert main(["dashboard", "--ledger", "http://cycles.internal:7878/v1", "--no-browser"]) == 0
    assert "its dashboard is at http://cycles.internal:7878/dashboard" in capsys.readouterr().err
