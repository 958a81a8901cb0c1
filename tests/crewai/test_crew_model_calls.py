"""Every model call of a real crew reserves first, commits its real usage, releases on failure."""

from __future__ import annotations

import pytest
from crewai_fakes import USAGE, ScriptedLLM, crew_of, lookup, tool_call
from cycles.testing import assert_ledger_invariant
from cycles import BudgetExceeded, Cycles, ReservationStatus, Subject, Unit, usd

import cycles_crewai
from cycles_crewai import BudgetStop, denial_of

CALL_COST = usd("0.30")  # 1,000 input + 500 output tokens of canned-model


def test_a_looping_crew_is_stopped_at_its_budget(cy: Cycles, subject: Subject) -> None:
    cy.budgets.set("tenant:acme", usd(1))
    llm = ScriptedLLM(script=[tool_call("lookup", q="again")])  # never gives a final answer
    with cycles_crewai.enable(cy, subject), pytest.raises(BudgetStop) as stopped:
        crew_of(llm, [lookup], max_iter=50).kickoff()

    # $1 pays for two $0.30 calls; the third one's ~$0.41 estimate no longer fits.
    assert llm.calls == 2
    assert isinstance(stopped.value.error, BudgetExceeded)
    assert denial_of(stopped.value) is stopped.value.error
    tenant = cy.budgets.get("tenant:acme")
    assert tenant.spent is not None and tenant.spent.amount == 2 * CALL_COST.amount
    assert tenant.reserved is not None and tenant.reserved.amount == 0


def test_actual_usage_is_committed_per_agent_and_run(cy: Cycles, subject: Subject) -> None:
    cy.budgets.set("tenant:acme", usd(5))
    llm = ScriptedLLM(script=["Thought: easy.\nFinal Answer: replaced the toner."])
    with cycles_crewai.enable(cy, subject) as hooks:
        out = crew_of(llm).kickoff()
    assert "toner" in out.raw

    (run,) = hooks.runs
    committed = cy.list_reservations(tenant="acme", status=ReservationStatus.COMMITTED).reservations
    assert len(committed) == 1
    (r,) = committed
    assert r.committed == CALL_COST
    assert r.action.kind == "llm.completion" and r.action.name == "canned-model"
    assert r.subject.workflow == run and r.subject.agent == "support-agent"
    assert r.subject.dimensions == {"task": "handle-case"}
    assert r.scope_path == f"tenant:acme/workflow:{run}/agent:support-agent"
    assert cy.budgets.get("tenant:acme").spent == CALL_COST


def test_run_budgets_cap_each_kickoff(cy: Cycles, subject: Subject) -> None:
    cy.budgets.set("tenant:acme", usd(5))
    with cycles_crewai.enable(cy, subject, run_budgets=[usd(0.5)]) as hooks:
        for _ in range(2):  # each run gets its own $0.50: one call fits, the second does not
            llm = ScriptedLLM(script=[tool_call("lookup", q="x")])
            with pytest.raises(BudgetStop):
                crew_of(llm, [lookup], max_iter=10).kickoff()
            assert llm.calls == 1
    assert len(set(hooks.runs)) == 2
    for run in hooks.runs:
        run_budget = cy.budgets.get(f"tenant:acme/workflow:{run}")
        assert run_budget.spent == CALL_COST
    assert cy.budgets.get("tenant:acme").spent == usd(0.6)


def test_a_failed_model_call_is_released(cy: Cycles, subject: Subject) -> None:
    cy.budgets.set("tenant:acme", usd(5))
    llm = ScriptedLLM(script=[RuntimeError("provider is down")])
    with cycles_crewai.enable(cy, subject), pytest.raises(RuntimeError, match="provider is down"):
        crew_of(llm).kickoff()
    assert llm.calls >= 1
    released = cy.list_reservations(tenant="acme", status=ReservationStatus.RELEASED).reservations
    assert len(released) == llm.calls
    tenant = cy.budgets.get("tenant:acme")
    assert tenant.spent is not None and tenant.spent.amount == 0


def test_calls_without_usage_commit_the_estimate(cy: Cycles, subject: Subject) -> None:
    cy.budgets.set("tenant:acme", usd(5))
    llm = ScriptedLLM(script=["Final Answer: done."], usage=None)
    with cycles_crewai.enable(cy, subject):
        crew_of(llm).kickoff()
    (r,) = cy.list_reservations(tenant="acme", status=ReservationStatus.COMMITTED).reservations
    assert r.committed == r.reserved and r.reserved.unit is Unit.USD_MICROCENTS
    assert r.reserved.amount > CALL_COST.amount


def test_an_unpriced_model_stops_the_crew_instead_of_running_unaccounted(cy: Cycles, subject: Subject) -> None:
    cy.budgets.set("tenant:acme", usd(5))
    llm = ScriptedLLM(model="no-such-model-anywhere", script=["Final Answer: done."])
    with cycles_crewai.enable(cy, subject), pytest.raises(BudgetStop, match="register_price"):
        crew_of(llm).kickoff()
    assert llm.calls == 0


def test_shadow_mode_never_blocks_and_records_would_denies(subject: Subject) -> None:
    cy = Cycles("memory://", mode="shadow")
    cy.budgets.set("tenant:acme", usd(0.5))
    llm = ScriptedLLM(script=[tool_call("lookup", q="x"), tool_call("lookup", q="x"), "Final Answer: done."])
    with cycles_crewai.enable(cy, subject):
        crew_of(llm, [lookup]).kickoff()
    assert llm.calls == 3
    # $0.50 pays for the first call; the other two would have been denied (the second overspends).
    assert [r.action.kind for r in cy.shadow_log] == ["llm.completion", "llm.completion"]
    assert cy.shadow_log[0].reason_code == "BUDGET_EXCEEDED"
    tenant = cy.budgets.get("tenant:acme")
    assert tenant.spent == usd("0.50") and tenant.is_over_limit  # the overspend is on the books
    assert_ledger_invariant(cy)


def test_direct_llm_calls_are_guarded_too(cy: Cycles, subject: Subject) -> None:
    cy.budgets.set("tenant:acme", usd(0.5))
    llm = ScriptedLLM(script=["hello"])
    with cycles_crewai.enable(cy, subject):
        assert llm.call("hi") == "hello"
        with pytest.raises(BudgetStop):
            llm.call("hi again")
    assert cy.budgets.get("tenant:acme").spent == CALL_COST
    assert USAGE["prompt_tokens"] == 1000
