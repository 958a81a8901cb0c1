"""The SDK's own tracing and Cycles' OpenTelemetry spans: every decision appears in the agent's
trace (custom spans, read back with a TracingProcessor) and every Cycles span names that trace."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agents import Agent, Runner, set_trace_processors, set_tracing_disabled
from agents.testing import ModelStep
from agents.tracing import Span, Trace, TracingProcessor
from agents_fakes import MODEL, SUBJECT, WORKFLOW, answer, priced, scripted, search, tool_round

from cycles import AsyncCycles, BudgetExceeded, usd
from cycles.testing import assert_settled_async
from cycles_openai_agents import CyclesModel, CyclesRunHooks
from tests.otel.telemetry import instrumented, without_opentelemetry


class ProviderDown(Exception):
    pass


class Collected(TracingProcessor):
    """Every trace and span the SDK finishes, in memory."""

    def __init__(self) -> None:
        self.traces: list[Trace] = []
        self.spans: list[Span[Any]] = []

    def on_trace_start(self, trace: Trace) -> None:
        self.traces.append(trace)

    def on_trace_end(self, trace: Trace) -> None:
        pass

    def on_span_start(self, span: Span[Any]) -> None:
        pass

    def on_span_end(self, span: Span[Any]) -> None:
        self.spans.append(span)

    def shutdown(self) -> None:
        pass

    def force_flush(self) -> None:
        pass

    def of_type(self, kind: str) -> list[Span[Any]]:
        return [s for s in self.spans if s.span_data.type == kind]

    def cycles(self, name: str) -> list[dict[str, Any]]:
        return [s.span_data.export()["data"] for s in self.of_type("custom") if s.span_data.export()["name"] == name]


@pytest.fixture
def sdk_traces() -> Iterator[Collected]:
    """The SDK's tracing on (conftest turns it off), into this processor only: nothing is exported."""
    collected = Collected()
    set_trace_processors([collected])
    set_tracing_disabled(False)
    try:
        yield collected
    finally:
        set_tracing_disabled(True)
        set_trace_processors([])


@pytest.mark.parametrize("ledger", ["memory", "sqlite"])
async def test_decisions_appear_in_the_agents_trace_and_the_otel_spans_name_it(
    sdk_traces: Collected, tmp_path: Path, ledger: str
) -> None:
    steps = [tool_round(("search", {"query": "cycles"}), tokens=(1000, 200)), answer("found it", tokens=(1500, 50))]
    with instrumented() as otel:  # clients made after instrument() are traced
        cy = AsyncCycles("memory://" if ledger == "memory" else f"sqlite:///{tmp_path / 'l.db'}")
        await cy.budgets.set(WORKFLOW, usd(1))
        hooks = CyclesRunHooks(cy, subject=SUBJECT, model=MODEL)
        result = await hooks.run(Agent(name="researcher", model=scripted(steps), tools=[search]), "look it up")
        assert result.final_output == "found it"
        assert (await cy.budgets.get(WORKFLOW)).spent == priced(*steps)
        await assert_settled_async(cy, "tenant:acme")
        await cy.aclose()

    (trace,) = sdk_traces.traces
    (agent_span,) = sdk_traces.of_type("agent")
    # the SDK's trace holds every decision, under the agent's span, with the usage of each call
    llm_commits = [d for d in sdk_traces.cycles("cycles.commit") if d["cycles.action.kind"] == "llm.completion"]
    assert [(d["gen_ai.usage.input_tokens"], d["gen_ai.usage.output_tokens"]) for d in llm_commits] == [
        (1000, 200),
        (1500, 50),
    ]
    assert [d["cycles.actual"] for d in llm_commits] == [priced(s).amount for s in steps]
    reserves = sdk_traces.cycles("cycles.reserve")
    assert {d["cycles.action.name"] for d in reserves} == {MODEL, "search"}
    assert all(d["cycles.decision"] == "ALLOW" and d["cycles.scope"].startswith(WORKFLOW) for d in reserves)
    # ...each under the span it decided on: a model call's under its turn of the agent, a tool's under its own
    by_id = {s.span_id: s for s in sdk_traces.spans}
    decisions = [s for s in sdk_traces.of_type("custom") if s.span_data.name.startswith("cycles.")]
    assert len(decisions) == 6  # two model calls and a tool call, each reserved and committed
    for span in decisions:
        parent = by_id[span.parent_id]
        assert span.trace_id == trace.trace_id
        if span.span_data.data["cycles.action.kind"] == "llm.completion":
            assert parent.span_data.export()["name"] == "turn" and parent.parent_id == agent_span.span_id
        else:
            assert parent.span_data.type == "function" and parent.span_data.name == "search"

    # every Cycles OTel span of a step names the SDK's trace and the agent's span: the two join
    otel_commits = [s for s in otel.finished("cycles.commit") if s.attributes["cycles.action.kind"] == "llm.completion"]
    assert [
        (s.attributes["gen_ai.usage.input_tokens"], s.attributes["gen_ai.usage.output_tokens"]) for s in otel_commits
    ] == [(1000, 200), (1500, 50)]
    step_spans = otel.finished("cycles.reserve") + otel.finished("cycles.commit")
    assert len(step_spans) == 6  # two model calls and a tool call, reserved and committed
    for span in step_spans:
        assert span.attributes["openai_agents.trace_id"] == trace.trace_id
        assert span.attributes["gen_ai.agent.name"] == "researcher"
    assert {s.attributes["openai_agents.span_id"] for s in step_spans} == {d.parent_id for d in decisions}
    llm_spans = [s for s in step_spans if s.attributes["cycles.action.kind"] == "llm.completion"]
    assert {s.attributes["gen_ai.request.model"] for s in llm_spans} == {MODEL}
    assert {s.attributes["gen_ai.operation.name"] for s in llm_spans} == {"chat"}
    tool_spans = [s for s in step_spans if s.attributes["cycles.action.kind"] == "tool.call"]
    assert {s.attributes["gen_ai.tool.name"] for s in tool_spans} == {"search"}


