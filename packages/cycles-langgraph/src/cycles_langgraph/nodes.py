"""LangGraph node guards: reserve before a node runs, commit after, release if it raises."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar, cast, overload

from langchain_core.runnables import RunnableConfig
from langgraph.types import Command

from cycles import Action, Amount, AsyncCycles, Cycles, Denied, Subject
from cycles_langgraph._common import SubjectLike, aguard, resolve_subject, step, sync_cycles

__all__ = ["guard_node"]

F = TypeVar("F", bound=Callable[..., Any])
Estimate = Amount | Callable[[Any], Amount]


@overload
def guard_node(
    fn: F,
    /,
    *,
    cycles: Cycles | AsyncCycles,
    subject: SubjectLike,
    estimate: Estimate,
    action: Action | None = None,
    fallback: str | None = None,
) -> F: ...


@overload
def guard_node(
    fn: None = None,
    /,
    *,
    cycles: Cycles | AsyncCycles,
    subject: SubjectLike,
    estimate: Estimate,
    action: Action | None = None,
    fallback: str | None = None,
) -> Callable[[F], F]: ...


def guard_node(
    fn: F | None = None,
    /,
    *,
    cycles: Cycles | AsyncCycles,
    subject: SubjectLike,
    estimate: Estimate,
    action: Action | None = None,
    fallback: str | None = None,
) -> F | Callable[[F], F]:
    """Guard a ``StateGraph`` node: ``builder.add_node("plan", guard_node(plan, cycles=cy, ...))``.

    Also a decorator: ``@guard_node(cycles=cy, subject=..., estimate=usd(0.05))``.

    ``estimate`` is an amount or a function of the node's input state; ``subject`` a ``Subject`` or
    a function of the run's config (``per_run(Subject(tenant="acme"))``: one budget per thread).
    The node commits the estimate, or what the guarded calls inside it (callbacks, middleware, with
    the same client) spent: those draw from the node's reservation, which must cover them.
    When denied (the node before it runs, or a guarded call inside it), the node raises the
    ``cycles.Denied`` subclass (``BudgetExceeded``...) as an exception LangGraph's default
    ``RetryPolicy`` does not retry; with ``fallback="name"`` it returns ``Command(goto="name")``
    instead. That goto is added to the node's own edges (LangGraph still follows them), so a
    fallback suits nodes whose routing reads state or is itself by ``Command``. The node keeps its
    injected arguments (``config``, ``runtime``, ``store``, ``writer``...): the wrapper shows
    LangGraph the node's own signature, plus ``config``. Functions only (sync or async), not
    compiled subgraphs: guard the node that invokes one.
    """
    if fn is None:
        return lambda f: guard_node(
            f, cycles=cycles, subject=subject, estimate=estimate, action=action, fallback=fallback
        )
    node = fn
    act = action or Action("graph.node", getattr(fn, "__name__", "node"))
    signature = inspect.signature(fn)
    passes_config = "config" in signature.parameters

    def plan(state: Any, config: RunnableConfig) -> tuple[Subject, Amount]:
        amount = estimate if isinstance(estimate, Amount) else estimate(state)
        return resolve_subject(subject, config), amount

    wrapper: Any  # gets a __signature__ below
    if inspect.iscoroutinefunction(fn):

        async def awrapper(state: Any, /, config: RunnableConfig, **kwargs: Any) -> Any:
            who, amount = plan(state, config)
            try:
                async with aguard(cycles, who, act, amount):
                    return await node(state, **_args(kwargs, config, passes_config))
            except Denied:
                # Denied is a RuntimeError: LangGraph's default RetryPolicy does not retry it.
                if fallback is None:
                    raise
                return Command(goto=fallback)

        wrapper = awrapper
    else:
        client = sync_cycles(cycles)

        def swrapper(state: Any, /, config: RunnableConfig, **kwargs: Any) -> Any:
            who, amount = plan(state, config)
            try:
                with step(client, who, act, amount):
                    return node(state, **_args(kwargs, config, passes_config))
            except Denied:
                # Denied is a RuntimeError: LangGraph's default RetryPolicy does not retry it.
                if fallback is None:
                    raise
                return Command(goto=fallback)

        wrapper = swrapper

    functools.update_wrapper(wrapper, fn)
    wrapper.__signature__ = _with_config(signature)  # what LangGraph reads to inject arguments
    return cast(F, wrapper)


def _args(kwargs: dict[str, Any], config: RunnableConfig, passes_config: bool) -> dict[str, Any]:
    return {**kwargs, "config": config} if passes_config else kwargs


def _with_config(signature: inspect.Signature) -> inspect.Signature:
    """The node's signature with a ``config: RunnableConfig`` LangGraph will inject."""
    params = [p for p in signature.parameters.values() if p.name != "config"]
    config = inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=RunnableConfig)
    at = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
    return signature.replace(parameters=[*params[:at], config, *params[at:]])
