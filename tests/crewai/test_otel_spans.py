"""OpenTelemetry: a crew's Cycles spans nest under the span its kickoff runs in, name the crew,
agent and task they belong to, and carry the GenAI attributes with exact token counts.

CrewAI's own telemetry is OpenTelemetry on a private provider whose spans are never made current
(and it is off in these tests), so the crew's place is given by attributes, and the parent is the
span the caller (or an instrumentation of CrewAI) has current around the kickoff."""

from __future__ import annotations

from pathlib import Path

import pytest
from crewai_fakes import MODEL, ScriptedLLM, crew_of, lookup, tool_call

import cycles_crewai
from cycles import BudgetExceeded, Cycles, Subject, risk_points, usd
from cycles.testing import assert_settled
from cycles_crewai import BudgetStop
from tests.otel.telemetry import instrumented, without_opentelemetry


@pytest.mark.parametrize("ledger", ["memory", "sqlite"])
def test_cycles_spans_nest_under_the_kickoff_span_and_name_the_crew(
    subject: Subject, tmp_path: Path, ledger: str
) -> None:
    llm = ScriptedLLM(script=[tool_call("lookup", q="x"), "Thought: done.\nFinal Answer: ok"])
    crew = crew_of(llm, [lookup])
    with instrumented() as otel:  # clients made after instrument() are traced
        cy = Cycles("memory://" if ledger == "memory" else f"sqlite:///{tmp_path / 'l.db'}")
        cy.budgets.set("tenant:acme", usd("0.50"))  # the first call's $0.30, not the second's estimate
        cy.budgets.set("tenant:acme", risk_points(10))
        with (
            otel.tracer_provider.get_tracer("app").start_as_current_span("crew.kickoff"),
            cycles_crewai.enable(cy, subject, tool_costs={"lookup": 1}),
            pytest.raises(BudgetStop) as stopped,
        ):
            crew.kickoff()
        assert isinstance(stopped.value.error, BudgetExceeded)
        assert_settled(cy, "tenant:acme")
        cy.close()

    (root,) = otel.finished("crew.kickoff")
    llm_allowed, tool_reserve, llm_denied = otel.finished("cycles.reserve")
    llm_commit, tool_commit = otel.finished("cycles.commit")
    (agent,), (task,) = crew.agents, crew.tasks
    for span in (llm_allowed, tool_reserve, llm_denied, llm_commit, tool_commit):
        assert span.context.trace_id == root.context.trace_id
        assert otel.ancestors(span) == ["crew.kickoff"]
        assert span.attributes["crewai.crew.id"] == str(crew.id)
        assert span.attributes["crewai.agent.id"] == str(agent.id)
        assert span.attributes["gen_ai.agent.name"] == "Support Agent"
        assert (span.attributes["crewai.task.id"], span.attributes["crewai.task.name"]) == (str(task.id), "handle-case")
    for span in (llm_allowed, llm_denied, llm_commit):
        assert span.attributes["gen_ai.operation.name"] == "chat"
        assert span.attributes["gen_ai.request.model"] == MODEL
        assert span.attributes["gen_ai.provider.name"] == span.attributes["gen_ai.system"] == llm.provider
    assert llm_commit.attributes["gen_ai.response.model"] == MODEL
    assert (
        llm_commit.attributes["gen_ai.usage.input_tokens"],
        llm_commit.attributes["gen_ai.usage.output_tokens"],
    ) == (
        1000,
        500,
    )
    assert llm_commit.attributes["cycles.actual"] == usd("0.30").amount
    assert (tool_reserve.attributes["gen_ai.operation.name"], tool_reserve.attributes["gen_ai.tool.name"]) == (
        "execute_tool",
        "lookup",
    )
    assert tool_commit.attributes["cycles.unit"] == "RISK_POINTS"
    assert llm_denied.attributes["cycles.decision"] == "DENY"
    assert [(e.name, e.attributes["cycles.reason_code"]) for e in llm_denied.events] == [
        ("cycles.denied", "BUDGET_EXCEEDED")
    ]


def test_without_opentelemetry_the_hooks_work_the_same(cy: Cycles, subject: Subject) -> None:
    cy.budgets.set("tenant:acme", usd(5))
    llm = ScriptedLLM(script=["Thought: easy.\nFinal Answer: ok"])
    with without_opentelemetry(), cycles_crewai.enable(cy, subject):
        crew_of(llm).kickoff()
    assert cy.budgets.get("tenant:acme").spent == usd("0.30")
