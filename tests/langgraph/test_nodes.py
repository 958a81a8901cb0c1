"""guard_node on real StateGraphs: denial, retries, fallback routes, injection, per-run budgets, fan-out."""

from __future__ import annotations

import asyncio
import operator
import threading
import time
from dataclasses import dataclass
from typing import Annotated, Any, TypedDict

import pytest
from langchain.agents import create_agent
from langchain_core.messages import HumanMessage
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import tool
from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime
from langgraph.store.base import BaseStore
from langgraph.store.memory import InMemoryStore
from langgraph.types import RetryPolicy, Send, StreamWriter
from langgraph_fakes import CALL_COST, reply, runaway, scripted, spent

from cycles import Action, AsyncCycles, BudgetExceeded, Cycles, Denied, Subject, usd
from cycles_langgraph import CyclesCallbackHandler, CyclesMiddleware, guard_node, per_run


class Work(TypedDict, total=False):
    done: Annotated[list[str], operator.add]
    route: str


def test_a_denied_node_raises_budget_exceeded_and_is_not_retried(cy: Cycles, tenant: str) -> None:
    cy.budgets.set(f"tenant:{tenant}", usd(1))
    attempts: list[str] = []

    def count_attempts(config: RunnableConfig) -> Subject:
        attempts.append(config["metadata"]["langgraph_node"])
        return Subject(tenant=tenant)

    def step(state: Work) -> Work:
        return {"done": ["step"]}

    builder = StateGraph(Work)
    builder.add_node(
        "step",
        guard_node(step, cycles=cy, subject=count_attempts, estimate=usd("0.30")),
        retry_policy=RetryPolicy(initial_interval=0.01, jitter=False),
    )
    builder.add_edge(START, "step")
    builder.add_edge("step", "step")  # a runaway loop

    with pytest.raises(BudgetExceeded) as raised:
        builder.compile().invoke({"done": []}, {"recursion_limit": 100})

    assert len(attempts) == 4  # three paid steps, one denied attempt: no retry
    assert RetryPolicy().retry_on(raised.value) is False
    assert isinstance(raised.value, Denied) and raised.value.code == "BUDGET_EXCEEDED"
    assert spent(cy, f"tenant:{tenant}") == usd("0.90").amount


def test_why_the_adapter_re_raises_denials() -> None:
    """LangGraph's default ``retry_on`` retries any exception that is not a programming error
    (ValueError, RuntimeError, ...): the core's own BudgetExceeded would be retried unless it is one."""
    default_retry_on = RetryPolicy().retry_on
    assert default_retry_on(BudgetExceeded("over")) is not issubclass(BudgetExceeded, RuntimeError)


def test_a_denied_node_routes_to_the_fallback(cy: Cycles, tenant: str) -> None:
    cy.budgets.set(f"tenant:{tenant}", usd("0.10"))
    ran: list[str] = []

    def expensive(state: Work) -> Work:
        ran.append("expensive")
        return {"done": ["expensive"]}

    def cheap(state: Work) -> Work:
        return {"done": ["cheap"]}

    builder = StateGraph(Work)
    builder.add_node(
        "expensive",
        guard_node(expensive, cycles=cy, subject=Subject(tenant=tenant), estimate=usd(1), fallback="cheap"),
    )
    builder.add_node("cheap", cheap)
    builder.add_edge(START, "expensive")
    builder.add_edge("expensive", END)
    builder.add_edge("cheap", END)

    out = builder.compile().invoke({"done": []})

    assert out["done"] == ["cheap"] and ran == []
    assert spent(cy, f"tenant:{tenant}") == 0


def test_shadow_mode_runs_the_node_anyway(shadow_cy: Cycles, tenant: str) -> None:
    shadow_cy.budgets.set(f"tenant:{tenant}", usd("0.10"))
    node = guard_node(
        lambda s: {"done": ["ran"]},
        cycles=shadow_cy,
        subject=Subject(tenant=tenant),
        estimate=usd(1),
        fallback="x",
    )

    assert node({"done": []}, config={}) == {"done": ["ran"]}
    assert shadow_cy.shadow_log[-1].reason_code == "BUDGET_EXCEEDED"


def test_a_node_that_raises_releases_its_reservation(cy: Cycles, tenant: str) -> None:
    cy.budgets.set(f"tenant:{tenant}", usd(1))

    def broken(state: Work) -> Work:
        raise ValueError("bad input")

    builder = StateGraph(Work)
    builder.add_node("broken", guard_node(broken, cycles=cy, subject=Subject(tenant=tenant), estimate=usd("0.5")))
    builder.add_edge(START, "broken")

    with pytest.raises(ValueError, match="bad input"):
        builder.compile().invoke({"done": []})

    assert spent(cy, f"tenant:{tenant}") == 0


