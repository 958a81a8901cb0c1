"""Leases are bounded: a heartbeat stops at ``max_lease_ms``, when its guard is dropped, or (async)
when the task that started it is gone; a warning names the reservation, which then expires."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable

import pytest

from cycles import Action, AsyncCycles, AsyncGuard, Cycles, InvalidRequest, ReservationExpired, Subject, usd
from cycles.models import ReservationStatus
from cycles.testing import assert_settled

LLM = Action("llm.completion", "gpt-4o-mini")
ACME = Subject(tenant="acme")


def wait_until(check: Callable[[], bool], what: str, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


def is_expired(cy: Cycles, rid: str) -> bool:
    cy.sweep()
    try:
        return cy.get_reservation(rid).status is ReservationStatus.EXPIRED
    except ReservationExpired:  # reading an expired reservation says so
        return True


def warned(caplog: pytest.LogCaptureFixture, *parts: str) -> bool:
    return any(all(p in r.getMessage() for p in parts) for r in caplog.records)


def test_the_heartbeat_stops_at_max_lease_and_the_reservation_expires(caplog: pytest.LogCaptureFixture) -> None:
    cy = Cycles("memory://", ttl_ms=1000, grace_period_ms=0)
    cy.budgets.set("tenant:acme", usd(1))
    with caplog.at_level(logging.WARNING, logger="cycles.guard"):
        g = cy.guard(ACME, LLM, usd(0.1), max_lease_ms=1500).start()
        rid = g.reservation_id or ""
        wait_until(lambda: g.lease_exceeded, "the lease bound")
        assert g.heartbeat_errors == [] and warned(caplog, rid, "max_lease_ms=1500")
        wait_until(lambda: is_expired(cy, rid), "the reservation to expire")
    g.commit(usd(0.04))
    g.finish()  # the spend still happened: recorded as an event, not lost
    assert g.charged == usd(0.04)
    assert_settled(cy, "tenant:acme", usd(0.04))


def test_a_dropped_guard_stops_beating(caplog: pytest.LogCaptureFixture) -> None:
    cy = Cycles("memory://", ttl_ms=1000, grace_period_ms=0)
    cy.budgets.set("tenant:acme", usd(1))
    with caplog.at_level(logging.WARNING, logger="cycles.guard"):
        g = cy.guard(ACME, LLM, usd(0.1)).start()
        rid = g.reservation_id or ""
        del g
        gc.collect()
        wait_until(lambda: warned(caplog, rid, "its guard is gone"), "the heartbeat to notice")
    wait_until(lambda: is_expired(cy, rid), "the reservation to expire")


async def test_an_async_heartbeat_stops_with_the_task_that_started_it(caplog: pytest.LogCaptureFixture) -> None:
    acy = AsyncCycles("memory://", ttl_ms=1000, grace_period_ms=0)
    await acy.budgets.set("tenant:acme", usd(1))

    async def leak() -> AsyncGuard:
        return await acy.guard(ACME, LLM, usd(0.1)).start()  # a callback that never settles

    with caplog.at_level(logging.WARNING, logger="cycles.guard"):
        g = await asyncio.create_task(leak())
        rid = g.reservation_id or ""
        deadline = time.monotonic() + 20
        while not warned(caplog, rid, "the task that started it has ended"):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
    await g.fail()
    await acy.aclose()


def test_lease_options_are_validated() -> None:
    cy = Cycles("memory://")
    with pytest.raises(InvalidRequest):
        cy.guard(ACME, LLM, usd(0.1), max_lease_ms=10)
    with pytest.raises(InvalidRequest):
        cy.guard(ACME, LLM, usd(0.1), on_failure="maybe")  # type: ignore[arg-type]
    assert cy.guard(ACME, LLM, usd(0.1), max_lease_ms=0) is not None  # 0: no bound
