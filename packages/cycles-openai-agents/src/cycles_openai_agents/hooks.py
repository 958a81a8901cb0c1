"""Run hooks that reserve before every model and tool call and commit what it really cost.

The SDK calls ``on_llm_start`` just before the model and lets an exception from it propagate, so a
denial there stops the call before a token is spent. ``on_llm_end`` carries the response's
``usage``, priced by ``cycles.pricing``. Tools are reserved in ``on_tool_start`` (or earlier, by
:meth:`CyclesRunHooks.tool_guardrail`) and committed in ``on_tool_end``.

What the hooks cannot see, they leave to two helpers: the SDK has no hook for a failed or cancelled
model call, so :meth:`CyclesRunHooks.run` / :meth:`CyclesRunHooks.run_streamed` release whatever a
run left pending, and :class:`~cycles_openai_agents.model.CyclesModel` (a model wrapper) releases at
once, clamps ``max_tokens`` to the budget's caps and can end a run with a final message.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Literal

from agents import (
    Agent,
    GuardrailFunctionOutput,
    InputGuardrail,
    ModelResponse,
    RunContextWrapper,
    RunHooks,
    Runner,
    RunResult,
    RunResultStreaming,
    Tool,
    ToolGuardrailFunctionOutput,
    ToolInputGuardrail,
    ToolInputGuardrailData,
    TResponseInputItem,
    Usage,
    UserError,
)
from agents.tool_context import ToolContext
from pydantic import BaseModel

from cycles import Action, Amount, AsyncCycles, Decision, Denied, Subject, usd
from cycles.guard import AsyncGuard
from cycles.pricing import approx_messages_tokens, estimate_cost, price_usage
from cycles_openai_agents.model import CyclesModel

__all__ = ["CyclesRunHooks", "OnExhausted", "OnToolDenied"]

log = logging.getLogger("cycles.openai_agents")

OnExhausted = Literal["raise", "finish"]
"""What a denied model call does: raise the ``Denied``, or end the run with ``final_message``."""
OnToolDenied = Literal["reject", "raise"]
"""What a tool guardrail does on denial: tell the model why and go on, or raise a tripwire."""

DEFAULT_FINAL_MESSAGE = "I have to stop here: the budget for this task is used up."

# Which run a reservation belongs to, so run() releases exactly its own leftovers. Every task the
# SDK creates for a run copies the caller's context, so they all see the token run() set.
_RUN: ContextVar[object | None] = ContextVar("cycles_openai_agents_run", default=None)
_LEVEL_VALUE = re.compile(r"[^a-zA-Z0-9_.-]")


@dataclass(eq=False)
class _Call:
    """One model or tool call between its reservation and its settlement."""

    key: tuple[object, ...]
    subject: Subject
    action: Action
    estimate: Amount
    run: object | None
    agent: str
    guard: AsyncGuard | None = None
    started: bool = False  # tool: on_tool_start has run (a guardrail may reserve before it)
    denied: Denied | None = None  # model, "finish" mode: the model must not be called
    # model: the priced usage CyclesModel saw, committed if on_llm_end never comes
    actual: Amount | None = None
    prompt: object = None  # the input list the SDK hands both on_llm_start and the model


class CyclesRunHooks(RunHooks[Any]):
    """``Runner.run(agent, input, hooks=CyclesRunHooks(acy, subject=...))``: every call reserved first.

    - ``subject``: who pays, or a function of the agent (per-agent budgets after handoffs).
    - ``model``: the name to price calls with; by default the agent's model name (``agent.model``
      as a string, a :class:`CyclesModel`'s name, or a model object's ``.model``).
    - ``max_output_tokens``: what a call may produce when ``model_settings.max_tokens`` is unset;
      the estimate reserves for that many output tokens.
    - ``tool_costs`` / ``default_tool_cost``: what a tool call reserves and commits (any unit:
      ``usd``, ``risk_points``...). Tool calls draw from ``<subject>/toolset:<tool name>`` (when
      ``tool_scopes``), so a budget set there limits that tool alone.
    - ``on_exhausted="finish"``: a model call the budget refuses ends the run with
      ``final_message`` instead of raising (needs the agent's model wrapped in :class:`CyclesModel`,
      the only place that can answer instead of the model).
    """

    def __init__(
        self,
        cycles: AsyncCycles,
        subject: Subject | Callable[[Agent[Any]], Subject],
        *,
        model: str | None = None,
        max_output_tokens: int = 1024,
        tool_costs: Mapping[str, Amount] | None = None,
        default_tool_cost: Amount | None = None,
        tool_scopes: bool = True,
        on_exhausted: OnExhausted = "raise",
        final_message: str = DEFAULT_FINAL_MESSAGE,
    ) -> None:
        if on_exhausted not in ("raise", "finish"):
            raise ValueError(f"on_exhausted must be 'raise' or 'finish', not {on_exhausted!r}")
        self.cycles = cycles
        self._subject = subject
        self._model = model
        self.max_output_tokens = max_output_tokens
        self.tool_costs = dict(tool_costs or {})
        self.default_tool_cost = default_tool_cost if default_tool_cost is not None else usd(0)
        self.tool_scopes = tool_scopes
        self.on_exhausted: OnExhausted = on_exhausted
        self.final_message = final_message
        self.handoffs: list[tuple[str, str]] = []
        """Every handoff seen, as ``(from agent, to agent)`` names, in order."""
        self.stopped: Denied | None = None
        """The denial that ended the last run with ``final_message`` (``on_exhausted="finish"``)."""
        self._calls: dict[tuple[object, ...], list[_Call]] = {}
        self._by_prompt: dict[int, _Call] = {}
        self._cleanups: set[asyncio.Task[None]] = set()

    # ---- model calls ------------------------------------------------------------------------

    async def on_llm_start(
        self,
        context: RunContextWrapper[Any],
        agent: Agent[Any],
        system_prompt: str | None,
        input_items: list[TResponseInputItem],
    ) -> None:
        model = self.model_name(agent)
        call = _Call(
            key=("llm", id(context.usage), id(agent)),
            subject=self.subject_for(agent),
            action=Action("llm.completion", model),
            estimate=self.estimate(agent, system_prompt, input_items),
            run=_RUN.get(),
            agent=agent.name,
            prompt=input_items,
        )
        try:
            await self._reserve(call)
        except Denied as denial:
            if self.on_exhausted != "finish" or not isinstance(agent.model, CyclesModel):
                raise
            call.denied = self.stopped = denial  # CyclesModel answers with final_message instead
            log.info("budget exhausted, ending the run with the final message: %s", denial)
        self._add(call)
        self._by_prompt[id(input_items)] = call

    async def on_llm_end(self, context: RunContextWrapper[Any], agent: Agent[Any], response: ModelResponse) -> None:
        call = self._pop(("llm", id(context.usage), id(agent)))
        if call is not None and call.denied is not None:
            return  # CyclesModel answered; the model was not called
        usage = response.usage
        model = call.action.name if call is not None else self.model_name(agent)
        actual = self.price(model, usage)
        metrics = {"tokens_input": usage.input_tokens, "tokens_output": usage.output_tokens}
        if call is not None and call.guard is not None:
            call.guard.commit(actual, metrics=metrics)
            await call.guard.finish()
            return
        # No open reservation (a retried call after CyclesModel released the failed attempt): the
        # tokens were spent all the same, so charge them as an event.
        if actual.amount:
            subject = self.subject_for(agent)
            await self.cycles.event(subject, Action("llm.completion", model), actual, metrics=metrics)

    # ---- tool calls -------------------------------------------------------------------------

    async def on_tool_start(self, context: RunContextWrapper[Any], agent: Agent[Any], tool: Tool) -> None:
        key = self._tool_key(context, tool.name)
        reserved = next((c for c in self._calls.get(key, ()) if not c.started), None)
        if reserved is None:  # no guardrail reserved it: reserve now (a denial aborts the run)
            reserved = self._tool_call(key, agent, tool.name, None)
            await self._reserve(reserved)
            self._add(reserved)
        reserved.started = True

    async def on_tool_end(self, context: RunContextWrapper[Any], agent: Agent[Any], tool: Tool, result: object) -> None:
        call = self._pop(self._tool_key(context, tool.name), started=True)
        if call is not None and call.guard is not None:
            await call.guard.finish()  # a tool costs what it reserved

    async def on_handoff(self, context: RunContextWrapper[Any], from_agent: Agent[Any], to_agent: Agent[Any]) -> None:
        self.handoffs.append((from_agent.name, to_agent.name))
        log.info("handoff %s -> %s", from_agent.name, to_agent.name)

    # ---- guardrails -------------------------------------------------------------------------

    def input_guardrail(
        self, *, estimate: Amount | None = None, run_in_parallel: bool = False, name: str = "cycles_budget"
    ) -> InputGuardrail[Any]:
        """Refuse a run the budget cannot cover, before the model is called.

        Trips when the subject's budget cannot cover ``estimate`` (default: the first model call's
        estimate). ``run_in_parallel=False`` (the default) makes the SDK run it *before* the model;
        with ``True`` the SDK starts the model at the same time and tokens may be spent first.
        In shadow mode it never trips.
        """

        async def cycles_budget(
            context: RunContextWrapper[Any], agent: Agent[Any], input: str | list[TResponseInputItem]
        ) -> GuardrailFunctionOutput:
            items: list[TResponseInputItem] = (
                [{"role": "user", "content": input}] if isinstance(input, str) else list(input)
            )
            need = estimate or self.estimate(agent, await agent.get_system_prompt(context), items)
            subject = self.subject_for(agent)
            verdict = await self.cycles.decide(subject, Action("llm.completion", self.model_name(agent)), need)
            denied = verdict.decision is Decision.DENY
            info = {
                "decision": verdict.decision.value,
                "reason_code": verdict.reason_code,
                "estimate": str(need),
            }
            return GuardrailFunctionOutput(output_info=info, tripwire_triggered=denied and not self._shadow)

        return InputGuardrail(guardrail_function=cycles_budget, name=name, run_in_parallel=run_in_parallel)

    def tool_guardrail(
        self,
        cost: Amount | None = None,
        *,
        on_deny: OnToolDenied = "reject",
        message: str = "Not run: {reason}. Continue without this tool.",
        name: str = "cycles_tool_budget",
    ) -> ToolInputGuardrail[Any]:
        """A tool input guardrail that reserves the tool call's ``cost`` (or its configured cost).

        On denial (budget, risk points, caps' allow/deny lists) it either rejects the call --
        the model gets ``message`` as the tool's output and the run goes on -- or, with
        ``on_deny="raise"``, trips ``ToolInputGuardrailTripwireTriggered``. An allowed call's
        reservation is committed by these hooks' ``on_tool_end``: pass the same hooks to the run.
        """
        if on_deny not in ("reject", "raise"):
            raise ValueError(f"on_deny must be 'reject' or 'raise', not {on_deny!r}")

        async def guardrail(data: ToolInputGuardrailData) -> ToolGuardrailFunctionOutput:
            context = data.context
            key = self._tool_key(context, context.tool_name)
            if any(not c.started for c in self._calls.get(key, ())):  # run twice (pre-approval): once
                return ToolGuardrailFunctionOutput.allow(output_info={"reserved": "already"})
            call = self._tool_call(key, data.agent, context.tool_name, cost)
            try:
                await self._reserve(call)
            except Denied as denial:
                info = {"reason_code": denial.reason_code, "message": denial.message, "scope": denial.scope}
                if on_deny == "raise":
                    return ToolGuardrailFunctionOutput.raise_exception(output_info=info)
                return ToolGuardrailFunctionOutput.reject_content(message.format(reason=denial.message), info)
            self._add(call)
            return ToolGuardrailFunctionOutput.allow(output_info={"reserved": str(call.estimate)})

        return ToolInputGuardrail(guardrail_function=guardrail, name=name)

    # ---- running ----------------------------------------------------------------------------

    async def run(self, starting_agent: Agent[Any], input: Any, **kwargs: Any) -> RunResult:
        """``Runner.run`` with these hooks; whatever the run leaves pending is released.

        A budget denial raised inside a tool hook reaches the caller as the ``Denied`` itself (the
        SDK wraps it in ``UserError``), so ``except cycles.Denied`` works for every call.
        """
        token = _RUN.set(run := object())
        self.stopped = None
        try:
            return await Runner.run(starting_agent, input, hooks=self, **kwargs)
        except UserError as exc:
            if isinstance(exc.__cause__, Denied):
                raise exc.__cause__ from exc
            raise
        finally:
            _RUN.reset(token)
            await self._settle_run(run)

    def run_streamed(self, starting_agent: Agent[Any], input: Any, **kwargs: Any) -> RunResultStreaming:
        """``Runner.run_streamed`` with these hooks; what the run leaves pending is released when it ends."""
        token = _RUN.set(run := object())
        self.stopped = None
        try:
            result = Runner.run_streamed(starting_agent, input, hooks=self, **kwargs)
        finally:
            _RUN.reset(token)
        if result.run_loop_task is not None:
            result.run_loop_task.add_done_callback(lambda _: self._spawn(self._settle_run(run)))
        return result

    async def release_pending(self) -> None:
        """Settle every reservation still open (of any run): for ``Runner.run`` used directly."""
        await self.wait_settled()
        await self._settle_run(None)

    async def wait_settled(self) -> None:
        """Wait until the clean-ups of finished streamed runs are done."""
        while self._cleanups:
            await asyncio.gather(*self._cleanups, return_exceptions=True)

    # ---- pricing and subjects ---------------------------------------------------------------

    def model_name(self, agent: Agent[Any]) -> str:
        """The name a call of ``agent`` is priced with."""
        if self._model is not None:
            return self._model
        model = agent.model
        if isinstance(model, str):
            return model
        if isinstance(model, CyclesModel) and model.name is not None:
            return model.name
        if isinstance(name := getattr(model, "model", None), str):
            return name
        raise ValueError(
            f"cannot tell which model agent {agent.name!r} uses: pass CyclesRunHooks(..., model='gpt-4o') "
            "or CyclesModel(model, hooks, name='gpt-4o')"
        )

    def subject_for(self, agent: Agent[Any]) -> Subject:
        return self._subject(agent) if callable(self._subject) else self._subject

    def estimate(self, agent: Agent[Any], system_prompt: str | None, items: list[TResponseInputItem]) -> Amount:
        """Worst case of one model call: the prompt's approximate tokens plus every output token allowed."""
        texts = [system_prompt or "", *(_item_text(item) for item in items)]
        max_tokens = agent.model_settings.max_tokens or self.max_output_tokens
        return estimate_cost(
            self.model_name(agent), input_tokens=approx_messages_tokens(texts), max_output_tokens=max_tokens
        )

    @staticmethod
    def price(model: str, usage: Usage) -> Amount:
        """What a response's usage costs."""
        cached = usage.input_tokens_details.cached_tokens or 0
        return price_usage(
            model,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            cached_input_tokens=min(cached, usage.input_tokens),
        )

    # ---- internals --------------------------------------------------------------------------

    @property
    def _shadow(self) -> bool:
        return self.cycles.mode == "shadow"

    def _tool_key(self, context: RunContextWrapper[Any], tool_name: str) -> tuple[object, ...]:
        # Parallel calls of one tool differ by call id; other local tools (no ToolContext) by name.
        call_id = context.tool_call_id if isinstance(context, ToolContext) else tool_name
        return ("tool", id(context.usage), call_id)

    def _tool_call(self, key: tuple[object, ...], agent: Agent[Any], tool_name: str, cost: Amount | None) -> _Call:
        subject = self.subject_for(agent)
        if self.tool_scopes:
            subject = subject.merged(toolset=_LEVEL_VALUE.sub("_", tool_name)[:128])
        estimate = cost if cost is not None else self.tool_costs.get(tool_name, self.default_tool_cost)
        return _Call(
            key=key,
            subject=subject,
            action=Action("tool.call", tool_name),
            estimate=estimate,
            run=_RUN.get(),
            agent=agent.name,
        )

    async def _reserve(self, call: _Call) -> None:
        # The agent's name goes with the reservation: after a handoff the ledger shows who spent.
        guard = self.cycles.guard(call.subject, call.action, estimate=call.estimate, metadata={"agent": call.agent})
        await guard.start()  # raises the Denied before anything runs
        call.guard = guard

    def _add(self, call: _Call) -> None:
        self._calls.setdefault(call.key, []).append(call)

    def _pop(self, key: tuple[object, ...], *, started: bool | None = None) -> _Call | None:
        calls = self._calls.get(key)
        if not calls:
            return None
        call = next((c for c in calls if started is None or c.started == started), None)
        if call is not None:
            self._forget(call)
        return call

    def _forget(self, call: _Call) -> None:
        calls = self._calls.get(call.key, [])
        if call in calls:
            calls.remove(call)
        if not calls:
            self._calls.pop(call.key, None)
        if call.prompt is not None and self._by_prompt.get(id(call.prompt)) is call:
            del self._by_prompt[id(call.prompt)]

    def _call_for_prompt(self, prompt: object) -> _Call | None:
        """The model call on_llm_start reserved for this input list (the SDK passes the same list)."""
        return self._by_prompt.get(id(prompt))

    async def _abort(self, call: _Call, reason: BaseException | None = None) -> None:
        """The call failed: release its reservation, or commit what the wrapper saw it cost."""
        self._forget(call)
        guard, call.guard = call.guard, None
        if guard is None:
            return
        if call.actual is not None:
            guard.commit(call.actual)  # tokens were spent: fail() then settles instead of releasing
        await guard.fail(reason)

    def _pending(self, run: object | None) -> Iterator[_Call]:
        for calls in list(self._calls.values()):
            yield from (c for c in list(calls) if run is None or c.run is run)

    async def _settle_run(self, run: object | None) -> None:
        for call in list(self._pending(run)):
            await self._abort(call)

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)


def _item_text(item: object) -> str:
    if isinstance(item, BaseModel):
        return item.model_dump_json(exclude_none=True)
    try:
        return json.dumps(item, default=str, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(item)
