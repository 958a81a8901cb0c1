"""OpenTelemetry for Cycles: spans and metrics for every budget decision (``pip install 'cycles-core[otel]'``).

    import cycles.otel
    cycles.otel.instrument()                        # global providers, or pass tracer_provider= / meter_provider=
    cy = Cycles("http://cycles:7878", api_key=...)  # clients (and servers) made from now on are traced

Spans (``cycles.reserve``, ``cycles.commit``, ``cycles.release``, ``cycles.extend``, ``cycles.decide``,
``cycles.event``) wrap each ledger operation of a client, and of a server around its ledger; a
server also opens a SERVER span per request. Over HTTP the client sends the W3C ``traceparent``
of its span and the server continues that trace, so one trace holds the agent's own span, the
client call and the server's work. Attributes: ``cycles.scope``, ``cycles.tenant``, ``cycles.unit``,
``cycles.estimate``, ``cycles.actual``, ``cycles.decision``, ``cycles.reason_code``,
``cycles.reservation_id``, ``cycles.action.kind`` / ``.name``; for model calls the GenAI semantic
conventions' ``gen_ai.operation.name``, ``gen_ai.provider.name`` (and ``gen_ai.system``, its name
before semconv 1.37), ``gen_ai.request.model`` and, at commit, ``gen_ai.response.model``,
``gen_ai.usage.input_tokens`` / ``gen_ai.usage.output_tokens``; for tool calls ``execute_tool`` and
``gen_ai.tool.name``. A denial is a span event ``cycles.denied`` (a decision, not an error: the
span's status stays unset).

Framework adapters: every span opens as a child of the span current in the caller's context (a
framework's, an instrumentation's or the user's own), and a step's ``guard.annotate({...})`` adds
the framework's ids (``langchain.run_id``, ``openai_agents.trace_id``, ``crewai.task.id``...) to
every span of that step. ``step_attributes(guard)`` gives the same attributes for a framework's own
tracing (the OpenAI Agents SDK's spans). None of this imports OpenTelemetry.

Metrics: ``cycles.decisions`` (counter: operation, decision, reason code), ``cycles.reserve.duration``
(histogram, seconds), ``cycles.commit.actual_to_estimate`` (histogram of actual / estimate), and,
opt-in with ``scope_gauges=True``, ``cycles.budget.remaining`` / ``cycles.budget.spent`` per scope and
unit, for at most ``max_scopes`` scopes (the cardinality guard: scopes past it are not reported and
``cycles.budget.scopes_dropped`` counts them).

Without ``instrument()`` nothing here runs beyond one ``if`` per client or server created.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from cycles.errors import CyclesError, Denied, NotFound
from cycles.ledger.base import AsyncLedger, Ledger
from cycles.models import Amount, Balance, Subject
from cycles.scopes import derive_scopes

if TYPE_CHECKING:
    from cycles.guard import _GuardFace

__all__ = [
    "current_trace_ids",
    "genai_model_attributes",
    "genai_usage_attributes",
    "instrument",
    "instrument_app",
    "instrumented",
    "span_attributes",
    "step_attributes",
    "step_scope",
    "uninstrument",
    "unwrap",
    "wrap_ledger",
]

_OPS = ("reserve", "commit", "release", "extend", "decide", "event")
_LLM_PREFIXES = ("llm", "gen_ai", "model")
_TOOL_PREFIXES = ("tool",)
#: the semconv's ``gen_ai.operation.name`` by the last part of a model call's kind (else ``chat``:
#: completions, structured output and tool use are chat calls to the providers we price)
_GENAI_OPERATIONS = {
    "embedding": "embeddings",
    "embeddings": "embeddings",
    "text_completion": "text_completion",
    "generate_content": "generate_content",
}

AttributeValue = str | bool | int | float
_NONE: Mapping[str, AttributeValue] = MappingProxyType({})
_extra: ContextVar[Mapping[str, AttributeValue]] = ContextVar("cycles_otel_attributes", default=_NONE)


@dataclass
class _State:
    tracer: Any
    meter: Any
    decisions: Any
    reserve_duration: Any
    ratio: Any
    dropped: Any
    scope_gauges: bool
    max_scopes: int
    estimates: OrderedDict[str, int]
    balances: dict[tuple[str, str], Balance]
    lock: threading.Lock


_state: _State | None = None


def instrumented() -> bool:
    return _state is not None


def instrument(
    *,
    tracer_provider: Any = None,
    meter_provider: Any = None,
    scope_gauges: bool = False,
    max_scopes: int = 100,
) -> None:
    """Trace and measure every Cycles client and server created after this call."""
    try:
        from opentelemetry import metrics, trace
    except ImportError as exc:
        raise ImportError(f"cycles.otel needs the otel extra: pip install 'cycles-core[otel]' ({exc})") from exc
    global _state
    tracer = (tracer_provider or trace.get_tracer_provider()).get_tracer("cycles")
    meter = (meter_provider or metrics.get_meter_provider()).get_meter("cycles")
    state = _State(
        tracer=tracer,
        meter=meter,
        decisions=meter.create_counter("cycles.decisions", unit="{decision}", description="Budget decisions"),
        reserve_duration=meter.create_histogram(
            "cycles.reserve.duration", unit="s", description="Time to reserve (or be refused)"
        ),
        ratio=meter.create_histogram(
            "cycles.commit.actual_to_estimate", unit="1", description="Committed actual / reserved estimate"
        ),
        dropped=meter.create_counter(
            "cycles.budget.scopes_dropped", unit="{scope}", description="Scopes left out of the budget gauges"
        ),
        scope_gauges=scope_gauges,
        max_scopes=max_scopes,
        estimates=OrderedDict(),
        balances={},
        lock=threading.Lock(),
    )
    if scope_gauges:
        meter.create_observable_gauge(
            "cycles.budget.remaining", callbacks=[functools.partial(_observe, "remaining")], unit="1"
        )
        meter.create_observable_gauge("cycles.budget.spent", callbacks=[functools.partial(_observe, "spent")], unit="1")
    _state = state


def uninstrument() -> None:
    """Stop instrumenting new clients and servers (those made meanwhile keep their wrappers, inert)."""
    global _state
    _state = None


# ---- attributes --------------------------------------------------------------------------------


def genai_model_attributes(kind: str, name: str) -> dict[str, Any]:
    """The GenAI semantic conventions' request attributes of an action (empty: neither a model nor a
    tool call). A model's provider is read from its name (``openai:gpt-4o``, ``openai/gpt-4o``); an
    adapter that knows it otherwise annotates the step with ``gen_ai.provider.name``."""
    head = kind.split(".", 1)[0]
    if head in _TOOL_PREFIXES:
        return {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": name}
    if head not in _LLM_PREFIXES:
        return {}
    cut = min((i for i in (name.find(":"), name.find("/")) if i > 0), default=-1)
    provider, model = (name[:cut], name[cut + 1 :]) if 0 < cut < len(name) - 1 else ("", name)
    attrs: dict[str, Any] = {
        "gen_ai.operation.name": _GENAI_OPERATIONS.get(kind.rsplit(".", 1)[-1], "chat"),
        "gen_ai.request.model": model,
    }
    if provider:  # gen_ai.system before semconv 1.37, gen_ai.provider.name since
        attrs["gen_ai.system"] = attrs["gen_ai.provider.name"] = provider
    return attrs


def genai_usage_attributes(
    *, input_tokens: int | None = None, output_tokens: int | None = None, response_model: str | None = None
) -> dict[str, Any]:
    """The GenAI semantic conventions' usage attributes of a model call's response."""
    attrs: dict[str, Any] = {}
    if input_tokens is not None:
        attrs["gen_ai.usage.input_tokens"] = input_tokens
    if output_tokens is not None:
        attrs["gen_ai.usage.output_tokens"] = output_tokens
    if response_model:
        attrs["gen_ai.response.model"] = response_model
    return attrs


def step_attributes(guard: _GuardFace) -> dict[str, Any]:
    """A step's decision under the Cycles spans' attribute names, for a framework's own tracing
    (which is not OpenTelemetry): scope, action, estimate, decision, reservation, and once settled
    the actual, the charge and the model call's usage."""
    attrs = _subject_attrs(guard.subject, guard.action)
    attrs.update(_amount_attrs("estimate", guard.estimate))
    attrs["cycles.decision"] = "DENY" if guard.state == "denied" else guard.decision.value
    if guard.reservation_id:
        attrs["cycles.reservation_id"] = guard.reservation_id
    if guard.actual is not None:
        attrs["cycles.actual"] = guard.actual.amount
    if guard.charged is not None:
        attrs["cycles.charged"] = guard.charged.amount
    metrics = guard._core.metrics
    if metrics is not None:
        attrs.update(_metrics_attrs(metrics))
    attrs.update(guard._core.span_attributes)
    return attrs


