"""Denial-rate spikes and burn-rate anomalies, with the alert clock moved by the test."""

from __future__ import annotations

from cycles.ledger.records import EVENTS, MemoryRecordStore
from cycles.models import Amount, Balance, SignedAmount, Unit
from cycles.server.governance.context import Governance


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
