"""Action authority for a CrewAI support crew, offline.

A support agent reads a case, notes it, updates the CRM and tries to email the customer. Model calls
spend a USD budget; the tools spend a separate RISK_POINTS budget that each run gets afresh: reading
costs 1 point, a note 2, a CRM update 25, an email to a customer 40. At 60 points per run the email
(1 + 2 + 25 + 40 = 68) is denied before it is sent, the agent is told so, and it escalates instead.

The model is scripted (no network, no API key); everything else is real CrewAI and a real ledger.

    python examples/crewai_action_authority.py
"""

from __future__ import annotations

import json
import os
from typing import Any

for _name, _value in {
    "CREWAI_DISABLE_TELEMETRY": "true",
    "OTEL_SDK_DISABLED": "true",
    "CREWAI_TRACING_ENABLED": "false",
    "CREWAI_DISABLE_VERSION_CHECK": "true",
}.items():
    os.environ.setdefault(_name, _value)

from crewai import Agent, Crew, CrewOutput, Task  # noqa: E402
from crewai.events.types.llm_events import LLMCallType  # noqa: E402
from crewai.llms.base_llm import BaseLLM, llm_call_context  # noqa: E402
from crewai.tools import tool  # noqa: E402
from pydantic import Field  # noqa: E402

import cycles_crewai  # noqa: E402
from cycles import Cycles, ReservationStatus, Subject, Unit, risk_points, usd  # noqa: E402
from cycles.pricing import approx_tokens, register_price  # noqa: E402

RISK = {"read_case": 1, "add_note": 2, "update_crm": 25, "email_customer": 40}
sent: list[str] = []
escalations: list[str] = []


@tool("read_case")
def read_case(case_id: str) -> str:
    """Read a support case."""
    return f"Case {case_id}: ACME-9 printer jams on every page since the 2.3 firmware update."


@tool("add_note")
def add_note(case_id: str, note: str) -> str:
    """Add an internal note to a case."""
    return f"note added to {case_id}"


@tool("update_crm")
def update_crm(case_id: str, status: str) -> str:
    """Set a case's status in the CRM."""
    return f"{case_id} is now {status}"


@tool("email_customer")
def email_customer(case_id: str, body: str) -> str:
    """Email the customer of a case."""
    sent.append(body)
    return "email sent"


@tool("escalate")
def escalate(case_id: str, reason: str) -> str:
    """Hand a case to a human."""
    escalations.append(f"case {case_id}: {reason}")
    return f"{case_id} escalated to the support lead"


def _call(name: str, **args: str) -> list[dict[str, Any]]:
    function = {"name": name, "arguments": json.dumps(args)}
    return [{"id": f"call_{name}", "type": "function", "function": function}]


class ScriptedModel(BaseLLM):
    """Stands in for a real model: plays back its script (an entry may be a function of the last
    message, to react to a tool result), reports token usage and emits CrewAI's LLM events."""

    script: list[Any] = Field(default_factory=list)
    turn: int = 0

    def supports_function_calling(self) -> bool:
        return True

    def get_input_tokens_count(self, messages: Any, tools: Any = None, response_model: Any = None) -> int:
        return approx_tokens(json.dumps(messages, default=str))  # what a real provider would count

    def call(
        self,
        messages: Any,
        tools: Any = None,
        callbacks: Any = None,
        available_functions: Any = None,
        from_task: Any = None,
        from_agent: Any = None,
        response_model: Any = None,
    ) -> Any:
        with llm_call_context():
            who = {"from_task": from_task, "from_agent": from_agent}
            self._emit_call_started_event(messages=messages, tools=tools, **who)
            reply = self.script[self.turn]
            if callable(reply):
                reply = reply(str(messages[-1].get("content")))
            self.turn += 1
            call_type = LLMCallType.TOOL_CALL if isinstance(reply, list) else LLMCallType.LLM_CALL
            usage = {"prompt_tokens": 900, "completion_tokens": 150}
            self._emit_call_completed_event(response=reply, call_type=call_type, usage=usage, **who)
            return reply


def main() -> dict[str, Any]:
    sent.clear()
    escalations.clear()
    register_price("scripted-support-model", input_per_mtok=2.5, output_per_mtok=10)
    cy = Cycles("memory://")
    cy.budgets.set("tenant:acme", usd(5))  # model spend for the tenant

    model = ScriptedModel(
        model="scripted-support-model",
        script=[
            _call("read_case", case_id="42"),
            _call("add_note", case_id="42", note="Firmware 2.3 regression; workaround: roll back to 2.2."),
            _call("update_crm", case_id="42", status="workaround-sent"),
            _call("email_customer", case_id="42", body="Please roll your printer back to firmware 2.2."),
            lambda told: (
                _call("escalate", case_id="42", reason="email blocked by the risk budget")
                if "BLOCKED" in told
                else "Case 42 resolved and the customer emailed."
            ),
            "Case 42 noted and updated; the customer email was escalated to the support lead.",
        ],
    )
    agent = Agent(
        role="Support Agent",
        goal="Resolve support cases",
        backstory="Tier-1 support.",
        llm=model,
        tools=[read_case, add_note, update_crm, email_customer, escalate],
        verbose=False,
    )
    task = Task(name="case-42", description="Resolve case 42.", expected_output="What was done.", agent=agent)

    # keep_run_budgets: keep the run's budget row to print it below (by default it is deleted at the end)
    hooks = cycles_crewai.enable(
        cy, Subject(tenant="acme"), tool_costs=RISK, run_budgets=[risk_points(60)], keep_run_budgets=True
    )
    with hooks:
        result = Crew(agents=[agent], tasks=[task], verbose=False).kickoff()
    assert isinstance(result, CrewOutput)  # not a streaming crew

    (run,) = hooks.runs
    risk = cy.budgets.get(f"tenant:acme/workflow:{run}", unit=Unit.RISK_POINTS)
    money = cy.budgets.get("tenant:acme", unit=Unit.USD_MICROCENTS)
    tools = [
        r.action.name
        for r in cy.list_reservations(tenant="acme", status=ReservationStatus.COMMITTED).reservations
        if r.action.kind == "tool.call"
    ]
    print(f"answer:      {result.raw}")
    print(f"tools run:   {', '.join(sorted(tools))} (+ escalate, unpriced)")
    print(f"emails sent: {len(sent)}")
    print(f"escalated:   {'; '.join(escalations)}")
    print(f"risk points: {risk.spent} of {risk.allocated} for run {run}")
    print(f"model spend: {money.spent} of {money.allocated}")
    return {
        "answer": result.raw,
        "tools": sorted(tools),
        "emails": list(sent),
        "escalations": list(escalations),
        "risk_spent": risk.spent,
    }


if __name__ == "__main__":
    main()
