"""A runaway support bot, stopped at its $1 budget.

The bot is a LangGraph graph (agent -> tools -> agent ...) whose model never stops searching the
help center: a bug, a prompt injection, a confused model. Without a budget it would loop until the
recursion limit, paying for every call. With Cycles:

- ``guard_node`` reserves before every agent turn against the ticket's run budget
  (``per_run``: ``tenant:acme/workflow:<thread_id>``, $1) and the tenant's ($50). When the next
  turn does not fit, the graph routes to a ``handoff`` node instead of calling the model.
- ``CyclesCallbackHandler`` prices each model call from its ``usage_metadata`` (and charges each
  tool call): the turn's reservation is settled at what the call really cost.

Runs offline in about a second: the model is langchain-core's fake chat model.

    uv run python examples/langgraph_support_bot.py
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Annotated, Any, TypedDict

from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, AnyMessage
from langchain_core.runnables import Runnable
from langchain_core.tools import tool
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.prebuilt import ToolNode, tools_condition

from cycles import Cycles, Subject, usd
from cycles.pricing import register_price
from cycles_langgraph import CyclesCallbackHandler, guard_node, per_run

TICKET = "ticket-4521"


class SupportModel(GenericFakeChatModel):
    """A stand-in for a real chat model, reporting token usage the way providers do."""

    model_name: str = "support-model"

    def bind_tools(self, tools: Any, **kwargs: Any) -> Runnable[Any, AIMessage]:
        return self  # the fake decides its tool calls itself


def searches_forever() -> Iterator[AIMessage]:
    for n in itertools.count(1):
        yield AIMessage(
            content="Let me look that up once more.",
            tool_calls=[{"name": "search_help_center", "args": {"query": f"refund status #{n}"}, "id": f"call_{n}"}],
            usage_metadata={"input_tokens": 1000, "output_tokens": 500, "total_tokens": 1500},
        )


@tool
def search_help_center(query: str) -> str:
    """Search the help center articles."""
    return f"No article matches {query!r}."


class Ticket(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]


def build(cy: Cycles) -> Any:
    model = SupportModel(messages=searches_forever()).bind_tools([search_help_center])

    def agent(state: Ticket) -> dict[str, list[AnyMessage]]:
        return {"messages": [model.invoke(state["messages"])]}

    def handoff(state: Ticket) -> dict[str, list[AnyMessage]]:
        return {"messages": [AIMessage("This needs a person: I've passed your ticket to our support team.")]}

    builder = StateGraph(Ticket)
    builder.add_node(
        "agent",
        guard_node(
            agent,
            cycles=cy,
            subject=per_run(Subject(tenant="acme")),
            estimate=usd("0.45"),  # covers one model call's reservation (prompt + 1,024 output tokens)
            fallback="handoff",
        ),
    )
    builder.add_node("tools", ToolNode([search_help_center]))
    builder.add_node("handoff", handoff)
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", tools_condition)  # -> "tools" while the model calls tools
    builder.add_edge("tools", "agent")
    builder.add_edge("handoff", END)
    return builder.compile()


def main() -> None:
    # $100 / $400 per million input / output tokens: each 1,000-in / 500-out turn costs $0.30.
    register_price("support-model", input_per_mtok=100, output_per_mtok=400)
    cy = Cycles("memory://")
    cy.budgets.set("tenant:acme", usd(50))
    cy.budgets.set(f"tenant:acme/workflow:{TICKET}", usd(1))
    handler = CyclesCallbackHandler(cy, per_run(Subject(tenant="acme")), tool_estimate=usd("0.01"))

    result = build(cy).invoke(
        {"messages": [("user", "Where is my refund for order A-17?")]},
        {"callbacks": [handler], "configurable": {"thread_id": TICKET}, "recursion_limit": 200},
    )

    turns = sum(1 for m in result["messages"] if isinstance(m, AIMessage) and m.tool_calls)
    run, tenant = cy.budgets.get(f"tenant:acme/workflow:{TICKET}"), cy.budgets.get("tenant:acme")
    print(f"{turns} model turns, then: {result['messages'][-1].content}")
    print(f"Stopped at {run.spent} of the ticket's {run.allocated} budget ({tenant.spent} spent by the tenant).")
    cy.close()


if __name__ == "__main__":
    main()
