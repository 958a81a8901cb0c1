"""A run (``cy.run`` / ``acy.run``): its scope and budgets, its context, and the one settlement rule
for every step it owns, on every backend."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading

import pytest

from cycles import (
    BudgetClosed,
    BudgetExceeded,
    CommitOveragePolicy,
    Cycles,
    Denied,
    InvalidRequest,
    NotFound,
    Subject,
    ToolNotAllowed,
    current_run,
    for_each,
    risk_points,
    tokens,
    usd,
)
from cycles.models import Caps, ReservationStatus
from cycles.testing import assert_settled, assert_settled_async

from .conftest import Backend
from .helpers import LLM, TOOL

ACME = Subject(tenant="acme")


def statuses(cy: Cycles, run_scope_workflow: str) -> list[str]:
    page = cy.list_reservations(tenant="acme", workflow=run_scope_workflow, limit=200, sort_by="created_at_ms")
    return sorted(r.status.value for r in page.reservations)


def test_a_run_is_its_own_workflow_scope_with_its_id_on_every_step(cy: Cycles) -> None:
    cy.budgets.set("tenant:acme", usd(10))
    assert current_run() is None
    with cy.run(ACME, name="support", budgets=[usd(1)]) as run:
        assert current_run() is run
        assert run.id.startswith("support-") and run.subject.workflow == run.id
        assert run.scope == f"tenant:acme/workflow:{run.id}"
        assert run.subject.dimensions == {"run_id": run.id}
        with run.guard(LLM, estimate=usd(0.1)) as g:
            g.commit(usd(0.04))
        agent_step = run.guard(TOOL, usd(0.01), subject=Subject(tenant="acme", agent="triage")).start()
        agent_step.finish()
        assert agent_step.subject.workflow == run.id and agent_step.subject.dimensions == {"run_id": run.id}
        assert cy.budgets.get(run.scope).spent == usd(0.05)
        stored = cy.get_reservation(g.reservation_id or "")
        assert stored.subject.dimensions == {"run_id": run.id}
    assert current_run() is None
    assert run.state == "ended" and run.charged == {usd(0).unit: usd(0.05)}
    assert_settled(cy, "tenant:acme", usd(0.05))


def test_run_budgets_are_set_at_start_and_deleted_at_end_unless_kept(cy: Cycles) -> None:
    cy.budgets.set("tenant:acme", usd(10))
    cy.budgets.set("tenant:acme", risk_points(100))
    run = cy.run(ACME, budgets=[usd(0.5), risk_points(60)])
    with run:
        assert cy.budgets.get(run.scope, unit=usd(0).unit).allocated == usd(0.5)
        assert cy.budgets.get(run.scope, unit=risk_points(0).unit).allocated == risk_points(60)
        with run.guard(TOOL, risk_points(25)):
            pass
    assert run.charged == {risk_points(0).unit: risk_points(25)}
    with pytest.raises(NotFound):  # no row left behind, in any unit
        cy.budgets.get(run.scope)
    assert cy.budgets.get("tenant:acme", unit=risk_points(0).unit).spent == risk_points(25)  # the spend stays
    with pytest.raises(RuntimeError):  # the run has ended: it takes no more steps
        run.guard(TOOL, risk_points(1))
    with cy.run(ACME, budgets=[usd(0.5)], keep_budgets=True) as kept:
        pass
    with cy.guard(kept.subject, LLM, usd(0.1)) as g:  # a kept budget stays open
        g.commit(usd(0.1))
    assert cy.budgets.get(kept.scope).spent == usd(0.1)
    with pytest.raises(InvalidRequest):  # a subject naming a workflow has no run scope to hold budgets
        cy.run(Subject(tenant="acme", workflow="shared"), budgets=[usd(1)])
    shared = cy.run(Subject(tenant="acme", workflow="shared"))
    assert shared.subject.workflow == "shared" and shared.subject.dimensions == {"run_id": shared.id}


def test_a_step_on_an_ended_runs_deleted_scope_is_refused_not_charged_to_the_parents(cy: Cycles) -> None:
    """A straggler the agent left behind, stepping on the run's subject after it ended, would escape
    the run's cap once its budget row is gone: it is refused like a step on a closed run budget."""
    cy.budgets.set("tenant:acme", usd(10))
    with cy.run(ACME, budgets=[usd(0.5)]) as run:
        pass
    for step in (
        lambda: cy.guard(run.subject, LLM, usd(0.1)).start(),
        lambda: cy.reserve(run.subject, LLM, usd(0.1)),
        lambda: cy.event(run.subject, LLM, usd(0.1)),
        lambda: cy.guard(run.subject.model_copy(update={"dimensions": None}), LLM, usd(0.1)).start(),  # same scope
    ):
        with pytest.raises(BudgetClosed) as refused:
            step()
        assert refused.value.details == {"scope": run.scope, "run_id": run.id}
    assert cy.budgets.get("tenant:acme").spent == usd(0) and cy.budgets.get("tenant:acme").reserved == usd(0)
    with cy.guard(run.subject, LLM, usd(0.1), mode="shadow") as g:  # shadow mode records, never blocks
        g.commit(usd(0.01))
    assert g.shadow is not None and g.shadow.reason_code == "BUDGET_CLOSED"
    # a new run that takes the id again is its own; runs without budgets, and kept ones, still bind
    with cy.run(ACME, run_id=run.id, budgets=[usd(0.5)]) as again, again.guard(LLM, usd(0.1)) as g:
        g.commit(usd(0.02))
    with cy.run(ACME) as plain:
        pass
    with cy.run(ACME, budgets=[usd(0.5)], keep_budgets=True) as kept:
        pass
    for subject in (plain.subject, kept.subject):
        with cy.guard(subject, LLM, usd(0.1)) as g:
            g.commit(usd(0.1))
    assert_settled(cy, "tenant:acme", usd(0.23))


