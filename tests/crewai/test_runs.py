"""Each kickoff is a core run: concurrent kickoffs of one Crew never share a run, batches give every
input its own run, and every call that ran (and only those) is charged, priced by the model that
answered. Each test ends with the shared check (``cycles.testing.assert_settled``)."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from crewai.tools import tool
from crewai_fakes import BilledFailure, ScriptedLLM, answer, crew_of, lookup, run_spent, tool_call

import cycles_crewai
from cycles import BudgetExceeded, Cycles, ReservationStatus, Subject, Unit, risk_points, usd
from cycles.testing import assert_settled
from cycles_crewai import BudgetStop

CALL_COST = usd("0.30")  # 1,000 input + 500 output tokens of canned-model


def test_the_same_crew_kicked_off_from_two_threads_gets_two_runs(cy: Cycles, subject: Subject) -> None:
    cy.budgets.set("tenant:acme", usd(10))
    llm = ScriptedLLM(script=[tool_call("lookup", q="again")])  # loops until its run budget stops it
    crew = crew_of(llm, [lookup], max_iter=20)
    barrier = threading.Barrier(2)
    stops: list[BaseException] = []
    refused = 0  # kickoffs crewai itself refused: it runs one agent executor once at a time

    def kickoff() -> None:
        nonlocal refused
        barrier.wait()
        try:
            crew.kickoff()
        except BudgetStop as stop:
            stops.append(stop)
        except RuntimeError as exc:  # "Executor is already running", when the two kickoffs overlap there
            if "already running" not in str(exc):
                raise
            refused += 1

    with cycles_crewai.enable(cy, subject, run_budgets=[usd("0.50")]) as hooks:
        threads = [threading.Thread(target=kickoff) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(stops) + refused == 2 and stops
    assert all(isinstance(s.error, BudgetExceeded) for s in stops)  # type: ignore[attr-defined]
    assert len(hooks.runs) == 2  # no third run id, no call outside a run's budget
    # each run that got to call paid one call (the second's estimate did not fit its own $0.50);
    # a run crewai refused made none
    spent = sorted(run_spent(cy, run).amount for run in hooks.runs)
    assert spent == sorted([0] * refused + [CALL_COST.amount] * len(stops))
    # every run ended, the refused one too: no per-run budget row is left behind
    assert [b.scope for b in cy.budgets.list(tenant="acme")] == ["tenant:acme"]
    assert_settled(cy, "tenant:acme", [CALL_COST] * len(stops))


def test_a_kickoff_crewai_refuses_without_ending_it_still_ends_its_run(cy: Cycles, subject: Subject) -> None:
    """What overlapping kickoffs of one Crew do, made deterministic: the other kickoff's end leaves
    the Crew's pairing flag set, then this one is refused ("Executor is already running"), so CrewAI
    dispatches no EXECUTION_END for it. Its run must end anyway, and the next kickoff get a new one."""
    cy.budgets.set("tenant:acme", usd(10))
    crew: Any = None

    def refused(messages: Any) -> Any:
        crew._execution_end_dispatched = True  # as the overlapping kickoff's end leaves it
        raise RuntimeError("Executor is already running. Cannot invoke the same executor instance concurrently.")

    crew = crew_of(ScriptedLLM(script=[refused]))
    with cycles_crewai.enable(cy, subject, run_budgets=[usd("0.50")]) as hooks:
        with pytest.raises(RuntimeError, match="already running"):
            crew.kickoff()
        crew_of(ScriptedLLM(script=["Final Answer: ok."])).kickoff()  # same thread, after the failure
    assert len(hooks.runs) == 2 and [run_spent(cy, run).amount for run in hooks.runs] == [0, CALL_COST.amount]
    assert [b.scope for b in cy.budgets.list(tenant="acme")] == ["tenant:acme"]
    assert_settled(cy, "tenant:acme", CALL_COST)


def _by_case(messages: Any) -> Any:
    """Case 2 keeps calling a tool (until its run budget stops it); the others answer at once."""
    text = str(messages)
    return tool_call("lookup", q="x") if "case 2." in text else f"Final Answer: closed {text.count('case ')}."


def test_kickoff_for_each_gives_every_input_its_own_run(cy: Cycles, subject: Subject) -> None:
    cy.budgets.set("tenant:acme", usd(10))
    crew = crew_of(ScriptedLLM(script=[_by_case]), [lookup], description="Handle support case {case}.")
    with cycles_crewai.enable(cy, subject, run_budgets=[usd("0.50")]) as hooks:
        results = hooks.kickoff_for_each(crew, [{"case": "1"}, {"case": "2"}, {"case": "3"}])
    assert "closed" in answer(results[0]) and "closed" in answer(results[2])
    assert isinstance(results[1], BudgetExceeded) and [i for i, _ in results.errors] == [1]
    assert len(results.runs) == 3 and hooks.runs == [r.id for r in results.runs]
    # input 2 paid its one call (the second's estimate did not fit its own $0.50), 1 and 3 one each
    assert_settled(cy, "tenant:acme", [CALL_COST] * 3)


def test_kickoff_for_each_can_stop_at_the_first_denial(cy: Cycles, subject: Subject) -> None:
    cy.budgets.set("tenant:acme", usd(10))
    crew = crew_of(ScriptedLLM(script=[_by_case]), [lookup], description="Handle support case {case}.")
    with cycles_crewai.enable(cy, subject, run_budgets=[usd("0.50")]) as hooks, pytest.raises(BudgetExceeded):
        hooks.kickoff_for_each(crew, [{"case": "2"}, {"case": "3"}], stop_on_denial=True)
    assert len(hooks.runs) == 1
    assert_settled(cy, "tenant:acme", CALL_COST)


def test_a_billed_call_that_failed_afterwards_is_charged(cy: Cycles, subject: Subject) -> None:
    cy.budgets.set("tenant:acme", usd(5))
    llm = ScriptedLLM(script=[BilledFailure("structured output did not validate")])
    with cycles_crewai.enable(cy, subject), pytest.raises(BilledFailure):
        crew_of(llm).kickoff()
    (r,) = cy.list_reservations(tenant="acme").reservations
    assert r.status is ReservationStatus.COMMITTED and r.committed == CALL_COST
    assert_settled(cy, "tenant:acme", CALL_COST)


def test_a_model_call_is_priced_by_the_model_named_in_its_completion(cy: Cycles, subject: Subject) -> None:
    from crewai.events import crewai_event_bus
    from crewai.events.types.llm_events import LLMCallCompletedEvent

    from cycles.pricing import register_price

    register_price("canned-model-large", input_per_mtok=1000, output_per_mtok=4000)  # 10x canned-model

    class Routed(ScriptedLLM):
        """A router: the completion names the model that really answered."""

        def _emit_call_completed_event(self, **kwargs: Any) -> None:
            crewai_event_bus.emit(
                self,
                LLMCallCompletedEvent(
                    model="canned-model-large",
                    response=kwargs["response"],
                    call_type=kwargs["call_type"],
                    usage=kwargs["usage"],
                    call_id="x",
                ),
            )

    cy.budgets.set("tenant:acme", usd(5))
    with cycles_crewai.enable(cy, subject):
        crew_of(Routed(script=["Final Answer: ok."])).kickoff()
    assert_settled(cy, "tenant:acme", usd(3))


class Flaky:
    def __init__(self) -> None:
        self.ran = 0


def _failing_tools(flaky: Flaky) -> list[Any]:
    @tool("charge_card")
    def charge_card(amount: str) -> str:
        """Charge the customer's card."""
        flaky.ran += 1
        raise RuntimeError("card declined")

    @tool("send_sms")
    def send_sms(text: str) -> str:
        """Send an SMS (the carrier bills every attempt)."""
        flaky.ran += 1
        raise RuntimeError("carrier error")

    return [charge_card, send_sms]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_failed_tool_is_released_unless_its_policy_charges_it(cy: Cycles, subject: Subject) -> None:
    cy.budgets.set("tenant:acme", usd(10))
    flaky = Flaky()
    llm = ScriptedLLM(
        script=[
            tool_call("charge_card", amount="5"),
            tool_call("send_sms", text="hi"),
            "Final Answer: both failed.",
        ]
    )
    costs = {"charge_card": 10, "send_sms": 3}
    with cycles_crewai.enable(
        cy, subject, tool_costs=costs, charge_failed_tools=["send_sms"], run_budgets=[risk_points(60)]
    ) as hooks:
        crew_of(llm, _failing_tools(flaky)).kickoff()
    assert flaky.ran == 2
    tools = {
        r.action.name: r.status
        for r in cy.list_reservations(tenant="acme").reservations
        if r.action.kind == "tool.call"
    }
    assert tools == {"charge_card": ReservationStatus.RELEASED, "send_sms": ReservationStatus.COMMITTED}
    (run,) = hooks.runs
    assert run_spent(cy, run, Unit.RISK_POINTS) == risk_points(3)
    assert [b.scope for b in cy.budgets.list()] == ["tenant:acme"]  # the run left no budget row behind
    assert_settled(cy, "tenant:acme", [CALL_COST] * 3)