async def test_a_denial_is_a_span_event_and_a_decision_in_the_agents_trace(sdk_traces: Collected) -> None:
    with instrumented() as otel:
        cy = AsyncCycles("memory://")
        await cy.budgets.set(WORKFLOW, usd(0))
        hooks = CyclesRunHooks(cy, subject=SUBJECT, model=MODEL)
        with pytest.raises(BudgetExceeded):
            await hooks.run(Agent(name="researcher", model=scripted([answer()])), "hi")
        await cy.aclose()

    (denied,) = otel.finished("cycles.reserve")
    assert denied.attributes["cycles.decision"] == "DENY"
    assert [(e.name, e.attributes["cycles.reason_code"]) for e in denied.events] == [
        ("cycles.denied", "BUDGET_EXCEEDED")
    ]
    (trace,) = sdk_traces.traces
    assert denied.attributes["openai_agents.trace_id"] == trace.trace_id
    (decision,) = sdk_traces.cycles("cycles.reserve")
    assert (decision["cycles.decision"], decision["cycles.reason_code"]) == ("DENY", "BUDGET_EXCEEDED")
    assert "cycles.reservation_id" not in decision


async def test_without_opentelemetry_the_agents_trace_still_gets_the_decisions(sdk_traces: Collected) -> None:
    steps = [answer("hi", tokens=(1000, 200))]
    with without_opentelemetry():
        cy = AsyncCycles("memory://")
        await cy.budgets.set(WORKFLOW, usd(1))
        hooks = CyclesRunHooks(cy, subject=SUBJECT, model=MODEL)
        await hooks.run(Agent(name="researcher", model=scripted(steps)), "hi")
        assert (await cy.budgets.get(WORKFLOW)).spent == priced(*steps)
        await cy.aclose()
    (commit,) = sdk_traces.cycles("cycles.commit")
    assert (commit["gen_ai.usage.input_tokens"], commit["gen_ai.usage.output_tokens"]) == (1000, 200)
    assert "otel.trace_id" not in commit


async def test_a_failed_model_call_is_a_release_in_the_agents_trace(sdk_traces: Collected) -> None:
    cy = AsyncCycles("memory://")
    await cy.budgets.set(WORKFLOW, usd(1))
    hooks = CyclesRunHooks(cy, subject=SUBJECT)
    model = CyclesModel(scripted([ModelStep.raise_error(ProviderDown("503"))]), hooks, name=MODEL)

    with pytest.raises(ProviderDown):
        await Runner.run(Agent(name="researcher", model=model), "hi", hooks=hooks)
    await cy.aclose()

    (reserve,) = sdk_traces.cycles("cycles.reserve")
    (release,) = sdk_traces.cycles("cycles.release")
    assert release["cycles.reservation_id"] == reserve["cycles.reservation_id"]
    assert "cycles.actual" not in release
