"""Where the Redis ledger keeps things: one hash tag (cluster slot) per tenant, ids that carry it,
prefixes that isolate, nothing that scans the keyspace."""

from __future__ import annotations

import threading
from collections import defaultdict

import pytest
import redis
from redis.crc import key_slot

from cycles import Action, Cycles, Subject, tokens
from cycles.errors import BudgetClosed, InvalidRequest, NotFound
from cycles.ledger.redis import MAX_EXACT_AMOUNT, RedisLedger, open_redis
from cycles.models import Amount, Unit
from tests.redis.conftest import PrivateRedis

LLM = Action("llm.completion", "m")


def _keys(raw: redis.Redis, prefix: str) -> list[str]:
    return sorted(k.decode() for k in raw.scan_iter(match=f"{prefix}:*"))


def _workload(cy: Cycles) -> None:
    cy.budgets.set("tenant:acme", tokens(100))
    cy.budgets.set("tenant:acme/workflow:w", tokens(50))
    cy.budgets.set("tenant:beta", tokens(100))
    cy.budgets.set("workflow:w", tokens(100))
    for subject in (
        Subject(tenant="acme", workflow="w", agent="a"),
        Subject(tenant="beta"),
        Subject(workflow="w"),
    ):
        r = cy.reserve(subject, LLM, tokens(5))
        cy.commit(r.reservation_id or "", tokens(4))
        cy.reserve(subject, LLM, tokens(1))  # left active
        cy.event(subject, LLM, tokens(1))
        cy.decide(subject, LLM, tokens(1))


def test_a_tenants_keys_share_one_hash_tag_and_tenants_spread(url: str, prefix: str, raw: redis.Redis) -> None:
    cy = Cycles(url)
    _workload(cy)
    by_tag: dict[str, set[int]] = defaultdict(set)
    for key in _keys(raw, prefix):
        tag = key[len(prefix) + 2 : key.index("}")]
        by_tag[tag].add(key_slot(key.encode()))
    assert set(by_tag) == {"acme", "beta", "~", "!"}
    assert all(len(slots) == 1 for slots in by_tag.values()), by_tag
    assert len({next(iter(s)) for s in by_tag.values()}) == 4  # different tenants, different slots
    cy.close()


def test_reservation_ids_carry_the_tenant_and_are_found_from_the_id_alone(url: str) -> None:
    cy = Cycles(url)
    cy.budgets.set("tenant:acme", tokens(100))
    cy.budgets.set("workflow:w", tokens(100))
    with_tenant = cy.reserve(Subject(tenant="acme", agent="a"), LLM, tokens(5)).reservation_id or ""
    without = cy.reserve(Subject(workflow="w"), LLM, tokens(5)).reservation_id or ""
    assert with_tenant.startswith("rsv_acme_") and without.startswith("rsv_") and without.count("_") == 1
    other = Cycles(url)  # another process would know nothing but the id
    assert other.get_reservation(with_tenant).subject.tenant == "acme"
    assert other.get_reservation(without).subject.workflow == "w"
    for bogus in ("rsv_acme_" + "0" * 32, "rsv_nope", "xyz", "rsv_a}b_" + "0" * 32, ""):
        with pytest.raises(NotFound):
            other.get_reservation(bogus)
    cy.close()
    other.close()


def test_prefixes_isolate_ledgers_on_one_database(prefix: str) -> None:
    a = open_redis(f"redis://127.0.0.1:6379/0?prefix={prefix}-a")
    b = open_redis(f"redis://127.0.0.1:6379/0?prefix={prefix}-b")
    try:
        a.set_budget("tenant:acme", tokens(10))
        assert [x.scope for x in a.list_budgets()] == ["tenant:acme"]
        assert b.list_budgets() == []
        with pytest.raises(NotFound):
            b.get_budget("tenant:acme")
    finally:
        from tests.redis.backend import drop_prefix

        drop_prefix(f"{prefix}-a")
        drop_prefix(f"{prefix}-b")
        a.close()
        b.close()


def test_no_operation_scans_the_keyspace(private_redis: PrivateRedis) -> None:
    seen: list[str] = []
    stop = threading.Event()

    def monitor() -> None:
        with private_redis.client().monitor() as m:
            for cmd in m.listen():
                seen.append(cmd["command"])
                if stop.is_set() and "STOP-MONITOR" in cmd["command"]:
                    return

    t = threading.Thread(target=monitor, daemon=True)
    t.start()
    cy = Cycles(private_redis.url)
    _workload(cy)
    cy.budgets.list()
    cy.balances(tenant="acme")
    cy.list_reservations()
    cy.list_reservations(tenant="acme")
    cy.sweep()
    stop.set()
    private_redis.client().echo("STOP-MONITOR")
    t.join(timeout=10)
    verbs = {c.split(" ", 1)[0].strip('"').upper() for c in seen}
    assert "EVALSHA" in verbs
    assert not verbs & {"KEYS", "SCAN", "EVAL", "FLUSHDB", "FLUSHALL"}, verbs
    cy.close()


def test_amounts_beyond_exact_lua_integers_are_refused(url: str) -> None:
    ledger = open_redis(url)
    with pytest.raises(InvalidRequest, match="too large"):
        ledger.set_budget("tenant:acme", Amount(unit=Unit.TOKENS, amount=MAX_EXACT_AMOUNT + 1))
    ledger.set_budget("tenant:acme", Amount(unit=Unit.TOKENS, amount=MAX_EXACT_AMOUNT - 5))
    with pytest.raises(InvalidRequest, match="2\\*\\*53"):
        ledger.fund_budget("tenant:acme", Amount(unit=Unit.TOKENS, amount=10))
    b = ledger.fund_budget("tenant:acme", Amount(unit=Unit.TOKENS, amount=5))
    assert b.allocated is not None and b.allocated.amount == MAX_EXACT_AMOUNT  # exact, no float rounding
    ledger.close()


def test_a_refused_status_change_changes_no_unit(url: str) -> None:
    """Checks first, then writes: closing is for good, and a refusal leaves every unit as it was."""
    ledger = open_redis(url)
    ledger.set_budget("tenant:x", Amount(unit=Unit.CREDITS, amount=5))
    ledger.set_budget("tenant:x", Amount(unit=Unit.TOKENS, amount=5))
    ledger.set_budget_status("tenant:x", "CLOSED", unit=Unit.TOKENS)
    with pytest.raises(BudgetClosed, match="closed for good"):
        ledger.set_budget_status("tenant:x", "FROZEN")
    cy = Cycles(ledger=ledger)
    assert cy.reserve(Subject(tenant="x"), LLM, Amount(unit=Unit.CREDITS, amount=1)).reservation_id
    cy.close()


def test_url_options(url: str) -> None:
    ledger = open_redis(url + "&include_balances=true&retries=0&socket_timeout=3")
    assert isinstance(ledger, RedisLedger) and ledger.include_balances
    assert "prefix=" in ledger.url
    ledger.set_budget("tenant:acme", tokens(10))
    r = ledger.reserve(
        __import__("cycles.models", fromlist=["ReservationCreateRequest"]).ReservationCreateRequest(
            idempotency_key="k", subject=Subject(tenant="acme"), action=LLM, estimate=tokens(1)
        )
    )
    assert r.balances and r.balances[0].reserved == tokens(1)
    ledger.close()
    with pytest.raises(InvalidRequest, match="prefix"):
        open_redis("redis://127.0.0.1:6379/0?prefix=a{b")
