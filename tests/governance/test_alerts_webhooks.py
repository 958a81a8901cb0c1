"""Threshold events at exactly the crossings, denials, budgets on the spec's paths, and webhook
delivery to a receiver on 127.0.0.1 (signature, retries on 500, replay, auto-disable), on memory,
SQLite and Redis. Ends with the operator walkthrough of docs/server.md, in HTTP calls only."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from .conftest import Api
from .receiver import Receiver, verify

USD = "USD_MICROCENTS"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def spend(api: Api, key: str, subject: dict[str, str], amount: int) -> None:
    r = api.k(
        key,
        "POST",
        "/v1/events",
        json={
            "idempotency_key": uuid.uuid4().hex,
            "subject": subject,
            "action": {"kind": "llm", "name": "m"},
            "actual": {"unit": USD, "amount": amount},
        },
    )
    assert r.status_code == 201, r.text


def crossings(api: Api, scope: str) -> list[tuple[str, Any]]:
    events = api.a("GET", f"/v1/admin/events?scope={scope}&sort_dir=asc&limit=100").json()["events"]
    return [
        (e["event_type"], e["data"].get("threshold"))
        for e in events
        if e["event_type"] in ("budget.threshold_crossed", "budget.exhausted")
    ]


def test_threshold_events_fire_at_exactly_the_crossings(api: Api) -> None:
    api.tenant("acme")
    created = api.a(
        "POST",
        "/v1/admin/budgets",
        json={"tenant_id": "acme", "scope": "tenant:acme", "unit": USD, "allocated": {"unit": USD, "amount": 1000}},
    )
    assert created.status_code == 201 and created.json()["status"] == "ACTIVE"
    key = api.key("acme")
    who = {"tenant": "acme"}
    spend(api, key, who, 799)
    assert crossings(api, "tenant:acme") == []
    spend(api, key, who, 1)  # 800 / 1000: exactly 80%
    assert crossings(api, "tenant:acme") == [("budget.threshold_crossed", 0.8)]
    spend(api, key, who, 149)  # 949
    spend(api, key, who, 1)  # 950: exactly 95%
    spend(api, key, who, 10)  # 960: nothing new
    assert crossings(api, "tenant:acme") == [("budget.threshold_crossed", 0.8), ("budget.threshold_crossed", 0.95)]
    spend(api, key, who, 40)  # 1000: 100% and exhausted
    got = crossings(api, "tenant:acme")
    assert got[2:] == [("budget.threshold_crossed", 1.0), ("budget.exhausted", 1.0)]
    # a new allocation lowers utilisation: the marks fall, and the next rise announces again
    fund = api.a(
        "POST",
        "/v1/admin/budgets/fund?tenant_id=acme&scope=tenant:acme&unit=USD_MICROCENTS",
        json={"operation": "RESET", "amount": {"unit": USD, "amount": 2000}},
    )
    assert fund.status_code == 200 and fund.json()["new_allocated"]["amount"] == 2000
    spend(api, key, who, 600)  # 1600 / 2000 = 80% again
    assert crossings(api, "tenant:acme")[4:] == [("budget.threshold_crossed", 0.8)]
    event = api.a("GET", "/v1/admin/events?event_type=budget.threshold_crossed&limit=1").json()["events"][0]
    assert event["data"]["utilization"] == 0.8 and event["data"]["direction"] == "rising"
    assert event["data"]["allocated"] == 2000 and event["request_id"]


def test_one_step_across_two_thresholds_announces_both(api: Api) -> None:
    api.tenant("acme")
    api.budget("tenant:acme", 1000)
    key = api.key("acme")
    spend(api, key, {"tenant": "acme"}, 960)
    assert crossings(api, "tenant:acme") == [("budget.threshold_crossed", 0.8), ("budget.threshold_crossed", 0.95)]


def test_denials_become_events(api: Api) -> None:
    api.tenant("acme")
    api.budget("tenant:acme", 100)
    key = api.key("acme")
    denied = api.reserve(key, {"tenant": "acme", "workflow": "w1"}, 500)
    assert denied.status_code == 409 or denied.json().get("decision") == "DENY"
    events = api.a("GET", "/v1/admin/events?event_type=reservation.denied").json()["events"]
    assert len(events) == 1
    overview = api.a("GET", "/v1/admin/overview").json()
    assert overview["recent_denials"][0]["event_id"] == events[0]["event_id"]
    assert overview["recent_denials_by_reason"] == {"BUDGET_EXCEEDED": 1}
    assert overview["tenant_counts"]["active"] == 1 and overview["budget_counts"]["total"] == 1
    data = events[0]["data"]
    assert data["reason_code"] == "BUDGET_EXCEEDED" and data["requested_amount"] == 500
    assert data["subject"]["workflow"] == "w1" and events[0]["tenant_id"] == "acme"


def test_budgets_on_spec_paths(api: Api) -> None:
    api.tenant("acme")
    body = {
        "tenant_id": "acme",
        "scope": "tenant:acme/workspace:prod",
        "unit": USD,
        "allocated": {"unit": USD, "amount": 500},
    }
    assert api.a("POST", "/v1/admin/budgets", json=body).status_code == 201
    dup = api.a("POST", "/v1/admin/budgets", json=body)
    assert dup.status_code == 409 and dup.json()["error"] == "DUPLICATE_RESOURCE"
    q = "scope=tenant:acme/workspace:prod&unit=USD_MICROCENTS"
    assert api.a("GET", f"/v1/admin/budgets/lookup?{q}").json()["allocated"]["amount"] == 500
    assert api.a("POST", f"/v1/admin/budgets/freeze?{q}", json={"reason": "audit"}).json()["status"] == "FROZEN"
    again = api.a("POST", f"/v1/admin/budgets/freeze?{q}")
    assert again.status_code == 409
    assert api.a("POST", f"/v1/admin/budgets/unfreeze?{q}").json()["status"] == "ACTIVE"
    debit = api.a(
        "POST",
        f"/v1/admin/budgets/fund?tenant_id=acme&{q}",
        json={"operation": "DEBIT", "amount": {"unit": USD, "amount": 200}},
    )
    assert debit.status_code == 200 and debit.json()["new_remaining"]["amount"] == 300
    too_much = api.a(
        "POST",
        f"/v1/admin/budgets/fund?tenant_id=acme&{q}",
        json={"operation": "DEBIT", "amount": {"unit": USD, "amount": 301}},
    )
    assert too_much.status_code == 409
    patched = api.a("PATCH", f"/v1/admin/budgets?{q}", json={"overdraft_limit": {"unit": USD, "amount": 50}})
    assert patched.json()["overdraft_limit"]["amount"] == 50
    ledgers = api.a("GET", "/v1/admin/budgets?tenant_id=acme").json()["ledgers"]
    assert [x["scope"] for x in ledgers] == ["tenant:acme/workspace:prod"]
    kinds = [e["event_type"] for e in api.a("GET", "/v1/admin/events?category=budget&sort_dir=asc").json()["events"]]
    assert kinds == ["budget.created", "budget.frozen", "budget.unfrozen", "budget.debited", "budget.updated"]
    ops = [
        x["operation"] for x in api.a("GET", "/v1/admin/audit/logs?resource_type=budget&sort_dir=asc").json()["logs"]
    ]
    assert ops == ["createBudget", "createBudget", "freezeBudget", "freezeBudget", "unfreezeBudget", "fundBudget",
                   "fundBudget", "updateBudget"]  # fmt: skip
    # a tenant key with budgets:read lists its own budgets only
    key = api.key("acme", permissions=["budgets:read"])
    assert len(api.k(key, "GET", "/v1/admin/budgets").json()["ledgers"]) == 1


def allow_loopback(api: Api) -> None:
    """The receiver listens on http://127.0.0.1: a development setting (the spec's default blocks
    plain http and loopback, against SSRF)."""
    body = {"allow_http": True, "blocked_cidr_ranges": ["10.0.0.0/8"]}
    r = api.a("PUT", "/v1/admin/config/webhook-security", json=body)
    assert r.status_code == 200 and r.json()["allow_http"] is True


def _hook(api: Api, receiver: Receiver, **extra: Any) -> tuple[str, str]:
    allow_loopback(api)
    body = {"url": receiver.url, "event_types": ["budget.threshold_crossed", "tenant.updated"], **extra}
    r = api.a("POST", "/v1/admin/webhooks?tenant_id=acme", json=body)
    assert r.status_code == 201, r.text
    return r.json()["subscription"]["subscription_id"], r.json()["signing_secret"]


def test_webhook_delivery_signed_retried_replayed(api: Api, receiver: Receiver) -> None:
    api.tenant("acme")
    sid, secret = _hook(api, receiver, retry_policy={"initial_delay_ms": 100, "max_retries": 3})
    listed = api.a("GET", "/v1/admin/webhooks?tenant_id=acme").json()["subscriptions"]
    assert listed[0]["subscription_id"] == sid and "signing_secret" not in listed[0]
    receiver.statuses = [500, 500]  # two failures, then success
    api.a("PATCH", "/v1/admin/tenants/acme", json={"name": "Acme 2"})
    receiver.wait_for(lambda: len(receiver.received) >= 3, "three attempts")
    assert all(verify(secret, r) for r in receiver.received)
    assert not verify("wrong-secret", receiver.received[0])
    first = receiver.received[0]["headers"]
    event = receiver.events()[0]
    assert event["event_type"] == "tenant.updated" and first["X-Cycles-Event-Id"] == event["event_id"]
    assert first["traceparent"].split("-")[1] == first["X-Cycles-Trace-Id"] == event["trace_id"]
    assert {e["event_id"] for e in receiver.events()} == {event["event_id"]}  # the same event, retried

    def delivered() -> bool:
        rows = api.a("GET", f"/v1/admin/webhooks/{sid}/deliveries").json()["deliveries"]
        return bool(rows) and rows[0]["status"] == "SUCCESS"

    receiver.wait_for(delivered, "the delivery to be marked SUCCESS")
    row = api.a("GET", f"/v1/admin/webhooks/{sid}/deliveries").json()["deliveries"][0]
    assert row["attempts"] == 3 and row["response_status"] == 200 and row["event_id"] == event["event_id"]

    replay = api.a("POST", f"/v1/admin/webhooks/{sid}/replay", json={"event_types": ["tenant.updated"]})
    assert replay.status_code == 202 and replay.json()["events_queued"] == 1
    receiver.wait_for(lambda: len(receiver.received) >= 4, "the replayed delivery")
    assert receiver.events()[3]["event_id"] == event["event_id"]

    test = api.a("POST", f"/v1/admin/webhooks/{sid}/test").json()
    assert test["success"] and test["response_status"] == 200
    assert receiver.events()[-1]["event_type"] == "system.webhook_test"


def test_webhook_auto_disables_after_consecutive_failures(api: Api, receiver: Receiver) -> None:
    api.tenant("acme")
    sid, _ = _hook(api, receiver, retry_policy={"max_retries": 0, "initial_delay_ms": 100}, disable_after_failures=2)
    receiver.always = 500
    api.a("PATCH", "/v1/admin/tenants/acme", json={"name": "one"})
    api.a("PATCH", "/v1/admin/tenants/acme", json={"name": "two"})

    def disabled() -> bool:
        return api.a("GET", f"/v1/admin/webhooks/{sid}").json()["status"] == "DISABLED"

    receiver.wait_for(disabled, "the subscription to be disabled")
    hook = api.a("GET", f"/v1/admin/webhooks/{sid}").json()
    assert hook["consecutive_failures"] == 2
    events = api.a("GET", "/v1/admin/events?event_type=webhook.disabled").json()["events"]
    assert events and events[0]["data"]["disable_reason"] == "consecutive_failures_exceeded_threshold"
    failed = api.a("GET", f"/v1/admin/webhooks/{sid}/deliveries?status=FAILED").json()["deliveries"]
    assert len(failed) == 2
    # re-enabling resets the counter and emits webhook.resumed
    resumed = api.a("PATCH", f"/v1/admin/webhooks/{sid}", json={"status": "ACTIVE"}).json()
    assert resumed["status"] == "ACTIVE" and resumed["consecutive_failures"] == 0


def test_tenant_self_service_webhooks_stay_within_the_boundary(api: Api, receiver: Receiver) -> None:
    api.tenant("acme")
    remote = api.a(
        "POST",
        "/v1/admin/webhooks?tenant_id=acme",
        json={"url": "http://example.com/x", "event_types": ["budget.exhausted"]},
    )
    assert remote.status_code == 400 and remote.json()["error"] == "WEBHOOK_URL_INVALID"  # http is off by default
    local = api.a(
        "POST",
        "/v1/admin/webhooks?tenant_id=acme",
        json={"url": "https://127.0.0.1/x", "event_types": ["budget.exhausted"]},
    )
    assert local.status_code == 400 and "blocked range" in local.json()["message"]  # loopback: the SSRF guard
    allow_loopback(api)
    writer = api.key("acme", permissions=["webhooks:write", "webhooks:read"])
    bad = api.k(writer, "POST", "/v1/webhooks", json={"url": receiver.url, "event_types": ["api_key.created"]})
    assert bad.status_code == 400
    ok = api.k(writer, "POST", "/v1/webhooks", json={"url": receiver.url, "event_types": ["budget.exhausted"]})
    assert ok.status_code == 201 and ok.json()["subscription"]["tenant_id"] == "acme"
    reader = api.key("acme")  # default permissions: no webhooks:*
    assert api.k(reader, "GET", "/v1/webhooks").status_code == 403
    assert len(api.k(writer, "GET", "/v1/webhooks").json()["subscriptions"]) == 1


def test_operator_walkthrough_over_http(api: Api, receiver: Receiver) -> None:
    """docs/server.md, "An operator's first hour": tenant, scoped key, monthly budget with an 80%
    alert webhook, an agent crossing 80%, the webhook firing, and the audit trail of each step."""
    assert api.a("POST", "/v1/admin/tenants", json={"tenant_id": "acme", "name": "Acme"}).status_code == 201
    key = api.a(
        "POST",
        "/v1/admin/api-keys",
        json={"tenant_id": "acme", "name": "support-bot", "scope_filter": ["workspace:support"],
              "permissions": ["reservations:create", "reservations:commit", "reservations:release", "balances:read"]},
    ).json()  # fmt: skip
    budget = api.a(
        "POST",
        "/v1/admin/budgets",
        json={"tenant_id": "acme", "scope": "tenant:acme/workspace:support", "unit": USD,
              "allocated": {"unit": USD, "amount": 10_000_000},
              "period_start": "2026-12-01T00:00:00Z", "period_end": "2027-01-01T00:00:00Z"},
    )  # fmt: skip
    assert budget.status_code == 201
    allow_loopback(api)  # only because this test's receiver is on http://127.0.0.1
    hook = api.a(
        "POST",
        "/v1/admin/webhooks?tenant_id=acme",
        json={
            "url": receiver.url,
            "event_types": ["budget.threshold_crossed"],
            "thresholds": {"budget_utilization": [0.8]},
        },
    ).json()
    secret = hook["signing_secret"]

    agent = key["key_secret"]
    subject = {"tenant": "acme", "workspace": "support", "agent": "bot"}
    for _ in range(9):  # $0.90 of $1.00 in nine $0.10 steps: crosses 80% on the eighth
        r = api.reserve(agent, subject, 1_000_000)
        assert r.status_code == 200 and r.json()["decision"] == "ALLOW"
        rid = r.json()["reservation_id"]
        done = {"idempotency_key": uuid.uuid4().hex, "actual": {"unit": USD, "amount": 1_000_000}}
        commit = api.k(agent, "POST", f"/v1/reservations/{rid}/commit", json=done)
        assert commit.status_code == 200
    receiver.wait_for(lambda: len(receiver.received) >= 1, "the 80% alert")
    alert = receiver.received[0]
    assert verify(secret, alert)
    body = receiver.events()[0]
    assert body["event_type"] == "budget.threshold_crossed" and body["data"]["threshold"] == 0.8
    # utilisation counts what is reserved: the eighth reservation (7 spent + 1 reserved) crossed it
    assert body["scope"] == "tenant:acme/workspace:support" and body["data"]["spent"] == 7_000_000
    assert body["data"]["reserved"] == 1_000_000
    # 95% and 100% are not this subscription's thresholds: nothing more was delivered
    logs = api.a("GET", "/v1/admin/audit/logs?sort_dir=asc").json()["logs"]
    steps = [(x["operation"], x["status"], x["metadata"]["actor_type"]) for x in logs]
    assert steps == [
        ("createTenant", 201, "admin"),
        ("createApiKey", 201, "admin"),
        ("createBudget", 201, "admin"),
        ("updateWebhookSecurityConfig", 200, "admin"),
        ("createWebhookSubscription", 201, "admin"),
    ]
    assert len(receiver.received) == 1


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_one_dispatcher_per_deployment(
    backend: str, tmp_path: Any, request: pytest.FixtureRequest, receiver: Receiver, admin_spec: Any, runtime_spec: Any
) -> None:
    """Two servers over one ledger: both run a dispatcher, one delivers; each event arrives once."""
    from cycles.server import create_app
    from cycles.server.testing import ServerThread

    from .conftest import ADMIN_KEY

    if backend == "sqlite":
        url = f"sqlite:///{tmp_path}/shared.db"
    else:
        from tests.redis.backend import fresh_redis_url

        url = fresh_redis_url(request)
    with (
        ServerThread(create_app(url, admin_key=ADMIN_KEY, sweep_interval_s=0)) as one,
        ServerThread(create_app(url, admin_key=ADMIN_KEY, sweep_interval_s=0)) as two,
    ):
        a, b = Api(one.url, admin_spec, runtime_spec), Api(two.url, admin_spec, runtime_spec)
        try:
            a.tenant("acme")
            _hook(a, receiver)
            for i in range(10):
                (a if i % 2 else b).a("PATCH", "/v1/admin/tenants/acme", json={"name": f"n{i}"})
            receiver.wait_for(lambda: len(receiver.received) >= 10, "ten deliveries")
            ids = [e["event_id"] for e in receiver.events()]
            assert len(ids) == len(set(ids)) == 10  # each event once, from whichever server leads
        finally:
            a.close()
            b.close()
    assert len(receiver.received) == 10


def test_overdraft_debt_becomes_an_event(api: Api) -> None:
    api.tenant("acme")
    r = api.a(
        "POST",
        "/admin/budgets",
        json={
            "scope": "tenant:acme",
            "amount": {"unit": USD, "amount": 1000},
            "overdraft_limit": {"unit": USD, "amount": 500},
        },
    )
    assert r.status_code == 201
    key = api.key("acme")
    held = api.k(
        key,
        "POST",
        "/v1/reservations",
        json={"idempotency_key": "r1", "subject": {"tenant": "acme"}, "action": {"kind": "llm", "name": "m"},
              "estimate": {"unit": USD, "amount": 1000}, "overage_policy": "ALLOW_WITH_OVERDRAFT"},
    )  # fmt: skip
    assert held.status_code == 200, held.text
    rid = held.json()["reservation_id"]
    done = api.k(key, "POST", f"/v1/reservations/{rid}/commit",
                 json={"idempotency_key": "c1", "actual": {"unit": USD, "amount": 1200}})  # fmt: skip
    assert done.status_code == 200, done.text
    events = api.a("GET", "/v1/admin/events?event_type=budget.debt_incurred").json()["events"]
    assert len(events) == 1
    assert events[0]["data"]["debt_incurred"] == 200 and events[0]["data"]["total_debt"] == 200
    assert events[0]["data"]["overdraft_limit"] == 500
    # a limit lowered below the debt (PATCH changes the limit alone) enters over-limit, announced
    patched = api.a("PATCH", f"/v1/admin/budgets?scope=tenant:acme&unit={USD}",
                    json={"overdraft_limit": {"unit": USD, "amount": 100}})  # fmt: skip
    assert patched.status_code == 200 and patched.json()["is_over_limit"] is True
    entered = api.a("GET", "/v1/admin/events?event_type=budget.over_limit_entered").json()["events"]
    assert [(e["data"]["debt"], e["data"]["overdraft_limit"]) for e in entered] == [(200, 100)]


def test_bulk_actions_on_budgets_and_webhooks(api: Api, receiver: Receiver) -> None:
    api.tenant("acme")
    for ws in ("a", "b", "c"):
        api.budget(f"tenant:acme/workspace:{ws}", 100)
    body = {"filter": {"tenant_id": "acme", "scope_prefix": "tenant:acme/workspace:"}, "action": "CREDIT",
            "amount": {"unit": USD, "amount": 50}, "idempotency_key": "k1"}  # fmt: skip
    wrong = api.a("POST", "/v1/admin/budgets/bulk-action", json={**body, "expected_count": 2})
    assert wrong.status_code == 409 and wrong.json()["error"] == "COUNT_MISMATCH"
    done = api.a("POST", "/v1/admin/budgets/bulk-action", json={**body, "expected_count": 3}).json()
    assert done["total_matched"] == 3 and len(done["succeeded"]) == 3 and not done["failed"]
    ledgers = api.a("GET", "/v1/admin/budgets?tenant_id=acme&scope_prefix=tenant:acme/workspace:").json()["ledgers"]
    assert {x["allocated"]["amount"] for x in ledgers} == {150}
    assert len(api.a("GET", "/v1/admin/events?event_type=budget.funded").json()["events"]) == 3
    sid, _ = _hook(api, receiver)
    paused = api.a(
        "POST",
        "/v1/admin/webhooks/bulk-action",
        json={"filter": {"tenant_id": "acme"}, "action": "PAUSE", "idempotency_key": "p"},
    ).json()
    assert paused["succeeded"] == [{"id": sid}]
    assert api.a("GET", f"/v1/admin/webhooks/{sid}").json()["status"] == "PAUSED"
    ops = [
        x["operation"]
        for x in api.a("GET", "/v1/admin/audit/logs?operation=bulkActionBudgets,bulkActionWebhooks").json()["logs"]
    ]
    assert ops == ["bulkActionWebhooks", "bulkActionBudgets", "bulkActionBudgets"]
