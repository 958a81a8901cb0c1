"""What the dashboard reads, in as few ledger round trips as the backend allows.

Budgets, balances and live reservations come through the ledger interface, one page at a time.
The aggregates (spend over time, counts) would take every page of every reservation through
that interface, so each backend answers them its own cheapest way:

- ``sqlite://``: SQL (aggregates, one page of reservations) on a read-only connection of its own
  (WAL: never waits for, nor holds up, a writer); indexed by ``reservations_done``.
- ``memory://``: aggregates in one pass over the in-process rows (copied under the ledger's lock);
  pages through the ledger's own per-tenant indexes.
- anything else (``redis://``, ``http(s)://``): the most recent ``SAMPLE_PAGES`` pages of settled
  reservations, and the chart says it is a sample.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from cycles.errors import InvalidRequest
from cycles.ledger.base import AsyncLedger
from cycles.ledger.memory import settled_fields
from cycles.ledger.rules import ReservationQuery, ReservationRow
from cycles.ledger.sqlite import _RES_COLS, _reservation_from
from cycles.models import Balance, ReservationStatus, ReservationSummary, Unit

__all__ = ["Series", "Totals", "reader_for"]

SAMPLE_PAGES = 10
COUNT_CAP = 10_000


@dataclass(slots=True)
class Series:
    """Settled spend per time bucket and unit: ``points[unit][i]`` for the bucket at ``start + i*width``."""

    start_ms: int
    width_ms: int
    buckets: int
    points: dict[Unit, list[int]] = field(default_factory=dict)
    sampled: bool = False

    def add(self, at_ms: int, unit: Unit, amount: int) -> None:
        slot = (at_ms - self.start_ms) // self.width_ms
        if 0 <= slot < self.buckets:
            self.points.setdefault(unit, [0] * self.buckets)[slot] += amount


@dataclass(slots=True)
class Totals:
    active_reservations: int
    capped: bool
    statuses: dict[tuple[str, Unit], str]


class Reader:
    """The generic path: everything through the ledger interface."""

    def __init__(self, ledger: AsyncLedger) -> None:
        self.ledger = ledger

    async def budgets(self, tenant: str | None) -> list[Balance]:
        return await self.ledger.list_budgets(tenant=tenant)

    async def statuses(self, tenant: str | None) -> dict[tuple[str, Unit], str]:
        return {}

    async def active_count(self, tenant: str | None) -> tuple[int, bool]:
        count, cursor = 0, None
        while True:
            page = await self.ledger.list_reservations(
                ReservationQuery(tenant=tenant, status=ReservationStatus.ACTIVE, limit=200, cursor=cursor)
            )
            count += len(page.reservations)
            cursor = page.next_cursor
            if not cursor:
                return count, False
            if count >= COUNT_CAP:
                return count, True

    async def spend(self, tenant: str | None, since_ms: int, until_ms: int, buckets: int) -> Series:
        series = Series(since_ms, max(1, (until_ms - since_ms) // buckets), buckets)
        cursor = None
        for _ in range(SAMPLE_PAGES):
            page = await self.ledger.list_reservations(
                ReservationQuery(
                    tenant=tenant,
                    status=ReservationStatus.COMMITTED,
                    finalized_from_ms=since_ms,
                    sort_by="created_at_ms",
                    limit=200,
                    cursor=cursor,
                )
            )
            for r in page.reservations:
                if r.committed is not None and r.finalized_at_ms is not None:
                    series.add(r.finalized_at_ms, r.committed.unit, r.committed.amount)
            cursor = page.next_cursor
            if not cursor:
                return series
        series.sampled = True
        return series

    async def reservations(
        self, tenant: str | None, status: ReservationStatus | None, cursor: str | None, limit: int = 50
    ) -> tuple[list[ReservationSummary], str | None]:
        page = await self.ledger.list_reservations(
            ReservationQuery(tenant=tenant, status=status, sort_by="created_at_ms", limit=limit, cursor=cursor)
        )
        return page.reservations, page.next_cursor


class MemoryReader(Reader):
    """Aggregates in one pass over the in-process rows; pages through the ledger's own indexes."""

    def __init__(self, ledger: AsyncLedger, sync: Any) -> None:
        super().__init__(ledger)
        self._sync = sync

    def _rows(self) -> list[Any]:
        with self._sync._lock:
            return list(self._sync._store.reservations.values())

    async def statuses(self, tenant: str | None) -> dict[tuple[str, Unit], str]:
        with self._sync._lock:
            return {key: row.status for key, row in self._sync._store.budgets.items()}

    async def active_count(self, tenant: str | None) -> tuple[int, bool]:
        now = int(time.time() * 1000)
        n = sum(
            1
            for r in self._rows()
            if isinstance(r, ReservationRow)  # finished rows are stored packed; ACTIVE ones never are
            and r.status is ReservationStatus.ACTIVE
            and r.deadline_ms >= now
            and _tenant_ok(r.subject.tenant, tenant)
        )
        return n, False

    async def spend(self, tenant: str | None, since_ms: int, until_ms: int, buckets: int) -> Series:
        series = Series(since_ms, max(1, (until_ms - since_ms) // buckets), buckets)
        for stored in self._rows():
            owner, status, unit, committed, finalized = settled_fields(stored)
            if status != "COMMITTED" or finalized is None or not committed:
                continue
            if finalized >= since_ms and _tenant_ok(owner, tenant):
                series.add(finalized, Unit(unit), committed)
        return series


def _tenant_ok(owner: str | None, tenant: str | None) -> bool:
    return tenant is None or owner == tenant


def _offset(cursor: str | None) -> int:
    """The dashboard's own page cursors: ``o<offset>`` (the pages are its own, not the protocol's)."""
    if not cursor:
        return 0
    if not cursor.startswith("o") or not cursor[1:].isdigit():
        raise InvalidRequest("cursor is not one this page issued")
    return int(cursor[1:])


def _page_of(found: list[ReservationSummary], offset: int, limit: int) -> tuple[list[ReservationSummary], str | None]:
    """``found`` holds up to limit + 1 rows from ``offset``: the extra one says there is a next page."""
    return found[:limit], (f"o{offset + limit}" if len(found) > limit else None)


class SqliteReader(Reader):
    def __init__(self, ledger: AsyncLedger, path: str) -> None:
        super().__init__(ledger)
        self._path = path
        self._local = threading.local()

    def _db(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(f"file:{self._path}?mode=ro", uri=True, check_same_thread=False, timeout=10)
            db.execute("PRAGMA query_only = 1")
            self._local.db = db
        return db

    async def _query(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        return await asyncio.to_thread(lambda: self._db().execute(sql, params).fetchall())

    async def statuses(self, tenant: str | None) -> dict[tuple[str, Unit], str]:
        sql = "SELECT scope, unit, status FROM budgets" + (" WHERE tenant = ?" if tenant else "")
        rows = await self._query(sql, (tenant,) if tenant else ())
        return {(scope, Unit(unit)): status for scope, unit, status in rows}

    async def active_count(self, tenant: str | None) -> tuple[int, bool]:
        sql = "SELECT COUNT(*) FROM reservations WHERE status = 'ACTIVE' AND deadline_ms >= ?"
        params: tuple[Any, ...] = (int(time.time() * 1000),)
        if tenant:
            sql += " AND tenant = ?"
            params += (tenant,)
        rows = await self._query(sql, params)
        return int(rows[0][0]), False

    async def reservations(
        self, tenant: str | None, status: ReservationStatus | None, cursor: str | None, limit: int = 50
    ) -> tuple[list[ReservationSummary], str | None]:
        """Newest first, straight from the table: the ledger's own listing reads every row (and takes
        the write lock) to page; this reads one page."""
        offset = _offset(cursor)
        where: list[str] = ["1 = 1"]
        params: list[Any] = []
        if status is not None:
            where.append("status = ?")
            params.append(status.value)
        if status is ReservationStatus.ACTIVE:  # overdue ones are expired already, in all but name
            where.append("deadline_ms >= ?")
            params.append(int(time.time() * 1000))
        if tenant:
            where.append("tenant = ?")
            params.append(tenant)
        # Sort ids only, then read the page's rows: a sort that carries whole rows (JSON columns
        # and all) costs ten times more on a large table.
        page = (
            f"SELECT id FROM reservations WHERE {' AND '.join(where)} "
            "ORDER BY created_at_ms DESC, id DESC LIMIT ? OFFSET ?"
        )
        sql = f"SELECT {_RES_COLS} FROM reservations WHERE id IN ({page}) ORDER BY created_at_ms DESC, id DESC"
        rows = await self._query(sql, (*params, limit + 1, offset))
        return _page_of([_reservation_from(r).to_summary() for r in rows], offset, limit)

    async def spend(self, tenant: str | None, since_ms: int, until_ms: int, buckets: int) -> Series:
        series = Series(since_ms, max(1, (until_ms - since_ms) // buckets), buckets)
        # coalesce(...) and status != 'ACTIVE' match the partial index reservations_done.
        sql = (
            "SELECT (finalized_at_ms - ?) / ?, unit, SUM(committed) FROM reservations "
            "WHERE status != 'ACTIVE' AND coalesce(finalized_at_ms, deadline_ms) >= ? AND status = 'COMMITTED'"
        )
        params: tuple[Any, ...] = (since_ms, series.width_ms, since_ms)
        if tenant:
            sql += " AND tenant = ?"
            params += (tenant,)
        for slot, unit, total in await self._query(sql + " GROUP BY 1, 2", params):
            series.add(since_ms + int(slot) * series.width_ms, Unit(unit), int(total or 0))
        return series


def reader_for(ledger: AsyncLedger) -> Reader:
    """The fastest reader for the backend under ``ledger`` (which may be wrapped: traced, observed)."""
    from cycles.otel import unwrap

    sync = getattr(unwrap(ledger), "sync", None)  # an embedded ledger under its async face
    name = type(sync).__name__
    if name == "MemoryLedger":
        return MemoryReader(ledger, sync)
    if name == "SqliteLedger" and getattr(sync, "path", ":memory:") != ":memory:":
        return SqliteReader(ledger, str(getattr(sync, "path")))  # noqa: B009
    return Reader(ledger)


def utilisation(b: Balance) -> float | None:
    """Share of the allocation used (spent + reserved + debt), or None without an allocation."""
    if b.allocated is None or b.allocated.amount <= 0:
        return None
    used = sum(p.amount for p in (b.spent, b.reserved, b.debt) if p is not None)
    return used / b.allocated.amount


def tree(balances: list[Balance]) -> list[tuple[int, Balance]]:
    """Budgets in scope order with their depth below the tenant (parents before children)."""
    ordered = sorted(balances, key=lambda b: (b.scope.split("/"), b.remaining.unit.value))
    return [(b.scope.count("/"), b) for b in ordered]


def group_by_tenant(balances: list[Balance]) -> dict[str, list[Balance]]:
    out: dict[str, list[Balance]] = defaultdict(list)
    for b in balances:
        out[b.scope.split("/", 1)[0].removeprefix("tenant:")].append(b)
    return dict(out)
