"""Scaling benchmark: does one tenant's operation get slower as the ledger grows?

    ./run bench scaling               1k, 10k and 100k reservations per backend, then the soak
    ./run bench scaling --quick       1k and 10k only, shorter soak
    ./run bench scaling --backends sqlite,redis --sizes 1000,10000,100000

For each backend (memory, sqlite, redis) the ledger is filled, in steps, with reservations spread
over 100 tenants (9 in 10 released, 1 in 10 left ACTIVE; every tenant also has 20 budgets). At each
size it measures, for one tenant, the median latency of:

  pair      reserve + commit
  list      one page of GET /v1/reservations (limit 50, newest first)
  balances  one page of balances (limit 50)
  sweep     a sweep with nothing due
  metrics   GET /metrics through the ASGI app over the same ledger (active-count cache defeated)

and prints the ratio largest-size / smallest-size for each: the target is flat, under 2x ("met" or
"missed"). Medians are the least of three rounds, to damp a shared machine's noise.

Then a bounded soak per embedded backend (memory, sqlite; retention 2 s): reserve+release pairs at
full speed for three phases, printing stored rows, file size and process RSS after each phase.
The target is flat: the stored rows follow the rate (one retention window of it), not the time run;
the SQLite file is the database plus a WAL that the checkpointer truncates past 1,000 pages. Redis
keeps records for the protocol's fixed 24 h, so its soak shows one index entry per pair (not flat by
design within a day).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from cycles.ledger.base import Ledger, ThreadedAsyncLedger, open_async_ledger, open_ledger
from cycles.ledger.rules import BalanceQuery, ReservationQuery
from cycles.models import (
    Action,
    Amount,
    CommitRequest,
    ReleaseRequest,
    ReservationCreateRequest,
    Subject,
    Unit,
)
from cycles.server.app import create_app
from cycles.server.keys import MemoryKeyStore

TENANTS = [f"t{i:03d}" for i in range(100)]
HOT = TENANTS[0]
USD = Unit.USD_MICROCENTS
ACTION = Action("llm.completion", "bench-model")
REDIS_URL = os.environ.get("CYCLES_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
_counter = iter(range(10**12))


def key() -> str:
    return f"k{next(_counter)}"


def reserve_req(tenant: str, estimate: int = 10, ttl_ms: int = 3_600_000) -> ReservationCreateRequest:
    return ReservationCreateRequest(
        idempotency_key=key(),
        subject=Subject(tenant=tenant, workflow="w", agent="a"),
        action=ACTION,
        estimate=Amount(unit=USD, amount=estimate),
        ttl_ms=ttl_ms,
    )


def median_us(fn: Callable[[], Any], n: int, rounds: int = 3) -> float:
    best = float("inf")
    for _ in range(rounds):
        samples = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t)
        best = min(best, statistics.median(samples))
    return best * 1e6


# ---- filling --------------------------------------------------------------------------------


def setup(ledger: Ledger) -> None:
    for tenant in TENANTS:
        ledger.set_budget(f"tenant:{tenant}", Amount(unit=USD, amount=10**15))
        for w in range(19):
            ledger.set_budget(f"tenant:{tenant}/workflow:w{w:02d}", Amount(unit=USD, amount=10**12))


def fill(ledger: Ledger, start: int, stop: int) -> None:
    release = ReleaseRequest
    for i in range(start, stop):
        tenant = TENANTS[i % len(TENANTS)]
        res = ledger.reserve(reserve_req(tenant, 0))
        if i % 10:
            ledger.release(res.reservation_id or "", release(idempotency_key=key()))


# ---- measuring ------------------------------------------------------------------------------


class Probe:
    """The per-size measurements for one backend."""

    def __init__(self, name: str, ledger: Ledger, url: str) -> None:
        self.name, self.ledger = name, ledger
        if name == "memory":
            self.app = create_app(ledger=ThreadedAsyncLedger(ledger), keys=MemoryKeyStore(), sweep_interval_s=0)
        else:
            self.app = create_app(ledger=open_async_ledger(url), keys=MemoryKeyStore(), sweep_interval_s=0)
        self.loop = asyncio.new_event_loop()
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://bench")

    def pair(self) -> None:
        res = self.ledger.reserve(reserve_req(HOT, 10))
        self.ledger.commit(
            res.reservation_id or "", CommitRequest(idempotency_key=key(), actual=Amount(unit=USD, amount=8))
        )

    def list_page(self) -> None:
        page = self.ledger.list_reservations(ReservationQuery(limit=50), tenant=HOT)
        assert len(page.reservations) == 50

    def balances(self) -> None:
        page = self.ledger.balances(BalanceQuery(tenant=HOT, limit=50), tenant=HOT)
        assert len(page.balances) == 20

    def sweep(self) -> None:
        self.ledger.sweep(1000)

    def metrics(self) -> None:
        self.app.server._active_checked = 0.0  # defeat the few-seconds cache: measure the read itself

        async def get() -> None:
            r = await self.client.get("/metrics")
            assert r.status_code == 200

        self.loop.run_until_complete(get())

    def measure(self) -> dict[str, float]:
        return {
            "pair": median_us(self.pair, 100),
            "list": median_us(self.list_page, 30),
            "balances": median_us(self.balances, 30),
            "sweep": median_us(self.sweep, 30),
            "metrics": median_us(self.metrics, 30),
        }

    def close(self) -> None:
        async def shut() -> None:
            await self.client.aclose()
            if self.name != "memory":
                await self.app.server.ledger.aclose()

        self.loop.run_until_complete(shut())
        self.loop.close()


def open_backend(name: str, tmp: Path) -> tuple[Ledger, str, Callable[[], None]]:
    if name == "memory":
        return open_ledger("memory://"), "memory://", lambda: None
    if name == "sqlite":
        url = f"sqlite:///{tmp}/scaling-{uuid.uuid4().hex[:8]}.db"
        return open_ledger(url), url, lambda: None
    prefix = f"bench-scaling-{uuid.uuid4().hex[:12]}"
    sep = "&" if "?" in REDIS_URL else "?"
    url = f"{REDIS_URL}{sep}prefix={prefix}"
    return open_ledger(url), url, lambda: drop_redis(prefix)


def drop_redis(prefix: str) -> None:
    from bench_redis import drop  # the same clean-up as the Redis benchmark (bench/ is on sys.path)

    drop(REDIS_URL, prefix)


def scaling(backends: list[str], sizes: list[int], tmp: Path) -> bool:
    ops = ["pair", "list", "balances", "sweep", "metrics"]
    all_met = True
    for name in backends:
        ledger, url, cleanup = open_backend(name, tmp)
        probe = Probe(name, ledger, url)
        try:
            setup(ledger)
            results: dict[int, dict[str, float]] = {}
            filled = 0
            for size in sizes:
                t = time.perf_counter()
                fill(ledger, filled, size)
                filled = size
                fill_s = time.perf_counter() - t
                results[size] = probe.measure()
                row = "  ".join(f"{op} {results[size][op]:8.1f}" for op in ops)
                print(f"{name:7s} {size:>7,} rows  {row}   (us, median; filled in {fill_s:.1f} s)", flush=True)
            first, last = results[sizes[0]], results[sizes[-1]]
            verdicts = []
            for op in ops:
                ratio = last[op] / first[op]
                met = ratio < 2.0
                all_met &= met
                verdicts.append(f"{op} {ratio:4.2f}x {'met' if met else 'MISSED'}")
            print(f"{name:7s} {sizes[-1]:,}/{sizes[0]:,} ratio: " + ", ".join(verdicts), flush=True)
        finally:
            probe.close()
            ledger.close()
            cleanup()
    return all_met


# ---- soak -----------------------------------------------------------------------------------


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def stored(name: str, ledger: Any, path: Path | None) -> str:
    if name == "memory":
        store = ledger._store
        return f"rows {len(store.reservations) + len(store.idempotency):6d}"
    if name == "sqlite":
        import sqlite3

        assert path is not None
        db = sqlite3.connect(path)
        n = db.execute("SELECT (SELECT count(*) FROM reservations) + (SELECT count(*) FROM idempotency)").fetchone()[0]
        db.close()
        size = sum(p.stat().st_size for p in path.parent.glob(path.name + "*") if p.is_file()) / 2**20
        return f"rows {n:6d}  file {size:6.1f} MB"
    client, base = ledger._client, ledger._base(HOT)
    return f"keys idx {client.zcard(base + 'idx'):6d}  index {client.zcard(base + 'ix:' + HOT):6d}"


def soak(backends: list[str], phase_s: float, tmp: Path) -> None:
    for name in backends:
        path: Path | None = None
        cleanup: Callable[[], None] = lambda: None  # noqa: E731
        if name == "memory":
            ledger: Any = open_ledger("memory://", retention_ms=2000)
        elif name == "sqlite":
            path = tmp / f"soak-{uuid.uuid4().hex[:8]}.db"
            ledger = open_ledger(f"sqlite:///{path}?retention_ms=2000")
        else:
            ledger, _, cleanup = open_backend("redis", tmp)
        try:
            ledger.set_budget(f"tenant:{HOT}", Amount(unit=USD, amount=10**15))
            gc.collect()  # what the scaling runs left behind is not this soak's
            print(f"soak {name:7s} before   {stored(name, ledger, path)}  rss {rss_mb():6.1f} MB", flush=True)
            pairs = 0
            for phase in range(1, 4):
                end = time.monotonic() + phase_s
                while time.monotonic() < end:
                    res = ledger.reserve(reserve_req(HOT, 0, ttl_ms=60_000))
                    ledger.release(res.reservation_id or "", ReleaseRequest(idempotency_key=key()))
                    pairs += 1
                print(
                    f"soak {name:7s} phase {phase} {stored(name, ledger, path)}  rss {rss_mb():6.1f} MB  "
                    f"({pairs:,} pairs so far)",
                    flush=True,
                )
            if name == "memory":  # retained rows the garbage collector has to walk
                t = time.perf_counter()
                gc.collect()
                print(
                    f"soak memory  full gc {1e3 * (time.perf_counter() - t):.1f} ms over "
                    f"{len(gc.get_objects()):,} tracked objects",
                    flush=True,
                )
        finally:
            ledger.close()
            cleanup()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1k and 10k rows only, 3 s soak phases")
    parser.add_argument("--backends", default="memory,sqlite,redis")
    parser.add_argument("--sizes", default="", help="comma-separated row counts (default 1000,10000,100000)")
    parser.add_argument("--soak-s", type=float, default=0.0, help="seconds per soak phase (default 5, --quick 3)")
    parser.add_argument("--no-soak", action="store_true")
    args = parser.parse_args()
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if args.sizes:
        sizes = [int(s) for s in args.sizes.split(",")]
    else:
        sizes = [1000, 10000] if args.quick else [1000, 10000, 100000]
    print(f"scaling: {', '.join(backends)} at {', '.join(f'{s:,}' for s in sizes)} rows over {len(TENANTS)} tenants")
    with tempfile.TemporaryDirectory(prefix="cycles-bench-scaling-") as tmp:
        met = scaling(backends, sizes, Path(tmp))
        print(f"scaling targets (< 2x from {sizes[0]:,} to {sizes[-1]:,} rows): {'all met' if met else 'some MISSED'}")
        if not args.no_soak:
            soak(backends, args.soak_s or (3.0 if args.quick else 5.0), Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
