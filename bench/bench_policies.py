"""What named policies cost on the hot path, as ratios to the same step with none stored, measured in
the same run.

    ./run bench policies          (or: uv run python bench/bench_policies.py [--quick] [--redis URL])

Per ledger (memory, SQLite, and Redis when reachable), the time of a guarded step (reserve + commit)
with 0, 10, 100 and 1,000 policies stored for the tenant: one matches the step (``agent:*`` with
caps and a rate limit far above the load), the others name other workspaces. A reservation looks
its policies up by O(depth) candidate patterns, so the cost must not grow with how many are stored.
"""

from __future__ import annotations

import argparse
import tempfile
import uuid
from collections.abc import Callable

from bench_core import on_fresh_redis, per_op_us  # bench/ is on sys.path when run as a script

from cycles import Action, Cycles, Subject, tokens

SUBJECT = Subject(tenant="bench", workspace="w", agent="a")
ACTION = Action("llm.completion", "bench")


def setup(cy: Cycles, stored: int) -> None:
    cy.tenants.create("bench", "Bench")
    cy.budgets.set("tenant:bench", tokens(10**15))
    cy.budgets.set("tenant:bench/workspace:w", tokens(10**15))
    if stored:
        cy.policies.create(
            "bench",
            "agents",
            "agent:*",
            caps={"max_tokens": 4096},
            rate_limits={"max_reservations_per_minute": 10**9},
        )
    for i in range(stored - 1):
        cy.policies.create("bench", f"ws-{i}", f"tenant:bench/workspace:other-{i}/*", caps={"max_tokens": i})


def step(cy: Cycles) -> Callable[[], None]:
    def op() -> None:
        with cy.guard(SUBJECT, ACTION, estimate=tokens(5)) as g:
            g.commit(tokens(3))

    return op


def bench_ledger(name: str, make_url: Callable[[], str], n: int, sizes: list[int]) -> None:
    results: list[tuple[int, float]] = []
    for stored in sizes:
        with Cycles(make_url(), heartbeat=False) as cy:
            setup(cy, stored)
            results.append((stored, per_op_us(step(cy), n)))
    base = results[0][1]
    for stored, us in results:
        print(f"  {name:7s} {stored:6,d} policies stored {us:8.1f} us/step   x{us / base:5.2f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    n = 200 if args.quick else 2000
    sizes = [0, 10, 100] if args.quick else [0, 10, 100, 1000]
    tmp = tempfile.mkdtemp()
    print("guarded step (reserve + commit), best of 5; ratio to 0 policies on the same ledger")
    bench_ledger("memory", lambda: "memory://", n, sizes)
    bench_ledger("sqlite", lambda: f"sqlite:///{tmp}/{uuid.uuid4().hex}.db", n, sizes)
    on_fresh_redis(args.redis, "benchp", lambda fresh: bench_ledger("redis", fresh, n // 2, sizes))


if __name__ == "__main__":
    main()
