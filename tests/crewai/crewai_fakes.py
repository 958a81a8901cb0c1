"""A scripted CrewAI model and small crews for the adapter tests (no network, no API key)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from crewai import Agent, Crew, Task
from crewai.events.types.llm_events import LLMCallType
from crewai.hooks import HookAborted
from crewai.llms.base_llm import BaseLLM, llm_call_context
from crewai.tools import BaseTool, tool
from pydantic import Field

MODEL = "canned-model"
USAGE = {"prompt_tokens": 1000, "completion_tokens": 500}  # $0.30 at the test price


def tool_call(name: str, **args: Any) -> list[dict[str, Any]]:
    """A native tool-call reply, as OpenAI-style providers return it."""
    return [{"id": f"call_{name}", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}]


class ScriptedLLM(BaseLLM):
    """Replies from a script: a string is a text answer, a list is native tool calls, an exception is
    raised as a provider failure. The last entry repeats. Emits CrewAI's LLM events like a provider."""

    model: str = MODEL
    script: list[Any] = Field(default_factory=list)
    usage: dict[str, int] | None = Field(default_factory=lambda: dict(USAGE))
    calls: int = 0
    seen: list[list[dict[str, Any]]] = Field(default_factory=list)

    def __init__(self, **data: Any) -> None:
        data.setdefault("model", MODEL)  # BaseLLM validates the model before field defaults apply
        super().__init__(**data)

    def supports_function_calling(self) -> bool:
        return True

    def call(  # type: ignore[override]
        self,
        messages: Any,
        tools: Any = None,
        callbacks: Any = None,
        available_functions: Any = None,
        from_task: Any = None,
        from_agent: Any = None,
        response_model: Any = None,
    ) -> Any:
        msgs = [{"role": "user", "content": messages}] if isinstance(messages, str) else messages
        with llm_call_context():
            self._emit_call_started_event(messages=msgs, tools=tools, from_task=from_task, from_agent=from_agent)
            try:
                self._invoke_before_llm_call_hooks(msgs, from_agent)  # a no-op under an agent executor
            except HookAborted as denial:
                self._emit_call_denied_event(denial, from_task, from_agent)
                raise
            reply = self.script[min(self.calls, len(self.script) - 1)]
            self.calls += 1
            self.seen.append([dict(m) for m in msgs])
            if isinstance(reply, Exception):
                self._emit_call_failed_event(error=str(reply), from_task=from_task, from_agent=from_agent)
                raise reply
            call_type = LLMCallType.TOOL_CALL if isinstance(reply, list) else LLMCallType.LLM_CALL
            self._emit_call_completed_event(
                response=reply, call_type=call_type, from_task=from_task, from_agent=from_agent,
                messages=msgs, usage=self.usage,
            )
            return reply

    def tool_results(self, call: int) -> list[str]:
        """The tool results the model had been shown when it was called the ``call``-th time (from 0)."""
        return [str(m.get("content")) for m in self.seen[call] if m.get("role") == "tool"]


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


def crew_of(llm: BaseLLM, tools: Sequence[BaseTool] = (), *, role: str = "Support Agent", max_iter: int = 25) -> Crew:
    agent = Agent(role=role, goal="Resolve the customer's case", backstory="A careful support engineer.",
                  llm=llm, tools=list(tools), max_iter=max_iter, max_retry_limit=0, verbose=False)
    task = Task(name="handle-case", description="Handle support case 42.", expected_output="A short resolution note.",
                agent=agent)
    return Crew(agents=[agent], tasks=[task], verbose=False)
