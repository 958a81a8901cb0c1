"""The package surface: exports, the missing-extra message, uninstalling, and the example."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import pytest
from crewai.hooks import InterceptionPoint, get_hooks
from crewai_fakes import ScriptedLLM, crew_of

import cycles_crewai
from cycles import Cycles, InvalidRequest, Subject, risk_points, usd

EXAMPLE = Path(__file__).parents[2] / "examples" / "crewai_action_authority.py"


def test_public_api() -> None:
    assert sorted(cycles_crewai.__all__) == [
        "BudgetStop",
        "BudgetedTool",
        "CyclesHooks",
        "OnDeny",
        "budgeted",
        "denial_of",
        "enable",
    ]
    for name in cycles_crewai.__all__:
        assert getattr(cycles_crewai, name) is not None


def test_without_crewai_the_import_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "cycles_crewai" or m.startswith("cycles_crewai.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "crewai", None)  # what an environment without the extra sees
    with pytest.raises(ImportError, match=r'pip install "cycles-crewai\[crewai\]"'):
        importlib.import_module("cycles_crewai")


def test_leaving_enable_uninstalls_and_later_runs_are_not_charged(cy: Cycles, subject: Subject) -> None:
    cy.budgets.set("tenant:acme", usd(5))
    llm = ScriptedLLM(script=["All done."])
    crew = crew_of(llm)
    with cycles_crewai.enable(cy, subject) as hooks:
        assert hooks._before_llm in get_hooks(InterceptionPoint.PRE_MODEL_CALL)
        crew.kickoff()
    assert hooks._before_llm not in get_hooks(InterceptionPoint.PRE_MODEL_CALL)
    spent = cy.budgets.get("tenant:acme").spent
    # The agent's executor copied the hooks when it first ran; once disabled they do nothing.
    crew.kickoff()
    assert llm.calls == 2
    assert cy.budgets.get("tenant:acme").spent == spent
    hooks.disable()  # idempotent


def test_a_bad_option_fails_at_once(cy: Cycles, subject: Subject) -> None:
    with pytest.raises(ValueError, match="on_tool_deny"):
        cycles_crewai.enable(cy, subject, on_tool_deny="sometimes")  # type: ignore[arg-type]


def test_run_budgets_need_a_workflow_per_run(cy: Cycles) -> None:
    fixed_run = Subject(tenant="acme", workflow="case-7")
    with pytest.raises(InvalidRequest, match="workflow scope per run"):
        cycles_crewai.enable(cy, fixed_run, run_budgets=[risk_points(1)])


def test_the_example_runs_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("crewai_action_authority", EXAMPLE)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, example)  # pydantic resolves the model's annotations there
    spec.loader.exec_module(example)
    outcome = example.main()
    assert outcome["emails"] == []
    assert outcome["escalations"] == ["case 42: email blocked by the risk budget"]
    assert outcome["tools"] == ["add_note", "read_case", "update_crm"]
    assert outcome["risk_spent"] == risk_points(28)
    assert "escalated" in outcome["answer"]
