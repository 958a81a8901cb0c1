"""A run: one agent run, its scope, its budgets and every step reserved inside it.

The contract (adapters map their framework's callbacks onto it and keep no settlement rules of
their own)::

    with cy.run(Subject(tenant="acme"), budgets=[usd(0.50), risk_points(60)]) as run:
        with run.guard(Action("llm.completion", "gpt-4o"), estimate=usd(0.02)) as g:
            g.commit(usd(0.013))
    # async: ``async with acy.run(...) as run`` / ``async with run.guard(...)``

- **Identity and scope.** ``run.id`` is ``run_id`` or ``<name>-<12 hex>``. ``run.subject`` is the
  subject with the run as its ``workflow`` level (a subject that already names a workflow keeps
  it: its runs share that scope and cannot have budgets of their own; ``own_scope=False`` keeps the
  subject's levels as they are, for callers whose budgets sit on fixed scopes) and
  ``dimensions["run_id"] = run.id`` (the key ``per_run`` quotas use). Every step's subject
  carries both: ``run.guard(..., subject=...)`` fills in the workflow and the dimension.
- **Budgets.** ``budgets=[usd(0.5), risk_points(60)]`` are set on the run's workflow scope
  (``run.scope``) when it starts, one per unit, and deleted when it ends, after every step is
  settled, unless ``keep_budgets=True`` (the rows stay, open, for the caller): a long-lived
  service leaves no budget row behind per run. Where the ledger refuses the delete (a step it
  could not settle still holds a reservation, or the run ran into overdraft debt) the budget is
  closed instead, with a warning: nothing more can be charged to it and the row shows why.
  After the run ends, a step on its subject outside the run (``cy.guard(run.subject, ...)``,
  ``cy.reserve``, ``cy.event``: a straggler the agent left behind) would be charged to the parent
  scopes only, escaping the cap the run had: the client refuses it with ``BudgetClosed``, as the
  ledger refuses a step on a run budget it closed (a guard denies it at start, a shadow guard
  records the would-deny and lets it through).
  The client remembers the last 10,000 runs that deleted their budgets; ``keep_budgets=True``
  runs keep their open rows, which still bind.
- **Context.** ``start()`` (or entering ``with``) makes the run current in this context:
  ``cycles.current_run()`` returns it there and in every thread or task that copies the context
  afterwards, so concurrent runs on one framework object never share state. ``end()`` restores
  the previous one when called in the same context.
- **Steps.** ``run.guard(action, estimate, ...)`` takes the options of ``cy.guard`` (plus
  ``subject``) and returns a guard the run owns: used as ``with``, or ``start()`` /
  ``finish()`` / ``fail()`` from callbacks. ``start(begin=False)`` reserves ahead of the action
  (a guardrail); ``begin()`` says it started.
- **One settlement rule** (``cycles.guard`` applies it as each step ends, the run to every step
  still open when it ends, by success, exception, cancellation or denial): an action that
  happened is committed (its actual, else its estimate, surfaced as ``actual_missing`` when an
  actual was expected); a step that never started is released; a step whose action raised is
  released (``on_failure="charge"``: committed at its estimate); nothing is released once its
  action happened. A run that ends with an error (not a denial) while a step is still open died
  of that step: it failed. A run that ends normally, denied, cancelled or interrupted with a step
  still open cut it short: it is committed (its actual, else its estimate).
- **Nothing silent.** ``run.uncharged`` totals what capped commits left unrecorded,
  ``run.missing_actuals`` lists steps settled without an actual, ``run.steps`` records every step
  (guards, with their state, charged, uncharged and flags).
- **Callbacks.** ``run.track(key, value)`` / ``take(key)`` / ``peek(key)`` pair a framework's
  start and end callbacks (by call id) for the life of the run, so an adapter keeps no registry
  of its own that could outlive it.
- **Caps.** ``run.grant(key, caps)`` remembers the caps a model call was granted; ``run.check_tool
  (name, key)`` raises ``ToolNotAllowed`` for a tool those caps forbid (the budget's own caps are
  checked by the core at reservation too). ``Guard.max_tokens(n)`` clamps a request.
- **Batches.** ``for_each(...)`` / ``afor_each(...)`` run one callable per input, each in its
  own run; a denial ends that input's run only, unless ``stop_on_denial=True``.
- ``run.end(exc)`` is idempotent; a run can be started once.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
import uuid
from collections.abc import Awaitable, Callable, Hashable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from cycles.errors import BudgetClosed, CyclesError, Denied, InvalidRequest, NotFound, ToolNotAllowed
from cycles.guard import AsyncGuard, Guard, _Call, _Flow, _GuardCore, adrive, drive
from cycles.models import Action, Amount, Caps, Subject, Unit, trusted
from cycles.scopes import derive_scopes

if TYPE_CHECKING:
    from cycles.client import AsyncCycles, Cycles

__all__ = ["AsyncRun", "BatchResult", "Run", "afor_each", "current_run", "for_each"]

log = logging.getLogger("cycles.run")

T = TypeVar("T")
_current_run: contextvars.ContextVar[Run | AsyncRun | None] = contextvars.ContextVar("cycles_run", default=None)


def current_run() -> Run | AsyncRun | None:
    """The run started in this context (or the one this thread/task copied), else None."""
    return _current_run.get()


class EndedRuns:
    """The runs of one client that ended and deleted their budgets (the newest ``keep``), so that a
    step on such a run's subject is refused instead of escaping its cap (see the module docstring)."""

    def __init__(self, keep: int = 10_000) -> None:
        self._scopes: dict[str, str] = {}  # run id (its workflow level) -> its scope, oldest first
        self._keep = keep
        self._lock = threading.Lock()

    def note(self, run_id: str, scope: str) -> None:
        with self._lock:
            self._scopes[run_id] = scope
            while len(self._scopes) > self._keep:
                del self._scopes[next(iter(self._scopes))]

    def forget(self, run_id: str) -> None:
        """A new run took the id (``run_id=`` given again): its steps are its own."""
        with self._lock:
            self._scopes.pop(run_id, None)

    def check(self, subject: Subject) -> None:
        """Raise ``BudgetClosed`` when ``subject`` is on the scope of an ended run of this client."""
        scope = self._scopes.get(subject.workflow) if subject.workflow is not None else None
        if scope is None:  # the common case: one dict lookup
            return
        levels = {k: getattr(subject, k) for k in ("tenant", "workspace", "app", "workflow")}
        if derive_scopes(Subject(**levels))[-1] == scope:
            raise BudgetClosed(
                f"run {subject.workflow} has ended and its budgets were deleted: a step on its scope {scope} "
                "would escape its cap (start a new run, or keep_budgets=True)",
                details={"scope": scope, "run_id": subject.workflow},
            )


