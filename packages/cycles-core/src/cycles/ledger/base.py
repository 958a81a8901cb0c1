"""The ledger interface every backend implements, and the URL-scheme registry.

A ledger speaks the protocol's operations in terms of the wire models. ``tenant`` is the caller's
effective tenant (the server passes the API key's tenant; an in-process caller passes ``None``,
meaning trusted). Backends: memory, sqlite (``TransactionalLedger`` over ``rules``), redis (Lua),
http (a remote Cycles server).
"""

from __future__ import annotations

import abc
import asyncio
import functools
import importlib
import os
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from cycles.errors import CyclesError, InvalidRequest
from cycles.ledger import counters, rules
from cycles.ledger.counters import CounterPage, CounterQuery, CounterReset, CounterResetRequest
from cycles.ledger.funding import FundingOperation, FundingResult, check_request
from cycles.ledger.limits import DEFAULT_LIMITS, RateLimiter, TenantLimits
from cycles.ledger.periods import PeriodSpec
from cycles.ledger.policies import NamedPolicy
from cycles.ledger.quotas import PolicyEdit, ScopePolicy
from cycles.ledger.rules import BalanceQuery, ReservationQuery, Txn
from cycles.models import (
    Amount,
    Balance,
    BalanceResponse,
    Caps,
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
    Unit,
)

__all__ = [
    "AsyncLedger",
    "BalanceQuery",
    "Ledger",
    "ReservationQuery",
    "TransactionalLedger",
    "ThreadedAsyncLedger",
    "default_ledger_url",
    "open_async_ledger",
    "open_ledger",
]

P = ParamSpec("P")
T = TypeVar("T")


