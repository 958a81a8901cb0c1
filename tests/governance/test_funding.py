"""fundBudget over HTTP on every ledger: all five operations with the spec's response and events,
refusals with the spec's codes, idempotent replay, permissions, audit before/after, and threshold
alerts re-armed by funding at exactly the next real crossing (never fired by the funding itself)."""

from __future__ import annotations

import contextlib
import json
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import ADMIN_KEY, Api
from .spec import admin_validator
from .test_alerts_webhooks import crossings, spend

USD = "USD_MICROCENTS"
Q = "tenant_id=acme&scope=tenant:acme&unit=USD_MICROCENTS"


def usd(n: int) -> dict[str, Any]:
    return {"unit": USD, "amount": n}


def fund(api: Api, operation: str, amount: int, query: str = Q, **body: Any) -> httpx.Response:
    return api.a(
        "POST", f"/v1/admin/budgets/fund?{query}", json={"operation": operation, "amount": usd(amount), **body}
    )


def figures(api: Api, scope: str = "tenant:acme") -> tuple[int, ...]:
    b = api.a("GET", f"/v1/admin/budgets/lookup?scope={scope}&unit={USD}").json()
    return tuple(b[k]["amount"] for k in ("allocated", "spent", "reserved", "debt", "remaining"))


def budget_events(api: Api) -> list[dict[str, Any]]:
    events = api.a("GET", "/v1/admin/events?category=budget&sort_dir=asc&limit=100").json()["events"]
    return [e for e in events if e["data"].get("operation") not in (None, "CREATE")]


def acme(api: Api, allocated: int, overdraft: int = 0) -> str:
    """Tenant acme with a USD budget at tenant:acme; returns a tenant key that can spend."""
    api.tenant("acme")
    body = {"tenant_id": "acme", "scope": "tenant:acme", "unit": USD, "allocated": usd(allocated)}
    if overdraft:
        body["overdraft_limit"] = usd(overdraft)
    assert api.a("POST", "/v1/admin/budgets", json=body).status_code == 201
    return api.key("acme")


def run_into_debt(api: Api, key: str, held: int, actual: int) -> None:
    r = api.k(key, "POST", "/v1/reservations",
              json={"idempotency_key": uuid.uuid4().hex, "subject": {"tenant": "acme"},
                    "action": {"kind": "llm", "name": "m"}, "estimate": usd(held),
                    "overage_policy": "ALLOW_WITH_OVERDRAFT"})  # fmt: skip
    assert r.status_code == 200, r.text
    done = api.k(key, "POST", f"/v1/reservations/{r.json()['reservation_id']}/commit",
                 json={"idempotency_key": uuid.uuid4().hex, "actual": usd(actual)})  # fmt: skip
    assert done.status_code == 200, done.text


def test_all_five_operations_answer_and_announce_as_the_spec_says(api: Api) -> None:
    key = acme(api, 1000, overdraft=500)
    run_into_debt(api, key, 1000, 1100)  # spent 1000, debt 100
    assert figures(api) == (1000, 1000, 0, 100, -100)
    steps = [
        ("CREDIT", 300, {}, (1300, 1000, 0, 100, 200)),  # debt kept
        ("REPAY_DEBT", 100, {}, (1400, 1100, 0, 0, 300)),
        ("DEBIT", 250, {}, (1150, 1100, 0, 0, 50)),
        ("RESET", 2000, {}, (2000, 1100, 0, 0, 900)),
        ("RESET_SPENT", 1500, {}, (1500, 0, 0, 0, 1500)),
        ("RESET_SPENT", 1500, {"spent": usd(40)}, (1500, 40, 0, 0, 1460)),
        ("CREDIT", 10, {"spent": usd(999)}, (1510, 40, 0, 0, 1470)),  # spent: ignored but for RESET_SPENT
    ]
    before = figures(api)
    for operation, amount, extra, after in steps:
        r = fund(api, operation, amount, **extra, reason=f"{operation.lower()} for the test")
        assert r.status_code == 200, r.text
        body = r.json()
        admin_validator("BudgetFundingResponse").validate(body)
        assert body["operation"] == operation
        assert (body["previous_allocated"]["amount"], body["new_allocated"]["amount"]) == (before[0], after[0])
        assert (body["previous_spent"]["amount"], body["new_spent"]["amount"]) == (before[1], after[1])
        assert (body["previous_debt"]["amount"], body["new_debt"]["amount"]) == (before[3], after[3])
        assert (body["previous_remaining"]["amount"], body["new_remaining"]["amount"]) == (before[4], after[4])
        assert figures(api) == after
        before = after
    events = budget_events(api)
    assert [e["event_type"] for e in events] == [
        "budget.funded", "budget.debt_repaid", "budget.debited", "budget.reset",
        "budget.reset_spent", "budget.reset_spent", "budget.funded",
    ]  # fmt: skip
    for e in events:
        admin_validator("EventDataBudgetLifecycle").validate(e["data"])
        assert e["tenant_id"] == "acme" and e["scope"] == "tenant:acme"
        assert e["data"]["reason"] == f"{e['data']['operation'].lower()} for the test"
    routine, migrated = events[4]["data"], events[5]["data"]
    assert routine["spent_override_provided"] is False and migrated["spent_override_provided"] is True
    assert routine["previous_state"]["spent"] == 1100 and routine["new_state"]["spent"] == 0
    assert routine["previous_state"]["reserved"] == 0 and migrated["new_state"]["spent"] == 40
    assert "spent_override_provided" not in events[0]["data"]
    # every call audited with the budget before and after
    logs = api.a("GET", "/v1/admin/audit/logs?operation=fundBudget&sort_dir=asc").json()["logs"]
    assert len(logs) == len(steps)
    first = logs[0]["metadata"]
    assert first["before"]["allocated"]["amount"] == 1000 and first["after"]["allocated"]["amount"] == 1300
    assert first["reason"] == "credit for the test" and logs[0]["resource_id"]


