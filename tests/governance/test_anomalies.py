"""Denial-rate spikes and burn-rate anomalies, with the alert clock moved by the test."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cycles.ledger.records import EVENTS, MemoryRecordStore, RecordStore, RedisRecordStore, SqliteRecordStore
from cycles.models import Amount, Balance, SignedAmount, Unit
from cycles.server import create_app
from cycles.server.governance.context import Governance
from cycles.server.testing import ServerThread

from .conftest import ADMIN_KEY


def _balance(spent: int, allocated: int = 10**9) -> Balance:
    usd = Unit.USD_MICROCENTS
    return Balance(
        scope="tenant:acme/workflow:w",
        scope_path="tenant:acme/workflow:w",
        remaining=SignedAmount(unit=usd, amount=allocated - spent),
        spent=Amount(unit=usd, amount=spent),
        reserved=Amount(unit=usd, amount=0),
        debt=Amount(unit=usd, amount=0),
        allocated=Amount(unit=usd, amount=allocated),
    )


def _types(gov: Governance) -> list[str]:
    return [e["event_type"] for e in gov.records.iter(EVENTS, ascending=True)]


async def test_denial_rate_spike_once_per_window() -> None:
    gov = Governance(MemoryRecordStore())
    now = [1_000_000.0]
    gov.alerts.clock = lambda: now[0]
    for _ in range(20):  # 20 allowed
        await gov.alerts.decision("acme", False)
        now[0] += 1
    for _ in range(2):  # 2 of 22 denied: 9%, under the 10% default
        await gov.alerts.decision("acme", True)
    assert "reservation.denial_rate_spike" not in _types(gov)
    await gov.alerts.decision("acme", True)  # 3 of 23: 13%
    await gov.alerts.decision("acme", True)
    spikes = [e for e in gov.records.iter(EVENTS) if e["event_type"] == "reservation.denial_rate_spike"]
    assert len(spikes) == 1 and spikes[0]["tenant_id"] == "acme"
    assert spikes[0]["data"]["metric"] == "denial_rate" and spikes[0]["data"]["sample_count"] == 23
    now[0] += 600  # a later window: the old decisions have left it
    for _ in range(10):
        await gov.alerts.decision("acme", False)
    assert _types(gov).count("reservation.denial_rate_spike") == 1


async def test_burn_rate_anomaly_against_the_previous_hour() -> None:
    gov = Governance(MemoryRecordStore())
    now = [2_000_000.0]
    gov.alerts.clock = lambda: now[0]
    spent = 0
    for _ in range(60):  # an hour at 100 per minute
        await gov.alerts.balances([_balance(spent)])
        spent += 100
        now[0] += 60
    assert "budget.burn_rate_anomaly" not in _types(gov)
    for _ in range(5):  # then 5 minutes at 250 per minute: 2.5x, under the 3x default
        spent += 250
        now[0] += 60
        await gov.alerts.balances([_balance(spent)])
    assert "budget.burn_rate_anomaly" not in _types(gov)
    for _ in range(5):  # then 1000 per minute
        spent += 1000
        now[0] += 60
        await gov.alerts.balances([_balance(spent)])
    events = [e for e in gov.records.iter(EVENTS) if e["event_type"] == "budget.burn_rate_anomaly"]
    assert 1 <= len(events) <= 2  # once per 5-minute window, and these 5 minutes span at most two
    data = events[0]["data"]
    assert data["multiplier"] >= 3.0 and data["window_seconds"] == 300 and data["baseline_rate"] > 0


@pytest.fixture(params=["sqlite", "redis"])
def two_servers(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Governance, Governance]]:
    """The governance state of two servers over one ledger: two stores on one SQLite file, or two
    clients of one Redis under one prefix (what two processes have)."""
    if request.param == "sqlite":
        stores: list[RecordStore] = [SqliteRecordStore(str(tmp_path / "shared.db")) for _ in range(2)]
    else:
        import redis

        from tests.redis.backend import REDIS_URL, drop_prefix, new_prefix, require_redis

        require_redis()
        prefix = new_prefix()
        request.addfinalizer(lambda: drop_prefix(prefix))
        stores = [RedisRecordStore(redis.Redis.from_url(REDIS_URL), prefix=prefix) for _ in range(2)]
    yield Governance(stores[0]), Governance(stores[1])
    for store in stores:
        store.close()


def _drive(govs: tuple[Governance, ...], now: list[float]) -> None:
    for gov in govs:
        gov.alerts.clock = lambda: now[0]


async def test_denial_spike_seen_across_servers_announced_once(two_servers: tuple[Governance, Governance]) -> None:
    a, b = two_servers
    now = [3_000_000.0]
    _drive(two_servers, now)
    for i in range(12):  # 12 allowed, half on each server
        await two_servers[i % 2].alerts.decision("acme", False)
        now[0] += 1
    for gov in two_servers:  # what the servers' one-second flush does
        await gov.alerts.denials.flush()
    # one denial on each: 2 of 14 (14%) for the deployment; each server alone saw 1 of 7, under the
    # 10-sample minimum: measured per process this spike would never be announced
    await a.alerts.decision("acme", True)
    assert _types(a) == []
    await b.alerts.decision("acme", True)
    spikes = [e for e in a.records.iter(EVENTS) if e["event_type"] == "reservation.denial_rate_spike"]
    assert len(spikes) == 1 and spikes[0]["data"]["sample_count"] == 14
    for i in range(6):  # more denials on both, same window: announced once
        await two_servers[i % 2].alerts.decision("acme", True)
    assert _types(b).count("reservation.denial_rate_spike") == 1
    now[0] += 600  # a later window, a new spike: once again
    for i in range(12):
        await two_servers[i % 2].alerts.decision("acme", i % 3 == 2)
        now[0] += 1
    assert _types(a).count("reservation.denial_rate_spike") == 2


async def _burn(govs: tuple[Governance, ...], now: list[float]) -> list[dict[str, object]]:
    """An hour at 100 per minute, 5 minutes at 2.5x (under the 3x default), then 10x; each server
    seeing every other minute. The anomalies announced once the 10x started."""
    _drive(govs, now)
    spent = 0
    for i in range(60):
        await govs[i % len(govs)].alerts.balances([_balance(spent)])
        spent += 100
        now[0] += 60
    for i in range(5):
        spent += 250
        now[0] += 60
        await govs[i % len(govs)].alerts.balances([_balance(spent)])
    assert "budget.burn_rate_anomaly" not in _types(govs[0])
    for i in range(5):
        spent += 1000
        now[0] += 60
        await govs[i % len(govs)].alerts.balances([_balance(spent)])
    return [e for e in govs[-1].records.iter(EVENTS) if e["event_type"] == "budget.burn_rate_anomaly"]


async def test_burn_rate_across_servers_against_the_previous_hour(two_servers: tuple[Governance, Governance]) -> None:
    alone = await _burn((Governance(MemoryRecordStore()),), [4_000_000.0])
    shared = await _burn(two_servers, [4_000_000.0])
    # the two servers together announce what one server seeing everything announces: once per window
    assert len(shared) == len(alone) >= 1
    data = shared[0]["data"]
    assert isinstance(data, dict) and data["multiplier"] >= 3.0 and 90 <= data["baseline_rate"] <= 160


@pytest.fixture(params=["sqlite", "redis"])
def shared_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/shared.db"
    from tests.redis.backend import fresh_redis_url

    return fresh_redis_url(request)


def test_denial_spike_over_http_with_two_servers(shared_url: str) -> None:
    """Two apps on one ledger, each serving every other reservation: the spike is measured on all
    of them and announced once."""
    apps = [create_app(shared_url, admin_key=ADMIN_KEY, sweep_interval_s=0, key_cache_ttl_s=0) for _ in range(2)]
    for app in apps:
        app.state.cycles.gov.alerts.denials.flush_after_s = 0  # every allowed one written at once: exact counts
    with ServerThread(apps[0]) as a, ServerThread(apps[1]) as b:
        admin = {"X-Admin-API-Key": ADMIN_KEY}
        httpx.post(f"{a.url}/v1/admin/tenants", headers=admin, json={"tenant_id": "acme", "name": "A"})
        budget = {"scope": "tenant:acme", "amount": {"unit": "USD_MICROCENTS", "amount": 12}}
        assert httpx.post(f"{a.url}/admin/budgets", headers=admin, json=budget).is_success
        key = httpx.post(f"{b.url}/v1/admin/api-keys", headers=admin, json={"tenant_id": "acme", "name": "k"})
        headers = {"X-Cycles-API-Key": key.json()["key_secret"]}

        def reserve(url: str, amount: int) -> int:
            estimate = {"unit": "USD_MICROCENTS", "amount": amount}
            body = {"idempotency_key": uuid.uuid4().hex, "subject": {"tenant": "acme"},
                    "action": {"kind": "llm", "name": "m"}, "estimate": estimate}  # fmt: skip
            return httpx.post(f"{url}/v1/reservations", headers=headers, json=body).status_code

        urls = [a.url, b.url]
        assert [reserve(urls[i % 2], 1) for i in range(12)] == [200] * 12
        # 1 denial of 13 (7.7%), then 2 of 14 (14%): each server alone saw 7 decisions, under the
        # 10-sample minimum, so measured per process this spike is never seen
        assert [reserve(urls[i % 2], 5) for i in range(4)] == [409] * 4
        spikes = apps[0].state.cycles.gov.records.events(event_type="reservation.denial_rate_spike")
    assert len(spikes) == 1 and spikes[0]["data"]["sample_count"] == 14 and spikes[0]["tenant_id"] == "acme"
