"""What goes on the wire: one endpoint per ledger method, the spec's request shapes, the headers."""

from __future__ import annotations

import json
from typing import Any

import pytest

from cycles import Action, Caps, Subject, Unit, usd
from cycles.errors import InvalidRequest, NotFound
from cycles.ledger.http import HttpLedger, trace_context
from cycles.ledger.rules import BalanceQuery, ReservationQuery
from cycles.models import (
    CommitRequest,
    DecisionRequest,
    EventCreateRequest,
    ReleaseRequest,
    ReservationCreateRequest,
    ReservationExtendRequest,
    ReservationStatus,
    StandardMetrics,
)

from .conftest import (
    ADMIN_KEY,
    API_KEY,
    TRACE_ID,
    ClientFactory,
    FakeProtocolServer,
    Reply,
    assert_schema,
    balance,
    balances_reply,
    commit_reply,
    decision_reply,
    detail_reply,
    event_reply,
    extend_reply,
    list_reply,
    release_reply,
    reservation_reply,
)

SUBJECT = Subject(tenant="acme", workflow="run-42")
ACTION = Action("llm.completion", "openai:gpt-4o")


def _reserve_req(key: str = "key-reserve") -> ReservationCreateRequest:
    return ReservationCreateRequest(
        idempotency_key=key, subject=SUBJECT, action=ACTION, estimate=usd(0.05), metadata={"run": 42}
    )


# method, args, (http method, path), request schema, reply, expected status
POSTS: list[tuple[str, tuple[Any, ...], str, str, Reply]] = [
    (
        "reserve",
        (_reserve_req(),),
        "/v1/reservations",
        "ReservationCreateRequest",
        Reply(json=reservation_reply()),
    ),
    (
        "commit",
        (
            "rsv_1",
            CommitRequest(idempotency_key="key-commit", actual=usd(0.03), metrics=StandardMetrics(tokens_input=5)),
        ),
        "/v1/reservations/rsv_1/commit",
        "CommitRequest",
        Reply(json=commit_reply()),
    ),
    (
        "release",
        ("rsv_1", ReleaseRequest(idempotency_key="key-release", reason="[TEST]")),
        "/v1/reservations/rsv_1/release",
        "ReleaseRequest",
        Reply(json=release_reply()),
    ),
    (
        "extend",
        ("rsv_1", ReservationExtendRequest(idempotency_key="key-extend", extend_by_ms=30_000)),
        "/v1/reservations/rsv_1/extend",
        "ReservationExtendRequest",
        Reply(json=extend_reply()),
    ),
    (
        "decide",
        (DecisionRequest(idempotency_key="key-decide", subject=SUBJECT, action=ACTION, estimate=usd(1)),),
        "/v1/decide",
        "DecisionRequest",
        Reply(json=decision_reply()),
    ),
    (
        "event",
        (EventCreateRequest(idempotency_key="key-event", subject=SUBJECT, action=ACTION, actual=usd(0.01)),),
        "/v1/events",
        "EventCreateRequest",
        Reply(status=201, json=event_reply()),
    ),
]


@pytest.mark.parametrize(("method", "args", "path", "schema", "reply"), POSTS, ids=[p[0] for p in POSTS])
async def test_each_mutation_posts_its_spec_request(
    make_client: ClientFactory,
    fake: FakeProtocolServer,
    method: str,
    args: tuple[Any, ...],
    path: str,
    schema: str,
    reply: Reply,
) -> None:
    fake.script("POST", path, reply)
    result = await make_client()(method, *args, tenant="ignored-by-http")

    [seen] = fake.seen()
    assert (seen.method, seen.raw_path, seen.query) == ("POST", path, {})
    assert_schema(schema, seen.json)
    req = args[-1]
    assert seen.json == req.to_wire()
    assert seen.headers["x-cycles-api-key"] == API_KEY
    assert seen.headers["x-idempotency-key"] == req.idempotency_key == seen.json["idempotency_key"]
    assert seen.headers["content-type"] == "application/json"
    assert "ignored-by-http" not in seen.body.decode() + json.dumps(seen.headers)
    assert result.to_wire() == reply.json


