"""The governance spec's funding operations (``fundBudget``): their types and the checks that need
no ledger state. ``rules.fund`` applies them inside a store transaction and ``lua/funding.lua``
mirrors it for Redis; the arithmetic itself is ``rules.apply_funding``.

What each operation does to a budget (``remaining = allocated - spent - reserved - debt`` always):

=============  ==============================================================  ======================
operation      effect                                                          refused when
=============  ==============================================================  ======================
CREDIT         allocated += amount (spent, reserved, debt kept)                amount is 0
DEBIT          allocated -= amount                                             amount is 0; remaining
                                                                               would go below zero
RESET          allocated = amount (a new ceiling; remaining may go negative)
RESET_SPENT    allocated = amount, spent = ``spent`` (default 0): a new        ``spent`` in another unit
               billing period; reserved and debt carried over
REPAY_DEBT     debt -= amount, spent += amount, allocated += amount: the       amount is 0, or more
               consumption that ran into debt is paid for and becomes spent    than the debt
=============  ==============================================================  ======================

Every operation is refused on a FROZEN or CLOSED budget, in a unit the budget does not have, and
past the largest amount the ledger holds. CREDIT keeps the debt, as the spec says (protocol v0's
``fund_budget`` repays debt first: it is REPAY_DEBT of what is owed, then CREDIT of the rest).
RESET and RESET_SPENT accept 0 (a zero ceiling stops all spending). On a recurring budget the
period rolls over first, and the operation changes the current period only: the per-period
allocation stays what ``set_budget`` made it.

Idempotency: with a key, the first result is remembered (per tenant, endpoint ``fund``) and the same
request again returns it (``replayed=True``, nothing applied twice); the same key with another
request raises ``IdempotencyMismatch``.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict

from cycles.errors import BudgetExceeded, InvalidRequest, UnitMismatch
from cycles.models import Amount, Balance, Unit

__all__ = [
    "ENDPOINT",
    "FundingOperation",
    "FundingRequest",
    "FundingResult",
    "check_request",
    "debit_refused",
    "repay_refused",
]

#: The endpoint name funding idempotency records are kept under (beside reserve, commit, ...).
ENDPOINT = "fund"


class FundingOperation(StrEnum):
    CREDIT = "CREDIT"
    DEBIT = "DEBIT"
    RESET = "RESET"
    RESET_SPENT = "RESET_SPENT"
    REPAY_DEBT = "REPAY_DEBT"


#: Operations that must move something: an amount of 0 is a mistake, not a no-op to record.
_POSITIVE = frozenset({FundingOperation.CREDIT, FundingOperation.DEBIT, FundingOperation.REPAY_DEBT})


class FundingRequest(BaseModel):
    """What a funding operation asks for: its idempotency fingerprint is taken of this."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    scope: str
    unit: Unit
    operation: FundingOperation
    amount: Amount
    spent: Amount | None = None


class FundingResult(BaseModel):
    """The budget before and after one funding operation. ``replayed``: an idempotent replay of an
    earlier result (nothing was applied this time). ``before``/``after`` carry every figure the
    ledger has (an http:// ledger knows what the spec's response carries: reserved is derived)."""

    model_config = ConfigDict(extra="forbid")

    operation: FundingOperation
    scope: str
    unit: Unit
    before: Balance
    after: Balance
    funded_at_ms: int
    replayed: bool = False

    def to_wire(self) -> dict[str, Any]:
        """The spec's BudgetFundingResponse."""
        unit = self.unit.value

        def amount(b: Balance, name: str) -> dict[str, Any]:
            value = getattr(b, name)
            return {"unit": unit, "amount": value.amount if value is not None else 0}

        out: dict[str, Any] = {"operation": self.operation.value}
        for name in ("allocated", "remaining", "debt", "spent"):
            out[f"previous_{name}"] = amount(self.before, name)
            out[f"new_{name}"] = amount(self.after, name)
        from cycles.ledger.records import iso_ms  # records imports the stores, which import rules

        out["timestamp"] = iso_ms(self.funded_at_ms)
        return out


def check_request(
    scope: str,
    unit: Unit,
    operation: FundingOperation | str,
    amount: Amount,
    spent: Amount | None,
    idempotency_key: str | None = None,
) -> FundingRequest:
    """The checks that need no ledger state, made by every backend before it touches the store
    (the http:// ledger too, so a bad call never leaves the process)."""
    if idempotency_key is not None and not 1 <= len(idempotency_key) <= 256:
        raise InvalidRequest("idempotency_key must be 1 to 256 characters")
    try:
        op = FundingOperation(operation)
    except ValueError:
        names = ", ".join(o.value for o in FundingOperation)
        raise InvalidRequest(f"operation must be one of {names}", details={"operation": str(operation)}) from None
    unit = Unit(unit)
    for name, value in (("amount", amount), ("spent", spent)):
        if value is not None and value.unit != unit:
            raise UnitMismatch(
                f"{name} is in {value.unit.value} but the budget's unit is {unit.value}",
                details={"requested_unit": value.unit.value, "expected_units": [unit.value]},
            )
    if op in _POSITIVE and amount.amount <= 0:
        raise InvalidRequest(f"{op.value} needs an amount above 0", details={"operation": op.value})
    if spent is not None and op is not FundingOperation.RESET_SPENT:
        raise InvalidRequest("spent is only for RESET_SPENT", details={"operation": op.value})
    return FundingRequest(scope=scope, unit=unit, operation=op, amount=amount, spent=spent)


# The refusals that depend on the budget: built here so rules.py and the Redis error mapping
# raise the same exception with the same message and details.


def debit_refused(scope: str, unit: str, remaining: int, amount: int) -> BudgetExceeded:
    return BudgetExceeded(
        f"DEBIT of {amount} would take the remaining {remaining} of {scope} ({unit}) below zero",
        details={"scope": scope, "unit": unit, "remaining": remaining, "requested": amount},
    )


def repay_refused(scope: str, unit: str, debt: int, amount: int) -> InvalidRequest:
    return InvalidRequest(
        f"REPAY_DEBT of {amount} is more than the debt of {scope} ({unit}), which is {debt}",
        details={"scope": scope, "unit": unit, "debt": debt, "requested": amount},
    )
