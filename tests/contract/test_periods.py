"""Recurring budgets: calendar periods in a time zone (DST, month ends), fixed durations, rollover
policies, reservations and debt across a boundary -- with an injected clock, on every backend.
Nothing is scheduled: the first operation after a boundary rolls the budget over."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cycles import (
    BudgetExceeded,
    CommitOveragePolicy,
    Cycles,
    InvalidRequest,
    NotFound,
    Subject,
    tokens,
)

from .clocked import Clock, at, clocked_client
from .conftest import Backend
from .helpers import LLM, amounts, bal

ACME = Subject(tenant="acme")
BERLIN = "Europe/Berlin"
HOUR = 3_600_000


@pytest.fixture
def clock() -> Clock:
    return Clock(at(2026, 3, 28, 12, tz=BERLIN))


@pytest.fixture
def tcy(
    backend: str, ledger: Backend, tmp_path: Path, request: pytest.FixtureRequest, clock: Clock
) -> Iterator[Cycles]:
    with clocked_client(backend, ledger, tmp_path, request, clock) as client:
        yield client


def spend(cy: Cycles, n: int, subject: Subject = ACME) -> None:
    r = cy.reserve(subject, LLM, tokens(n))
    assert r.reservation_id
    cy.commit(r.reservation_id, tokens(n))


def window(cy: Cycles, scope: str = "tenant:acme") -> tuple[str | None, str | None]:
    b = bal(cy, scope)
    return b.period_start, b.period_end


def test_a_daily_budget_is_whole_again_at_midnight_in_its_time_zone(tcy: Cycles, clock: Clock) -> None:
    b = tcy.budgets.set("tenant:acme", tokens(100), period="day", timezone=BERLIN)
    assert (b.period_start, b.period_end) == ("2026-03-27T23:00:00Z", "2026-03-28T23:00:00Z")
    spend(tcy, 100)
    with pytest.raises(BudgetExceeded):
        tcy.reserve(ACME, LLM, tokens(1))
    clock.at(2026, 3, 29, 0, 59, tz="UTC")  # 01:59 in Berlin: still the 29th there; UTC midnight is past
    assert amounts(bal(tcy, "tenant:acme")) == (100, 0, 0, 0, 100)
    clock.at(2026, 3, 29, 0, 0, 0, tz=BERLIN)
    spend(tcy, 10)
    assert amounts(bal(tcy, "tenant:acme")) == (100, 10, 0, 0, 90)


def test_the_day_of_a_dst_change_is_23_or_25_hours_long(tcy: Cycles, clock: Clock) -> None:
    tcy.budgets.set("tenant:acme", tokens(100), period="day", timezone=BERLIN)
    clock.at(2026, 3, 29, 12, tz=BERLIN)  # spring forward: 23 hours
    assert window(tcy) == ("2026-03-28T23:00:00Z", "2026-03-29T22:00:00Z")
    clock.at(2026, 10, 25, 12, tz=BERLIN)  # fall back: 25 hours
    assert window(tcy) == ("2026-10-24T22:00:00Z", "2026-10-25T23:00:00Z")
    spend(tcy, 40)
    clock.ms = at(2026, 10, 25, 23, tz="UTC") - 1  # the last ms of that long day
    assert amounts(bal(tcy, "tenant:acme"))[1] == 40
    clock.advance(1)
    assert amounts(bal(tcy, "tenant:acme"))[1] == 0
    assert window(tcy) == ("2026-10-25T23:00:00Z", "2026-10-26T23:00:00Z")


def test_hourly_periods_follow_the_zone_through_the_repeated_hour(tcy: Cycles, clock: Clock) -> None:
    clock.ms = at(2026, 10, 25, 0, 30, tz="UTC")  # 02:30 CEST, the first 02:xx of the night
    tcy.budgets.set("tenant:acme", tokens(10), period="hour", timezone=BERLIN)
    assert window(tcy) == ("2026-10-25T00:00:00Z", "2026-10-25T01:00:00Z")
    spend(tcy, 10)
    clock.advance(HOUR)  # 02:30 CET, the second one: a new hour
    assert window(tcy) == ("2026-10-25T01:00:00Z", "2026-10-25T02:00:00Z")
    assert amounts(bal(tcy, "tenant:acme")) == (10, 0, 0, 0, 10)


def test_weeks_start_on_monday_and_months_on_the_first(tcy: Cycles, clock: Clock) -> None:
    clock.at(2026, 4, 2, 15, tz=BERLIN)  # a Thursday
    tcy.budgets.set("tenant:acme", tokens(10), period="week", timezone=BERLIN)
    tcy.budgets.set("tenant:acme/workspace:w", tokens(10), period="month", timezone="America/New_York")
    tcy.budgets.set("tenant:acme/workspace:u", tokens(10), period="month")  # UTC
    assert window(tcy) == ("2026-03-29T22:00:00Z", "2026-04-05T22:00:00Z")
    assert window(tcy, "tenant:acme/workspace:w") == ("2026-04-01T04:00:00Z", "2026-05-01T04:00:00Z")
    assert window(tcy, "tenant:acme/workspace:u") == ("2026-04-01T00:00:00Z", "2026-05-01T00:00:00Z")


def test_month_ends_and_leap_years(tcy: Cycles, clock: Clock) -> None:
    clock.at(2028, 1, 31, 23, 59, tz=BERLIN)
    tcy.budgets.set("tenant:acme", tokens(100), period="month", timezone=BERLIN)
    spend(tcy, 70)
    clock.at(2028, 2, 1, 0, 0, tz=BERLIN)
    assert amounts(bal(tcy, "tenant:acme")) == (100, 0, 0, 0, 100)
    assert window(tcy) == ("2028-01-31T23:00:00Z", "2028-02-29T23:00:00Z")  # 29 days: 2028 is a leap year
    clock.at(2028, 2, 29, 23, 59, tz=BERLIN)
    spend(tcy, 5)
    clock.at(2028, 3, 1, tz=BERLIN)
    assert amounts(bal(tcy, "tenant:acme")) == (100, 0, 0, 0, 100)
    clock.at(2028, 12, 31, 23, 30, tz=BERLIN)
    assert window(tcy) == ("2028-11-30T23:00:00Z", "2028-12-31T23:00:00Z")
    clock.at(2029, 1, 1, 0, 30, tz=BERLIN)
    assert window(tcy) == ("2028-12-31T23:00:00Z", "2029-01-31T23:00:00Z")


@pytest.mark.parametrize(
    ("period", "length_ms"), [("90s", 90_000), ("15m", 900_000), ("12h", 12 * HOUR), ("7d", 168 * HOUR)]
)
def test_fixed_durations_count_from_when_the_period_was_set(
    tcy: Cycles, clock: Clock, period: str, length_ms: int
) -> None:
    clock.ms = at(2026, 5, 1, 10, 0, 7)
    tcy.budgets.set("tenant:acme", tokens(50), period=period)
    spend(tcy, 50)
    clock.advance(length_ms - 1)
    assert amounts(bal(tcy, "tenant:acme"))[4] == 0
    clock.advance(1)
    assert amounts(bal(tcy, "tenant:acme")) == (50, 0, 0, 0, 50)
    clock.advance(3 * length_ms + 5)  # three more boundaries while idle: the window is still aligned
    b = bal(tcy, "tenant:acme")
    start = at(2026, 5, 1, 10, 0, 7) + 4 * length_ms
    assert b.period_start is not None and b.period_start.startswith(_iso_prefix(start))


def _iso_prefix(ms: int) -> str:
    from cycles.ledger.periods import iso

    return iso(ms)[:19]


@pytest.mark.parametrize(
    ("policy", "after_one", "after_skip"),
    [
        ("NONE", 100, 100),
        ("CARRY_FORWARD", 160, 160 + 100 + 100),  # 60 unused; then 160 unused and one idle day's 100
        ("CAP_AT_ALLOCATED", 160, 200),  # what carries over is at most one allocation
    ],
)
def test_rollover_policies(tcy: Cycles, clock: Clock, policy: str, after_one: int, after_skip: int) -> None:
    tcy.budgets.set("tenant:acme", tokens(100), period="day", timezone=BERLIN, rollover_policy=policy)
    spend(tcy, 40)
    clock.at(2026, 3, 29, 9, tz=BERLIN)
    assert amounts(bal(tcy, "tenant:acme")) == (after_one, 0, 0, 0, after_one)
    clock.at(2026, 3, 31, 9, tz=BERLIN)  # the 30th passed untouched
    assert amounts(bal(tcy, "tenant:acme")) == (after_skip, 0, 0, 0, after_skip)


def test_a_reservation_across_the_boundary_keeps_its_hold_and_is_charged_to_the_new_period(
    tcy: Cycles, clock: Clock
) -> None:
    tcy.budgets.set("tenant:acme", tokens(100), period="hour", timezone=BERLIN)
    spend(tcy, 50)
    r = tcy.reserve(ACME, LLM, tokens(30), ttl_ms=3 * HOUR)
    assert r.reservation_id
    assert amounts(bal(tcy, "tenant:acme")) == (100, 50, 30, 0, 20)
    clock.advance(HOUR)
    assert amounts(bal(tcy, "tenant:acme")) == (100, 0, 30, 0, 70)  # the hold moved with it
    tcy.commit(r.reservation_id, tokens(20))
    assert amounts(bal(tcy, "tenant:acme")) == (100, 20, 0, 0, 80)
    r2 = tcy.reserve(ACME, LLM, tokens(10), ttl_ms=3 * HOUR)
    assert r2.reservation_id
    clock.advance(HOUR)
    tcy.release(r2.reservation_id)
    assert amounts(bal(tcy, "tenant:acme")) == (100, 0, 0, 0, 100)


def test_debt_is_repaid_from_the_next_periods_allocation(tcy: Cycles, clock: Clock) -> None:
    tcy.budgets.set("tenant:acme", tokens(100), period="day", timezone=BERLIN, overdraft_limit=tokens(500))
    r = tcy.reserve(ACME, LLM, tokens(100), overage_policy=CommitOveragePolicy.ALLOW_WITH_OVERDRAFT)
    assert r.reservation_id
    tcy.commit(r.reservation_id, tokens(130))
    assert amounts(bal(tcy, "tenant:acme")) == (100, 100, 0, 30, -30)
    clock.at(2026, 3, 29, 1, tz=BERLIN)
    assert amounts(bal(tcy, "tenant:acme")) == (100, 30, 0, 0, 70)
    spend(tcy, 70)


def test_idle_periods_repay_debt_as_if_crossed_one_at_a_time(tcy: Cycles, clock: Clock) -> None:
    """Nobody reads or writes on 3/29: the budget on 3/30 is what two boundaries give, and the
    first write there makes it so for good (reads alone never change a budget)."""
    tcy.budgets.set("tenant:acme", tokens(100), period="day", timezone=BERLIN, overdraft_limit=tokens(500))
    r = tcy.reserve(ACME, LLM, tokens(100), overage_policy=CommitOveragePolicy.ALLOW_WITH_OVERDRAFT)
    assert r.reservation_id
    tcy.commit(r.reservation_id, tokens(250))
    clock.at(2026, 3, 30, 1, tz=BERLIN)
    assert amounts(bal(tcy, "tenant:acme")) == (100, 50, 0, 0, 50)
    assert amounts(bal(tcy, "tenant:acme")) == (100, 50, 0, 0, 50)  # the read changed nothing
    spend(tcy, 50)
    assert amounts(bal(tcy, "tenant:acme")) == (100, 100, 0, 0, 0)


def test_more_debt_than_an_allocation_stays_debt(tcy: Cycles, clock: Clock) -> None:
    tcy.budgets.set("tenant:acme", tokens(100), period="day", timezone=BERLIN, overdraft_limit=tokens(500))
    r = tcy.reserve(ACME, LLM, tokens(100), overage_policy=CommitOveragePolicy.ALLOW_WITH_OVERDRAFT)
    assert r.reservation_id
    tcy.commit(r.reservation_id, tokens(250))
    clock.at(2026, 3, 29, 1, tz=BERLIN)
    assert amounts(bal(tcy, "tenant:acme")) == (100, 100, 0, 50, -50)
    clock.at(2026, 3, 30, 1, tz=BERLIN)
    assert amounts(bal(tcy, "tenant:acme")) == (100, 50, 0, 0, 50)


def test_funding_tops_up_this_period_and_setting_again_keeps_the_window(tcy: Cycles, clock: Clock) -> None:
    tcy.budgets.set("tenant:acme", tokens(100), period="day", timezone=BERLIN)
    spend(tcy, 30)
    tcy.budgets.fund("tenant:acme", tokens(50))
    assert amounts(bal(tcy, "tenant:acme")) == (150, 30, 0, 0, 120)
    clock.advance(HOUR)
    b = tcy.budgets.set("tenant:acme", tokens(200), period="day", timezone=BERLIN)
    assert (b.period_start, b.period_end) == ("2026-03-27T23:00:00Z", "2026-03-28T23:00:00Z")
    clock.at(2026, 3, 29, 9, tz=BERLIN)
    assert amounts(bal(tcy, "tenant:acme")) == (200, 0, 0, 0, 200)  # the new allocation, every day
    b = tcy.budgets.set("tenant:acme", tokens(200), period="none")
    assert b.period_start is None
    spend(tcy, 5)
    clock.at(2026, 4, 9, tz=BERLIN)
    assert amounts(bal(tcy, "tenant:acme")) == (200, 5, 0, 0, 195)


def test_child_and_parent_periods_roll_independently(tcy: Cycles, clock: Clock) -> None:
    tcy.budgets.set("tenant:acme", tokens(1000), period="month", timezone=BERLIN)
    tcy.budgets.set("tenant:acme/workflow:w", tokens(100), period="day", timezone=BERLIN)
    sub = Subject(tenant="acme", workflow="w")
    spend(tcy, 100, sub)
    with pytest.raises(BudgetExceeded):
        tcy.reserve(sub, LLM, tokens(1))
    clock.at(2026, 3, 29, 8, tz=BERLIN)
    spend(tcy, 100, sub)
    assert amounts(bal(tcy, "tenant:acme")) == (1000, 200, 0, 0, 800)
    assert amounts(bal(tcy, "tenant:acme/workflow:w")) == (100, 100, 0, 0, 0)
    assert {b.scope: b.period_end for b in tcy.budgets.list(tenant="acme")} == {
        "tenant:acme": "2026-03-31T22:00:00Z",
        "tenant:acme/workflow:w": "2026-03-29T22:00:00Z",
    }


@pytest.mark.parametrize(
    "kwargs",
    [
        {"period": "fortnight"},
        {"period": "0s"},
        {"period": "10x"},
        {"period": "day", "timezone": "Mars/Olympus"},
        {"period": "12h", "timezone": BERLIN},
        {"period": "day", "rollover_policy": "SOMETIMES"},
        {"timezone": BERLIN},
    ],
)
def test_bad_periods_are_refused_and_write_nothing(tcy: Cycles, kwargs: dict[str, str]) -> None:
    with pytest.raises(InvalidRequest):
        tcy.budgets.set("tenant:acme", tokens(100), **kwargs)  # type: ignore[arg-type]
    with pytest.raises(NotFound):
        tcy.budgets.get("tenant:acme")


def test_a_boundary_rolls_over_exactly_once_under_concurrent_operations(tcy: Cycles, clock: Clock) -> None:
    import threading
    from concurrent.futures import ThreadPoolExecutor

    tcy.budgets.set("tenant:acme", tokens(1000), period="hour", timezone=BERLIN)
    spend(tcy, 500)
    clock.advance(HOUR)  # every thread below is the "first operation after the boundary"
    start = threading.Barrier(8)

    def worker() -> None:
        start.wait()
        for _ in range(5):
            spend(tcy, 1)

    with ThreadPoolExecutor(8) as pool:
        for f in [pool.submit(worker) for _ in range(8)]:
            f.result()
    assert amounts(bal(tcy, "tenant:acme")) == (1000, 40, 0, 0, 960)  # a second roll would have lost spend


def test_runtime_balances_show_the_rolled_over_period(tcy: Cycles, clock: Clock) -> None:
    tcy.budgets.set("tenant:acme", tokens(100), period="day", timezone=BERLIN)
    spend(tcy, 70)
    clock.at(2026, 3, 29, 6, tz=BERLIN)
    (b,) = tcy.balances(tenant="acme")
    assert amounts(b) == (100, 0, 0, 0, 100)
    assert b.period_start is None  # the protocol's Balance has no period fields; the operator plane does
