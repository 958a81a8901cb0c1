"""The governance spec's funding operations (``Ledger.fund``) on every backend: each operation's
arithmetic, every refusal leaving the budget as it was, idempotent replay and mismatch, funding
racing reservations, and funding across a period boundary. One set of assertions holds
``rules.fund`` (memory, SQLite), ``lua/funding.lua`` (Redis) and the HTTP endpoint (http)."""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cycles import (
    BudgetClosed,
    BudgetExceeded,
    BudgetFrozen,
    CommitOveragePolicy,
    Cycles,
    IdempotencyMismatch,
    InvalidRequest,
    NotFound,
    OverdraftLimitExceeded,
    Subject,
    UnitMismatch,
    tokens,
    usd,
)
from cycles.ledger.funding import FundingResult

from .clocked import Clock, at, clocked_client
from .conftest import MULTI_PROCESS, Backend
from .helpers import LLM, amounts, bal
from .test_concurrency import _race_in_child

ACME = Subject(tenant="acme")
SCOPE = "tenant:acme"


def _spent_and_held(cy: Cycles) -> None:
    """(allocated, spent, reserved, debt, remaining) = (100, 30, 20, 0, 50)."""
    cy.budgets.set(SCOPE, tokens(100))
    cy.reserve(ACME, LLM, tokens(20))
    r = cy.reserve(ACME, LLM, tokens(30))
    assert r.reservation_id
    cy.commit(r.reservation_id, tokens(30))


def _in_debt(cy: Cycles) -> None:
    """(100, 80, 20, 10, -10): a commit ran 10 past what was left, into the overdraft."""
    cy.budgets.set(SCOPE, tokens(100), overdraft_limit=tokens(50))
    cy.reserve(ACME, LLM, tokens(20))
    r = cy.reserve(ACME, LLM, tokens(60), overage_policy=CommitOveragePolicy.ALLOW_WITH_OVERDRAFT)
    assert r.reservation_id
    cy.commit(r.reservation_id, tokens(90))


STATES = {"spent_and_held": _spent_and_held, "in_debt": _in_debt}
START = {"spent_and_held": (100, 30, 20, 0, 50), "in_debt": (100, 80, 20, 10, -10)}


@pytest.mark.parametrize(
    ("state", "operation", "amount", "spent", "expected"),
    [
        ("spent_and_held", "CREDIT", 25, None, (125, 30, 20, 0, 75)),
        ("spent_and_held", "DEBIT", 50, None, (50, 30, 20, 0, 0)),  # exactly to zero
        ("spent_and_held", "RESET", 40, None, (40, 30, 20, 0, -10)),  # a ceiling below use
        ("spent_and_held", "RESET", 0, None, (0, 30, 20, 0, -50)),
        ("spent_and_held", "RESET_SPENT", 60, None, (60, 0, 20, 0, 40)),  # reserved straddles
        ("spent_and_held", "RESET_SPENT", 60, 45, (60, 45, 20, 0, -5)),
        ("in_debt", "CREDIT", 25, None, (125, 80, 20, 10, 15)),  # debt kept (REPAY_DEBT clears it)
        ("in_debt", "REPAY_DEBT", 4, None, (104, 84, 20, 6, -6)),
        ("in_debt", "REPAY_DEBT", 10, None, (110, 90, 20, 0, 0)),
        ("in_debt", "RESET_SPENT", 100, None, (100, 0, 20, 10, 70)),  # periods do not forgive debt
        ("in_debt", "RESET", 200, None, (200, 80, 20, 10, 90)),
    ],
)
def test_each_operation_moves_exactly_its_figures(
    cy: Cycles, state: str, operation: str, amount: int, spent: int | None, expected: tuple[int, ...]
) -> None:
    STATES[state](cy)
    result = cy.budgets.adjust(SCOPE, operation, tokens(amount), spent=tokens(spent) if spent is not None else None)
    assert isinstance(result, FundingResult)
    assert result.operation.value == operation and result.scope == SCOPE and not result.replayed
    assert amounts(result.before) == START[state]
    assert amounts(result.after) == expected
    assert amounts(bal(cy, SCOPE)) == expected
    # a ceiling below what is already used (not as debt) marks the budget over its limit
    assert bal(cy, SCOPE).is_over_limit is (expected[1] + expected[2] > expected[0])
    wire = result.to_wire()
    assert wire["previous_remaining"]["amount"] == START[state][4]
    assert wire["new_remaining"]["amount"] == expected[4]
    assert wire["new_spent"]["amount"] == expected[1]