@contextmanager
def span_attributes(attrs: Mapping[str, AttributeValue]) -> Iterator[None]:
    """Add ``attrs`` to every Cycles span opened in this block (a guard does this with what its
    step was annotated with). Costs a context variable, traced or not."""
    if not attrs:
        yield
        return
    token = _extra.set({**_extra.get(), **attrs})
    try:
        yield
    finally:
        _extra.reset(token)


def step_scope(action: Any, annotations: Mapping[str, AttributeValue]) -> AbstractContextManager[None]:
    """What a guard wraps each ledger call of its step in: the action's GenAI attributes (which a
    commit, release or extend request does not carry) and the step's annotations, on every span.
    Nothing to do (one ``if``) when Cycles is not instrumented."""
    if _state is None:
        return nullcontext()
    kind, name = action.kind, action.name
    return span_attributes(
        {"cycles.action.kind": kind, "cycles.action.name": name, **genai_model_attributes(kind, name), **annotations}
    )


def current_trace_ids() -> dict[str, str]:
    """The OpenTelemetry trace and span id current here, as hex (empty when Cycles is not
    instrumented or no span is current): for a framework's own tracing to name the OTel trace."""
    if _state is None:
        return {}
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return {}
    return {"otel.trace_id": format(ctx.trace_id, "032x"), "otel.span_id": format(ctx.span_id, "016x")}


