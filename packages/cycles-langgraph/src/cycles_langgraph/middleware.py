"""LangChain v1 agents (``create_agent``): budget each model call and each tool call.

A denied *tool* call becomes an error ``ToolMessage`` the model reads and can react to; a denied
*model* call ends the run with a final ``AIMessage`` (no tool calls, so the agent loop exits).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from langchain.agents.middleware import AgentMiddleware, AgentState, ModelRequest, ModelResponse
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.runnables import ensure_config
from langgraph.prebuilt.tool_node import ToolCallRequest
from langgraph.types import Command

from cycles import Action, Amount, AsyncCycles, AsyncGuard, Caps, Cycles, Denied, Guard, Subject, usd
from cycles_langgraph._common import (
    Model,
    SubjectLike,
    aguard,
    estimate_prompt,
    max_output_tokens,
    model_of,
    priced,
    resolve_subject,
    sync_cycles,
    tool_cost,
    usage_of,
)

__all__ = ["CyclesMiddleware"]

ToolResult = ToolMessage | Command[Any]


class CyclesMiddleware(AgentMiddleware[AgentState[Any], Any, Any]):
    """``create_agent(model, tools, middleware=[CyclesMiddleware(cy, subject=...)])``.

    Each model call reserves ``estimate`` (default: the core's estimate for the prompt at the call's
    max tokens), runs with ``max_tokens`` clamped to the reservation's caps, and commits the priced
    ``usage_metadata`` of the response. Each tool call reserves ``tool_estimate`` and obeys the caps'
    allow/deny lists. Works with ``Cycles`` (sync and async agents) or ``AsyncCycles`` (async only).
    """

    def __init__(
        self,
        cycles: Cycles | AsyncCycles,
        subject: SubjectLike,
        *,
        estimate: Amount | None = None,
        max_output_tokens: int = 1024,
        tool_estimate: Amount | Mapping[str, Amount] | None = None,
        max_tokens_setting: str = "max_tokens",
        out_of_budget: Callable[[Denied], str] | None = None,
    ) -> None:
        super().__init__()
        self.cycles = cycles
        self.subject = subject
        self.estimate = estimate
        self.max_output_tokens = max_output_tokens
        self.tool_estimate = usd(0) if tool_estimate is None else tool_estimate
        self.max_tokens_setting = max_tokens_setting
        self.out_of_budget = out_of_budget or (lambda exc: f"Stopping here: the budget is exhausted ({exc}).")

    # -- model ---------------------------------------------------------------------------------

    def wrap_model_call(
        self,
        request: ModelRequest[Any],
        handler: Callable[[ModelRequest[Any]], ModelResponse[Any]],
    ) -> ModelResponse[Any] | AIMessage:
        model, action, estimate, own_max = self._model_plan(request)
        try:
            with sync_cycles(self.cycles).guard(self._subject(), action, estimate=estimate) as g:
                response = handler(self._clamped(request, g.caps, own_max))
                self._commit(g, model, response)
                return response
        except Denied as exc:
            return AIMessage(content=self.out_of_budget(exc))

    async def awrap_model_call(
        self,
        request: ModelRequest[Any],
        handler: Callable[[ModelRequest[Any]], Awaitable[ModelResponse[Any]]],
    ) -> ModelResponse[Any] | AIMessage:
        model, action, estimate, own_max = self._model_plan(request)
        try:
            async with aguard(self.cycles, self._subject(), action, estimate) as g:
                response = await handler(self._clamped(request, g.caps, own_max))
                self._commit(g, model, response)
                return response
        except Denied as exc:
            return AIMessage(content=self.out_of_budget(exc))

    # -- tools ---------------------------------------------------------------------------------

    def wrap_tool_call(self, request: ToolCallRequest, handler: Callable[[ToolCallRequest], ToolResult]) -> ToolResult:
        action, estimate = self._tool_plan(request)
        try:
            with sync_cycles(self.cycles).guard(self._subject(), action, estimate=estimate):
                return handler(request)
        except Denied as exc:
            return _denied_tool(request, exc)

    async def awrap_tool_call(
        self, request: ToolCallRequest, handler: Callable[[ToolCallRequest], Awaitable[ToolResult]]
    ) -> ToolResult:
        action, estimate = self._tool_plan(request)
        try:
            async with aguard(self.cycles, self._subject(), action, estimate):
                return await handler(request)
        except Denied as exc:
            return _denied_tool(request, exc)

    # -- no I/O below --------------------------------------------------------------------------

    def _subject(self) -> Subject:
        return resolve_subject(self.subject, ensure_config())

    def _model_plan(self, request: ModelRequest[Any]) -> tuple[Model | None, Action, Amount, int]:
        """The model, action and estimate of a call, and its own max tokens (0: none set)."""
        ls_params = dict(request.model._get_ls_params())
        model = model_of(request.model_settings, ls_params)
        own_max = max_output_tokens(0, request.model_settings, ls_params)
        cap = own_max or self.max_output_tokens
        estimate = self.estimate or estimate_prompt(model, request.messages, request.tools, cap)
        name = model.ref if model else type(request.model).__name__
        return model, Action("llm.completion", name), estimate, own_max

    def _clamped(self, request: ModelRequest[Any], caps: Caps | None, own_max: int) -> ModelRequest[Any]:
        if caps is None or caps.max_tokens is None or 0 < own_max <= caps.max_tokens:
            return request
        settings = {**request.model_settings, self.max_tokens_setting: caps.max_tokens}
        return request.override(model_settings=settings)

    def _commit(self, guard: Guard | AsyncGuard, model: Model | None, response: ModelResponse[Any]) -> None:
        usage = usage_of(response.result)
        if usage is not None and model is not None:  # else the estimate is committed
            actual, metrics = priced(model, usage)
            guard.commit(actual, metrics=metrics)

    def _tool_plan(self, request: ToolCallRequest) -> tuple[Action, Amount]:
        name = request.tool_call["name"]
        return Action("tool.call", name), tool_cost(self.tool_estimate, name)


def _denied_tool(request: ToolCallRequest, exc: Denied) -> ToolMessage:
    name = request.tool_call["name"]
    return ToolMessage(
        content=f"Tool '{name}' was not run: {exc}. Continue without it.",
        tool_call_id=request.tool_call["id"] or "",
        name=name,
        status="error",
    )
