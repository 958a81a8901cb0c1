"""A runaway OpenAI Agents SDK agent on a budget, offline.

    python examples/openai_agents_budget.py     # pip install "cycles-openai-agents[openai-agents]"

The model is the SDK's own ScriptedModel, so no API key and no network: it asks once to deploy to
production and then keeps asking for web searches, forever. Cycles governs the run:

- every model call reserves its worst case before the model is called and commits the real token
  cost after; the run ends with a final message when the $0.05 budget can no longer cover a call;
- ``deploy`` costs 50 risk points and the run has 10: the tool guardrail refuses it, the model is
  told why and carries on;
- the input guardrail would have refused the whole run up front had the budget been empty.
"""

from __future__ import annotations

import asyncio
import itertools
import os

os.environ.setdefault("OPENAI_AGENTS_DISABLE_TRACING", "1")

from agents import Agent, Usage, function_tool, set_tracing_disabled
from agents.testing import ModelStep, ScriptedModel, function_call

from cycles import AsyncCycles, Subject, Unit, risk_points, usd
from cycles.pricing import register_price
from cycles_openai_agents import CyclesModel, CyclesRunHooks

MODEL = "scripted-model"
WORKFLOW = "tenant:acme/workflow:research-1"


def runaway_model() -> ScriptedModel:
    """Deploy once, then search forever; every turn reads 2,000 tokens and writes 300."""
    ids = itertools.count()

    def turn(tool: str, **args: str) -> ModelStep:
        call = function_call(tool, args, call_id=f"call-{next(ids)}")
        return ModelStep(output=[call], usage=Usage(requests=1, input_tokens=2000, output_tokens=300))

    return ScriptedModel([turn("deploy", service="api")] + [turn("search", query=f"q{i}") for i in range(100)])


async def main() -> None:
    set_tracing_disabled(True)
    register_price(MODEL, input_per_mtok=2.5, output_per_mtok=10)  # what the scripted model "costs"

    cy = AsyncCycles("memory://")
    await cy.budgets.set(WORKFLOW, usd("0.05"))
    await cy.budgets.set(WORKFLOW, risk_points(10))
    hooks = CyclesRunHooks(
        cy,
        subject=Subject(tenant="acme", workflow="research-1"),
        tool_costs={"deploy": risk_points(50)},
        on_exhausted="finish",
        final_message="I ran out of budget; here is what I found so far.",
    )

    @function_tool
    def search(query: str) -> str:
        """Search the web."""
        return f"3 results for {query!r}"

    @function_tool(tool_input_guardrails=[hooks.tool_guardrail()])
    def deploy(service: str) -> str:
        """Deploy a service to production."""
        return f"{service} deployed"

    model = runaway_model()
    agent = Agent(
        name="researcher",
        instructions="Research the question with web searches.",
        model=CyclesModel(model, hooks, name=MODEL),
        tools=[search, deploy],
        input_guardrails=[hooks.input_guardrail()],
    )

    result = await hooks.run(agent, "How do teams cap what their AI agents spend?", max_turns=200)

    spent = await cy.budgets.get(WORKFLOW, Unit.USD_MICROCENTS)
    risk = await cy.budgets.get(WORKFLOW, Unit.RISK_POINTS)
    refused = [r.output for r in result.tool_input_guardrail_results if r.output.behavior["type"] != "allow"]
    print(f"final output:    {result.final_output}")
    print(f"model calls:     {len(model.calls)} (the script had {len(model.calls) + model.remaining_steps})")
    print(f"stopped by:      {hooks.stopped}")
    print(f"deploy refused:  {refused[0].output_info['message'] if refused else 'no'}")
    print(f"budget:          spent {spent.spent} of {spent.allocated}, {spent.remaining} left")
    print(f"risk points:     spent {risk.spent} of {risk.allocated}")
    await cy.aclose()


if __name__ == "__main__":
    asyncio.run(main())
