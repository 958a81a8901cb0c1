"""Request bodies for the server tests."""

from __future__ import annotations

import uuid
from typing import Any

USD = "USD_MICROCENTS"


def key() -> str:
    return uuid.uuid4().hex


def amount(value: int, unit: str = USD) -> dict[str, Any]:
    return {"unit": unit, "amount": value}


def reserve_body(tenant: str | None = "acme", estimate: int = 1000, **extra: Any) -> dict[str, Any]:
    subject: dict[str, Any] = {"workflow": "wf-1", "agent": "writer"}
    if tenant is not None:
        subject["tenant"] = tenant
    body: dict[str, Any] = {
        "idempotency_key": key(),
        "subject": subject,
        "action": {"kind": "llm.completion", "name": "openai:gpt-4o"},
        "estimate": amount(estimate),
    }
    body.update(extra)
    return body


def commit_body(actual: int = 800, **extra: Any) -> dict[str, Any]:
    return {"idempotency_key": key(), "actual": amount(actual), **extra}


def release_body(**extra: Any) -> dict[str, Any]:
    return {"idempotency_key": key(), **extra}


def extend_body(by_ms: int = 30_000) -> dict[str, Any]:
    return {"idempotency_key": key(), "extend_by_ms": by_ms}


def decide_body(tenant: str = "acme", estimate: int = 1000) -> dict[str, Any]:
    return {
        "idempotency_key": key(),
        "subject": {"tenant": tenant, "workflow": "wf-1"},
        "action": {"kind": "llm.completion", "name": "openai:gpt-4o"},
        "estimate": amount(estimate),
    }


def event_body(tenant: str = "acme", actual: int = 500, **extra: Any) -> dict[str, Any]:
    return {
        "idempotency_key": key(),
        "subject": {"tenant": tenant, "workflow": "wf-1"},
        "action": {"kind": "tool.search", "name": "web.search"},
        "actual": amount(actual),
        **extra,
    }
