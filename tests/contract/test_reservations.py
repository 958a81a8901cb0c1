"""Reserve / commit / release, scope derivation and denials: the heart of the protocol."""

from __future__ import annotations

import pytest

from cycles import (
    BudgetExceeded,
    Cycles,
    Decision,
    NotFound,
    ReservationFinalized,
    ReservationStatus,
    Subject,
    UnitMismatch,
    risk_points,
    tokens,
    usd,
)

from .helpers import LLM, amounts, bal


def test_reserve_holds_the_estimate_on_every_budgeted_scope(cy: Cycles) -> None:
    cy.budgets.set("tenant:acme", usd(50))
    cy.budgets.set("tenant:acme/workflow:run-42", usd(1))
    r = cy.reserve(Subject(tenant="acme", workflow="run-42", agent="writer"), LLM, usd(0.05))
    assert r.decision is Decision.ALLOW and r.reservation_id
    assert r.affected_scopes == [
        "tenant:acme",
        "tenant:acme/workflow:run-42",
        "tenant:acme/workflow:run-42/agent:writer",
    ]
    assert r.scope_path == "tenant:acme/workflow:run-42/agent:writer"
    assert amounts(bal(cy, "tenant:acme")) == (50 * 10**8, 0, 5_000_000, 0, 50 * 10**8 - 5_000_000)
    assert amounts(bal(cy, "tenant:acme/workflow:run-42")) == (10**8, 0, 5_000_000, 0, 95_000_000)
    assert r.expires_at_ms and r.remaining_ttl_ms and 0 < r.remaining_ttl_ms <= 60_000


def test_commit_charges_actual_and_returns_the_rest_to_every_scope(cy: Cycles) -> None:
    cy.budgets.set("tenant:acme", usd(50))
    cy.budgets.set("tenant:acme/workflow:run-42", usd(1))
    r = cy.reserve(Subject(tenant="acme", workflow="run-42"), LLM, usd(0.05))
    assert r.reservation_id
    c = cy.commit(r.reservation_id, usd(0.031))
    assert c.status == "COMMITTED"
    assert c.charged == usd(0.031)
    assert c.released == usd(0.019)
    assert amounts(bal(cy, "tenant:acme/workflow:run-42")) == (10**8, 3_100_000, 0, 0, 96_900_000)
    assert amounts(bal(cy, "tenant:acme")) == (50 * 10**8, 3_100_000, 0, 0, 50 * 10**8 - 3_100_000)
    detail = cy.get_reservation(r.reservation_id)
    assert detail.status is ReservationStatus.COMMITTED
    assert detail.committed == usd(0.031) and detail.finalized_at_ms


def test_release_returns_the_whole_reservation(cy: Cycles) -> None:
    cy.budgets.set("tenant:acme", tokens(1000))
    r = cy.reserve(Subject(tenant="acme"), LLM, tokens(400))
    assert r.reservation_id
    rel = cy.release(r.reservation_id, reason="tool failed")
    assert rel.status == "RELEASED" and rel.released == tokens(400)
    assert amounts(bal(cy, "tenant:acme")) == (1000, 0, 0, 0, 1000)
    assert cy.get_reservation(r.reservation_id).status is ReservationStatus.RELEASED


def test_gaps_are_skipped_and_scopes_without_budget_are_skipped(cy: Cycles) -> None:
    cy.budgets.set("tenant:t/agent:a", tokens(10))
    # "tenant:t/agent:a" is not a derived scope of a subject that has an app: nothing budgeted -> 404
    with pytest.raises(NotFound):
        cy.reserve(Subject(tenant="t", app="x", agent="a"), LLM, tokens(4))
    r = cy.reserve(Subject(tenant="t", agent="a"), LLM, tokens(4))
    assert r.affected_scopes == ["tenant:t", "tenant:t/agent:a"]  # the gap (app) is skipped
    cy.budgets.set("tenant:t", tokens(100))
    r2 = cy.reserve(Subject(tenant="t", app="x", agent="a"), LLM, tokens(4))
    assert r2.affected_scopes == ["tenant:t", "tenant:t/app:x", "tenant:t/app:x/agent:a"]
    # only r2 holds on tenant:t: r was taken before tenant:t had a budget and settles what it held
    assert amounts(bal(cy, "tenant:t")) == (100, 0, 4, 0, 96)
    assert amounts(bal(cy, "tenant:t/agent:a")) == (10, 0, 4, 0, 6)


def test_no_budget_anywhere_is_not_found(cy: Cycles) -> None:
    with pytest.raises(NotFound) as err:
        cy.reserve(Subject(tenant="nobody"), LLM, usd(1))
    assert err.value.code == "NOT_FOUND" and err.value.http_status == 404


def test_budget_in_another_unit_is_unit_mismatch_with_details(cy: Cycles) -> None:
    cy.budgets.set("tenant:acme", usd(5))
    with pytest.raises(UnitMismatch) as err:
        cy.reserve(Subject(tenant="acme"), LLM, tokens(5))
    assert err.value.details["scope"] == "tenant:acme"
    assert err.value.details["requested_unit"] == "TOKENS"
    assert err.value.details["expected_units"] == ["USD_MICROCENTS"]


def test_denial_names_the_scope_and_changes_nothing(cy: Cycles) -> None:
    cy.budgets.set("tenant:acme", usd(50))
    cy.budgets.set("tenant:acme/workflow:w", usd(0.10))
    before = [amounts(b) for b in cy.budgets.list()]
    with pytest.raises(BudgetExceeded) as err:
        cy.reserve(Subject(tenant="acme", workflow="w"), LLM, usd(0.11))
    assert err.value.details["scope"] == "tenant:acme/workflow:w"
    assert err.value.code == "BUDGET_EXCEEDED" and err.value.http_status == 409
    assert [amounts(b) for b in cy.budgets.list()] == before


