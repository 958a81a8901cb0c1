"""The SDK's own tracing (not OpenTelemetry) and Cycles' OpenTelemetry spans, joined both ways.

- Every step's OpenTelemetry spans (``cycles.reserve``, ``cycles.commit``...) carry the SDK's
  ``openai_agents.trace_id`` and ``openai_agents.span_id`` (the agent span the call runs in) and
  ``gen_ai.agent.name``, so a trace backend can join the two traces.
- Every decision appears in the SDK's trace as a custom span (``cycles.reserve``,
  ``cycles.commit``, ``cycles.release``) under the agent's span, with the same attributes as the
  OpenTelemetry span (``cycles.step_attributes``): scope, estimate, decision and reason, actual,
  the GenAI model and usage, and the OpenTelemetry trace id when one is current.

With the SDK's tracing disabled, nothing is recorded there; without OpenTelemetry, nothing here
imports it.
"""

from __future__ import annotations

from typing import Any

from agents.tracing import custom_span, get_current_span, get_current_trace

from cycles import Denied
from cycles.guard import AsyncGuard
from cycles.otel import current_trace_ids, step_attributes

__all__ = ["annotate", "record"]

_NO_OP = "no-op"  # the id of the SDK's spans and traces while its tracing is disabled
_SPAN_NAMES = {"settled": "cycles.commit", "released": "cycles.release"}


def annotate(guard: AsyncGuard, agent_name: str) -> None:
    """Put the SDK's trace and span ids, and the agent's name, on the step's OpenTelemetry spans."""
    trace, span = get_current_trace(), get_current_span()
    guard.annotate(
        {
            "gen_ai.agent.name": agent_name,
            "openai_agents.trace_id": trace.trace_id if trace is not None and trace.trace_id != _NO_OP else None,
            "openai_agents.span_id": span.span_id if span is not None and span.span_id != _NO_OP else None,
        }
    )


def record(guard: AsyncGuard, denial: Denied | None = None) -> None:
    """The step's decision (or settlement) as a custom span in the SDK's current trace."""
    trace = get_current_trace()
    if trace is None or trace.trace_id == _NO_OP:
        return
    data: dict[str, Any] = {**step_attributes(guard), **current_trace_ids()}
    if denial is not None:
        data.update({"cycles.decision": "DENY", "cycles.reason_code": denial.reason_code})
    span = custom_span(_SPAN_NAMES.get(guard.state, "cycles.reserve"), data=data)
    span.start()
    span.finish()
