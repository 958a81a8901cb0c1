"""Action quotas and action-kind access (action-kinds / protocol-extensions v0.1.26) on every
backend: windows and their keys, the per_run lifecycle, the normative evaluation order, atomicity
with the budget, races, and deny_detail shapes checked against the extension spec's schema."""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from cycles import (
    Action,
    ActionKindDenied,
    ActionKindNotAllowed,
    ActionQuotaExceeded,
    BudgetExceeded,
    Cycles,
    Decision,
    Denied,
    InvalidRequest,
    NotFound,
    Subject,
    tokens,
)

from .clocked import Clock, at, clocked_client
from .conftest import MULTI_PROCESS, Backend, open_backend
from .helpers import amounts, bal

EMAIL = Action("message.email.send", "smtp")
POST = Action("http.post", "webhook")
SEARCH = Action("web.search", "q")


def run(run_id: str, **levels: str) -> Subject:
    return Subject(tenant="acme", dimensions={"run_id": run_id}, **levels)


@pytest.fixture
def clock() -> Clock:
    return Clock(at(2026, 4, 9, 14, 32, 10))


@pytest.fixture
def tcy(
    backend: str, ledger: Backend, tmp_path: Path, request: pytest.FixtureRequest, clock: Clock
) -> Iterator[Cycles]:
    with clocked_client(backend, ledger, tmp_path, request, clock) as client:
        client.budgets.set("tenant:acme", tokens(1_000_000))
        yield client


def grants(cy: Cycles, subject: Subject, action: Action, n: int, *, commit: bool = True) -> int:
    granted = 0
    for _ in range(n):
        try:
            r = cy.reserve(subject, action, tokens(1))
        except Denied:
            continue
        granted += 1
        assert r.reservation_id
        if commit:
            cy.commit(r.reservation_id, tokens(1))
    return granted


def test_max_calls_5_per_run_lets_exactly_five_through_in_every_run(tcy: Cycles) -> None:
    q = tcy.quotas.set("tenant:acme", action_kind="message.email.send", max_calls=5, window="per_run")
    assert (q.scope, q.max_calls, q.window) == ("tenant:acme", 5, "per_run")
    for r in ("run-1", "run-2", "run-3"):
        assert grants(tcy, run(r), EMAIL, 8) == 5
    with pytest.raises(ActionQuotaExceeded) as err:
        tcy.reserve(run("run-1"), EMAIL, tokens(1))
    assert isinstance(err.value, Denied) and err.value.http_status == 409
    qv = err.value.deny_detail["quota_violation"]
    assert qv == {
        "action_kind": "message.email.send",
        "window": "per_run",
        "window_key": "run-1",
        "used": 5,
        "limit": 5,
        "scope": "tenant:acme",
    }
    assert "5" in (err.value.suggested_fix or "")
    assert grants(tcy, run("run-1"), SEARCH, 3) == 3  # other kinds are not counted


def test_a_per_run_quota_needs_a_run_id(tcy: Cycles) -> None:
    tcy.quotas.set("tenant:acme", action_kind="message.email.send", max_calls=5, window="per_run")
    with pytest.raises(InvalidRequest, match="run_id"):
        tcy.reserve(Subject(tenant="acme"), EMAIL, tokens(1))
    tcy.reserve(Subject(tenant="acme"), SEARCH, tokens(1))  # no per_run quota applies: no run_id needed
    assert amounts(bal(tcy, "tenant:acme"))[2] == 1


def test_a_denied_reservation_counts_nothing_and_changes_no_balance(tcy: Cycles) -> None:
    tcy.budgets.set("tenant:acme/workflow:small", tokens(3))
    tcy.quotas.set("tenant:acme", action_kind="message.email.send", max_calls=5, window="per_run")
    sub = run("r", workflow="small")
    assert grants(tcy, sub, EMAIL, 10, commit=False) == 3  # the budget stops it first
    with pytest.raises(BudgetExceeded):
        tcy.reserve(sub, EMAIL, tokens(1))
    tcy.budgets.fund("tenant:acme/workflow:small", tokens(100))
    assert grants(tcy, sub, EMAIL, 10, commit=False) == 2  # the 7 budget denials counted nothing
    before = amounts(bal(tcy, "tenant:acme/workflow:small"))
    with pytest.raises(ActionQuotaExceeded):
        tcy.reserve(sub, EMAIL, tokens(1))
    assert amounts(bal(tcy, "tenant:acme/workflow:small")) == before


