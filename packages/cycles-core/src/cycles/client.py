"""``Cycles`` and ``AsyncCycles``: the one object users hold.

``_ClientBase`` builds requests and guards and owns the settings (no I/O). ``Cycles`` and
``AsyncCycles`` only send them to a ledger, synchronously or with ``await``.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar, cast

from pydantic import BaseModel, ValidationError

from cycles.errors import InvalidRequest, describe_validation_error
from cycles.flows import (
    AsyncLedgerSender,
    AsyncSender,
    Flow,
    Group,
    LedgerCall,
    LedgerSender,
    S,
    SyncSender,
    operation,
)
from cycles.guard import (
    AsyncGuard,
    Guard,
    GuardSettings,
    Mode,
    OnFailure,
    OnMissingActual,
    ShadowRecord,
    _GuardCore,
)
from cycles.ledger import periods
from cycles.ledger.base import (
    AsyncLedger,
    BalanceQuery,
    Ledger,
    ReservationQuery,
    ThreadedAsyncLedger,
    open_async_ledger,
    open_ledger,
)
from cycles.ledger.funding import FundingResult
from cycles.ledger.records import RecordStore, records_of

if TYPE_CHECKING:
    from cycles.operator import AsyncOperator, Operator
from cycles.ledger.rules import new_idempotency_key
from cycles.models import (
    Action,
    Amount,
    Balance,
    Caps,
    CommitOveragePolicy,
    CommitRequest,
    CommitResponse,
    DecisionRequest,
    DecisionResponse,
    EventCreateRequest,
    EventCreateResponse,
    ReleaseRequest,
    ReleaseResponse,
    ReservationCreateRequest,
    ReservationCreateResponse,
    ReservationDetail,
    ReservationExtendRequest,
    ReservationExtendResponse,
    ReservationListResponse,
    ReservationStatus,
    StandardMetrics,
    Subject,
    Unit,
)
from cycles.otel import wrap_ledger
from cycles.quotas_api import Quotas
from cycles.run import AsyncRun, EndedRuns, Run, _RunCore
from cycles.shadow import ShadowEvent, ShadowRecorder, ShadowReport, ShadowStore, report_from_store, shadow_store_for

__all__ = ["AsyncBudgets", "AsyncCycles", "Budgets", "Cycles"]

P = ParamSpec("P")
T = TypeVar("T")

_WINDOWS = ("created_from", "created_to", "expires_from", "expires_to", "finalized_from", "finalized_to")
_List = list  # `list` is shadowed by Budgets.list inside the budget classes

EstimateArg = Amount | Callable[..., Amount]
ActualArg = Callable[[Any], Amount | None] | None


M = TypeVar("M", bound=BaseModel)


def _build(cls: type[M], **fields: Any) -> M:
    """Validate a request built from user arguments; bad input is an InvalidRequest, like on the wire."""
    try:
        return cls(**fields)
    except ValidationError as exc:
        raise InvalidRequest(
            describe_validation_error(exc), details={"errors": exc.errors(include_url=False, include_context=False)}
        ) from exc


def _key(idempotency_key: str | None) -> str:
    return idempotency_key or new_idempotency_key()


def _ms(value: int | datetime | str | None) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return int(value.timestamp() * 1000)


def _metrics(value: StandardMetrics | Mapping[str, Any] | None) -> StandardMetrics | None:
    if value is None or isinstance(value, StandardMetrics):
        return value
    return _build(StandardMetrics, **dict(value))


def _policy(value: CommitOveragePolicy | str | None, default: CommitOveragePolicy) -> CommitOveragePolicy:
    return default if value is None else CommitOveragePolicy(value)


GuardT = TypeVar("GuardT", Guard, AsyncGuard)
RunT = TypeVar("RunT", Run, AsyncRun)
OperatorT = TypeVar("OperatorT")


class _ClientBase(Generic[GuardT, RunT, OperatorT]):
    """Settings, request building, guard and run construction, the operator plane's groups. No I/O:
    each shell says only how its guards, runs and operator are made (``_guard_of``, ``_run_of``,
    ``_open_operator``)."""

    def __init__(
        self,
        *,
        mode: Mode,
        ttl_ms: int,
        grace_period_ms: int,
        overage_policy: CommitOveragePolicy | str,
        heartbeat: bool,
        shadow_log_size: int,
    ) -> None:
        if mode not in ("enforce", "shadow"):
            raise InvalidRequest("mode must be 'enforce' or 'shadow'")
        self.mode: Mode = mode
        self.settings = GuardSettings(
            ttl_ms=ttl_ms,
            grace_period_ms=grace_period_ms,
            overage_policy=CommitOveragePolicy(overage_policy),
            mode=mode,
            heartbeat=heartbeat,
        )
        #: Decisions enforcement would have made but shadow mode let through (newest last).
        self.shadow_log: deque[ShadowRecord] = deque(maxlen=shadow_log_size)
        self._shadow_recorder: ShadowRecorder | None = None
        #: Runs that ended and deleted their budgets: a step on their scope is refused (``cycles.run``).
        self._ended_runs = EndedRuns()
        self._operator_lock = threading.Lock()  # one operator per client, whichever thread asks first

    def publish_shadow(self, record: ShadowRecord) -> None:
        """Keep a settled shadow decision next to the ledger (a background thread writes it), where
        ``shadow_report`` and the dashboard read every process's decisions."""
        if self._shadow_recorder is None:
            ledger = cast(Any, self).ledger
            self._shadow_recorder = ShadowRecorder(lambda: shadow_store_for(ledger))
        self._shadow_recorder.submit(ShadowEvent.from_record(record))

    def _shadow_store(self) -> ShadowStore:
        if self._shadow_recorder is None:
            ledger = cast(Any, self).ledger
            self._shadow_recorder = ShadowRecorder(lambda: shadow_store_for(ledger))
        self._shadow_recorder.flush()
        return self._shadow_recorder.store

    def _close_shadow(self) -> None:
        if self._shadow_recorder is not None:
            self._shadow_recorder.close()

    def _guard_core(
        self,
        subject: Subject,
        action: Action,
        estimate: Amount,
        *,
        ttl_ms: int | None,
        grace_period_ms: int | None,
        overage_policy: CommitOveragePolicy | str | None,
        mode: Mode | None,
        heartbeat: bool | None,
        idempotency_key: str | None,
        metadata: dict[str, Any] | None,
        **step: Any,
    ) -> _GuardCore:
        """``step``: the step options of ``GuardSettings`` (max_lease_ms, on_failure,
        on_missing_actual, expect_actual); None leaves the default."""
        base = self.settings
        step = {k: v for k, v in step.items() if v is not None}
        overrides = (ttl_ms, grace_period_ms, overage_policy, mode, heartbeat, metadata, *step.values())
        if all(o is None for o in overrides):  # the common case shares the client's settings object
            if not isinstance(estimate, Amount):
                raise InvalidRequest(f"estimate must be an Amount (e.g. usd(0.05)), got {type(estimate).__name__}")
            return _GuardCore(self, subject, action, estimate, base, idempotency_key, self.shadow_log)
        settings = GuardSettings(
            ttl_ms=base.ttl_ms if ttl_ms is None else ttl_ms,
            grace_period_ms=base.grace_period_ms if grace_period_ms is None else grace_period_ms,
            overage_policy=_policy(overage_policy, base.overage_policy),
            mode=base.mode if mode is None else mode,
            heartbeat=base.heartbeat if heartbeat is None else heartbeat,
            metadata=metadata,
            **step,
        )
        if settings.mode not in ("enforce", "shadow"):
            raise InvalidRequest("mode must be 'enforce' or 'shadow'")
        if settings.on_failure not in ("release", "charge"):
            raise InvalidRequest("on_failure must be 'release' or 'charge'")
        if settings.on_missing_actual not in ("estimate", "release", "leave"):
            raise InvalidRequest("on_missing_actual must be 'estimate', 'release' or 'leave'")
        if settings.max_lease_ms is not None and 0 < settings.max_lease_ms < 1000:
            raise InvalidRequest("max_lease_ms must be at least 1000 (or 0: no bound)")
        if not 1000 <= settings.ttl_ms <= 86_400_000:
            raise InvalidRequest("ttl_ms must be between 1000 and 86400000")
        if not 0 <= settings.grace_period_ms <= 60_000:
            raise InvalidRequest("grace_period_ms must be between 0 and 60000")
        if not isinstance(estimate, Amount):
            raise InvalidRequest(f"estimate must be an Amount (e.g. usd(0.05)), got {type(estimate).__name__}")
        return _GuardCore(self, subject, action, estimate, settings, idempotency_key, self.shadow_log)

    def _guard_of(self, core: _GuardCore) -> GuardT:
        raise NotImplementedError

    def _run_of(self, core: _RunCore) -> RunT:
        raise NotImplementedError

    def _open_operator(self) -> OperatorT:
        raise NotImplementedError

    def guard(
        self,
        subject: Subject,
        action: Action,
        estimate: Amount,
        *,
        ttl_ms: int | None = None,
        grace_period_ms: int | None = None,
        overage_policy: CommitOveragePolicy | str | None = None,
        mode: Mode | None = None,
        heartbeat: bool | None = None,
        idempotency_key: str | None = None,
        metadata: dict[str, Any] | None = None,
        on_failure: OnFailure | None = None,
        on_missing_actual: OnMissingActual | None = None,
        expect_actual: bool | None = None,
        max_lease_ms: int | None = None,
    ) -> GuardT:
        """Reserve before an action, settle after (see ``cycles.guard``). ``on_failure``: a body that
        raised releases (default) or, ``"charge"``, commits its estimate. ``on_missing_actual``: how a
        step expected to report an actual (model calls by default, or ``expect_actual=True``) that
        did not is settled. ``max_lease_ms``: the heartbeat stops extending after this long (default
        10 minutes; 0: no bound)."""
        core = self._guard_core(
            subject,
            action,
            estimate,
            ttl_ms=ttl_ms,
            grace_period_ms=grace_period_ms,
            overage_policy=overage_policy,
            mode=mode,
            heartbeat=heartbeat,
            idempotency_key=idempotency_key,
            metadata=metadata,
            on_failure=on_failure,
            on_missing_actual=on_missing_actual,
            expect_actual=expect_actual,
            max_lease_ms=max_lease_ms,
        )
        return self._guard_of(core)

    def run(
        self,
        subject: Subject,
        *,
        budgets: Sequence[Amount] = (),
        run_id: str | None = None,
        name: str | None = None,
        keep_budgets: bool = False,
        own_scope: bool = True,
        **step_options: Any,
    ) -> RunT:
        """One agent run: its workflow scope, per-run ``budgets`` and every step in it, settled by
        one rule when it ends (see ``cycles.run``). ``own_scope=False``: the run does not become the
        subject's workflow level (no budgets then). ``step_options`` are defaults for its guards."""
        core = _RunCore(
            self,
            subject,
            budgets=budgets,
            run_id=run_id,
            name=name,
            keep_budgets=keep_budgets,
            step_options=step_options,
            own_scope=own_scope,
        )
        return self._run_of(core)

    # -- the governance plane (cycles.operator) ----------------------------------------------

    @property
    def operator(self) -> OperatorT:
        """The governance plane (tenants, keys, budgets, webhooks, events, audit) on this ledger:
        see ``cycles.operator``. Needs the server extra; over http(s) the ledger's ``admin_key``.
        On ``AsyncCycles`` every operation is awaited."""
        op: OperatorT | None = self.__dict__.get("_operator")
        if op is None:
            with self._operator_lock:  # two threads must not each open one (in process: an app each)
                op = self.__dict__.get("_operator")
                if op is None:
                    op = self.__dict__["_operator"] = self._open_operator()
        return op

    # One property per operator group, for both shells.
    @property
    def tenants(self) -> Any:
        """``cy.operator.tenants``: create, list, get, update, suspend, reactivate, close."""
        return cast(Any, self.operator).tenants

    @property
    def keys(self) -> Any:
        """``cy.operator.keys``: create (permissions, scope filter, expiry), list, update, revoke, validate."""
        return cast(Any, self.operator).keys

    @property
    def webhooks(self) -> Any:
        """``cy.operator.webhooks``: create, list, get, update, delete, test, deliveries, replay."""
        return cast(Any, self.operator).webhooks

    @property
    def policies(self) -> Any:
        """``cy.operator.policies``: create, list, get, update, disable, enable (named policies)."""
        return cast(Any, self.operator).policies

    def _reserve_request(
        self,
        subject: Subject,
        action: Action,
        estimate: Amount,
        *,
        ttl_ms: int | None,
        grace_period_ms: int | None,
        overage_policy: CommitOveragePolicy | str | None,
        dry_run: bool,
        idempotency_key: str | None,
        metadata: dict[str, Any] | None,
        observe_mode: str | None = None,
    ) -> ReservationCreateRequest:
        if isinstance(subject, Subject):
            self._ended_runs.check(subject)
        return _build(
            ReservationCreateRequest,
            idempotency_key=_key(idempotency_key),
            subject=subject,
            action=action,
            estimate=estimate,
            ttl_ms=self.settings.ttl_ms if ttl_ms is None else ttl_ms,
            grace_period_ms=self.settings.grace_period_ms if grace_period_ms is None else grace_period_ms,
            overage_policy=_policy(overage_policy, self.settings.overage_policy),
            dry_run=dry_run,
            metadata=metadata,
            observe_mode=observe_mode,
        )

    @staticmethod
    def _commit_request(
        actual: Amount,
        idempotency_key: str | None,
        metrics: StandardMetrics | Mapping[str, Any] | None,
        metadata: dict[str, Any] | None,
    ) -> CommitRequest:
        return _build(
            CommitRequest,
            idempotency_key=_key(idempotency_key),
            actual=actual,
            metrics=_metrics(metrics),
            metadata=metadata,
        )

    @staticmethod
    def _release_request(reason: str | None, idempotency_key: str | None) -> ReleaseRequest:
        return _build(ReleaseRequest, idempotency_key=_key(idempotency_key), reason=reason)

    @staticmethod
    def _extend_request(extend_by_ms: int, idempotency_key: str | None) -> ReservationExtendRequest:
        return _build(ReservationExtendRequest, idempotency_key=_key(idempotency_key), extend_by_ms=extend_by_ms)

    @staticmethod
    def _decide_request(
        subject: Subject, action: Action, estimate: Amount, idempotency_key: str | None
    ) -> DecisionRequest:
        return _build(
            DecisionRequest, idempotency_key=_key(idempotency_key), subject=subject, action=action, estimate=estimate
        )

    def _event_request(
        self,
        subject: Subject,
        action: Action,
        actual: Amount,
        overage_policy: CommitOveragePolicy | str | None,
        idempotency_key: str | None,
        metrics: StandardMetrics | Mapping[str, Any] | None,
        metadata: dict[str, Any] | None,
    ) -> EventCreateRequest:
        if isinstance(subject, Subject):
            self._ended_runs.check(subject)
        return _build(
            EventCreateRequest,
            idempotency_key=_key(idempotency_key),
            subject=subject,
            action=action,
            actual=actual,
            overage_policy=_policy(overage_policy, self.settings.overage_policy),
            metrics=_metrics(metrics),
            metadata=metadata,
        )

    @staticmethod
    def _balance_query(levels: tuple[str | None, ...], cursor: str | None) -> BalanceQuery:
        tenant, workspace, app, workflow, agent, toolset = levels
        return BalanceQuery(tenant, workspace, app, workflow, agent, toolset, limit=200, cursor=cursor)

    @staticmethod
    def _reservation_query(
        status: ReservationStatus | str | None,
        idempotency_key: str | None,
        limit: int,
        cursor: str | None,
        filters: dict[str, Any],
    ) -> ReservationQuery:
        levels = {
            k: filters.pop(k) for k in ("tenant", "workspace", "app", "workflow", "agent", "toolset") if k in filters
        }
        window = {name: _ms(filters.pop(name, None)) for name in _WINDOWS}
        sort_by = filters.pop("sort_by", None)
        sort_dir = filters.pop("sort_dir", "desc")
        include = tuple(filters.pop("include", ()))
        if filters:
            raise TypeError(f"unknown reservation filters: {sorted(filters)}")
        return ReservationQuery(
            **levels,
            status=ReservationStatus(status) if status is not None else None,
            idempotency_key=idempotency_key,
            sort_by=sort_by,
            sort_dir=sort_dir,
            include=include,
            limit=limit,
            cursor=cursor,
            created_from_ms=window["created_from"],
            created_to_ms=window["created_to"],
            expires_from_ms=window["expires_from"],
            expires_to_ms=window["expires_to"],
            finalized_from_ms=window["finalized_from"],
            finalized_to_ms=window["finalized_to"],
        )