class Ledger(abc.ABC):
    """Synchronous ledger. Every method is atomic; mutating ones are idempotent by request key."""

    url: str = ""
    #: True when calls may block on I/O or locks: the async facade then runs them in a thread.
    blocking: bool = True

    # runtime plane (protocol v0)
    @abc.abstractmethod
    def reserve(self, req: ReservationCreateRequest, *, tenant: str | None = None) -> ReservationCreateResponse: ...
    @abc.abstractmethod
    def commit(self, reservation_id: str, req: CommitRequest, *, tenant: str | None = None) -> CommitResponse: ...
    @abc.abstractmethod
    def release(self, reservation_id: str, req: ReleaseRequest, *, tenant: str | None = None) -> ReleaseResponse: ...
    @abc.abstractmethod
    def extend(
        self, reservation_id: str, req: ReservationExtendRequest, *, tenant: str | None = None
    ) -> ReservationExtendResponse: ...
    @abc.abstractmethod
    def decide(self, req: DecisionRequest, *, tenant: str | None = None) -> DecisionResponse: ...
    @abc.abstractmethod
    def event(self, req: EventCreateRequest, *, tenant: str | None = None) -> EventCreateResponse: ...
    @abc.abstractmethod
    def balances(self, query: BalanceQuery, *, tenant: str | None = None) -> BalanceResponse: ...
    @abc.abstractmethod
    def get_reservation(self, reservation_id: str, *, tenant: str | None = None) -> ReservationDetail: ...
    @abc.abstractmethod
    def list_reservations(self, query: ReservationQuery, *, tenant: str | None = None) -> ReservationListResponse: ...

    # operator plane
    @abc.abstractmethod
    def set_budget(
        self,
        scope: str,
        amount: Amount,
        *,
        overdraft_limit: Amount | None = None,
        caps: Caps | None = None,
        period: PeriodSpec | None = None,
    ) -> Balance:
        """Create or set a budget; ``period`` makes it recurring (``periods.spec``; ``PeriodSpec(None)``
        removes the period, ``None`` keeps whatever is stored)."""

    @abc.abstractmethod
    def fund_budget(self, scope: str, amount: Amount) -> Balance: ...
    @abc.abstractmethod
    def set_overdraft_limit(self, scope: str, limit: Amount) -> Balance:
        """Change only the overdraft limit of the budget of ``scope`` in ``limit``'s unit."""

    @abc.abstractmethod
    def fund(
        self,
        scope: str,
        unit: Unit,
        operation: FundingOperation | str,
        amount: Amount,
        *,
        spent: Amount | None = None,
        idempotency_key: str | None = None,
    ) -> FundingResult:
        """One funding operation of the governance spec (CREDIT, DEBIT, RESET, RESET_SPENT,
        REPAY_DEBT), atomic; ``cycles.ledger.funding`` says what each does and refuses."""

    @abc.abstractmethod
    def set_budget_status(self, scope: str, status: str, *, unit: Unit | None = None) -> list[Balance]: ...
    @abc.abstractmethod
    def delete_budget(self, scope: str, *, unit: Unit | None = None, force: bool = False) -> list[Balance]:
        """Delete a scope's budgets (one unit, or all): ``rules.delete_budget`` says when it is refused."""

    @abc.abstractmethod
    def get_budget(self, scope: str, *, unit: Unit | None = None) -> Balance: ...
    @abc.abstractmethod
    def list_budgets(self, *, tenant: str | None = None) -> list[Balance]: ...
    @abc.abstractmethod
    def sweep(self, limit: int = 1000) -> int:
        """Expire reservations past their deadline (returning their amounts); purge old idempotency records."""

    # action quotas and action-kind access (ledger/quotas.py)
    @abc.abstractmethod
    def update_policy(self, scope: str, edit: PolicyEdit) -> ScopePolicy:
        """Set or delete a quota, or replace the allowed/denied action kinds, on one scope."""

    @abc.abstractmethod
    def list_policies(self, *, tenant: str | None = None) -> list[ScopePolicy]: ...

    # action quota counters (ledger/counters.py)
    @abc.abstractmethod
    def list_quota_counters(self, query: CounterQuery, *, tenant: str | None = None) -> CounterPage:
        """One page of a tenant's live quota counters (``query.tenant``, or the caller's)."""

    @abc.abstractmethod
    def reset_quota_counter(self, req: CounterResetRequest, *, tenant: str | None = None) -> CounterReset:
        """Set one counter to 0 (incident response); ``NotFound`` when no live counter has its name."""

    # named policies (ledger/policies.py); a ledger that keeps none (a remote server's) refuses
    def put_named_policy(self, policy: NamedPolicy, *, create: bool) -> NamedPolicy:
        """Store a new named policy, or a new version of one (``rules.put_named_policy``)."""
        raise _no_named_policies(self)

    def get_named_policy(self, policy_id: str) -> NamedPolicy:
        raise _no_named_policies(self)

    def list_named_policies(self, *, tenant: str) -> list[NamedPolicy]:
        raise _no_named_policies(self)

    def count_active(self) -> int | None:
        """ACTIVE reservations across all tenants, from a maintained count (never a scan of rows),
        or ``None`` when the backend keeps no such total (Redis: the counts live per slot)."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections and files."""

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncLedger(abc.ABC):
    """The same operations, awaitable. Native for redis and http; a thread shell for embedded ledgers."""

    url: str = ""

    @abc.abstractmethod
    async def reserve(
        self, req: ReservationCreateRequest, *, tenant: str | None = None
    ) -> ReservationCreateResponse: ...
    @abc.abstractmethod
    async def commit(self, reservation_id: str, req: CommitRequest, *, tenant: str | None = None) -> CommitResponse: ...
    @abc.abstractmethod
    async def release(
        self, reservation_id: str, req: ReleaseRequest, *, tenant: str | None = None
    ) -> ReleaseResponse: ...
    @abc.abstractmethod
    async def extend(
        self, reservation_id: str, req: ReservationExtendRequest, *, tenant: str | None = None
    ) -> ReservationExtendResponse: ...
    @abc.abstractmethod
    async def decide(self, req: DecisionRequest, *, tenant: str | None = None) -> DecisionResponse: ...
    @abc.abstractmethod
    async def event(self, req: EventCreateRequest, *, tenant: str | None = None) -> EventCreateResponse: ...
    @abc.abstractmethod
    async def balances(self, query: BalanceQuery, *, tenant: str | None = None) -> BalanceResponse: ...
    @abc.abstractmethod
    async def get_reservation(self, reservation_id: str, *, tenant: str | None = None) -> ReservationDetail: ...
    @abc.abstractmethod
    async def list_reservations(
        self, query: ReservationQuery, *, tenant: str | None = None
    ) -> ReservationListResponse: ...
    @abc.abstractmethod
    async def set_budget(
        self,
        scope: str,
        amount: Amount,
        *,
        overdraft_limit: Amount | None = None,
        caps: Caps | None = None,
        period: PeriodSpec | None = None,
    ) -> Balance: ...
    @abc.abstractmethod
    async def fund_budget(self, scope: str, amount: Amount) -> Balance: ...
    @abc.abstractmethod
    async def set_overdraft_limit(self, scope: str, limit: Amount) -> Balance: ...
    @abc.abstractmethod
    async def fund(
        self,
        scope: str,
        unit: Unit,
        operation: FundingOperation | str,
        amount: Amount,
        *,
        spent: Amount | None = None,
        idempotency_key: str | None = None,
    ) -> FundingResult:
        """See ``Ledger.fund``."""

    @abc.abstractmethod
    async def set_budget_status(self, scope: str, status: str, *, unit: Unit | None = None) -> list[Balance]: ...
    @abc.abstractmethod
    async def delete_budget(self, scope: str, *, unit: Unit | None = None, force: bool = False) -> list[Balance]:
        """Delete a scope's budgets (one unit, or all): ``rules.delete_budget`` says when it is refused."""

    @abc.abstractmethod
    async def get_budget(self, scope: str, *, unit: Unit | None = None) -> Balance: ...
    @abc.abstractmethod
    async def list_budgets(self, *, tenant: str | None = None) -> list[Balance]: ...
    @abc.abstractmethod
    async def sweep(self, limit: int = 1000) -> int: ...
    @abc.abstractmethod
    async def update_policy(self, scope: str, edit: PolicyEdit) -> ScopePolicy: ...
    @abc.abstractmethod
    async def list_policies(self, *, tenant: str | None = None) -> list[ScopePolicy]: ...
    @abc.abstractmethod
    async def list_quota_counters(self, query: CounterQuery, *, tenant: str | None = None) -> CounterPage: ...
    @abc.abstractmethod
    async def reset_quota_counter(self, req: CounterResetRequest, *, tenant: str | None = None) -> CounterReset: ...

    async def put_named_policy(self, policy: NamedPolicy, *, create: bool) -> NamedPolicy:
        raise _no_named_policies(self)

    async def get_named_policy(self, policy_id: str) -> NamedPolicy:
        raise _no_named_policies(self)

    async def list_named_policies(self, *, tenant: str) -> list[NamedPolicy]:
        raise _no_named_policies(self)

    async def count_active(self) -> int | None:
        """See ``Ledger.count_active``."""
        return None

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