class _RunCore:
    """What a run knows and decides, with no I/O."""

    def __init__(
        self,
        client: object,
        subject: Subject,
        *,
        budgets: Sequence[Amount],
        run_id: str | None,
        name: str | None,
        keep_budgets: bool,
        step_options: dict[str, Any],
        own_scope: bool = True,
    ) -> None:
        if not isinstance(subject, Subject):
            raise InvalidRequest(f"a run needs a Subject, got {type(subject).__name__}")
        self.client = client
        self.id = run_id or f"{name or 'run'}-{uuid.uuid4().hex[:12]}"
        self.own_scope = own_scope and subject.workflow is None
        base = _validated_subject(subject, workflow=self.id) if self.own_scope else subject
        units = [b.unit for b in budgets]
        if len(set(units)) != len(units):
            raise InvalidRequest("a run takes at most one budget per unit")
        if budgets and not self.own_scope:
            raise InvalidRequest(
                f"budgets= needs a run scope of its own, but the subject names workflow {subject.workflow!r}: "
                "leave workflow unset (the run becomes the workflow)"
            )
        self.subject = _with_run_id(base, self.id)
        levels = {k: getattr(base, k) for k in ("tenant", "workspace", "app", "workflow")}
        self.scope = derive_scopes(Subject(**levels))[-1]
        self.budgets = tuple(budgets)
        self.keep_budgets = keep_budgets
        self.step_options = step_options
        self.state: Literal["new", "open", "ended"] = "new"
        self.error: BaseException | None = None
        self.steps: list[Guard | AsyncGuard] = []
        self._open: dict[_GuardCore, Guard | AsyncGuard] = {}
        self._grants: dict[Hashable, Caps] = {}
        self._keyed: dict[Hashable, Any] = {}
        self._lock = threading.Lock()

    # -- steps ---------------------------------------------------------------------------------

    def step_subject(self, subject: Subject | None) -> Subject:
        if subject is None:
            return self.subject
        if subject.workflow is None and self.own_scope:
            subject = subject.merged(workflow=self.subject.workflow)
        return _with_run_id(subject, self.id)

    def step_core(
        self, action: Action, estimate: Amount, subject: Subject | None, options: dict[str, Any]
    ) -> _GuardCore:
        if self.state == "ended":
            raise RuntimeError(f"run {self.id} has ended: it takes no more steps")
        merged = {**self.step_options, **options}
        build = self.client._guard_core  # type: ignore[attr-defined]
        core: _GuardCore = build(
            self.step_subject(subject),
            action,
            estimate,
            ttl_ms=merged.pop("ttl_ms", None),
            grace_period_ms=merged.pop("grace_period_ms", None),
            overage_policy=merged.pop("overage_policy", None),
            mode=merged.pop("mode", None),
            heartbeat=merged.pop("heartbeat", None),
            idempotency_key=merged.pop("idempotency_key", None),
            metadata=merged.pop("metadata", None),
            **merged,
        )
        core.run = self
        return core

    def adopt(self, shell: Guard | AsyncGuard) -> None:
        core = shell._core
        core.on_settled = self._forget
        with self._lock:
            self.steps.append(shell)
            self._open[core] = shell

    def _forget(self, core: _GuardCore) -> None:
        with self._lock:
            self._open.pop(core, None)

    def take_open(self) -> list[Guard | AsyncGuard]:
        with self._lock:
            shells = list(self._open.values())
            self._open.clear()
        return shells

    # -- caps ----------------------------------------------------------------------------------

    def grant(self, key: Hashable, caps: Caps | None) -> None:
        with self._lock:
            if caps is None or caps.is_empty():
                self._grants.pop(key, None)
            else:
                self._grants[key] = caps

    def check_tool(self, name: str, key: Hashable) -> None:
        caps = self._grants.get(key)
        if caps is not None and not caps.allows_tool(name):
            raise ToolNotAllowed(
                f"tool {name!r} is not allowed by the caps of the model call that chose it",
                details={"tool": name, "scope": self.scope},
            )

    # -- flows ---------------------------------------------------------------------------------

    def start_flow(self) -> _Flow:
        if self.state != "new":
            raise RuntimeError("a run can be started once")
        ended = getattr(self.client, "_ended_runs", None)
        if isinstance(ended, EndedRuns):
            ended.forget(self.id)
        done: list[Amount] = []
        try:
            for amount in self.budgets:
                yield _Call("set_budget", (self.scope, amount))
                done.append(amount)
        except BaseException:
            yield from self._cleanup_flow(done)
            self.state = "ended"
            raise
        self.state = "open"
        return None

    def end_flow(self, exc: BaseException | None) -> _Flow:
        self.state = "ended"
        self.error = exc
        self._keyed.clear()
        if not self.keep_budgets:
            yield from self._cleanup_flow(self.budgets)
            ended = getattr(self.client, "_ended_runs", None)
            if self.budgets and isinstance(ended, EndedRuns):
                ended.note(self.id, self.scope)
        self._grants.clear()
        return None

    def _cleanup_flow(self, budgets: Iterable[Amount]) -> _Flow:
        """Delete each budget the run set; close it (with a warning) where the ledger refuses."""
        for amount in budgets:
            unit = amount.unit.value
            try:
                yield _Call("delete_budget", (self.scope,), {"unit": amount.unit})
                continue
            except NotFound:
                continue  # deleted already (by an operator): nothing is left behind
            except CyclesError as error:
                log.warning(
                    "run %s: could not delete its %s budget %s (closing it): %s", self.id, unit, self.scope, error
                )
            try:
                yield _Call("set_budget_status", (self.scope, "CLOSED"), {"unit": amount.unit})
            except CyclesError as error:
                log.warning("run %s: could not close its %s budget %s: %s", self.id, unit, self.scope, error)
        return None

    def abandon_reason(self, exc: BaseException | None) -> str:
        how = "normally" if exc is None else f"with {type(exc).__name__}"
        return f"run {self.id} ended {how} while it was open"


