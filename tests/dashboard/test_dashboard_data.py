"""The dashboard's own read paths agree with the ledger's on every embedded backend."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from cycles import Action, Cycles, ReservationStatus, Subject, tokens
from cycles.dashboard.data import MemoryReader, Reader, SqliteReader, reader_for
from cycles.errors import InvalidRequest
from cycles.ledger.base import ThreadedAsyncLedger
from cycles.server import create_app


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_pages_counts_and_spend_match_the_ledger(kind: str, tmp_path: Path) -> None:
    cy = Cycles("memory://" if kind == "memory" else f"sqlite:///{tmp_path}/l.db", heartbeat=False)
    cy.budgets.set("tenant:a", tokens(10_000))
    cy.budgets.set("tenant:b", tokens(10_000))
    held = []
    for i in range(7):
        tenant = "a" if i % 2 else "b"
        r = cy.reserve(Subject(tenant=tenant, agent=f"x{i}"), Action("tool.call", "t"), tokens(10 + i))
        assert r.reservation_id
        if i < 3:
            cy.commit(r.reservation_id, tokens(5))
        else:
            held.append(r.reservation_id)
    reader = reader_for(ThreadedAsyncLedger(cy.ledger))
    assert isinstance(reader, MemoryReader if kind == "memory" else SqliteReader)
    app = create_app(ledger=ThreadedAsyncLedger(cy.ledger), keys_url="memory://", sweep_interval_s=0)
    assert type(app.server.dashboard.reader) is type(reader)  # under the server's wrapped (observed) ledger
    generic = Reader(ThreadedAsyncLedger(cy.ledger))

    async def pages(r: Reader, tenant: str | None, status: ReservationStatus | None) -> list[str]:
        ids: list[str] = []
        cursor = None
        while True:
            rows, cursor = await r.reservations(tenant, status, cursor, limit=2)
            ids += [x.reservation_id for x in rows]
            if cursor is None:
                return ids

    for tenant in (None, "a"):
        for status in (None, ReservationStatus.ACTIVE, ReservationStatus.COMMITTED):
            ours = asyncio.run(pages(reader, tenant, status))
            theirs = asyncio.run(pages(generic, tenant, status))
            assert ours == theirs and ours, (tenant, status)
    assert asyncio.run(reader.active_count(None)) == (4, False) == asyncio.run(generic.active_count(None))
    now = int(time.time() * 1000)
    spend = asyncio.run(reader.spend(None, now - 3_600_000, now + 1, 4))
    assert spend.points == asyncio.run(generic.spend(None, now - 3_600_000, now + 1, 4)).points
    assert sum(spend.points[tokens(1).unit]) == 15
    with pytest.raises(InvalidRequest):
        asyncio.run(reader.reservations(None, None, "bogus"))
    cy.close()
