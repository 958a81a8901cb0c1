"""OpenTelemetry: a graph's Cycles spans nest under the span current in its node, carry the
LangChain run tree's ids and the GenAI attributes with exact token counts; denials are events."""

from __future__ import annotations

from typing import Annotated, Any, TypedDict
from uuid import UUID

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AnyMessage
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from langgraph_fakes import CALL_COST, FakeChat, reply, scripted, spent
from opentelemetry import trace

from cycles import BudgetExceeded, Cycles, Subject, usd
from cycles.testing import assert_settled
from cycles_langgraph import CyclesCallbackHandler
from tests.otel.telemetry import instrumented, without_opentelemetry


class State(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]


class ModelRuns(BaseCallbackHandler):
    """Records the LangChain run id of every chat model call and its parent's."""

    def __init__(self) -> None:
        self.runs: list[tuple[UUID, UUID | None]] = []

    def on_chat_model_start(self, serialized: Any, messages: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self.runs.append((run_id, kwargs.get("parent_run_id")))


def graph_calling(model: FakeChat, tracer: trace.Tracer) -> Any:
    """One node that calls the model inside a span of its own, as an instrumented node would."""

    def agent(state: State) -> dict[str, Any]:
        with tracer.start_as_current_span("node.agent"):
            return {"messages": [model.invoke(state["messages"])]}

    g = StateGraph(State)
    g.add_node("agent", agent)
    g.add_edge(START, "agent")
    g.add_edge("agent", END)
    return g.compile()


def test_cycles_spans_nest_under_the_node_span_with_genai_attributes(
    backend: str, subject: Subject, tenant: str
) -> None:
    model = scripted(reply("one"), reply("two"))
    runs = ModelRuns()
    with instrumented() as otel, Cycles(backend) as cy:  # clients made after instrument() are traced
        cy.budgets.set(f"tenant:{tenant}", usd("0.50"))  # one call's $0.30, then less than an estimate
        tracer = otel.tracer_provider.get_tracer("app")
        app = graph_calling(model, tracer)
        config = {"callbacks": [runs, CyclesCallbackHandler(cy, subject)], "configurable": {"thread_id": "th-1"}}
        with tracer.start_as_current_span("agent.run"):
            app.invoke({"messages": [("user", "hi")]}, config=config)
            with pytest.raises(BudgetExceeded):
                app.invoke({"messages": [("user", "again")]}, config=config)

        (run_id, parent_id), (denied_run, _) = runs.runs
        allowed, denied = otel.finished("cycles.reserve")
        (commit,) = otel.finished("cycles.commit")
        (root,) = otel.finished("agent.run")
        for span in (allowed, commit, denied):
            assert span.context.trace_id == root.context.trace_id
            assert otel.ancestors(span)[0] == "node.agent" and otel.ancestors(span)[-1] == "agent.run"
            assert span.attributes["langgraph.node"] == "agent"
            assert span.attributes["langgraph.thread_id"] == "th-1"
        assert allowed.attributes["langchain.run_id"] == commit.attributes["langchain.run_id"] == str(run_id)
        assert allowed.attributes["langchain.parent_run_id"] == str(parent_id)
        assert denied.attributes["langchain.run_id"] == str(denied_run)
        for span in (allowed, commit):
            assert span.attributes["gen_ai.operation.name"] == "chat"
            assert span.attributes["gen_ai.request.model"] == "fake-model"
            assert span.attributes["gen_ai.provider.name"] == span.attributes["gen_ai.system"] == "fake"
        assert commit.attributes["gen_ai.response.model"] == "fake-model"
        assert (commit.attributes["gen_ai.usage.input_tokens"], commit.attributes["gen_ai.usage.output_tokens"]) == (
            1000,
            500,
        )
        assert commit.attributes["cycles.actual"] == CALL_COST.amount
        assert denied.attributes["cycles.decision"] == "DENY"
        assert [e.name for e in denied.events] == ["cycles.denied"]
        assert denied.events[0].attributes["cycles.reason_code"] == "BUDGET_EXCEEDED"
        assert spent(cy, f"tenant:{tenant}") == CALL_COST.amount
        assert_settled(cy, f"tenant:{tenant}")


def test_without_opentelemetry_the_handler_works_the_same(cy: Cycles, subject: Subject, tenant: str) -> None:
    cy.budgets.set(f"tenant:{tenant}", usd(5))
    model = scripted(reply("one"))
    with without_opentelemetry():
        model.invoke("hi", config={"callbacks": [CyclesCallbackHandler(cy, subject)]})
    assert spent(cy, f"tenant:{tenant}") == CALL_COST.amount


def test_a_text_completion_model_is_not_called_chat(backend: str, subject: Subject, tenant: str) -> None:
    from langchain_core.language_models.fake import FakeListLLM

    with instrumented() as otel, Cycles(backend) as cy:
        cy.budgets.set(f"tenant:{tenant}", usd(1))
        llm = FakeListLLM(responses=["done"])
        handler = CyclesCallbackHandler(cy, subject, estimate=usd("0.01"))
        assert llm.invoke("complete this", config={"callbacks": [handler]}) == "done"
        (reserved,) = otel.finished("cycles.reserve")
        assert reserved.attributes["gen_ai.operation.name"] == "text_completion"
        assert_settled(cy, f"tenant:{tenant}")
