"""Helpers for testing code that uses Cycles (and for testing a Cycles backend)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from cycles.client import AsyncCycles, Cycles
from cycles.models import Amount, Balance, ReservationStatus, Unit

__all__ = [
    "assert_ledger_invariant",
    "assert_ledger_invariant_async",
    "assert_settled",
    "assert_settled_async",
    "check_balances",
    "check_settled",
]

Expected = Amount | Iterable[Amount] | Mapping[Unit, int]
"""What a scope should have spent: an amount, amounts to add up (one per call or tool), or per unit."""


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


def _expected(spent: Expected) -> dict[Unit, int]:
    if isinstance(spent, Amount):
        return {spent.unit: spent.amount}
    if isinstance(spent, Mapping):
        return {Unit(u): int(n) for u, n in spent.items()}
    out: dict[Unit, int] = {}
    for a in spent:
        out[a.unit] = out.get(a.unit, 0) + a.amount
    return out


def check_settled(
    balances: list[Balance], active: list[str], scope: str, spent: Expected | None, *, debt: Expected | None = None
) -> None:
    """The shared end-of-test check of every adapter test: ``active`` (ids of reservations still
    ACTIVE) is empty, ``scope`` spent exactly ``spent`` in each unit (plus ``debt``, if given: what
    went over as debt), and every balance keeps the ledger invariant. ``spent=None`` checks the rest."""
    assert not active, f"reservations left ACTIVE: {active}"
    check_balances(balances)
    want = _expected(spent) if spent is not None else {}
    have = {b.spent.unit: b.spent.amount for b in balances if b.scope == scope and b.spent is not None}
    for unit, amount in want.items():
        assert have.get(unit, 0) == amount, (
            f"{scope} spent {have.get(unit, 0)} {unit.value}, expected {amount} (the priced usage of the calls "
            "that ran plus the charged tools)"
        )
    if debt is not None:
        owed = {b.debt.unit: b.debt.amount for b in balances if b.scope == scope and b.debt is not None}
        for unit, amount in _expected(debt).items():
            assert owed.get(unit, 0) == amount, f"{scope} debt {owed.get(unit, 0)} {unit.value}, expected {amount}"


def _tenant(scope: str) -> str:
    return scope.split("/", 1)[0].removeprefix("tenant:")


def assert_settled(cy: Cycles, scope: str, spent: Expected | None = None, *, debt: Expected | None = None) -> None:
    """``check_settled`` against a client: the reservations of the scope's tenant, every budget."""
    tenant = _tenant(scope)
    active: list[str] = []
    cursor: str | None = None
    while True:
        page = cy.list_reservations(tenant=tenant, status=ReservationStatus.ACTIVE, limit=200, cursor=cursor)
        active += [r.reservation_id for r in page.reservations]
        cursor = page.next_cursor
        if not cursor:
            break
    check_settled(cy.budgets.list(), active, scope, spent, debt=debt)


async def assert_settled_async(
    cy: AsyncCycles, scope: str, spent: Expected | None = None, *, debt: Expected | None = None
) -> None:
    tenant = _tenant(scope)
    active: list[str] = []
    cursor: str | None = None
    while True:
        page = await cy.list_reservations(tenant=tenant, status=ReservationStatus.ACTIVE, limit=200, cursor=cursor)
        active += [r.reservation_id for r in page.reservations]
        cursor = page.next_cursor
        if not cursor:
            break
    check_settled(await cy.budgets.list(), active, scope, spent, debt=debt)
