"""The input guardrail refuses an unaffordable run before any model call; tool guardrails enforce
per-tool budgets, risk points and the caps' tool lists, rejecting (the model goes on) or raising."""

from __future__ import annotations

from typing import Any

import pytest
from agents import (
    Agent,
    FunctionTool,
    InputGuardrailTripwireTriggered,
    Runner,
    ToolInputGuardrailTripwireTriggered,
    function_tool,
)
from agents_fakes import MODEL, SUBJECT, WORKFLOW, answer, balance, priced, scripted, search, tool_round

from cycles import AsyncCycles, Caps, ToolNotAllowed, Unit, risk_points, usd
from cycles_openai_agents import CyclesRunHooks, OnToolDenied


def deploy_tool(hooks: CyclesRunHooks, cost: Any = None, on_deny: OnToolDenied = "reject") -> FunctionTool:
    @function_tool(tool_input_guardrails=[hooks.tool_guardrail(cost, on_deny=on_deny)])
    def deploy(service: str) -> str:
        """Deploy a service to production."""
        return f"{service} deployed"

    return deploy


def tool_outputs(model_input: Any) -> list[str]:
    return [str(item["output"]) for item in model_input if item.get("type") == "function_call_output"]


async def test_the_blocking_guardrail_makes_zero_model_calls_when_the_budget_is_empty(
    cy: AsyncCycles,
) -> None:
    await cy.budgets.set(WORKFLOW, usd(0))
    model = scripted([answer()])
    hooks = CyclesRunHooks(cy, subject=SUBJECT, model=MODEL)
    guardrail = hooks.input_guardrail()
    assert guardrail.run_in_parallel is False  # the SDK runs it before the model, not alongside

    with pytest.raises(InputGuardrailTripwireTriggered) as tripped:
        await Runner.run(Agent(name="a", model=model, input_guardrails=[guardrail]), "expensive question")

    assert model.calls == ()
    assert tripped.value.guardrail_result.output.output_info["reason_code"] == "BUDGET_EXCEEDED"
    assert (await cy.list_reservations(tenant="acme")).reservations == []


async def test_the_blocking_guardrail_also_runs_first_in_a_streamed_run(cy: AsyncCycles) -> None:
    await cy.budgets.set(WORKFLOW, usd(0))
    model = scripted([answer()])
    hooks = CyclesRunHooks(cy, subject=SUBJECT, model=MODEL)
    agent = Agent(name="a", model=model, input_guardrails=[hooks.input_guardrail()])

    result = hooks.run_streamed(agent, "expensive question")
    with pytest.raises(InputGuardrailTripwireTriggered):
        async for _ in result.stream_events():
            pass

    assert model.calls == ()


async def test_the_input_guardrail_lets_an_affordable_run_through(cy: AsyncCycles) -> None:
    await cy.budgets.set(WORKFLOW, usd(1))
    hooks = CyclesRunHooks(cy, subject=SUBJECT, model=MODEL)
    agent = Agent(name="a", model=scripted([answer("ok")]), input_guardrails=[hooks.input_guardrail()])

    result = await hooks.run(agent, "cheap question")

    assert result.final_output == "ok"
    assert result.input_guardrail_results[0].output.tripwire_triggered is False


async def test_the_input_guardrail_can_demand_a_minimum_for_the_whole_run(cy: AsyncCycles) -> None:
    await cy.budgets.set(WORKFLOW, usd("0.5"))
    model = scripted([answer()])
    hooks = CyclesRunHooks(cy, subject=SUBJECT, model=MODEL)
    agent = Agent(name="a", model=model, input_guardrails=[hooks.input_guardrail(estimate=usd(1))])

    with pytest.raises(InputGuardrailTripwireTriggered):
        await hooks.run(agent, "a long research task")
    assert model.calls == ()


async def test_a_tool_over_its_risk_points_is_rejected_and_the_agent_continues(cy: AsyncCycles) -> None:
    await cy.budgets.set(WORKFLOW, usd(1))
    await cy.budgets.set(WORKFLOW, risk_points(10))
    hooks = CyclesRunHooks(cy, subject=SUBJECT, model=MODEL)
    model = scripted([tool_round(("deploy", {"service": "api"})), answer("could not deploy, told the user")])
    agent = Agent(name="ops", model=model, tools=[deploy_tool(hooks, risk_points(50))])

    result = await hooks.run(agent, "ship it")

    assert result.final_output == "could not deploy, told the user"
    [rejection] = tool_outputs(model.calls[1].input)
    assert rejection.startswith("Not run: Insufficient remaining budget")
    rp = await balance(cy, unit=Unit.RISK_POINTS)
    assert rp.spent == risk_points(0)
    assert rp.reserved == risk_points(0)


