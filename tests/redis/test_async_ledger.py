"""The async twin: native redis.asyncio, the same flows and answers as the sync ledger."""

from __future__ import annotations

import asyncio

import pytest

from cycles import Action, AsyncCycles, Cycles, Subject, tokens
from cycles.errors import BudgetExceeded, LedgerUnavailable, NotFound
from cycles.ledger.redis import AsyncRedisLedger
from cycles.testing import assert_ledger_invariant_async
from tests.redis.conftest import PrivateRedis

LLM = Action("llm.completion", "m")


async def test_async_cycles_uses_the_native_async_ledger(url: str) -> None:
    acy = AsyncCycles(url)
    assert isinstance(acy.ledger, AsyncRedisLedger)
    await acy.budgets.set("tenant:acme", tokens(100))
    async with acy.guard(Subject(tenant="acme", agent="a"), LLM, estimate=tokens(10)) as g:
        g.commit(tokens(7))
    b = await acy.budgets.get("tenant:acme")
    assert (b.spent and b.spent.amount, b.reserved and b.reserved.amount) == (7, 0)
    await assert_ledger_invariant_async(acy)
    await acy.ledger.aclose()


async def test_async_and_sync_see_the_same_ledger(url: str) -> None:
    acy = AsyncCycles(url)
    cy = Cycles(url)
    cy.budgets.set("tenant:acme", tokens(100))
    r = await acy.reserve(Subject(tenant="acme"), LLM, tokens(10))
    assert cy.get_reservation(r.reservation_id or "").reserved == tokens(10)
    c1 = cy.commit(r.reservation_id or "", tokens(4), idempotency_key="same")
    c2 = await acy.commit(r.reservation_id or "", tokens(4), idempotency_key="same")
    assert c1 == c2  # the replay, not a second charge
    assert [b.scope for b in await acy.budgets.list()] == ["tenant:acme"]
    assert (await acy.list_reservations(tenant="acme")).reservations[0].status.value == "COMMITTED"
    with pytest.raises(NotFound):
        await acy.get_reservation("rsv_acme_" + "f" * 32)
    await acy.ledger.aclose()
    cy.close()


async def test_concurrent_tasks_never_overspend(url: str) -> None:
    acy = AsyncCycles(url)
    await acy.budgets.set("tenant:acme", tokens(1000))
    granted = 0

    async def worker() -> None:
        nonlocal granted
        while True:
            try:
                r = await acy.reserve(Subject(tenant="acme"), LLM, tokens(7))
            except BudgetExceeded:
                return
            granted += 7
            await acy.commit(r.reservation_id or "", tokens(7))

    await asyncio.gather(*(worker() for _ in range(32)))
    b = await acy.budgets.get("tenant:acme")
    assert b.spent is not None and b.spent.amount == granted == 1000 - 1000 % 7
    await acy.ledger.aclose()


async def test_async_script_reload_and_unavailable(private_redis: PrivateRedis) -> None:
    acy = AsyncCycles(private_redis.url + "?retries=0")
    await acy.budgets.set("tenant:acme", tokens(100))
    private_redis.client().script_flush()
    r = await acy.reserve(Subject(tenant="acme"), LLM, tokens(10))
    private_redis.client().script_flush()
    assert len((await acy.list_reservations()).reservations) == 1  # the pipelined path reloads too
    private_redis.stop()
    with pytest.raises(LedgerUnavailable):
        await acy.commit(r.reservation_id or "", tokens(3))
    await acy.ledger.aclose()