class _BudgetOps(Group[S]):
    """The operator plane: set, fund, freeze, close, read budgets. ``scope`` is a budget id such
    as ``"tenant:acme/workflow:run-42"``. Written once as flows (``cycles.flows``): ``Budgets``
    calls a ``Ledger``, ``AsyncBudgets`` awaits an ``AsyncLedger``."""

    @operation
    def set(
        self,
        scope: str,
        amount: Amount,
        *,
        overdraft_limit: Amount | None = None,
        caps: Caps | None = None,
        period: str | None = None,
        timezone: str | None = None,
        rollover_policy: str | None = None,
    ) -> Flow[Balance]:
        """Create a budget or set its allocation. ``period`` makes it recurring: ``"hour"``, ``"day"``,
        ``"week"``, ``"month"`` in ``timezone`` (IANA, default UTC) or a duration such as ``"12h"``;
        ``rollover_policy`` NONE (default), CARRY_FORWARD or CAP_AT_ALLOCATED; ``"none"`` removes it."""
        spec = periods.spec(period, timezone, rollover_policy)
        balance: Balance = yield LedgerCall(
            "set_budget", scope, amount, overdraft_limit=overdraft_limit, caps=caps, period=spec
        )
        return balance

    @operation
    def fund(self, scope: str, amount: Amount) -> Flow[Balance]:
        balance: Balance = yield LedgerCall("fund_budget", scope, amount)
        return balance

    @operation
    def adjust(
        self,
        scope: str,
        operation: str,
        amount: Amount,
        *,
        spent: Amount | None = None,
        idempotency_key: str | None = None,
    ) -> Flow[FundingResult]:
        """One funding operation of the governance spec, atomic in the ledger: CREDIT, DEBIT, RESET,
        RESET_SPENT (``spent``: the new period's starting spend, default 0) or REPAY_DEBT
        (``cycles.ledger.funding``). Unlike ``fund``, CREDIT keeps any debt (REPAY_DEBT clears it)."""
        result: FundingResult = yield LedgerCall(
            "fund", scope, amount.unit, operation, amount, spent=spent, idempotency_key=idempotency_key
        )
        return result

    @operation
    def get(self, scope: str, unit: Unit | None = None) -> Flow[Balance]:
        balance: Balance = yield LedgerCall("get_budget", scope, unit=unit)
        return balance

    @operation
    def list(self, tenant: str | None = None) -> Flow[_List[Balance]]:
        balances: _List[Balance] = yield LedgerCall("list_budgets", tenant=tenant)
        return balances

    @operation
    def freeze(self, scope: str, unit: Unit | None = None) -> Flow[_List[Balance]]:
        return (yield from _status(scope, "FROZEN", unit))

    @operation
    def unfreeze(self, scope: str, unit: Unit | None = None) -> Flow[_List[Balance]]:
        return (yield from _status(scope, "ACTIVE", unit))

    @operation
    def close(self, scope: str, unit: Unit | None = None) -> Flow[_List[Balance]]:
        return (yield from _status(scope, "CLOSED", unit))

    @operation
    def delete(self, scope: str, unit: Unit | None = None, *, force: bool = False) -> Flow[_List[Balance]]:
        """Delete the scope's budgets (one unit, or all) and return them as they were last. Raises
        ``BudgetInUse`` while reservations hold on one, ``DebtOutstanding`` while one is in debt
        unless ``force`` (which writes the debt off)."""
        balances: _List[Balance] = yield LedgerCall("delete_budget", scope, unit=unit, force=force)
        return balances


