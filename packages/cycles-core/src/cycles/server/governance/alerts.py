"""Runtime events and alerts, observed on the server's ledger: reservation denials, threshold
crossings, exhaustion, burn-rate and denial-rate anomalies.

``ObservedLedger`` wraps the server's ledger. After every reserve, commit and event it looks at
the balances the ledger returned (the server asks for them):

* ``budget.threshold_crossed`` -- utilisation ``(spent + reserved) / allocated`` rose to or past a
  threshold: the spec's defaults 0.80, 0.95, 1.0, plus any ``thresholds.budget_utilization`` of the
  tenant's webhook subscriptions. Once per crossing: the highest threshold announced for a budget is
  kept in the record store and moved with compare-and-set, so of several servers seeing the same
  crossing exactly one announces it; when utilisation falls back below a threshold (funding, a
  release, a new period) the mark falls with it and the next rise announces again.
* ``budget.exhausted`` -- remaining reached zero or less (once, until it is positive again).
* ``budget.debt_incurred`` -- a commit left more debt than before (overdraft); and
  ``budget.over_limit_entered`` / ``budget.over_limit_exited`` when ``is_over_limit`` flips.
* ``reservation.denied`` -- a reservation refused by a budget (reason, scope, amount, subject).
* ``reservation.denial_rate_spike`` -- over ``rate_window_seconds`` (default 300 s) more than
  ``denial_rate_threshold`` (default 10%) of a tenant's reservations were denied (at least 10
  samples); once per window.
* ``budget.burn_rate_anomaly`` -- a budget's spend over the last ``burn_rate_window_seconds``
  (default 300 s) ran at ``burn_rate_multiplier`` (default 3x) its average rate over the previous
  hour; once per window.

Rates are measured per deployment, not per server process: the decision counts and the spend
samples live in the record store (``rates.SharedRate``, ``RecordStore.tally``), where every server
adds to and reads the same numbers, so with N servers a spike is seen at all of its samples, not
1/N of them; the once-per-window marks are shared too, so it is announced once per deployment.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from cycles.errors import Denied
from cycles.ledger.base import AsyncLedger, BalanceQuery, ReservationQuery
from cycles.ledger.counters import CounterPage, CounterQuery, CounterReset, CounterResetRequest
from cycles.ledger.funding import FundingOperation, FundingResult
from cycles.ledger.periods import PeriodSpec
from cycles.ledger.policies import NamedPolicy
from cycles.ledger.quotas import PolicyEdit, ScopePolicy, threshold_crossings
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
from cycles.scopes import derive_scopes, scope_tenant
from cycles.server.governance.rates import BUCKETS, SharedRate

if TYPE_CHECKING:
    from starlette.requests import Request

    from cycles.server.auth import Principal
    from cycles.server.governance.context import Governance

__all__ = ["DEFAULT_THRESHOLDS", "ObservedLedger", "current_request"]

DEFAULT_THRESHOLDS = (0.8, 0.95, 1.0)
_THRESHOLDS_TTL_S = 5.0

#: (request, principal) of the runtime call being served (set by the runtime guard).
current_request: contextvars.ContextVar[tuple[Request, Principal] | None] = contextvars.ContextVar(
    "cycles_current_request", default=None
)


def utilization(b: Balance) -> float | None:
    allocated = b.allocated.amount if b.allocated else 0
    if allocated <= 0:
        return None
    used = (b.spent.amount if b.spent else 0) + (b.reserved.amount if b.reserved else 0)
    return used / allocated


class Alerts:
    """Turns ledger results into events (see the module docstring)."""

    def __init__(self, gov: Governance) -> None:
        self.gov = gov
        #: seconds since the epoch (tests move it)
        self.clock: Callable[[], float] = time.time
        self.denials = SharedRate(gov, "denial_rate", lambda: self.clock())
        self._sampled: dict[str, int] = {}  # budget -> the last bucket this process sampled
        self._levels: dict[str, str] = {}  # local copy of the shared marks: skips CAS when nothing moved
        self._thresholds: dict[str, tuple[float, tuple[float, ...], dict[str, Any]]] = {}

    async def settings(self, tenant: str) -> tuple[tuple[float, ...], dict[str, Any]]:
        """Thresholds for a tenant's budgets: the defaults plus its webhooks' own; and the rate settings."""
        now = time.monotonic()
        hit = self._thresholds.get(tenant)
        if hit is not None and hit[0] > now:
            return hit[1], hit[2]
        levels = set(DEFAULT_THRESHOLDS)
        rates: dict[str, Any] = {}
        for hook in await self.gov.run(self.gov.records.doc_list, "webhook", tenant=tenant):
            cfg = hook.get("thresholds") or {}
            levels.update(float(x) for x in cfg.get("budget_utilization") or ())
            for k, v in cfg.items():
                if k != "budget_utilization":
                    rates.setdefault(k, v)
        out = tuple(sorted(x for x in levels if x > 0))
        self._thresholds[tenant] = (now + _THRESHOLDS_TTL_S, out, rates)
        return out, rates

    def forget(self, tenant: str) -> None:
        self._thresholds.pop(tenant, None)

    async def balances(self, balances: list[Balance] | None) -> None:
        for b in balances or ():
            tenant = scope_tenant(b.scope)
            if tenant is None:
                continue
            thresholds, rates = await self.settings(tenant)
            await self._crossing(b, tenant, thresholds)
            await self._burn_rate(b, tenant, rates)

    async def _crossing(self, b: Balance, tenant: str, thresholds: tuple[float, ...]) -> None:
        util = utilization(b)
        if util is None:
            return
        unit = b.allocated.unit if b.allocated else b.remaining.unit
        key = f"alert:{b.scope}#{unit.value}"
        level = max((t for t in thresholds if t <= util + 1e-12), default=0.0)
        exhausted = b.remaining.amount <= 0
        over = bool(b.is_over_limit)
        debt = b.debt.amount if b.debt else 0
        want = f"{level:g}|{int(exhausted)}|{int(over)}|{debt}"
        if self._levels.get(key) == want:
            return
        current = await self.gov.run(self.gov.records.read, key)
        while current != want:
            if await self.gov.run(self.gov.records.cas, key, current, want):
                break
            current = await self.gov.run(self.gov.records.read, key)
        else:
            self._levels[key] = want
            return  # another server moved it already
        self._levels[key] = want
        parts = [*(current or "0|0|0|0").split("|"), "0", "0"]
        old_level, old_exhausted, old_over, old_debt = float(parts[0]), parts[1] == "1", parts[2] == "1", int(parts[3])
        crossed = [t for t in thresholds if old_level < t <= level]
        for t in crossed:
            await self._emit(
                "budget.threshold_crossed",
                tenant,
                b.scope,
                {**_numbers(b, unit), "threshold": t, "utilization": round(util, 6), "direction": "rising"},
            )
        if exhausted and not old_exhausted:
            await self._emit(
                "budget.exhausted",
                tenant,
                b.scope,
                {**_numbers(b, unit), "threshold": 1.0, "utilization": round(util, 6)},
            )
        limit = b.overdraft_limit.amount if b.overdraft_limit else 0
        if debt > old_debt:
            incurred = {"scope": b.scope, "unit": unit.value, "debt_incurred": debt - old_debt, "total_debt": debt}
            await self._emit("budget.debt_incurred", tenant, b.scope, {**incurred, "overdraft_limit": limit})
        if over != old_over:
            data: dict[str, Any] = {"scope": b.scope, "unit": unit.value, "debt": debt, "overdraft_limit": limit}
            data["is_over_limit"] = over
            if limit > 0:
                data["debt_utilization"] = round(debt / limit, 6)
            event = "budget.over_limit_entered" if over else "budget.over_limit_exited"
            await self._emit(event, tenant, b.scope, data)

    async def _burn_rate(self, b: Balance, tenant: str, rates: dict[str, Any]) -> None:
        if b.spent is None:
            return
        window = float(rates.get("burn_rate_window_seconds", 300))
        multiplier = float(rates.get("burn_rate_multiplier", 3.0))
        now = self.clock()
        unit = b.spent.unit
        key = f"{b.scope}#{unit.value}"
        step = window / BUCKETS
        bucket = int(now // step)
        if self._sampled.get(key) == bucket:  # this process samples a budget once per tenth of a window
            return
        if len(self._sampled) > 100_000:
            self._sampled.clear()
        self._sampled[key] = bucket
        # the spend at the first observation in each bucket, by any server, for the last hour
        # (12 windows) and the current bucket
        found = await self.gov.run(
            self.gov.records.tally,
            f"burn:{window:g}:{key}",
            bucket,
            {"spent": b.spent.amount},
            keep=12 * BUCKETS + 1,
            ttl_ms=int(13 * window * 1000),
            once=True,
        )
        samples = sorted((k * step, v["spent"]) for k, v in found.items() if "spent" in v)
        # the last sample at least a window old splits "recent" from the baseline before it
        split = next((s for s in reversed(samples) if s[0] <= now - window), None)
        first_t, first_spent = samples[0]
        if split is None or split[0] - first_t < window:  # need a window of history for a baseline
            return
        split_t, split_spent = split
        baseline = (split_spent - first_spent) / ((split_t - first_t) / 60)
        current = (b.spent.amount - split_spent) / max((now - split_t) / 60, 1e-9)
        if baseline <= 0 or current < multiplier * baseline:
            return
        if not await self.gov.run(
            self.gov.records.cas, f"burn:{key}:{int(now // window)}", None, "1", ttl_ms=int(2 * window * 1000)
        ):
            return
        remaining = b.remaining.amount
        data = {
            "scope": b.scope,
            "unit": unit.value,
            "current_rate": round(current, 6),
            "baseline_rate": round(baseline, 6),
            "multiplier": round(current / baseline, 3),
            "window_seconds": int(window),
        }
        if current > 0 and remaining > 0:
            data["projected_exhaustion_minutes"] = round(remaining / current, 3)
        await self._emit("budget.burn_rate_anomaly", tenant, b.scope, data)

    async def decision(self, tenant: str | None, denied: bool) -> None:
        if tenant is None:
            return
        _, rates = await self.settings(tenant)
        window = float(rates.get("rate_window_seconds", 300))
        threshold = float(rates.get("denial_rate_threshold", 0.1))
        data = await self.denials.spike(tenant, denied, window, threshold)
        if data is None:
            return
        await self._emit("reservation.denial_rate_spike", tenant, f"tenant:{tenant}", data)

    async def denied(self, req: ReservationCreateRequest, tenant: str | None, reason: str, scope: str | None) -> None:
        scopes = derive_scopes(req.subject)
        owner = tenant or (scope_tenant(scopes[0]) if scopes else None) or "__system__"
        where = scope or (scopes[-1] if scopes else None)
        data: dict[str, Any] = {
            "scope": where,
            "unit": req.estimate.unit.value,
            "reason_code": reason,
            "requested_amount": req.estimate.amount,
            "subject": req.subject.model_dump(exclude_none=True, mode="json"),
            "action": req.action.model_dump(exclude_none=True, mode="json"),
        }
        await self._emit("reservation.denied", owner, where, {k: v for k, v in data.items() if v is not None})

    async def quota_thresholds(self, crossings: list[dict[str, Any]]) -> None:
        """quota.threshold_approaching, one per counter that reached its threshold (the ledger
        reports each once per window instance: ``quotas.note_threshold``)."""
        from cycles.ledger.counters import correlation_id

        ctx = current_request.get()
        request, principal = ctx if ctx is not None else (None, None)
        for data in crossings:
            tenant = scope_tenant(data["scope"]) or "__system__"
            await self.gov.emit(
                "quota.threshold_approaching",
                request,
                principal,
                tenant_id=tenant,
                scope=data["scope"],
                data=data,
                correlation_id=correlation_id(tenant, data),
            )

    async def _emit(self, event_type: str, tenant: str, scope: str | None, data: dict[str, Any]) -> None:
        ctx = current_request.get()
        request, principal = ctx if ctx is not None else (None, None)
        await self.gov.emit(event_type, request, principal, tenant_id=tenant, scope=scope, data=data)


def _numbers(b: Balance, unit: Unit) -> dict[str, Any]:
    return {
        "scope": b.scope,
        "unit": unit.value,
        "allocated": b.allocated.amount if b.allocated else 0,
        "remaining": b.remaining.amount,
        "spent": b.spent.amount if b.spent else 0,
        "reserved": b.reserved.amount if b.reserved else 0,
    }


class ObservedLedger(AsyncLedger):
    """The server's ledger with ``Alerts`` watching its results. Everything else passes through."""

    def __init__(self, inner: AsyncLedger, alerts: Alerts) -> None:
        self.inner = inner
        self.alerts = alerts
        self.url = inner.url

    def __getattr__(self, name: str) -> Any:  # backend extras (sync, prefix, ...)
        return getattr(self.inner, name)

    async def _safely(self, coro: Any) -> None:
        try:
            await coro
        except Exception:
            import logging

            logging.getLogger("cycles.server").warning("could not record an event", exc_info=True)

    async def reserve(self, req: ReservationCreateRequest, *, tenant: str | None = None) -> ReservationCreateResponse:
        crossings: list[dict[str, Any]] = []
        token = threshold_crossings.set(crossings)  # the ledger notes quota thresholds reached here
        try:
            res = await self.inner.reserve(req, tenant=tenant)
        except Denied as exc:
            if not req.dry_run:
                await self._safely(self.alerts.denied(req, tenant, exc.code, exc.scope))
                await self._safely(self.alerts.decision(tenant or req.subject.tenant, True))
            raise
        finally:
            threshold_crossings.reset(token)
        if crossings:
            await self._safely(self.alerts.quota_thresholds(crossings))
        if not req.dry_run:
            denied = res.decision.value == "DENY"
            if denied:
                await self._safely(self.alerts.denied(req, tenant, res.reason_code or "BUDGET_EXCEEDED", None))
            await self._safely(self.alerts.decision(tenant or req.subject.tenant, denied))
            await self._safely(self.alerts.balances(res.balances))
        return res

    async def commit(self, reservation_id: str, req: CommitRequest, *, tenant: str | None = None) -> CommitResponse:
        res = await self.inner.commit(reservation_id, req, tenant=tenant)
        await self._safely(self.alerts.balances(res.balances))
        return res

    async def release(self, reservation_id: str, req: ReleaseRequest, *, tenant: str | None = None) -> ReleaseResponse:
        res = await self.inner.release(reservation_id, req, tenant=tenant)
        await self._safely(self.alerts.balances(res.balances))
        return res

    async def event(self, req: EventCreateRequest, *, tenant: str | None = None) -> EventCreateResponse:
        res = await self.inner.event(req, tenant=tenant)
        await self._safely(self.alerts.balances(res.balances))
        return res

    async def extend(
        self, reservation_id: str, req: ReservationExtendRequest, *, tenant: str | None = None
    ) -> ReservationExtendResponse:
        return await self.inner.extend(reservation_id, req, tenant=tenant)

    async def decide(self, req: DecisionRequest, *, tenant: str | None = None) -> DecisionResponse:
        return await self.inner.decide(req, tenant=tenant)

    async def balances(self, query: BalanceQuery, *, tenant: str | None = None) -> BalanceResponse:
        return await self.inner.balances(query, tenant=tenant)

    async def get_reservation(self, reservation_id: str, *, tenant: str | None = None) -> ReservationDetail:
        return await self.inner.get_reservation(reservation_id, tenant=tenant)

    async def list_reservations(self, query: ReservationQuery, *, tenant: str | None = None) -> ReservationListResponse:
        return await self.inner.list_reservations(query, tenant=tenant)

    async def set_budget(
        self,
        scope: str,
        amount: Amount,
        *,
        overdraft_limit: Amount | None = None,
        caps: Caps | None = None,
        period: PeriodSpec | None = None,
    ) -> Balance:
        b = await self.inner.set_budget(scope, amount, overdraft_limit=overdraft_limit, caps=caps, period=period)
        await self._safely(self.alerts.balances([b]))  # a smaller allocation may cross a threshold
        return b

    async def set_overdraft_limit(self, scope: str, limit: Amount) -> Balance:
        b = await self.inner.set_overdraft_limit(scope, limit)
        await self._safely(self.alerts.balances([b]))  # a limit below the debt enters over-limit
        return b

    async def fund_budget(self, scope: str, amount: Amount) -> Balance:
        b = await self.inner.fund_budget(scope, amount)
        await self._safely(self.alerts.balances([b]))  # funding lowers utilisation: the marks fall
        return b

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
        result = await self.inner.fund(scope, unit, operation, amount, spent=spent, idempotency_key=idempotency_key)
        # Funding moves the marks with utilisation: lower (CREDIT, RESET up, RESET_SPENT) re-arms the
        # thresholds for the next real rise; higher (DEBIT, RESET down) is a crossing like any other.
        # A replay changed nothing, so it is not looked at again.
        if not result.replayed:
            await self._safely(self.alerts.balances([result.after]))
        return result

    async def set_budget_status(self, scope: str, status: str, *, unit: Unit | None = None) -> list[Balance]:
        return await self.inner.set_budget_status(scope, status, unit=unit)

    async def delete_budget(self, scope: str, *, unit: Unit | None = None, force: bool = False) -> list[Balance]:
        return await self.inner.delete_budget(scope, unit=unit, force=force)

    async def get_budget(self, scope: str, *, unit: Unit | None = None) -> Balance:
        return await self.inner.get_budget(scope, unit=unit)

    async def list_budgets(self, *, tenant: str | None = None) -> list[Balance]:
        return await self.inner.list_budgets(tenant=tenant)

    async def sweep(self, limit: int = 1000) -> int:
        return await self.inner.sweep(limit)

    async def update_policy(self, scope: str, edit: PolicyEdit) -> ScopePolicy:
        return await self.inner.update_policy(scope, edit)

    async def count_active(self) -> int | None:
        return await self.inner.count_active()

    async def list_policies(self, *, tenant: str | None = None) -> list[ScopePolicy]:
        return await self.inner.list_policies(tenant=tenant)

    async def list_quota_counters(self, query: CounterQuery, *, tenant: str | None = None) -> CounterPage:
        return await self.inner.list_quota_counters(query, tenant=tenant)

    async def reset_quota_counter(self, req: CounterResetRequest, *, tenant: str | None = None) -> CounterReset:
        return await self.inner.reset_quota_counter(req, tenant=tenant)

    async def put_named_policy(self, policy: NamedPolicy, *, create: bool) -> NamedPolicy:
        return await self.inner.put_named_policy(policy, create=create)

    async def get_named_policy(self, policy_id: str) -> NamedPolicy:
        return await self.inner.get_named_policy(policy_id)

    async def list_named_policies(self, *, tenant: str) -> list[NamedPolicy]:
        return await self.inner.list_named_policies(tenant=tenant)

    async def aclose(self) -> None:
        await self.inner.aclose()
