"""Priority headroom: a reservation tagged ``priority:<p>`` is granted only if each budget on its
path keeps p's share of its allocation afterwards (critical 0%, high 10%, normal 25%, low 50%,
bulk 70%), so background work cannot starve critical work. Untagged reservations have none."""

from __future__ import annotations

import pytest

from cycles import Action, BudgetExceeded, Cycles, Decision, InvalidRequest, Subject, tokens
from cycles.errors import PriorityHeadroomExceeded

from .helpers import amounts, bal

ACME = Subject(tenant="acme")


def act(priority: str | None) -> Action:
    return Action("llm.completion", "m", tags=[f"priority:{priority}"] if priority else None)


def test_low_priority_stops_once_less_than_half_would_remain(cy: Cycles) -> None:
    cy.budgets.set("tenant:acme", tokens(100))
    cy.reserve(ACME, act("low"), tokens(40))  # 60 left >= 50
    with pytest.raises(PriorityHeadroomExceeded) as err:
        cy.reserve(ACME, act("low"), tokens(20))  # would leave 40 < 50
    assert isinstance(err.value, BudgetExceeded) and err.value.reason_code == "PRIORITY_HEADROOM"
    detail = err.value.deny_detail
    assert detail["reason_code"] == "PRIORITY_HEADROOM" and detail["blocked_by_scope"] == "tenant:acme"
    assert detail["budget_remaining"] == 60 and "priority" in detail["suggested_fix"]
    with pytest.raises(PriorityHeadroomExceeded):
        cy.reserve(ACME, act("bulk"), tokens(1))  # bulk keeps 70%
    cy.reserve(ACME, act("normal"), tokens(35))  # 25 left >= 25
    cy.reserve(ACME, act("high"), tokens(15))  # 10 left >= 10
    with pytest.raises(PriorityHeadroomExceeded):
        cy.reserve(ACME, act("high"), tokens(1))
    cy.reserve(ACME, act("critical"), tokens(10))  # critical may take the last of it
    assert amounts(bal(cy, "tenant:acme")) == (100, 0, 100, 0, 0)


def test_headroom_holds_on_every_budget_of_the_path_and_untagged_work_has_none(cy: Cycles) -> None:
    cy.budgets.set("tenant:acme", tokens(1000))
    cy.budgets.set("tenant:acme/workflow:w", tokens(100))
    sub = Subject(tenant="acme", workflow="w")
    cy.reserve(sub, act(None), tokens(60))
    with pytest.raises(PriorityHeadroomExceeded) as err:
        cy.reserve(sub, act("low"), tokens(1))  # the workflow has 40 of 100 left
    assert err.value.scope == "tenant:acme/workflow:w"
    dry = cy.reserve(sub, act("low"), tokens(1), dry_run=True)
    assert dry.decision is Decision.DENY and dry.reason_code == "PRIORITY_HEADROOM"
    assert dry.deny_detail is not None and dry.deny_detail["reason_code"] == "PRIORITY_HEADROOM"
    decided = cy.decide(sub, act("normal"), tokens(16))
    assert decided.decision is Decision.DENY and decided.reason_code == "PRIORITY_HEADROOM"
    assert cy.decide(sub, act("normal"), tokens(15)).decision is Decision.ALLOW
    cy.reserve(sub, act(None), tokens(40))


def test_an_unknown_priority_is_a_bad_request(cy: Cycles) -> None:
    cy.budgets.set("tenant:acme", tokens(100))
    with pytest.raises(InvalidRequest, match="priority"):
        cy.reserve(ACME, act("urgent"), tokens(1))
