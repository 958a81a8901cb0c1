"""The guard lifecycle on every backend: reserve -> run -> commit / release, and its recovery rules."""

from __future__ import annotations

import time
from typing import Any

import pytest

from cycles import (
    Action,
    BudgetExceeded,
    Caps,
    Cycles,
    LedgerUnavailable,
    ReservationStatus,
    Subject,
    ToolNotAllowed,
    tokens,
    usd,
)
from cycles.testing import assert_ledger_invariant

from .conftest import Backend
from .helpers import LLM, amounts, bal

RUN = Subject(tenant="acme", workflow="run-42", agent="writer")


@pytest.fixture
def funded(cy: Cycles) -> Cycles:
    cy.budgets.set("tenant:acme", usd(50))
    cy.budgets.set("tenant:acme/workflow:run-42", usd(1))
    return cy


def spent(cy: Cycles) -> int:
    b = bal(cy, "tenant:acme/workflow:run-42")
    assert b.spent is not None
    return b.spent.amount


def test_commit_charges_the_actual(funded: Cycles) -> None:
    with funded.guard(RUN, LLM, estimate=usd(0.05)) as g:
        assert g.reservation_id
        g.commit(usd(0.031))
    assert spent(funded) == 3_100_000
    assert g.charged == usd(0.031)
    assert bal(funded, "tenant:acme").reserved == usd(0)


def test_no_commit_charges_the_estimate(funded: Cycles) -> None:
    with funded.guard(RUN, LLM, estimate=usd(0.05)):
        pass
    assert spent(funded) == 5_000_000


def test_a_failing_body_releases(funded: Cycles) -> None:
    with pytest.raises(RuntimeError), funded.guard(RUN, LLM, estimate=usd(0.05)) as g:
        raise RuntimeError("provider down")
    assert spent(funded) == 0 and bal(funded, "tenant:acme").reserved == usd(0)
    assert g.reservation_id
    assert funded.get_reservation(g.reservation_id).status is ReservationStatus.RELEASED


def test_a_body_failing_after_the_action_happened_still_settles(funded: Cycles) -> None:
    with pytest.raises(RuntimeError), funded.guard(RUN, LLM, estimate=usd(0.05)) as g:
        g.commit(usd(0.02))  # the call happened and cost this much
        raise RuntimeError("post-processing failed")
    assert spent(funded) == 2_000_000


def test_denied_guard_never_runs_the_body(funded: Cycles) -> None:
    ran = []
    with pytest.raises(BudgetExceeded), funded.guard(RUN, LLM, estimate=usd(2)):
        ran.append(1)
    assert ran == []


def test_runaway_loop_stops_at_the_budget(funded: Cycles) -> None:
    calls = 0
    with pytest.raises(BudgetExceeded):
        while True:
            with funded.guard(RUN, LLM, estimate=usd(0.05)) as g:
                calls += 1
                g.commit(usd(0.04))
    assert calls == 24  # 24 x 0.04 = 0.96; the 25th estimate of 0.05 does not fit in 0.04
    assert spent(funded) == 96_000_000


def test_nested_guards_do_not_double_count(funded: Cycles) -> None:
    step = Action("agent.step", "draft")
    with funded.guard(RUN, step, estimate=usd(0.30)) as outer:
        for _ in range(3):
            with funded.guard(RUN, LLM, estimate=usd(0.05)) as inner:
                assert inner.reservation_id is None  # drawn from the outer reservation
                inner.commit(usd(0.04))
        assert bal(funded, "tenant:acme/workflow:run-42").reserved == usd(0.30)
    assert spent(funded) == 12_000_000  # 3 x 0.04, not 0.30 + 0.12
    assert outer.charged == usd(0.12)
    rows = funded.list_reservations(tenant="acme").reservations
    assert len(rows) == 1


def test_nested_guard_beyond_the_outer_reservation_is_denied(funded: Cycles) -> None:
    with funded.guard(RUN, Action("agent.step", "x"), estimate=usd(0.10)):
        with funded.guard(RUN, LLM, estimate=usd(0.06)) as a:
            a.commit(usd(0.06))
        with pytest.raises(BudgetExceeded), funded.guard(RUN, LLM, estimate=usd(0.06)):
            pass
    assert spent(funded) == 6_000_000


def test_nested_guard_on_a_deeper_subject_reserves_on_its_own(funded: Cycles) -> None:
    funded.budgets.set("tenant:acme/workflow:run-42/agent:writer/toolset:web", usd(0.5))
    deeper = RUN.merged(toolset="web")
    with funded.guard(RUN, Action("agent.step", "x"), estimate=usd(0.10)) as outer:
        with funded.guard(deeper, LLM, estimate=usd(0.05)) as inner:
            assert inner.reservation_id is not None
            inner.commit(usd(0.01))
        outer.commit(usd(0.02))
    assert spent(funded) == 3_000_000


