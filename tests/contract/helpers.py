"""Small helpers shared by the contract tests."""

from __future__ import annotations

from cycles import Action, Amount, Balance, Cycles, Subject

LLM = Action("llm.completion", "openai:gpt-4o")
TOOL = Action("tool.call", "search")


def bal(cy: Cycles, scope: str) -> Balance:
    return cy.budgets.get(scope)


def amounts(b: Balance) -> tuple[int, int, int, int, int]:
    """(allocated, spent, reserved, debt, remaining) of a balance."""
    assert b.allocated and b.spent and b.reserved and b.debt
    return b.allocated.amount, b.spent.amount, b.reserved.amount, b.debt.amount, b.remaining.amount


def subject(**levels: str) -> Subject:
    return Subject(**levels)


def amt(b: Amount | None) -> int:
    assert b is not None
    return b.amount
