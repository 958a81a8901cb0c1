"""Expired reservations come back without their client: lazily on the next access to the tenant,
and by the sweep, which visits only the slots whose earliest deadline has passed."""

from __future__ import annotations

import contextlib

import redis

from cycles.ledger.redis import RedisLedger, open_redis
from cycles.ledger.rules import IDEMPOTENCY_RETENTION_MS
from cycles.models import (
    Action,
    CommitRequest,
    ReservationCreateRequest,
    ReservationStatus,
    Subject,
    tokens,
)

T0 = 1_800_000_000_000
LLM = Action("llm.completion", "m")


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now


def _ledger(url: str, clock: Clock) -> RedisLedger:
    return open_redis(url, clock=clock)


def _reserve(ledger: RedisLedger, tenant: str, amount: int = 10, key: str = "k") -> str:
    r = ledger.reserve(
        ReservationCreateRequest(
            idempotency_key=key,
            subject=Subject(tenant=tenant),
            action=LLM,
            estimate=tokens(amount),
            ttl_ms=1000,
            grace_period_ms=0,
        )
    )
    assert r.reservation_id
    return r.reservation_id


def _reserved(ledger: RedisLedger, scope: str) -> int:
    b = ledger.get_budget(scope)
    assert b.reserved is not None
    return b.reserved.amount


def _due_index(raw: redis.Redis, prefix: str) -> dict[str, float]:
    return {k.decode(): s for k, s in raw.zrange(f"{prefix}:{{!}}:due", 0, -1, withscores=True)}


def test_the_sweep_returns_abandoned_budget_and_visits_only_due_slots(url: str, prefix: str, raw: redis.Redis) -> None:
    clock = Clock()
    client = _ledger(url, clock)
    for tenant in ("a", "b", "c"):
        client.set_budget(f"tenant:{tenant}", tokens(100))
    rid = _reserve(client, "a")
    _reserve(client, "b", key="k2")
    assert _due_index(raw, prefix) == {"a": T0 + 1000, "b": T0 + 1000}  # c has nothing to expire
    client.close()  # the client is gone: nothing but the sweep will touch tenant a again

    sweeper = _ledger(url, clock)  # e.g. the server's background task
    assert sweeper.sweep() == 0  # nothing is due yet
    clock.now += 1001
    assert sweeper.sweep() == 2
    # what is left to do in those slots is the purge, a day after the reservations ended
    assert _due_index(raw, prefix) == {
        "a": T0 + 1000 + IDEMPOTENCY_RETENTION_MS,
        "b": T0 + 1000 + IDEMPOTENCY_RETENTION_MS,
    }
    assert _reserved(sweeper, "tenant:a") == 0
    detail = raw.hget(f"{prefix}:{{a}}:r:{rid}", "status")
    assert detail == b"EXPIRED"
    assert sweeper.sweep() == 0
    sweeper.close()


def test_an_access_expires_what_is_due_in_that_tenant(url: str, raw: redis.Redis) -> None:
    clock = Clock()
    ledger = _ledger(url, clock)
    ledger.set_budget("tenant:a", tokens(10))
    _reserve(ledger, "a", amount=10)
    clock.now += 1001
    assert _reserved(ledger, "tenant:a") == 0  # the read itself expired it, no sweep ran
    _reserve(ledger, "a", amount=10, key="again")  # and the budget is usable again
    ledger.close()


def test_the_sweep_bounds_its_work_and_resumes(url: str, prefix: str, raw: redis.Redis) -> None:
    clock = Clock()
    ledger = _ledger(url, clock)
    ledger.set_budget("tenant:a", tokens(1000))
    for i in range(7):
        _reserve(ledger, "a", amount=1, key=f"k{i}")
    clock.now += 1001
    assert ledger.sweep(limit=3) == 3
    assert ledger.sweep(limit=3) == 3
    assert ledger.sweep(limit=3) == 1
    assert ledger.sweep(limit=3) == 0
    ledger.close()


def test_a_lost_index_update_is_repaired_by_the_round_robin(url: str, prefix: str, raw: redis.Redis) -> None:
    clock = Clock()
    ledger = _ledger(url, clock)
    ledger.set_budget("tenant:a", tokens(100))
    _reserve(ledger, "a")
    raw.delete(f"{prefix}:{{!}}:due")  # as if the client died before publishing its deadline
    clock.now += 1001
    assert ledger.sweep() == 1  # found through the tenant registry
    ledger.close()


def test_a_concurrent_reserve_is_not_lost_by_a_sweep(url: str, prefix: str, raw: redis.Redis) -> None:
    """The sweep's update of the index is a compare-and-set on a version a reserve bumps."""
    clock = Clock()
    ledger = _ledger(url, clock)
    ledger.set_budget("tenant:a", tokens(100))
    _reserve(ledger, "a", key="first")
    clock.now += 1001
    flow = ledger._sweep(1000)
    step = next(flow)  # the sweep read the due slots and their versions ...
    step = flow.send(ledger._execute(step))  # ... and expired slot a (nothing left: next deadline none)
    reply = ledger._execute(step)
    _reserve(ledger, "a", key="second")  # meanwhile a client reserves, deadline T0 + 2001 + 1000
    step = flow.send(reply)  # the sweep's compare-and-set now fails: the version moved
    with contextlib.suppress(StopIteration):
        flow.send(ledger._execute(step))
    deadline = clock.now + 1000
    assert _due_index(raw, prefix)["a"] <= deadline  # still a lower bound: the new deadline is not lost
    assert ledger.sweep() == 0  # nothing due yet; the slot's entry moves up to its real deadline
    assert _due_index(raw, prefix) == {"a": deadline}
    clock.now = deadline + 1
    assert ledger.sweep() == 1
    ledger.close()


def test_finished_reservations_and_idempotency_records_go_after_a_day(url: str, prefix: str, raw: redis.Redis) -> None:
    clock = Clock()
    ledger = _ledger(url, clock)
    ledger.set_budget("tenant:a", tokens(100))
    rid = _reserve(ledger, "a")
    ledger.commit(rid, CommitRequest(idempotency_key="c", actual=tokens(3)))
    idem = f"{prefix}:{{a}}:i:commit:a:c"
    assert 0 < raw.pttl(idem) <= IDEMPOTENCY_RETENTION_MS
    assert raw.pttl(f"{prefix}:{{a}}:r:{rid}") > IDEMPOTENCY_RETENTION_MS  # safety-net TTL, after the purge
    clock.now += IDEMPOTENCY_RETENTION_MS - 10
    ledger.sweep()
    assert ledger.get_reservation(rid).status is ReservationStatus.COMMITTED
    clock.now += 20
    ledger.sweep()
    assert not raw.exists(f"{prefix}:{{a}}:r:{rid}")
    assert raw.zcard(f"{prefix}:{{a}}:idx") == 0
    assert _due_index(raw, prefix) == {}  # nothing left to do in the slot
    ledger.close()