def test_per_run_counts_come_back_on_release_and_expiry_but_not_commit(tcy: Cycles, clock: Clock) -> None:
    tcy.quotas.set("tenant:acme", action_kind="message.email.send", max_calls=2, window="per_run")
    sub = run("r")
    a = tcy.reserve(sub, EMAIL, tokens(1))
    b = tcy.reserve(sub, EMAIL, tokens(1), ttl_ms=1000, grace_period_ms=0)
    assert a.reservation_id and b.reservation_id
    with pytest.raises(ActionQuotaExceeded):
        tcy.reserve(sub, EMAIL, tokens(1))
    tcy.release(a.reservation_id)  # a cancelled call does not count
    c = tcy.reserve(sub, EMAIL, tokens(1))
    assert c.reservation_id
    tcy.commit(c.reservation_id, tokens(1))  # a committed one counts for good
    clock.advance(1500)
    assert tcy.sweep() == 1  # b expires: its count comes back
    d = tcy.reserve(sub, EMAIL, tokens(1))
    assert d.reservation_id
    with pytest.raises(ActionQuotaExceeded):
        tcy.reserve(sub, EMAIL, tokens(1))


@pytest.mark.parametrize(
    ("window", "step_ms", "key"),
    [
        ("per_minute_tumbling", 60_000, "2026-04-09T14:32"),
        ("per_hour_tumbling", 3_600_000, "2026-04-09T14"),
        ("per_day_tumbling", 86_400_000, "2026-04-09"),
    ],
)
def test_tumbling_windows_are_utc_calendar_buckets(
    tcy: Cycles, clock: Clock, window: str, step_ms: int, key: str
) -> None:
    tcy.quotas.set("tenant:acme", action_kind="http.post", max_calls=3, window=window)
    sub = Subject(tenant="acme")
    r = tcy.reserve(sub, POST, tokens(1))
    assert r.reservation_id
    tcy.release(r.reservation_id)  # tumbling counts are not given back: the window decides
    assert grants(tcy, sub, POST, 5) == 2
    with pytest.raises(ActionQuotaExceeded) as err:
        tcy.reserve(sub, POST, tokens(1))
    assert err.value.deny_detail["quota_violation"]["window_key"] == key
    start = clock.ms - clock.ms % step_ms
    clock.ms = start + step_ms - 1  # the bucket's last ms
    with pytest.raises(ActionQuotaExceeded):
        tcy.reserve(sub, POST, tokens(1))
    clock.ms = start + step_ms  # the next bucket: whole again, nothing scheduled
    assert grants(tcy, sub, POST, 5) == 3


def test_per_tenant_per_day_counts_at_the_tenant_across_the_hierarchy(tcy: Cycles) -> None:
    tcy.quotas.set("tenant:acme/workspace:a", action_kind="http.post", max_calls=4, window="per_tenant_per_day")
    tcy.quotas.set("tenant:acme/workspace:b", action_kind="http.post", max_calls=4, window="per_tenant_per_day")
    a, b = Subject(tenant="acme", workspace="a"), Subject(tenant="acme", workspace="b")
    assert grants(tcy, a, POST, 3) == 3
    assert grants(tcy, b, POST, 3) == 1  # one counter for the tenant's day
    with pytest.raises(ActionQuotaExceeded) as err:
        tcy.reserve(b, POST, tokens(1))
    assert err.value.deny_detail["quota_violation"]["scope"] == "tenant:acme"