def test_a_ceiling_below_use_blocks_new_work_until_funded(cy: Cycles) -> None:
    _spent_and_held(cy)
    cy.budgets.adjust(SCOPE, "RESET", tokens(40))
    with pytest.raises(OverdraftLimitExceeded):
        cy.reserve(ACME, LLM, tokens(1))
    cy.budgets.adjust(SCOPE, "CREDIT", tokens(15))  # remaining 5 again
    assert bal(cy, SCOPE).is_over_limit is False
    assert cy.reserve(ACME, LLM, tokens(5)).reservation_id


def test_repaying_all_debt_lets_reservations_through_again(cy: Cycles) -> None:
    _in_debt(cy)
    cy.budgets.adjust(SCOPE, "CREDIT", tokens(50))  # remaining 40, debt still 10
    cy.budgets.adjust(SCOPE, "REPAY_DEBT", tokens(10))
    assert amounts(bal(cy, SCOPE)) == (160, 90, 20, 0, 50)
    assert bal(cy, SCOPE).is_over_limit is False
    assert cy.reserve(ACME, LLM, tokens(50)).reservation_id


@pytest.mark.parametrize(
    ("state", "operation", "amount", "spent", "error"),
    [
        ("spent_and_held", "DEBIT", 51, None, BudgetExceeded),  # remaining would be -1
        ("in_debt", "DEBIT", 1, None, BudgetExceeded),  # already below zero
        ("spent_and_held", "REPAY_DEBT", 1, None, InvalidRequest),  # no debt to repay
        ("in_debt", "REPAY_DEBT", 11, None, InvalidRequest),  # more than the debt
        ("spent_and_held", "CREDIT", 0, None, InvalidRequest),
        ("spent_and_held", "DEBIT", 0, None, InvalidRequest),
        ("in_debt", "REPAY_DEBT", 0, None, InvalidRequest),
        ("spent_and_held", "CREDIT", 5, 5, InvalidRequest),  # spent is for RESET_SPENT only
        ("spent_and_held", "TOP_UP", 5, None, InvalidRequest),  # not an operation
    ],
)
def test_a_refused_operation_leaves_the_budget_as_it_was(
    cy: Cycles, state: str, operation: str, amount: int, spent: int | None, error: type[Exception]
) -> None:
    STATES[state](cy)
    with pytest.raises(error):
        cy.budgets.adjust(SCOPE, operation, tokens(amount), spent=tokens(spent) if spent is not None else None)
    assert amounts(bal(cy, SCOPE)) == START[state]


def test_units_must_match_the_budget(cy: Cycles) -> None:
    _spent_and_held(cy)
    with pytest.raises(UnitMismatch):  # the budget is in tokens, not dollars
        cy.budgets.adjust(SCOPE, "CREDIT", usd(1))
    with pytest.raises(UnitMismatch):
        cy.ledger.fund(SCOPE, tokens(1).unit, "RESET_SPENT", tokens(60), spent=usd(1))
    with pytest.raises(UnitMismatch):
        cy.ledger.fund(SCOPE, usd(1).unit, "CREDIT", tokens(1))
    assert amounts(bal(cy, SCOPE)) == START["spent_and_held"]


def test_frozen_closed_and_missing_budgets_are_refused(cy: Cycles) -> None:
    _spent_and_held(cy)
    with pytest.raises(NotFound):
        cy.budgets.adjust("tenant:acme/workspace:none", "CREDIT", tokens(5))
    cy.budgets.freeze(SCOPE)
    with pytest.raises(BudgetFrozen):
        cy.budgets.adjust(SCOPE, "CREDIT", tokens(5))
    cy.budgets.unfreeze(SCOPE)
    cy.budgets.adjust(SCOPE, "CREDIT", tokens(5))
    cy.budgets.close(SCOPE)
    with pytest.raises(BudgetClosed):
        cy.budgets.adjust(SCOPE, "RESET_SPENT", tokens(500))
    assert amounts(bal(cy, SCOPE)) == (105, 30, 20, 0, 55)


def test_the_same_key_and_request_replay_the_first_result(cy: Cycles, backend: str) -> None:
    _spent_and_held(cy)
    first = cy.budgets.adjust(SCOPE, "CREDIT", tokens(10), idempotency_key="topup-1")
    again = cy.budgets.adjust(SCOPE, "CREDIT", tokens(10), idempotency_key="topup-1")
    assert amounts(bal(cy, SCOPE)) == (110, 30, 20, 0, 60)  # applied once
    assert again.to_wire() == first.to_wire()  # the first answer, timestamp and all
    if backend != "http":  # the spec's response has no replay marker to carry it over the wire
        assert again.replayed and not first.replayed
    with pytest.raises(IdempotencyMismatch):
        cy.budgets.adjust(SCOPE, "CREDIT", tokens(11), idempotency_key="topup-1")
    with pytest.raises(IdempotencyMismatch):
        cy.budgets.adjust(SCOPE, "DEBIT", tokens(10), idempotency_key="topup-1")
    cy.budgets.set("tenant:acme/workspace:w", tokens(10))
    with pytest.raises(IdempotencyMismatch):  # another scope of the same tenant: the same namespace
        cy.budgets.adjust("tenant:acme/workspace:w", "CREDIT", tokens(10), idempotency_key="topup-1")
    assert amounts(bal(cy, SCOPE)) == (110, 30, 20, 0, 60)
    cy.budgets.set("tenant:other", tokens(10))  # another tenant's keys are its own
    assert amounts(cy.budgets.adjust("tenant:other", "DEBIT", tokens(4), idempotency_key="topup-1").after)[0] == 6


