"""What reading quota counters costs as a tenant's counters grow: a page must cost what it returns.

    uv run python bench/bench_counters.py [--quick] [--redis URL]

Per ledger (SQLite, and Redis when reachable), the time of one page of 50 counters (the first page,
and the page after the middle one, from its cursor) with a few (1 000) and many (100 000; --quick: 10 000) live
per_run counters in the tenant, and as many in a neighbour tenant whose name the first one's is a
prefix of. The counters are written straight into the store in the ledger's own format (a reserve
per counter would take minutes); the reads are the ledger's. Target: many / few under 2x.
memory:// sorts its whole key -> text store per read (one process, dicts): not measured.
"""

from __future__ import annotations

import argparse
import sqlite3
import tempfile
import time
import uuid
from collections.abc import Callable

from _targets import Targets
from bench_core import per_op_us

from cycles import Cycles, tokens
from cycles.ledger.counters import CounterQuery
from cycles.ledger.paging import encode_position

FAR = 4_000_000_000_000  # the year 2096: live for the whole run


def _names(tenant: str, n: int) -> list[str]:
    return [f"tenant:{tenant}|message.email.send|per_run|run-{i:07d}" for i in range(n)]


def _value() -> str:
    return f"1,{FAR},5,86400000,{int(time.time() * 1000)}"


def fill_sqlite(path: str, n: int) -> None:
    db = sqlite3.connect(path)
    with db:
        for tenant in ("bench", "bench-x"):
            db.executemany("INSERT OR REPLACE INTO kv VALUES (?,?)", (("qc|" + k, _value()) for k in _names(tenant, n)))
    db.close()


def fill_redis(url: str, prefix: str, n: int) -> None:
    import redis

    client = redis.Redis.from_url(url)
    for tenant in ("bench", "bench-x"):
        names = _names(tenant, n)
        base = f"{prefix}:{{{tenant}}}:"
        for i in range(0, n, 5000):
            pipe = client.pipeline(transaction=False)
            chunk = names[i : i + 5000]
            for name in chunk:
                pipe.set(base + "q:" + name, _value(), px=86_400_000)
            pipe.zadd(base + "qix", dict.fromkeys(chunk, 0))
            pipe.execute()


def page_ops(cy: Cycles, n: int) -> tuple[Callable[[], None], Callable[[], None]]:
    # the cursor a client paging through would hold halfway through the tenant's counters
    halfway = _names("bench", n)[n // 2]
    middle = encode_position((halfway,), CounterQuery(tenant="bench").binding())

    def first() -> None:
        assert len(cy.quotas.counters_page("bench", limit=50).counters) == 50

    def later() -> None:
        assert len(cy.quotas.counters_page("bench", limit=50, cursor=middle).counters) == 50

    return first, later


def measure(name: str, open_with: Callable[[int], Cycles], sizes: list[int], targets: Targets) -> None:
    figures = {}
    for n in sizes:
        cy = open_with(n)
        try:
            first, later = page_ops(cy, n)
            figures[n] = (per_op_us(first, 50), per_op_us(later, 50))
        finally:
            cy.close()
        print(f"  {name:7} {n:>7} counters: first page {figures[n][0]:8.0f} us, later page {figures[n][1]:8.0f} us")
    few, many = figures[sizes[0]], figures[sizes[-1]]
    for label, i in (("first page", 0), ("later page", 1)):
        ratio = many[i] / few[i]
        verdict = targets.check(f"{name} {label} {sizes[-1]}/{sizes[0]} counters", f"{ratio:.2f}x", ratio < 2.0)
        print(f"  {name:7} {label}: {ratio:.2f}x ({verdict})")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    sizes = [1_000, 10_000 if args.quick else 100_000]
    targets = Targets()
    tmp = tempfile.mkdtemp()

    def sqlite_with(n: int) -> Cycles:
        path = f"{tmp}/counters-{n}.db"
        with Cycles(f"sqlite:///{path}") as cy:
            cy.budgets.set("tenant:bench", tokens(1))  # creates the file and its schema
        fill_sqlite(path, n)
        return Cycles(f"sqlite:///{path}")

    measure("sqlite", sqlite_with, sizes, targets)
    try:
        import redis

        redis.Redis.from_url(args.redis).ping()
    except Exception as exc:  # noqa: BLE001 - a benchmark reports what it could not measure
        print(f"  redis   skipped: {exc}")
        targets.report()
        return
    prefixes: list[str] = []

    def redis_with(n: int) -> Cycles:
        prefix = f"benchctr{uuid.uuid4().hex[:8]}"
        prefixes.append(prefix)
        fill_redis(args.redis, prefix, n)
        return Cycles(f"{args.redis}?prefix={prefix}")

    try:
        measure("redis", redis_with, sizes, targets)
    finally:  # never leave keys on a shared Redis
        client = redis.Redis.from_url(args.redis)
        for prefix in prefixes:
            for key in client.scan_iter(match=f"{prefix}:*", count=10_000):
                client.delete(key)
    targets.report()


if __name__ == "__main__":
    main()
