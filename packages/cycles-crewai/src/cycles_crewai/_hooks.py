"""``enable``: CrewAI's global hooks and event-bus listeners, mapped onto a Cycles run.

- each kickoff is a ``cycles`` run (``cy.run``): the run is the subject's workflow, with the
  per-run budgets (``run_budgets``), created at EXECUTION_START and ended at EXECUTION_END (or
  on the kickoff's failed event, where CrewAI dispatches no EXECUTION_END). The run lives in a
  context variable, so the same ``Crew`` kicked off from two threads gets two runs;
  inside a run the caller opened (``with cy.run(...)``, ``kickoff_for_each``) the crew uses it;
- before every model call: reserve it in the run. A denial raises ``HookAborted`` (``BudgetStop``),
  the only thing that really stops a CrewAI call: other hook exceptions are swallowed and a
  ``False`` return is retried as a recoverable error;
- LLM-call-completed event: commit the usage, priced by the model the event names; LLM-call-failed
  event: fail the step. Tokens the LLM tracked before it failed (a structured output that did not
  validate) are the call's actual, so it is charged; otherwise it is released;
- before every tool call: check it against the caps of the model call that chose it, reserve its
  price from ``tool_costs`` (e.g. risk points); after it: settle (a tool that failed, also when
  CrewAI turned the exception into a result, is released unless named in ``charge_failed_tools``).

Every settlement rule is the core's (``cycles.guard`` / ``cycles.run``); this module only maps.
CrewAI runs event handlers on a thread pool, after the call returned. The hook stores the step in a
context variable, which the bus copies into the handler of every event the call emits, so
concurrent agents never settle each other's calls.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextvars import ContextVar
from typing import Any

from crewai.events import crewai_event_bus
from crewai.events.types.crew_events import CrewKickoffFailedEvent
from crewai.events.types.llm_events import LLMCallCompletedEvent, LLMCallFailedEvent
from crewai.hooks import HookAborted, InterceptionPoint, register_hook, unregister_hook
from crewai.hooks.llm_hooks import LLMCallHookContext
from crewai.hooks.tool_hooks import ToolCallHookContext
from crewai.tools.tool_failure import detect_tool_failure
from crewai.types.usage_metrics import UsageMetrics
from crewai.utilities.string_utils import sanitize_tool_name

from cycles import (
    Action,
    Amount,
    BatchResult,
    Cycles,
    CyclesError,
    Denied,
    Guard,
    InvalidRequest,
    Run,
    ShadowRecord,
    Subject,
    UnpricedModel,
    current_run,
    for_each,
    risk_points,
    with_args_fingerprint,
)
from cycles.guard import OnFailure
from cycles.pricing import approx_messages_tokens, estimate_cost, price_usage
from cycles.scopes import derive_scopes
from cycles_crewai._common import (
    BLOCKED_BY_HOOK,
    BudgetStop,
    OnDeny,
    ToolCall,
    blocked_result,
    crew_attributes,
    current_tool_call,
    scope_value,
)

__all__ = ["CyclesHooks", "enable"]

log = logging.getLogger("cycles_crewai")


class _ModelCall:
    """The step a before-model hook reserved, for the events of that call (no state of its own)."""

    __slots__ = ("guard", "hooks", "llm", "model", "usage_before")

    def __init__(self, hooks: CyclesHooks, guard: Guard, model: str, llm: Any) -> None:
        self.hooks, self.guard, self.model, self.llm = hooks, guard, model, llm
        self.usage_before = _tracked(llm)


_current_call: ContextVar[_ModelCall | None] = ContextVar("cycles_crewai_model_call", default=None)
_owned_run: ContextVar[Run | None] = ContextVar("cycles_crewai_run", default=None)


def _tracked(llm: Any) -> UsageMetrics | None:
    """What the LLM object has counted so far (CrewAI's providers count a response's tokens before
    parsing it, so a call that failed afterwards shows up in the difference)."""
    summary = getattr(llm, "get_token_usage_summary", None)
    return summary() if callable(summary) else None


def _texts(messages: Iterable[Any]) -> list[str]:
    texts = []
    for message in messages:
        content = message.get("content") if isinstance(message, Mapping) else message
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts.extend(str(p.get("text", "")) for p in content if isinstance(p, Mapping))
    return texts


def _priced(model: str, price: Callable[[str], Amount]) -> Amount:
    """Price a CrewAI model name; a LiteLLM-style ``openai/gpt-4o`` falls back to its last segment."""
    try:
        return price(model)
    except UnpricedModel:
        if "/" not in model:
            raise
        return price(model.rsplit("/", 1)[1])


def _usage_cost(model: str, usage: UsageMetrics) -> tuple[Amount, dict[str, Any]]:
    actual = _priced(
        model,
        lambda m: price_usage(
            m,
            input_tokens=usage.prompt_tokens,
            output_tokens=usage.completion_tokens,
            cached_input_tokens=min(usage.cached_prompt_tokens, usage.prompt_tokens),
        ),
    )
    return actual, {
        "tokens_input": usage.prompt_tokens,
        "tokens_output": usage.completion_tokens,
        "model_version": model[:128],  # the model that answered: gen_ai.response.model on the commit span
    }


class CyclesHooks:
    """The hooks and listeners one ``enable(...)`` installed. A context manager: leaving it (or
    ``disable()``) uninstalls them."""

    def __init__(
        self,
        cycles: Cycles,
        subject: Subject,
        *,
        tool_costs: Mapping[str, int | Amount] | None = None,
        charge_failed_tools: Iterable[str] = (),
        on_tool_deny: OnDeny = "soft",
        run_budgets: Sequence[Amount] = (),
        keep_run_budgets: bool = False,
        per_agent: bool = True,
        max_output_tokens: int = 1024,
    ) -> None:
        if on_tool_deny not in ("soft", "hard"):
            raise ValueError("on_tool_deny must be 'soft' or 'hard'")
        if run_budgets and subject.workflow is not None:
            raise InvalidRequest(
                f"run_budgets need a workflow scope per run, but the subject names workflow {subject.workflow!r}: "
                "leave it unset (each kickoff becomes the workflow)"
            )
        self.cycles = cycles
        self.subject = subject
        self.on_tool_deny: OnDeny = on_tool_deny
        self.tool_costs = {
            sanitize_tool_name(name): risk_points(cost) if isinstance(cost, int) else cost
            for name, cost in (tool_costs or {}).items()
        }
        self.charge_failed_tools = {sanitize_tool_name(name) for name in charge_failed_tools}
        self.run_budgets = tuple(run_budgets)
        self.keep_run_budgets = keep_run_budgets
        self.per_agent = per_agent
        self.max_output_tokens = max_output_tokens
        #: The id (the workflow) of every crew run started under these hooks, oldest first.
        self.runs: list[str] = []
        self.active = False
        self._hooks = (
            (InterceptionPoint.EXECUTION_START, self._on_execution_start),
            (InterceptionPoint.EXECUTION_END, self._on_execution_end),
            (InterceptionPoint.PRE_MODEL_CALL, self._before_llm),
            (InterceptionPoint.PRE_TOOL_CALL, self._before_tool),
            (InterceptionPoint.POST_TOOL_CALL, self._after_tool),
        )

    # -- install / uninstall ---------------------------------------------------------------------

    def install(self) -> CyclesHooks:
        if not self.active:
            for point, hook in self._hooks:
                register_hook(point, hook)
            crewai_event_bus.on(LLMCallCompletedEvent)(self._on_llm_completed)
            crewai_event_bus.on(LLMCallFailedEvent)(self._on_llm_failed)
            crewai_event_bus.on(CrewKickoffFailedEvent)(self._on_kickoff_failed)
            self.active = True
        return self

    def disable(self) -> None:
        """Uninstall, after letting pending LLM events settle their calls. Idempotent."""
        if not self.active:
            return
        self.active = False  # executors that copied the hooks when they were created keep calling them
        for point, hook in self._hooks:
            unregister_hook(point, hook)
        crewai_event_bus.flush()
        crewai_event_bus.off(LLMCallCompletedEvent, self._on_llm_completed)
        crewai_event_bus.off(LLMCallFailedEvent, self._on_llm_failed)
        crewai_event_bus.off(CrewKickoffFailedEvent, self._on_kickoff_failed)

    def __enter__(self) -> CyclesHooks:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.disable()

    # -- runs and subjects -----------------------------------------------------------------------

    def new_run(self, crew: Any = None) -> Run:
        """A run for one kickoff: the crew's name plus a unique suffix, with ``run_budgets``."""
        name = scope_value(str(getattr(crew, "name", None) or "crew"), "crew")[:110]
        run = self.cycles.run(self.subject, name=name, budgets=self.run_budgets, keep_budgets=self.keep_run_budgets)
        self.runs.append(run.id)
        return run

    def _run(self) -> Run | None:
        run = current_run()
        # an ended run left current by a kickoff that failed (see ``_on_kickoff_failed``) is not it
        if isinstance(run, Run) and run._client is self.cycles and run.state != "ended":
            return run
        return None

    def subject_for(self, agent: Any = None, task: Any = None, run: Run | None = None) -> Subject:
        """Who a call is charged to: the run's subject (the base, with the run as its workflow), the
        agent role as its agent (unless the base sets one), and the task (name, else id) as ``task``."""
        base = run.subject if run is not None else self.subject
        role = getattr(agent, "role", None)
        if self.per_agent and isinstance(role, str) and self.subject.agent is None:
            base = base.merged(agent=scope_value(role, "agent"))
        dims = dict(base.dimensions or {})
        if task is not None and len(dims) < 16 and "task" not in dims:
            dims["task"] = str(getattr(task, "name", None) or getattr(task, "id", ""))[:256]
            base = base.model_copy(update={"dimensions": dims})
        return base

    def kickoff_for_each(
        self, crew: Any, inputs: Iterable[Mapping[str, Any]], *, stop_on_denial: bool = False
    ) -> BatchResult:
        """``crew.kickoff_for_each`` with one run per input: a denial ends that input's run (its entry
        is the ``Denied``) and the others go on, unless ``stop_on_denial``."""

        def kickoff(run: Run, item: Mapping[str, Any]) -> Any:
            try:
                return crew.copy().kickoff(inputs=dict(item))
            except BudgetStop as stop:
                if isinstance(stop.error, Denied):
                    raise stop.error from stop
                raise

        return for_each(lambda i: self.new_run(crew), inputs, kickoff, stop_on_denial=stop_on_denial)

    # -- crew runs -------------------------------------------------------------------------------

    def _on_execution_start(self, ctx: Any) -> None:
        crew = getattr(ctx, "crew", None)
        if not self.active or crew is None:
            return
        if _owned_run.get() is not None:  # an outer kickoff's run, or one whose kickoff failed unended:
            crewai_event_bus.flush()  # let that failure's event end it (``_on_kickoff_failed``) first
        if self._run() is not None:
            return  # inside a run the caller opened: the crew uses it
        try:
            run = self.new_run(crew).start()
        except CyclesError as error:  # only HookAborted stops a kickoff; anything else is swallowed
            raise BudgetStop(error, "could not start the run") from error
        _owned_run.set(run)

    def _on_execution_end(self, ctx: Any) -> None:
        run = _owned_run.get()
        if run is None or getattr(ctx, "crew", None) is None:
            return
        crewai_event_bus.flush()  # usage arrives on the bus's thread pool: let it settle the calls first
        _owned_run.set(None)
        run.end(getattr(ctx, "error", None))

    def _on_kickoff_failed(self, source: Any, event: CrewKickoffFailedEvent) -> None:
        """A kickoff raised. CrewAI skips its EXECUTION_END when another kickoff of the same ``Crew``
        ended meanwhile (its start/end pairing flags live on the Crew, not on the kickoff: two
        overlapping kickoffs share them), so the run is ended here too. The bus runs this in a copy
        of the kickoff's context: ``_owned_run`` is that kickoff's run. ``end`` is idempotent."""
        run = _owned_run.get()
        if run is not None:
            run.end(RuntimeError(event.error))

    # -- model calls -----------------------------------------------------------------------------

    def _before_llm(self, ctx: LLMCallHookContext) -> None:
        _current_call.set(None)  # this context's events belong to this call from now on
        if not self.active:
            return
        llm = ctx.llm
        model = str(getattr(llm, "model", None) or "unknown")
        run = self._run()
        subject = self.subject_for(ctx.agent, ctx.task, run)
        action = Action("llm.completion", model)
        limit = int(getattr(llm, "max_tokens", None) or getattr(llm, "max_completion_tokens", None) or 0)
        try:
            prompt = approx_messages_tokens(_texts(ctx.messages))
            out = limit or self.max_output_tokens
            estimate = _priced(model, lambda m: estimate_cost(m, input_tokens=prompt, max_output_tokens=out))
            guard = (
                run.guard(action, estimate, subject=subject)
                if run is not None
                else self.cycles.guard(subject, action, estimate)
            )
            guard.annotate(crew_attributes(ctx.crew, ctx.agent, ctx.task, llm))
            guard.start()
        except CyclesError as error:  # Denied, or a call nobody can price or record: fail closed
            if self.cycles.mode == "shadow":  # never blocks (the guard itself logs its would-denies)
                log.warning("shadow mode: model call to %s not accounted: %s", model, error)
                return
            raise BudgetStop(error, f"model call to {model} by {derive_scopes(subject)[-1]}") from error
        _current_call.set(_ModelCall(self, guard, model, llm))
        if run is not None and ctx.agent is not None:  # its caps apply to the tools this call chooses
            run.grant((id(ctx.agent), id(ctx.task)), guard.caps)

    def _on_llm_completed(self, source: Any, event: LLMCallCompletedEvent) -> None:
        call = _current_call.get()
        if call is None or call.hooks is not self:
            return
        usage = UsageMetrics.from_provider_dict(event.usage) if event.usage else None
        self._settle(call, usage, event.model, failed=False)

    def _on_llm_failed(self, source: Any, event: LLMCallFailedEvent) -> None:
        call = _current_call.get()
        if call is None or call.hooks is not self:
            return
        before, after = call.usage_before, _tracked(call.llm)
        billed = after.delta_since(before) if before is not None and after is not None else None
        self._settle(call, billed if billed is not None and billed.total_tokens else None, event.model, failed=True)

    @staticmethod
    def _settle(call: _ModelCall, usage: UsageMetrics | None, answered_by: str | None, *, failed: bool) -> None:
        guard = call.guard
        try:
            if usage is not None:  # priced by the model that answered, as the event names it
                actual, metrics = _usage_cost(answered_by or call.model, usage)
                guard.commit(actual, metrics=metrics)
            if failed:
                guard.fail(RuntimeError(f"model call to {call.model} failed"))
            else:
                guard.finish()  # a retried call's completion after its failure is charged by the core
        except CyclesError:  # never raise into CrewAI's bus; an unsettled reservation expires on its own
            log.exception("could not settle the reservation of a %s call", call.model)

    # -- tool calls ------------------------------------------------------------------------------

    def _before_tool(self, ctx: ToolCallHookContext) -> None:
        current_tool_call.set(None)
        if not self.active:
            return
        run = self._run()
        subject = self.subject_for(ctx.agent, ctx.task, run)
        call = ToolCall(self.cycles, subject, ctx.tool_input, errors_before=_tool_errors(ctx.task))
        current_tool_call.set(call)  # for the after-tool hook, and a budgeted() tool run by this call
        original = getattr(ctx.tool, "_original_tool", None)
        name = str(getattr(original, "name", None) or ctx.tool_name)
        action = with_args_fingerprint(Action("tool.call", name), ctx.tool_input)
        cost = self.tool_costs.get(ctx.tool_name)
        if run is not None:
            try:
                run.check_tool(name, (id(ctx.agent), id(ctx.task)))
            except CyclesError as denial:
                self._deny(call, action, cost, denial)
        if cost is None or getattr(original, "__cycles_budgeted__", False):
            return  # unpriced, or a budgeted() tool that reserves for itself
        on_failure: OnFailure = "charge" if ctx.tool_name in self.charge_failed_tools else "release"
        guard = (
            run.guard(action, cost, subject=subject, on_failure=on_failure)
            if run is not None
            else self.cycles.guard(subject, action, cost, on_failure=on_failure)
        )
        guard.annotate(crew_attributes(ctx.crew, ctx.agent, ctx.task))
        try:
            guard.start(begin=False)  # runs only if no other hook blocks it
        except CyclesError as error:  # Denied (incl. the budget's tool caps), or no budget in this unit
            self._deny(call, action, cost, error)
            return
        call.guard = guard

    def _deny(self, call: ToolCall, action: Action, cost: Amount | None, error: CyclesError) -> None:
        """Block the tool (the after-tool hook then reports or stops); in shadow mode only record."""
        if self.cycles.mode == "shadow":
            scope = error.details.get("scope")
            record = ShadowRecord(
                subject=call.subject,
                action=action,
                estimate=cost or risk_points(0),
                reason_code=error.code,
                message=error.message,
                scope=scope if isinstance(scope, str) else None,
                at_ms=time.time_ns() // 1_000_000,
            )
            self.cycles.shadow_log.append(record)
            log.warning("shadow mode: would deny tool %s: %s", action.name, error)
            return
        if not isinstance(error, Denied):  # no budget in this unit, ledger down: tell the developer too
            log.warning("Cycles blocked tool %s: %s", action.name, error)
        call.denial = error
        raise HookAborted(f"Cycles denied {action.name}: {error}", source="cycles")

    def _after_tool(self, ctx: ToolCallHookContext) -> str | None:
        call = current_tool_call.get()
        current_tool_call.set(None)
        if call is None or call.tool_input is not ctx.tool_input:
            return None
        if call.denial is not None:
            if self.on_tool_deny == "hard":
                raise BudgetStop(call.denial, f"tool {ctx.tool_name}")
            return blocked_result(ctx.tool_name, call.denial).as_agent_message()
        guard = call.guard
        if guard is None:
            return None
        try:
            # CrewAI runs the after-hooks of a call another hook blocked, too: that one never ran.
            if not str(ctx.tool_result or "").startswith(BLOCKED_BY_HOOK):
                guard.begin()
            failure = detect_tool_failure(ctx.raw_tool_result)
            if failure is not None or _tool_errors(ctx.task) > call.errors_before:
                guard.fail(RuntimeError(failure.message if failure else f"tool {ctx.tool_name} failed"))
            else:
                guard.finish()
        except CyclesError:
            log.exception("could not settle the reservation of tool call %s", guard.idempotency_key)
        return None


