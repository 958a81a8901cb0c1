"""Post-only events and the non-mutating /decide."""

from __future__ import annotations

import pytest

from cycles import (
    BudgetExceeded,
    CommitOveragePolicy,
    Cycles,
    Decision,
    NotFound,
    OverdraftLimitExceeded,
    Subject,
    UnitMismatch,
    tokens,
    usd,
)

from .helpers import LLM, amounts, bal

ACME = Subject(tenant="acme", workflow="w")


def test_event_charges_every_scope_atomically(cy: Cycles) -> None:
    cy.budgets.set("tenant:acme", tokens(1000))
    cy.budgets.set("tenant:acme/workflow:w", tokens(100))
    e = cy.event(ACME, LLM, tokens(30), metrics={"tokens_input": 10, "tokens_output": 20})
    assert e.status == "APPLIED" and e.event_id
    assert amounts(bal(cy, "tenant:acme")) == (1000, 30, 0, 0, 970)
    assert amounts(bal(cy, "tenant:acme/workflow:w")) == (100, 30, 0, 0, 70)


def test_event_reject_policy_refuses_what_does_not_fit(cy: Cycles) -> None:
    cy.budgets.set("tenant:acme/workflow:w", tokens(10))
    with pytest.raises(BudgetExceeded):
        cy.event(ACME, LLM, tokens(11), overage_policy=CommitOveragePolicy.REJECT)
    assert amounts(bal(cy, "tenant:acme/workflow:w")) == (10, 0, 0, 0, 10)


def test_event_allow_if_available_caps_and_flags(cy: Cycles) -> None:
    cy.budgets.set("tenant:acme/workflow:w", tokens(10))
    e = cy.event(ACME, LLM, tokens(25))
    assert e.charged == tokens(10)
    b = bal(cy, "tenant:acme/workflow:w")
    assert amounts(b) == (10, 10, 0, 0, 0) and b.is_over_limit


def test_event_overdraft(cy: Cycles) -> None:
    cy.budgets.set("tenant:acme/workflow:w", tokens(10), overdraft_limit=tokens(5))
    cy.event(ACME, LLM, tokens(14), overage_policy="ALLOW_WITH_OVERDRAFT")
    assert amounts(bal(cy, "tenant:acme/workflow:w")) == (10, 10, 0, 4, -4)
    with pytest.raises(OverdraftLimitExceeded):
        cy.event(ACME, LLM, tokens(2), overage_policy="ALLOW_WITH_OVERDRAFT")


def test_event_without_budget_or_in_wrong_unit(cy: Cycles) -> None:
    with pytest.raises(NotFound):
        cy.event(ACME, LLM, tokens(1))
    cy.budgets.set("tenant:acme", usd(1))
    with pytest.raises(UnitMismatch):
        cy.event(ACME, LLM, tokens(1))


def test_decide_answers_without_mutating(cy: Cycles) -> None:
    cy.budgets.set("tenant:acme/workflow:w", tokens(10))
    ok = cy.decide(ACME, LLM, tokens(10))
    assert ok.decision is Decision.ALLOW
    assert ok.affected_scopes == ["tenant:acme", "tenant:acme/workflow:w"]
    no = cy.decide(ACME, LLM, tokens(11))
    assert no.decision is Decision.DENY and no.reason_code == "BUDGET_EXCEEDED"
    ghost = cy.decide(Subject(tenant="ghost"), LLM, tokens(1))
    assert ghost.decision is Decision.DENY and ghost.reason_code == "BUDGET_NOT_FOUND"
    assert amounts(bal(cy, "tenant:acme/workflow:w")) == (10, 0, 0, 0, 10)


def test_decide_unit_mismatch_is_an_error_not_a_deny(cy: Cycles) -> None:
    cy.budgets.set("tenant:acme", usd(1))
    with pytest.raises(UnitMismatch):
        cy.decide(ACME, LLM, tokens(1))


def test_frozen_and_closed_budgets(cy: Cycles) -> None:
    from cycles import BudgetClosed, BudgetFrozen

    cy.budgets.set("tenant:acme", tokens(100))
    cy.budgets.freeze("tenant:acme")
    with pytest.raises(BudgetFrozen):
        cy.reserve(ACME, LLM, tokens(1))
    assert cy.decide(ACME, LLM, tokens(1)).reason_code == "BUDGET_FROZEN"
    cy.budgets.unfreeze("tenant:acme")
    cy.reserve(ACME, LLM, tokens(1))
    cy.budgets.close("tenant:acme")
    with pytest.raises(BudgetClosed):
        cy.reserve(ACME, LLM, tokens(1))
    with pytest.raises(BudgetClosed):
        cy.budgets.unfreeze("tenant:acme")


def test_a_refused_status_change_changes_no_unit(cy: Cycles) -> None:
    from cycles import BudgetClosed, Unit, credits

    cy.budgets.set("tenant:acme", credits(10))
    cy.budgets.set("tenant:acme", tokens(10))
    cy.budgets.close("tenant:acme", Unit.TOKENS)
    with pytest.raises(BudgetClosed):
        cy.budgets.freeze("tenant:acme")  # TOKENS is closed for good: the whole change is refused
    assert cy.reserve(ACME, LLM, credits(1)).reservation_id  # CREDITS was not frozen on the way
