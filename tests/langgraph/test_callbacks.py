"""CyclesCallbackHandler: any LangChain runnable, sync and async, blocked before the provider."""

from __future__ import annotations

import operator
from typing import Annotated, Any, TypedDict

import pytest
from langchain_core.language_models import FakeListLLM
from langchain_core.messages import AIMessage, AnyMessage
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import tool
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.types import RetryPolicy
from langgraph_fakes import CALL_COST, FakeChat, reply, scripted, spent

from cycles import BudgetExceeded, Caps, Cycles, Subject, ToolNotAllowed, usd
from cycles.pricing import price_usage
from cycles_langgraph import CyclesCallbackHandler, per_run


def test_a_call_commits_its_usage_priced_by_the_core(cy: Cycles, subject: Subject, tenant: str) -> None:
    cy.budgets.set(f"tenant:{tenant}", usd(5))
    model = scripted(reply("hello"))

    model.invoke("hi", config={"callbacks": [CyclesCallbackHandler(cy, subject)]})

    expected = price_usage("fake-model", input_tokens=1000, output_tokens=500)
    assert expected == CALL_COST
    assert spent(cy, f"tenant:{tenant}") == CALL_COST.amount


def test_a_denied_call_never_reaches_the_provider(cy: Cycles, subject: Subject, tenant: str) -> None:
    cy.budgets.set(f"tenant:{tenant}", usd("0.50"))
    model = scripted(reply("one"), reply("two"))
    config: RunnableConfig = {"callbacks": [CyclesCallbackHandler(cy, subject)]}

    model.invoke("hi", config=config)  # $0.30 spent, $0.20 left: less than the next estimate
    with pytest.raises(BudgetExceeded):
        model.invoke("hi again", config=config)

    assert len(model.calls) == 1
    assert spent(cy, f"tenant:{tenant}") == CALL_COST.amount


@pytest.mark.asyncio
async def test_async_invoke_is_blocked_too(cy: Cycles, subject: Subject, tenant: str) -> None:
    cy.budgets.set(f"tenant:{tenant}", usd("0.50"))
    model = scripted(reply("one"), reply("two"))
    config: RunnableConfig = {"callbacks": [CyclesCallbackHandler(cy, subject)]}

    await model.ainvoke("hi", config=config)
    with pytest.raises(BudgetExceeded):
        await model.ainvoke("hi again", config=config)

    assert len(model.calls) == 1
    assert spent(cy, f"tenant:{tenant}") == CALL_COST.amount


def test_a_failed_call_releases_its_reservation(cy: Cycles, subject: Subject, tenant: str) -> None:
    cy.budgets.set(f"tenant:{tenant}", usd(5))

    def provider_down() -> AIMessage:
        raise ConnectionError("provider down")

    with pytest.raises(ConnectionError):
        scripted(provider_down).invoke("hi", config={"callbacks": [CyclesCallbackHandler(cy, subject)]})

    assert spent(cy, f"tenant:{tenant}") == 0


def test_a_fixed_estimate_and_no_usage_commits_the_estimate(cy: Cycles, subject: Subject, tenant: str) -> None:
    cy.budgets.set(f"tenant:{tenant}", usd(5))
    model = FakeChat(messages=iter([AIMessage(content="no usage reported")]))

    handler = CyclesCallbackHandler(cy, subject, estimate=usd("0.07"))
    model.invoke("hi", config={"callbacks": [handler]})

    assert spent(cy, f"tenant:{tenant}") == usd("0.07").amount


@tool
def search(q: str) -> str:
    """Search the help center."""
    return f"3 articles about {q}"


deployed: list[str] = []


@tool
def deploy(service: str) -> str:
    """Deploy a service."""
    deployed.append(service)
    return "deployed"


@pytest.mark.parametrize(
    "caps", [Caps(tool_denylist=["deploy"]), Caps(tool_allowlist=["search"])], ids=["denylist", "allowlist"]
)
def test_tool_calls_obey_the_caps(cy: Cycles, subject: Subject, tenant: str, caps: Caps) -> None:
    cy.budgets.set(f"tenant:{tenant}", usd(5), caps=caps)
    config: RunnableConfig = {"callbacks": [CyclesCallbackHandler(cy, subject, tool_estimate=usd("0.01"))]}
    deployed.clear()

    assert search.invoke({"q": "refunds"}, config=config) == "3 articles about refunds"
    with pytest.raises(ToolNotAllowed):
        deploy.invoke({"service": "billing"}, config=config)

    assert deployed == []
    assert spent(cy, f"tenant:{tenant}") == usd("0.01").amount


def test_tool_prices_per_name(cy: Cycles, subject: Subject, tenant: str) -> None:
    cy.budgets.set(f"tenant:{tenant}", usd(5))
    handler = CyclesCallbackHandler(cy, subject, tool_estimate={"search": usd("0.02"), "*": usd("0.5")})

    search.invoke({"q": "x"}, config={"callbacks": [handler]})
    deploy.invoke({"service": "x"}, config={"callbacks": [handler]})

    assert spent(cy, f"tenant:{tenant}") == usd("0.52").amount