async def test_reads_use_get_without_body_or_idempotency_key(
    make_client: ClientFactory, fake: FakeProtocolServer
) -> None:
    fake.script("GET", "/v1/balances", Reply(json=balances_reply()))
    fake.script("GET", "/v1/reservations/rsv_1", Reply(json=detail_reply()))
    fake.script("GET", "/v1/reservations", Reply(json=list_reply()))
    client = make_client()

    page = await client("balances", BalanceQuery(tenant="acme", workflow="run-42"), tenant="x")
    detail = await client("get_reservation", "rsv_1")
    listing = await client("list_reservations", ReservationQuery())

    assert [b.scope for b in page.balances] == ["tenant:acme"]
    assert detail.reservation_id == "rsv_1"
    assert (listing.next_cursor, listing.has_more) == ("c2", True)
    for seen in fake.seen():
        assert seen.method == "GET" and seen.body == b""
        assert "x-idempotency-key" not in seen.headers and "content-type" not in seen.headers
        assert seen.headers["x-cycles-api-key"] == API_KEY
    assert fake.seen()[0].query == {"tenant": ["acme"], "workflow": ["run-42"], "limit": ["50"]}
    assert fake.seen()[2].query == {"limit": ["50"]}


async def test_list_reservations_sends_every_filter(make_client: ClientFactory, fake: FakeProtocolServer) -> None:
    fake.script("GET", "/v1/reservations", Reply(json=list_reply()))
    query = ReservationQuery(
        tenant="acme",
        agent="bot",
        status=ReservationStatus.ACTIVE,
        idempotency_key="key 1/2",
        created_from_ms=1_767_225_600_000,  # 2026-01-01T00:00:00Z
        created_to_ms=1_767_225_600_500,
        expires_from_ms=0,
        expires_to_ms=1_767_225_601_000,
        finalized_from_ms=1_767_225_602_000,
        finalized_to_ms=1_767_225_603_000,
        sort_by="expires_at_ms",
        sort_dir="asc",
        include=("metadata", "committed_metadata"),
        limit=10,
        cursor="abc=",
    )
    await make_client()("list_reservations", query)

    [seen] = fake.seen()
    assert seen.query == {
        "idempotency_key": ["key 1/2"],
        "status": ["ACTIVE"],
        "tenant": ["acme"],
        "agent": ["bot"],
        "from": ["2026-01-01T00:00:00.000Z"],
        "to": ["2026-01-01T00:00:00.500Z"],
        "expires_from": ["1970-01-01T00:00:00.000Z"],
        "expires_to": ["2026-01-01T00:00:01.000Z"],
        "finalized_from": ["2026-01-01T00:00:02.000Z"],
        "finalized_to": ["2026-01-01T00:00:03.000Z"],
        "sort_by": ["expires_at_ms"],
        "sort_dir": ["asc"],
        "include": ["metadata,committed_metadata"],
        "limit": ["10"],
        "cursor": ["abc="],
    }


async def test_balances_sends_include_children_only_when_set(
    make_client: ClientFactory, fake: FakeProtocolServer
) -> None:
    fake.script("GET", "/v1/balances", Reply(json=balances_reply()))
    await make_client()("balances", BalanceQuery(app="chat", include_children=True, limit=200, cursor="n"))
    assert fake.seen()[0].query == {
        "app": ["chat"],
        "include_children": ["true"],
        "limit": ["200"],
        "cursor": ["n"],
    }


async def test_reservation_ids_are_percent_encoded_in_paths(
    make_client: ClientFactory, fake: FakeProtocolServer
) -> None:
    rid = "rsv/odd id?#"
    fake.script("GET", "/v1/reservations/" + rid, Reply(json=detail_reply(rid)))
    detail = await make_client()("get_reservation", rid)
    assert detail.reservation_id == rid
    assert fake.seen()[0].raw_path == "/v1/reservations/rsv%2Fodd%20id%3F%23"


async def test_responses_tolerate_fields_added_by_newer_servers(
    make_client: ClientFactory, fake: FakeProtocolServer
) -> None:
    evidence = {
        "evidence_id": "a" * 64,
        "cycles_evidence_url": "https://cycles.example/v1/evidence/" + "a" * 64,
    }
    reply = reservation_reply(cycles_evidence=evidence)
    reply["balances"] = [{**balance(), "future_field": 1}]
    fake.script("POST", "/v1/reservations", Reply(json=reply))
    result = await make_client()("reserve", _reserve_req())
    assert result.reservation_id == "rsv_1"
    assert result.balances is not None and result.balances[0].remaining.amount == 700
    assert len(fake.seen()) == 1


async def test_trace_context_headers_reach_the_server(make_client: ClientFactory, fake: FakeProtocolServer) -> None:
    fake.script("POST", "/v1/reservations", Reply(json=reservation_reply()))
    client = make_client()
    traceparent = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
    with trace_context(TRACE_ID, traceparent=traceparent):
        await client("reserve", _reserve_req("k1"))
    await client("reserve", _reserve_req("k2"))

    inside, outside = fake.seen()
    assert inside.headers["x-cycles-trace-id"] == TRACE_ID
    assert inside.headers["traceparent"] == traceparent
    assert "x-cycles-trace-id" not in outside.headers and "traceparent" not in outside.headers


