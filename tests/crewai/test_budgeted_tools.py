"""``budgeted(tool, ...)``: every run of one tool reserves first, commits after, releases on failure."""

from __future__ import annotations

from typing import Any

import pytest
from crewai.tools import BaseTool, tool
from crewai.tools.tool_failure import ToolExecutionFailedError, ToolFailure
from crewai_fakes import CRM, ScriptedLLM, answer, crew_of, tool_call

import cycles_crewai
from cycles import Action, BudgetExceeded, Cycles, ReservationStatus, Subject, Unit, risk_points, usd
from cycles_crewai import BudgetedTool, budgeted, denial_of

CASE = Subject(tenant="acme", workflow="case-42")


def _update_twice() -> ScriptedLLM:
    return ScriptedLLM(
        script=[
            tool_call("update_crm", case_id="42", note="first"),
            tool_call("update_crm", case_id="42", note="second"),
            "Final Answer: noted.",
        ]
    )


def _statuses(cy: Cycles) -> list[str]:
    return sorted(r.status.value for r in cy.list_reservations(tenant="acme").reservations)


def test_a_denied_run_is_reported_to_the_agent(cy: Cycles) -> None:
    cy.budgets.set("tenant:acme/workflow:case-42", risk_points(30))
    crm = CRM()
    read, update, _ = crm.tools()
    update = budgeted(update, estimate=risk_points(25), cycles=cy, subject=CASE)
    assert isinstance(update, BudgetedTool) and update.name == "update_crm"

    llm = _update_twice()
    out = crew_of(llm, [read, update]).kickoff()  # no enable(): only the tool is under budget

    assert crm.ran == ["update_crm"]
    assert "noted" in answer(out)
    assert llm.tool_results(2)[-1].startswith("BLOCKED by Cycles: 'update_crm' was not run (BUDGET_EXCEEDED")
    assert cy.budgets.get("tenant:acme/workflow:case-42").spent == risk_points(25)
    assert _statuses(cy) == ["COMMITTED"]


def test_hard_mode_stops_the_crew(cy: Cycles) -> None:
    cy.budgets.set("tenant:acme/workflow:case-42", risk_points(30))
    crm = CRM()
    update = budgeted(crm.tools()[1], estimate=risk_points(25), cycles=cy, subject=CASE, on_deny="hard")
    with pytest.raises(ToolExecutionFailedError) as stopped:
        crew_of(_update_twice(), [update]).kickoff()
    assert crm.ran == ["update_crm"]
    denial = denial_of(stopped.value)
    assert isinstance(denial, BudgetExceeded) and denial.scope == "tenant:acme/workflow:case-42"


def test_decorates_tool_functions_and_basetool_subclasses(cy: Cycles) -> None:
    cy.budgets.set("tenant:acme", usd("1.005"))
    ran: list[str] = []

    @budgeted(
        estimate=lambda args: usd(0.01 * len(args["query"])),
        cycles=cy,
        subject=CASE,
        actual=lambda result: usd(0.005),
    )
    @tool("search")
    def search(query: str) -> str:
        """Search the web."""
        ran.append(query)
        return f"results for {query}"

    @budgeted(estimate=usd(0.25), cycles=cy, subject=CASE, action=Action("tool.email", "send_email"))
    class SendEmail(BaseTool):
        name: str = "send_email"
        description: str = "Email the customer."

        def _run(self, to: str, body: str) -> str:
            ran.append(to)
            return "sent"

    assert search.run(query="printer") == "results for printer"
    email = SendEmail()
    assert set(email.args_schema.model_json_schema()["properties"]) == {"to", "body"}
    assert email.run(to="bob@example.com", body="hi") == "sent"
    for _ in range(3):
        email.run(to="bob@example.com", body="again")  # $0.25 each after the $0.005 search: four fit
    blocked = email.run(to="bob@example.com", body="once more")
    assert isinstance(blocked, ToolFailure) and blocked.code == "BUDGET_EXCEEDED"
    assert ran == ["printer", "bob@example.com", "bob@example.com", "bob@example.com", "bob@example.com"]
    assert cy.budgets.get("tenant:acme").spent == usd(0.005) + usd(1.0)
    committed = cy.list_reservations(tenant="acme", status=ReservationStatus.COMMITTED).reservations
    assert {(r.action.kind, r.action.name) for r in committed} == {
        ("tool.call", "search"),
        ("tool.email", "send_email"),
    }


def test_a_failed_run_is_released(cy: Cycles) -> None:
    cy.budgets.set("tenant:acme", risk_points(10))

    @budgeted(estimate=risk_points(5), cycles=cy, subject=CASE)
    @tool("flaky")
    def flaky(mode: str) -> Any:
        """Fail one way or another."""
        if mode == "raise":
            raise RuntimeError("upstream 500")
        return ToolFailure(message="Slack said ok=false")

    with pytest.raises(RuntimeError):
        flaky.run(mode="raise")
    assert isinstance(flaky.run(mode="report"), ToolFailure)
    assert _statuses(cy) == ["RELEASED", "RELEASED"]
    assert cy.budgets.get("tenant:acme").spent == risk_points(0)


def test_inside_enable_a_budgeted_tool_uses_the_agent_and_run_subject(cy: Cycles, subject: Subject) -> None:
    cy.budgets.set("tenant:acme", usd(10))
    cy.budgets.set("tenant:acme", risk_points(100))
    crm = CRM()
    read, update, _ = crm.tools()
    update = budgeted(update, estimate=risk_points(25))  # client and subject come from enable()
    with cycles_crewai.enable(cy, subject, tool_costs={"update_crm": 99}) as hooks:  # no double charge
        crew_of(_update_twice(), [read, update]).kickoff()
    assert crm.ran == ["update_crm", "update_crm"]
    (run,) = hooks.runs
    tools = [r for r in cy.list_reservations(tenant="acme").reservations if r.action.kind == "tool.call"]
    assert len(tools) == 2
    assert {r.scope_path for r in tools} == {f"tenant:acme/workflow:{run}/agent:support-agent"}
    assert cy.budgets.get("tenant:acme", unit=Unit.RISK_POINTS).spent == risk_points(50)


def test_without_a_client_it_says_how_to_get_one() -> None:
    update = budgeted(CRM().tools()[1], estimate=risk_points(1))
    with pytest.raises(RuntimeError, match="enable"):
        update.run(case_id="1", note="n")
    with pytest.raises(ValueError, match="on_deny"):
        budgeted(estimate=risk_points(1), on_deny="maybe")  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="BaseTool"):
        budgeted(len, estimate=risk_points(1))  # type: ignore[call-overload]
