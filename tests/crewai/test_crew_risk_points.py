"""Consequential tools are capped per run by a RISK_POINTS budget, independent of the USD one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from crewai_fakes import CRM, ScriptedLLM, answer, crew_of, react_call, run_spent, tool_call

import cycles_crewai
from cycles import (
    BudgetExceeded,
    Caps,
    Cycles,
    ReservationStatus,
    Subject,
    ToolNotAllowed,
    Unit,
    risk_points,
    usd,
)
from cycles_crewai import BudgetStop

RISK = {"read_crm": 1, "update_crm": 25, "deploy": 50}


def _script(call: Callable[..., Any] = tool_call) -> list[Any]:
    return [
        call("read_crm", case_id="42"),
        call("update_crm", case_id="42", note="replacing the printer"),
        call("deploy", service="printer-firmware"),  # 1 + 25 + 50 > 60: denied
        call("read_crm", case_id="43"),  # cheap tools keep working after the denial
        "Thought: deploy was blocked.\nFinal Answer: escalated the firmware deploy to a human.",
    ]


SCRIPT = _script()


def _risk_spent(cy: Cycles, run: str) -> int:
    return int(run_spent(cy, run, Unit.RISK_POINTS).amount)


@pytest.mark.parametrize("native", [True, False], ids=["native-tool-calls", "react-text"])
def test_a_consequential_tool_is_denied_while_cheap_tools_keep_working(
    cy: Cycles, subject: Subject, native: bool
) -> None:
    cy.budgets.set("tenant:acme", usd(10))
    crm = CRM()
    llm = ScriptedLLM(script=_script(tool_call if native else react_call), native=native)
    with cycles_crewai.enable(cy, subject, tool_costs=RISK, run_budgets=[risk_points(60)]) as hooks:
        out = crew_of(llm, crm.tools()).kickoff()

    assert crm.ran == ["read_crm", "update_crm", "read_crm"]  # deploy never ran
    assert "escalated" in answer(out)
    # What the model was told after asking for deploy:
    assert "BLOCKED by Cycles: 'deploy' was not run (BUDGET_EXCEEDED" in llm.transcript(3)
    (run,) = hooks.runs
    assert _risk_spent(cy, run) == 27
    tools = cy.list_reservations(tenant="acme", status=ReservationStatus.COMMITTED).reservations
    assert sorted(r.action.name for r in tools if r.action.kind == "tool.call") == [
        "read_crm",
        "read_crm",
        "update_crm",
    ]
    # The model calls went to the USD budget: five of them at $0.30.
    assert cy.budgets.get("tenant:acme", unit=Unit.USD_MICROCENTS).spent == usd("1.50")


def test_hard_mode_stops_the_crew_at_the_denied_tool(cy: Cycles, subject: Subject) -> None:
    cy.budgets.set("tenant:acme", usd(10))
    crm, llm = CRM(), ScriptedLLM(script=SCRIPT)
    per_run = [risk_points(60)]
    hard = cycles_crewai.enable(cy, subject, tool_costs=RISK, run_budgets=per_run, on_tool_deny="hard")
    with hard, pytest.raises(BudgetStop) as stopped:
        crew_of(llm, crm.tools()).kickoff()
    assert crm.ran == ["read_crm", "update_crm"]
    assert llm.calls == 3
    assert isinstance(stopped.value.error, BudgetExceeded)
    assert str(stopped.value.error.scope).startswith("tenant:acme/workflow:")


def test_each_run_gets_a_fresh_risk_budget(cy: Cycles, subject: Subject) -> None:
    cy.budgets.set("tenant:acme", usd(10))
    with cycles_crewai.enable(cy, subject, tool_costs=RISK, run_budgets=[risk_points(30)]) as hooks:
        for _ in range(2):
            crm = CRM()
            llm = ScriptedLLM(
                script=[
                    tool_call("update_crm", case_id="1", note="n"),
                    tool_call("update_crm", case_id="2", note="n"),
                    "Final Answer: done.",
                ]
            )
            crew_of(llm, crm.tools()).kickoff()
            assert crm.ran == ["update_crm"]  # 25 + 25 > 30 in each run, whatever the last run spent
    assert [_risk_spent(cy, run) for run in hooks.runs] == [25, 25]


def test_budget_caps_deny_a_tool_by_name(cy: Cycles, subject: Subject) -> None:
    # The USD budget's caps ride on the model call's grant and apply to the tools it chooses, priced or not.
    cy.budgets.set("tenant:acme", usd(10), caps=Caps(tool_denylist=["deploy"]))
    crm = CRM()
    llm = ScriptedLLM(
        script=[tool_call("deploy", service="x"), tool_call("read_crm", case_id="1"), "Final Answer: ok."]
    )
    with cycles_crewai.enable(cy, subject):
        crew_of(llm, crm.tools()).kickoff()
    assert crm.ran == ["read_crm"]
    assert llm.tool_results(1)[0].startswith("BLOCKED by Cycles: 'deploy' was not run (TOOL_NOT_ALLOWED")


def test_risk_budget_allowlist_caps_priced_tools(cy: Cycles, subject: Subject) -> None:
    cy.budgets.set("tenant:acme", usd(10))
    cy.budgets.set("tenant:acme", risk_points(100), caps=Caps(tool_allowlist=["read_crm"]))
    crm = CRM()
    llm = ScriptedLLM(
        script=[
            tool_call("update_crm", case_id="1", note="n"),
            tool_call("read_crm", case_id="1"),
            "Final Answer: ok.",
        ]
    )
    with (
        cycles_crewai.enable(cy, subject, tool_costs=RISK, on_tool_deny="hard"),
        pytest.raises(BudgetStop) as stop,
    ):
        crew_of(llm, crm.tools()).kickoff()
    assert crm.ran == []
    assert isinstance(stop.value.error, ToolNotAllowed)
    assert cy.budgets.get("tenant:acme", unit=Unit.RISK_POINTS).spent == risk_points(0)


def test_a_priced_tool_without_a_budget_in_its_unit_is_blocked(cy: Cycles, subject: Subject) -> None:
    cy.budgets.set("tenant:acme", usd(10))  # USD only: nothing to draw risk points from
    crm = CRM()
    llm = ScriptedLLM(script=[tool_call("update_crm", case_id="1", note="n"), "Final Answer: ok."])
    with cycles_crewai.enable(cy, subject, tool_costs=RISK):
        crew_of(llm, crm.tools()).kickoff()
    assert crm.ran == []
    assert "BLOCKED by Cycles: 'update_crm' was not run (UNIT_MISMATCH" in llm.tool_results(1)[0]


def test_shadow_mode_lets_denied_tools_run_and_records_them(subject: Subject) -> None:
    cy = Cycles("memory://", mode="shadow")
    cy.budgets.set("tenant:acme", usd(10), caps=Caps(tool_denylist=["read_crm"]))
    crm = CRM()
    llm = ScriptedLLM(
        script=[tool_call("read_crm", case_id="1"), tool_call("deploy", service="x"), "Final Answer: ok."]
    )
    with cycles_crewai.enable(cy, subject, tool_costs=RISK, run_budgets=[risk_points(10)]):
        crew_of(llm, crm.tools()).kickoff()
    assert crm.ran == ["read_crm", "deploy"]
    assert [(r.action.name, r.reason_code) for r in cy.shadow_log] == [
        ("read_crm", "TOOL_NOT_ALLOWED"),
        ("deploy", "BUDGET_EXCEEDED"),
    ]
