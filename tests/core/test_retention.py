"""Embedded ledgers forget finished reservations and idempotency records after their retention,
a little at a time, so a long-running process's ledger does not grow without bound."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from cycles import Action, Cycles, NotFound, Subject, tokens

LLM = Action("llm.completion", "m")


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_finished_records_are_forgotten_after_retention(kind: str, tmp_path: Path) -> None:
    url = "memory://" if kind == "memory" else f"sqlite:///{tmp_path}/r.db"
    cy = Cycles(url, retention_ms=1000)
    cy.budgets.set("tenant:acme", tokens(1000))
    done = cy.reserve(Subject(tenant="acme"), LLM, tokens(10), idempotency_key="k1")
    assert done.reservation_id
    cy.commit(done.reservation_id, tokens(5))
    live = cy.reserve(Subject(tenant="acme"), LLM, tokens(10))
    assert live.reservation_id
    time.sleep(1.1)
    cy.sweep()
    with pytest.raises(NotFound):  # finished and past retention: forgotten
        cy.get_reservation(done.reservation_id)
    assert cy.get_reservation(live.reservation_id).status.value == "ACTIVE"  # live ones never are
    again = cy.reserve(Subject(tenant="acme"), LLM, tokens(10), idempotency_key="k1")
    assert again.reservation_id != done.reservation_id  # the key's record is gone too: a new reservation
    b = cy.budgets.get("tenant:acme")
    assert b.spent == tokens(5) and b.reserved == tokens(20)  # balances are never forgotten
    cy.close()


def test_memory_purge_is_bounded_per_call_and_oldest_first() -> None:
    from cycles.ledger.memory import MemoryLedger

    ledger = MemoryLedger(retention_ms=1000)
    cy = Cycles(ledger=ledger)
    cy.budgets.set("tenant:acme", tokens(10**6))
    for _ in range(30):
        r = cy.reserve(Subject(tenant="acme"), LLM, tokens(1))
        assert r.reservation_id
        cy.release(r.reservation_id)
    store = ledger._store
    assert (len(store.idempotency), len(store.reservations)) == (60, 30)
    time.sleep(1.1)
    assert ledger.sweep(limit=10) == 0  # nothing to expire; forgets at most 10 records, oldest first
    assert (len(store.idempotency), len(store.reservations)) == (50, 30)
    while ledger.sweep(limit=10) == 0 and store.reservations:
        pass
    assert (len(store.idempotency), len(store.reservations)) == (0, 0)
    assert cy.budgets.get("tenant:acme").reserved == tokens(0)