# ---- ledgers built on rules + a transactional store -----------------------------------------


class TransactionalLedger(Ledger):
    """Runs each operation of ``rules`` inside one store transaction (memory, sqlite).

    A CyclesError raised by a rule still commits the transaction: rules write nothing before they
    refuse, except an expiry they discovered, which must persist. Any other exception rolls back.
    """

    #: Expire overdue reservations at most this often as a side effect of ordinary writes.
    lazy_sweep_interval_ms = 1000
    #: How many records one lazy sweep may touch: it runs inside somebody's write transaction.
    lazy_sweep_limit = 100
    #: Retention purge paced by writes: every ``PURGE_EVERY`` writes forget up to this many records
    #: each past retention. A write adds at most two (a reservation row, an idempotency record), so
    #: the purge keeps pace with any sustained write rate and the store stays flat.
    purge_per_write = 4
    PURGE_EVERY = 16

    def __init__(
        self,
        clock: Callable[[], int] | None = None,
        include_balances: bool = False,
        retention_ms: int = rules.IDEMPOTENCY_RETENTION_MS,
        limits: TenantLimits = DEFAULT_LIMITS,
    ) -> None:
        self._clock = clock or _wall_clock_ms
        #: What one tenant may make the ledger keep (see ``cycles.ledger.limits``).
        self.limits = limits
        self._rate = RateLimiter(limits.max_reservations_per_second)
        self._next_sweep_ms = 0
        self._writes = 0
        #: How long finished reservations and idempotency records are kept (replays and audits read
        #: them); older ones are forgotten a little at a time by the lazy sweep.
        self.retention_ms = retention_ms
        #: Put Balance snapshots into reserve/commit/release/event responses (optional in the spec;
        #: a server wants them, an in-process guard does not pay for them).
        self.include_balances = include_balances

    @abc.abstractmethod
    def _transaction(self, *, write: bool) -> AbstractContextManager[Txn]: ...

    def _write(self, fn: Callable[..., T], *args: Any) -> T:
        with self._transaction(write=True) as txn:
            self._housekeeping(txn, fn)
            return fn(txn, *args)

    def _read(self, fn: Callable[..., T], *args: Any) -> T:
        """A read-only operation: no housekeeping, and a store may serve it outside the write lock."""
        with self._transaction(write=False) as txn:
            return fn(txn, *args)

    def _housekeeping(self, txn: Txn, fn: Callable[..., Any]) -> None:
        """At most once per ``lazy_sweep_interval_ms``, as a side effect of an ordinary write: expire
        overdue reservations and forget records past retention (skipped when the write is a sweep).
        Between those, every ``PURGE_EVERY``-th write also purges (see ``purge_per_write``)."""
        if fn is rules.sweep:
            return
        if txn.now_ms >= self._next_sweep_ms:
            self._next_sweep_ms = txn.now_ms + self.lazy_sweep_interval_ms
            rules.sweep(txn, self.lazy_sweep_limit, self.retention_ms)
            return
        self._writes += 1
        if self._writes >= self.PURGE_EVERY:  # work proportional to writes, amortised
            self._writes = 0
            txn.purge(txn.now_ms - self.retention_ms, self.PURGE_EVERY * self.purge_per_write)

    def reserve(self, req: ReservationCreateRequest, *, tenant: str | None = None) -> ReservationCreateResponse:
        if self._rate.rate > 0 and not req.dry_run:
            self._rate.take(tenant if tenant is not None else req.subject.tenant)
        return self._write(rules.reserve, req, tenant)

    def commit(self, reservation_id: str, req: CommitRequest, *, tenant: str | None = None) -> CommitResponse:
        return self._write(rules.commit, reservation_id, req, tenant)

    def release(self, reservation_id: str, req: ReleaseRequest, *, tenant: str | None = None) -> ReleaseResponse:
        return self._write(rules.release, reservation_id, req, tenant)

    def extend(
        self, reservation_id: str, req: ReservationExtendRequest, *, tenant: str | None = None
    ) -> ReservationExtendResponse:
        return self._write(rules.extend, reservation_id, req, tenant)

    def decide(self, req: DecisionRequest, *, tenant: str | None = None) -> DecisionResponse:
        return self._write(rules.decide, req, tenant)  # writes only its idempotency record

    def event(self, req: EventCreateRequest, *, tenant: str | None = None) -> EventCreateResponse:
        return self._write(rules.event, req, tenant)

    def balances(self, query: BalanceQuery, *, tenant: str | None = None) -> BalanceResponse:
        return self._read(rules.balances, query, tenant)

    def get_reservation(self, reservation_id: str, *, tenant: str | None = None) -> ReservationDetail:
        return self._write(rules.get_reservation, reservation_id, tenant)

    def list_reservations(self, query: ReservationQuery, *, tenant: str | None = None) -> ReservationListResponse:
        return self._read(rules.list_reservations, query, tenant)

    def set_budget(
        self,
        scope: str,
        amount: Amount,
        *,
        overdraft_limit: Amount | None = None,
        caps: Caps | None = None,
        period: PeriodSpec | None = None,
    ) -> Balance:
        return self._write(rules.set_budget, scope, amount, overdraft_limit, caps, period)

    def fund_budget(self, scope: str, amount: Amount) -> Balance:
        return self._write(rules.fund_budget, scope, amount)

    def set_overdraft_limit(self, scope: str, limit: Amount) -> Balance:
        return self._write(rules.set_overdraft_limit, scope, limit)

    def fund(
        self,
        scope: str,
        unit: Unit,
        operation: FundingOperation | str,
        amount: Amount,
        *,
        spent: Amount | None = None,
        idempotency_key: str | None = None,
    ) -> FundingResult:
        req = check_request(scope, unit, operation, amount, spent, idempotency_key)
        return self._write(rules.fund, req, idempotency_key)

    def set_budget_status(self, scope: str, status: str, *, unit: Unit | None = None) -> list[Balance]:
        return self._write(rules.set_budget_status, scope, unit, status)

    def delete_budget(self, scope: str, *, unit: Unit | None = None, force: bool = False) -> list[Balance]:
        return self._write(rules.delete_budget, scope, unit, force)

    # The operator plane's reads go through the write path: like Redis's scripts, they show a budget
    # after lazy expiry (the runtime plane's balances and listings are the reads that skip it).
    def get_budget(self, scope: str, *, unit: Unit | None = None) -> Balance:
        return self._write(rules.get_budget, scope, unit)

    def list_budgets(self, *, tenant: str | None = None) -> list[Balance]:
        return self._write(rules.list_budgets, tenant)

    def sweep(self, limit: int = 1000) -> int:
        return self._write(rules.sweep, limit, self.retention_ms)

    def update_policy(self, scope: str, edit: PolicyEdit) -> ScopePolicy:
        return self._write(rules.update_policy, scope, edit)

    def list_policies(self, *, tenant: str | None = None) -> list[ScopePolicy]:
        return self._write(rules.list_policies, tenant)

    def list_quota_counters(self, query: CounterQuery, *, tenant: str | None = None) -> CounterPage:
        return self._read(counters.list_counters, query, tenant)

    def reset_quota_counter(self, req: CounterResetRequest, *, tenant: str | None = None) -> CounterReset:
        return self._write(counters.reset_counter, req, tenant)

    def put_named_policy(self, policy: NamedPolicy, *, create: bool) -> NamedPolicy:
        return self._write(rules.put_named_policy, policy, create)

    def get_named_policy(self, policy_id: str) -> NamedPolicy:
        return self._read(rules.get_named_policy, policy_id)

    def list_named_policies(self, *, tenant: str) -> list[NamedPolicy]:
        return self._read(rules.list_named_policies, tenant)


