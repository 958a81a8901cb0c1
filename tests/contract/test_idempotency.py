"""Idempotency per (tenant, endpoint, key): replays return the original, mismatches are refused."""

from __future__ import annotations

import time

import pytest

from cycles import Cycles, IdempotencyMismatch, Subject, tokens

from .helpers import LLM, amounts, bal

ACME = Subject(tenant="acme")


def test_replayed_reserve_returns_the_same_reservation_and_holds_once(cy: Cycles) -> None:
    cy.budgets.set("tenant:acme", tokens(100))
    a = cy.reserve(ACME, LLM, tokens(10), idempotency_key="step-1")
    time.sleep(0.01)
    b = cy.reserve(ACME, LLM, tokens(10), idempotency_key="step-1")
    assert a.reservation_id == b.reservation_id
    assert a.expires_at_ms == b.expires_at_ms
    assert b.remaining_ttl_ms is not None and a.remaining_ttl_ms is not None
    assert b.remaining_ttl_ms <= a.remaining_ttl_ms  # recomputed, not copied
    assert bal(cy, "tenant:acme").reserved == tokens(10)


def test_same_key_different_payload_is_a_mismatch(cy: Cycles) -> None:
    cy.budgets.set("tenant:acme", tokens(100))
    cy.reserve(ACME, LLM, tokens(10), idempotency_key="k")
    with pytest.raises(IdempotencyMismatch) as err:
        cy.reserve(ACME, LLM, tokens(11), idempotency_key="k")
    assert err.value.http_status == 409
    assert bal(cy, "tenant:acme").reserved == tokens(10)


def test_keys_are_scoped_per_endpoint(cy: Cycles) -> None:
    cy.budgets.set("tenant:acme", tokens(100))
    r = cy.reserve(ACME, LLM, tokens(10), idempotency_key="same")
    assert r.reservation_id
    cy.commit(r.reservation_id, tokens(4), idempotency_key="same")
    cy.event(ACME, LLM, tokens(1), idempotency_key="same")
    assert amounts(bal(cy, "tenant:acme")) == (100, 5, 0, 0, 95)


def test_replayed_commit_charges_once(cy: Cycles) -> None:
    cy.budgets.set("tenant:acme", tokens(100))
    r = cy.reserve(ACME, LLM, tokens(10))
    assert r.reservation_id
    first = cy.commit(r.reservation_id, tokens(8), idempotency_key="c1")
    again = cy.commit(r.reservation_id, tokens(8), idempotency_key="c1")
    assert first == again
    assert amounts(bal(cy, "tenant:acme")) == (100, 8, 0, 0, 92)
    with pytest.raises(IdempotencyMismatch):
        cy.commit(r.reservation_id, tokens(9), idempotency_key="c1")


def test_replayed_release_and_extend(cy: Cycles) -> None:
    cy.budgets.set("tenant:acme", tokens(100))
    r = cy.reserve(ACME, LLM, tokens(10))
    assert r.reservation_id
    e1 = cy.extend(r.reservation_id, 1000, idempotency_key="x1")
    e2 = cy.extend(r.reservation_id, 1000, idempotency_key="x1")
    assert e1.expires_at_ms == e2.expires_at_ms  # applied once
    rel1 = cy.release(r.reservation_id, idempotency_key="r1")
    rel2 = cy.release(r.reservation_id, idempotency_key="r1")
    assert rel1 == rel2
    assert amounts(bal(cy, "tenant:acme")) == (100, 0, 0, 0, 100)
    e3 = cy.extend(r.reservation_id, 1000, idempotency_key="x1")
    assert e3.remaining_ttl_ms == 0  # replay after release: the lease is no longer active


def test_replayed_event_applies_once(cy: Cycles) -> None:
    cy.budgets.set("tenant:acme", tokens(100))
    a = cy.event(ACME, LLM, tokens(7), idempotency_key="e")
    b = cy.event(ACME, LLM, tokens(7), idempotency_key="e")
    assert a.event_id == b.event_id
    assert amounts(bal(cy, "tenant:acme")) == (100, 7, 0, 0, 93)


def test_keys_are_scoped_per_tenant(cy: Cycles) -> None:
    cy.budgets.set("tenant:a", tokens(100))
    cy.budgets.set("tenant:b", tokens(100))
    ra = cy.reserve(Subject(tenant="a"), LLM, tokens(10), idempotency_key="shared")
    rb = cy.reserve(Subject(tenant="b"), LLM, tokens(20), idempotency_key="shared")
    assert ra.reservation_id != rb.reservation_id
    assert bal(cy, "tenant:b").reserved == tokens(20)


def test_metadata_key_order_does_not_make_a_mismatch(cy: Cycles) -> None:
    """Payloads compare as canonical JSON: the same metadata in another key order is the same request."""
    cy.budgets.set("tenant:acme", tokens(100))
    a = cy.reserve(ACME, LLM, tokens(10), idempotency_key="m", metadata={"a": 1, "b": {"x": 1, "y": 2}})
    b = cy.reserve(ACME, LLM, tokens(10), idempotency_key="m", metadata={"b": {"y": 2, "x": 1}, "a": 1})
    assert a.reservation_id == b.reservation_id
    with pytest.raises(IdempotencyMismatch):
        cy.reserve(ACME, LLM, tokens(10), idempotency_key="m", metadata={"a": 2, "b": {"x": 1, "y": 2}})
    assert bal(cy, "tenant:acme").reserved == tokens(10)
