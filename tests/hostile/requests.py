"""Request builders for the hostile suite (in process and as JSON bodies)."""

from __future__ import annotations

import uuid
from typing import Any

from cycles.models import (
    Action,
    Amount,
    CommitRequest,
    ReleaseRequest,
    ReservationCreateRequest,
    Subject,
    Unit,
)

USD = Unit.USD_MICROCENTS


def key() -> str:
    return uuid.uuid4().hex


def reserve(tenant: str, estimate: int = 1000, **extra: Any) -> ReservationCreateRequest:
    return ReservationCreateRequest(
        idempotency_key=key(),
        subject=Subject(tenant=tenant, workflow="wf"),
        action=Action("llm.completion", "m"),
        estimate=Amount(unit=USD, amount=estimate),
        **extra,
    )


def commit(actual: int = 500) -> CommitRequest:
    return CommitRequest(idempotency_key=key(), actual=Amount(unit=USD, amount=actual))


def release() -> ReleaseRequest:
    return ReleaseRequest(idempotency_key=key())


def reserve_body(tenant: str, estimate: int = 1000, **extra: Any) -> dict[str, Any]:
    return {
        "idempotency_key": key(),
        "subject": {"tenant": tenant, "workflow": "wf"},
        "action": {"kind": "llm.completion", "name": "m"},
        "estimate": {"unit": USD.value, "amount": estimate},
        **extra,
    }
