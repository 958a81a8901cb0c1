"""OpenTelemetry: spans and metrics read back from the SDK's in-memory exporters."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import cycles.otel
from cycles import Action, BudgetExceeded, Cycles, Subject, tokens, usd
from cycles.server import create_app
from cycles.server.testing import ServerThread
from tests.otel.telemetry import Telemetry, instrumented, without_opentelemetry

ADMIN = "otel-admin-key-0123456789"
LLM = Action("llm.completion", "openai:gpt-4o")


@pytest.fixture
def otel() -> Iterator[Telemetry]:
    with instrumented(scope_gauges=True, max_scopes=2) as t:
        yield t


def test_guard_spans_carry_the_decision_and_genai_attributes(otel: Telemetry) -> None:
    with Cycles("memory://", heartbeat=False) as cy:
        cy.budgets.set("tenant:acme", usd(1))
        with cy.guard(Subject(tenant="acme", workflow="wf"), LLM, estimate=usd(0.40)) as g:
            g.commit(usd(0.30), metrics={"tokens_input": 120, "tokens_output": 40})
        with pytest.raises(BudgetExceeded), cy.guard(Subject(tenant="acme"), LLM, estimate=usd(5)):
            pass
    (reserve, denied) = otel.finished("cycles.reserve")
    assert reserve.attributes["cycles.decision"] == "ALLOW"
    assert reserve.attributes["cycles.scope"] == "tenant:acme/workflow:wf"
    assert reserve.attributes["cycles.estimate"] == usd(0.40).amount
    assert reserve.attributes["cycles.unit"] == "USD_MICROCENTS"
    assert (
        reserve.attributes["gen_ai.provider.name"] == "openai"
        and reserve.attributes["gen_ai.request.model"] == "gpt-4o"
    )
    rid = reserve.attributes["cycles.reservation_id"]
    (commit,) = otel.finished("cycles.commit")
    assert commit.attributes["cycles.reservation_id"] == rid
    assert commit.attributes["cycles.actual"] == usd(0.30).amount
    assert (commit.attributes["gen_ai.usage.input_tokens"], commit.attributes["gen_ai.usage.output_tokens"]) == (
        120,
        40,
    )
    # a denial is a decision: an event on the span, not an error status
    assert denied.attributes["cycles.decision"] == "DENY"
    assert denied.attributes["cycles.reason_code"] == "BUDGET_EXCEEDED"
    (event,) = denied.events
    assert event.name == "cycles.denied" and event.attributes["cycles.denied_scope"] == "tenant:acme"
    assert denied.status.status_code.name == "UNSET"

    decisions = {
        (p.attributes["cycles.operation"], p.attributes["cycles.decision"], p.attributes["cycles.reason_code"]): p.value
        for p in otel.points("cycles.decisions")
    }
    assert decisions[("reserve", "ALLOW", "")] == 1
    assert decisions[("reserve", "DENY", "BUDGET_EXCEEDED")] == 1
    assert decisions[("commit", "ALLOW", "")] == 1
    (latency_allow, latency_deny) = sorted(
        otel.points("cycles.reserve.duration"), key=lambda p: p.attributes["cycles.decision"]
    )
    assert latency_allow.count == 1 and latency_deny.count == 1
    (ratio,) = otel.points("cycles.commit.actual_to_estimate")
    assert ratio.count == 1 and ratio.sum == pytest.approx(0.75)


def test_scope_gauges_are_opt_in_and_capped(otel: Telemetry) -> None:
    with Cycles("memory://", heartbeat=False) as cy:
        for name in ("a", "b", "c"):
            cy.budgets.set(f"tenant:{name}", tokens(100 + ord(name)))
        cy.budgets.list()  # the gauges see what the client reads
    remaining = {p.attributes["cycles.scope"]: p.value for p in otel.points("cycles.budget.remaining")}
    assert remaining == {"tenant:a": 197, "tenant:b": 198}  # max_scopes=2: c is left out, and counted
    (dropped,) = otel.points("cycles.budget.scopes_dropped")
    assert dropped.value == 1


def test_one_trace_covers_the_agent_the_client_and_the_server(otel: Telemetry, tmp_path: Path) -> None:
    app = create_app(f"sqlite:///{tmp_path}/ledger.db", admin_key=ADMIN, sweep_interval_s=0, access_log=False)
    with ServerThread(app) as srv:
        httpx.post(
            srv.url + "/admin/budgets",
            json={"scope": "tenant:acme", "amount": {"unit": "USD_MICROCENTS", "amount": usd(1).amount}},
            headers={"X-Admin-API-Key": ADMIN},
        ).raise_for_status()
        key = httpx.post(srv.url + "/admin/keys", json={"tenant": "acme"}, headers={"X-Admin-API-Key": ADMIN}).json()
        agent = otel.tracer_provider.get_tracer("agent")
        with (
            Cycles(srv.url, api_key=key["api_key"], heartbeat=False) as cy,
            agent.start_as_current_span("agent.step"),
            cy.guard(Subject(tenant="acme"), LLM, estimate=usd(0.10)) as g,
        ):
            g.commit(usd(0.05))
    (step,) = otel.finished("agent.step")
    trace_id = step.context.trace_id
    client_reserve = next(
        s
        for s in otel.finished("cycles.reserve")
        if s.kind.name == "CLIENT" and s.parent.span_id == step.context.span_id
    )
    server_span = next(s for s in otel.finished("POST /v1/reservations"))
    server_reserve = next(s for s in otel.finished("cycles.reserve") if s is not client_reserve)
    # agent -> client reserve -> (HTTP, traceparent) -> server request -> server's ledger reserve
    assert {client_reserve.context.trace_id, server_span.context.trace_id, server_reserve.context.trace_id} == {
        trace_id
    }
    assert server_span.parent.span_id == client_reserve.context.span_id
    assert server_reserve.parent.span_id == server_span.context.span_id
    assert server_span.kind.name == "SERVER" and server_span.attributes["http.response.status_code"] == 200
    assert server_reserve.attributes["cycles.decision"] == "ALLOW"
    assert otel.finished("POST /v1/reservations/{reservation_id}/commit")


def test_without_instrument_nothing_is_wrapped() -> None:
    with Cycles("memory://") as cy:
        assert type(cy.ledger).__name__ == "MemoryLedger"


def test_a_missing_opentelemetry_names_the_extra() -> None:
    with without_opentelemetry(), pytest.raises(ImportError, match=r"pip install 'cycles-core\[otel\]'"):
        cycles.otel.instrument()


def test_a_steps_annotations_and_model_reach_every_span_of_it(otel: Telemetry) -> None:
    with Cycles("memory://", heartbeat=False) as cy:
        cy.budgets.set("tenant:acme", usd(1))
        guard = cy.guard(Subject(tenant="acme"), Action("llm.chat", "anthropic/claude-x"), estimate=usd(0.10))
        guard.annotate({"framework.run_id": "r-1", "framework.parent": None})  # None: left out
        with guard as g:
            g.commit(usd(0.05), metrics={"tokens_input": 7, "tokens_output": 3, "model_version": "claude-x-2"})
        with cy.guard(Subject(tenant="acme"), Action("tool.call", "search"), estimate=usd(0.01)):
            pass
    (reserve, tool_reserve) = otel.finished("cycles.reserve")
    (commit, tool_commit) = otel.finished("cycles.commit")
    for span in (reserve, commit):  # a commit request names no model: the guard's step adds it
        assert span.attributes["framework.run_id"] == "r-1" and "framework.parent" not in span.attributes
        assert span.attributes["gen_ai.request.model"] == "claude-x"
        assert span.attributes["gen_ai.provider.name"] == span.attributes["gen_ai.system"] == "anthropic"
        assert span.attributes["gen_ai.operation.name"] == "chat"
    assert commit.attributes["gen_ai.response.model"] == "claude-x-2"
    assert (commit.attributes["gen_ai.usage.input_tokens"], commit.attributes["gen_ai.usage.output_tokens"]) == (7, 3)
    for span in (tool_reserve, tool_commit):
        assert span.attributes["gen_ai.operation.name"] == "execute_tool"
        assert span.attributes["gen_ai.tool.name"] == "search"
        assert "framework.run_id" not in span.attributes  # another step's annotations stay with it


def test_genai_attributes_and_step_records_need_no_opentelemetry() -> None:
    assert cycles.otel.genai_model_attributes("llm.completion", "gpt-4o") == {
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": "gpt-4o",
    }
    assert cycles.otel.genai_model_attributes("graph.node", "plan") == {}
    operations = {
        kind: cycles.otel.genai_model_attributes(kind, "m")["gen_ai.operation.name"]
        for kind in ("llm.embedding", "llm.structured_output", "llm.text_completion", "llm.chat", "model.call")
    }
    assert operations == {
        "llm.embedding": "embeddings",
        "llm.structured_output": "chat",
        "llm.text_completion": "text_completion",
        "llm.chat": "chat",
        "model.call": "chat",
    }
    assert cycles.otel.genai_usage_attributes(input_tokens=0, output_tokens=None) == {"gen_ai.usage.input_tokens": 0}
    with without_opentelemetry(), Cycles("memory://", heartbeat=False) as cy:
        cy.budgets.set("tenant:acme", usd(1))
        with cy.guard(Subject(tenant="acme"), LLM, estimate=usd(0.10)) as g:
            g.annotate({"framework.run_id": "r-1"})
            g.commit(usd(0.05), metrics={"tokens_input": 12, "tokens_output": 4})
        record = cycles.otel.step_attributes(g)
        assert cycles.otel.current_trace_ids() == {}
    assert record["cycles.decision"] == "ALLOW" and record["cycles.reservation_id"] == g.reservation_id
    assert (record["cycles.estimate"], record["cycles.actual"]) == (usd(0.10).amount, usd(0.05).amount)
    assert (record["gen_ai.usage.input_tokens"], record["gen_ai.usage.output_tokens"]) == (12, 4)
    assert record["gen_ai.provider.name"] == "openai" and record["framework.run_id"] == "r-1"
