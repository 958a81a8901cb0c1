"""LangChain callbacks: reserve before every model and tool call, settle when it ends.

LangChain only lets a callback stop a call when the handler sets ``raise_error``; and it runs an
*async* handler's coroutines for a sync ``invoke`` after the fact, swallowing their errors. So this
handler is synchronous and runs inline (``run_inline``): a denied call raises its
``cycles.Denied`` before it reaches the provider, under ``invoke`` and ``ainvoke`` alike.

Settlement is the core's: a call is a step (of the current ``cycles`` run, if any) settled by its
end or error callback. LangChain sends no callback when an ``ainvoke`` is cancelled (e.g. by
``asyncio.wait_for``): the step is then settled when the task that started it ends, by the core's
rule for an interrupted step. A stream its consumer closed is charged for what it generated.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import BaseMessage, ToolMessage, UsageMetadata
from langchain_core.outputs import ChatGeneration, LLMResult
from langchain_core.runnables import ensure_config

from cycles import Action, Amount, Cycles, CyclesError, Guard, usd, with_args_fingerprint
from cycles_langgraph._common import (
    Model,
    SubjectLike,
    actual_cost,
    covered,
    estimate_prompt,
    langchain_attributes,
    max_output_tokens,
    model_of,
    partial_cost,
    prompt_tokens,
    resolve_subject,
    step,
    tool_cost,
    usage_of,
)

log = logging.getLogger("cycles_langgraph")


class _Open(NamedTuple):
    guard: Guard
    model: Model | None
    prompt_tokens: int


__all__ = ["CyclesCallbackHandler"]


class CyclesCallbackHandler(BaseCallbackHandler):
    """Budget every LLM / chat-model / tool call a runnable makes.

    ``model.invoke(msgs, config={"callbacks": [CyclesCallbackHandler(cy, subject=...)]})``.
    A model call reserves ``estimate`` (default: the core's estimate for the prompt and the
    call's max tokens, else ``max_output_tokens``) and commits the cost of the response's
    ``usage_metadata``, priced by the model that answered (``response_metadata``); a tool call
    reserves and commits ``tool_estimate`` (a fixed amount, or one per tool name) and is checked
    against the caps' allow/deny lists. A call that raised is released, also a tool whose error
    LangChain turned into a result (``handle_tool_error``), unless the tool is named in
    ``charge_failed_tools``. Callbacks cannot change a request: to clamp ``max_tokens`` use
    ``CyclesMiddleware`` (whose own calls this handler leaves to it, so both can be installed: the
    handler then covers the calls other middleware makes on its own, e.g. summarization).
    """

    raise_error = True
    run_inline = True  # under ainvoke too: in the task of the call, so its end can be seen

    def __init__(
        self,
        cycles: Cycles,
        subject: SubjectLike,
        *,
        estimate: Amount | None = None,
        max_output_tokens: int = 1024,
        tool_estimate: Amount | Mapping[str, Amount] | None = None,
        charge_failed_tools: Sequence[str] = (),
    ) -> None:
        self.cycles = cycles
        self.subject = subject
        self.estimate = estimate
        self.max_output_tokens = max_output_tokens
        self.tool_estimate = usd(0) if tool_estimate is None else tool_estimate
        self.charge_failed_tools = set(charge_failed_tools)
        self._open: dict[UUID, _Open] = {}  # by LangChain run_id, from start to end callback only
        self._lock = threading.Lock()

    # -- models --------------------------------------------------------------------------------

    def on_chat_model_start(
        self,
        serialized: dict[str, Any],
        messages: list[list[BaseMessage]],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self._model_start(run_id, parent_run_id, serialized, messages[0] if messages else [], metadata, kwargs)

    def on_llm_start(
        self,
        serialized: dict[str, Any],
        prompts: list[str],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self._model_start(run_id, parent_run_id, serialized, prompts, metadata, kwargs)

    def on_llm_end(self, response: LLMResult, *, run_id: UUID, **kwargs: Any) -> None:
        call = self._pop(run_id)
        if call is None:
            return
        messages = [g.message for gens in response.generations for g in gens if isinstance(g, ChatGeneration)]
        cost = actual_cost(call.model, messages, usage_of(messages) or _llm_output_usage(response.llm_output))
        if cost is not None:
            call.guard.commit(cost[0], metrics=cost[1])
        call.guard.finish()  # no usage: the core commits the estimate and flags it

    def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        call = self._pop(run_id)
        if call is None:
            return
        response = kwargs.get("response")  # what a stream produced before it stopped
        gens = [g for gens in response.generations for g in gens] if isinstance(response, LLMResult) else []
        if gens:  # tokens were generated before it stopped: they are billed
            messages = [g.message for g in gens if isinstance(g, ChatGeneration)]
            cost = actual_cost(call.model, messages, usage_of(messages)) or partial_cost(
                call.model, call.prompt_tokens, "".join(g.text for g in gens)
            )
            if cost is not None:
                call.guard.commit(cost[0], metrics=cost[1])
        call.guard.fail(error)

    # -- tools ---------------------------------------------------------------------------------

    def on_tool_start(
        self,
        serialized: dict[str, Any],
        input_str: str,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        inputs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        name = str(serialized.get("name") or kwargs.get("name") or "tool")
        estimate = tool_cost(self.tool_estimate, name)
        if covered.get():
            return  # CyclesMiddleware reserved this call
        action = with_args_fingerprint(Action("tool.call", name), input_str if inputs is None else inputs)
        self._start(run_id, parent_run_id, metadata, action, estimate, None)

    def on_tool_end(self, output: Any, *, run_id: UUID, **kwargs: Any) -> None:
        call = self._pop(run_id)
        if call is None:
            return
        if isinstance(output, ToolMessage) and output.status == "error":  # handle_tool_error made it a result
            call.guard.fail(RuntimeError(str(output.content)))
        else:
            call.guard.finish()

    def on_tool_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        call = self._pop(run_id)
        if call is not None:
            call.guard.fail(error)

    # -- shared --------------------------------------------------------------------------------

    def _model_start(
        self,
        run_id: UUID,
        parent_run_id: UUID | None,
        serialized: Mapping[str, Any],
        messages: Sequence[BaseMessage] | Sequence[str],
        metadata: Mapping[str, Any] | None,
        kwargs: Mapping[str, Any],
    ) -> None:
        if covered.get():
            return  # CyclesMiddleware reserved this call
        params = kwargs.get("invocation_params") or {}
        model = model_of(metadata, params, serialized.get("kwargs"))
        cap = max_output_tokens(self.max_output_tokens, params, metadata)
        estimate = self.estimate or estimate_prompt(model, messages, params.get("tools"), cap)
        name = model.ref if model else str(serialized.get("name") or "unknown-model")
        action = Action("llm.completion", name)
        # on_llm_start hands plain prompts: a text completion model, not a chat model
        text = bool(messages) and isinstance(messages[0], str)
        operation = {"gen_ai.operation.name": "text_completion"} if text else {}
        tokens = prompt_tokens(messages, None)
        self._start(run_id, parent_run_id, metadata, action, estimate, model, tokens, operation)

    def _start(
        self,
        run_id: UUID,
        parent_run_id: UUID | None,
        metadata: Mapping[str, Any] | None,
        action: Action,
        estimate: Amount,
        model: Model | None,
        tokens: int = 0,
        annotations: Mapping[str, Any] | None = None,
    ) -> None:
        config = ensure_config({"metadata": dict(metadata or {})})
        on_failure = "charge" if action.is_tool and action.name in self.charge_failed_tools else "release"
        where = {**langchain_attributes(config, run_id=run_id, parent_run_id=parent_run_id), **(annotations or {})}
        subject = resolve_subject(self.subject, config)
        guard = step(self.cycles, subject, action, estimate, attributes=where, on_failure=on_failure)
        guard.start()  # a Denied raised here stops the call: the handler sets raise_error
        with self._lock:
            self._open[run_id] = _Open(guard, model, tokens)
        try:
            task = asyncio.current_task()
        except RuntimeError:  # no event loop in this thread: a sync invoke
            task = None
        if task is not None:  # LangChain sends nothing when this task is cancelled mid-call
            task.add_done_callback(lambda t: self._orphaned(run_id, t))

    def _orphaned(self, run_id: UUID, task: asyncio.Task[Any]) -> None:
        """The task of a call ended without its end or error callback: settle it by the core's rule."""
        call = self._pop(run_id)
        if call is None:
            return
        try:
            call.guard.fail(asyncio.CancelledError() if task.cancelled() else task.exception())
        except CyclesError:
            log.exception("could not settle the reservation of a cancelled call")

    def _pop(self, run_id: UUID) -> _Open | None:
        with self._lock:
            return self._open.pop(run_id, None)


def _llm_output_usage(llm_output: Mapping[str, Any] | None) -> UsageMetadata | None:
    """Older LLM integrations report ``token_usage`` in ``llm_output`` instead of on the message."""
    usage = (llm_output or {}).get("token_usage") or {}
    if "prompt_tokens" not in usage or "completion_tokens" not in usage:
        return None
    inp, out = int(usage["prompt_tokens"]), int(usage["completion_tokens"])
    return UsageMetadata(input_tokens=inp, output_tokens=out, total_tokens=inp + out)
