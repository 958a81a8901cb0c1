"""LangChain callbacks: reserve before every model and tool call, settle when it ends.

LangChain only lets a callback stop a call when the handler sets ``raise_error``; and it runs an
*async* handler's coroutines for a sync ``invoke`` after the fact, swallowing their errors. So this
handler is synchronous: a sync ``invoke`` calls it inline, an ``ainvoke`` runs it in a worker
thread and awaits it before the provider is called. Both honour ``raise_error``, so a denied call
raises its ``cycles.Denied`` before it reaches the provider, under both.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import BaseMessage, UsageMetadata
from langchain_core.outputs import ChatGeneration, LLMResult
from langchain_core.runnables import ensure_config

from cycles import Action, Amount, Cycles, Guard, usd
from cycles_langgraph._common import (
    Model,
    SubjectLike,
    estimate_prompt,
    max_output_tokens,
    model_of,
    priced,
    resolve_subject,
    tool_cost,
    usage_of,
)

__all__ = ["CyclesCallbackHandler"]


class CyclesCallbackHandler(BaseCallbackHandler):
    """Budget every LLM / chat-model / tool call a runnable makes.

    ``model.invoke(msgs, config={"callbacks": [CyclesCallbackHandler(cy, subject=...)]})``.
    A model call reserves ``estimate`` (default: the core's estimate for the prompt and the
    call's max tokens, else ``max_output_tokens``) and commits the cost of the response's
    ``usage_metadata``; a tool call reserves and commits ``tool_estimate`` (a fixed amount, or one
    per tool name) and is checked against the caps' allow/deny lists. An error releases.
    Callbacks cannot change a request: to clamp ``max_tokens`` use ``CyclesMiddleware``.
    """

    raise_error = True

    def __init__(
        self,
        cycles: Cycles,
        subject: SubjectLike,
        *,
        estimate: Amount | None = None,
        max_output_tokens: int = 1024,
        tool_estimate: Amount | Mapping[str, Amount] | None = None,
    ) -> None:
        self.cycles = cycles
        self.subject = subject
        self.estimate = estimate
        self.max_output_tokens = max_output_tokens
        self.tool_estimate = usd(0) if tool_estimate is None else tool_estimate
        self._open: dict[UUID, tuple[Guard, Model | None]] = {}  # by LangChain run_id
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
        self._model_start(run_id, serialized, messages[0] if messages else [], metadata, kwargs)

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
        self._model_start(run_id, serialized, prompts, metadata, kwargs)

    def on_llm_end(self, response: LLMResult, *, run_id: UUID, **kwargs: Any) -> None:
        guard, model = self._pop(run_id)
        if guard is None:
            return
        messages = [g.message for gens in response.generations for g in gens if isinstance(g, ChatGeneration)]
        usage = usage_of(messages) or _llm_output_usage(response.llm_output)
        if usage is None or model is None:
            guard.finish()  # nothing measured: the estimate stands
            return
        actual, metrics = priced(model, usage)
        guard.commit(actual, metrics=metrics)
        guard.finish()

    def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._fail(run_id)

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
        self._start(run_id, metadata, Action("tool.call", name), estimate, None)

    def on_tool_end(self, output: Any, *, run_id: UUID, **kwargs: Any) -> None:
        guard, _ = self._pop(run_id)
        if guard is not None:
            guard.finish()

    def on_tool_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._fail(run_id)

    # -- shared --------------------------------------------------------------------------------

    def _model_start(
        self,
        run_id: UUID,
        serialized: Mapping[str, Any],
        messages: Sequence[BaseMessage] | Sequence[str],
        metadata: Mapping[str, Any] | None,
        kwargs: Mapping[str, Any],
    ) -> None:
        params = kwargs.get("invocation_params") or {}
        model = model_of(metadata, params, serialized.get("kwargs"))
        cap = max_output_tokens(self.max_output_tokens, params, metadata)
        estimate = self.estimate or estimate_prompt(model, messages, params.get("tools"), cap)
        name = model.ref if model else str(serialized.get("name") or "unknown-model")
        self._start(run_id, metadata, Action("llm.completion", name), estimate, model)

    def _start(
        self,
        run_id: UUID,
        metadata: Mapping[str, Any] | None,
        action: Action,
        estimate: Amount,
        model: Model | None,
    ) -> None:
        config = ensure_config({"metadata": dict(metadata or {})})
        guard = self.cycles.guard(resolve_subject(self.subject, config), action, estimate=estimate)
        guard.start()  # a Denied raised here stops the call: the handler sets raise_error
        with self._lock:
            self._open[run_id] = (guard, model)

    def _pop(self, run_id: UUID) -> tuple[Guard | None, Model | None]:
        with self._lock:
            return self._open.pop(run_id, (None, None))

    def _fail(self, run_id: UUID) -> None:
        guard, _ = self._pop(run_id)
        if guard is not None:
            guard.fail()


def _llm_output_usage(llm_output: Mapping[str, Any] | None) -> UsageMetadata | None:
    """Older LLM integrations report ``token_usage`` in ``llm_output`` instead of on the message."""
    usage = (llm_output or {}).get("token_usage") or {}
    if "prompt_tokens" not in usage or "completion_tokens" not in usage:
        return None
    inp, out = int(usage["prompt_tokens"]), int(usage["completion_tokens"])
    return UsageMetadata(input_tokens=inp, output_tokens=out, total_tokens=inp + out)
