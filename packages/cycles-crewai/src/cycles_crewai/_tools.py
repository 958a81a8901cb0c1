"""``budgeted``: a CrewAI tool that reserves before every run, commits after, releases on failure."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar, overload

from crewai.tools import BaseTool
from crewai.tools.tool_failure import ToolFailure, ToolFailurePolicy
from pydantic import PrivateAttr

from cycles import Action, Amount, Cycles, CyclesError, Denied, Run, Subject, current_run, with_args_fingerprint
from cycles_crewai._common import OnDeny, blocked_result, current_tool_call

__all__ = ["BudgetedTool", "budgeted"]

log = logging.getLogger("cycles_crewai")

Estimate = Amount | Callable[[Mapping[str, Any]], Amount]
"""An amount, or a function of the tool's arguments returning one."""
Actual = Callable[[Any], Amount | None]
"""A function of the tool's result returning what the run really cost (None: the estimate)."""

ToolT = TypeVar("ToolT", bound=BaseTool)


class _Failed(Exception):
    """The tool reported a ToolFailure: nothing happened, so the guard must release."""

    def __init__(self, failure: ToolFailure) -> None:
        self.failure = failure


@dataclass(frozen=True, slots=True)
class _Budget:
    estimate: Estimate
    action: Action | None
    actual: Actual | None
    cycles: Cycles | None
    subject: Subject | None
    on_deny: OnDeny

    def run(self, tool_name: str, kwargs: Mapping[str, Any], call: Callable[[], Any]) -> Any:
        """Run ``call`` inside a guard; a denial becomes the blocked result the agent sees."""
        hook = current_tool_call.get()  # set by enable()'s before-tool hook: per-agent, per-run subject
        cy = self.cycles or (hook.cycles if hook else None)
        subject = self.subject or (hook.subject if hook else None)
        if cy is None or subject is None:
            raise RuntimeError(
                f"budgeted tool {tool_name!r} has no Cycles client or subject: pass cycles= and subject= "
                "to budgeted(), or run the crew inside cycles_crewai.enable(...)"
            )
        action = with_args_fingerprint(self.action or Action("tool.call", tool_name), dict(kwargs))
        estimate = self.estimate(kwargs) if callable(self.estimate) else self.estimate
        run = current_run()
        step = (
            run.guard(action, estimate, subject=subject)
            if isinstance(run, Run) and run._client is cy
            else cy.guard(subject, action, estimate=estimate)
        )
        started = False
        try:
            with step as g:
                started = True
                result = call()
                if isinstance(result, ToolFailure):
                    raise _Failed(result)  # releases: the tool says it did not do it
                cost = self.actual(result) if self.actual is not None else None
                if cost is not None:
                    g.commit(cost)
                return result
        except _Failed as failed:
            return failed.failure
        except CyclesError as error:
            if started:
                raise  # from the tool's own body, not our reservation
            # Denied, caps (ToolNotAllowed), or no budget for this unit: the action does not run.
            if not isinstance(error, Denied):
                log.warning("Cycles blocked tool %s: %s", tool_name, error)
            return blocked_result(tool_name, error)


class BudgetedTool(BaseTool):
    """A tool whose every run is a Cycles reservation. Build one with ``budgeted(tool, ...)``."""

    __cycles_budgeted__ = True

    inner: BaseTool
    _budget: _Budget = PrivateAttr()

    def _run(self, *args: Any, **kwargs: Any) -> Any:
        return self._budget.run(self.name, kwargs, lambda: self.inner.run(*args, **kwargs))

    def format_output_for_agent(self, raw_result: Any) -> str:
        return self.inner.format_output_for_agent(raw_result)


