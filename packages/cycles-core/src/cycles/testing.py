"""Helpers for testing code that uses Cycles (and for testing a Cycles backend)."""

from __future__ import annotations

from cycles.client import AsyncCycles, Cycles
from cycles.models import Balance

__all__ = ["assert_ledger_invariant", "assert_ledger_invariant_async", "check_balances"]


def check_balances(balances: list[Balance]) -> None:
    """Raise AssertionError unless every balance satisfies the protocol's ledger invariant:
    ``remaining = allocated - spent - reserved - debt``, amounts non-negative, one unit per balance,
    and nothing reserved or spent beyond the allocation unless it is recorded as debt or over-limit."""
    for b in balances:
        parts = {"allocated": b.allocated, "spent": b.spent, "reserved": b.reserved, "debt": b.debt}
        missing = [k for k, v in parts.items() if v is None]
        assert not missing, f"{b.scope}: balance lacks {missing}"
        a, s, r, d = (v.amount for v in parts.values() if v is not None)
        units = {v.unit for v in parts.values() if v is not None} | {b.remaining.unit}
        assert len(units) == 1, f"{b.scope}: mixed units {units}"
        assert min(a, s, r, d) >= 0, f"{b.scope}: negative component in {parts}"
        assert b.remaining.amount == a - s - r - d, (
            f"{b.scope}: remaining {b.remaining.amount} != allocated {a} - spent {s} - reserved {r} - debt {d}"
        )
        if d == 0 and not b.is_over_limit:
            assert s + r <= a, f"{b.scope}: spent {s} + reserved {r} exceed allocated {a} with no debt recorded"


def assert_ledger_invariant(cy: Cycles) -> None:
    check_balances(cy.budgets.list())


async def assert_ledger_invariant_async(cy: AsyncCycles) -> None:
    check_balances(await cy.budgets.list())
