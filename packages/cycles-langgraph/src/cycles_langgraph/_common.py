"""What the three adapters share and that does no I/O: subjects from runs, model ids, usage.

Pricing itself (estimates, actual cost from tokens) is the core's: this module only finds the
model name and the token counts in LangChain's objects and hands them to ``cycles.pricing``.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import Any, Literal, NamedTuple
from uuid import UUID

from langchain_core.messages import AIMessage, BaseMessage, UsageMetadata, get_buffer_string
from langchain_core.runnables import RunnableConfig, ensure_config

from cycles import (
    Action,
    Amount,
    AsyncCycles,
    AsyncGuard,
    AsyncRun,
    Cycles,
    Guard,
    Run,
    Subject,
    current_run,
    usd,
)
from cycles.pricing import approx_messages_tokens, approx_tokens, estimate_cost, price_answer, price_usage

__all__ = ["SubjectLike", "per_run"]

covered: ContextVar[bool] = ContextVar("cycles_langgraph_covered", default=False)
"""True while CyclesMiddleware runs a call it reserved: the callback handler leaves it alone."""

SubjectLike = Subject | Callable[[RunnableConfig], Subject]
"""A fixed subject, or a function of the current run's config (see ``per_run``)."""

_UNSAFE = re.compile(r"[^a-zA-Z0-9_.-]+")
_MAX_TOKEN_KEYS = ("max_tokens", "max_completion_tokens", "max_output_tokens", "ls_max_tokens")


def per_run(
    base: Subject, *, level: Literal["workspace", "app", "workflow", "agent", "toolset"] = "workflow"
) -> Callable[[RunnableConfig], Subject]:
    """A subject per run: ``base`` with ``level`` set to the run's ``thread_id``.

    ``per_run(Subject(tenant="acme"))`` spends a run on thread ``t-1`` against
    ``tenant:acme/workflow:t-1`` *and* ``tenant:acme``, so each run has its own budget (set it with
    ``cy.budgets.set("tenant:acme/workflow:t-1", usd(1))``) under its tenant's. A thread id with
    characters a scope cannot hold has them replaced by ``-``. No ``thread_id``: ``base`` unchanged.
    """

    def subject_of(config: RunnableConfig) -> Subject:
        configurable = config.get("configurable") or {}
        metadata = config.get("metadata") or {}
        thread = configurable.get("thread_id") or metadata.get("thread_id")
        if thread is None:
            return base
        return base.merged(**{level: _UNSAFE.sub("-", str(thread))[:128]})

    return subject_of


def resolve_subject(subject: SubjectLike, config: RunnableConfig) -> Subject:
    return subject if isinstance(subject, Subject) else subject(config)


class Model(NamedTuple):
    """Which model a call uses, as LangChain's tracing params name it."""

    provider: str | None
    name: str

    @property
    def ref(self) -> str:
        return f"{self.provider}:{self.name}" if self.provider else self.name


def model_of(*sources: Mapping[str, Any] | None) -> Model | None:
    """From LangSmith params (``ls_provider``/``ls_model_name``), else invocation params."""
    provider = name = None
    for source in sources:
        if not source:
            continue
        provider = provider or source.get("ls_provider")
        for key in ("ls_model_name", "model_name", "model", "model_id"):
            value = source.get(key)
            if name is None and isinstance(value, str) and value:
                name = value
    return None if name is None else Model(provider if isinstance(provider, str) else None, name)


def max_output_tokens(default: int, *sources: Mapping[str, Any] | None) -> int:
    for source in sources:
        for key in _MAX_TOKEN_KEYS:
            value = (source or {}).get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return default


def prompt_tokens(prompt: Sequence[BaseMessage] | Sequence[str], tools: object) -> int:
    """Input tokens approximated offline from the prompt (plus tool schemas)."""
    texts = [m if isinstance(m, str) else get_buffer_string([m]) for m in prompt]
    if tools:
        texts.append(str(tools))
    return approx_messages_tokens(texts)


def estimate_prompt(
    model: Model | None, prompt: Sequence[BaseMessage] | Sequence[str], tools: object, cap: int
) -> Amount:
    """Input tokens approximated offline from the prompt (plus tool schemas), output at its cap."""
    if model is None:
        raise ValueError("cannot tell which model is called (no ls_model_name, model_name or model): pass estimate=")
    return estimate_cost(
        model.name, input_tokens=prompt_tokens(prompt, tools), max_output_tokens=cap, provider=model.provider
    )


def usage_of(messages: Iterable[object]) -> UsageMetadata | None:
    """The ``usage_metadata`` of the first AIMessage carrying one."""
    for message in messages:
        if isinstance(message, AIMessage) and message.usage_metadata:
            return message.usage_metadata
    return None


def answered_by(requested: Model | None, messages: Iterable[object]) -> Model | None:
    """The model that produced the response (its ``response_metadata``), else the one requested:
    a fallback or a router answers with another model than the call asked for."""
    for message in messages:
        meta = getattr(message, "response_metadata", None) or {}
        name = meta.get("model_name") or meta.get("model")
        if isinstance(name, str) and name:
            provider = meta.get("model_provider") or (requested.provider if requested else None)
            return Model(provider if isinstance(provider, str) else None, name)
    return requested