def test_refusals_carry_the_spec_codes_and_change_nothing(api: Api) -> None:
    acme(api, 1000)
    start = figures(api)
    refused = [
        (fund(api, "DEBIT", 1001), 409, "BUDGET_EXCEEDED"),
        (fund(api, "REPAY_DEBT", 1), 400, "INVALID_REQUEST"),  # no debt
        (fund(api, "CREDIT", 0), 400, "INVALID_REQUEST"),
        (fund(api, "TOP_UP", 5), 400, "INVALID_REQUEST"),
        # the admin key must name the tenant
        (fund(api, "CREDIT", 5, query="scope=tenant:acme&unit=USD_MICROCENTS"), 400, "INVALID_REQUEST"),
        (fund(api, "CREDIT", 5, query="tenant_id=acme&scope=tenant:acme/workspace:x&unit=USD_MICROCENTS"),
         404, "BUDGET_NOT_FOUND"),
        (fund(api, "CREDIT", 5, query="tenant_id=acme&scope=tenant:acme&unit=TOKENS"), 400, "UNIT_MISMATCH"),
    ]  # fmt: skip
    for r, status, code in refused:
        assert (r.status_code, r.json()["error"]) == (status, code), r.text
    q = "scope=tenant:acme&unit=USD_MICROCENTS"
    assert api.a("POST", f"/v1/admin/budgets/freeze?{q}").status_code == 200
    frozen = fund(api, "CREDIT", 5)
    assert (frozen.status_code, frozen.json()["error"]) == (409, "BUDGET_FROZEN")
    assert figures(api) == start
    assert [e["event_type"] for e in budget_events(api)] == ["budget.frozen"]
    failed = api.a("GET", "/v1/admin/audit/logs?operation=fundBudget&status_min=400").json()["logs"]
    assert len(failed) == len(refused) + 1


def test_the_same_key_replays_and_another_request_under_it_is_refused(api: Api) -> None:
    acme(api, 1000)
    first = fund(api, "CREDIT", 100, idempotency_key="topup-2026-12")
    again = fund(api, "CREDIT", 100, idempotency_key="topup-2026-12")
    assert again.status_code == 200 and again.json() == first.json()
    assert figures(api)[0] == 1100
    assert [e["event_type"] for e in budget_events(api)] == ["budget.funded"]  # one event: applied once
    other = fund(api, "CREDIT", 101, idempotency_key="topup-2026-12")
    assert (other.status_code, other.json()["error"]) == (409, "IDEMPOTENCY_MISMATCH")
    assert figures(api)[0] == 1100
    replayed = api.a("GET", "/v1/admin/audit/logs?operation=fundBudget&sort_dir=asc").json()["logs"][1]
    assert replayed["metadata"]["replayed"] is True


