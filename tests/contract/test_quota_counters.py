"""Reading and resetting action quota counters (ledger/counters.py) on every backend: what a counter
shows, which ones a query returns, paging, tenant isolation, windows that end, and the reset
semantics of the action-kinds spec (count to 0, tumbling windows keep their end, per_run TTLs
refreshed, reservations untouched)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cycles import Action, ActionQuotaExceeded, Cycles, InvalidRequest, NotFound, Subject, tokens
from cycles.ledger.counters import CounterQuery, CounterResetRequest, CounterState
from cycles.ledger.paging import SCAN_BUDGET

from .clocked import Clock, at, clocked_client
from .conftest import Backend

EMAIL = Action("message.email.send", "smtp")
POST = Action("http.post", "hook")
HOUR = "2026-04-09T14"


def run(run_id: str, tenant: str = "acme", **levels: str) -> Subject:
    return Subject(tenant=tenant, dimensions={"run_id": run_id}, **levels)


@pytest.fixture
def clock() -> Clock:
    return Clock(at(2026, 4, 9, 14, 32, 10))


@pytest.fixture
def qcy(
    backend: str, ledger: Backend, tmp_path: Path, request: pytest.FixtureRequest, clock: Clock
) -> Iterator[Cycles]:
    """acme and acme-corp (acme's name is a prefix of it) with an email per_run quota and an hourly
    external_side_effect quota each; acme has run-1 at 2 emails, run-2 at 1; acme-corp run-1 at 1."""
    with clocked_client(backend, ledger, tmp_path, request, clock) as cy:
        for tenant in ("acme", "acme-corp"):
            cy.budgets.set(f"tenant:{tenant}", tokens(1_000_000))
            cy.quotas.set(f"tenant:{tenant}", action_kind="message.email.send", max_calls=3, window="per_run")
            cy.quotas.set(
                f"tenant:{tenant}", risk_class="external_side_effect", max_calls=100, window="per_hour_tumbling"
            )
        for subject in (run("run-1"), run("run-1"), run("run-2"), run("run-1", tenant="acme-corp")):
            cy.reserve(subject, EMAIL, tokens(1))
        yield cy


def rows(cs: list[CounterState]) -> list[tuple[str, str | None, str | None, int, int, int | None]]:
    return [(c.action_kind, c.risk_class, c.window_key, c.used, c.limit, c.remaining) for c in cs]


def reset(cy: Cycles, **fields: str) -> tuple[CounterState, int]:
    body = {"tenant_id": "acme", "scope": "tenant:acme", "action_kind": "message.email.send", "window": "per_run"}
    result = cy.ledger.reset_quota_counter(CounterResetRequest.model_validate({**body, **fields}))
    return result.counter, result.previous_used


def test_counters_show_what_was_counted_under_which_limit(qcy: Cycles) -> None:
    counters = qcy.quotas.counters("acme")
    assert rows(counters) == [
        ("__risk__", "external_side_effect", HOUR, 3, 100, 97),
        ("message.email.send", None, "run-1", 2, 3, 1),
        ("message.email.send", None, "run-2", 1, 3, 2),
    ]
    hourly, run1 = counters[0], counters[1]
    assert hourly.expires_at == "2026-04-09T15:00:00.000Z"  # the window's end, not the cleanup TTL
    assert run1.expires_at == "2026-04-10T14:32:10.000Z"  # per_run: 24 h after its last increment
    assert run1.last_incremented_at == "2026-04-09T14:32:10.000Z"
    assert {c.scope for c in counters} == {"tenant:acme"}


def test_the_limit_shown_is_the_one_counted_under(qcy: Cycles) -> None:
    qcy.quotas.set("tenant:acme", action_kind="message.email.send", max_calls=10, window="per_run")
    assert rows(qcy.quotas.counters("acme", run_id="run-1")) == [("message.email.send", None, "run-1", 2, 3, 1)]
    qcy.reserve(run("run-1"), EMAIL, tokens(1))
    assert rows(qcy.quotas.counters("acme", run_id="run-1")) == [("message.email.send", None, "run-1", 3, 10, 7)]


def test_filters(qcy: Cycles) -> None:
    def keys(**filters: object) -> list[str | None]:
        return [c.window_key for c in qcy.quotas.counters("acme", **filters)]

    assert keys(run_id="run-2") == ["run-2"]
    assert keys(window="per_hour_tumbling") == [HOUR]
    assert keys(action_kind="__risk__") == [HOUR]
    assert keys(action_kind="message.email.send") == ["run-1", "run-2"]
    assert keys(action_kind="http.post") == []
    assert keys(scope="tenant:acme") == [HOUR, "run-1", "run-2"]
    assert keys(scope="tenant:ac") == [HOUR, "run-1", "run-2"]  # a prefix of the scope, within the tenant
    assert keys(scope="tenant:acme/workspace:w") == []
    qcy.quotas.set("tenant:acme/workspace:w", action_kind="http.post", max_calls=5, window="per_day_tumbling")
    qcy.reserve(Subject(tenant="acme", workspace="w"), POST, tokens(1))
    assert keys(scope="tenant:acme/workspace:w") == ["2026-04-09"]
    assert keys(scope="tenant:acme/workspace:w", action_kind="__risk__") == []  # the risk counter is at the tenant


def test_a_tenant_never_sees_another_tenants_counters(qcy: Cycles) -> None:
    assert [c.window_key for c in qcy.quotas.counters("acme-corp")] == [HOUR, "run-1"]
    assert {c.scope for c in qcy.quotas.counters("acme-corp")} == {"tenant:acme-corp"}
    assert qcy.quotas.counters("acm") == []
    assert qcy.quotas.counters("acme", scope="tenant:acme-corp") == []
    with pytest.raises(InvalidRequest):  # a reset names one tenant and a scope under it
        reset(qcy, tenant_id="acme", scope="tenant:acme-corp", window_key="run-1")
    assert [c.used for c in qcy.quotas.counters("acme-corp")] == [1, 1]


def test_a_caller_bound_to_a_tenant_reads_and_resets_only_its_own(backend: str, qcy: Cycles) -> None:
    if backend == "http":
        pytest.skip("over HTTP the caller's tenant is its key's: tests/governance/test_action_kinds_plane.py")
    ledger = qcy.ledger
    own = ledger.list_quota_counters(CounterQuery(), tenant="acme")
    assert [c.window_key for c in own.counters] == [HOUR, "run-1", "run-2"]
    with pytest.raises(NotFound):
        ledger.list_quota_counters(CounterQuery(tenant="acme-corp"), tenant="acme")
    req = CounterResetRequest(
        tenant_id="acme-corp", scope="tenant:acme-corp", action_kind="message.email.send", window="per_run",
        window_key="run-1",
    )  # fmt: skip
    with pytest.raises(NotFound):
        ledger.reset_quota_counter(req, tenant="acme")
    with pytest.raises(InvalidRequest, match="tenant_id"):
        ledger.list_quota_counters(CounterQuery())  # a trusted caller names the tenant


def test_pages_walk_every_counter_once_and_cursors_are_bound_to_their_filters(qcy: Cycles) -> None:
    for i in range(7):
        qcy.reserve(run(f"batch-{i}"), EMAIL, tokens(1))
    everything = [c.window_key for c in qcy.quotas.counters("acme")]
    assert len(everything) == 10
    seen: list[str | None] = []
    cursor = None
    while True:
        page = qcy.quotas.counters_page("acme", limit=3, cursor=cursor)
        assert len(page.counters) <= 3
        seen += [c.window_key for c in page.counters]
        if not page.has_more:
            break
        cursor = page.next_cursor
    assert seen == everything
    first = qcy.quotas.counters_page("acme", limit=3)
    with pytest.raises(InvalidRequest, match="cursor"):
        qcy.quotas.counters_page("acme", limit=3, window="per_run", cursor=first.next_cursor)
    with pytest.raises(InvalidRequest):
        qcy.quotas.counters_page("acme", limit=201)


def test_a_selective_filter_never_walks_the_whole_tenant_in_one_page(backend: str, qcy: Cycles) -> None:
    if backend == "http":
        pytest.skip("SCAN_BUDGET rows make the HTTP variant slow; the same code serves it")
    qcy.quotas.set("tenant:acme", risk_class="external_side_effect", max_calls=100_000, window="per_hour_tumbling")
    for i in range(SCAN_BUDGET + 10):
        qcy.reserve(run(f"r{i:05d}"), EMAIL, tokens(1))
    page = qcy.quotas.counters_page("acme", run_id="zzz-none")
    assert page.counters == [] and page.has_more and page.next_cursor  # short, with a cursor to go on
    rest = qcy.quotas.counters_page("acme", run_id="zzz-none", cursor=page.next_cursor)
    assert rest.counters == [] and not rest.has_more


def test_zero_counts_are_shown_on_request_and_ended_windows_not_at_all(qcy: Cycles, clock: Clock) -> None:
    r = qcy.reserve(run("run-3"), EMAIL, tokens(1))
    assert r.reservation_id
    qcy.release(r.reservation_id)  # per_run: the count comes back
    assert "run-3" not in [c.window_key for c in qcy.quotas.counters("acme")]
    shown = {c.window_key: c.used for c in qcy.quotas.counters("acme", include_zero=True)}
    assert shown["run-3"] == 0
    clock.at(2026, 4, 9, 15, 0, 1)  # the hour is over: its counter no longer counts, nor shows
    assert [c.window_key for c in qcy.quotas.counters("acme")] == ["run-1", "run-2"]
    clock.advance(25 * 3_600_000)  # and the runs lapse 24 h after their last increment
    assert qcy.quotas.counters("acme", include_zero=True) == []


def test_reset_sets_the_count_to_zero_and_gives_the_quota_back(qcy: Cycles) -> None:
    qcy.reserve(run("run-1"), EMAIL, tokens(1))
    with pytest.raises(ActionQuotaExceeded):
        qcy.reserve(run("run-1"), EMAIL, tokens(1))
    counter, previous = reset(qcy, window_key="run-1", reason="double counted")
    assert previous == 3 and (counter.used, counter.limit, counter.remaining, counter.window_key) == (0, 3, 3, "run-1")
    for _ in range(3):
        qcy.reserve(run("run-1"), EMAIL, tokens(1))
    with pytest.raises(ActionQuotaExceeded):
        qcy.reserve(run("run-1"), EMAIL, tokens(1))
    assert [c.used for c in qcy.quotas.counters("acme", run_id="run-1")] == [3]
    assert [c.used for c in qcy.quotas.counters("acme-corp")] == [1, 1]  # nothing else moved
    balance = next(b for b in qcy.balances(tenant="acme") if b.scope == "tenant:acme")
    assert balance.reserved is not None and balance.reserved.amount == 7  # every reservation still held


def test_reset_of_a_tumbling_window_keeps_its_end_and_a_per_run_counter_refreshes_its_ttl(
    qcy: Cycles, clock: Clock
) -> None:
    clock.advance(60_000)
    hourly, previous = reset(qcy, action_kind="__risk__", risk_class="external_side_effect",
                             window="per_hour_tumbling", window_key=HOUR)  # fmt: skip
    assert previous == 3 and hourly.used == 0 and hourly.expires_at == "2026-04-09T15:00:00.000Z"
    run2, previous = reset(qcy, window_key="run-2")
    assert previous == 1 and run2.expires_at == "2026-04-10T14:33:10.000Z"  # now + 24 h
    clock.advance(23 * 3_600_000 + 59 * 60_000 + 30_000)  # past run-1's lapse, before run-2's
    assert [c.window_key for c in qcy.quotas.counters("acme", include_zero=True)] == ["run-2"]


def test_reset_needs_a_live_counter_named_exactly(qcy: Cycles, clock: Clock) -> None:
    with pytest.raises(NotFound):
        reset(qcy, window_key="run-9")
    with pytest.raises(NotFound):
        reset(qcy, action_kind="http.post", window_key="run-1")
    with pytest.raises(NotFound):  # the hour before has no counter
        reset(qcy, action_kind="__risk__", risk_class="external_side_effect", window="per_hour_tumbling",
              window_key="2026-04-09T13")  # fmt: skip
    with pytest.raises(InvalidRequest):  # a bucket written another way is not a bucket
        reset(qcy, action_kind="__risk__", risk_class="external_side_effect", window="per_hour_tumbling",
              window_key="2026-04-09 14")  # fmt: skip
    with pytest.raises(ValueError, match="risk_class"):
        reset(qcy, action_kind="__risk__", window="per_hour_tumbling", window_key=HOUR)
    clock.advance(25 * 3_600_000)
    with pytest.raises(NotFound):  # lapsed
        reset(qcy, window_key="run-1")


def test_reads_and_resets_are_the_same_through_the_async_client(ledger: Backend, backend: str) -> None:
    import asyncio

    async def main() -> None:
        acy = ledger.open_async()
        try:
            await acy.budgets.set("tenant:acme", tokens(100))
            await acy.quotas.set("tenant:acme", action_kind="message.email.send", max_calls=2, window="per_run")
            await acy.reserve(run("a"), EMAIL, tokens(1))
            assert [(c.window_key, c.used) for c in await acy.quotas.counters("acme")] == [("a", 1)]
            req = CounterResetRequest(tenant_id="acme", scope="tenant:acme", action_kind="message.email.send",
                                      window="per_run", window_key="a")  # fmt: skip
            assert (await acy.ledger.reset_quota_counter(req)).previous_used == 1
            assert await acy.quotas.counters("acme") == []
        finally:
            await acy.aclose()

    asyncio.run(main())


def test_a_threshold_is_reached_once_per_window_instance(backend: str, qcy: Cycles, clock: Clock) -> None:
    if backend == "http":
        pytest.skip("the server turns crossings into events: tests/governance/test_action_kinds_plane.py")
    from cycles.ledger.quotas import threshold_crossings

    qcy.quotas.set("tenant:acme", action_kind="http.post", max_calls=10, window="per_run", threshold_pct=0.7)
    seen: list[dict[str, object]] = []
    token = threshold_crossings.set(seen)
    try:
        held = [qcy.reserve(run("t"), POST, tokens(1)).reservation_id for _ in range(8)]
        assert [(d["used"], d["limit"], d["threshold_pct"], d["window_key"]) for d in seen] == [(7, 10, 0.7, "t")]
        rid = held[-1]
        assert rid
        qcy.release(rid)  # 7 again, then 8: the threshold was announced in this run already
        qcy.reserve(run("t"), POST, tokens(1))
        qcy.reserve(run("t"), POST, tokens(1))
        assert len(seen) == 1
        # the hourly risk-class counter (100 calls) crosses at 80, once
        for i in range(80 - 3 - 10):
            qcy.reserve(run(f"x{i}"), EMAIL, tokens(1))
        risk = [d for d in seen if d["action_kind"] == "__risk__"]
        assert [(d["used"], d["risk_class"], d["window_key"]) for d in risk] == [(80, "external_side_effect", HOUR)]
        # a reset lets the threshold announce again; so does the next window
        reset(
            qcy, action_kind="__risk__", risk_class="external_side_effect", window="per_hour_tumbling", window_key=HOUR
        )
        for i in range(80):
            qcy.reserve(run(f"y{i}"), EMAIL, tokens(1))
        clock.at(2026, 4, 9, 15, 0, 0)
        for i in range(80):
            qcy.reserve(run(f"z{i}"), EMAIL, tokens(1))
        risk = [d for d in seen if d["action_kind"] == "__risk__"]
        assert [d["window_key"] for d in risk] == [HOUR, HOUR, "2026-04-09T15"]
    finally:
        threshold_crossings.reset(token)
