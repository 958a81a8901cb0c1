"""The client against the real ``cycles serve`` app (our server), end to end: provisioning over
the operator plane, guards, denials and reads, sync and async. The full backend contract suite
is the broader check; this one keeps the client and the server honest with each other."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator

import pytest

from cycles import Action, AsyncCycles, BudgetExceeded, Cycles, NotFound, Subject, Unauthorized, usd
from cycles.errors import Forbidden
from cycles.server import create_app
from cycles.server.testing import ServerThread

ADMIN = "real-admin-key-0123456789"
SUBJECT = Subject(tenant="acme", workflow="run-1")
ACTION = Action("llm.completion", "openai:gpt-4o")


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    with ServerThread(create_app("memory://", admin_key=ADMIN, sweep_interval_s=0)) as srv:
        yield srv


def _new_key(srv: ServerThread, tenant: str) -> str:
    req = urllib.request.Request(
        srv.url + "/admin/keys",
        data=json.dumps({"tenant": tenant}).encode(),
        headers={"X-Admin-API-Key": ADMIN, "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=5) as resp:
        key: str = json.load(resp)["api_key"]
        return key


def test_sync_lifecycle_against_cycles_serve(server: ServerThread) -> None:
    with Cycles(server.url, api_key=_new_key(server, "acme"), admin_key=ADMIN, heartbeat=False) as cy:
        cy.budgets.set("tenant:acme", usd(1))
        with cy.guard(SUBJECT, ACTION, usd(0.5)) as g:
            g.commit(usd(0.2))
        [balance] = cy.balances(tenant="acme")
        assert (balance.spent, balance.reserved) == (usd(0.2), usd(0))
        with pytest.raises(BudgetExceeded) as info:
            cy.reserve(SUBJECT, ACTION, usd(5))
        assert info.value.scope == "tenant:acme" and info.value.request_id and info.value.trace_id
        committed = cy.list_reservations(status="COMMITTED", created_from="2020-01-01T00:00:00Z")
        assert len(committed.reservations) == 1
        with pytest.raises(NotFound):
            cy.get_reservation("rsv_missing")
        with pytest.raises(Forbidden):
            cy.reserve(Subject(tenant="globex"), ACTION, usd(0.01))
        assert cy.event(SUBJECT, ACTION, usd(0.1)).status == "APPLIED"
        assert cy.budgets.get("tenant:acme").spent == usd(0.3)


async def test_async_lifecycle_against_cycles_serve(server: ServerThread) -> None:
    async with AsyncCycles(server.url, api_key=_new_key(server, "initech"), admin_key=ADMIN, heartbeat=False) as acy:
        await acy.budgets.set("tenant:initech", usd(1))
        subject = Subject(tenant="initech")
        async with acy.guard(subject, ACTION, usd(0.1)) as g:
            g.commit(usd(0.05))
        r = await acy.reserve(subject, ACTION, usd(0.1))
        assert r.reservation_id is not None
        assert (await acy.extend(r.reservation_id, 10_000)).status == "ACTIVE"
        assert (await acy.release(r.reservation_id)).released == usd(0.1)
        decision = await acy.decide(subject, ACTION, usd(5))
        assert decision.decision.value == "DENY"
        [balance] = await acy.balances(tenant="initech")
        assert balance.spent == usd(0.05)


def test_a_wrong_api_key_is_unauthorized(server: ServerThread) -> None:
    with Cycles(server.url, api_key="cyc_nope") as cy, pytest.raises(Unauthorized):
        cy.reserve(SUBJECT, ACTION, usd(0.01))