def test_reservation_is_atomic_across_scopes(cy: Cycles) -> None:
    """The parent has room, the child does not: nothing is held anywhere."""
    cy.budgets.set("tenant:acme", usd(100))
    cy.budgets.set("tenant:acme/agent:a", usd(1))
    cy.reserve(Subject(tenant="acme", agent="a"), LLM, usd(0.6))
    with pytest.raises(BudgetExceeded):
        cy.reserve(Subject(tenant="acme", agent="a"), LLM, usd(0.6))
    assert bal(cy, "tenant:acme").reserved == usd(0.6)


def test_separate_units_are_separate_budgets(cy: Cycles) -> None:
    cy.budgets.set("tenant:acme", usd(1))
    cy.budgets.set("tenant:acme", risk_points(100))
    cy.reserve(Subject(tenant="acme"), LLM, risk_points(60))
    with pytest.raises(BudgetExceeded):
        cy.reserve(Subject(tenant="acme"), LLM, risk_points(60))
    cy.reserve(Subject(tenant="acme"), LLM, usd(0.5))
    units = {b.remaining.unit.value: b.remaining.amount for b in cy.budgets.list()}
    assert units == {"RISK_POINTS": 40, "USD_MICROCENTS": 50_000_000}


def test_finalized_reservations_refuse_further_settlement(cy: Cycles) -> None:
    cy.budgets.set("tenant:acme", tokens(100))
    r = cy.reserve(Subject(tenant="acme"), LLM, tokens(10))
    assert r.reservation_id
    cy.commit(r.reservation_id, tokens(5))
    with pytest.raises(ReservationFinalized):
        cy.commit(r.reservation_id, tokens(5))
    with pytest.raises(ReservationFinalized):
        cy.release(r.reservation_id)
    with pytest.raises(ReservationFinalized):
        cy.extend(r.reservation_id, 1000)
    r2 = cy.reserve(Subject(tenant="acme"), LLM, tokens(10))
    assert r2.reservation_id
    cy.release(r2.reservation_id)
    with pytest.raises(ReservationFinalized):
        cy.commit(r2.reservation_id, tokens(1))
    assert amounts(bal(cy, "tenant:acme")) == (100, 5, 0, 0, 95)


def test_unknown_reservation_is_not_found(cy: Cycles) -> None:
    for op in (
        lambda: cy.commit("rsv_nope", tokens(1)),
        lambda: cy.release("rsv_nope"),
        lambda: cy.extend("rsv_nope", 1000),
        lambda: cy.get_reservation("rsv_nope"),
    ):
        with pytest.raises(NotFound):
            op()


def test_commit_in_another_unit_is_unit_mismatch(cy: Cycles) -> None:
    cy.budgets.set("tenant:acme", tokens(100))
    r = cy.reserve(Subject(tenant="acme"), LLM, tokens(10))
    assert r.reservation_id
    with pytest.raises(UnitMismatch):
        cy.commit(r.reservation_id, usd(0.01))
    assert bal(cy, "tenant:acme").reserved == tokens(10)


def test_dry_run_evaluates_without_holding_anything(cy: Cycles) -> None:
    cy.budgets.set("tenant:acme", usd(1))
    ok = cy.reserve(Subject(tenant="acme"), LLM, usd(0.5), dry_run=True)
    assert ok.decision is Decision.ALLOW
    assert ok.reservation_id is None and ok.expires_at_ms is None and ok.remaining_ttl_ms is None
    assert ok.affected_scopes == ["tenant:acme"]
    no = cy.reserve(Subject(tenant="acme"), LLM, usd(5), dry_run=True)
    assert no.decision is Decision.DENY and no.reason_code == "BUDGET_EXCEEDED"
    assert no.affected_scopes == ["tenant:acme"]
    missing = cy.reserve(Subject(tenant="ghost"), LLM, usd(5), dry_run=True)
    assert missing.decision is Decision.DENY and missing.reason_code == "BUDGET_NOT_FOUND"
    assert amounts(bal(cy, "tenant:acme")) == (10**8, 0, 0, 0, 10**8)
    assert cy.list_reservations(tenant="acme").reservations == []


def test_caps_come_back_as_allow_with_caps(cy: Cycles) -> None:
    from cycles import Caps

    cy.budgets.set("tenant:acme", usd(10), caps=Caps(tool_denylist=["deploy"], max_tokens=512))
    cy.budgets.set("tenant:acme/agent:a", usd(1), caps=Caps(max_tokens=256, tool_denylist=["email"]))
    r = cy.reserve(Subject(tenant="acme", agent="a"), LLM, usd(0.1))
    assert r.decision is Decision.ALLOW_WITH_CAPS
    assert r.caps is not None
    assert r.caps.max_tokens == 256
    assert sorted(r.caps.tool_denylist or []) == ["deploy", "email"]
    plain = cy.reserve(Subject(tenant="acme", workflow="x"), LLM, usd(0.1))
    assert plain.decision is Decision.ALLOW_WITH_CAPS  # the tenant's caps apply below it too
    cy.budgets.set("tenant:other", usd(1))
    free = cy.reserve(Subject(tenant="other"), LLM, usd(0.1))
    assert free.decision is Decision.ALLOW and free.caps is None
