"""A model wrapper for what run hooks cannot do: shape the call their reservation allowed.

The SDK resolves a call's model settings before ``on_llm_start`` and has no hook for a failed
call, so only a wrapper can clamp ``max_tokens`` to the budget's caps, keep tools the caps forbid
away from the model, answer with a final message instead of calling the model when the budget is
gone, and release the reservation the moment the call fails or is cancelled.

The wrapper finds the reservation ``on_llm_start`` made for this call by the input list: the SDK
passes the same list object to the hook and to the model.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from agents import (
    AgentOutputSchemaBase,
    Handoff,
    Model,
    ModelResponse,
    ModelSettings,
    ModelTracing,
    Tool,
    TResponseInputItem,
    Usage,
)
from agents.items import TResponseStreamEvent
from agents.retry import ModelRetryAdvice, ModelRetryAdviceRequest
from openai.types.responses import Response, ResponseCompletedEvent, ResponseOutputMessage, ResponseOutputText
from openai.types.responses.response_prompt_param import ResponsePromptParam

from cycles import Caps

if TYPE_CHECKING:
    from cycles_openai_agents.hooks import CyclesRunHooks, _Call

__all__ = ["CyclesModel"]


class CyclesModel(Model):
    """``Agent(model=CyclesModel(model, hooks))``: the model, governed by the hooks' reservations.

    ``name`` prices the calls (default: the wrapped model's ``.model``, as OpenAI models have).
    """

    def __init__(self, model: Model, hooks: CyclesRunHooks, *, name: str | None = None) -> None:
        self.wrapped = model
        self.hooks = hooks
        inner_name = getattr(model, "model", None)
        self.name: str | None = name if name is not None else inner_name if isinstance(inner_name, str) else None

    async def get_response(
        self,
        system_instructions: str | None,
        input: str | list[TResponseInputItem],
        model_settings: ModelSettings,
        tools: list[Tool],
        output_schema: AgentOutputSchemaBase | None,
        handoffs: list[Handoff],
        tracing: ModelTracing,
        *,
        previous_response_id: str | None,
        conversation_id: str | None,
        prompt: ResponsePromptParam | None,
    ) -> ModelResponse:
        call = self.hooks._call_for_prompt(input)
        if call is not None and call.denied is not None:
            return ModelResponse(output=[self._final_message()], usage=Usage(), response_id=None)
        model_settings, tools = _within_caps(call, model_settings, tools)
        try:
            response = await self.wrapped.get_response(
                system_instructions,
                input,
                model_settings,
                tools,
                output_schema,
                handoffs,
                tracing,
                previous_response_id=previous_response_id,
                conversation_id=conversation_id,
                prompt=prompt,
            )
        except BaseException as exc:
            if call is not None:
                await self.hooks._abort(call, exc)
            raise
        if call is not None:
            call.actual = self.hooks.price(call.action.name, response.usage)
        return response

    async def stream_response(
        self,
        system_instructions: str | None,
        input: str | list[TResponseInputItem],
        model_settings: ModelSettings,
        tools: list[Tool],
        output_schema: AgentOutputSchemaBase | None,
        handoffs: list[Handoff],
        tracing: ModelTracing,
        *,
        previous_response_id: str | None,
        conversation_id: str | None,
        prompt: ResponsePromptParam | None,
    ) -> AsyncIterator[TResponseStreamEvent]:
        call = self.hooks._call_for_prompt(input)
        if call is not None and call.denied is not None:
            yield ResponseCompletedEvent(type="response.completed", response=self._final_response(), sequence_number=0)
            return
        model_settings, tools = _within_caps(call, model_settings, tools)
        try:
            async for event in self.wrapped.stream_response(
                system_instructions,
                input,
                model_settings,
                tools,
                output_schema,
                handoffs,
                tracing,
                previous_response_id=previous_response_id,
                conversation_id=conversation_id,
                prompt=prompt,
            ):
                if call is not None and isinstance(event, ResponseCompletedEvent) and event.response.usage:
                    u = event.response.usage
                    usage = Usage(
                        requests=1,
                        input_tokens=u.input_tokens,
                        output_tokens=u.output_tokens,
                        input_tokens_details=u.input_tokens_details,
                    )
                    call.actual = self.hooks.price(call.action.name, usage)
                yield event
        except BaseException as exc:  # GeneratorExit included: the consumer stopped mid-stream
            if call is not None:
                await self.hooks._abort(call, exc)
            raise

    def get_retry_advice(self, request: ModelRetryAdviceRequest) -> ModelRetryAdvice | None:
        return self.wrapped.get_retry_advice(request)

    async def close(self) -> None:
        await self.wrapped.close()

    async def _cleanup_on_run_end(self, owner: object) -> None:
        await self.wrapped._cleanup_on_run_end(owner)

    def _final_message(self) -> ResponseOutputMessage:
        text = ResponseOutputText(type="output_text", text=self.hooks.final_message, annotations=[])
        return ResponseOutputMessage(
            id="cycles-budget-stop", type="message", role="assistant", status="completed", content=[text]
        )

    def _final_response(self) -> Response:
        return Response(
            id="cycles-budget-stop",
            created_at=0,
            model=self.name or "cycles",
            object="response",
            output=[self._final_message()],
            tool_choice="none",
            tools=[],
            parallel_tool_calls=False,
            status="completed",
        )


def _within_caps(call: _Call | None, settings: ModelSettings, tools: list[Tool]) -> tuple[ModelSettings, list[Tool]]:
    caps: Caps | None = call.guard.caps if call is not None and call.guard is not None else None
    if caps is None:
        return settings, tools
    if caps.max_tokens is not None and (settings.max_tokens is None or settings.max_tokens > caps.max_tokens):
        settings = settings.resolve(ModelSettings(max_tokens=caps.max_tokens))
    if caps.tool_allowlist or caps.tool_denylist:
        tools = [t for t in tools if not isinstance(n := getattr(t, "name", None), str) or caps.allows_tool(n)]
    return settings, tools
