"""Balances and reservation queries, pagination, and the operator plane."""

from __future__ import annotations

import pytest

from cycles import Cycles, InvalidRequest, NotFound, ReservationStatus, Subject, Unit, tokens, usd

from .helpers import LLM, amounts


def test_balances_filter_by_subject_levels(cy: Cycles) -> None:
    cy.budgets.set("tenant:acme", usd(10))
    cy.budgets.set("tenant:acme/workflow:a", usd(1))
    cy.budgets.set("tenant:acme/workflow:b", usd(2))
    cy.budgets.set("tenant:other", usd(3))
    scopes = [b.scope for b in cy.balances(tenant="acme")]
    assert scopes == ["tenant:acme", "tenant:acme/workflow:a", "tenant:acme/workflow:b"]
    assert [b.scope for b in cy.balances(tenant="acme", workflow="b")] == ["tenant:acme/workflow:b"]
    for b in cy.balances(tenant="acme"):
        assert b.scope_path == b.scope and b.invariant_holds()


def test_balances_need_a_filter(cy: Cycles) -> None:
    with pytest.raises(InvalidRequest):
        cy.balances()


def test_balances_paginate(cy: Cycles) -> None:
    from cycles.ledger.base import BalanceQuery

    for i in range(7):
        cy.budgets.set(f"tenant:acme/agent:a{i}", tokens(i + 1))
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        page = cy.ledger.balances(BalanceQuery(tenant="acme", limit=3, cursor=cursor))
        seen += [b.scope for b in page.balances]
        pages += 1
        cursor = page.next_cursor
        assert page.has_more is (cursor is not None)
        if not cursor:
            break
    assert pages == 3 and len(seen) == 7 == len(set(seen))
    with pytest.raises(InvalidRequest):
        cy.ledger.balances(BalanceQuery(tenant="acme", limit=3, cursor="garbage!"))


def test_list_reservations_filters_and_pages(cy: Cycles) -> None:
    cy.budgets.set("tenant:acme", tokens(1000))
    ids = []
    for i in range(5):
        r = cy.reserve(Subject(tenant="acme", agent=f"a{i % 2}"), LLM, tokens(10), idempotency_key=f"k{i}")
        assert r.reservation_id
        ids.append(r.reservation_id)
    cy.commit(ids[0], tokens(5))
    active = cy.list_reservations(tenant="acme", status=ReservationStatus.ACTIVE)
    assert sorted(r.reservation_id for r in active.reservations) == sorted(ids[1:])
    by_key = cy.list_reservations(tenant="acme", idempotency_key="k3")
    assert [r.reservation_id for r in by_key.reservations] == [ids[3]]
    agent0 = cy.list_reservations(tenant="acme", agent="a0")
    assert len(agent0.reservations) == 3
    committed = cy.list_reservations(tenant="acme", status="COMMITTED").reservations
    assert committed[0].committed == tokens(5) and committed[0].finalized_at_ms
    page1 = cy.list_reservations(tenant="acme", limit=2, sort_by="created_at_ms", sort_dir="asc")
    assert page1.has_more and page1.next_cursor
    page2 = cy.list_reservations(
        tenant="acme", limit=2, sort_by="created_at_ms", sort_dir="asc", cursor=page1.next_cursor
    )
    assert not {r.reservation_id for r in page1.reservations} & {r.reservation_id for r in page2.reservations}
    with pytest.raises(InvalidRequest):  # a cursor is bound to its filters
        cy.list_reservations(tenant="acme", limit=2, status="ACTIVE", cursor=page1.next_cursor)


def test_reservation_detail_round_trips_subject_action_and_metadata(cy: Cycles) -> None:
    cy.budgets.set("tenant:acme", tokens(100))
    s = Subject(tenant="acme", workflow="w", dimensions={"cost_center": "r-and-d"})
    r = cy.reserve(s, LLM, tokens(10), metadata={"step": 3})
    assert r.reservation_id
    d = cy.get_reservation(r.reservation_id)
    assert d.subject == s and d.action == LLM and d.reserved == tokens(10)
    assert d.metadata == {"step": 3}
    assert d.affected_scopes == ["tenant:acme", "tenant:acme/workflow:w"]
    cy.commit(r.reservation_id, tokens(2), metadata={"outcome": "ok"})
    assert cy.get_reservation(r.reservation_id).committed_metadata == {"outcome": "ok"}


