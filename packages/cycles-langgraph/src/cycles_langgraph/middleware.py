"""LangChain v1 agents (``create_agent``): budget each model call and each tool call.

A denied *tool* call becomes an error ``ToolMessage`` the model reads and can react to; a denied
*model* call ends the run with a final ``AIMessage`` (no tool calls, so the agent loop exits).

A model call is priced by the model that answered (``response_metadata``), so a fallback listed
after this middleware is charged at its own price. Model calls other middleware makes on its own
(``SummarizationMiddleware``) do not pass through ``wrap_model_call``: install a
``CyclesCallbackHandler`` too (``middleware.callbacks()``), which covers them and leaves the calls
this middleware reserved alone.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from langchain.agents.middleware import AgentMiddleware, AgentState, ModelRequest, ModelResponse
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.runnables import ensure_config
from langgraph.prebuilt.tool_node import ToolCallRequest
from langgraph.types import Command

from cycles import Action, Amount, AsyncCycles, AsyncGuard, Cycles, Denied, Guard, Subject, usd, with_args_fingerprint
from cycles_langgraph._common import (
    Model,
    SubjectLike,
    actual_cost,
    aguard,
    covered,
    estimate_prompt,
    max_output_tokens,
    model_of,
    resolve_subject,
    step,
    sync_cycles,
    tool_cost,
    usage_of,
)
from cycles_langgraph.callbacks import CyclesCallbackHandler

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
        charge_failed_tools: tuple[str, ...] | list[str] = (),
    ) -> None:
        super().__init__()
        self.cycles = cycles
        self.subject = subject
        self.estimate = estimate
        self.max_output_tokens = max_output_tokens
        self.tool_estimate = usd(0) if tool_estimate is None else tool_estimate
        self.max_tokens_setting = max_tokens_setting
        self.out_of_budget = out_of_budget or (lambda exc: f"Stopping here: the budget is exhausted ({exc}).")
        self.charge_failed_tools = set(charge_failed_tools)

    def callbacks(self) -> CyclesCallbackHandler:
        """A callback handler with the same client and prices, for the model calls other middleware
        makes on its own: ``agent.invoke(..., config={"callbacks": [mw.callbacks()]})``."""
        return CyclesCallbackHandler(
            sync_cycles(self.cycles),
            self.subject,
            estimate=self.estimate,
            max_output_tokens=self.max_output_tokens,
            tool_estimate=self.tool_estimate,
            charge_failed_tools=tuple(self.charge_failed_tools),
        )

    # -- model ---------------------------------------------------------------------------------

    def wrap_model_call(
        self,
        request: ModelRequest[Any],
        handler: Callable[[ModelRequest[Any]], ModelResponse[Any]],
    ) -> ModelResponse[Any] | AIMessage:
        model, action, estimate, own_max = self._model_plan(request)
        try:
            with step(sync_cycles(self.cycles), self._subject(), action, estimate) as g:
                token = covered.set(True)
                try:
                    response = handler(self._clamped(request, g, own_max))
                finally:
                    covered.reset(token)
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
                token = covered.set(True)
                try:
                    response = await handler(self._clamped(request, g, own_max))
                finally:
                    covered.reset(token)
                self._commit(g, model, response)
                return response
        except Denied as exc:
            return AIMessage(content=self.out_of_budget(exc))

    # -- tools ---------------------------------------------------------------------------------

    def wrap_tool_call(self, request: ToolCallRequest, handler: Callable[[ToolCallRequest], ToolResult]) -> ToolResult:
        action, estimate = self._tool_plan(request)
        try:
            with step(sync_cycles(self.cycles), self._subject(), action, estimate, **self._policy(action)) as g:
                token = covered.set(True)
                try:
                    return self._settled(g, handler(request))
                finally:
                    covered.reset(token)
        except _ToolFailed as failed:
            return failed.result
        except Denied as exc:
            return _denied_tool(request, exc)

    async def awrap_tool_call(
        self, request: ToolCallRequest, handler: Callable[[ToolCallRequest], Awaitable[ToolResult]]
    ) -> ToolResult:
        action, estimate = self._tool_plan(request)
        try:
            async with aguard(self.cycles, self._subject(), action, estimate, **self._policy(action)) as g:
                token = covered.set(True)
                try:
                    return self._settled(g, await handler(request))
                finally:
                    covered.reset(token)
        except _ToolFailed as failed:
            return failed.result
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

    def _clamped(self, request: ModelRequest[Any], guard: Guard | AsyncGuard, own_max: int) -> ModelRequest[Any]:
        limit = guard.max_tokens(own_max or None)
        if limit is None or limit == own_max:
            return request
        settings = {**request.model_settings, self.max_tokens_setting: limit}
        return request.override(model_settings=settings)

    def _commit(self, guard: Guard | AsyncGuard, model: Model | None, response: ModelResponse[Any]) -> None:
        cost = actual_cost(model, response.result, usage_of(response.result))
        if cost is not None:  # else the core commits the estimate and flags it
            guard.commit(cost[0], metrics=cost[1])

    def _policy(self, action: Action) -> dict[str, Any]:
        return {"on_failure": "charge" if action.name in self.charge_failed_tools else "release"}

    @staticmethod
    def _settled(guard: Guard | AsyncGuard, result: ToolResult) -> ToolResult:
        """A tool whose error became its result (``status="error"``) failed: the guard settles it so."""
        if isinstance(result, ToolMessage) and result.status == "error":
            raise _ToolFailed(result)
        return result

    def _tool_plan(self, request: ToolCallRequest) -> tuple[Action, Amount]:
        name = request.tool_call["name"]
        action = with_args_fingerprint(Action("tool.call", name), request.tool_call.get("args"))
        return action, tool_cost(self.tool_estimate, name)


class _ToolFailed(Exception):
    """Carries a tool's error result out of its guard, which then applies the failed-step policy."""

    def __init__(self, result: ToolMessage) -> None:
        super().__init__(str(result.content))
        self.result = result


def _denied_tool(request: ToolCallRequest, exc: Denied) -> ToolMessage:
    name = request.tool_call["name"]
    return ToolMessage(
        content=f"Tool '{name}' was not run: {exc}. Continue without it.",
        tool_call_id=request.tool_call["id"] or "",
        name=name,
        status="error",
    )