def test_trace_context_rejects_malformed_ids() -> None:
    for bad in ("4BF92F3577B34DA6A3CE929D0E0E4736", "0" * 32, "abc"):
        with pytest.raises(ValueError, match="32 lowercase hex"), trace_context(bad):
            pass
    with pytest.raises(ValueError, match="printable ASCII"), trace_context(traceparent="00-x\r\nX-Evil: 1"):
        pass


async def test_an_idempotency_key_that_cannot_be_a_header_travels_in_the_body_only(
    make_client: ClientFactory, fake: FakeProtocolServer
) -> None:
    fake.script("POST", "/v1/reservations", Reply(json=reservation_reply()))
    key = "line\r\nX-Injected: yes"
    await make_client()("reserve", _reserve_req(key))
    [seen] = fake.seen()
    assert seen.json["idempotency_key"] == key
    assert "x-idempotency-key" not in seen.headers and "x-injected" not in seen.headers


@pytest.mark.parametrize("suffix", ["", "/", "/v1", "/v1/"])
async def test_base_url_forms(make_client: ClientFactory, fake: FakeProtocolServer, suffix: str) -> None:
    fake.script("POST", "/v1/reservations", Reply(json=reservation_reply()))
    await make_client(fake.url + suffix)("reserve", _reserve_req())
    assert fake.seen()[0].raw_path == "/v1/reservations"


async def test_a_path_prefix_is_kept(make_client: ClientFactory, fake: FakeProtocolServer) -> None:
    fake.script("POST", "/cycles/v1/reservations", Reply(json=reservation_reply()))
    await make_client(fake.url + "/cycles")("reserve", _reserve_req())
    assert fake.seen()[0].raw_path == "/cycles/v1/reservations"


@pytest.mark.parametrize(
    "url",
    ["ftp://host", "http://user:pw@host:1", "http://host:1/?x=1", "http://host:99999", "http://"],
)
def test_bad_urls_are_refused(url: str) -> None:
    with pytest.raises(InvalidRequest):
        HttpLedger(url)


def test_header_injection_through_options_is_refused() -> None:
    with pytest.raises(InvalidRequest, match="printable ASCII"):
        HttpLedger("http://127.0.0.1:1", api_key="k\r\nX-Evil: 1")
    with pytest.raises(InvalidRequest, match="printable ASCII"):
        HttpLedger("http://127.0.0.1:1", headers={"X Bad": "v"})


async def test_sweep_is_left_to_the_server(make_client: ClientFactory, fake: FakeProtocolServer) -> None:
    assert await make_client()("sweep") == 0
    assert fake.seen() == []


