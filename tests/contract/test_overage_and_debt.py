"""Commit overage policies, debt, over-limit and funding (the spec's OVERDRAFT sections)."""

from __future__ import annotations

import pytest

from cycles import (
    BudgetExceeded,
    CommitOveragePolicy,
    Cycles,
    DebtOutstanding,
    Decision,
    OverdraftLimitExceeded,
    Subject,
    tokens,
)

from .helpers import LLM, amounts, bal

ACME = Subject(tenant="acme")


def _reserve(cy: Cycles, n: int, policy: CommitOveragePolicy) -> str:
    r = cy.reserve(ACME, LLM, tokens(n), overage_policy=policy)
    assert r.reservation_id
    return r.reservation_id


def test_reject_policy_refuses_overage_and_keeps_the_reservation(cy: Cycles) -> None:
    cy.budgets.set("tenant:acme", tokens(1000))
    rid = _reserve(cy, 100, CommitOveragePolicy.REJECT)
    with pytest.raises(BudgetExceeded):
        cy.commit(rid, tokens(150))
    assert amounts(bal(cy, "tenant:acme")) == (1000, 0, 100, 0, 900)
    cy.commit(rid, tokens(100))
    assert amounts(bal(cy, "tenant:acme")) == (1000, 100, 0, 0, 900)


def test_overage_within_remaining_is_charged_in_full(cy: Cycles) -> None:
    cy.budgets.set("tenant:acme", tokens(1000))
    rid = _reserve(cy, 100, CommitOveragePolicy.ALLOW_IF_AVAILABLE)
    c = cy.commit(rid, tokens(150))
    assert c.charged == tokens(150)
    assert amounts(bal(cy, "tenant:acme")) == (1000, 150, 0, 0, 850)


def test_allow_if_available_caps_the_charge_and_marks_over_limit(cy: Cycles) -> None:
    cy.budgets.set("tenant:acme", tokens(200))
    rid = _reserve(cy, 100, CommitOveragePolicy.ALLOW_IF_AVAILABLE)
    _reserve(cy, 50, CommitOveragePolicy.ALLOW_IF_AVAILABLE)  # leaves 50 remaining
    c = cy.commit(rid, tokens(400))  # delta 300, only 50 available
    assert c.charged == tokens(150)
    b = bal(cy, "tenant:acme")
    assert amounts(b) == (200, 150, 50, 0, 0)
    assert b.is_over_limit is True
    with pytest.raises(OverdraftLimitExceeded):  # over-limit blocks new work until reconciled
        cy.reserve(ACME, LLM, tokens(1))
    d = cy.decide(ACME, LLM, tokens(1))
    assert d.decision is Decision.DENY and d.reason_code == "OVERDRAFT_LIMIT_EXCEEDED"
    cy.budgets.fund("tenant:acme", tokens(100))
    assert bal(cy, "tenant:acme").is_over_limit is False
    cy.reserve(ACME, LLM, tokens(1))


def test_overdraft_creates_debt_up_to_the_limit(cy: Cycles) -> None:
    cy.budgets.set("tenant:acme", tokens(100), overdraft_limit=tokens(50))
    rid = _reserve(cy, 80, CommitOveragePolicy.ALLOW_WITH_OVERDRAFT)
    c = cy.commit(rid, tokens(130))  # 20 from remaining, 30 as debt
    assert c.charged == tokens(130)
    b = bal(cy, "tenant:acme")
    assert amounts(b) == (100, 100, 0, 30, -30)
    assert b.is_over_limit is False
    # remaining is negative: a new reservation cannot fit
    with pytest.raises(BudgetExceeded):
        cy.reserve(ACME, LLM, tokens(1))


def test_overdraft_beyond_the_limit_is_refused_and_changes_nothing(cy: Cycles) -> None:
    cy.budgets.set("tenant:acme", tokens(100), overdraft_limit=tokens(10))
    rid = _reserve(cy, 100, CommitOveragePolicy.ALLOW_WITH_OVERDRAFT)
    with pytest.raises(OverdraftLimitExceeded):
        cy.commit(rid, tokens(150))
    assert amounts(bal(cy, "tenant:acme")) == (100, 0, 100, 0, 0)
    cy.commit(rid, tokens(105))
    assert amounts(bal(cy, "tenant:acme")) == (100, 100, 0, 5, -5)


def test_debt_without_overdraft_limit_blocks_with_debt_outstanding(cy: Cycles) -> None:
    cy.budgets.set("tenant:acme", tokens(100), overdraft_limit=tokens(50))
    rid = _reserve(cy, 100, CommitOveragePolicy.ALLOW_WITH_OVERDRAFT)
    cy.commit(rid, tokens(120))
    cy.budgets.set("tenant:acme", tokens(100), overdraft_limit=tokens(0))
    with pytest.raises(DebtOutstanding):
        cy.reserve(ACME, LLM, tokens(1))
    d = cy.decide(ACME, LLM, tokens(1))
    assert d.decision is Decision.DENY and d.reason_code == "DEBT_OUTSTANDING"


def test_funding_repays_debt_first(cy: Cycles) -> None:
    cy.budgets.set("tenant:acme", tokens(100), overdraft_limit=tokens(50))
    rid = _reserve(cy, 100, CommitOveragePolicy.ALLOW_WITH_OVERDRAFT)
    cy.commit(rid, tokens(140))
    assert amounts(bal(cy, "tenant:acme")) == (100, 100, 0, 40, -40)
    b = cy.budgets.fund("tenant:acme", tokens(30))
    assert amounts(b) == (130, 130, 0, 10, -10)
    b = cy.budgets.fund("tenant:acme", tokens(60))
    assert amounts(b) == (190, 140, 0, 0, 50)
    cy.reserve(ACME, LLM, tokens(50))


def test_overdraft_applies_per_scope(cy: Cycles) -> None:
    cy.budgets.set("tenant:acme", tokens(1000), overdraft_limit=tokens(100))
    cy.budgets.set("tenant:acme/agent:a", tokens(100), overdraft_limit=tokens(100))
    r = cy.reserve(Subject(tenant="acme", agent="a"), LLM, tokens(90), overage_policy="ALLOW_WITH_OVERDRAFT")
    assert r.reservation_id
    cy.commit(r.reservation_id, tokens(150))
    assert amounts(bal(cy, "tenant:acme")) == (1000, 150, 0, 0, 850)
    assert amounts(bal(cy, "tenant:acme/agent:a")) == (100, 100, 0, 50, -50)