def _no_named_policies(ledger: object) -> CyclesError:
    return InvalidRequest(
        f"{type(ledger).__name__} keeps no named policies: manage them on the server (/v1/admin/policies)"
    )


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class ThreadedAsyncLedger(AsyncLedger):
    """Async face of a synchronous ledger. Non-blocking ledgers (memory) are called inline:
    a microsecond operation costs less than a thread hop. Blocking ones run in a worker thread."""

    def __init__(self, ledger: Ledger) -> None:
        self.sync = ledger
        self.url = ledger.url

    async def _call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        if not self.sync.blocking:
            return fn(*args, **kwargs)
        return await asyncio.to_thread(functools.partial(fn, *args, **kwargs))

    async def reserve(self, req: ReservationCreateRequest, *, tenant: str | None = None) -> ReservationCreateResponse:
        return await self._call(self.sync.reserve, req, tenant=tenant)

    async def commit(self, reservation_id: str, req: CommitRequest, *, tenant: str | None = None) -> CommitResponse:
        return await self._call(self.sync.commit, reservation_id, req, tenant=tenant)

    async def release(self, reservation_id: str, req: ReleaseRequest, *, tenant: str | None = None) -> ReleaseResponse:
        return await self._call(self.sync.release, reservation_id, req, tenant=tenant)

    async def extend(
        self, reservation_id: str, req: ReservationExtendRequest, *, tenant: str | None = None
    ) -> ReservationExtendResponse:
        return await self._call(self.sync.extend, reservation_id, req, tenant=tenant)

    async def decide(self, req: DecisionRequest, *, tenant: str | None = None) -> DecisionResponse:
        return await self._call(self.sync.decide, req, tenant=tenant)

    async def event(self, req: EventCreateRequest, *, tenant: str | None = None) -> EventCreateResponse:
        return await self._call(self.sync.event, req, tenant=tenant)

    async def balances(self, query: BalanceQuery, *, tenant: str | None = None) -> BalanceResponse:
        return await self._call(self.sync.balances, query, tenant=tenant)

    async def get_reservation(self, reservation_id: str, *, tenant: str | None = None) -> ReservationDetail:
        return await self._call(self.sync.get_reservation, reservation_id, tenant=tenant)

    async def list_reservations(self, query: ReservationQuery, *, tenant: str | None = None) -> ReservationListResponse:
        return await self._call(self.sync.list_reservations, query, tenant=tenant)

    async def set_budget(
        self,
        scope: str,
        amount: Amount,
        *,
        overdraft_limit: Amount | None = None,
        caps: Caps | None = None,
        period: PeriodSpec | None = None,
    ) -> Balance:
        return await self._call(
            self.sync.set_budget,
            scope,
            amount,
            overdraft_limit=overdraft_limit,
            caps=caps,
            period=period,
        )

    async def fund_budget(self, scope: str, amount: Amount) -> Balance:
        return await self._call(self.sync.fund_budget, scope, amount)

    async def set_overdraft_limit(self, scope: str, limit: Amount) -> Balance:
        return await self._call(self.sync.set_overdraft_limit, scope, limit)

    async def fund(
        self,
        scope: str,
        unit: Unit,
        operation: FundingOperation | str,
        amount: Amount,
        *,
        spent: Amount | None = None,
        idempotency_key: str | None = None,
    ) -> FundingResult:
        return await self._call(
            self.sync.fund, scope, unit, operation, amount, spent=spent, idempotency_key=idempotency_key
        )

    async def set_budget_status(self, scope: str, status: str, *, unit: Unit | None = None) -> list[Balance]:
        return await self._call(self.sync.set_budget_status, scope, status, unit=unit)

    async def delete_budget(self, scope: str, *, unit: Unit | None = None, force: bool = False) -> list[Balance]:
        return await self._call(self.sync.delete_budget, scope, unit=unit, force=force)

    async def get_budget(self, scope: str, *, unit: Unit | None = None) -> Balance:
        return await self._call(self.sync.get_budget, scope, unit=unit)

    async def list_budgets(self, *, tenant: str | None = None) -> list[Balance]:
        return await self._call(self.sync.list_budgets, tenant=tenant)

    async def sweep(self, limit: int = 1000) -> int:
        return await self._call(self.sync.sweep, limit)

    async def update_policy(self, scope: str, edit: PolicyEdit) -> ScopePolicy:
        return await self._call(self.sync.update_policy, scope, edit)

    async def list_policies(self, *, tenant: str | None = None) -> list[ScopePolicy]:
        return await self._call(self.sync.list_policies, tenant=tenant)

    async def list_quota_counters(self, query: CounterQuery, *, tenant: str | None = None) -> CounterPage:
        return await self._call(self.sync.list_quota_counters, query, tenant=tenant)

    async def reset_quota_counter(self, req: CounterResetRequest, *, tenant: str | None = None) -> CounterReset:
        return await self._call(self.sync.reset_quota_counter, req, tenant=tenant)

    async def put_named_policy(self, policy: NamedPolicy, *, create: bool) -> NamedPolicy:
        return await self._call(self.sync.put_named_policy, policy, create=create)

    async def get_named_policy(self, policy_id: str) -> NamedPolicy:
        return await self._call(self.sync.get_named_policy, policy_id)

    async def list_named_policies(self, *, tenant: str) -> list[NamedPolicy]:
        return await self._call(self.sync.list_named_policies, tenant=tenant)

    async def count_active(self) -> int | None:
        return await self._call(self.sync.count_active)

    async def aclose(self) -> None:
        await self._call(self.sync.close)


