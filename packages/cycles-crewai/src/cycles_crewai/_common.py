"""What the tool wrappers and the hooks share: the stop exception, the blocked-tool result, the
per-call context a hook hands to a wrapped tool."""

from __future__ import annotations

import re
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Literal

from crewai.hooks import HookAborted
from crewai.tools.tool_failure import ToolExecutionFailedError, ToolFailure, ToolFailureReason

from cycles import Cycles, CyclesError, Guard, Subject, ToolNotAllowed
from cycles.errors import error_for

OnDeny = Literal["soft", "hard"]
"""``"soft"``: a denied tool call comes back to the agent as a blocked result it can react to.
``"hard"``: the denial stops the crew."""

BLOCKED_BY_HOOK = "Tool execution blocked by hook"  # CrewAI's own text for a call a hook blocked


class BudgetStop(HookAborted):
    """Cycles stopped the crew: ``error`` says why (a ``cycles.Denied``, or the ``CyclesError`` that
    made the call impossible to authorize, e.g. an unpriced model or an unreachable ledger)."""

    def __init__(self, error: CyclesError, what: str) -> None:
        super().__init__(f"Cycles stopped the crew: {what}: {error}", source="cycles")
        self.error = error


def blocked_result(tool_name: str, error: CyclesError) -> ToolFailure:
    """The result an agent sees for a tool call Cycles did not allow. A ``ToolFailure``: CrewAI shows
    the agent its text and records the failure (``TaskOutput.tool_failures``, the event bus)."""
    scope = error.details.get("scope")
    where = f" on {scope}" if isinstance(scope, str) else ""
    return ToolFailure(
        message=(
            f"BLOCKED by Cycles: {tool_name!r} was not run ({error.code}{where}: {error.message}). "
            "Do not retry it: continue without it, or escalate to a human."
        ),
        reason=ToolFailureReason.TOOL_REPORTED,
        code=error.code,
        details={"cycles": True, "message": error.message, "scope": scope},
    )


def denial_of(exc: BaseException) -> CyclesError | None:
    """The Cycles decision behind an exception a crew raised, or None if Cycles did not stop it.

    A hard stop surfaces as ``BudgetStop`` (LLM calls, tools priced through ``enable``) or as CrewAI's
    ``ToolExecutionFailedError`` (a ``budgeted(..., on_deny="hard")`` tool)."""
    if isinstance(exc, BudgetStop):
        return exc.error
    if isinstance(exc, ToolExecutionFailedError):
        failure = exc.record.failure
        if failure.details.get("cycles") and failure.code:
            details = {"scope": failure.details.get("scope")}
            message = str(failure.details.get("message") or failure.message)
            if failure.code == ToolNotAllowed.code:
                return ToolNotAllowed(message, details=details)
            return error_for(failure.code, message, details=details)
    return None


@dataclass(slots=True)
class ToolCall:
    """One tool call as the before-tool hook saw it, for the after-tool hook and a wrapped tool."""

    cycles: Cycles
    subject: Subject
    tool_input: dict[str, Any]
    guard: Guard | None = None  # opened by the before-tool hook for a priced tool
    denial: CyclesError | None = None
    errors_before: int = 0  # the task's tool error count before the call


current_tool_call: ContextVar[ToolCall | None] = ContextVar("cycles_crewai_tool_call", default=None)

_NOT_SCOPE_CHARS = re.compile(r"[^a-zA-Z0-9_.-]+")


def scope_value(text: str, default: str) -> str:
    """A CrewAI name (agent role, crew name) as a subject level: ``Support Agent`` -> ``support-agent``."""
    value = _NOT_SCOPE_CHARS.sub("-", text.strip().lower()).strip("-.")[:128]
    return value or default


def crew_attributes(crew: Any, agent: Any, task: Any, llm: Any = None) -> dict[str, str | None]:
    """Where a call sits in the crew, for its OpenTelemetry spans: crew, agent (its role as the GenAI
    ``gen_ai.agent.name``), task, and the provider a CrewAI LLM names."""
    provider = getattr(llm, "provider", None)
    provider = provider if isinstance(provider, str) and provider else None
    return {
        "crewai.crew.id": _text(getattr(crew, "id", None)),
        "crewai.crew.name": _text(getattr(crew, "name", None)),
        "crewai.agent.id": _text(getattr(agent, "id", None)),
        "gen_ai.agent.name": _text(getattr(agent, "role", None)),
        "crewai.task.id": _text(getattr(task, "id", None)),
        "crewai.task.name": _text(getattr(task, "name", None)),
        "gen_ai.provider.name": provider,
        "gen_ai.system": provider,  # its name before semconv 1.37
    }


def _text(value: object) -> str | None:
    return None if value is None else str(value)