def test_the_most_specific_scope_with_a_rule_for_the_kind_decides(tcy: Cycles) -> None:
    tcy.quotas.set("tenant:acme", action_kind="message.email.send", max_calls=5, window="per_run")
    tcy.quotas.set("tenant:acme/workflow:strict", action_kind="message.email.send", max_calls=2, window="per_run")
    assert grants(tcy, run("r", workflow="strict"), EMAIL, 5) == 2
    assert grants(tcy, run("r", workflow="other"), EMAIL, 9) == 5


def test_risk_class_quotas_aggregate_and_come_before_kind_quotas(tcy: Cycles) -> None:
    tcy.quotas.set("tenant:acme", risk_class="external_side_effect", max_calls=3, window="per_hour_tumbling")
    tcy.quotas.set("tenant:acme", action_kind="http.post", max_calls=1, window="per_hour_tumbling")
    sub = Subject(tenant="acme")
    assert grants(tcy, sub, POST, 1) == 1
    assert grants(tcy, sub, EMAIL, 5) == 2  # email and http.post share the external_side_effect count
    with pytest.raises(ActionQuotaExceeded) as err:
        tcy.reserve(sub, POST, tokens(1))  # both exhausted: the risk-class step reports first
    qv = err.value.deny_detail["quota_violation"]
    assert qv["risk_class"] == "external_side_effect" and qv["action_kind"] == "http.post" and qv["limit"] == 3
    assert grants(tcy, sub, SEARCH, 2) == 2  # read_only is another class
    with pytest.raises(InvalidRequest, match="custom"):
        tcy.reserve(sub, Action("custom.acme.erp", "x"), tokens(1))  # undeclared custom kind, class needed


def test_access_lists_come_first_and_the_denylist_wins_over_everything(tcy: Cycles) -> None:
    tcy.quotas.deny_kinds("tenant:acme/agent:intern", ["code.deploy"])
    intern = Subject(tenant="acme", agent="intern")
    with pytest.raises(ActionKindDenied) as denied:
        tcy.reserve(intern, Action("code.deploy", "prod"), tokens(1))
    assert denied.value.deny_detail["reason_code"] == "ACTION_KIND_DENIED"
    assert denied.value.deny_detail["blocked_by_scope"] == "tenant:acme/agent:intern"
    tcy.reserve(intern, SEARCH, tokens(1))
    # no budget at all for this tenant: access control still answers before NOT_FOUND
    tcy.quotas.allow_kinds("tenant:other", ["web.search"])
    with pytest.raises(ActionKindNotAllowed):
        tcy.reserve(Subject(tenant="other"), EMAIL, tokens(1))
    with pytest.raises(NotFound):
        tcy.reserve(Subject(tenant="other"), SEARCH, tokens(1))
    with pytest.raises(InvalidRequest, match="mutually exclusive"):
        tcy.quotas.deny_kinds("tenant:other", ["code.exec"])
    policy = tcy.quotas.allow_kinds("tenant:other", [])
    assert policy.allowed_action_kinds == []


def test_evaluation_order_quota_before_budget(tcy: Cycles) -> None:
    tcy.budgets.set("tenant:acme/workflow:w", tokens(1))
    tcy.quotas.set("tenant:acme", action_kind="http.post", max_calls=1, window="per_day_tumbling")
    sub = Subject(tenant="acme", workflow="w")
    assert grants(tcy, sub, POST, 1) == 1
    with pytest.raises(ActionQuotaExceeded):  # budget and quota both exhausted: the quota answers
        tcy.reserve(sub, POST, tokens(5))