# ---- opening a ledger by URL ----------------------------------------------------------------

# scheme -> "module:factory"; drivers are imported only when their scheme is used.
_SYNC_SCHEMES = {
    "memory": "cycles.ledger.memory:open_memory",
    "sqlite": "cycles.ledger.sqlite:open_sqlite",
    "redis": "cycles.ledger.redis:open_redis",
    "rediss": "cycles.ledger.redis:open_redis",
    "http": "cycles.ledger.http:open_http",
    "https": "cycles.ledger.http:open_http",
}
_ASYNC_SCHEMES = {
    "redis": "cycles.ledger.redis:open_async_redis",
    "rediss": "cycles.ledger.redis:open_async_redis",
    "http": "cycles.ledger.http:open_async_http",
    "https": "cycles.ledger.http:open_async_http",
}


def default_ledger_url() -> str:
    """``CYCLES_URL`` if set, else an SQLite file in the per-user data directory.

    The directory is ``$CYCLES_HOME``, else ``$XDG_DATA_HOME/cycles``, else ``~/.local/share/cycles``.
    """
    url = os.environ.get("CYCLES_URL")
    if url:
        return url
    home = os.environ.get("CYCLES_HOME")
    if home:
        base = Path(home)
    else:
        xdg = os.environ.get("XDG_DATA_HOME")
        base = (Path(xdg) if xdg else Path.home() / ".local" / "share") / "cycles"
    return f"sqlite:///{base / 'ledger.db'}"


