"""Exact at the edges, with LangChain's own fake models: a cancelled ``ainvoke`` leaves nothing
reserved, a fallback model is priced as itself, a stream closed early is charged for what it
generated, failed tools follow one policy. Each test ends with the shared check
(``cycles.testing.assert_settled``) on memory, SQLite and Redis."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from langchain.agents import create_agent
from langchain.agents.middleware import ModelFallbackMiddleware
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.tools import ToolException, tool
from langgraph_fakes import CALL_COST, USAGE, FakeChat, reply, scripted

from cycles import Cycles, ReservationStatus, Subject, usd
from cycles.pricing import approx_tokens, estimate_cost, price_usage, register_price
from cycles.testing import assert_settled
from cycles_langgraph import CyclesCallbackHandler, CyclesMiddleware


class Stalled(FakeChat):
    """A provider that never answers (until cancelled)."""

    async def _agenerate(self, *args: Any, **kwargs: Any) -> Any:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


def test_a_cancelled_ainvoke_leaves_nothing_reserved(cy: Cycles, subject: Subject, tenant: str) -> None:
    cy.budgets.set(f"tenant:{tenant}", usd(5))
    handler = CyclesCallbackHandler(cy, subject, estimate=usd("0.5"))

    async def main() -> None:
        model = Stalled(messages=iter([]))
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(model.ainvoke("hi", config={"callbacks": [handler]}), 0.2)
        await asyncio.sleep(0)  # the cancelled task's done-callbacks run

    asyncio.run(main())
    (r,) = cy.list_reservations(tenant=tenant).reservations
    # the request had gone out: it is never released, it is charged at its estimate
    assert r.status is ReservationStatus.COMMITTED and handler._open == {}
    assert_settled(cy, f"tenant:{tenant}", usd("0.5"))


def test_a_fallback_model_is_priced_as_the_model_that_answered(cy: Cycles, subject: Subject, tenant: str) -> None:
    register_price("fake-model-large", input_per_mtok=1000, output_per_mtok=4000)  # 10x fake-model
    cy.budgets.set(f"tenant:{tenant}", usd(10))

    def primary_down() -> AIMessage:
        raise ConnectionError("primary is down")

    big = AIMessage(content="answered by the big one", usage_metadata=USAGE.copy())
    big.response_metadata = {"model_name": "fake-model-large"}  # as providers report the answering model
    fallback = FakeChat(model_name="fake-model-large", messages=iter([big]))
    agent = create_agent(
        scripted(primary_down),
        tools=[],
        middleware=[CyclesMiddleware(cy, subject), ModelFallbackMiddleware(fallback)],
    )
    out = agent.invoke({"messages": [HumanMessage("hi")]})
    assert out["messages"][-1].content == "answered by the big one"
    # $3.00 of real spend recorded as $3.00, not as the primary's $0.30
    assert_settled(cy, f"tenant:{tenant}", usd(3))


def test_a_stream_closed_early_is_charged_for_what_it_generated(cy: Cycles, subject: Subject, tenant: str) -> None:
    cy.budgets.set(f"tenant:{tenant}", usd(5))
    text = "one two three four five six seven eight nine ten"
    model = FakeChat(messages=iter([AIMessage(content=text)]))
    stream = model.stream("hi", config={"callbacks": [CyclesCallbackHandler(cy, subject)]})
    seen = "".join(str(next(stream).content) for _ in range(3))
    stream.close()
    (r,) = cy.list_reservations(tenant=tenant).reservations
    assert r.status is ReservationStatus.COMMITTED and r.committed is not None
    generated = price_usage("fake-model", input_tokens=0, output_tokens=approx_tokens(seen))
    estimate = estimate_cost("fake-model", input_tokens=0, max_output_tokens=1024)
    assert generated.amount <= r.committed.amount < estimate.amount  # what was generated, not $0
    assert_settled(cy, f"tenant:{tenant}", r.committed)


def test_a_tool_error_turned_into_a_result_is_released_unless_charged(
    cy: Cycles, subject: Subject, tenant: str
) -> None:
    cy.budgets.set(f"tenant:{tenant}", usd(5))

    @tool
    def refund(order: str) -> str:
        """Refund an order."""
        raise ToolException("payment provider refused")

    @tool
    def sms(text: str) -> str:
        """Send an SMS (billed per attempt)."""
        raise ToolException("carrier error")

    refund.handle_tool_error = True
    sms.handle_tool_error = True
    handler = CyclesCallbackHandler(
        cy, subject, tool_estimate={"refund": usd("0.2"), "sms": usd("0.05")}, charge_failed_tools=["sms"]
    )
    for t, args in ((refund, {"order": "1"}), (sms, {"text": "hi"})):
        call = {"name": t.name, "args": args, "id": f"call-{t.name}", "type": "tool_call"}
        result = t.invoke(call, config={"callbacks": [handler]})
        assert result.status == "error"
    status = {r.action.name: r.status for r in cy.list_reservations(tenant=tenant).reservations}
    assert status == {"refund": ReservationStatus.RELEASED, "sms": ReservationStatus.COMMITTED}
    assert_settled(cy, f"tenant:{tenant}", usd("0.05"))


def test_middleware_tools_follow_the_same_failure_policy(cy: Cycles, subject: Subject, tenant: str) -> None:
    cy.budgets.set(f"tenant:{tenant}", usd(5))

    @tool
    def refund(order: str) -> str:
        """Refund an order."""
        raise ToolException("payment provider refused")

    refund.handle_tool_error = True
    model = scripted(reply(tool="refund", order="1"), reply("could not refund"))
    agent = create_agent(model, tools=[refund], middleware=[CyclesMiddleware(cy, subject, tool_estimate=usd("0.2"))])
    agent.invoke({"messages": [HumanMessage("refund order 1")]})
    status = {r.action.name: r.status for r in cy.list_reservations(tenant=tenant).reservations}
    assert status["refund"] is ReservationStatus.RELEASED
    assert_settled(cy, f"tenant:{tenant}", [CALL_COST, CALL_COST])


def test_calls_other_middleware_makes_are_covered_by_the_callbacks(cy: Cycles, subject: Subject, tenant: str) -> None:
    from langchain.agents.middleware import SummarizationMiddleware

    cy.budgets.set(f"tenant:{tenant}", usd(10))
    summarizer = scripted(reply("a summary"))
    model = scripted(reply("the answer"))
    mw = CyclesMiddleware(cy, subject)
    summarize = SummarizationMiddleware(model=summarizer, trigger=("messages", 3), keep=("messages", 1))
    agent = create_agent(model, tools=[], middleware=[mw, summarize])
    history = [HumanMessage(f"message {i}") for i in range(6)]
    agent.invoke({"messages": history}, config={"callbacks": [mw.callbacks()]})
    assert summarizer.calls, "the summarization model was not called"
    reservations = cy.list_reservations(tenant=tenant).reservations
    assert len(reservations) == 2  # the agent's call (middleware) and the summary (callbacks), once each
    assert_settled(cy, f"tenant:{tenant}", [CALL_COST, CALL_COST])


def test_one_compiled_agent_invoked_from_two_threads_runs_two_runs(cy: Cycles, subject: Subject, tenant: str) -> None:
    import threading

    from langgraph_fakes import runaway

    @tool
    def search(q: str) -> str:
        """Search the knowledge base."""
        return "nothing new"

    cy.budgets.set(f"tenant:{tenant}", usd(10))
    agent = create_agent(runaway(), tools=[search], middleware=[CyclesMiddleware(cy, subject)])
    runs: list[Any] = []
    barrier = threading.Barrier(2)

    def invoke() -> None:
        with cy.run(subject, budgets=[usd("0.5")]) as run:  # $0.50 a run: one $0.30 call, not two
            runs.append(run)
            barrier.wait()
            agent.invoke({"messages": [HumanMessage("loop")]}, config={"recursion_limit": 50})

    threads = [threading.Thread(target=invoke) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({r.id for r in runs}) == 2
    for run in runs:  # each run stopped at its own cap; no step landed outside a run
        assert run.charged == {CALL_COST.unit: CALL_COST}
        assert {g.subject.dimensions["run_id"] for g in run.steps} == {run.id}
    assert_settled(cy, f"tenant:{tenant}", [CALL_COST, CALL_COST])