def test_funding_needs_budgets_write_within_the_keys_tenant_and_scope(api: Api) -> None:
    acme(api, 1000)
    api.tenant("rival")
    ws = "tenant:acme/workspace:prod"
    created = api.a(
        "POST", "/v1/admin/budgets", json={"tenant_id": "acme", "scope": ws, "unit": USD, "allocated": usd(100)}
    )
    assert created.status_code == 201
    body = {"operation": "CREDIT", "amount": usd(5)}
    path = f"/v1/admin/budgets/fund?scope=tenant:acme&unit={USD}"
    reader = api.key("acme", permissions=["budgets:read"])
    r = api.k(reader, "POST", path, json=body)
    assert r.status_code == 403 and "budgets:write" in r.json()["message"]
    rival = api.key("rival", permissions=["budgets:write"])
    assert api.k(rival, "POST", path, json=body).status_code == 403
    narrow = api.key("acme", permissions=["budgets:write"], scope_filter=["workspace:prod"])
    assert api.k(narrow, "POST", path, json=body).status_code == 403
    assert api.k(narrow, "POST", f"/v1/admin/budgets/fund?scope={ws}&unit={USD}", json=body).status_code == 200
    writer = api.key("acme", permissions=["budgets:write"])
    ok = api.k(writer, "POST", path, json=body)
    assert ok.status_code == 200 and ok.json()["new_allocated"]["amount"] == 1005
    assert figures(api) == (1005, 0, 0, 0, 1005) and figures(api, ws)[0] == 105


def test_funding_re_arms_thresholds_for_the_next_real_crossing_only(api: Api) -> None:
    key = acme(api, 1000)
    who = {"tenant": "acme"}
    spend(api, key, who, 800)  # 80%
    assert crossings(api, "tenant:acme") == [("budget.threshold_crossed", 0.8)]
    assert fund(api, "CREDIT", 1000).status_code == 200  # 800 / 2000 = 40%: re-armed, nothing announced
    assert fund(api, "DEBIT", 100).status_code == 200  # 800 / 1900: still below 80%
    assert crossings(api, "tenant:acme") == [("budget.threshold_crossed", 0.8)]
    spend(api, key, who, 719)  # 1519 / 1900 = 79.9%
    assert len(crossings(api, "tenant:acme")) == 1
    spend(api, key, who, 1)  # 1520 / 1900 = 80%: the next real crossing
    assert crossings(api, "tenant:acme") == [("budget.threshold_crossed", 0.8)] * 2
    assert fund(api, "RESET", 1850).status_code == 200  # 82%: the same band, nothing again
    assert fund(api, "CREDIT", 1).status_code == 200
    assert len(crossings(api, "tenant:acme")) == 2
    assert fund(api, "DEBIT", 250).status_code == 200  # 1520 / 1601 = 94.9%: funding, no new crossing
    assert len(crossings(api, "tenant:acme")) == 2
    assert fund(api, "DEBIT", 1).status_code == 200  # 1520 / 1600 = 95%: a real crossing, once
    assert crossings(api, "tenant:acme")[2:] == [("budget.threshold_crossed", 0.95)]
    assert fund(api, "RESET_SPENT", 1600).status_code == 200  # a new billing period: all marks fall
    spend(api, key, who, 1279)
    assert len(crossings(api, "tenant:acme")) == 3
    spend(api, key, who, 1)  # 1280 / 1600 = 80% of the new period
    spend(api, key, who, 240)  # 95%
    assert crossings(api, "tenant:acme")[3:] == [("budget.threshold_crossed", 0.8), ("budget.threshold_crossed", 0.95)]
    replay = fund(api, "RESET_SPENT", 1600, idempotency_key="period-2")
    assert fund(api, "RESET_SPENT", 1600, idempotency_key="period-2").json() == replay.json()
    spend(api, key, who, 1280)  # 80% once more after the (single) reset
    assert crossings(api, "tenant:acme")[5:] == [("budget.threshold_crossed", 0.8)]


def test_bulk_funding_applies_every_operation_once_per_key(api: Api) -> None:
    api.tenant("acme")
    for ws in ("a", "b"):
        body = {"tenant_id": "acme", "scope": f"tenant:acme/workspace:{ws}", "unit": USD, "allocated": usd(100)}
        assert api.a("POST", "/v1/admin/budgets", json=body).status_code == 201
    bulk = {"filter": {"tenant_id": "acme", "scope_prefix": "tenant:acme/workspace:"}, "action": "RESET_SPENT",
            "amount": usd(300), "spent": usd(20), "idempotency_key": "period-2026-12"}  # fmt: skip
    done = api.a("POST", "/v1/admin/budgets/bulk-action", json=bulk).json()
    assert len(done["succeeded"]) == 2 and not done["failed"]
    again = api.a("POST", "/v1/admin/budgets/bulk-action", json=bulk).json()
    assert len(again["succeeded"]) == 2
    for ws in ("a", "b"):
        assert figures(api, f"tenant:acme/workspace:{ws}") == (300, 20, 0, 0, 280)
    assert len(api.a("GET", "/v1/admin/events?event_type=budget.reset_spent").json()["events"]) == 2
    repay = api.a("POST", "/v1/admin/budgets/bulk-action",
                  json={**bulk, "action": "REPAY_DEBT", "amount": usd(1), "idempotency_key": "r"}).json()  # fmt: skip
    assert [f["error_code"] for f in repay["failed"]] == ["INVALID_REQUEST"] * 2  # no debt to repay