def _subject_attrs(subject: Subject, action: Any) -> dict[str, Any]:
    attrs: dict[str, Any] = {
        "cycles.scope": derive_scopes(subject)[-1],
        "cycles.action.kind": action.kind,
        "cycles.action.name": action.name,
    }
    if subject.tenant:
        attrs["cycles.tenant"] = subject.tenant
    attrs.update(genai_model_attributes(action.kind, action.name))
    return attrs


def _metrics_attrs(metrics: Any) -> dict[str, Any]:
    return genai_usage_attributes(
        input_tokens=metrics.tokens_input, output_tokens=metrics.tokens_output, response_model=metrics.model_version
    )


def _amount_attrs(name: str, amount: Amount | None) -> dict[str, Any]:
    if amount is None:
        return {}
    return {f"cycles.{name}": amount.amount, "cycles.unit": amount.unit.value}


def _request_attrs(op: str, args: tuple[Any, ...]) -> dict[str, Any]:
    attrs: dict[str, Any] = {"cycles.operation": op}
    req = args[-1]
    if op in ("commit", "release", "extend"):
        attrs["cycles.reservation_id"] = args[0]
    subject = getattr(req, "subject", None)
    if subject is not None:
        attrs.update(_subject_attrs(subject, req.action))
    attrs.update(_amount_attrs("estimate", getattr(req, "estimate", None)))
    attrs.update(_amount_attrs("actual", getattr(req, "actual", None)))
    metrics = getattr(req, "metrics", None)
    if metrics is not None:
        attrs.update(_metrics_attrs(metrics))
    attrs.update(_extra.get())  # the step's framework ids (and what its adapter knows better)
    return attrs


def _response_attrs(op: str, response: Any) -> dict[str, Any]:
    attrs: dict[str, Any] = {}
    decision = getattr(response, "decision", None)
    if decision is not None:
        attrs["cycles.decision"] = decision.value
    elif op in ("commit", "release", "event"):
        attrs["cycles.decision"] = "ALLOW"
    rid = getattr(response, "reservation_id", None)
    if rid:
        attrs["cycles.reservation_id"] = rid
    reason = getattr(response, "reason_code", None)
    if reason:
        attrs["cycles.reason_code"] = reason
    charged = getattr(response, "charged", None)
    if charged is not None:
        attrs["cycles.charged"] = charged.amount
    return attrs


# ---- the traced call ---------------------------------------------------------------------------