async def test_an_allowed_risky_tool_commits_its_risk_points(cy: AsyncCycles) -> None:
    await cy.budgets.set(WORKFLOW, usd(1))
    await cy.budgets.set(WORKFLOW, risk_points(100))
    hooks = CyclesRunHooks(cy, subject=SUBJECT, model=MODEL)
    model = scripted([tool_round(("deploy", {"service": "api"})), answer("deployed")])
    agent = Agent(name="ops", model=model, tools=[deploy_tool(hooks, risk_points(60))])

    await hooks.run(agent, "ship it")

    assert tool_outputs(model.calls[1].input) == ["api deployed"]
    assert (await balance(cy, unit=Unit.RISK_POINTS)).spent == risk_points(60)


async def test_a_tool_guardrail_can_raise_instead(cy: AsyncCycles) -> None:
    await cy.budgets.set(WORKFLOW, usd(1))
    await cy.budgets.set(WORKFLOW, risk_points(10))
    hooks = CyclesRunHooks(cy, subject=SUBJECT, model=MODEL)
    model = scripted([tool_round(("deploy", {"service": "api"})), answer()])
    agent = Agent(name="ops", model=model, tools=[deploy_tool(hooks, risk_points(50), on_deny="raise")])

    with pytest.raises(ToolInputGuardrailTripwireTriggered) as tripped:
        await hooks.run(agent, "ship it")

    assert tripped.value.output.output_info["reason_code"] == "BUDGET_EXCEEDED"
    assert len(model.calls) == 1


async def test_a_budget_on_the_tools_own_scope_limits_that_tool_alone(cy: AsyncCycles) -> None:
    await cy.budgets.set(WORKFLOW, usd(1))
    await cy.budgets.set(f"{WORKFLOW}/toolset:search", usd("0.015"))
    hooks = CyclesRunHooks(cy, subject=SUBJECT, model=MODEL, tool_costs={"search": usd("0.01")})

    @function_tool(name_override="search", tool_input_guardrails=[hooks.tool_guardrail()])
    def guarded_search(query: str) -> str:
        """Search the web."""
        return f"results for {query}"

    model = scripted(
        [
            tool_round(("search", {"query": "one"})),
            tool_round(("search", {"query": "two"})),
            answer("answered with one search"),
        ]
    )

    await hooks.run(Agent(name="a", model=model, tools=[guarded_search]), "research")

    assert tool_outputs(model.calls[1].input) == ["results for one"]
    assert tool_outputs(model.calls[2].input)[-1].startswith("Not run:")
    assert (await cy.budgets.get(f"{WORKFLOW}/toolset:search")).spent == usd("0.01")


async def test_parallel_tool_calls_are_reserved_and_committed_one_by_one(cy: AsyncCycles) -> None:
    await cy.budgets.set(WORKFLOW, usd(1))
    hooks = CyclesRunHooks(cy, subject=SUBJECT, model=MODEL, tool_costs={"search": usd("0.01")})
    steps = [tool_round(("search", {"query": "a"}), ("search", {"query": "b"})), answer()]

    await hooks.run(Agent(name="a", model=scripted(steps), tools=[search]), "two searches at once")

    tools = [r for r in (await cy.list_reservations(tenant="acme")).reservations if r.action.kind == "tool.call"]
    assert [(r.status.value, r.committed) for r in tools] == [("COMMITTED", usd("0.01"))] * 2
    assert (await balance(cy)).spent == priced(*steps) + usd("0.02")


async def test_a_tool_the_caps_deny_stops_the_run_from_the_hooks(cy: AsyncCycles) -> None:
    await cy.budgets.set(WORKFLOW, usd(1), caps=Caps(tool_denylist=["search"]))
    hooks = CyclesRunHooks(cy, subject=SUBJECT, model=MODEL)
    model = scripted([tool_round(("search", {"query": "x"})), answer()])

    with pytest.raises(ToolNotAllowed):
        await hooks.run(Agent(name="a", model=model, tools=[search]), "search")


async def test_a_tool_the_caps_deny_is_rejected_by_the_guardrail(cy: AsyncCycles) -> None:
    await cy.budgets.set(WORKFLOW, usd(1), caps=Caps(tool_allowlist=["search"]))
    hooks = CyclesRunHooks(cy, subject=SUBJECT, model=MODEL)
    model = scripted([tool_round(("deploy", {"service": "api"})), answer("not allowed to deploy")])

    result = await hooks.run(Agent(name="a", model=model, tools=[deploy_tool(hooks)]), "ship it")

    assert result.final_output == "not allowed to deploy"
    assert "not allowed" in tool_outputs(model.calls[1].input)[0]
