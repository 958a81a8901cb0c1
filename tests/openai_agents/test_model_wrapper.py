"""CyclesModel shapes each call by its reservation: caps clamp max_tokens and hide forbidden tools,
and with on_exhausted="finish" a budget that is gone ends the run with a final message."""

from __future__ import annotations

import pytest
from agents import Agent, ModelSettings, function_tool
from agents_fakes import MODEL, SUBJECT, WORKFLOW, answer, balance, priced, scripted, search, tool_round

from cycles import AsyncCycles, BudgetExceeded, Caps, usd
from cycles_openai_agents import CyclesModel, CyclesRunHooks


@function_tool
def deploy(service: str) -> str:
    """Deploy a service."""
    return f"{service} deployed"


async def test_an_exhausted_budget_ends_the_run_with_a_final_message(cy: AsyncCycles) -> None:
    await cy.budgets.set(WORKFLOW, usd("0.02"))
    hooks = CyclesRunHooks(cy, subject=SUBJECT, on_exhausted="finish", final_message="Out of budget, stopping.")
    loop = [tool_round(("search", {"query": f"attempt {i}"})) for i in range(30)]
    inner = scripted(loop)

    result = await hooks.run(Agent(name="looper", model=CyclesModel(inner, hooks, name=MODEL), tools=[search]), "go")

    assert result.final_output == "Out of budget, stopping."
    assert isinstance(hooks.stopped, BudgetExceeded)
    calls = len(inner.calls)
    assert 1 < calls < len(loop)
    assert (await balance(cy)).spent == priced(*loop[:calls])


async def test_an_exhausted_budget_ends_a_streamed_run_with_a_final_message(cy: AsyncCycles) -> None:
    await cy.budgets.set(WORKFLOW, usd("0.02"))
    hooks = CyclesRunHooks(cy, subject=SUBJECT, on_exhausted="finish")
    loop = [tool_round(("search", {"query": f"attempt {i}"})) for i in range(30)]
    inner = scripted(loop)

    result = hooks.run_streamed(Agent(name="looper", model=CyclesModel(inner, hooks, name=MODEL), tools=[search]), "go")
    kinds = [event.type async for event in result.stream_events()]
    await hooks.wait_settled()

    assert result.final_output == hooks.final_message
    assert "raw_response_event" in kinds
    assert "run_item_stream_event" in kinds
    assert (await balance(cy)).spent == priced(*loop[: len(inner.calls)])


async def test_finish_mode_without_the_wrapper_still_refuses_to_call_the_model(cy: AsyncCycles) -> None:
    await cy.budgets.set(WORKFLOW, usd(0))
    hooks = CyclesRunHooks(cy, subject=SUBJECT, model=MODEL, on_exhausted="finish")
    model = scripted([answer()])

    with pytest.raises(BudgetExceeded):  # only the wrapper can answer instead of the model
        await hooks.run(Agent(name="a", model=model), "hi")
    assert model.calls == ()


async def test_caps_max_tokens_clamps_the_call(cy: AsyncCycles) -> None:
    await cy.budgets.set(WORKFLOW, usd(1), caps=Caps(max_tokens=50))
    hooks = CyclesRunHooks(cy, subject=SUBJECT)
    inner = scripted([answer(), answer()])
    roomy = Agent(
        name="roomy",
        model=CyclesModel(inner, hooks, name=MODEL),
        model_settings=ModelSettings(max_tokens=4000),
    )
    tight = roomy.clone(name="tight", model_settings=ModelSettings(max_tokens=20))

    await hooks.run(roomy, "hi")
    await hooks.run(tight, "hi")

    assert [call.model_settings.max_tokens for call in inner.calls] == [50, 20]


async def test_tools_the_caps_forbid_are_not_offered_to_the_model(cy: AsyncCycles) -> None:
    await cy.budgets.set(WORKFLOW, usd(1), caps=Caps(tool_denylist=["deploy"]))
    hooks = CyclesRunHooks(cy, subject=SUBJECT)
    inner = scripted([answer()])

    await hooks.run(Agent(name="a", model=CyclesModel(inner, hooks, name=MODEL), tools=[search, deploy]), "hi")

    assert [tool.name for tool in inner.calls[0].tools] == ["search"]


async def test_a_streamed_run_commits_the_priced_usage(cy: AsyncCycles) -> None:
    await cy.budgets.set(WORKFLOW, usd(1))
    hooks = CyclesRunHooks(cy, subject=SUBJECT)
    steps = [tool_round(("search", {"query": "streams"})), answer("streamed")]
    inner = scripted(steps)

    result = hooks.run_streamed(Agent(name="a", model=CyclesModel(inner, hooks, name=MODEL), tools=[search]), "hi")
    async for _ in result.stream_events():
        pass

    assert result.final_output == "streamed"
    assert all(call.streamed for call in inner.calls)
    assert (await balance(cy)).spent == priced(*steps)


def test_the_wrapper_takes_its_name_from_the_wrapped_model() -> None:
    hooks = CyclesRunHooks(AsyncCycles("memory://"), subject=SUBJECT)
    inner = scripted([])
    assert CyclesModel(inner, hooks).name is None  # ScriptedModel has no .model; OpenAI models do
    inner.model = "gpt-4o-mini"  # type: ignore[attr-defined]
    assert CyclesModel(inner, hooks).name == "gpt-4o-mini"
    assert hooks.model_name(Agent(name="a", model=CyclesModel(inner, hooks))) == "gpt-4o-mini"