def _validated_subject(subject: Subject, **levels: str) -> Subject:
    try:
        return subject.merged(**levels)
    except ValueError as exc:
        raise InvalidRequest(f"run id {levels!r} cannot be a scope level: {exc}") from exc


def _with_run_id(subject: Subject, run_id: str) -> Subject:
    dims = subject.dimensions or {}
    if dims.get("run_id") == run_id:
        return subject
    if "run_id" not in dims and len(dims) >= 16:
        raise InvalidRequest("the subject has 16 dimensions already: a run needs one for run_id")
    return subject.model_copy(update={"dimensions": {**dims, "run_id": run_id}})


class _RunFace:
    """What user code reads on a run, shared by both shells."""

    _core: _RunCore
    _token: contextvars.Token[Run | AsyncRun | None] | None

    def _reset(self) -> None:
        if self._token is not None:
            with contextlib.suppress(ValueError):  # ended in another context: nothing to undo
                _current_run.reset(self._token)
            self._token = None

    @property
    def id(self) -> str:
        return self._core.id

    @property
    def subject(self) -> Subject:
        """The run's subject: its workflow scope (unless ``own_scope=False``), ``dimensions["run_id"] = id``."""
        return self._core.subject

    @property
    def scope(self) -> str:
        """The run's workflow scope, where its budgets live (``tenant:acme/workflow:<id>``)."""
        return self._core.scope

    @property
    def state(self) -> str:
        """``new``, ``open`` or ``ended``."""
        return self._core.state

    @property
    def error(self) -> BaseException | None:
        """What the run ended with (None: it ended normally or has not ended)."""
        return self._core.error

    @property
    def steps(self) -> list[Any]:
        """Every step reserved in the run (guards, oldest first), settled or not."""
        with self._core._lock:
            return list(self._core.steps)

    @property
    def open_steps(self) -> list[Any]:
        with self._core._lock:
            return list(self._core._open.values())

    @property
    def charged(self) -> dict[Unit, Amount]:
        """What the ledger charged for the run's settled steps, per unit."""
        return _totals(g.charged for g in self.steps)

    @property
    def uncharged(self) -> dict[Unit, Amount]:
        """What capped commits left unrecorded, per unit (empty: nothing)."""
        return _totals(g.uncharged for g in self.steps)

    @property
    def missing_actuals(self) -> list[Any]:
        """Steps that ended without the actual they were expected to report."""
        return [g for g in self.steps if g.actual_missing]

    def subject_for(self, **levels: str | None) -> Subject:
        """The run's subject with some levels set (``agent=``, ``toolset=``...)."""
        return self._core.step_subject(self._core.subject.merged(**levels))

    def track(self, key: Hashable, value: Any) -> None:
        """Pair a framework callback's key (a call id, a run id) with what its later callback needs
        (usually the step's guard). Forgotten when taken or when the run ends."""
        with self._core._lock:
            self._core._keyed[key] = value

    def take(self, key: Hashable) -> Any:
        """What ``track`` stored under ``key`` (removed), or None."""
        with self._core._lock:
            return self._core._keyed.pop(key, None)

    def peek(self, key: Hashable) -> Any:
        """What ``track`` stored under ``key`` (kept), or None."""
        return self._core._keyed.get(key)

    def grant(self, key: Hashable, caps: Caps | None) -> None:
        """Remember the caps a model call (identified by ``key``) was granted, for the tools it picks."""
        self._core.grant(key, caps)

    def check_tool(self, name: str, key: Hashable) -> None:
        """Raise ``ToolNotAllowed`` if the caps granted under ``key`` forbid tool ``name``."""
        self._core.check_tool(name, key)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id} {self.state} steps={len(self._core.steps)}>"


