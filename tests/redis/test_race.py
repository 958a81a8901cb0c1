"""4 processes x 8 threads race for one tenant budget and for per-agent budgets on the real Redis.

Phase 1 reserves until every thread is refused; phase 2 settles everything concurrently (commit
some with an actual above or below the estimate, release the rest). The ledger must never grant
more than a budget holds, and its totals must equal what the clients were told, to the unit.
"""

from __future__ import annotations

import functools
import multiprocessing as mp
import threading
from collections import defaultdict
from queue import Empty
from typing import Any

import pytest

from cycles import Action, Cycles, Subject, tokens
from cycles.errors import BudgetExceeded, CyclesError
from cycles.models import CommitOveragePolicy
from cycles.testing import check_balances

PROCESSES = 4
THREADS = 8
TENANT_BUDGET = 6_000
AGENT_BUDGET = 260  # 32 agents x 260 = 8,320 > 6,000: both the tenant and the agents bind
LLM = Action("llm.completion", "m")


def _thread(url: str, agent: str, amount: int, out: list[Any], start: Any, barrier: Any) -> None:
    cy = Cycles(url)
    subject = Subject(tenant="race", agent=agent)
    granted: list[tuple[str, int]] = []
    start.wait()
    refused = 0
    while refused < 3:  # a refusal may be transient: a sibling's reservation can be released later
        try:
            r = cy.reserve(subject, LLM, tokens(amount), ttl_ms=120_000)
        except BudgetExceeded:
            refused += 1
            continue
        assert r.reservation_id
        granted.append((r.reservation_id, amount))
    barrier.wait()  # phase 2, once every thread of every process is refused: settle concurrently
    settled = []
    for i, (rid, held) in enumerate(granted):
        if i % 3 == 2:
            released = cy.release(rid)
            settled.append(("release", rid, held, released.released.amount))
        else:
            actual = held + 3 if i % 3 == 0 else max(0, held - 2)  # over and under the estimate
            c = cy.commit(rid, tokens(actual))
            settled.append(("commit", rid, held, c.charged.amount))
    out.append((agent, granted, settled))
    cy.close()


def _snapshot_between_phases(url: str, queue: Any) -> None:
    """Barrier action: runs once, when every thread has been refused and none has settled yet."""
    cy = Cycles(url)
    queue.put({b.scope: b.model_dump(mode="json") for b in cy.budgets.list(tenant="race")})
    cy.close()


