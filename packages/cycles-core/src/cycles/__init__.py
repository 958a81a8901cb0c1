"""Cycles: runtime budget and action authority for AI agents.

Reserve before the expensive or dangerous call, commit the actual cost after, release on failure::

    from cycles import Cycles, Subject, Action, usd

    cy = Cycles()  # CYCLES_URL, else the embedded SQLite ledger
    cy.budgets.set("tenant:acme", usd(50))
    with cy.guard(Subject(tenant="acme"), Action("llm.completion", "openai:gpt-4o"), estimate=usd(0.05)) as g:
        g.commit(usd(0.031))
"""

from cycles.client import AsyncBudgets, AsyncCycles, Budgets, Cycles
from cycles.errors import (
    ActionKindDenied,
    ActionKindNotAllowed,
    ActionQuotaExceeded,
    BudgetClosed,
    BudgetExceeded,
    BudgetFrozen,
    CyclesError,
    DebtOutstanding,
    Denied,
    Forbidden,
    IdempotencyMismatch,
    InternalError,
    InvalidRequest,
    LedgerUnavailable,
    LimitExceeded,
    LoopDetected,
    MaxExtensionsExceeded,
    NotFound,
    OverdraftLimitExceeded,
    PriorityHeadroomExceeded,
    ReservationExpired,
    ReservationFinalized,
    TenantClosed,
    ToolNotAllowed,
    Unauthorized,
    UnitMismatch,
    UnpricedModel,
)
from cycles.guard import AsyncGuard, Guard, ShadowRecord
from cycles.ledger.quotas import Quota, ScopePolicy, args_fingerprint, with_args_fingerprint
from cycles.models import (
    Action,
    Amount,
    Balance,
    Budget,
    Caps,
    CommitOveragePolicy,
    Decision,
    ReservationStatus,
    SignedAmount,
    StandardMetrics,
    Subject,
    Unit,
    credits,
    risk_points,
    tokens,
    usd,
)
from cycles.run import AsyncRun, BatchResult, Run, afor_each, current_run, for_each

__version__ = "0.1.0"

__all__ = [
    "Action",
    "ActionKindDenied",
    "ActionKindNotAllowed",
    "ActionQuotaExceeded",
    "Amount",
    "AsyncBudgets",
    "AsyncCycles",
    "AsyncGuard",
    "AsyncRun",
    "Balance",
    "BatchResult",
    "Budget",
    "BudgetClosed",
    "BudgetExceeded",
    "BudgetFrozen",
    "Budgets",
    "Caps",
    "CommitOveragePolicy",
    "Cycles",
    "CyclesError",
    "DebtOutstanding",
    "Decision",
    "Denied",
    "Forbidden",
    "Guard",
    "IdempotencyMismatch",
    "InternalError",
    "InvalidRequest",
    "LedgerUnavailable",
    "LimitExceeded",
    "LoopDetected",
    "MaxExtensionsExceeded",
    "NotFound",
    "OverdraftLimitExceeded",
    "PriorityHeadroomExceeded",
    "Quota",
    "ReservationExpired",
    "ReservationFinalized",
    "ReservationStatus",
    "Run",
    "ScopePolicy",
    "ShadowRecord",
    "SignedAmount",
    "StandardMetrics",
    "Subject",
    "TenantClosed",
    "ToolNotAllowed",
    "Unauthorized",
    "Unit",
    "UnitMismatch",
    "UnpricedModel",
    "__version__",
    "afor_each",
    "args_fingerprint",
    "credits",
    "current_run",
    "for_each",
    "risk_points",
    "tokens",
    "usd",
    "with_args_fingerprint",
]