@contextmanager
def _span(state: _State, op: str, args: tuple[Any, ...]) -> Iterator[Callable[[Any], None]]:
    """One operation's span and metrics; yields ``done(response)``."""
    from opentelemetry import trace
    from opentelemetry.propagate import inject

    attrs = _request_attrs(op, args)
    start = time.perf_counter()
    with state.tracer.start_as_current_span(
        f"cycles.{op}",
        kind=trace.SpanKind.CLIENT,
        attributes=attrs,
        record_exception=False,  # a denial is a decision, not an error: recorded below, as such
        set_status_on_exception=False,
    ) as span:
        headers: dict[str, str] = {}
        inject(headers)  # the traceparent the HTTP ledger sends (W3C trace context)
        from cycles.ledger.http import trace_context

        outcome: dict[str, Any] = {}

        def done(response: Any) -> None:
            outcome.update(_response_attrs(op, response))
            span.set_attributes(outcome)
            _after(state, op, args, response)

        try:
            with trace_context(traceparent=headers["traceparent"]) if "traceparent" in headers else _nothing():
                yield done
        except (Denied, NotFound) as denial:
            reason = "BUDGET_NOT_FOUND" if isinstance(denial, NotFound) else denial.code
            outcome = {"cycles.decision": "DENY", "cycles.reason_code": reason}
            scope = denial.details.get("scope") if isinstance(denial.details, Mapping) else None
            span.set_attributes(outcome)
            span.add_event(
                "cycles.denied",
                {"cycles.reason_code": reason, "cycles.denied_scope": str(scope or ""), "message": denial.message},
            )
            raise
        except CyclesError as exc:
            span.record_exception(exc)
            span.set_attribute("cycles.error_code", exc.code)
            span.set_status(trace.Status(trace.StatusCode.ERROR, exc.code))
            outcome = {"cycles.decision": "ERROR", "cycles.reason_code": exc.code}
            raise
        except BaseException as exc:
            span.record_exception(exc)
            span.set_status(trace.Status(trace.StatusCode.ERROR, type(exc).__name__))
            raise
        finally:
            if op in ("reserve", "decide", "commit", "event") and outcome:
                labels = {
                    "cycles.operation": op,
                    "cycles.decision": outcome.get("cycles.decision", "ALLOW"),
                    "cycles.reason_code": outcome.get("cycles.reason_code", ""),
                }
                state.decisions.add(1, labels)
            if op == "reserve":
                state.reserve_duration.record(
                    time.perf_counter() - start, {"cycles.decision": outcome.get("cycles.decision", "ERROR")}
                )


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def _after(state: _State, op: str, args: tuple[Any, ...], response: Any) -> None:
    with state.lock:
        if op == "reserve" and getattr(response, "reservation_id", None):
            state.estimates[response.reservation_id] = args[-1].estimate.amount
            while len(state.estimates) > 10_000:
                state.estimates.popitem(last=False)
        elif op == "commit":
            estimate = state.estimates.pop(args[0], None)
            if estimate:
                state.ratio.record(args[-1].actual.amount / estimate, {"cycles.unit": args[-1].actual.unit.value})
        elif op == "release":
            state.estimates.pop(args[0], None)
        if state.scope_gauges:
            for b in getattr(response, "balances", None) or ():
                _note_balance(state, b)


def _note_balance(state: _State, b: Balance) -> None:
    key = (b.scope, b.remaining.unit.value)
    if key not in state.balances and len(state.balances) >= state.max_scopes:
        state.dropped.add(1)
        return
    state.balances[key] = b


def _observe(field: str, options: Any) -> Iterator[Any]:
    from opentelemetry.metrics import Observation

    state = _state
    if state is None:
        return
    with state.lock:
        balances = list(state.balances.values())
    for b in balances:
        value = b.remaining if field == "remaining" else b.spent
        if value is not None:
            yield Observation(value.amount, {"cycles.scope": b.scope, "cycles.unit": b.remaining.unit.value})


# ---- ledger wrappers -----------------------------------------------------------------------------


