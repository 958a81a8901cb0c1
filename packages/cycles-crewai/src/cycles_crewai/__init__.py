"""Cycles for CrewAI: every model call and consequential tool call reserves budget before it runs.

    from cycles import Cycles, Subject, usd, risk_points
    import cycles_crewai

    cy = Cycles()
    cy.budgets.set("tenant:acme", usd(20))
    with cycles_crewai.enable(cy, Subject(tenant="acme"), tool_costs={"update_crm": 25},
                              run_budgets=[usd(0.50), risk_points(60)]):
        crew.kickoff()

``budgeted(tool, estimate=...)`` puts a single tool under a budget; ``enable(...)`` installs CrewAI's
global model/tool hooks and event listeners (model spend in USD, tools priced in USD or risk points).
"""

try:
    import crewai  # noqa: F401
except ImportError as exc:  # pragma: no cover - tests/crewai/test_crewai_adapter.py simulates it
    if exc.name is not None and exc.name != "crewai" and not exc.name.startswith("crewai."):
        raise
    message = 'cycles-crewai needs CrewAI, an optional extra: pip install "cycles-crewai[crewai]"'
    raise ImportError(message) from exc

from cycles_crewai._common import BudgetStop, OnDeny, denial_of
from cycles_crewai._hooks import CyclesHooks, enable
from cycles_crewai._tools import BudgetedTool, budgeted

__all__ = ["BudgetStop", "BudgetedTool", "CyclesHooks", "OnDeny", "budgeted", "denial_of", "enable"]
