"""``cycles-mcp serve``: the nine cooperative tools end to end, on SQLite and Redis, over stdio and HTTP."""

from __future__ import annotations

import json
from typing import Any

import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from cycles import Cycles, risk_points
from cycles.testing import assert_ledger_invariant
from cycles_mcp.server import TOOL_NAMES, default_subject
from tests.mcp.conftest import Env

RISK = {"unit": "RISK_POINTS", "amount": 10}
ACTION = {"kind": "tool.deploy", "name": "deploy"}


def _json(result: Any) -> Any:
    return json.loads("".join(getattr(c, "text", "") for c in result.content))


async def _call(client: Client, tool: str, **args: Any) -> Any:
    result = await client.call_tool(tool, args)
    assert not result.is_error, f"{tool}: {result.content}"
    return _json(result)


async def test_nine_tools_end_to_end(any_env: Env) -> None:
    env = any_env
    with Cycles(env.ledger) as cy:
        cy.budgets.set("tenant:acme", risk_points(100))
    args = ["-m", "cycles_mcp.cli", "serve", "--ledger", env.ledger]
    async with env.stdio_client(args, CYCLES_DEFAULT_TENANT="acme", CYCLES_DEFAULT_AGENT="bot") as client:
        assert sorted(t.name for t in (await client.list_tools()).tools) == sorted(TOOL_NAMES)

        decision = await _call(client, "cycles_decide", idempotencyKey="d1", action=ACTION, estimate=RISK)
        assert decision["decision"] == "ALLOW"
        held = await _call(
            client, "cycles_reserve", idempotencyKey="r1", action=ACTION, estimate=RISK, ttlMs=60_000, gracePeriodMs=0
        )
        rid = held["reservation_id"]
        assert held["decision"] == "ALLOW"
        replay = await _call(
            client, "cycles_reserve", idempotencyKey="r1", action=ACTION, estimate=RISK, ttlMs=60_000, gracePeriodMs=0
        )
        assert replay["reservation_id"] == rid  # same key, same reservation
        extended = await _call(client, "cycles_extend", reservationId=rid, idempotencyKey="e1", extendByMs=30_000)
        assert extended["status"] == "ACTIVE"
        got = await _call(client, "cycles_get_reservation", reservationId=rid)
        assert got["subject"] == {"tenant": "acme", "agent": "bot"}  # the defaults filled the subject
        listed = await _call(client, "cycles_list_reservations", status="ACTIVE")
        assert [r["reservation_id"] for r in listed["reservations"]] == [rid]
        committed = await _call(
            client,
            "cycles_commit",
            reservationId=rid,
            idempotencyKey="c1",
            actual={"unit": "RISK_POINTS", "amount": 7},
            metrics={"latencyMs": 12, "tokensInput": 3},
        )
        assert committed["status"] == "COMMITTED" and committed["charged"]["amount"] == 7

        other = {"tenant": "acme", "workflow": "w1"}
        second = await _call(client, "cycles_reserve", idempotencyKey="r2", action=ACTION, estimate=RISK, subject=other)
        released = await _call(
            client, "cycles_release", reservationId=second["reservation_id"], idempotencyKey="x1", reason="not needed"
        )
        assert released["status"] == "RELEASED"
        event = await _call(
            client,
            "cycles_create_event",
            idempotencyKey="ev1",
            action=ACTION,
            actual={"unit": "RISK_POINTS", "amount": 3},
        )
        assert event["status"] == "APPLIED"
        balances = await _call(client, "cycles_check_balance", tenant="acme")
        (tenant,) = [b for b in balances["balances"] if b["scope"] == "tenant:acme"]
        assert (
            tenant["spent"]["amount"] == 10
            and tenant["reserved"]["amount"] == 0
            and tenant["remaining"]["amount"] == 90
        )

        resource = await client.read_resource("cycles://balances/acme")
        assert json.loads(resource.contents[0].text)[0]["scope"] == "tenant:acme"  # type: ignore[union-attr]
        detail = await client.read_resource(f"cycles://reservations/{rid}")
        assert json.loads(detail.contents[0].text)["status"] == "COMMITTED"  # type: ignore[union-attr]
        with pytest.raises(MCPError, match="NOT_FOUND"):
            await client.read_resource("cycles://reservations/nope")

        denied = await client.call_tool(
            "cycles_reserve",
            {"idempotencyKey": "big", "action": ACTION, "estimate": {"unit": "RISK_POINTS", "amount": 1000}},
        )
        assert denied.is_error and _json(denied)["error"] == "BUDGET_EXCEEDED"
        assert _json(denied)["details"]["scope"] == "tenant:acme"
        changed = {"idempotencyKey": "r1", "action": ACTION, "estimate": {"unit": "RISK_POINTS", "amount": 11}}
        mismatch = await client.call_tool("cycles_reserve", changed)
        assert mismatch.is_error and _json(mismatch)["error"] == "IDEMPOTENCY_MISMATCH"
    with Cycles(env.ledger) as cy:
        assert_ledger_invariant(cy)


async def test_http_transport_with_bearer_token(env: Env) -> None:
    with Cycles(env.ledger) as cy:
        cy.budgets.set("tenant:acme", risk_points(5))
    args = ["-m", "cycles_mcp.cli", "serve", "--ledger", env.ledger, "--token", "s3cret"]
    with env.http_server(args, CYCLES_DEFAULT_TENANT="acme") as url:
        response = httpx2.post(url, json={"jsonrpc": "2.0", "id": 1, "method": "ping"})
        assert response.status_code == 401
        auth = httpx2.AsyncClient(headers={"Authorization": "Bearer s3cret"})
        async with auth, Client(streamable_http_client(url, http_client=auth), mode="legacy") as client:
            five = {"unit": "RISK_POINTS", "amount": 5}
            held = await _call(client, "cycles_reserve", idempotencyKey="h1", action=ACTION, estimate=five)
            assert held["decision"] == "ALLOW"
            refused = await client.call_tool(
                "cycles_decide",
                {"idempotencyKey": "h2", "action": ACTION, "estimate": {"unit": "RISK_POINTS", "amount": 1}},
            )
            assert _json(refused)["decision"] == "DENY"


def test_default_subject_reads_every_level() -> None:
    environ = {"CYCLES_DEFAULT_TENANT": "acme", "CYCLES_DEFAULT_TOOLSET": "db", "CYCLES_DEFAULT_APP": ""}
    assert default_subject(environ) == {"tenant": "acme", "toolset": "db"}
