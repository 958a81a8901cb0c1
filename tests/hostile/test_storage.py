"""Why 3: one tenant cannot make the ledger keep without bound -- zero-cost reservations included --
and the retention purge keeps pace with the write rate."""

from __future__ import annotations

import sqlite3
from typing import Any

import pytest
import redis

from cycles.errors import InvalidRequest, LimitExceeded
from cycles.ledger.base import Ledger, open_ledger
from cycles.ledger.limits import RateLimiter, TenantLimits
from cycles.models import Amount, Unit

from .conftest import ALICE, MALLORY, UrlFactory, fund, open_http
from .requests import commit, release, reserve, reserve_body


def test_zero_cost_reservations_count_against_the_active_limit(make_url: UrlFactory) -> None:
    ledger = open_ledger(make_url(max_active_reservations=5))
    try:
        fund(ledger, ALICE)
        fund(ledger, MALLORY, amount=1)
        ledger.commit(ledger.reserve(reserve(MALLORY, 1)).reservation_id or "", commit(1))  # spent in full
        ids = [ledger.reserve(reserve(MALLORY, 0)).reservation_id for _ in range(5)]  # granted: cost nothing
        ledger.reserve(reserve(MALLORY, 0, dry_run=True))  # a dry run holds nothing and counts nothing
        with pytest.raises(LimitExceeded) as refused:
            ledger.reserve(reserve(MALLORY, 0))
        assert refused.value.retry_after_s and refused.value.details["limit"] == "max_active_reservations"
        assert ledger.reserve(reserve(ALICE, 10)).reservation_id  # the bystander is not limited
        ledger.release(ids[0] or "", release())  # a slot frees as soon as one finishes
        assert ledger.reserve(reserve(MALLORY, 0)).reservation_id
        with pytest.raises(LimitExceeded):
            ledger.reserve(reserve(MALLORY, 0))
    finally:
        ledger.close()


async def test_the_active_limit_is_429_with_retry_after_over_http(make_url: UrlFactory) -> None:
    import httpx

    app, keys = await open_http(make_url(max_active_reservations=3))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        for _ in range(3):
            r = await c.post(
                "/v1/reservations", json=reserve_body(MALLORY, 0), headers={"X-Cycles-API-Key": keys[MALLORY]}
            )
            assert r.status_code == 200, r.text
        r = await c.post("/v1/reservations", json=reserve_body(MALLORY, 0), headers={"X-Cycles-API-Key": keys[MALLORY]})
        assert r.status_code == 429 and r.json()["error"] == "LIMIT_EXCEEDED"
        assert int(r.headers["retry-after"]) >= 1 and int(r.headers["x-ratelimit-reset"]) > 0
        r = await c.post("/v1/reservations", json=reserve_body(ALICE, 0), headers={"X-Cycles-API-Key": keys[ALICE]})
        assert r.status_code == 200
    await app.server.aclose()


def test_metadata_is_bounded(make_url: UrlFactory) -> None:
    ledger = open_ledger(make_url(max_metadata_bytes=1024))
    try:
        fund(ledger, MALLORY)
        with pytest.raises(InvalidRequest) as refused:
            ledger.reserve(reserve(MALLORY, 0, metadata={"blob": "x" * 2000}))
        assert refused.value.details["limit"] == "max_metadata_bytes"
        rid = ledger.reserve(reserve(MALLORY, 10, metadata={"small": "x" * 100})).reservation_id
        assert rid is not None
        with pytest.raises(InvalidRequest):
            ledger.commit(rid, commit(5).model_copy(update={"metadata": {"blob": "y" * 2000}}))
        refused = ledger.get_budget(f"tenant:{MALLORY}")  # the refused commit wrote nothing
        assert refused.spent is not None and refused.spent.amount == 0
        assert refused.reserved is not None and refused.reserved.amount == 10
        ledger.commit(rid, commit(5))
        done = ledger.get_budget(f"tenant:{MALLORY}")
        assert done.spent is not None and done.spent.amount == 5
    finally:
        ledger.close()


def test_the_default_metadata_bound_is_enforced(ledger: Ledger) -> None:
    fund(ledger, MALLORY)
    with pytest.raises(InvalidRequest):
        ledger.reserve(reserve(MALLORY, 0, metadata={"blob": "x" * (TenantLimits().max_metadata_bytes + 1)}))


def test_an_optional_reservation_rate(make_url: UrlFactory) -> None:
    ledger = open_ledger(make_url(max_reservations_per_second="0.01"))  # one, then one per 100 s
    try:
        fund(ledger, MALLORY, ALICE)
        ledger.reserve(reserve(MALLORY, 0))
        with pytest.raises(LimitExceeded) as refused:
            ledger.reserve(reserve(MALLORY, 0))
        assert refused.value.retry_after_s and refused.value.retry_after_s > 1
        ledger.reserve(reserve(ALICE, 0))  # per tenant
    finally:
        ledger.close()