class _Traced:
    """Forwards everything to the wrapped ledger (``__wrapped__``), attribute writes included, so
    whatever is cached on a ledger (its event store) is shared with the unwrapped one."""

    def __init__(self, inner: Any, state: _State) -> None:
        object.__setattr__(self, "__wrapped__", inner)
        object.__setattr__(self, "_otel", state)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__wrapped__, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.__wrapped__, name, value)

    def __repr__(self) -> str:
        return f"Traced({self.__wrapped__!r})"

    def _note_budgets(self, balances: list[Balance]) -> list[Balance]:
        state: _State = self._otel
        if state.scope_gauges:
            with state.lock:
                for b in balances:
                    _note_balance(state, b)
        return balances


class TracedLedger(_Traced):
    """A ``Ledger`` whose protocol operations are traced (registered as a virtual subclass)."""

    def list_budgets(self, *, tenant: str | None = None) -> list[Balance]:
        return self._note_budgets(self.__wrapped__.list_budgets(tenant=tenant))


class TracedAsyncLedger(_Traced):
    """An ``AsyncLedger`` whose protocol operations are traced."""

    async def list_budgets(self, *, tenant: str | None = None) -> list[Balance]:
        return self._note_budgets(await self.__wrapped__.list_budgets(tenant=tenant))


def _sync_op(op: str) -> Callable[..., Any]:
    def call(self: _Traced, *args: Any, **kwargs: Any) -> Any:
        with _span(self._otel, op, args) as done:
            response = getattr(self.__wrapped__, op)(*args, **kwargs)
            done(response)
            return response

    call.__name__ = op
    return call


def _async_op(op: str) -> Callable[..., Any]:
    async def call(self: _Traced, *args: Any, **kwargs: Any) -> Any:
        with _span(self._otel, op, args) as done:
            response = await getattr(self.__wrapped__, op)(*args, **kwargs)
            done(response)
            return response

    call.__name__ = op
    return call


for _op in _OPS:
    setattr(TracedLedger, _op, _sync_op(_op))
    setattr(TracedAsyncLedger, _op, _async_op(_op))
Ledger.register(TracedLedger)
AsyncLedger.register(TracedAsyncLedger)


def unwrap(ledger: Any) -> Any:
    """The ledger under a traced one (itself otherwise)."""
    return ledger.__wrapped__ if isinstance(ledger, _Traced) else ledger


def wrap_ledger(ledger: Any) -> Any:
    """``ledger`` traced when ``instrument()`` was called, else ``ledger`` itself (the client and
    server call this on the ledger they open)."""
    state = _state
    if state is None or isinstance(ledger, _Traced):
        return ledger
    if isinstance(ledger, AsyncLedger):
        return TracedAsyncLedger(ledger, state)
    return TracedLedger(ledger, state)


# ---- the server's side -----------------------------------------------------------------------------


def _route(path: str) -> str:
    if path.startswith("/v1/reservations/"):
        parts = path.split("/")
        if len(parts) >= 4 and parts[3]:
            parts[3] = "{reservation_id}"
        return "/".join(parts)
    return path if not path.startswith("/dashboard/") else "/dashboard"


class TracedApp:
    """ASGI wrapper: a SERVER span per HTTP request, continuing the caller's W3C trace context."""

    def __init__(self, app: Any, state: _State) -> None:
        self.app = app
        self._otel = state

    def __getattr__(self, name: str) -> Any:  # .server, .state, ... of the wrapped CyclesApp
        return getattr(self.app, name)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        from opentelemetry import context, trace
        from opentelemetry.propagate import extract

        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", [])}
        route = _route(scope["path"])
        token = context.attach(extract(carrier))
        try:
            with self._otel.tracer.start_as_current_span(
                f"{scope['method']} {route}",
                kind=trace.SpanKind.SERVER,
                attributes={"http.request.method": scope["method"], "http.route": route, "url.path": scope["path"]},
            ) as span:

                async def traced_send(message: Any) -> None:
                    if message["type"] == "http.response.start":
                        status = int(message["status"])
                        span.set_attribute("http.response.status_code", status)
                        if status >= 500:
                            span.set_status(trace.Status(trace.StatusCode.ERROR))
                    await send(message)

                await self.app(scope, receive, traced_send)
        finally:
            context.detach(token)


def instrument_app(app: Any) -> Any:
    """The server's ASGI app traced when ``instrument()`` was called (``create_app`` calls this)."""
    state = _state
    if state is None or isinstance(app, TracedApp):
        return app
    return TracedApp(app, state)
