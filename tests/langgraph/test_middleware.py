"""CyclesMiddleware on real ``create_agent`` agents with a fake tool-calling model."""

from __future__ import annotations

import pytest
from langchain.agents import create_agent
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langgraph_fakes import CALL_COST, reply, runaway, scripted, spent

from cycles import AsyncCycles, Caps, Cycles, Subject, usd
from cycles.pricing import price_usage
from cycles_langgraph import CyclesMiddleware, per_run

refunds: list[str] = []


@tool
def search(q: str) -> str:
    """Search the help center."""
    return f"3 articles about {q}"


@tool
def refund(order: str) -> str:
    """Refund an order."""
    refunds.append(order)
    return f"refunded {order}"


def ask(text: str = "where is my refund?") -> dict[str, list[HumanMessage]]:
    return {"messages": [HumanMessage(text)]}


def test_a_runaway_agent_is_stopped_at_the_budget(cy: Cycles, subject: Subject, tenant: str) -> None:
    cy.budgets.set(f"tenant:{tenant}", usd(1))
    model = runaway()
    agent = create_agent(model, [search], middleware=[CyclesMiddleware(cy, subject)])

    out = agent.invoke(ask())

    final = out["messages"][-1]
    assert isinstance(final, AIMessage) and not final.tool_calls
    assert "budget" in final.text and "BUDGET_EXCEEDED" in final.text
    assert len(model.calls) == 2  # a third reservation (~$0.41) does not fit in the $0.40 left
    assert spent(cy, f"tenant:{tenant}") == 2 * CALL_COST.amount


def test_actual_cost_committed_is_the_priced_usage(cy: Cycles, subject: Subject, tenant: str) -> None:
    cy.budgets.set(f"tenant:{tenant}", usd(10))
    agent = create_agent(
        scripted(reply(tool="search", q="refunds"), reply("Here is how refunds work.")),
        [search],
        middleware=[CyclesMiddleware(cy, subject)],
    )

    agent.invoke(ask())

    one_call = price_usage("fake-model", input_tokens=1000, output_tokens=500)
    assert spent(cy, f"tenant:{tenant}") == 2 * one_call.amount


@pytest.mark.parametrize(
    "caps", [Caps(tool_denylist=["refund"]), Caps(tool_allowlist=["search"])], ids=["denylist", "allowlist"]
)
def test_a_denied_tool_becomes_a_tool_message_and_the_agent_recovers(
    cy: Cycles, subject: Subject, tenant: str, caps: Caps
) -> None:
    cy.budgets.set(f"tenant:{tenant}", usd(5), caps=caps)
    refunds.clear()
    model = scripted(reply(tool="refund", order="A-17"), reply("I can't refund that myself; a human will."))
    agent = create_agent(model, [refund, search], middleware=[CyclesMiddleware(cy, subject)])

    out = agent.invoke(ask("refund order A-17"))

    denied = next(m for m in out["messages"] if isinstance(m, ToolMessage))
    assert denied.status == "error" and "TOOL_NOT_ALLOWED" in denied.text
    assert out["messages"][-1].text == "I can't refund that myself; a human will."
    assert refunds == []
    assert len(model.calls) == 2


@pytest.mark.parametrize(("own", "sent"), [(None, 256), (2000, 256), (100, None)])
def test_max_tokens_is_clamped_to_the_caps(
    cy: Cycles, subject: Subject, tenant: str, own: int | None, sent: int | None
) -> None:
    cy.budgets.set(f"tenant:{tenant}", usd(5), caps=Caps(max_tokens=256))
    model = scripted(reply("short answer"), max_tokens=own)
    agent = create_agent(model, [search], middleware=[CyclesMiddleware(cy, subject)])

    agent.invoke(ask())

    assert model.calls[0].get("max_tokens") == sent  # None: the model's own, lower setting stands