def test_a_refusal_is_not_remembered_under_its_key(cy: Cycles) -> None:
    _spent_and_held(cy)
    with pytest.raises(BudgetExceeded):
        cy.budgets.adjust(SCOPE, "DEBIT", tokens(60), idempotency_key="drain")
    cy.budgets.adjust(SCOPE, "CREDIT", tokens(10))
    result = cy.budgets.adjust(SCOPE, "DEBIT", tokens(60), idempotency_key="drain")  # now it fits
    assert amounts(result.after) == (50, 30, 20, 0, 0)


# ---- funding racing reservations: never more granted than allocated -----------------------------

COST = 7


def test_debits_racing_reservations_never_oversubscribe(cy: Cycles) -> None:
    cy.budgets.set("tenant:race", tokens(500))
    granted, lock, stop = 0, threading.Lock(), threading.Event()
    debits: list[FundingResult] = []

    def reserve() -> None:
        nonlocal granted
        for _ in range(30):
            try:
                cy.reserve(Subject(tenant="race", agent="x"), LLM, tokens(COST))
            except BudgetExceeded:
                continue
            with lock:
                granted += 1

    def fund() -> None:
        while not stop.is_set():
            try:
                debits.append(cy.budgets.adjust("tenant:race", "DEBIT", tokens(60)))
            except BudgetExceeded:
                continue
            cy.budgets.adjust("tenant:race", "CREDIT", tokens(60))

    with ThreadPoolExecutor(6) as pool:
        funder = pool.submit(fund)
        for f in [pool.submit(reserve) for _ in range(5)]:
            f.result()
        stop.set()
        funder.result()
    for d in debits:  # each DEBIT saw the reservations granted before it, atomically
        assert d.after.remaining.amount >= 0
        assert d.after.reserved is not None and d.after.allocated is not None
        assert d.after.reserved.amount <= d.after.allocated.amount
    assert granted * COST <= 500
    assert amounts(bal(cy, "tenant:race")) == (500, 0, granted * COST, 0, 500 - granted * COST)


def test_funding_from_this_process_while_other_processes_reserve(cy: Cycles, ledger: Backend, backend: str) -> None:
    if backend not in MULTI_PROCESS:
        pytest.skip(f"{backend} state is private to one process")
    cy.budgets.set("tenant:race", tokens(140))  # fits 20 of 7
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_race_in_child, args=(ledger.spec, 2, 15, "race", f"p{i}", out)) for i in range(3)]
    for p in procs:
        p.start()
    credited = 0
    for _ in range(10):  # 10 top-ups of 14 while the children race: room for 20 more
        cy.budgets.adjust("tenant:race", "CREDIT", tokens(14))
        credited += 14
        try:
            cy.budgets.adjust("tenant:race", "DEBIT", tokens(7))
            cy.budgets.adjust("tenant:race", "CREDIT", tokens(7))
        except BudgetExceeded:
            pass
    granted = sum(dict(out.get(timeout=120) for _ in procs).values())
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    allocated = 140 + credited
    assert granted * COST <= allocated
    assert amounts(bal(cy, "tenant:race")) == (allocated, 0, granted * COST, 0, allocated - granted * COST)


# ---- recurring budgets: the period rolls over first, funding changes the current one ---------------


@pytest.fixture
def clock() -> Clock:
    return Clock(at(2026, 3, 10, 12))


@pytest.fixture
def tcy(
    backend: str, ledger: Backend, tmp_path: Path, request: pytest.FixtureRequest, clock: Clock
) -> Iterator[Cycles]:
    with clocked_client(backend, ledger, tmp_path, request, clock) as client:
        yield client


