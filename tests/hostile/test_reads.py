"""Why 2 and 4: a page costs what it returns, not what the tenant (or the ledger) holds, and a
read never queues behind writers. Costs are counted (rows decoded, commands sent), never timed."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from cycles.errors import InvalidRequest
from cycles.ledger.base import Ledger, open_ledger
from cycles.ledger.rules import BalanceQuery, ReservationQuery
from cycles.models import Amount, ReservationStatus, Unit

from .conftest import ALICE, MALLORY, Http, fund
from .requests import release, reserve

ROWS = 400


@contextmanager
def rows_read(ledger: Ledger, backend: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Counts reservation rows the backend decodes (SQLite) or fetches (Redis HMGET of a row)."""
    count = [0]
    if backend == "sqlite":
        import cycles.ledger.sqlite as sqlite_module

        original = sqlite_module._reservation_from

        def counting(row: tuple[Any, ...]) -> Any:
            count[0] += 1
            return original(row)

        monkeypatch.setattr(sqlite_module, "_reservation_from", counting)
        yield count
        monkeypatch.setattr(sqlite_module, "_reservation_from", original)
        return
    execute = ledger._execute  # type: ignore[attr-defined]

    def counting_execute(step: Any) -> Any:
        steps = step if isinstance(step, list) else [step]
        for s in steps:
            args = getattr(s, "args", ())
            if args and args[0] == "HMGET" and ":r:" in args[1]:
                count[0] += 1
            assert getattr(s, "script", None) is None, "a listing ran a script (it would block Redis)"
        return execute(step)

    monkeypatch.setattr(ledger, "_execute", counting_execute)
    yield count
    monkeypatch.setattr(ledger, "_execute", execute)


def _fill(ledger: Ledger, tenant: str, n: int, finished_every: int = 2) -> list[str]:
    ids = []
    for i in range(n):
        rid = ledger.reserve(reserve(tenant, 0)).reservation_id
        assert rid is not None
        if i % finished_every == 0:
            ledger.release(rid, release())
        ids.append(rid)
    return ids


def test_a_list_page_reads_a_page_not_the_tenant(ledger: Ledger, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    fund(ledger, MALLORY, ALICE)
    _fill(ledger, MALLORY, ROWS)
    _fill(ledger, ALICE, 50)
    with rows_read(ledger, backend, monkeypatch) as count:
        page = ledger.list_reservations(ReservationQuery(limit=1), tenant=MALLORY)
    assert len(page.reservations) == 1 and page.has_more
    assert count[0] <= 70, f"read {count[0]} rows for one row of {ROWS}"
    with rows_read(ledger, backend, monkeypatch) as count:
        page = ledger.list_reservations(ReservationQuery(limit=5, status=ReservationStatus.ACTIVE), tenant=MALLORY)
    assert len(page.reservations) == 5 and all(r.status is ReservationStatus.ACTIVE for r in page.reservations)
    assert count[0] <= 70, f"read {count[0]} rows for 5 ACTIVE rows"


def test_keyset_pages_see_every_row_once_while_others_write(ledger: Ledger) -> None:
    fund(ledger, MALLORY)
    ids = _fill(ledger, MALLORY, 120)
    for sort_dir in ("desc", "asc"):
        seen: list[str] = []
        cursor = None
        while True:
            page = ledger.list_reservations(ReservationQuery(limit=7, cursor=cursor, sort_dir=sort_dir), tenant=MALLORY)
            seen += [r.reservation_id for r in page.reservations]
            ledger.reserve(reserve(MALLORY, 0))  # a write between pages: no row repeated or skipped
            cursor = page.next_cursor
            if not cursor:
                break
        originals = [rid for rid in seen if rid in set(ids)]
        assert sorted(originals) == sorted(ids) and len(originals) == len(set(originals))
        created = [r for r in seen]
        assert len(created) == len(set(created))
    with pytest.raises(InvalidRequest):  # a cursor stays bound to its filters
        ledger.list_reservations(ReservationQuery(limit=7, cursor=cursor or "x", status=ReservationStatus.ACTIVE))


def test_a_balances_page_reads_a_page(ledger: Ledger, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    scopes = [f"tenant:{MALLORY}/workflow:w{i:04d}" for i in range(150)]
    for scope in [f"tenant:{MALLORY}", *scopes]:
        ledger.set_budget(scope, Amount(unit=Unit.TOKENS, amount=100))
    decoded = [0]
    if backend == "sqlite":
        import cycles.ledger.sqlite as sqlite_module

        original = sqlite_module._budget_from

        def counting(row: Any) -> Any:
            decoded[0] += 1
            return original(row)

        monkeypatch.setattr(sqlite_module, "_budget_from", counting)
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        page = ledger.balances(BalanceQuery(tenant=MALLORY, limit=10, cursor=cursor), tenant=MALLORY)
        seen += [b.scope for b in page.balances]
        pages += 1
        cursor = page.next_cursor
        if not cursor:
            break
    assert seen == sorted([f"tenant:{MALLORY}", *scopes])
    if backend == "sqlite":
        assert decoded[0] <= pages * 70, f"{decoded[0]} budget rows decoded for {pages} pages of 10"


@pytest.mark.parametrize("op", ["list", "balances"])
def test_sqlite_reads_do_not_wait_for_the_write_lock(tmp_path: Path, op: str) -> None:
    """SQLite only: Redis reads are plain commands (counted above), there is no write queue."""
    ledger = open_ledger(f"sqlite:///{tmp_path}/reads.db")
    fund(ledger, MALLORY)
    _fill(ledger, MALLORY, 10)
    done = threading.Event()
    errors: list[BaseException] = []

    def read() -> None:
        try:
            if op == "list":
                ledger.list_reservations(ReservationQuery(limit=5), tenant=MALLORY)
            else:
                ledger.balances(BalanceQuery(tenant=MALLORY), tenant=MALLORY)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        done.set()

    with ledger._locked():  # type: ignore[attr-defined]  # a writer holds the queue
        thread = threading.Thread(target=read)
        thread.start()
        finished = done.wait(timeout=30)  # a deadlock guard, not a timing: without the fix it never ends
    thread.join()
    ledger.close()
    assert finished and not errors, errors


async def test_metrics_never_scans(http: Http, monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
    ledger = http.app.server.ledger

    async def no_scans(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("/metrics listed reservations")

    monkeypatch.setattr(ledger, "list_reservations", no_scans)
    r = await http.client.post(
        "/v1/reservations",
        json={
            "idempotency_key": "m1",
            "subject": {"tenant": MALLORY},
            "action": {"kind": "k", "name": "n"},
            "estimate": {"unit": "USD_MICROCENTS", "amount": 0},
        },
        headers=http.as_(MALLORY),
    )
    assert r.status_code == 200
    r = await http.client.get("/metrics")
    assert r.status_code == 200
    if backend == "sqlite":
        assert "cycles_active_reservations 1" in r.text


async def test_metrics_behind_a_token(make_url: Any) -> None:
    import httpx

    from cycles.server.app import create_app
    from cycles.server.keys import MemoryKeyStore

    app = create_app(make_url(), keys=MemoryKeyStore(), sweep_interval_s=0, metrics_token="s3cret-token")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        assert (await c.get("/metrics")).status_code == 401
        assert (await c.get("/metrics", headers={"Authorization": "Bearer wrong"})).status_code == 401
        ok = await c.get("/metrics", headers={"Authorization": "Bearer s3cret-token"})
        assert ok.status_code == 200 and "cycles_http_requests_total" in ok.text
    await app.server.aclose()
