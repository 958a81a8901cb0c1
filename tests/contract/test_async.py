"""The async twin: same lifecycle with ``await`` (and concurrent tasks sharing one budget)."""

from __future__ import annotations

import asyncio

import pytest

from cycles import BudgetExceeded, Subject, usd
from cycles.testing import assert_ledger_invariant_async

from .conftest import Backend
from .helpers import LLM

RUN = Subject(tenant="acme", workflow="run-42")


async def test_async_guard_lifecycle(ledger: Backend) -> None:
    cy = ledger.open_async()
    await cy.budgets.set("tenant:acme/workflow:run-42", usd(1))
    async with cy.guard(RUN, LLM, estimate=usd(0.05)) as g:
        g.commit(usd(0.02))
    with pytest.raises(RuntimeError):
        async with cy.guard(RUN, LLM, estimate=usd(0.05)):
            raise RuntimeError("boom")
    b = await cy.budgets.get("tenant:acme/workflow:run-42")
    assert b.spent == usd(0.02) and b.reserved == usd(0)
    await assert_ledger_invariant_async(cy)
    await cy.aclose()


async def test_concurrent_tasks_never_overspend(ledger: Backend) -> None:
    cy = ledger.open_async()
    await cy.budgets.set("tenant:acme/workflow:run-42", usd(1))
    granted = 0

    async def agent() -> None:
        nonlocal granted
        for _ in range(10):
            try:
                async with cy.guard(RUN, LLM, estimate=usd(0.03)) as g:
                    await asyncio.sleep(0)
                    g.commit(usd(0.03))
                    granted += 1
            except BudgetExceeded:
                return

    await asyncio.gather(*(agent() for _ in range(8)))
    assert granted == 33
    b = await cy.budgets.get("tenant:acme/workflow:run-42")
    assert b.spent == usd(0.99)
    await assert_ledger_invariant_async(cy)
    await cy.aclose()


async def test_async_decorator_and_nesting(ledger: Backend) -> None:
    cy = ledger.open_async()
    await cy.budgets.set("tenant:acme/workflow:run-42", usd(1))

    @cy.guarded(RUN, LLM, estimate=usd(0.05), actual=lambda r: usd(0.01))
    async def call() -> str:
        return "ok"

    async with cy.guard(RUN, LLM, estimate=usd(0.2)) as outer:
        assert await call() == "ok"
        assert await call() == "ok"
    assert outer.charged == usd(0.02)
    await assert_ledger_invariant_async(cy)
    await cy.aclose()
