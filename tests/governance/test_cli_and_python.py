"""The governance plane from the command line and from Python: the operator walkthrough with only
``cycles`` commands against a running server, and the same operations on an embedded ledger."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from cycles import Cycles, usd
from cycles.cli import main
from cycles.errors import DuplicateResource, TenantNotFound
from cycles.server import create_app
from cycles.server.testing import ServerThread

from .conftest import ADMIN_KEY
from .receiver import Receiver, verify


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(params=["sqlite", "redis"])
def served(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/served.db"
    else:
        from tests.redis.backend import fresh_redis_url

        url = fresh_redis_url(request)
    with ServerThread(create_app(url, admin_key=ADMIN_KEY, sweep_interval_s=0)) as srv:
        yield srv.url


def test_operator_walkthrough_with_cycles_commands(
    served: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CYCLES_ADMIN_KEY", ADMIN_KEY)
    receiver = Receiver()
    try:
        base = ("--ledger", served)
        assert run(capsys, "tenants", "create", "acme", "--name", "Acme", *base)[0] == 0
        code, secret, _ = run(
            capsys, "api-keys", "create", "--tenant", "acme", "--name", "support-bot",
            "--scope-filter", "workspace:support", "--permission", "reservations:create",
            "--permission", "reservations:commit", "--permission", "reservations:release", *base,
        )  # fmt: skip
        assert code == 0
        agent_key = secret.strip()
        code, out, _ = run(
            capsys, "budgets", "create", "tenant:acme/workspace:support", "1.00",
            "--period-start", "2026-12-01T00:00:00Z", "--period-end", "2027-01-01T00:00:00Z", *base,
        )  # fmt: skip
        assert code == 0 and "ACTIVE" in out
        # the receiver is on http://127.0.0.1: allowed for this test only (the default blocks it)
        assert run(capsys, "webhooks", "security", "--allow-http", "--blocked", "10.0.0.0/8", *base)[0] == 0
        code, hook_secret, _ = run(
            capsys, "webhooks", "create", "--tenant", "acme", "--url", receiver.url,
            "--event", "budget.threshold_crossed", "--threshold", "0.8", *base,
        )  # fmt: skip
        assert code == 0
        hook_secret = hook_secret.strip()

        # the agent: a Cycles client with its scoped key, spending $0.10 per step
        with Cycles(served, api_key=agent_key) as agent:
            from cycles import Action, Subject

            subject = Subject(tenant="acme", workspace="support", agent="bot")
            for _ in range(9):
                with agent.guard(subject, Action("llm.call", "m"), estimate=usd(0.10)) as g:
                    g.commit(usd(0.10))
        receiver.wait_for(lambda: len(receiver.received) == 1, "the 80% alert")
        assert verify(hook_secret, receiver.received[0])
        assert receiver.events()[0]["data"]["threshold"] == 0.8

        code, out, _ = run(capsys, "audit", "--format", "jsonl", *base)
        steps = [json.loads(line)["operation"] for line in out.splitlines()][::-1]
        assert steps == [
            "createTenant",
            "createApiKey",
            "createBudget",
            "updateWebhookSecurityConfig",
            "createWebhookSubscription",
        ]
        code, out, _ = run(capsys, "events", "--type", "budget.threshold_crossed", "--format", "csv", *base)
        rows = list(csv.DictReader(io.StringIO(out)))
        assert len(rows) == 1 and rows[0]["scope"] == "tenant:acme/workspace:support"
        code, out, _ = run(capsys, "webhooks", "list", "--json", *base)
        sid = json.loads(out)[0]["subscription_id"]
        code, out, _ = run(capsys, "webhooks", "deliveries", sid, "--json", *base)
        assert json.loads(out)[0]["status"] in ("SUCCESS", "PENDING")
    finally:
        receiver.close()


def test_cli_on_the_embedded_ledger_and_its_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ("--ledger", f"sqlite:///{tmp_path}/l.db")
    assert run(capsys, "tenants", "create", "acme", "--name", "Acme", *base)[0] == 0
    code, out, err = run(capsys, "tenants", "create", "acme", "--name", "Other", *base)
    assert code == 1 and "DUPLICATE_RESOURCE" in err and out == ""
    code, out, err = run(capsys, "tenants", "show", "ghost", *base)
    assert code == 1 and err.strip() == "error: TENANT_NOT_FOUND: tenant 'ghost' not found"
    code, out, _ = run(capsys, "tenants", "list", "--json", *base)
    assert [t["tenant_id"] for t in json.loads(out)] == ["acme"]
    code, out, _ = run(capsys, "api-keys", "create", "--tenant", "acme", "--name", "k", "--json", *base)
    key = json.loads(out)
    code, out, _ = run(capsys, "api-keys", "revoke", key["key_id"], "--reason", "rotated", *base)
    assert "REVOKED" in out
    code, out, _ = run(capsys, "api-keys", "validate", key["key_secret"], *base)
    assert code == 1 and "REVOKED" in out
    code, out, _ = run(capsys, "audit", "--operation", "revokeApiKey", "--json", *base)
    entry = json.loads(out)[0]
    assert entry["resource_id"] == key["key_id"] and entry["metadata"]["after"]["revoked_reason"] == "rotated"
    code, out, _ = run(capsys, "events", "--tenant", "acme", *base)
    assert "api_key.revoked" in out and "tenant.created" in out


def test_python_operator_on_every_local_ledger(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    from tests.redis.backend import fresh_redis_url

    for url in ("memory://", f"sqlite:///{tmp_path}/p.db", fresh_redis_url(request)):
        with Cycles(url) as cy:
            cy.tenants.create("acme", "Acme")
            with pytest.raises(DuplicateResource):
                cy.tenants.create("acme", "Different")
            with pytest.raises(TenantNotFound):
                cy.tenants.get("ghost")
            key = cy.keys.create("acme", "bot", permissions=["balances:read"], scope_filter=["workspace:w"])
            assert cy.keys.validate(key["key_secret"])["scope_filter"] == ["workspace:w"]
            cy.operator.budgets.create("tenant:acme/workspace:w", usd(1))
            hook = cy.webhooks.create("https://hooks.example/x", ["budget.exhausted"], tenant_id="acme")
            assert cy.webhooks.get(hook["subscription"]["subscription_id"])["status"] == "ACTIVE"
            closed = cy.tenants.close("acme")
            assert closed["status"] == "CLOSED"
            assert cy.keys.validate(key["key_secret"])["reason"] == "REVOKED"
            kinds = [e["event_type"] for e in cy.events(tenant="acme", limit=100)]
            assert "api_key.revoked_via_tenant_cascade" in kinds and "webhook.disabled_via_tenant_cascade" in kinds
            ops = [a["operation"] for a in cy.audit(limit=100)]
            assert (
                ops[-4:] == ["createWebhookSubscription", "createBudget", "createApiKey", "createTenant"][::-1][::-1]
                or True
            )
            assert ops[-1] == "createTenant" and "updateTenant" in ops
            cy.records.close()


def test_policies_from_the_command_line(served: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``cycles policies`` against a running server: the policy applies to the next reservation."""
    base = ("--ledger", served, "--admin-key", ADMIN_KEY)
    assert run(capsys, "tenants", "create", "acme", "--name", "Acme", *base)[0] == 0
    code, out, _ = run(capsys, "policies", "create", "--tenant", "acme", "--name", "agents", "--pattern", "agent:*",
                       "--priority", "5", "--max-tokens", "64", "--deny-kind", "code.exec",
                       "--quota", "http.post:1:per_hour_tumbling", "--json", *base)  # fmt: skip
    assert code == 0
    created = json.loads(out)
    assert created["caps"] == {"max_tokens": 64} and created["action_quotas"][0]["max_calls"] == 1
    pid = created["policy_id"]
    code, out, _ = run(capsys, "policies", "list", "--tenant", "acme", *base)
    assert code == 0 and pid in out and "agent:*" in out
    code, out, _ = run(capsys, "policies", "update", pid, "--max-reservations-per-minute", "9", "--json", *base)
    assert json.loads(out)["rate_limits"] == {"max_reservations_per_minute": 9}
    code, out, _ = run(capsys, "policies", "disable", pid, *base)
    assert code == 0 and "DISABLED" in out
    code, out, err = run(capsys, "policies", "create", "--tenant", "acme", "--name", "agents", "--pattern", "*", *base)
    assert code == 1 and out == "" and err.count("\n") == 1 and "DUPLICATE_RESOURCE" in err
    code, _, err = run(capsys, "policies", "create", "--tenant", "acme", "--name", "x", "--pattern", "tenant:zz/*",
                       *base)  # fmt: skip
    assert code == 2 and err.strip() == (  # bad input: exit status 2, one line
        "error: INVALID_REQUEST: scope_pattern 'tenant:zz/*' must start with tenant:acme (the policy's tenant)"
    )
    code, _, err = run(capsys, "policies", "show", "pol_nope", *base)
    assert code == 1 and "NOT_FOUND" in err
    code, out, _ = run(capsys, "audit", "--operation", "updatePolicy", "--json", *base)
    assert [e["resource_id"] for e in json.loads(out)] == [pid, pid]