@dataclass
class Ctx:
    user: str


def test_injected_arguments_still_reach_the_node(cy: Cycles, tenant: str) -> None:
    cy.budgets.set(f"tenant:{tenant}", usd(1))
    seen: dict[str, Any] = {}

    @guard_node(cycles=cy, subject=per_run(Subject(tenant=tenant)), estimate=lambda state: usd("0.02"))
    def node(
        state: Work, config: RunnableConfig, runtime: Runtime[Ctx], store: BaseStore, writer: StreamWriter
    ) -> Work:
        seen.update(thread=config["configurable"]["thread_id"], user=runtime.context.user, store=store)
        writer({"progress": "half way"})
        return {"done": ["node"]}

    def untyped(state: Work) -> Work:  # no injections: the wrapper must not pass config to it
        return {"done": ["untyped"]}

    builder = StateGraph(Work, context_schema=Ctx)
    builder.add_node("node", node)
    builder.add_node("untyped", guard_node(untyped, cycles=cy, subject=Subject(tenant=tenant), estimate=usd("0.01")))
    builder.add_edge(START, "node")
    builder.add_edge("node", "untyped")
    cy.budgets.set(f"tenant:{tenant}/workflow:run-1", usd(1))
    store = InMemoryStore()

    chunks = list(
        builder.compile(store=store).stream(
            {"done": []},
            {"configurable": {"thread_id": "run-1"}},
            context=Ctx(user="ann"),
            stream_mode=["custom", "values"],
        )
    )

    assert seen == {"thread": "run-1", "user": "ann", "store": store}
    assert ("custom", {"progress": "half way"}) in chunks
    assert chunks[-1] == ("values", {"done": ["node", "untyped"]})
    assert spent(cy, f"tenant:{tenant}/workflow:run-1") == usd("0.02").amount
    assert spent(cy, f"tenant:{tenant}") == usd("0.03").amount


def test_model_calls_inside_a_guarded_node_draw_from_its_reservation(cy: Cycles, tenant: str) -> None:
    """The node reserves once; the callbacks' calls inside it are charged against that reservation."""
    cy.budgets.set(f"tenant:{tenant}", usd(1))
    model = scripted(reply("a"), reply("b"))

    def two_calls(state: Work) -> Work:
        model.invoke("first")
        model.invoke("second")
        return {"done": ["two_calls"]}

    builder = StateGraph(Work)
    builder.add_node("two", guard_node(two_calls, cycles=cy, subject=Subject(tenant=tenant), estimate=usd(1)))
    builder.add_edge(START, "two")
    handler = CyclesCallbackHandler(cy, Subject(tenant=tenant))

    builder.compile().invoke({"done": []}, {"callbacks": [handler]})

    assert spent(cy, f"tenant:{tenant}") == 2 * CALL_COST.amount


@pytest.mark.asyncio
@pytest.mark.parametrize("client", ["sync", "async"])
async def test_async_nodes_are_guarded(cy: Cycles, tenant: str, client: str) -> None:
    cy.budgets.set(f"tenant:{tenant}", usd(1))
    budget = cy if client == "sync" else AsyncCycles(ledger=cy.ledger)

    async def step(state: Work, config: RunnableConfig) -> Work:
        await asyncio.sleep(0)
        return {"done": [config["metadata"]["langgraph_node"]]}

    async def sorry(state: Work) -> Work:
        return {"route": "sorry"}

    builder = StateGraph(Work)
    builder.add_node(
        "step",
        guard_node(step, cycles=budget, subject=Subject(tenant=tenant), estimate=usd("0.3"), fallback="sorry"),
    )
    builder.add_node("sorry", sorry)
    builder.add_edge(START, "step")
    builder.add_conditional_edges("step", lambda s: END if s.get("route") == "sorry" else "step")

    out = await builder.compile().ainvoke({"done": []})

    assert out == {"done": ["step"] * 3, "route": "sorry"}
    assert spent(cy, f"tenant:{tenant}") == usd("0.9").amount


def test_a_sync_node_with_an_async_client_is_refused(cy: Cycles, tenant: str) -> None:
    with pytest.raises(TypeError, match="AsyncCycles"):
        guard_node(lambda s: s, cycles=AsyncCycles(ledger=cy.ledger), subject=Subject(tenant=tenant), estimate=usd(1))


def test_the_action_can_be_named(cy: Cycles, tenant: str) -> None:
    cy.budgets.set(f"tenant:{tenant}", usd(1))
    node = guard_node(
        lambda s: {"done": ["x"]},
        cycles=cy,
        subject=Subject(tenant=tenant),
        estimate=usd("0.1"),
        action=Action("graph.node", "summarize"),
    )
    node({"done": []}, config={})

    (reservation,) = cy.list_reservations(tenant=tenant).reservations
    assert reservation.action.name == "summarize"