def _tool_errors(task: Any) -> int:
    """CrewAI counts every tool error on the task (raised, or turned into a result)."""
    return int(getattr(task, "tools_errors", 0) or 0)


def enable(
    cycles: Cycles,
    subject: Subject,
    *,
    tool_costs: Mapping[str, int | Amount] | None = None,
    charge_failed_tools: Iterable[str] = (),
    on_tool_deny: OnDeny = "soft",
    run_budgets: Sequence[Amount] = (),
    keep_run_budgets: bool = False,
    per_agent: bool = True,
    max_output_tokens: int = 1024,
) -> CyclesHooks:
    """Put every CrewAI model call, and every tool named in ``tool_costs``, under Cycles budgets.

    ``subject`` is the base, e.g. ``Subject(tenant="acme")``: each kickoff becomes its workflow unless it
    names one, each agent role its agent scope (``per_agent``). Model calls are priced in USD from
    their token usage; ``max_output_tokens`` bounds the estimate when the LLM object sets no
    ``max_tokens``. ``tool_costs`` prices tools, an int as risk points (``{"read_crm": 1,
    "update_crm": 25}``). ``run_budgets`` are set on each run's workflow scope as it starts (e.g.
    ``[risk_points(60)]``: at most 60 points of consequential actions per run); they are deleted when
    the run ends unless ``keep_run_budgets``. A tool that fails is released, unless its name is in
    ``charge_failed_tools`` (tools that bill even when they fail). ``hooks.kickoff_for_each(crew,
    inputs)`` gives every input its own run; a denial stops that input only.

    A denied model call stops the crew with ``BudgetStop``; a denied tool call is reported to the agent
    as a blocked result (``on_tool_deny="soft"``) or stops the crew (``"hard"``). Shadow mode
    (``Cycles(..., mode="shadow")``) blocks nothing and records would-denies in ``cycles.shadow_log``.

    Returns the installed ``CyclesHooks``: a context manager; leaving it (or ``disable()``) undoes
    this. CrewAI copies the global model hooks into an agent's executor when the agent first runs, so
    enable before that; after ``disable()`` those copies do nothing.
    """
    hooks = CyclesHooks(
        cycles,
        subject,
        tool_costs=tool_costs,
        charge_failed_tools=charge_failed_tools,
        on_tool_deny=on_tool_deny,
        run_budgets=run_budgets,
        keep_run_budgets=keep_run_budgets,
        per_agent=per_agent,
        max_output_tokens=max_output_tokens,
    )
    return hooks.install()