def test_the_rate_limiter_refills() -> None:
    now = [0.0]
    limiter = RateLimiter(2.0, clock=lambda: now[0])
    limiter.take("t")
    limiter.take("t")
    with pytest.raises(LimitExceeded):
        limiter.take("t")
    now[0] += 0.5
    limiter.take("t")


def _stored(ledger: Ledger, backend: str) -> int:
    """Rows the ledger keeps for MALLORY: reservations (SQLite: and idempotency records)."""
    if backend == "sqlite":
        db = sqlite3.connect(ledger.path)  # type: ignore[attr-defined]
        n = db.execute("SELECT (SELECT count(*) FROM reservations) + (SELECT count(*) FROM idempotency)").fetchone()
        db.close()
        return int(n[0])
    client: redis.Redis[Any] = ledger._client  # type: ignore[attr-defined]
    base = ledger._base(MALLORY)  # type: ignore[attr-defined]
    return int(client.zcard(base + "idx")) + int(client.zcard(base + "ix:" + MALLORY))


def test_retention_purge_keeps_pace_with_writes(make_url: UrlFactory, backend: str) -> None:
    """A soak in simulated time: reserve+release pairs far faster than the once-a-second lazy sweep
    could purge alone. The store must stay flat at what one retention window holds."""
    now = [1_700_000_000_000]
    retention = 1000 if backend == "sqlite" else 24 * 3600 * 1000  # Redis keeps rules' 24 h
    step = retention // 1000  # 1,000 pairs per retention window: 5x what one lazy sweep a second purges
    url = make_url(retention_ms=retention) if backend == "sqlite" else make_url()
    ledger = open_ledger(url, clock=lambda: now[0])
    try:
        fund(ledger, MALLORY)
        sizes = []
        for i in range(4000):
            rid = ledger.reserve(reserve(MALLORY, 0)).reservation_id
            ledger.release(rid or "", release())
            now[0] += step
            if i % 1000 == 999:
                sizes.append(_stored(ledger, backend))
        window = 2 * 1000 * (3 if backend == "sqlite" else 2)  # what two windows hold, per kind of row
        assert max(sizes) <= window, sizes
        assert sizes[-1] <= sizes[1] * 1.5, f"the store grows: {sizes}"
    finally:
        ledger.close()


def test_budget_debt_decision_is_documented(ledger: Ledger) -> None:
    """With debt and an overdraft limit, a reserve beyond what remains is BUDGET_EXCEEDED: debt
    within an overdraft limit is allowed by policy (spec: DEBT_OUTSTANDING is "debt > 0 and
    overdraft_limit == 0"). Without an overdraft limit, any debt is DEBT_OUTSTANDING."""
    from cycles.errors import BudgetExceeded, DebtOutstanding
    from cycles.models import CommitOveragePolicy

    usd = Unit.USD_MICROCENTS
    for tenant, overdraft_after, expected in ((MALLORY, 500, BudgetExceeded), (ALICE, 0, DebtOutstanding)):
        scope = f"tenant:{tenant}"
        ledger.set_budget(scope, Amount(unit=usd, amount=1000), overdraft_limit=Amount(unit=usd, amount=500))
        rid = ledger.reserve(reserve(tenant, 1000, overage_policy=CommitOveragePolicy.ALLOW_WITH_OVERDRAFT))
        ledger.commit(rid.reservation_id or "", commit(1200))  # 200 of debt, within the limit
        # the operator keeps the overdraft limit (MALLORY) or withdraws it (ALICE)
        ledger.set_budget(
            scope, Amount(unit=usd, amount=1000), overdraft_limit=Amount(unit=usd, amount=overdraft_after)
        )
        balance = ledger.get_budget(scope, unit=usd)
        assert balance.debt is not None and balance.debt.amount == 200 and not balance.is_over_limit
        with pytest.raises(expected):
            ledger.reserve(reserve(tenant, 10))


def test_memory_keeps_the_same_limits_and_counts() -> None:
    """memory:// (one process) has the same limits, from the same URL options."""
    ledger = open_ledger("memory://?max_active_reservations=2&max_metadata_bytes=64")
    fund(ledger, MALLORY, ALICE)
    first = ledger.reserve(reserve(MALLORY, 0)).reservation_id
    ledger.reserve(reserve(MALLORY, 0))
    with pytest.raises(LimitExceeded):
        ledger.reserve(reserve(MALLORY, 0))
    ledger.reserve(reserve(ALICE, 0))
    assert ledger.count_active() == 3
    ledger.release(first or "", release())
    assert ledger.count_active() == 2
    ledger.reserve(reserve(MALLORY, 0))
    with pytest.raises(InvalidRequest):
        ledger.reserve(reserve(ALICE, 0, metadata={"blob": "x" * 100}))