def test_dry_run_and_decide_deny_with_detail_and_count_nothing(tcy: Cycles) -> None:
    tcy.quotas.set("tenant:acme", action_kind="message.email.send", max_calls=1, window="per_run")
    sub = run("r")
    for _ in range(3):
        dry = tcy.reserve(sub, EMAIL, tokens(1), dry_run=True)
        assert dry.decision is not Decision.DENY and dry.reservation_id is None
    assert grants(tcy, sub, EMAIL, 1) == 1
    dry = tcy.reserve(sub, EMAIL, tokens(1), dry_run=True)
    assert dry.decision is Decision.DENY and dry.reason_code == "ACTION_QUOTA_EXCEEDED"
    assert dry.deny_detail and dry.deny_detail["quota_violation"]["used"] == 1
    decided = tcy.decide(sub, EMAIL, tokens(1))
    assert decided.decision is Decision.DENY and decided.reason_code == "ACTION_QUOTA_EXCEEDED"
    assert decided.deny_detail == dry.deny_detail
    over = tcy.decide(Subject(tenant="acme"), SEARCH, tokens(10**9))
    assert over.deny_detail is not None and over.deny_detail["reason_code"] == "BUDGET_EXCEEDED"
    assert over.deny_detail["budget_remaining"] == 1_000_000 - 1


def test_policy_keys_allowlists_select_which_calls_a_quota_counts(tcy: Cycles) -> None:
    tcy.quotas.set(
        "tenant:acme", action_kind="http.post", max_calls=1, window="per_day_tumbling", host_allowlist=["api.x.com"]
    )
    sub = Subject(tenant="acme")
    to_x = Action("http.post", "w", policy_keys={"host": "api.x.com"})
    assert grants(tcy, sub, to_x, 3) == 1
    assert grants(tcy, sub, Action("http.post", "w", policy_keys={"host": "api.y.com"}), 3) == 3
    assert grants(tcy, sub, POST, 3) == 3  # no host given: the host-scoped quota does not apply


def test_quotas_are_listed_read_and_deleted(tcy: Cycles) -> None:
    tcy.quotas.set("tenant:acme", action_kind="message.email.send", max_calls=5, window="per_run")
    tcy.quotas.set("tenant:acme", action_kind="message.email.send", max_calls=7, window="per_run")  # replaces
    tcy.quotas.set("tenant:acme/workflow:w", risk_class="high_risk", max_calls=2, window="per_hour_tumbling")
    tcy.quotas.set("tenant:zeta", action_kind="http.post", max_calls=1, window="per_day_tumbling")
    listed = tcy.quotas.list(tenant="acme")
    assert sorted((q.scope, q.target, q.max_calls) for q in listed) == [
        ("tenant:acme", "message.email.send", 7),
        ("tenant:acme/workflow:w", "__risk__:high_risk", 2),
    ]
    got = tcy.quotas.get("tenant:acme", action_kind="message.email.send", window="per_run")
    assert got.max_calls == 7
    tcy.quotas.delete("tenant:acme", action_kind="message.email.send", window="per_run")
    with pytest.raises(NotFound):
        tcy.quotas.get("tenant:acme", action_kind="message.email.send", window="per_run")
    with pytest.raises(NotFound):
        tcy.quotas.delete("tenant:acme", action_kind="message.email.send", window="per_run")
    assert grants(tcy, run("r"), EMAIL, 9) == 9
    with pytest.raises(InvalidRequest):
        tcy.quotas.set("tenant:acme", action_kind="x.y", max_calls=0, window="per_run")
    with pytest.raises(InvalidRequest):
        tcy.quotas.set("tenant:acme", action_kind="x.y", max_calls=1, window="per_week")


