"""The loop guard through the LangChain adapter: a tool call's name and canonical arguments are its
fingerprint (``cycles.with_args_fingerprint``); the same call repeated past the guard is refused the
way the adapter refuses any tool (a ToolMessage the agent reads / ``LoopDetected`` from the
callbacks), the same tool with other arguments is not."""

from __future__ import annotations

import pytest
from langchain.agents import create_agent
from langchain_core.messages import HumanMessage, ToolMessage
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import tool
from langgraph_fakes import reply, scripted

from cycles import Cycles, LoopDetected, Subject, usd
from cycles_langgraph import CyclesCallbackHandler, CyclesMiddleware

searched: list[dict[str, str]] = []


@tool
def search(q: str, lang: str = "en") -> str:
    """Search the help center."""
    searched.append({"q": q, "lang": lang})
    return f"3 articles about {q}"


def test_an_agent_repeating_one_tool_call_is_stopped_by_the_loop_guard(
    cy: Cycles, subject: Subject, tenant: str
) -> None:
    cy.budgets.set(f"tenant:{tenant}", usd(10))
    cy.quotas.set_loop_guard(f"tenant:{tenant}", 2)
    searched.clear()
    model = scripted(
        reply(tool="search", q="refund policy", lang="en"),
        reply(tool="search", lang="en", q="refund policy"),  # the same call, arguments in another order
        reply(tool="search", q="refund policy", lang="en"),
        reply(tool="search", q="shipping", lang="en"),
        reply("Refunds take 5 days."),
    )
    agent = create_agent(model, [search], middleware=[CyclesMiddleware(cy, subject, tool_estimate=usd("0.01"))])

    with cy.run(subject):  # the loop guard counts per run
        out = agent.invoke({"messages": [HumanMessage("how do refunds work?")]})

    results = [m for m in out["messages"] if isinstance(m, ToolMessage)]
    assert [m.status for m in results] == ["success", "success", "error", "success"]
    assert "loop detected" in results[2].text
    assert searched == [{"q": "refund policy", "lang": "en"}] * 2 + [{"q": "shipping", "lang": "en"}]
    assert out["messages"][-1].text == "Refunds take 5 days."


def test_the_callbacks_raise_loop_detected_before_the_tool_runs(cy: Cycles, subject: Subject, tenant: str) -> None:
    cy.budgets.set(f"tenant:{tenant}", usd(5))
    cy.quotas.set_loop_guard(f"tenant:{tenant}", 2)
    searched.clear()
    config: RunnableConfig = {"callbacks": [CyclesCallbackHandler(cy, subject, tool_estimate=usd("0.01"))]}
    with cy.run(subject):
        for _ in range(2):
            search.invoke({"q": "refunds"}, config=config)
        with pytest.raises(LoopDetected) as denied:
            search.invoke({"q": "refunds"}, config=config)
        search.invoke({"q": "returns"}, config=config)
    assert denied.value.reason_code == "LOOP_DETECTED"
    assert searched == [{"q": "refunds", "lang": "en"}] * 2 + [{"q": "returns", "lang": "en"}]