def test_shadow_mode_never_blocks_and_records_why(ledger: Backend) -> None:
    cy = ledger.open(mode="shadow")
    cy.budgets.set("tenant:acme/workflow:run-42", usd(0.10))
    ran = 0
    for _ in range(5):
        with cy.guard(RUN, LLM, estimate=usd(0.05)) as g:
            ran += 1
            g.commit(usd(0.05))
    assert ran == 5
    reasons = [r.reason_code for r in cy.shadow_log]
    # the first would-deny is the budget; the shadow spend then marks the scope over-limit
    assert reasons == ["BUDGET_EXCEEDED", "OVERDRAFT_LIMIT_EXCEEDED", "OVERDRAFT_LIMIT_EXCEEDED"]
    assert cy.shadow_log[0].scope == "tenant:acme/workflow:run-42"
    b = bal(cy, "tenant:acme/workflow:run-42")
    assert b.spent == usd(0.10) and b.is_over_limit  # spend accounted up to what existed, and flagged
    # ... and the shadow log says how much enforcement would have saved
    assert [r.actual for r in cy.shadow_log] == [usd(0.05)] * 3
    assert sum(r.overspend.amount for r in cy.shadow_log if r.overspend) == usd(0.15).amount
    assert_ledger_invariant(cy)
    cy.close()


def test_shadow_mode_per_guard(funded: Cycles) -> None:
    with funded.guard(RUN, LLM, estimate=usd(5), mode="shadow") as g:
        assert g.shadow is not None and g.shadow.reason_code == "BUDGET_EXCEEDED"
    assert len(funded.shadow_log) == 1


def test_caps_block_disallowed_tools_and_release(funded: Cycles) -> None:
    funded.budgets.set("tenant:acme/workflow:run-42", usd(1), caps=Caps(tool_denylist=["deploy"], max_tokens=300))
    with pytest.raises(ToolNotAllowed) as err, funded.guard(RUN, Action("tool.call", "deploy"), estimate=usd(0.01)):
        pytest.fail("the body must not run")
    assert err.value.details["tool"] == "deploy"
    assert bal(funded, "tenant:acme").reserved == usd(0)
    with funded.guard(RUN, Action("tool.call", "search"), estimate=usd(0.01)) as g:
        assert g.caps is not None and g.caps.max_tokens == 300


def test_decorator(funded: Cycles) -> None:
    @funded.guarded(
        RUN, Action("tool.call", "search"), estimate=lambda q: usd(0.001 * len(q)), actual=lambda r: usd(0.002)
    )
    def search(q: str) -> str:
        return q.upper()

    assert search("hello") == "HELLO"
    assert spent(funded) == 200_000


class _LostResponse:
    """A ledger whose first commit succeeds but whose answer is lost on the way back."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.commits: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def commit(self, reservation_id: str, req: Any, **kw: Any) -> Any:
        self.commits.append(req.idempotency_key)
        response = self.inner.commit(reservation_id, req, **kw)
        if len(self.commits) == 1:
            raise LedgerUnavailable("connection reset after the request was sent")
        return response


def test_an_ambiguous_commit_is_retried_with_the_same_key_and_charges_once(funded: Cycles) -> None:
    flaky = _LostResponse(funded.ledger)
    cy = Cycles(ledger=flaky)  # type: ignore[arg-type]
    with cy.guard(RUN, LLM, estimate=usd(0.05)) as g:
        g.commit(usd(0.03))
    assert len(flaky.commits) == 2 and flaky.commits[0] == flaky.commits[1]
    assert spent(funded) == 3_000_000


def test_an_expired_lease_falls_back_to_an_event_with_the_same_key(funded: Cycles) -> None:
    with funded.guard(RUN, LLM, estimate=usd(0.05), ttl_ms=1000, grace_period_ms=0, heartbeat=False) as g:
        time.sleep(1.15)
        g.commit(usd(0.03))
    assert spent(funded) == 3_000_000
    assert bal(funded, "tenant:acme").reserved == usd(0)
    assert g.reservation_id
    rows = funded.list_reservations(tenant="acme", status="EXPIRED").reservations
    assert [r.reservation_id for r in rows] == [g.reservation_id]


def test_heartbeat_keeps_a_long_body_alive(funded: Cycles) -> None:
    with funded.guard(RUN, LLM, estimate=usd(0.05), ttl_ms=1000, grace_period_ms=0) as g:
        time.sleep(2.2)
        g.commit(usd(0.01))
    assert g.heartbeat_errors == []
    assert spent(funded) == 1_000_000
    assert g.reservation_id
    assert funded.get_reservation(g.reservation_id).status is ReservationStatus.COMMITTED


def test_split_form_for_callback_frameworks(funded: Cycles) -> None:
    g = funded.guard(RUN, LLM, estimate=usd(0.05))
    g.start()
    assert bal(funded, "tenant:acme").reserved == usd(0.05)
    g.finish(actual=usd(0.01))
    g2 = funded.guard(RUN, LLM, estimate=usd(0.05)).start()
    g2.fail(RuntimeError("x"))
    assert amounts(bal(funded, "tenant:acme/workflow:run-42"))[1:3] == (1_000_000, 0)


def test_risk_points_cap_consequential_actions(cy: Cycles) -> None:
    from cycles import risk_points

    cy.budgets.set("tenant:acme/workflow:run-1", risk_points(60))
    run = Subject(tenant="acme", workflow="run-1")
    costs = {"read_crm": 1, "update_crm": 25, "deploy": 50}
    done = []
    for tool in ["read_crm", "update_crm", "read_crm", "deploy", "read_crm"]:
        try:
            with cy.guard(run, Action("tool.call", tool), estimate=risk_points(costs[tool])):
                done.append(tool)
        except BudgetExceeded:
            done.append(f"denied:{tool}")
    assert done == ["read_crm", "update_crm", "read_crm", "denied:deploy", "read_crm"]
    assert tokens(0).unit != risk_points(0).unit
