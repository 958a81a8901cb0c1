"""Scripted model turns, tools and ledger helpers shared by the adapter tests."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from agents import Usage, function_tool
from agents.testing import ModelStep, ScriptedModel, assistant_message, function_call

from cycles import Amount, AsyncCycles, Balance, Subject, Unit
from cycles.pricing import price_usage, register_price

MODEL = "scripted-model"
register_price(MODEL, input_per_mtok=2.0, output_per_mtok=8.0)

SUBJECT = Subject(tenant="acme", workflow="run-42")
WORKFLOW = "tenant:acme/workflow:run-42"
_call_ids = itertools.count(1)  # the SDK may skip a call id it has already run: keep them unique


def usage(input_tokens: int = 1000, output_tokens: int = 200) -> Usage:
    return Usage(
        requests=1,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        total_tokens=input_tokens + output_tokens,
    )


def tool_round(*calls: tuple[str, dict[str, Any]], tokens: tuple[int, int] = (1000, 200)) -> ModelStep:
    """One model turn asking for tool calls (parallel when more than one)."""
    output = [function_call(name, args, call_id=f"call-{next(_call_ids)}") for name, args in calls]
    return ModelStep(output=output, usage=usage(*tokens))


def answer(text: str = "done", tokens: tuple[int, int] = (1500, 50)) -> ModelStep:
    return ModelStep(output=[assistant_message(text)], usage=usage(*tokens))


def scripted(steps: Sequence[ModelStep]) -> ScriptedModel:
    return ScriptedModel(list(steps))


@function_tool
def search(query: str) -> str:
    """Search the web."""
    return f"results for {query}"


async def balance(cy: AsyncCycles, scope: str = WORKFLOW, unit: Unit = Unit.USD_MICROCENTS) -> Balance:
    return await cy.budgets.get(scope, unit)


def priced(*steps: ModelStep) -> Amount:
    """What the scripted turns cost at the registered price: the amount that must be committed."""
    total = 0
    for step in steps:
        total += price_usage(MODEL, input_tokens=step.usage.input_tokens, output_tokens=step.usage.output_tokens).amount
    return Amount(unit=Unit.USD_MICROCENTS, amount=total)
