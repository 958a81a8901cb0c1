"""A run that raises or is cancelled leaves nothing reserved: the SDK has no hook for a failed
model call, so run()/run_streamed() release what a run left pending and CyclesModel releases at once."""

from __future__ import annotations

import asyncio

import pytest
from agents import Agent, ModelSettings, Runner, UserError, function_tool
from agents.retry import ModelRetrySettings, RetryDecision
from agents.testing import ModelCall, ModelStep
from agents_fakes import MODEL, SUBJECT, WORKFLOW, answer, balance, priced, scripted, tool_round

from cycles import AsyncCycles, ReservationStatus, usd
from cycles_openai_agents import CyclesModel, CyclesRunHooks


class ProviderDown(Exception):
    pass


async def statuses(cy: AsyncCycles) -> list[str]:
    return sorted(r.status.value for r in (await cy.list_reservations(tenant="acme")).reservations)


async def test_run_releases_the_model_reservation_when_the_model_raises(cy: AsyncCycles) -> None:
    await cy.budgets.set(WORKFLOW, usd(1))
    hooks = CyclesRunHooks(cy, subject=SUBJECT, model=MODEL)
    model = scripted([ModelStep.raise_error(ProviderDown("503"))])

    with pytest.raises(ProviderDown):
        await hooks.run(Agent(name="a", model=model), "hi")

    assert await statuses(cy) == ["RELEASED"]
    b = await balance(cy)
    assert b.reserved == usd(0)
    assert b.spent == usd(0)


async def test_the_model_wrapper_releases_even_under_a_plain_runner_run(cy: AsyncCycles) -> None:
    await cy.budgets.set(WORKFLOW, usd(1))
    hooks = CyclesRunHooks(cy, subject=SUBJECT)
    model = CyclesModel(scripted([ModelStep.raise_error(ProviderDown("503"))]), hooks, name=MODEL)

    with pytest.raises(ProviderDown):
        await Runner.run(Agent(name="a", model=model), "hi", hooks=hooks)

    assert await statuses(cy) == ["RELEASED"]


async def test_release_pending_settles_what_a_plain_runner_run_left_open(cy: AsyncCycles) -> None:
    await cy.budgets.set(WORKFLOW, usd(1))
    hooks = CyclesRunHooks(cy, subject=SUBJECT, model=MODEL)

    with pytest.raises(ProviderDown):
        await Runner.run(Agent(name="a", model=scripted([ModelStep.raise_error(ProviderDown())])), "hi", hooks=hooks)
    assert await statuses(cy) == ["ACTIVE"]  # the SDK never told the hooks the call failed

    await hooks.release_pending()
    assert await statuses(cy) == ["RELEASED"]


async def test_a_tool_that_raises_releases_its_reservation_and_keeps_the_model_cost(cy: AsyncCycles) -> None:
    await cy.budgets.set(WORKFLOW, usd(1))
    hooks = CyclesRunHooks(cy, subject=SUBJECT, model=MODEL, tool_costs={"explode": usd("0.1")})

    @function_tool(failure_error_function=None)
    def explode() -> str:
        """Always fails."""
        raise RuntimeError("kaboom")

    steps = [tool_round(("explode", {}))]
    with pytest.raises(UserError):
        await hooks.run(Agent(name="a", model=scripted([*steps, answer()]), tools=[explode]), "go")

    assert await statuses(cy) == ["COMMITTED", "RELEASED"]
    assert (await balance(cy)).spent == priced(*steps)


async def test_a_cancelled_run_charges_the_call_in_flight_at_its_estimate(cy: AsyncCycles) -> None:
    await cy.budgets.set(WORKFLOW, usd(1))
    hooks = CyclesRunHooks(cy, subject=SUBJECT, model=MODEL)
    model_called = asyncio.Event()

    async def hang(call: ModelCall) -> ModelStep:
        model_called.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    run = asyncio.create_task(hooks.run(Agent(name="a", model=scripted([ModelStep.respond(hang)])), "hi"))
    await model_called.wait()
    assert await statuses(cy) == ["ACTIVE"]
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run

    # the request reached the provider: it may have been billed, so it is never released
    assert await statuses(cy) == ["COMMITTED"]


async def test_a_failed_streamed_run_releases_its_reservation(cy: AsyncCycles) -> None:
    await cy.budgets.set(WORKFLOW, usd(1))
    hooks = CyclesRunHooks(cy, subject=SUBJECT, model=MODEL)
    result = hooks.run_streamed(Agent(name="a", model=scripted([ModelStep.raise_error(ProviderDown())])), "hi")

    with pytest.raises(ProviderDown):
        async for _ in result.stream_events():
            pass
    await hooks.wait_settled()

    assert await statuses(cy) == ["RELEASED"]


async def test_a_streamed_response_the_sdk_rejects_is_still_paid_for(cy: AsyncCycles) -> None:
    await cy.budgets.set(WORKFLOW, usd(1))
    hooks = CyclesRunHooks(cy, subject=SUBJECT, model=MODEL)
    model = scripted([tool_round(("missing_tool", {})), answer()])
    result = hooks.run_streamed(Agent(name="a", model=model), "hi")

    with pytest.raises(Exception, match="missing_tool"):
        async for _ in result.stream_events():
            pass
    await hooks.wait_settled()

    # the response arrived (and was paid for) before the SDK rejected its unknown tool
    assert await statuses(cy) == ["COMMITTED"]
    assert (await balance(cy)).reserved == usd(0)


async def test_a_streamed_model_error_releases_through_the_wrapper(cy: AsyncCycles) -> None:
    await cy.budgets.set(WORKFLOW, usd(1))
    hooks = CyclesRunHooks(cy, subject=SUBJECT)
    model = CyclesModel(scripted([ModelStep.raise_error(ProviderDown("stream cut"))]), hooks, name=MODEL)
    result = Runner.run_streamed(Agent(name="a", model=model), "hi", hooks=hooks)

    with pytest.raises(ProviderDown):
        async for _ in result.stream_events():
            pass

    reservations = (await cy.list_reservations(tenant="acme")).reservations
    assert [r.status for r in reservations] == [ReservationStatus.RELEASED]


async def test_a_retried_model_call_is_charged_even_after_its_reservation_was_released(
    cy: AsyncCycles,
) -> None:
    await cy.budgets.set(WORKFLOW, usd(1))
    hooks = CyclesRunHooks(cy, subject=SUBJECT)
    ok = answer("second time lucky")
    inner = scripted([ModelStep.raise_error(ProviderDown("blip")), ok])
    retry = ModelRetrySettings(max_retries=1, policy=lambda _: RetryDecision(retry=True, delay=0))
    agent = Agent(name="a", model=CyclesModel(inner, hooks, name=MODEL), model_settings=ModelSettings(retry=retry))

    result = await hooks.run(agent, "hi")

    assert result.final_output == "second time lucky" and len(inner.calls) == 2
    assert await statuses(cy) == ["RELEASED"]  # the failed attempt; the retry is charged as an event
    assert (await balance(cy)).spent == priced(ok)