def _status(scope: str, status: str, unit: Unit | None) -> Flow[_List[Balance]]:
    balances: _List[Balance] = yield LedgerCall("set_budget_status", scope, status, unit=unit)
    return balances


class Budgets(_BudgetOps[SyncSender]):
    __doc__ = _BudgetOps.__doc__

    def __init__(self, ledger: Ledger) -> None:
        super().__init__(LedgerSender(ledger))


class AsyncBudgets(_BudgetOps[AsyncSender]):
    """``Budgets`` with every method awaited."""

    def __init__(self, ledger: AsyncLedger) -> None:
        super().__init__(AsyncLedgerSender(ledger))


class Cycles(_ClientBase[Guard, Run, "Operator"]):
    """Budget authority for one process. ``Cycles()`` uses ``CYCLES_URL`` or the embedded SQLite
    ledger at the per-user default path; ``Cycles("memory://")``, ``Cycles("sqlite:///x.db")``,
    ``Cycles("redis://...")``, ``Cycles("http://host:7878", api_key=...)`` pick a backend."""

    def __init__(
        self,
        url: str | None = None,
        *,
        ledger: Ledger | None = None,
        mode: Mode = "enforce",
        ttl_ms: int = 60_000,
        grace_period_ms: int = 5_000,
        overage_policy: CommitOveragePolicy | str = CommitOveragePolicy.ALLOW_IF_AVAILABLE,
        heartbeat: bool = True,
        shadow_log_size: int = 10_000,
        **ledger_options: Any,
    ) -> None:
        super().__init__(
            mode=mode,
            ttl_ms=ttl_ms,
            grace_period_ms=grace_period_ms,
            overage_policy=overage_policy,
            heartbeat=heartbeat,
            shadow_log_size=shadow_log_size,
        )
        self.ledger: Ledger = wrap_ledger(ledger if ledger is not None else open_ledger(url, **ledger_options))
        self.budgets = Budgets(self.ledger)
        self.quotas: Quotas[SyncSender] = Quotas(LedgerSender(self.ledger))

    @property
    def url(self) -> str:
        return self.ledger.url

    def _guard_of(self, core: _GuardCore) -> Guard:
        return Guard(self, core)

    def _run_of(self, core: _RunCore) -> Run:
        return Run(self, core)

    def _open_operator(self) -> Operator:
        from cycles.operator import Operator

        return Operator(ledger=self.ledger)

    def guarded(
        self,
        subject: Subject,
        action: Action,
        estimate: EstimateArg,
        *,
        actual: ActualArg = None,
        **guard_options: Any,
    ) -> Callable[[Callable[P, T]], Callable[P, T]]:
        """Decorate a function so every call runs inside a guard. ``estimate`` may be a callable of the
        function's arguments; ``actual`` a callable of its result returning the real cost (or None)."""

        def decorate(fn: Callable[P, T]) -> Callable[P, T]:
            if inspect.iscoroutinefunction(fn):
                raise TypeError(f"{fn.__qualname__} is async: decorate it with AsyncCycles.guarded")

            @functools.wraps(fn)
            def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
                amount = estimate(*args, **kwargs) if callable(estimate) else estimate
                with self.guard(subject, action, amount, **guard_options) as g:
                    result = fn(*args, **kwargs)
                    cost = actual(result) if actual is not None else None
                    if cost is not None:
                        g.commit(cost)
                    return result

            return wrapper

        return decorate

    # -- raw protocol operations -----------------------------------------------------------

    def reserve(
        self,
        subject: Subject,
        action: Action,
        estimate: Amount,
        *,
        ttl_ms: int | None = None,
        grace_period_ms: int | None = None,
        overage_policy: CommitOveragePolicy | str | None = None,
        dry_run: bool = False,
        idempotency_key: str | None = None,
        metadata: dict[str, Any] | None = None,
        observe_mode: str | None = None,
    ) -> ReservationCreateResponse:
        req = self._reserve_request(
            subject,
            action,
            estimate,
            ttl_ms=ttl_ms,
            grace_period_ms=grace_period_ms,
            overage_policy=overage_policy,
            dry_run=dry_run,
            idempotency_key=idempotency_key,
            metadata=metadata,
            observe_mode=observe_mode,
        )
        return self.ledger.reserve(req)

    def commit(
        self,
        reservation_id: str,
        actual: Amount,
        *,
        idempotency_key: str | None = None,
        metrics: StandardMetrics | Mapping[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> CommitResponse:
        req = self._commit_request(actual, idempotency_key, metrics, metadata)
        return self.ledger.commit(reservation_id, req)

    def release(
        self, reservation_id: str, *, reason: str | None = None, idempotency_key: str | None = None
    ) -> ReleaseResponse:
        return self.ledger.release(reservation_id, self._release_request(reason, idempotency_key))

    def extend(
        self, reservation_id: str, extend_by_ms: int, *, idempotency_key: str | None = None
    ) -> ReservationExtendResponse:
        return self.ledger.extend(reservation_id, self._extend_request(extend_by_ms, idempotency_key))

    def decide(
        self, subject: Subject, action: Action, estimate: Amount, *, idempotency_key: str | None = None
    ) -> DecisionResponse:
        return self.ledger.decide(self._decide_request(subject, action, estimate, idempotency_key))

    def event(
        self,
        subject: Subject,
        action: Action,
        actual: Amount,
        *,
        overage_policy: CommitOveragePolicy | str | None = None,
        idempotency_key: str | None = None,
        metrics: StandardMetrics | Mapping[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> EventCreateResponse:
        req = self._event_request(subject, action, actual, overage_policy, idempotency_key, metrics, metadata)
        return self.ledger.event(req)

    def balances(
        self,
        *,
        tenant: str | None = None,
        workspace: str | None = None,
        app: str | None = None,
        workflow: str | None = None,
        agent: str | None = None,
        toolset: str | None = None,
    ) -> list[Balance]:
        """Every balance matching the subject filter (all pages)."""
        out: list[Balance] = []
        cursor: str | None = None
        while True:
            query = self._balance_query((tenant, workspace, app, workflow, agent, toolset), cursor)
            page = self.ledger.balances(query)
            out.extend(page.balances)
            cursor = page.next_cursor
            if not cursor:
                return out

    def get_reservation(self, reservation_id: str) -> ReservationDetail:
        return self.ledger.get_reservation(reservation_id)

    def list_reservations(
        self,
        *,
        status: ReservationStatus | str | None = None,
        idempotency_key: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
        **filters: Any,
    ) -> ReservationListResponse:
        """One page of reservations; follow ``next_cursor`` for more. Filters: tenant .. toolset,
        created_from/created_to, expires_from/expires_to, finalized_from/finalized_to, sort_by,
        sort_dir, include."""
        query = self._reservation_query(status, idempotency_key, limit, cursor, filters)
        return self.ledger.list_reservations(query)

    def sweep(self, limit: int = 1000) -> int:
        """Expire reservations past their deadline now (normally done lazily). Returns how many."""
        return self.ledger.sweep(limit)

    def shadow_report(self, *, tenant: str | None = None, since: str | int | None = "7d") -> ShadowReport:
        """What enforcement would have done, from every process's shadow decisions on this ledger:
        would-denies by scope, action and reason, spend prevented, peak overage and a suggested
        budget per scope. ``since``: ``"7d"``, ``"12h"``, an ISO date or a ms timestamp."""
        store = self._shadow_store()
        return report_from_store(store, self.budgets.list(tenant=tenant), tenant=tenant, since=since)

    # -- governance records (cycles.ledger.records) -----------------------------------------

    @property
    def records(self) -> RecordStore:
        """The ledger's event and audit store (memory, SQLite, Redis)."""
        return records_of(self.ledger)

    def events(self, *, tenant: str | None = None, limit: int = 100, **filters: Any) -> _List[dict[str, Any]]:
        """Governance events, newest first. Filters: event_type, category, scope (prefix),
        correlation_id, request_id, trace_id, since, until, search (see ``EventFilter``)."""
        return self.records.events(tenant=tenant, limit=limit, **filters)

    def audit(self, *, tenant: str | None = None, limit: int = 100, **filters: Any) -> _List[dict[str, Any]]:
        """Audit entries, newest first. Filters: key_id, operation, resource_type, resource_id,
        status, status_min, status_max, error_code, since, until, ... (see ``AuditFilter``)."""
        return self.records.audit(tenant=tenant, limit=limit, **filters)

    def close(self) -> None:
        self._close_shadow()
        op = self.__dict__.pop("_operator", None)
        if op is not None:
            op.close()
        self.ledger.close()

    def __enter__(self) -> Cycles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Cycles({self.url!r}, mode={self.mode!r})"


class AsyncCycles(_ClientBase[AsyncGuard, AsyncRun, "AsyncOperator"]):
    """The asyncio twin of ``Cycles``: same constructor, same methods, awaited."""

    def __init__(
        self,
        url: str | None = None,
        *,
        ledger: AsyncLedger | Ledger | None = None,
        mode: Mode = "enforce",
        ttl_ms: int = 60_000,
        grace_period_ms: int = 5_000,
        overage_policy: CommitOveragePolicy | str = CommitOveragePolicy.ALLOW_IF_AVAILABLE,
        heartbeat: bool = True,
        shadow_log_size: int = 10_000,
        **ledger_options: Any,
    ) -> None:
        super().__init__(
            mode=mode,
            ttl_ms=ttl_ms,
            grace_period_ms=grace_period_ms,
            overage_policy=overage_policy,
            heartbeat=heartbeat,
            shadow_log_size=shadow_log_size,
        )
        if isinstance(ledger, Ledger):
            ledger = ThreadedAsyncLedger(ledger)
        self.ledger: AsyncLedger = wrap_ledger(
            ledger if ledger is not None else open_async_ledger(url, **ledger_options)
        )
        self.budgets = AsyncBudgets(self.ledger)
        self.quotas: Quotas[AsyncSender] = Quotas(AsyncLedgerSender(self.ledger))

    @property
    def url(self) -> str:
        return self.ledger.url

    def _guard_of(self, core: _GuardCore) -> AsyncGuard:
        return AsyncGuard(self, core)

    def _run_of(self, core: _RunCore) -> AsyncRun:
        return AsyncRun(self, core)

    def _open_operator(self) -> AsyncOperator:
        from cycles.operator import AsyncOperator

        return AsyncOperator(ledger=self.ledger)

    def guarded(
        self,
        subject: Subject,
        action: Action,
        estimate: EstimateArg,
        *,
        actual: ActualArg = None,
        **guard_options: Any,
    ) -> Callable[[Callable[P, Awaitable[T]]], Callable[P, Awaitable[T]]]:
        def decorate(fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
            if not inspect.iscoroutinefunction(fn):
                raise TypeError(f"{fn.__qualname__} is not async: decorate it with Cycles.guarded")

            @functools.wraps(fn)
            async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
                amount = estimate(*args, **kwargs) if callable(estimate) else estimate
                async with self.guard(subject, action, amount, **guard_options) as g:
                    result = await fn(*args, **kwargs)
                    cost = actual(result) if actual is not None else None
                    if cost is not None:
                        g.commit(cost)
                    return result

            return cast(Callable[P, Awaitable[T]], wrapper)

        return decorate

    async def reserve(
        self,
        subject: Subject,
        action: Action,
        estimate: Amount,
        *,
        ttl_ms: int | None = None,
        grace_period_ms: int | None = None,
        overage_policy: CommitOveragePolicy | str | None = None,
        dry_run: bool = False,
        idempotency_key: str | None = None,
        metadata: dict[str, Any] | None = None,
        observe_mode: str | None = None,
    ) -> ReservationCreateResponse:
        req = self._reserve_request(
            subject,
            action,
            estimate,
            ttl_ms=ttl_ms,
            grace_period_ms=grace_period_ms,
            overage_policy=overage_policy,
            dry_run=dry_run,
            idempotency_key=idempotency_key,
            metadata=metadata,
            observe_mode=observe_mode,
        )
        return await self.ledger.reserve(req)

    async def commit(
        self,
        reservation_id: str,
        actual: Amount,
        *,
        idempotency_key: str | None = None,
        metrics: StandardMetrics | Mapping[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> CommitResponse:
        req = self._commit_request(actual, idempotency_key, metrics, metadata)
        return await self.ledger.commit(reservation_id, req)

    async def release(
        self, reservation_id: str, *, reason: str | None = None, idempotency_key: str | None = None
    ) -> ReleaseResponse:
        return await self.ledger.release(reservation_id, self._release_request(reason, idempotency_key))

    async def extend(
        self, reservation_id: str, extend_by_ms: int, *, idempotency_key: str | None = None
    ) -> ReservationExtendResponse:
        return await self.ledger.extend(reservation_id, self._extend_request(extend_by_ms, idempotency_key))

    async def decide(
        self, subject: Subject, action: Action, estimate: Amount, *, idempotency_key: str | None = None
    ) -> DecisionResponse:
        return await self.ledger.decide(self._decide_request(subject, action, estimate, idempotency_key))

    async def event(
        self,
        subject: Subject,
        action: Action,
        actual: Amount,
        *,
        overage_policy: CommitOveragePolicy | str | None = None,
        idempotency_key: str | None = None,
        metrics: StandardMetrics | Mapping[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> EventCreateResponse:
        req = self._event_request(subject, action, actual, overage_policy, idempotency_key, metrics, metadata)
        return await self.ledger.event(req)

    async def balances(
        self,
        *,
        tenant: str | None = None,
        workspace: str | None = None,
        app: str | None = None,
        workflow: str | None = None,
        agent: str | None = None,
        toolset: str | None = None,
    ) -> list[Balance]:
        out: list[Balance] = []
        cursor: str | None = None
        while True:
            query = self._balance_query((tenant, workspace, app, workflow, agent, toolset), cursor)
            page = await self.ledger.balances(query)
            out.extend(page.balances)
            cursor = page.next_cursor
            if not cursor:
                return out

    async def get_reservation(self, reservation_id: str) -> ReservationDetail:
        return await self.ledger.get_reservation(reservation_id)

    async def list_reservations(
        self,
        *,
        status: ReservationStatus | str | None = None,
        idempotency_key: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
        **filters: Any,
    ) -> ReservationListResponse:
        query = self._reservation_query(status, idempotency_key, limit, cursor, filters)
        return await self.ledger.list_reservations(query)

    async def sweep(self, limit: int = 1000) -> int:
        return await self.ledger.sweep(limit)

    async def shadow_report(self, *, tenant: str | None = None, since: str | int | None = "7d") -> ShadowReport:
        """The async twin of ``Cycles.shadow_report``."""
        store = await asyncio.to_thread(self._shadow_store)
        budgets = await self.budgets.list(tenant=tenant)
        return await asyncio.to_thread(report_from_store, store, budgets, tenant=tenant, since=since)

    @property
    def records(self) -> RecordStore:
        """The ledger's event and audit store (its calls block: use ``events``/``audit`` here)."""
        return records_of(self.ledger)

    async def events(self, *, tenant: str | None = None, limit: int = 100, **filters: Any) -> _List[dict[str, Any]]:
        """As ``Cycles.events``."""
        return await asyncio.to_thread(functools.partial(self.records.events, tenant=tenant, limit=limit, **filters))

    async def audit(self, *, tenant: str | None = None, limit: int = 100, **filters: Any) -> _List[dict[str, Any]]:
        """As ``Cycles.audit``."""
        return await asyncio.to_thread(functools.partial(self.records.audit, tenant=tenant, limit=limit, **filters))

    async def aclose(self) -> None:
        await asyncio.to_thread(self._close_shadow)
        op = self.__dict__.pop("_operator", None)
        if op is not None:
            await op.aclose()
        await self.ledger.aclose()

    async def __aenter__(self) -> AsyncCycles:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"AsyncCycles({self.url!r}, mode={self.mode!r})"
