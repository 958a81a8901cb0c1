"""Deleting a budget (``rules.delete_budget``): on every backend, refused while reserved or in debt
(unless forced), gone from reads and listings afterwards, and never touching another row."""

from __future__ import annotations

import pytest

from cycles import (
    Balance,
    BudgetInUse,
    CommitOveragePolicy,
    Cycles,
    DebtOutstanding,
    InvalidRequest,
    NotFound,
    Subject,
    Unit,
    tokens,
    usd,
)
from cycles.ledger.base import BalanceQuery

from .helpers import LLM, amounts, bal

RUN = "tenant:acme/workflow:run-1"
RUN_SUBJECT = Subject(tenant="acme", workflow="run-1")


def _scopes(cy: Cycles, tenant: str | None = None) -> list[tuple[str, str]]:
    return [(b.scope, _unit(b).value) for b in cy.budgets.list(tenant=tenant)]


def _unit(b: Balance) -> Unit:
    assert b.allocated is not None
    return b.allocated.unit


def test_delete_removes_the_row_and_nothing_else(cy: Cycles) -> None:
    cy.budgets.set("tenant:acme", tokens(1000))
    cy.budgets.set(RUN, tokens(100))
    cy.budgets.set(RUN, usd(1))
    cy.budgets.set("tenant:other/workflow:run-1", tokens(7))
    rid = cy.reserve(RUN_SUBJECT, LLM, tokens(30)).reservation_id
    assert rid
    cy.commit(rid, tokens(20))

    gone = cy.budgets.delete(RUN, Unit.TOKENS)
    assert [(b.scope, _unit(b), amounts(b)) for b in gone] == [(RUN, Unit.TOKENS, (100, 20, 0, 0, 80))]
    with pytest.raises(NotFound):
        cy.budgets.get(RUN, Unit.TOKENS)
    assert _unit(bal(cy, RUN)) is Unit.USD_MICROCENTS  # the other unit of the scope stays
    assert (RUN, "TOKENS") not in _scopes(cy)
    assert _scopes(cy) == [
        ("tenant:acme", "TOKENS"),
        (RUN, "USD_MICROCENTS"),
        ("tenant:other/workflow:run-1", "TOKENS"),
    ]
    assert amounts(bal(cy, "tenant:acme")) == (1000, 20, 0, 0, 980)  # the parent keeps what was spent

    cy.budgets.delete(RUN)  # every unit left
    with pytest.raises(NotFound):
        cy.budgets.get(RUN)
    assert _scopes(cy, "acme") == [("tenant:acme", "TOKENS")]
    assert [b.scope for b in cy.balances(tenant="acme")] == ["tenant:acme"]
    assert amounts(bal(cy, "tenant:other/workflow:run-1")) == (7, 0, 0, 0, 7)


def test_delete_of_a_missing_budget_is_not_found(cy: Cycles) -> None:
    cy.budgets.set("tenant:acme", tokens(10))
    with pytest.raises(NotFound):
        cy.budgets.delete("tenant:acme/workflow:nope")
    with pytest.raises(NotFound):
        cy.budgets.delete("tenant:acme", Unit.USD_MICROCENTS)
    with pytest.raises(InvalidRequest):
        cy.budgets.delete("not a scope")
    assert amounts(bal(cy, "tenant:acme")) == (10, 0, 0, 0, 10)


def test_delete_is_refused_while_a_reservation_holds_on_it(cy: Cycles) -> None:
    cy.budgets.set("tenant:acme", tokens(1000))
    cy.budgets.set(RUN, tokens(100))
    cy.budgets.set(RUN, usd(1))
    rid = cy.reserve(RUN_SUBJECT, LLM, tokens(30)).reservation_id
    assert rid
    with pytest.raises(BudgetInUse) as refused:
        cy.budgets.delete(RUN)
    assert refused.value.code == "BUDGET_IN_USE"
    assert refused.value.details == {"scope": RUN, "unit": "TOKENS", "reserved": 30}
    # every unit is checked before any is deleted: the usd row is still there
    assert [u for s, u in _scopes(cy, "acme") if s == RUN] == ["TOKENS", "USD_MICROCENTS"]
    assert amounts(bal(cy, RUN)) == (100, 0, 30, 0, 70)
    cy.release(rid)
    assert len(cy.budgets.delete(RUN)) == 2
    assert _scopes(cy, "acme") == [("tenant:acme", "TOKENS")]


def test_delete_is_refused_while_in_debt_unless_forced(cy: Cycles) -> None:
    cy.budgets.set("tenant:acme", tokens(1000))
    cy.budgets.set(RUN, tokens(100), overdraft_limit=tokens(50))
    rid = cy.reserve(RUN_SUBJECT, LLM, tokens(100), overage_policy=CommitOveragePolicy.ALLOW_WITH_OVERDRAFT)
    assert rid.reservation_id
    cy.commit(rid.reservation_id, tokens(130))
    assert amounts(bal(cy, RUN)) == (100, 100, 0, 30, -30)
    with pytest.raises(DebtOutstanding) as refused:
        cy.budgets.delete(RUN)
    details = refused.value.details
    assert (details["scope"], details["unit"], details["debt"]) == (RUN, "TOKENS", 30)
    assert amounts(bal(cy, RUN)) == (100, 100, 0, 30, -30)
    (gone,) = cy.budgets.delete(RUN, force=True)
    assert amounts(gone) == (100, 100, 0, 30, -30)
    assert _scopes(cy, "acme") == [("tenant:acme", "TOKENS")]


def test_a_closed_or_frozen_budget_can_be_deleted_and_set_again(cy: Cycles) -> None:
    cy.budgets.set(RUN, tokens(100))
    cy.budgets.close(RUN)
    cy.budgets.delete(RUN)
    cy.budgets.set(RUN, tokens(5))  # a fresh row: the closed one is gone
    assert amounts(bal(cy, RUN)) == (5, 0, 0, 0, 5)
    cy.budgets.freeze(RUN)
    cy.budgets.delete(RUN)
    assert _scopes(cy) == []


def test_delete_keeps_paging_whole(cy: Cycles) -> None:
    for i in range(6):
        cy.budgets.set(f"tenant:acme/agent:a{i}", tokens(i + 1))
    for i in (0, 2, 5):
        cy.budgets.delete(f"tenant:acme/agent:a{i}")
    seen: list[str] = []
    cursor = None
    while True:
        page = cy.ledger.balances(BalanceQuery(tenant="acme", limit=2, cursor=cursor))
        seen += [b.scope for b in page.balances]
        if not page.has_more:
            break
        cursor = page.next_cursor
    assert seen == [f"tenant:acme/agent:a{i}" for i in (1, 3, 4)]
    cy.budgets.set("tenant:acme/agent:a2", tokens(9))  # set again: back in the index, once
    assert [b.scope for b in cy.budgets.list(tenant="acme")] == [f"tenant:acme/agent:a{i}" for i in (1, 2, 3, 4)]


def test_a_period_goes_with_the_row(cy: Cycles) -> None:
    cy.budgets.set(RUN, tokens(100), period="day")
    assert bal(cy, RUN).period_start is not None
    cy.budgets.delete(RUN)
    b = cy.budgets.set(RUN, tokens(100))
    assert b.period_start is None
