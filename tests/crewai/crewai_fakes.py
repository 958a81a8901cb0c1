"""A scripted CrewAI model and small crews for the adapter tests (no network, no API key)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from crewai import Agent, Crew, CrewOutput, Task
from crewai.events.types.llm_events import LLMCallType
from crewai.hooks import HookAborted
from crewai.llms.base_llm import BaseLLM, llm_call_context
from crewai.tools import BaseTool, tool
from crewai.utilities.types import LLMMessage
from pydantic import Field

from cycles.pricing import approx_tokens

MODEL = "canned-model"
USAGE = {"prompt_tokens": 1000, "completion_tokens": 500}  # $0.30 at the test price


def tool_call(name: str, **args: Any) -> list[dict[str, Any]]:
    """A native tool-call reply, as OpenAI-style providers return it."""
    function = {"name": name, "arguments": json.dumps(args)}
    return [{"id": f"call_{name}", "type": "function", "function": function}]


def react_call(name: str, **args: Any) -> str:
    """The same tool call in CrewAI's text (ReAct) format, for models without native tool calling."""
    return f"Thought: I need {name}.\nAction: {name}\nAction Input: {json.dumps(args)}"


class BilledFailure(ValueError):
    """A response the provider returned and billed, which then failed (e.g. structured output that
    did not validate): CrewAI's providers count its tokens on the LLM, then emit a failed event."""


class ScriptedLLM(BaseLLM):
    """Replies from a script: a string is a text answer, a list is native tool calls, an exception is
    raised as a provider failure. The last entry repeats. Emits CrewAI's LLM events like a provider."""

    model: str = MODEL
    script: list[Any] = Field(default_factory=list)
    usage: dict[str, int] | None = Field(default_factory=lambda: dict(USAGE))
    native: bool = True  # False: CrewAI prompts for, and parses, ReAct text instead
    calls: int = 0
    seen: list[list[dict[str, Any]]] = Field(default_factory=list)

    def __init__(self, **data: Any) -> None:
        data.setdefault("model", MODEL)  # BaseLLM validates the model before field defaults apply
        super().__init__(**data)

    def supports_function_calling(self) -> bool:
        return self.native

    def get_input_tokens_count(self, messages: Any, tools: Any = None, response_model: Any = None) -> int:
        return approx_tokens(json.dumps(messages, default=str))  # quietly: the base class warns

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
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        msgs: list[LLMMessage] = messages
        with llm_call_context():
            who = {"from_task": from_task, "from_agent": from_agent}
            self._emit_call_started_event(messages=msgs, tools=tools, **who)
            try:
                self._invoke_before_llm_call_hooks(msgs, from_agent)  # a no-op under an agent executor
            except HookAborted as denial:
                self._emit_call_denied_event(denial, from_task, from_agent)
                raise
            reply = self.script[min(self.calls, len(self.script) - 1)]
            if callable(reply) and not isinstance(reply, type):  # a reply chosen from the prompt
                reply = reply(msgs)
            self.calls += 1
            self.seen.append([dict(m) for m in msgs])
            if isinstance(reply, BilledFailure):  # the provider answered (and billed), parsing failed
                self._track_token_usage_internal(dict(self.usage or {}))
            if isinstance(reply, Exception):
                self._emit_call_failed_event(error=str(reply), **who)
                raise reply
            kind = LLMCallType.TOOL_CALL if isinstance(reply, list) else LLMCallType.LLM_CALL
            self._emit_call_completed_event(response=reply, call_type=kind, usage=self.usage, **who)
            return reply

    def tool_results(self, call: int) -> list[str]:
        """The tool results the model had been shown when it was called the ``call``-th time (from 0)."""
        return [str(m.get("content")) for m in self.seen[call] if m.get("role") == "tool"]

    def transcript(self, call: int) -> str:
        """Everything the model was shown on its ``call``-th call (tool results, or ReAct observations)."""
        return "\n".join(str(m.get("content")) for m in self.seen[call])


@tool("lookup")
def lookup(q: str) -> str:
    """Look something up."""
    return "nothing new"


class CRM:
    """A fake CRM whose tools record what really ran."""

    def __init__(self) -> None:
        self.ran: list[str] = []

    def tools(self) -> list[BaseTool]:
        crm = self

        @tool("read_crm")
        def read_crm(case_id: str) -> str:
            """Read a support case from the CRM."""
            crm.ran.append("read_crm")
            return f"case {case_id}: printer jams on every page"

        @tool("update_crm")
        def update_crm(case_id: str, note: str) -> str:
            """Write a note on a support case."""
            crm.ran.append("update_crm")
            return f"case {case_id} updated"

        @tool("deploy")
        def deploy(service: str) -> str:
            """Deploy a service to production."""
            crm.ran.append("deploy")
            return f"{service} deployed"

        return [read_crm, update_crm, deploy]


def answer(output: object) -> str:
    """The final answer of a (non-streaming) kickoff."""
    assert isinstance(output, CrewOutput)
    return output.raw


def crew_of(
    llm: BaseLLM, tools: Sequence[BaseTool] = (), *, max_iter: int = 25, description: str = "Handle support case 42."
) -> Crew:
    agent = Agent(
        role="Support Agent",
        goal="Resolve the customer's case",
        backstory="A careful support engineer.",
        llm=llm,
        tools=list(tools),
        max_iter=max_iter,
        max_retry_limit=0,
        verbose=False,
    )
    task = Task(
        name="handle-case",
        description=description,
        expected_output="A short resolution note.",
        agent=agent,
    )
    return Crew(agents=[agent], tasks=[task], verbose=False)


def run_spent(cy: Any, run: str, unit: Any = None) -> Any:
    """What one run was charged in ``unit`` (default USD), summed from its reservations: a run's
    budget row is deleted when it ends. Asserts that none of them is still ACTIVE."""
    from cycles import Amount, ReservationStatus, Unit

    want = unit or Unit.USD_MICROCENTS
    page = cy.list_reservations(tenant="acme", workflow=run, limit=200)
    assert not page.has_more
    assert all(r.status is not ReservationStatus.ACTIVE for r in page.reservations)
    total = sum(r.committed.amount for r in page.reservations if r.committed is not None and r.committed.unit is want)
    return Amount(unit=want, amount=total)
