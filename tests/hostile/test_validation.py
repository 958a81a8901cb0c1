"""Why 1: a trailing newline (or an unvalidated assignment) must not poison the ledger, and a row
that cannot be read back must not stop a sweep or another tenant's request."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

import pydantic
import pytest
import redis

from cycles.errors import InvalidRequest, NotFound
from cycles.identifiers import check_identifier, is_identifier
from cycles.ledger.base import Ledger
from cycles.models import Subject
from cycles.scopes import parse_scope
from cycles.server.keys import MemoryKeyStore
from cycles.testing import check_balances

from .conftest import ALICE, MALLORY, Http, fund
from .requests import release, reserve, reserve_body


@pytest.mark.parametrize("bad", ["alpha\n", "alpha\r\n", "\nalpha", "al pha", "a/b", "", "x" * 129, "ünïcode"])
def test_identifiers_are_checked_whole(bad: str) -> None:
    assert not is_identifier(bad)
    with pytest.raises(InvalidRequest):
        check_identifier(bad, "tenant")
    with pytest.raises(pydantic.ValidationError):
        Subject(tenant=bad)
    with pytest.raises(InvalidRequest):
        parse_scope(f"tenant:{bad}")


async def test_a_key_for_a_tenant_with_a_trailing_newline_is_refused() -> None:
    with pytest.raises(InvalidRequest):
        await MemoryKeyStore().create("alpha\n")


async def test_admin_refuses_a_newline_tenant_over_http(http: Http) -> None:
    r = await http.client.post("/admin/keys", json={"tenant": "alpha\n"}, headers=http.admin)
    assert r.status_code == 400 and r.json()["error"] == "INVALID_REQUEST"
    r = await http.client.get("/admin/budgets", params={"tenant": "alpha\n"}, headers=http.admin)
    assert r.status_code == 400


def test_assignment_is_validated_in_process(ledger: Ledger) -> None:
    fund(ledger, MALLORY)
    subject = Subject(tenant=MALLORY)
    with pytest.raises(pydantic.ValidationError):
        subject.workflow = "run 42/x"
    with pytest.raises(pydantic.ValidationError):
        subject.tenant = "alpha\n"
    req = reserve(MALLORY)
    with pytest.raises(pydantic.ValidationError):
        req.subject.agent = "a b"
    assert req.subject.agent is None
    ledger.reserve(req)  # the request is still whole, and still valid


def _poison(ledger: Ledger, backend: str, rid: str, *, overdue: bool = True) -> None:
    """What an older version accepted: a subject that cannot be read back, on a row already overdue
    (or, ``overdue=False``, still live)."""
    bad_subject = {"tenant": MALLORY, "workflow": "run 42/x"}
    if backend == "sqlite":
        db = sqlite3.connect(ledger.path)  # type: ignore[attr-defined]
        with db:
            db.execute("UPDATE reservations SET subject=? WHERE id=?", (json.dumps(bad_subject), rid))
            if overdue:
                db.execute(
                    "UPDATE reservations SET expires_at_ms=0, deadline_ms=0, grace_period_ms=0 WHERE id=?", (rid,)
                )
        db.close()
        return
    client = ledger._client  # type: ignore[attr-defined]
    base = ledger._base(MALLORY)  # type: ignore[attr-defined]
    info = json.loads(client.hget(base + "r:" + rid, "info"))
    info[0] = bad_subject
    client.hset(base + "r:" + rid, mapping={"info": json.dumps(info)})
    if overdue:
        client.hset(base + "r:" + rid, mapping={"expires": 0, "grace": 0})
        client.zadd(base + "idx", {rid: 0})


def _quarantined(ledger: Ledger, backend: str) -> list[Any]:
    if backend != "sqlite":
        return []
    db = sqlite3.connect(ledger.path)  # type: ignore[attr-defined]
    rows = db.execute("SELECT id, tenant FROM quarantine").fetchall()
    db.close()
    return rows


def test_an_unreadable_row_does_not_stop_the_sweep_or_other_tenants(ledger: Ledger, backend: str) -> None:
    fund(ledger, MALLORY, ALICE)
    poisoned = ledger.reserve(reserve(MALLORY, 1000)).reservation_id
    assert poisoned is not None
    kept = ledger.reserve(reserve(MALLORY, 10)).reservation_id
    _poison(ledger, backend, poisoned)

    ledger.sweep()  # must not raise
    ledger.sweep()
    for _ in range(5):  # another tenant's writes keep working (they run the lazy sweep too)
        rid = ledger.reserve(reserve(ALICE)).reservation_id
        assert rid is not None
        ledger.release(rid, release())
    page = ledger.list_reservations(rules_query(MALLORY), tenant=MALLORY)
    ids = {r.reservation_id for r in page.reservations}
    assert kept in ids and poisoned not in ids  # skipped, and the rest of the tenant's page is there
    mallory = ledger.get_budget(f"tenant:{MALLORY}")
    assert mallory.reserved is not None and mallory.reserved.amount == 10  # the poisoned hold went back
    if backend == "sqlite":
        assert [r[0] for r in _quarantined(ledger, backend)] == [poisoned]
    check_balances(ledger.list_budgets())


def rules_query(tenant: str) -> Any:
    from cycles.ledger.rules import ReservationQuery

    return ReservationQuery(tenant=tenant, limit=50)


async def test_an_unreadable_row_does_not_stop_the_server(http: Http, make_url: Any, backend: str) -> None:
    from cycles.ledger.base import open_ledger

    c = http.client
    r = await c.post("/v1/reservations", json=reserve_body(MALLORY), headers=http.as_(MALLORY))
    assert r.status_code == 200
    side = open_ledger(make_url())
    try:
        _poison(side, backend, r.json()["reservation_id"])
    finally:
        side.close()
    assert (await c.post("/admin/sweep", headers=http.admin)).status_code == 200
    for _ in range(3):
        r = await c.post("/v1/reservations", json=reserve_body(ALICE), headers=http.as_(ALICE))
        assert r.status_code == 200, r.text
    r = await c.get("/v1/reservations", params={"tenant": MALLORY}, headers=http.as_(MALLORY))
    assert r.status_code == 200
    r = await c.get("/v1/balances", params={"tenant": ALICE}, headers=http.as_(ALICE))
    assert r.status_code == 200


def test_reading_an_unreadable_row_is_a_typed_not_found(ledger: Ledger, backend: str) -> None:
    """Asked for by id, a row that cannot be read back answers as a missing one (SQLite also moves
    it to quarantine), never as an internal error; the tenant's other reservations are unharmed."""
    fund(ledger, MALLORY)
    poisoned = ledger.reserve(reserve(MALLORY, 1000)).reservation_id
    kept = ledger.reserve(reserve(MALLORY, 10)).reservation_id
    assert poisoned is not None and kept is not None
    _poison(ledger, backend, poisoned, overdue=False)
    with pytest.raises(NotFound) as caught:
        ledger.get_reservation(poisoned)
    assert caught.value.code == "NOT_FOUND" and caught.value.details == {"reservation_id": poisoned}
    assert ledger.get_reservation(kept).reservation_id == kept
    check_balances(ledger.list_budgets())


