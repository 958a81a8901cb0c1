"""``enable``: CrewAI's global hooks and event-bus listeners, wired to a Cycles client.

- before every model call: reserve its estimated cost. A denial raises ``HookAborted`` (``BudgetStop``),
  the only thing that really stops a CrewAI call: other hook exceptions are swallowed and a ``False``
  return is retried as a recoverable error;
- LLM-call-completed event: commit the real token usage; LLM-call-failed event: release. CrewAI's
  rate-limit retries re-run a call after its failed event: a completion after a release is charged
  as a direct event, so a retried call is paid for once;
- before every tool call: check the tool against the caps of the model call that chose it, reserve its
  price from ``tool_costs`` (e.g. risk points); after it: commit, or report the denial to the agent;
- each kickoff: the crew run becomes the subject's workflow (optionally with budgets of its own), each
  agent role its agent scope, the task the subject's ``task`` dimension.

CrewAI runs event handlers on a thread pool, after the call returned. The hook stores the reservation
in a context variable, which the bus copies into the handler of every event the call emits, so
concurrent agents never settle each other's calls.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextvars import ContextVar
from typing import Any, Literal

from crewai.events import crewai_event_bus
from crewai.events.types.llm_events import LLMCallCompletedEvent, LLMCallFailedEvent
from crewai.hooks import HookAborted, InterceptionPoint, register_hook, unregister_hook
from crewai.hooks.llm_hooks import LLMCallHookContext
from crewai.hooks.tool_hooks import ToolCallHookContext
from crewai.types.usage_metrics import UsageMetrics
from crewai.utilities.string_utils import sanitize_tool_name

from cycles import (
    Action,
    Amount,
    Caps,
    Cycles,
    CyclesError,
    Denied,
    Guard,
    ShadowRecord,
    Subject,
    ToolNotAllowed,
    UnpricedModel,
    risk_points,
)
from cycles.pricing import approx_messages_tokens, estimate_cost, price_usage
from cycles.scopes import derive_scopes
from cycles_crewai._common import (
    BLOCKED_BY_HOOK,
    BudgetStop,
    OnDeny,
    ToolCall,
    blocked_result,
    current_tool_call,
    scope_value,
)

__all__ = ["CyclesHooks", "enable"]

log = logging.getLogger("cycles_crewai")


class _ModelCall:
    """One reserved model call. Its events settle it: the first completion commits, a failure
    releases, a completion after a failure (a retried call) is charged as an event."""

    __slots__ = ("_lock", "action", "guard", "hooks", "run", "state", "subject")

    def __init__(self, hooks: CyclesHooks, guard: Guard, subject: Subject, action: Action) -> None:
        self.hooks, self.guard, self.subject, self.action = hooks, guard, subject, action
        self.run = subject.workflow
        self.state: Literal["open", "committed", "released"] = "open"
        self._lock = threading.Lock()

    def settle(self, completed: bool) -> Literal["commit", "release", "event"] | None:
        with self._lock:
            if self.state == "open":
                self.state = "committed" if completed else "released"
                return "commit" if completed else "release"
            if self.state == "released" and completed:
                self.state = "committed"
                return "event"
            return None


_current_call: ContextVar[_ModelCall | None] = ContextVar("cycles_crewai_model_call", default=None)


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


class CyclesHooks:
    """The hooks and listeners one ``enable(...)`` installed. A context manager: leaving it (or
    ``disable()``) uninstalls them and settles what is still open."""

    def __init__(
        self,
        cycles: Cycles,
        subject: Subject,
        *,
        tool_costs: Mapping[str, int | Amount] | None = None,
        on_tool_deny: OnDeny = "soft",
        run_budgets: Sequence[Amount] = (),
        per_agent: bool = True,
        max_output_tokens: int = 1024,
    ) -> None:
        if on_tool_deny not in ("soft", "hard"):
            raise ValueError("on_tool_deny must be 'soft' or 'hard'")
        self.cycles = cycles
        self.subject = subject
        self.on_tool_deny: OnDeny = on_tool_deny
        self.tool_costs = {
            sanitize_tool_name(name): risk_points(cost) if isinstance(cost, int) else cost
            for name, cost in (tool_costs or {}).items()
        }
        self.run_budgets = tuple(run_budgets)
        self.per_agent = per_agent
        self.max_output_tokens = max_output_tokens
        #: The workflow of every crew run started under these hooks, oldest first.
        self.runs: list[str] = []
        self.active = False
        self._lock = threading.Lock()
        self._run_of: dict[int, str] = {}  # id(crew) -> the workflow of its current run
        self._grants: dict[tuple[str | None, int, int], Caps] = {}  # (run, id(agent), id(task)) -> caps
        self._model_calls: set[_ModelCall] = set()  # reserved, no event yet
        self._tool_calls: dict[int, ToolCall] = {}  # id(tool_input) -> the call between its two hooks
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
            self.active = True
        return self

    def disable(self) -> None:
        """Uninstall, let pending LLM events settle their calls, then commit the estimate of any call
        no event settled (it was allowed and may have run). Idempotent."""
        if not self.active:
            return
        self.active = False  # executors that copied the hooks when they were created keep calling them
        for point, hook in self._hooks:
            unregister_hook(point, hook)
        crewai_event_bus.flush()
        crewai_event_bus.off(LLMCallCompletedEvent, self._on_llm_completed)
        crewai_event_bus.off(LLMCallFailedEvent, self._on_llm_failed)
        self._settle_leftovers(None)
        with self._lock:
            self._grants.clear()

    def __enter__(self) -> CyclesHooks:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.disable()

    # -- subjects --------------------------------------------------------------------------------

    def _start_run(self, crew: Any) -> str:
        if self.subject.workflow is not None:
            run = self.subject.workflow
        else:
            name = scope_value(str(getattr(crew, "name", None) or "crew"), "crew")[:110]
            run = f"{name}-{uuid.uuid4().hex[:12]}"
        with self._lock:
            self._run_of[id(crew)] = run
            self.runs.append(run)
        return run

    def subject_for(self, agent: Any = None, crew: Any = None, task: Any = None) -> Subject:
        """Who a call is charged to: the base subject, with the crew run as its workflow and the agent
        role as its agent (unless the base sets them), and the task (name, else id) as ``task``."""
        levels: dict[str, str | None] = {}
        if crew is not None and self.subject.workflow is None:
            levels["workflow"] = self._run_of.get(id(crew)) or self._start_run(crew)
        role = getattr(agent, "role", None)
        if self.per_agent and isinstance(role, str) and self.subject.agent is None:
            levels["agent"] = scope_value(role, "agent")
        subject = self.subject.merged(**levels)
        dims = dict(subject.dimensions or {})
        if task is not None and len(dims) < 16 and "task" not in dims:
            dims["task"] = str(getattr(task, "name", None) or getattr(task, "id", ""))[:256]
            subject = subject.model_copy(update={"dimensions": dims})
        return subject

    # -- crew runs -------------------------------------------------------------------------------

    def _on_execution_start(self, ctx: Any) -> None:
        crew = getattr(ctx, "crew", None)
        if not self.active or crew is None:
            return
        run = self._start_run(crew)
        scope = derive_scopes(self.subject.merged(workflow=run))[-1]
        for amount in self.run_budgets:
            try:
                self.cycles.budgets.set(scope, amount)
            except CyclesError as error:  # only HookAborted stops a kickoff; anything else is swallowed
                raise BudgetStop(error, f"could not set the run budget {scope}") from error

    def _on_execution_end(self, ctx: Any) -> None:
        crew = getattr(ctx, "crew", None)
        if crew is None:
            return
        crewai_event_bus.flush()  # usage arrives on the bus's thread pool: let it settle the calls first
        with self._lock:
            run = self._run_of.pop(id(crew), None)
            for key in [k for k in self._grants if run is not None and k[0] == run]:
                del self._grants[key]
        if run is not None:
            self._settle_leftovers(run)

    def _settle_leftovers(self, run: str | None) -> None:
        with self._lock:
            calls = [c for c in self._model_calls if run is None or c.run == run]
            tools = [t for t in self._tool_calls.values() if run is None or t.subject.workflow == run]
            for tool in tools:
                self._tool_calls.pop(id(tool.tool_input), None)
        for call in calls:
            self._settle(call, None, completed=True)
        for tool in tools:
            self._finish_tool(tool, ran=True)

    # -- model calls -----------------------------------------------------------------------------

    def _before_llm(self, ctx: LLMCallHookContext) -> None:
        _current_call.set(None)  # this context's events belong to this call from now on
        if not self.active:
            return
        llm = ctx.llm
        model = str(getattr(llm, "model", None) or "unknown")
        subject = self.subject_for(ctx.agent, ctx.crew, ctx.task)
        action = Action("llm.completion", model)
        limit = int(getattr(llm, "max_tokens", None) or getattr(llm, "max_completion_tokens", None) or 0)
        try:
            prompt = approx_messages_tokens(_texts(ctx.messages))
            out = limit or self.max_output_tokens
            estimate = _priced(model, lambda m: estimate_cost(m, input_tokens=prompt, max_output_tokens=out))
            guard = self.cycles.guard(subject, action, estimate=estimate)
            guard.start()
        except CyclesError as error:  # Denied, or a call nobody can price or record: fail closed
            if self.cycles.mode == "shadow":  # never blocks (the guard itself logs its would-denies)
                log.warning("shadow mode: model call to %s not accounted: %s", model, error)
                return
            raise BudgetStop(error, f"model call to {model} by {derive_scopes(subject)[-1]}") from error
        call = _ModelCall(self, guard, subject, action)
        _current_call.set(call)
        with self._lock:
            self._model_calls.add(call)
            if ctx.agent is not None:  # the grant's tool caps apply to the tools this call chooses
                key = (subject.workflow, id(ctx.agent), id(ctx.task))
                if guard.caps is None:
                    self._grants.pop(key, None)
                else:
                    self._grants[key] = guard.caps

    def _on_llm_completed(self, source: Any, event: LLMCallCompletedEvent) -> None:
        call = _current_call.get()
        if call is not None and call.hooks is self:
            self._settle(call, UsageMetrics.from_provider_dict(event.usage), completed=True)

    def _on_llm_failed(self, source: Any, event: LLMCallFailedEvent) -> None:
        call = _current_call.get()
        if call is not None and call.hooks is self:
            self._settle(call, None, completed=False)

    def _settle(self, call: _ModelCall, usage: UsageMetrics | None, *, completed: bool) -> None:
        outcome = call.settle(completed)
        if outcome is None:
            return
        with self._lock:
            self._model_calls.discard(call)
        try:
            if outcome == "release":
                call.guard.fail()
                return
            actual, metrics = call.guard.estimate, None
            if usage is not None:
                metrics = {"tokens_input": usage.prompt_tokens, "tokens_output": usage.completion_tokens}
                actual = _priced(
                    call.action.name,
                    lambda m: price_usage(
                        m,
                        input_tokens=usage.prompt_tokens,
                        output_tokens=usage.completion_tokens,
                        cached_input_tokens=min(usage.cached_prompt_tokens, usage.prompt_tokens),
                    ),
                )
            if outcome == "event":  # a retry succeeded after its reservation went back
                self.cycles.event(call.subject, call.action, actual, metrics=metrics)
            else:
                call.guard.commit(actual, metrics=metrics)
                call.guard.finish()
        except CyclesError:  # never raise into CrewAI's bus; an unsettled reservation expires on its own
            log.exception("could not settle the reservation of a %s call", call.action.name)

    # -- tool calls ------------------------------------------------------------------------------

    def _before_tool(self, ctx: ToolCallHookContext) -> None:
        current_tool_call.set(None)
        if not self.active:
            return
        subject = self.subject_for(ctx.agent, ctx.crew, ctx.task)
        call = ToolCall(self.cycles, subject, ctx.tool_input)
        current_tool_call.set(call)  # a budgeted() tool run by this call reserves with this subject
        with self._lock:
            self._tool_calls[id(ctx.tool_input)] = call
        original = getattr(ctx.tool, "_original_tool", None)
        name = str(getattr(original, "name", None) or ctx.tool_name)
        action = Action("tool.call", name)
        cost = self.tool_costs.get(ctx.tool_name)
        caps = self._grants.get((subject.workflow, id(ctx.agent), id(ctx.task)))
        if caps is not None and not caps.allows_tool(name):
            denial = ToolNotAllowed(
                f"tool {name!r} is not allowed by the caps of the model call that chose it",
                details={"tool": name, "scope": derive_scopes(subject)[-1]},
            )
            self._deny(call, action, cost, denial)
        if cost is None or getattr(original, "__cycles_budgeted__", False):
            return  # unpriced, or a budgeted() tool that reserves for itself
        guard = self.cycles.guard(subject, action, estimate=cost)
        try:
            guard.start()
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
        current_tool_call.set(None)
        with self._lock:
            call = self._tool_calls.pop(id(ctx.tool_input), None)
        if call is None or call.tool_input is not ctx.tool_input:
            return None
        if call.denial is not None:
            if self.on_tool_deny == "hard":
                raise BudgetStop(call.denial, f"tool {ctx.tool_name}")
            return blocked_result(ctx.tool_name, call.denial).as_agent_message()
        # CrewAI runs the after-hooks of a call another hook blocked, too: that one did not run.
        self._finish_tool(call, ran=not str(ctx.tool_result or "").startswith(BLOCKED_BY_HOOK))
        return None

    @staticmethod
    def _finish_tool(call: ToolCall, *, ran: bool) -> None:
        if call.guard is None:
            return
        try:
            if ran:
                call.guard.finish()
            else:
                call.guard.fail()
        except CyclesError:
            log.exception("could not settle the reservation of tool call %s", call.guard.idempotency_key)


def enable(
    cycles: Cycles,
    subject: Subject,
    *,
    tool_costs: Mapping[str, int | Amount] | None = None,
    on_tool_deny: OnDeny = "soft",
    run_budgets: Sequence[Amount] = (),
    per_agent: bool = True,
    max_output_tokens: int = 1024,
) -> CyclesHooks:
    """Put every CrewAI model call, and every tool named in ``tool_costs``, under Cycles budgets.

    ``subject`` is the base, e.g. ``Subject(tenant="acme")``: each kickoff becomes its workflow unless it
    names one, each agent role its agent scope (``per_agent``). Model calls are priced in USD from
    their token usage; ``max_output_tokens`` bounds the estimate when the LLM object sets no
    ``max_tokens``. ``tool_costs`` prices tools, an int as risk points (``{"read_crm": 1,
    "update_crm": 25}``). ``run_budgets`` are set on each run's workflow scope as it starts (e.g.
    ``[risk_points(60)]``: at most 60 points of consequential actions per run).

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
        on_tool_deny=on_tool_deny,
        run_budgets=run_budgets,
        per_agent=per_agent,
        max_output_tokens=max_output_tokens,
    )
    return hooks.install()