def test_no_caps_leave_the_request_alone(cy: Cycles, subject: Subject, tenant: str) -> None:
    cy.budgets.set(f"tenant:{tenant}", usd(5))
    model = scripted(reply("answer"))
    create_agent(model, [search], middleware=[CyclesMiddleware(cy, subject)]).invoke(ask())

    assert "max_tokens" not in model.calls[0]


def test_each_run_has_its_own_budget_under_its_tenant(cy: Cycles, tenant: str) -> None:
    cy.budgets.set(f"tenant:{tenant}", usd("1.2"))
    for thread in ("a", "b"):
        cy.budgets.set(f"tenant:{tenant}/workflow:{thread}", usd(1))
    middleware = CyclesMiddleware(cy, per_run(Subject(tenant=tenant)))
    models = {thread: runaway() for thread in ("a", "b")}

    for thread, model in models.items():
        create_agent(model, [search], middleware=[middleware]).invoke(ask(), {"configurable": {"thread_id": thread}})

    assert len(models["a"].calls) == 2  # stopped by its run's $1
    assert len(models["b"].calls) == 1  # stopped by what the tenant had left after run a
    assert spent(cy, f"tenant:{tenant}/workflow:a") == 2 * CALL_COST.amount
    assert spent(cy, f"tenant:{tenant}") == 3 * CALL_COST.amount


def test_shadow_mode_lets_the_agent_run_and_records_would_deny(shadow_cy: Cycles, tenant: str) -> None:
    shadow_cy.budgets.set(f"tenant:{tenant}", usd("0.50"), caps=Caps(tool_denylist=["refund"]))
    refunds.clear()
    model = scripted(reply(tool="refund", order="A-1"), reply(tool="search", q="x"), reply("done"))
    middleware = CyclesMiddleware(shadow_cy, Subject(tenant=tenant))

    out = create_agent(model, [refund, search], middleware=[middleware]).invoke(ask())

    assert out["messages"][-1].text == "done" and refunds == ["A-1"]
    assert {r.reason_code for r in shadow_cy.shadow_log} >= {"TOOL_NOT_ALLOWED", "BUDGET_EXCEEDED"}


@pytest.mark.asyncio
@pytest.mark.parametrize("client", ["sync", "async"])
async def test_async_agent_is_stopped_at_the_budget(cy: Cycles, subject: Subject, tenant: str, client: str) -> None:
    cy.budgets.set(f"tenant:{tenant}", usd(1))
    model = runaway()
    budget = cy if client == "sync" else AsyncCycles(ledger=cy.ledger)
    agent = create_agent(model, [search], middleware=[CyclesMiddleware(budget, subject)])

    out = await agent.ainvoke(ask())

    assert "budget" in out["messages"][-1].text
    assert len(model.calls) == 2
    assert spent(cy, f"tenant:{tenant}") == 2 * CALL_COST.amount


@pytest.mark.asyncio
async def test_async_denied_tool_becomes_a_tool_message(cy: Cycles, subject: Subject, tenant: str) -> None:
    cy.budgets.set(f"tenant:{tenant}", usd(5), caps=Caps(tool_denylist=["refund"]))
    refunds.clear()
    model = scripted(reply(tool="refund", order="A-17"), reply("escalating to a human"))
    agent = create_agent(model, [refund], middleware=[CyclesMiddleware(AsyncCycles(ledger=cy.ledger), subject)])

    out = await agent.ainvoke(ask())

    assert any(isinstance(m, ToolMessage) and m.status == "error" for m in out["messages"])
    assert out["messages"][-1].text == "escalating to a human" and refunds == []


def test_an_async_client_in_a_sync_agent_says_what_to_do(cy: Cycles, subject: Subject, tenant: str) -> None:
    cy.budgets.set(f"tenant:{tenant}", usd(5))
    agent = create_agent(
        scripted(reply("hi")), [search], middleware=[CyclesMiddleware(AsyncCycles(ledger=cy.ledger), subject)]
    )

    with pytest.raises(TypeError, match="AsyncCycles"):
        agent.invoke(ask())
