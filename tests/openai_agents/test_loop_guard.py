"""The loop guard through the OpenAI Agents SDK hooks and tool guardrail: a tool call's name and
canonical arguments (the model's JSON text, parsed) are its fingerprint
(``cycles.with_args_fingerprint``). The same call repeated past the guard is denied the way the
adapter denies any tool: the hooks stop the run with ``LoopDetected``, the guardrail rejects the call
and the model reads why. The same tool with other arguments runs."""

from __future__ import annotations

from typing import Any

import pytest
from agents import Agent, function_tool
from agents_fakes import MODEL, SUBJECT, WORKFLOW, answer, scripted, tool_round

from cycles import AsyncCycles, LoopDetected, usd
from cycles_openai_agents import CyclesRunHooks

LOOKUPS: list[str] = []


def tool_outputs(model_input: Any) -> list[str]:
    return [str(item["output"]) for item in model_input if item.get("type") == "function_call_output"]


@function_tool
def lookup(order: str, verbose: bool = False) -> str:
    """Look an order up."""
    LOOKUPS.append(order)
    return f"order {order}: shipped"


async def test_the_hooks_stop_a_run_repeating_one_tool_call(cy: AsyncCycles) -> None:
    await cy.budgets.set(WORKFLOW, usd(1))
    await cy.quotas.set_loop_guard("tenant:acme", 2)
    LOOKUPS.clear()
    hooks = CyclesRunHooks(cy, subject=SUBJECT, model=MODEL, tool_costs={"lookup": usd("0.01")})
    model = scripted(
        [
            tool_round(("lookup", {"order": "A-1", "verbose": True})),
            tool_round(("lookup", {"order": "A-2", "verbose": True})),  # other arguments
            tool_round(("lookup", {"verbose": True, "order": "A-1"})),  # the same call, keys reordered
            tool_round(("lookup", {"order": "A-1", "verbose": True})),  # third: the loop guard stops the run
            answer("never reached"),
        ]
    )

    with pytest.raises(LoopDetected) as denied:
        await hooks.run(Agent(name="support", model=model, tools=[lookup]), "where is A-1?")

    assert denied.value.reason_code == "LOOP_DETECTED"
    assert LOOKUPS == ["A-1", "A-2", "A-1"]


async def test_the_guardrail_rejects_the_repeat_and_the_model_goes_on(cy: AsyncCycles) -> None:
    await cy.budgets.set(WORKFLOW, usd(1))
    await cy.quotas.set_loop_guard("tenant:acme", 1)
    hooks = CyclesRunHooks(cy, subject=SUBJECT, model=MODEL)
    ran: list[str] = []

    @function_tool(tool_input_guardrails=[hooks.tool_guardrail(usd("0.01"))])
    def refund(order: str) -> str:
        """Refund an order."""
        ran.append(order)
        return f"refunded {order}"

    model = scripted(
        [
            tool_round(("refund", {"order": "A-1"})),
            tool_round(("refund", {"order": "A-1"})),  # the same refund again: rejected
            tool_round(("refund", {"order": "A-2"})),
            answer("refunded A-1 and A-2"),
        ]
    )

    result = await hooks.run(Agent(name="support", model=model, tools=[refund]), "refund A-1 and A-2")

    assert result.final_output == "refunded A-1 and A-2"
    assert ran == ["A-1", "A-2"]
    rejection = tool_outputs(model.calls[2].input)[1]
    assert rejection.startswith("Not run: loop detected")