async def test_an_async_step_on_an_ended_runs_deleted_scope_is_refused(ledger: Backend) -> None:
    acy = ledger.open_async()
    await acy.budgets.set("tenant:acme", usd(10))
    async with acy.run(ACME, budgets=[usd(0.5)]) as run:
        pass
    with pytest.raises(BudgetClosed):
        async with acy.guard(run.subject, LLM, usd(0.1)):
            pytest.fail("a refused step must not run")
    with pytest.raises(BudgetClosed):
        await acy.reserve(run.subject, LLM, usd(0.1))
    assert (await acy.budgets.get("tenant:acme")).reserved == usd(0)
    await acy.aclose()


def test_a_run_budget_caps_the_run(cy: Cycles) -> None:
    cy.budgets.set("tenant:acme", usd(10))
    with pytest.raises(BudgetExceeded), cy.run(ACME, budgets=[usd(0.15)]) as run:
        for _ in range(3):
            with run.guard(LLM, estimate=usd(0.05)) as g:
                g.commit(usd(0.06))
    assert run.charged == {usd(0).unit: usd(0.12)}
    assert_settled(cy, "tenant:acme", usd(0.12))


def test_when_the_run_ends_every_open_step_is_settled_by_the_rule(cy: Cycles) -> None:
    cy.budgets.set("tenant:acme", tokens(10_000))
    with pytest.raises(BudgetExceeded), cy.run(ACME) as run:
        measured = run.guard(LLM, tokens(100)).start()
        measured.commit(tokens(42))  # the action happened and said what it cost
        unmeasured = run.guard(LLM, tokens(100)).start()  # started, no actual: may have been billed
        ahead = run.guard(TOOL, tokens(10)).start(begin=False)  # reserved ahead, never started
        started_tool = run.guard(TOOL, tokens(7)).start(begin=False)
        started_tool.begin()
        assert len(run.open_steps) == 4
        with run.guard(TOOL, tokens(100_000)):  # a denial ends the run: it cut the others short
            pass
    assert run.open_steps == [] and isinstance(run.error, BudgetExceeded)
    assert (measured.state, measured.charged) == ("settled", tokens(42))
    assert (unmeasured.state, unmeasured.charged, unmeasured.actual_missing) == ("settled", tokens(100), True)
    assert unmeasured.interrupted and run.missing_actuals == [unmeasured]
    assert ahead.state == "released"
    assert (started_tool.state, started_tool.charged, started_tool.actual_missing) == ("settled", tokens(7), False)
    assert_settled(cy, "tenant:acme", tokens(149))