def test_shadow_mode_blocks_nothing_and_records_would_deny(shadow_cy: Cycles, tenant: str) -> None:
    shadow_cy.budgets.set(f"tenant:{tenant}", usd("0.50"))
    model = scripted(lambda: reply("again"))
    config: RunnableConfig = {"callbacks": [CyclesCallbackHandler(shadow_cy, Subject(tenant=tenant))]}

    for _ in range(3):
        model.invoke("hi", config=config)

    assert len(model.calls) == 3
    assert shadow_cy.shadow_log and shadow_cy.shadow_log[0].reason_code == "BUDGET_EXCEEDED"  # the 2nd call


class Chat(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]
    turns: Annotated[int, operator.add]


def test_a_runaway_graph_is_stopped_and_not_retried(cy: Cycles, tenant: str) -> None:
    """A node calling the model in a loop: the callbacks stop it, the node's RetryPolicy gives up."""
    cy.budgets.set(f"tenant:{tenant}", usd(100))
    cy.budgets.set(f"tenant:{tenant}/workflow:ticket-7", usd(1))
    model = scripted(lambda: reply("let me check again"))
    attempts: list[int] = []

    def agent(state: Chat) -> dict[str, Any]:
        attempts.append(state["turns"])
        return {"messages": [model.invoke(state["messages"])], "turns": 1}

    builder = StateGraph(Chat)
    builder.add_node("agent", agent, retry_policy=RetryPolicy(initial_interval=0.01, jitter=False))
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", lambda s: END if s["turns"] > 50 else "agent")
    handler = CyclesCallbackHandler(cy, per_run(Subject(tenant=tenant)))

    with pytest.raises(BudgetExceeded):
        builder.compile().invoke(
            {"messages": [("user", "where is my refund?")], "turns": 0},
            {"callbacks": [handler], "configurable": {"thread_id": "ticket-7"}},
        )

    assert len(model.calls) == 2  # $0.60 of the run's $1; a third estimate (~$0.41) did not fit
    assert attempts == [0, 1, 2]  # the denied third turn ran once: RetryPolicy did not retry it
    assert spent(cy, f"tenant:{tenant}/workflow:ticket-7") == 2 * CALL_COST.amount
    assert spent(cy, f"tenant:{tenant}") == 2 * CALL_COST.amount


def test_usage_metadata_is_what_gets_priced(cy: Cycles, subject: Subject, tenant: str) -> None:
    cy.budgets.set(f"tenant:{tenant}", usd(5))
    big = AIMessage(
        content="long answer",
        usage_metadata={"input_tokens": 2000, "output_tokens": 1000, "total_tokens": 3000},
    )
    scripted(big).invoke("hi", config={"callbacks": [CyclesCallbackHandler(cy, subject)]})

    assert spent(cy, f"tenant:{tenant}") == 2 * CALL_COST.amount


@pytest.mark.asyncio
async def test_a_runaway_async_graph_is_stopped(cy: Cycles, tenant: str) -> None:
    cy.budgets.set(f"tenant:{tenant}", usd(1))
    model = scripted(lambda: reply("let me check again"))

    async def agent(state: Chat) -> dict[str, Any]:
        return {"messages": [await model.ainvoke(state["messages"])], "turns": 1}

    builder = StateGraph(Chat)
    builder.add_node("agent", agent)
    builder.add_edge(START, "agent")
    builder.add_edge("agent", "agent")
    handler = CyclesCallbackHandler(cy, Subject(tenant=tenant))

    with pytest.raises(BudgetExceeded):
        await builder.compile().ainvoke({"messages": [("user", "refund?")], "turns": 0}, {"callbacks": [handler]})

    assert len(model.calls) == 2
    assert spent(cy, f"tenant:{tenant}") == 2 * CALL_COST.amount


def test_per_run_makes_any_thread_id_a_valid_scope(tenant: str) -> None:
    subject_of = per_run(Subject(tenant=tenant))

    assert subject_of({"configurable": {"thread_id": "user 42/ticket#7"}}).workflow == "user-42-ticket-7"
    assert subject_of({}) == Subject(tenant=tenant)
    assert per_run(Subject(tenant=tenant), level="agent")({"metadata": {"thread_id": "t1"}}).agent == "t1"


def test_plain_llms_are_budgeted_too(cy: Cycles, subject: Subject, tenant: str) -> None:
    cy.budgets.set(f"tenant:{tenant}", usd("0.15"))
    llm = FakeListLLM(responses=["a completion"])
    config: RunnableConfig = {"callbacks": [CyclesCallbackHandler(cy, subject, estimate=usd("0.10"))]}

    assert llm.invoke("complete this", config=config) == "a completion"
    with pytest.raises(BudgetExceeded):
        llm.invoke("and this", config=config)

    assert spent(cy, f"tenant:{tenant}") == usd("0.10").amount  # no usage reported: the estimate


def test_a_model_without_a_name_needs_a_fixed_estimate(cy: Cycles, subject: Subject, tenant: str) -> None:
    cy.budgets.set(f"tenant:{tenant}", usd(1))

    with pytest.raises(ValueError, match="pass estimate="):
        FakeListLLM(responses=["x"]).invoke("hi", config={"callbacks": [CyclesCallbackHandler(cy, subject)]})
