"""A model wrapper for what run hooks cannot do: shape the call their reservation allowed.

The SDK resolves a call's model settings before ``on_llm_start`` and has no hook for a failed
call, so only a wrapper can clamp ``max_tokens`` to the budget's caps, keep tools the caps forbid
away from the model, answer with a final message instead of calling the model when the budget is
gone, settle the call the moment it fails or is cancelled (by the core's rule: a provider error
releases; a cancelled call, or a stream its consumer closed, is charged for what it generated), and
price a streamed response by the model that answered it.

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

from cycles import Amount, Caps
from cycles.pricing import approx_tokens, price_answer, price_usage
from cycles_openai_agents.tracing import record as record_decision

if TYPE_CHECKING:
    from cycles_openai_agents.hooks import CyclesRunHooks, _Call

__all__ = ["CyclesModel", "usage_price"]


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
            if call is not None and call.guard is not None:
                await call.guard.fail(exc)  # the core's rule: released, or (cancelled) charged
                record_decision(call.guard)
            raise
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
        seen: list[str] = []  # the text generated so far, to charge a stream stopped early
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
                if call is not None and call.guard is not None:
                    if isinstance(event, ResponseCompletedEvent) and event.response.usage:
                        u = event.response.usage
                        usage = Usage(
                            requests=1,
                            input_tokens=u.input_tokens,
                            output_tokens=u.output_tokens,
                            input_tokens_details=u.input_tokens_details,
                        )
                        answered = event.response.model or call.model
                        metrics = {
                            "tokens_input": u.input_tokens,
                            "tokens_output": u.output_tokens,
                            "model_version": answered[:128],  # gen_ai.response.model on the commit span
                        }
                        call.guard.commit(usage_price(answered, usage, call.model), metrics=metrics)
                    elif isinstance(delta := getattr(event, "delta", None), str):
                        seen.append(delta)
                yield event
        except BaseException as exc:  # GeneratorExit included: the consumer stopped mid-stream
            if call is not None and call.guard is not None:
                if call.guard.actual is None and seen:  # charged for what it generated
                    out = approx_tokens("".join(seen))
                    call.guard.commit(
                        price_usage(call.model, input_tokens=call.prompt_tokens, output_tokens=out),
                        metrics={"tokens_input": call.prompt_tokens, "tokens_output": out},
                    )
                await call.guard.fail(exc)
                record_decision(call.guard)
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
    guard = call.guard if call is not None else None
    caps: Caps | None = guard.caps if guard is not None else None
    if guard is None or caps is None:
        return settings, tools
    limit = guard.max_tokens(settings.max_tokens)
    if limit != settings.max_tokens:
        settings = settings.resolve(ModelSettings(max_tokens=limit))
    if caps.tool_allowlist or caps.tool_denylist:
        tools = [t for t in tools if not isinstance(n := getattr(t, "name", None), str) or guard.allows_tool(n)]
    return settings, tools


def usage_price(model: str, usage: Usage, requested: str | None = None) -> Amount:
    """What a response's usage costs at ``model``'s price (the model that answered; ``requested``
    is the fallback price when the data does not know it)."""
    cached = usage.input_tokens_details.cached_tokens or 0
    return price_answer(
        model,
        requested=requested or model,
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        cached_input_tokens=min(cached, usage.input_tokens),
    )