def _process(url: str, index: int, queue: Any, start: Any, barrier: Any) -> None:
    out: list[Any] = []
    threads = [
        threading.Thread(target=_thread, args=(url, f"p{index}-t{j}", 5 + j % 4, out, start, barrier))
        for j in range(THREADS)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    queue.put(out)


@pytest.mark.slow
def test_processes_and_threads_never_oversubscribe_and_the_books_balance(url: str) -> None:
    cy = Cycles(url)
    cy.budgets.set("tenant:race", tokens(TENANT_BUDGET))
    agents = [f"p{i}-t{j}" for i in range(PROCESSES) for j in range(THREADS)]
    for agent in agents:
        cy.budgets.set(f"tenant:race/agent:{agent}", tokens(AGENT_BUDGET))

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    phase1 = ctx.Queue()
    barrier = ctx.Barrier(PROCESSES * THREADS, functools.partial(_snapshot_between_phases, url, phase1), 240)
    start = ctx.Barrier(PROCESSES * THREADS, timeout=240)
    procs = [ctx.Process(target=_process, args=(url, i, queue, start, barrier)) for i in range(PROCESSES)]
    for p in procs:
        p.start()
    results: list[Any] = []
    for _ in procs:
        try:
            results.extend(queue.get(timeout=240))
        except Empty:
            pytest.fail("a racing process did not report")
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0

    granted_by_agent: dict[str, int] = defaultdict(int)
    charged_by_agent: dict[str, int] = defaultdict(int)
    ids: set[str] = set()
    for agent, granted, settled in results:
        assert len(settled) == len(granted)
        for rid, amount in granted:
            ids.add(rid)
            granted_by_agent[agent] += amount
        for kind, _rid, held, amount in settled:
            if kind == "commit":
                # ALLOW_IF_AVAILABLE: an overage is charged only as far as every scope can cover it
                assert held - 2 <= amount <= held + 3
                charged_by_agent[agent] += amount
            else:
                assert amount == held
    assert len(ids) == sum(len(g) for _, g, _ in results), "a reservation id was handed out twice"

    total_granted = sum(granted_by_agent.values())
    mismatches: list[Any] = []
    held_after_phase1 = {scope: b["reserved"]["amount"] for scope, b in phase1.get(timeout=10).items()}
    if held_after_phase1.pop("tenant:race") != total_granted:
        mismatches.append(("tenant reserved after phase 1", total_granted))
    for agent in agents:
        if held_after_phase1[f"tenant:race/agent:{agent}"] != granted_by_agent[agent]:
            mismatches.append((agent, "reserved after phase 1", granted_by_agent[agent]))
    assert total_granted <= TENANT_BUDGET
    for agent in agents:
        assert granted_by_agent[agent] <= AGENT_BUDGET
    # Phase 1 ended when every thread was refused: the tenant or the agent budget was (nearly) full.
    assert total_granted > TENANT_BUDGET - 8 * len(agents) or all(
        granted_by_agent[a] > AGENT_BUDGET - 8 for a in agents
    )

    balances = {b.scope: b for b in cy.budgets.list(tenant="race")}
    check_balances(list(balances.values()))
    for agent in agents:
        b = balances[f"tenant:race/agent:{agent}"]
        got = (b.spent and b.spent.amount, b.reserved and b.reserved.amount, b.debt and b.debt.amount)
        if got != (charged_by_agent[agent], 0, 0):
            mismatches.append((agent, got, charged_by_agent[agent]))
    tenant = balances["tenant:race"]
    total_charged = sum(charged_by_agent.values())
    if (tenant.spent and tenant.spent.amount, tenant.reserved and tenant.reserved.amount) != (
        total_charged,
        0,
    ):
        mismatches.append(("tenant", tenant, total_charged))
    assert mismatches == []

    # Every reservation is finalized exactly as its client was told.
    listed = cy.list_reservations(tenant="race", limit=200)
    statuses: dict[str, int] = defaultdict(int)
    page = listed
    while True:
        for s in page.reservations:
            statuses[s.status.value] += 1
        if not page.next_cursor:
            break
        page = cy.list_reservations(tenant="race", limit=200, cursor=page.next_cursor)
    commits = sum(1 for _, _, settled in results for k, *_ in settled if k == "commit")
    assert dict(statuses) == {"COMMITTED": commits, "RELEASED": len(ids) - commits}
    cy.close()


def test_overdraft_commits_racing_on_one_scope_keep_the_invariant(url: str) -> None:
    """Concurrent ALLOW_WITH_OVERDRAFT commits may together pass the limit (the spec allows it); the
    scope then reads over-limit, and every balance still satisfies the ledger invariant."""
    cy = Cycles(url)
    cy.budgets.set("tenant:od", tokens(100), overdraft_limit=tokens(50))
    subject = Subject(tenant="od")
    held = [
        cy.reserve(subject, LLM, tokens(10), overage_policy=CommitOveragePolicy.ALLOW_WITH_OVERDRAFT) for _ in range(10)
    ]
    errors: list[Exception] = []

    def settle(rid: str) -> None:
        try:
            cy.commit(rid, tokens(30))
        except CyclesError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=settle, args=(r.reservation_id,)) for r in held]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    b = cy.budgets.get("tenant:od")
    check_balances([b])
    assert b.debt is not None and b.debt.amount <= 50
    assert all(type(e).__name__ == "OverdraftLimitExceeded" for e in errors)
    cy.close()
