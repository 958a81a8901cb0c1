"""``enable``: CrewAI's global hooks and event-bus listeners, wired to a Cycles client.

- before every model call: reserve the estimated cost (``HookAborted`` on denial: the only thing that
  really stops a CrewAI call; other hook exceptions are swallowed and a ``False`` return is retried);
- LLM-call-completed event: commit the real token usage; LLM-call-failed event: release;
- before every tool call: reserve the tool's price from ``tool_costs`` (e.g. risk points), check the
  tool against the caps of the model call that chose it; after it: commit, or report the denial;
- each kickoff: the crew run becomes the subject's workflow (optionally with its own budgets), each
  agent role its agent scope; the task goes in the subject's ``task`` dimension.

CrewAI runs event handlers on a thread pool, after the call returned. A reservation is matched to its
events through a context variable set by the hook (the bus copies the emitting context into the
handler), so concurrent agents never settle each other's calls.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from contextvars import ContextVar
from typing import Any

from crewai.events import crewai_event_bus
from crewai.events.types.llm_events import LLMCallCompletedEvent, LLMCallFailedEvent, LLMCallStartedEvent
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


class _Call:
    """One reserved model call, settled by the first terminal event that reaches it."""

    __slots__ = ("_lock", "call_id", "guard", "hooks", "model", "run", "settled")

    def __init__(self, hooks: CyclesHooks, guard: Guard, model: str, run: str | None) -> None:
        self.hooks, self.guard, self.model, self.run = hooks, guard, model, run
        self.call_id: str | None = None
        self.settled = False
        self._lock = threading.Lock()

    def bind(self, call_id: str) -> bool:
        """Tie this reservation to the first call id its context reports; refuse any other."""
        with self._lock:
            if self.call_id is None:
                self.call_id = call_id
            return self.call_id == call_id

    def claim(self, call_id: str | None) -> bool:
        with self._lock:
            if self.settled or (call_id is not None and self.call_id not in (None, call_id)):
                return False
            self.settled = True
            return True


_current_call: ContextVar[_Call | None] = ContextVar("cycles_crewai_llm_call", default=None)


def _texts(messages: Iterable[Any]) -> list[str]:
    texts = []
    for message in messages:
        content = message.get("content") if isinstance(message, Mapping) else message
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts.extend(str(p.get("text", "")) for p in content if isinstance(p, Mapping))
    return texts


def _price(model: str, **tokens: int) -> Amount:
    """Price a CrewAI model name; LiteLLM-style ``openai/gpt-4o`` falls back to its last segment."""
    try:
        if "max_output_tokens" in tokens:
            return estimate_cost(model, **tokens)
        return price_usage(model, **tokens)
    except UnpricedModel:
        if "/" not in model:
            raise
        return _price(model.rsplit("/", 1)[1], **tokens)


class CyclesHooks:
    """The installed hooks and listeners of one ``enable(...)``. A context manager: leaving it (or
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
        #: The workflow id of every crew run started under these hooks, oldest first.
        self.runs: list[str] = []
        self._run_of: dict[int, str] = {}  # id(crew) -> workflow of its current run
        self._grants: dict[tuple[int, int], Caps] = {}  # (id(agent), id(task)) -> caps of its last model call
        self._open: set[_Call] = set()
        self._lock = threading.Lock()
        self.active = False
        self._hooks = (
            (InterceptionPoint.EXECUTION_START, self._on_execution_start),
            (InterceptionPoint.EXECUTION_END, self._on_execution_end),
            (InterceptionPoint.PRE_MODEL_CALL, self._before_llm),
            (InterceptionPoint.PRE_TOOL_CALL, self._before_tool),
            (InterceptionPoint.POST_TOOL_CALL, self._after_tool),
        )
        self._listeners = (
            (LLMCallStartedEvent, self._on_llm_started),
            (LLMCallCompletedEvent, self._on_llm_completed),
            (LLMCallFailedEvent, self._on_llm_failed),
        )

    # -- install / uninstall ---------------------------------------------------------------------

    def install(self) -> CyclesHooks:
        if not self.active:
            for point, hook in self._hooks:
                register_hook(point, hook)
            for event_type, handler in self._listeners:
                crewai_event_bus.on(event_type)(handler)
            self.active = True
        return self

    def disable(self) -> None:
        """Uninstall, wait for pending LLM events, and settle any call no event settled (commit its
        estimate: the call was allowed and may have run)."""
        if not self.active:
            return
        self.active = False  # executors that copied our hooks at creation keep calling them: no-ops now
        for point, hook in self._hooks:
            unregister_hook(point, hook)
        crewai_event_bus.flush()
        for event_type, handler in self._listeners:
            crewai_event_bus.off(event_type, handler)
        self._settle_leftovers(None)

    def __enter__(self) -> CyclesHooks:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.disable()

    # -- subjects --------------------------------------------------------------------------------

    def _start_run(self, crew: Any) -> str:
        if self.subject.workflow is not None:
            run = self.subject.workflow
        else:
            run = f"{scope_value(str(getattr(crew, 'name', None) or 'crew'), 'crew')[:110]}-{uuid.uuid4().hex[:12]}"
        with self._lock:
            self._run_of[id(crew)] = run
            self.runs.append(run)
        return run

    def subject_for(self, agent: Any = None, crew: Any = None, task: Any = None) -> Subject:
        """The subject a call is charged to: the base subject, the crew run as its workflow, the
        agent's role as its agent; the task (name, else id) as the ``task`` dimension."""
        levels: dict[str, str | None] = {}
        if crew is not None and self.subject.workflow is None:
            levels["workflow"] = self._run_of.get(id(crew)) or self._start_run(crew)
        role = getattr(agent, "role", None)
        if self.per_agent and isinstance(role, str) and self.subject.agent is None:
            levels["agent"] = scope_value(role, "agent")
        subject = self.subject.merged(**levels)
        if task is not None:
            dims = dict(subject.dimensions or {})
            if len(dims) < 16 and "task" not in dims:
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
        crewai_event_bus.flush()  # usage events run on a thread pool: let them settle first
        with self._lock:
            run = self._run_of.pop(id(crew), None)
        if run is not None:
            self._settle_leftovers(run)

    def _settle_leftovers(self, run: str | None) -> None:
        with self._lock:
            calls = [c for c in self._open if run is None or c.run == run]
        for call in calls:
            if call.claim(None):
                self._settle(call, None)

    # -- model calls -----------------------------------------------------------------------------

    def _before_llm(self, ctx: LLMCallHookContext) -> None:
        _current_call.set(None)  # never let a later event of this context settle an older call
        if not self.active:
            return
        model = str(getattr(ctx.llm, "model", None) or "unknown")
        subject = self.subject_for(ctx.agent, ctx.crew, ctx.task)
        max_tokens = getattr(ctx.llm, "max_tokens", None)
        try:
            estimate = _price(
                model,
                input_tokens=approx_messages_tokens(_texts(ctx.messages)),
                max_output_tokens=int(max_tokens or self.max_output_tokens),
            )
            guard = self.cycles.guard(subject, Action("llm.completion", model), estimate=estimate)
            guard.start()
        except CyclesError as error:  # Denied, or a call nobody can price or record: fail closed
            if self.cycles.mode == "shadow":  # shadow mode never blocks (the guard logs its would-denies)
                log.warning("shadow mode: model call to %s not accounted: %s", model, error)
                return
            raise BudgetStop(error, f"model call to {model} by {derive_scopes(subject)[-1]}") from error
        call = _Call(self, guard, model, subject.workflow)
        with self._lock:
            self._open.add(call)
        _current_call.set(call)
        if guard.caps is not None and ctx.agent is not None:
            self._grants[id(ctx.agent), id(ctx.task)] = guard.caps

    def _on_llm_started(self, source: Any, event: LLMCallStartedEvent) -> None:
        call = _current_call.get()
        if call is not None and call.hooks is self:
            call.bind(event.call_id)

    def _on_llm_completed(self, source: Any, event: LLMCallCompletedEvent) -> None:
        call = _current_call.get()
        if call is None or call.hooks is not self or not call.claim(event.call_id):
            return
        usage = UsageMetrics.from_provider_dict(event.usage)
        self._settle(call, usage)

    def _on_llm_failed(self, source: Any, event: LLMCallFailedEvent) -> None:
        call = _current_call.get()
        if call is None or call.hooks is not self or not call.claim(event.call_id):
            return
        self._settle(call, None, failed=True)

    def _settle(self, call: _Call, usage: UsageMetrics | None, *, failed: bool = False) -> None:
        with self._lock:
            self._open.discard(call)
        try:
            if failed:
                call.guard.fail()
                return
            if usage is not None:
                actual = _price(
                    call.model,
                    input_tokens=usage.prompt_tokens,
                    output_tokens=usage.completion_tokens,
                    cached_input_tokens=min(usage.cached_prompt_tokens, usage.prompt_tokens),
                )
                call.guard.commit(
                    actual,
                    metrics={"tokens_input": usage.prompt_tokens, "tokens_output": usage.completion_tokens},
                )
            call.guard.finish()  # without usage: the estimate
        except CyclesError:  # a handler must not raise into CrewAI's bus; the reservation expires
            log.exception("could not settle the reservation for a %s call", call.model)

    # -- tool calls ------------------------------------------------------------------------------

    def _before_tool(self, ctx: ToolCallHookContext) -> None:
        current_tool_call.set(None)
        if not self.active:
            return
        subject = self.subject_for(ctx.agent, ctx.crew, ctx.task)
        call = ToolCall(self.cycles, subject, ctx.tool_input)
        current_tool_call.set(call)
        original = getattr(ctx.tool, "_original_tool", None)
        name = str(getattr(original, "name", None) or ctx.tool_name)
        cost = self.tool_costs.get(ctx.tool_name)
        action = Action("tool.call", name)
        caps = self._grants.get((id(ctx.agent), id(ctx.task)))
        if caps is not None and not caps.allows_tool(name):
            scope = derive_scopes(subject)[-1]
            self._deny(call, action, cost, ToolNotAllowed(
                f"tool {name!r} is not allowed by the caps of the model call that chose it",
                details={"tool": name, "scope": scope},
            ))
        if cost is None or getattr(original, "__cycles_budgeted__", False):
            return  # unpriced, or a budgeted() tool that reserves for itself (with this call's subject)
        guard = self.cycles.guard(subject, action, estimate=cost)
        try:
            guard.start()
        except CyclesError as error:  # Denied (incl. the budget's tool caps), or no budget in this unit
            self._deny(call, action, cost, error)
            return
        call.guard = guard

    def _deny(self, call: ToolCall, action: Action, cost: Amount | None, error: CyclesError) -> None:
        """Block the tool (the after-tool hook reports or stops); in shadow mode only record it."""
        if self.cycles.mode == "shadow":
            scope = error.details.get("scope")
            self.cycles.shadow_log.append(ShadowRecord(
                call.subject, action, cost or risk_points(0), error.code, error.message,
                scope if isinstance(scope, str) else None, time.time_ns() // 1_000_000,
            ))
            log.warning("shadow mode: would deny tool %s: %s", action.name, error)
            return
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
        if call.guard is not None:
            try:
                if str(ctx.tool_result or "").startswith(BLOCKED_BY_HOOK):
                    call.guard.fail()  # another hook blocked it: it did not run
                else:
                    call.guard.finish()
            except CyclesError:
                log.exception("could not settle the reservation for tool %s", ctx.tool_name)
        return None


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
    """Put every CrewAI model call (and every tool in ``tool_costs``) under Cycles budgets.

    ``subject`` is the base (e.g. ``Subject(tenant="acme")``); each kickoff becomes its workflow unless
    it has one, each agent role its agent scope. ``tool_costs`` prices tools, ints as risk points
    (``{"read_crm": 1, "update_crm": 25}``). ``run_budgets`` are set on every new run's workflow scope
    (e.g. ``[risk_points(60)]``: at most 60 points of consequential actions per run). A denied model
    call stops the crew with ``BudgetStop``; a denied tool call is reported to the agent
    (``on_tool_deny="soft"``) or stops the crew (``"hard"``). ``max_output_tokens`` bounds the
    estimate of a model whose LLM object sets no ``max_tokens``.

    Returns the installed hooks; use as a context manager (or call ``disable()``) to undo. CrewAI
    copies the global hooks into an agent's executor when the agent first runs: enable before that.
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
