"""The gate in process, on a real in-memory ledger: what it reserves, refuses and settles."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from cycles import AsyncCycles, ReservationStatus, Unit, risk_points
from cycles.testing import assert_ledger_invariant_async
from cycles_mcp.gate import Admission, Gate
from cycles_mcp.policy import parse_policy

POLICY = """
tenant = "acme"
deny = ["drop_*"]
session_budget = [{ risk_points = 60 }, { usd = 0.01 }]

[tools."preview"]
cost = { risk_points = 5, usd = 0.02 }

[tools."deploy"]
cost = { risk_points = 50 }

[tools."paid_api"]
cost = { risk_points = 10 }
on_failure = "charge"
"""


@pytest.fixture
async def cycles() -> AsyncIterator[AsyncCycles]:
    async with AsyncCycles("memory://") as cy:
        yield cy


async def _statuses(cy: AsyncCycles) -> dict[str, list[ReservationStatus]]:
    out: dict[str, list[ReservationStatus]] = {}
    for r in (await cy.list_reservations(tenant="acme")).reservations:
        out.setdefault(r.action.name, []).append(r.status)
    return out


async def test_a_cost_in_several_units_is_all_or_none(cycles: AsyncCycles) -> None:
    gate = Gate(parse_policy(POLICY), cycles)
    run = gate.new_run()
    admission = await gate.admit(run, "preview")  # 5 risk points fit, $0.02 does not fit $0.01
    assert not admission.allowed and admission.guards == []
    assert admission.refusal is not None and "$0.0100 left" in admission.refusal
    assert await _statuses(cycles) == {"preview": [ReservationStatus.RELEASED]}  # the risk step, released
    balance = await cycles.budgets.get(run.scope, unit=Unit.RISK_POINTS)
    assert balance.reserved == risk_points(0) and balance.spent == risk_points(0)
    await gate.end_run(run)
    await assert_ledger_invariant_async(cycles)


async def test_failed_calls_are_released_unless_the_tool_bills_anyway(cycles: AsyncCycles) -> None:
    gate = Gate(parse_policy(POLICY), cycles)
    run = gate.new_run()

    async def tool_error() -> str:
        return "error"

    for tool in ("deploy", "paid_api"):
        result = await gate.call(run, tool, tool_error, failed=lambda r: r == "error")
        assert result == "error"
    statuses = await _statuses(cycles)
    assert statuses == {"deploy": [ReservationStatus.RELEASED], "paid_api": [ReservationStatus.COMMITTED]}
    assert (await cycles.budgets.get(run.scope, unit=Unit.RISK_POINTS)).spent == risk_points(10)

    async def crash() -> str:
        raise ConnectionError("upstream went away")

    with pytest.raises(ConnectionError):
        await gate.call(run, "deploy", crash, failed=lambda r: False)
    assert (await cycles.budgets.get(run.scope, unit=Unit.RISK_POINTS)).reserved == risk_points(0)
    await gate.end_run(run)
    await assert_ledger_invariant_async(cycles)


async def test_refusals_name_the_budget_and_what_to_do(cycles: AsyncCycles) -> None:
    no_session = parse_policy('tenant = "acme"\n[tools."deploy"]\ncost = { risk_points = 50 }\n')
    gate = Gate(no_session, cycles)
    run = gate.new_run()
    refused = await gate.admit(run, "deploy")
    assert not refused.allowed and refused.refusal is not None
    assert "No budget covers it" in refused.refusal and "cycles budget set" in refused.refusal

    await cycles.budgets.set("tenant:acme", risk_points(30))
    refused = await gate.admit(run, "deploy")
    assert refused.refusal is not None
    assert "The budget tenant:acme has 30 risk points left" in refused.refusal
    assert "cycles budget fund tenant:acme" in refused.refusal
    await gate.end_run(run)


async def test_shadow_mode_records_the_deny_list_and_the_budget(cycles: AsyncCycles) -> None:
    gate = Gate(parse_policy(POLICY), cycles, shadow=True)
    run = gate.new_run()
    denied = await gate.admit(run, "drop_table")
    assert denied.allowed and denied.shadow_denied
    over = await gate.admit(run, "preview")
    assert over.allowed and over.shadow_denied
    await gate.settle(over, ran=True)
    codes = [(r.action.name, r.reason_code) for r in cycles.shadow_log]
    assert codes == [("drop_table", "TOOL_DENIED"), ("preview", "BUDGET_EXCEEDED")]
    await gate.end_run(run)


async def test_ungated_and_unmatched_tools_touch_no_ledger(cycles: AsyncCycles) -> None:
    gate = Gate(parse_policy('tenant = "acme"\nsession_budget = { risk_points = 5 }\n'), cycles)
    run = gate.new_run()
    admission = await gate.admit(run, "anything")
    assert admission == Admission(admission.match, True)
    assert run.state == "new"  # nothing gated yet: the session's run has not even started
    assert await cycles.budgets.list(tenant="acme") == []
    await gate.end_run(run)


async def test_session_budgets_are_per_run(cycles: AsyncCycles) -> None:
    gate = Gate(parse_policy(POLICY), cycles)
    first, second = gate.new_run(), gate.new_run()
    assert (await gate.admit(first, "deploy")).allowed
    assert not (await gate.admit(first, "deploy")).allowed  # 10 left in the first session
    assert (await gate.admit(second, "deploy")).allowed  # the second has its own 60
    assert first.scope != second.scope
    for run in (first, second):
        await gate.end_run(run)  # the open steps are settled by the core's rule: never begun, released
    balances = {b.scope: b for b in await cycles.budgets.list(tenant="acme") if b.remaining.unit is Unit.RISK_POINTS}
    assert all(b.reserved is not None and b.reserved.amount == 0 for b in balances.values())
