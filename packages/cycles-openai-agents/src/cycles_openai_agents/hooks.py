"""Run hooks mapping the SDK's callbacks onto a Cycles run (``cycles.run``): every model and tool
call is a step of the run, and every settlement rule is the core's.

The SDK calls ``on_llm_start`` just before the model and lets an exception from it propagate, so a
denial there stops the call before a token is spent. ``on_llm_end`` carries the response's
``usage``, priced by ``cycles.pricing``. Tools are reserved in ``on_tool_start`` (or earlier, by
:meth:`CyclesRunHooks.tool_guardrail`, as a step that has not begun) and settled in ``on_tool_end``.

Each ``Runner`` run is one Cycles run, created at its first call: :meth:`CyclesRunHooks.run` /
:meth:`~CyclesRunHooks.run_streamed` end it when the SDK run ends (success, exception,
cancellation), settling what is still open by the core's rule (a tool that ran is committed, a
step that never started is released). Under a plain ``Runner.run`` a failed run's reservations
are bounded by the heartbeat's ``max_lease_ms`` and the run's lifetime (nothing is kept once the
SDK drops the run), or settled at once by :meth:`~CyclesRunHooks.release_pending`; the SDK has no
hook for a failed model call, which :class:`~cycles_openai_agents.model.CyclesModel` (a model
wrapper) settles at once, besides clamping ``max_tokens`` to the caps and ending a run with a final
message.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
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

from cycles import Action, Amount, AsyncCycles, AsyncRun, Decision, Denied, Subject, usd, with_args_fingerprint
from cycles.guard import AsyncGuard, OnFailure
from cycles.pricing import approx_messages_tokens, estimate_cost
from cycles_openai_agents import tracing
from cycles_openai_agents.model import CyclesModel, usage_price

__all__ = ["CyclesRunHooks", "OnExhausted", "OnToolDenied"]

log = logging.getLogger("cycles.openai_agents")

OnExhausted = Literal["raise", "finish"]
"""What a denied model call does: raise the ``Denied``, or end the run with ``final_message``."""
OnToolDenied = Literal["reject", "raise"]
"""What a tool guardrail does on denial: tell the model why and go on, or raise a tripwire."""

DEFAULT_FINAL_MESSAGE = "I have to stop here: the budget for this task is used up."

# The runs a call of ``CyclesRunHooks.run`` / ``run_streamed`` created, for it to end. Every task the
# SDK creates for a run copies the caller's context, so they all append to the same list.
_STARTED: ContextVar[list[AsyncRun] | None] = ContextVar("cycles_openai_agents_runs", default=None)
_LEVEL_VALUE = re.compile(r"[^a-zA-Z0-9_.-]")
#: What the SDK's default ``failure_error_function`` turns a tool's exception into.
TOOL_ERROR_TEXT = "An error occurred while running the tool. Please try again."


@dataclass(eq=False)
class _Call:
    """One model call's step, for the hook and the model wrapper that see it."""

    model: str
    guard: AsyncGuard | None = None
    denied: Denied | None = None  # "finish" mode: the model must not be called
    prompt_tokens: int = 0


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
    - ``run_budgets``: budgets of each run's own workflow scope (the subject must not name a
      workflow), deleted when the run ends.
    - ``charge_failed_tools``: tools charged even when they fail (by default a tool that raised,
      also when the SDK turned the error into a result, is released); ``tool_failed(name, result)``
      tells a failure from a result when a tool has its own ``failure_error_function``.
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
        run_budgets: Sequence[Amount] = (),
        charge_failed_tools: Iterable[str] = (),
        tool_failed: Callable[[str, object], bool] | None = None,
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
        self.run_budgets = tuple(run_budgets)
        self.charge_failed_tools = set(charge_failed_tools)
        self.tool_failed = tool_failed or (lambda name, result: result == TOOL_ERROR_TEXT)
        # The run of each SDK run, by its Usage object (one per run, shared by its tool contexts);
        # an entry goes when the SDK drops the run, so nothing here outlives it.
        self._runs: dict[int, AsyncRun] = {}
        self._cleanups: set[asyncio.Task[None]] = set()

    # ---- model calls ------------------------------------------------------------------------

    async def on_llm_start(
        self,
        context: RunContextWrapper[Any],
        agent: Agent[Any],
        system_prompt: str | None,
        input_items: list[TResponseInputItem],
    ) -> None:
        run = await self.run_of(context, agent)
        model = self.model_name(agent)
        estimate = self.estimate(agent, system_prompt, input_items)
        call = _Call(model=model, prompt_tokens=self._prompt_tokens(system_prompt, input_items))
        guard = run.guard(
            Action("llm.completion", model), estimate, subject=self.subject_for(agent), metadata={"agent": agent.name}
        )
        tracing.annotate(guard, agent.name)
        try:
            await guard.start()  # raises the Denied before anything runs
            call.guard = guard
            tracing.record(guard)
        except Denied as denial:
            tracing.record(guard, denial)
            if self.on_exhausted != "finish" or not isinstance(agent.model, CyclesModel):
                raise
            call.denied = self.stopped = denial  # CyclesModel answers with final_message instead
            log.info("budget exhausted, ending the run with the final message: %s", denial)
        run.track(("llm", id(agent)), call)
        run.track(("prompt", id(input_items)), call)

    async def on_llm_end(self, context: RunContextWrapper[Any], agent: Agent[Any], response: ModelResponse) -> None:
        run = await self.run_of(context, agent)
        call: _Call | None = run.take(("llm", id(agent)))
        if call is None or call.guard is None:
            return  # CyclesModel answered (the model was not called), or nothing was reserved
        usage = response.usage
        if usage.requests or usage.input_tokens or usage.output_tokens:
            actual = self.price(call.model, usage)
            call.guard.commit(
                actual, metrics={"tokens_input": usage.input_tokens, "tokens_output": usage.output_tokens}
            )
        await call.guard.finish()  # no usage: the core commits the estimate and flags it
        tracing.record(call.guard)

    # ---- tool calls -------------------------------------------------------------------------

    async def on_tool_start(self, context: RunContextWrapper[Any], agent: Agent[Any], tool: Tool) -> None:
        run = await self.run_of(context, agent)
        key = self._tool_key(context, tool.name)
        guard: AsyncGuard | None = run.peek(key)
        if guard is None:  # no guardrail reserved it: reserve now
            guard = self._tool_guard(run, agent, context, tool.name, None)
            try:
                await guard.start()
                tracing.record(guard)
            except Denied as denial:
                tracing.record(guard, denial)
                # The denial aborts the SDK run: settle its run now (tools that already ran are
                # committed, reserved ones that never started are released), even under Runner.run.
                await run.end(denial)
                raise
            run.track(key, guard)
        guard.begin()

    async def on_tool_end(self, context: RunContextWrapper[Any], agent: Agent[Any], tool: Tool, result: object) -> None:
        run = await self.run_of(context, agent)
        guard: AsyncGuard | None = run.take(self._tool_key(context, tool.name))
        if guard is None:
            return
        if self.tool_failed(tool.name, result):  # the SDK turned the tool's exception into a result
            await guard.fail(RuntimeError(f"tool {tool.name} failed: {result}"))
        else:
            await guard.finish()  # a tool costs what it reserved
        tracing.record(guard)

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
            run = await self.run_of(context, data.agent)
            key = self._tool_key(context, context.tool_name)
            if run.peek(key) is not None:  # run twice (pre-approval): reserve once
                return ToolGuardrailFunctionOutput.allow(output_info={"reserved": "already"})
            guard = self._tool_guard(run, data.agent, context, context.tool_name, cost)
            try:
                await guard.start(begin=False)  # reserved ahead: it begins in on_tool_start
                tracing.record(guard)
            except Denied as denial:
                tracing.record(guard, denial)
                info = {"reason_code": denial.reason_code, "message": denial.message, "scope": denial.scope}
                if on_deny == "raise":
                    return ToolGuardrailFunctionOutput.raise_exception(output_info=info)
                return ToolGuardrailFunctionOutput.reject_content(message.format(reason=denial.message), info)
            run.track(key, guard)
            return ToolGuardrailFunctionOutput.allow(output_info={"reserved": str(guard.estimate)})

        return ToolInputGuardrail(guardrail_function=guardrail, name=name)

    # ---- running ----------------------------------------------------------------------------

    async def run(self, starting_agent: Agent[Any], input: Any, **kwargs: Any) -> RunResult:
        """``Runner.run`` with these hooks, as one Cycles run ended (and settled) when it ends.

        A budget denial raised inside a tool hook reaches the caller as the ``Denied`` itself (the
        SDK wraps it in ``UserError``), so ``except cycles.Denied`` works for every call.
        """
        started: list[AsyncRun] = []
        token = _STARTED.set(started)
        self.stopped = None
        error: BaseException | None = None
        try:
            return await Runner.run(starting_agent, input, hooks=self, **kwargs)
        except UserError as exc:
            error = exc
            if isinstance(exc.__cause__, Denied):
                raise exc.__cause__ from exc
            raise
        except BaseException as exc:
            error = exc
            raise
        finally:
            _STARTED.reset(token)
            await asyncio.shield(self._end(started, error))

    def run_streamed(self, starting_agent: Agent[Any], input: Any, **kwargs: Any) -> RunResultStreaming:
        """``Runner.run_streamed`` with these hooks; its Cycles run ends when the stream's run ends."""
        started: list[AsyncRun] = []
        token = _STARTED.set(started)
        self.stopped = None
        try:
            result = Runner.run_streamed(starting_agent, input, hooks=self, **kwargs)
        finally:
            _STARTED.reset(token)
        task = result.run_loop_task
        if task is not None:
            task.add_done_callback(lambda t: self._spawn(self._end(started, _task_error(t))))
        return result

    async def release_pending(self) -> None:
        """End every run still open as failed (a plain ``Runner.run`` that raised): a call in flight
        failed and is released, tools that ran are settled, nothing stays reserved."""
        await self.wait_settled()
        await self._end(list(self._runs.values()), RuntimeError("the run ended without its hooks knowing"))

    async def wait_settled(self) -> None:
        """Wait until the clean-ups of finished streamed runs are done."""
        while self._cleanups:
            await asyncio.gather(*self._cleanups, return_exceptions=True)

    async def run_of(self, context: RunContextWrapper[Any], agent: Agent[Any]) -> AsyncRun:
        """The Cycles run of the SDK run ``context`` belongs to (created, and started, at its first call)."""
        usage = context.usage
        run = self._runs.get(id(usage))
        if run is None:
            name = _LEVEL_VALUE.sub("_", agent.name)[:100] or "agent"
            # Subjects keep their levels (budgets may sit on tenant/agent scopes) unless the run
            # needs a workflow scope of its own for run_budgets.
            own = bool(self.run_budgets)
            run = self.cycles.run(self.subject_for(agent), name=name, budgets=self.run_budgets, own_scope=own)
            await run.start()
            self._runs[id(usage)] = run
            weakref.finalize(usage, self._runs.pop, id(usage), None)
            started = _STARTED.get()
            if started is not None:
                started.append(run)
        return run

    async def _end(self, runs: list[AsyncRun], error: BaseException | None) -> None:
        for run in runs:
            for key in [k for k, v in self._runs.items() if v is run]:
                self._runs.pop(key, None)
            await run.end(error)

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
        """What a response's usage costs, at ``model``'s price."""
        return usage_price(model, usage)

    # ---- internals --------------------------------------------------------------------------

    @property
    def _shadow(self) -> bool:
        return self.cycles.mode == "shadow"

    @staticmethod
    def _prompt_tokens(system_prompt: str | None, items: list[TResponseInputItem]) -> int:
        return approx_messages_tokens([system_prompt or "", *(_item_text(item) for item in items)])

    def _tool_key(self, context: RunContextWrapper[Any], tool_name: str) -> tuple[object, ...]:
        # Parallel calls of one tool differ by call id; other local tools (no ToolContext) by name.
        call_id = context.tool_call_id if isinstance(context, ToolContext) else tool_name
        return ("tool", call_id)

    def _tool_guard(
        self, run: AsyncRun, agent: Agent[Any], context: RunContextWrapper[Any], tool_name: str, cost: Amount | None
    ) -> AsyncGuard:
        subject = self.subject_for(agent)
        if self.tool_scopes:
            subject = subject.merged(toolset=_LEVEL_VALUE.sub("_", tool_name)[:128])
        estimate = cost if cost is not None else self.tool_costs.get(tool_name, self.default_tool_cost)
        on_failure: OnFailure = "charge" if tool_name in self.charge_failed_tools else "release"
        action = Action("tool.call", tool_name)
        if isinstance(context, ToolContext):  # the model's arguments (JSON text), for the loop guard
            action = with_args_fingerprint(action, context.tool_arguments)
        guard = run.guard(action, estimate, subject=subject, metadata={"agent": agent.name}, on_failure=on_failure)
        tracing.annotate(guard, agent.name)
        return guard

    def _call_for_prompt(self, prompt: object) -> _Call | None:
        """The model call on_llm_start reserved for this input list (the SDK passes the same list)."""
        for run in list(self._runs.values()):
            call: _Call | None = run.peek(("prompt", id(prompt)))
            if call is not None:
                return call
        return None

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)


def _task_error(task: asyncio.Task[Any]) -> BaseException | None:
    if task.cancelled():
        return asyncio.CancelledError()
    return task.exception()


def _item_text(item: object) -> str:
    if isinstance(item, BaseModel):
        return item.model_dump_json(exclude_none=True)
    try:
        return json.dumps(item, default=str, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(item)