def test_every_deny_detail_is_valid_against_the_extension_schema(tcy: Cycles) -> None:
    validate = deny_detail_validator()
    tcy.budgets.set("tenant:acme/workflow:w", tokens(2))
    tcy.quotas.set("tenant:acme", action_kind="http.post", max_calls=1, window="per_run")
    tcy.quotas.set("tenant:acme", risk_class="high_risk", max_calls=1, window="per_minute_tumbling")
    tcy.quotas.deny_kinds("tenant:acme/agent:a", ["code.deploy"])
    tcy.quotas.allow_kinds("tenant:acme/agent:b", ["web.search"])
    sub = run("r", workflow="w")
    grants(tcy, sub, POST, 1)
    grants(tcy, sub, Action("code.exec", "sh"), 1)
    seen = set()
    for subject, action, amount in [
        (sub, POST, 1),
        (sub, Action("code.exec", "sh"), 1),
        (run("r", agent="a"), Action("code.deploy", "x"), 1),
        (run("r", agent="b"), EMAIL, 1),
        (sub, SEARCH, 5),
        (Subject(tenant="nobody"), SEARCH, 1),
    ]:
        try:
            tcy.reserve(subject, action, tokens(amount))
        except (Denied, NotFound) as exc:
            detail = exc.deny_detail if isinstance(exc, Denied) else None
            if detail is not None:
                validate(detail)
                seen.add(detail["reason_code"])
        else:
            raise AssertionError(f"{action.kind} was not denied")
        dry = tcy.decide(subject, action, tokens(amount))
        assert dry.deny_detail is not None
        validate(dry.deny_detail)
    assert seen == {"ACTION_QUOTA_EXCEEDED", "ACTION_KIND_DENIED", "ACTION_KIND_NOT_ALLOWED", "BUDGET_EXCEEDED"}


def deny_detail_validator() -> Any:
    import yaml
    from jsonschema import Draft202012Validator

    from tests.server.spec import find_spec

    base = find_spec()
    assert base is not None, "the protocol spec is needed (../shared/spec)"
    doc = yaml.safe_load((base.parent / "cycles-protocol-extensions-v0.1.26.yaml").read_text())
    schemas = doc["components"]["schemas"]
    validator = Draft202012Validator({"$ref": "#/components/schemas/DenyDetail", "components": {"schemas": schemas}})
    return validator.validate


# ---- races ----------------------------------------------------------------------------------


def _race(cy: Cycles, threads: int, attempts: int, run_ids: list[str]) -> dict[str, int]:
    granted = dict.fromkeys(run_ids, 0)
    lock = threading.Lock()

    def worker(i: int) -> None:
        for k in range(attempts):
            rid = run_ids[(i + k) % len(run_ids)]
            try:
                cy.reserve(run(rid), EMAIL, tokens(1))
            except ActionQuotaExceeded:
                continue
            with lock:
                granted[rid] += 1

    with ThreadPoolExecutor(threads) as pool:
        for f in [pool.submit(worker, i) for i in range(threads)]:
            f.result()
    return granted


def _race_in_child(spec: tuple[str, str, bool], run_ids: list[str], out: Any) -> None:
    with open_backend(spec, heartbeat=False) as cy:
        out.put(_race(cy, 3, 8, run_ids))


def test_threads_racing_a_per_run_quota_get_exactly_max_calls(cy: Cycles) -> None:
    cy.budgets.set("tenant:acme", tokens(10_000))
    cy.quotas.set("tenant:acme", action_kind="message.email.send", max_calls=5, window="per_run")
    assert _race(cy, 8, 12, ["a", "b", "c"]) == {"a": 5, "b": 5, "c": 5}


def test_processes_racing_a_per_run_quota_get_exactly_max_calls(cy: Cycles, ledger: Backend, backend: str) -> None:
    if backend not in MULTI_PROCESS:
        pytest.skip(f"{backend} state is private to one process")
    cy.budgets.set("tenant:acme", tokens(10_000))
    cy.quotas.set("tenant:acme", action_kind="message.email.send", max_calls=5, window="per_run")
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    runs = ["a", "b", "c"]
    procs = [ctx.Process(target=_race_in_child, args=(ledger.spec, runs, out)) for _ in range(4)]
    for p in procs:
        p.start()
    totals = dict.fromkeys(runs, 0)
    for _ in procs:
        for rid, n in out.get(timeout=180).items():
            totals[rid] += n
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert totals == {"a": 5, "b": 5, "c": 5}
    assert amounts(bal(cy, "tenant:acme"))[2] == 15  # reserved: exactly the granted ones


# ---- observe mode ---------------------------------------------------------------------------


