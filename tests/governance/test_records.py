"""The event and audit store (cycles.ledger.records) on memory, SQLite and real Redis."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cycles import AsyncCycles, Cycles
from cycles.errors import InvalidRequest
from cycles.ledger.records import (
    AUDIT,
    EVENTS,
    AuditFilter,
    EventFilter,
    RecordStore,
    new_audit,
    new_event,
    to_csv,
    to_jsonl,
)

from .spec import admin_validator

BACKENDS = ["memory", "sqlite", "redis"]


@pytest.fixture(params=BACKENDS)
def cy(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cycles]:
    if request.param == "memory":
        url = "memory://"
    elif request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/ledger.db"
    else:
        from tests.redis.backend import fresh_redis_url

        url = fresh_redis_url(request)
    client = Cycles(url)
    yield client
    client.records.close()
    client.close()


def _events(store: RecordStore, n: int, *, base_ms: int = 1_700_000_000_000) -> list[dict]:
    out = []
    for i in range(n):
        tenant = "acme" if i % 2 == 0 else "globex"
        ev = new_event(
            "budget.funded" if i % 3 else "budget.threshold_crossed",
            tenant_id=tenant,
            scope=f"tenant:{tenant}/workspace:w{i % 4}",
            data={"i": i},
            actor={"type": "admin", "key_id": "k1"},
            correlation_id=f"corr-{i}",
            now_ms=base_ms + i,
        )
        out.append(store.append(EVENTS, ev))
    return out


def test_records_validate_against_the_admin_spec() -> None:
    ev = new_event("budget.exhausted", tenant_id="acme", scope="tenant:acme", data={"scope": "tenant:acme"})
    admin_validator("Event").validate(ev)
    entry = new_audit("createBudget", tenant_id="__admin__", status=201, before=None, after={"allocated": 1})
    admin_validator("AuditLogEntry").validate(entry)
    assert ev["category"] == "budget" and ev["timestamp"].endswith("Z")


def test_append_get_and_newest_first_paging(cy: Cycles) -> None:
    store = cy.records
    made = _events(store, 25)
    assert store.get(EVENTS, made[3]["event_id"]) == made[3]
    assert store.get(EVENTS, "evt_nope") is None
    assert store.get(AUDIT, made[3]["event_id"]) is None  # streams are separate

    seen: list[str] = []
    cursor = None
    while True:
        page, cursor = store.page(EVENTS, limit=7, cursor=cursor)
        seen += [e["event_id"] for e in page]
        if cursor is None:
            break
    assert seen == [e["event_id"] for e in reversed(made)]
    oldest_first = [e["event_id"] for e in store.iter(EVENTS, ascending=True)]
    assert oldest_first == [e["event_id"] for e in made]


def test_filters_compose_and_tenant_index_isolates(cy: Cycles) -> None:
    store = cy.records
    made = _events(store, 30)
    acme = store.page(EVENTS, tenant="acme", limit=100)[0]
    assert {e["tenant_id"] for e in acme} == {"acme"} and len(acme) == 15
    crossed = cy.events(tenant="acme", event_type="budget.threshold_crossed")
    assert [e["data"]["i"] for e in crossed] == [i for i in range(29, -1, -1) if i % 2 == 0 and i % 3 == 0]
    by_scope = cy.events(scope="tenant:acme/workspace:w2")
    assert {e["data"]["i"] % 4 for e in by_scope} == {2}
    window = cy.events(since=made[10]["timestamp"], until=made[12]["timestamp"])
    assert [e["data"]["i"] for e in window] == [12, 11, 10]
    assert [e["data"]["i"] for e in cy.events(search="CORR-7")] == [7]
    assert cy.events(category="tenant") == []
    # a filtered page that must skip many rows still pages correctly
    page, cursor = store.page(EVENTS, match=EventFilter(correlation_id="corr-0"), limit=1)
    assert [e["data"]["i"] for e in page] == [0] and cursor is None


def test_audit_filters(cy: Cycles) -> None:
    store = cy.records
    for i, (op, status, code) in enumerate(
        [("createBudget", 201, None), ("fundBudget", 409, "BUDGET_FROZEN"), ("revokeApiKey", 200, None)]
    ):
        store.append(
            AUDIT,
            new_audit(op, tenant_id="__admin__", status=status, error_code=code, resource_type="budget", key_id="k1",
                      resource_id=f"r{i}", request_id=f"req-{i}"),
        )  # fmt: skip
    assert [a["operation"] for a in cy.audit(operation="createBudget,revokeApiKey")] == ["revokeApiKey", "createBudget"]
    assert [a["operation"] for a in cy.audit(error_code="BUDGET_FROZEN")] == ["fundBudget"]
    assert [a["operation"] for a in cy.audit(error_code_exclude=["BUDGET_FROZEN"])] == ["revokeApiKey", "createBudget"]
    assert [a["operation"] for a in cy.audit(status_min=400)] == ["fundBudget"]
    assert [a["operation"] for a in cy.audit(request_id="req-2")] == ["revokeApiKey"]
    assert cy.audit(tenant="__admin__", limit=1)[0]["operation"] == "revokeApiKey"
    with pytest.raises(InvalidRequest):
        AuditFilter(status=200, status_min=100)
    with pytest.raises(InvalidRequest):
        AuditFilter(status_min=500, status_max=400)


def test_retention_and_cap_forget_the_oldest(cy: Cycles) -> None:
    store = cy.records
    made = _events(store, 20)
    cutoff = made[5]["event_id"]
    store.retention_ms = 10**12  # nothing is old enough...
    store.max_records = 12  # ...but only 12 may stay
    assert store.purge(now_ms=1_700_000_000_000 + 100) == 8
    left = [e["data"]["i"] for e in store.iter(EVENTS, ascending=True)]
    assert left == list(range(8, 20))
    assert store.page(EVENTS, tenant="acme", limit=100)[0][-1]["data"]["i"] == 8  # tenant index pruned too
    store.max_records = 1000
    store.retention_ms = 5  # older than now - 5 ms is gone
    store.purge(now_ms=1_700_000_000_000 + 15)
    assert [e["data"]["i"] for e in store.iter(EVENTS, ascending=True)] == list(range(10, 20))
    assert store.get(EVENTS, cutoff) is None


def test_cas_is_atomic_and_leases_expire(cy: Cycles) -> None:
    store = cy.records
    assert store.read("k") is None
    assert store.cas("k", None, "a")
    assert not store.cas("k", None, "b")
    assert store.read("k") == "a"
    assert store.cas("k", "a", "b") and store.read("k") == "b"
    assert store.cas("k", "b", None) and store.read("k") is None
    assert store.cas("lease", None, "me", ttl_ms=1)
    threading.Event().wait(0.01)
    assert store.read("lease") is None and store.cas("lease", None, "other", ttl_ms=60_000)

    # many threads race for one slot: exactly one wins
    wins: list[int] = []

    def race(i: int) -> None:
        if store.cas("slot", None, str(i)):
            wins.append(i)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and store.read("slot") == str(wins[0])


def test_exports(cy: Cycles) -> None:
    made = _events(cy.records, 3)
    lines = to_jsonl(reversed(made)).splitlines()
    assert [json.loads(x)["event_id"] for x in lines] == [e["event_id"] for e in reversed(made)]
    csv_text = to_csv(made, EVENTS)
    rows = csv_text.splitlines()
    assert rows[0].startswith("event_id,timestamp,event_type") and len(rows) == 4
    assert '"{""i"": 0}"' in rows[1]


def test_sqlite_records_survive_reopening_and_are_shared(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/shared.db"
    with Cycles(url) as a, Cycles(url) as b:
        ev = a.records.append(EVENTS, new_event("tenant.created", tenant_id="acme"))
        assert b.events()[0]["event_id"] == ev["event_id"]
    with Cycles(url) as c:
        assert c.records.get(EVENTS, ev["event_id"]) == ev


def test_async_client_reads_the_same_store(tmp_path: Path) -> None:
    import asyncio

    url = f"sqlite:///{tmp_path}/a.db"
    with Cycles(url) as cy:
        cy.records.append(EVENTS, new_event("tenant.created", tenant_id="acme"))

    async def main() -> list[dict]:
        acy = AsyncCycles(url)
        try:
            return await acy.events(tenant="acme")
        finally:
            await acy.aclose()

    assert [e["event_type"] for e in asyncio.run(main())] == ["tenant.created"]


def test_bad_inputs_are_typed_errors(cy: Cycles) -> None:
    with pytest.raises(InvalidRequest):
        cy.records.append(EVENTS, {"event_id": "nope"})
    with pytest.raises(InvalidRequest):
        cy.records.page(EVENTS, cursor="aud_x")
    with pytest.raises(InvalidRequest):
        cy.events(since="yesterday")
    with pytest.raises(InvalidRequest):
        cy.events(search="x" * 129)