async def test_reading_an_unreadable_row_over_http_is_a_404(http: Http, make_url: Any, backend: str) -> None:
    from cycles.ledger.base import open_ledger

    r = await http.client.post("/v1/reservations", json=reserve_body(MALLORY), headers=http.as_(MALLORY))
    rid = r.json()["reservation_id"]
    side = open_ledger(make_url())
    try:
        _poison(side, backend, rid, overdue=False)
    finally:
        side.close()
    r = await http.client.get(f"/v1/reservations/{rid}", headers=http.as_(MALLORY))
    assert r.status_code == 404 and r.json()["error"] == "NOT_FOUND", r.text


def test_redis_rows_for_a_poisoned_tag_are_never_addressed() -> None:
    """Reservation ids name their tenant's hash tag: an id whose tenant part is not an identifier
    (a newline, braces) is never turned into a key."""
    from cycles.ledger.redis import _reservation_tag

    assert _reservation_tag("rsv_alpha\n_" + "0" * 32) is None
    assert _reservation_tag("rsv_a}b{c_" + "0" * 32) is None
    assert _reservation_tag("rsv_alpha_" + "0" * 32 + "\n") is None
    assert _reservation_tag("rsv_alpha_" + "0" * 32) == "alpha"
    assert redis  # the module is the backend under test


async def test_nan_and_infinity_in_metadata_are_refused(http: Http, ledger: Ledger) -> None:
    for raw in ('{"x": NaN}', '{"x": [1, Infinity]}', '{"x": {"y": -Infinity}}'):
        body = json.dumps(reserve_body(MALLORY)).replace('"wf"}', '"wf"}, "metadata": ' + raw, 1)
        r = await http.client.post(
            "/v1/reservations",
            content=body,
            headers={**http.as_(MALLORY), "content-type": "application/json"},
        )
        assert r.status_code == 400 and r.json()["error"] == "INVALID_REQUEST", r.text
    with pytest.raises(pydantic.ValidationError):
        reserve(MALLORY, metadata={"x": float("nan")})
    fund(ledger, MALLORY)
    rid = ledger.reserve(reserve(MALLORY, metadata={"x": 1.5})).reservation_id
    assert rid is not None
    assert ledger.get_reservation(rid).metadata == {"x": 1.5}