def test_a_period_that_ended_rolls_over_before_the_funding(tcy: Cycles, clock: Clock) -> None:
    tcy.budgets.set(SCOPE, tokens(100), period="day")
    r = tcy.reserve(ACME, LLM, tokens(60))
    assert r.reservation_id
    tcy.commit(r.reservation_id, tokens(60))
    clock.at(2026, 3, 11, 9)  # a new day: spent starts again at 0
    result = tcy.budgets.adjust(SCOPE, "CREDIT", tokens(10))
    assert amounts(result.before) == (100, 0, 0, 0, 100)
    assert amounts(result.after) == (110, 0, 0, 0, 110)
    assert bal(tcy, SCOPE).period_start == "2026-03-11T00:00:00Z"
    debit = tcy.budgets.adjust(SCOPE, "DEBIT", tokens(30))
    assert amounts(debit.after) == (80, 0, 0, 0, 80)
    clock.at(2026, 3, 12, 9)  # the top-up and the debit were for that day only
    assert amounts(bal(tcy, SCOPE)) == (100, 0, 0, 0, 100)


def test_reset_spent_on_a_recurring_budget_keeps_its_window(tcy: Cycles, clock: Clock) -> None:
    tcy.budgets.set(SCOPE, tokens(100), period="day")
    clock.advance(3_600_000)
    result = tcy.budgets.adjust(SCOPE, "RESET_SPENT", tokens(70), spent=tokens(15))
    assert amounts(result.after) == (70, 15, 0, 0, 55)
    b = bal(tcy, SCOPE)
    assert (b.period_start, b.period_end) == ("2026-03-10T00:00:00Z", "2026-03-11T00:00:00Z")


def test_changing_the_overdraft_limit_keeps_amounts_and_the_period_allocation(tcy: Cycles, clock: Clock) -> None:
    """The limit alone changes: a top-up before it stays, and the next period starts from the
    budget's own allocation, not from what the top-up made of this one."""
    tcy.budgets.set(SCOPE, tokens(100), period="day")
    tcy.budgets.adjust(SCOPE, "CREDIT", tokens(25))
    b = tcy.ledger.set_overdraft_limit(SCOPE, tokens(40))
    assert amounts(b) == (125, 0, 0, 0, 125) and b.overdraft_limit == tokens(40)
    assert bal(tcy, SCOPE).overdraft_limit == tokens(40)
    clock.at(2026, 3, 11, 9)
    assert amounts(bal(tcy, SCOPE)) == (100, 0, 0, 0, 100)
    assert bal(tcy, SCOPE).overdraft_limit == tokens(40)


def test_an_overdraft_limit_needs_a_live_budget_in_its_unit(cy: Cycles, backend: str) -> None:
    cy.budgets.set(SCOPE, tokens(100))
    with pytest.raises(NotFound):
        cy.ledger.set_overdraft_limit("tenant:acme/workspace:none", tokens(10))
    # the scope's budget is in tokens; the spec's updateBudget names (scope, unit): no such budget
    with pytest.raises(NotFound if backend == "http" else UnitMismatch):
        cy.ledger.set_overdraft_limit(SCOPE, usd(1))
    cy.budgets.close(SCOPE)
    with pytest.raises(BudgetClosed):
        cy.ledger.set_overdraft_limit(SCOPE, tokens(10))


def test_an_overdraft_limit_below_the_debt_marks_the_budget_over_its_limit(cy: Cycles) -> None:
    _in_debt(cy)  # debt 10 under a limit of 50
    assert cy.ledger.set_overdraft_limit(SCOPE, tokens(5)).is_over_limit is True
    with pytest.raises(OverdraftLimitExceeded):
        cy.reserve(ACME, LLM, tokens(1))
    # raising the limit again is not enough while the scope is short of funds (remaining -10):
    # the over-limit state ends the way the protocol says, when the debt is repaid
    assert cy.ledger.set_overdraft_limit(SCOPE, tokens(50)).is_over_limit is True
    cy.budgets.adjust(SCOPE, "REPAY_DEBT", tokens(10))
    assert not bal(cy, SCOPE).is_over_limit
    with pytest.raises(BudgetExceeded):  # no longer over the limit: just nothing left (remaining 0)
        cy.reserve(ACME, LLM, tokens(1))


# ---- the async client: the same flow, awaited ---------------------------------------------------


async def test_the_async_client_funds_the_same_way(ledger: Backend) -> None:
    acy = ledger.open_async()
    await acy.budgets.set("tenant:async", tokens(100))
    result = await acy.budgets.adjust("tenant:async", "DEBIT", tokens(40), idempotency_key="k")
    again = await acy.budgets.adjust("tenant:async", "DEBIT", tokens(40), idempotency_key="k")
    assert again.to_wire() == result.to_wire()
    assert amounts(await acy.budgets.get("tenant:async")) == (60, 0, 0, 0, 60)
    with pytest.raises(BudgetExceeded):
        await acy.budgets.adjust("tenant:async", "DEBIT", tokens(61))
    await acy.aclose()
