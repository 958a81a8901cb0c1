"""The governance plane from asyncio: ``AsyncCycles`` has the operator's groups, awaited, on every
ledger (in-process on the caller's loop, over HTTP on a server), with the same typed errors, and
the in-process app keeps its blocking stores off the event loop."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cycles import AsyncCycles, usd
from cycles.errors import DuplicateResource, TenantNotFound
from cycles.ledger.records import SqliteRecordStore
from cycles.operator import AsyncOperator
from cycles.server import create_app
from cycles.server.keys import SqliteKeyStore
from cycles.server.testing import ServerThread

from .conftest import ADMIN_KEY


async def walkthrough(acy: AsyncCycles) -> None:
    """Every group once, and the typed errors, through ``await``."""
    created = await acy.tenants.create("acme", "Acme")
    assert created["tenant_id"] == "acme"
    with pytest.raises(DuplicateResource):
        await acy.tenants.create("acme", "Different")
    with pytest.raises(TenantNotFound):
        await acy.tenants.get("ghost")
    assert [t["tenant_id"] for t in await acy.tenants.list()] == ["acme"]
    key = await acy.keys.create("acme", "bot", permissions=["balances:read"], scope_filter=["workspace:w"])
    assert (await acy.keys.validate(key["key_secret"]))["scope_filter"] == ["workspace:w"]
    await acy.operator.budgets.create("tenant:acme/workspace:w", usd(1))
    frozen = await acy.operator.budgets.freeze("tenant:acme/workspace:w", "USD_MICROCENTS")
    assert frozen["status"] == "FROZEN"
    hook = await acy.webhooks.create("https://hooks.example/x", ["budget.exhausted"], tenant_id="acme")
    sid = hook["subscription"]["subscription_id"]
    assert (await acy.webhooks.get(sid))["status"] == "ACTIVE"
    policy = await acy.policies.create("acme", "agents", "agent:*", caps={"max_tokens": 8})
    assert (await acy.policies.disable(policy["policy_id"]))["status"] == "DISABLED"
    assert [p["name"] for p in await acy.policies.list(tenant_id="acme")] == ["agents"]
    assert (await acy.tenants.suspend("acme"))["status"] == "SUSPENDED"
    assert (await acy.tenants.close("acme"))["status"] == "CLOSED"
    assert (await acy.keys.validate(key["key_secret"]))["reason"] == "REVOKED"
    kinds = [e["event_type"] for e in await acy.operator.events(tenant_id="acme")]
    assert "api_key.revoked_via_tenant_cascade" in kinds and "webhook.disabled_via_tenant_cascade" in kinds
    ops = [a["operation"] for a in await acy.operator.audit(limit=50)]
    assert ops[-1] == "createTenant" and "freezeBudget" in ops and "updateTenant" in ops


async def test_async_operator_on_every_local_ledger(ledger_url: str) -> None:
    async with AsyncCycles(ledger_url) as acy:
        assert isinstance(acy.operator, AsyncOperator)
        await walkthrough(acy)
        # the audit trail is the ledger's own: the sync reader sees what the async plane wrote
        assert any(a["operation"] == "createApiKey" for a in await acy.audit(limit=50))


async def test_async_operator_against_a_server(tmp_path: Path) -> None:
    app = create_app(f"sqlite:///{tmp_path}/srv.db", admin_key=ADMIN_KEY, sweep_interval_s=0)
    with ServerThread(app) as srv:
        async with AsyncCycles(srv.url, admin_key=ADMIN_KEY) as acy:
            await walkthrough(acy)
            assert (await acy.operator.introspect())["auth_type"] == "admin"


async def test_the_embedded_plane_keeps_blocking_work_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite's record and key stores block; every call to them must run in a worker thread."""
    calls: list[tuple[str, bool]] = []

    def watch(cls: type, name: str) -> None:
        original: Callable[..., Any] = getattr(cls, name)

        @functools.wraps(original)
        def watched(*args: Any, **kwargs: Any) -> Any:
            try:
                asyncio.get_running_loop()
                on_loop = True
            except RuntimeError:
                on_loop = False
            calls.append((name, on_loop))
            return original(*args, **kwargs)

        monkeypatch.setattr(cls, name, watched)

    for name in ("__init__", "append", "doc_get", "doc_swap", "doc_update", "doc_list", "page"):
        watch(SqliteRecordStore, name)
    for name in ("__init__", "_run"):
        watch(SqliteKeyStore, name)
    async with AsyncCycles(f"sqlite:///{tmp_path}/b.db") as acy:
        await walkthrough(acy)
    assert {"append", "doc_swap", "page", "_run"} <= {name for name, _ in calls}
    assert [name for name, on_loop in calls if on_loop] == []