def _totals(amounts: Iterable[Amount | None]) -> dict[Unit, Amount]:
    out: dict[Unit, int] = {}
    for a in amounts:
        if a is not None:
            out[a.unit] = out.get(a.unit, 0) + a.amount
    return {unit: trusted(Amount, unit=unit, amount=n) for unit, n in out.items()}


class Run(_RunFace):
    """``with cy.run(subject, budgets=[...]) as run:`` -- or ``run.start()`` / ``run.end(exc)``."""

    def __init__(self, client: Cycles, core: _RunCore) -> None:
        self._client = client
        self._core = core
        self._token: contextvars.Token[Run | AsyncRun | None] | None = None

    def start(self) -> Run:
        """Set the run's budgets and make it current in this context."""
        drive(self._client.ledger, self._core.start_flow())
        self._token = _current_run.set(self)
        return self

    def end(self, exc: BaseException | None = None) -> None:
        """Settle every step still open by the rule, then delete the run's budgets. Idempotent."""
        if self._core.state == "ended":
            return
        why = self._core.abandon_reason(exc)
        try:
            for shell in self._core.take_open():
                assert isinstance(shell, Guard)
                try:
                    shell._abandon(why, exc)
                except CyclesError as error:
                    log.warning("run %s: could not settle %r: %s", self.id, shell, error)
        finally:
            drive(self._client.ledger, self._core.end_flow(exc))
            self._reset()

    def guard(self, action: Action, estimate: Amount, *, subject: Subject | None = None, **options: Any) -> Guard:
        """A step of this run: ``cy.guard``'s options; ``subject`` defaults to the run's."""
        shell = Guard(self._client, self._core.step_core(action, estimate, subject, options))
        self._core.adopt(shell)
        return shell

    def __enter__(self) -> Run:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        self.end(exc)


