"""Redis ledger benchmark: reserve+commit pairs per second from N concurrent async clients, next to
the raw throughput of a minimal EVALSHA doing the same 3-key check-and-decrement, measured in the
same run on the same server.

    uv run python bench/bench_redis.py [--redis-url redis://127.0.0.1:6379/0] [--clients 1 8 32]
                                       [--seconds 3] [--rounds 3]

Columns, per client count (N asyncio tasks in one process):
  raw EVALSHA/s  the minimal check-and-decrement script through a plain redis-py asyncio client
                 (``await r.evalsha(...)``, connection pool) -- the baseline of the target
  raw mux/s      the same script through the ledger's auto-pipelining transport (context: what the
                 transport alone gets out of Redis)
  pairs/s        ``AsyncCycles`` reserve then commit: two scripts over three derived scopes, each
                 with lazy expiry, idempotency record and expiry index
  pairs/raw      pairs/s over raw EVALSHA/s (target: >= 50% at 32 clients)
The three are measured in interleaved rounds and the median round is reported, so that load from
other processes hits them alike. After every ledger round the books are checked: spent on every
scope equals the sum of committed amounts, nothing is left reserved, the ledger invariant holds;
"mismatches" counts the scopes that disagree (must be 0).

Keys live under a fresh prefix and are deleted afterwards; the server is never flushed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable

import redis
import redis.asyncio
from _targets import Targets

from cycles import Action, AsyncCycles, Subject, tokens
from cycles.ledger.redis import _Multiplexer, _pack
from cycles.testing import check_balances

SUBJECT = Subject(tenant="bench", workflow="w", agent="a")
SCOPES = ["tenant:bench", "tenant:bench/workflow:w", "tenant:bench/workflow:w/agent:a"]
ACTION = Action("llm.completion", "bench-model")
COST = 5

RAW_CHECK_AND_DECREMENT = """
for i = 1, 3 do
  if tonumber(redis.call('HGET', KEYS[i], 'remaining')) < tonumber(ARGV[1]) then return 0 end
end
for i = 1, 3 do redis.call('HINCRBY', KEYS[i], 'remaining', -ARGV[1]) end
return 1
"""


async def drive(clients: int, seconds: float, op: Callable[[], Awaitable[None]]) -> tuple[float, list[float]]:
    """Run ``op`` from ``clients`` tasks for ``seconds``; returns (ops per second, latencies in s)."""
    latencies: list[float] = []
    for _ in range(min(clients, 4)):  # warm up: connections, scripts loaded
        await op()
    stop = time.perf_counter() + seconds

    async def client() -> None:
        while time.perf_counter() < stop:
            t = time.perf_counter()
            await op()
            latencies.append(time.perf_counter() - t)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return len(latencies) / (time.perf_counter() - started), latencies


async def raw_plain(url: str, prefix: str, clients: int, seconds: float) -> float:
    r = redis.asyncio.Redis.from_url(url, socket_timeout=5.0, socket_connect_timeout=2.0)
    keys = [f"{prefix}:{{raw}}:{s}" for s in SCOPES]
    for k in keys:
        await r.hset(k, "remaining", 10**15)
    sha = await r.script_load(RAW_CHECK_AND_DECREMENT)

    async def op() -> None:
        await r.evalsha(sha, 3, *keys, COST)

    rate, _ = await drive(clients, seconds, op)
    await r.aclose()
    return rate


async def raw_mux(url: str, prefix: str, clients: int, seconds: float) -> float:
    r = redis.asyncio.Redis.from_url(url, socket_timeout=5.0, socket_connect_timeout=2.0)
    keys = [f"{prefix}:{{raw}}:{s}" for s in SCOPES]
    sha = await r.script_load(RAW_CHECK_AND_DECREMENT)
    mux = _Multiplexer(r.connection_pool, retries=2)
    packed = _pack(("EVALSHA", sha, 3, *keys, COST))

    async def op() -> None:
        await mux.execute(packed)

    rate, _ = await drive(clients, seconds, op)
    await mux.aclose()
    await r.aclose()
    return rate


async def ledger_pairs(url: str, prefix: str, clients: int, seconds: float) -> tuple[float, list[float], int]:
    acy = AsyncCycles(f"{url}?prefix={prefix}-ledger-{uuid.uuid4().hex[:6]}")
    for scope in SCOPES:
        await acy.budgets.set(scope, tokens(10**15))
    committed = 0

    async def op() -> None:
        nonlocal committed
        r = await acy.reserve(SUBJECT, ACTION, tokens(COST))
        await acy.commit(r.reservation_id or "", tokens(COST))
        committed += COST

    rate, latencies = await drive(clients, seconds, op)
    balances = await acy.budgets.list(tenant="bench")
    check_balances(balances)
    mismatches = (
        len(SCOPES)
        - len(balances)
        + sum(
            1
            for b in balances
            if (b.spent and b.spent.amount, b.reserved and b.reserved.amount, b.debt and b.debt.amount)
            != (committed, 0, 0)
        )
    )
    await acy.ledger.aclose()
    return rate, latencies, mismatches


def drop(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    for i in range(0, len(keys), 500):
        client.unlink(*keys[i : i + 500])
    client.close()


def ms(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] * 1000 if len(values) > 1 else values[0] * 1000


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    args = parser.parse_args()
    prefix = f"bench-{uuid.uuid4().hex[:12]}"
    info = redis.Redis.from_url(args.redis_url).info("server")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"Redis {info['redis_version']} at {args.redis_url}; {os.cpu_count()} CPUs, load {load:.2f}; "
        f"{args.rounds} x {args.seconds:g} s per figure (median)"
    )
    print(
        f"{'clients':>7} {'raw EVALSHA/s':>13} {'raw mux/s':>10} {'pairs/s':>8} {'pairs/raw':>9} "
        f"{'pair p50 ms':>11} {'pair p99 ms':>11} {'mismatches':>10}"
    )
    total_mismatches = 0
    targets = Targets()
    try:
        for clients in args.clients:
            plain, mux, pairs, latencies, mismatches = [], [], [], [], 0
            for _ in range(args.rounds):
                plain.append(await raw_plain(args.redis_url, prefix, clients, args.seconds))
                rate, lat, bad = await ledger_pairs(args.redis_url, prefix, clients, args.seconds)
                pairs.append(rate)
                latencies += lat
                mismatches += bad
                mux.append(await raw_mux(args.redis_url, prefix, clients, args.seconds))
            total_mismatches += mismatches
            p, r = statistics.median(pairs), statistics.median(plain)
            print(
                f"{clients:>7} {r:>13,.0f} {statistics.median(mux):>10,.0f} {p:>8,.0f} {p / r:>9.0%} "
                f"{ms(latencies, 50):>11.2f} {ms(latencies, 99):>11.2f} {mismatches:>10}"
            )
            if clients == 32:
                targets.check("32 clients: pairs/s >= 50% of raw EVALSHA/s", f"{p / r:.0%}", p / r >= 0.5)
            targets.check(f"{clients} clients: 0 ledger mismatches", str(mismatches), mismatches == 0)
    finally:
        drop(args.redis_url, prefix)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"load after: {load:.2f}. A pair is two scripts: ledger operations/s = 2 x pairs/s.")
    targets.report()
    if total_mismatches:
        raise SystemExit(f"{total_mismatches} ledger mismatches")


if __name__ == "__main__":
    asyncio.run(main())
