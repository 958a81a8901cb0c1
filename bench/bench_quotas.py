"""What recurring budgets and action quotas cost on the hot path, as ratios to a plain guarded
step measured in the same run.

    ./run bench quotas            (or: uv run python bench/bench_quotas.py [--quick] [--redis URL])

Per ledger (memory, SQLite, and Redis when reachable), the time of a guarded step (reserve +
commit) for:
  plain      a budget on each of three scopes (the baseline)
  period     the same budgets, each with a daily period in Europe/Berlin
  quota      plus a per_run quota and a per_hour_tumbling risk-class quota on the tenant
  + N runs   the same, after N other runs have left their counters in the store (N = 100, 10 000):
             the cost must not grow with the number of counters
"""

from __future__ import annotations

import argparse
import tempfile
import uuid
from collections.abc import Callable

from bench_core import on_fresh_redis, per_op_us  # bench/ is on sys.path when run as a script

from cycles import Action, Cycles, Subject, tokens

SCOPES = ["tenant:bench", "tenant:bench/workflow:w", "tenant:bench/workflow:w/agent:a"]
ACTION = Action("message.email.send", "bench")


def setup(cy: Cycles, *, period: bool, quota: bool) -> None:
    for scope in SCOPES:
        if period:
            cy.budgets.set(scope, tokens(10**15), period="day", timezone="Europe/Berlin")
        else:
            cy.budgets.set(scope, tokens(10**15))
    if quota:
        cy.quotas.set("tenant:bench", action_kind="message.email.send", max_calls=100_000, window="per_run")
        cy.quotas.set("tenant:bench", risk_class="external_side_effect", max_calls=100_000, window="per_hour_tumbling")


def step(cy: Cycles, run_id: str) -> Callable[[], None]:
    subject = Subject(tenant="bench", workflow="w", agent="a", dimensions={"run_id": run_id})

    def op() -> None:
        with cy.guard(subject, ACTION, estimate=tokens(5)) as g:
            g.commit(tokens(3))

    return op


def fill_runs(cy: Cycles, runs: int) -> None:
    for i in range(runs):
        r = cy.reserve(Subject(tenant="bench", dimensions={"run_id": f"old-{i}"}), ACTION, tokens(1))
        assert r.reservation_id
        cy.commit(r.reservation_id, tokens(1))


def bench_ledger(name: str, make_url: Callable[[], str], n: int, sizes: list[int]) -> None:
    results: list[tuple[str, float]] = []
    for label, period, quota, runs in [
        ("plain", False, False, 0),
        ("period", True, False, 0),
        ("period+quota", True, True, 0),
        *[(f"period+quota, {k:,} runs stored", True, True, k) for k in sizes],
    ]:
        with Cycles(make_url(), heartbeat=False) as cy:
            setup(cy, period=period, quota=quota)
            fill_runs(cy, runs)
            results.append((label, per_op_us(step(cy, "bench-run"), n)))
    base = results[0][1]
    for label, us in results:
        print(f"  {name:7s} {label:34s} {us:8.1f} us/step   x{us / base:5.2f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    n = 200 if args.quick else 2000
    sizes = [100, 1000] if args.quick else [100, 10_000]
    tmp = tempfile.mkdtemp()
    print("guarded step (reserve + commit), best of 5; ratio to 'plain' on the same ledger")
    bench_ledger("memory", lambda: "memory://", n, sizes)
    bench_ledger("sqlite", lambda: f"sqlite:///{tmp}/{uuid.uuid4().hex}.db", n, sizes)
    on_fresh_redis(args.redis, "benchq", lambda fresh: bench_ledger("redis", fresh, n // 2, sizes))


if __name__ == "__main__":
    main()
