"""Races: many threads and processes against one budget never get more than was allocated."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from cycles import BudgetExceeded, Cycles, ReservationStatus, Subject, tokens
from cycles.testing import assert_ledger_invariant

from .conftest import MULTI_PROCESS, Backend, open_backend
from .helpers import LLM, amounts, bal

COST = 7
ALLOCATED = 500  # fits 71 reservations of 7


def _race(cy: Cycles, threads: int, attempts: int, subject: Subject) -> int:
    granted = 0
    lock = threading.Lock()

    def worker() -> None:
        nonlocal granted
        for _ in range(attempts):
            try:
                cy.reserve(subject, LLM, tokens(COST))
            except BudgetExceeded:
                continue
            with lock:
                granted += 1

    with ThreadPoolExecutor(threads) as pool:
        for f in [pool.submit(worker) for _ in range(threads)]:
            f.result()
    return granted


def _race_in_child(
    spec: tuple[str, str, bool],
    threads: int,
    attempts: int,
    tenant: str,
    agent: str,
    out: multiprocessing.Queue,  # type: ignore[type-arg]
) -> None:
    with open_backend(spec, heartbeat=False) as cy:
        out.put((agent, _race(cy, threads, attempts, Subject(tenant=tenant, agent=agent))))


def test_threads_never_oversubscribe(cy: Cycles) -> None:
    cy.budgets.set("tenant:race", tokens(ALLOCATED))
    granted = _race(cy, threads=8, attempts=25, subject=Subject(tenant="race", agent="x"))
    assert granted == ALLOCATED // COST
    assert amounts(bal(cy, "tenant:race")) == (ALLOCATED, 0, granted * COST, 0, ALLOCATED - granted * COST)


def test_processes_never_oversubscribe(cy: Cycles, ledger: Backend, backend: str) -> None:
    if backend not in MULTI_PROCESS:
        pytest.skip(f"{backend} state is private to one process")
    cy.budgets.set("tenant:race", tokens(300))  # fits 42: binding over the four agents' 56
    for i in range(4):
        cy.budgets.set(f"tenant:race/agent:p{i}", tokens(100))  # independent per-agent budgets too
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_race_in_child, args=(ledger.spec, 4, 12, "race", f"p{i}", out)) for i in range(4)]
    for p in procs:
        p.start()
    by_agent = dict(out.get(timeout=120) for _ in procs)
    results = [by_agent[f"p{i}"] for i in range(4)]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    granted = sum(results)
    assert granted == 300 // COST, results
    assert all(r <= 100 // COST for r in results), results
    tenant = bal(cy, "tenant:race")
    assert tenant.reserved == tokens(granted * COST)
    for i in range(4):
        assert bal(cy, f"tenant:race/agent:p{i}").reserved == tokens(results[i] * COST)


def _reserve_and_die(spec: tuple[str, str, bool], ready: multiprocessing.Event) -> None:  # type: ignore[type-arg]
    cy = open_backend(spec, heartbeat=False)
    cy.reserve(Subject(tenant="crash"), LLM, tokens(40), ttl_ms=1000, grace_period_ms=0)
    n = 0
    while True:  # commit in a loop until killed at an arbitrary point
        r = cy.reserve(Subject(tenant="crash"), LLM, tokens(1), ttl_ms=1000, grace_period_ms=0)
        assert r.reservation_id
        cy.commit(r.reservation_id, tokens(1))
        n += 1
        if n == 20:
            ready.set()


def test_a_killed_process_loses_no_commit_and_strands_nothing(cy: Cycles, ledger: Backend, backend: str) -> None:
    if backend not in MULTI_PROCESS:
        pytest.skip("needs a store shared with a child process")
    cy.budgets.set("tenant:crash", tokens(10_000))
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    p = ctx.Process(target=_reserve_and_die, args=(ledger.spec, ready))
    p.start()
    assert ready.wait(60)
    time.sleep(0.05)
    assert p.pid is not None
    os.kill(p.pid, signal.SIGKILL)
    p.join()
    time.sleep(1.1)  # past every TTL the child held
    cy.sweep()
    b = bal(cy, "tenant:crash")
    assert b.reserved == tokens(0)
    committed = 0
    cursor = None
    while True:
        page = cy.list_reservations(tenant="crash", status=ReservationStatus.COMMITTED, limit=200, cursor=cursor)
        committed += sum(r.committed.amount for r in page.reservations if r.committed)
        cursor = page.next_cursor
        if not cursor:
            break
    assert committed >= 20
    assert b.spent == tokens(committed)  # every commit the ledger acknowledged is in the totals
    assert_ledger_invariant(cy)