# ---- the same from Python and the command line, embedded and against a server ---------------------


def test_the_operator_funds_an_embedded_ledger(tmp_path: Path) -> None:
    from cycles import Cycles, IdempotencyMismatch, usd

    with Cycles(f"sqlite:///{tmp_path}/op.db") as cy, cy.operator as op:
        op.tenants.create("acme", "Acme")
        op.budgets.create("tenant:acme", usd(10))
        body = op.budgets.fund("tenant:acme", "RESET_SPENT", usd(20), spent=usd(2), idempotency_key="p1")
        admin_validator("BudgetFundingResponse").validate(body)
        assert body["new_spent"]["amount"] == usd(2).amount and body["new_allocated"]["amount"] == usd(20).amount
        assert op.budgets.fund("tenant:acme", "RESET_SPENT", usd(20), spent=usd(2), idempotency_key="p1") == body
        with pytest.raises(IdempotencyMismatch):
            op.budgets.fund("tenant:acme", "RESET_SPENT", usd(21), idempotency_key="p1")
        assert [e["event_type"] for e in op.events(event_type="budget.reset_spent")] == ["budget.reset_spent"]
        assert cy.budgets.get("tenant:acme").remaining.amount == usd(18).amount


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    from cycles.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("where", ["embedded", "server"])
def test_cycles_budgets_fund_every_operation(
    where: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path}/cli.db"
    with contextlib.ExitStack() as stack:
        if where == "server":
            from cycles.server import create_app
            from cycles.server.testing import ServerThread

            url = stack.enter_context(ServerThread(create_app(url, admin_key=ADMIN_KEY, sweep_interval_s=0))).url
            monkeypatch.setenv("CYCLES_ADMIN_KEY", ADMIN_KEY)
        base = ("--ledger", url)
        assert run(capsys, "tenants", "create", "acme", "--name", "Acme", *base)[0] == 0
        assert run(capsys, "budgets", "create", "tenant:acme", "100", "--unit", "tokens", *base)[0] == 0
        fund = ("budgets", "fund", "tenant:acme", "--unit", "tokens")
        code, out, _ = run(capsys, *fund, "50", "--operation", "debit", *base)
        assert code == 0 and "DEBIT: allocated 50" in out
        code, out, _ = run(capsys, *fund, "80", "--operation", "RESET_SPENT", "--spent", "5", "--json",
                           "--idempotency-key", "p2", *base)  # fmt: skip
        body = json.loads(out)
        admin_validator("BudgetFundingResponse").validate(body)
        assert code == 0 and body["new_spent"]["amount"] == 5 and body["new_remaining"]["amount"] == 75
        code, again, _ = run(capsys, *fund, "80", "--operation", "RESET_SPENT", "--spent", "5", "--json",
                             "--idempotency-key", "p2", *base)  # fmt: skip
        assert code == 0 and json.loads(again) == body
        code, out, err = run(capsys, *fund, "1", "--operation", "REPAY_DEBT", *base)
        assert code != 0 and out == "" and len(err.strip().splitlines()) == 1 and "INVALID_REQUEST" in err
        code, _, err = run(capsys, *fund, "76", "--operation", "DEBIT", *base)
        assert code != 0 and len(err.strip().splitlines()) == 1 and "BUDGET_EXCEEDED" in err
        code, _, err = run(capsys, *fund, "1", "--operation", "TOP_UP", *base)
        assert code == 2  # a usage error, from argparse
        code, out, _ = run(capsys, "budgets", "show", "tenant:acme", "--unit", "tokens", "--json", *base)
        assert json.loads(out)["remaining"]["amount"] == 75


def test_overdraft_changes_beside_fundings_lose_none_of_them(api: Api) -> None:
    """PATCH changes the limit alone in one ledger step, so no funding that lands beside it is
    undone (re-setting an allocation read a moment before would drop it)."""
    acme(api, 1000)
    query = f"scope=tenant:acme&unit={USD}"

    def step(i: int) -> int:
        if i % 2:
            return fund(api, "CREDIT", 10).status_code
        return api.a("PATCH", f"/v1/admin/budgets?{query}", json={"overdraft_limit": usd(i)}).status_code

    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(step, range(80))) == {200}
    assert figures(api) == (1000 + 40 * 10, 0, 0, 0, 1400)
    b = api.a("GET", f"/v1/admin/budgets/lookup?{query}").json()
    assert b["overdraft_limit"]["amount"] in range(0, 80, 2)