def test_api_key_defaults_to_the_environment(fake: FakeProtocolServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CYCLES_API_KEY", "from-env")
    monkeypatch.setenv("CYCLES_ADMIN_KEY", "never-read-by-the-client")
    fake.script("GET", "/v1/reservations/r", Reply(json=detail_reply("r")))
    with HttpLedger(fake.url) as ledger:
        ledger.get_reservation("r")
        with pytest.raises(InvalidRequest, match="admin_key"):
            ledger.list_budgets()
    assert fake.seen()[0].headers["x-cycles-api-key"] == "from-env"


# ---- the operator plane (this project's admin API, not protocol v0) ---------------------------


async def test_budget_administration_needs_an_admin_key(make_client: ClientFactory, fake: FakeProtocolServer) -> None:
    client = make_client()
    calls: list[tuple[str, tuple[Any, ...]]] = [
        ("set_budget", ("tenant:acme", usd(1))),
        ("fund_budget", ("tenant:acme", usd(1))),
        ("set_budget_status", ("tenant:acme", "FROZEN")),
        ("get_budget", ("tenant:acme",)),
        ("list_budgets", ()),
    ]
    for method, args in calls:
        with pytest.raises(InvalidRequest, match=r"not part of Cycles protocol v0.*admin_key"):
            await client(method, *args)
    assert fake.seen() == []


async def test_admin_calls_use_the_operator_plane(make_client: ClientFactory, fake: FakeProtocolServer) -> None:
    scope = "tenant:acme/workflow:run-42"
    fake.script("POST", "/admin/budgets", Reply(status=201, json=balance(scope)))
    fake.script("POST", "/admin/budgets/fund", Reply(json=balance(scope)))
    fake.script("POST", "/admin/budgets/status", Reply(json={"budgets": [balance(scope)]}))
    fake.script("GET", f"/admin/budgets/{scope}", Reply(json=balance(scope)))
    fake.script("GET", "/admin/budgets", Reply(json={"budgets": [balance(), balance(scope)]}))
    client = make_client(admin_key=ADMIN_KEY)

    caps = Caps(tool_denylist=["deploy"])
    assert (await client("set_budget", scope, usd(1), overdraft_limit=usd(0.5), caps=caps)).scope == scope
    assert (await client("fund_budget", scope, usd(2))).scope == scope
    assert [b.scope for b in await client("set_budget_status", scope, "FROZEN", unit=Unit.USD_MICROCENTS)] == [scope]
    assert (await client("get_budget", scope, unit=Unit.USD_MICROCENTS)).scope == scope
    assert len(await client("list_budgets", tenant="acme")) == 2

    set_, fund, status, get, listing = fake.seen()
    assert set_.json == {
        "scope": scope,
        "amount": {"unit": "USD_MICROCENTS", "amount": 100_000_000},
        "overdraft_limit": {"unit": "USD_MICROCENTS", "amount": 50_000_000},
        "caps": {"tool_denylist": ["deploy"]},
    }
    assert fund.json == {"scope": scope, "amount": {"unit": "USD_MICROCENTS", "amount": 200_000_000}}
    assert status.json == {"scope": scope, "status": "FROZEN", "unit": "USD_MICROCENTS"}
    assert (get.raw_path, get.query) == (f"/admin/budgets/{scope}", {"unit": ["USD_MICROCENTS"]})
    assert (listing.raw_path, listing.query) == ("/admin/budgets", {"tenant": ["acme"]})
    for seen in fake.seen():
        assert seen.headers["x-admin-api-key"] == ADMIN_KEY
        assert "x-cycles-api-key" not in seen.headers


async def test_delete_budget_is_a_delete_on_its_path(make_client: ClientFactory, fake: FakeProtocolServer) -> None:
    from cycles import BudgetInUse

    from .conftest import error_body

    scope = "tenant:acme/workflow:run-42"
    refused = Reply(status=409, json=error_body("BUDGET_IN_USE", "reserved"))
    fake.script("DELETE", f"/admin/budgets/{scope}", Reply(json={"budgets": [balance(scope)]}), refused)
    client = make_client(admin_key=ADMIN_KEY)
    gone = await client("delete_budget", scope, unit=Unit.USD_MICROCENTS, force=True)
    assert [b.scope for b in gone] == [scope]
    with pytest.raises(BudgetInUse, match="reserved"):
        await client("delete_budget", scope)
    first, second = fake.seen()
    assert (first.method, first.raw_path, first.query) == (
        "DELETE",
        f"/admin/budgets/{scope}",
        {"unit": ["USD_MICROCENTS"], "force": ["true"]},
    )
    assert second.query == {} and first.headers["x-admin-api-key"] == ADMIN_KEY


async def test_admin_errors_map_like_protocol_errors(make_client: ClientFactory, fake: FakeProtocolServer) -> None:
    from .conftest import error_body

    fake.script("GET", "/admin/budgets/tenant:nope", Reply(status=404, json=error_body("NOT_FOUND", "no budget")))
    with pytest.raises(NotFound, match="no budget"):
        await make_client(admin_key=ADMIN_KEY)("get_budget", "tenant:nope")


async def test_an_admin_key_alone_reads_reservations_with_admin_auth(
    make_client: ClientFactory, fake: FakeProtocolServer
) -> None:
    fake.script("GET", "/v1/reservations/rsv_1", Reply(json=detail_reply()))
    await make_client(api_key=None, admin_key=ADMIN_KEY)("get_reservation", "rsv_1")
    [seen] = fake.seen()
    assert seen.headers["x-admin-api-key"] == ADMIN_KEY and "x-cycles-api-key" not in seen.headers


def test_fake_server_replies_conform() -> None:
    """The canned replies the tests use are valid protocol responses (so the tests prove the
    client against the spec, not against a fake's idea of it)."""
    for schema, body in [
        ("ReservationCreateResponse", reservation_reply()),
        ("CommitResponse", commit_reply()),
        ("ReleaseResponse", release_reply()),
        ("ReservationExtendResponse", extend_reply()),
        ("DecisionResponse", decision_reply()),
        ("EventCreateResponse", event_reply()),
        ("BalanceResponse", balances_reply()),
        ("ReservationDetail", detail_reply()),
        ("ReservationListResponse", list_reply()),
    ]:
        assert_schema(schema, body)
    from .conftest import error_body

    assert_schema("ErrorResponse", error_body("BUDGET_EXCEEDED", details={"scope": "tenant:acme"}))
