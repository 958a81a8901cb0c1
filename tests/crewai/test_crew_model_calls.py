"""Every model call of a real crew reserves first, commits its real usage, releases on failure."""

from __future__ import annotations

import pytest
from crewai_fakes import ScriptedLLM, answer, crew_of, lookup, run_spent, tool_call

import cycles_crewai
from cycles import BudgetExceeded, Cycles, ReservationStatus, Subject, Unit, usd
from cycles.testing import assert_ledger_invariant
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
    assert "toner" in answer(out)

    (run,) = hooks.runs
    committed = cy.list_reservations(tenant="acme", status=ReservationStatus.COMMITTED).reservations
    assert len(committed) == 1
    (r,) = committed
    assert r.committed == CALL_COST
    assert r.action.kind == "llm.completion" and r.action.name == "canned-model"
    assert r.subject.workflow == run and r.subject.agent == "support-agent"
    assert r.subject.dimensions == {"run_id": run, "task": "handle-case"}
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
        assert run_spent(cy, run) == CALL_COST
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


def test_an_unpriced_model_stops_the_crew(cy: Cycles, subject: Subject) -> None:
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
    # ALLOW_IF_AVAILABLE caps what the shadow events charge at the allocation and flags the budget.
    assert tenant.spent == usd("0.50") and tenant.is_over_limit
    assert_ledger_invariant(cy)


def test_direct_llm_calls_are_guarded_too(cy: Cycles, subject: Subject) -> None:
    cy.budgets.set("tenant:acme", usd(0.5))
    llm = ScriptedLLM(script=["hello"])
    with cycles_crewai.enable(cy, subject):
        assert llm.call("hi") == "hello"
        with pytest.raises(BudgetStop):
            llm.call("hi again")
    assert cy.budgets.get("tenant:acme").spent == CALL_COST


class RateLimited(Exception):
    """What a provider SDK raises on HTTP 429; CrewAI retries the whole call."""

    status_code = 429
    headers = {"retry-after": "0"}  # noqa: RUF012 - read by CrewAI's retry loop, never mutated


def test_a_call_crewai_retries_after_a_rate_limit_is_paid_once(cy: Cycles, subject: Subject) -> None:
    cy.budgets.set("tenant:acme", usd(5))
    llm = ScriptedLLM(script=[RateLimited("rate limit"), "All done."])
    with cycles_crewai.enable(cy, subject):
        crew_of(llm).kickoff()
    assert llm.calls == 2  # one logical call, two attempts: its failed event came first
    (released,) = cy.list_reservations(tenant="acme", status=ReservationStatus.RELEASED).reservations
    assert released.action.name == "canned-model"
    assert cy.budgets.get("tenant:acme").spent == CALL_COST


def test_each_agent_spends_from_its_own_scope(cy: Cycles) -> None:
    from crewai import Agent, Crew, Task

    cy.budgets.set("tenant:acme", usd(5))
    cy.budgets.set("tenant:acme/workflow:case-9/agent:writer", usd("0.10"))  # less than one call
    researcher_llm, writer_llm = ScriptedLLM(script=["Findings."]), ScriptedLLM(script=["Draft."])
    researcher = Agent(role="Researcher", goal="g", backstory="b", llm=researcher_llm, max_retry_limit=0)
    writer = Agent(role="Writer", goal="g", backstory="b", llm=writer_llm, max_retry_limit=0)
    crew = Crew(
        agents=[researcher, writer],
        tasks=[
            Task(description="Research.", expected_output="notes", agent=researcher),
            Task(description="Write.", expected_output="text", agent=writer),
        ],
    )
    with (
        cycles_crewai.enable(cy, Subject(tenant="acme", workflow="case-9")),
        pytest.raises(BudgetStop) as stop,
    ):
        crew.kickoff()
    assert (researcher_llm.calls, writer_llm.calls) == (1, 0)
    assert stop.value.error.details["scope"] == "tenant:acme/workflow:case-9/agent:writer"
    (r,) = cy.list_reservations(tenant="acme", status=ReservationStatus.COMMITTED).reservations
    assert r.scope_path == "tenant:acme/workflow:case-9/agent:researcher"


def test_concurrent_crews_settle_their_own_calls(cy: Cycles, subject: Subject) -> None:
    from concurrent.futures import ThreadPoolExecutor

    cy.budgets.set("tenant:acme", usd(50))
    llms = [
        ScriptedLLM(
            script=[tool_call("lookup", q="a"), "Done."],
            usage={"prompt_tokens": 1000 * (i + 1), "completion_tokens": 0},
        )
        for i in range(4)
    ]
    with cycles_crewai.enable(cy, subject) as hooks, ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda llm: crew_of(llm, [lookup]).kickoff(), llms))
    assert len(set(hooks.runs)) == 4
    committed = cy.list_reservations(tenant="acme", status=ReservationStatus.COMMITTED).reservations
    by_run: dict[str, set[int]] = {}
    for r in committed:
        assert r.committed is not None and r.subject.workflow is not None
        by_run.setdefault(r.subject.workflow, set()).add(r.committed.amount)
    # Each crew's model priced its calls differently ($0.10 x its number): no run got another's usage.
    assert sorted(by_run.values(), key=min) == [{usd(f"0.{i}").amount} for i in range(1, 5)]