def _wrap_instance(tool: BaseTool, budget: _Budget) -> BudgetedTool:
    wrapped = BudgetedTool(
        inner=tool,
        name=tool.name,
        description=tool.description,
        args_schema=tool.args_schema,
        result_schema=tool.result_schema,
        result_as_answer=tool.result_as_answer,
        cache_function=tool.cache_function,
        tool_failure_policy=ToolFailurePolicy.RAISE if budget.on_deny == "hard" else tool.tool_failure_policy,
    )
    wrapped._budget = budget
    return wrapped


def _wrap_class(cls: type[ToolT], budget: _Budget) -> type[ToolT]:
    original = cls._run

    @functools.wraps(original)  # keeps the signature CrewAI derives args_schema from
    def _run(self: BaseTool, *args: Any, **kwargs: Any) -> Any:
        return budget.run(self.name, kwargs, lambda: original(self, *args, **kwargs))

    namespace: dict[str, Any] = {
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
        "__doc__": cls.__doc__,
        "__cycles_budgeted__": True,
        "_run": _run,
    }
    if budget.on_deny == "hard":
        namespace["__annotations__"] = {"tool_failure_policy": ToolFailurePolicy | None}
        namespace["tool_failure_policy"] = ToolFailurePolicy.RAISE
    return type(cls.__name__, (cls,), namespace)


@overload
def budgeted(
    tool: BaseTool,
    /,
    *,
    estimate: Estimate,
    action: Action | None = ...,
    actual: Actual | None = ...,
    cycles: Cycles | None = ...,
    subject: Subject | None = ...,
    on_deny: OnDeny = ...,
) -> BudgetedTool: ...
@overload
def budgeted(
    tool: type[ToolT],
    /,
    *,
    estimate: Estimate,
    action: Action | None = ...,
    actual: Actual | None = ...,
    cycles: Cycles | None = ...,
    subject: Subject | None = ...,
    on_deny: OnDeny = ...,
) -> type[ToolT]: ...
@overload
def budgeted(
    tool: None = ...,
    /,
    *,
    estimate: Estimate,
    action: Action | None = ...,
    actual: Actual | None = ...,
    cycles: Cycles | None = ...,
    subject: Subject | None = ...,
    on_deny: OnDeny = ...,
) -> Callable[[Any], Any]: ...
def budgeted(
    tool: BaseTool | type[BaseTool] | None = None,
    /,
    *,
    estimate: Estimate,
    action: Action | None = None,
    actual: Actual | None = None,
    cycles: Cycles | None = None,
    subject: Subject | None = None,
    on_deny: OnDeny = "soft",
) -> Any:
    """Make every run of a tool reserve ``estimate`` first, commit after, release if it fails.

    Works on a tool instance (``budgeted(search, estimate=usd(0.01))``), a ``BaseTool`` subclass, or as
    a decorator stacked on ``@tool``. ``estimate`` is an ``Amount`` (``usd(...)``, ``risk_points(25)``)
    or a function of the tool's arguments; ``actual`` an optional function of its result; ``action``
    defaults to ``Action("tool.call", <tool name>)``, which the budget's tool allow/deny caps check.

    ``cycles``/``subject`` default to the ones of ``enable(...)`` when the crew runs inside it (with
    the agent and run scopes). A denied run returns a blocked result the agent can react to
    (``on_deny="soft"``) or stops the crew (``"hard"``: the tool's ``tool_failure_policy`` becomes
    ``"raise"``, so CrewAI raises ``ToolExecutionFailedError``; ``denial_of(exc)`` gives the reason).
    """
    if on_deny not in ("soft", "hard"):
        raise ValueError("on_deny must be 'soft' or 'hard'")
    budget = _Budget(estimate, action, actual, cycles, subject, on_deny)

    def wrap(target: Any) -> Any:
        if isinstance(target, BaseTool):
            return _wrap_instance(target, budget)
        if isinstance(target, type) and issubclass(target, BaseTool):
            return _wrap_class(target, budget)
        raise TypeError(f"budgeted() wraps a crewai BaseTool (or subclass), got {type(target).__name__}")

    return wrap if tool is None else wrap(tool)