def _observed(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [r.cycles for r in caplog.records if r.name == "cycles.observe"]  # type: ignore[attr-defined]


def test_observe_mode_evaluates_everything_and_changes_nothing(tcy: Cycles, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="cycles.observe")
    tcy.quotas.set("tenant:acme", action_kind="message.email.send", max_calls=1, window="per_run")
    sub = run("r")
    assert grants(tcy, sub, EMAIL, 1) == 1
    before = amounts(bal(tcy, "tenant:acme"))
    denied = tcy.reserve(sub, EMAIL, tokens(1), observe_mode="OBSERVE")
    assert denied.decision is Decision.DENY and denied.reservation_id is None and denied.expires_at_ms is None
    assert denied.deny_detail and denied.deny_detail["reason_code"] == "ACTION_QUOTA_EXCEEDED"
    assert denied.affected_scopes == ["tenant:acme"]
    allowed = tcy.reserve(Subject(tenant="acme"), SEARCH, tokens(5), observe_mode="OBSERVE")
    assert allowed.decision is Decision.ALLOW and allowed.reservation_id is None
    assert amounts(bal(tcy, "tenant:acme")) == before  # no balance and no counter moved
    events = _observed(caplog)
    assert [e["event_type"] for e in events] == ["reservation.observed_denied", "reservation.observed_allowed"]
    assert events[0]["data"]["deny_detail"] == denied.deny_detail
    assert events[0]["data"]["would_have_blocked_at"] == "tenant:acme" and events[1]["data"]["estimated_amount"] == 5
    assert len(events[0]["correlation_id"]) == 32 and "correlation_id" not in events[1]  # no run_id: none


def test_a_tenant_in_observe_mode_is_observed_unless_a_request_says_enforce(
    tcy: Cycles, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="cycles.observe")
    tcy.budgets.set("tenant:acme/workflow:w", tokens(1))
    sub = Subject(tenant="acme", workflow="w")
    policy = tcy.quotas.set_observe_mode("tenant:acme", "OBSERVE")
    assert policy.observe_mode == "OBSERVE"
    shadow = tcy.reserve(sub, SEARCH, tokens(5))  # would exceed: observed, not refused, nothing held
    assert shadow.decision is Decision.DENY and shadow.reason_code == "BUDGET_EXCEEDED"
    assert [e["event_type"] for e in _observed(caplog)] == ["reservation.observed_denied"]
    with pytest.raises(BudgetExceeded):
        tcy.reserve(sub, SEARCH, tokens(5), observe_mode="ENFORCE")
    tcy.quotas.set_observe_mode("tenant:acme", "ENFORCE")
    with pytest.raises(BudgetExceeded):
        tcy.reserve(sub, SEARCH, tokens(5))
    with pytest.raises(InvalidRequest):
        tcy.quotas.set_observe_mode("tenant:acme/workflow:w", "OBSERVE")


# ---- loop guard -----------------------------------------------------------------------------


def test_the_loop_guard_is_off_by_default_and_caps_identical_steps_when_on(tcy: Cycles) -> None:
    from cycles import LoopDetected, with_args_fingerprint

    lookup = Action("tool.call", "lookup_order")
    same = with_args_fingerprint(lookup, {"order": 42, "verbose": True})
    assert same == with_args_fingerprint(lookup, {"verbose": True, "order": 42})  # canonical arguments
    sub = run("r")
    assert grants(tcy, sub, same, 6, commit=False) == 6  # off by default
    tcy.quotas.set_loop_guard("tenant:acme", 3)
    sub = run("r2")
    for _ in range(3):  # failing calls are released: they still count as repeats
        r = tcy.reserve(sub, same, tokens(1))
        assert r.reservation_id
        tcy.release(r.reservation_id)
    with pytest.raises(LoopDetected) as err:
        tcy.reserve(sub, same, tokens(1))
    assert isinstance(err.value, ActionQuotaExceeded) and err.value.reason_code == "LOOP_DETECTED"
    detail = err.value.deny_detail
    assert detail["reason_code"] == "LOOP_DETECTED" and detail["quota_violation"]["used"] == 3
    deny_detail_validator()(detail)
    assert grants(tcy, sub, with_args_fingerprint(lookup, {"order": 43}), 2) == 2  # other arguments
    assert grants(tcy, run("r3"), same, 3) == 3  # another run
    assert grants(tcy, sub, lookup, 5) == 5  # no fingerprint: nothing to compare
    dry = tcy.decide(sub, same, tokens(1))
    assert dry.decision is Decision.DENY and dry.reason_code == "LOOP_DETECTED"
    tcy.quotas.set_loop_guard("tenant:acme", None)
    assert grants(tcy, sub, same, 2) == 2


async def test_the_async_client_has_the_same_quotas_and_periods(ledger: Backend) -> None:
    import asyncio

    from cycles.testing import assert_ledger_invariant_async

    acy = ledger.open_async()
    b = await acy.budgets.set("tenant:acme", tokens(1000), period="day", timezone="Europe/Berlin")
    assert b.period_start is not None
    await acy.quotas.set("tenant:acme", action_kind="message.email.send", max_calls=3, window="per_run")
    assert [q.max_calls for q in await acy.quotas.list(tenant="acme")] == [3]

    async def attempt() -> bool:
        try:
            await acy.reserve(run("r"), EMAIL, tokens(1))
        except ActionQuotaExceeded:
            return False
        return True

    results = await asyncio.gather(*(attempt() for _ in range(8)))
    assert sum(results) == 3
    await acy.quotas.delete("tenant:acme", action_kind="message.email.send", window="per_run")
    assert await acy.quotas.list(tenant="acme") == []
    await assert_ledger_invariant_async(acy)
    await acy.aclose()


def test_a_scope_holds_at_most_50_kind_quotas_and_20_risk_class_quotas(cy: Cycles) -> None:
    for i in range(50):
        cy.quotas.set("tenant:acme", action_kind=f"k.{i}", max_calls=1, window="per_run")
    with pytest.raises(InvalidRequest, match="at most"):
        cy.quotas.set("tenant:acme", action_kind="k.50", max_calls=1, window="per_run")
    cy.quotas.set("tenant:acme", action_kind="k.0", max_calls=2, window="per_run")  # a replacement fits
    for window in ("per_run", "per_minute_tumbling", "per_hour_tumbling", "per_day_tumbling"):
        for risk in ("read_only", "local_mutation", "side_effect", "external_side_effect", "high_risk"):
            cy.quotas.set("tenant:acme", risk_class=risk, max_calls=1, window=window)
    with pytest.raises(InvalidRequest, match="at most"):
        cy.quotas.set("tenant:acme", risk_class="high_risk", max_calls=1, window="per_tenant_per_day")
    assert len(cy.quotas.list("tenant:acme")) == 70


def test_expired_counters_are_forgotten_and_live_ones_kept(backend: str, tcy: Cycles, clock: Clock) -> None:
    tcy.quotas.set("tenant:acme", action_kind="message.email.send", max_calls=2, window="per_run")
    tcy.quotas.set("tenant:acme", action_kind="http.post", max_calls=1, window="per_minute_tumbling")
    assert grants(tcy, run("old"), EMAIL, 2) == 2
    assert grants(tcy, Subject(tenant="acme"), POST, 1) == 1
    clock.advance(23 * 3_600_000)
    assert grants(tcy, run("old"), EMAIL, 1) == 0  # a run's counter lives 24 h after its last increment
    clock.advance(2 * 3_600_000)
    tcy.sweep()
    assert grants(tcy, run("old"), EMAIL, 3) == 2  # a run idle past its TTL starts again (spec warning)
    if backend in ("memory", "sqlite"):
        ledger = tcy.ledger
        with ledger._transaction(write=True) as txn:  # type: ignore[attr-defined]
            keys = [k for k, _ in txn.scan_meta("qc|")]
        assert all("|per_minute_tumbling|" not in k for k in keys)  # the old minute's counter is gone
        assert any("|per_run|old" in k for k in keys)