def actual_cost(
    requested: Model | None, messages: Sequence[object], usage: UsageMetadata | None
) -> tuple[Amount, dict[str, Any]] | None:
    """What a response cost, priced by the model that answered (None: no usage to price)."""
    answered = answered_by(requested, messages)
    if usage is None or answered is None:
        return None
    return priced(answered, usage, requested)


def partial_cost(model: Model | None, prompt_tokens: int, text: str) -> tuple[Amount, dict[str, Any]] | None:
    """A stream stopped early without usage: the prompt plus the tokens generated so far."""
    if model is None:
        return None
    out = approx_tokens(text)
    actual = price_usage(model.name, input_tokens=prompt_tokens, output_tokens=out, provider=model.provider)
    return actual, {"tokens_input": prompt_tokens, "tokens_output": out}


def priced(model: Model, usage: UsageMetadata, requested: Model | None = None) -> tuple[Amount, dict[str, Any]]:
    """The actual cost of ``usage`` priced by the core (by ``model``, the one that answered), and
    the metrics to record with it. LangChain's ``input_tokens`` counts cached prompt tokens too."""
    cached = (usage.get("input_token_details") or {}).get("cache_read", 0)
    actual = price_answer(
        model.name,
        requested=(requested or model).name,
        input_tokens=usage["input_tokens"],
        output_tokens=usage["output_tokens"],
        cached_input_tokens=cached,
        provider=model.provider,
    )
    return actual, {
        "tokens_input": usage["input_tokens"],
        "tokens_output": usage["output_tokens"],
        "model_version": model.name[:128],  # the model that answered: gen_ai.response.model on the commit span
    }


def tool_cost(spec: Amount | Mapping[str, Amount], name: str) -> Amount:
    """A tool call's fixed cost: one amount for every tool, or per name (``"*"`` the default)."""
    if isinstance(spec, Amount):
        return spec
    return spec.get(name, spec.get("*", usd(0)))


def sync_cycles(cycles: Cycles | AsyncCycles) -> Cycles:
    if isinstance(cycles, AsyncCycles):
        raise TypeError("an AsyncCycles client can only guard async runs (ainvoke/astream); pass a Cycles")
    return cycles


def run_of(cycles: Cycles | AsyncCycles) -> Run | AsyncRun | None:
    """The ``cycles`` run current in this context, if it is one of this client's."""
    run = current_run()
    return run if run is not None and run._client is cycles else None


def langchain_attributes(
    config: RunnableConfig, *, run_id: UUID | None = None, parent_run_id: UUID | None = None
) -> dict[str, str | int | None]:
    """Where a step sits in LangChain's run tree and LangGraph's graph, as attributes of its
    OpenTelemetry spans: the call's run id (callbacks know it), its parent run (else the runnable
    running now, e.g. the graph node), the node, the superstep and the thread."""
    metadata = config.get("metadata") or {}
    configurable = config.get("configurable") or {}
    if parent_run_id is None:
        parent_run_id = getattr(config.get("callbacks"), "parent_run_id", None)
    node_step = metadata.get("langgraph_step")
    thread = configurable.get("thread_id") or metadata.get("thread_id")
    return {
        "langchain.run_id": str(run_id) if run_id else None,
        "langchain.parent_run_id": str(parent_run_id) if parent_run_id else None,
        "langgraph.node": str(metadata["langgraph_node"]) if metadata.get("langgraph_node") else None,
        "langgraph.step": node_step if isinstance(node_step, int) else None,
        "langgraph.thread_id": str(thread) if thread else None,
    }


def step(
    cycles: Cycles,
    subject: Subject,
    action: Action,
    estimate: Amount,
    *,
    attributes: Mapping[str, str | int | None] | None = None,
    **options: Any,
) -> Guard:
    """A guard for one call: a step of the current run when there is one, else a plain guard. Its
    spans carry ``attributes`` (default: the current runnable's place in the run tree)."""
    run = run_of(cycles)
    if isinstance(run, Run):
        guard = run.guard(action, estimate, subject=subject, **options)
    else:
        guard = cycles.guard(subject, action, estimate, **options)
    guard.annotate(langchain_attributes(ensure_config()) if attributes is None else attributes)
    return guard


@asynccontextmanager
async def aguard(
    cycles: Cycles | AsyncCycles, subject: Subject, action: Action, estimate: Amount, **options: Any
) -> AsyncIterator[Guard | AsyncGuard]:
    """The core's guard in an async run, with either client (a sync one does its ledger calls inline)."""
    if isinstance(cycles, AsyncCycles):
        run = run_of(cycles)
        async_step = (
            run.guard(action, estimate, subject=subject, **options)
            if isinstance(run, AsyncRun)
            else cycles.guard(subject, action, estimate, **options)
        )
        async_step.annotate(langchain_attributes(ensure_config()))
        async with async_step as guard:
            yield guard
    else:
        with step(cycles, subject, action, estimate, **options) as guard:
            yield guard