# -- fan-out -----------------------------------------------------------------------------------


class FanOut(TypedDict, total=False):
    done: Annotated[list[int], operator.add]
    denied: Annotated[int, operator.add]


def _fan_out(worker: Any, cy: Cycles | AsyncCycles, tenant: str) -> Any:
    def sorry(state: FanOut) -> FanOut:
        return {"denied": 1}

    builder = StateGraph(FanOut)
    builder.add_node(
        "worker",
        guard_node(worker, cycles=cy, subject=per_run(Subject(tenant=tenant)), estimate=usd("0.15"), fallback="sorry"),
    )
    builder.add_node("sorry", sorry)
    builder.add_conditional_edges(START, lambda s: [Send("worker", {"i": i}) for i in range(12)])
    return builder.compile()


def test_parallel_branches_share_one_budget_and_never_overspend(cy: Cycles, tenant: str) -> None:
    cy.budgets.set(f"tenant:{tenant}", usd(10))
    cy.budgets.set(f"tenant:{tenant}/workflow:fan", usd(1))
    running, peak = [0], [0]
    lock = threading.Lock()

    def worker(state: dict[str, int]) -> FanOut:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.05)  # hold the reservations while the others try
        with lock:
            running[0] -= 1
        return {"done": [state["i"]]}

    out = _fan_out(worker, cy, tenant).invoke({"done": []}, {"configurable": {"thread_id": "fan"}})

    assert peak[0] > 1, "the branches were meant to run in parallel"
    assert len(out["done"]) == 6  # $1 / $0.15
    assert out["denied"] == 1  # the six denied branches all went to the (one) fallback task
    assert spent(cy, f"tenant:{tenant}/workflow:fan") == usd("0.90").amount


@pytest.mark.asyncio
async def test_parallel_async_branches_share_one_budget(cy: Cycles, tenant: str) -> None:
    cy.budgets.set(f"tenant:{tenant}", usd(10))
    cy.budgets.set(f"tenant:{tenant}/workflow:fan", usd(1))

    async def worker(state: dict[str, int]) -> FanOut:
        await asyncio.sleep(0.02)
        return {"done": [state["i"]]}

    graph = _fan_out(worker, AsyncCycles(ledger=cy.ledger), tenant)
    out = await graph.ainvoke({"done": []}, {"configurable": {"thread_id": "fan"}})

    assert len(out["done"]) == 6
    assert spent(cy, f"tenant:{tenant}/workflow:fan") == usd("0.90").amount


@tool
def lookup(q: str) -> str:
    """Look something up."""
    return "nothing new"


class Team(TypedDict, total=False):
    messages: Annotated[list[Any], operator.add]


def test_parallel_sub_agents_draw_from_the_parent_run_atomically(cy: Cycles, tenant: str) -> None:
    """Two runaway sub-agents as parallel subgraphs, each its own agent scope under the run's $1."""
    cy.budgets.set(f"tenant:{tenant}", usd(10))
    cy.budgets.set(f"tenant:{tenant}/workflow:job", usd(1))
    for i in range(2):
        cy.budgets.set(f"tenant:{tenant}/workflow:job/agent:researcher-{i}", usd(5))
    models = [runaway("lookup"), runaway("lookup")]

    def sub_agent(name: str, model: Any) -> Any:
        def subject(config: RunnableConfig) -> Subject:
            return per_run(Subject(tenant=tenant, agent=name))(config)

        agent = create_agent(model, [lookup], middleware=[CyclesMiddleware(cy, subject)])

        def run(state: Team) -> Team:
            out = agent.invoke({"messages": [HumanMessage(f"{name}: research")]})
            return {"messages": [out["messages"][-1]]}

        return run

    builder = StateGraph(Team)
    for i, model in enumerate(models):
        builder.add_node(f"agent{i}", sub_agent(f"researcher-{i}", model))
        builder.add_edge(START, f"agent{i}")

    out = builder.compile().invoke({"messages": []}, {"configurable": {"thread_id": "job"}})

    assert all("budget" in m.text for m in out["messages"])  # both ended cleanly
    assert sum(len(m.calls) for m in models) == 2  # $1 pays for two calls in all, whoever made them
    assert spent(cy, f"tenant:{tenant}/workflow:job") == 2 * CALL_COST.amount
    per_agent = [spent(cy, f"tenant:{tenant}/workflow:job/agent:researcher-{i}") for i in range(2)]
    assert sum(per_agent) == 2 * CALL_COST.amount