def test_a_run_that_dies_of_an_error_fails_the_step_that_raised_it(cy: Cycles) -> None:
    cy.budgets.set("tenant:acme", tokens(1000))
    with pytest.raises(ConnectionError), cy.run(ACME) as run:
        call = run.guard(LLM, tokens(100)).start()  # a callback framework: no end callback came
        ahead = run.guard(TOOL, tokens(10)).start(begin=False)
        raise ConnectionError("provider down")
    assert (call.state, call.failed, ahead.state) == ("released", True, "released")
    assert_settled(cy, "tenant:acme", tokens(0))


def test_a_failed_step_is_released_unless_its_policy_charges_it(cy: Cycles) -> None:
    cy.budgets.set("tenant:acme", usd(1))
    with cy.run(ACME) as run:
        with pytest.raises(ValueError), run.guard(TOOL, usd(0.1)) as free:
            raise ValueError("the tool failed")
        with pytest.raises(ValueError), run.guard(TOOL, usd(0.2), on_failure="charge") as billed:
            raise ValueError("the tool failed but billed")
        with pytest.raises(ValueError), run.guard(TOOL, usd(0.3)) as done:
            done.commit(usd(0.05))  # the action happened, then the code after it raised
            raise ValueError("after the action")
    assert (free.state, free.failed) == ("released", True)
    assert (billed.state, billed.charged) == ("settled", usd(0.2))
    assert (done.state, done.charged) == ("settled", usd(0.05))
    assert_settled(cy, "tenant:acme", usd(0.25))


def test_an_interrupted_step_is_never_released(cy: Cycles) -> None:
    cy.budgets.set("tenant:acme", usd(1))
    with pytest.raises(KeyboardInterrupt), cy.guard(ACME, LLM, usd(0.1)) as g:
        raise KeyboardInterrupt
    assert (g.state, g.charged, g.interrupted, g.actual_missing) == ("settled", usd(0.1), True, True)
    assert_settled(cy, "tenant:acme", usd(0.1))


def test_a_missing_actual_is_surfaced_and_settled_as_configured(cy: Cycles, caplog: pytest.LogCaptureFixture) -> None:
    cy.budgets.set("tenant:acme", usd(1))
    with caplog.at_level(logging.WARNING, logger="cycles.guard"), cy.run(ACME) as run:
        with run.guard(LLM, usd(0.1)) as estimated:
            pass
        with run.guard(LLM, usd(0.1), on_missing_actual="release") as released:
            pass
        with run.guard(TOOL, usd(0.02)) as priced:  # a tool's estimate is its price: nothing is missing
            pass
        with run.guard(TOOL, usd(0.02), expect_actual=True, on_missing_actual="leave") as left:
            pass
    assert (estimated.state, estimated.charged, estimated.actual_missing) == ("settled", usd(0.1), True)
    assert (released.state, released.actual_missing) == ("released", True)
    assert (priced.state, priced.actual_missing) == ("settled", False)
    assert (left.state, left.actual_missing) == ("left", True)
    assert run.missing_actuals == [estimated, released, left]
    names = " ".join(r.getMessage() for r in caplog.records)
    assert estimated.reservation_id in names and left.reservation_id in names
    assert cy.get_reservation(left.reservation_id or "").status is ReservationStatus.ACTIVE  # left to expire
    cy.release(left.reservation_id or "")
    assert_settled(cy, "tenant:acme", usd(0.12))