def _factory(table: dict[str, str], url: str) -> Callable[..., Any] | None:
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    target = table.get(scheme)
    if target is None:
        return None
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        extra = {"redis": "redis", "rediss": "redis", "http": "http", "https": "http"}.get(scheme, "")
        raise ImportError(
            f"the {scheme}:// ledger needs an optional dependency: pip install 'cycles-core[{extra}]' ({exc})"
        ) from exc
    factory: Callable[..., Any] = getattr(module, attr)
    return factory


def open_ledger(url: str | None = None, **options: Any) -> Ledger:
    url = url or default_ledger_url()
    factory = _factory(_SYNC_SCHEMES, url)
    if factory is None:
        raise InvalidRequest(
            f"unsupported ledger URL {url!r}: use memory://, sqlite:///path, redis://host:port/db or http(s)://host"
        )
    ledger: Ledger = factory(url, **options)
    return ledger


def open_async_ledger(url: str | None = None, **options: Any) -> AsyncLedger:
    url = url or default_ledger_url()
    factory = _factory(_ASYNC_SCHEMES, url)
    if factory is not None:
        ledger: AsyncLedger = factory(url, **options)
        return ledger
    return ThreadedAsyncLedger(open_ledger(url, **options))


def iter_pages(fetch: Callable[[str | None], tuple[list[T], str | None]]) -> Iterator[T]:
    """Follow ``next_cursor`` until the last page."""
    cursor: str | None = None
    while True:
        items, cursor = fetch(cursor)
        yield from items
        if not cursor:
            return


__all__ += ["CyclesError", "iter_pages"]
