"""Shadow decisions live in the ledger, on every backend, and the report reads every writer's."""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
from pathlib import Path

import pytest

from cycles import Cycles, Subject, usd
from cycles.cli import main
from cycles.testing import assert_ledger_invariant

from .conftest import MULTI_PROCESS, Backend, open_backend
from .helpers import LLM, TOOL

# est 0.40, actual 0.30 against $1.00: three calls fit, the 4th would be denied (BUDGET_EXCEEDED; the
# ledger accounts 0.10 of its 0.30 and flags the scope), the 5th too (OVERDRAFT_LIMIT_EXCEEDED, 0 of 0.30).
CALLS = 5


def _workload(cy: Cycles, agent: str) -> None:
    for _ in range(CALLS):
        with cy.guard(Subject(tenant="shadow", agent=agent), LLM, estimate=usd(0.40)) as g:
            g.commit(usd(0.30))


def _workload_in_child(spec: tuple[str, str, bool], agent: str, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    with open_backend(spec, mode="shadow", heartbeat=False) as cy:
        _workload(cy, agent)
    out.put(agent)  # after close(): every shadow event is written


def test_shadow_decisions_are_reported_from_the_ledger(ledger: Backend, backend: str) -> None:
    cy = ledger.open(mode="shadow", heartbeat=False)
    cy.budgets.set("tenant:shadow/agent:a", usd(1))
    cy.budgets.set("tenant:shadow", usd(10))
    _workload(cy, "a")
    with cy.guard(Subject(tenant="shadow", agent="a"), TOOL, estimate=usd(0.01)):
        pass  # no commit(): the estimate is what it cost
    assert_ledger_invariant(cy)
    # A reader that is not the writer: a fresh client (the same one for memory://, private to it).
    # The writer's events are on their way from its recorder thread; close() waits for them.
    reader = cy
    if backend != "memory":
        cy.close()
        reader = ledger.open()
    report = reader.shadow_report(tenant="shadow", since="1h")
    assert report.would_deny == 3
    assert report.by_reason == {"OVERDRAFT_LIMIT_EXCEEDED": 2, "BUDGET_EXCEEDED": 1}
    assert report.prevented == {usd(1).unit: usd(0.61).amount}  # 0.30 + 0.30 + the tool's estimate 0.01
    line = next(b for b in report.budgets if b.scope == "tenant:shadow/agent:a")
    assert (line.would_deny, line.peak_overage) == (3, usd(0.51).amount)
    assert line.allocated == usd(1).amount and line.spent == usd(1).amount
    assert line.suggested == usd(1.90).amount  # (1.00 spent + 0.51 unaccounted) x 1.2 = 1.812, up to 1.9
    assert {(g.scope, g.action, g.reason_code, g.calls, g.spent) for g in report.groups} == {
        ("tenant:shadow/agent:a", "llm.completion openai:gpt-4o", "BUDGET_EXCEEDED", 1, usd(0.30).amount),
        ("tenant:shadow/agent:a", "llm.completion openai:gpt-4o", "OVERDRAFT_LIMIT_EXCEEDED", 1, usd(0.30).amount),
        ("tenant:shadow/agent:a", "tool.call search", "OVERDRAFT_LIMIT_EXCEEDED", 1, usd(0.01).amount),
    }
    assert "3 calls would have been denied." in report.summary()
    assert reader.shadow_report(tenant="other", since="1h").would_deny == 0
    reader.close()


def test_shadow_report_covers_every_process(ledger: Backend, backend: str, capsys: pytest.CaptureFixture[str]) -> None:
    if backend not in MULTI_PROCESS:
        pytest.skip(f"{backend} state is private to one process")
    with ledger.open() as admin:
        admin.budgets.set("tenant:shadow", usd(10))
        for agent in ("p0", "p1"):
            admin.budgets.set(f"tenant:shadow/agent:{agent}", usd(1))
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_workload_in_child, args=(ledger.spec, f"p{i}", out)) for i in range(2)]
    for p in procs:
        p.start()
    assert sorted(out.get(timeout=120) for _ in procs) == ["p0", "p1"]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    with ledger.open() as reader:
        report = reader.shadow_report(tenant="shadow", since="1h")
    assert report.would_deny == 4
    assert {g.scope for g in report.groups} == {"tenant:shadow/agent:p0", "tenant:shadow/agent:p1"}
    assert report.prevented == {usd(1).unit: usd(1.20).amount}
    by_scope = {b.scope: b for b in report.budgets}
    for agent in ("p0", "p1"):
        assert by_scope[f"tenant:shadow/agent:{agent}"].peak_overage == usd(0.50).amount
    # the tenant spent 2.00 through the ledger and 1.00 past its agents' budgets
    assert by_scope["tenant:shadow"].suggested == usd(3.60).amount
    if not ledger.routed:  # the command line reads the same events
        assert main(["shadow", "report", "--ledger", ledger.url, "--tenant", "shadow", "--since", "1h", "--json"]) == 0
        body = json.loads(capsys.readouterr().out)
        assert body["would_deny"] == 4 and body["peak_overage"] == {"USD_MICROCENTS": usd(0.50).amount}
        assert main(["shadow", "report", "--ledger", ledger.url, "--since", "1h"]) == 0
        text = capsys.readouterr().out
        assert "4 calls would have been denied. Enforcement would have prevented $1.2000 of spend." in text
        assert "tenant:shadow/agent:p1" in text


def test_a_servers_observe_mode_events_are_in_the_report(ledger: Backend, backend: str) -> None:
    """What a server in observe mode records (the spec's payload, no actual: nothing ran) counts too."""
    if ledger.routed:
        pytest.skip("the server's own event store is read through the server (the other tests)")
    from cycles.ledger.records import EVENTS, new_event, records_of

    with ledger.open() as cy:
        cy.budgets.set("tenant:obs", usd(1))
        records_of(cy.ledger).append(
            EVENTS,
            new_event(
                "reservation.observed_denied",
                tenant_id="obs",
                scope="tenant:obs",
                data={
                    "scope": "tenant:obs",
                    "unit": "USD_MICROCENTS",
                    "deny_detail": {"reason_code": "ACTION_KIND_DENIED"},
                    "action": {"kind": "tool.email", "name": "send"},
                    "estimated_amount": usd(0.25).amount,
                    "observe_mode": "OBSERVE",
                },
            ),
        )
        report = cy.shadow_report(tenant="obs", since="1h")
    assert report.would_deny == 1 and report.by_reason == {"ACTION_KIND_DENIED": 1}
    (event,) = report.events
    assert (event.mode, event.action_kind, event.estimate, event.actual) == (
        "observe",
        "tool.email",
        usd(0.25).amount,
        None,
    )
    assert report.prevented == {}  # it never ran: nothing spent, nothing to prevent


def test_a_client_never_closed_still_writes_its_shadow_events(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/ledger.db"
    with Cycles(url) as admin:
        admin.budgets.set("tenant:exit", usd(0.10))
    script = (
        "from cycles import Cycles, Subject, Action, usd\n"
        f"cy = Cycles({url!r}, mode='shadow', heartbeat=False)\n"
        "for _ in range(3):\n"
        "    with cy.guard(Subject(tenant='exit'), Action('llm.completion', 'm'), estimate=usd(0.08)) as g:\n"
        "        g.commit(usd(0.08))\n"  # and the process ends without cy.close()
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    with Cycles(url) as reader:
        assert reader.shadow_report(since="1h").would_deny == 2
