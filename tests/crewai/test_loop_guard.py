"""The loop guard through the CrewAI tool hooks: a tool call's name and canonical arguments are its
fingerprint (``cycles.with_args_fingerprint``); the same call repeated past the guard is blocked the
way the adapter blocks any denied tool (the model reads why), the same tool with other arguments
runs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from crewai_fakes import CRM, ScriptedLLM, answer, crew_of, react_call, tool_call

import cycles_crewai
from cycles import Cycles, ReservationStatus, Subject, risk_points, usd

COSTS = {"read_crm": 1, "update_crm": 25, "deploy": 50}


def _script(call: Callable[..., Any]) -> list[Any]:
    # Never the same call twice in a row: CrewAI's ReAct parser refuses an immediate repeat itself.
    return [
        call("read_crm", case_id="42"),
        call("read_crm", case_id="43"),  # other arguments run
        call("read_crm", case_id="42"),
        call("read_crm", case_id="44"),
        call("read_crm", case_id="42"),  # a third identical call: the loop guard (2) blocks it
        "Thought: I kept re-reading case 42.\nFinal Answer: printer replaced.",
    ]


@pytest.mark.parametrize("native", [True, False], ids=["native-tool-calls", "react-text"])
def test_a_crew_repeating_one_tool_call_is_stopped_by_the_loop_guard(
    cy: Cycles, subject: Subject, native: bool
) -> None:
    cy.budgets.set("tenant:acme", usd(10))
    cy.budgets.set("tenant:acme", risk_points(100))
    cy.quotas.set_loop_guard("tenant:acme", 2)
    crm = CRM()
    llm = ScriptedLLM(script=_script(tool_call if native else react_call), native=native)
    with cycles_crewai.enable(cy, subject, tool_costs=COSTS) as hooks:
        out = crew_of(llm, crm.tools()).kickoff()

    assert crm.ran == ["read_crm"] * 4  # 42, 43, 42, 44; the third 42 was blocked
    assert "printer replaced" in answer(out)
    assert "BLOCKED by Cycles: 'read_crm' was not run" not in llm.transcript(4)
    assert "BLOCKED by Cycles: 'read_crm' was not run" in llm.transcript(5)
    assert "loop detected" in llm.transcript(5)
    (run,) = hooks.runs
    tools = cy.list_reservations(tenant="acme", status=ReservationStatus.COMMITTED).reservations
    assert sum(1 for r in tools if r.action.name == "read_crm" and r.subject.workflow == run) == 4
