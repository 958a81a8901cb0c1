"""TTL, grace period, extension and expiry (lazily on access and by a sweep)."""

from __future__ import annotations

import time

import pytest

from cycles import (
    Cycles,
    MaxExtensionsExceeded,
    ReservationExpired,
    ReservationStatus,
    Subject,
    tokens,
)

from .helpers import LLM, amounts, bal

ACME = Subject(tenant="acme")


def _short(cy: Cycles, grace_ms: int = 0) -> str:
    r = cy.reserve(ACME, LLM, tokens(10), ttl_ms=1000, grace_period_ms=grace_ms)
    assert r.reservation_id
    return r.reservation_id


def test_commit_within_grace_succeeds(cy: Cycles) -> None:
    cy.budgets.set("tenant:acme", tokens(100))
    rid = _short(cy, grace_ms=3000)
    time.sleep(1.2)
    cy.commit(rid, tokens(7))
    assert amounts(bal(cy, "tenant:acme")) == (100, 7, 0, 0, 93)


def test_commit_after_grace_is_expired_and_the_hold_is_returned(cy: Cycles) -> None:
    cy.budgets.set("tenant:acme", tokens(100))
    rid = _short(cy)
    time.sleep(1.15)
    with pytest.raises(ReservationExpired) as err:
        cy.commit(rid, tokens(7))
    assert err.value.http_status == 410
    assert amounts(bal(cy, "tenant:acme")) == (100, 0, 0, 0, 100)
    with pytest.raises(ReservationExpired):
        cy.release(rid)
    with pytest.raises(ReservationExpired):
        cy.get_reservation(rid)
    rows = cy.list_reservations(tenant="acme", status="EXPIRED").reservations
    assert [r.reservation_id for r in rows] == [rid]


def test_sweep_reclaims_abandoned_reservations_without_a_client(cy: Cycles) -> None:
    cy.budgets.set("tenant:acme", tokens(100))
    for _ in range(3):
        _short(cy)
    assert bal(cy, "tenant:acme").reserved == tokens(30)
    time.sleep(1.15)
    assert cy.sweep() == 3
    assert amounts(bal(cy, "tenant:acme")) == (100, 0, 0, 0, 100)
    assert cy.sweep() == 0


def test_a_denied_reserve_first_reclaims_expired_holds(cy: Cycles) -> None:
    cy.budgets.set("tenant:acme", tokens(10))
    _short(cy)
    time.sleep(1.15)
    r = cy.reserve(ACME, LLM, tokens(10))  # fits only once the dead reservation is gone
    assert r.reservation_id


def test_extend_moves_expiry_relative_to_current_expiry(cy: Cycles) -> None:
    cy.budgets.set("tenant:acme", tokens(100))
    r = cy.reserve(ACME, LLM, tokens(10), ttl_ms=1000, grace_period_ms=0)
    assert r.reservation_id and r.expires_at_ms
    e = cy.extend(r.reservation_id, 2000)
    assert e.status == "ACTIVE" and e.expires_at_ms == r.expires_at_ms + 2000
    assert e.remaining_ttl_ms is not None and 1500 < e.remaining_ttl_ms <= 3000
    time.sleep(1.2)
    cy.commit(r.reservation_id, tokens(3))  # alive thanks to the extension
    assert amounts(bal(cy, "tenant:acme")) == (100, 3, 0, 0, 97)


def test_extend_after_expiry_is_refused(cy: Cycles) -> None:
    cy.budgets.set("tenant:acme", tokens(100))
    rid = _short(cy, grace_ms=5000)
    time.sleep(1.15)
    with pytest.raises(ReservationExpired):  # extend is strict on expires_at, not the grace
        cy.extend(rid, 1000)
    cy.commit(rid, tokens(1))  # ... while commit still has its grace period


def test_extensions_are_bounded(cy: Cycles) -> None:
    cy.budgets.set("tenant:acme", tokens(100))
    r = cy.reserve(ACME, LLM, tokens(10))
    assert r.reservation_id
    with pytest.raises(MaxExtensionsExceeded):
        for _ in range(100):
            cy.extend(r.reservation_id, 1000)
    assert cy.get_reservation(r.reservation_id).status is ReservationStatus.ACTIVE
