"""Every model call is reserved in on_llm_start and committed at its priced usage in on_llm_end."""

from __future__ import annotations

from pathlib import Path

import pytest
from agents import Agent, ModelSettings, Runner
from agents_fakes import MODEL, SUBJECT, WORKFLOW, answer, balance, priced, scripted, search, tool_round

from cycles import AsyncCycles, BudgetExceeded, Subject, usd
from cycles.pricing import approx_messages_tokens, estimate_cost
from cycles.testing import assert_ledger_invariant_async
from cycles_openai_agents import CyclesRunHooks


async def test_committed_cost_is_the_priced_usage_not_the_estimate(cy: AsyncCycles) -> None:
    await cy.budgets.set(WORKFLOW, usd(1))
    steps = [tool_round(("search", {"query": "cycles"})), answer("found it")]
    model = scripted(steps)
    hooks = CyclesRunHooks(cy, subject=SUBJECT, model=MODEL)

    result = await Runner.run(Agent(name="researcher", model=model, tools=[search]), "look it up", hooks=hooks)

    assert result.final_output == "found it"
    spent = (await balance(cy)).spent
    assert spent is not None
    assert spent == priced(*steps)
    committed = (await cy.list_reservations(status="COMMITTED", tenant="acme")).reservations
    llm = sorted(r.committed.amount for r in committed if r.action.kind == "llm.completion" and r.committed)
    assert llm == sorted(priced(step).amount for step in steps)
    # the estimate reserved the full default max_output_tokens, far above what was used
    assert all(
        r.reserved.amount > r.committed.amount for r in committed if r.action.kind == "llm.completion" and r.committed
    )


async def test_a_looping_agent_is_stopped_at_its_budget(cy: AsyncCycles) -> None:
    await cy.budgets.set(WORKFLOW, usd("0.02"))
    loop = [tool_round(("search", {"query": f"attempt {i}"})) for i in range(30)]
    model = scripted(loop)
    hooks = CyclesRunHooks(cy, subject=SUBJECT, model=MODEL)

    with pytest.raises(BudgetExceeded) as denied:
        await hooks.run(Agent(name="looper", model=model, tools=[search]), "never stop", max_turns=100)

    calls = len(model.calls)
    assert 1 < calls < len(loop)
    b = await balance(cy)
    assert b.spent == priced(*loop[:calls])
    assert b.reserved is not None
    assert b.reserved.amount == 0
    assert denied.value.scope == WORKFLOW
    # it stopped because the next call's worst case no longer fitted, not earlier
    assert b.remaining.amount < estimate_cost(MODEL, input_tokens=0, max_output_tokens=1024).amount


async def test_a_denial_in_on_llm_start_means_the_model_is_never_called(cy: AsyncCycles) -> None:
    await cy.budgets.set(WORKFLOW, usd(0))
    model = scripted([answer()])
    hooks = CyclesRunHooks(cy, subject=SUBJECT, model=MODEL)

    with pytest.raises(BudgetExceeded):
        await Runner.run(Agent(name="a", model=model), "hi", hooks=hooks)

    assert model.calls == ()


async def test_the_estimate_covers_the_prompt_and_the_agents_max_tokens(cy: AsyncCycles) -> None:
    await cy.budgets.set(WORKFLOW, usd(1))
    hooks = CyclesRunHooks(cy, subject=SUBJECT, model=MODEL)
    agent = Agent(
        name="a",
        instructions="Be brief.",
        model=scripted([answer()]),
        model_settings=ModelSettings(max_tokens=64),
    )

    await Runner.run(agent, "hello there", hooks=hooks)

    [reservation] = (await cy.list_reservations(tenant="acme")).reservations
    prompt = approx_messages_tokens(["Be brief.", '{"content": "hello there", "role": "user"}'])
    assert reservation.reserved == estimate_cost(MODEL, input_tokens=prompt, max_output_tokens=64)


async def test_handoffs_are_recorded_and_each_agent_pays_from_its_own_scope(cy: AsyncCycles) -> None:
    await cy.budgets.set("tenant:acme", usd(1))
    await cy.budgets.set("tenant:acme/agent:billing", usd("0.5"))
    billing = Agent(name="billing", model=scripted([answer("refund issued")]))
    triage_steps = [tool_round(("transfer_to_billing", {}))]
    triage = Agent(name="triage", model=scripted(triage_steps), handoffs=[billing])
    hooks = CyclesRunHooks(cy, subject=lambda agent: Subject(tenant="acme", agent=agent.name), model=MODEL)

    result = await hooks.run(triage, "I want my money back")

    assert result.final_output == "refund issued"
    assert hooks.handoffs == [("triage", "billing")]
    assert (await cy.budgets.get("tenant:acme/agent:billing")).spent == priced(answer("refund issued"))
    reservations = (await cy.list_reservations(tenant="acme", include=["metadata"])).reservations
    by_agent = {(r.metadata or {}).get("agent"): r.scope_path for r in reservations}
    assert by_agent == {"triage": "tenant:acme/agent:triage", "billing": "tenant:acme/agent:billing"}


async def test_the_model_name_comes_from_the_agent_when_not_given(cy: AsyncCycles) -> None:
    hooks = CyclesRunHooks(cy, subject=SUBJECT)
    assert hooks.model_name(Agent(name="a", model="gpt-4o")) == "gpt-4o"
    with pytest.raises(ValueError, match="cannot tell which model"):
        hooks.model_name(Agent(name="a", model=scripted([])))


async def test_shadow_mode_never_blocks_and_logs_what_it_would_have_denied(tmp_path: Path) -> None:
    shadow = AsyncCycles(f"sqlite:///{tmp_path / 'shadow.db'}", mode="shadow")
    await shadow.budgets.set(WORKFLOW, usd(0))
    hooks = CyclesRunHooks(shadow, subject=SUBJECT, model=MODEL, tool_costs={"search": usd("0.01")})
    steps = [tool_round(("search", {"query": "x"})), answer("done anyway")]
    model = scripted(steps)
    agent = Agent(name="a", model=model, tools=[search], input_guardrails=[hooks.input_guardrail()])

    result = await hooks.run(agent, "hi")

    assert result.final_output == "done anyway"
    assert len(model.calls) == 2
    assert result.input_guardrail_results[0].output.output_info["decision"] == "DENY"  # noted, not enforced
    # every call would have been denied (after the first, because shadow spend put the scope over its limit)
    assert [r.action.kind for r in shadow.shadow_log] == ["llm.completion", "tool.call", "llm.completion"]
    assert shadow.shadow_log[0].reason_code == "BUDGET_EXCEEDED"
    await assert_ledger_invariant_async(shadow)
    await shadow.aclose()
