"""Each SDK run is one Cycles run: actions that ran are never released, failed tools follow one
policy, and a plain ``Runner.run`` that dies leaves no lease alive and no bookkeeping behind.
Each test ends with the shared check (``cycles.testing.assert_settled``)."""

from __future__ import annotations

import asyncio
import gc
import time
from typing import Any

import pytest
from agents import Agent, Runner, UserError, function_tool
from agents.testing import ModelStep
from agents_fakes import MODEL, SUBJECT, WORKFLOW, answer, priced, scripted, tool_round

from cycles import AsyncCycles, Denied, ReservationExpired, ReservationStatus, Subject, risk_points, usd
from cycles.testing import assert_settled_async
from cycles_openai_agents import CyclesRunHooks


class ProviderDown(Exception):
    pass


async def test_tools_that_ran_before_a_parallel_denial_are_committed(cy: AsyncCycles) -> None:
    await cy.budgets.set(WORKFLOW, usd(1))
    await cy.budgets.set(WORKFLOW, risk_points(20))
    ran: list[str] = []

    def risky(name: str) -> object:
        @function_tool(name_override=name)
        def act() -> str:
            """A consequential action."""
            ran.append(name)
            return f"{name} done"

        return act

    hooks = CyclesRunHooks(cy, subject=SUBJECT, model=MODEL, default_tool_cost=risk_points(8), tool_scopes=False)
    steps = [tool_round(("a", {}), ("b", {}), ("c", {}))]  # 8 + 8 + 8 > 20: the third is denied
    agent = Agent(name="ops", model=scripted([*steps, answer()]), tools=[risky("a"), risky("b"), risky("c")])
    with pytest.raises((Denied, UserError)):
        await Runner.run(agent, "go", hooks=hooks)  # hooks only, no hooks.run(): the run aborts

    tools = {
        r.action.name: r.status
        for r in (await cy.list_reservations(tenant="acme")).reservations
        if r.action.kind == "tool.call"
    }
    assert len(tools) == 2 and ReservationStatus.RELEASED not in tools.values()
    assert set(ran) <= set(tools)  # every tool that ran is committed, none released
    await assert_settled_async(cy, WORKFLOW, [priced(*steps), risk_points(16)])


async def test_a_plain_runner_run_that_dies_leaves_no_lease_and_no_bookkeeping(cy: AsyncCycles) -> None:
    short = AsyncCycles(ledger=cy.ledger, ttl_ms=1000, grace_period_ms=0)
    await short.budgets.set(WORKFLOW, usd(1))
    hooks = CyclesRunHooks(short, subject=SUBJECT, model=MODEL)
    with pytest.raises(ProviderDown):
        await Runner.run(Agent(name="a", model=scripted([ModelStep.raise_error(ProviderDown())])), "hi", hooks=hooks)
    (r,) = (await short.list_reservations(tenant="acme")).reservations
    assert r.status is ReservationStatus.ACTIVE  # the SDK never told the hooks the call failed
    gc.collect()
    assert hooks._runs == {}  # the SDK dropped the run: the hooks hold nothing of it

    deadline = time.monotonic() + 20  # no heartbeat keeps it alive: it expires
    while True:
        await short.sweep()
        try:
            if (await short.get_reservation(r.reservation_id)).status is ReservationStatus.EXPIRED:
                break
        except ReservationExpired:
            break
        assert time.monotonic() < deadline, "the reservation was kept alive"
        await asyncio.sleep(0.1)
    await assert_settled_async(short, WORKFLOW, usd(0))


async def test_a_failed_tool_is_released_unless_its_policy_charges_it(cy: AsyncCycles) -> None:
    await cy.budgets.set(WORKFLOW, usd(1))

    @function_tool  # the SDK's default failure_error_function turns the exception into a result
    def charge_card() -> str:
        """Charge the card."""
        raise RuntimeError("declined")

    @function_tool
    def send_sms() -> str:
        """Send an SMS (billed per attempt)."""
        raise RuntimeError("carrier error")

    hooks = CyclesRunHooks(
        cy,
        subject=SUBJECT,
        model=MODEL,
        tool_costs={"charge_card": usd("0.1"), "send_sms": usd("0.02")},
        charge_failed_tools=["send_sms"],
    )
    steps = [tool_round(("charge_card", {}), ("send_sms", {})), answer("both failed")]
    result = await hooks.run(Agent(name="a", model=scripted(steps), tools=[charge_card, send_sms]), "go")
    assert result.final_output == "both failed"
    tools = {
        r.action.name: r.status
        for r in (await cy.list_reservations(tenant="acme")).reservations
        if r.action.kind == "tool.call"
    }
    assert tools == {"charge_card": ReservationStatus.RELEASED, "send_sms": ReservationStatus.COMMITTED}
    await assert_settled_async(cy, WORKFLOW, [priced(*steps), usd("0.02")])


async def test_each_run_is_its_own_run_with_its_own_budget(cy: AsyncCycles) -> None:
    await cy.budgets.set("tenant:acme", usd(1))
    step = answer("ok")
    hooks = CyclesRunHooks(cy, subject=Subject(tenant="acme"), model=MODEL, run_budgets=[usd("0.01")])
    first = await hooks.run(Agent(name="a", model=scripted([step])), "hi")
    second = await hooks.run(Agent(name="a", model=scripted([step])), "hi")
    assert first.final_output == second.final_output == "ok"
    runs = {r.subject.workflow for r in (await cy.list_reservations(tenant="acme")).reservations}
    assert len(runs) == 2 and all(w and w.startswith("a-") for w in runs)
    await assert_settled_async(cy, "tenant:acme", [priced(step), priced(step)])


async def test_a_stream_cancelled_mid_answer_is_charged_for_what_it_generated(cy: AsyncCycles) -> None:
    from openai.types.responses import ResponseTextDeltaEvent

    from cycles.pricing import approx_tokens, price_usage
    from cycles_openai_agents import CyclesModel

    await cy.budgets.set(WORKFLOW, usd(1))
    hooks = CyclesRunHooks(cy, subject=SUBJECT)
    words = ["Budgets ", "keep ", "agents ", "honest "]
    generating = asyncio.Event()

    async def stream(call: object) -> Any:
        for i, word in enumerate(words):
            yield ResponseTextDeltaEvent(
                type="response.output_text.delta",
                item_id="msg-1",
                output_index=0,
                content_index=0,
                delta=word,
                logprobs=[],
                sequence_number=i,
            )
        generating.set()
        await asyncio.Event().wait()  # the provider keeps going until the consumer stops it

    model = CyclesModel(scripted([ModelStep.stream(stream)]), hooks, name=MODEL)
    result = hooks.run_streamed(Agent(name="a", model=model), "hi")

    async def consume() -> None:
        async for _ in result.stream_events():
            pass

    consumer = asyncio.create_task(consume())
    await generating.wait()
    result.cancel()
    await consumer
    await hooks.wait_settled()

    (r,) = (await cy.list_reservations(tenant="acme")).reservations
    assert r.status is ReservationStatus.COMMITTED and r.committed is not None
    output = approx_tokens("".join(words))
    assert r.committed.amount >= price_usage(MODEL, input_tokens=0, output_tokens=output).amount  # not $0
    assert r.committed.amount < price_usage(MODEL, input_tokens=0, output_tokens=1024).amount  # not the estimate
    await assert_settled_async(cy, WORKFLOW, r.committed)