def test_a_capped_commit_is_recorded_logged_and_counted(cy: Cycles, caplog: pytest.LogCaptureFixture) -> None:
    cy.budgets.set("tenant:acme", usd(1))
    with caplog.at_level(logging.WARNING, logger="cycles.guard"), cy.run(ACME) as run, run.guard(LLM, usd(0.5)) as g:
        g.commit(usd(1.5))  # the provider billed more than the budget has
    assert g.charged == usd(1) and g.uncharged == usd(0.5) and run.uncharged == {usd(0).unit: usd(0.5)}
    assert any("went unrecorded" in r.getMessage() for r in caplog.records)
    assert_settled(cy, "tenant:acme", usd(1))


def test_true_spend_is_recorded_as_debt_with_overdraft(cy: Cycles) -> None:
    cy.budgets.set("tenant:acme", usd(1), overdraft_limit=usd(5))
    with cy.run(ACME, overage_policy=CommitOveragePolicy.ALLOW_WITH_OVERDRAFT) as run, run.guard(LLM, usd(0.5)) as g:
        g.commit(usd(1.5))
    assert g.charged == usd(1.5) and g.uncharged is None and run.uncharged == {}
    assert_settled(cy, "tenant:acme", usd(1), debt=usd(0.5))


def test_concurrent_runs_in_threads_never_share_a_run(cy: Cycles) -> None:
    cy.budgets.set("tenant:acme", usd(10))
    seen: dict[str, str] = {}
    barrier = threading.Barrier(2)

    def agent(name: str) -> None:
        with cy.run(ACME, name=name, budgets=[usd(0.3)]) as run:
            barrier.wait()
            for _ in range(5):
                try:
                    with run.guard(LLM, usd(0.1)) as g:
                        g.commit(usd(0.1))
                except BudgetExceeded:
                    break
            here = current_run()
            assert here is not None
            seen[name] = here.id
            ctx = contextvars.copy_context()  # work handed to a pool sees the same run
            assert ctx.run(current_run) is run

    threads = [threading.Thread(target=agent, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen["a"].startswith("a-") and seen["b"].startswith("b-")
    assert_settled(cy, "tenant:acme", usd(0.6))  # each run stopped at its own cap


def test_caps_granted_to_a_model_call_bound_the_tools_it_picks(cy: Cycles) -> None:
    with cy.run(ACME) as run:
        run.grant("agent-1", Caps(tool_denylist=["deploy"]))
        run.check_tool("search", "agent-1")
        with pytest.raises(ToolNotAllowed):
            run.check_tool("deploy", "agent-1")
        run.check_tool("deploy", "agent-2")
        run.grant("agent-1", None)
        run.check_tool("deploy", "agent-1")
    with pytest.raises(RuntimeError, match="has ended"):
        run.guard(TOOL, usd(0))
    run.end()  # idempotent


def test_for_each_gives_every_input_its_own_run_and_one_denial_stops_only_its_own(cy: Cycles) -> None:
    cy.budgets.set("tenant:acme", usd(10))

    def work(run: object, cost: float) -> str:
        assert current_run() is run
        with run.guard(LLM, usd(cost)) as g:  # type: ignore[attr-defined]
            g.commit(usd(cost))
        return f"did {cost}"

    results = for_each(lambda i: cy.run(ACME, budgets=[usd(0.5)]), [0.1, 0.9, 0.2], work)
    assert results[0] == "did 0.1" and isinstance(results[1], BudgetExceeded) and results[2] == "did 0.2"
    assert [i for i, _ in results.errors] == [1]
    assert len({r.id for r in results.runs}) == 3
    with pytest.raises(Denied):
        for_each(lambda i: cy.run(ACME, budgets=[usd(0.5)]), [0.9, 0.1], work, stop_on_denial=True)
    assert_settled(cy, "tenant:acme", usd(0.3))


async def test_async_runs_in_concurrent_tasks_and_a_cancelled_step(ledger: Backend) -> None:
    acy = ledger.open_async()
    await acy.budgets.set("tenant:acme", usd(10))
    in_call = asyncio.Event()

    async def agent(name: str, hang: bool) -> None:
        async with acy.run(ACME, name=name, budgets=[usd(1)]) as run:
            assert current_run() is run
            async with run.guard(LLM, usd(0.1)) as g:
                g.commit(usd(0.03))
            if hang:
                async with run.guard(LLM, usd(0.2)):
                    in_call.set()
                    await asyncio.Event().wait()

    calm = asyncio.create_task(agent("calm", hang=False))
    stuck = asyncio.create_task(agent("stuck", hang=True))
    await calm
    await in_call.wait()
    stuck.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stuck
    # the cancelled call had started: it is committed at its estimate, flagged, never released
    await assert_settled_async(acy, "tenant:acme", usd(0.03 + 0.03 + 0.2))
    await acy.aclose()


def test_many_runs_leave_no_budget_row_behind(cy: Cycles) -> None:
    cy.budgets.set("tenant:acme", usd(10))
    cy.budgets.set("tenant:acme", risk_points(1000))
    before = [(b.scope, b.allocated) for b in cy.budgets.list()]
    for i in range(12):
        with cy.run(ACME, budgets=[usd(0.5), risk_points(60)]) as run:
            with run.guard(LLM, usd(0.02)) as g:
                g.commit(usd(0.01))
            if i % 3 == 0:  # some runs end by an exception: the budgets go all the same
                with pytest.raises(ValueError), run.guard(TOOL, risk_points(5)):
                    raise ValueError("tool failed")
    with pytest.raises(BudgetExceeded), cy.run(ACME, budgets=[usd(0.01)]) as denied, denied.guard(LLM, usd(0.02)):
        pass
    assert [(b.scope, b.allocated) for b in cy.budgets.list()] == before
    assert_settled(cy, "tenant:acme", usd(0.12))


def test_a_run_budget_the_ledger_will_not_delete_is_closed_with_a_warning(
    cy: Cycles, caplog: pytest.LogCaptureFixture
) -> None:
    cy.budgets.set("tenant:acme", usd(10))
    with caplog.at_level(logging.WARNING, logger="cycles.run"), cy.run(ACME, budgets=[usd(1)]) as run:
        # a reservation the run does not own holds on its budget past its end
        outside = cy.reserve(run.subject, LLM, usd(0.2)).reservation_id
    assert outside
    assert any("could not delete" in r.getMessage() and run.scope in r.getMessage() for r in caplog.records)
    b = cy.budgets.get(run.scope)
    assert b.status == "CLOSED" and b.reserved == usd(0.2)
    cy.commit(outside, usd(0.1))  # the held reservation still settles against the closed row
    assert cy.budgets.delete(run.scope)[0].spent == usd(0.1)  # and an operator can delete it then
    assert [b.scope for b in cy.budgets.list()] == ["tenant:acme"]


async def test_async_runs_leave_no_budget_row_behind(ledger: Backend) -> None:
    acy = ledger.open_async()
    await acy.budgets.set("tenant:acme", usd(10))

    async def agent() -> None:
        async with acy.run(ACME, budgets=[usd(0.5)]) as run, run.guard(LLM, usd(0.1)) as g:
            g.commit(usd(0.03))

    await asyncio.gather(*(agent() for _ in range(5)))
    assert [b.scope for b in await acy.budgets.list()] == ["tenant:acme"]
    await assert_settled_async(acy, "tenant:acme", usd(0.15))
    await acy.aclose()
