"""Governance benchmark: what the governance plane adds to the runtime, and what the record store
costs, next to baselines measured in the same run.

    ./run bench governance      (or: uv run python bench/bench_governance.py [--quick])

1. Runtime overhead: reserve + commit through the server's observed ledger (threshold marks,
   denial rates, burn rates) vs the same ledger bare, in one process, per backend (memory, sqlite),
   with 1 / 10 / 100 distinct budgets being charged (the alert state is per budget).
2. Record store: appending an event, and reading the newest page of 50 with a filter that matches
   one record in ten, at 1,000 / 10,000 / 50,000 stored events, per backend (memory, sqlite, redis);
   the baseline is a bare append/read of the same JSON in the same backend (a dict, an INSERT, an HSET).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cycles.ledger.base import open_async_ledger
from cycles.ledger.records import EVENTS, EventFilter, new_event, records_of
from cycles.models import Action, CommitRequest, ReservationCreateRequest, Subject, usd


def best_us(fn: Callable[[], None], n: int, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - start) / n)
    return best * 1e6


async def _steps(ledger: Any, budgets: int, n: int) -> float:
    subjects = [Subject(tenant="bench", workflow=f"w{i}") for i in range(budgets)]
    for s in subjects:
        await ledger.set_budget(f"tenant:bench/workflow:{s.workflow}", usd(10**6))
    await ledger.set_budget("tenant:bench", usd(10**7))
    action = Action("llm", "m")
    start = time.perf_counter()
    for i in range(n):
        req = ReservationCreateRequest(
            idempotency_key=uuid.uuid4().hex, subject=subjects[i % budgets], action=action, estimate=usd(0.0001)
        )
        res = await ledger.reserve(req)
        await ledger.commit(res.reservation_id, CommitRequest(idempotency_key=uuid.uuid4().hex, actual=usd(0.0001)))
    return (time.perf_counter() - start) / n * 1e6


def runtime_overhead(quick: bool) -> None:
    from cycles.server.governance import Governance
    from cycles.server.governance.alerts import ObservedLedger

    n = 200 if quick else 1000
    rounds = 3 if quick else 5
    print("runtime overhead: reserve+commit, observed ledger vs bare (us per step, best of alternating rounds)")
    for backend in ("memory", "sqlite"):
        for budgets in (1, 10, 100):
            with tempfile.TemporaryDirectory() as tmp:
                bare = open_async_ledger("memory://" if backend == "memory" else f"sqlite:///{tmp}/bare.db",
                                         include_balances=True)  # fmt: skip
                inner = open_async_ledger("memory://" if backend == "memory" else f"sqlite:///{tmp}/obs.db",
                                          include_balances=True)  # fmt: skip
                gov = Governance(records_of(inner))
                observed = ObservedLedger(inner, gov.alerts)
                base = obs = float("inf")
                for _ in range(rounds):  # alternate, so a busy moment on a shared machine hits both
                    base = min(base, asyncio.run(_steps(bare, budgets, n)))
                    obs = min(obs, asyncio.run(_steps(observed, budgets, n)))
                gov.records.close()
                print(
                    f"  {backend:6} budgets={budgets:3}  bare {base:8.1f}  observed {obs:8.1f}  ratio {obs / base:5.2f}"
                )


def _redis_url() -> str:
    return os.environ.get("CYCLES_TEST_REDIS_URL", "redis://127.0.0.1:6379/0") + f"?prefix=bench-{uuid.uuid4().hex}"


def record_store(quick: bool) -> None:
    sizes = (1000, 5000) if quick else (1000, 10_000, 50_000)
    print("record store: append one event; newest page of 50 matching 1 in 10 (us per call)")
    for backend in ("memory", "sqlite", "redis"):
        for size in sizes:
            with tempfile.TemporaryDirectory() as tmp:
                store, baseline, cleanup = _open(backend, tmp)
                payload = new_event("budget.funded", tenant_id="bench", scope="tenant:bench", data={"x": 1})
                # the baselines serialise the same record too: the store's own work is what is compared
                for i in range(size):
                    ev = new_event(
                        "budget.exhausted" if i % 10 == 0 else "budget.funded",
                        tenant_id="bench",
                        scope="tenant:bench",
                        data={"i": i},
                    )
                    store.append(EVENTS, ev)
                n = 200 if quick else 1000
                append, bare, page = _measure(store, baseline, payload, n, 20 if quick else 50)
                print(
                    f"  {backend:6} events={size:6}  append {append:7.1f} (bare {bare:6.1f}, "
                    f"ratio {append / bare:5.2f})  filtered page {page:9.1f}"
                )
                cleanup()


def _measure(
    store: Any, baseline: Callable[[str], None], record: dict[str, Any], n: int, pages: int
) -> tuple[float, ...]:
    append = best_us(lambda: store.append(EVENTS, new_event("budget.funded", tenant_id="bench")), n)
    bare = best_us(lambda: baseline(json.dumps(record, separators=(",", ":"))), n)
    flt = EventFilter(event_type="budget.exhausted")
    page = best_us(lambda: store.page(EVENTS, tenant="bench", match=flt, limit=50), pages)
    return append, bare, page


def _open(backend: str, tmp: str) -> tuple[Any, Callable[[str], None], Callable[[], None]]:
    from cycles.ledger.records import MemoryRecordStore, RedisRecordStore, SqliteRecordStore

    if backend == "memory":
        store: Any = MemoryRecordStore(max_records=10**7)
        plain: dict[int, str] = {}
        return store, lambda body: plain.__setitem__(len(plain), body), lambda: None
    if backend == "sqlite":
        path = str(Path(tmp) / "r.db")
        store = SqliteRecordStore(path, max_records=10**7)
        db = sqlite3.connect(str(Path(tmp) / "bare.db"), isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("CREATE TABLE t (id TEXT PRIMARY KEY, body TEXT) WITHOUT ROWID")

        def insert(body: str) -> None:
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO t VALUES (?, ?)", (uuid.uuid4().hex, body))
            db.execute("COMMIT")

        return store, insert, lambda: (store.close(), db.close())
    import redis

    url = _redis_url()
    base, _, query = url.partition("?")
    prefix = query.split("=", 1)[1]
    client = redis.Redis.from_url(base)
    store = RedisRecordStore(client, prefix=prefix, max_records=10**7)

    def cleanup() -> None:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        for i in range(0, len(keys), 500):
            client.unlink(*keys[i : i + 500])
        client.close()

    return store, lambda body: client.hset(f"{prefix}:bare", uuid.uuid4().hex, body), cleanup


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    args = parser.parse_args(argv)
    runtime_overhead(args.quick)
    record_store(args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