class AsyncRun(_RunFace):
    """``async with acy.run(subject, budgets=[...]) as run:`` -- or ``await run.start()`` / ``end(exc)``."""

    def __init__(self, client: AsyncCycles, core: _RunCore) -> None:
        self._client = client
        self._core = core
        self._token: contextvars.Token[Run | AsyncRun | None] | None = None

    async def start(self) -> AsyncRun:
        """Set the run's budgets and make it current in this context."""
        await adrive(self._client.ledger, self._core.start_flow())
        self._token = _current_run.set(self)
        return self

    async def end(self, exc: BaseException | None = None) -> None:
        """Settle every step still open by the rule, then delete the run's budgets. Idempotent."""
        if self._core.state == "ended":
            return
        why = self._core.abandon_reason(exc)
        try:
            for shell in self._core.take_open():
                assert isinstance(shell, AsyncGuard)
                try:
                    await shell._abandon(why, exc)
                except CyclesError as error:
                    log.warning("run %s: could not settle %r: %s", self.id, shell, error)
        finally:
            await adrive(self._client.ledger, self._core.end_flow(exc))
            self._reset()

    def guard(self, action: Action, estimate: Amount, *, subject: Subject | None = None, **options: Any) -> AsyncGuard:
        """A step of this run: ``acy.guard``'s options; ``subject`` defaults to the run's."""
        shell = AsyncGuard(self._client, self._core.step_core(action, estimate, subject, options))
        self._core.adopt(shell)
        return shell

    async def __aenter__(self) -> AsyncRun:
        return await self.start()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        await self.end(exc)


# ---- batches ---------------------------------------------------------------------------------


class BatchResult(list[Any]):
    """One entry per input, in order: the callable's result, or the exception that ended its run.
    ``runs`` holds each input's run; ``errors`` the (index, exception) of the inputs that failed."""

    def __init__(self) -> None:
        super().__init__()
        self.runs: list[Run | AsyncRun] = []
        self.errors: list[tuple[int, BaseException]] = []

    def denied(self, index: int, denial: Denied, stop: bool) -> None:
        if stop:
            raise denial
        self.append(denial)
        self.errors.append((index, denial))


def for_each(
    open_run: Callable[[int], Run],
    inputs: Iterable[T],
    fn: Callable[[Run, T], Any],
    *,
    stop_on_denial: bool = False,
) -> BatchResult:
    """Run ``fn(run, input)`` for each input in a run of its own (``open_run(index)`` makes it).

    A ``Denied`` ends that input's run only, and stands in its result; the others go on unless
    ``stop_on_denial`` (then it is raised). Any other exception is raised as usual."""
    out = BatchResult()
    for i, item in enumerate(inputs):
        run = open_run(i)
        out.runs.append(run)
        try:
            with run:
                out.append(fn(run, item))
        except Denied as denial:
            out.denied(i, denial, stop_on_denial)
    return out


async def afor_each(
    open_run: Callable[[int], AsyncRun],
    inputs: Iterable[T],
    fn: Callable[[AsyncRun, T], Awaitable[Any]],
    *,
    stop_on_denial: bool = False,
) -> BatchResult:
    """The async twin of ``for_each`` (inputs one after another)."""
    out = BatchResult()
    for i, item in enumerate(inputs):
        run = open_run(i)
        out.runs.append(run)
        try:
            async with run:
                out.append(await fn(run, item))
        except Denied as denial:
            out.denied(i, denial, stop_on_denial)
    return out