def test_budget_admin_set_fund_get_list(cy: Cycles) -> None:
    b = cy.budgets.set("tenant:acme", usd(5))
    assert amounts(b) == (5 * 10**8, 0, 0, 0, 5 * 10**8)
    b = cy.budgets.fund("tenant:acme", usd(1))
    assert b.allocated == usd(6)
    cy.budgets.set("tenant:acme", tokens(10))
    assert cy.budgets.get("tenant:acme", Unit.TOKENS).allocated == tokens(10)
    assert {b.remaining.unit for b in cy.budgets.list(tenant="acme")} == {Unit.TOKENS, Unit.USD_MICROCENTS}
    cy.budgets.set("tenant:zeta", usd(1))
    assert [b.scope for b in cy.budgets.list(tenant="zeta")] == ["tenant:zeta"]
    with pytest.raises(NotFound):
        cy.budgets.get("tenant:nope")
    with pytest.raises(NotFound):
        cy.budgets.fund("tenant:nope", usd(1))


@pytest.mark.parametrize(
    "scope",
    ["", "acme", "tenant:", "tenant:a b", "workflow:x/tenant:y", "tenant:a/tenant:b", "planet:earth", "tenant:a/"],
)
def test_bad_budget_ids_are_invalid_requests(cy: Cycles, scope: str) -> None:
    with pytest.raises(InvalidRequest):
        cy.budgets.set(scope, usd(1))
    assert cy.budgets.list() == []


def test_bad_client_input_is_a_typed_error_and_changes_nothing(cy: Cycles) -> None:
    cy.budgets.set("tenant:acme", tokens(100))
    r = cy.reserve(Subject(tenant="acme"), LLM, tokens(10))
    assert r.reservation_id
    for bad in (
        lambda: cy.extend(r.reservation_id or "", -5),
        lambda: cy.reserve(Subject(tenant="acme"), LLM, tokens(1), ttl_ms=5),
        lambda: cy.reserve(Subject(tenant="acme"), LLM, tokens(1), idempotency_key="x" * 10_000),
        lambda: cy.commit(r.reservation_id or "", tokens(1), metrics={"tokens_input": -1}),
        lambda: cy.list_reservations(limit=0),
    ):
        with pytest.raises(InvalidRequest):
            bad()
    assert amounts(cy.budgets.get("tenant:acme")) == (100, 0, 10, 0, 90)


def test_every_budget_view_carries_status_and_caps(cy: Cycles) -> None:
    from cycles import Budget, Caps

    caps = Caps(max_tokens=500, tool_denylist=["deploy"])
    made = cy.budgets.set("tenant:acme", usd(5), overdraft_limit=usd(1), caps=caps)
    assert isinstance(made, Budget) and (made.status, made.caps) == ("ACTIVE", caps)
    funded = cy.budgets.fund("tenant:acme", usd(1))
    assert isinstance(funded, Budget) and funded.status == "ACTIVE" and funded.caps == caps
    (frozen,) = cy.budgets.freeze("tenant:acme")
    assert isinstance(frozen, Budget) and frozen.status == "FROZEN"
    for view in (cy.budgets.get("tenant:acme"), *cy.budgets.list(), *cy.budgets.list(tenant="acme")):
        assert isinstance(view, Budget) and (view.status, view.caps) == ("FROZEN", caps)
        assert view.overdraft_limit == usd(1) and view.to_wire()["status"] == "FROZEN"
    (closed,) = cy.budgets.close("tenant:acme")
    assert isinstance(closed, Budget) and closed.status == "CLOSED"
    # The runtime plane's Balance stays the protocol's shape: no status, no caps on the wire.
    (runtime,) = cy.balances(tenant="acme")
    assert "status" not in runtime.to_wire() and "caps" not in runtime.to_wire()
